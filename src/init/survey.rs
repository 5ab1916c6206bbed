//! Finding the labelled images: an ImageFolder tree or a CSV listing, their classes and
//! counts, and the sizes and colour of a sample of their headers.

use image::ImageDecoder;

use super::*;

/// How the images are labelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// `<class>/<image>`.
    Class,
    /// `<split>/<class>/<image>`, with the images per split.
    SplitClass { splits: Vec<(String, usize)> },
    /// A CSV listing: the file and its path and label columns.
    Listing { file: PathBuf, path_field: String, label_field: String },
}

/// What the sampled image headers say.
#[derive(Debug, Clone, PartialEq)]
pub struct Sizes {
    /// Headers read.
    pub sampled: usize,
    /// Sampled files whose header could not be read.
    pub unreadable: usize,
    /// Every header read is of a grayscale image.
    pub grayscale: bool,
    /// Median width and median height.
    pub median: (u32, u32),
    /// Median of the shorter sides.
    pub median_short: u32,
    /// The smallest shorter side.
    pub smallest_side: u32,
    /// The largest ratio of longer to shorter side.
    pub widest_ratio: f64,
    /// The most common size, and how many sampled images have it.
    pub common: ((u32, u32), usize),
}

/// What `kiln init` found in a folder.
#[derive(Debug, Clone)]
pub struct Survey {
    /// The folder the images are in (canonical): the `dir` source's path, or the listing's
    /// folder.
    pub root: PathBuf,
    pub layout: Layout,
    /// Classes and their image counts, in class order.
    pub classes: Vec<(String, usize)>,
    /// Folder or label names that cannot be class names (hidden folders, names with spaces
    /// at the ends), with their image counts: label drops them.
    pub skipped: Vec<(String, usize)>,
    /// Images that get no label (outside any class folder, or with an empty label).
    pub unlabelled: usize,
    /// Images found in all.
    pub images: usize,
    pub sizes: Sizes,
}

