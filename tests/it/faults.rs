//! Fault injection on a real pipeline: what must never happen to kiln, whatever is done to
//! it or to its cache.
//!
//! A reduced copy of `pipelines/quickstart.toml` (fewer images and epochs, frequent training
//! checkpoints) runs once cleanly in a reference workspace; its lock file and every file
//! under `outputs/` (and the command stage's `reports/`) are recorded. Each scenario then
//! damages a workspace of its own (kill -9, flipped bytes, a broken state index, paths that
//! leave the workspace) and asserts that
//!
//! - no kiln process panics (exit 101 or a panic message), dies of a signal, or hangs;
//! - nothing outside the workspace changes (a sentinel directory beside it is digested
//!   before and after);
//! - after at most two plain `kiln run`s (and `kiln verify` where the scenario says so), the
//!   lock file and the files under `outputs/` equal the reference run's, byte for byte.
//!
//! Knobs (environment): `KILN_FAULT_SEED` (all random choices; printed, so a failure can be
//! replayed), `KILN_FAULT_CYCLES` (kill -9 cycles, default 20), `KILN_FAULT_BUDGET_SECS`
//! (wall-clock budget of the kill cycles, default 90), `KILN_FAULT_TIMEOUT_SECS` (the most
//! one kiln command may take before it counts as a hang, default 300).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kiln::rng::Rng;

use crate::support::{env_seed, env_u64, plain_command, shipped, tail};

const MANIFEST: &str = "pipelines/quickstart.toml";
const LOCK: &str = "pipelines/quickstart.lock";
const VIEWS: &str = "outputs/quickstart";

// ---------------------------------------------------------------------------------------
// Knobs and seeds

fn command_limit() -> Duration {
    Duration::from_secs(env_u64("KILN_FAULT_TIMEOUT_SECS", 300))
}

/// `KILN_FAULT_SEED`, else one drawn from the clock (and printed).
fn base_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| env_seed("KILN_FAULT_SEED"))
}

