//! The import map of `src/` held against the floors of `docs/architecture.md`: no files that
//! import each other in a loop, no import that runs up a floor, no file the map leaves out.
//! A file imports what its `use` trees and its `crate::…` / `super::…` paths name, except that
//! a module's own submodules are contained in it, not imported by it (a `mod.rs` declaring,
//! re-exporting or registering its children); test code (`tests.rs`, `*_tests.rs`,
//! `test_*.rs`, `#[cfg(test)]` items) is left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Source text with comments, string and char literals blanked, so only code is read.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == b'r' && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#')) {
            // Raw string: r"…", r#"…"#, …
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c as char);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == b'"'
                    && b[j + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|&&h| h == b'#')
                        .count()
                        == hashes
                {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{7f}'), not a lifetime ('a).
            let close = if b.get(i + 1) == Some(&b'\\') {
                b[i + 2..]
                    .iter()
                    .position(|&x| x == b'\'')
                    .map(|p| i + 2 + p)
            } else {
                src[i + 1..]
                    .chars()
                    .next()
                    .map(|ch| i + 1 + ch.len_utf8())
                    .filter(|&end| b.get(end) == Some(&b'\''))
            };
            match close {
                Some(end) => {
                    out.push_str("' '");
                    i = end + 1;
                }
                None => {
                    out.push('\'');
                    i += 1;
                }
            }
        } else {
            let ch = src[i..].chars().next().unwrap_or(' ');
            out.push(ch);
            i += ch.len_utf8();
        }
    }
    out
}

/// Drops every item marked `#[cfg(test)]`: a `mod tests { … }`, a `use`, a function.
fn without_test_items(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at + "#[cfg(test)]".len()..];
        let b = after.as_bytes();
        // The item ends at the `;` (or, for a field, the `,`) before any `{`, at the `}`
        // matching its first `{`, or where the block around it closes.
        let mut end = after.len();
        let mut depth = 0usize;
        for (i, &c) in b.iter().enumerate() {
            match c {
                b'{' => depth += 1,
                b'}' if depth == 0 => {
                    end = i;
                    break;
                }
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i + 1;
                        break;
                    }
                }
                b';' | b',' if depth == 0 => {
                    end = i + 1;
                    break;
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

fn is_test_file(rel: &str) -> bool {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    name == "tests.rs" || name.ends_with("_tests.rs") || name.starts_with("test_")
}

/// The module path of a file: `pipeline/process.rs` → `[pipeline, process]`.
fn module_of(rel: &str) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_owned)
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// Every path a `use` tree names: `a::{b, c::{d, e as f}}` → `a::b`, `a::c::d`, `a::c::e`.
fn use_paths(tree: &str) -> Vec<Vec<String>> {
    fn walk(tokens: &[String], i: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
        let mut path = prefix.to_vec();
        while *i < tokens.len() {
            let t = tokens[*i].as_str();
            *i += 1;
            match t {
                "::" => {}
                "{" => {
                    loop {
                        walk(tokens, i, &path, out);
                        match tokens.get(*i).map(String::as_str) {
                            Some(",") => *i += 1,
                            Some("}") => {
                                *i += 1;
                                break;
                            }
                            _ => break,
                        }
                    }
                    return;
                }
                "," | "}" => {
                    *i -= 1;
                    break;
                }
                "as" => {
                    *i += 1;
                }
                "*" => {}
                "self" if !path.is_empty() => {}
                word => path.push(word.to_owned()),
            }
        }
        if path.len() > prefix.len() || !prefix.is_empty() {
            out.push(path);
        }
    }
    let mut tokens = Vec::new();
    let mut word = String::new();
    let mut chars = tree.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_alphanumeric() || c == '_' {
            word.push(c);
            continue;
        }
        if !word.is_empty() {
            tokens.push(std::mem::take(&mut word));
        }
        match c {
            ':' if chars.peek() == Some(&':') => {
                chars.next();
                tokens.push("::".into());
            }
            '{' | '}' | ',' | '*' => tokens.push(c.to_string()),
            _ => {}
        }
    }
    if !word.is_empty() {
        tokens.push(word);
    }
    let mut out = Vec::new();
    let mut i = 0;
    walk(&tokens, &mut i, &[], &mut out);
    out
}

/// The files each file of `files` (relative path → source) imports, among `files`.
fn import_graph(files: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeMap<Vec<String>, String> = files
        .keys()
        .map(|rel| (module_of(rel), rel.clone()))
        .collect();
    let resolve = |path: &[String]| -> Option<String> {
        (1..=path.len())
            .rev()
            .find_map(|n| modules.get(&path[..n]).cloned())
    };
    let use_re = regex::Regex::new(r"(?s)\buse\s+([^;]+);").unwrap();
    let path_re = regex::Regex::new(r"\b(?:crate|super)(?:::\w+)+").unwrap();
    let mut graph = BTreeMap::new();
    for (rel, src) in files {
        let me = module_of(rel);
        let code = without_test_items(&code_only(src));
        let mut paths: Vec<Vec<String>> = Vec::new();
        for m in use_re.captures_iter(&code) {
            paths.extend(use_paths(&m[1]));
        }
        for m in path_re.find_iter(&code) {
            paths.push(m.as_str().split("::").map(str::to_owned).collect());
        }
        let mut targets = BTreeSet::new();
        for p in paths {
            let mut base = me.clone();
            let mut rest: &[String] = &p;
            match rest.first().map(String::as_str) {
                Some("crate") => {
                    base.clear();
                    rest = &rest[1..];
                }
                Some("super") => {
                    while rest.first().map(String::as_str) == Some("super") {
                        base.pop();
                        rest = &rest[1..];
                    }
                }
                Some("self") => rest = &rest[1..],
                // A child module named without `self::` (`use writer::Op;` in a mod.rs).
                Some(first)
                    if modules.contains_key(&[me.clone(), vec![first.to_owned()]].concat()) => {}
                _ => continue,
            }
            let full: Vec<String> = base.iter().chain(rest).cloned().collect();
            if let Some(target) = resolve(&full) {
                // A module's face (its mod.rs) declaring, re-exporting and registering its own
                // submodules is containment, not an import: only the other direction counts.
                let own_child = target != *rel && module_of(&target).starts_with(&me);
                if &target != rel && !full.is_empty() && !own_child {
                    targets.insert(target);
                }
            }
        }
        graph.insert(rel.clone(), targets);
    }
    graph
}

