//! Depthwise convolution as a candle custom op.
//!
//! candle runs a grouped convolution as one convolution per group: for a depthwise layer
//! (groups = channels) that is hundreds of tiny im2col + matmul calls, 148–275 ms per
//! EfficientNet layer on 2 cores. Here each (image, channel) plane is one task: for every
//! kernel tap the output row is a shifted, scaled copy of an input row, which the compiler
//! vectorises for stride 1. The backward pass (input and weight gradients) is written the
//! same way, so depthwise layers can be fine-tuned too. Other devices fall back to candle's
//! grouped convolution.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::Result;

/// `x`: `[N, C, H, W]`, `w`: `[C, 1, K, K]`; symmetric zero padding.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if !super::kernels_apply(super::Kernel::Depthwise, &[x, w]) {
        let c = x.dim(1)?;
        return x.conv2d(w, padding, stride, 1, c);
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, Depthwise { stride, padding })
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub oh: usize,
    pub ow: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Geometry {
    pub(crate) fn new(x: &[usize], w: &[usize], stride: usize, padding: usize) -> Result<Self> {
        let [n, c, h, wd] = x else { candle_core::bail!("depthwise conv: input must be [N, C, H, W], got {x:?}") };
        let [wc, 1, k, k2] = w else { candle_core::bail!("depthwise conv: kernel must be [C, 1, K, K], got {w:?}") };
        if wc != c || k != k2 {
            candle_core::bail!("depthwise conv: kernel {w:?} does not fit input {x:?}");
        }
        if stride == 0 || *h == 0 || *wd == 0 || *k == 0 {
            candle_core::bail!("conv: stride {stride}, kernel {k} and input {h}x{wd} must all be at least 1");
        }
        let oh = (h + 2 * padding).checked_sub(*k).map(|v| v / stride + 1);
        let ow = (wd + 2 * padding).checked_sub(*k).map(|v| v / stride + 1);
        let (Some(oh), Some(ow)) = (oh, ow) else { candle_core::bail!("depthwise conv: kernel larger than padded input") };
        Ok(Geometry { n: *n, c: *c, h: *h, w: *wd, k: *k, oh, ow, stride, padding })
    }

    /// Output columns `ox` whose input column `ox * stride + kx - padding` is inside the image.
    fn cols(&self, kx: usize) -> (usize, usize) {
        let lo = self.padding.saturating_sub(kx).div_ceil(self.stride);
        let hi = if self.w + self.padding > kx { ((self.w - 1 + self.padding - kx) / self.stride + 1).min(self.ow) } else { 0 };
        (lo, hi.max(lo))
    }

    fn row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.stride + ky).checked_sub(self.padding).filter(|iy| *iy < self.h)
    }

    /// Calls `f(iy, ix0, ox_lo, ox_hi, tap)` for each output row and kernel tap that touch
    /// the image, where the input column of output column `ox` is `ix0 + ox * stride`.
    pub(crate) fn for_taps(&self, oy: usize, mut f: impl FnMut(usize, usize, usize, usize, usize)) {
        for ky in 0..self.k {
            let Some(iy) = self.row(oy, ky) else { continue };
            for kx in 0..self.k {
                let (lo, hi) = self.cols(kx);
                if lo < hi {
                    f(iy, lo * self.stride + kx - self.padding, lo, hi, ky * self.k + kx);
                }
            }
        }
    }
}

pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("depthwise conv: input is not contiguous"),
    }
}

struct Depthwise {
    stride: usize,
    padding: usize,
}

