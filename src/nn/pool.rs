//! Max pooling as a custom op, forward and backward, on the CPU.
//!
//! candle's max-pool backward finds the maxima again by upsampling the output, comparing,
//! averaging ties and upsampling the gradient: nine passes over the activation for a 2×2
//! pool, and it refuses a kernel larger than its stride (the ResNet stem's 3×3, stride 2),
//! which kiln had written as the maximum of nine strided views. Here the forward pass is
//! one pass, and the backward pass finds each window's first maximum (PyTorch's choice on
//! ties) and routes the gradient there. Padding counts as −∞, as in PyTorch.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::Result;
use super::depthwise::slice;

/// `k × k` max pooling with `stride` and `padding` on each side over `[N, C, H, W]`.
pub fn max_pool2d(x: &Tensor, k: usize, stride: usize, padding: usize) -> Result<Tensor> {
    if !super::kernels_apply(super::Kernel::Pool, &[x]) {
        return fallback(x, k, stride, padding);
    }
    x.contiguous()?.apply_op1(MaxPool { k, stride, padding })
}

/// What other devices run: the maximum of `k²` strided views of the zero-padded input,
/// which candle differentiates exactly. (candle's own max pool refuses a backward pass
/// whose kernel differs from its stride, and scales the gradient by 1/k² where it does
/// not; see the tests.) Zero padding equals −∞ padding because every pool in kiln's
/// networks follows a ReLU.
fn fallback(x: &Tensor, k: usize, stride: usize, padding: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = MaxPool { k, stride, padding }.out(h, w)?;
    // Room for `stride · out` rows and columns from every tap's offset.
    let (bottom, right) = ((stride * oh + k).saturating_sub(h + padding), (stride * ow + k).saturating_sub(w + padding));
    let xp = x.pad_with_zeros(2, padding, bottom)?.pad_with_zeros(3, padding, right)?;
    let mut out: Option<Tensor> = None;
    for dy in 0..k {
        for dx in 0..k {
            let v = xp.narrow(2, dy, stride * oh)?.narrow(3, dx, stride * ow)?;
            let v = v.reshape((n, c, oh, stride, ow, stride))?.narrow(3, 0, 1)?.narrow(5, 0, 1)?.reshape((n, c, oh, ow))?;
            out = Some(match out {
                None => v,
                Some(o) => o.maximum(&v)?,
            });
        }
    }
    out.ok_or_else(|| candle_core::Error::Msg("max pool: empty window".into()))
}

#[derive(Debug, Clone, Copy)]
struct MaxPool {
    k: usize,
    stride: usize,
    padding: usize,
}

impl MaxPool {
    fn out(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        if self.k == 0 || self.stride == 0 || h == 0 || w == 0 || h + 2 * self.padding < self.k || w + 2 * self.padding < self.k {
            candle_core::bail!("max pool: a {0}x{0} window does not fit a {h}x{w} input", self.k);
        }
        // As PyTorch: more padding than half the window would leave windows with no pixel.
        if 2 * self.padding > self.k {
            candle_core::bail!("max pool: padding {} is more than half the {}x{} window", self.padding, self.k, self.k);
        }
        Ok(((h + 2 * self.padding - self.k) / self.stride + 1, (w + 2 * self.padding - self.k) / self.stride + 1))
    }

    /// The index in the plane of the first maximum of output `(oy, ox)`'s window.
    #[inline]
    fn argmax(&self, x: &[f32], w: usize, h: usize, oy: usize, ox: usize) -> usize {
        let (y0, x0) = ((oy * self.stride) as isize - self.padding as isize, (ox * self.stride) as isize - self.padding as isize);
        let (ys, ye) = (y0.max(0) as usize, ((y0 + self.k as isize) as usize).min(h));
        let (xs, xe) = (x0.max(0) as usize, ((x0 + self.k as isize) as usize).min(w));
        let mut best = ys * w + xs;
        for iy in ys..ye {
            for ix in xs..xe {
                // `>` keeps the first of equal values; NaN wins so that it propagates.
                let i = iy * w + ix;
                if beats(x[i], x[best]) {
                    best = i;
                }
            }
        }
        best
    }
}

