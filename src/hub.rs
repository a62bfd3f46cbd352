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
//! Offline first: what the cache holds is used without asking the Hub. A repo (or a dataset
//! split) that is not there is downloaded into it, in that layout, with the `hf-hub` crate
//! (`HF_ENDPOINT`, `HF_TOKEN` or the token file honoured, a progress bar on a terminal), unless
//! `HF_HUB_OFFLINE` is set: then it is an error that says where it looked and how to fetch it.
//! A path that exists locally is always a path, never an id.

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
        "download it with `huggingface-cli download {}{cli_kind} --revision {}` (or let packsft \
         download it: leave HF_HUB_OFFLINE unset), or give a local path",
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

/// Whether the Hub must not be asked: `HF_HUB_OFFLINE` set to 1, ON, YES or TRUE (as
/// `huggingface_hub` reads it).
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_uppercase().as_str(),
            "1" | "ON" | "YES" | "TRUE"
        )
    })
}

/// Whether a cached model snapshot has what loading reads: a config (or an adapter's), and
/// its weights whole (every shard its index names).
fn model_complete(snap: &Path) -> bool {
    let config = snap.join("config.json").is_file() || snap.join("adapter_config.json").is_file();
    let index = snap.join("model.safetensors.index.json");
    let weights = if index.is_file() {
        index_shards(&index).is_ok_and(|s| s.iter().all(|f| snap.join(f).is_file()))
    } else {
        snap.join("model.safetensors").is_file() || snap.join("adapter_model.safetensors").is_file()
    };
    config && weights
}

/// The shard files that a sharded checkpoint's index (`model.safetensors.index.json`) lists in
/// its `weight_map`, each once, sorted. A name that is not a plain file name inside the model
/// directory is refused, not read or downloaded. The checkpoint loader (`model::weights`) and
/// the Hub download both read an index through this.
pub(crate) fn index_shards(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::model(index, format!("invalid JSON at line {}: {e}", e.line())))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::model(index, "missing object `weight_map`"))?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_owned))
        .collect();
    shards.sort();
    shards.dedup();
    if let Some(bad) = shards.iter().find(|s| {
        let p = Path::new(s.as_str());
        p.is_absolute()
            || p.components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
    }) {
        return Err(Error::model(
            index,
            format!("lists shard {bad:?}, which is not a file name inside the model directory"),
        ));
    }
    Ok(shards)
}

/// `p` itself when it exists; else, when it reads as a repo id, its snapshot in the cache, with
/// what the cache lacks downloaded first (unless offline; when the Hub cannot be reached, a
/// complete cached snapshot is used with a warning, as `huggingface_hub` does); else `p`
/// (whose absence the caller reports).
pub fn resolve(p: &Path) -> Result<PathBuf> {
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    let Some(id) = p.to_str().and_then(RepoId::parse) else {
        return Ok(p.to_path_buf());
    };
    let cache = cache_dir();
    let named = |e: Error| {
        Error::Config(format!(
            "{} is no local file or directory, and as a Hub repo id: {e}",
            p.display()
        ))
    };
    if offline() {
        return snapshot_in(&cache, &id)
            .map_err(|e| named(Error::Config(format!("{e} (HF_HUB_OFFLINE is set)"))));
    }
    match download_model(&cache, &id) {
        Ok(snap) => Ok(snap),
        Err(e) => match snapshot_in(&cache, &id) {
            Ok(snap) if model_complete(&snap) => {
                tracing::warn!("{e}; using the cached snapshot {}", snap.display());
                Ok(snap)
            }
            _ => Err(named(e)),
        },
    }
}

/// A repo of models or of datasets.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Model,
    Dataset,
}

