//! The documentation against the code it describes.
//!
//! - `docs/configuration.md` documents exactly the keys `gateway.yaml` accepts: a key added to
//!   the file format without a row, a row for a key that does not exist, and a row removed for a
//!   key that still exists all fail here.
//! - Every relative link in `README.md` and `docs/` reaches a file, and every `#anchor` a heading
//!   of that file.
//! - Every command in a block marked `<!-- run by deploy/check.sh -->` is a line of that script,
//!   so the commands the docs show are the ones CI runs.
//!
//! **How the accepted keys are found.** Not by reading `src/config/file.rs` as text: a parser
//! of Rust source would have to follow field renames, `r#match`, nested and boxed types, maps
//! and lists, and the hand-written deserializer of `upstream`, and it would drift from serde's
//! reading of the same file. Instead the test asks the loader itself. Every struct of the file
//! layer rejects unknown keys, and the loader's refusal (written in `src/config/tree.rs` from the
//! fields serde reports) lists the keys it expected ("unknown key `zzz_probe`, expected one of
//! `listen`, `admin_listen`, …"). So the test feeds
//! [`Config::from_yaml`] (the same function `txgate check` and `txgate run` use) small probe
//! documents that put the key `zzz_probe` at one place in the tree, reads the expected keys
//! from the answer, and for each key tries three shapes below it — a map (`{zzz_probe: 1}`), a
//! map of named entries (`{zzz_name: {zzz_probe: 1}}`) and a list (`[{zzz_probe: 1}]`). The
//! shape whose answer again names `zzz_probe` is a nested section, walked the same way; a key
//! where no shape does is a value. This needs no change to `src/` and sees exactly what a user's
//! file sees, including keys that only a map form of a value accepts (`routes[].upstream`). A
//! struct that does not deny unknown keys would hide its keys from this walk; if it has a
//! required key, the probe's answer names that key as missing, and the test reports it.
//!
//! **How the documented keys are read.** The reference is one table per section. The section's
//! path is the backticked text of the heading above the table (two paths when a section appears
//! in two places, as `inbound` does); the table's first column holds backticked keys relative to
//! it, with `.` for nesting. `<name>` stands for the entries of a map (`token_services.<name>`),
//! `[]` for the items of a list (`routes[]`). A heading path documents the section itself, and a
//! documented key documents the sections it lies in.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use txgate::config::Config;

const PROBE: &str = "zzz_probe";
const ENTRY: &str = "zzz_name";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

// --- accepted keys ------------------------------------------------------------------------------

/// One step from a map into the value below it.
enum Step {
    /// A key of a section.
    Field(String),
    /// An entry of a map whose keys the user names (`token_services.<name>`).
    Entry,
    /// An item of a list (`routes[]`).
    Item,
}

/// A document (JSON, which is YAML) with the probe key at the end of `path`.
fn probe_document(path: &[Step]) -> String {
    let mut value = format!("{{\"{PROBE}\": 1}}");
    for step in path.iter().rev() {
        value = match step {
            Step::Field(key) => format!("{{\"{key}\": {value}}}"),
            Step::Entry => format!("{{\"{ENTRY}\": {value}}}"),
            Step::Item => format!("[{value}]"),
        };
    }
    value
}

/// The path of `path` as the loader writes it in errors.
fn error_path(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Field(key) if out.is_empty() => out.push_str(key),
            Step::Field(key) => {
                out.push('.');
                out.push_str(key);
            }
            Step::Entry => {
                out.push('.');
                out.push_str(ENTRY);
            }
            Step::Item => out.push_str("[0]"),
        }
    }
    out
}