/// Each scenario draws from its own stream, so one scenario replays alone.
fn seed_for(name: &str) -> u64 {
    name.bytes().fold(base_seed() ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

// ---------------------------------------------------------------------------------------
// Running kiln

/// One finished kiln process.
struct Ran {
    args: Vec<String>,
    status: ExitStatus,
    stdout: String,
    stderr: String,
    timed_out: bool,
    elapsed: Duration,
}

impl Ran {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }

    fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    fn describe(&self) -> String {
        format!(
            "$ kiln {}\n{} after {:.1}s{}\n--- stdout (tail)\n{}\n--- stderr (tail)\n{}",
            self.args.join(" "),
            self.status,
            self.elapsed.as_secs_f64(),
            if self.timed_out { " (TIMED OUT: killed by the test)" } else { "" },
            tail(&self.stdout, 3000),
            tail(&self.stderr, 6000)
        )
    }

    /// What must never happen to a kiln process that the test did not kill on purpose.
    fn never(&self) -> Option<String> {
        if self.timed_out {
            return Some(format!("kiln did not finish within {}s (a hang?)", command_limit().as_secs()));
        }
        if self.status.code() == Some(101) {
            return Some("kiln panicked (exit 101)".into());
        }
        if let Some(sig) = self.status.signal() {
            let name = match sig {
                libc::SIGABRT => "SIGABRT (abort)",
                libc::SIGSEGV => "SIGSEGV",
                libc::SIGBUS => "SIGBUS",
                libc::SIGKILL => "SIGKILL (out of memory?)",
                _ => "a signal",
            };
            return Some(format!("kiln was killed by {name} ({sig})"));
        }
        if self.stderr.contains("panicked at") || self.stderr.contains("kiln bug") {
            return Some("kiln reported a panic on stderr".into());
        }
        None
    }
}

static LOG_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A started kiln process. Its output goes to files (never pipes: a killed kiln's orphaned
/// stage command could hold a pipe open, and a full pipe would stall kiln).
struct Running {
    child: Child,
    args: Vec<String>,
    stdout: PathBuf,
    stderr: PathBuf,
    started: Instant,
}

fn spawn(ws: &Path, logs: &Path, args: &[&str]) -> Running {
    fs::create_dir_all(logs).unwrap();
    let n = LOG_COUNTER.fetch_add(1, Ordering::Relaxed);
    let label = args.first().copied().unwrap_or("kiln");
    let stdout = logs.join(format!("{n:04}-{label}.stdout"));
    let stderr = logs.join(format!("{n:04}-{label}.stderr"));
    let child = plain_command(ws)
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&stdout).unwrap())
        .stderr(fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start kiln: {e}"));
    Running { child, args: args.iter().map(|a| a.to_string()).collect(), stdout, stderr, started: Instant::now() }
}

impl Running {
    /// Waits for the process to exit, or SIGKILLs it once `limit` has passed since it
    /// started. Returns what it did and whether the test killed it.
    fn finish(mut self, limit: Duration) -> (Ran, bool) {
        let mut killed = false;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if self.started.elapsed() >= limit {
                let _ = self.child.kill(); // SIGKILL
                killed = true;
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let elapsed = self.started.elapsed();
        let read = |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
        let ran = Ran {
            args: self.args,
            status,
            stdout: read(self.stdout.as_path()),
            stderr: read(self.stderr.as_path()),
            timed_out: false,
            elapsed,
        };
        (ran, killed)
    }
}

/// Runs kiln to the end (or to the hang limit).
fn run_kiln(ws: &Path, logs: &Path, args: &[&str]) -> Ran {
    let (mut ran, killed) = spawn(ws, logs, args).finish(command_limit());
    ran.timed_out = killed;
    ran
}

// ---------------------------------------------------------------------------------------
// The reference run

/// The bundled quickstart, made small enough to break many times: 240 images instead of 1600,
/// 3 epochs instead of 20, and a training checkpoint every 0.2 s so that kill -9 lands
/// between checkpoints (`checkpoint_secs` is not part of the stage key).
fn small_manifest() -> String {
    let mut text = shipped(MANIFEST);
    let edits =
        [("count = 1600", "count = 240"), ("epochs = 12", "epochs = 3"), ("[stages.train]\n", "[stages.train]\ncheckpoint_secs = 0.2\n")];
    for (from, to) in edits {
        assert!(text.contains(from), "{MANIFEST} no longer contains `{}`: update small_manifest() in tests/it/faults.rs", from.trim());
        text = text.replacen(from, to, 1);
    }
    text
}

struct Reference {
    /// The finished workspace. Scenarios copy it; nothing writes to it.
    dir: PathBuf,
    lock: String,
    outputs: BTreeMap<String, String>,
    /// How long the clean run took: the window in which kill -9 lands.
    duration: Duration,
}

fn reference() -> &'static Reference {
    static REFERENCE: OnceLock<Result<Reference, String>> = OnceLock::new();
    let built = REFERENCE.get_or_init(|| std::panic::catch_unwind(build_reference).map_err(|p| panic_text(&*p)));
    match built {
        Ok(r) => r,
        Err(e) => panic!("the clean reference run failed, so no scenario can be judged:\n{e}"),
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

fn build_reference() -> Reference {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kiln-faults");
    let dir = base.join("reference");
    let logs = base.join("reference-logs");
    for d in [&dir, &logs] {
        if d.exists() {
            fs::remove_dir_all(d).unwrap_or_else(|e| panic!("cannot remove the old {}: {e}", d.display()));
        }
    }
    fs::create_dir_all(dir.join("pipelines")).unwrap();
    fs::write(dir.join(MANIFEST), small_manifest()).unwrap();

    let first = run_kiln(&dir, &logs, &["run", MANIFEST]);
    if let Some(why) = first.never() {
        panic!("reference run: {why}\n{}", first.describe());
    }
    assert_eq!(first.code(), Some(0), "the clean reference run failed:\n{}", first.describe());
    let lock = fs::read_to_string(dir.join(LOCK)).unwrap_or_else(|e| panic!("{LOCK} after the reference run: {e}"));
    let outputs = observed(&dir);
    for must in ["train/model.safetensors", "train/model.json", "eval/metrics.json"] {
        assert!(outputs.contains_key(&format!("{VIEWS}/{must}")), "the reference run has no {VIEWS}/{must}: {:?}", outputs.keys());
    }
    let reference = Reference { dir, lock, outputs, duration: first.elapsed };

    // A second run must change nothing, or no comparison below would mean anything.
    let again = run_kiln(&reference.dir, &logs, &["run", MANIFEST]);
    if let Some(why) = again.never() {
        panic!("second reference run: {why}\n{}", again.describe());
    }
    assert_eq!(again.code(), Some(0), "the second reference run failed:\n{}", again.describe());
    if let Some(p) = mismatch(&reference.dir, &reference) {
        panic!("a second, cached run changed the reference workspace:\n{p}");
    }
    eprintln!(
        "faults: reference run of {MANIFEST} (reduced) took {:.1}s; {} files under outputs/; KILN_FAULT_SEED={}",
        reference.duration.as_secs_f64(),
        reference.outputs.len(),
        base_seed()
    );
    reference
}

// ---------------------------------------------------------------------------------------
// Looking at trees of files

/// Every entry under `dir`, keyed by its path relative to `base`: content digests, and
/// with `meta` also directories, symlinks and modes.
fn walk(base: &Path, dir: &Path, meta: bool, out: &mut BTreeMap<String, String>) {
    let rel = |p: &Path| p.strip_prefix(base).unwrap_or(p).to_string_lossy().into_owned();
    let items = match fs::read_dir(dir) {
        Ok(items) => items,
        Err(e) => {
            out.insert(rel(dir), format!("unreadable directory: {e}"));
            return;
        }
    };
    for item in items.flatten() {
        let path = item.path();
        let key = rel(path.as_path());
        let m = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                out.insert(key, format!("unreadable: {e}"));
                continue;
            }
        };
        if m.file_type().is_symlink() {
            let target = fs::read_link(&path).map(|t| t.display().to_string()).unwrap_or_else(|e| e.to_string());
            out.insert(key, format!("symlink -> {target}"));
        } else if m.is_dir() {
            if meta {
                out.insert(format!("{key}/"), format!("directory, mode {:o}", m.mode() & 0o7777));
            }
            walk(base, &path, meta, out);
        } else {
            let content = match fs::read(&path) {
                Ok(b) => format!("{} bytes, blake3 {}", b.len(), blake3::hash(&b).to_hex()),
                Err(e) => format!("unreadable: {e}"),
            };
            out.insert(key, if meta { format!("{content}, mode {:o}", m.mode() & 0o7777) } else { content });
        }
    }
}

/// The sentinel's state: names, kinds, modes, contents.
fn tree_state(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(dir, dir, true, &mut out);
    out
}

/// What a run leaves for people: files under `outputs/` and the command stage's
/// `reports/`. Not compared: kiln's own files at the top of `outputs/` (`.gitignore`, the
/// workspace run lock holding a pid) and HTML reports.
fn observed(ws: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for top in ["outputs", "reports"] {
        let dir = ws.join(top);
        if dir.exists() {
            walk(ws, &dir, false, &mut out);
        }
    }
    out.retain(|k, _| !k.starts_with("outputs/.") && !k.ends_with(".html"));
    out
}

fn cap(mut lines: Vec<String>, n: usize) -> String {
    if lines.len() > n {
        let more = lines.len() - n;
        lines.truncate(n);
        lines.push(format!("… and {more} more"));
    }
    lines.join("\n")
}

fn map_diff(want: &BTreeMap<String, String>, got: &BTreeMap<String, String>) -> String {
    let mut lines = Vec::new();
    for (k, v) in want {
        match got.get(k) {
            None => lines.push(format!("  missing {k} (reference: {v})")),
            Some(w) if w != v => lines.push(format!("  changed {k}: reference {v}, now {w}")),
            _ => {}
        }
    }
    for (k, w) in got {
        if !want.contains_key(k) {
            lines.push(format!("  extra   {k} ({w})"));
        }
    }
    cap(lines, 40)
}

fn line_diff(want: &str, got: &str) -> String {
    let (w, g): (Vec<&str>, Vec<&str>) = (want.lines().collect(), got.lines().collect());
    let mut lines: Vec<String> = w.iter().filter(|l| !g.contains(*l)).map(|l| format!("  - {l}")).collect();
    lines.extend(g.iter().filter(|l| !w.contains(*l)).map(|l| format!("  + {l}")));
    cap(lines, 40)
}

/// How the workspace differs from the reference run, if it does.
fn mismatch(ws: &Path, reference: &Reference) -> Option<String> {
    let mut problems = Vec::new();
    match fs::read_to_string(ws.join(LOCK)) {
        Ok(lock) if lock == reference.lock => {}
        Ok(lock) => problems.push(format!("{LOCK} differs from the reference run's:\n{}", line_diff(&reference.lock, &lock))),
        Err(e) => problems.push(format!("cannot read {LOCK}: {e}")),
    }
    let now = observed(ws);
    if now != reference.outputs {
        problems.push(format!("files under outputs/ differ from the reference run's:\n{}", map_diff(&reference.outputs, &now)));
    }
    (!problems.is_empty()).then(|| problems.join("\n"))
}

/// Regular files under `dir`, sorted (so that a seed picks the same ones every time).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(items) = fs::read_dir(&d) else { continue };
        for item in items.flatten() {
            let Ok(kind) = item.file_type() else { continue };
            if kind.is_dir() {
                stack.push(item.path());
            } else if kind.is_file() {
                out.push(item.path());
            }
        }
    }
    out.sort();
    out
}