/// The Hub's handle on the repo `id` and its file list at the revision (one request), with the
/// cache at `cache` to download into.
fn open_repo(
    cache: &Path,
    id: &RepoId,
    kind: Kind,
) -> Result<(hf_hub::api::sync::ApiRepo, hf_hub::api::RepoInfo)> {
    use hf_hub::api::sync::ApiBuilder;
    let endpoint = std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| "https://huggingface.co".to_string());
    check_reachable(&endpoint, std::time::Duration::from_secs(10)).map_err(|why| {
        Error::Config(format!(
            "{}@{}: the Hub at {endpoint} {why}; set HF_HUB_OFFLINE=1 to use only the local \
             cache ({})",
            id.repo,
            id.revision,
            cache.display()
        ))
    })?;
    let mut builder = ApiBuilder::from_env()
        .with_cache_dir(cache.to_path_buf())
        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if let Some(t) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
        builder = builder.with_token(Some(t));
    }
    let api = builder
        .build()
        .map_err(|e| hub_err(cache, id, "connecting", e))?;
    let repo_type = match kind {
        Kind::Model => hf_hub::RepoType::Model,
        Kind::Dataset => hf_hub::RepoType::Dataset,
    };
    let repo = api.repo(hf_hub::Repo::with_revision(
        id.repo.clone(),
        repo_type,
        id.revision.clone(),
    ));
    let info = repo
        .info()
        .map_err(|e| hub_err(cache, id, "listing the files", e))?;
    Ok((repo, info))
}

/// Whether a TCP connection to the endpoint's host opens within `timeout`. The Hub client has
/// no timeout of its own, so behind a firewall that drops packets a request would wait for the
/// system's (minutes); `huggingface_hub` gives up on its first request after 10 s.
fn check_reachable(
    endpoint: &str,
    timeout: std::time::Duration,
) -> std::result::Result<(), String> {
    use std::net::ToSocketAddrs;
    let (scheme, rest) = endpoint.split_once("://").unwrap_or(("https", endpoint));
    let host = rest.split('/').next().unwrap_or(rest);
    let with_port = if host
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host.to_string()
    } else {
        format!("{host}:{}", if scheme == "http" { 80 } else { 443 })
    };
    let addrs: Vec<_> = (with_port.to_socket_addrs())
        .map_err(|e| format!("could not be resolved ({e})"))?
        .collect();
    let mut last = String::from("has no address");
    for a in addrs {
        match std::net::TcpStream::connect_timeout(&a, timeout) {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("could not be reached within {} s ({e})", timeout.as_secs()),
        }
    }
    Err(last)
}

/// An error of the Hub client, naming the repo, what was being done, and the likely cause.
fn hub_err(cache: &Path, id: &RepoId, what: &str, e: hf_hub::api::sync::ApiError) -> Error {
    use hf_hub::api::sync::ApiError;
    let hint = match &e {
        ApiError::RequestError(r) if matches!(**r, ureq::Error::Status(401 | 403, _)) => {
            " (a gated or private repo: set HF_TOKEN, or log in with `huggingface-cli login`)"
        }
        ApiError::RequestError(r) if matches!(**r, ureq::Error::Status(404, _)) => {
            " (no such repo, revision or file on the Hub)"
        }
        _ => "",
    };
    Error::Config(format!(
        "{}@{}: {what} from the Hub failed: {e}{hint}; set HF_HUB_OFFLINE=1 to use only the \
         local cache ({})",
        id.repo,
        id.revision,
        cache.display()
    ))
}

/// Downloads `files` of the repo into the cache (what is there already is not fetched again).
fn fetch(
    repo: &hf_hub::api::sync::ApiRepo,
    cache: &Path,
    id: &RepoId,
    files: &[String],
) -> Result<()> {
    for f in files {
        repo.get(f)
            .map_err(|e| hub_err(cache, id, &format!("downloading {f}"), e))?;
    }
    Ok(())
}

