//! Checks of the code's layout that `cargo xtask test` runs first: no import cycle between
//! the modules of a crate (ARCHITECTURE.md's invariant).
//!
//! A module is a file (`src/a/b.rs` or `src/a/b/mod.rs` is `a::b`). It imports another
//! when its code, tests left out, names a path into it (`crate::`, `super::`, `self::`,
//! `use` trees with braces expanded). A module naming one of its ancestors is not an
//! edge: a parent declares its children, so they may use what it holds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Module = Vec<String>;

/// The crates whose `src/` is checked.
const CRATES: &[&str] = &["schema", "coordinator", "worker", "experiments", "cli", "xtask"];

/// Fails naming every cycle found, each as its modules in order.
pub fn check_cycles(root: &Path) -> Result<(), String> {
    let mut found = Vec::new();
    for name in CRATES {
        let src = root.join(name).join("src");
        let modules = modules(&src);
        let graph = imports(&modules);
        for cycle in cycles(&graph) {
            found.push(format!(
                "{name}: {}",
                cycle.iter().map(show).collect::<Vec<_>>().join(" -> ")
            ));
        }
    }
    if found.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "import cycles between modules (ARCHITECTURE.md: there are none); move what both need into one \
             of them or a third module:\n  {}",
            found.join("\n  ")
        ))
    }
}

fn show(m: &Module) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// Every module of a crate's library or binary root, with its source (tests cut).
fn modules(src: &Path) -> BTreeMap<Module, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let relative = path.strip_prefix(src).unwrap_or(&path);
            if relative.starts_with("bin") {
                continue; // each binary is a crate of its own file
            }
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                if let (Some(module), Ok(text)) = (module_of(relative), std::fs::read_to_string(&path)) {
                    out.insert(module, strip(&text));
                }
            }
        }
    }
    out
}

fn module_of(relative: &Path) -> Option<Module> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    match parts.last().map(String::as_str) {
        Some("lib" | "main") if parts.len() == 1 => parts.clear(),
        Some("mod") => {
            parts.pop();
        }
        Some("tests") if parts.len() > 1 => return None, // a module's `tests.rs`
        _ => {}
    }
    Some(parts)
}