/// Files in loops of imports (Tarjan's strongly connected components of more than one file).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on.insert(v);
        let graph = s.graph;
        for w in graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
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
                s.found.push(comp);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found
}

/// The floors of the map: `N: item item…`; an item ending in `/` is a folder.
fn floors(doc: &str) -> Vec<(String, u32)> {
    let block = doc
        .split("```floors")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("docs/architecture.md has a ```floors block");
    let mut out = Vec::new();
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let (n, items) = line.split_once(':').expect("a floor line is `N: items`");
        let n: u32 = n.trim().parse().expect("a floor number");
        out.extend(items.split_whitespace().map(|i| (i.to_owned(), n)));
    }
    out
}

/// The floor of a file: the longest listed path that is it or a folder holding it.
fn floor_of(rel: &str, floors: &[(String, u32)]) -> Option<u32> {
    floors
        .iter()
        .filter(|(item, _)| {
            if item.ends_with('/') {
                rel.starts_with(item.as_str())
            } else {
                rel == item
            }
        })
        .max_by_key(|(item, _)| item.len())
        .map(|(_, n)| *n)
}

/// Every problem of `files` against `floors`, in words.
fn problems(files: &BTreeMap<String, String>, floors: &[(String, u32)]) -> Vec<String> {
    let graph = import_graph(files);
    let mut out = Vec::new();
    for rel in files.keys() {
        if floor_of(rel, floors).is_none() {
            out.push(format!("src/{rel} is under no module of the map"));
        }
    }
    for (from, targets) in &graph {
        for to in targets {
            if let (Some(a), Some(b)) = (floor_of(from, floors), floor_of(to, floors)) {
                if b > a {
                    out.push(format!(
                        "src/{from} (floor {a}) imports src/{to} (floor {b}): an import runs up"
                    ));
                }
            }
        }
    }
    for c in cycles(&graph) {
        out.push(format!(
            "these files import each other in a loop: {}",
            c.join(", ")
        ));
    }
    out
}

fn source_tree() -> BTreeMap<String, String> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                walk(&p, root, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                let rel = p
                    .strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                if !is_test_file(&rel) {
                    out.insert(rel, std::fs::read_to_string(&p).unwrap());
                }
            }
        }
    }
    let root = Path::new(ROOT).join("src");
    let mut out = BTreeMap::new();
    walk(&root, &root, &mut out);
    out
}

#[test]
fn the_import_map_keeps_the_floors_of_docs_architecture() {
    let files = source_tree();
    let doc = std::fs::read_to_string(Path::new(ROOT).join("docs/architecture.md")).unwrap();
    let floors = floors(&doc);
    // The reader sees the imports it should: a check that parses nothing passes anything.
    let graph = import_graph(&files);
    for (from, to) in [
        ("ingress/mod.rs", "pipeline/mod.rs"),
        ("pipeline/process.rs", "identity/mod.rs"),
        ("outbox/delivery/mod.rs", "trace/mod.rs"),
        (
            "outbox/store/embedded/writer.rs",
            "outbox/store/embedded/syncer.rs",
        ),
        ("config/mod.rs", "tags/mod.rs"),
    ] {
        assert!(
            graph[from].contains(to),
            "the reader missed src/{from} -> src/{to}; it read {:?}",
            graph[from]
        );
    }
    let found = problems(&files, &floors);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

#[test]
fn the_check_finds_a_loop_an_upward_import_and_a_stray_file() {
    let files: BTreeMap<String, String> = [
        ("lib.rs", "pub mod low; pub mod high; pub mod stray;"),
        // `low` reaches up to `high`, which imports `low`: a loop and an upward import.
        ("low.rs", "use crate::high::Thing; // use crate::stray::X;\nconst S: &str = \"crate::stray::Y\";"),
        ("high/mod.rs", "mod part;\nuse part::Piece;\nuse crate::low::f;\npub struct Thing;\n#[cfg(test)]\nmod tests { use crate::stray::Z; }"),
        ("high/part.rs", "use super::super::low::f;\npub struct Piece;"),
        ("stray.rs", ""),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    let floors = floors("```floors\n3: lib.rs\n2: high/\n1: low.rs\n```");
    let graph = import_graph(&files);
    assert_eq!(
        graph["low.rs"].iter().collect::<Vec<_>>(),
        ["high/mod.rs"],
        "comments, strings and test items are not imports"
    );
    assert_eq!(
        graph["high/mod.rs"].iter().collect::<Vec<_>>(),
        ["low.rs"],
        "a module's own parts are contained, not imported"
    );
    assert!(graph["high/part.rs"].contains("low.rs"));
    let found = problems(&files, &floors);
    assert!(
        found
            .iter()
            .any(|p| p.contains("src/low.rs (floor 1) imports src/high/mod.rs (floor 2)")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|p| p.contains("in a loop") && p.contains("low.rs") && p.contains("high/mod.rs")),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|p| p.contains("src/stray.rs is under no module")),
        "{found:?}"
    );
}
