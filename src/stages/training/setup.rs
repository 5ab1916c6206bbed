//! Everything a model needs before its first batch: the input normalisation the shards
//! must be fed with, the network (with pretrained weights), what it trains on (images, or
//! the memoised backbone features of head fine-tuning), the loss's class weights, the
//! optimizer and the schedule.

use std::collections::HashSet;

use candle_core::{Device, Tensor};

use super::step::{Data, Inputs, Objective, candle};
use super::{ClassWeights, Finetune, FinetuneMode, Model, PosWeight};
use crate::digest::Digest;
use crate::formats::preprocess::Normalize;
use crate::formats::shards::{Dtype, Pixels, ShardManifest, Split};
use crate::nn::layers::Ctx;
use crate::nn::loss::balanced_weights;
use crate::nn::models::{Network, block_of};
use crate::nn::optim::{OptimConfig, Optimizer};
use crate::nn::schedule::Schedule;
use crate::nn::{ParamStore, read_weights};
use crate::stages::{StageContext, StageError};
use crate::task::Outputs;

/// A built network: its parameters, the network, and the summary's first lines.
pub type Built = (ParamStore, Box<dyn Network>, Vec<String>);

/// What [`Model::prepare`] made: the data to train on and, when the backbone is frozen,
/// the summary line of its feature pass and the seconds it took.
pub struct Prepared {
    pub data: Data,
    pub features_line: Option<String>,
    pub features_seconds: f64,
}

/// Bump when a backbone's numerics change (padding, batch-norm formula, convolution
/// kernels): memoised features of the old code must not be reused.
const FEATURES_VERSION: u32 = 1;

impl Model {
    /// The model input: the preset of a pretrained model (or the manifest's override) must
    /// match what preprocess produced; byte shards are normalised with it at load time.
    pub fn resolve_input(&self, m: &ShardManifest) -> Result<Normalize, StageError> {
        let c = m.channels;
        let want = self.expected_input();
        if let Some(size) = want.size
            && size != [m.width, m.height]
        {
            return Err(StageError::Failed(format!(
                "model `{}` expects {}x{} input but the shards are {}x{}: set `size = [{}, {}]` in the preprocess stage, or `input = {{ size = [{}, {}] }}` in this stage to accept them",
                self.config.model, size[0], size[1], m.width, m.height, size[0], size[1], m.width, m.height
            )));
        }
        if let Some(channels) = want.channels
            && channels != c
        {
            return Err(StageError::Failed(format!(
                "model `{}` expects {channels} channels but the shards have {c}: set `color = \"rgb\"` in the preprocess stage",
                self.config.model
            )));
        }
        match (want.norm.map_err(StageError::Failed)?, m.normalization.clone()) {
            (Some(w), _) if w.mean.len() != c || w.std.len() != c => {
                Err(StageError::Failed(format!("input normalisation has {} values, the shards have {c} channels", w.mean.len())))
            }
            (Some(w), Some(d)) if !w.approx_eq(&d) => Err(StageError::Failed(format!(
                "model `{}` expects normalize = {{ mean = {:?}, std = {:?} }} but preprocess used mean = {:?}, std = {:?}: change the preprocess stage, or set `input = {{ mean = …, std = … }}` here to accept it",
                self.config.model, w.mean, w.std, d.mean, d.std
            ))),
            (Some(w), None) if m.dtype == Dtype::F32 => Err(StageError::Failed(format!(
                "model `{}` expects normalised input but the f32 shards were written without normalisation: add normalize = {{ mean = {:?}, std = {:?} }} to the preprocess stage",
                self.config.model, w.mean, w.std
            ))),
            (Some(w), _) => Ok(w),
            (None, Some(d)) => Ok(d),
            (None, None) => Ok(Normalize::identity(c)),
        }
    }

    /// Which weights train, by name, under the manifest's `finetune`.
    fn trainable_rule(&self) -> Box<dyn Fn(&str) -> bool + Send + Sync> {
        let head_dot = format!("{}.", self.arch.head_prefix());
        match &self.config.finetune {
            Finetune::Mode(FinetuneMode::Full) => Box::new(|_| true),
            Finetune::Mode(FinetuneMode::Head) => Box::new(move |n| n.starts_with(&head_dot)),
            Finetune::LastN { last_n_blocks } => {
                let blocks = self.arch.blocks();
                let open: HashSet<String> = blocks[blocks.len() - last_n_blocks..].iter().cloned().collect();
                Box::new(move |n| n.starts_with(&head_dot) || block_of(n, &blocks).is_some_and(|b| open.contains(b)))
            }
        }
    }

