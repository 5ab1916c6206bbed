//! Activations as kiln applies them: fused into the pass that produces their input.
//!
//! candle's ReLU backward is five passes over the activation (a comparison, a cast, a
//! multiply, then a zero-fill and an add to accumulate). Here the gradient gate is judged
//! from the output, inside the backward pass of whatever produced it (batch norm, a
//! residual add).

use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::Result;
use super::depthwise::slice;

/// The activation fused after a normalisation or a residual add.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    Identity,
    Relu,
    Relu6,
}

impl Act {
    /// The same activation with candle's ops: the path other devices take. Written as
    /// `x · [0 < x < 6] + 6 · [x ≥ 6]` with the masks detached, so that at exactly 0 or 6
    /// no gradient passes, as in PyTorch and kiln's kernels (candle's `relu` passes it at 0
    /// and its `clamp` passes half).
    pub fn tensor(self, x: &Tensor) -> Result<Tensor> {
        let positive = || x.gt(0f64)?.to_dtype(x.dtype());
        match self {
            Act::Identity => Ok(x.clone()),
            Act::Relu => x.mul(&positive()?),
            Act::Relu6 => {
                let below = x.lt(6f64)?.to_dtype(x.dtype())?;
                let above = x.ge(6f64)?.to_dtype(x.dtype())?;
                x.mul(&positive()?.mul(&below)?)? + (above * 6.0)?
            }
        }
    }
}

/// An activation as a type, so that a kernel is compiled once per activation with the test
/// inside its vectorised loop, instead of a `match` per element.
pub(crate) trait Gate: Copy + Send + Sync {
    fn pass(self, y: f32) -> bool;
    fn apply(self, v: f32) -> f32;

    /// `dy` where the gate passes `y`, else 0 (also for a NaN `dy`, as PyTorch's threshold
    /// backward). A bit mask rather than a branch: a ReLU's signs are close to random, and
    /// as a branch this mispredicted on every other element (a quarter of the small CNN's
    /// training time in batch norm's backward pass); as a mask the loop vectorises.
    #[inline(always)]
    fn grad(self, y: f32, dy: f32) -> f32 {
        f32::from_bits(dy.to_bits() & 0u32.wrapping_sub(u32::from(self.pass(y))))
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Always;
#[derive(Clone, Copy)]
pub(crate) struct Positive;
#[derive(Clone, Copy)]
pub(crate) struct BelowSix;

impl Gate for Always {
    #[inline(always)]
    fn pass(self, _: f32) -> bool {
        true
    }
    #[inline(always)]
    fn apply(self, v: f32) -> f32 {
        v
    }
}

impl Gate for Positive {
    #[inline(always)]
    fn pass(self, y: f32) -> bool {
        y > 0.0
    }
    #[inline(always)]
    fn apply(self, v: f32) -> f32 {
        v.max(0.0)
    }
}

impl Gate for BelowSix {
    #[inline(always)]
    fn pass(self, y: f32) -> bool {
        (y > 0.0) & (y < 6.0)
    }
    #[inline(always)]
    fn apply(self, v: f32) -> f32 {
        v.clamp(0.0, 6.0)
    }
}

/// Calls the kernel `$f` monomorphised for `$act`'s gate (its first argument).
macro_rules! gated {
    ($act:expr, $f:ident($($arg:expr),* $(,)?)) => {
        match $act {
            $crate::nn::activation::Act::Identity => $f($crate::nn::activation::Always, $($arg),*),
            $crate::nn::activation::Act::Relu => $f($crate::nn::activation::Positive, $($arg),*),
            $crate::nn::activation::Act::Relu6 => $f($crate::nn::activation::BelowSix, $($arg),*),
        }
    };
}
pub(crate) use gated;

/// Elements per parallel task in element-wise ops.
const CHUNK: usize = 1 << 16;

/// `f(out, a, b)` over matching chunks of two same-sized operands, in parallel: the
/// element-wise ops' one loop.
fn zip_chunks(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync,
) -> Result<Vec<f32>> {
    let (a, b) = (slice(s1, l1)?, slice(s2, l2)?);
    if a.len() != b.len() {
        candle_core::bail!("element-wise op: {:?} and {:?} differ", l1.dims(), l2.dims());
    }
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(CHUNK).zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK))).for_each(|(o, (a, b))| f(o, a, b));
    Ok(out)
}

/// `act(a + b)` for two tensors of one shape, with the gradient passing to both: a residual
/// connection and the activation after it, in one pass each way.
pub fn add_act(a: &Tensor, b: &Tensor, act: Act) -> Result<Tensor> {
    if !super::kernels_apply(super::Kernel::Activation, &[a, b]) || a.dims() != b.dims() {
        return act.tensor(&(a + b)?);
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, AddAct { act })
}

struct AddAct {
    act: Act,
}

impl candle_core::CustomOp2 for AddAct {
    fn name(&self) -> &'static str {
        "kiln-add-act"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        fn kernel<G: Gate>(gate: G, o: &mut [f32], a: &[f32], b: &[f32]) {
            for ((o, a), b) in o.iter_mut().zip(a).zip(b) {
                *o = gate.apply(a + b);
            }
        }
        let out = zip_chunks(s1, l1, s2, l2, |o, a, b| gated!(self.act, kernel(o, a, b)))?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, y: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = if self.act == Act::Identity { grad.clone() } else { y.apply_op2_no_bwd(&grad.contiguous()?, &Mask { act: self.act })? };
        let keep = |t: &Tensor| if t.track_op() { Some(g.clone()) } else { None };
        Ok((keep(a), keep(b)))
    }
}

/// The gradient that passes an activation, judged from its output.
struct Mask {
    act: Act,
}

impl candle_core::CustomOp2 for Mask {
    fn name(&self) -> &'static str {
        "kiln-activation-mask"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        fn kernel<G: Gate>(gate: G, o: &mut [f32], y: &[f32], dy: &[f32]) {
            for ((o, y), g) in o.iter_mut().zip(y).zip(dy) {
                *o = gate.grad(*y, *g);
            }
        }
        let out = zip_chunks(s1, l1, s2, l2, |o, y, dy| gated!(self.act, kernel(o, y, dy)))?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::test_support::{data, max_diff};
    use candle_core::Var;

    #[test]
    fn add_activation_matches_the_composite_forward_and_backward() {
        for act in [Act::Identity, Act::Relu, Act::Relu6] {
            let a = Var::from_tensor(&(data(&[2, 3, 4, 5], 9) * 8.0).unwrap()).unwrap();
            let b = Var::from_tensor(&(data(&[2, 3, 4, 5], 10) * 6.0).unwrap()).unwrap();
            let ours = add_act(&a, &b, act).unwrap();
            let theirs = act.tensor(&(a.as_tensor() + b.as_tensor()).unwrap()).unwrap();
            assert!(max_diff(&ours, &theirs) < 1e-6, "{act:?}");
            let probe = data(&[2, 3, 4, 5], 11);
            let g1 = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [a.as_tensor(), b.as_tensor()] {
                assert!(max_diff(g1.get(v).unwrap(), g2.get(v).unwrap()) < 1e-6, "{act:?}");
            }
        }
    }
}
