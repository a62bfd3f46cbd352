//! The house rules, read from the source: folders (rooms) import only from floors below them,
//! no two files import each other (directly or around a circle), `model/` never names a cargo
//! feature (the kernel-or-reference choice lives in `nn::kernels` and `nn::attention`), no file
//! is over 800 lines and no function over 120.
//!
//! An import is any `crate::` or `super::` path in a source line outside comments and test
//! modules, resolved to the file that defines the module it names (the longest module prefix).
//! `src/lib.rs` (the public face, which re-exports the rooms) and `src/main.rs` are not rooms.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Floors, bottom first: a room imports only from rooms on lower floors.
const FLOORS: &[&[&str]] = &[
    &["error"],
    &["io", "device", "pullback", "hub"],
    &["cuda"],
    &["dist"],
    &["data"],
    &["collate"],
    &["nn"],
    &["model"],
    &["train"],
    &["recipe"],
    &["cli"],
];

const MAX_FILE_LINES: usize = 800;
const MAX_FN_LINES: usize = 120;

fn floor_of(room: &str) -> Option<usize> {
    FLOORS.iter().position(|f| f.contains(&room))
}

struct SourceFile {
    path: PathBuf,
    /// Module path from the crate root (`["model", "decoder"]` for src/model/decoder/mod.rs).
    module: Vec<String>,
    /// Lines before the file's `#[cfg(test)]` module, comments removed.
    code: Vec<String>,
    lines: usize,
    text: String,
}

fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_string());
    }
    parts
}

fn strip_comment(line: &str) -> &str {
    match line.find("//") {
        Some(i) if !line[..i].contains('"') => &line[..i],
        _ => line,
    }
}

fn sources() -> Vec<SourceFile> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    walk(&src, &mut paths);
    paths.sort();
    paths
        .into_iter()
        .filter(|p| p.file_name().unwrap() != "main.rs")
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let rel = path.strip_prefix(&src).unwrap().to_path_buf();
            let code = text
                .lines()
                .take_while(|l| l.trim() != "#[cfg(test)]")
                .map(|l| strip_comment(l).to_string())
                .collect();
            SourceFile {
                module: module_path(&rel),
                lines: text.lines().count(),
                code,
                text,
                path: rel,
            }
        })
        .collect()
}

/// Every path a line of code names from `crate::` or `super::`, expanded through `use` groups
/// (`crate::nn::{graph, kernels::add}` names `nn::graph` and `nn::kernels::add`), relative to
/// the root for `crate::` and with one leading `super` per level otherwise.
fn named_paths(code: &str) -> Vec<Vec<String>> {
    fn parse_tree(s: &[u8], i: &mut usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
        let mut path = prefix;
        loop {
            while *i < s.len() && s[*i].is_ascii_whitespace() {
                *i += 1;
            }
            if *i >= s.len() {
                break;
            }
            if s[*i] == b'{' {
                *i += 1;
                loop {
                    parse_tree(s, i, path.clone(), out);
                    while *i < s.len() && s[*i].is_ascii_whitespace() {
                        *i += 1;
                    }
                    if *i < s.len() && s[*i] == b',' {
                        *i += 1;
                        continue;
                    }
                    if *i < s.len() && s[*i] == b'}' {
                        *i += 1;
                    }
                    return;
                }
            }
            let start = *i;
            while *i < s.len() && (s[*i].is_ascii_alphanumeric() || s[*i] == b'_' || s[*i] == b'*')
            {
                *i += 1;
            }
            if start == *i {
                break;
            }
            path.push(String::from_utf8_lossy(&s[start..*i]).into_owned());
            if s[*i..].starts_with(b"::") {
                *i += 2;
                continue;
            }
            break;
        }
        out.push(path);
    }
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    for (kw, root) in [("crate::", "crate"), ("super::", "super")] {
        let mut from = 0;
        while let Some(k) = code[from..].find(kw) {
            let at = from + k;
            from = at + kw.len();
            let before = code[..at].chars().last();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let mut i = at + kw.len();
            parse_tree(bytes, &mut i, vec![root.to_string()], &mut out);
        }
    }
    out
}

