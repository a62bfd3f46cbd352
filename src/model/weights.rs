//! Reading and writing Hugging Face safetensors checkpoints.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::{safetensors::MmapedSafetensors, DType, Device, Tensor};

use crate::error::{Error, Result};

/// A checkpoint's configuration file.
pub const CONFIG_FILE: &str = "config.json";
/// The single-file checkpoint in a model directory (what `DecoderModel::save` writes).
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint: its `weight_map` names the shard of each tensor.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// The tensors of a checkpoint directory: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`.
pub struct CheckpointWeights {
    dir: PathBuf,
    st: MmapedSafetensors,
    used: HashSet<String>,
    names: Vec<String>,
}

impl CheckpointWeights {
    /// Memory-maps the checkpoint in `dir`: `model.safetensors` if present, else every shard
    /// the index lists. A `pytorch_model.bin` alone is an error (it is not read).
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join(WEIGHTS_FILE);
        let index = dir.join(WEIGHTS_INDEX_FILE);
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            // Shards live in the model directory: a path that leaves it is refused, not read.
            let shards = crate::hub::index_shards(&index)?;
            let files: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            if let Some(missing) = files.iter().find(|f| !f.exists()) {
                return Err(Error::model(
                    &index,
                    format!("lists shard {} which does not exist", missing.display()),
                ));
            }
            files
        } else {
            let hint = if dir.join("pytorch_model.bin").exists() {
                " (pytorch_model.bin is not read: convert the checkpoint to safetensors)"
            } else {
                ""
            };
            return Err(Error::model(
                dir,
                format!("no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in the model directory{hint}"),
            ));
        };
        Self::from_files(dir, &files)
    }

    /// One safetensors file (a PEFT adapter's `adapter_model.safetensors`), named by `path`.
    pub fn open_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::model(path, "file does not exist"));
        }
        Self::from_files(path, &[path.to_path_buf()])
    }

    /// `files` as one checkpoint; errors name `dir`.
    fn from_files(dir: &Path, files: &[PathBuf]) -> Result<Self> {
        // SAFETY: the files are memory-mapped read-only; a checkpoint modified while training
        // reads it is outside what any loader can guard against.
        let st = unsafe { MmapedSafetensors::multi(files) }
            .map_err(|e| Error::model(dir, format!("cannot read safetensors: {e}")))?;
        let names = st.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Self {
            dir: dir.to_path_buf(),
            st,
            used: HashSet::new(),
            names,
        })
    }

    /// The shape of every tensor in the checkpoint (read from the headers).
    pub fn shapes(&self) -> Vec<Vec<usize>> {
        self.st
            .tensors()
            .into_iter()
            .map(|(_, v)| v.shape().to_vec())
            .collect()
    }

    /// Every tensor name, in the files' order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The shape of tensor `name`, from the headers.
    pub fn shapes_of(&self, name: &str) -> Result<Vec<usize>> {
        self.st
            .tensors()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.shape().to_vec())
            .ok_or_else(|| {
                Error::model(
                    &self.dir,
                    format!("weight `{name}` is missing from the checkpoint"),
                )
            })
    }

    /// Whether the checkpoint holds a tensor named `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    /// Loads `name`, checks its shape, converts to `dtype`.
    pub fn get(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        if !self.contains(name) {
            return Err(Error::model(
                &self.dir,
                format!("weight `{name}` is missing from the checkpoint"),
            ));
        }
        let t = self.st.load(name, device)?;
        if t.dims() != shape {
            return Err(Error::model(
                &self.dir,
                format!(
                    "weight `{name}` has shape {:?}, config.json implies {shape:?}",
                    t.dims()
                ),
            ));
        }
        self.used.insert(name.to_string());
        Ok(t.to_dtype(dtype)?)
    }

    /// Checks that `name` exists with `shape` (from the headers, nothing loaded) and counts it
    /// as read.
    pub fn check(&mut self, name: &str, shape: &[usize]) -> Result<()> {
        let found = self
            .st
            .tensors()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.shape().to_vec());
        match found {
            None => Err(Error::model(
                &self.dir,
                format!("weight `{name}` is missing from the checkpoint"),
            )),
            Some(s) if s != shape => Err(Error::model(
                &self.dir,
                format!("weight `{name}` has shape {s:?}, config.json implies {shape:?}"),
            )),
            Some(_) => {
                self.used.insert(name.to_string());
                Ok(())
            }
        }
    }

    /// Names present in the checkpoint that the model did not read.
    pub fn unused(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .names
            .iter()
            .filter(|n| !self.used.contains(*n))
            .cloned()
            .collect();
        v.sort();
        v
    }
}

/// Writes `tensors` as one safetensors file, atomically, with the `format: pt` metadata that
/// transformers checks for.
pub fn save_safetensors(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let contiguous: BTreeMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.contiguous()?)))
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let tmp = crate::io::tmp_sibling(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let written = safetensors::serialize_to_file(
        contiguous.iter().map(|(k, t)| (k.as_str(), t)),
        Some(meta),
        &tmp,
    )
    .map_err(|e| Error::model(path, format!("cannot write safetensors: {e}")))
    .and_then(|_| {
        // safetensors writes through a private temporary file (mode 0600): give the weights the
        // mode every other output gets, and have them on disk before the rename publishes them,
        // as io::write_atomic does.
        crate::io::match_new_file_mode(&tmp)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&tmp, e))
    })
    .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
