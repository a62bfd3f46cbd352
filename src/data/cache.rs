//! The tokenization cache: a dataset's examples, origins and report stored under a key that hashes
//! everything that decides them (the data files' bytes, the tokenizer and its config, the template's
//! source, the data settings and the length options, this build's version), so a second run on the
//! same data starts training without rendering and tokenizing again. A changed input changes the
//! key; a cache file that does not read back is ignored and rebuilt.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::example::{Dataset, Example};
use super::report::DataReport;
use super::source::Loc;
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"PKSFTTC1";

/// Where cached datasets are kept.
#[derive(Debug, Clone)]
pub struct TokenCache {
    dir: PathBuf,
}

/// A key over byte strings: SHA-256 of the parts, each length-prefixed so that parts cannot run
/// into each other; the file name is its first 128 bits.
#[derive(Clone, Default)]
pub struct KeyHasher(Sha256);

impl KeyHasher {
    fn eat(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// Adds one part.
    pub fn part(&mut self, bytes: &[u8]) {
        self.eat(&(bytes.len() as u64).to_le_bytes());
        self.eat(bytes);
    }

    /// Adds a file's path and bytes.
    pub fn file(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        self.part(path.to_string_lossy().as_bytes());
        self.part(&bytes);
        Ok(())
    }

    /// The key, as a file name.
    pub fn finish(&self) -> String {
        let digest = self.0.clone().finalize();
        digest[..16].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl TokenCache {
    /// A cache in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// `PACKSFT_CACHE`, else `${XDG_CACHE_HOME:-~/.cache}/packsft`, with `tokenized/` below.
    pub fn default_dir() -> PathBuf {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let root = var("PACKSFT_CACHE").unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .or_else(|| var("HOME").map(|h| h.join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("packsft")
        });
        root.join("tokenized")
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.bin"))
    }

    /// The datasets stored under `key`, if they read back whole.
    pub fn load(&self, key: &str) -> Option<Vec<Dataset>> {
        let mut bytes = Vec::new();
        std::fs::File::open(self.path(key))
            .ok()?
            .read_to_end(&mut bytes)
            .ok()?;
        decode(&bytes)
    }

    /// Stores `datasets` under `key` (atomically).
    pub fn store(&self, key: &str, datasets: &[&Dataset]) -> Result<()> {
        crate::io::write_atomic(&self.path(key), &encode(datasets))
    }
}

fn encode(datasets: &[&Dataset]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    let u64s = |out: &mut Vec<u8>, v: u64| out.extend_from_slice(&v.to_le_bytes());
    u64s(&mut out, datasets.len() as u64);
    for ds in datasets {
        let mut files: Vec<Arc<Path>> = Vec::new();
        for o in &ds.origins {
            if !files.contains(&o.file) {
                files.push(o.file.clone());
            }
        }
        let head = serde_json::json!({
            "path": ds.path,
            "report": ds.report,
            "files": files.iter().map(|f| f.to_string_lossy()).collect::<Vec<_>>(),
        })
        .to_string();
        u64s(&mut out, head.len() as u64);
        out.extend_from_slice(head.as_bytes());
        u64s(&mut out, ds.examples.len() as u64);
        for (ex, o) in ds.examples.iter().zip(&ds.origins) {
            u64s(&mut out, ex.input_ids.len() as u64);
            for id in &ex.input_ids {
                out.extend_from_slice(&id.to_le_bytes());
            }
            out.extend(ex.loss_mask.iter().map(|&m| m as u8));
            let file = files.iter().position(|f| *f == o.file).expect("listed");
            u64s(&mut out, file as u64);
            u64s(&mut out, o.line.map_or(0, |l| l as u64 + 1));
            u64s(&mut out, o.row as u64);
        }
    }
    out
}

/// Reads `encode`'s bytes back; `None` for anything else.
fn decode(bytes: &[u8]) -> Option<Vec<Dataset>> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = bytes.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    if take(8)? != MAGIC {
        return None;
    }
    let mut out = Vec::new();
    let read_u64 = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap());
    let n_sets = read_u64(take(8)?) as usize;
    for _ in 0..n_sets {
        let head_len = read_u64(take(8)?) as usize;
        let head: serde_json::Value = serde_json::from_slice(take(head_len)?).ok()?;
        let report: DataReport = serde_json::from_value(head["report"].clone()).ok()?;
        let files: Vec<Arc<Path>> = head["files"]
            .as_array()?
            .iter()
            .map(|f| Some(Arc::from(Path::new(f.as_str()?))))
            .collect::<Option<_>>()?;
        let n = read_u64(take(8)?) as usize;
        let (mut examples, mut origins) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..n {
            let len = read_u64(take(8)?) as usize;
            let ids = take(len.checked_mul(4)?)?
                .chunks(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let mask = take(len)?.iter().map(|&b| b != 0).collect();
            examples.push(Example::new(ids, mask));
            let file = files.get(read_u64(take(8)?) as usize)?.clone();
            let line = read_u64(take(8)?);
            let row = read_u64(take(8)?) as usize;
            origins.push(Loc {
                file,
                line: (line > 0).then(|| line as usize - 1),
                row,
            });
        }
        out.push(Dataset {
            path: PathBuf::from(head["path"].as_str()?),
            examples,
            origins,
            report,
        });
    }
    (at == bytes.len()).then_some(out)
}
