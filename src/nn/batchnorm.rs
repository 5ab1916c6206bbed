//! Batch normalisation fused with the activation after it, as custom ops.
//!
//! Written with candle's tensor ops, batch norm reduces over dimensions (0, 2, 3) several
//! times in the forward pass and again in the backward pass of every broadcast, and
//! candle's CPU reductions over non-trailing dimensions walk a strided index per element:
//! profiling the small CNN put most of its training time there. Here statistics are one
//! pass per channel, the backward pass uses the closed form
//! `dx = γ/σ · (dy − mean(dy) − x̂ · mean(dy · x̂))`, and the ReLU (or ReLU6) that follows
//! is applied in the same pass: its own backward in candle is five passes over the
//! activation (a comparison, a cast, a multiply, and a zero-fill and add to accumulate).
//! The forward pass keeps its statistics for the backward pass instead of recomputing them.
//!
//! With running statistics (evaluation, or a frozen layer being fine-tuned through) the
//! layer is `act(x · scale + shift)` per channel: one pass, differentiable in all three.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::Result;
use super::activation::{Act, Gate, gated};
use super::depthwise::slice;
use super::kernels_apply;

/// `out = act(x · scale + shift)` over one plane.
#[inline(always)]
fn scale_shift<G: Gate>(gate: G, out: &mut [f32], x: &[f32], scale: f32, shift: f32) {
    for (o, v) in out.iter_mut().zip(x) {
        *o = gate.apply(v * scale + shift);
    }
}

const LANES: usize = 8;

/// Writes `o = dy` where the gate passes `y` (0 elsewhere) over one plane and returns
/// `(Σ (x − shift)·o, Σ o)`. Two loops, not one: with the gate inside the summing loop
/// LLVM turned each lane's mask into a branch, mispredicted every other element on a
/// ReLU's output (a third of batch norm's backward pass); written out first, the gate is a
/// vector select and the sums plain vector arithmetic over a plane still in L1.
#[inline(always)]
fn gate_and_sum<G: Gate>(gate: G, o: &mut [f32], x: &[f32], y: &[f32], dy: &[f32], shift: f32) -> (f32, f32) {
    for ((o, y), dy) in o.iter_mut().zip(y).zip(dy) {
        *o = gate.grad(*y, *dy);
    }
    lane_sums(o, x, shift)
}

/// `(Σ (x − shift)·g, Σ g)`, in eight partial sums so that the loop vectorises.
fn lane_sums(g: &[f32], x: &[f32], shift: f32) -> (f32, f32) {
    let (mut a, mut b) = ([0f32; LANES], [0f32; LANES]);
    let n = x.len().min(g.len());
    let body = n / LANES * LANES;
    for (x, g) in x[..body].chunks_exact(LANES).zip(g[..body].chunks_exact(LANES)) {
        for l in 0..LANES {
            a[l] += (x[l] - shift) * g[l];
            b[l] += g[l];
        }
    }
    for j in body..n {
        a[0] += (x[j] - shift) * g[j];
        b[0] += g[j];
    }
    (a.iter().sum(), b.iter().sum())
}

/// Runs `f(plane, out_plane)` over every `[plane]` chunk of `out` in parallel and adds up
/// its pairs per channel, image by image in order (so the bits do not depend on threads).
fn channel_sums(out: &mut [f32], c: usize, plane: usize, f: impl Fn(usize, &mut [f32]) -> (f32, f32) + Sync) -> Vec<(f64, f64)> {
    let pairs: Vec<(f32, f32)> = planes(out, plane).map(|(p, o)| f(p, o)).collect();
    let mut sums = vec![(0f64, 0f64); c];
    for (p, (a, b)) in pairs.into_iter().enumerate() {
        let s = &mut sums[p % c.max(1)];
        s.0 += f64::from(a);
        s.1 += f64::from(b);
    }
    sums
}

/// Planes per parallel task, so that small planes do not become thousands of tasks.
fn planes_per_task(plane: usize) -> usize {
    (16_384 / plane.max(1)).max(1)
}

/// Every `[plane]` chunk of `out` with its index (image · C + channel), in parallel.
fn planes(out: &mut [f32], plane: usize) -> impl IndexedParallelIterator<Item = (usize, &mut [f32])> {
    out.par_chunks_mut(plane.max(1)).with_min_len(planes_per_task(plane)).enumerate()
}

/// `act(x · scale + shift)` over `[N, C, H, W]`, one scale and shift per channel: batch
/// norm's forward pass with the batch's statistics or with running ones.
fn affine_planes(x: &[f32], plane: usize, scale: &[f32], shift: &[f32], act: Act) -> Vec<f32> {
    let c = scale.len().max(1);
    let mut out = vec![0f32; x.len()];
    planes(&mut out, plane).for_each(|(p, o)| {
        gated!(act, scale_shift(o, &x[p * plane..(p + 1) * plane], scale[p % c], shift[p % c]));
    });
    out
}

