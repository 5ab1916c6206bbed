//! `kind = "preprocess"`: the deterministic image transforms, once per image, memoised;
//! and the augmentation spec, recorded for later stages.
//!
//! ```toml
//! [stages.preprocess]
//! kind = "preprocess"
//! inputs = ["clean"]
//! color = "rgb"                      # or "grayscale"
//! size = [224, 224]                  # width, height
//! resize = "crop"                    # "exact", "crop" (shorter side + centre), "letterbox"
//! interpolation = "bilinear"         # "nearest", "bilinear", "bicubic", "lanczos"
//! normalize = { mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225] }
//! augmentation = "online"            # applied by train each epoch; "offline": by convert
//! [stages.preprocess.augment]        # Keras ImageDataGenerator names
//! rotation_range = 15.0
//! horizontal_flip = true
//! fill_mode = "reflect"
//! ```
//!
//! The resized images are stored once per (image, transform); changing only the
//! augmentation reruns nothing here but the bookkeeping. Normalisation is recorded, not
//! baked into the 8-bit images: convert applies it for `f32` shards, train at load time.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use toml::Spanned;
use toml::de::DeValue;

use super::{ParseContext, Stage, StageContext, StageError, StageKind, io, parse_config};
use crate::diagnostic::{Bounds, Checker, Issue, ValueSpans};
use crate::digest::Digest;
use crate::formats::dataset::Item;
use crate::formats::preprocess::{AugmentWhere, MAX_SIDE, Normalize, Spec};
use crate::imaging::augment::Augment;
use crate::imaging::transform::{ColorMode, Interpolation, ResizeMode, Transform};
use crate::imaging::{self, DecodeLimits};

pub struct PreprocessKind;

fn one() -> f64 {
    1.0
}

fn is_one(v: &f64) -> bool {
    *v == 1.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    color: ColorMode,
    size: [u32; 2],
    #[serde(default)]
    resize: ResizeMode,
    #[serde(default)]
    interpolation: Interpolation,
    #[serde(default)]
    pad: u8,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    crop_pct: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    normalize: Option<Normalize>,
    #[serde(default)]
    augment: Augment,
    #[serde(default)]
    augmentation: AugmentWhere,
}

#[derive(Debug)]
pub struct PreprocessStage {
    spec: Spec,
}

impl StageKind for PreprocessKind {
    fn name(&self) -> &'static str {
        "preprocess"
    }

    fn version(&self) -> u32 {
        1
    }

    fn parse(&self, table: Spanned<DeValue<'_>>, _cx: &ParseContext<'_>) -> Result<Arc<dyn Stage>, Vec<Issue>> {
        let spans = ValueSpans::of(&table);
        let c: Config = parse_config(table)?;
        let mut ck = Checker::new(&spans);
        for (i, side) in c.size.iter().enumerate() {
            ck.int(&format!("size[{i}]"), u64::from(*side), 1, u64::from(MAX_SIDE), "pixels; `size` is [width, height]");
        }
        if ck.float("crop_pct", c.crop_pct, Bounds::above(0.0, 1.0), "the share of the resized image kept by the centre crop")
            && c.crop_pct != 1.0
            && c.resize != ResizeMode::Crop
        {
            ck.fail(
                "crop_pct",
                format!("`crop_pct` = {} needs resize = \"crop\"", c.crop_pct),
                "e.g. crop_pct = 0.875: resize to 256, centre crop 224",
            );
        }
        if let Some(n) = &c.normalize {
            let channels = c.color.channels();
            for (name, values) in [("mean", &n.mean), ("std", &n.std)] {
                if values.len() != channels {
                    ck.fail(
                        &format!("normalize.{name}"),
                        format!("`normalize.{name}` has {} values but color = {:?} has {channels} channel(s)", values.len(), c.color),
                        "one value per channel: e.g. normalize = { mean = [0.5], std = [0.5] } for grayscale, three of each for rgb",
                    );
                }
            }
            ck.floats("normalize.mean", n.mean.iter().map(|v| f64::from(*v)), Bounds::closed(0.0, 1.0), "a fraction of 255");
            ck.floats(
                "normalize.std",
                n.std.iter().map(|v| f64::from(*v)),
                Bounds::above(0.0, 10.0),
                "a fraction of 255; pixels are divided by it",
            );
        }
        for bad in c.augment.validate() {
            let path = format!("augment.{}", bad.field);
            if spans.is_non_finite(&path) {
                continue; // reported by the document-wide check
            }
            ck.fail(&path, format!("`{path}` = {} is out of range", bad.value), format!("`{path}` must be {}", bad.expected));
        }
        let issues = ck.into_issues();
        if !issues.is_empty() {
            return Err(issues);
        }
        let transform = Transform {
            color: c.color,
            width: c.size[0],
            height: c.size[1],
            resize: c.resize,
            interpolation: c.interpolation,
            pad: c.pad,
            crop_pct: c.crop_pct,
        };
        Ok(Arc::new(PreprocessStage { spec: Spec { transform, normalize: c.normalize, augment: c.augment, augmentation: c.augmentation } }))
    }
}

