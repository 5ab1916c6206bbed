//! The Slurm executor on a real one-node cluster that the test starts itself (slurmctld and
//! slurmd from Debian's slurm-wlm, munge for authentication, a generated slurm.conf on
//! free ports). Skips when Slurm is not installed or the test is not root.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::{KILN, free_port, shipped, stage_map, which, workspace_with};

/// On `PATH`, or in /usr/sbin or /usr/bin (Slurm's daemons are in sbin, which a `PATH` may lack).
fn installed(program: &str) -> bool {
    which(program).is_some() || ["/usr/sbin", "/usr/bin"].iter().any(|d| Path::new(d).join(program).is_file())
}

struct Cluster {
    daemons: Vec<Child>,
    conf: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Option<Cluster> {
        if !installed("slurmctld") || !installed("slurmd") || !installed("sbatch") {
            eprintln!("skipping: Slurm is not installed (apt-get install slurm-wlm munge)");
            return None;
        }
        let uid = Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            eprintln!("skipping: the one-node Slurm cluster needs root");
            return None;
        }
        // munge authenticates every Slurm message; start it if nothing answers.
        if !Command::new("munge").arg("-n").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success()) {
            let _ = std::fs::create_dir_all("/run/munge");
            let _ = Command::new("chown").args(["munge:munge", "/run/munge"]).status();
            let started = Command::new("su").args(["-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"]).status().is_ok_and(|s| s.success())
                || Command::new("/usr/sbin/munged").arg("--force").status().is_ok_and(|s| s.success());
            assert!(started, "cannot start munged");
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let d = d.as_path();
        for sub in ["state", "spool", "log"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let host = String::from_utf8_lossy(&Command::new("hostname").arg("-s").output().unwrap().stdout).trim().to_string();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let conf = d.join("slurm.conf");
        std::fs::write(
            &conf,
            format!(
                "ClusterName=kilntest\nSlurmctldHost={host}(127.0.0.1)\nSlurmUser=root\nSlurmdUser=root\nAuthType=auth/munge\n\
                 StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\nSlurmctldPidFile={d}/ctld.pid\nSlurmdPidFile={d}/d.pid\n\
                 SlurmctldLogFile={d}/log/ctld.log\nSlurmdLogFile={d}/log/d.log\nSlurmctldPort={}\nSlurmdPort={}\n\
                 ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nJobAcctGatherType=jobacct_gather/none\n\
                 AccountingStorageType=accounting_storage/none\nSchedulerType=sched/backfill\nSelectType=select/cons_tres\n\
                 SelectTypeParameters=CR_Core\nReturnToService=2\nMpiDefault=none\nMinJobAge=600\n\
                 NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN\nPartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP\n",
                free_port(),
                free_port(),
                d = d.display()
            ),
        )
        .unwrap();
        let spawn = |program: &str| {
            Command::new(program).arg("-D").env("SLURM_CONF", &conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
        };
        let ctld = spawn("slurmctld");
        std::thread::sleep(Duration::from_millis(500));
        let slurmd = spawn("slurmd");
        let log = d.join("log/d.log");
        let cluster = Cluster { daemons: vec![ctld, slurmd], conf, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = cluster.cmd("sinfo").args(["-h", "-o", "%t"]).output().unwrap();
            if String::from_utf8_lossy(&out.stdout).trim() == "idle" {
                return Some(cluster);
            }
            assert!(Instant::now() < deadline, "the Slurm node never became idle: {}", std::fs::read_to_string(&log).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// `kiln run` in `ws`, in the background.
    fn spawn_run(&self, ws: &Path) -> Child {
        self.cmd(KILN).arg("run").current_dir(ws).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }

    fn kiln(&self, ws: &Path, args: &[&str]) -> Output {
        self.cmd(KILN).args(args).current_dir(ws).output().unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.cmd("scancel").args(["--user", "root"]).status();
        for d in &mut self.daemons {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

fn lock(ws: &Path) -> toml::Table {
    toml::from_str(&std::fs::read_to_string(ws.join("pipelines/quickstart.lock")).unwrap()).unwrap()
}

#[test]
fn slurm_runs_give_local_results_and_cancelled_jobs_fail_with_slurms_reason() {
    let Some(cluster) = Cluster::start() else { return };
    let text = shipped("pipelines/quickstart.toml").replace("epochs = 12", "epochs = 2");
    let (local, slurm) = (workspace_with("pipelines/quickstart.toml", &text), workspace_with("pipelines/quickstart.toml", &text));
    let out = cluster.kiln(local.path(), &["run", "pipelines/quickstart.toml"]);
    assert!(out.status.success());
    let out = cluster.kiln(slurm.path(), &["run", "pipelines/quickstart.toml", "--executor", "slurm"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let lines = stage_map(&stdout);
    assert_eq!(lines.len(), 8);
    assert!(lines.values().all(|o| o.starts_with("ran")), "{stdout}");
    assert_eq!(std::fs::read_dir(slurm.path().join("outputs/quickstart/.slurm")).unwrap().count(), 8, "one job log per stage");
    // The same keys and the same artifacts, byte for byte: the lock files are identical.
    assert_eq!(lock(local.path()), lock(slurm.path()));
    assert_eq!(
        std::fs::read(local.path().join("outputs/quickstart/train/model.safetensors")).unwrap(),
        std::fs::read(slurm.path().join("outputs/quickstart/train/model.safetensors")).unwrap()
    );
    // Cached stages submit nothing.
    let out = cluster.kiln(slurm.path(), &["run", "pipelines/quickstart.toml", "--executor", "slurm"]);
    assert!(stage_map(&String::from_utf8_lossy(&out.stdout)).values().all(|o| o == "cached"));

    // scancel of a running stage: failed with Slurm's reason, dependents skipped; the next
    // run redoes only what did not finish.
    let ws = tempfile::tempdir().unwrap();
    let ws = ws.path();
    std::fs::write(
        ws.join("kiln.toml"),
        "[pipeline]\nexecutor = \"slurm\"\n\n[stages.first]\nkind = \"command\"\ncmd = \"echo 1 > first.txt\"\nouts = [\"first.txt\"]\n\n\
         [stages.slow]\nkind = \"command\"\ninputs = [\"first\"]\ncmd = \"sleep 6 && cat first.txt > slow.txt\"\nouts = [\"slow.txt\"]\n\
         resources = { cpus = 1, time = \"00:05:00\" }\n\n\
         [stages.after]\nkind = \"command\"\ninputs = [\"slow\"]\ncmd = \"cat slow.txt > after.txt\"\nouts = [\"after.txt\"]\n",
    )
    .unwrap();
    let child = cluster.spawn_run(ws);
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = loop {
        let out = cluster.cmd("squeue").args(["-h", "-n", "kiln-kiln-slow", "-t", "RUNNING", "-o", "%i"]).output().unwrap();
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !id.is_empty() {
            break id;
        }
        assert!(Instant::now() < deadline, "the slow stage's job never ran");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(cluster.cmd("scancel").arg(&job).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let lines = stage_map(&stdout);
    assert!(lines["first"].starts_with("ran"), "{stdout}");
    assert!(lines["slow"].starts_with("failed") && lines["slow"].contains("CANCELLED"), "{stdout}");
    assert!(lines["after"].starts_with("skipped"), "{stdout}");
    let out = cluster.kiln(ws, &["run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let lines = stage_map(&stdout);
    assert_eq!(lines["first"], "cached", "{stdout}");
    assert!(lines["slow"].starts_with("ran") && lines["after"].starts_with("ran"), "{stdout}");
    assert_eq!(std::fs::read_to_string(ws.join("after.txt")).unwrap(), "1\n");

    // SIGTERM on `kiln run` cancels its jobs instead of leaving them to run.
    std::fs::write(ws.join("kiln.toml"), std::fs::read_to_string(ws.join("kiln.toml")).unwrap().replace("sleep 6", "sleep 30")).unwrap();
    let child = cluster.spawn_run(ws);
    let running = |cluster: &Cluster| {
        let out = cluster.cmd("squeue").args(["-h", "-n", "kiln-kiln-slow", "-o", "%i"]).output().unwrap();
        !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !running(&cluster) {
        assert!(Instant::now() < deadline, "the slow stage's job never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("interrupted: Slurm job"), "{}", String::from_utf8_lossy(&out.stdout));
    let deadline = Instant::now() + Duration::from_secs(20);
    while running(&cluster) {
        assert!(Instant::now() < deadline, "the job outlived `kiln run`");
        std::thread::sleep(Duration::from_millis(200));
    }
}
