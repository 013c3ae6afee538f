//! The worker's layout, checked: every file of `worker/src` is parsed, and the test fails, naming
//! the file and line, when a module imports from a layer above its own (or from another module of
//! its own layer), when the top-level modules import each other in a cycle, when a file is over
//! [`MAX_FILE_LINES`] lines, or when a function (tests excluded) is over [`MAX_FN_LINES`] lines.
//!
//! Run it with `cargo test -p apptainer-orchestrator-worker --test structure`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proc_macro2::{TokenStream, TokenTree};
use syn::spanned::Spanned;
use syn::visit::Visit;

/// The layers, top to bottom, the same as `lib.rs`'s map. A module may import only from the
/// layers below its own; the `why` says what the layer is for and so why it sits there.
const LAYERS: &[(&[&str], &str)] = &[
    (
        &["app"],
        "wires everything together, so it may use everything",
    ),
    (
        &["http", "check", "reconciler"],
        "operator surfaces look at the path from outside; nothing on the path needs them",
    ),
    (
        &["intake"],
        "the start of the request path: decodes, checks, hands to the scheduler",
    ),
    (
        &["fleet"],
        "what a host does with deliveries that are not one container's requests (admin messages, \
         fleet-wide gathers): the intake hands them here; it may look at the lanes and the store",
    ),
    (
        &["scheduler"],
        "lanes and the executor, which runs an operation and settles it",
    ),
    (
        &["ops"],
        "one file per operation, on top of the runtime and the store",
    ),
    (
        &["progress"],
        "best-effort envelopes an operation sends while it runs",
    ),
    (
        &["runtime"],
        "the apptainer adapter: knows the command line, not the request path",
    ),
    (
        &["outbox"],
        "drains committed replies from the store through the publisher",
    ),
    (
        &["store"],
        "SQLite: the records every layer above reads and writes",
    ),
    (
        &["broker"],
        "connections, topology and confirmed publishing: used at both ends of the path",
    ),
    (
        &["rules", "reply", "metrics", "telemetry"],
        "foundations: the request rules and the reply shape know nothing of the path",
    ),
    (&["settings"], "flags and environment, read by everything"),
];

const MAX_FILE_LINES: usize = 600;
const MAX_FN_LINES: usize = 80;

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("worker/src is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
    found.sort();
}

/// The module path of a file of the library: `store/inbox.rs` is `[store, inbox]`,
/// `store/mod.rs` is `[store]`; `None` for the crate root and the binary.
fn module_of(file: &Path) -> Option<Vec<String>> {
    let relative = file.strip_prefix(src_dir()).ok()?;
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?.trim_end_matches(".rs").to_owned();
    if parts.is_empty() && (last == "lib" || last == "main") {
        return None;
    }
    if last != "mod" {
        parts.push(last);
    }
    Some(parts)
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(names, _)| names.contains(&module))
}

/// One import of a top-level module, where it was written.
struct Import {
    target: String,
    line: usize,
}

/// Collects every `crate::` (or `super::` reaching the crate) path of a file, in `use` items,
/// in code and in macro invocations, and the functions that are too long.
struct Collector {
    module: Vec<String>,
    imports: Vec<Import>,
    long_fns: Vec<(String, usize, usize)>,
    in_tests: usize,
    /// Names the crate root re-exports (`pub use app::Worker`), and the module each is from.
    reexports: BTreeMap<String, String>,
}

