//! The proxy's module graph, read from its sources: no two modules import
//! each other, directly or through others, and the folders keep to their
//! layers (`http/` knows nothing of the listeners or the identity;
//! `inbound/` and `outbound/` never import each other). A newcomer reads
//! the code top-down by these rules; this test keeps them true.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`http::body`; the crate root is empty) of each source file.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read src dir") {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let rel = p.strip_prefix(src).expect("under src");
            let mut parts: Vec<String> = rel
                .iter()
                .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_owned())
                .collect();
            if parts.last().map(String::as_str) == Some("mod") || parts == ["lib"] {
                parts.pop();
            }
            if parts == ["main"] {
                continue; // the binary, a crate of its own
            }
            out.insert(parts.join("::"), p);
        }
    }
    out
}

/// The code of a file without comments and without its test module (tests
/// may reach anywhere; the layering is about what ships).
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read source");
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path that follows `crate::` in `code`, braces expanded.
fn crate_paths(code: &str) -> Vec<Vec<String>> {
    let bytes = code.as_bytes();
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = code[at..].find("crate::") {
        let start = at + i;
        let ident_before = start > 0 && {
            let b = bytes[start - 1];
            b.is_ascii_alphanumeric() || b == b'_'
        };
        at = start + "crate::".len();
        if ident_before {
            continue;
        }
        at = read_path(code, at, Vec::new(), &mut out);
    }
    out
}

/// Reads `a::b::{c, d::e}` from `at`, appending each full path to `out`;
/// returns where it stopped.
fn read_path(code: &str, mut at: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let bytes = code.as_bytes();
    let mut path = prefix;
    loop {
        while at < bytes.len() && bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        if at < bytes.len() && bytes[at] == b'{' {
            at += 1;
            loop {
                at = read_path(code, at, path.clone(), out);
                while at < bytes.len() && (bytes[at].is_ascii_whitespace() || bytes[at] == b',') {
                    at += 1;
                }
                if at >= bytes.len() || bytes[at] == b'}' {
                    return at + 1;
                }
            }
        }
        let s = at;
        while at < bytes.len() && (bytes[at].is_ascii_alphanumeric() || bytes[at] == b'_') {
            at += 1;
        }
        if s == at {
            break;
        }
        path.push(code[s..at].to_owned());
        if code[at..].starts_with("::") {
            at += 2;
        } else {
            break;
        }
    }
    if !path.is_empty() {
        out.push(path);
    }
    at
}

