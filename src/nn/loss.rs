//! Classification losses: softmax cross-entropy, and binary cross-entropy on one logit.

use candle_core::{D, Tensor};

use super::Result;

/// Cross-entropy over logits `[N, C]` with integer targets, label smoothing `eps` (the
/// target puts `1 - eps` on the true class and spreads `eps` evenly over all classes), and
/// optional per-class weights; weighted examples are averaged by the total weight, as in
/// PyTorch's `CrossEntropyLoss(weight=…)`.
pub fn cross_entropy(logits: &Tensor, targets: &[u32], eps: f64, class_weights: Option<&[f32]>) -> Result<Tensor> {
    let (n, c) = logits.dims2()?;
    if targets.len() != n {
        candle_core::bail!("cross entropy: {} targets for {n} rows", targets.len());
    }
    let mut soft = vec![0f32; n * c];
    let mut total = 0f64;
    for (i, &t) in targets.iter().enumerate() {
        let t = t as usize;
        if t >= c {
            candle_core::bail!("cross entropy: target {t} out of range for {c} classes");
        }
        let w = class_weights.map_or(1.0, |w| w[t]);
        total += f64::from(w);
        let row = &mut soft[i * c..(i + 1) * c];
        for v in row.iter_mut() {
            *v = w * (eps / c as f64) as f32;
        }
        row[t] += w * (1.0 - eps) as f32;
    }
    let soft = Tensor::from_vec(soft, (n, c), logits.device())?;
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    (logp * soft)?.sum_all()?.affine(-1.0 / total.max(f64::MIN_POSITIVE), 0.0)
}

/// Binary cross-entropy on logits `[N, K]` (K independent binary targets per row, 1 for a
/// binary model) with targets in [0, 1] (smoothed targets are fractions), row-major, and a
/// weight on each column's positive term, as PyTorch's `BCEWithLogitsLoss(pos_weight=…)`:
/// `−[w·y·log σ(z) + (1−y)·log(1−σ(z))]`, averaged over every element. Written with
/// `log σ(z) = −softplus(−z)` and `log(1−σ(z)) = −softplus(z)`, each softplus as
/// `max(x, 0) + log(1 + e^−|x|)`, so no logit overflows.
pub fn binary_cross_entropy(logits: &Tensor, targets: &[f32], pos_weight: &[f64]) -> Result<Tensor> {
    let (n, width) = logits.dims2()?;
    if targets.len() != n * width || pos_weight.len() != width {
        candle_core::bail!(
            "binary cross entropy: {} targets and {} positive weights for logits of shape [{n}, {width}]",
            targets.len(),
            pos_weight.len()
        );
    }
    let y = Tensor::from_vec(targets.to_vec(), (n, width), logits.device())?;
    let w = Tensor::from_vec(pos_weight.iter().map(|&v| v as f32).collect::<Vec<_>>(), (1, width), logits.device())?;
    let tail = logits.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    let softplus_pos = (logits.relu()? + &tail)?;
    // softplus(−z) = softplus(z) − z: one kink, at which candle's derivatives of relu and
    // |·| (both 1 at 0) then still add up to σ(0) − 1 = −½.
    let softplus_neg = (&softplus_pos - logits)?;
    let pos = (y.broadcast_mul(&w)? * softplus_neg)?;
    let neg = (y.affine(-1.0, 1.0)? * softplus_pos)?;
    (pos + neg)?.sum_all()?.affine(1.0 / (n * width).max(1) as f64, 0.0)
}