impl Collector {
    /// Resolves a path's leading segments to the top-level module it names, if any.
    fn note(&mut self, segments: &[String], line: usize) {
        let mut base = self.module.clone();
        let mut rest = segments;
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
            _ => return,
        }
        // `crate::Worker` names `app`: the crate root re-exports it.
        let target = base
            .first()
            .or(rest.first())
            .map(|t| match base.is_empty() {
                true => self.reexports.get(t).unwrap_or(t),
                false => t,
            });
        let seen = |i: &Import| Some(&i.target) == target && i.line == line;
        if let (Some(target), false) = (target.cloned(), self.imports.iter().any(seen)) {
            self.imports.push(Import {
                target: target.clone(),
                line,
            });
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(path) => {
                prefix.push(path.ident.to_string());
                self.use_tree(prefix, &path.tree);
                prefix.pop();
            }
            syn::UseTree::Name(name) => self.leaf(prefix, &name.ident, tree),
            syn::UseTree::Rename(rename) => self.leaf(prefix, &rename.ident, tree),
            syn::UseTree::Glob(_) => {
                let segments = prefix.clone();
                self.note(&segments, tree.span().start().line);
            }
            syn::UseTree::Group(group) => {
                for item in &group.items {
                    self.use_tree(prefix, item);
                }
            }
        }
    }

    fn leaf(&mut self, prefix: &[String], ident: &syn::Ident, tree: &syn::UseTree) {
        let mut segments = prefix.to_vec();
        segments.push(ident.to_string());
        self.note(&segments, tree.span().start().line);
    }

    fn tokens(&mut self, tokens: TokenStream) {
        let trees: Vec<TokenTree> = tokens.into_iter().collect();
        for (i, tree) in trees.iter().enumerate() {
            match tree {
                TokenTree::Group(group) => self.tokens(group.stream()),
                TokenTree::Ident(ident) if ident == "crate" => {
                    let next = trees.get(i + 3);
                    let colons =
                        matches!(trees.get(i + 1), Some(TokenTree::Punct(p)) if p.as_char() == ':');
                    if let (true, Some(TokenTree::Ident(module))) = (colons, next) {
                        let segments = ["crate".to_owned(), module.to_string()];
                        self.note(&segments, ident.span().start().line);
                    }
                }
                _ => {}
            }
        }
    }

    fn function(&mut self, name: String, attrs: &[syn::Attribute], span: proc_macro2::Span) {
        let is_test = attrs.iter().any(|a| {
            let path = a.path();
            path.is_ident("test") || path.segments.last().is_some_and(|s| s.ident == "test")
        });
        let lines = span.end().line - span.start().line + 1;
        if self.in_tests == 0 && !is_test && lines > MAX_FN_LINES {
            self.long_fns.push((name, span.start().line, lines));
        }
    }
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.meta
                .require_list()
                .is_ok_and(|list| list.tokens.to_string().contains("test"))
    })
}

impl<'ast> Visit<'ast> for Collector {
    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &item.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        self.note(&segments, path.span().start().line);
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.tokens(mac.tokens.clone());
        syn::visit::visit_macro(self, mac);
    }

    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        let tests = is_cfg_test(&item.attrs);
        self.in_tests += usize::from(tests);
        self.module.push(item.ident.to_string());
        syn::visit::visit_item_mod(self, item);
        self.module.pop();
        self.in_tests -= usize::from(tests);
    }

    fn visit_item_fn(&mut self, item: &'ast syn::ItemFn) {
        self.function(item.sig.ident.to_string(), &item.attrs, item.span());
        syn::visit::visit_item_fn(self, item);
    }

    fn visit_impl_item_fn(&mut self, item: &'ast syn::ImplItemFn) {
        self.function(item.sig.ident.to_string(), &item.attrs, item.span());
        syn::visit::visit_impl_item_fn(self, item);
    }

    fn visit_trait_item_fn(&mut self, item: &'ast syn::TraitItemFn) {
        if item.default.is_some() {
            self.function(item.sig.ident.to_string(), &item.attrs, item.span());
        }
        syn::visit::visit_trait_item_fn(self, item);
    }
}

/// Every file of `worker/src`, parsed: (file, its module path, its imports, its long functions).
struct Parsed {
    file: PathBuf,
    module: Option<Vec<String>>,
    lines: usize,
    imports: Vec<Import>,
    long_fns: Vec<(String, usize, usize)>,
}

/// The names `lib.rs` re-exports from a module (`pub use app::Worker;`), mapped to the module.
fn root_reexports() -> BTreeMap<String, String> {
    let lib = std::fs::read_to_string(src_dir().join("lib.rs")).expect("lib.rs is readable");
    let mut names = BTreeMap::new();
    for item in syn::parse_file(&lib).expect("lib.rs parses").items {
        let syn::Item::Use(item) = item else { continue };
        let syn::UseTree::Path(path) = &item.tree else {
            continue;
        };
        let leaves = match &*path.tree {
            syn::UseTree::Group(group) => group.items.iter().collect(),
            leaf => vec![leaf],
        };
        for leaf in leaves {
            if let syn::UseTree::Name(name) = leaf {
                names.insert(name.ident.to_string(), path.ident.to_string());
            }
        }
    }
    names
}

