//! Writing the starter manifest for what the survey found: the choices (size, colour,
//! split, model) and the commented TOML text, planned before it is returned.

use super::*;

/// `s` as a TOML basic string.
pub(super) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `s` with control characters replaced, for a comment.
pub(super) fn plain(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// `target` relative to `base` (both absolute), with `/` separators: `data/pets`, or
/// `../shared/pets` outside `base`, or absolute when they share nothing but `/`.
pub(super) fn relative(base: &Path, target: &Path) -> Result<String, Error> {
    let base: Vec<Component<'_>> = base.components().collect();
    let to: Vec<Component<'_>> = target.components().collect();
    let common = base.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let text = |c: &Component<'_>| -> Result<String, Error> {
        c.as_os_str()
            .to_str()
            .map(String::from)
            .ok_or_else(|| usage(format!("`{}` is not UTF-8, which a manifest path must be", target.display())))
    };
    if common <= 1 {
        return target
            .to_str()
            .map(String::from)
            .ok_or_else(|| usage(format!("`{}` is not UTF-8, which a manifest path must be", target.display())));
    }
    let mut parts: Vec<String> = vec!["..".to_string(); base.len() - common];
    for c in &to[common..] {
        parts.push(text(c)?);
    }
    Ok(parts.join("/"))
}

/// What init writes for a survey.
pub(super) struct Choices {
    side: u32,
    resize: &'static str,
    widths: &'static [u32],
    near_duplicates_keep: bool,
    min_side: Option<u32>,
    max_ratio: Option<f64>,
    batch_size: u32,
}

pub(super) fn choose(s: &Survey) -> Choices {
    let z = &s.sizes;
    let short = z.median_short;
    let side = (if short <= 64 { short } else { short.min(MAX_SIDE) / 16 * 16 }).max(MIN_SIDE);
    let ((cw, ch), count) = z.common;
    let resize = if count == z.sampled && cw == side && ch == side { "exact" } else { "crop" };
    // Each width is a stage that halves the resolution: about 3 to 8 pixels a side remain.
    let widths: &'static [u32] = match side {
        0..24 => &[32, 64],
        24..=64 => &[32, 64, 128],
        _ => &[16, 32, 64, 128],
    };
    Choices {
        side,
        resize,
        widths,
        // A 64-bit perceptual hash of a small image says little: many items of a class
        // look alike to it (the bundled digits and Fashion-MNIST pipelines keep them).
        near_duplicates_keep: short <= 32,
        min_side: (z.smallest_side < 8).then_some(z.smallest_side.max(1)),
        max_ratio: (z.widest_ratio > 5.0).then_some((z.widest_ratio * 1.5).ceil().min(1000.0)),
        batch_size: if s.images < 5000 { 32 } else { 64 },
    }
}