/// Inverse-frequency weights (`n / (classes * count)`, scikit-learn's "balanced").
pub fn balanced_weights(targets: &[u32], classes: usize) -> Vec<f32> {
    let mut counts = vec![0usize; classes];
    for &t in targets {
        counts[t as usize] += 1;
    }
    counts.iter().map(|&k| if k == 0 { 0.0 } else { targets.len() as f32 / (classes * k) as f32 }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cross_entropy_matches_hand_computation() {
        let logits = Tensor::from_vec(vec![2f32, 0.0, 0.0, 0.0, 1.0, 0.0], (2, 3), &Device::Cpu).unwrap();
        let lse0 = (2f64.exp() + 2.0).ln();
        let lse1 = (1f64.exp() + 2.0).ln();
        // Row 0 targets class 0 (log p = 2 - lse0), row 1 targets class 2 (log p = 0 - lse1).
        let plain = cross_entropy(&logits, &[0, 2], 0.0, None).unwrap().to_scalar::<f32>().unwrap();
        let expect = ((lse0 - 2.0) + lse1) / 2.0;
        assert!((f64::from(plain) - expect).abs() < 1e-6);
        // Weight 3 on class 2.
        let w = cross_entropy(&logits, &[0, 2], 0.0, Some(&[1.0, 1.0, 3.0])).unwrap().to_scalar::<f32>().unwrap();
        assert!((f64::from(w) - ((lse0 - 2.0) + 3.0 * lse1) / 4.0).abs() < 1e-6);
        // Smoothing 0.3 over 3 classes: 0.8 on the target, 0.1 elsewhere.
        let s = cross_entropy(&logits, &[0, 2], 0.3, None).unwrap().to_scalar::<f32>().unwrap();
        let row0 = 0.8 * (lse0 - 2.0) + 0.1 * lse0 + 0.1 * lse0;
        let row1 = 0.1 * lse1 + 0.1 * (lse1 - 1.0) + 0.8 * lse1;
        assert!((f64::from(s) - (row0 + row1) / 2.0).abs() < 1e-6);
    }

    #[test]
    fn binary_cross_entropy_matches_pytorch_with_pos_weight() {
        // torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.]))(
        //     torch.tensor([[2.], [-1.], [40.], [-40.]]), torch.tensor([[1.], [0.], [0.], [1.]]))
        let z = Tensor::from_vec(vec![2f32, -1.0, 40.0, -40.0], (4, 1), &Device::Cpu).unwrap();
        let sp = |x: f64| x.max(0.0) + (-x.abs()).exp().ln_1p();
        let expect = (3.0 * sp(-2.0) + sp(-1.0) + sp(40.0) + 3.0 * sp(40.0)) / 4.0;
        let got = binary_cross_entropy(&z, &[1.0, 0.0, 0.0, 1.0], &[3.0]).unwrap().to_scalar::<f32>().unwrap();
        assert!((f64::from(got) - expect).abs() < 1e-4, "{got} vs {expect}");
        // Its gradient is w·(σ(z) − 1) for a positive row and σ(z) for a negative one, over N.
        let v = candle_core::Var::from_tensor(&z).unwrap();
        let loss = binary_cross_entropy(v.as_tensor(), &[1.0, 0.0, 0.0, 1.0], &[3.0]).unwrap();
        let g: Vec<f32> = loss.backward().unwrap().get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let s = |x: f32| 1.0 / (1.0 + (-x).exp());
        let want = [3.0 * (s(2.0) - 1.0), s(-1.0), s(40.0), 3.0 * (s(-40.0) - 1.0)].map(|v| v / 4.0);
        for (a, b) in g.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{g:?} vs {want:?}");
        }
        assert!(binary_cross_entropy(&z, &[1.0], &[1.0]).is_err());
        // At z = 0 exactly (the kink of relu and |·|): σ(0) − 1 = −½ for a positive, ½ for a negative.
        let zero = candle_core::Var::from_tensor(&Tensor::zeros((2, 1), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
        let loss = binary_cross_entropy(zero.as_tensor(), &[1.0, 0.0], &[1.0]).unwrap();
        let g: Vec<f32> = loss.backward().unwrap().get(zero.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(g, vec![-0.25, 0.25]);
        // Two columns, each with its own weight: the mean over all four elements.
        let z2 = Tensor::from_vec(vec![2f32, -1.0, 40.0, -40.0], (2, 2), &Device::Cpu).unwrap();
        let two = binary_cross_entropy(&z2, &[1.0, 0.0, 0.0, 1.0], &[3.0, 5.0]).unwrap().to_scalar::<f32>().unwrap();
        let expect = (3.0 * sp(-2.0) + sp(-1.0) + sp(40.0) + 5.0 * sp(40.0)) / 4.0;
        assert!((f64::from(two) - expect).abs() < 1e-4, "{two} vs {expect}");
    }

    #[test]
    fn balanced_weights_are_inverse_frequency() {
        assert_eq!(balanced_weights(&[0, 0, 0, 1], 2), vec![4.0 / 6.0, 2.0]);
    }
}
