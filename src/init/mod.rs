//! `kiln init [DIR]`: look at a folder of labelled images and write a commented starter
//! manifest for it, as `cargo new` or `dvc init` start a project.
//!
//! What it recognises, in this order:
//! - an ImageFolder tree: `DIR/<class>/<image>`, or `DIR/<split>/<class>/<image>` when
//!   every top folder has a split's name (`train`, `test`, `val`, `all`, …);
//! - a CSV listing in DIR (or DIR itself) with a column of image paths (relative to the
//!   listing) and a column of labels.
//!
//! A folder that holds a single sub-folder (the workspace root with its `data/`) is looked
//! into. Counting images reads only names; sizes and colour come from the headers of at
//! most [`MAX_SAMPLE`] images, so no pixel is decoded. The manifest is planned
//! ([`Plan::from_str`]) before it is written: every value in it passes kiln's checks.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use crate::Error;
use crate::plan::Plan;
use crate::stages::StageRegistry;

/// Image extensions collect takes from a folder when the manifest names none.
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff"];
/// Top folder names that make a tree `split/class/image`.
const SPLIT_NAMES: &[&str] = &["train", "training", "test", "testing", "val", "valid", "validation", "dev", "all"];
/// Column names taken for the label column of a listing, before any other column.
const LABEL_COLUMNS: &[&str] = &["label", "labels", "class", "class_name", "category", "target", "y"];
/// Folders of a workspace root that hold no data (kiln's own, build output, hidden ones).
const WORKSPACE_FOLDERS: &[&str] = &["cache", "outputs", "target", "node_modules"];
/// The most image headers read for sizes and colour.
pub const MAX_SAMPLE: usize = 200;
/// The largest side written for preprocess: a small CNN trained on the CPU.
const MAX_SIDE: u32 = 128;
/// The smallest side written for preprocess.
const MIN_SIDE: u32 = 8;
/// Listings larger than this are not read (collect's limit for listings).
const MAX_LISTING_BYTES: u64 = 1 << 30;
/// Rows of a CSV whose values are looked up on disk to find the path column.
const PROBE_ROWS: usize = 50;
/// The order of the stages written: the bundled pipelines' order.
pub const STAGE_ORDER: &str = "collect → clean → preprocess → label → convert → train → eval";

/// What `kiln init` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The folder of images, or a CSV listing.
    pub dir: PathBuf,
    /// Where the manifest goes (`kiln.toml`).
    pub output: PathBuf,
    /// Overwrite `output` if it exists.
    pub force: bool,
}

mod render;
mod survey;

pub use render::render;
pub use survey::{Layout, Sizes, Survey, survey};

/// A manifest written by [`init`].
#[derive(Debug, Clone)]
pub struct Written {
    /// Where it was written, as given.
    pub path: PathBuf,
    pub survey: Survey,
    pub text: String,
}

fn usage(message: impl Into<String>) -> Error {
    Error::Usage(message.into())
}

/// Looks at `opts.dir`, writes the starter manifest to `opts.output`, and says what it
/// found. Nothing is written when the output exists (without `force`), when nothing
/// labelled is found, or when the manifest would not plan.
pub fn init(opts: &Options) -> Result<Written, Error> {
    let output = &opts.output;
    if output.is_dir() {
        return Err(usage(format!("`{}` is a directory: pass the manifest's file name, e.g. --output kiln.toml", output.display())));
    }
    if output.exists() && !opts.force {
        return Err(usage(format!("`{}` already exists; pass --force to overwrite it", output.display())));
    }
    let parent = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|source| Error::Io { action: "create", path: parent.to_path_buf(), source })?;
    let workspace = parent.canonicalize().map_err(|source| Error::Io { action: "resolve", path: parent.to_path_buf(), source })?;
    let survey = survey(&opts.dir, &workspace)?;
    let shown = output.display().to_string();
    let text = render(&survey, &workspace, &opts.dir.display().to_string(), &shown)?;
    // Planned as `kiln run` would plan it: a value init writes that kiln refuses is a bug
    // here, and must not reach the user's file.
    Plan::from_str(output, text.clone(), &StageRegistry::builtin())?;
    std::fs::write(output, &text).map_err(|source| Error::Io { action: "write", path: output.clone(), source })?;
    Ok(Written { path: output.clone(), survey, text })
}

