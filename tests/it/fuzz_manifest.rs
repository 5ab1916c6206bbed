//! A manifest fuzzer: every bundled `pipelines/*.toml`, mutated with a seeded generator,
//! must never crash kiln, and every manifest error must point into the file.
//!
//! Each case mutates one bundled manifest (one to three of: replace a number with an odd
//! value, replace a string with an odd string, delete / duplicate / swap lines, insert
//! random bytes, truncate), writes it to `pipelines/NAME.toml` in a temporary workspace and
//! runs `kiln dag pipelines/NAME.toml`, which loads the whole manifest (parse, `${params}`
//! interpolation, per-kind stage configs, the stage graph, plan checks) and touches no
//! cache. Mutants that dag accepts and whose mutations cannot have introduced a new path
//! (no string replacement, no inserted bytes) also get `kiln run --dry-run`, which opens the
//! cache inside the workspace and computes every stage key without running a stage.
//!
//! Rules: no exit 101, no death by signal (SIGABRT…), no panic message, no hang; exit 2
//! always names a location `NAME.toml:LINE:COL` inside the file (errors about the command
//! line itself excepted); `kiln dag` exits 1 only when the file is not UTF-8.
//!
//! Knobs: `KILN_FUZZ_SEED` (default: from the clock; printed), `KILN_FUZZ_CASES` (default
//! 2000), `KILN_FUZZ_SECS` (wall-clock budget, default 60), `KILN_FUZZ_CASE` (replay one case).

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kiln::rng::Rng;

use crate::support::{env_seed, env_u64, plain_command, tail};

const DAG_LIMIT: Duration = Duration::from_secs(30);
const DRY_RUN_LIMIT: Duration = Duration::from_secs(60);

struct Bundled {
    /// File stem: `quickstart` for `pipelines/quickstart.toml`.
    name: String,
    text: String,
}

fn bundled() -> Vec<Bundled> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut found: Vec<Bundled> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| Bundled {
            name: p.file_stem().unwrap().to_string_lossy().into_owned(),
            text: fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        })
        .collect();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(!found.is_empty(), "no manifests in {}", dir.display());
    found
}

// ---------------------------------------------------------------------------------------
// Running kiln

struct Ran {
    status: ExitStatus,
    stderr: String,
    timed_out: bool,
}

/// Runs kiln in `ws` with a time limit. Stderr goes to a file, not a pipe: an error that
/// quotes a 10 kB line several times must not stall kiln on a full pipe.
fn kiln(ws: &Path, args: &[&str], limit: Duration) -> Ran {
    let err = ws.join("logs/kiln.stderr");
    let mut child = plain_command(ws)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&err).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start kiln: {e}"));
    let started = Instant::now();
    let (status, timed_out) = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break (status, false);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            break (child.wait().unwrap(), true);
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    Ran { status, stderr: String::from_utf8_lossy(&fs::read(&err).unwrap_or_default()).into_owned(), timed_out }
}

/// Every `FILE:LINE:COL` in `text`.
fn locations(text: &str, file: &str) -> Vec<(usize, usize)> {
    let needle = format!("{file}:");
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find(&needle) {
        let rest = &text[from + i + needle.len()..];
        let line_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let after = &rest[line_len..];
        if line_len > 0 && after.starts_with(':') {
            let col_len = after[1..].bytes().take_while(u8::is_ascii_digit).count();
            if col_len > 0 {
                let line = rest[..line_len].parse().unwrap_or(usize::MAX);
                let col = after[1..1 + col_len].parse().unwrap_or(usize::MAX);
                found.push((line, col));
            }
        }
        from += i + needle.len();
    }
    found
}