/// Copies a workspace, keeping hard links (views are hard links into `cache/blobs`),
/// symlinks and modes.
fn copy_tree(from: &Path, to: &Path) {
    let mut links = HashMap::new();
    copy_dir(from, to, &mut links);
}

fn copy_dir(from: &Path, to: &Path, links: &mut HashMap<(u64, u64), PathBuf>) {
    fs::create_dir_all(to).unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
    for item in fs::read_dir(from).unwrap_or_else(|e| panic!("list {}: {e}", from.display())) {
        let item = item.unwrap();
        let (src, dst) = (item.path(), to.join(item.file_name()));
        let meta = fs::symlink_metadata(&src).unwrap();
        if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&src).unwrap(), &dst).unwrap();
        } else if meta.is_dir() {
            copy_dir(&src, &dst, links);
            fs::set_permissions(&dst, meta.permissions()).unwrap();
        } else if meta.is_file() {
            let id = (meta.dev(), meta.ino());
            if let Some(first) = links.get(&id) {
                fs::hard_link(first, &dst).unwrap_or_else(|e| panic!("link {}: {e}", dst.display()));
                continue;
            }
            if meta.nlink() > 1 {
                links.insert(id, dst.clone());
            }
            fs::copy(&src, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
        }
    }
}

/// The blob that the view file `view_rel` shows: the file in `cache/blobs` with the same
/// inode (views are hard links), else the blob named by the view's content digest.
fn blob_behind(ws: &Path, view_rel: &str) -> PathBuf {
    let view = ws.join(view_rel);
    let meta = fs::metadata(&view).unwrap_or_else(|e| panic!("{view_rel}: {e}"));
    let blobs = ws.join("cache/blobs");
    for path in files_under(&blobs) {
        if let Ok(m) = fs::symlink_metadata(&path)
            && m.ino() == meta.ino()
            && m.dev() == meta.dev()
        {
            return path;
        }
    }
    let hex = blake3::hash(&fs::read(&view).unwrap()).to_hex().to_string();
    let by_digest = blobs.join(&hex[..2]).join(&hex[2..]);
    assert!(by_digest.is_file(), "no blob behind {view_rel}: no hard link into cache/blobs and no {}", by_digest.display());
    by_digest
}