/// What `dir` holds, for a manifest in `workspace` (a canonical folder).
pub fn survey(dir: &Path, workspace: &Path) -> Result<Survey, Error> {
    let shown = dir.display().to_string();
    let mut root = dir.canonicalize().map_err(|e| usage(format!("cannot read `{shown}`: {e}")))?;
    if root.is_file() {
        return match read_listing(&root)? {
            Some(listing) => survey_listing(listing),
            None => Err(usage(format!(
                "`{shown}` is not a CSV listing with a column of image paths and a column of labels; \
                 pass a folder of class folders (DIR/<class>/<image>) or such a listing"
            ))),
        };
    }
    if !root.is_dir() {
        return Err(usage(format!("`{shown}` is not a folder")));
    }
    if workspace.starts_with(&root) && workspace != root {
        return Err(usage(format!(
            "`{shown}` contains the folder the manifest goes in (`{}`), whose cache and outputs would become part of the data; \
             run kiln init from outside the data folder, or pass --output",
            workspace.display()
        )));
    }
    let mut files = image_files(&root, root == workspace);
    // Into a lone sub-folder: the workspace root's `data/`, a download's one folder.
    loop {
        let tops: Vec<&str> = files.iter().filter(|p| p.len() >= 2).map(|p| p[0].as_str()).collect::<BTreeSet<_>>().into_iter().collect();
        let images_here = files.iter().any(|p| p.len() == 1);
        let &[top] = tops.as_slice() else { break };
        // Not into a split folder, nor into a class folder: only when folders remain below.
        let leaves = files.iter().all(|p| p.len() < 3);
        if images_here || !csv_files(&root).is_empty() || (root != workspace && (is_split_name(top) || leaves)) {
            break;
        }
        root = root.join(top);
        files = files.into_iter().map(|p| p[1..].to_vec()).collect();
    }
    let tops: BTreeSet<&str> = files.iter().filter(|p| p.len() >= 2).map(|p| p[0].as_str()).collect();
    let deep = files.iter().filter(|p| p.len() >= 3).count();
    let split_layout = !tops.is_empty() && tops.iter().all(|t| is_split_name(t)) && deep * 2 >= files.len();
    let at = usize::from(split_layout);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut splits: BTreeMap<String, usize> = BTreeMap::new();
    let mut unlabelled = 0;
    for p in &files {
        if p.len() >= at + 2 {
            *counts.entry(p[at].clone()).or_default() += 1;
            if split_layout {
                *splits.entry(p[0].clone()).or_default() += 1;
            }
        } else {
            unlabelled += 1;
        }
    }
    let (classes, skipped) = sort_classes(counts)?;
    if classes.len() >= 2 {
        if root == workspace {
            return Err(usage(format!(
                "the class folders are in the folder the manifest goes in (`{}`), which kiln uses as the workspace root; \
                 move them into a sub-folder (e.g. `data/`), or write the manifest one level up: --output ../kiln.toml",
                workspace.display()
            )));
        }
        let paths: Vec<PathBuf> =
            files.iter().filter(|p| p.len() >= at + 2).map(|p| p.iter().fold(root.clone(), |path, part| path.join(part))).collect();
        let sizes = measure(&paths).ok_or_else(|| unreadable(&shown, paths.len()))?;
        let layout = if split_layout { Layout::SplitClass { splits: splits.into_iter().collect() } } else { Layout::Class };
        return Ok(Survey { root, layout, classes, skipped, unlabelled, images: files.len(), sizes });
    }
    for csv in csv_files(&root) {
        if let Some(listing) = read_listing(&csv)? {
            return survey_listing(listing);
        }
    }
    let extensions = IMAGE_EXTENSIONS.iter().map(|e| format!(".{e}")).collect::<Vec<_>>().join(", ");
    Err(usage(match (files.len(), classes.first()) {
        (0, _) => format!(
            "no images in `{shown}`: kiln init looks for {extensions} files in class folders \
             (DIR/<class>/<image> or DIR/<split>/<class>/<image>), or listed with their labels in a CSV file in DIR"
        ),
        (_, Some((only, n))) => format!(
            "the images in `{shown}` are of one class only (`{only}`, {n} images): a classifier needs at least two \
             class folders (DIR/<class>/<image>)"
        ),
        (n, None) => format!(
            "{n} images in `{shown}`, but no class folders (DIR/<class>/<image>) and no CSV listing with a path and a label \
             column say what they show"
        ),
    }))
}

pub(super) fn unreadable(shown: &str, n: usize) -> Error {
    usage(format!("none of the sampled files of the {n} in `{shown}` could be read as an image (not one header decoded)"))
}

pub(super) fn is_split_name(name: &str) -> bool {
    SPLIT_NAMES.contains(&name.to_ascii_lowercase().as_str())
}

pub(super) fn has_image_extension(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Every image file under `root`, links followed as collect follows them, as path parts
/// relative to it, sorted. At a workspace root, hidden folders and kiln's own are skipped.
pub(super) fn image_files(root: &Path, workspace_root: bool) -> Vec<Vec<String>> {
    let skipped = |e: &walkdir::DirEntry| {
        let name = e.file_name().to_string_lossy();
        workspace_root && e.depth() == 1 && e.file_type().is_dir() && (name.starts_with('.') || WORKSPACE_FOLDERS.contains(&&*name))
    };
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(root).follow_links(true).sort_by_file_name().into_iter().filter_entry(|e| !skipped(e)).flatten() {
        if !entry.file_type().is_file() || !has_image_extension(entry.path()) {
            continue;
        }
        let Ok(rel) = entry.path().strip_prefix(root) else { continue };
        out.push(rel.iter().map(|p| p.to_string_lossy().into_owned()).collect());
    }
    out
}

/// The CSV files directly in `dir`, sorted.
pub(super) fn csv_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("csv")) && p.is_file())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Classes that can be class names, in order (numerically when every name is a number),
/// and those that cannot (hidden folders, names with spaces at the ends): label drops
/// their images. A name with `|` is refused: label would read it as several classes.
#[allow(clippy::type_complexity)]
pub(super) fn sort_classes(counts: BTreeMap<String, usize>) -> Result<(Vec<(String, usize)>, Vec<(String, usize)>), Error> {
    if let Some(bad) = counts.keys().find(|c| c.contains(crate::formats::dataset::MULTI)) {
        return Err(usage(format!(
            "class `{bad}` contains `{}`, which kiln reads as a separator of several classes: rename it (e.g. with `_`)",
            crate::formats::dataset::MULTI
        )));
    }
    let (mut classes, skipped): (Vec<(String, usize)>, Vec<(String, usize)>) =
        counts.into_iter().partition(|(c, _)| !c.is_empty() && c.trim() == c && !c.starts_with('.'));
    if classes.iter().all(|(c, _)| c.parse::<u64>().is_ok()) {
        classes.sort_by_key(|(c, _)| c.parse::<u64>().unwrap_or(u64::MAX));
    }
    Ok((classes, skipped))
}

