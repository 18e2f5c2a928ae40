//! The layering of `src/`, checked by reading the source (in the spirit of ArchUnit).
//!
//! txgate is one crate, so the compiler does not stop a module from importing one above it.
//! This test does: it reads every `.rs` file under `src/`, collects the `crate::<module>`
//! references of production code (a file's `#[cfg(test)]` tail and `tests` submodules are left
//! out) and checks the rules of DESIGN.md's "Layers":
//!
//! - no circle between top-level modules;
//! - `config` is data: it imports none of the runtime pieces or front doors;
//! - `exchange`, `inbound` and `cache` import no front door (`admission`, `proxy`, `server`);
//! - nothing in production imports `dev` (the development STS, echo backend and demo); only
//!   `main.rs` does;
//! - the two front doors stand side by side: `proxy` does not import `ext_authz` nor the other
//!   way round, and `ext_authz` does not use pingora at all (it proves the request-path stages
//!   do not need it).
//!
//! The checker itself is tested on made-up graphs, so a rule that could never fail is caught.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules it refers to.
type Graph = BTreeMap<String, BTreeSet<String>>;

/// Modules that hold configuration as data.
const CONFIG: &[&str] = &["config"];
/// Runtime pieces below the front doors.
const RUNTIME: &[&str] = &["exchange", "inbound", "cache"];
/// Front doors and what sits on top of them.
const FRONT_DOORS: &[&str] = &[
    "admission",
    "proxy",
    "ext_authz",
    "server",
    "admin",
    "state",
];
/// The front doors that must not import each other.
const SIDE_BY_SIDE: &[&str] = &["proxy", "ext_authz"];
/// The front door that must not use pingora.
const PINGORA_FREE: &str = "ext_authz";
/// The development tools.
const DEV: &str = "dev";

/// The top-level module a file under `src/` belongs to: `src/config/file.rs` → `config`;
/// `src/lib.rs` and `src/main.rs` → `None` (the crate root and the binary).
fn top_module(relative: &Path) -> Option<String> {
    let mut parts = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy());
    let first = parts.next()?.to_string();
    match first.as_str() {
        "lib.rs" | "main.rs" => None,
        name => Some(name.trim_end_matches(".rs").to_string()),
    }
}

/// The production code of a file: without comments (a doc link to another module is no
/// import) and without the items marked `#[cfg(test)]` (each up to its closing brace or
/// semicolon), wherever they stand in the file.
fn production(text: &str) -> String {
    let code = text
        .lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = String::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at..];
        // The item ends at the `;` of `mod tests;` or at the brace closing its body.
        let end = match (item.find(';'), item.find('{')) {
            (Some(semi), Some(open)) if semi < open => semi + 1,
            (_, Some(open)) => {
                let mut depth = 0;
                let mut end = item.len();
                for (i, c) in item[open..].char_indices() {
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
            (None, None) => item.len(),
        };
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// Every top-level module named after `crate::` in `code`, grouped imports included
/// (`use crate::{a::B, c};`).
fn referenced(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            // A group: each top-level item up to the matching brace.
            let mut depth = 1;
            let mut item = String::new();
            let mut at_item_start = true;
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => {
                        at_item_start = true;
                        continue;
                    }
                    _ => {}
                }
                if depth == 1 && at_item_start {
                    if c.is_alphanumeric() || c == '_' {
                        item.push(c);
                    } else if !item.is_empty() {
                        found.insert(std::mem::take(&mut item));
                        at_item_start = false;
                    }
                }
            }
            if !item.is_empty() {
                found.insert(item);
            }
        } else {
            let name: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
        rest = after;
    }
    found
}

