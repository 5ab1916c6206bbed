//! What the test modules share: running the `kiln` binary, temporary workspaces, reading
//! JSON and `kiln run`'s per-stage lines, and small file and process helpers.
//!
//! Two environments run kiln. [`command`] passes the test's environment through unchanged;
//! [`plain_command`] sets `NO_COLOR=1` and removes `RUST_LOG`, so that neither colour codes
//! nor log lines chosen by whoever runs the tests reach output that a test reads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The `kiln` binary under test.
pub const KILN: &str = env!("CARGO_BIN_EXE_kiln");

// ---------------------------------------------------------------------------------------
// Running kiln

/// `kiln` in `dir`, with the test's environment.
pub fn command(dir: &Path) -> Command {
    let mut c = Command::new(KILN);
    c.current_dir(dir);
    c
}

/// `kiln` in `dir` with `NO_COLOR=1` and without `RUST_LOG`.
pub fn plain_command(dir: &Path) -> Command {
    let mut c = command(dir);
    c.env("NO_COLOR", "1").env_remove("RUST_LOG");
    c
}

/// Runs `kiln ARGS` in `dir` ([`command`]'s environment).
pub fn kiln(dir: &Path, args: &[&str]) -> Output {
    command(dir).args(args).output().unwrap()
}

/// Runs `kiln ARGS` in `dir` ([`command`]'s environment), asserts that it succeeded and
/// returns its stdout.
pub fn ok(dir: &Path, args: &[&str]) -> String {
    let out = kiln(dir, args);
    assert!(out.status.success(), "kiln {args:?}:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `kiln ARGS` in `dir` ([`plain_command`]'s environment).
pub fn kiln_plain(dir: &Path, args: &[&str]) -> Output {
    plain_command(dir).args(args).output().unwrap()
}

/// Runs `kiln ARGS` in `dir` ([`plain_command`]'s environment), asserts that it succeeded
/// and returns its output.
pub fn plain_ok(dir: &Path, args: &[&str]) -> Output {
    let out = kiln_plain(dir, args);
    assert!(out.status.success(), "{}", text(&out));
    out
}

/// Stdout and stderr of a finished process, labelled, for failure messages.
pub fn text(out: &Output) -> String {
    format!("--- stdout\n{}--- stderr\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A diagnostic with its line wrapping (and the `│` of its gutter) undone: every run of
/// whitespace becomes one space, so a message can be found whatever the terminal width.
pub fn unwrap_diagnostic(text: &str) -> String {
    text.replace('│', " ").split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `(stage, outcome)` for each of `kiln run`'s per-stage lines whose outcome starts with
/// `ran`, `cached`, `failed` or `skipped`, in the order printed. The outcome keeps its
/// detail: `ran (1.2s)`, `cached (from remote)`.
pub fn stage_lines(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(char::is_whitespace)?;
            let rest = rest.trim();
            ["ran", "cached", "failed", "skipped"].iter().any(|w| rest.starts_with(w)).then(|| (name.to_string(), rest.to_string()))
        })
        .collect()
}

/// [`stage_lines`] by stage name.
pub fn stage_map(stdout: &str) -> BTreeMap<String, String> {
    stage_lines(stdout).into_iter().collect()
}

// ---------------------------------------------------------------------------------------
// Workspaces

/// The text of a file shipped with kiln, relative to the crate root (`pipelines/quickstart.toml`).
pub fn shipped(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A new temporary workspace holding `text` at `rel` (its folders created).
pub fn workspace_with(rel: &str, text: &str) -> tempfile::TempDir {
    let ws = tempfile::tempdir().unwrap();
    write(&ws.path().join(rel), text.as_bytes());
    ws
}

/// A temporary workspace with a `kiln.toml`, whose commands run in
/// [`plain_command`]'s environment.
pub struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new(manifest: &str) -> Self {
        let ws = Workspace { dir: tempfile::tempdir().unwrap() };
        ws.write("kiln.toml", manifest);
        ws
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) {
        write(&self.path(rel), text.as_bytes());
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = plain_command(self.dir.path());
        c.args(args);
        c
    }

    pub fn kiln(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }
}

/// `../shared/REL` beside the repository, or `None` (and a note that the test skips) when
/// it is absent.
pub fn shared(rel: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared").join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: {} is absent", p.display());
        None
    }
}

// ---------------------------------------------------------------------------------------
// Files

/// Writes `bytes` to `path`, creating its folders.
pub fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// Reads a JSON file; a missing file fails the test with its path.
pub fn read_json(path: impl AsRef<Path>) -> serde_json::Value {
    let path = path.as_ref();
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// Parses JSON that kiln printed.
pub fn parse_json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

/// Sets a file's modification time a minute back, so that a later write within the same
/// clock tick still changes it.
pub fn backdate(path: &Path) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(60)).unwrap();
}

/// `img` as PNG bytes.
pub fn png(img: &image::DynamicImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// The CRC-32 of a PNG chunk (IEEE polynomial), for tests that forge PNG headers.
/// `src/imaging/mod.rs`'s unit tests have the same function.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

// ---------------------------------------------------------------------------------------
// The machine

/// Where `program` is on `PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(program)).find(|p| p.is_file())
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `cond` every 20 ms; fails the test after 30 s.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------
// Knobs

/// A whole number from the environment variable `name`, else `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

/// A seed from the environment variable `name`, else one drawn from the clock (print it, so
/// that a failure can be replayed).
pub fn env_seed(name: &str) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64))
}

/// The last `n` bytes of `s` (fewer, to start on a character boundary).
pub fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut start = s.len() - n;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}
