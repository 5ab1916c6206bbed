//! Where kiln may write: below the workspace root and inside its cache, judged on real
//! paths (symlinks resolved), never on the text of a path.
//!
//! A manifest's `outs = ["link/sub"]` is inside the workspace as text, but if `link` is a
//! symlink to `/srv/shared`, deleting the output before the stage runs would delete
//! `/srv/shared/sub`. Every place that deletes, writes or restores a workspace path asks
//! [`Confined::check`] first; the plan asks it for every declared output before anything
//! runs, so such a manifest is an error with its location, and the check at the point of
//! deletion catches a link that a stage created while the pipeline ran.

use std::path::{Component, Path, PathBuf};

use crate::diagnostic::Issue;

/// A path that resolves outside the directory it must stay in.
#[derive(Debug, Clone, thiserror::Error)]
#[error("`{}` resolves to `{}`, outside {what} `{}`", path.display(), real.display(), inside.display())]
pub struct Escape {
    pub path: PathBuf,
    /// Where the path really leads once symlinks are resolved.
    pub real: PathBuf,
    pub inside: PathBuf,
    pub what: &'static str,
}

/// A directory kiln may change, with its real path resolved once.
#[derive(Debug, Clone)]
pub struct Confined {
    dir: PathBuf,
    real: PathBuf,
    what: &'static str,
}

impl Confined {
    /// `what` names the directory in messages ("the workspace", "the cache").
    pub fn new(dir: &Path, what: &'static str) -> Confined {
        let real = real_path(dir);
        Confined { dir: dir.to_path_buf(), real, what }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Fails unless `path` (absolute, or relative to the directory) lies strictly below the
    /// directory once every symlink on the way is resolved. The last component itself is
    /// not followed: kiln replaces a symlink in that position rather than writing through
    /// it, so a link named as an output is removed as a link.
    pub fn check(&self, path: &Path) -> Result<(), Escape> {
        let abs = if path.is_absolute() { path.to_path_buf() } else { self.dir.join(path) };
        let escape = |real: PathBuf| Escape { path: path.to_path_buf(), real, inside: self.dir.clone(), what: self.what };
        let Some(name) = abs.file_name() else { return Err(escape(abs.clone())) };
        let parent = abs.parent().unwrap_or(Path::new("/"));
        let real = real_path(parent).join(name);
        if real.starts_with(&self.real) && real != self.real { Ok(()) } else { Err(escape(real)) }
    }
}

/// The real path of `path`: its deepest existing ancestor canonicalised (every symlink
/// resolved), then the components that do not exist yet. A `..` among those cannot be
/// resolved against the file system, so it is applied textually after the real prefix,
/// which is what the kernel will do once the directories exist.
pub fn real_path(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = abs.as_path();
    let mut rest: Vec<&std::ffi::OsStr> = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            let mut out = real;
            for part in rest.iter().rev() {
                match Path::new(part).components().next() {
                    Some(Component::ParentDir) => {
                        out.pop();
                    }
                    Some(Component::CurDir) | None => {}
                    _ => out.push(part),
                }
            }
            return out;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name);
                existing = parent;
            }
            // `..` as the last component has no file name: resolve it textually.
            (Some(parent), None) => {
                rest.push(std::ffi::OsStr::new(".."));
                existing = parent;
            }
            (None, _) => return abs,
        }
    }
}

/// Plan-time checks of where a manifest makes kiln write: every declared output (`outs`: its
/// path and where the manifest names it) and the views resolve inside the workspace, and the
/// cache is a directory of its own (never the workspace, one of its ancestors, `/`, or a
/// directory that holds other things; `cache_span` is where the manifest names it).
pub fn layout_issues<'a>(
    root: &Path,
    cache_dir: &Path,
    cache_span: Option<std::ops::Range<usize>>,
    outs: impl IntoIterator<Item = (&'a str, std::ops::Range<usize>)>,
) -> Vec<Issue> {
    let mut issues = Vec::new();
    let workspace = Confined::new(root, "the workspace");
    for (out, span) in outs {
        if let Err(e) = workspace.check(Path::new(out)) {
            issues.push(
                Issue::new(span, format!("output `{out}` resolves to `{}`, outside the workspace", e.real.display()))
                    .label("leaves the workspace through a symlink")
                    .help("kiln deletes an output before its stage runs and restores it from the cache: name a path that no symlink leads out of the workspace"),
            );
        }
    }
    let views = root.join("outputs").join("views");
    if let Err(e) = workspace.check(&views) {
        issues.push(
            Issue::new(0..0, format!("`outputs/` resolves to `{}`, outside the workspace", e.real.display()))
                .help("kiln rebuilds `outputs/` on every run: make it a directory of the workspace, not a symlink"),
        );
    }
    let span = cache_span.unwrap_or(0..0);
    let cache_real = real_path(cache_dir);
    let root_real = real_path(root);
    if root_real.starts_with(&cache_real) {
        issues.push(
            Issue::new(span.clone(), format!("the cache `{}` would contain the workspace", cache_real.display()))
                .label("not a directory of its own")
                .help("kiln empties the cache's `tmp/` and removes what nothing refers to: use a directory of its own, such as `cache` (the default)"),
        );
    } else if cache_real.starts_with(root_real.join("outputs")) {
        issues.push(
            Issue::new(span.clone(), "the cache cannot live under `outputs/`, which kiln rebuilds on every run")
                .help("use `cache` (the default) or a directory outside `outputs/`"),
        );
    } else if let Ok(Some(found)) = crate::cache::foreign_contents(cache_dir) {
        issues.push(
            Issue::new(span, format!("`{}` is not a kiln cache: it holds {found}", cache_dir.display())).label("not a kiln cache").help(
                format!(
                    "kiln cleans and collects garbage in its cache; name a new or empty directory (kiln marks its caches with `{}`)",
                    crate::cache::CACHE_TAG
                ),
            ),
        );
    }
    issues
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_out_of_the_workspace_are_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(ws.join("data")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, ws.join("link")).unwrap();
        let confined = Confined::new(&ws, "the workspace");

        confined.check(Path::new("data/out")).unwrap();
        confined.check(Path::new("new/deeper/out")).unwrap();
        // The link itself may be replaced: it lives in the workspace.
        confined.check(Path::new("link")).unwrap();
        let err = confined.check(Path::new("link/sub")).unwrap_err();
        assert!(err.real.starts_with(outside.canonicalize().unwrap()), "{err}");
        assert!(confined.check(Path::new("link/../link/sub")).is_err());
        assert!(confined.check(&ws.join("../outside/x")).is_err());
        assert!(confined.check(Path::new("data/..")).is_err(), "the workspace root itself is not an output");
        assert!(confined.check(Path::new("/etc/passwd")).is_err());
    }

    #[test]
    fn a_workspace_reached_through_a_link_is_still_itself() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir_all(real.join("out")).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("alias")).unwrap();
        let confined = Confined::new(&dir.path().join("alias"), "the workspace");
        confined.check(Path::new("out/file")).unwrap();
        confined.check(&real.join("out/file")).unwrap();
    }
}
