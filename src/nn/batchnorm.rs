//! Training-mode batch normalisation as fused custom ops.
//!
//! Written with candle's tensor ops, batch norm reduces over dimensions (0, 2, 3) several
//! times in the forward pass and again in the backward pass of every broadcast, and
//! candle's CPU reductions over non-trailing dimensions walk a strided index per element:
//! profiling the small CNN put most of its training time there. Here statistics are one
//! pass per channel and the backward pass uses the closed form
//! `dx = γ/σ · (dy − mean(dy) − x̂ · mean(dy · x̂))`.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::Result;
use super::depthwise::slice;

/// `y = (x − μ_B) / sqrt(σ²_B + eps) · γ + β` with the batch's own statistics, and those
/// statistics (`[2, C]`: mean, biased variance), detached, for the running averages.
pub fn train_forward(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let x = x.contiguous()?;
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 {
        let mean = x.mean_keepdim((0, 2, 3))?;
        let var = x.broadcast_sub(&mean)?.sqr()?.mean_keepdim((0, 2, 3))?;
        let c = x.dim(1)?;
        let shape = (1, c, 1, 1);
        let y = x
            .broadcast_sub(&mean)?
            .broadcast_div(&(&var + eps)?.sqrt()?)?
            .broadcast_mul(&gamma.reshape(shape)?)?
            .broadcast_add(&beta.reshape(shape)?)?;
        let stats = Tensor::stack(&[mean.flatten_all()?.detach(), var.flatten_all()?.detach()], 0)?;
        return Ok((y, stats));
    }
    let stats = x.apply_op1_no_bwd(&Stats)?;
    let y = x.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, Fused { eps })?;
    Ok((y, stats))
}

/// Per-channel mean and biased variance of `[N, C, H, W]`, in f64 sums.
fn channel_stats(x: &[f32], n: usize, c: usize, plane: usize) -> Vec<(f64, f64)> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mut s, mut s2) = (0f64, 0f64);
            for img in 0..n {
                let p = &x[(img * c + ch) * plane..(img * c + ch + 1) * plane];
                let (mut a, mut b) = (0f32, 0f32);
                for v in p {
                    a += v;
                    b += v * v;
                }
                s += f64::from(a);
                s2 += f64::from(b);
            }
            let m = (n * plane) as f64;
            let mean = s / m;
            (mean, (s2 / m - mean * mean).max(0.0))
        })
        .collect()
}

/// Per-channel pairs as a `[2, C]` tensor: firsts, then seconds.
fn two_rows(pairs: &[(f64, f64)]) -> (CpuStorage, Shape) {
    let mut out: Vec<f32> = pairs.iter().map(|p| p.0 as f32).collect();
    out.extend(pairs.iter().map(|p| p.1 as f32));
    (CpuStorage::F32(out), Shape::from((2, pairs.len())))
}

fn dims(l: &Layout) -> Result<(usize, usize, usize)> {
    match l.dims() {
        &[n, c, h, w] => Ok((n, c, h * w)),
        d => candle_core::bail!("batch norm: expected [N, C, H, W], got {d:?}"),
    }
}

struct Stats;

impl CustomOp1 for Stats {
    fn name(&self) -> &'static str {
        "kiln-batch-norm-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, plane) = dims(l)?;
        Ok(two_rows(&channel_stats(slice(s, l)?, n, c, plane)))
    }
}

struct Fused {
    eps: f64,
}