/// The snapshot of the model repo `id`, downloaded into the cache: the top-level configs,
/// tokenizer files and chat templates, then the weights: the shards the index names, or
/// `model.safetensors`, or a PEFT adapter's `adapter_model.safetensors` (never a second copy
/// such as `consolidated.safetensors`, nor `original/` or ONNX exports; none in a tokenizer's
/// repo).
fn download_model(cache: &Path, id: &RepoId) -> Result<PathBuf> {
    let (repo, info) = open_repo(cache, id, Kind::Model)?;
    let names: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let has = |f: &str| names.iter().any(|n| n == f);
    let meta: Vec<String> = (names.iter())
        .filter(|n| {
            !n.contains('/')
                && (n.ends_with(".json") || n.ends_with(".jinja") || *n == "tokenizer.model")
        })
        .cloned()
        .collect();
    tracing::info!(
        "{}@{}: fetching into {}",
        id.repo,
        id.revision,
        cache.display()
    );
    fetch(&repo, cache, id, &meta)?;
    let snap = cache.join(id.folder()).join("snapshots").join(&info.sha);
    let weights = if has("model.safetensors.index.json") {
        index_shards(&snap.join("model.safetensors.index.json"))?
    } else if has("model.safetensors") {
        vec!["model.safetensors".to_string()]
    } else if has("adapter_model.safetensors") {
        vec!["adapter_model.safetensors".to_string()]
    } else {
        // A tokenizer's repo (`model.tokenizer`) has none; a model path without them fails
        // where the weights are read, naming the snapshot.
        tracing::warn!(
            "{}@{}: no safetensors weights on the Hub (model.safetensors, its sharded index, or \
             a PEFT adapter's adapter_model.safetensors); the repo has: {}",
            id.repo,
            id.revision,
            names.join(", ")
        );
        Vec::new()
    };
    fetch(&repo, cache, id, &weights)?;
    Ok(snap)
}

