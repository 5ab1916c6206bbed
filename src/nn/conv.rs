//! Dense 2-D convolution on the CPU: matrix multiplies, forward and backward.
//!
//! candle's CPU convolution backward computes the input gradient with a direct transposed
//! convolution (a dot product per output element) and the kernel gradient with an im2col
//! as large as the image; profiling the small CNN showed under 2% of training time in
//! matrix multiplies. An earlier version here built one column matrix for the whole batch
//! and multiplied once, which then needed a permute copy of the output (and of its
//! gradient) and kept every image's columns alive for the backward pass.
//!
//! Now each image is `Y_i = W · cols(X_i)`, written straight into its `[Cout, OH, OW]`
//! slot where it is multiplied alone (`gemm` over caller-owned buffers, [`super::gemm`]);
//! a 1×1, stride-1 convolution multiplies the image itself with no column copy. The
//! backward pass is
//! `dX_i = col2im(Wᵀ · dY_i)` and `dW = Σ_i dY_i · cols(X_i)ᵀ`, with the columns made
//! again rather than kept. On small output maps (a 7×7 map is 49 columns) one image per
//! multiply left gemm's kernels mostly idle at the edges and paid its packing per image,
//! so in training there a *stack* of images is multiplied at once, their columns side by
//! side ([`Shapes::stack`]), and the output is copied into each image's slot. Inference
//! does not stack, so that an image's outputs do not depend on its batch. Stacks run in
//! parallel where the batch allows, otherwise each multiply is split over the threads.
//! The weight gradient sums its images in fixed groups of [`GROUP`] and then the groups
//! in order; stacks and groups depend only on the shapes, so the bits do not depend on
//! the thread count. Other devices and dtypes keep candle's convolution.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::Result;
use super::depthwise::{Geometry, slice};
use super::gemm::{Mat, matmul};

/// Images whose weight gradients are summed together before the groups are added.
const GROUP: usize = 8;

/// Columns per multiply that small output maps are stacked up to (see [`Shapes::stack`]).
const NARROW: usize = 256;

/// `x`: `[N, C, H, W]`, `w`: `[Cout, C, K, K]`, symmetric zero padding.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    let (_, c_in, k, k2) = w.dims4()?;
    if !super::kernels_apply(super::Kernel::Conv, &[x, w]) || c_in != c || k != k2 {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    // Inference (nothing to differentiate) keeps one image per multiply: stacked, an image's
    // rounding would depend on the batch it came in (gemm blocks its sums by the multiply's
    // shape), and `serve` batches requests as they arrive.
    let stack = x.track_op() || w.track_op();
    x.contiguous()?.apply_op2(&w.contiguous()?, Conv { stride, padding, stack })
}

/// Shapes of one convolution, checked once.
#[derive(Debug, Clone, Copy)]
struct Shapes {
    g: Geometry,
    c_out: usize,
}

/// A task's reusable buffers: stacked columns, and a stacked output or gradient.
#[derive(Default)]
struct Scratch {
    cols: Vec<f32>,
    wide: Vec<f32>,
}

impl Shapes {
    fn new(x: &[usize], w: &[usize], stride: usize, padding: usize) -> Result<Self> {
        let &[c_out, c_in, k, k2] = w else { candle_core::bail!("conv2d: kernel must be [Cout, C, K, K], got {w:?}") };
        if x.len() != 4 || x[1] != c_in || k != k2 {
            candle_core::bail!("conv2d: kernel {w:?} does not fit input {x:?}");
        }
        Ok(Shapes { g: Geometry::new(x, &[c_in, 1, k, k], stride, padding)?, c_out })
    }

    fn plane_in(&self) -> usize {
        self.g.c * self.g.h * self.g.w
    }

    fn plane_out(&self) -> usize {
        self.c_out * self.cols()
    }

    fn cols(&self) -> usize {
        self.g.oh * self.g.ow
    }

    fn rows(&self) -> usize {
        self.g.c * self.g.k * self.g.k
    }

    /// A 1×1 stride-1 unpadded convolution: the image is its own column matrix.
    fn direct(&self) -> bool {
        self.g.k == 1 && self.g.stride == 1 && self.g.padding == 0
    }

