//! A small convolutional network for training from scratch: stages of
//! (3×3 conv → batch norm → ReLU) × `convs_per_stage`, each followed by 2×2 max pooling,
//! then either flatten + a hidden layer or global average pooling, then the head.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::nn::Result;
use crate::nn::layers::{Act, BatchNorm2d, Conv2d, Ctx, Linear, dropout, global_avg_pool, max_pool_2x2};
use crate::nn::{ParamStore, models::Network};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CnnConfig {
    /// Output channels of each stage; every stage halves the resolution.
    pub widths: Vec<usize>,
    pub convs_per_stage: usize,
    /// Units of the hidden fully connected layer after flattening; 0 = global average
    /// pooling straight into the head.
    pub hidden: usize,
    /// Dropout before the first fully connected layer: the hidden layer, or the head when
    /// there is none (before train version 3 it was applied before both).
    pub dropout: f64,
}

impl Default for CnnConfig {
    fn default() -> Self {
        CnnConfig { widths: vec![32, 64], convs_per_stage: 1, hidden: 128, dropout: 0.25 }
    }
}

impl CnnConfig {
    pub fn blocks(&self) -> Vec<String> {
        let mut b: Vec<String> = (0..self.widths.len()).map(|i| format!("stages.{i}")).collect();
        if self.hidden > 0 {
            b.push("hidden".into());
        }
        b
    }
}

pub struct Cnn {
    stages: Vec<Vec<(Conv2d, BatchNorm2d)>>,
    hidden: Option<Linear>,
    head: Linear,
    dropout: f64,
}

impl Cnn {
    pub fn new(ps: &mut ParamStore, cfg: &CnnConfig, channels: usize, size: [u32; 2], classes: usize) -> Result<Self> {
        // A manifest's CNN is range-checked when it loads; this guards configs read back from
        // elsewhere (a model.json): a zero width would divide by zero in batch norm.
        if cfg.widths.contains(&0) || !(0.0..1.0).contains(&cfg.dropout) {
            candle_core::bail!("cnn: widths must be at least 1 and dropout in [0, 1), got {:?} and {}", cfg.widths, cfg.dropout);
        }
        let (mut c, mut h, mut w) = (channels, size[1] as usize, size[0] as usize);
        let mut stages = Vec::new();
        for (i, &width) in cfg.widths.iter().enumerate() {
            let mut layers = Vec::new();
            for j in 0..cfg.convs_per_stage.max(1) {
                let p = format!("stages.{i}.{j}");
                layers.push((
                    Conv2d::new(ps, &format!("{p}.conv"), c, width, 3, 1, 1, 1, false)?,
                    BatchNorm2d::new(ps, &format!("{p}.bn"), width, 1e-5)?,
                ));
                c = width;
            }
            stages.push(layers);
            if h < 2 || w < 2 {
                candle_core::bail!(
                    "cnn: {} stages halve a {}x{} input below 1 pixel; use fewer widths",
                    cfg.widths.len(),
                    size[0],
                    size[1]
                );
            }
            (h, w) = (h / 2, w / 2);
        }
        let (hidden, head_in) =
            if cfg.hidden > 0 { (Some(Linear::new(ps, "hidden", c * h * w, cfg.hidden)?), cfg.hidden) } else { (None, c) };
        let head = Linear::new(ps, "head", head_in, classes)?;
        Ok(Cnn { stages, hidden, head, dropout: cfg.dropout })
    }
}

impl Network for Cnn {
    fn features(&self, x: &Tensor, cx: &mut Ctx) -> Result<Tensor> {
        let mut x = x.clone();
        for stage in &self.stages {
            for (conv, bn) in stage {
                x = bn.forward_act(&conv.forward(&x)?, cx, Act::Relu)?;
            }
            x = max_pool_2x2(&x)?;
        }
        match &self.hidden {
            Some(h) => {
                let flat = dropout(&x.flatten_from(1)?, self.dropout, cx)?;
                h.forward(&flat)?.relu()
            }
            None => global_avg_pool(&x),
        }
    }

    fn classify(&self, features: &Tensor, cx: &mut Ctx) -> Result<Tensor> {
        // One dropout, as PyTorch's usual `Flatten, Dropout, Linear, ReLU, Linear`.
        let p = if self.hidden.is_some() { 0.0 } else { self.dropout };
        self.head.forward(&dropout(features, p, cx)?)
    }
}
