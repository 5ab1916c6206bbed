//! The shared remote cache against a real S3 server: a one-node Garage started by the test
//! on 127.0.0.1 (sqlite metadata, replication factor 1). Skips when `garage` is not on PATH
//! (`.ci/run` installs it).

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::{command, free_port, shipped, stage_lines, stage_map, which, workspace_with};

const MANIFEST: &str = "pipelines/quickstart.toml";

struct Garage {
    child: Child,
    endpoint: String,
    key_id: String,
    secret: String,
    _dir: tempfile::TempDir,
}

impl Garage {
    fn start() -> Option<Garage> {
        let Some(bin) = which("garage") else {
            eprintln!("skipping: no `garage` on PATH (cargo install garage --locked)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let (rpc, s3) = (free_port(), free_port());
        let config = dir.path().join("garage.toml");
        let secret: String = (0..32).map(|i| format!("{:02x}", (i * 37 + 11) % 256)).collect();
        std::fs::write(
            &config,
            format!(
                r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"
"#,
                d = dir.path().display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("garage.log")).unwrap();
        let child = Command::new(&bin)
            .args(["-c", config.to_str().unwrap(), "server"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let node = loop {
            let out = Command::new(&bin).args(["-c", config.to_str().unwrap(), "node", "id", "-q"]).output().unwrap();
            if out.status.success() {
                break String::from_utf8_lossy(&out.stdout).trim().split('@').next().unwrap().to_string();
            }
            assert!(Instant::now() < deadline, "garage did not start: {}", std::fs::read_to_string(dir.path().join("garage.log")).unwrap());
            std::thread::sleep(Duration::from_millis(200));
        };
        garage_cli(&bin, &config, &["layout", "assign", "-z", "dc1", "-c", "1G", &node]);
        garage_cli(&bin, &config, &["layout", "apply", "--version", "1"]);
        garage_cli(&bin, &config, &["bucket", "create", "kiln-test"]);
        let key = garage_cli(&bin, &config, &["key", "create", "kiln-key"]);
        let field = |name: &str| {
            key.lines()
                .find_map(|l| l.trim().strip_prefix(name).map(|v| v.trim_start_matches(':').trim().to_string()))
                .unwrap_or_else(|| panic!("no `{name}` in {key}"))
        };
        let (key_id, secret_key) = (field("Key ID"), field("Secret key"));
        garage_cli(&bin, &config, &["bucket", "allow", "--read", "--write", "--owner", "kiln-test", "--key", "kiln-key"]);
        Some(Garage { child, endpoint: format!("http://127.0.0.1:{s3}"), key_id, secret: secret_key, _dir: dir })
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}

fn garage_cli(bin: &Path, config: &Path, args: &[&str]) -> String {
    // A fresh cluster takes a moment to accept layout and bucket commands.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(bin).args(["-c", config.to_str().unwrap()]).args(args).output().unwrap();
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(Instant::now() < deadline, "garage {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn kiln(ws: &Path, g: &Garage, args: &[&str]) -> Output {
    command(ws)
        .args(args)
        .env("AWS_ACCESS_KEY_ID", &g.key_id)
        .env("AWS_SECRET_ACCESS_KEY", &g.secret)
        .env("AWS_REGION", "garage")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(ws: &Path, g: &Garage, args: &[&str]) -> (String, String) {
    let out = kiln(ws, g, args);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "kiln {args:?}:\n{stdout}{stderr}");
    (stdout, stderr)
}

fn wipe(ws: &Path) {
    for d in ["cache", "outputs", "reports"] {
        let _ = std::fs::remove_dir_all(ws.join(d));
    }
}

#[test]
fn remote_cache_shares_results_detects_corruption_and_survives_outages() {
    let Some(mut garage) = Garage::start() else { return };
    let text = shipped(MANIFEST).replace("epochs = 12", "epochs = 3");
    let text = format!("{text}\n[cache.remote]\nurl = \"s3://kiln-test/team\"\nendpoint = \"{}\"\nregion = \"garage\"\n", garage.endpoint);
    let ws = workspace_with(MANIFEST, &text);
    let ws = ws.path();

    // 1. A run uploads every result.
    let (stdout, stderr) = ok(ws, &garage, &["run", MANIFEST]);
    let first = stage_lines(&stdout);
    assert_eq!(first.len(), 8);
    assert!(first.iter().all(|(_, o)| o.starts_with("ran")), "{stdout}");
    assert!(stderr.contains("uploaded") && !stderr.contains("unreachable"), "{stderr}");
    let lock = std::fs::read_to_string(ws.join("pipelines/quickstart.lock")).unwrap();
    let weights = std::fs::read(ws.join("outputs/quickstart/train/model.safetensors")).unwrap();

    // 2. Another machine (here: the same one with its cache gone) computes nothing.
    wipe(ws);
    let (stdout, _) = ok(ws, &garage, &["run", MANIFEST]);
    let second = stage_lines(&stdout);
    assert!(second.iter().all(|(_, o)| o.starts_with("cached (from remote")), "{stdout}");
    assert_eq!(std::fs::read_to_string(ws.join("pipelines/quickstart.lock")).unwrap(), lock, "same keys and output digests");
    assert_eq!(std::fs::read(ws.join("outputs/quickstart/train/model.safetensors")).unwrap(), weights);
    assert!(ws.join("reports/quickstart_rows.txt").is_file(), "workspace outputs are restored too");

    // 3. A corrupt object on the remote is detected, ignored, recomputed and replaced.
    let config = kiln::cache::remote::RemoteConfig {
        url: "s3://kiln-test/team".into(),
        endpoint: Some(garage.endpoint.clone()),
        region: Some("garage".into()),
        jobs: None,
    };
    let remote = kiln::cache::remote::Remote::open_with_credentials(&config, &garage.key_id, &garage.secret).unwrap();
    let name = kiln::cache::remote::Remote::blob_name(&kiln::Digest::of_bytes(&weights));
    remote.put_raw(&name, b"not the weights".to_vec()).unwrap();
    wipe(ws);
    let (stdout, stderr) = ok(ws, &garage, &["run", MANIFEST]);
    let third = stage_map(&stdout);
    assert!(stderr.contains("corrupt"), "{stderr}");
    assert!(third["train"].starts_with("ran"), "{stdout}");
    // Train recomputed the same artifact, so eval is taken from the remote (early cutoff).
    for stage in ["collect", "clean", "preprocess", "label", "convert", "summary", "eval"] {
        assert!(third[stage].starts_with("cached (from remote"), "{stage}: {stdout}");
    }
    assert_eq!(std::fs::read(ws.join("outputs/quickstart/train/model.safetensors")).unwrap(), weights, "training is reproducible");
    wipe(ws);
    let (stdout, _) = ok(ws, &garage, &["run", MANIFEST]);
    assert!(stage_lines(&stdout).iter().all(|(_, o)| o.starts_with("cached (from remote")), "the upload repaired the object: {stdout}");

    // 4. push and pull move the lock file's results explicitly.
    wipe(ws);
    let (stdout, _) = ok(ws, &garage, &["pull", MANIFEST]);
    assert!(stdout.starts_with("pulled 8 stage results"), "{stdout}");
    let (stdout, _) = ok(ws, &garage, &["run", MANIFEST, "--no-remote"]);
    assert!(stage_lines(&stdout).iter().all(|(_, o)| o == "cached" || o.starts_with("cached (restored")), "{stdout}");
    let (stdout, _) = ok(ws, &garage, &["push", MANIFEST]);
    assert!(stdout.starts_with("pushed 8 stage results: 0 objects uploaded"), "{stdout}");

    // 5. The remote goes away mid-run: the run still succeeds, locally, with one warning.
    wipe(ws);
    let started = Instant::now();
    let mut child = command(ws)
        .args(["run", MANIFEST, "-j", "1"])
        .env("AWS_ACCESS_KEY_ID", &garage.key_id)
        .env("AWS_SECRET_ACCESS_KEY", &garage.secret)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = String::new();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    for line in lines.by_ref() {
        let line = line.unwrap();
        stdout.push_str(&line);
        stdout.push('\n');
        if line.starts_with("collect ") {
            break;
        }
    }
    garage.stop();
    for line in lines {
        stdout.push_str(&line.unwrap());
        stdout.push('\n');
    }
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(child.wait().unwrap().success(), "{stdout}{stderr}");
    let fifth = stage_lines(&stdout);
    assert_eq!(fifth.len(), 8, "{stdout}");
    assert!(fifth[0].1.starts_with("cached (from remote"), "the first stage came from the remote: {stdout}");
    assert!(fifth.iter().any(|(_, o)| o.starts_with("ran")), "the rest ran locally: {stdout}");
    assert_eq!(stderr.matches("continuing with the local cache only").count(), 1, "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(120), "a dead remote costs seconds");
    assert_eq!(std::fs::read_to_string(ws.join("pipelines/quickstart.lock")).unwrap(), lock, "a local recompute gives the same lock");
}
