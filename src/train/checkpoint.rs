//! Checkpoints: `output_dir/checkpoint-<step>/` holds the model in Hugging Face layout, the
//! optimizer moments, and the trainer state (step, data position, seed, ...) needed to resume a
//! run exactly. A checkpoint is written into a hidden temporary directory and renamed into
//! place, so a crash mid-save never leaves a half-written `checkpoint-<step>`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The `TrainerState` of a checkpoint, as JSON; its presence marks a checkpoint as complete.
pub const STATE_FILE: &str = "trainer_state.json";
/// The AdamW moments and update counts of a checkpoint (`AdamW::state_tensors`).
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The `format_version` this packsft writes; a checkpoint with another one is refused.
pub const FORMAT_VERSION: u32 = 1;

/// Everything besides weights and moments that resuming needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Layout version of the checkpoint (`FORMAT_VERSION` when written).
    pub format_version: u32,
    /// Optimizer steps completed.
    pub global_step: usize,
    /// Optimizer steps of the whole run (the length the lr schedule runs over).
    pub total_steps: usize,
    /// Data position: the epoch being read and how many examples of its order were consumed.
    pub epoch: usize,
    /// Examples of the current epoch's order already consumed.
    pub cursor: usize,
    /// Seed of the data order (`TrainerConfig::seed`).
    pub seed: u64,
    /// Whether the examples are shuffled every epoch.
    pub shuffle: bool,
    /// Number of training examples.
    pub n_train_examples: usize,
    /// `batch_size * grad_accum` of the trainer config.
    pub examples_per_step: usize,
    /// Batching that decides the data position of every later step.
    pub max_tokens_per_batch: Option<usize>,
    /// Whether examples of similar length are batched together (also decides the data order).
    pub group_by_length: bool,
    /// FNV-1a hash of the training examples' token ids: the same data, not only as many rows.
    pub data_hash: u64,
    /// Names and shapes of the model's parameters, to refuse a checkpoint of another model.
    pub param_shapes: Vec<(String, Vec<usize>)>,
    /// Lowest eval loss reached so far; `None` before the first evaluation.
    pub best_eval_loss: Option<f64>,
}

impl TrainerState {
    /// Whether a run described by `self` can resume exactly from a checkpoint whose state is
    /// `saved`: same seed, shuffling, data (count and hash), batching and total steps, so the
    /// resumed run visits the same examples in the same steps. The message names the first
    /// setting that differs, with both values.
    pub fn check_compatible(&self, saved: &TrainerState) -> std::result::Result<(), String> {
        let fields: [(&str, String, String); 8] = [
            ("train.seed", self.seed.to_string(), saved.seed.to_string()),
            (
                "train.shuffle",
                self.shuffle.to_string(),
                saved.shuffle.to_string(),
            ),
            (
                "the number of training examples",
                self.n_train_examples.to_string(),
                saved.n_train_examples.to_string(),
            ),
            (
                "examples per step",
                self.examples_per_step.to_string(),
                saved.examples_per_step.to_string(),
            ),
            (
                "the total steps",
                self.total_steps.to_string(),
                saved.total_steps.to_string(),
            ),
            (
                "train.max_tokens_per_batch",
                format!("{:?}", self.max_tokens_per_batch),
                format!("{:?}", saved.max_tokens_per_batch),
            ),
            (
                "train.group_by_length",
                self.group_by_length.to_string(),
                saved.group_by_length.to_string(),
            ),
            (
                "the training data (hash of its token ids)",
                format!("{:016x}", self.data_hash),
                format!("{:016x}", saved.data_hash),
            ),
        ];
        match fields.into_iter().find(|(_, ours, theirs)| ours != theirs) {
            Some((what, ours, theirs)) => Err(format!(
                "cannot resume exactly: checkpoint has {what} = {theirs}, this run {ours}"
            )),
            None => Ok(()),
        }
    }

