//! Optimizers with state that checkpoints can save and restore (candle's own keep theirs
//! private, and its SGD has no momentum).

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// SGD with (optionally Nesterov) momentum; weight decay added to the gradient.
    Sgd,
    /// Adam; weight decay added to the gradient (L2), as in PyTorch's `Adam`.
    Adam,
    /// Adam with decoupled weight decay (Loshchilov & Hutter), as in PyTorch's `AdamW`.
    #[default]
    Adamw,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    pub kind: OptimizerKind,
    pub momentum: f64,
    pub nesterov: bool,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Applied to weights with two or more dimensions (convolution and linear kernels);
    /// biases and batch-norm scales are not decayed.
    pub weight_decay: f64,
}

struct Slot {
    name: String,
    var: Var,
    lr_scale: f64,
    decay: bool,
    m: Option<Tensor>,
    v: Option<Tensor>,
}

pub struct Optimizer {
    cfg: OptimConfig,
    slots: Vec<Slot>,
    step: u64,
}

impl Optimizer {
    /// `lr_scale(name)` multiplies the learning rate of one parameter (discriminative rates).
    pub fn new(cfg: OptimConfig, params: Vec<(String, Var)>, lr_scale: impl Fn(&str) -> f64) -> Self {
        let slots = params
            .into_iter()
            .map(|(name, var)| Slot { lr_scale: lr_scale(&name), decay: var.rank() >= 2, name, var, m: None, v: None })
            .collect();
        Optimizer { cfg, slots, step: 0 }
    }

    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Scales all gradients so their global L2 norm is at most `max_norm`; returns the norm
    /// before clipping.
    pub fn clip_grad_norm(&self, grads: &mut GradStore, max_norm: f64) -> Result<f64> {
        let mut total = 0f64;
        for s in &self.slots {
            if let Some(g) = grads.get(s.var.as_tensor()) {
                total += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
            }
        }
        let norm = total.sqrt();
        if norm > max_norm && norm.is_finite() {
            let k = max_norm / (norm + 1e-6);
            for s in &self.slots {
                if let Some(g) = grads.remove(s.var.as_tensor()) {
                    grads.insert(s.var.as_tensor(), (g * k)?);
                }
            }
        }
        Ok(norm)
    }

    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else { continue };
            let lr = lr * s.lr_scale;
            let wd = if s.decay { c.weight_decay } else { 0.0 };
            let w = s.var.as_tensor();
            let new = match c.kind {
                OptimizerKind::Sgd => {
                    let g = if wd > 0.0 { (g + (w * wd)?)? } else { g.clone() };
                    let update = if c.momentum > 0.0 {
                        let buf = match &s.m {
                            Some(b) => ((b * c.momentum)? + &g)?,
                            None => g.clone(),
                        };
                        let u = if c.nesterov { (&g + (&buf * c.momentum)?)? } else { buf.clone() };
                        s.m = Some(buf);
                        u
                    } else {
                        g
                    };
                    (w - (update * lr)?)?
                }
                OptimizerKind::Adam | OptimizerKind::Adamw => {
                    let decoupled = c.kind == OptimizerKind::Adamw;
                    let g = if wd > 0.0 && !decoupled { (g + (w * wd)?)? } else { g.clone() };
                    let m = match &s.m {
                        Some(m) => ((m * c.beta1)? + (&g * (1.0 - c.beta1))?)?,
                        None => (&g * (1.0 - c.beta1))?,
                    };
                    let v = match &s.v {
                        Some(v) => ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?,
                        None => (g.sqr()? * (1.0 - c.beta2))?,
                    };
                    let m_hat = (&m / (1.0 - c.beta1.powi(t)))?;
                    let v_hat = (&v / (1.0 - c.beta2.powi(t)))?;
                    let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
                    s.m = Some(m);
                    s.v = Some(v);
                    let w = if wd > 0.0 && decoupled { (w * (1.0 - lr * wd))? } else { w.clone() };
                    (w - (update * lr)?)?
                }
            };
            s.var.set(&new)?;
        }
        Ok(())
    }

    /// Moment buffers by `optim.m.<param>` / `optim.v.<param>`, for a checkpoint.
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for s in &self.slots {
            if let Some(m) = &s.m {
                out.insert(format!("optim.m.{}", s.name), m.clone());
            }
            if let Some(v) = &s.v {
                out.insert(format!("optim.v.{}", s.name), v.clone());
            }
        }
        out
    }

    pub fn restore(&mut self, state: &BTreeMap<String, Tensor>, steps: u64) -> Result<()> {
        for s in &mut self.slots {
            let dev = s.var.device().clone();
            s.m = state.get(&format!("optim.m.{}", s.name)).map(|t| t.to_device(&dev)).transpose()?;
            s.v = state.get(&format!("optim.v.{}", s.name)).map(|t| t.to_device(&dev)).transpose()?;
        }
        self.step = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn cfg(kind: OptimizerKind) -> OptimConfig {
        OptimConfig { kind, momentum: 0.9, nesterov: false, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }

    fn run(kind: OptimizerKind, steps: usize) -> f32 {
        // Minimise (w - 3)^2 from w = 0.
        let w = Var::from_tensor(&Tensor::zeros((1, 1), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
        let mut opt = Optimizer::new(cfg(kind), vec![("w".into(), w.clone())], |_| 1.0);
        for _ in 0..steps {
            let loss = (w.as_tensor() - 3.0).unwrap().sqr().unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap(), 0.05).unwrap();
        }
        w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]
    }

    #[test]
    fn optimizers_converge() {
        for kind in [OptimizerKind::Sgd, OptimizerKind::Adam, OptimizerKind::Adamw] {
            let w = run(kind, 400);
            assert!((w - 3.0).abs() < 0.05, "{kind:?} ended at {w}");
        }
    }

    #[test]
    fn first_adam_step_is_lr_times_sign() {
        // With bias correction the first Adam update is lr * g / |g|.
        assert!((run(OptimizerKind::Adam, 1) - 0.05).abs() < 1e-6);
        // SGD: w - lr * 2(w - 3) = 0.3.
        assert!((run(OptimizerKind::Sgd, 1) - 0.3).abs() < 1e-6);
    }
}
