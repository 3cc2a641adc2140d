//! The dependency direction of docs/architecture.md, checked: every `crate::MODULE` path in a
//! module's source names a module of a lower layer or of its own layer; pass files import no
//! other pass file. A new import that points up or sideways fails here with the file and line.

use std::path::{Path, PathBuf};

/// Lowest first; modules on one line form one layer (they may use each other).
const LAYERS: &[&[&str]] = &[
    &["error", "progress"],
    &["tokenizer"],
    // The forward calls the hook sites, and the hooks act on the model's tensors: one layer.
    &["model", "runtime"],
    &["io"],
    &["data", "ir", "report"],
    &["locate", "rome"],
    &["verify"],
    &["passes"],
    &["search"],
    &["compile"],
    &["cli"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a source file belongs to (`src/locate/patch.rs` → `locate`).
fn module_of(root: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(root).unwrap();
    let mut parts = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned());
    let first = parts.next().unwrap();
    if first == "passes" {
        return "passes".into();
    }
    let second = parts.next().unwrap();
    second.trim_end_matches(".rs").to_string()
}

/// Every `crate::NAME` in a line of code (comments skipped).
fn crate_paths(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    let mut out = vec![];
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + 7..];
        let name: String = after.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() {
            out.push(name);
        }
        rest = after;
    }
    // `use crate::{a, b::c}` groups.
    if let Some(i) = code.find("crate::{") {
        for item in code[i + 8..].split([',', '}']) {
            let name: String = item.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.push(name);
            }
        }
    }
    out
}

#[test]
fn imports_point_down_the_layers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![];
    rust_files(&root.join("src"), &mut files);
    rust_files(&root.join("passes"), &mut files);
    let mut bad = vec![];
    let mut unknown = vec![];
    for f in &files {
        let module = module_of(root, f);
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(own) = layer(&module) else {
            unknown.push(format!("{} (module `{module}`)", f.display()));
            continue;
        };
        for (n, line) in std::fs::read_to_string(f).unwrap().lines().enumerate() {
            for used in crate_paths(line) {
                // Re-exports at the crate root (`crate::Error`, `crate::Result`) are `error`.
                let used = if used == "Error" || used == "Result" { "error".to_string() } else { used };
                match layer(&used) {
                    Some(l) if l <= own => {}
                    Some(_) => bad.push(format!("{}:{}: `{module}` uses `crate::{used}`, a higher layer", f.display(), n + 1)),
                    None => unknown.push(format!("{}:{}: `crate::{used}` is in no layer", f.display(), n + 1)),
                }
            }
        }
    }
    assert!(unknown.is_empty(), "modules missing from LAYERS (add them, and to docs/architecture.md):\n{}", unknown.join("\n"));
    assert!(bad.is_empty(), "imports against the layer order of docs/architecture.md:\n{}", bad.join("\n"));
}

#[test]
fn pass_files_import_no_other_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("passes");
    let mut files = vec![];
    rust_files(&root, &mut files);
    // A pass file declares its registry entry; other files there (mod.rs, shared helpers) are not passes.
    let is_pass = |f: &PathBuf| std::fs::read_to_string(f).unwrap().contains("pub const INFO: PassInfo");
    let passes: Vec<String> = files.iter().filter(|f| is_pass(f)).map(|f| f.file_stem().unwrap().to_string_lossy().into_owned()).collect();
    assert!(passes.len() >= 5, "{passes:?}");
    let mut bad = vec![];
    for f in &files {
        let me = f.file_stem().unwrap().to_string_lossy().into_owned();
        for (n, line) in std::fs::read_to_string(f).unwrap().lines().enumerate() {
            for other in passes.iter().filter(|p| **p != me) {
                if line.contains(&format!("super::{other}")) || line.contains(&format!("passes::{other}")) {
                    bad.push(format!("{}:{}: uses the pass `{other}`", f.display(), n + 1));
                }
            }
        }
    }
    assert!(bad.is_empty(), "a pass is one file; share code through the library instead:\n{}", bad.join("\n"));
}

/// The table above is the one docs/architecture.md shows.
#[test]
fn the_architecture_doc_lists_the_same_layers() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md")).unwrap();
    let line = LAYERS.iter().map(|l| l.join(" ")).collect::<Vec<_>>().join(" → ");
    assert!(doc.contains(&line), "docs/architecture.md should contain the layer line:\n{line}");
}
