//! Neural-network building blocks on candle that kiln owns.
//!
//! candle ships layers, but three of its facts get in the way of reproducible training
//! (see `../shared/models/README.md`): its CPU random generator cannot be seeded, the
//! `candle-transformers` models keep batch norm in eval mode, and depthwise convolution
//! runs one convolution per channel. So kiln keeps its own small set of trainable modules:
//! parameters live in a [`ParamStore`] initialised from kiln's pinned [`Rng`], batch norm
//! trains, dropout draws its masks from a seeded stream, and depthwise convolution is a
//! custom op ([`depthwise`]).

pub mod activation;
pub mod batchnorm;
pub mod conv;
pub mod depthwise;
pub mod device;
pub(crate) mod gemm;
pub mod input;
pub mod layers;
pub mod loss;
pub mod models;
pub mod optim;
pub mod pool;
pub mod schedule;

use std::collections::BTreeMap;
use std::path::Path;

use std::cell::Cell;

use candle_core::{DType, Device, Tensor, Var};

use crate::rng::Rng;

pub use candle_core::Error as CandleError;
pub type Result<T> = std::result::Result<T, CandleError>;

/// kiln's CPU kernels, each of which falls back to candle's ops off the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    Conv = 1,
    Depthwise = 2,
    BatchNorm = 4,
    Activation = 8,
    Pool = 16,
}

thread_local! {
    /// Kernels that tests have switched to candle's ops on the CPU: the path every other
    /// device takes.
    static FALLBACK: Cell<u8> = const { Cell::new(0) };
}

/// Whether kiln's CPU kernel `k` applies to these tensors: f32 on the CPU. Elsewhere (CUDA,
/// Metal, other dtypes) each op falls back to candle's own ops.
pub(crate) fn kernels_apply(k: Kernel, ts: &[&Tensor]) -> bool {
    FALLBACK.with(Cell::get) & k as u8 == 0 && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Runs `f` with the given kernels on their candle fallback (on this thread), so that the
/// path a GPU takes is checked against kiln's kernels on the CPU.
#[cfg(test)]
pub(crate) fn with_fallback<R>(kernels: &[Kernel], f: impl FnOnce() -> R) -> R {
    let mask = kernels.iter().fold(0u8, |m, k| m | *k as u8);
    let before = FALLBACK.with(|c| c.replace(mask));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    FALLBACK.with(|c| c.set(before));
    out.unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Every kernel, for [`with_fallback`].
#[cfg(test)]
pub(crate) const ALL_KERNELS: [Kernel; 5] = [Kernel::Conv, Kernel::Depthwise, Kernel::BatchNorm, Kernel::Activation, Kernel::Pool];

/// What a named tensor is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Learned, updated by the optimizer unless frozen.
    Weight,
    /// State such as batch-norm running statistics: saved, never given gradients.
    Buffer,
}

#[derive(Debug)]
struct Slot {
    var: Var,
    role: Role,
    trainable: bool,
}

/// How a freshly created weight is filled.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// PyTorch's default for convolution and linear layers and their biases
    /// (`kaiming_uniform_(a=√5)`): U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Convolutions used
    /// He's U(±sqrt(6 / fan_in)) until train version 3: with batch norm after them the
    /// output does not see the scale, but Adam's steps are of fixed size, so weights √6
    /// times larger learned √6 times slower (Fashion-MNIST lost accuracy to PyTorch on the
    /// same recipe).
    Uniform {
        fan_in: usize,
    },
    Const(f32),
}

/// Every parameter and buffer of a model, by its checkpoint name (torchvision / timm style).
///
/// Each tensor's initial values come from its own stream `Rng::for_item(seed, name, 0)`,
/// so adding a layer does not change how the others start.
pub struct ParamStore {
    slots: BTreeMap<String, Slot>,
    device: Device,
    seed: u64,
    trainable: Box<dyn Fn(&str) -> bool + Send + Sync>,
}

impl std::fmt::Debug for ParamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamStore").field("slots", &self.slots.len()).field("device", &self.device).finish()
    }
}

impl ParamStore {
    pub fn new(device: Device, seed: u64) -> Self {
        ParamStore { slots: BTreeMap::new(), device, seed, trainable: Box::new(|_| true) }
    }

