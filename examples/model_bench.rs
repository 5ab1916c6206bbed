//! Throughput of kiln's models on random input: inference (eval mode, no gradients) and
//! training (forward, backward, AdamW step). `bench/models.py` runs it beside PyTorch.
//!
//!   cargo run --release --example model_bench -- resnet18 train 8 224 5

use std::time::Instant;

use candle_core::{Device, Tensor};
use kiln::nn::layers::Ctx;
use kiln::nn::loss::cross_entropy;
use kiln::nn::models::{Arch, CnnConfig};
use kiln::nn::optim::{OptimConfig, Optimizer, OptimizerKind};
use kiln::nn::{ParamStore, Result};
use kiln::rng::Rng;

// The same allocator as the kiln binary: training and inference run there with it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_string());
    let (model, mode) = (get(0, "resnet18"), get(1, "infer"));
    let batch: usize = get(2, "8").parse().expect("batch");
    let size: usize = get(3, "224").parse().expect("size");
    let iters: usize = get(4, "5").parse().expect("iterations");
    let channels: usize = get(5, "3").parse().expect("channels");
    let classes = 10;
    let cnn = CnnConfig { widths: vec![32, 64], convs_per_stage: 1, hidden: 128, dropout: 0.25 };
    let arch = Arch::from_name(&model, Some(cnn)).expect("model name");
    // Inference runs as eval, predict and serve run it (`TrainedModel::load`): plain weights,
    // so no graph is recorded and activations are freed as they are consumed.
    let mut ps = ParamStore::new(Device::Cpu, 1);
    if mode != "train" {
        ps = ps.with_trainable(|_| false);
    }
    let net = arch.build(&mut ps, channels, [size as u32, size as u32], classes)?;
    let mut rng = Rng::new(3);
    let x: Vec<f32> = (0..batch * channels * size * size).map(|_| rng.range(-1.0, 1.0) as f32).collect();
    let x = Tensor::from_vec(x, (batch, channels, size, size), &Device::Cpu)?;
    let labels: Vec<u32> = (0..batch).map(|i| (i % classes) as u32).collect();
    let cfg =
        OptimConfig { kind: OptimizerKind::Adamw, momentum: 0.9, nesterov: false, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-4 };
    let mut opt = Optimizer::new(cfg, ps.trainable(), |_| 1.0);
    let mut step = || -> Result<()> {
        if mode == "train" {
            let logits = net.forward(&x, &mut Ctx::train(Rng::new(5)))?;
            let loss = cross_entropy(&logits, &labels, 0.0, None)?;
            opt.step(&loss.backward()?, 1e-3)?;
        } else {
            net.forward(&x, &mut Ctx::eval())?.sum_all()?.to_scalar::<f32>()?;
        }
        Ok(())
    };
    step()?; // warm-up
    let start = Instant::now();
    for _ in 0..iters {
        step()?;
    }
    let secs = start.elapsed().as_secs_f64();
    let ips = (batch * iters) as f64 / secs;
    println!(
        "{{\"impl\": \"kiln\", \"model\": \"{model}\", \"mode\": \"{mode}\", \"batch\": {batch}, \"size\": {size}, \"threads\": {}, \"images_per_sec\": {ips:.2}, \"ms_per_image\": {:.2}}}",
        candle_core::utils::get_num_threads(),
        1000.0 / ips
    );
    Ok(())
}