/// Everything wrong with one kiln invocation on `mutant` (saved as `file`). `planning_only`:
/// the command does no I/O but reading the manifest, so exit 1 means it could not read it.
fn judge(ran: &Ran, file: &str, mutant: &[u8], planning_only: bool) -> Vec<String> {
    if ran.timed_out {
        return vec!["did not finish in time (a hang?)".into()];
    }
    let mut problems = Vec::new();
    if ran.status.code() == Some(101) {
        problems.push("panicked (exit 101)".into());
    }
    if let Some(sig) = ran.status.signal() {
        let name = if sig == libc::SIGABRT { " (SIGABRT)" } else { "" };
        problems.push(format!("killed by signal {sig}{name}"));
    }
    if ran.stderr.contains("panicked at") {
        problems.push("a panic message on stderr".into());
    }
    match ran.status.code() {
        Some(2) if ran.stderr.contains("Usage: kiln") => {} // about the command line itself
        Some(2) => {
            let lines = mutant.iter().filter(|&&b| b == b'\n').count() + 1;
            let found = locations(&ran.stderr, file);
            if found.is_empty() {
                problems.push(format!("exit 2 without a location `{file}:LINE:COL`"));
            }
            for (line, col) in found {
                if line == 0 || line > lines || col == 0 {
                    problems.push(format!("location {file}:{line}:{col} is outside the {lines}-line file"));
                }
            }
        }
        Some(1) if planning_only && std::str::from_utf8(mutant).is_ok() => {
            problems.push("exit 1 on a manifest that is valid UTF-8 (only reading it can fail)".into());
        }
        Some(0..=2) | None => {}
        Some(other) => problems.push(format!("unexpected exit code {other}")),
    }
    problems
}

// ---------------------------------------------------------------------------------------
// Mutations

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Number,
    Str,
    DeleteLine,
    DuplicateLine,
    SwapLines,
    InsertBytes,
    Truncate,
}

const KINDS: [Kind; 7] =
    [Kind::Number, Kind::Str, Kind::DeleteLine, Kind::DuplicateLine, Kind::SwapLines, Kind::InsertBytes, Kind::Truncate];

/// What a number is replaced with (TOML text).
const NUMBERS: [&str; 16] = [
    "nan",
    "inf",
    "-inf",
    "-1",
    "0",
    "1e308",
    "-1e308",
    "9223372036854775807",
    "2.5",
    "\"x\"",
    "[]",
    "{}",
    "true",
    "18446744073709551616",
    "-9223372036854775808",
    "1e-320",
];

/// Bytes that mean something to TOML, for insertions that stay printable.
const TOML_BYTES: &[u8] = b"[]{}=\"'#.,\n\\ 0123456789-+e_:$";

