//! Settings the manifest carries for the engine: where stages run (`[pipeline] executor`)
//! and what a Slurm job for a stage asks for (`resources`). They are declared here, with
//! the rest of the manifest's schema, so the manifest needs nothing from the engine; the
//! engine ([`crate::exec`]) and the Slurm backend ([`crate::slurm`]) read them.

use serde::{Deserialize, Serialize};

/// Where stages run: this process's threads, or Slurm jobs (`sbatch`) that run kiln on a
/// node for one stage each, with the workspace and cache on a shared filesystem.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Executor {
    #[default]
    Local,
    Slurm,
}

/// `resources = { cpus = 2, mem = "4G", gpus = 1, time = "01:00:00", partition = "gpu" }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub cpus: Option<u32>,
    pub mem: Option<String>,
    pub gpus: Option<u32>,
    pub time: Option<String>,
    pub partition: Option<String>,
}

impl Resources {
    /// The `sbatch` flags that ask for these resources.
    pub fn sbatch_args(&self) -> Vec<String> {
        let mut a = Vec::new();
        if let Some(c) = self.cpus {
            a.push(format!("--cpus-per-task={c}"));
        }
        if let Some(m) = &self.mem {
            a.push(format!("--mem={m}"));
        }
        if let Some(g) = self.gpus {
            a.push(format!("--gres=gpu:{g}"));
        }
        if let Some(t) = &self.time {
            a.push(format!("--time={t}"));
        }
        if let Some(p) = &self.partition {
            a.push(format!("--partition={p}"));
        }
        a
    }
}
