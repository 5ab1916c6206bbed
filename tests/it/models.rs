//! Pretrained forward passes against golden outputs from `../shared/models` (skipped when
//! the shared folder is absent).

use std::path::Path;

use candle_core::{Device, Tensor};
use kiln::imaging::transform::{ColorMode, Interpolation, ResizeMode, Transform};
use kiln::imaging::{DecodeLimits, decode};
use kiln::nn::layers::{Ctx, softmax};
use kiln::nn::models::Arch;
use kiln::nn::{ParamStore, input, read_weights};

use crate::support::shared;

fn load(arch: &Arch, weights: &Path, classes: usize) -> Box<dyn kiln::nn::models::Network> {
    let mut ps = ParamStore::new(Device::Cpu, 0);
    let net = arch.build(&mut ps, 3, [224, 224], classes).unwrap();
    let tensors = read_weights(weights).unwrap();
    let loaded = ps.load(&tensors, |_| false).unwrap();
    assert_eq!(loaded.len(), ps.len(), "every tensor of the model is in the file");
    net
}

fn top(probs: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<(usize, f32)> = probs.iter().copied().enumerate().collect();
    idx.sort_by(|a, b| b.1.total_cmp(&a.1));
    idx.truncate(k);
    idx
}

#[test]
fn efficientnet_lite0_classifies_the_golden_photos() {
    let (Some(weights), Some(photos)) = (shared("models/efficientnet_lite0.safetensors"), shared("datasets/photos")) else { return };
    let arch = Arch::EfficientnetLite0;
    let net = load(&arch, &weights, 1000);
    let preset = arch.preset().unwrap();
    let transform = Transform {
        color: ColorMode::Rgb,
        width: 224,
        height: 224,
        resize: ResizeMode::Crop,
        interpolation: Interpolation::Bilinear,
        pad: 0,
        crop_pct: 224.0 / 256.0,
    };
    let images: Vec<_> = ["coffee.png", "chelsea.png"]
        .iter()
        .map(|f| decode(&std::fs::read(photos.join(f)).unwrap(), &DecodeLimits::default()).unwrap().1)
        .collect();
    let x = input::batch(&images, &transform, &preset.mean, &preset.std, &Device::Cpu).unwrap();
    let probs = softmax(&net.forward(&x, &mut Ctx::eval()).unwrap()).unwrap().to_vec2::<f32>().unwrap();
    let coffee = top(&probs[0], 1);
    assert_eq!(coffee[0].0, 967, "espresso");
    assert!(coffee[0].1 > 0.9, "{coffee:?}");
    let cat = top(&probs[1], 3);
    assert_eq!(cat.iter().map(|t| t.0).collect::<Vec<_>>(), vec![282, 285, 281], "tiger cat, Egyptian cat, tabby");
    // The golden probabilities are 0.38 / 0.37 / 0.16 with Pillow's resize.
    for ((_, p), want) in cat.iter().zip([0.38, 0.37, 0.16]) {
        assert!((p - want).abs() < 0.02, "{cat:?}");
    }
}

#[test]
fn resnet18_matches_torchvision_logits() {
    let (Some(weights), Some(io)) =
        (shared("models/resnet18_torchvision_seeded.safetensors"), shared("models/resnet18_torchvision_seeded_io.safetensors"))
    else {
        return;
    };
    let net = load(&Arch::Resnet18, &weights, 1000);
    let io = candle_core::safetensors::load(&io, &Device::Cpu).unwrap();
    let logits = net.forward(&io["x"], &mut Ctx::eval()).unwrap();
    let diff: f32 = (logits - &io["logits"]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
    assert!(diff < 1e-3, "max |kiln - torchvision| = {diff}");
}

/// A head replaced for new classes: everything but `fc` loads, and `fc` gets the new shape.
#[test]
fn replacing_the_head_keeps_the_backbone() {
    let Some(weights) = shared("models/resnet18_torchvision_seeded.safetensors") else { return };
    let mut ps = ParamStore::new(Device::Cpu, 0);
    let _net = Arch::Resnet18.build(&mut ps, 3, [224, 224], 5).unwrap();
    let tensors = read_weights(&weights).unwrap();
    assert!(ps.load(&tensors, |_| false).is_err(), "a 1000-class head does not fit 5 classes");
    let loaded = ps.load(&tensors, |n| n.starts_with("fc.")).unwrap();
    assert_eq!(loaded.len(), ps.len() - 2);
    assert_eq!(ps.tensors()["fc.weight"].dims(), &[5, 512]);
    let _ = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu);
}