/// The source without comments and without `#[cfg(test)]` items.
fn strip(text: &str) -> String {
    let code: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = String::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        // The item ends at its `;` or at the brace closing its first `{`.
        let end = match (after.find(';'), after.find('{')) {
            (Some(semi), Some(open)) if semi < open => semi + 1,
            (_, Some(open)) => {
                let mut depth = 0usize;
                let mut end = after.len();
                for (i, c) in after[open..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = open + i + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (Some(semi), None) => semi + 1,
            (None, None) => after.len(),
        };
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// Each module's imports of other modules, ancestors left out.
fn imports(modules: &BTreeMap<Module, String>) -> BTreeMap<Module, BTreeSet<Module>> {
    let mut graph = BTreeMap::new();
    for (module, text) in modules {
        let mut targets = BTreeSet::new();
        for path in paths(text) {
            let Some(absolute) = resolve(module, &path) else {
                continue;
            };
            // The longest prefix that is a module.
            let target = (0..=absolute.len())
                .rev()
                .map(|n| absolute[..n].to_vec())
                .find(|p| modules.contains_key(p));
            if let Some(target) = target {
                let ancestor = module.starts_with(&target);
                if !ancestor {
                    targets.insert(target);
                }
            }
        }
        graph.insert(module.clone(), targets);
    }
    graph
}

/// A path as written (`crate::a::b`, `super::c`) made absolute from `module`.
fn resolve(module: &Module, path: &[String]) -> Option<Module> {
    let mut base: Module = match path.first()?.as_str() {
        "crate" => Vec::new(),
        "self" | "super" => module.clone(),
        _ => return None,
    };
    let mut rest = &path[1..];
    if path[0] == "super" {
        base.pop()?;
    }
    while rest.first().is_some_and(|s| s == "super") {
        base.pop()?;
        rest = &rest[1..];
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

/// Every path starting with `crate`, `super` or `self` in the code, `use` trees expanded.
fn paths(text: &str) -> Vec<Vec<String>> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let boundary = i == 0 || !(chars[i - 1].is_alphanumeric() || chars[i - 1] == '_' || chars[i - 1] == ':');
        if boundary {
            for head in ["crate::", "super::", "self::"] {
                if chars[i..].iter().take(head.len()).copied().eq(head.chars()) {
                    let (trees, end) = tree(&chars, i);
                    out.extend(trees);
                    i = end;
                    break;
                }
            }
        }
        i += 1;
    }
    out
}

/// The paths of one use tree starting at `i` (`a::b::{c, d::e}`), and where it ends.
fn tree(chars: &[char], mut i: usize) -> (Vec<Vec<String>>, usize) {
    let mut prefix = Vec::new();
    loop {
        let start = i;
        while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
            i += 1;
        }
        if i > start {
            prefix.push(chars[start..i].iter().collect::<String>());
        }
        if chars.get(i) == Some(&':') && chars.get(i + 1) == Some(&':') {
            i += 2;
            if chars.get(i) == Some(&'{') {
                let mut out = Vec::new();
                i += 1;
                loop {
                    while chars.get(i).is_some_and(|c| c.is_whitespace() || *c == ',') {
                        i += 1;
                    }
                    match chars.get(i) {
                        None => return (out, i),
                        Some('}') => return (out, i + 1),
                        _ => {}
                    }
                    let (inner, end) = tree(chars, i);
                    for p in inner {
                        let mut full = prefix.clone();
                        if p.first().is_some_and(|s| s == "self") {
                            full.extend(p.into_iter().skip(1));
                        } else {
                            full.extend(p);
                        }
                        out.push(full);
                    }
                    if end == i {
                        i += 1; // not a path: step over it
                    } else {
                        i = end;
                    }
                }
            }
        } else {
            return (vec![prefix], i);
        }
    }
}

/// The strongly connected components of more than one module (Tarjan), each in order.
fn cycles(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct State<'a> {
        graph: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        found: Vec<Vec<Module>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Module) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flatten() {
            let Some((w, _)) = s.graph.get_key_value(w) else {
                continue;
            };
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(path: &str) -> Module {
        path.split("::").filter(|s| !s.is_empty()).map(String::from).collect()
    }

    #[test]
    fn use_trees_expand_and_resolve() {
        let found = paths("use crate::{a::X, b::{self, c::Y}};\nfn f() { super::d::g(); my_crate::z(); }");
        assert_eq!(
            found,
            vec![
                vec!["crate", "a", "X"],
                vec!["crate", "b"],
                vec!["crate", "b", "c", "Y"],
                vec!["super", "d", "g"]
            ]
        );
        assert_eq!(resolve(&m("x::y"), &found[3]), Some(m("x::d::g")));
    }

    #[test]
    fn a_cycle_is_found_and_an_ancestor_is_not_one() {
        let mut modules = BTreeMap::new();
        modules.insert(m(""), "mod a; mod b; pub use a::A;".to_string());
        modules.insert(m("a"), "use crate::b::B; use super::Error;".to_string());
        modules.insert(m("b"), "use crate::Error;".to_string());
        modules.insert(m("b::c"), "use super::B;".to_string());
        assert!(cycles(&imports(&modules)).is_empty());
        modules.insert(m("b"), "use crate::a::A;".to_string());
        assert_eq!(cycles(&imports(&modules)), vec![vec![m("a"), m("b")]]);
        // Tests may use anything: they are cut before the graph is drawn.
        let text =
            strip("use crate::x;\n#[cfg(test)]\nmod tests {\n use crate::y; { }\n}\nuse crate::z; // crate::w\n");
        assert_eq!(paths(&text), vec![vec!["crate", "x"], vec!["crate", "z"]]);
    }
}