impl CustomOp2 for Depthwise {
    fn name(&self) -> &'static str {
        "kiln-depthwise-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l1.dims(), l2.dims(), self.stride, self.padding)?;
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let (plane_in, plane_out, taps) = (g.h * g.w, g.oh * g.ow, g.k * g.k);
        let mut out = vec![0f32; g.n * g.c * plane_out];
        out.par_chunks_mut(plane_out).enumerate().for_each(|(p, out)| {
            let x = &x[p * plane_in..(p + 1) * plane_in];
            let w = &w[(p % g.c) * taps..(p % g.c + 1) * taps];
            for oy in 0..g.oh {
                let row = &mut out[oy * g.ow..(oy + 1) * g.ow];
                g.for_taps(oy, |iy, ix0, lo, hi, t| {
                    let (wv, src) = (w[t], &x[iy * g.w..(iy + 1) * g.w]);
                    if g.stride == 1 {
                        for (o, i) in row[lo..hi].iter_mut().zip(&src[ix0..ix0 + hi - lo]) {
                            *o += wv * i;
                        }
                    } else {
                        for (j, o) in row[lo..hi].iter_mut().enumerate() {
                            *o += wv * src[ix0 + j * g.stride];
                        }
                    }
                });
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.c, g.oh, g.ow))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (h, wd) = (x.dim(2)?, x.dim(3)?);
        let gx = grad.apply_op2_no_bwd(w, &GradInput { stride: self.stride, padding: self.padding, h, w: wd })?;
        let k = w.dim(2)?;
        let gw = x.apply_op2_no_bwd(&grad, &GradWeight { stride: self.stride, padding: self.padding, k })?;
        Ok((Some(gx), Some(gw)))
    }
}

/// d(loss)/d(input): every output gradient flows back to the input pixels it read.
struct GradInput {
    stride: usize,
    padding: usize,
    h: usize,
    w: usize,
}

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "kiln-depthwise-conv2d-grad-input"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let &[n, c, _, _] = l1.dims() else { candle_core::bail!("depthwise grad: bad gradient shape") };
        let g = Geometry::new(&[n, c, self.h, self.w], l2.dims(), self.stride, self.padding)?;
        let (gy, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let (plane_in, plane_out, taps) = (g.h * g.w, g.oh * g.ow, g.k * g.k);
        let mut out = vec![0f32; n * c * plane_in];
        out.par_chunks_mut(plane_in).enumerate().for_each(|(p, gx)| {
            let gy = &gy[p * plane_out..(p + 1) * plane_out];
            let w = &w[(p % c) * taps..(p % c + 1) * taps];
            for oy in 0..g.oh {
                let grow = &gy[oy * g.ow..(oy + 1) * g.ow];
                g.for_taps(oy, |iy, ix0, lo, hi, t| {
                    let (wv, dst) = (w[t], &mut gx[iy * g.w..(iy + 1) * g.w]);
                    for (j, gv) in grow[lo..hi].iter().enumerate() {
                        dst[ix0 + j * g.stride] += wv * gv;
                    }
                });
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c, self.h, self.w))))
    }
}

/// d(loss)/d(kernel): per channel, the sum over images and positions of output gradient
/// times the input pixel each tap read.
struct GradWeight {
    stride: usize,
    padding: usize,
    k: usize,
}