/// The module graph of the crate under `src`. `main` is the binary's node.
fn graph_of(src: &Path) -> Graph {
    let mut graph = Graph::new();
    let mut stack = vec![src.to_path_buf()];
    let mut modules = BTreeSet::new();
    let mut files = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("src/ is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    for file in &files {
        let relative = file.strip_prefix(src).expect("under src/");
        if let Some(module) = top_module(relative) {
            modules.insert(module);
        }
    }
    for file in files {
        let relative = file.strip_prefix(src).expect("under src/");
        // Test-only submodules (`foo/tests.rs`) are not production code.
        if relative.file_stem().is_some_and(|s| s == "tests") {
            continue;
        }
        let node = match top_module(relative) {
            Some(module) => module,
            None if relative == Path::new("main.rs") => "main".to_string(),
            None => continue,
        };
        let text = std::fs::read_to_string(&file).expect("a readable source file");
        let mut code = production(&text);
        if node == "main" {
            // The binary names the library as `txgate::`, not `crate::`.
            code = code.replace("txgate::", "crate::");
        }
        let edges = graph.entry(node.clone()).or_default();
        for target in referenced(&code) {
            if target != node && modules.contains(&target) {
                edges.insert(target);
            }
        }
    }
    graph
}

/// Every rule violation of `graph`, one line each.
fn violations(graph: &Graph) -> Vec<String> {
    let mut found = Vec::new();
    for circle in circles(graph) {
        found.push(format!("import circle: {}", circle.join(" → ")));
    }
    let edges = |from: &str| graph.get(from).into_iter().flatten();
    for from in CONFIG {
        for to in edges(from) {
            if RUNTIME.contains(&to.as_str()) || FRONT_DOORS.contains(&to.as_str()) || to == DEV {
                found.push(format!("{from} is data but imports {to}"));
            }
        }
    }
    for from in RUNTIME {
        for to in edges(from) {
            if FRONT_DOORS.contains(&to.as_str()) || to == DEV {
                found.push(format!("{from} is below the front doors but imports {to}"));
            }
        }
    }
    for from in SIDE_BY_SIDE {
        for to in edges(from) {
            if SIDE_BY_SIDE.contains(&to.as_str()) {
                found.push(format!(
                    "{from} is a front door but imports the front door {to}"
                ));
            }
        }
    }
    for (from, tos) in graph {
        if from != "main" && from != DEV && tos.contains(DEV) {
            found.push(format!("{from} is production code but imports {DEV}"));
        }
    }
    found
}

/// The strongly connected components of more than one module, each as a closed path.
fn circles(graph: &Graph) -> Vec<Vec<String>> {
    let nodes: BTreeSet<&String> = graph.keys().chain(graph.values().flatten()).collect();
    let reaches = |from: &String, to: &String| -> bool {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from];
        while let Some(node) = stack.pop() {
            for next in graph.get(node).into_iter().flatten() {
                if next == to {
                    return true;
                }
                if seen.insert(next) {
                    stack.push(next);
                }
            }
        }
        false
    };
    let mut done: BTreeSet<&String> = BTreeSet::new();
    let mut found = Vec::new();
    for node in &nodes {
        if done.contains(node) {
            continue;
        }
        let mut component: Vec<String> = nodes
            .iter()
            .filter(|other| *other == node || (reaches(node, other) && reaches(other, node)))
            .map(|n| n.to_string())
            .collect();
        for member in &component {
            done.insert(
                nodes
                    .iter()
                    .find(|n| **n == member)
                    .copied()
                    .unwrap_or(node),
            );
        }
        if component.len() > 1 || reaches(node, node) {
            component.push(component[0].clone());
            found.push(component);
        }
    }
    found
}

/// The production code of every file of the top-level module `module` under `src`, by path.
fn module_code(src: &Path, module: &str) -> Vec<(String, String)> {
    let mut files = vec![src.join(format!("{module}.rs"))];
    let mut stack = vec![src.join(module)];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs")
                && path.file_stem().is_none_or(|s| s != "tests")
            {
                files.push(path);
            }
        }
    }
    files
        .into_iter()
        .filter(|f| f.exists())
        .map(|f| {
            let text = std::fs::read_to_string(&f).expect("a readable source file");
            (f.display().to_string(), production(&text))
        })
        .collect()
}