/// The paths of `use` items that start with a plain name (not `crate`, `super`, `self` or
/// `::`): in a `mod.rs`, its child modules (other crates' paths match no module and are dropped).
fn child_paths(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for line in code.lines() {
        let t = line.trim_start();
        let t = t.strip_prefix("pub ").unwrap_or(t);
        let t = t.strip_prefix("pub(crate) ").unwrap_or(t);
        let t = t.strip_prefix("pub(super) ").unwrap_or(t);
        let Some(rest) = t.strip_prefix("use ") else {
            continue;
        };
        if ["crate::", "super::", "self::", "::"]
            .iter()
            .any(|k| rest.starts_with(k))
        {
            continue;
        }
        for p in named_paths(&format!("crate::{rest}")) {
            out.push(p[1..].to_vec());
        }
    }
    out
}

/// The files a file imports, with the path that names each.
fn imports(file: &SourceFile, by_module: &BTreeMap<Vec<String>, usize>) -> Vec<(usize, String)> {
    let code = file.code.join("\n");
    let is_mod_file = matches!(
        file.path.file_name().and_then(|n| n.to_str()),
        Some("mod.rs" | "lib.rs")
    );
    let mut out = Vec::new();
    // A `mod.rs` (or `lib.rs`) naming its own child modules without `self::`:
    // `use adapters::{...}` is an import of `adapters.rs` as much as a `super::` path is.
    if is_mod_file {
        for child in child_paths(&code) {
            let mut abs = file.module.clone();
            abs.extend(child.iter().cloned());
            let target = (file.module.len() + 1..=abs.len())
                .rev()
                .find_map(|n| by_module.get(&abs[..n]).copied());
            if let Some(t) = target {
                out.push((t, child.join("::")));
            }
        }
    }
    for p in named_paths(&code) {
        let mut abs: Vec<String> = if p[0] == "crate" {
            Vec::new()
        } else {
            // `super` from a file `a/b.rs` (module a::b) is a; from `a/mod.rs` (module a) it is
            // a's parent.
            let mut m = file.module.clone();
            if !is_mod_file || !m.is_empty() {
                m.pop();
            }
            m
        };
        let mut rest = p[1..].iter().peekable();
        while rest.peek().is_some_and(|s| *s == "super") {
            abs.pop();
            rest.next();
        }
        abs.extend(rest.cloned());
        let target = (0..=abs.len())
            .rev()
            .find_map(|n| by_module.get(&abs[..n]).copied());
        if let Some(t) = target {
            out.push((t, p.join("::")));
        }
    }
    out
}

fn room(file: &SourceFile) -> String {
    file.module.first().cloned().unwrap_or_else(|| "lib".into())
}

