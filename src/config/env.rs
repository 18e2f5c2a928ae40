//! `${VAR}` expansion in `gateway.yaml` string values.
//!
//! Secrets must come from the environment (or files), never from the file itself, so any string
//! value may reference a variable. Expansion runs on the parsed YAML tree rather than the raw
//! text so that a value can never inject YAML structure, and so that a missing variable is
//! reported at its key path. `$${` writes a literal `${`.

use serde_yaml::Value;

use super::ConfigProblem;

/// Expands every string scalar in `tree`; a problem names the key path of the string.
pub fn expand_tree(
    tree: &mut Value,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigProblem> {
    walk(tree, String::new(), env)
}

fn walk(
    node: &mut Value,
    path: String,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigProblem> {
    match node {
        Value::String(s) => {
            if s.contains('$') {
                *s = expand(s, env).map_err(|m| ConfigProblem::new(path, m))?;
            }
            Ok(())
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                walk(item, format!("{path}[{i}]"), env)?;
            }
            Ok(())
        }
        Value::Mapping(map) => {
            for (key, value) in map.iter_mut() {
                let key = match key {
                    Value::String(k) => k.clone(),
                    other => serde_yaml::to_string(other)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                };
                let child = if path.is_empty() {
                    key
                } else {
                    format!("{path}.{key}")
                };
                walk(value, child, env)?;
            }
            Ok(())
        }
        Value::Tagged(tagged) => walk(&mut tagged.value, path, env),
        Value::Null | Value::Bool(_) | Value::Number(_) => Ok(()),
    }
}

/// Expands `${NAME}` references in one string.
pub fn expand(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(literal) = after.strip_prefix("${") {
            out.push_str("${");
            rest = literal;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| "unterminated ${...} reference".to_string())?;
            let name = &body[..end];
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return Err(format!(
                    "invalid variable name \"{name}\" in ${{...}} (letters, digits and _ only)"
                ));
            }
            let value =
                env(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
            out.push_str(&value);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SECRET" => Some("s3cr3t".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_references_and_keeps_other_dollars() {
        assert_eq!(expand("${SECRET}", &env).unwrap(), "s3cr3t");
        assert_eq!(expand("a-${SECRET}-b", &env).unwrap(), "a-s3cr3t-b");
        assert_eq!(expand("${EMPTY}", &env).unwrap(), "");
        assert_eq!(expand("cost $5", &env).unwrap(), "cost $5");
        assert_eq!(expand("$${SECRET}", &env).unwrap(), "${SECRET}");
    }

    #[test]
    fn reports_missing_and_malformed_references() {
        assert_eq!(
            expand("${NOPE}", &env).unwrap_err(),
            "environment variable NOPE is not set"
        );
        assert!(
            expand("${SECRET", &env)
                .unwrap_err()
                .contains("unterminated")
        );
        assert!(
            expand("${1X}", &env)
                .unwrap_err()
                .contains("invalid variable")
        );
    }

    #[test]
    fn tree_errors_name_the_key_path() {
        let mut tree: Value =
            serde_yaml::from_str("a:\n  list:\n    - x\n    - \"${NOPE}\"\n").unwrap();
        let problem = expand_tree(&mut tree, &env).unwrap_err();
        assert_eq!(problem.path, "a.list[1]");
    }
}