/// Whether `v` takes over from `best`: larger, or NaN (so that it propagates). Written
/// with `|` and `&`, not `||` and `&&`, so that it compiles to a select: on a ReLU's output
/// the winner of a window is close to random, and a branch mispredicted every other time.
#[inline(always)]
fn beats(v: f32, best: f32) -> bool {
    (v > best) | (v.is_nan() & !best.is_nan())
}

/// The larger of two values, the first on a tie, NaN winning (as in the backward pass).
/// A bit-mask select: as `if`, LLVM made it a branch in the pooling loop.
#[inline(always)]
fn wins(best: f32, v: f32) -> f32 {
    let take = 0u32.wrapping_sub(u32::from(beats(v, best)));
    f32::from_bits((v.to_bits() & take) | (best.to_bits() & !take))
}

fn dims(l: &Layout) -> Result<(usize, usize, usize, usize)> {
    match l.dims() {
        &[n, c, h, w] => Ok((n, c, h, w)),
        d => candle_core::bail!("max pool: expected [N, C, H, W], got {d:?}"),
    }
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "kiln-max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = dims(l)?;
        let (oh, ow) = self.out(h, w)?;
        let x = slice(s, l)?;
        let mut out = vec![0f32; n * c * oh * ow];
        out.par_chunks_mut(oh * ow).zip(x.par_chunks(h * w)).for_each(|(o, x)| {
            if self.k == 2 && self.stride == 2 && self.padding == 0 {
                // The common case without the window bookkeeping.
                for (oy, o) in o.chunks_exact_mut(ow).enumerate() {
                    let (r0, r1) = (&x[2 * oy * w..(2 * oy + 1) * w], &x[(2 * oy + 1) * w..(2 * oy + 2) * w]);
                    for ((o, a), b) in o.iter_mut().zip(r0.chunks_exact(2)).zip(r1.chunks_exact(2)) {
                        // A tree, not a chain (the same first maximum): independent selects.
                        *o = wins(wins(a[0], a[1]), wins(b[0], b[1]));
                    }
                }
            } else {
                for oy in 0..oh {
                    for ox in 0..ow {
                        o[oy * ow + ox] = x[self.argmax(x, w, h, oy, ox)];
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op3_no_bwd(res, &grad.contiguous()?, &MaxPoolGrad(*self))?))
    }
}

/// `g` where `hit`, else 0, by a bit mask rather than a branch (see [`beats`]).
#[inline(always)]
fn keep(g: f32, hit: bool) -> f32 {
    f32::from_bits(g.to_bits() & 0u32.wrapping_sub(u32::from(hit)))
}

/// Whether tap `v` is the one the forward pass chose as the window's maximum `m`: the
/// first tap with `m`'s bits. (An earlier tap of equal value but other bits, −0 against
/// +0, would itself have been chosen; a NaN wins only as the window's first NaN.)
#[inline(always)]
fn same(v: f32, m: f32) -> bool {
    v.to_bits() == m.to_bits()
}

/// Each output's gradient, added to its window's first maximum; from `x`, the pool's
/// output `y` and `dy`.
struct MaxPoolGrad(MaxPool);

impl candle_core::CustomOp3 for MaxPoolGrad {
    fn name(&self) -> &'static str {
        "kiln-max-pool2d-grad"
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
        let (n, c, h, w) = dims(l1)?;
        let (oh, ow) = self.0.out(h, w)?;
        if l2.dims() != [n, c, oh, ow] || l3.dims() != [n, c, oh, ow] {
            candle_core::bail!("max pool backward: output {:?} or gradient {:?} does not fit", l2.dims(), l3.dims());
        }
        let (x, y, dy) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let mut dx = vec![0f32; x.len()];
        let planes = dx.par_chunks_mut(h * w).zip(x.par_chunks(h * w)).zip(y.par_chunks(oh * ow).zip(dy.par_chunks(oh * ow)));
        planes.for_each(|((dx, x), (y, dy))| {
            if self.0.k == 2 && self.0.stride == 2 && self.0.padding == 0 {
                // Windows do not overlap. The first tap equal to the window's maximum takes
                // the gradient and every tap is written (the gradient or 0): the winner of
                // a window of ReLU outputs is close to random, and searching for it with
                // compares mispredicted a branch on most windows.
                for oy in 0..oh {
                    let (upper, lower) = dx.split_at_mut((2 * oy + 1) * w);
                    let (d0, d1) = (&mut upper[2 * oy * w..], &mut lower[..w]);
                    let (r0, r1) = (&x[2 * oy * w..(2 * oy + 1) * w], &x[(2 * oy + 1) * w..(2 * oy + 2) * w]);
                    let outs = y[oy * ow..(oy + 1) * ow].iter().zip(&dy[oy * ow..(oy + 1) * ow]);
                    let taps = r0.chunks_exact(2).zip(r1.chunks_exact(2)).zip(d0.chunks_exact_mut(2).zip(d1.chunks_exact_mut(2)));
                    for ((&m, &g), ((a, b), (da, db))) in outs.zip(taps) {
                        let t0 = same(a[0], m);
                        let t1 = !t0 & same(a[1], m);
                        let t2 = !(t0 | t1) & same(b[0], m);
                        let t3 = !(t0 | t1 | t2);
                        (da[0], da[1], db[0], db[1]) = (keep(g, t0), keep(g, t1), keep(g, t2), keep(g, t3));
                    }
                }
                return;
            }
            for oy in 0..oh {
                for ox in 0..ow {
                    dx[self.0.argmax(x, w, h, oy, ox)] += dy[oy * ow + ox];
                }
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_support::{data, max_diff};
    use candle_core::Var;

    /// Forward against candle's pool and against the fallback (the other devices' path),
    /// backward against the fallback, for the CNN's 2×2 and the ResNet stem's 3×3 / 2 / 1,
    /// odd sizes included. candle's own max-pool backward is not the reference: it scales
    /// the gradient by 1/k² (its tie-splitting average divides every window by k², not by
    /// the number of maxima), which the last check pins down.
    #[test]
    fn matches_candle_pooling_forward_and_backward() {
        for (k, stride, pad, h, w) in [(2, 2, 0, 8, 6), (2, 2, 0, 7, 9), (3, 2, 1, 8, 8), (3, 2, 1, 7, 9), (3, 1, 1, 5, 5)] {
            // Distinct values, so that every window has one maximum.
            let n = 2 * 3 * h * w;
            let v: Vec<f32> = (0..n).map(|i| ((i * 37) % n) as f32 / n as f32).collect();
            let x = Var::from_tensor(&Tensor::from_vec(v, (2, 3, h, w), &candle_core::Device::Cpu).unwrap()).unwrap();
            let ours = max_pool2d(&x, k, stride, pad).unwrap();
            // candle's own pool, zero-padded (the input is non-negative).
            let theirs = {
                let xp = x.pad_with_zeros(2, pad, pad).unwrap().pad_with_zeros(3, pad, pad).unwrap();
                xp.max_pool2d_with_stride(k, stride).unwrap()
            };
            let reference = fallback(&x, k, stride, pad).unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "k={k} s={stride} {h}x{w}");
            assert_eq!(max_diff(&ours, &theirs), 0.0);
            assert_eq!(max_diff(&ours, &reference), 0.0);
            let probe = data(ours.dims(), 2);
            let g1 = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&reference * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-6, "k={k} s={stride} {h}x{w}");
            // (On sizes the pool does not divide, candle's upsampling misplaces it too.)
            if k == stride && h % k == 0 && w % k == 0 {
                let g3 = (&theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let scaled = (g3.get(&x).unwrap() * (k * k) as f64).unwrap();
                assert!(max_diff(g1.get(&x).unwrap(), &scaled) < 1e-5, "candle's 1/k² scaling changed: k={k} {h}x{w}");
            }
        }
    }

    /// Overlapping windows: finite differences, with distinct values so each maximum is
    /// unique and a small step does not change which element wins.
    #[test]
    fn overlapping_windows_route_the_gradient_to_each_maximum() {
        let n = 2 * 2 * 7 * 7;
        let v: Vec<f32> = (0..n).map(|i| ((i * 37) % n) as f32 * 0.01 - 1.0).collect();
        let x = Tensor::from_vec(v.clone(), (2, 2, 7, 7), &candle_core::Device::Cpu).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let probe = data(&[2, 2, 4, 4], 3);
        let loss = |t: &Tensor| (max_pool2d(t, 3, 2, 1).unwrap() * &probe).unwrap().sum_all().unwrap();
        let grad = loss(&xv).backward().unwrap().get(&xv).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let f =
            |v: &[f32]| loss(&Tensor::from_vec(v.to_vec(), (2, 2, 7, 7), &candle_core::Device::Cpu).unwrap()).to_scalar::<f32>().unwrap();
        for i in (0..n).step_by(5) {
            let (mut up, mut down) = (v.clone(), v.clone());
            up[i] += 1e-3;
            down[i] -= 1e-3;
            let numeric = (f(&up) - f(&down)) / 2e-3;
            assert!((numeric - grad[i]).abs() < 1e-2, "element {i}: {numeric} vs {}", grad[i]);
        }
        // A negative input with padding: −∞ padding, not zero, wins nothing.
        let neg = Tensor::full(-5f32, (1, 1, 3, 3), &candle_core::Device::Cpu).unwrap();
        let pooled = max_pool2d(&neg, 3, 2, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(pooled, vec![-5.0; 4]);
    }

    /// Bad geometry is an error, not a panic or a window of padding; a NaN wins its window
    /// in the 2×2 fast path as in the general one.
    #[test]
    fn bad_windows_are_errors_and_nan_propagates() {
        let x = Tensor::ones((1, 1, 1, 1), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(max_pool2d(&x, 2, 2, 2).is_err(), "padding more than half the window");
        assert!(max_pool2d(&x, 3, 0, 1).is_err(), "stride 0");
        let v = vec![1.0, f32::NAN, 2.0, 3.0];
        let x = Tensor::from_vec(v, (1, 1, 2, 2), &candle_core::Device::Cpu).unwrap();
        for (k, s, p) in [(2, 2, 0), (3, 2, 1)] {
            let y = max_pool2d(&x, k, s, p).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(y[0].is_nan(), "k={k}: {y:?}");
        }
    }

    /// The 2×2 kernels choose by selects and bit masks, not branches; on a ReLU's output
    /// most windows hold ties (zeros, and −0 beside +0) and NaN must still win. Each
    /// window's gradient must land on its first maximum under `>` with NaN winning, as a
    /// plain search finds it, and nowhere else.
    #[test]
    fn two_by_two_windows_route_ties_signed_zeros_and_nan_to_the_first_maximum() {
        let windows: [[f32; 4]; 8] = [
            [0.0, 0.0, 0.0, 0.0],
            [-0.0, 0.0, 0.0, -0.0],
            [0.0, -0.0, 1.0, 1.0],
            [2.0, 3.0, 3.0, 1.0],
            [f32::NAN, 1.0, f32::NAN, 5.0],
            [1.0, 5.0, f32::NAN, f32::NAN],
            [-1.0, -2.0, -0.5, -0.5],
            [7.0, 7.0, 7.0, 7.0],
        ];
        // Eight windows side by side: a 2×16 plane.
        let (h, w) = (2, 16);
        let mut v = vec![0f32; h * w];
        for (j, win) in windows.iter().enumerate() {
            (v[2 * j], v[2 * j + 1], v[w + 2 * j], v[w + 2 * j + 1]) = (win[0], win[1], win[2], win[3]);
        }
        let x = Var::from_tensor(&Tensor::from_vec(v, (1, 1, h, w), &candle_core::Device::Cpu).unwrap()).unwrap();
        let y = max_pool2d(&x, 2, 2, 0).unwrap();
        let probe: Vec<f32> = (1..=windows.len()).map(|i| i as f32).collect();
        let probe = Tensor::from_vec(probe, (1, 1, 1, windows.len()), &candle_core::Device::Cpu).unwrap();
        let dx = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = dx.get(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let out = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (j, win) in windows.iter().enumerate() {
            let mut best = 0;
            for t in 1..4 {
                if win[t] > win[best] || (win[t].is_nan() && !win[best].is_nan()) {
                    best = t;
                }
            }
            assert_eq!(out[j].to_bits(), win[best].to_bits(), "window {j}: output");
            let taps = [2 * j, 2 * j + 1, w + 2 * j, w + 2 * j + 1];
            for (t, &i) in taps.iter().enumerate() {
                let want = if t == best { (j + 1) as f32 } else { 0.0 };
                assert_eq!(dx[i], want, "window {j} {win:?}: tap {t}");
            }
        }
    }
}
