//! The training loop: data, model, optimizer, checkpoints, metrics.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use candle_core::{D, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, Progress};
use super::data::Split;
use super::{ClassWeights, Finetune, FinetuneMode, Monitor, TrainStage};
use crate::dataset;
use crate::digest::Digest;
use crate::model::{InputCard, ModelCard};
use crate::nn::layers::Ctx;
use crate::nn::loss::{balanced_weights, cross_entropy};
use crate::nn::models::{Network, block_of};
use crate::nn::optim::{OptimConfig, Optimizer};
use crate::nn::schedule::Schedule;
use crate::nn::{ParamStore, read_weights, weights_digest};
use crate::rng::Rng;
use crate::stages::convert::{Dtype, ShardManifest};
use crate::stages::preprocess::Normalize;
use crate::stages::{Stage, StageContext, StageError};

/// One epoch's figures (deterministic: no timings, so equal runs write equal histories).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
}

/// What a network is given: images, or (head fine-tuning) memoised backbone features.
enum Inputs {
    Images { train: Split, val: Split },
    Features { train: (Tensor, Vec<u32>), val: (Tensor, Vec<u32>) },
}

impl Inputs {
    fn train_len(&self) -> usize {
        match self {
            Inputs::Images { train, .. } => train.len(),
            Inputs::Features { train, .. } => train.1.len(),
        }
    }
    fn val_len(&self) -> usize {
        match self {
            Inputs::Images { val, .. } => val.len(),
            Inputs::Features { val, .. } => val.1.len(),
        }
    }
}

fn candle(what: &str) -> impl Fn(candle_core::Error) -> StageError + '_ {
    move |e| StageError::Failed(format!("{what}: {e}"))
}

/// The model input: the preset of a pretrained model (or the manifest's override) must
/// match what preprocess produced; byte shards are normalised with it at load time.
pub(super) fn resolve_input(stage: &TrainStage, m: &ShardManifest) -> Result<Normalize, StageError> {
    let c = m.channels;
    let want = stage.expected_input();
    if let Some(size) = want.size
        && size != [m.width, m.height]
    {
        return Err(StageError::Failed(format!(
            "model `{}` expects {}x{} input but the shards are {}x{}: set `size = [{}, {}]` in the preprocess stage, or `input = {{ size = [{}, {}] }}` in this stage to accept them",
            stage.config.model, size[0], size[1], m.width, m.height, size[0], size[1], m.width, m.height
        )));
    }
    if let Some(channels) = want.channels
        && channels != c
    {
        return Err(StageError::Failed(format!(
            "model `{}` expects {channels} channels but the shards have {c}: set `color = \"rgb\"` in the preprocess stage",
            stage.config.model
        )));
    }
    match (want.norm.map_err(StageError::Failed)?, m.normalization.clone()) {
        (Some(w), _) if w.mean.len() != c || w.std.len() != c => {
            Err(StageError::Failed(format!("input normalisation has {} values, the shards have {c} channels", w.mean.len())))
        }
        (Some(w), Some(d)) if !w.approx_eq(&d) => Err(StageError::Failed(format!(
            "model `{}` expects normalize = {{ mean = {:?}, std = {:?} }} but preprocess used mean = {:?}, std = {:?}: change the preprocess stage, or set `input = {{ mean = …, std = … }}` here to accept it",
            stage.config.model, w.mean, w.std, d.mean, d.std
        ))),
        (Some(w), None) if m.dtype == Dtype::F32 => Err(StageError::Failed(format!(
            "model `{}` expects normalised input but the f32 shards were written without normalisation: add normalize = {{ mean = {:?}, std = {:?} }} to the preprocess stage",
            stage.config.model, w.mean, w.std
        ))),
        (Some(w), _) => Ok(w),
        (None, Some(d)) => Ok(d),
        (None, None) => Ok(Normalize::identity(c)),
    }
}

struct Eval {
    loss: f64,
    accuracy: f64,
}

