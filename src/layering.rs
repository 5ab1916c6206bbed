//! The layering of the crate, checked on every `cargo test`: the module graph has no cycle,
//! and no stage kind uses another kind.
//!
//! The graph is built from the source text under `src/`. Each file belongs to a node: its
//! top-level module (`src/X.rs` or anything under `src/X/`), except that every module of
//! `stages` is a node of its own (`src/stages/K.rs` or anything under `src/stages/K/` is
//! `stages::K`; `src/stages/mod.rs` is the contract `stages`), so stage kinds cannot reach
//! each other through the `stages` node; `src/lib.rs` is the node `crate` (`crate::Error`).
//! An edge is every path a file names, in a `use` or inline, that starts with `crate::`,
//! `super::`, `self::` or a child module the file declares (`mod x;`), resolved to the node
//! it lands in. Comments, string and character literals, `#[cfg(test)] mod … { … }` blocks
//! and `#[cfg(test)] mod …;` files are not looked at: tests may reach across layers.
//!
//! The rules:
//! 1. the node graph has no cycle (a strongly connected component of more than one node
//!    fails the test, listed with the references that close it);
//! 2. a stage kind (a `stages` module that implements `StageKind`) uses no other kind:
//!    what kinds share lives in `formats` and in the non-kind modules of `stages`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A source file: where it is, its module path (`["exec", "stage"]`) and its code with
/// comments, literals and test modules removed.
struct Source {
    rel: String,
    module: Vec<String>,
    code: String,
    /// `#[cfg(test)] mod NAME;` declared here.
    test_children: Vec<String>,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel.with_extension("").iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The code with comments, string literals and character literals blanked out (a literal
/// becomes `""`), so that only real paths remain.
fn strip(text: &str) -> String {
    let b = text.as_bytes();
    let mut out: Vec<u8> = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            i += rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
        } else if rest.starts_with(b"/*") {
            let mut depth = 0usize;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(b' ');
        } else if let Some(hashes) = raw_string_at(b, i) {
            // r"…", r#"…"#, br"…": ends at a quote followed by as many hashes.
            let mut j = i + 2 + hashes;
            while j < b.len() && !(b[j] == b'"' && b[j + 1..].iter().take(hashes).filter(|&&c| c == b'#').count() == hashes) {
                j += 1;
            }
            i = (j + 1 + hashes).min(b.len());
            out.extend_from_slice(b"\"\"");
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            i = (j + 1).min(b.len());
            out.extend_from_slice(b"\"\"");
        } else if b[i] == b'\'' {
            // A character literal ('x', '\n', 'é'), or a lifetime ('a), which stays.
            if b.get(i + 1) == Some(&b'\\') {
                // The escaped character takes at least one byte: the quote closing the
                // literal comes after it ('\'' is four bytes).
                let close = b.get(i + 3..).and_then(|r| r.iter().position(|&c| c == b'\'')).map_or(b.len(), |p| i + 3 + p);
                i = close + 1;
                out.extend_from_slice(b"' '");
            } else {
                let len = text[i + 1..].chars().next().map_or(1, char::len_utf8);
                if b.get(i + 1 + len) == Some(&b'\'') {
                    i += len + 2;
                    out.extend_from_slice(b"' '");
                } else {
                    out.push(b'\'');
                    i += 1;
                }
            }
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("only whole ASCII-delimited regions are removed")
}

/// The number of `#`s of a raw string literal starting at `i` (`r"`, `r#"`, `br"`), if one
/// does.
fn raw_string_at(b: &[u8], i: usize) -> Option<usize> {
    let starts_token = i == 0 || !is_ident(b[i - 1]) || (b[i - 1] == b'b' && (i < 2 || !is_ident(b[i - 2])));
    if b[i] != b'r' || !starts_token {
        return None;
    }
    let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
    (b.get(i + 1 + hashes) == Some(&b'"')).then_some(hashes)
}

/// Removes `#[cfg(test)] mod NAME { … }` blocks; returns the rest and the names of
/// `#[cfg(test)] mod NAME;` declarations.
fn drop_test_modules(code: &str) -> (String, Vec<String>) {
    const ATTR: &str = "#[cfg(test)]";
    let mut out = String::with_capacity(code.len());
    let mut files = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find(ATTR) {
        out.push_str(&rest[..at]);
        let after = &rest[at + ATTR.len()..];
        let mut item = after.trim_start();
        for vis in ["pub(crate) ", "pub(super) ", "pub "] {
            if let Some(r) = item.strip_prefix(vis) {
                item = r.trim_start();
                break;
            }
        }
        let Some(decl) = item.strip_prefix("mod ") else {
            // Another test-only item: kept (it is looked at like any code).
            out.push_str(ATTR);
            rest = after;
            continue;
        };
        let decl = decl.trim_start();
        let name_len = decl.bytes().take_while(|&c| is_ident(c)).count();
        let name = &decl[..name_len];
        let tail = decl[name_len..].trim_start();
        if let Some(r) = tail.strip_prefix(';') {
            files.push(name.to_string());
            rest = r;
        } else if let Some(body) = tail.strip_prefix('{') {
            let mut depth = 1usize;
            let mut end = body.len();
            for (k, c) in body.bytes().enumerate() {
                match c {
                    b'{' => depth += 1,
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = k + 1;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            rest = &body[end..];
        } else {
            out.push_str(ATTR);
            rest = after;
        }
    }
    out.push_str(rest);
    (out, files)
}

/// `mod NAME;` declarations: the file's child modules, which it may name without a prefix.
fn child_modules(code: &str) -> BTreeSet<String> {
    let mut children = BTreeSet::new();
    for statement in code.split([';', '{', '}']) {
        let mut s = statement.trim();
        // Attributes before the declaration (`#[path = …]`, `#[allow(…)]`).
        while s.starts_with("#[") {
            s = s.find(']').map_or("", |e| s[e + 1..].trim_start());
        }
        for vis in ["pub(crate) ", "pub(super) ", "pub "] {
            if let Some(r) = s.strip_prefix(vis) {
                s = r.trim_start();
                break;
            }
        }
        if let Some(name) = s.strip_prefix("mod ").map(str::trim)
            && !name.is_empty()
            && name.bytes().all(is_ident)
        {
            children.insert(name.to_string());
        }
    }
    children
}

/// Reads `ident(::ident)*` from `s`, stopping before a `{` group; returns the segments
/// and the rest of `s` from the group (`Some`) when there is one.
fn segments(s: &str) -> (Vec<String>, Option<&str>) {
    let mut out = Vec::new();
    let mut rest = s.trim_start();
    loop {
        if rest.starts_with('{') {
            return (out, Some(rest));
        }
        let len = rest.bytes().take_while(|&c| is_ident(c)).count();
        if len == 0 {
            return (out, None);
        }
        out.push(rest[..len].to_string());
        match rest[len..].strip_prefix("::") {
            Some(r) => rest = r,
            None => return (out, None),
        }
    }
}

/// The paths a `{ a::b, c::{d, e}, self }` group (starting at its `{`) names below `base`.
fn group_paths(base: &[String], group: &str, out: &mut Vec<Vec<String>>) {
    let mut depth = 0usize;
    let mut start = 1;
    for (k, c) in group.bytes().enumerate() {
        match c {
            b'{' => depth += 1,
            b'}' | b',' if depth == 1 => {
                item_paths(base, &group[start..k], out);
                start = k + 1;
                if c == b'}' {
                    return;
                }
            }
            b'}' => depth -= 1,
            _ => {}
        }
    }
}

fn item_paths(base: &[String], item: &str, out: &mut Vec<Vec<String>>) {
    let (segs, group) = segments(item);
    let mut path = base.to_vec();
    path.extend(segs.into_iter().filter(|s| s != "self"));
    match group {
        Some(g) => group_paths(&path, g, out),
        None if !item.trim().is_empty() => out.push(path),
        None => {}
    }
}

/// Every module path the code names, absolute (`["stages", "io", "write"]`).
fn references(code: &str, module: &[String], children: &BTreeSet<String>) -> Vec<Vec<String>> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        // A path starts at an identifier that does not continue one, a path (`a::b`) or a
        // method call (`.collect::<…>()`, where `collect` may also name a child module).
        let starts = is_ident(b[i])
            && !b[i].is_ascii_digit()
            && (i == 0 || (!is_ident(b[i - 1]) && b[i - 1] != b'.' && !(i >= 2 && &b[i - 2..i] == b"::")));
        if !starts {
            i += 1;
            continue;
        }
        let len = b[i..].iter().take_while(|&&c| is_ident(c)).count();
        let head = &code[i..i + len];
        let mut j = i + len;
        if !code[j..].starts_with("::") {
            i = j;
            continue;
        }
        let mut base: Vec<String> = match head {
            "crate" => Vec::new(),
            "self" => module.to_vec(),
            "super" => module[..module.len().saturating_sub(1)].to_vec(),
            child if children.contains(child) => {
                let mut m = module.to_vec();
                m.push(child.to_string());
                m
            }
            _ => {
                i = j;
                continue;
            }
        };
        j += 2;
        while code[j..].starts_with("super::") {
            base.pop();
            j += "super::".len();
        }
        let (segs, group) = segments(&code[j..]);
        base.extend(segs);
        match group {
            Some(g) => group_paths(&base, g, &mut out),
            None => out.push(base),
        }
        i = j;
    }
    out
}

/// The modules of `src/`, and the node every path lands in.
struct Nodes {
    top: BTreeSet<String>,
    stage_modules: BTreeSet<String>,
}

impl Nodes {
    fn of(&self, path: &[String]) -> String {
        match path {
            [first, second, ..] if first == "stages" && self.stage_modules.contains(second) => format!("stages::{second}"),
            [first, ..] if self.top.contains(first) => first.clone(),
            _ => "crate".to_string(),
        }
    }
}

fn sources() -> Vec<Source> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut sources: Vec<Source> = files
        .iter()
        .filter(|p| !p.ends_with("main.rs") || p.parent() != Some(src.as_path()))
        .map(|p| {
            let rel = p.strip_prefix(&src).expect("below src/");
            let text = std::fs::read_to_string(p).expect("source is UTF-8");
            let (code, test_children) = drop_test_modules(&strip(&text));
            Source { rel: format!("src/{}", rel.display()), module: module_of(rel), code, test_children }
        })
        .collect();
    let test_modules: Vec<Vec<String>> = sources
        .iter()
        .flat_map(|s| {
            s.test_children.iter().map(|c| {
                let mut m = s.module.clone();
                m.push(c.clone());
                m
            })
        })
        .collect();
    sources.retain(|s| !test_modules.iter().any(|t| s.module.starts_with(t)));
    sources
}

/// Tarjan's strongly connected components.
fn components(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(v: &'a str, st: &mut State<'a>) {
        let n = st.index.len();
        st.index.insert(v, n);
        st.low.insert(v, n);
        st.stack.push(v);
        st.on_stack.insert(v);
        let edges = st.edges;
        for w in edges.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !st.index.contains_key(w) {
                visit(w, st);
                let lw = st.low[w];
                let lv = st.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if st.on_stack.contains(w) {
                let iw = st.index[w];
                let lv = st.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if st.low[v] == st.index[v] {
            let mut component = Vec::new();
            while let Some(w) = st.stack.pop() {
                st.on_stack.remove(w);
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            component.sort();
            st.out.push(component);
        }
    }
    let mut st =
        State { edges, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), on_stack: BTreeSet::new(), out: Vec::new() };
    let nodes: BTreeSet<&str> = edges.iter().flat_map(|(k, vs)| std::iter::once(k.as_str()).chain(vs.iter().map(String::as_str))).collect();
    for v in nodes {
        if !st.index.contains_key(v) {
            visit(v, &mut st);
        }
    }
    st.out
}

#[test]
fn the_module_graph_has_no_cycle_and_stage_kinds_do_not_use_each_other() {
    let sources = sources();
    let top: BTreeSet<String> = sources.iter().filter_map(|s| s.module.first().cloned()).collect();
    let stage_modules: BTreeSet<String> =
        sources.iter().filter(|s| s.module.len() >= 2 && s.module[0] == "stages").map(|s| s.module[1].clone()).collect();
    let nodes = Nodes { top, stage_modules };
    assert!(nodes.top.contains("stages") && nodes.top.contains("exec"), "the source tree was not found: {:?}", nodes.top);
    let kinds: BTreeSet<String> = sources.iter().filter(|s| s.code.contains("impl StageKind for")).map(|s| nodes.of(&s.module)).collect();
    assert!(kinds.contains("stages::collect") && kinds.contains("stages::train"), "no stage kinds found: {kinds:?}");

    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // (from, to) → the first reference that makes the edge, for the message.
    let mut why: BTreeMap<(String, String), String> = BTreeMap::new();
    for s in &sources {
        let from = nodes.of(&s.module);
        let children = child_modules(&s.code);
        edges.entry(from.clone()).or_default();
        for path in references(&s.code, &s.module, &children) {
            let to = nodes.of(&path);
            if to != from {
                edges.entry(from.clone()).or_default().insert(to.clone());
                why.entry((from.clone(), to)).or_insert_with(|| format!("{} names crate::{}", s.rel, path.join("::")));
            }
        }
    }

    let mut problems = Vec::new();
    for component in components(&edges).into_iter().filter(|c| c.len() > 1) {
        let mut lines = vec![format!("import cycle between {}:", component.join(", "))];
        for a in &component {
            for b in edges[a].iter().filter(|b| component.contains(b)) {
                lines.push(format!("  {a} → {b}: {}", why[&(a.clone(), b.clone())]));
            }
        }
        problems.push(lines.join("\n"));
    }
    for (a, tos) in &edges {
        for b in tos.iter().filter(|b| kinds.contains(a) && kinds.contains(*b)) {
            problems.push(format!(
                "stage kind {a} uses stage kind {b} ({}): move what they share to `formats` or a non-kind module of `stages`",
                why[&(a.clone(), b.clone())]
            ));
        }
    }
    assert!(problems.is_empty(), "the layering is broken (see src/layering.rs):\n{}", problems.join("\n"));
}

#[test]
fn the_scanner_sees_paths_and_not_text() {
    let code = strip(
        "use crate::{a::B, c::{self, d::E}};\n// crate::commented\nlet s = \"crate::quoted\"; let c = '\"'; fn f<'a>(x: &'a super::up::T) { child::g(); }\n/* crate::block */",
    );
    let module: Vec<String> = vec!["m".into(), "n".into()];
    let children: BTreeSet<String> = ["child".to_string()].into();
    let found: Vec<String> = references(&code, &module, &children).iter().map(|p| p.join("::")).collect();
    assert!(references(&strip("let v = it.child::<Vec<_>>();"), &module, &children).is_empty());
    assert_eq!(found, ["a::B", "c", "c::d::E", "m::up::T", "m::n::child::g"]);
    let (kept, files) =
        drop_test_modules("fn a() {}\n#[cfg(test)]\nmod tests {\n fn b() { crate::x::y(); }\n}\n#[cfg(test)]\nmod more;\nfn c() {}\n");
    assert!(!kept.contains("crate::x") && kept.contains("fn c()"), "{kept}");
    assert_eq!(files, ["more"]);
    assert_eq!(
        child_modules("pub mod a;\nmod b;\n#[cfg(unix)]\nmod c;\npub(crate) mod d { }"),
        BTreeSet::from(["a", "b", "c", "d"].map(String::from))
    );
}
