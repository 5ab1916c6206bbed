//! Model architectures: a small CNN for training from scratch, ResNet-18/34/50
//! (torchvision/timm names) and EfficientNet-Lite0 (lukemelas names), all with trainable
//! batch norm so they can be fine-tuned, not only evaluated.
//!
//! Every architecture is one row of [`ARCHITECTURES`]: its manifest name, a description,
//! the input its pretrained weights expect, its head and blocks, and how to build it.
//! [`Arch`]'s methods all read that row, so adding an architecture is one [`Arch`] variant
//! and one row; the tests build every row and check it against its variant.

pub mod cnn;
pub mod efficientnet_lite;
pub mod resnet;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::layers::Ctx;
use super::{ParamStore, Result};

pub use cnn::CnnConfig;

/// A classifier: pooled features, then a (replaceable) head.
pub trait Network: Send + Sync {
    /// `[N, C, H, W]` → `[N, F]`, the input of the classifier head.
    fn features(&self, x: &Tensor, cx: &mut Ctx) -> Result<Tensor>;
    /// `[N, F]` → logits `[N, classes]` (dropout, then the head).
    fn classify(&self, features: &Tensor, cx: &mut Ctx) -> Result<Tensor>;

    fn forward(&self, x: &Tensor, cx: &mut Ctx) -> Result<Tensor> {
        let f = self.features(x, cx)?;
        self.classify(&f, cx)
    }
}

/// Which network, by the name a manifest uses (`model = "resnet18"`). Each variant has
/// one row in [`ARCHITECTURES`], whose `name` is the variant's serde tag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "name")]
pub enum Arch {
    Cnn(CnnConfig),
    Resnet18,
    Resnet34,
    Resnet50,
    EfficientnetLite0,
}

/// What a pretrained model expects to see.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preset {
    pub channels: usize,
    pub size: [u32; 2],
    /// Per channel, as fractions of 255 (the preprocess stage's convention).
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// A [`Preset`] as a table row can hold it (no allocation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputPreset {
    pub channels: usize,
    pub size: [u32; 2],
    pub mean: &'static [f32],
    pub std: &'static [f32],
}

impl InputPreset {
    pub fn to_preset(self) -> Preset {
        Preset { channels: self.channels, size: self.size, mean: self.mean.to_vec(), std: self.std.to_vec() }
    }
}

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
const IMAGENET: InputPreset = InputPreset { channels: 3, size: [224, 224], mean: &IMAGENET_MEAN, std: &IMAGENET_STD };

// (x * 255 - 127) / 128, the TensorFlow Lite models' input scaling.
const TFLITE_MEAN: [f32; 3] = [127.0 / 255.0; 3];
const TFLITE_STD: [f32; 3] = [128.0 / 255.0; 3];
const TFLITE: InputPreset = InputPreset { channels: 3, size: [224, 224], mean: &TFLITE_MEAN, std: &TFLITE_STD };

/// Builds a network into a [`ParamStore`]: `(arch, ps, channels, [width, height], classes)`.
pub type BuildFn = fn(&Arch, &mut ParamStore, usize, [u32; 2], usize) -> Result<Box<dyn Network>>;

/// One architecture: everything kiln knows about it, in one place.
pub struct ArchSpec {
    /// The manifest's `model = "…"`, and the serde tag of its [`Arch`].
    pub name: &'static str,
    /// One line for people: what the network is and where its weights come from.
    pub description: &'static str,
    /// The [`Arch`] this name stands for; only the CNN reads the manifest's `cnn` table.
    pub arch: fn(Option<CnnConfig>) -> Arch,
    /// The input pretrained weights expect; `None` for a network that fits whatever the
    /// data is.
    pub preset: Option<InputPreset>,
    /// Name prefix of the classifier head, which is re-initialised for the dataset's classes.
    pub head_prefix: &'static str,
    /// Name prefixes of the trainable blocks, input to output, head excluded.
    pub blocks: fn(&Arch) -> Vec<String>,
    pub build: BuildFn,
}