/// The manifest text for `s`, with paths relative to `workspace` (the manifest's folder).
/// `dir` and `manifest` are shown as the user gave them.
pub fn render(s: &Survey, workspace: &Path, dir: &str, manifest: &str) -> Result<String, Error> {
    let c = choose(s);
    let z = &s.sizes;
    let name = {
        let stem = s.root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let cleaned: String = stem.chars().map(|ch| if ch.is_ascii_alphanumeric() || ch == '-' || ch == '_' { ch } else { '_' }).collect();
        if cleaned.trim_matches('_').is_empty() { "pipeline".to_string() } else { cleaned }
    };
    let mut t = String::new();
    let w = &mut t;
    let source_rel = relative(workspace, &s.root)?;
    let found = match &s.layout {
        Layout::Class => format!("an ImageFolder, {}/<class>/<image>", plain(&source_rel)),
        Layout::SplitClass { splits } => format!(
            "an ImageFolder, {}/<split>/<class>/<image> ({})",
            plain(&source_rel),
            splits.iter().map(|(sp, n)| format!("{}: {n}", plain(sp))).collect::<Vec<_>>().join(", ")
        ),
        Layout::Listing { file, .. } => format!("a listing, {}", plain(&relative(workspace, file)?)),
    };
    let _ = writeln!(w, "# A kiln pipeline for the images in `{}`, written by `kiln init`.", plain(dir));
    let _ = writeln!(w, "#");
    let _ = writeln!(w, "#   kiln run {}       # runs every stage; results are in outputs/{name}/<stage>/", plain(manifest));
    let _ = writeln!(w, "#   kiln status {}    # after an edit: what changed, and which stages rerun", plain(manifest));
    let _ = writeln!(w, "#");
    let _ = writeln!(w, "# Found {found}: {} classes, {} images.", s.classes.len(), s.images);
    let _ = writeln!(w, "# Image size: {}.", size_words(z));
    let _ = writeln!(w, "#");
    let _ = writeln!(w, "# The stages run {STAGE_ORDER}. Every option of every");
    let _ = writeln!(w, "# stage, with its default, is in the README's manifest reference.");
    let _ = writeln!(w);
    let _ = writeln!(w, "[pipeline]");
    let _ = writeln!(w, "name = {}          # results go to outputs/<name>/", quote(&name));
    let _ = writeln!(w, "seed = 42           # every random draw (splits, augmentation, weights) comes from it");
    let _ = writeln!(w);

    // collect
    let _ = writeln!(w, "[stages.collect]");
    let _ = writeln!(w, "kind = \"collect\"");
    let _ = writeln!(w, "[[stages.collect.sources]]");
    match &s.layout {
        Layout::Class | Layout::SplitClass { .. } => {
            let _ = writeln!(w, "type = \"dir\"");
            let _ = writeln!(w, "path = {}", quote(&source_rel));
            if matches!(s.layout, Layout::Class) {
                let _ = writeln!(w, "layout = \"class\"             # <class>/<image>: the folder is the label");
            } else {
                let _ = writeln!(w, "layout = \"split/class\"       # <split>/<class>/<image>");
            }
            let _ = writeln!(w, "# extensions = [\"png\", \"jpg\"]   # default: every image extension kiln decodes");
            let _ = writeln!(w, "# exclude = [\"**/thumbs/**\"]     # globs of files to leave out");
        }
        Layout::Listing { file, path_field, label_field } => {
            let rel = relative(workspace, file)?;
            if !rel.contains('/') {
                return Err(usage(format!(
                    "the listing `{}` is in the folder the manifest goes in (`{}`), and kiln depends on a listing's whole folder; \
                     move the listing and its images into a sub-folder (e.g. `data/`), or write the manifest one level up: --output ../kiln.toml",
                    file.display(),
                    workspace.display()
                )));
            }
            let _ = writeln!(w, "type = \"listing\"              # paths are relative to the listing's folder");
            let _ = writeln!(w, "path = {}", quote(&rel));
            let _ = writeln!(w, "path_field = {}", quote(path_field));
            let _ = writeln!(w, "label_field = {}", quote(label_field));
        }
    }
    let _ = writeln!(w);

    // clean
    let _ = writeln!(w, "[stages.clean]");
    let _ = writeln!(w, "kind = \"clean\"");
    let _ = writeln!(w, "inputs = [\"collect\"]");
    let _ = writeln!(w, "# Each image is decoded once and measured. The checks and their defaults: `decode`,");
    let _ = writeln!(w, "# `too_small` (min_side = 8), `aspect_ratio` (max_ratio = 5.0), `low_information`");
    let _ = writeln!(w, "# (min_contrast = 2.0) and `near_duplicates` (max_distance = 14) quarantine what they");
    let _ = writeln!(w, "# find; `exact_duplicates` drops the copies; `wrong_extension`, `too_dark` (below = 16.0),");
    let _ = writeln!(w, "# `too_bright` (above = 240.0), `blurry` (min_sharpness = 10.0) and `grayscale` only");
    let _ = writeln!(w, "# report (policy \"keep\"). `kiln report {} clean` lists what was found.", plain(manifest));
    let _ = writeln!(w, "[stages.clean.checks]");
    let mut any_check = false;
    if c.near_duplicates_keep {
        let _ = writeln!(w, "# Small images of one class look alike to a 64-bit perceptual hash: report, keep.");
        let _ = writeln!(w, "near_duplicates = {{ policy = \"keep\" }}");
        any_check = true;
    }
    if let Some(min_side) = c.min_side {
        let _ = writeln!(w, "# The smallest images found are {min_side} pixels on the shorter side.");
        let _ = writeln!(w, "too_small = {{ policy = \"quarantine\", min_side = {min_side} }}");
        any_check = true;
    }
    if let Some(ratio) = c.max_ratio {
        let _ = writeln!(w, "# The longest side of some images found is {:.1} times the shorter one.", z.widest_ratio);
        let _ = writeln!(w, "aspect_ratio = {{ policy = \"quarantine\", max_ratio = {ratio:.1} }}");
        any_check = true;
    }
    if !any_check {
        let _ = writeln!(w, "# blurry = {{ policy = \"quarantine\", min_sharpness = 10.0 }}");
    }
    let _ = writeln!(w);

    // preprocess
    let _ = writeln!(w, "[stages.preprocess]");
    let _ = writeln!(w, "kind = \"preprocess\"");
    let _ = writeln!(w, "inputs = [\"clean\"]");
    if z.grayscale {
        let _ = writeln!(w, "color = \"grayscale\"          # every sampled image is grayscale");
    } else {
        let _ = writeln!(w, "color = \"rgb\"                # or \"grayscale\"");
    }
    let typical = if z.median.0 == z.median.1 { z.median.0.to_string() } else { format!("{}x{}", z.median.0, z.median.1) };
    let why = if c.side < z.median_short {
        format!("the images are typically {typical}; a small CNN on the CPU wants fewer pixels")
    } else if c.side > z.median_short {
        format!("the images are typically {typical}; {MIN_SIDE} is the least written")
    } else {
        format!("the typical size found ({typical})")
    };
    let _ = writeln!(w, "size = [{}, {}]               # width, height: {why}", c.side, c.side);
    if c.resize == "exact" {
        let _ = writeln!(w, "resize = \"exact\"             # every sampled image is this size already");
    } else {
        let _ = writeln!(w, "resize = \"crop\"              # scale the shorter side, cut the centre; or \"exact\", \"letterbox\"");
    }
    let _ = writeln!(w, "interpolation = \"bilinear\"   # or \"nearest\", \"bicubic\", \"lanczos\"");
    if z.grayscale {
        let _ = writeln!(w, "normalize = {{ mean = [0.5], std = [0.25] }}   # recorded; train applies it");
    } else {
        let _ = writeln!(
            w,
            "normalize = {{ mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225] }}   # ImageNet's; recorded, train applies it"
        );
    }
    let _ = writeln!(w, "# Augmentation: drawn afresh each epoch by train, for the training split only.");
    let _ = writeln!(w, "# [stages.preprocess.augment]");
    let _ = writeln!(w, "# rotation_range = 10.0");
    let _ = writeln!(w, "# width_shift_range = 0.1");
    let _ = writeln!(w, "# height_shift_range = 0.1");
    let _ = writeln!(w, "# horizontal_flip = true      # not for digits or text: a mirror image is another class");
    let _ = writeln!(w);

    // label
    let _ = writeln!(w, "[stages.label]");
    let _ = writeln!(w, "kind = \"label\"");
    let _ = writeln!(w, "inputs = [\"preprocess\"]");
    match &s.layout {
        Layout::Listing { label_field, .. } => {
            let _ = writeln!(w, "# Labels come from the listing's `{}` column (what collect found).", plain(label_field));
        }
        _ => {
            let _ = writeln!(w, "# Labels come from the class folders (what collect found).");
        }
    }
    let _ = writeln!(w, "# `classes` fixes the class order; the comments count the images found.");
    let _ = writeln!(w, "classes = [");
    for (class, n) in &s.classes {
        let q = quote(class);
        let pad = 24usize.saturating_sub(q.chars().count() + 1);
        let _ = writeln!(w, "  {q},{:pad$} # {n} image{}", "", if *n == 1 { "" } else { "s" });
    }
    let _ = writeln!(w, "]");
    if s.skipped.is_empty() {
        let _ = writeln!(w, "# unknown = \"drop\"           # drop images of other classes instead of failing");
    } else {
        let names: Vec<String> = s.skipped.iter().map(|(n, k)| format!("{} ({k})", plain(n))).collect();
        let _ = writeln!(w, "# Not classes: {}.", names.join(", "));
        let _ = writeln!(w, "unknown = \"drop\"             # drop their images instead of failing");
    }
    if s.unlabelled > 0 {
        let _ = writeln!(w, "# {} images have no label: they are dropped (missing = \"drop\", the default).", s.unlabelled);
    }
    let _ = writeln!(w);

    // convert
    let _ = writeln!(w, "[stages.convert]");
    let _ = writeln!(w, "kind = \"convert\"");
    let _ = writeln!(w, "inputs = [\"label\"]");
    let smallest = s.classes.iter().map(|(_, n)| *n).min().unwrap_or(0);
    match &s.layout {
        Layout::SplitClass { splits } if splits.iter().any(|(sp, _)| sp == "test") => {
            let own_val = splits.iter().any(|(sp, _)| ["val", "valid", "validation"].contains(&sp.as_str()));
            let _ = writeln!(w, "# The folders' own split is kept: `test` is the test set; validation is carved");
            if own_val {
                let _ = writeln!(w, "# out of train only with a `val` above 0 (the folders have their own val split).");
                let _ = writeln!(w, "split = {{ from_items = true, val = 0.0 }}");
            } else {
                let _ = writeln!(w, "# out of train (stratified by class, seeded).");
                let _ = writeln!(w, "split = {{ from_items = true, val = 0.1 }}");
            }
        }
        layout => {
            if let Layout::SplitClass { splits } = layout {
                let names: Vec<String> = splits.iter().map(|(sp, _)| plain(sp)).collect();
                let _ = writeln!(w, "# The folders' splits ({}) include no `test`: convert deals its own.", names.join(", "));
            }
            let _ = writeln!(w, "# Seeded and stratified by class; copies that clean found never straddle splits.");
            if smallest < 50 {
                let _ = writeln!(w, "split = {{ train = 0.7, val = 0.15, test = 0.15 }}   # the smallest class has {smallest} images");
            } else {
                let _ = writeln!(w, "split = {{ train = 0.8, val = 0.1, test = 0.1 }}");
            }
        }
    }
    let _ = writeln!(w);

    // train
    let widths = c.widths.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
    let _ = writeln!(w, "[stages.train]");
    let _ = writeln!(w, "kind = \"train\"");
    let _ = writeln!(w, "inputs = [\"convert\"]");
    let _ = writeln!(w, "# A small CNN from scratch: each width is a conv stage that halves the resolution.");
    let _ = writeln!(w, "# For photos, fine-tuning a pretrained network does better: see pipelines/finetune.toml");
    let _ = writeln!(w, "# (model = \"resnet18\" or \"efficientnet_lite0\" with `weights`, and finetune = \"head\").");
    let _ = writeln!(w, "model = \"cnn\"");
    let _ = writeln!(w, "cnn = {{ widths = [{widths}], hidden = 128, dropout = 0.25 }}");
    let _ = writeln!(w, "epochs = 15");
    let _ = writeln!(w, "batch_size = {}", c.batch_size);
    let _ = writeln!(w, "optimizer = \"adamw\"");
    let _ = writeln!(w, "lr = 0.002");
    let _ = writeln!(w, "schedule = \"cosine\"           # from `lr` down to `min_lr` (0) over the run");
    let _ = writeln!(w, "device = \"cpu\"                # \"auto\" takes a GPU when kiln is built with --features cuda");
    let _ = writeln!(w, "# early_stopping = {{ patience = 3 }}   # stop when val accuracy stops improving");
    let _ = writeln!(w);

    // eval
    let _ = writeln!(w, "[stages.eval]");
    let _ = writeln!(w, "kind = \"eval\"");
    let _ = writeln!(w, "inputs = [\"train\", \"convert\"]   # the model and the data");
    let _ = writeln!(w, "split = \"test\"");
    let _ = writeln!(w, "# batch_size = 64               # images scored at once: it decides eval's memory use");
    Ok(t)
}
