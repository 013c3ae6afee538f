//! A check of the fake's own layout, run by `cargo test -p apptainer-orchestrator-tests --bin
//! fake-apptainer`: every module has a place in the layers of the map in `fake-apptainer.rs`,
//! imports (`crate::x`) only point down those layers, the modules import each other in no
//! cycle, and every file opens with a `//!` and stays under 600 lines. It reads the sources as
//! text; it is not part of the binary.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The layers, top first: a module may import from its own layer (without a cycle) or below.
const LAYERS: &[(&str, &[&str])] = &[
    ("the subcommands", &["cmd"]),
    (
        "what the subcommands build on",
        &[
            "action",
            "assemble",
            "bundle",
            "controls",
            "definition",
            "image",
            "instance_state",
            "monitor",
            "network",
        ],
    ),
    ("the command-line machinery", &["cli"]),
    (
        "the foundations",
        &["glob", "ident", "invocation", "json", "sylog", "sys"],
    ),
];

/// This check itself, which is no part of the binary (and quotes `crate::` paths as examples).
const THIS_FILE: &str = "layout_test.rs";

/// The longest a source file may be.
const MAX_LINES: usize = 600;

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, names)| names.contains(&module))
}

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") && !path.ends_with(THIS_FILE) {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to: `cli/parse.rs` is `cli`, `glob.rs` is `glob`.
fn module_of(root: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(root).expect("a file below the root");
    let first = rel.components().next().expect("a relative path");
    let first = first.as_os_str().to_string_lossy();
    first.strip_suffix(".rs").unwrap_or(&first).to_string()
}

/// The top-level modules a source names through `crate::`, in `use` lines or inline paths.
fn imports(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        match rest.strip_prefix('{') {
            Some(group) => {
                let (mut depth, mut item) = (0usize, String::new());
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            found.insert(first_segment(&item));
                            item.clear();
                            continue;
                        }
                        _ => {}
                    }
                    item.push(c);
                }
                found.insert(first_segment(&item));
            }
            None => {
                found.insert(first_segment(rest));
            }
        }
    }
    found.remove("");
    found
}

fn first_segment(path: &str) -> String {
    path.trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// Every breach of the layout rules in the fake's sources below `root`, as sentences.
fn layout_breaches(root: &Path) -> Vec<String> {
    let mut files = Vec::new();
    source_files(root, &mut files);
    let mut breaches = Vec::new();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let text = fs::read_to_string(file).expect("a readable source file");
        let shown = file.strip_prefix(root).unwrap_or(file).display();
        if !text.starts_with("//!") {
            breaches.push(format!(
                "{shown} does not open with a //! saying what it is"
            ));
        }
        let lines = text.lines().count();
        if lines > MAX_LINES {
            breaches.push(format!("{shown} has {lines} lines (at most {MAX_LINES})"));
        }
        let module = module_of(root, file);
        let layer = layer_of(&module);
        if layer.is_none() {
            breaches.push(format!("{shown}: module {module} has no layer in LAYERS"));
        }
        for target in imports(&text) {
            if target == module {
                continue;
            }
            match (layer, layer_of(&target)) {
                (Some(l), Some(t)) if t < l => breaches.push(format!(
                    "{shown}: {module} ({}) imports {target} from a layer above ({})",
                    LAYERS[l].0, LAYERS[t].0
                )),
                _ => {}
            }
            graph.entry(module.clone()).or_default().insert(target);
        }
    }
    breaches.extend(cycles(&graph));
    breaches
}

/// One sentence per module that reaches itself again through the imports.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut found = Vec::new();
    for start in graph.keys() {
        let mut path = vec![start.clone()];
        if reaches(graph, start, start, &mut path, &mut BTreeSet::new()) {
            found.push(format!("import cycle: {}", path.join(" -> ")));
        }
    }
    found
}

fn reaches(
    graph: &BTreeMap<String, BTreeSet<String>>,
    from: &str,
    goal: &str,
    path: &mut Vec<String>,
    seen: &mut BTreeSet<String>,
) -> bool {
    for next in graph.get(from).into_iter().flatten() {
        path.push(next.clone());
        if next == goal {
            return true;
        }
        if seen.insert(next.clone()) && reaches(graph, next, goal, path, seen) {
            return true;
        }
        path.pop();
    }
    false
}

#[test]
fn the_fakes_modules_import_down_the_layers_of_its_map_without_cycles() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/bin/fake_apptainer");
    let breaches = layout_breaches(&root);
    assert!(
        breaches.is_empty(),
        "the fake's layout rules are broken:\n{}",
        breaches.join("\n")
    );
}

#[test]
fn a_backward_import_and_a_cycle_are_both_reported() {
    let root = std::env::temp_dir().join(format!("fake-layout-test-{}", std::process::id()));
    fs::create_dir_all(root.join("cli")).expect("a temporary directory");
    fs::write(
        root.join("cli/mod.rs"),
        "//! cli\nuse crate::{sys, cmd::x};\n",
    )
    .expect("write");
    fs::write(root.join("cmd.rs"), "//! cmd\nuse crate::cli::Fail;\n").expect("write");
    fs::write(
        root.join("sys.rs"),
        "//! sys\nfn f() { crate::sylog::info(\"\"); }\n",
    )
    .expect("write");
    fs::write(root.join("sylog.rs"), "//! sylog\n").expect("write");
    let breaches = layout_breaches(&root);
    let _ = fs::remove_dir_all(&root);
    assert!(
        breaches
            .iter()
            .any(|b| b.contains("cli (the command-line machinery) imports cmd from a layer above")),
        "{breaches:?}"
    );
    assert!(
        breaches
            .iter()
            .any(|b| b == "import cycle: cli -> cmd -> cli"),
        "{breaches:?}"
    );
    assert_eq!(
        breaches.len(),
        3,
        "only the two cycles and the backward import: {breaches:?}"
    );
}
