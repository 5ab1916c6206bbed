//! Model architectures: a small CNN for training from scratch, ResNet-18/34/50
//! (torchvision/timm names) and EfficientNet-Lite0 (lukemelas names), all with trainable
//! batch norm so they can be fine-tuned, not only evaluated.

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

/// Which network, by the name a manifest uses (`model = "resnet18"`).
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

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl Arch {
    pub fn from_name(name: &str, cnn: Option<CnnConfig>) -> Option<Arch> {
        Some(match name {
            "cnn" => Arch::Cnn(cnn.unwrap_or_default()),
            "resnet18" => Arch::Resnet18,
            "resnet34" => Arch::Resnet34,
            "resnet50" => Arch::Resnet50,
            "efficientnet_lite0" => Arch::EfficientnetLite0,
            _ => return None,
        })
    }

    pub const NAMES: &'static [&'static str] = &["cnn", "resnet18", "resnet34", "resnet50", "efficientnet_lite0"];

    pub fn name(&self) -> &'static str {
        match self {
            Arch::Cnn(_) => "cnn",
            Arch::Resnet18 => "resnet18",
            Arch::Resnet34 => "resnet34",
            Arch::Resnet50 => "resnet50",
            Arch::EfficientnetLite0 => "efficientnet_lite0",
        }
    }

    /// The input pretrained weights for this architecture expect; `None` for the CNN,
    /// which fits whatever the data is.
    pub fn preset(&self) -> Option<Preset> {
        match self {
            Arch::Cnn(_) => None,
            Arch::Resnet18 | Arch::Resnet34 | Arch::Resnet50 => {
                Some(Preset { channels: 3, size: [224, 224], mean: IMAGENET_MEAN.to_vec(), std: IMAGENET_STD.to_vec() })
            }
            // (x * 255 - 127) / 128, the TensorFlow Lite models' input scaling.
            Arch::EfficientnetLite0 => {
                Some(Preset { channels: 3, size: [224, 224], mean: vec![127.0 / 255.0; 3], std: vec![128.0 / 255.0; 3] })
            }
        }
    }

    /// Name prefix of the classifier head, which is re-initialised for the dataset's classes.
    pub fn head_prefix(&self) -> &'static str {
        match self {
            Arch::Cnn(_) => "head",
            Arch::Resnet18 | Arch::Resnet34 | Arch::Resnet50 => "fc",
            Arch::EfficientnetLite0 => "_fc",
        }
    }

    /// Name prefixes of the trainable blocks, input to output, head excluded: what
    /// `last_n_blocks = N` counts from the end.
    pub fn blocks(&self) -> Vec<String> {
        match self {
            Arch::Cnn(c) => c.blocks(),
            Arch::Resnet18 => resnet::blocks(&resnet::LAYERS_18),
            Arch::Resnet34 => resnet::blocks(&resnet::LAYERS_34),
            Arch::Resnet50 => resnet::blocks(&resnet::LAYERS_50),
            Arch::EfficientnetLite0 => efficientnet_lite::blocks(),
        }
    }

    /// Builds the network, creating (or reusing) its tensors in `ps`.
    pub fn build(&self, ps: &mut ParamStore, channels: usize, size: [u32; 2], classes: usize) -> Result<Box<dyn Network>> {
        Ok(match self {
            Arch::Cnn(c) => Box::new(cnn::Cnn::new(ps, c, channels, size, classes)?),
            Arch::Resnet18 => Box::new(resnet::ResNet::new(ps, &resnet::LAYERS_18, false, channels, classes)?),
            Arch::Resnet34 => Box::new(resnet::ResNet::new(ps, &resnet::LAYERS_34, false, channels, classes)?),
            Arch::Resnet50 => Box::new(resnet::ResNet::new(ps, &resnet::LAYERS_50, true, channels, classes)?),
            Arch::EfficientnetLite0 => Box::new(efficientnet_lite::EfficientNetLite::new(ps, channels, classes)?),
        })
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