/// The keys of the section at `path`, or `None` when the value there is not a section.
fn section_keys(path: &[Step]) -> Option<Vec<String>> {
    let document = probe_document(path);
    let error = Config::from_yaml(&document, "probe.yaml", &|_| None).err()?;
    if error.message.starts_with("missing key") && error.path == error_path(path) {
        panic!(
            "{}: a section that ignores unknown keys (probe {document}: {error}); \
             add #[serde(deny_unknown_fields)] to its struct",
            error_path(path)
        );
    }
    let expected = error
        .message
        .strip_prefix(&format!("unknown key `{PROBE}`, "))?;
    if expected.starts_with("there are no fields") {
        return Some(Vec::new());
    }
    Some(backticked(expected))
}

/// Every key `gateway.yaml` accepts, as documented paths (`routes[].exchange.scope`).
fn accepted_keys() -> BTreeSet<String> {
    fn walk(path: &mut Vec<Step>, prefix: &str, out: &mut BTreeSet<String>) {
        assert!(
            path.len() < 12,
            "{prefix}: nested too deep for a config file"
        );
        let keys = section_keys(path).unwrap_or_else(|| {
            panic!(
                "{prefix}: expected a section (probe {})",
                probe_document(path)
            )
        });
        for key in keys {
            let name = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            path.push(Step::Field(key));
            let depth = path.len();
            let shapes = [
                (None, ""),
                (Some(Step::Entry), ".<name>"),
                (Some(Step::Item), "[]"),
            ];
            let mut leaf = true;
            for (step, suffix) in shapes {
                path.extend(step);
                if section_keys(path).is_some() {
                    let section = format!("{name}{suffix}");
                    out.insert(section.clone());
                    walk(path, &section, out);
                    leaf = false;
                }
                path.truncate(depth);
                if !leaf {
                    break;
                }
            }
            if leaf {
                out.insert(name);
            }
            path.pop();
        }
    }
    let mut out = BTreeSet::new();
    walk(&mut Vec::new(), "", &mut out);
    out
}

// --- documented keys ----------------------------------------------------------------------------

/// The `code` spans of a line of Markdown, in order.
fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// Lines of a Markdown file outside fenced code blocks, with their 1-based numbers.
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push((i + 1, line));
        }
    }
    out
}

/// The keys `docs/configuration.md` names explicitly (section headings and table rows), each
/// with the line that names it.
fn documented_keys() -> BTreeMap<String, usize> {
    let text = read("docs/configuration.md");
    let mut out = BTreeMap::new();
    let mut sections: Vec<String> = Vec::new();
    let mut in_key_table = false;
    for (number, line) in prose_lines(&text) {
        if line.starts_with('#') {
            sections = backticked(line);
            for section in &sections {
                out.insert(section.clone(), number);
            }
            in_key_table = false;
            continue;
        }
        if !line.starts_with('|') {
            in_key_table = false;
            continue;
        }
        let first = line.split('|').nth(1).unwrap_or("").trim();
        if first == "key" {
            assert!(
                !sections.is_empty(),
                "docs/configuration.md:{number}: a key table under a heading without a `path`"
            );
            in_key_table = true;
            continue;
        }
        if !in_key_table || first.starts_with("---") {
            continue;
        }
        let keys = backticked(first);
        assert!(
            !keys.is_empty(),
            "docs/configuration.md:{number}: a row without a `key` in its first column"
        );
        for section in &sections {
            for key in &keys {
                out.insert(format!("{section}.{key}"), number);
            }
        }
    }
    out
}