impl Written {
    /// What was found and written, and the command to run next, for people.
    pub fn summary(&self) -> Vec<String> {
        let s = &self.survey;
        let shown = self.path.display();
        let mut lines = Vec::new();
        let found = match &s.layout {
            Layout::Class => format!("an ImageFolder `{}` (<class>/<image>)", s.root.display()),
            Layout::SplitClass { splits } => format!(
                "an ImageFolder `{}` (<split>/<class>/<image>; splits {})",
                s.root.display(),
                splits.iter().map(|(name, n)| format!("{name}: {n}")).collect::<Vec<_>>().join(", ")
            ),
            Layout::Listing { file, path_field, label_field } => {
                format!("a listing `{}` (paths in `{path_field}`, labels in `{label_field}`)", file.display())
            }
        };
        lines.push(format!("found {found}: {} classes, {} images", s.classes.len(), s.images));
        let width = s.classes.iter().map(|(c, _)| c.chars().count()).max().unwrap_or(0).min(32);
        const SHOWN_CLASSES: usize = 20;
        for (class, n) in s.classes.iter().take(SHOWN_CLASSES) {
            lines.push(format!("  {class:<width$}  {n}"));
        }
        if s.classes.len() > SHOWN_CLASSES {
            lines.push(format!("  … and {} more classes (all are in the manifest)", s.classes.len() - SHOWN_CLASSES));
        }
        if !s.skipped.is_empty() {
            let names: Vec<String> = s.skipped.iter().map(|(c, n)| format!("`{c}` ({n})")).collect();
            lines.push(format!("not classes, dropped by label: {}", names.join(", ")));
        }
        if s.unlabelled > 0 {
            lines.push(format!("{} images have no class and are dropped by label", s.unlabelled));
        }
        lines.push(format!("image size: {}", size_words(&s.sizes)));
        if s.sizes.unreadable > 0 {
            lines.push(format!(
                "{} of {} sampled files could not be read as images: clean will quarantine such files",
                s.sizes.unreadable,
                s.sizes.sampled + s.sizes.unreadable
            ));
        }
        lines.push(format!("wrote {shown}: {STAGE_ORDER}"));
        lines.push(format!("next: kiln run {shown}"));
        lines
    }
}

/// `20x20 (all 36 sampled images), grayscale`, or the median and the spread.
fn size_words(z: &Sizes) -> String {
    let ((cw, ch), count) = z.common;
    let colour = if z.grayscale { "grayscale" } else { "colour" };
    if count == z.sampled {
        format!("{cw}x{ch} (all {} sampled images), {colour}", z.sampled)
    } else {
        format!(
            "typically {}x{} (median of {} sampled images; the most common, {cw}x{ch}, has {count}), {colour}",
            z.median.0, z.median.1, z.sampled
        )
    }
}

// ---------------------------------------------------------------------------------------
// Looking

#[cfg(test)]
mod tests {
    use super::render::*;
    use super::survey::*;
    use super::*;

    fn sizes(read: &[(u32, u32, bool)]) -> Sizes {
        sizes_of(read, 0).unwrap()
    }

    fn survey_of(root: &Path, layout: Layout, classes: &[(&str, usize)], sizes: Sizes) -> Survey {
        Survey {
            root: root.to_path_buf(),
            layout,
            classes: classes.iter().map(|(c, n)| (c.to_string(), *n)).collect(),
            skipped: Vec::new(),
            unlabelled: 0,
            images: classes.iter().map(|(_, n)| n).sum(),
            sizes,
        }
    }