/// `act((x − μ_B) / sqrt(σ²_B + eps) · γ + β)` with the batch's own statistics, and those
/// statistics (`[2, C]`: mean, biased variance), detached, for the running averages.
pub fn train_forward(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64, act: Act) -> Result<(Tensor, Tensor)> {
    let x = x.contiguous()?;
    if !kernels_apply(super::Kernel::BatchNorm, &[&x, gamma, beta]) {
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
        return Ok((act.tensor(&y)?, stats));
    }
    let kept = Arc::new(Mutex::new(Vec::new()));
    let y = x.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, Fused { eps, act, stats: kept.clone() })?;
    let st = locked(&kept)?;
    Ok((y, Tensor::from_vec(two_rows(&st), (2, st.len()), x.device())?))
}

/// `act(x · scale + shift)` per channel (`scale`, `shift`: `[C]`), differentiable in all
/// three: batch norm with running statistics folded into one scale and shift.
pub fn affine_act(x: &Tensor, scale: &Tensor, shift: &Tensor, act: Act) -> Result<Tensor> {
    let c = x.dim(1)?;
    if !kernels_apply(super::Kernel::BatchNorm, &[x, scale, shift]) {
        let shape = (1, c, 1, 1);
        return act.tensor(&x.broadcast_mul(&scale.reshape(shape)?)?.broadcast_add(&shift.reshape(shape)?)?);
    }
    x.contiguous()?.apply_op3(&scale.contiguous()?, &shift.contiguous()?, Affine { act })
}

/// Per-channel mean and biased variance of `[N, C, H, W]`, in f64 sums.
fn channel_stats(x: &[f32], n: usize, c: usize, plane: usize) -> Vec<(f64, f64)> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            if n == 0 || plane == 0 {
                return (0.0, 0.0);
            }
            // Sums of x − x₀ (the channel's first value): E[x²] − E[x]² cancels badly when
            // the mean is large against the spread; shifted by a sample it does not.
            let shift = x[ch * plane];
            let (mut s, mut s2) = (0f64, 0f64);
            for img in 0..n {
                let p = &x[(img * c + ch) * plane..(img * c + ch + 1) * plane];
                let (mut a, mut b) = ([0f32; LANES], [0f32; LANES]);
                let mut chunks = p.chunks_exact(LANES);
                for v in &mut chunks {
                    for l in 0..LANES {
                        let d = v[l] - shift;
                        a[l] += d;
                        b[l] += d * d;
                    }
                }
                for v in chunks.remainder() {
                    let d = v - shift;
                    a[0] += d;
                    b[0] += d * d;
                }
                s += f64::from(a.iter().sum::<f32>());
                s2 += f64::from(b.iter().sum::<f32>());
            }
            let m = (n * plane) as f64;
            let mean = s / m;
            (f64::from(shift) + mean, (s2 / m - mean * mean).max(0.0))
        })
        .collect()
}

/// Per-channel pairs as a `[2, C]` tensor: firsts, then seconds.
fn two_rows(pairs: &[(f64, f64)]) -> Vec<f32> {
    pairs.iter().map(|p| p.0 as f32).chain(pairs.iter().map(|p| p.1 as f32)).collect()
}

/// One buffer `[dx…, da…, db…]` for an input gradient of `len` values and two parameter
/// gradients per channel, so that one op returns all three ([`split3`]): `grads` fills
/// the input gradient and returns the parameters' pairs.
fn flat_grads(len: usize, c: usize, grads: impl FnOnce(&mut [f32]) -> Vec<(f32, f32)>) -> (CpuStorage, Shape) {
    let mut out = vec![0f32; len + 2 * c];
    let (grad, rest) = out.split_at_mut(len);
    let params = grads(grad);
    let (da, db) = rest.split_at_mut(c);
    for ((a, b), p) in da.iter_mut().zip(db).zip(&params) {
        (*a, *b) = *p;
    }
    (CpuStorage::F32(out), Shape::from(len + 2 * c))
}

/// The batch's statistics, as the forward pass left them.
fn locked(stats: &Mutex<Vec<(f64, f64)>>) -> Result<std::sync::MutexGuard<'_, Vec<(f64, f64)>>> {
    stats.lock().map_err(|_| candle_core::Error::Msg("batch norm: statistics lock poisoned".into()))
}

fn dims(l: &Layout) -> Result<(usize, usize, usize)> {
    match l.dims() {
        &[n, c, h, w] => Ok((n, c, h * w)),
        d => candle_core::bail!("batch norm: expected [N, C, H, W], got {d:?}"),
    }
}

