//! The modules of `src/` depend on each other one way. Each top-level module
//! sits in a layer and may use only modules of lower layers (the order of
//! `docs/architecture.md`); this test reads every file under `src/` and names
//! each `crate::` path that runs the other way.

use std::collections::BTreeSet;
use std::path::Path;

/// Lowest first. Modules in one layer may not use each other.
const LAYERS: &[&[&str]] = &[
    &["secret", "telemetry"],
    &["segment"],
    &["mapping", "rules"],
    &["config"],
    &["storage"],
    &["budget", "backpressure", "delivery"],
    &["web"],
    &["ingest", "admin", "insights"],
    &["openapi"],
    &["server"],
    &["cli"],
    &["lib", "main"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The top-level modules a file's text names through `crate::`, comments
/// left out; `crate::{a, b::c}` names `a` and `b`.
fn uses(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // The first name of each item at the group's top level.
                let mut depth = 0;
                let mut item_start = true;
                let mut name = String::new();
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            if !name.is_empty() {
                                found.insert(std::mem::take(&mut name));
                            }
                            item_start = true;
                            continue;
                        }
                        _ => {}
                    }
                    if depth == 0 && item_start {
                        if c.is_ascii_alphanumeric() || c == '_' {
                            name.push(c);
                        } else if !name.is_empty() {
                            found.insert(std::mem::take(&mut name));
                            item_start = false;
                        }
                    }
                }
                if !name.is_empty() {
                    found.insert(name);
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        }
    }
    found
}

/// `module uses target`, when that runs against the layers.
fn violations(module: &str, text: &str) -> Vec<String> {
    let Some(own) = layer_of(module) else {
        return vec![format!(
            "{module}: not in any layer (add it to LAYERS and docs/architecture.md)"
        )];
    };
    uses(text)
        .into_iter()
        .filter(|target| target != module)
        .filter_map(|target| match layer_of(&target) {
            Some(layer) if layer < own => None,
            Some(_) => Some(format!(
                "{module} uses {target}, a module of its layer or above"
            )),
            None => Some(format!("{module} uses {target}, which is in no layer")),
        })
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn modules_depend_on_lower_layers_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 20, "read {} files under src/", files.len());
    let mut wrong = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let first = relative.components().next().unwrap().as_os_str();
        let module = first.to_str().unwrap().trim_end_matches(".rs");
        let text = std::fs::read_to_string(file).unwrap();
        for v in violations(module, &text) {
            wrong.push(format!("{}: {v}", relative.display()));
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against docs/architecture.md's order:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn every_layered_module_exists() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for module in LAYERS.iter().flat_map(|l| l.iter()) {
        let file = src.join(format!("{module}.rs"));
        let folder = src.join(module).join("mod.rs");
        assert!(
            file.exists() || folder.exists(),
            "{module} is in LAYERS but not in src/"
        );
    }
}

#[test]
fn the_ties_that_once_closed_a_cycle_are_refused() {
    // Each of these once tied most of src/ into one cycle.
    let ties = [
        ("config", "use crate::insights::config::validate;"),
        ("secret", "crate::config::Scalar::deserialize(d)"),
        (
            "segment",
            "Ok(Some(crate::mapping::values::number_text(n)))",
        ),
        (
            "ingest",
            "let why = crate::admin::auth::cross_site(headers);",
        ),
        ("admin", "use crate::ingest::{ApiError, AppState};"),
        ("insights", "use crate::{ingest::AppState, web};"),
        ("delivery", "use crate::server;"),
        ("storage", "use crate::{telemetry, delivery::Delivery};"),
    ];
    for (module, line) in ties {
        assert!(
            !violations(module, line).is_empty(),
            "{module}: `{line}` should be refused"
        );
    }
    // And what runs downward passes, comments aside.
    assert!(violations("ingest", "use crate::{web::{ApiError, AppState}, storage};").is_empty());
    assert!(violations("mapping", "// see crate::server for where this is used").is_empty());
    assert_eq!(
        violations("newcomer", "use crate::storage;"),
        ["newcomer: not in any layer (add it to LAYERS and docs/architecture.md)"]
    );
}