    /// Builds the network for `shape` (`[channels, height, width]`), its initial weights
    /// drawn from `seed`, and loads the manifest's pretrained `weights` into it. Returns the
    /// summary's first lines too. `outputs` is the head's width.
    pub fn build(&self, cx: &StageContext<'_>, device: &Device, seed: u64, shape: [usize; 3], outputs: usize) -> Result<Built, StageError> {
        let cfg = &self.config;
        let arch = &self.arch;
        let head_dot = format!("{}.", arch.head_prefix());
        let [c, hgt, wid] = shape;
        let mut ps = ParamStore::new(device.clone(), seed).with_trainable(self.trainable_rule());
        let net = arch.build(&mut ps, c, [wid as u32, hgt as u32], outputs).map_err(candle("build model"))?;
        let mut summary = vec![format!(
            "{} ({} parameters, {} trainable) on {}",
            arch.name(),
            ps.parameter_count(),
            trainable_count(&ps),
            cfg.device.kind()
        )];
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
            summary.push(format!("loaded {} tensors from {w}; head `{}` is new ({outputs} outputs)", loaded.len(), arch.head_prefix()));
        }
        Ok((ps, net, summary))
    }

    /// What the network trains on: the `train` and `val` rows as images (with the shards'
    /// online augmentation), or, when only the head trains, the backbone features of every
    /// row, computed by `net` once per image and memoised.
    pub fn prepare(
        &self,
        cx: &StageContext<'_>,
        net: &dyn Network,
        manifest: &ShardManifest,
        norm: Normalize,
        device: &Device,
        (mut train, mut val): (Split, Split),
    ) -> Result<Prepared, StageError> {
        let multi = [std::mem::take(&mut train.multi), std::mem::take(&mut val.multi)];
        let head_only = self.config.finetune == Finetune::Mode(FinetuneMode::Head);
        let augment = manifest.online_augment().filter(|_| manifest.dtype == Dtype::U8);
        if manifest.online_augment().is_some() && manifest.dtype == Dtype::F32 {
            cx.reporter
                .warn(&format!("{}: online augmentation needs u8 shards (dtype = \"u8\" in convert); training without it", cx.stage));
        }
        let mut features_seconds = 0.0;
        let mut features_line = None;
        let inputs = if head_only {
            let started = std::time::Instant::now();
            if augment.is_some() {
                cx.reporter.warn(&format!("{}: head fine-tuning trains on memoised features of the unaugmented images", cx.stage));
            }
            let mut computed = 0;
            let train = self.features(cx, net, &train, &norm, device, &mut computed)?;
            let val = self.features(cx, net, &val, &norm, device, &mut computed)?;
            features_line = Some(format!("backbone features: {computed} computed, {} memoised", train.1.len() + val.1.len() - computed));
            features_seconds = started.elapsed().as_secs_f64();
            Inputs::Features { train, val }
        } else {
            Inputs::Images { train, val }
        };
        Ok(Prepared { data: Data { norm, inputs, augment, multi }, features_line, features_seconds })
    }

    /// The loss for a run that trains on rows with `labels` (and multi-hot targets `multi`,
    /// for a multi-label model) of the dataset's `classes`: the manifest's `class_weights`
    /// (softmax) or `pos_weight` (sigmoids), and smoothing.
    pub fn objective(&self, labels: &[u32], multi: &[f32], classes: &[String]) -> Result<Objective, StageError> {
        let k = classes.len();
        let outputs = self.outputs(classes).map_err(StageError::Config)?;
        let class_weights = match &self.config.class_weights {
            None => None,
            Some(ClassWeights::Named(_)) => Some(balanced_weights(labels, k)),
            Some(ClassWeights::List(w)) if w.len() == k => Some(w.clone()),
            Some(ClassWeights::List(w)) => {
                return Err(StageError::Failed(format!("`class_weights` has {} values for {k} classes", w.len())));
            }
        };
        // Negatives per positive of each sigmoid output, in the rows trained on.
        let balanced = |positives: Vec<usize>, rows: usize| -> Result<Vec<f64>, StageError> {
            positives
                .iter()
                .enumerate()
                .map(|(c, &pos)| {
                    let name = classes.get(c).map_or("?", String::as_str);
                    match pos {
                        0 => Err(StageError::Failed(format!("`pos_weight = \"balanced\"`: the training rows hold no `{name}`"))),
                        // Negatives per positive would be 0 and silence the class's positive term.
                        p if p == rows => Err(StageError::Failed(format!(
                            "`pos_weight = \"balanced\"`: every training row has `{name}`, so it has no negatives to weigh against"
                        ))),
                        p => Ok((rows - p) as f64 / p as f64),
                    }
                })
                .collect()
        };
        let width = outputs.width(k);
        let pos_weight = match (&self.config.pos_weight, outputs) {
            (Some(PosWeight::Value(w)), _) => vec![*w; width],
            (Some(PosWeight::Named(_)), Outputs::Sigmoid { positive }) => {
                let pos = labels.iter().filter(|&&l| l as usize == positive).count();
                if pos == 0 {
                    return Err(StageError::Failed(format!(
                        "`pos_weight = \"balanced\"`: the training rows hold no `{}` (the positive class)",
                        classes[positive]
                    )));
                }
                vec![(labels.len() - pos) as f64 / pos as f64]
            }
            (Some(PosWeight::Named(_)), Outputs::Independent) => {
                let rows = multi.len() / k.max(1);
                balanced((0..k).map(|c| (0..rows).filter(|&r| multi[r * k + c] > 0.5).count()).collect(), rows)?
            }
            _ => vec![1.0; width],
        };
        Ok(Objective { outputs, classes: k, class_weights, pos_weight, label_smoothing: self.config.label_smoothing })
    }

    /// The optimizer over the trainable weights of `ps`; the backbone's rate is scaled by
    /// `backbone_lr_scale` (discriminative rates).
    pub fn optimizer(&self, ps: &ParamStore) -> Optimizer {
        let cfg = &self.config;
        let head_dot = format!("{}.", self.arch.head_prefix());
        let ocfg = OptimConfig {
            kind: cfg.optimizer,
            momentum: cfg.momentum,
            nesterov: cfg.nesterov,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: cfg.weight_decay,
        };
        Optimizer::new(ocfg, ps.trainable(), |n| if n.starts_with(&head_dot) { 1.0 } else { cfg.backbone_lr_scale })
    }

    pub fn schedule(&self) -> Schedule {
        let cfg = &self.config;
        Schedule {
            kind: cfg.schedule,
            lr: cfg.lr,
            min_lr: cfg.min_lr,
            warmup_epochs: cfg.warmup_epochs,
            step_epochs: cfg.step_epochs,
            gamma: cfg.gamma,
        }
    }

    /// Backbone features of every row, memoised per (model weights, input normalisation, row
    /// bytes): a second run, or another head on the same backbone, computes none.
    fn features(
        &self,
        cx: &StageContext<'_>,
        net: &dyn Network,
        split: &Split,
        norm: &Normalize,
        device: &Device,
        computed: &mut usize,
    ) -> Result<(Tensor, Vec<u32>), StageError> {
        let weights_tree = self.deps.first().and_then(|d| cx.dep_scan(d.get_ref())).map(|s| s.tree.digest());
        let mut h = blake3::Hasher::new();
        h.update(b"kiln-features\0");
        h.update(&FEATURES_VERSION.to_le_bytes());
        h.update(serde_json::to_string(&self.arch).expect("architecture serialises").as_bytes());
        h.update(weights_tree.map(|d| d.0).unwrap_or_default().as_slice());
        h.update(serde_json::to_string(&(&norm.mean, &norm.std)).expect("floats serialise").as_bytes());
        let op = Digest(*h.finalize().as_bytes());
        let row_len = split.row_len();
        let keys: Vec<Digest> = (0..split.len())
            .map(|r| {
                let mut h = blake3::Hasher::new();
                match &split.pixels {
                    Pixels::U8(v) => h.update(&v[r * row_len..(r + 1) * row_len]),
                    Pixels::F32(v) => h.update(&v[r * row_len..(r + 1) * row_len].iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<_>>()),
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
}

fn trainable_count(ps: &ParamStore) -> usize {
    ps.trainable().iter().map(|(_, v)| v.elem_count()).sum()
}