fn evaluate(net: &dyn Network, inputs: &Inputs, norm: &Normalize, batch: usize, device: &Device) -> candle_core::Result<Option<Eval>> {
    let n = inputs.val_len();
    if n == 0 {
        return Ok(None);
    }
    let (mut loss, mut correct) = (0f64, 0u64);
    for start in (0..n).step_by(batch) {
        let rows: Vec<usize> = (start..(start + batch).min(n)).collect();
        let (logits, labels) = match inputs {
            Inputs::Images { val, .. } => {
                let x = val.batch(&rows, norm, None, device)?;
                (net.forward(&x, &mut Ctx::eval())?, rows.iter().map(|&r| val.labels[r]).collect::<Vec<_>>())
            }
            Inputs::Features { val, .. } => {
                let x = val.0.narrow(0, start, rows.len())?;
                (net.classify(&x, &mut Ctx::eval())?, val.1[start..start + rows.len()].to_vec())
            }
        };
        loss += f64::from(cross_entropy(&logits, &labels, 0.0, None)?.to_scalar::<f32>()?) * rows.len() as f64;
        correct += count_correct(&logits, &labels)?;
    }
    Ok(Some(Eval { loss: loss / n as f64, accuracy: correct as f64 / n as f64 }))
}

fn count_correct(logits: &Tensor, labels: &[u32]) -> candle_core::Result<u64> {
    let pred: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
    Ok(pred.iter().zip(labels).filter(|(p, l)| p == l).count() as u64)
}

/// Bump when a backbone's numerics change (padding, batch-norm formula, convolution
/// kernels): memoised features of the old code must not be reused.
const FEATURES_VERSION: u32 = 1;

/// Backbone features of every row, memoised per (model weights, input normalisation, row
/// bytes): a second run, or another head on the same backbone, computes none.
fn features(
    cx: &StageContext<'_>,
    stage: &TrainStage,
    net: &dyn Network,
    split: &Split,
    norm: &Normalize,
    device: &Device,
    computed: &mut usize,
) -> Result<(Tensor, Vec<u32>), StageError> {
    let weights_tree = stage.deps.first().and_then(|d| cx.dep_scan(d.get_ref())).map(|s| s.tree.digest());
    let mut h = blake3::Hasher::new();
    h.update(b"kiln-features\0");
    h.update(&FEATURES_VERSION.to_le_bytes());
    h.update(serde_json::to_string(&stage.arch).expect("architecture serialises").as_bytes());
    h.update(weights_tree.map(|d| d.0).unwrap_or_default().as_slice());
    h.update(serde_json::to_string(&(&norm.mean, &norm.std)).expect("floats serialise").as_bytes());
    let op = Digest(*h.finalize().as_bytes());
    let row_len = split.row_len();
    let keys: Vec<Digest> = (0..split.len())
        .map(|r| {
            let mut h = blake3::Hasher::new();
            match &split.pixels {
                super::data::Pixels::U8(v) => h.update(&v[r * row_len..(r + 1) * row_len]),
                super::data::Pixels::F32(v) => {
                    h.update(&v[r * row_len..(r + 1) * row_len].iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<_>>())
                }
            };
            Digest(*h.finalize().as_bytes())
        })
        .collect();
    let memo = cx.cache.state().memo();
    let mut found: Vec<Option<Vec<f32>>> = Vec::with_capacity(keys.len());
    for k in &keys {
        let v = memo.get(k, &op).map_err(|e| StageError::Failed(format!("feature memo: {e}")))?;
        found.push(v.map(|b| b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()));
    }
    let misses: Vec<usize> = (0..keys.len()).filter(|&i| found[i].is_none()).collect();
    *computed += misses.len();
    if !misses.is_empty() {
        let progress = cx.reporter.progress(&format!("{}: backbone features", cx.stage), misses.len() as u64, "images");
        for chunk in misses.chunks(32) {
            let x = split.batch(chunk, norm, None, device).map_err(candle("batch"))?;
            let f = net.features(&x, &mut Ctx::eval()).map_err(candle("backbone forward"))?;
            let rows: Vec<Vec<f32>> = f.to_device(&Device::Cpu).and_then(|f| f.to_vec2()).map_err(candle("features"))?;
            let mut puts = Vec::with_capacity(chunk.len());
            for (&i, row) in chunk.iter().zip(rows) {
                puts.push((keys[i], row.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()));
                found[i] = Some(row);
            }
            memo.put_many(&op, &puts).map_err(|e| StageError::Failed(format!("feature memo: {e}")))?;
            progress.inc(chunk.len() as u64);
        }
        progress.finish();
    }
    let dim = found.first().and_then(|f| f.as_ref()).map_or(0, Vec::len);
    let flat: Vec<f32> = found.into_iter().flat_map(|f| f.expect("every row computed")).collect();
    let t = Tensor::from_vec(flat, (keys.len(), dim), device).map_err(candle("features"))?;
    Ok((t, split.labels.clone()))
}