    /// Images per multiply: 1 for a direct convolution (its image is its column matrix) or a
    /// map of [`NARROW`] columns or more, else the fewest, a power of two up to [`GROUP`] (so
    /// stacks tile the gradient groups), whose columns together reach [`NARROW`].
    fn stack(&self) -> usize {
        let mut s = 1;
        while !self.direct() && s < GROUP && s * self.cols() < NARROW {
            s *= 2;
        }
        s
    }

    fn kernel<'a>(&self, w: &'a [f32]) -> Mat<'a> {
        Mat::rows(w, self.c_out, self.rows())
    }

    /// The column matrix of the `n` images in `x` (`[n, C, H, W]`), side by side:
    /// `[C·K·K, n·L]`. `buf` is filled unless the image already is one (a direct
    /// convolution, whose stacks are single images).
    fn columns<'a>(&self, x: &'a [f32], n: usize, buf: &'a mut Vec<f32>) -> Mat<'a> {
        if self.direct() {
            debug_assert_eq!(n, 1, "direct convolutions are not stacked");
            return Mat::rows(x, self.rows(), self.cols());
        }
        let l = self.cols();
        buf.resize(self.rows() * n * l, 0.0);
        if self.g.padding > 0 {
            buf.fill(0.0);
        }
        for (i, xi) in x.chunks_exact(self.plane_in().max(1)).enumerate() {
            im2col(xi, &self.g, &mut buf[i * l..], n * l);
        }
        Mat::rows(buf, self.rows(), n * l)
    }

    /// `[s, Cout, L]` (the images' own layout) into `[Cout, s·L]` (stacked columns).
    fn stack_rows(&self, from: &[f32], to: &mut Vec<f32>) {
        let (l, n) = (self.cols(), from.len() / self.plane_out().max(1));
        to.resize(from.len(), 0.0);
        for (i, img) in from.chunks_exact(self.plane_out().max(1)).enumerate() {
            for (co, row) in img.chunks_exact(l.max(1)).enumerate() {
                to[co * n * l + i * l..][..l].copy_from_slice(row);
            }
        }
    }

    /// The inverse of [`Shapes::stack_rows`].
    fn unstack_rows(&self, from: &[f32], to: &mut [f32]) {
        let (l, n) = (self.cols(), to.len() / self.plane_out().max(1));
        for (i, img) in to.chunks_exact_mut(self.plane_out().max(1)).enumerate() {
            for (co, row) in img.chunks_exact_mut(l.max(1)).enumerate() {
                row.copy_from_slice(&from[co * n * l + i * l..][..l]);
            }
        }
    }
}

/// Whether to give each thread whole stacks (true) or split each multiply (false): whole
/// stacks when they share out evenly or are many.
fn by_stack(n: usize) -> bool {
    let t = rayon::current_num_threads();
    t > 1 && (n >= 4 * t || (n >= t && n.is_multiple_of(t)))
}

/// Runs `f(stack, out_chunk, scratch, split_multiply)` for every stack's output chunk
/// (`chunk` values; the last may be shorter).
fn per_stack(out: &mut [f32], chunk: usize, f: impl Fn(usize, &mut [f32], &mut Scratch, bool) + Sync) {
    if chunk == 0 {
        return;
    }
    if by_stack(out.len().div_ceil(chunk)) {
        out.par_chunks_mut(chunk).enumerate().for_each_init(Scratch::default, |buf, (i, o)| f(i, o, buf, false));
    } else {
        let mut buf = Scratch::default();
        for (i, o) in out.chunks_mut(chunk).enumerate() {
            f(i, o, &mut buf, true);
        }
    }
}

