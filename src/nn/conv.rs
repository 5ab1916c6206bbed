//! Dense 2-D convolution as im2col + matrix multiply, forward and backward.
//!
//! candle's CPU convolution backward computes the input gradient with a direct transposed
//! convolution (a dot product per output element) and the kernel gradient with an im2col
//! as large as the image; profiling the small CNN showed under 2% of training time in
//! matrix multiplies. Here the convolution is `W · im2col(x)`: the gradients of the matrix
//! multiply are matrix multiplies again (candle differentiates them), and the gradient of
//! im2col is col2im, a custom op. Other devices keep candle's convolution.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::Result;
use super::depthwise::{Geometry, slice};

/// `x`: `[N, C, H, W]`, `w`: `[Cout, C, K, K]`, symmetric zero padding.
///
/// The columns are laid out `[C·K·K, N·OH·OW]`, so the whole batch is one matrix multiply
/// `W[Cout, C·K·K] · cols` (a batched multiply would copy `W` once per image).
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (c_out, c_in, k, _) = w.dims4()?;
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 || c_in != c {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    let (oh, ow) = ((h + 2 * padding - k) / stride + 1, (wd + 2 * padding - k) / stride + 1);
    let cols = x.contiguous()?.apply_op1(Im2Col { k, stride, padding })?;
    let y = w.reshape((c_out, c * k * k))?.matmul(&cols)?;
    y.reshape((c_out, n, oh, ow))?.permute((1, 0, 2, 3))?.contiguous()
}

struct Im2Col {
    k: usize,
    stride: usize,
    padding: usize,
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "kiln-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let c = l.dims()[1];
        let g = Geometry::new(l.dims(), &[c, 1, self.k, self.k], self.stride, self.padding)?;
        let x = slice(s, l)?;
        let (plane_in, cols, taps) = (g.h * g.w, g.oh * g.ow, g.k * g.k);
        let width = g.n * cols;
        let mut out = vec![0f32; g.c * taps * width];
        // One channel fills `taps` consecutive rows; image `n` fills columns [n·L, (n+1)·L).
        out.par_chunks_mut(taps * width).enumerate().for_each(|(ch, rows)| {
            for img in 0..g.n {
                let x = &x[(img * g.c + ch) * plane_in..(img * g.c + ch + 1) * plane_in];
                for oy in 0..g.oh {
                    g.for_taps(oy, |iy, ix0, lo, hi, t| {
                        let at = t * width + img * cols + oy * g.ow;
                        let dst = &mut rows[at..at + g.ow];
                        let src = &x[iy * g.w..(iy + 1) * g.w];
                        if g.stride == 1 {
                            dst[lo..hi].copy_from_slice(&src[ix0..ix0 + hi - lo]);
                        } else {
                            for (j, d) in dst[lo..hi].iter_mut().enumerate() {
                                *d = src[ix0 + j * g.stride];
                            }
                        }
                    });
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.c * taps, width))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, c, h, w) = x.dims4()?;
        let gx = grad.contiguous()?.apply_op1_no_bwd(&Col2Im { k: self.k, stride: self.stride, padding: self.padding, n, c, h, w })?;
        // Col2Im writes channel-major planes, [C, N, H, W].
        Ok(Some(gx.permute((1, 0, 2, 3))?.contiguous()?))
    }
}

/// The adjoint of [`Im2Col`]: every column entry flows back to the pixel it copied.
struct Col2Im {
    k: usize,
    stride: usize,
    padding: usize,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "kiln-col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = self.n;
        let g = Geometry::new(&[n, self.c, self.h, self.w], &[self.c, 1, self.k, self.k], self.stride, self.padding)?;
        let (plane_in, cols, taps) = (g.h * g.w, g.oh * g.ow, g.k * g.k);
        let width = n * cols;
        if l.dims() != [g.c * taps, width] {
            candle_core::bail!("col2im: gradient shape {:?} does not fit", l.dims());
        }
        let gc = slice(s, l)?;
        let mut out = vec![0f32; g.c * n * plane_in];
        out.par_chunks_mut(n * plane_in).enumerate().for_each(|(ch, planes)| {
            let rows = &gc[ch * taps * width..(ch + 1) * taps * width];
            for img in 0..n {
                let gx = &mut planes[img * plane_in..(img + 1) * plane_in];
                for oy in 0..g.oh {
                    g.for_taps(oy, |iy, ix0, lo, hi, t| {
                        let at = t * width + img * cols + oy * g.ow;
                        let src = &rows[at..at + g.ow];
                        let dst = &mut gx[iy * g.w..(iy + 1) * g.w];
                        for (j, v) in src[lo..hi].iter().enumerate() {
                            dst[ix0 + j * g.stride] += v;
                        }
                    });
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.c, n, g.h, g.w))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_support::{data, max_diff};
    use candle_core::Var;

    /// Forward and both gradients against candle's own convolution, on the shapes where
    /// candle's backward is right (even sizes for stride 2).
    #[test]
    fn matches_candle_convolution_forward_and_backward() {
        for (k, stride, pad, h, w) in [(3, 1, 1, 9, 7), (3, 2, 1, 8, 10), (1, 1, 0, 5, 6), (7, 2, 3, 12, 12), (1, 2, 0, 8, 8)] {
            let x = Var::from_tensor(&data(&[2, 3, h, w], 1)).unwrap();
            let wt = Var::from_tensor(&data(&[4, 3, k, k], 2)).unwrap();
            let ours = conv2d(&x, &wt, stride, pad).unwrap();
            let theirs = x.conv2d(&wt, pad, stride, 1, 1).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            assert!(max_diff(&ours, &theirs) < 1e-4, "forward k={k} s={stride}");
            let probe = data(ours.dims(), 3);
            let g1 = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(max_diff(g1.get(&x).unwrap(), g2.get(&x).unwrap()) < 1e-4, "grad input k={k} s={stride}");
            assert!(max_diff(g1.get(&wt).unwrap(), g2.get(&wt).unwrap()) < 1e-3, "grad weight k={k} s={stride}");
        }
    }
}