    /// Renders `s` for a manifest in `ws` and plans it, as `kiln run` would.
    fn plans(ws: &Path, s: &Survey) -> String {
        let text = render(s, ws, "data", "kiln.toml").unwrap();
        let path = ws.join("kiln.toml");
        if let Err(e) = Plan::from_str(&path, text.clone(), &StageRegistry::builtin()) {
            panic!("{:?}\n{text}", miette::Report::new(e));
        }
        text
    }

    #[test]
    fn every_kind_of_set_gets_a_manifest_that_plans() {
        let ws = tempfile::tempdir().unwrap();
        let ws = ws.path().canonicalize().unwrap();
        let data = ws.join("data");
        let small_gray = sizes(&[(20, 20, true); 5]);
        let text = plans(&ws, &survey_of(&data, Layout::Class, &[("a", 12), ("b", 12), ("c", 12)], small_gray.clone()));
        assert!(
            text.contains("layout = \"class\"") && text.contains("color = \"grayscale\"") && text.contains("size = [20, 20]"),
            "{text}"
        );
        assert!(text.contains("resize = \"exact\"") && text.contains("train = 0.7") && text.contains("widths = [32, 64]"), "{text}");
        assert!(text.contains("near_duplicates = { policy = \"keep\" }"), "{text}");

        // Photos: colour, various sizes, capped; their own train/test split.
        let photos = sizes(&[(500, 375, false), (640, 480, false), (300, 300, true), (1024, 768, false)]);
        let splits = Layout::SplitClass { splits: vec![("test".into(), 200), ("train".into(), 800)] };
        let text = plans(&ws, &survey_of(&data, splits, &[("cat", 500), ("dog", 500)], photos));
        assert!(text.contains("color = \"rgb\"") && text.contains("size = [128, 128]") && text.contains("resize = \"crop\""), "{text}");
        assert!(text.contains("from_items = true, val = 0.1") && text.contains("widths = [16, 32, 64, 128]"), "{text}");
        assert!(!text.contains("near_duplicates ="), "{text}");

        // scikit-learn's digits from make_imagefolder.py: one split named `all`, 8x8.
        let digits = Layout::SplitClass { splits: vec![("all".into(), 1797)] };
        let classes: Vec<(String, usize)> = (0..10).map(|d| (d.to_string(), 180)).collect();
        let refs: Vec<(&str, usize)> = classes.iter().map(|(c, n)| (c.as_str(), *n)).collect();
        let text = plans(&ws, &survey_of(&data, digits, &refs, sizes(&[(8, 8, true); 3])));
        assert!(text.contains("layout = \"split/class\"") && text.contains("train = 0.8") && text.contains("size = [8, 8]"), "{text}");

        // Tiny, long images: the clean thresholds follow what was found.
        let odd = sizes(&[(4, 40, true), (5, 50, true)]);
        let text = plans(&ws, &survey_of(&data, Layout::Class, &[("x", 3), ("y", 3)], odd));
        assert!(text.contains("min_side = 4") && text.contains("max_ratio = 15.0") && text.contains("size = [8, 8]"), "{text}");

        // A listing with its own columns; odd class names are quoted.
        let listing = Layout::Listing { file: data.join("list.csv"), path_field: "file".into(), label_field: "kind".into() };
        let mut s = survey_of(&data, listing, &[("say \"hi\"", 3), ("back\\slash", 3)], small_gray);
        s.skipped = vec![(".hidden".into(), 2)];
        let text = plans(&ws, &s);
        assert!(
            text.contains("type = \"listing\"") && text.contains("path = \"data/list.csv\"") && text.contains("unknown = \"drop\""),
            "{text}"
        );
    }