/// Splits a flat `[dx…, da…, db…]` gradient into its three parts (views, no copy).
fn split3(flat: Tensor, x: &Tensor, c: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let n = x.elem_count();
    Ok((flat.narrow(0, 0, n)?.reshape(x.shape())?, flat.narrow(0, n, c)?, flat.narrow(0, n + c, c)?))
}

struct Fused {
    eps: f64,
    act: Act,
    /// The batch's statistics, written by the forward pass, read by the caller (running
    /// averages) and by the backward pass.
    stats: Arc<Mutex<Vec<(f64, f64)>>>,
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
        if gamma.len() != c || beta.len() != c {
            candle_core::bail!("batch norm: {c} channels, but {} scales and {} shifts", gamma.len(), beta.len());
        }
        let st = channel_stats(x, n, c, plane);
        let (scale, shift): (Vec<f32>, Vec<f32>) = st
            .iter()
            .zip(gamma.iter().zip(beta))
            .map(|(&(mean, var), (&g, &b))| {
                let inv = 1.0 / (var + self.eps).sqrt();
                ((f64::from(g) * inv) as f32, (f64::from(b) - mean * inv * f64::from(g)) as f32)
            })
            .unzip();
        let out = affine_planes(x, plane, &scale, &shift, self.act);
        *locked(&self.stats)? = st;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let st = locked(&self.stats)?.clone();
        let op = FusedGrad { eps: self.eps, act: self.act, stats: st, gamma: gamma.to_vec1::<f32>()? };
        let flat = x.apply_op3_no_bwd(y, &grad.contiguous()?, &op)?;
        let (dx, dgamma, dbeta) = split3(flat, x, gamma.elem_count())?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// The gradients of [`Fused`] from `x`, `y` and `dy`, flat: `[dx…, dγ…, dβ…]`.
struct FusedGrad {
    eps: f64,
    act: Act,
    stats: Vec<(f64, f64)>,
    gamma: Vec<f32>,
}

impl CustomOp3 for FusedGrad {
    fn name(&self) -> &'static str {
        "kiln-batch-norm-grad"
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
        let (x, y, dy) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        if self.stats.len() != c || self.gamma.len() != c || y.len() != x.len() || dy.len() != x.len() {
            candle_core::bail!("batch norm backward: shapes do not fit");
        }
        let inv: Vec<f64> = self.stats.iter().map(|s| 1.0 / (s.1 + self.eps).sqrt()).collect();
        let m = (n * plane) as f64;
        Ok(flat_grads(x.len(), c, |dx| {
            // dx ← dy' (the gradient that passes the activation), and per channel
            // sum(dy'·(x − μ)) and sum(dy').
            let sums = channel_sums(dx, c, plane, |p, o| {
                let r = p * plane..(p + 1) * plane;
                gated!(self.act, gate_and_sum(o, &x[r.clone()], &y[r.clone()], &dy[r], self.stats[p % c].0 as f32))
            });
            // dx = k·(g − mean(g) − x̂·mean(g·x̂)), written as on_g·g + on_x·x + offset per channel.
            planes(dx, plane).for_each(|(i, o)| {
                let ch = i % c;
                let k = f64::from(self.gamma[ch]) * inv[ch];
                let (mean_dy, mean_dxhat) = (sums[ch].1 / m, sums[ch].0 * inv[ch] / m);
                let slope = -k * inv[ch] * mean_dxhat;
                let (on_g, on_x, offset) = (k as f32, slope as f32, (-k * mean_dy - slope * self.stats[ch].0) as f32);
                for (o, v) in o.iter_mut().zip(&x[i * plane..(i + 1) * plane]) {
                    *o = on_g * *o + on_x * v + offset;
                }
            });
            sums.iter().zip(&inv).map(|(s, inv)| ((s.0 * inv) as f32, s.1 as f32)).collect()
        }))
    }
}

struct Affine {
    act: Act,
}

