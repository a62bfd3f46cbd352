//! Hugging Face Hub repo ids (`org/name`, `org/name@revision`) resolved to a snapshot directory of
//! the local cache, laid out as `huggingface_hub` writes it:
//!
//! ```text
//! $HF_HUB_CACHE (else $HF_HOME/hub, else ${XDG_CACHE_HOME:-~/.cache}/huggingface/hub)
//!   models--org--name/
//!     refs/main              the commit hash a revision name points to
//!     snapshots/<commit>/    the files (links into blobs/)
//!     blobs/<sha>
//! ```
//!
//! Offline first: nothing is downloaded. A repo that is not in the cache is an error that says
//! where it looked and how to fetch it (`huggingface-cli download`). A path that exists locally
//! is always a path, never an id.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A repo id with its revision (`main` unless `@revision` names a branch, tag or commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoId {
    /// `org/name`.
    pub repo: String,
    /// A branch, tag or 40-hex commit.
    pub revision: String,
}

impl RepoId {
    /// `org/name` or `org/name@revision`; `None` for anything else (a path with more parts, an
    /// absolute or relative path, empty parts).
    pub fn parse(s: &str) -> Option<Self> {
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, rev),
            Some(_) => return None,
            None => (s, "main"),
        };
        let ok = |part: &str| {
            !part.is_empty()
                && !part.starts_with('.')
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let (org, name) = repo.split_once('/')?;
        // A branch or tag may hold `/` (`refs/pr/1`) but never leave the repo's folders.
        let rev_ok = revision.split('/').all(ok);
        (ok(org) && ok(name) && rev_ok).then(|| Self {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }

    /// The repo's folder name in the cache: `models--org--name`.
    pub fn folder(&self) -> String {
        format!("models--{}", self.repo.replace('/', "--"))
    }

    /// The folder of the dataset repo of this id: `datasets--org--name`.
    pub fn dataset_folder(&self) -> String {
        format!("datasets--{}", self.repo.replace('/', "--"))
    }
}

/// The cache directory, as `huggingface_hub` picks it: `HF_HUB_CACHE` (or the older
/// `HUGGINGFACE_HUB_CACHE`), else `HF_HOME/hub`, else `${XDG_CACHE_HOME:-~/.cache}/huggingface/hub`.
pub fn cache_dir() -> PathBuf {
    cache_dir_from(|k| std::env::var_os(k))
}

/// `cache_dir` with the environment read through `env`.
pub fn cache_dir_from(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> PathBuf {
    let var = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(c) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return c;
    }
    if let Some(h) = var("HF_HOME") {
        return h.join("hub");
    }
    let cache = var("XDG_CACHE_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface").join("hub")
}

/// The snapshot directory of the model repo `id` in the cache at `cache`.
pub fn snapshot_in(cache: &Path, id: &RepoId) -> Result<PathBuf> {
    snapshot_of(cache, id, &id.folder(), "")
}

/// The snapshot directory of the dataset repo `id` in the cache at `cache`.
pub fn dataset_snapshot_in(cache: &Path, id: &RepoId) -> Result<PathBuf> {
    snapshot_of(cache, id, &id.dataset_folder(), " --repo-type dataset")
}

fn snapshot_of(cache: &Path, id: &RepoId, folder: &str, cli_kind: &str) -> Result<PathBuf> {
    let repo_dir = cache.join(folder);
    let is_commit = id.revision.len() == 40 && id.revision.bytes().all(|b| b.is_ascii_hexdigit());
    let fetch = format!(
        "download it with `huggingface-cli download {}{cli_kind} --revision {}` (this build \
         does not download), or give a local path",
        id.repo, id.revision
    );
    let commit = if is_commit {
        id.revision.clone()
    } else {
        let r = repo_dir.join("refs").join(&id.revision);
        match std::fs::read_to_string(&r) {
            Ok(c) => c.trim().to_string(),
            Err(_) => {
                return Err(Error::Config(format!(
                    "{}@{} is not in the Hugging Face cache (no {}): {fetch}",
                    id.repo,
                    id.revision,
                    r.display()
                )))
            }
        }
    };
    let snap = repo_dir.join("snapshots").join(&commit);
    if !snap.is_dir() {
        return Err(Error::Config(format!(
            "{}@{} is not in the Hugging Face cache (no {}): {fetch}",
            id.repo,
            id.revision,
            snap.display()
        )));
    }
    Ok(snap)
}

/// `p` itself when it exists; else, when it reads as a repo id, its snapshot in the cache; else
/// `p` (whose absence the caller reports).
pub fn resolve(p: &Path) -> Result<PathBuf> {
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    match p.to_str().and_then(RepoId::parse) {
        Some(id) => snapshot_in(&cache_dir(), &id).map_err(|e| {
            Error::Config(format!(
                "{} is no local file or directory, and as a Hub repo id: {e}",
                p.display()
            ))
        }),
        None => Ok(p.to_path_buf()),
    }
}

/// Which files of a Hub dataset a data path without a file part means: a split (the first of
/// `splits` the dataset has) of a subset (a configuration), as `datasets.load_dataset(repo,
/// subset, split=...)` picks them.
#[derive(Debug, Clone, Copy)]
pub struct DataSplit<'a> {
    /// The configuration's folder, where the dataset has several.
    pub subset: Option<&'a str>,
    /// Split names in order of preference (`train`; for evaluation `validation`, then `test`).
    pub splits: &'a [&'a str],
}

