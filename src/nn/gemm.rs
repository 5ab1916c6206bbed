//! Matrix multiply into a caller's buffer over strided views: the one unsafe seam of `nn`.
//!
//! candle's `matmul` allocates its result and wants contiguous operands, so a convolution
//! written with it pays a column copy for every image and a permute copy of its output.
//! The `gemm` crate (what candle itself calls) takes strides for all three matrices and
//! can accumulate into its destination; this wrapper checks every view against its slice
//! before the call, so the unsafe block's promise is in one place.
#![allow(unsafe_code)]

use gemm::Parallelism;

/// A read-only `rows × cols` view: element `(r, c)` is `data[r * row_stride + c * col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// A row-major view of the first `rows * cols` values of `data`.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat::strided(data, rows, cols, cols, 1)
    }

    /// # Panics
    /// When an element of the view would fall outside `data`.
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Self {
        // A stride of a dimension of one is never used: zero keeps it in range for gemm.
        let row_stride = if rows <= 1 { 0 } else { row_stride };
        let col_stride = if cols <= 1 { 0 } else { col_stride };
        let last = if rows == 0 || cols == 0 {
            Some(0)
        } else {
            (rows - 1)
                .checked_mul(row_stride)
                .and_then(|r| (cols - 1).checked_mul(col_stride).and_then(|c| r.checked_add(c)))
                .map(|v| v + 1)
        };
        assert!(
            last.is_some_and(|last| last <= data.len()),
            "gemm view {rows}x{cols} (strides {row_stride}, {col_stride}) exceeds {} values",
            data.len()
        );
        Mat { data, rows, cols, row_stride, col_stride }
    }

    /// The same values seen as the transpose (no copy).
    pub fn t(self) -> Self {
        Mat { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }
}

/// `dst = a · b` (or `dst += a · b` when `accumulate`), `dst` row-major `a.rows × b.cols`.
///
/// `parallel` lets gemm split the output over rayon's threads; callers that already run one
/// multiply per thread pass `false`. The sums are the same either way: gemm splits the
/// output, never the inner dimension, so results do not depend on the thread count.
///
/// # Panics
/// When the shapes disagree or `dst` is not exactly `a.rows × b.cols`.
pub fn matmul(dst: &mut [f32], a: Mat<'_>, b: Mat<'_>, accumulate: bool, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "gemm: inner dimensions {k} and {} differ", b.rows);
    assert_eq!(Some(dst.len()), m.checked_mul(n), "gemm: destination holds {} values, not {m}x{n}", dst.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    let parallelism = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
    // SAFETY: `Mat::strided` checked, without overflow, that every element of `a` and `b`
    // lies inside its slice, and `dst` holds exactly `m × n` values at row stride `n`,
    // column stride 1. `dst` is a unique borrow, so it cannot overlap `a` or `b`. Every
    // stride that is used (its dimension above one) is below the slice's length, so it
    // fits in isize; unused strides are zero.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: Mat, b: Mat) -> Vec<f32> {
        let mut out = vec![0f32; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                out[i * b.cols + j] =
                    (0..a.cols).map(|p| a.data[i * a.row_stride + p * a.col_stride] * b.data[p * b.row_stride + j * b.col_stride]).sum();
            }
        }
        out
    }

    #[test]
    fn strided_and_transposed_views_multiply_and_accumulate() {
        let a: Vec<f32> = (0..35).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..42).map(|i| (i as f32 * 0.11).cos()).collect();
        let (a, b) = (Mat::rows(&a, 5, 7), Mat::strided(&b, 7, 3, 1, 14));
        let expect = naive(a, b);
        let mut dst = vec![f32::NAN; 15];
        matmul(&mut dst, a, b, false, true);
        for (x, y) in dst.iter().zip(&expect) {
            assert!((x - y).abs() < 1e-5);
        }
        matmul(&mut dst, a, b, true, false);
        for (x, y) in dst.iter().zip(&expect) {
            assert!((x - 2.0 * y).abs() < 1e-5);
        }
        // (a·b)ᵀ = bᵀ·aᵀ through transposed views.
        let mut t = vec![0f32; 15];
        matmul(&mut t, b.t(), a.t(), false, false);
        for i in 0..5 {
            for j in 0..3 {
                assert!((t[j * 5 + i] - expect[i * 3 + j]).abs() < 1e-5);
            }
        }
    }

    #[test]
    #[should_panic(expected = "exceeds")]
    fn a_view_past_its_slice_is_refused() {
        let v = vec![0f32; 10];
        let _ = Mat::strided(&v, 3, 4, 4, 1);
    }

    #[test]
    #[should_panic(expected = "exceeds")]
    fn a_view_whose_extent_overflows_is_refused() {
        let v = vec![0f32; 10];
        let _ = Mat::strided(&v, usize::MAX / 2, 3, 4, 1);
    }
}