#[derive(Debug, Serialize)]
struct Failure {
    id: String,
    source: String,
    reason: String,
}

#[derive(Debug, Serialize)]
struct Report {
    items_in: usize,
    items_out: usize,
    failed: Vec<Failure>,
}

impl Stage for PreprocessStage {
    fn params(&self) -> serde_json::Value {
        serde_json::to_value(&self.spec).expect("preprocess spec serialises")
    }

    fn plan_issues(&self, plan: &dyn super::PlanView) -> Vec<Issue> {
        super::one_input_issue(plan).into_iter().collect()
    }

    fn run(&self, cx: &StageContext<'_>) -> Result<(), StageError> {
        let (input, artifact) = io::single_input(cx)?;
        let items = io::read(cx, input, artifact)?;
        let mut meta = io::read_meta(cx, input, artifact)?;
        let t = &self.spec.transform;
        // The memo key holds only the deterministic transform: augmentation edits reuse it.
        let op = Digest::of_bytes(format!("preprocess v1 {}", serde_json::to_string(t).expect("transform serialises")).as_bytes());
        let digests: Vec<Digest> = items.iter().map(|i| i.digest).collect();
        let transform_one = |d: &Digest| -> Result<(Digest, u64), String> {
            let bytes = cx.cache.read_blob(d).map_err(|e| format!("cannot read image: {e}"))?;
            let (_, img) = imaging::decode(&bytes, &DecodeLimits::default()).map_err(|e| e.to_string())?;
            let png = imaging::encode_png_fast(&t.apply(&img));
            Ok((cx.cache.put_blob_bytes(&png).map_err(|e| e.to_string())?, png.len() as u64))
        };
        let progress = cx.reporter.progress(&format!("{}: transforming images", cx.stage), items.len() as u64, "items");
        let results = cx
            .cache
            .memo_blobs(&digests, &op, |k| {
                let stored = transform_one(&digests[k]);
                progress.inc(1);
                stored
            })
            .map_err(|e| StageError::Failed(e.to_string()))?;
        progress.finish();
        let mut out = Vec::with_capacity(items.len());
        let mut failed = Vec::new();
        for (item, result) in items.iter().zip(results) {
            match result {
                Ok((digest, bytes)) => {
                    let mut next: Item = item.clone();
                    next.origin = Some(item.origin.unwrap_or(item.digest));
                    (next.digest, next.bytes) = (digest, bytes);
                    (next.format, next.width, next.height) = (Some("png".into()), Some(t.width), Some(t.height));
                    out.push(next);
                }
                Err(reason) => failed.push(Failure { id: item.id.clone(), source: item.source.clone(), reason }),
            }
        }
        if !failed.is_empty() {
            cx.reporter.warn(&format!(
                "stage `{}`: {} images could not be preprocessed (see preprocess_report.json); run a clean stage first",
                cx.stage,
                failed.len()
            ));
        }
        meta.preprocess = Some(self.spec.clone());
        let report = Report { items_in: items.len(), items_out: out.len(), failed };
        io::write(cx, &mut out)?;
        io::write_meta(cx, &meta)?;
        io::write_json(cx, "preprocess_report.json", &report)
    }
}
