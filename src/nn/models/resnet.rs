//! ResNet-18/34/50 with torchvision / timm tensor names (`conv1`, `bn1`, `layer1.0.conv1`,
//! `layer2.0.downsample.0`, `fc`), so their checkpoints load as they are.

use candle_core::Tensor;

use crate::nn::Result;
use crate::nn::layers::{Act, BatchNorm2d, Conv2d, Ctx, Linear, add_act, global_avg_pool, max_pool_3x3_s2};
use crate::nn::{ParamStore, models::Network};

pub const LAYERS_18: [usize; 4] = [2, 2, 2, 2];
pub const LAYERS_34: [usize; 4] = [3, 4, 6, 3];
pub const LAYERS_50: [usize; 4] = [3, 4, 6, 3];

/// Block prefixes in order: the stem, then `layerS.B`.
pub fn blocks(layers: &[usize; 4]) -> Vec<String> {
    let mut b = vec!["conv1".to_string(), "bn1".to_string()];
    for (s, &n) in layers.iter().enumerate() {
        b.extend((0..n).map(|i| format!("layer{}.{i}", s + 1)));
    }
    b
}

struct Block {
    convs: Vec<(Conv2d, BatchNorm2d)>,
    downsample: Option<(Conv2d, BatchNorm2d)>,
}

impl Block {
    fn forward(&self, x: &Tensor, cx: &Ctx) -> Result<Tensor> {
        let mut y = x.clone();
        let last = self.convs.len() - 1;
        for (i, (conv, bn)) in self.convs.iter().enumerate() {
            let act = if i < last { Act::Relu } else { Act::Identity };
            y = bn.forward_act(&conv.forward(&y)?, cx, act)?;
        }
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward(&conv.forward(x)?, cx)?,
            None => x.clone(),
        };
        add_act(&y, &shortcut, Act::Relu)
    }
}

pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    blocks: Vec<Block>,
    fc: Linear,
}

impl ResNet {
    pub fn new(ps: &mut ParamStore, layers: &[usize; 4], bottleneck: bool, channels: usize, classes: usize) -> Result<Self> {
        let conv1 = Conv2d::new(ps, "conv1", channels, 64, 7, 2, 3, 1, false)?;
        let bn1 = BatchNorm2d::new(ps, "bn1", 64, 1e-5)?;
        let expansion = if bottleneck { 4 } else { 1 };
        let mut c_in = 64;
        let mut blocks = Vec::new();
        for (s, &n) in layers.iter().enumerate() {
            let width = 64 << s;
            for i in 0..n {
                let p = format!("layer{}.{i}", s + 1);
                let stride = if s > 0 && i == 0 { 2 } else { 1 };
                let c_out = width * expansion;
                let mut convs = Vec::new();
                let conv_bn =
                    |ps: &mut ParamStore, k: usize, cin: usize, cout: usize, stride: usize, j: usize| -> Result<(Conv2d, BatchNorm2d)> {
                        Ok((
                            Conv2d::new(ps, &format!("{p}.conv{j}"), cin, cout, k, stride, k / 2, 1, false)?,
                            BatchNorm2d::new(ps, &format!("{p}.bn{j}"), cout, 1e-5)?,
                        ))
                    };
                if bottleneck {
                    // torchvision's v1.5: the stride sits on the 3×3 convolution.
                    convs.push(conv_bn(ps, 1, c_in, width, 1, 1)?);
                    convs.push(conv_bn(ps, 3, width, width, stride, 2)?);
                    convs.push(conv_bn(ps, 1, width, c_out, 1, 3)?);
                } else {
                    convs.push(conv_bn(ps, 3, c_in, width, stride, 1)?);
                    convs.push(conv_bn(ps, 3, width, width, 1, 2)?);
                }
                let downsample = if stride != 1 || c_in != c_out {
                    Some((
                        Conv2d::new(ps, &format!("{p}.downsample.0"), c_in, c_out, 1, stride, 0, 1, false)?,
                        BatchNorm2d::new(ps, &format!("{p}.downsample.1"), c_out, 1e-5)?,
                    ))
                } else {
                    None
                };
                blocks.push(Block { convs, downsample });
                c_in = c_out;
            }
        }
        let fc = Linear::new(ps, "fc", c_in, classes)?;
        Ok(ResNet { conv1, bn1, blocks, fc })
    }
}

impl Network for ResNet {
    fn features(&self, x: &Tensor, cx: &mut Ctx) -> Result<Tensor> {
        let x = self.bn1.forward_act(&self.conv1.forward(x)?, cx, Act::Relu)?;
        let mut x = max_pool_3x3_s2(&x)?;
        for b in &self.blocks {
            x = b.forward(&x, cx)?;
        }
        global_avg_pool(&x)
    }

    fn classify(&self, features: &Tensor, _cx: &mut Ctx) -> Result<Tensor> {
        self.fc.forward(features)
    }
}