fn strip_optim(t: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    t.iter().filter(|(k, _)| !k.starts_with("optim.")).map(|(k, v)| (k.clone(), v.clone())).collect()
}

pub fn run(stage: &TrainStage, cx: &StageContext<'_>) -> Result<(), StageError> {
    let cfg = &stage.config;
    let (input, artifact) = dataset::single_input(cx)?;
    let manifest = ShardManifest::read(cx, input, artifact)?;
    let norm = resolve_input(stage, &manifest)?;
    let classes = manifest.classes.len();
    if classes < 2 {
        return Err(StageError::Failed(format!("input `{input}` has {classes} class(es): a classifier needs at least 2")));
    }
    let train = Split::load(cx, input, artifact, &manifest, "train")?;
    let val = Split::load(cx, input, artifact, &manifest, "val")?;
    if train.is_empty() {
        return Err(StageError::Failed(format!("input `{input}` has an empty train split")));
    }
    let device = cfg.device.open().map_err(candle("open device"))?;
    let arch = &stage.arch;
    let head_dot = format!("{}.", arch.head_prefix());
    let blocks = arch.blocks();
    let rule: Box<dyn Fn(&str) -> bool + Send + Sync> = match &cfg.finetune {
        Finetune::Mode(FinetuneMode::Full) => Box::new(|_| true),
        Finetune::Mode(FinetuneMode::Head) => {
            let h = head_dot.clone();
            Box::new(move |n| n.starts_with(&h))
        }
        Finetune::LastN { last_n_blocks } => {
            let open: HashSet<String> = blocks[blocks.len() - last_n_blocks..].iter().cloned().collect();
            let (h, blocks) = (head_dot.clone(), blocks.clone());
            Box::new(move |n| n.starts_with(&h) || block_of(n, &blocks).is_some_and(|b| open.contains(b)))
        }
    };
    let [c, hgt, wid] = train.shape;
    let mut ps = ParamStore::new(device.clone(), cx.seed).with_trainable(rule);
    let net = arch.build(&mut ps, c, [wid as u32, hgt as u32], classes).map_err(candle("build model"))?;
    let mut summary =
        vec![format!("{} ({} parameters, {} trainable) on {}", arch.name(), ps.parameter_count(), trainable_count(&ps), cfg.device.kind())];
    if let Some(w) = &cfg.weights {
        let path = cx.root.join(w);
        let tensors = read_weights(&path).map_err(|e| StageError::Failed(e.to_string()))?;
        let loaded = ps.load(&tensors, |n| n.starts_with(&head_dot)).map_err(|e| StageError::Failed(format!("weights `{w}`: {e}")))?;
        let expected = ps.names().filter(|n| !n.starts_with(&head_dot)).count();
        if loaded.is_empty() {
            return Err(StageError::Failed(format!(
                "no tensor in weights `{w}` matches model `{}`: is it a {} checkpoint?",
                cfg.model, cfg.model
            )));
        }
        if loaded.len() < expected {
            cx.reporter.warn(&format!(
                "{}: weights `{w}` cover {} of {expected} backbone tensors; the rest start from random values",
                cx.stage,
                loaded.len()
            ));
        }
        summary.push(format!("loaded {} tensors from {w}; head `{}` is new ({classes} classes)", loaded.len(), arch.head_prefix()));
    }

    let head_only = cfg.finetune == Finetune::Mode(FinetuneMode::Head);
    let augment = manifest.online_augment().filter(|_| manifest.dtype == Dtype::U8);
    if manifest.online_augment().is_some() && manifest.dtype == Dtype::F32 {
        cx.reporter.warn(&format!("{}: online augmentation needs u8 shards (dtype = \"u8\" in convert); training without it", cx.stage));
    }
    let inputs = if head_only {
        if augment.is_some() {
            cx.reporter.warn(&format!("{}: head fine-tuning trains on memoised features of the unaugmented images", cx.stage));
        }
        let mut computed = 0;
        let train = features(cx, stage, net.as_ref(), &train, &norm, &device, &mut computed)?;
        let val = features(cx, stage, net.as_ref(), &val, &norm, &device, &mut computed)?;
        summary.push(format!("backbone features: {computed} computed, {} memoised", train.1.len() + val.1.len() - computed));
        Inputs::Features { train, val }
    } else {
        Inputs::Images { train, val }
    };
    let train_labels: Vec<u32> = match &inputs {
        Inputs::Images { train, .. } => train.labels.clone(),
        Inputs::Features { train, .. } => train.1.clone(),
    };
    let class_weights: Option<Vec<f32>> = match &cfg.class_weights {
        None => None,
        Some(ClassWeights::Named(_)) => Some(balanced_weights(&train_labels, classes)),
        Some(ClassWeights::List(w)) if w.len() == classes => Some(w.clone()),
        Some(ClassWeights::List(w)) => {
            return Err(StageError::Failed(format!("`class_weights` has {} values for {classes} classes", w.len())));
        }
    };

    let ocfg = OptimConfig {
        kind: cfg.optimizer,
        momentum: cfg.momentum,
        nesterov: cfg.nesterov,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: cfg.weight_decay,
    };
    let mut opt = Optimizer::new(ocfg, ps.trainable(), |n| if n.starts_with(&head_dot) { 1.0 } else { cfg.backbone_lr_scale });
    let schedule = Schedule {
        kind: cfg.schedule,
        lr: cfg.lr,
        min_lr: cfg.min_lr,
        warmup_epochs: cfg.warmup_epochs,
        step_epochs: cfg.step_epochs,
        gamma: cfg.gamma,
    };

    let mut progress = Progress::default();
    if let Some((p, tensors)) = checkpoint::load(cx.scratch) {
        ps.load(&strip_optim(&tensors), |_| false).map_err(|e| StageError::Failed(format!("checkpoint: {e}")))?;
        opt.restore(&tensors, p.steps).map_err(candle("checkpoint"))?;
        summary.push(format!("resumed from a checkpoint at epoch {}, batch {}", p.epoch + 1, p.batch));
        progress = p;
    }

    let n = inputs.train_len();
    // A last batch of one sample would give batch norm a zero variance: fold it into the previous one.
    let batch_size = cfg.batch_size.min(n);
    let mut batches_per_epoch = n / batch_size;
    if n % batch_size > 1 {
        batches_per_epoch += 1;
    }
    let started = Instant::now();
    let mut last_checkpoint = Instant::now();
    let mut images_trained = 0u64;
    let mut stopped_early = false;
    while progress.epoch < cfg.epochs {
        let epoch = progress.epoch;
        let mut order: Vec<usize> = (0..n).collect();
        Rng::for_item(cx.seed, "shuffle", epoch as u64).shuffle(&mut order);
        let bar = cx.reporter.progress(&format!("{}: epoch {}/{}", cx.stage, epoch + 1, cfg.epochs), batches_per_epoch as u64, "batches");
        bar.inc(progress.batch as u64);
        let epoch_started = Instant::now();
        let mut epoch_images = 0u64;
        for b in progress.batch..batches_per_epoch {
            let end = if b + 1 == batches_per_epoch { n } else { (b + 1) * batch_size };
            let rows = &order[b * batch_size..end];
            let lr = schedule.lr(progress.steps, batches_per_epoch, cfg.epochs);
            let mut ctx = Ctx::train(Rng::for_item(cx.seed, "dropout", progress.steps));
            let (logits, labels) = match &inputs {
                Inputs::Images { train, .. } => {
                    let x =
                        train.batch(rows, &norm, augment.as_ref().map(|a| (a, cx.seed, epoch as u64)), &device).map_err(candle("batch"))?;
                    (net.forward(&x, &mut ctx).map_err(candle("forward"))?, rows.iter().map(|&r| train.labels[r]).collect::<Vec<_>>())
                }
                Inputs::Features { train, .. } => {
                    let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), &device)
                        .map_err(candle("batch"))?;
                    let x = train.0.index_select(&idx, 0).map_err(candle("batch"))?;
                    (net.classify(&x, &mut ctx).map_err(candle("forward"))?, rows.iter().map(|&r| train.1[r]).collect())
                }
            };
            let loss = cross_entropy(&logits, &labels, cfg.label_smoothing, class_weights.as_deref()).map_err(candle("loss"))?;
            let loss_value = f64::from(loss.to_scalar::<f32>().map_err(candle("loss"))?);
            if !loss_value.is_finite() {
                return Err(StageError::Failed(format!(
                    "training diverged at epoch {}, batch {} (loss {loss_value}): lower `lr` (now {}) or set `clip_grad_norm`",
                    epoch + 1,
                    b + 1,
                    cfg.lr
                )));
            }
            let mut grads = loss.backward().map_err(candle("backward"))?;
            if let Some(max) = cfg.clip_grad_norm {
                opt.clip_grad_norm(&mut grads, max).map_err(candle("clip"))?;
            }
            opt.step(&grads, lr).map_err(candle("optimizer step"))?;
            progress.steps += 1;
            progress.loss_sum += loss_value * rows.len() as f64;
            progress.correct += count_correct(&logits, &labels).map_err(candle("accuracy"))?;
            progress.seen += rows.len() as u64;
            progress.batch = b + 1;
            epoch_images += rows.len() as u64;
            bar.inc(1);
            let secs = epoch_started.elapsed().as_secs_f64().max(1e-9);
            bar.set_detail(&format!(
                "loss {:.4} acc {:.3} {:.0} img/s",
                progress.loss_sum / progress.seen as f64,
                progress.correct as f64 / progress.seen as f64,
                epoch_images as f64 / secs
            ));
            if last_checkpoint.elapsed().as_secs_f64() >= cfg.checkpoint_secs && b + 1 < batches_per_epoch {
                save_state(cx, &ps, &opt, &mut progress, started.elapsed().as_secs_f64())?;
                last_checkpoint = Instant::now();
            }
        }
        bar.finish();
        images_trained += epoch_images;
        let val = evaluate(net.as_ref(), &inputs, &norm, batch_size.max(64), &device).map_err(candle("validation"))?;
        let record = EpochRecord {
            epoch: epoch + 1,
            lr: schedule.lr(progress.steps.saturating_sub(1), batches_per_epoch, cfg.epochs),
            train_loss: progress.loss_sum / progress.seen.max(1) as f64,
            train_accuracy: progress.correct as f64 / progress.seen.max(1) as f64,
            val_loss: val.as_ref().map(|v| v.loss),
            val_accuracy: val.as_ref().map(|v| v.accuracy),
        };
        tracing::info!(stage = cx.stage, epoch = epoch + 1, train_loss = record.train_loss, val_accuracy = ?record.val_accuracy, "epoch done");
        // Higher is better for accuracy, lower for loss; without a validation split the
        // training loss decides.
        let score = match (cfg.monitor, &val) {
            (Monitor::ValAccuracy, Some(v)) => v.accuracy,
            (Monitor::ValLoss, Some(v)) => -v.loss,
            (_, None) => -record.train_loss,
        };
        let min_delta = cfg.early_stopping.as_ref().map_or(0.0, |e| e.min_delta);
        let improved = progress.best.is_none_or(|(_, best)| score > best + min_delta);
        if improved {
            progress.best = Some((epoch + 1, score));
            progress.stale_epochs = 0;
            checkpoint::save_best(cx.scratch, &ps.tensors())?;
        } else {
            progress.stale_epochs += 1;
        }
        progress.history.push(record);
        progress.epoch += 1;
        progress.batch = 0;
        progress.loss_sum = 0.0;
        progress.correct = 0;
        progress.seen = 0;
        save_state(cx, &ps, &opt, &mut progress, started.elapsed().as_secs_f64())?;
        last_checkpoint = Instant::now();
        if let Some(es) = &cfg.early_stopping
            && progress.stale_epochs >= es.patience
        {
            stopped_early = true;
            summary.push(format!("stopped early after epoch {}: no improvement for {} epochs", progress.epoch, es.patience));
            break;
        }
    }
    let train_seconds = progress.train_seconds + started.elapsed().as_secs_f64();
    write_artifact(stage, cx, &manifest, &norm, &ps, &progress, summary, images_trained, train_seconds, stopped_early)
}