    /// Reads `trainer_state.json` of a checkpoint directory.
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

/// The directory of the checkpoint after optimizer step `step`: `output_dir/checkpoint-<step>`.
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

/// The newest complete checkpoint in `output_dir` (highest step), if any.
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
        for (step, p) in all.into_iter().take(excess) {
            // Renamed away first, then deleted: a kill while deleting leaves a hidden leftover
            // (swept at the next start), never a half-deleted `checkpoint-<step>`.
            let doomed =
                output_dir.join(format!(".checkpoint-{step}.pruned-{}", std::process::id()));
            std::fs::rename(&p, &doomed).map_err(|e| Error::io(&p, e))?;
            std::fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))?;
        }
    }
    Ok(final_dir)
}

/// Whether `name` is what a run leaves in its output directory while writing: a checkpoint being
/// written, replaced or pruned (`.checkpoint-<step>.{tmp,old,pruned}-<pid>`), a file being
/// replaced (`.<name>.tmp-<pid>`), or the safetensors crate's temporary file (`.tmpXXXXXX`).
fn is_leftover(name: &str) -> bool {
    let Some(rest) = name.strip_prefix('.') else {
        return false;
    };
    // The safetensors crate's own temporary file (the tempfile crate's `.tmpXXXXXX`).
    if let Some(r) = rest.strip_prefix("tmp") {
        if r.len() == 6 && r.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return true;
        }
    }
    [".tmp-", ".old-", ".pruned-"].iter().any(|tag| {
        rest.rsplit_once(tag)
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// Removes what killed runs left in `output_dir` (see `is_leftover`); a checkpoint directory
/// being replaced (`.old-`) whose new one never took its name is put back first. Call it with
/// the directory's lock held (`lock::OutputLock`), so no live run's files are touched. Returns
/// what it removed.
pub fn sweep(output_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return Ok(removed);
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !is_leftover(&name) {
            continue;
        }
        let p = e.path();
        if let Some(step) = name
            .strip_prefix(".checkpoint-")
            .and_then(|r| r.split_once(".old-"))
            .and_then(|(s, _)| s.parse::<usize>().ok())
        {
            let home = checkpoint_dir(output_dir, step);
            if !home.exists() && p.join(STATE_FILE).exists() {
                std::fs::rename(&p, &home).map_err(|e| Error::io(&p, e))?;
                tracing::warn!(checkpoint = %home.display(), "put back a checkpoint a killed run was replacing");
                continue;
            }
        }
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|e| Error::io(&p, e))?;
        removed.push(p);
    }
    if !removed.is_empty() {
        tracing::warn!(
            output_dir = %output_dir.display(),
            n = removed.len(),
            "removed what an interrupted run left behind"
        );
    }
    Ok(removed)
}

/// Why the checkpoint in `dir` cannot be resumed from, if it cannot: its state, its weights'
/// and its optimizer state's safetensors headers must all read.
pub fn damage(dir: &Path) -> Option<String> {
    if let Err(e) = TrainerState::load(dir) {
        return Some(e.to_string());
    }
    if let Err(e) = crate::model::weights::CheckpointWeights::open(dir) {
        return Some(e.to_string());
    }
    let opt = dir.join(OPTIMIZER_FILE);
    // SAFETY: mapped read-only to check the header against the file's length; nothing is kept.
    unsafe { candle_core::safetensors::MmapedSafetensors::new(&opt) }
        .err()
        .map(|e| format!("{}: {e}", opt.display()))
}

