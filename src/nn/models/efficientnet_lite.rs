//! EfficientNet-Lite0: EfficientNet-B0 without squeeze-and-excitation, with ReLU6, batch
//! norm eps 1e-3 and a fixed 32-channel stem and 1280-channel head. Tensor names follow
//! lukemelas/EfficientNet-PyTorch (`_conv_stem`, `_blocks.N._depthwise_conv`, `_fc`).
//! candle-transformers' EfficientNet has SE and SiLU, so it cannot load these weights.

use candle_core::Tensor;

use crate::nn::Result;
use crate::nn::layers::{Act, BatchNorm2d, Conv2d, Ctx, Linear, dropout, global_avg_pool};
use crate::nn::{ParamStore, models::Network};

const EPS: f64 = 1e-3;

/// (expansion, kernel, stride, output channels, repeats) per stage, as in B0.
const STAGES: [(usize, usize, usize, usize, usize); 7] =
    [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)];

pub fn blocks() -> Vec<String> {
    let n: usize = STAGES.iter().map(|s| s.4).sum();
    let mut b = vec!["_conv_stem".to_string(), "_bn0".to_string()];
    b.extend((0..n).map(|i| format!("_blocks.{i}")));
    b.extend(["_conv_head".to_string(), "_bn1".to_string()]);
    b
}

struct MbConv {
    expand: Option<(Conv2d, BatchNorm2d)>,
    depthwise: (Conv2d, BatchNorm2d),
    project: (Conv2d, BatchNorm2d),
    residual: bool,
}

impl MbConv {
    fn forward(&self, x: &Tensor, cx: &Ctx) -> Result<Tensor> {
        let mut y = x.clone();
        if let Some((conv, bn)) = &self.expand {
            y = bn.forward_act(&conv.forward(&y)?, cx, Act::Relu6)?;
        }
        y = self.depthwise.1.forward_act(&self.depthwise.0.forward(&y)?, cx, Act::Relu6)?;
        y = self.project.1.forward(&self.project.0.forward(&y)?, cx)?;
        if self.residual { y + x } else { Ok(y) }
    }
}

pub struct EfficientNetLite {
    stem: (Conv2d, BatchNorm2d),
    blocks: Vec<MbConv>,
    head: (Conv2d, BatchNorm2d),
    fc: Linear,
    dropout: f64,
}

impl EfficientNetLite {
    pub fn new(ps: &mut ParamStore, channels: usize, classes: usize) -> Result<Self> {
        let stem = (Conv2d::new(ps, "_conv_stem", channels, 32, 3, 2, 1, 1, false)?.tf_same(), BatchNorm2d::new(ps, "_bn0", 32, EPS)?);
        let mut c_in = 32;
        let mut blocks = Vec::new();
        for &(expand, k, stride, c_out, repeats) in &STAGES {
            for r in 0..repeats {
                let p = format!("_blocks.{}", blocks.len());
                let stride = if r == 0 { stride } else { 1 };
                let mid = c_in * expand;
                let expand_layer = if expand != 1 {
                    Some((
                        Conv2d::new(ps, &format!("{p}._expand_conv"), c_in, mid, 1, 1, 0, 1, false)?,
                        BatchNorm2d::new(ps, &format!("{p}._bn0"), mid, EPS)?,
                    ))
                } else {
                    None
                };
                let depthwise = (
                    Conv2d::new(ps, &format!("{p}._depthwise_conv"), mid, mid, k, stride, k / 2, mid, false)?.tf_same(),
                    BatchNorm2d::new(ps, &format!("{p}._bn1"), mid, EPS)?,
                );
                let project = (
                    Conv2d::new(ps, &format!("{p}._project_conv"), mid, c_out, 1, 1, 0, 1, false)?,
                    BatchNorm2d::new(ps, &format!("{p}._bn2"), c_out, EPS)?,
                );
                blocks.push(MbConv { expand: expand_layer, depthwise, project, residual: stride == 1 && c_in == c_out });
                c_in = c_out;
            }
        }
        let head = (Conv2d::new(ps, "_conv_head", c_in, 1280, 1, 1, 0, 1, false)?, BatchNorm2d::new(ps, "_bn1", 1280, EPS)?);
        let fc = Linear::new(ps, "_fc", 1280, classes)?;
        Ok(EfficientNetLite { stem, blocks, head, fc, dropout: 0.2 })
    }
}

impl Network for EfficientNetLite {
    fn features(&self, x: &Tensor, cx: &mut Ctx) -> Result<Tensor> {
        let mut x = self.stem.1.forward_act(&self.stem.0.forward(x)?, cx, Act::Relu6)?;
        for b in &self.blocks {
            x = b.forward(&x, cx)?;
        }
        let x = self.head.1.forward_act(&self.head.0.forward(&x)?, cx, Act::Relu6)?;
        global_avg_pool(&x)
    }

    fn classify(&self, features: &Tensor, cx: &mut Ctx) -> Result<Tensor> {
        self.fc.forward(&dropout(features, self.dropout, cx)?)
    }
}