#[test]
fn rooms_import_only_from_lower_floors_and_files_never_in_a_circle() {
    let files = sources();
    let by_module: BTreeMap<Vec<String>, usize> = files
        .iter()
        .enumerate()
        .map(|(i, f)| (f.module.clone(), i))
        .collect();
    let mut problems = Vec::new();
    let mut edges: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); files.len()];
    for (i, f) in files.iter().enumerate() {
        let from = room(f);
        if from == "lib" {
            continue;
        }
        let Some(floor) = floor_of(&from) else {
            problems.push(format!(
                "src/{}: room `{from}` is on no floor",
                f.path.display()
            ));
            continue;
        };
        for (t, named) in imports(f, &by_module) {
            if t == i {
                continue;
            }
            let to = room(&files[t]);
            if to == "lib" {
                problems.push(format!(
                    "src/{} names `{named}` through the crate root: import it from its room",
                    f.path.display()
                ));
                continue;
            }
            // A module using what an ancestor module file defines (`super::DecoderModel` in
            // `decoder/cache.rs`) is Rust's module tree, not a circle: the ancestor declares it.
            let ancestor = files[t].module.len() < f.module.len()
                && f.module.starts_with(&files[t].module)
                && matches!(
                    files[t].path.file_name().and_then(|n| n.to_str()),
                    Some("mod.rs" | "lib.rs")
                );
            if !ancestor {
                edges[i].insert(t);
            }
            if to != from && floor_of(&to).is_none_or(|g| g >= floor) {
                problems.push(format!(
                    "src/{} (floor {floor}, `{from}`) imports `{named}` from `{to}`, which is not below it",
                    f.path.display()
                ));
            }
        }
    }
    // Circles of files: a depth-first search that finds a back edge.
    fn visit(
        n: usize,
        edges: &[BTreeSet<usize>],
        state: &mut [u8],
        stack: &mut Vec<usize>,
        found: &mut Vec<Vec<usize>>,
    ) {
        state[n] = 1;
        stack.push(n);
        for &m in &edges[n] {
            match state[m] {
                0 => visit(m, edges, state, stack, found),
                1 => {
                    let at = stack.iter().position(|&x| x == m).unwrap();
                    found.push(stack[at..].to_vec());
                }
                _ => {}
            }
        }
        stack.pop();
        state[n] = 2;
    }
    let mut state = vec![0u8; files.len()];
    let mut circles = Vec::new();
    for n in 0..files.len() {
        if state[n] == 0 {
            visit(n, &edges, &mut state, &mut Vec::new(), &mut circles);
        }
    }
    for c in circles {
        let names: Vec<String> = c
            .iter()
            .map(|&i| format!("src/{}", files[i].path.display()))
            .collect();
        problems.push(format!(
            "circle: {} -> (back to the first)",
            names.join(" -> ")
        ));
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
    // The check sees the imports it is about: the model reads batches and ops below it.
    let decoder = by_module[&vec!["model".to_string(), "decoder".to_string()]];
    let seen: Vec<String> = edges[decoder].iter().map(|&t| room(&files[t])).collect();
    assert!(
        seen.contains(&"collate".to_string()) && seen.contains(&"nn".to_string()),
        "{seen:?}"
    );
}

#[test]
fn the_model_never_names_a_cargo_feature() {
    for f in sources().iter().filter(|f| room(f) == "model") {
        for (n, line) in f.text.lines().enumerate() {
            assert!(
                !line.contains("feature = \"cuda\"") && !line.contains("feature = \"flash-attn\""),
                "src/{}:{}: the model picks no kernel by feature (nn::kernels does): {line}",
                f.path.display(),
                n + 1
            );
        }
    }
}

#[test]
fn no_file_over_800_lines_and_no_function_over_120() {
    let mut problems = Vec::new();
    for f in sources() {
        if f.lines > MAX_FILE_LINES {
            problems.push(format!("src/{}: {} lines", f.path.display(), f.lines));
        }
        let lines: Vec<&str> = f.text.lines().collect();
        for (n, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            let is_fn = ["fn ", "pub fn ", "pub(crate) fn ", "pub(super) fn "]
                .iter()
                .any(|p| t.starts_with(p));
            if !is_fn {
                continue;
            }
            // The signature ends at the first line ending in `{` (a body) or `;` (none).
            let Some(open) = (n..lines.len()).find(|&k| {
                let l = strip_comment(lines[k]).trim_end();
                l.ends_with('{') || l.ends_with(';')
            }) else {
                continue;
            };
            if strip_comment(lines[open]).trim_end().ends_with(';') {
                continue;
            }
            // The body ends at the first later line that is a `}` at the signature's indentation.
            let indent = line.len() - t.len();
            let close = (open + 1..lines.len()).find(|&k| {
                let l = lines[k];
                l.len() > indent && l[..indent].trim().is_empty() && l[indent..].starts_with('}')
            });
            if let Some(close) = close {
                let len = close - n + 1;
                if len > MAX_FN_LINES {
                    problems.push(format!(
                        "src/{}:{}: a function of {len} lines",
                        f.path.display(),
                        n + 1
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}
