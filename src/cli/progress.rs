//! Terminal rendering of engine events: indicatif bars on stderr when it is a terminal,
//! one line per finished stage on stdout.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::report::{Progress, Reporter, StageOutcome};

/// Hashing less than this is over before a bar is worth drawing.
const MIN_BYTES_FOR_BAR: u64 = 32 << 20;

pub struct CliReporter {
    multi: Option<MultiProgress>,
    quiet: bool,
    spinners: Mutex<HashMap<String, ProgressBar>>,
}

struct Bar(ProgressBar);

impl Progress for Bar {
    fn inc(&self, n: u64) {
        self.0.inc(n);
    }
    fn set_detail(&self, detail: &str) {
        self.0.set_prefix(detail.to_string());
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

struct Nothing;

impl Progress for Nothing {
    fn inc(&self, _: u64) {}
    fn finish(&self) {}
}

impl CliReporter {
    pub fn new(progress: bool, quiet: bool) -> Self {
        let multi = progress.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        CliReporter { multi, quiet, spinners: Mutex::new(HashMap::new()) }
    }

    /// Prints a line of results to stdout without tearing the bars. If the reader has gone
    /// away (`kiln run | head`), the work goes on and the output is dropped.
    pub fn line(&self, text: &str) {
        let print = || {
            use std::io::Write;
            let _ = writeln!(std::io::stdout().lock(), "{text}");
        };
        match &self.multi {
            Some(m) => m.suspend(print),
            None => print(),
        }
    }

    /// Prints a note for people to stderr.
    pub fn note(&self, text: &str) {
        if self.quiet {
            return;
        }
        let print = || {
            use std::io::Write;
            let _ = writeln!(std::io::stderr().lock(), "{text}");
        };
        match &self.multi {
            Some(m) => m.suspend(print),
            None => print(),
        }
    }

    pub fn clear(&self) {
        if let Some(m) = &self.multi {
            let _ = m.clear();
        }
    }
}

impl Reporter for CliReporter {
    fn progress(&self, label: &str, total: u64, unit: &'static str) -> Box<dyn Progress> {
        let Some(multi) = &self.multi else { return Box::new(Nothing) };
        if unit == "bytes" && total < MIN_BYTES_FOR_BAR {
            return Box::new(Nothing);
        }
        let bar = multi.add(ProgressBar::new(total));
        let template = if unit == "bytes" {
            "{msg:.dim} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
        } else {
            "{msg:.dim} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {prefix}"
        };
        bar.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> "));
        bar.set_message(label.to_string());
        Box::new(Bar(bar))
    }

    fn stage_started(&self, stage: &str) {
        if let Some(multi) = &self.multi {
            let spinner = multi.add(ProgressBar::new_spinner());
            spinner
                .set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").unwrap_or_else(|_| ProgressStyle::default_spinner()));
            spinner.set_message(stage.to_string());
            spinner.enable_steady_tick(Duration::from_millis(120));
            self.spinners.lock().expect("spinner map").insert(stage.to_string(), spinner);
        }
    }

    fn stage_finished(&self, stage: &str, outcome: &StageOutcome) {
        if let Some(s) = self.spinners.lock().expect("spinner map").remove(stage) {
            s.finish_and_clear();
        }
        self.line(&format!("{stage:<24} {}", outcome.describe()));
    }

    fn summary(&self, stage: &str, lines: &[String]) {
        for line in lines {
            self.note(&format!("  {stage}: {line}"));
        }
    }

    fn warn(&self, message: &str) {
        if !self.quiet {
            self.note(&format!("warning: {message}"));
        }
    }
}