const TABLE: [ArchSpec; 5] = [
    ArchSpec {
        name: "cnn",
        description: "a small convolutional network trained from scratch, shaped by the `cnn` table",
        arch: |cnn| Arch::Cnn(cnn.unwrap_or_default()),
        preset: None,
        head_prefix: "head",
        blocks: |arch| cnn_config(arch).blocks(),
        build: build_cnn,
    },
    ArchSpec {
        name: "resnet18",
        description: "ResNet-18 with torchvision/timm tensor names",
        arch: |_| Arch::Resnet18,
        preset: Some(IMAGENET),
        head_prefix: "fc",
        blocks: |_| resnet::blocks(&resnet::LAYERS_18),
        build: build_resnet18,
    },
    ArchSpec {
        name: "resnet34",
        description: "ResNet-34 with torchvision/timm tensor names",
        arch: |_| Arch::Resnet34,
        preset: Some(IMAGENET),
        head_prefix: "fc",
        blocks: |_| resnet::blocks(&resnet::LAYERS_34),
        build: build_resnet34,
    },
    ArchSpec {
        name: "resnet50",
        description: "ResNet-50 (bottleneck blocks, torchvision v1.5) with torchvision/timm tensor names",
        arch: |_| Arch::Resnet50,
        preset: Some(IMAGENET),
        head_prefix: "fc",
        blocks: |_| resnet::blocks(&resnet::LAYERS_50),
        build: build_resnet50,
    },
    ArchSpec {
        name: "efficientnet_lite0",
        description: "EfficientNet-Lite0 with lukemelas/EfficientNet-PyTorch tensor names",
        arch: |_| Arch::EfficientnetLite0,
        preset: Some(TFLITE),
        head_prefix: "_fc",
        blocks: |_| efficientnet_lite::blocks(),
        build: build_efficientnet_lite0,
    },
];

/// Every architecture kiln can train, in the order error messages list them.
pub static ARCHITECTURES: &[ArchSpec] = &TABLE;

const ARCH_NAMES: [&str; TABLE.len()] = {
    let mut names = [""; TABLE.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = TABLE[i].name;
        i += 1;
    }
    names
};

/// The CNN row's configuration; its functions are only ever given an [`Arch::Cnn`].
fn cnn_config(arch: &Arch) -> &CnnConfig {
    match arch {
        Arch::Cnn(c) => c,
        other => unreachable!("the cnn row was given `{}`", other.name()),
    }
}

fn build_cnn(arch: &Arch, ps: &mut ParamStore, channels: usize, size: [u32; 2], classes: usize) -> Result<Box<dyn Network>> {
    Ok(Box::new(cnn::Cnn::new(ps, cnn_config(arch), channels, size, classes)?))
}

fn build_resnet18(_: &Arch, ps: &mut ParamStore, channels: usize, _: [u32; 2], classes: usize) -> Result<Box<dyn Network>> {
    Ok(Box::new(resnet::ResNet::new(ps, &resnet::LAYERS_18, false, channels, classes)?))
}

fn build_resnet34(_: &Arch, ps: &mut ParamStore, channels: usize, _: [u32; 2], classes: usize) -> Result<Box<dyn Network>> {
    Ok(Box::new(resnet::ResNet::new(ps, &resnet::LAYERS_34, false, channels, classes)?))
}

fn build_resnet50(_: &Arch, ps: &mut ParamStore, channels: usize, _: [u32; 2], classes: usize) -> Result<Box<dyn Network>> {
    Ok(Box::new(resnet::ResNet::new(ps, &resnet::LAYERS_50, true, channels, classes)?))
}

fn build_efficientnet_lite0(_: &Arch, ps: &mut ParamStore, channels: usize, _: [u32; 2], classes: usize) -> Result<Box<dyn Network>> {
    Ok(Box::new(efficientnet_lite::EfficientNetLite::new(ps, channels, classes)?))
}

impl Arch {
    pub fn from_name(name: &str, cnn: Option<CnnConfig>) -> Option<Arch> {
        ARCHITECTURES.iter().find(|s| s.name == name).map(|s| (s.arch)(cnn))
    }

    pub const NAMES: &'static [&'static str] = &ARCH_NAMES;

    /// This architecture's row of [`ARCHITECTURES`].
    pub fn spec(&self) -> &'static ArchSpec {
        let want = std::mem::discriminant(self);
        ARCHITECTURES
            .iter()
            .find(|s| std::mem::discriminant(&(s.arch)(None)) == want)
            .expect("every Arch variant has a row in ARCHITECTURES")
    }

    pub fn name(&self) -> &'static str {
        self.spec().name
    }

    /// One line saying what the network is.
    pub fn description(&self) -> &'static str {
        self.spec().description
    }

    /// The input pretrained weights for this architecture expect; `None` for the CNN,
    /// which fits whatever the data is.
    pub fn preset(&self) -> Option<Preset> {
        self.spec().preset.map(InputPreset::to_preset)
    }

    /// Name prefix of the classifier head, which is re-initialised for the dataset's classes.
    pub fn head_prefix(&self) -> &'static str {
        self.spec().head_prefix
    }

    /// Name prefixes of the trainable blocks, input to output, head excluded: what
    /// `last_n_blocks = N` counts from the end.
    pub fn blocks(&self) -> Vec<String> {
        (self.spec().blocks)(self)
    }

    /// Builds the network, creating (or reusing) its tensors in `ps`.
    pub fn build(&self, ps: &mut ParamStore, channels: usize, size: [u32; 2], classes: usize) -> Result<Box<dyn Network>> {
        (self.spec().build)(self, ps, channels, size, classes)
    }
}