/// The newest checkpoint in `output_dir` that can be resumed from; newer damaged ones are
/// skipped with a warning naming what is wrong.
pub fn latest_complete(output_dir: &Path) -> Option<PathBuf> {
    for (_, p) in list(output_dir).into_iter().rev() {
        match damage(&p) {
            None => return Some(p),
            Some(why) => {
                tracing::warn!(checkpoint = %p.display(), "skipping a damaged checkpoint: {why}")
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> TrainerState {
        TrainerState {
            format_version: FORMAT_VERSION,
            global_step: 3,
            total_steps: 10,
            epoch: 0,
            cursor: 24,
            seed: 42,
            shuffle: true,
            n_train_examples: 80,
            examples_per_step: 8,
            max_tokens_per_batch: None,
            group_by_length: false,
            data_hash: 0xfeed,
            param_shapes: vec![("w".into(), vec![2, 3])],
            best_eval_loss: Some(1.5),
        }
    }

    #[test]
    fn leftovers_of_killed_runs_are_recognised_and_checkpoints_are_not() {
        for name in [
            ".checkpoint-12.tmp-4711",
            ".checkpoint-3.old-99",
            ".checkpoint-5.pruned-1",
            ".metrics.jsonl.tmp-123",
            ".model.safetensors.tmp-8",
            ".tmpA1b2C3",
        ] {
            assert!(is_leftover(name), "{name}");
        }
        for name in [
            "checkpoint-12",
            "metrics.jsonl",
            ".packsft.lock",
            ".checkpoint-12.tmp-",
            ".notes.tmp-abc",
            "model.safetensors",
        ] {
            assert!(!is_leftover(name), "{name}");
        }
    }

    #[test]
    fn a_sweep_removes_leftovers_and_puts_back_a_checkpoint_being_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join(".checkpoint-4.tmp-77")).unwrap();
        std::fs::write(d.join(".checkpoint-4.tmp-77/model.safetensors"), b"half").unwrap();
        std::fs::write(d.join(".metrics.jsonl.tmp-77"), b"x").unwrap();
        std::fs::create_dir_all(d.join(".checkpoint-2.pruned-77")).unwrap();
        std::fs::create_dir_all(d.join(".checkpoint-6.old-77")).unwrap();
        std::fs::write(d.join(".checkpoint-6.old-77").join(STATE_FILE), b"{}").unwrap();
        std::fs::create_dir_all(d.join("checkpoint-8")).unwrap();
        std::fs::write(d.join("checkpoint-8").join(STATE_FILE), b"{}").unwrap();
        let removed = sweep(d).unwrap();
        assert_eq!(removed.len(), 3, "{removed:?}");
        let mut left: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["checkpoint-6", "checkpoint-8"]);
    }

    #[test]
    fn a_run_is_compatible_with_its_own_checkpoint_whatever_its_progress() {
        let saved = state();
        let mut fresh = state();
        (fresh.global_step, fresh.cursor, fresh.best_eval_loss) = (0, 0, None);
        assert_eq!(fresh.check_compatible(&saved), Ok(()));
    }

    #[test]
    fn each_setting_that_moves_the_data_is_named_with_both_values() {
        let saved = state();
        type Change = fn(&mut TrainerState);
        let cases: Vec<(Change, &str)> = vec![
            (|s| s.seed = 7, "train.seed = 42, this run 7"),
            (
                |s| s.shuffle = false,
                "train.shuffle = true, this run false",
            ),
            (
                |s| s.n_train_examples = 81,
                "training examples = 80, this run 81",
            ),
            (
                |s| s.examples_per_step = 16,
                "examples per step = 8, this run 16",
            ),
            (|s| s.total_steps = 11, "the total steps = 10, this run 11"),
            (
                |s| s.max_tokens_per_batch = Some(512),
                "max_tokens_per_batch = None, this run Some(512)",
            ),
            (
                |s| s.group_by_length = true,
                "group_by_length = false, this run true",
            ),
            (
                |s| s.data_hash = 1,
                "= 000000000000feed, this run 0000000000000001",
            ),
        ];
        for (change, expect) in cases {
            let mut ours = state();
            change(&mut ours);
            let e = ours.check_compatible(&saved).unwrap_err();
            assert!(
                e.starts_with("cannot resume exactly: checkpoint has "),
                "{e}"
            );
            assert!(e.contains(expect), "{e} should contain {expect}");
        }
    }
}