impl CustomOp2 for GradWeight {
    fn name(&self) -> &'static str {
        "kiln-depthwise-conv2d-grad-weight"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let c = l1.dims()[1];
        let g = Geometry::new(l1.dims(), &[c, 1, self.k, self.k], self.stride, self.padding)?;
        if l2.dims() != [g.n, g.c, g.oh, g.ow] {
            candle_core::bail!("depthwise grad: gradient shape {:?} does not fit", l2.dims());
        }
        let (x, gy) = (slice(s1, l1)?, slice(s2, l2)?);
        let (plane_in, plane_out, taps) = (g.h * g.w, g.oh * g.ow, g.k * g.k);
        let mut out = vec![0f32; c * taps];
        out.par_chunks_mut(taps).enumerate().for_each(|(ch, gw)| {
            let mut acc = vec![0f64; taps];
            for img in 0..g.n {
                let p = img * c + ch;
                let (x, gy) = (&x[p * plane_in..(p + 1) * plane_in], &gy[p * plane_out..(p + 1) * plane_out]);
                for oy in 0..g.oh {
                    let grow = &gy[oy * g.ow..(oy + 1) * g.ow];
                    g.for_taps(oy, |iy, ix0, lo, hi, t| {
                        let src = &x[iy * g.w..(iy + 1) * g.w];
                        let mut s = 0f32;
                        for (j, gv) in grow[lo..hi].iter().enumerate() {
                            s += gv * src[ix0 + j * g.stride];
                        }
                        acc[t] += f64::from(s);
                    });
                }
            }
            for (o, a) in gw.iter_mut().zip(acc) {
                *o = a as f32;
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((c, 1, self.k, self.k))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_support::{data, max_diff};
    use candle_core::Var;

    /// Forward and both gradients by definition (plain loops), for the kernel sizes,
    /// strides and odd sizes EfficientNet uses. (candle's own grouped-convolution backward
    /// fails on odd sizes with stride 2, so it cannot be the reference.)
    #[test]
    fn matches_the_definition_forward_and_backward() {
        for (k, stride, h, w) in [(3, 1, 9, 7), (3, 2, 9, 8), (5, 1, 6, 11), (5, 2, 12, 13)] {
            let (n, c, pad) = (2, 4, k / 2);
            let x = Var::from_tensor(&data(&[n, c, h, w], 1)).unwrap();
            let wt = Var::from_tensor(&data(&[c, 1, k, k], 2)).unwrap();
            let ours = conv2d(&x, &wt, stride, pad).unwrap();
            let (oh, ow) = ((h + 2 * pad - k) / stride + 1, (w + 2 * pad - k) / stride + 1);
            assert_eq!(ours.dims(), &[n, c, oh, ow]);
            let probe = data(ours.dims(), 3);
            let grads = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();

            let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let wv = wt.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let pv = probe.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (mut y, mut gx, mut gw) = (vec![0f64; n * c * oh * ow], vec![0f64; xv.len()], vec![0f64; wv.len()]);
            for b in 0..n {
                for ch in 0..c {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let o = ((b * c + ch) * oh + oy) * ow + ox;
                            for ky in 0..k {
                                for kx in 0..k {
                                    let (iy, ix) = ((oy * stride + ky) as isize - pad as isize, (ox * stride + kx) as isize - pad as isize);
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let i = ((b * c + ch) * h + iy as usize) * w + ix as usize;
                                    let t = (ch * k + ky) * k + kx;
                                    y[o] += f64::from(xv[i] * wv[t]);
                                    gx[i] += f64::from(pv[o] * wv[t]);
                                    gw[t] += f64::from(pv[o] * xv[i]);
                                }
                            }
                        }
                    }
                }
            }
            let close = |a: Vec<f32>, b: Vec<f64>, tol: f64, what: &str| {
                for (u, v) in a.iter().zip(&b) {
                    assert!((f64::from(*u) - v).abs() < tol, "{what} k={k} s={stride}: {u} vs {v}");
                }
            };
            close(ours.flatten_all().unwrap().to_vec1().unwrap(), y, 1e-5, "forward");
            close(grads.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap(), gx, 1e-5, "grad input");
            close(grads.get(&wt).unwrap().flatten_all().unwrap().to_vec1().unwrap(), gw, 1e-4, "grad weight");
            // And the forward agrees with candle's grouped convolution.
            let theirs = x.conv2d(&wt, pad, stride, 1, c).unwrap();
            assert!(max_diff(&ours, &theirs) < 1e-5);
        }
    }

    /// candle's grouped convolution (what other devices run) gives the same numbers.
    #[test]
    fn the_fallback_gives_the_same_numbers() {
        for (k, stride, h, w) in [(3, 1, 9, 7), (3, 2, 10, 8), (5, 1, 6, 11), (5, 2, 12, 12), (5, 1, 3, 3), (3, 1, 2, 2)] {
            let (n, c, pad) = (2, 4, k / 2);
            let x = Var::from_tensor(&data(&[n, c, h, w], 1)).unwrap();
            let wt = Var::from_tensor(&data(&[c, 1, k, k], 2)).unwrap();
            let run = || {
                let y = conv2d(&x, &wt, stride, pad).unwrap();
                let probe = data(y.dims(), 3);
                let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                (y, g.get(&x).unwrap().clone(), g.get(&wt).unwrap().clone())
            };
            let (a, b) = (run(), crate::nn::with_fallback(&[crate::nn::Kernel::Depthwise], run));
            assert!(crate::nn::test_support::max_diff(&a.0, &b.0) < 1e-4, "forward k={k} s={stride}");
            assert!(crate::nn::test_support::max_diff(&a.1, &b.1) < 1e-4, "grad x k={k} s={stride}");
            assert!(crate::nn::test_support::max_diff(&a.2, &b.2) < 1e-3, "grad w k={k} s={stride}");
        }
    }
}