/// A CSV listing's path and label columns and its rows (image path, label).
pub(super) struct Listing {
    file: PathBuf,
    path_field: String,
    label_field: String,
    rows: Vec<(PathBuf, String)>,
}

/// The listing in `file`, if it is a CSV file with a column of image paths (most of the
/// first rows name an image file that exists) and a column of labels.
pub(super) fn read_listing(file: &Path) -> Result<Option<Listing>, Error> {
    let Ok(meta) = std::fs::metadata(file) else { return Ok(None) };
    if !meta.is_file() || meta.len() > MAX_LISTING_BYTES || !file.extension().is_some_and(|x| x.eq_ignore_ascii_case("csv")) {
        return Ok(None);
    }
    let Ok(mut reader) = csv::Reader::from_path(file) else { return Ok(None) };
    let Ok(headers) = reader.headers().map(|h| h.iter().map(String::from).collect::<Vec<_>>()) else { return Ok(None) };
    let Ok(records) = reader.records().collect::<Result<Vec<csv::StringRecord>, _>>() else { return Ok(None) };
    if records.is_empty() || headers.len() < 2 {
        return Ok(None);
    }
    let base = file.parent().unwrap_or(Path::new("."));
    let resolve = |v: &str| if Path::new(v).is_absolute() { PathBuf::from(v) } else { base.join(v) };
    let probe = &records[..records.len().min(PROBE_ROWS)];
    let hits =
        |c: usize| probe.iter().filter(|r| r.get(c).is_some_and(|v| has_image_extension(Path::new(v)) && resolve(v).is_file())).count();
    let Some(path_col) = (0..headers.len())
        .map(|c| (c, hits(c)))
        .filter(|&(_, h)| h > 0 && h * 2 >= probe.len())
        .max_by_key(|&(c, h)| (h, std::cmp::Reverse(c)))
        .map(|(c, _)| c)
    else {
        return Ok(None);
    };
    let distinct =
        |c: usize| records.iter().filter_map(|r| r.get(c)).map(str::trim).filter(|v| !v.is_empty()).collect::<BTreeSet<_>>().len();
    let others: Vec<usize> = (0..headers.len()).filter(|&c| c != path_col).collect();
    let named =
        others.iter().copied().find(|&c| LABEL_COLUMNS.contains(&headers[c].trim().to_ascii_lowercase().as_str()) && distinct(c) >= 2);
    let Some(label_col) = named.or_else(|| {
        others.iter().copied().find(|&c| {
            let d = distinct(c);
            d >= 2 && d * 2 <= records.len()
        })
    }) else {
        return Ok(None);
    };
    let rows = records.iter().map(|r| (resolve(r.get(path_col).unwrap_or("")), r.get(label_col).unwrap_or("").to_string())).collect();
    Ok(Some(Listing { file: file.to_path_buf(), path_field: headers[path_col].clone(), label_field: headers[label_col].clone(), rows }))
}

