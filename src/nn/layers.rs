//! Trainable layers. Each takes its tensors from a [`ParamStore`] under a name prefix, so
//! checkpoints use torchvision / timm names (`layer1.0.conv1.weight`, `bn1.running_mean`).

use candle_core::{D, Tensor, Var};

pub use super::activation::{Act, add_act};
use super::{Init, ParamStore, Result, depthwise};
use crate::rng::Rng;

/// Per-forward state: training or evaluation, and the stream dropout masks come from.
#[derive(Debug)]
pub struct Ctx {
    pub train: bool,
    rng: Rng,
}

impl Ctx {
    pub fn eval() -> Self {
        Ctx { train: false, rng: Rng::new(0) }
    }

    /// Training mode; `rng` should be derived from the seed and the step, so a resumed run
    /// draws the same masks.
    pub fn train(rng: Rng) -> Self {
        Ctx { train: true, rng }
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() { name.to_string() } else { format!("{prefix}.{name}") }
}

#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    groups: usize,
    same: bool,
}

/// TensorFlow's "SAME" padding for one axis: (before, after), the extra pixel after.
fn same_padding(size: usize, k: usize, stride: usize) -> (usize, usize) {
    let total = ((size.div_ceil(stride) - 1) * stride + k).saturating_sub(size);
    (total / 2, total - total / 2)
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ps: &mut ParamStore,
        prefix: &str,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        groups: usize,
        bias: bool,
    ) -> Result<Self> {
        let fan_in = c_in / groups * kernel * kernel;
        let weight = ps.weight(&join(prefix, "weight"), &[c_out, c_in / groups, kernel, kernel], Init::Uniform { fan_in })?;
        let bias = if bias { Some(ps.weight(&join(prefix, "bias"), &[c_out], Init::Uniform { fan_in })?) } else { None };
        Ok(Conv2d { weight, bias, stride, padding, groups, same: false })
    }

    /// Pads like TensorFlow's "SAME" (asymmetric for stride 2 on even sizes) instead of
    /// `padding`: what TensorFlow-trained weights such as EfficientNet-Lite expect.
    pub fn tf_same(mut self) -> Self {
        self.same = true;
        self
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (c_out, _, k, _) = self.weight.dims4()?;
        let (x, padding) = if self.same {
            let (t, b) = same_padding(x.dim(2)?, k, self.stride);
            let (l, r) = same_padding(x.dim(3)?, k, self.stride);
            if t == b && l == r && t == l { (x.clone(), t) } else { (x.pad_with_zeros(2, t, b)?.pad_with_zeros(3, l, r)?, 0) }
        } else {
            (x.clone(), self.padding)
        };
        let y = if self.groups > 1 && self.groups == c_out && x.dim(1)? == c_out {
            depthwise::conv2d(&x, &self.weight, self.stride, padding)?
        } else if self.groups == 1 {
            super::conv::conv2d(&x, &self.weight, self.stride, padding)?
        } else {
            x.conv2d(&self.weight, padding, self.stride, 1, self.groups)?
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, c_out, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// Batch normalisation that trains: batch statistics and running-average updates in
/// training mode (PyTorch semantics: momentum 0.1, unbiased variance for the running
/// estimate), running statistics in evaluation mode or when frozen.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
    trainable: bool,
}

impl BatchNorm2d {
    pub fn new(ps: &mut ParamStore, prefix: &str, channels: usize, eps: f64) -> Result<Self> {
        let weight = ps.weight(&join(prefix, "weight"), &[channels], Init::Const(1.0))?;
        let bias = ps.weight(&join(prefix, "bias"), &[channels], Init::Const(0.0))?;
        let running_mean = ps.buffer(&join(prefix, "running_mean"), &[channels], 0.0)?;
        let running_var = ps.buffer(&join(prefix, "running_var"), &[channels], 1.0)?;
        let trainable = ps.is_trainable(&join(prefix, "weight"));
        Ok(BatchNorm2d { weight, bias, running_mean, running_var, eps, momentum: 0.1, trainable })
    }

    pub fn forward(&self, x: &Tensor, cx: &Ctx) -> Result<Tensor> {
        self.forward_act(x, cx, Act::Identity)
    }

    /// `act(bn(x))` in one pass (and one backward pass): see [`super::batchnorm`].
    pub fn forward_act(&self, x: &Tensor, cx: &Ctx, act: Act) -> Result<Tensor> {
        if cx.train && self.trainable {
            let (y, stats) = super::batchnorm::train_forward(x, &self.weight, &self.bias, self.eps, act)?;
            let n = (x.elem_count() / x.dim(1)?) as f64;
            let m = self.momentum;
            let (mean, var) = (stats.get(0)?, (stats.get(1)? * (n / (n - 1.0).max(1.0)))?);
            self.running_mean.set(&((self.running_mean.as_tensor() * (1.0 - m))? + (mean * m)?)?)?;
            self.running_var.set(&((self.running_var.as_tensor() * (1.0 - m))? + (var * m)?)?)?;
            return Ok(y);
        }
        // Running statistics fold into one scale and shift per channel.
        let scale = self.weight.broadcast_div(&(self.running_var.as_detached_tensor() + self.eps)?.sqrt()?)?;
        let shift = (&self.bias - self.running_mean.as_detached_tensor().mul(&scale)?)?;
        super::batchnorm::affine_act(x, &scale, &shift, act)
    }
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub fn new(ps: &mut ParamStore, prefix: &str, c_in: usize, c_out: usize) -> Result<Self> {
        let weight = ps.weight(&join(prefix, "weight"), &[c_out, c_in], Init::Uniform { fan_in: c_in })?;
        let bias = ps.weight(&join(prefix, "bias"), &[c_out], Init::Uniform { fan_in: c_in })?;
        Ok(Linear { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// Inverted dropout with a mask from the context's seeded stream (candle's CPU generator
/// cannot be seeded).
pub fn dropout(x: &Tensor, p: f64, cx: &mut Ctx) -> Result<Tensor> {
    if !cx.train || p <= 0.0 {
        return Ok(x.clone());
    }
    let keep = 1.0 - p;
    let scale = (1.0 / keep) as f32;
    let mask: Vec<f32> = (0..x.elem_count()).map(|_| if cx.rng.unit() < keep { scale } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?;
    x.mul(&mask)
}

/// Mean over the spatial dimensions: `[N, C, H, W]` → `[N, C]`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.mean((2, 3))
}

/// 3×3 max pooling with stride 2 and padding 1 (the ResNet stem).
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    super::pool::max_pool2d(x, 3, 2, 1)
}

/// 2×2 max pooling with stride 2.
pub fn max_pool_2x2(x: &Tensor) -> Result<Tensor> {
    super::pool::max_pool2d(x, 2, 2, 0)
}

/// Softmax probabilities over the last dimension.
pub fn softmax(logits: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(logits, D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn batch_norm_trains_on_batch_statistics_and_updates_running_ones() {
        let mut ps = ParamStore::new(Device::Cpu, 0);
        let bn = BatchNorm2d::new(&mut ps, "bn", 1, 1e-5).unwrap();
        let x = Tensor::from_vec(vec![1f32, 2.0, 3.0, 4.0], (1, 1, 2, 2), &Device::Cpu).unwrap();
        let y = bn.forward(&x, &Ctx::train(Rng::new(0))).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Mean 2.5, biased variance 1.25.
        let expect: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0].iter().map(|v| (v - 2.5) / (1.25f32 + 1e-5).sqrt()).collect();
        for (a, b) in y.iter().zip(&expect) {
            assert!((a - b).abs() < 1e-5);
        }
        let rm = ps.tensors()["bn.running_mean"].to_vec1::<f32>().unwrap()[0];
        let rv = ps.tensors()["bn.running_var"].to_vec1::<f32>().unwrap()[0];
        assert!((rm - 0.25).abs() < 1e-6, "{rm}");
        // Unbiased variance 5/3, blended with 1.0 at momentum 0.1.
        assert!((rv - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-6, "{rv}");
    }

    #[test]
    fn dropout_is_seeded_and_scales() {
        let x = Tensor::ones((1, 1000), candle_core::DType::F32, &Device::Cpu).unwrap();
        let a = dropout(&x, 0.5, &mut Ctx::train(Rng::new(7))).unwrap().to_vec2::<f32>().unwrap();
        let b = dropout(&x, 0.5, &mut Ctx::train(Rng::new(7))).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(a, b);
        let kept = a[0].iter().filter(|v| **v > 0.0).count();
        assert!((400..600).contains(&kept));
        assert!(a[0].iter().all(|v| *v == 0.0 || *v == 2.0));
        assert_eq!(dropout(&x, 0.5, &mut Ctx::eval()).unwrap().to_vec2::<f32>().unwrap()[0], vec![1.0; 1000]);
    }
}