/// What a string is replaced with (TOML text).
fn odd_string(rng: &mut Rng) -> String {
    match rng.below(9) {
        0 => "\"\"".into(),
        1 => "\"../../x\"".into(),
        2 => "\"/\"".into(),
        3 => "\"\\u0000\"".into(),
        4 => format!("\"{}\"", "x".repeat(10 * 1024)),
        5 => "\"${params.nope}\"".into(),
        6 => "\"${params.\"".into(),
        7 => "\" \"".into(),
        _ => "\"é\\t🦀\"".into(),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tok {
    Num,
    Str,
}

#[derive(Clone, Copy)]
struct Token {
    kind: Tok,
    start: usize,
    end: usize,
}

/// End (exclusive) of a one-line string opened just before `j`; `None` if unterminated.
fn close_single(b: &[u8], mut j: usize, quote: u8) -> Option<usize> {
    while j < b.len() {
        match b[j] {
            b'\\' if quote == b'"' => j += 2,
            b'\n' => return None,
            c if c == quote => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// End (exclusive) of a multi-line string whose body starts at `j`.
fn close_multi(b: &[u8], mut j: usize, quote: u8) -> Option<usize> {
    let closing = [quote; 3];
    while j < b.len() {
        if b[j] == b'\\' && quote == b'"' {
            j += 2;
            continue;
        }
        if b[j..].starts_with(&closing) {
            let mut end = j + 3;
            // Up to two quotes right before the closing ones belong to the string.
            while end < b.len() && b[end] == quote && end < j + 5 {
                end += 1;
            }
            return Some(end);
        }
        j += 1;
    }
    None
}

fn starts_number(b: &[u8], i: usize) -> bool {
    let digit_at = |k: usize| b.get(k).is_some_and(u8::is_ascii_digit);
    let head = digit_at(i) || (matches!(b[i], b'+' | b'-') && digit_at(i + 1));
    let after_word = i > 0 && (b[i - 1].is_ascii_alphanumeric() || matches!(b[i - 1], b'_' | b'.' | b'-' | b'+'));
    head && !after_word
}

/// Numbers and strings of a TOML text, outside comments (a lexical approximation that also
/// works on bytes that are no longer UTF-8).
fn tokens(b: &[u8]) -> Vec<Token> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'#' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'"' || c == b'\'' {
            let triple = b[i..].starts_with(&[c; 3]);
            let end = if triple { close_multi(b, i + 3, c) } else { close_single(b, i + 1, c) };
            match end {
                Some(end) => {
                    out.push(Token { kind: Tok::Str, start: i, end });
                    i = end;
                }
                None if triple => break,
                None => {
                    while i < b.len() && b[i] != b'\n' {
                        i += 1;
                    }
                }
            }
        } else if starts_number(b, i) {
            let start = i;
            i += 1;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || matches!(b[i], b'_' | b'.' | b'+' | b'-')) {
                i += 1;
            }
            out.push(Token { kind: Tok::Num, start, end: i });
        } else {
            i += 1;
        }
    }
    out
}

fn split_lines(b: &[u8]) -> Vec<Vec<u8>> {
    b.split_inclusive(|&c| c == b'\n').map(<[u8]>::to_vec).collect()
}

/// A line to mutate: mostly one that means something (not blank, not a comment).
fn pick_line(lines: &[Vec<u8>], rng: &mut Rng) -> usize {
    let meaningful: Vec<usize> =
        (0..lines.len()).filter(|&i| lines[i].iter().find(|b| !b.is_ascii_whitespace()).is_some_and(|&b| b != b'#')).collect();
    if !meaningful.is_empty() && rng.below(5) != 0 {
        meaningful[rng.below(meaningful.len() as u64) as usize]
    } else {
        rng.below(lines.len() as u64) as usize
    }
}

/// For step descriptions: at most 60 characters.
fn short(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim_end_matches('\n');
    if text.chars().count() <= 60 {
        return text.to_string();
    }
    format!("{}… ({} bytes)", text.chars().take(60).collect::<String>(), bytes.len())
}

struct Mutant {
    bytes: Vec<u8>,
    steps: Vec<String>,
    /// No mutation could have introduced a path kiln would write to or hash (no new
    /// strings, no inserted bytes): safe for `kiln run --dry-run`.
    dry_run_safe: bool,
}

fn mutate(original: &[u8], rng: &mut Rng) -> Mutant {
    let mut bytes = original.to_vec();
    let mut steps = Vec::new();
    let mut dry_run_safe = true;
    let count = 1 + usize::from(rng.below(4) == 0) + usize::from(rng.below(8) == 0);
    for _ in 0..count {
        let kind = KINDS[rng.below(KINDS.len() as u64) as usize];
        let step = match kind {
            Kind::Number | Kind::Str => {
                let want = if kind == Kind::Number { Tok::Num } else { Tok::Str };
                let found: Vec<Token> = tokens(&bytes).into_iter().filter(|t| t.kind == want).collect();
                if found.is_empty() {
                    continue;
                }
                let t = found[rng.below(found.len() as u64) as usize];
                let with =
                    if kind == Kind::Number { NUMBERS[rng.below(NUMBERS.len() as u64) as usize].to_string() } else { odd_string(rng) };
                let old = short(&bytes[t.start..t.end]);
                bytes = [&bytes[..t.start], with.as_bytes(), &bytes[t.end..]].concat();
                if kind == Kind::Str {
                    dry_run_safe = false;
                }
                let what = if kind == Kind::Number { "number" } else { "string" };
                format!("replace {what} `{old}` at byte {} with `{}`", t.start, short(with.as_bytes()))
            }
            Kind::DeleteLine => {
                let mut lines = split_lines(&bytes);
                if lines.is_empty() {
                    continue;
                }
                let i = pick_line(&lines, rng);
                let gone = lines.remove(i);
                bytes = lines.concat();
                format!("delete line {} `{}`", i + 1, short(&gone))
            }
            Kind::DuplicateLine => {
                let mut lines = split_lines(&bytes);
                if lines.is_empty() {
                    continue;
                }
                let i = pick_line(&lines, rng);
                let copy = lines[i].clone();
                let step = format!("duplicate line {} `{}`", i + 1, short(&copy));
                lines.insert(i + 1, copy);
                bytes = lines.concat();
                step
            }
            Kind::SwapLines => {
                let mut lines = split_lines(&bytes);
                if lines.len() < 2 {
                    continue;
                }
                let i = pick_line(&lines, rng);
                let j = pick_line(&lines, rng);
                if i == j {
                    continue;
                }
                let step = format!("swap line {} `{}` with line {} `{}`", i + 1, short(&lines[i]), j + 1, short(&lines[j]));
                lines.swap(i, j);
                bytes = lines.concat();
                step
            }
            Kind::InsertBytes => {
                dry_run_safe = false;
                let at = rng.below(bytes.len() as u64 + 1) as usize;
                let n = 1 + rng.below(16) as usize;
                let raw = rng.below(2) == 0;
                let insert: Vec<u8> = (0..n)
                    .map(|_| if raw { rng.next_u64() as u8 } else { TOML_BYTES[rng.below(TOML_BYTES.len() as u64) as usize] })
                    .collect();
                bytes = [&bytes[..at], &insert[..], &bytes[at..]].concat();
                format!("insert bytes {insert:?} at byte {at}")
            }
            Kind::Truncate => {
                let at = rng.below(bytes.len() as u64 + 1) as usize;
                bytes.truncate(at);
                format!("truncate at byte {at}")
            }
        };
        steps.push(step);
    }
    Mutant { bytes, steps, dry_run_safe }
}

// ---------------------------------------------------------------------------------------
// The tests

/// A fresh workspace with `pipelines/` and `logs/`.
fn workspace() -> tempfile::TempDir {
    let ws = tempfile::Builder::new().prefix("kiln-fuzz-").tempdir().unwrap();
    fs::create_dir_all(ws.path().join("pipelines")).unwrap();
    fs::create_dir_all(ws.path().join("logs")).unwrap();
    ws
}

#[test]
fn every_bundled_manifest_plans_cleanly() {
    let ws = workspace();
    for m in bundled() {
        let rel = format!("pipelines/{}.toml", m.name);
        fs::write(ws.path().join(&rel), &m.text).unwrap();
        let dag = kiln(ws.path(), &["dag", rel.as_str()], DAG_LIMIT);
        let problems = judge(&dag, &format!("{}.toml", m.name), m.text.as_bytes(), true);
        assert!(
            problems.is_empty() && dag.status.code() == Some(0),
            "`kiln dag {rel}` as shipped: {problems:?}, {}\n{}",
            dag.status,
            dag.stderr
        );
    }
}

#[derive(Default)]
struct Counts {
    cases: u64,
    dag: [u64; 4], // exit 0, 1, 2, anything else
    dry_runs: u64,
}

/// Where a failing mutant is kept for replay.
fn save(seed: u64, case: u64, name: &str, bytes: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz_manifest-failures");
    let _ = fs::create_dir_all(&dir);
    let path = dir.join(format!("seed-{seed}-case-{case}-{name}.toml"));
    let _ = fs::write(&path, bytes);
    path
}

#[test]
fn mutated_manifests_never_crash_and_always_point_at_their_errors() {
    let manifests = bundled();
    let max_cases = env_u64("KILN_FUZZ_CASES", 2000);
    let budget = Duration::from_secs(env_u64("KILN_FUZZ_SECS", 60));
    let seed = env_seed("KILN_FUZZ_SEED");
    let only = std::env::var("KILN_FUZZ_CASE").ok().and_then(|v| v.trim().parse::<u64>().ok());
    let cases: Vec<u64> = match only {
        Some(case) => vec![case],
        None => (0..max_cases).collect(),
    };
    let ws = workspace();
    let started = Instant::now();
    let mut counts = Counts::default();
    let mut failures: Vec<String> = Vec::new();
    for case in cases {
        if started.elapsed() > budget {
            break;
        }
        let original = &manifests[(case % manifests.len() as u64) as usize];
        let mut rng = Rng::new(seed ^ case.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mutant = mutate(original.text.as_bytes(), &mut rng);
        let rel = format!("pipelines/{}.toml", original.name);
        let file = format!("{}.toml", original.name);
        fs::write(ws.path().join(&rel), &mutant.bytes).unwrap();
        counts.cases += 1;

        let dag = kiln(ws.path(), &["dag", rel.as_str()], DAG_LIMIT);
        counts.dag[match dag.status.code() {
            Some(c @ 0..=2) => c as usize,
            _ => 3,
        }] += 1;
        let mut problems: Vec<String> = judge(&dag, &file, &mutant.bytes, true).into_iter().map(|p| format!("kiln dag: {p}")).collect();
        let mut stderr = dag.stderr;
        if problems.is_empty() && dag.status.code() == Some(0) && mutant.dry_run_safe {
            let dry = kiln(ws.path(), &["run", "--dry-run", rel.as_str()], DRY_RUN_LIMIT);
            counts.dry_runs += 1;
            let found = judge(&dry, &file, &mutant.bytes, false);
            if !found.is_empty() {
                stderr = dry.stderr;
                problems.extend(found.into_iter().map(|p| format!("kiln run --dry-run: {p}")));
            }
        }
        if problems.is_empty() {
            continue;
        }
        let saved = save(seed, case, &original.name, &mutant.bytes);
        let text = String::from_utf8_lossy(&mutant.bytes);
        let shown: String = text.chars().take(6000).collect();
        let cut = if shown.len() < text.len() {
            format!("\n… ({} bytes in all; see the saved file)", mutant.bytes.len())
        } else {
            String::new()
        };
        failures.push(format!(
            "case {case} on {rel}: replay with KILN_FUZZ_SEED={seed} KILN_FUZZ_CASE={case} cargo test --test it fuzz_manifest::\n\
             mutations:\n  {}\nproblems:\n  {}\nstderr (tail):\n{}\nmutant (saved as {}):\n{shown}{cut}",
            mutant.steps.join("\n  "),
            problems.join("\n  "),
            tail(&stderr, 3000),
            saved.display()
        ));
    }
    eprintln!(
        "fuzz_manifest: seed={seed} cases={} (max {max_cases}) manifests={} dag_exit0={} dag_exit1={} dag_exit2={} dag_other={} dry_runs={} failures={} elapsed={:.1}s",
        counts.cases,
        manifests.len(),
        counts.dag[0],
        counts.dag[1],
        counts.dag[2],
        counts.dag[3],
        counts.dry_runs,
        failures.len(),
        started.elapsed().as_secs_f64()
    );
    if !failures.is_empty() {
        let shown = failures.len().min(5);
        panic!(
            "{} of {} mutated manifests broke a rule (KILN_FUZZ_SEED={seed}); the first {shown}:\n\n{}",
            failures.len(),
            counts.cases,
            failures[..shown].join("\n\n----------------------------------------\n\n")
        );
    }
}