pub(super) fn survey_listing(listing: Listing) -> Result<Survey, Error> {
    let shown = listing.file.display().to_string();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut unlabelled = 0;
    for (_, label) in &listing.rows {
        // collect keeps the label as written; label trims it.
        let label = label.trim();
        if label.is_empty() {
            unlabelled += 1;
        } else {
            *counts.entry(label.to_string()).or_default() += 1;
        }
    }
    let (classes, skipped) = sort_classes(counts)?;
    if classes.len() < 2 {
        return Err(usage(format!("the listing `{shown}` names {} class(es): a classifier needs at least two", classes.len())));
    }
    let paths: Vec<PathBuf> = listing.rows.iter().filter(|(_, l)| !l.trim().is_empty()).map(|(p, _)| p.clone()).collect();
    let sizes = measure(&paths).ok_or_else(|| unreadable(&shown, paths.len()))?;
    let root = listing.file.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(Survey {
        root,
        layout: Layout::Listing { file: listing.file, path_field: listing.path_field, label_field: listing.label_field },
        classes,
        skipped,
        unlabelled,
        images: listing.rows.len(),
        sizes,
    })
}

/// Width, height and whether it is grayscale, from the header of the image at `path`
/// (a regular file): no pixel is decoded.
pub(super) fn header(path: &Path) -> Option<(u32, u32, bool)> {
    if !std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        return None;
    }
    let decoder = image::ImageReader::open(path).ok()?.with_guessed_format().ok()?.into_decoder().ok()?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return None;
    }
    Some((w, h, !decoder.color_type().has_color()))
}

/// At most `n` of `items`, spread evenly over them.
pub(super) fn spread<T>(items: &[T], n: usize) -> Vec<&T> {
    if items.len() <= n { items.iter().collect() } else { (0..n).map(|i| &items[i * items.len() / n]).collect() }
}

/// Sizes from the headers of at most [`MAX_SAMPLE`] of `paths`; `None` when none could be
/// read.
pub(super) fn measure(paths: &[PathBuf]) -> Option<Sizes> {
    let sample = spread(paths, MAX_SAMPLE);
    let headers: Vec<Option<(u32, u32, bool)>> = sample.iter().map(|p| header(p.as_path())).collect();
    let read: Vec<(u32, u32, bool)> = headers.iter().flatten().copied().collect();
    sizes_of(&read, headers.len() - read.len())
}

pub(super) fn sorted_by(read: &[(u32, u32, bool)], f: impl Fn(&(u32, u32, bool)) -> u32) -> Vec<u32> {
    let mut v: Vec<u32> = read.iter().map(f).collect();
    v.sort_unstable();
    v
}

/// Statistics of `(width, height, grayscale)` headers.
pub(super) fn sizes_of(read: &[(u32, u32, bool)], unreadable: usize) -> Option<Sizes> {
    if read.is_empty() {
        return None;
    }
    let n = read.len();
    let (widths, heights, shorts) = (sorted_by(read, |r| r.0), sorted_by(read, |r| r.1), sorted_by(read, |r| r.0.min(r.1)));
    let mut freq: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    for &(w, h, _) in read {
        *freq.entry((w, h)).or_default() += 1;
    }
    let common = freq.iter().max_by_key(|&(size, count)| (*count, std::cmp::Reverse(*size))).map(|(s, c)| (*s, *c)).expect("not empty");
    Some(Sizes {
        sampled: n,
        unreadable,
        grayscale: read.iter().all(|r| r.2),
        median: (widths[n / 2], heights[n / 2]),
        median_short: shorts[n / 2],
        smallest_side: shorts[0],
        widest_ratio: read.iter().map(|&(w, h, _)| f64::from(w.max(h)) / f64::from(w.min(h).max(1))).fold(1.0, f64::max),
        common,
    })
}

// ---------------------------------------------------------------------------------------
// Writing