fn trainable_count(ps: &ParamStore) -> usize {
    ps.trainable().iter().map(|(_, v)| v.elem_count()).sum()
}

fn save_state(cx: &StageContext<'_>, ps: &ParamStore, opt: &Optimizer, progress: &mut Progress, elapsed: f64) -> Result<(), StageError> {
    let mut tensors = ps.tensors();
    tensors.extend(opt.state());
    let before = progress.train_seconds;
    progress.train_seconds = before + elapsed;
    let r = checkpoint::save(cx.scratch, progress, &tensors);
    progress.train_seconds = before;
    r
}

#[allow(clippy::too_many_arguments)]
fn write_artifact(
    stage: &TrainStage,
    cx: &StageContext<'_>,
    manifest: &ShardManifest,
    norm: &Normalize,
    ps: &ParamStore,
    progress: &Progress,
    mut summary: Vec<String>,
    images_trained: u64,
    train_seconds: f64,
    stopped_early: bool,
) -> Result<(), StageError> {
    let last = ps.tensors();
    let best_file = cx.scratch.join("best.safetensors");
    let best: BTreeMap<String, Tensor> = match progress.best {
        Some(_) if best_file.is_file() => {
            candle_core::safetensors::load(&best_file, &Device::Cpu).map_err(candle("best checkpoint"))?.into_iter().collect()
        }
        _ => last.clone(),
    };
    crate::nn::save_weights(&best, &cx.out_dir.join("model.safetensors")).map_err(candle("save model"))?;
    crate::nn::save_weights(&last, &cx.out_dir.join("last.safetensors")).map_err(candle("save model"))?;
    let digest = weights_digest(&best).map_err(candle("digest"))?;
    let best_epoch = progress.best.map(|b| b.0);
    let best_record = best_epoch.and_then(|e| progress.history.iter().find(|r| r.epoch == e));
    let card = ModelCard {
        format: "kiln-model/1".into(),
        model: stage.config.model.clone(),
        architecture: stage.arch.clone(),
        classes: manifest.classes.clone(),
        input: InputCard {
            channels: manifest.channels,
            height: manifest.height as usize,
            width: manifest.width as usize,
            transform: manifest.transform.clone(),
            mean: norm.mean.clone(),
            std: norm.std.clone(),
        },
        weights_digest: digest.clone(),
        best_epoch,
        epochs_run: progress.history.len(),
        metrics: best_record.map(|r| serde_json::to_value(r).expect("record serialises")),
        hyperparameters: stage.params(),
        parameters: ps.parameter_count(),
        seed: cx.seed,
        device_kind: stage.config.device.kind().into(),
    };
    dataset::write_json(cx, "model.json", &card)?;
    dataset::write_json(cx, "history.json", &progress.history)?;
    let mut csv = String::from("epoch,lr,train_loss,train_accuracy,val_loss,val_accuracy\n");
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.6}")).unwrap_or_default();
    for r in &progress.history {
        csv.push_str(&format!(
            "{},{:.8},{:.6},{:.6},{},{}\n",
            r.epoch,
            r.lr,
            r.train_loss,
            r.train_accuracy,
            opt(r.val_loss),
            opt(r.val_accuracy)
        ));
    }
    std::fs::write(cx.out_dir.join("history.csv"), csv).map_err(|e| StageError::Failed(format!("cannot write history.csv: {e}")))?;
    match super::curves::svg(&progress.history, &format!("{} — {}", cx.pipeline, cx.stage)) {
        Ok(svg) => {
            std::fs::write(cx.out_dir.join("curves.svg"), svg).map_err(|e| StageError::Failed(format!("cannot write curves.svg: {e}")))?
        }
        Err(e) => cx.reporter.warn(&format!("{}: cannot draw learning curves: {e}", cx.stage)),
    }
    // Only what the seed determines goes into the artifact: timings (in the summary line,
    // the stage entry and the run record) would make every rerun a different artifact and
    // defeat early cutoff for everything downstream.
    let report = serde_json::json!({
        "weights_digest": digest,
        "stopped_early": stopped_early,
        "best_epoch": best_epoch,
    });
    dataset::write_json(cx, "train_report.json", &report)?;
    if let Some(r) = best_record {
        summary.push(format!(
            "best epoch {} of {}: val accuracy {}, val loss {}",
            r.epoch,
            progress.history.len(),
            r.val_accuracy.map_or("-".into(), |v| format!("{v:.4}")),
            r.val_loss.map_or("-".into(), |v| format!("{v:.4}"))
        ));
    }
    summary.push(format!(
        "{:.1} s, {:.0} images/s, weights {}",
        train_seconds,
        images_trained as f64 / train_seconds.max(1e-9),
        &digest[..16]
    ));
    cx.reporter.summary(cx.stage, &summary);
    Ok(())
}