/// Runs `f` with `path` writable (blobs are read-only), then puts its mode back.
fn with_writable<T>(path: &Path, f: impl FnOnce() -> T) -> T {
    let mode = fs::metadata(path).unwrap().permissions().mode();
    fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o200)).unwrap();
    let result = f();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    result
}

/// Flips one byte at or after `from`, in place (hard links see it); returns its offset.
fn flip_byte(path: &Path, from: usize, rng: &mut Rng) -> usize {
    let mut bytes = fs::read(path).unwrap();
    assert!(bytes.len() > from, "{} has {} bytes, nothing to flip after {from}", path.display(), bytes.len());
    let pos = from + rng.below((bytes.len() - from) as u64) as usize;
    bytes[pos] ^= 1 + rng.below(255) as u8;
    with_writable(path, || fs::write(path, &bytes).unwrap());
    pos
}

fn truncate_half(path: &Path) -> u64 {
    let len = fs::metadata(path).unwrap().len();
    with_writable(path, || fs::OpenOptions::new().write(true).open(path).unwrap().set_len(len / 2).unwrap());
    len / 2
}

// ---------------------------------------------------------------------------------------
// A scenario's own workspace, with a sentinel directory beside it

struct Scene {
    name: &'static str,
    seed: u64,
    _tmp: tempfile::TempDir,
    ws: PathBuf,
    sentinel: PathBuf,
    logs: PathBuf,
    sentinel_before: BTreeMap<String, String>,
}

impl Scene {
    /// An empty workspace.
    fn new(name: &'static str) -> Scene {
        let tmp = tempfile::Builder::new().prefix(&format!("kiln-faults-{name}-")).tempdir().unwrap();
        let ws = tmp.path().join("ws");
        let sentinel = tmp.path().join("sentinel");
        let logs = tmp.path().join("logs");
        fs::create_dir_all(&ws).unwrap();
        fs::create_dir_all(&logs).unwrap();
        fs::create_dir_all(sentinel.join("sub/deep")).unwrap();
        fs::write(sentinel.join("README.txt"), "kiln must never change this directory\n").unwrap();
        fs::write(sentinel.join("sub/keep.txt"), "keep me\n").unwrap();
        let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        fs::write(sentinel.join("sub/deep/data.bin"), noise).unwrap();
        let sentinel_before = tree_state(&sentinel);
        Scene { name, seed: seed_for(name), _tmp: tmp, ws, sentinel, logs, sentinel_before }
    }

    /// A workspace holding only the reduced quickstart manifest.
    fn fresh(name: &'static str) -> Scene {
        let scene = Scene::new(name);
        fs::create_dir_all(scene.path("pipelines")).unwrap();
        fs::write(scene.path(MANIFEST), small_manifest()).unwrap();
        scene
    }

    /// A copy of the finished reference workspace (cache, lock, views).
    fn from_reference(name: &'static str) -> Scene {
        let reference = reference();
        let scene = Scene::new(name);
        copy_tree(&reference.dir, &scene.ws);
        scene
    }

    fn rng(&self) -> Rng {
        Rng::new(self.seed)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.ws.join(rel)
    }

    fn rel(&self, path: &Path) -> String {
        path.strip_prefix(&self.ws).unwrap_or(path).display().to_string()
    }

    fn spawn(&self, args: &[&str]) -> Running {
        spawn(&self.ws, &self.logs, args)
    }

    /// Runs kiln to the end; fails the test on a panic, a signal or a hang.
    fn kiln(&self, args: &[&str]) -> Ran {
        let ran = run_kiln(&self.ws, &self.logs, args);
        if let Some(why) = ran.never() {
            panic!("[{}] {why} (KILN_FAULT_SEED={}):\n{}", self.name, base_seed(), ran.describe());
        }
        ran
    }

    fn assert_outside_untouched(&self) {
        let now = tree_state(&self.sentinel);
        assert!(
            now == self.sentinel_before,
            "[{}] kiln changed files outside its workspace, in {}:\n{}",
            self.name,
            self.sentinel.display(),
            map_diff(&self.sentinel_before, &now)
        );
    }

    /// Plain `kiln run`s, at most `max_runs`, must bring the workspace back to the
    /// reference state (exit 0, same lock, same files under outputs/).
    fn settle(&self, max_runs: usize, context: &str) {
        let reference = reference();
        let mut attempts = Vec::new();
        for n in 1..=max_runs {
            let run = self.kiln(&["run", MANIFEST]);
            let problem =
                if run.code() != Some(0) { Some(format!("exit code {:?}, expected 0", run.code())) } else { mismatch(&self.ws, reference) };
            match problem {
                None => {
                    self.assert_outside_untouched();
                    return;
                }
                Some(p) => attempts.push(format!("plain run {n} of at most {max_runs}: {p}\n{}", run.describe())),
            }
        }
        self.assert_outside_untouched();
        panic!(
            "[{}] the workspace did not return to the reference state (KILN_FAULT_SEED={}).\n{context}\n\n{}",
            self.name,
            base_seed(),
            attempts.join("\n\n")
        );
    }
}