/// The files of a dataset repo that `inside` names (a path, a glob whose `*` stays within a
/// folder as a file-system glob's does, or a folder: its data files), or, with `inside` empty,
/// those of the split `select` names; downloaded into the cache. Returns the path in the
/// snapshot that the data loader reads.
fn download_dataset(
    cache: &Path,
    id: &RepoId,
    inside: &str,
    select: DataSplit<'_>,
) -> Result<PathBuf> {
    let (repo, info) = open_repo(cache, id, Kind::Dataset)?;
    let names: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    let data =
        |n: &&String| n.ends_with(".parquet") || n.ends_with(".jsonl") || n.ends_with(".json");
    let chosen = if inside.is_empty() {
        split_pattern(&names, select).ok_or_else(|| split_missing(&names, select))?
    } else {
        inside.trim_end_matches('/').to_string()
    };
    let folder = format!("{chosen}/");
    let files: Vec<String> = if names.iter().any(|n| n.starts_with(&folder)) {
        names
            .iter()
            .filter(|n| n.starts_with(&folder))
            .filter(data)
            .cloned()
            .collect()
    } else {
        let pattern = glob::Pattern::new(&chosen)
            .map_err(|e| Error::Config(format!("{chosen}: not a glob: {e}")))?;
        let opts = glob::MatchOptions {
            require_literal_separator: true,
            ..Default::default()
        };
        names
            .iter()
            .filter(|n| pattern.matches_with(n, opts))
            .cloned()
            .collect()
    };
    if files.is_empty() {
        let mut listed: Vec<&String> = names.iter().filter(data).collect();
        listed.truncate(10);
        return Err(Error::Config(format!(
            "{}@{}: no file of the repo matches {chosen} (data files there: {})",
            id.repo,
            id.revision,
            listed
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    tracing::info!(
        "{}@{}: fetching {} file(s) into {}",
        id.repo,
        id.revision,
        files.len(),
        cache.display()
    );
    fetch(&repo, cache, id, &files)?;
    let snap = cache
        .join(id.dataset_folder())
        .join("snapshots")
        .join(&info.sha);
    Ok(snap.join(chosen))
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
    let cache = cache_dir();
    let named = |e: Error| {
        Error::Config(format!(
            "{}: {e} (or name the files: hf://datasets/{}/<path or glob>)",
            p.display(),
            id.repo
        ))
    };
    // What the cache holds, for offline runs and when the Hub cannot be reached.
    let cached = || -> Result<PathBuf> {
        let snap = dataset_snapshot_in(&cache, &id)?;
        if inside.is_empty() {
            split_files(&snap, select)
        } else {
            Ok(snap.join(inside))
        }
    };
    if offline() {
        return cached().map_err(|e| named(Error::Config(format!("{e} (HF_HUB_OFFLINE is set)"))));
    }
    match download_dataset(&cache, &id, inside, select) {
        Ok(path) => Ok(path),
        Err(e) => match cached() {
            Ok(path)
                if glob::glob(&path.to_string_lossy()).is_ok_and(|mut g| g.next().is_some()) =>
            {
                tracing::warn!("{e}; using the cached files {}", path.display());
                Ok(path)
            }
            _ => Err(named(e)),
        },
    }
}

/// The glob of a split's files in a dataset snapshot, in the layouts the Hub's datasets use:
/// `[data/]<split>-*.<ext>` (what `push_to_hub` writes), `[data/]<split>.<ext>`, and
/// `<split>/*.<ext>` (the Parquet conversion), under `<subset>/` or `data/<subset>/` when a
/// subset is named; extensions `parquet`, `jsonl`, `json`. The first split of `select.splits`
/// with files wins; the first layout with files within it.
pub fn split_files(snap: &Path, select: DataSplit<'_>) -> Result<PathBuf> {
    // The snapshot's files, relative to it (links into blobs/ included).
    let names: Vec<String> = glob::glob(&snap.join("**/*").to_string_lossy())
        .map(|g| {
            g.flatten()
                .filter(|f| f.is_file())
                .filter_map(|f| f.strip_prefix(snap).ok().map(|r| r.display().to_string()))
                .collect()
        })
        .unwrap_or_default();
    match split_pattern(&names, select) {
        Some(pattern) => Ok(snap.join(pattern)),
        None => Err(Error::Config(format!(
            "{} in {}",
            split_missing(&names, select),
            snap.display()
        ))),
    }
}

/// The glob (relative to a snapshot) of the split `select` names among a dataset repo's files
/// `names`, by the rules of [`split_files`]; `None` when no split has files.
fn split_pattern(names: &[String], select: DataSplit<'_>) -> Option<String> {
    let prefixes: Vec<String> = match select.subset {
        None => vec![String::new(), "data/".into()],
        Some(s) => vec![format!("{s}/"), format!("data/{s}/")],
    };
    let opts = glob::MatchOptions {
        require_literal_separator: true,
        ..Default::default()
    };
    for split in select.splits {
        for prefix in &prefixes {
            for ext in ["parquet", "jsonl", "json"] {
                for pattern in [
                    format!("{prefix}{split}-*.{ext}"),
                    format!("{prefix}{split}.{ext}"),
                    format!("{prefix}{split}/*.{ext}"),
                ] {
                    let Ok(p) = glob::Pattern::new(&pattern) else {
                        continue;
                    };
                    if names.iter().any(|n| p.matches_with(n, opts)) {
                        return Some(pattern);
                    }
                }
            }
        }
    }
    None
}

/// The error of a split with no files: which split, and the data files there are instead.
fn split_missing(names: &[String], select: DataSplit<'_>) -> Error {
    let mut files: Vec<String> = (names.iter())
        .filter(|n| n.ends_with(".parquet") || n.ends_with(".jsonl") || n.ends_with(".json"))
        .cloned()
        .collect();
    files.sort();
    let more = files.len().saturating_sub(10);
    files.truncate(10);
    Error::Config(format!(
        "no files of split {}{}; data files there: {}{}",
        select.splits.join(" or "),
        select
            .subset
            .map(|s| format!(" of subset {s}"))
            .unwrap_or_default(),
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
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe before the Hub client: a listening host passes, a closed port and an
    /// unresolvable name are errors that say which.
    #[test]
    fn the_hub_is_probed_with_a_timeout() {
        let t = std::time::Duration::from_secs(2);
        let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = open.local_addr().unwrap().port();
        assert_eq!(
            check_reachable(&format!("http://127.0.0.1:{port}"), t),
            Ok(())
        );
        drop(open);
        let closed = check_reachable(&format!("http://127.0.0.1:{port}/x"), t).unwrap_err();
        assert!(
            closed.contains("could not be reached within 2 s"),
            "{closed}"
        );
        let unknown = check_reachable("https://no-such-host.invalid", t).unwrap_err();
        assert!(unknown.contains("could not be resolved"), "{unknown}");
    }

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