#[test]
fn the_configuration_reference_documents_exactly_the_accepted_keys() {
    let accepted = accepted_keys();
    // Sanity: the walk reached the deepest sections, through a map, a list and `upstream`.
    for key in [
        "server.tls.reload_interval",
        "token_services.<name>.circuit_breaker.open_for",
        "token_services.<name>.inbound.introspection.client_ids",
        "routes[].upstream.health_check.healthy_after",
        "routes[].exchange.actor.token_file",
        "cache.max_ttl",
    ] {
        assert!(
            accepted.contains(key),
            "the probe walk missed {key}: {accepted:#?}"
        );
    }

    let documented = documented_keys();
    let mut covered: BTreeSet<String> = BTreeSet::new();
    for key in documented.keys() {
        covered.insert(key.clone());
        for (i, c) in key.char_indices() {
            if c == '.' || key[i..].starts_with("[]") {
                covered.insert(key[..i].to_string());
            }
        }
    }

    let undocumented: Vec<&String> = accepted.iter().filter(|k| !covered.contains(*k)).collect();
    let unknown: Vec<String> = documented
        .iter()
        .filter(|(k, _)| !accepted.contains(*k))
        .map(|(k, line)| format!("docs/configuration.md:{line}: {k}"))
        .collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "keys gateway.yaml accepts but docs/configuration.md does not document: {undocumented:#?}\n\
         keys docs/configuration.md documents but gateway.yaml does not accept: {unknown:#?}"
    );
}

// --- links --------------------------------------------------------------------------------------

/// The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim_start_matches('#')
        .trim()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .flat_map(char::to_lowercase)
        .collect()
}

fn anchors(file: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for (_, line) in prose_lines(&text) {
        if !line.starts_with('#') {
            continue;
        }
        let base = anchor(line);
        let n = seen.entry(base.clone()).or_insert(0);
        out.insert(if *n == 0 {
            base.clone()
        } else {
            format!("{base}-{n}")
        });
        *n += 1;
    }
    out
}

fn markdown_files() -> Vec<String> {
    let mut files = vec!["README.md".to_string()];
    let mut docs: Vec<String> = std::fs::read_dir(repo().join("docs"))
        .expect("docs/")
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

#[test]
fn every_relative_link_in_the_docs_reaches_its_file_and_heading() {
    let mut broken = Vec::new();
    for rel in markdown_files() {
        let file = repo().join(&rel);
        let dir = file.parent().unwrap().to_path_buf();
        for (number, line) in prose_lines(&read(&rel)) {
            for target in line
                .split("](")
                .skip(1)
                .filter_map(|rest| rest.split(')').next())
            {
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                let (path, fragment) = match target.split_once('#') {
                    Some((path, fragment)) => (path, Some(fragment)),
                    None => (target, None),
                };
                let linked = if path.is_empty() {
                    file.clone()
                } else {
                    dir.join(path)
                };
                if !linked.exists() {
                    broken.push(format!("{rel}:{number}: {target}: no such file"));
                    continue;
                }
                if let Some(fragment) = fragment
                    && !anchors(&linked).contains(fragment)
                {
                    broken.push(format!("{rel}:{number}: {target}: no such heading"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

// --- commands -----------------------------------------------------------------------------------

const RUN_BY_CHECK: &str = "<!-- run by deploy/check.sh -->";

#[test]
fn commands_shown_as_run_by_deploy_check_are_lines_of_it() {
    let script: BTreeSet<String> = read("deploy/check.sh")
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    let mut checked = 0;
    let mut missing = Vec::new();
    for rel in markdown_files() {
        let text = read(&rel);
        let lines: Vec<&str> = text.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            if lines[i].trim() != RUN_BY_CHECK {
                i += 1;
                continue;
            }
            assert!(
                lines.get(i + 1).is_some_and(|l| l.starts_with("```")),
                "{rel}:{}: {RUN_BY_CHECK} must stand right above a code block",
                i + 1
            );
            i += 2;
            while i < lines.len() && !lines[i].starts_with("```") {
                let command = lines[i].trim();
                if !command.is_empty() && !command.starts_with('#') {
                    checked += 1;
                    if !script.contains(command) {
                        missing.push(format!("{rel}:{}: {command}", i + 1));
                    }
                }
                i += 1;
            }
        }
    }
    assert!(checked > 0, "no code block is marked {RUN_BY_CHECK}");
    assert!(
        missing.is_empty(),
        "commands the docs say deploy/check.sh runs, which it does not:\n{}",
        missing.join("\n")
    );
}