/// A data path: `hf://datasets/org/name[@revision]/<path or glob inside the repo>` becomes that
/// path inside the dataset's snapshot in the cache; `hf://datasets/org/name[@revision]` alone
/// becomes the files of the split `select` names (see [`split_files`]); anything else is
/// returned as it is.
pub fn resolve_data(p: &Path, select: DataSplit<'_>) -> Result<PathBuf> {
    let Some(rest) = p.to_str().and_then(|s| s.strip_prefix("hf://datasets/")) else {
        return Ok(p.to_path_buf());
    };
    let bad = || {
        Error::Config(format!(
            "{}: expected hf://datasets/org/name[@revision][/<files inside the repo>]",
            p.display()
        ))
    };
    let mut parts = rest.splitn(3, '/');
    let (org, name_rev, inside) = (
        parts.next().ok_or_else(bad)?,
        parts.next().ok_or_else(bad)?,
        parts.next().unwrap_or(""),
    );
    let id = RepoId::parse(&format!("{org}/{name_rev}")).ok_or_else(bad)?;
    if inside.split('/').any(|c| c == "..") {
        return Err(bad());
    }
    let snap = dataset_snapshot_in(&cache_dir(), &id)?;
    if inside.is_empty() {
        return split_files(&snap, select).map_err(|e| {
            Error::Config(format!(
                "{}: {e} (or name the files: hf://datasets/{}/<path or glob>)",
                p.display(),
                id.repo
            ))
        });
    }
    Ok(snap.join(inside))
}

/// The glob of a split's files in a dataset snapshot, in the layouts the Hub's datasets use:
/// `[data/]<split>-*.<ext>` (what `push_to_hub` writes), `[data/]<split>.<ext>`, and
/// `<split>/*.<ext>` (the Parquet conversion), under `<subset>/` or `data/<subset>/` when a
/// subset is named; extensions `parquet`, `jsonl`, `json`. The first split of `select.splits`
/// with files wins; the first layout with files within it.
pub fn split_files(snap: &Path, select: DataSplit<'_>) -> Result<PathBuf> {
    let prefixes: Vec<String> = match select.subset {
        None => vec![String::new(), "data/".into()],
        Some(s) => vec![format!("{s}/"), format!("data/{s}/")],
    };
    for split in select.splits {
        for prefix in &prefixes {
            for ext in ["parquet", "jsonl", "json"] {
                for pattern in [
                    format!("{prefix}{split}-*.{ext}"),
                    format!("{prefix}{split}.{ext}"),
                    format!("{prefix}{split}/*.{ext}"),
                ] {
                    let full = snap.join(&pattern);
                    let found = glob::glob(&full.to_string_lossy())
                        .map(|mut g| g.next().is_some())
                        .unwrap_or(false);
                    if found {
                        return Ok(full);
                    }
                }
            }
        }
    }
    // What there is, so the user can pick: the data files, relative to the snapshot.
    let mut files: Vec<String> = glob::glob(&snap.join("**/*").to_string_lossy())
        .map(|g| {
            g.flatten()
                .filter(|f| {
                    f.extension()
                        .is_some_and(|e| e == "parquet" || e == "jsonl" || e == "json")
                })
                .filter_map(|f| f.strip_prefix(snap).ok().map(|r| r.display().to_string()))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let more = files.len().saturating_sub(10);
    files.truncate(10);
    Err(Error::Config(format!(
        "no files of split {}{} in {}; data files there: {}{}",
        select.splits.join(" or "),
        select
            .subset
            .map(|s| format!(" of subset {s}"))
            .unwrap_or_default(),
        snap.display(),
        if files.is_empty() {
            "none".to_string()
        } else {
            files.join(", ")
        },
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_paths_are_told_apart() {
        let id = RepoId::parse("Qwen/Qwen2.5-0.5B").unwrap();
        assert_eq!(
            (id.repo.as_str(), id.revision.as_str()),
            ("Qwen/Qwen2.5-0.5B", "main")
        );
        assert_eq!(id.folder(), "models--Qwen--Qwen2.5-0.5B");
        let id = RepoId::parse("org/name@v1.2").unwrap();
        assert_eq!(id.revision, "v1.2");
        for not_an_id in [
            "out/quickstart/model",
            "/abs/path",
            "./rel",
            "name",
            "org/",
            "/name",
            "a/b@",
            "../x",
        ] {
            assert_eq!(RepoId::parse(not_an_id), None, "{not_an_id}");
        }
    }
}