    #[test]
    fn paths_are_relative_to_the_manifest() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(relative(&p("/w/s"), &p("/w/s/data/x")).unwrap(), "data/x");
        assert_eq!(relative(&p("/w/s"), &p("/w/shared/d")).unwrap(), "../shared/d");
        assert_eq!(relative(&p("/w/s"), &p("/other/d")).unwrap(), "/other/d");
    }

    #[test]
    fn sizes_take_the_median_and_the_most_common() {
        let z = sizes(&[(10, 20, true), (30, 30, false), (30, 30, true), (100, 50, true)]);
        assert_eq!((z.median, z.median_short, z.smallest_side, z.common), ((30, 30), 30, 10, ((30, 30), 2)));
        assert!(!z.grayscale && (z.widest_ratio - 2.0).abs() < 1e-9);
        assert!(sizes_of(&[], 3).is_none());
    }

    fn png(path: &Path, w: u32, h: u32, seed: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::GrayImage::from_fn(w, h, |x, y| image::Luma([((x * 7 + y * 13 + seed * 31) % 251) as u8])).save(path).unwrap();
    }

    #[test]
    fn a_workspace_root_is_looked_into_and_splits_are_found() {
        let ws = tempfile::tempdir().unwrap();
        let ws = ws.path().canonicalize().unwrap();
        for (split, n) in [("train", 4), ("test", 2)] {
            for class in ["cat", "dog"] {
                for i in 0..n {
                    png(&ws.join(format!("data/pets/{split}/{class}/{i}.png")), 12, 10, i);
                }
            }
        }
        png(&ws.join("outputs/x/y/z.png"), 3, 3, 0);
        let s = survey(&ws, &ws).unwrap();
        assert_eq!(s.root, ws.join("data/pets"));
        assert_eq!(s.layout, Layout::SplitClass { splits: vec![("test".into(), 4), ("train".into(), 8)] });
        assert_eq!(s.classes, vec![("cat".to_string(), 6), ("dog".to_string(), 6)]);
        assert_eq!((s.sizes.common, s.sizes.grayscale), (((12, 10), 12), true));
        let text = plans(&ws, &s);
        assert!(text.contains("path = \"data/pets\""), "{text}");
    }

    #[test]
    fn a_listing_is_found_by_its_columns() {
        let ws = tempfile::tempdir().unwrap();
        let ws = ws.path().canonicalize().unwrap();
        let mut csv = String::from("id,file,kind\n");
        for i in 0..6 {
            png(&ws.join(format!("data/img/{i}.png")), 16, 16, i);
            csv.push_str(&format!("{i},img/{i}.png,{}\n", if i % 2 == 0 { "even" } else { "odd" }));
        }
        std::fs::write(ws.join("data/list.csv"), csv).unwrap();
        let s = survey(&ws.join("data"), &ws).unwrap();
        assert_eq!(s.layout, Layout::Listing { file: ws.join("data/list.csv"), path_field: "file".into(), label_field: "kind".into() });
        assert_eq!(s.classes, vec![("even".to_string(), 3), ("odd".to_string(), 3)]);
        plans(&ws, &s);
    }

    #[test]
    fn nothing_labelled_is_a_usage_error() {
        let ws = tempfile::tempdir().unwrap();
        let ws = ws.path().canonicalize().unwrap();
        std::fs::create_dir_all(ws.join("empty")).unwrap();
        std::fs::write(ws.join("empty/notes.txt"), "hello").unwrap();
        let e = survey(&ws.join("empty"), &ws).unwrap_err();
        assert!(matches!(&e, Error::Usage(m) if m.contains("no images")), "{e}");
        png(&ws.join("one/cat/a.png"), 8, 8, 0);
        png(&ws.join("one/cat/b.png"), 8, 8, 1);
        let e = survey(&ws.join("one"), &ws).unwrap_err();
        assert!(matches!(&e, Error::Usage(m) if m.contains("one class")), "{e}");
        png(&ws.join("flat/a.png"), 8, 8, 0);
        let e = survey(&ws.join("flat"), &ws).unwrap_err();
        assert!(matches!(&e, Error::Usage(m) if m.contains("no class folders")), "{e}");
    }
}