fn parse_all() -> Vec<Parsed> {
    let reexports = root_reexports();
    let mut files = Vec::new();
    rust_files(&src_dir(), &mut files);
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).expect("a source file is readable");
            let syntax = syn::parse_file(&text)
                .unwrap_or_else(|e| panic!("{}: does not parse: {e}", file.display()));
            let module = module_of(&file);
            let test_file = file.file_name().is_some_and(|n| n == "tests.rs");
            let mut collector = Collector {
                module: module.clone().unwrap_or_default(),
                imports: Vec::new(),
                long_fns: Vec::new(),
                in_tests: usize::from(test_file),
                reexports: reexports.clone(),
            };
            collector.visit_file(&syntax);
            Parsed {
                file,
                module,
                lines: text.lines().count(),
                imports: collector.imports,
                long_fns: collector.long_fns,
            }
        })
        .collect()
}

fn shown(file: &Path) -> String {
    file.strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")))
        .unwrap_or(file)
        .display()
        .to_string()
}

#[test]
fn no_module_imports_from_its_own_layer_or_one_above_it() {
    let mut wrong = Vec::new();
    for parsed in parse_all() {
        let Some(module) = parsed.module.as_ref().and_then(|m| m.first()) else {
            continue;
        };
        let Some(own) = layer_of(module) else {
            wrong.push(format!(
                "{}: module `{module}` is in no layer of LAYERS",
                shown(&parsed.file)
            ));
            continue;
        };
        for import in &parsed.imports {
            if &import.target == module || layer_of(&import.target).is_none_or(|l| l > own) {
                continue;
            }
            wrong.push(format!(
                "{}:{}: `{module}` imports from `{}`, which is not in a layer below its own",
                shown(&parsed.file),
                import.line,
                import.target
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_top_level_modules_import_each_other_in_no_cycle() {
    let mut edges: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for parsed in parse_all() {
        let Some(module) = parsed.module.as_ref().and_then(|m| m.first()) else {
            continue;
        };
        for import in &parsed.imports {
            if &import.target != module && layer_of(&import.target).is_some() {
                let place = format!("{}:{}", shown(&parsed.file), import.line);
                edges
                    .entry(module.clone())
                    .or_default()
                    .entry(import.target.clone())
                    .or_insert(place);
            }
        }
    }
    let mut cycles = BTreeSet::new();
    for start in edges.keys() {
        // Depth-first from each module, bounded by the number of modules.
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((at, path)) = stack.pop() {
            for (next, place) in edges.get(&at).into_iter().flatten() {
                if next == start {
                    cycles.insert(format!(
                        "{} -> {start} (closing import at {place})",
                        path.join(" -> ")
                    ));
                } else if seen.insert(next.clone()) && path.len() <= LAYERS.len() * 4 {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "import cycles:\n{}",
        cycles.into_iter().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn no_file_is_longer_than_a_person_holds_in_their_head() {
    let long: Vec<String> = parse_all()
        .into_iter()
        .filter(|p| p.lines > MAX_FILE_LINES)
        .map(|p| {
            format!(
                "{}:1: {} lines (at most {MAX_FILE_LINES})",
                shown(&p.file),
                p.lines
            )
        })
        .collect();
    assert!(long.is_empty(), "files too long:\n{}", long.join("\n"));
}

#[test]
fn no_function_is_longer_than_a_screen_or_two() {
    let long: Vec<String> = parse_all()
        .into_iter()
        .flat_map(|p| {
            let file = shown(&p.file);
            p.long_fns.into_iter().map(move |(name, line, lines)| {
                format!("{file}:{line}: fn {name} is {lines} lines (at most {MAX_FN_LINES})")
            })
        })
        .collect();
    assert!(long.is_empty(), "functions too long:\n{}", long.join("\n"));
}

#[test]
fn the_layers_are_the_ones_lib_rs_names_in_its_map() {
    let lib = std::fs::read_to_string(src_dir().join("lib.rs")).expect("lib.rs is readable");
    for (names, _) in LAYERS {
        for name in *names {
            assert!(
                lib.contains(&format!("pub mod {name};")),
                "LAYERS names `{name}`, which lib.rs does not declare"
            );
            assert!(
                lib.contains(&format!("[`{name}`]")),
                "lib.rs's map does not place `{name}`"
            );
        }
    }
}