impl CustomOp3 for Fused {
    fn name(&self) -> &'static str {
        "kiln-batch-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, plane) = dims(l1)?;
        let (x, gamma, beta) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let st = channel_stats(x, n, c, plane);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(plane).enumerate().for_each(|(p, o)| {
            let ch = p % c;
            let inv = 1.0 / (st[ch].1 + self.eps).sqrt();
            let scale = (f64::from(gamma[ch]) * inv) as f32;
            let shift = (f64::from(beta[ch]) - st[ch].0 * inv * f64::from(gamma[ch])) as f32;
            for (o, v) in o.iter_mut().zip(&x[p * plane..(p + 1) * plane]) {
                *o = v * scale + shift;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // [2, C]: sum(dy · x̂) and sum(dy) per channel.
        let sums = x.apply_op2_no_bwd(&grad, &ParamGrads { eps: self.eps })?;
        let dx = x.apply_op3_no_bwd(&grad, &Tensor::cat(&[gamma.unsqueeze(0)?, sums.clone()], 0)?, &InputGrad { eps: self.eps })?;
        Ok((Some(dx), Some(sums.get(0)?), Some(sums.get(1)?)))
    }
}

struct ParamGrads {
    eps: f64,
}

impl candle_core::CustomOp2 for ParamGrads {
    fn name(&self) -> &'static str {
        "kiln-batch-norm-param-grads"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, plane) = dims(l1)?;
        let (x, dy) = (slice(s1, l1)?, slice(s2, l2)?);
        let st = channel_stats(x, n, c, plane);
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let inv = 1.0 / (st[ch].1 + self.eps).sqrt();
                let mean = st[ch].0 as f32;
                let (mut dxhat, mut dsum) = (0f64, 0f64);
                for img in 0..n {
                    let r = (img * c + ch) * plane..(img * c + ch + 1) * plane;
                    let (mut a, mut b) = (0f32, 0f32);
                    for (v, g) in x[r.clone()].iter().zip(&dy[r]) {
                        a += (v - mean) * g;
                        b += g;
                    }
                    dxhat += f64::from(a) * inv;
                    dsum += f64::from(b);
                }
                (dxhat, dsum)
            })
            .collect();
        Ok(two_rows(&sums))
    }
}

/// `dx` from `x`, `dy` and `[γ; sum(dy·x̂); sum(dy)]` (`[3, C]`).
struct InputGrad {
    eps: f64,
}

impl CustomOp3 for InputGrad {
    fn name(&self) -> &'static str {
        "kiln-batch-norm-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, plane) = dims(l1)?;
        let (x, dy, p) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let st = channel_stats(x, n, c, plane);
        let m = (n * plane) as f64;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(plane).enumerate().for_each(|(i, o)| {
            let ch = i % c;
            let inv = 1.0 / (st[ch].1 + self.eps).sqrt();
            let (gamma, sum_dxhat, sum_dy) = (f64::from(p[ch]), f64::from(p[c + ch]), f64::from(p[2 * c + ch]));
            let k = (gamma * inv) as f32;
            let mean_dy = (sum_dy / m) as f32;
            let mean_dxhat = (sum_dxhat / m) as f32;
            let (mean, inv) = (st[ch].0 as f32, inv as f32);
            let r = i * plane..(i + 1) * plane;
            for ((o, v), g) in o.iter_mut().zip(&x[r.clone()]).zip(&dy[r]) {
                let xhat = (v - mean) * inv;
                *o = k * (g - mean_dy - xhat * mean_dxhat);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn data(shape: &[usize], salt: usize) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| (((i * 7919 + salt * 104_729) % 1000) as f32 / 250.0) - 1.5).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The fused op against the same formula written with candle's differentiable ops.
    #[test]
    fn fused_batch_norm_matches_the_composite_forward_and_backward() {
        let x = Var::from_tensor(&data(&[3, 4, 5, 6], 1)).unwrap();
        let gamma = Var::from_tensor(&data(&[4], 2)).unwrap();
        let beta = Var::from_tensor(&data(&[4], 3)).unwrap();
        let eps = 1e-5;
        let (ours, stats) = train_forward(&x, &gamma, &beta, eps).unwrap();
        let mean = x.mean_keepdim((0, 2, 3)).unwrap();
        let var = x.broadcast_sub(&mean).unwrap().sqr().unwrap().mean_keepdim((0, 2, 3)).unwrap();
        let theirs = x
            .broadcast_sub(&mean)
            .unwrap()
            .broadcast_div(&(&var + eps).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&gamma.reshape((1, 4, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&beta.reshape((1, 4, 1, 1)).unwrap())
            .unwrap();
        let diff =
            |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff(&ours, &theirs) < 1e-4);
        assert!(diff(&stats.get(0).unwrap(), &mean.flatten_all().unwrap()) < 1e-5);
        assert!(diff(&stats.get(1).unwrap(), &var.flatten_all().unwrap()) < 1e-4);
        let probe = data(&[3, 4, 5, 6], 4);
        let g1 = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (v, what) in [(x.as_tensor(), "x"), (gamma.as_tensor(), "gamma"), (beta.as_tensor(), "beta")] {
            assert!(diff(g1.get(v).unwrap(), g2.get(v).unwrap()) < 1e-3, "grad {what}");
        }
    }
}