/// The files of `code` that name pingora (its crates are `pingora` and `pingora_*`).
fn naming_pingora(code: &[(String, String)]) -> Vec<String> {
    code.iter()
        .filter(|(_, text)| {
            text.match_indices("pingora").any(|(at, _)| {
                let before = text[..at].chars().next_back();
                let after = text[at + "pingora".len()..].chars().next();
                !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
                    && matches!(after, Some(':') | Some('_'))
            })
        })
        .map(|(file, _)| format!("{file} uses pingora"))
        .collect()
}

#[test]
fn the_layers_hold() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph_of(&src);
    assert!(
        graph.contains_key("config") && graph.contains_key("proxy"),
        "the source was not read: {graph:?}"
    );
    let mut found = violations(&graph);
    let code = module_code(&src, PINGORA_FREE);
    assert!(!code.is_empty(), "src/{PINGORA_FREE}.rs was not read");
    found.extend(naming_pingora(&code));
    assert!(found.is_empty(), "layering violations: {found:#?}");
}

fn graph(edges: &[(&str, &str)]) -> Graph {
    let mut graph = Graph::new();
    for (from, to) in edges {
        graph
            .entry(from.to_string())
            .or_default()
            .insert(to.to_string());
        graph.entry(to.to_string()).or_default();
    }
    graph
}

#[test]
fn the_checker_finds_what_it_is_for() {
    let good = graph(&[
        ("proxy", "admission"),
        ("admission", "exchange"),
        ("exchange", "config"),
        ("main", "dev"),
        ("dev", "config"),
    ]);
    assert_eq!(violations(&good), Vec::<String>::new());
    let circle = graph(&[
        ("exchange", "config"),
        ("config", "tls"),
        ("tls", "exchange"),
    ]);
    let found = violations(&circle);
    assert!(
        found.iter().any(|v| v.starts_with("import circle:")),
        "{found:?}"
    );
    let upward = graph(&[
        ("config", "exchange"),
        ("inbound", "proxy"),
        ("cache", "dev"),
    ]);
    assert_eq!(
        violations(&upward),
        vec![
            "config is data but imports exchange".to_string(),
            "inbound is below the front doors but imports proxy".to_string(),
            "cache is below the front doors but imports dev".to_string(),
            "cache is production code but imports dev".to_string(),
        ]
    );
    let doors = graph(&[
        ("proxy", "ext_authz"),
        ("ext_authz", "admission"),
        ("config", "ext_authz"),
    ]);
    assert_eq!(
        violations(&doors),
        vec![
            "config is data but imports ext_authz".to_string(),
            "proxy is a front door but imports the front door ext_authz".to_string(),
        ]
    );
    let files = |text: &str| vec![("f.rs".to_string(), production(text))];
    assert_eq!(
        naming_pingora(&files("use pingora::http::RequestHeader;")),
        ["f.rs uses pingora"]
    );
    assert_eq!(
        naming_pingora(&files("let r = pingora_prometheus::x();")),
        ["f.rs uses pingora"]
    );
    assert!(naming_pingora(&files("// pingora::x in a comment\nfn no_pingora() {}")).is_empty());
}

#[test]
fn imports_are_read_in_every_form() {
    let code = "use crate::config::Route;\nuse crate::{error::GatewayError, exchange::{self, Tokens}, state};\nlet x = crate::metrics::Metrics::new();";
    let found: Vec<String> = referenced(code).into_iter().collect();
    assert_eq!(found, ["config", "error", "exchange", "metrics", "state"]);
    assert_eq!(
        production(
            "use crate::a; // see crate::c\n#[cfg(test)]\nmod tests { fn f() { crate::b::g(); } }\nuse crate::d;"
        ),
        "use crate::a; \n\nuse crate::d;"
    );
}
