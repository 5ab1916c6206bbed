//! `kind = "command"`: any shell command with declared outputs, DVC-style.
//!
//! ```toml
//! [stages.features]
//! kind = "command"
//! cmd = "python features.py --lr ${params.lr}"
//! deps = ["features.py", "data/raw"]
//! outs = ["data/features"]
//! params = ["threshold"]      # values from [params] the command reads by itself
//! env = { OMP_NUM_THREADS = "1" }
//! ```
//!
//! The command runs with `sh -c` in the workspace root, with `KILN_STAGE`, `KILN_PIPELINE`
//! and `KILN_SEED` set, and `KILN_INPUT_<STAGE>` naming the directory where each upstream
//! stage in `inputs` shows its artifact. Its standard output and error go to kiln's standard error, keeping
//! kiln's standard output for results.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;
use toml::de::DeValue;

use super::{Out, ParseContext, Stage, StageContext, StageError, StageKind};
use crate::diagnostic::Issue;
use crate::paths::{normalize_out, overlaps};

pub struct CommandKind;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    cmd: String,
    #[serde(default)]
    outs: Vec<Spanned<String>>,
    #[serde(default)]
    params: Vec<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

#[derive(Debug)]
pub struct CommandStage {
    cmd: String,
    outs: Vec<Out>,
    params: BTreeMap<String, serde_json::Value>,
    env: BTreeMap<String, String>,
}

impl StageKind for CommandKind {
    fn name(&self) -> &'static str {
        "command"
    }

    fn version(&self) -> u32 {
        1
    }

    fn parse(&self, table: Spanned<DeValue<'_>>, cx: &ParseContext<'_>) -> Result<Arc<dyn Stage>, Vec<Issue>> {
        let span = table.span();
        let raw: RawCommand = super::parse_config(table)?;
        let mut issues = Vec::new();
        if raw.cmd.trim().is_empty() {
            issues.push(Issue::new(span.clone(), "`cmd` is empty").help("give the shell command the stage runs"));
        }
        let mut outs: Vec<Out> = Vec::new();
        for out in raw.outs {
            match normalize_out(out.get_ref()) {
                Ok(path) => {
                    if let Some(prev) = outs.iter().find(|o| overlaps(&o.path, &path)) {
                        issues.push(
                            Issue::new(out.span(), format!("output `{path}` overlaps output `{}` of the same stage", prev.path))
                                .help("declare each output once; a directory covers what is inside it"),
                        );
                    }
                    outs.push(Out { path, span: out.span() });
                }
                Err(why) => issues.push(Issue::new(out.span(), format!("invalid output path `{}`: {why}", out.get_ref()))),
            }
        }
        let mut params = BTreeMap::new();
        for name in raw.params {
            let key = name.get_ref().strip_prefix("params.").unwrap_or(name.get_ref()).to_string();
            match cx.param(&key) {
                Some(v) => {
                    params.insert(key, v.clone());
                }
                None => issues.push(
                    Issue::new(name.span(), format!("unknown parameter `{key}`"))
                        .label("not in [params]")
                        .help(format!("define `{key}` under `[params]`")),
                ),
            }
        }
        if !issues.is_empty() {
            return Err(issues);
        }
        Ok(Arc::new(CommandStage { cmd: raw.cmd, outs, params, env: raw.env }))
    }
}

impl Stage for CommandStage {
    fn params(&self) -> serde_json::Value {
        let mut v = serde_json::json!({ "cmd": self.cmd });
        if !self.params.is_empty() {
            v["params"] = serde_json::to_value(&self.params).expect("json values serialise");
        }
        if !self.env.is_empty() {
            v["env"] = serde_json::to_value(&self.env).expect("strings serialise");
        }
        v
    }

    fn outs(&self) -> &[Out] {
        &self.outs
    }

    fn writes_workspace(&self) -> bool {
        true
    }

    fn run(&self, cx: &StageContext<'_>) -> Result<(), StageError> {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(&self.cmd)
            .current_dir(cx.root)
            .env("KILN_STAGE", cx.stage)
            .env("KILN_PIPELINE", cx.pipeline)
            .env("KILN_SEED", cx.seed.to_string())
            .envs(cx.inputs.keys().map(|name| (input_var(name), cx.outputs_dir.join(name))))
            .envs(&self.env)
            .stdin(Stdio::null())
            .stdout(std::io::stderr())
            .stderr(Stdio::inherit());
        die_with_parent(&mut command);
        tracing::debug!(stage = cx.stage, cmd = %self.cmd, "running command");
        let status = command.status().map_err(|source| StageError::Spawn { program: "sh".into(), source })?;
        if status.success() {
            return Ok(());
        }
        use std::os::unix::process::ExitStatusExt;
        Err(StageError::Exit(match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => "failed".into(),
        }))
    }
}

/// `KILN_INPUT_<STAGE>`: where an upstream stage's artifact can be read
/// (`prep-data` → `KILN_INPUT_PREP_DATA`).
pub fn input_var(stage: &str) -> String {
    format!("KILN_INPUT_{}", stage.to_ascii_uppercase().replace('-', "_"))
}

/// If kiln dies (even by `kill -9`), the command it started is killed too, instead of
/// writing outputs behind the back of the next run.
#[cfg(target_os = "linux")]
#[expect(unsafe_code, reason = "pre_exec runs between fork and exec; prctl is async-signal-safe")]
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure only calls prctl(2), which is async-signal-safe and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}