/// Which block prefix a tensor name belongs to (the longest matching prefix).
pub fn block_of<'a>(name: &str, blocks: &'a [String]) -> Option<&'a str> {
    blocks
        .iter()
        .filter(|b| name.strip_prefix(b.as_str()).is_some_and(|rest| rest.starts_with('.')))
        .max_by_key(|b| b.len())
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashSet;

    #[test]
    fn names_are_unique_and_listed_in_table_order() {
        let names: Vec<&str> = ARCHITECTURES.iter().map(|s| s.name).collect();
        assert_eq!(Arch::NAMES, names.as_slice());
        assert_eq!(names.iter().collect::<HashSet<_>>().len(), names.len(), "duplicate name in {names:?}");
        assert_eq!(Arch::NAMES, ["cnn", "resnet18", "resnet34", "resnet50", "efficientnet_lite0"]);
    }

    #[test]
    fn every_row_round_trips_through_its_name_and_serde_tag() {
        let mut variants = HashSet::new();
        for spec in ARCHITECTURES {
            let arch = Arch::from_name(spec.name, None).unwrap_or_else(|| panic!("`{}` is not found by name", spec.name));
            assert!(variants.insert(std::mem::discriminant(&arch)), "two rows make the variant of `{}`", spec.name);
            assert!(std::ptr::eq(arch.spec(), spec), "`{}` finds another row", spec.name);
            assert_eq!(arch.name(), spec.name);
            let json = serde_json::to_value(&arch).unwrap();
            assert_eq!(json["name"], spec.name, "the serde tag of `{}` differs from its name", spec.name);
            assert_eq!(serde_json::from_value::<Arch>(json).unwrap(), arch);
            assert!(!spec.description.is_empty());
        }
        assert_eq!(Arch::from_name("resnet19", None), None);
    }

    #[test]
    fn the_cnn_row_reads_the_manifest_config() {
        let cnn = CnnConfig { widths: vec![8], convs_per_stage: 2, hidden: 0, dropout: 0.0 };
        assert_eq!(Arch::from_name("cnn", Some(cnn.clone())), Some(Arch::Cnn(cnn.clone())));
        assert_eq!(Arch::from_name("cnn", None), Some(Arch::Cnn(CnnConfig::default())));
        assert_eq!(Arch::from_name("resnet18", Some(cnn)), Some(Arch::Resnet18));
    }

    #[test]
    fn presets_are_unchanged() {
        let imagenet = Preset { channels: 3, size: [224, 224], mean: vec![0.485, 0.456, 0.406], std: vec![0.229, 0.224, 0.225] };
        assert_eq!(Arch::Cnn(CnnConfig::default()).preset(), None);
        for arch in [Arch::Resnet18, Arch::Resnet34, Arch::Resnet50] {
            assert_eq!(arch.preset(), Some(imagenet.clone()));
        }
        let tflite = Preset { channels: 3, size: [224, 224], mean: vec![127.0 / 255.0; 3], std: vec![128.0 / 255.0; 3] };
        assert_eq!(Arch::EfficientnetLite0.preset(), Some(tflite));
    }

    /// Every row builds on a tiny input on the CPU, gives logits of the right shape, and
    /// its head and blocks name every tensor it made. Rows build on threads of their own:
    /// initialising ResNet-50 alone takes a while in a debug build.
    #[test]
    fn every_name_builds() {
        std::thread::scope(|scope| {
            for spec in ARCHITECTURES {
                scope.spawn(move || builds(spec));
            }
        });
    }

    fn builds(spec: &ArchSpec) {
        let classes = 3;
        let arch = Arch::from_name(spec.name, None).unwrap();
        let channels = spec.preset.map_or(3, |p| p.channels);
        let mut ps = ParamStore::new(Device::Cpu, 7);
        let net = arch.build(&mut ps, channels, [32, 32], classes).unwrap_or_else(|e| panic!("`{}` does not build: {e}", spec.name));
        let x = Tensor::zeros((2, channels, 32, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        let logits = net.forward(&x, &mut Ctx::eval()).unwrap();
        assert_eq!(logits.dims(), &[2, classes], "{}", spec.name);

        let head = format!("{}.", arch.head_prefix());
        let blocks = arch.blocks();
        assert!(!blocks.is_empty(), "{}", spec.name);
        assert!(ps.names().any(|n| n.starts_with(&head)), "`{}` has no head `{}`", spec.name, arch.head_prefix());
        for n in ps.names() {
            assert!(n.starts_with(&head) || block_of(n, &blocks).is_some(), "`{}`: tensor `{n}` is in no block", spec.name);
        }
        for b in &blocks {
            assert!(ps.names().any(|n| block_of(n, &blocks) == Some(b.as_str())), "`{}`: block `{b}` holds no tensor", spec.name);
        }
    }

    /// Every architecture, trained one step on the CPU kernels and on candle's fallback
    /// ops (what CUDA and Metal run), gives the same logits and the same gradient for
    /// every weight; evaluation too. This is where the GPU path is checked without a GPU.
    #[test]
    fn the_fallback_path_gives_the_kernels_numbers() {
        use crate::nn::layers::Ctx;
        use crate::rng::Rng;
        let cnn = CnnConfig { widths: vec![8, 16], convs_per_stage: 2, hidden: 16, dropout: 0.0 };
        for arch in [Arch::Cnn(cnn), Arch::Resnet18, Arch::EfficientnetLite0] {
            let size = if matches!(arch, Arch::Cnn(_)) { 12 } else { 72 };
            let run = |fallback: Option<&[crate::nn::Kernel]>| {
                let go = || {
                    let mut ps = ParamStore::new(Device::Cpu, 3);
                    let net = arch.build(&mut ps, 3, [size, size], 5).unwrap();
                    let n = 3 * 3 * (size * size) as usize;
                    let x: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1013) as f32 / 506.0) - 1.0).collect();
                    let x = Tensor::from_vec(x, (3, 3, size as usize, size as usize), &Device::Cpu).unwrap();
                    let logits = net.forward(&x, &mut Ctx::train(Rng::new(1))).unwrap();
                    let loss = crate::nn::loss::cross_entropy(&logits, &[1, 3, 4], 0.0, None).unwrap();
                    let grads = loss.backward().unwrap();
                    let g: Vec<(String, Tensor)> =
                        ps.trainable().into_iter().map(|(n, v)| (n, grads.get(v.as_tensor()).unwrap().clone())).collect();
                    let eval = net.forward(&x, &mut Ctx::eval()).unwrap();
                    (logits, g, eval)
                };
                match fallback {
                    Some(kernels) => crate::nn::with_fallback(kernels, go),
                    None => go(),
                }
            };
            let (l1, g1, e1) = run(None);
            // Each kernel alone, so that a difference names its op, then all at once.
            let mut sets: Vec<Vec<crate::nn::Kernel>> = crate::nn::ALL_KERNELS.iter().map(|k| vec![*k]).collect();
            sets.push(crate::nn::ALL_KERNELS.to_vec());
            for set in sets {
                let (l2, g2, e2) = run(Some(&set));
                let close = |a: &Tensor, b: &Tensor| {
                    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                    let d = crate::nn::test_support::max_diff(a, b);
                    (d <= 1e-3 * scale + 1e-5).then_some(()).ok_or(format!("{d} of {scale}"))
                };
                // Gradients: each element for the CNN. ResNet's and EfficientNet's late blocks
                // run on 3×3 maps with 27 values per channel, where an activation within
                // rounding of a ReLU kink can pass its gradient on one path and not the
                // other (the forward passes sum in different orders); that moves a few
                // elements, so there the whole tensor is compared by its norm, within 5 %: loose
                // for numerics (each op's own test is tight) but not for wiring, where a
                // wrong or missing gradient is off by its whole size (candle's max pool: 75 %).
                let norm = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
                let by_norm = !matches!(arch, Arch::Cnn(_));
                let mut bad = Vec::new();
                for (what, a, b) in [("logits", &l1, &l2), ("eval logits", &e1, &e2)] {
                    if let Err(e) = close(a, b) {
                        bad.push(format!("{what}: {e}"));
                    }
                }
                assert_eq!(g1.len(), g2.len());
                for ((name, a), (_, b)) in g1.iter().zip(&g2) {
                    let verdict = if by_norm {
                        let (d, r) = (norm(&(a - b).unwrap()), norm(b));
                        (d <= 5e-2 * r + 1e-5).then_some(()).ok_or(format!("norm {d} of {r}"))
                    } else {
                        close(a, b)
                    };
                    if let Err(e) = verdict {
                        bad.push(format!("gradient of {name}: {e}"));
                    }
                }
                assert!(bad.is_empty(), "{} with {set:?} on candle's ops: {} differ: {bad:#?}", arch.name(), bad.len());
            }
        }
    }
}