// ---------------------------------------------------------------------------------------
// 1. kill -9 at random moments

#[test]
fn kill_9_at_random_moments_then_one_run_matches_the_reference() {
    let reference = reference();
    let scene = Scene::fresh("kill9");
    let mut rng = scene.rng();
    let cycles = env_u64("KILN_FAULT_CYCLES", 20);
    let budget = Duration::from_secs(env_u64("KILN_FAULT_BUDGET_SECS", 90));
    let window = reference.duration.as_secs_f64();
    let started = Instant::now();
    let (mut done, mut killed, mut finished) = (0u64, 0u64, 0u64);
    let mut history = Vec::new();
    let mut failures = Vec::new();
    // After a run that finished by itself everything is cached; the next one is forced so
    // that there is work (and commits, and view rebuilds) to interrupt.
    let mut force = false;
    while done < cycles && started.elapsed() < budget {
        let delay = Duration::from_secs_f64(rng.unit() * window);
        let args: &[&str] = if force { &["run", MANIFEST, "--force"] } else { &["run", MANIFEST] };
        let (ran, by_us) = scene.spawn(args).finish(delay);
        done += 1;
        if by_us && ran.status.signal() == Some(libc::SIGKILL) {
            killed += 1;
            force = false;
            history.push(format!("cycle {done}: `kiln {}` killed after {:.2}s", args.join(" "), delay.as_secs_f64()));
        } else {
            finished += 1;
            force = true;
            history.push(format!("cycle {done}: `kiln {}` finished by itself in {:.2}s", args.join(" "), ran.elapsed.as_secs_f64()));
            // It finished before its moment came, on a workspace earlier kills left: it must
            // have finished well.
            if let Some(why) = ran.never() {
                failures.push(format!("cycle {done}: {why}\n{}", ran.describe()));
            } else if ran.code() != Some(0) {
                failures.push(format!("cycle {done}: a run after {killed} kill(s) failed by itself\n{}", ran.describe()));
            }
        }
    }
    eprintln!(
        "faults kill9: seed={} cycles={done} killed={killed} finished={finished} window={window:.1}s elapsed={:.1}s failures={}",
        base_seed(),
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    let context = format!("after kill -9 cycles:\n{}", history.join("\n"));
    assert!(failures.is_empty(), "[kill9] (KILN_FAULT_SEED={})\n{context}\n\n{}", base_seed(), failures.join("\n\n"));
    scene.assert_outside_untouched();
    scene.settle(1, &context);
}

// ---------------------------------------------------------------------------------------
// 2. Damaged cache objects

#[test]
fn corrupt_cache_objects_are_removed_by_verify_and_recomputed_by_run() {
    let scene = Scene::from_reference("cache-flips");
    let mut rng = scene.rng();
    let mut actions = Vec::new();
    let blobs: Vec<PathBuf> =
        files_under(&scene.path("cache/blobs")).into_iter().filter(|p| fs::metadata(p).is_ok_and(|m| m.len() >= 2)).collect();
    assert!(blobs.len() >= 5, "the reference cache has only {} non-trivial blobs", blobs.len());
    let mut order: Vec<usize> = (0..blobs.len()).collect();
    rng.shuffle(&mut order);
    for &i in &order[..3] {
        let pos = flip_byte(&blobs[i], 0, &mut rng);
        actions.push(format!("flipped byte {pos} of {}", scene.rel(&blobs[i])));
    }
    let half = truncate_half(&blobs[order[3]]);
    actions.push(format!("truncated {} to {half} bytes", scene.rel(&blobs[order[3]])));
    fs::remove_file(&blobs[order[4]]).unwrap();
    actions.push(format!("deleted {}", scene.rel(&blobs[order[4]])));
    for kind in ["trees", "stages"] {
        let files: Vec<PathBuf> =
            files_under(&scene.path(&format!("cache/{kind}"))).into_iter().filter(|p| fs::metadata(p).is_ok_and(|m| m.len() > 0)).collect();
        assert!(!files.is_empty(), "the reference cache has no {kind}");
        let file = &files[rng.below(files.len() as u64) as usize];
        let pos = flip_byte(file, 0, &mut rng);
        actions.push(format!("flipped byte {pos} of {}", scene.rel(file)));
    }
    let context = format!("damage done:\n{}", actions.join("\n"));

    let verify = scene.kiln(&["verify", MANIFEST]);
    eprintln!("faults cache-flips: seed={} damaged={} verify_exit={:?}", base_seed(), actions.len(), verify.code());
    assert!(
        matches!(verify.code(), Some(0 | 4)),
        "[cache-flips] kiln verify must exit 4 (corrupt entries removed) or 0 (KILN_FAULT_SEED={}).\n{context}\n{}",
        base_seed(),
        verify.describe()
    );
    scene.assert_outside_untouched();
    scene.settle(1, &context);
}

/// Flips a byte of tensor data in the blob behind `train/model.safetensors`: the file still
/// loads, the weights are silently different. Returns the context line for messages.
fn flip_model_weights(scene: &Scene, rng: &mut Rng) -> String {
    let view = format!("{VIEWS}/train/model.safetensors");
    let blob = blob_behind(&scene.ws, &view);
    // safetensors: 8 bytes of header length, the JSON header, then the tensors.
    let bytes = fs::read(&blob).unwrap();
    assert!(bytes.len() > 8, "{view} is too short to be safetensors");
    let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert!(data_start < bytes.len(), "{view}: header of {} bytes, file of {}", data_start, bytes.len());
    let pos = flip_byte(&blob, data_start, rng);
    format!("flipped byte {pos} (tensor data) of {} behind {view}", scene.rel(&blob))
}

#[test]
fn a_flipped_model_byte_never_gives_wrong_metrics() {
    let scene = Scene::from_reference("model-flip");
    let mut rng = scene.rng();
    let context = flip_model_weights(&scene, &mut rng);
    // The train view is a hard link to the damaged blob, so showing train's cached result
    // finds the damage and trains again; eval then scores the right weights. Either that
    // (exit 0) or a failed eval (exit 1) is right; metrics from the damaged weights, which
    // `settle` would find in the lock and outputs, are not.
    let forced = scene.kiln(&["run", MANIFEST, "eval", "--force"]);
    eprintln!("faults model-flip: seed={} forced_eval_exit={:?}", base_seed(), forced.code());
    assert!(matches!(forced.code(), Some(0 | 1)), "[model-flip] `kiln run --force eval`:\n{context}\n{}", forced.describe());
    scene.assert_outside_untouched();
    scene.settle(2, &context);
}

#[test]
fn a_flipped_model_byte_fails_eval_when_the_view_is_a_copy() {
    let scene = Scene::from_reference("model-flip-copy");
    let mut rng = scene.rng();
    // A view made by copying (a file system without hard links) does not share the blob's
    // bytes: train's cached result looks intact, and only eval's read of the weights can
    // find the damage. It must fail rather than score damaged weights.
    for file in files_under(&scene.path(&format!("{VIEWS}/train"))) {
        let copy = fs::read(&file).unwrap();
        fs::remove_file(&file).unwrap();
        fs::write(&file, &copy).unwrap();
    }
    let context = flip_model_weights(&scene, &mut rng);
    let forced = scene.kiln(&["run", MANIFEST, "eval", "--force"]);
    eprintln!("faults model-flip-copy: seed={} forced_eval_exit={:?}", base_seed(), forced.code());
    assert_eq!(
        forced.code(),
        Some(1),
        "[model-flip-copy] reading damaged weights must fail the eval stage (exit 1).\n{context}\n{}",
        forced.describe()
    );
    scene.assert_outside_untouched();
    scene.settle(2, &context);
}

// ---------------------------------------------------------------------------------------
// 3. Views over corrupt blobs

#[test]
fn verify_then_run_rebuilds_views_whose_blobs_were_corrupt() {
    let scene = Scene::from_reference("view-flips");
    let mut rng = scene.rng();
    let shards: Vec<PathBuf> = files_under(&scene.path(&format!("{VIEWS}/convert/shards")));
    assert!(!shards.is_empty(), "the reference convert view has no shards/");
    let shard = scene.rel(&shards[0]);
    let mut actions = Vec::new();
    for view in [format!("{VIEWS}/train/model.safetensors"), shard, format!("{VIEWS}/eval/metrics.json")] {
        let blob = blob_behind(&scene.ws, &view);
        let pos = flip_byte(&blob, 0, &mut rng);
        actions.push(format!("flipped byte {pos} of {} behind {view}", scene.rel(&blob)));
    }
    let context = format!("damage done:\n{}", actions.join("\n"));

    let verify = scene.kiln(&["verify", MANIFEST]);
    eprintln!("faults view-flips: seed={} damaged={} verify_exit={:?}", base_seed(), actions.len(), verify.code());
    assert_eq!(verify.code(), Some(4), "[view-flips] kiln verify must find the corrupt blobs (exit 4).\n{context}\n{}", verify.describe());
    scene.assert_outside_untouched();
    scene.settle(1, &context);
}

// ---------------------------------------------------------------------------------------
// 4. A damaged state index

fn damaged_state_index(name: &'static str, random_bytes: bool) {
    let scene = Scene::from_reference(name);
    let mut rng = scene.rng();
    let state = scene.path("cache/state.redb");
    let mut actions = Vec::new();
    for args in [["status", MANIFEST], ["run", MANIFEST], ["verify", MANIFEST]] {
        assert!(state.is_file(), "[{name}] no cache/state.redb to damage before `kiln {}`", args.join(" "));
        let len = fs::metadata(&state).unwrap().len();
        if random_bytes {
            let n = len.max(4096) as usize;
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            fs::write(&state, bytes).unwrap();
            actions.push(format!("overwrote cache/state.redb with {n} random bytes, then `kiln {}`", args.join(" ")));
        } else {
            fs::OpenOptions::new().write(true).open(&state).unwrap().set_len(len / 2).unwrap();
            actions.push(format!("truncated cache/state.redb from {len} to {} bytes, then `kiln {}`", len / 2, args.join(" ")));
        }
        let ran = scene.kiln(&args);
        assert_eq!(
            ran.code(),
            Some(0),
            "[{name}] `kiln {}` must rebuild a damaged state index and succeed.\n{}\n{}",
            args.join(" "),
            actions.join("\n"),
            ran.describe()
        );
        let said = ran.stderr.to_lowercase();
        assert!(
            ["state.redb", "state database", "state index", "file-state"].iter().any(|w| said.contains(*w)),
            "[{name}] `kiln {}` must warn on stderr that it rebuilt the state index.\n{}",
            args.join(" "),
            ran.describe()
        );
    }
    eprintln!("faults {name}: seed={} damaged={} commands=3 failures=0", base_seed(), actions.len());
    scene.assert_outside_untouched();
    scene.settle(1, &actions.join("\n"));
}

#[test]
fn a_truncated_state_index_is_rebuilt_with_a_warning() {
    damaged_state_index("state-truncated", false);
}

#[test]
fn a_state_index_of_random_bytes_is_rebuilt_with_a_warning() {
    damaged_state_index("state-random", true);
}

// ---------------------------------------------------------------------------------------
// 5. Paths that leave the workspace

#[test]
fn outs_through_a_symlink_that_leaves_the_workspace_are_refused() {
    for (name, out) in [("symlink-out", "link/sub"), ("symlink-dotdot-out", "link/../link/sub")] {
        let scene = Scene::new(name);
        std::os::unix::fs::symlink(&scene.sentinel, scene.path("link")).unwrap();
        let manifest = format!("[stages.escape]\nkind = \"command\"\ncmd = \"true\"\nouts = [\"{out}\"]\n");
        fs::write(scene.path("kiln.toml"), &manifest).unwrap();
        let run = scene.kiln(&["run", "kiln.toml"]);
        eprintln!("faults {name}: outs={out:?} exit={:?}", run.code());
        scene.assert_outside_untouched();
        assert_ne!(
            run.code(),
            Some(0),
            "[{name}] an output through `link` -> {} was accepted:\n{}",
            scene.sentinel.display(),
            run.describe()
        );
        assert_eq!(
            run.code(),
            Some(2),
            "[{name}] an output that resolves outside the workspace is a manifest error (exit 2):\n{manifest}\n{}",
            run.describe()
        );
    }
}

#[test]
fn a_cache_directory_that_is_not_a_kiln_cache_is_left_alone() {
    let scene = Scene::new("foreign-cache");
    let foreign = scene.ws.parent().unwrap().join("foreign");
    fs::create_dir_all(foreign.join("tmp")).unwrap();
    fs::write(foreign.join("tmp/keep.txt"), "precious\n").unwrap();
    fs::write(foreign.join("notes.txt"), "not a cache\n").unwrap();
    let manifest = format!(
        "[pipeline]\ncache = {:?}\n\n[stages.a]\nkind = \"command\"\ncmd = \"echo hi > a.txt\"\nouts = [\"a.txt\"]\n",
        foreign.display().to_string()
    );
    fs::write(scene.path("kiln.toml"), &manifest).unwrap();
    for cmd in ["status", "run"] {
        let ran = scene.kiln(&[cmd, "kiln.toml"]);
        eprintln!("faults foreign-cache: `kiln {cmd}` exit={:?}", ran.code());
        assert_eq!(
            fs::read_to_string(foreign.join("tmp/keep.txt")).ok().as_deref(),
            Some("precious\n"),
            "[foreign-cache] `kiln {cmd}` deleted or changed tmp/keep.txt in {}, which is not a kiln cache:\n{}",
            foreign.display(),
            ran.describe()
        );
        assert_eq!(fs::read_to_string(foreign.join("notes.txt")).ok().as_deref(), Some("not a cache\n"), "{}", ran.describe());
        assert!(
            matches!(ran.code(), Some(1 | 2)),
            "[foreign-cache] `kiln {cmd}` must refuse a cache directory that is not a kiln cache (exit 1 or 2):\n{manifest}\n{}",
            ran.describe()
        );
        assert!(
            ran.stderr.to_lowercase().contains("not a kiln cache"),
            "[foreign-cache] `kiln {cmd}` must say that the directory is not a kiln cache:\n{}",
            ran.describe()
        );
        assert!(!scene.path("a.txt").exists(), "[foreign-cache] `kiln {cmd}` ran a stage with a refused cache");
    }
    scene.assert_outside_untouched();
}

fn root_listing() -> BTreeSet<String> {
    fs::read_dir("/").unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
}

#[test]
fn the_filesystem_root_is_refused_as_a_cache() {
    let scene = Scene::new("root-cache");
    // Where this user may write to `/`, a kiln that did not refuse would empty `/tmp` (the
    // staging area of a cache at `/`): too dangerous to try.
    let me = fs::metadata(&scene.ws).unwrap();
    let root = fs::metadata("/").unwrap();
    let writable =
        me.uid() == 0 || root.mode() & 0o002 != 0 || root.mode() & 0o020 != 0 || (root.uid() == me.uid() && root.mode() & 0o200 != 0);
    if writable {
        eprintln!("faults root-cache: skipped: this user may write to `/`");
        return;
    }
    let manifest = "[pipeline]\ncache = \"/\"\n\n[stages.a]\nkind = \"command\"\ncmd = \"echo hi > a.txt\"\nouts = [\"a.txt\"]\n";
    fs::write(scene.path("kiln.toml"), manifest).unwrap();
    let before = root_listing();
    for cmd in ["status", "run"] {
        let ran = scene.kiln(&[cmd, "kiln.toml"]);
        eprintln!("faults root-cache: `kiln {cmd}` exit={:?}", ran.code());
        assert_eq!(root_listing(), before, "[root-cache] `kiln {cmd}` changed `/`:\n{}", ran.describe());
        assert!(
            matches!(ran.code(), Some(1 | 2)),
            "[root-cache] `kiln {cmd}` must refuse `cache = \"/\"` (exit 1 or 2):\n{}",
            ran.describe()
        );
        assert!(!scene.path("a.txt").exists(), "[root-cache] `kiln {cmd}` ran a stage with the cache at `/`");
    }
    scene.assert_outside_untouched();
}

#[test]
fn a_cache_that_would_contain_the_workspace_is_refused() {
    // The check that refuses `cache = "/"`, exercised where it is safe whoever runs it: a
    // cache at the workspace's parent (which holds the sentinel) or at the workspace itself.
    for cache in ["..", "."] {
        let scene = Scene::new("ancestor-cache");
        let manifest =
            format!("[pipeline]\ncache = \"{cache}\"\n\n[stages.a]\nkind = \"command\"\ncmd = \"echo hi > a.txt\"\nouts = [\"a.txt\"]\n");
        fs::write(scene.path("kiln.toml"), manifest).unwrap();
        for cmd in ["status", "run"] {
            let ran = scene.kiln(&[cmd, "kiln.toml"]);
            assert_eq!(
                ran.code(),
                Some(2),
                "[ancestor-cache] `kiln {cmd}` with cache = {cache:?} must be a manifest error:\n{}",
                ran.describe()
            );
            assert!(ran.stderr.contains("kiln.toml:2:"), "[ancestor-cache] the error points at the `cache` line:\n{}", ran.describe());
            assert!(!scene.path("a.txt").exists(), "[ancestor-cache] `kiln {cmd}` ran a stage");
        }
        assert!(
            !scene.path("CACHEDIR.TAG").exists() && !scene.path("blobs").exists(),
            "[ancestor-cache] kiln wrote a cache into the workspace"
        );
        scene.assert_outside_untouched();
    }
}

// ---------------------------------------------------------------------------------------
// 6. A missing blob

#[test]
fn a_missing_blob_is_recomputed_not_an_error() {
    let scene = Scene::from_reference("missing-blob");
    let view = format!("{VIEWS}/train/model.json");
    let blob = blob_behind(&scene.ws, &view);
    let want = fs::read(&blob).unwrap();
    fs::remove_file(&blob).unwrap();
    let context = format!("deleted {} behind {view}", scene.rel(&blob));

    let run = scene.kiln(&["run", MANIFEST]);
    eprintln!("faults missing-blob: run_exit={:?}", run.code());
    assert!(!run.output().contains("No such file"), "[missing-blob] {context}: the run tripped over the missing blob:\n{}", run.describe());
    assert_eq!(run.code(), Some(0), "[missing-blob] {context}: kiln run must recompute, not fail:\n{}", run.describe());
    assert!(
        fs::read(&blob).is_ok_and(|b| b == want),
        "[missing-blob] {context}: the run did not store the blob again:\n{}",
        run.describe()
    );
    if let Some(p) = mismatch(&scene.ws, reference()) {
        panic!("[missing-blob] {context}: the run did not restore the reference state:\n{p}\n{}", run.describe());
    }
    let verify = scene.kiln(&["verify", MANIFEST]);
    assert_eq!(verify.code(), Some(0), "[missing-blob] {context}: the cache is still damaged after the run:\n{}", verify.describe());
    scene.assert_outside_untouched();
}

#[test]
fn a_missing_blob_behind_a_deleted_view_is_recomputed_not_an_error() {
    let scene = Scene::from_reference("missing-blob-no-view");
    let view = format!("{VIEWS}/train/model.json");
    let blob = blob_behind(&scene.ws, &view);
    fs::remove_file(&blob).unwrap();
    fs::remove_dir_all(scene.path(&format!("{VIEWS}/train"))).unwrap();
    let context = format!("deleted {} behind {view}, and the view {VIEWS}/train", scene.rel(&blob));

    let run = scene.kiln(&["run", MANIFEST]);
    eprintln!("faults missing-blob-no-view: run_exit={:?}", run.code());
    assert!(
        !run.output().contains("No such file"),
        "[missing-blob-no-view] {context}: the run tripped over the missing blob:\n{}",
        run.describe()
    );
    assert_eq!(run.code(), Some(0), "[missing-blob-no-view] {context}: kiln run must recompute, not fail:\n{}", run.describe());
    if let Some(p) = mismatch(&scene.ws, reference()) {
        panic!("[missing-blob-no-view] {context}: the run did not restore the reference state:\n{p}\n{}", run.describe());
    }
    scene.assert_outside_untouched();
}
