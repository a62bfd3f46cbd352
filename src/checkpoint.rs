//! Checkpoints: `output_dir/checkpoint-<step>/` holds the model in Hugging Face layout, the
//! optimizer moments, and the trainer state (step, data position, seed, ...) needed to resume a
//! run exactly. A checkpoint is written into a hidden temporary directory and renamed into
//! place, so a crash mid-save never leaves a half-written `checkpoint-<step>`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const FORMAT_VERSION: u32 = 1;

/// Everything besides weights and moments that resuming needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    pub format_version: u32,
    /// Optimizer steps completed.
    pub global_step: usize,
    pub total_steps: usize,
    /// Data position: the epoch being read and how many examples of its order were consumed.
    pub epoch: usize,
    pub cursor: usize,
    pub seed: u64,
    pub shuffle: bool,
    pub n_train_examples: usize,
    pub examples_per_step: usize,
    /// Batching that decides the data position of every later step.
    pub max_tokens_per_batch: Option<usize>,
    pub group_by_length: bool,
    /// FNV-1a hash of the training examples' token ids: the same data, not only as many rows.
    pub data_hash: u64,
    /// Names and shapes of the model's parameters, to refuse a checkpoint of another model.
    pub param_shapes: Vec<(String, Vec<usize>)>,
    pub best_eval_loss: Option<f64>,
}

impl TrainerState {
    pub fn load(dir: &Path) -> Result<Self> {
        let p = dir.join(STATE_FILE);
        if !dir.is_dir() {
            return Err(Error::model(dir, "resume_from: not a directory"));
        }
        if !p.exists() {
            return Err(Error::model(
                dir,
                format!("resume_from: not a packsft checkpoint (no {STATE_FILE})"),
            ));
        }
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        let s: TrainerState = serde_json::from_str(&text)
            .map_err(|e| Error::model(&p, format!("line {}: {e}", e.line())))?;
        if s.format_version != FORMAT_VERSION {
            return Err(Error::model(
                &p,
                format!(
                    "format_version {} (this packsft reads {FORMAT_VERSION})",
                    s.format_version
                ),
            ));
        }
        Ok(s)
    }
}

pub fn checkpoint_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// Complete checkpoints in `output_dir`, oldest first.
pub fn list(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            let p = e.path();
            p.join(STATE_FILE).exists().then_some((step, p))
        })
        .collect();
    v.sort();
    v
}

pub fn latest(output_dir: &Path) -> Option<PathBuf> {
    list(output_dir).pop().map(|(_, p)| p)
}

/// Writes a checkpoint with `write` filling a fresh temporary directory, then renames it to
/// `checkpoint-<step>` (replacing an older one of the same step) and prunes to `keep` newest.
pub fn save(
    output_dir: &Path,
    step: usize,
    keep: Option<usize>,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let final_dir = checkpoint_dir(output_dir, step);
    let tmp = output_dir.join(format!(".checkpoint-{step}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // An older checkpoint of the same step is moved aside before the new one takes its name,
    // so at every instant one complete checkpoint-<step> exists (or can be recovered).
    let old = output_dir.join(format!(".checkpoint-{step}.old-{}", std::process::id()));
    if final_dir.exists() {
        std::fs::rename(&final_dir, &old).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    if let Some(keep) = keep {
        let all = list(output_dir);
        let excess = all.len().saturating_sub(keep.max(1));
        for (_, p) in all.into_iter().take(excess) {
            std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(final_dir)
}