/// One image's columns, `[C·K·K, OH·OW]`, into `cols` at row stride `ld`: row `c·K·K + tap`
/// holds the input pixels that tap of channel `c` sees at each output position. Positions
/// in the padding are not written: the caller zeroes the buffer first.
fn im2col(x: &[f32], g: &Geometry, cols: &mut [f32], ld: usize) {
    let (plane, taps) = (g.h * g.w, g.k * g.k);
    for ch in 0..g.c {
        let x = &x[ch * plane..(ch + 1) * plane];
        for oy in 0..g.oh {
            g.for_taps(oy, |iy, ix0, lo, hi, t| {
                let start = (ch * taps + t) * ld + oy * g.ow;
                let dst = &mut cols[start..start + g.ow];
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
}

/// The adjoint of [`im2col`]: every column entry (row stride `ld`) is added back to the
/// pixel it copied.
fn col2im(cols: &[f32], ld: usize, g: &Geometry, x: &mut [f32]) {
    let (plane, taps) = (g.h * g.w, g.k * g.k);
    x.fill(0.0);
    for ch in 0..g.c {
        let x = &mut x[ch * plane..(ch + 1) * plane];
        for oy in 0..g.oh {
            g.for_taps(oy, |iy, ix0, lo, hi, t| {
                let start = (ch * taps + t) * ld + oy * g.ow;
                let src = &cols[start..start + g.ow];
                let dst = &mut x[iy * g.w..(iy + 1) * g.w];
                if g.stride == 1 {
                    for (d, v) in dst[ix0..ix0 + hi - lo].iter_mut().zip(&src[lo..hi]) {
                        *d += v;
                    }
                } else {
                    for (j, v) in src[lo..hi].iter().enumerate() {
                        dst[ix0 + j * g.stride] += v;
                    }
                }
            });
        }
    }
}

struct Conv {
    stride: usize,
    padding: usize,
    /// Whether small maps multiply stacks of images (training) or one image at a time.
    stack: bool,
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "kiln-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = Shapes::new(l1.dims(), l2.dims(), self.stride, self.padding)?;
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let (g, st) = (s.g, if self.stack { s.stack() } else { 1 });
        let mut out = vec![0f32; g.n * s.plane_out()];
        per_stack(&mut out, st * s.plane_out(), |j, y, buf, split| {
            let imgs = y.len() / s.plane_out().max(1);
            let cols = s.columns(&x[j * st * s.plane_in()..(j * st + imgs) * s.plane_in()], imgs, &mut buf.cols);
            if imgs == 1 {
                matmul(y, s.kernel(w), cols, false, split);
            } else {
                buf.wide.resize(y.len(), 0.0);
                matmul(&mut buf.wide, s.kernel(w), cols, false, split);
                s.unstack_rows(&buf.wide, y);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.n, s.c_out, g.oh, g.ow))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (n, c, h, wd) = x.dims4()?;
        // The network's input needs no gradient: skip the larger half of the work there.
        let dx = if x.track_op() {
            Some(w.apply_op2_no_bwd(&grad, &InputGrad { stride: self.stride, padding: self.padding, x: [n, c, h, wd] })?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let k = w.dim(2)?;
            Some(x.apply_op2_no_bwd(&grad, &KernelGrad { stride: self.stride, padding: self.padding, k, c_out: w.dim(0)? })?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// `dX_i = col2im(Wᵀ · dY_i)`, from the kernel and the output gradient.
struct InputGrad {
    stride: usize,
    padding: usize,
    x: [usize; 4],
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "kiln-conv2d-input-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let s = Shapes::new(&self.x, l1.dims(), self.stride, self.padding)?;
        let (w, dy) = (slice(s1, l1)?, slice(s2, l2)?);
        let (g, st) = (s.g, s.stack());
        if l2.dims() != [g.n, s.c_out, g.oh, g.ow] {
            candle_core::bail!("conv2d backward: gradient shape {:?} does not fit", l2.dims());
        }
        let mut dx = vec![0f32; g.n * s.plane_in()];
        per_stack(&mut dx, st * s.plane_in(), |j, dxs, buf, split| {
            let imgs = dxs.len() / s.plane_in().max(1);
            let dys = &dy[j * st * s.plane_out()..(j * st + imgs) * s.plane_out()];
            if s.direct() {
                // One image per stack: its gradient is already the column matrix.
                matmul(dxs, s.kernel(w).t(), Mat::rows(dys, s.c_out, s.cols()), false, split);
                return;
            }
            let ld = imgs * s.cols();
            let dys = if imgs == 1 {
                dys
            } else {
                s.stack_rows(dys, &mut buf.wide);
                &buf.wide
            };
            buf.cols.resize(s.rows() * ld, 0.0);
            matmul(&mut buf.cols, s.kernel(w).t(), Mat::rows(dys, s.c_out, ld), false, split);
            for (i, dxi) in dxs.chunks_exact_mut(s.plane_in().max(1)).enumerate() {
                col2im(&buf.cols[i * s.cols()..], ld, &g, dxi);
            }
        });
        Ok((CpuStorage::F32(dx), Shape::from(self.x.to_vec())))
    }
}

/// `dW = Σ_i dY_i · cols(X_i)ᵀ`, from the input and the output gradient.
struct KernelGrad {
    stride: usize,
    padding: usize,
    k: usize,
    c_out: usize,
}

impl CustomOp2 for KernelGrad {
    fn name(&self) -> &'static str {
        "kiln-conv2d-kernel-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let c = l1.dims().get(1).copied().unwrap_or(0);
        let s = Shapes::new(l1.dims(), &[self.c_out, c, self.k, self.k], self.stride, self.padding)?;
        let (x, dy) = (slice(s1, l1)?, slice(s2, l2)?);
        let (g, st) = (s.g, s.stack());
        if l2.dims() != [g.n, s.c_out, g.oh, g.ow] {
            candle_core::bail!("conv2d backward: gradient shape {:?} does not fit", l2.dims());
        }
        let size = s.c_out * s.rows();
        if size == 0 {
            return Ok((CpuStorage::F32(Vec::new()), Shape::from((s.c_out, g.c, g.k, g.k))));
        }
        let groups = g.n.div_ceil(GROUP);
        // Each group's stacks accumulate in order into the group's own sum.
        let group_sum = |j: usize, sum: &mut [f32], buf: &mut Scratch, split: bool| {
            let end = ((j + 1) * GROUP).min(g.n);
            for (k, first) in (j * GROUP..end).step_by(st).enumerate() {
                let imgs = st.min(end - first);
                let dys = &dy[first * s.plane_out()..(first + imgs) * s.plane_out()];
                let dys = if imgs == 1 {
                    dys
                } else {
                    s.stack_rows(dys, &mut buf.wide);
                    &buf.wide
                };
                let cols = s.columns(&x[first * s.plane_in()..(first + imgs) * s.plane_in()], imgs, &mut buf.cols);
                matmul(sum, Mat::rows(dys, s.c_out, imgs * s.cols()), cols.t(), k > 0, split);
            }
        };
        let mut sums = vec![0f32; groups * size];
        let t = rayon::current_num_threads();
        if t > 1 && groups >= t {
            sums.par_chunks_mut(size).enumerate().for_each_init(Scratch::default, |buf, (j, sum)| group_sum(j, sum, buf, false));
        } else {
            let mut buf = Scratch::default();
            for (j, sum) in sums.chunks_mut(size).enumerate() {
                group_sum(j, sum, &mut buf, true);
            }
        }
        // The groups in order: the sum's bits do not depend on which thread made which.
        if groups > 1 {
            let (dw, rest) = sums.split_at_mut(size);
            for part in rest.chunks(size) {
                for (d, p) in dw.iter_mut().zip(part) {
                    *d += p;
                }
            }
        }
        let mut dw = sums;
        dw.resize(size, 0.0);
        Ok((CpuStorage::F32(dw), Shape::from((s.c_out, g.c, g.k, g.k))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_support::{data, max_diff};
    use candle_core::Var;

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(f32::to_bits).collect()
    }

    /// Output, input gradient and kernel gradient of `sum(conv(x, w) · probe)`.
    fn run(x: &Tensor, w: &Tensor, stride: usize, pad: usize, ours: bool) -> (Tensor, Tensor, Tensor) {
        let (x, w) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
        let y = if ours { conv2d(&x, &w, stride, pad).unwrap() } else { x.conv2d(&w, pad, stride, 1, 1).unwrap() };
        let probe = data(y.dims(), 3);
        let g = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        (y.clone(), g.get(&x).unwrap().clone(), g.get(&w).unwrap().clone())
    }

    /// Forward and both gradients against candle's own convolution (the path other devices
    /// take), on the shapes where candle's backward is right (even sizes for stride 2):
    /// batches that run stack by stack (a partial last stack too), split multiplies, and
    /// more than one gradient group.
    #[test]
    fn matches_candle_convolution_forward_and_backward() {
        for (n, c, c_out, k, stride, pad, h, w) in [
            (2, 3, 4, 3, 1, 1, 9, 7),
            (3, 3, 4, 3, 2, 1, 8, 10),
            (1, 3, 4, 1, 1, 0, 5, 6),
            (2, 3, 4, 7, 2, 3, 12, 12),
            (4, 3, 4, 1, 2, 0, 8, 8),
            (17, 3, 4, 3, 1, 1, 6, 6),
            (9, 3, 4, 1, 1, 0, 4, 4),
            // EfficientNet's late 1×1 convolutions: wide, on a 3×3 map, a batch of 3.
            (3, 192, 1152, 1, 1, 0, 3, 3),
            (3, 1152, 192, 1, 1, 0, 3, 3),
        ] {
            let (x, wt) = (data(&[n, c, h, w], 1), (data(&[c_out, c, k, k], 2) * 0.05).unwrap());
            let (y1, gx1, gw1) = run(&x, &wt, stride, pad, true);
            let (y2, gx2, gw2) = run(&x, &wt, stride, pad, false);
            assert_eq!(y1.dims(), y2.dims());
            assert!(max_diff(&y1, &y2) < 1e-4, "forward n={n} k={k} s={stride}");
            assert!(max_diff(&gx1, &gx2) < 1e-4, "grad input n={n} k={k} s={stride}");
            assert!(max_diff(&gw1, &gw2) < 1e-3, "grad weight n={n} k={k} s={stride}");
        }
    }

    /// Training is reproducible across thread counts: the same bits on 1, 2 and 3 threads,
    /// whichever way each batch is shared out.
    #[test]
    fn gives_the_same_bits_on_any_thread_count() {
        for (n, k, stride, pad) in [(17, 3, 1, 1), (3, 3, 2, 1), (8, 1, 1, 0)] {
            let (x, wt) = (data(&[n, 5, 10, 10], 4), data(&[6, 5, k, k], 5));
            let on = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let (y, gx, gw) = pool.install(|| run(&x, &wt, stride, pad, true));
                (bits(&y), bits(&gx), bits(&gw))
            };
            let one = on(1);
            assert_eq!(one, on(2), "n={n} k={k}: 1 vs 2 threads");
            assert_eq!(one, on(3), "n={n} k={k}: 1 vs 3 threads");
        }
    }

    /// The network's input is not a variable: no gradient is made for it.
    #[test]
    fn a_constant_input_gets_no_gradient() {
        let x = data(&[2, 3, 6, 6], 1);
        let w = Var::from_tensor(&data(&[4, 3, 3, 3], 2)).unwrap();
        let g = conv2d(&x, &w, 1, 1).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&x).is_none());
        assert!(g.get(&w).is_some());
    }

    /// An image's outputs at inference do not depend on the batch it came in (`serve`
    /// batches requests as they arrive): alone or ninth in a batch, the same bits, on a 7×7
    /// map with more than 512 terms per sum, where a stacked multiply would block the sums
    /// by the stack's width.
    #[test]
    fn inference_gives_an_image_the_same_bits_in_any_batch() {
        let x = data(&[9, 64, 7, 7], 6);
        let w = (data(&[16, 64, 3, 3], 7) * 0.05).unwrap();
        let batch = conv2d(&x, &w, 1, 1).unwrap();
        for i in [0, 4, 8] {
            let alone = conv2d(&x.narrow(0, i, 1).unwrap(), &w, 1, 1).unwrap();
            assert_eq!(bits(&alone), bits(&batch.narrow(0, i, 1).unwrap()), "image {i}");
        }
    }

    /// No input channels: every output is zero, stacked or not, and nothing panics.
    #[test]
    fn zero_input_channels_give_zeros() {
        let x = Tensor::zeros((2, 0, 5, 5), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let w = Var::zeros((4, 0, 3, 3), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        for y in [conv2d(&x, &w, 1, 1).unwrap(), conv2d(&x, &w.as_detached_tensor(), 1, 1).unwrap()] {
            assert_eq!(y.dims(), [2, 4, 5, 5]);
            assert!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| *v == 0.0));
        }
    }
}