    /// Decides, by name, which weights created from now on train; the others are frozen
    /// (plain tensors, so backward never walks them). Set before building a model.
    pub fn with_trainable(mut self, rule: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        self.trainable = Box::new(rule);
        self
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn create(&mut self, name: &str, shape: &[usize], init: Init, role: Role) -> Result<Var> {
        if let Some(slot) = self.slots.get(name) {
            return Ok(slot.var.clone());
        }
        let n: usize = shape.iter().product();
        let mut rng = Rng::for_item(self.seed, name, 0);
        let values: Vec<f32> = match init {
            Init::Const(c) => vec![c; n],
            Init::Uniform { fan_in } => {
                let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
                (0..n).map(|_| rng.range(-bound, bound) as f32).collect()
            }
        };
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, &self.device)?)?;
        let trainable = role == Role::Weight && (self.trainable)(name);
        self.slots.insert(name.to_string(), Slot { var: var.clone(), role, trainable });
        Ok(var)
    }

    /// A learned tensor as the forward pass should see it: tracked for gradients when
    /// trainable, a plain tensor (no backward through it) when frozen.
    pub fn weight(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let var = self.create(name, shape, init, Role::Weight)?;
        let trainable = self.slots[name].trainable;
        Ok(if trainable { var.as_tensor().clone() } else { var.as_detached_tensor() })
    }

    pub fn buffer(&mut self, name: &str, shape: &[usize], value: f32) -> Result<Var> {
        self.create(name, shape, Init::Const(value), Role::Buffer)
    }

    pub fn is_trainable(&self, name: &str) -> bool {
        self.slots.get(name).is_some_and(|s| s.trainable)
    }

    /// The trainable weights, in name order.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        self.slots.iter().filter(|(_, s)| s.trainable).map(|(n, s)| (n.clone(), s.var.clone())).collect()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Number of scalar weights (buffers excluded).
    pub fn parameter_count(&self) -> usize {
        self.slots.values().filter(|s| s.role == Role::Weight).map(|s| s.var.elem_count()).sum()
    }

    /// Overwrites tensors with values from `tensors` where names match. Shapes must agree;
    /// names for which `skip(name)` holds are left alone (a head replaced for new classes).
    /// Returns the names loaded.
    pub fn load(&mut self, tensors: &BTreeMap<String, Tensor>, skip: impl Fn(&str) -> bool) -> std::result::Result<Vec<String>, LoadError> {
        let mut loaded = Vec::new();
        for (name, slot) in &self.slots {
            if skip(name) {
                continue;
            }
            let Some(t) = tensors.get(name) else { continue };
            if t.dims() != slot.var.dims() {
                return Err(LoadError::Shape { name: name.clone(), expected: slot.var.dims().to_vec(), found: t.dims().to_vec() });
            }
            let t = t.to_dtype(DType::F32).and_then(|t| t.to_device(&self.device)).map_err(LoadError::Candle)?;
            slot.var.set(&t).map_err(LoadError::Candle)?;
            loaded.push(name.clone());
        }
        Ok(loaded)
    }

    /// Every tensor (weights and buffers) by name, for saving.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.slots.iter().map(|(n, s)| (n.clone(), s.var.as_detached_tensor())).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("weight `{name}` has shape {found:?} in the file, the model expects {expected:?}")]
    Shape { name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("cannot read weights from {path}: {source}")]
    Read { path: String, source: CandleError },
    #[error("{0}")]
    Candle(CandleError),
}

/// Reads a safetensors file (or a zip-format PyTorch `.pth`) into named f32 tensors on the CPU.
pub fn read_weights(path: &Path) -> std::result::Result<BTreeMap<String, Tensor>, LoadError> {
    let err = |source| LoadError::Read { path: path.display().to_string(), source };
    let is_pth = path.extension().is_some_and(|e| e == "pth" || e == "pt" || e == "bin");
    let tensors: Vec<(String, Tensor)> = if is_pth {
        candle_core::pickle::read_all(path).map_err(err)?
    } else {
        candle_core::safetensors::load(path, &Device::Cpu).map_err(err)?.into_iter().collect()
    };
    Ok(tensors
        .into_iter()
        .filter(|(_, t)| t.dtype().is_float())
        .map(|(n, t)| (n.strip_prefix("module.").map(String::from).unwrap_or(n), t))
        .collect())
}

/// Saves named tensors as safetensors with sorted names: the same weights give the same bytes.
pub fn save_weights(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let cpu: BTreeMap<String, Tensor> =
        tensors.iter().map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?.contiguous()?))).collect::<Result<_>>()?;
    candle_core::safetensors::save(&cpu.into_iter().collect(), path)
}

/// The blake3 digest of a model's weights in name order: the reproducibility fingerprint.
pub fn weights_digest(tensors: &BTreeMap<String, Tensor>) -> Result<String> {
    let mut h = blake3::Hasher::new();
    for (name, t) in tensors {
        h.update(name.as_bytes());
        h.update(&[0]);
        let v: Vec<f32> = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        for x in v {
            h.update(&x.to_le_bytes());
        }
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Deterministic test tensors and comparisons shared by the op tests.
#[cfg(test)]
pub(crate) mod test_support {
    use candle_core::{Device, Tensor};

    /// Values in [-1, 1) that differ by position and `salt`.
    pub fn data(shape: &[usize], salt: usize) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| (((i * 7919 + salt * 104_729) % 1000) as f32 / 500.0) - 1.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }
}