/// The module a path names or names an item of: its longest prefix that is
/// a module (the crate root when none is).
fn resolve(path: &[String], mods: &BTreeMap<String, PathBuf>) -> String {
    for n in (1..=path.len()).rev() {
        let m = path[..n].join("::");
        if mods.contains_key(&m) {
            return m;
        }
    }
    String::new()
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    graph_of(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

/// The import graph of the crate whose sources are in `src`.
fn graph_of(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules(src);
    let mut g = BTreeMap::new();
    for (m, path) in &mods {
        let deps: BTreeSet<String> = crate_paths(&code(path))
            .iter()
            .map(|p| resolve(p, &mods))
            .filter(|d| d != m)
            .collect();
        g.insert(m.clone(), deps);
    }
    g
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on.insert(v);
        for w in s.g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(w);
                comp.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[test]
fn no_two_modules_import_each_other() {
    let g = graph();
    assert!(g.len() > 20, "found only {} modules", g.len());
    let found = cycles(&g);
    let show: Vec<String> = found
        .iter()
        .map(|c| {
            let edges: Vec<String> = c
                .iter()
                .flat_map(|m| {
                    g[m].iter()
                        .filter(|d| c.contains(d))
                        .map(move |d| format!("{m} -> {d}"))
                })
                .collect();
            edges.join(", ")
        })
        .collect();
    assert!(found.is_empty(), "import cycles: {show:#?}");
}

/// The same rule for the workspace's other library crates.
#[test]
fn no_two_modules_of_the_other_crates_import_each_other() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for krate in ["identity", "ca-tool", "stepup"] {
        let g = graph_of(&root.join(krate).join("src"));
        assert!(g.len() > 5, "{krate}: found only {} modules", g.len());
        let found = cycles(&g);
        assert!(found.is_empty(), "{krate}: import cycles among {found:?}");
    }
}

#[test]
fn the_folders_keep_to_their_layers() {
    let g = graph();
    let under = |m: &str, top: &str| m == top || m.starts_with(&format!("{top}::"));
    let mut wrong = Vec::new();
    for (m, deps) in &g {
        for d in deps {
            let bad = (under(m, "http")
                && [
                    "inbound",
                    "outbound",
                    "identity",
                    "admin",
                    "run",
                    "quickstart",
                ]
                .iter()
                .any(|t| under(d, t)))
                || (under(m, "inbound") && under(d, "outbound"))
                || (under(m, "outbound") && under(d, "inbound"))
                || (["metrics", "config", "error"].contains(&m.as_str())
                    && !(d.is_empty() || under(d, "http") || d == "error" || d == "files"))
                || (!m.is_empty() && d.is_empty());
            if bad {
                wrong.push(format!(
                    "{m} -> {}",
                    if d.is_empty() { "crate root" } else { d }
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layering: {wrong:#?}");
}

#[test]
fn the_reader_of_paths_expands_groups() {
    let paths = crate_paths("use crate::a::{b, c::{d, E}};\nlet x = crate::f::g(); notcrate::h");
    let joined: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
    assert_eq!(joined, ["a::b", "a::c::d", "a::c::E", "f::g"]);
}

/// The names of `keyproof_proxy` items that `layout/hot-functions.txt`
/// mentions: each symbol's module path and the item in it. Legacy Rust
/// mangling: `_ZN14keyproof_proxy4http4body...E` for a function, and
/// `keyproof_proxy..http..body..ProxyBody` inside `$LT$...$GT$` for a type
/// in an impl or a generic argument.
fn hot_list_items() -> Vec<(Vec<String>, String)> {
    let list = Path::new(env!("CARGO_MANIFEST_DIR")).join("layout/hot-functions.txt");
    let text = std::fs::read_to_string(list).expect("read hot-functions.txt");
    let mut out = Vec::new();
    for sym in text.lines() {
        if let Some(rest) = sym.strip_prefix("_ZN14keyproof_proxy") {
            let mut segs = Vec::new();
            let mut s = rest;
            while let Some(n) = s.find(|c: char| !c.is_ascii_digit()).filter(|&n| n > 0) {
                let Ok(len) = s[..n].parse::<usize>() else {
                    break;
                };
                let Some(seg) = s.get(n..n + len) else { break };
                segs.push(seg.to_owned());
                s = &s[n + len..];
            }
            // The last segment is the hash. What follows a closure or an
            // impl block (`{{closure}}`, `_<impl ...>`, derive output) is
            // named by the code around it, so the path stops there; generic
            // parameters (`Foo$LT$B$GT$`) are not part of the name.
            segs.pop();
            if let Some(cut) = segs
                .iter()
                .position(|s| s.starts_with('_') || s.starts_with('{'))
            {
                segs.truncate(cut);
            }
            for seg in &mut segs {
                if let Some(i) = seg.find('$') {
                    seg.truncate(i);
                }
            }
            if let Some(item) = segs.pop() {
                out.push((segs, item));
            }
        }
        let mut s = sym;
        while let Some(i) = s.find("keyproof_proxy..") {
            let run: String = s[i + "keyproof_proxy..".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.')
                .collect();
            s = &s[i + 1..];
            let mut segs: Vec<String> = run.split("..").map(str::to_owned).collect();
            if let Some(item) = segs.pop() {
                out.push((segs, item));
            }
        }
    }
    out
}

/// `layout/hot-functions.txt` orders the release binary's hot code (see
/// `layout/README.md`); the linker skips names it does not find, so a
/// module moved or a function renamed silently loses that locality. Every
/// `keyproof_proxy` item the list names must still exist where it says.
/// After a failure here: `proxy/layout/profile.sh` regenerates the list.
#[test]
fn the_hot_function_list_names_items_that_exist() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mods = modules(&src);
    let items = hot_list_items();
    assert!(
        items.len() > 50,
        "only {} keyproof_proxy items in the list",
        items.len()
    );
    let words = |file: &Path| -> BTreeSet<String> {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map(str::to_owned)
            .collect()
    };
    let mut stale = BTreeSet::new();
    for (path, item) in &items {
        let mut full = path.clone();
        full.push(item.clone());
        // The longest prefix that is a module; the segment after it (a
        // type, trait or function) must be declared in that module's file.
        // The crate root is lib.rs and, for the binary, main.rs.
        let n = (0..=full.len())
            .rev()
            .find(|&n| mods.contains_key(&full[..n].join("::")))
            .unwrap_or(0);
        let Some(name) = full.get(n) else { continue };
        let module = full[..n].join("::");
        let mut known = words(&mods[&module]);
        if module.is_empty() {
            known.extend(words(&src.join("main.rs")));
        }
        if !known.contains(name) {
            stale.insert(full.join("::"));
        }
    }
    assert!(
        stale.is_empty(),
        "layout/hot-functions.txt names items that no longer exist there \
         (regenerate it with proxy/layout/profile.sh): {stale:#?}"
    );
}