impl CustomOp3 for Affine {
    fn name(&self) -> &'static str {
        "kiln-affine-act"
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
        let (_, c, plane) = dims(l1)?;
        let (x, scale, shift) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        if scale.len() != c || shift.len() != c {
            candle_core::bail!("affine: scale and shift must have {c} values");
        }
        Ok((CpuStorage::F32(affine_planes(x, plane, scale, shift, self.act)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        shift: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = AffineGrad { act: self.act, scale: scale.to_vec1::<f32>()? };
        let flat = x.apply_op3_no_bwd(y, &grad.contiguous()?, &op)?;
        let (dx, dscale, dshift) = split3(flat, x, scale.elem_count())?;
        let keep = |t: &Tensor, g: Tensor| if t.track_op() { Some(g) } else { None };
        Ok((keep(x, dx), keep(scale, dscale), keep(shift, dshift)))
    }
}

/// The gradients of [`Affine`] from `x`, `y` and `dy`, flat: `[dx…, dscale…, dshift…]`.
struct AffineGrad {
    act: Act,
    scale: Vec<f32>,
}

impl CustomOp3 for AffineGrad {
    fn name(&self) -> &'static str {
        "kiln-affine-act-grad"
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
        let (_, c, plane) = dims(l1)?;
        let (x, y, dy) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        if self.scale.len() != c || y.len() != x.len() || dy.len() != x.len() {
            candle_core::bail!("affine backward: shapes do not fit");
        }
        Ok(flat_grads(x.len(), c, |dx| {
            let sums = channel_sums(dx, c, plane, |p, o| {
                let r = p * plane..(p + 1) * plane;
                gated!(self.act, gate_and_sum(o, &x[r.clone()], &y[r.clone()], &dy[r], 0.0))
            });
            // The gate applied to k·dy (not k times the gated dy): the same bits as before,
            // a zero's sign included, for a negative scale.
            fn plane_grad<G: Gate>(gate: G, o: &mut [f32], y: &[f32], dy: &[f32], k: f32) {
                for ((o, out), g) in o.iter_mut().zip(y).zip(dy) {
                    *o = gate.grad(*out, k * g);
                }
            }
            planes(dx, plane).for_each(|(i, o)| {
                let r = i * plane..(i + 1) * plane;
                gated!(self.act, plane_grad(o, &y[r.clone()], &dy[r], self.scale[i % c]));
            });
            sums.iter().map(|s| (s.0 as f32, s.1 as f32)).collect()
        }))
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

    fn diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// The fused op against the same formula written with candle's differentiable ops (the
    /// path other devices take), for each activation, forward and all three gradients.
    #[test]
    fn fused_batch_norm_matches_the_composite_forward_and_backward() {
        for act in [Act::Identity, Act::Relu, Act::Relu6] {
            let x = Var::from_tensor(&(data(&[3, 4, 5, 6], 1) * 3.0).unwrap()).unwrap();
            let gamma = Var::from_tensor(&(data(&[4], 2) * 2.0).unwrap()).unwrap();
            let beta = Var::from_tensor(&data(&[4], 3)).unwrap();
            let eps = 1e-5;
            let (ours, stats) = train_forward(&x, &gamma, &beta, eps, act).unwrap();
            let mean = x.mean_keepdim((0, 2, 3)).unwrap();
            let var = x.broadcast_sub(&mean).unwrap().sqr().unwrap().mean_keepdim((0, 2, 3)).unwrap();
            let normed = x
                .broadcast_sub(&mean)
                .unwrap()
                .broadcast_div(&(&var + eps).unwrap().sqrt().unwrap())
                .unwrap()
                .broadcast_mul(&gamma.reshape((1, 4, 1, 1)).unwrap())
                .unwrap()
                .broadcast_add(&beta.reshape((1, 4, 1, 1)).unwrap())
                .unwrap();
            let theirs = act.tensor(&normed).unwrap();
            assert!(diff(&ours, &theirs) < 1e-4, "{act:?}");
            assert!(diff(&stats.get(0).unwrap(), &mean.flatten_all().unwrap()) < 1e-5);
            assert!(diff(&stats.get(1).unwrap(), &var.flatten_all().unwrap()) < 1e-4);
            let probe = data(&[3, 4, 5, 6], 4);
            let g1 = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (v, what) in [(x.as_tensor(), "x"), (gamma.as_tensor(), "gamma"), (beta.as_tensor(), "beta")] {
                assert!(diff(g1.get(v).unwrap(), g2.get(v).unwrap()) < 1e-3, "{act:?}: grad {what}");
            }
        }
    }

    /// Scale-and-shift with an activation against candle's ops, and its gradients.
    #[test]
    fn affine_activation_matches_the_composite_forward_and_backward() {
        for act in [Act::Identity, Act::Relu, Act::Relu6] {
            let x = Var::from_tensor(&(data(&[2, 3, 4, 5], 5) * 4.0).unwrap()).unwrap();
            let scale = Var::from_tensor(&(data(&[3], 6) * 2.0).unwrap()).unwrap();
            let shift = Var::from_tensor(&data(&[3], 7)).unwrap();
            let ours = affine_act(&x, &scale, &shift, act).unwrap();
            let shape = (1, 3, 1, 1);
            let theirs = act
                .tensor(&x.broadcast_mul(&scale.reshape(shape).unwrap()).unwrap().broadcast_add(&shift.reshape(shape).unwrap()).unwrap())
                .unwrap();
            assert!(diff(&ours, &theirs) < 1e-5, "{act:?}");
            let probe = data(&[2, 3, 4, 5], 8);
            let g1 = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for (v, what) in [(x.as_tensor(), "x"), (scale.as_tensor(), "scale"), (shift.as_tensor(), "shift")] {
                assert!(diff(g1.get(v).unwrap(), g2.get(v).unwrap()) < 1e-3, "{act:?}: grad {what}");
            }
        }
    }
}
