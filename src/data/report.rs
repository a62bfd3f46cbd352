//! What reading a dataset did: rows kept and dropped (and why), truncations, masks that found no
//! template, and the thresholds that stop a run before anything is written.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Thresholds on the dataset report that stop a run before training.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DataLimits {
    /// Most rows that may be dropped (too long, no target, template missing), as a fraction.
    pub max_dropped_fraction: Option<f64>,
    /// Most rows that may be truncated to `max_length`, as a fraction.
    pub max_truncated_fraction: Option<f64>,
    /// Most rows whose response (or instruction) template is missing, as a fraction.
    pub max_template_missing_fraction: Option<f64>,
    /// Fewest target tokens per token.
    pub min_supervised_ratio: Option<f64>,
}

/// What loading a dataset did, for the log, `packsft inspect` and thresholds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataReport {
    /// The row format the dataset was read as (detected or given), by its recipe name.
    pub format: String,
    /// The name of the prompt or chat template applied; `None`: none was (text, pre-tokenized
    /// or plain prompt/completion rows).
    pub template: Option<String>,
    /// `spans` or `response_template`.
    pub method: String,
    /// Which tokens carried loss (`completion`, `assistant`, `last_assistant` or `all`), as
    /// given or defaulted from the format.
    pub loss_on: String,
    /// Rows read (of this split, when an eval set is split off).
    pub rows: usize,
    /// Examples kept: `rows` less the dropped ones.
    pub examples: usize,
    /// Rows cut to `max_length` (`keep_start` or `keep_end` truncation).
    pub truncated: usize,
    /// Rows dropped for being longer than `max_length` (`data.truncation: drop`).
    pub dropped_too_long: usize,
    /// Rows dropped because no token of theirs (after the first) is a target.
    pub dropped_no_target: usize,
    /// Dropped because the response or instruction template was not found (TRL method).
    pub dropped_template_missing: usize,
    /// Rows in which the response template was not found (TRL method; they are dropped).
    pub response_template_missing: usize,
    /// Rows in which the instruction template was not found (TRL multi-turn; they are dropped).
    pub instruction_template_missing: usize,
    /// Examples that should end with an EOS target but do not: cut off by `keep_start`
    /// truncation, masked as the pad id (TRL method with pad == EOS), or no EOS token at all.
    pub eos_not_target: usize,
    /// Of `eos_not_target`: the EOS was cut off by `keep_start` truncation.
    pub eos_truncated: usize,
    /// Of `eos_not_target`: the EOS was masked because it is also the pad id (TRL method).
    pub eos_masked_as_pad: usize,
    /// Tokens in the examples kept.
    pub tokens: usize,
    /// Target tokens in the examples kept (the first token of an example never counts).
    pub target_tokens: usize,
    /// The first few dropped rows, `file:line (reason)`, to look at.
    pub dropped_rows: Vec<String>,
}

impl DataReport {
    /// Rows dropped for any reason (too long, no target, template missing).
    pub fn dropped(&self) -> usize {
        self.dropped_too_long + self.dropped_no_target + self.dropped_template_missing
    }

    /// Target tokens per token (first tokens of examples included in the count of tokens).
    pub fn supervised_ratio(&self) -> f64 {
        self.target_tokens as f64 / self.tokens.max(1) as f64
    }

    /// Stops with an error naming the dataset when a threshold is crossed.
    pub fn check(&self, limits: &DataLimits, path: &Path) -> Result<()> {
        let rows = self.rows.max(1) as f64;
        let over = |what: &str, n: usize, key: &str, max: Option<f64>| -> Result<()> {
            match max {
                Some(m) if n as f64 / rows > m => Err(Error::Dataset {
                    path: path.to_path_buf(),
                    msg: format!(
                        "{n} of {} rows {what} ({:.1}%), more than data.{key} = {m}",
                        self.rows,
                        100.0 * n as f64 / rows
                    ),
                }),
                _ => Ok(()),
            }
        };
        over(
            &format!(
                "dropped ({} too long, {} without a target token, {} template missing)",
                self.dropped_too_long, self.dropped_no_target, self.dropped_template_missing
            ),
            self.dropped(),
            "max_dropped_fraction",
            limits.max_dropped_fraction,
        )?;
        over(
            "truncated",
            self.truncated,
            "max_truncated_fraction",
            limits.max_truncated_fraction,
        )?;
        over(
            "without the response or instruction template",
            self.response_template_missing
                .max(self.instruction_template_missing),
            "max_template_missing_fraction",
            limits.max_template_missing_fraction,
        )?;
        if let Some(min) = limits.min_supervised_ratio {
            if self.supervised_ratio() < min {
                return Err(Error::Dataset {
                    path: path.to_path_buf(),
                    msg: format!(
                        "supervised-token ratio {:.4} ({} targets of {} tokens) is below data.min_supervised_ratio = {min}",
                        self.supervised_ratio(),
                        self.target_tokens,
                        self.tokens
                    ),
                });
            }
        }
        Ok(())
    }

    /// Logs the report, with a warning for each thing that was lost.
    pub fn log(&self, path: &Path) {
        tracing::info!(
            path = %path.display(),
            format = %self.format,
            template = %self.template.as_deref().unwrap_or("none"),
            method = %self.method,
            loss_on = %self.loss_on,
            rows = self.rows,
            examples = self.examples,
            truncated = self.truncated,
            dropped = self.dropped(),
            tokens = self.tokens,
            target_tokens = self.target_tokens,
            supervised_ratio = format!("{:.3}", self.supervised_ratio()),
            "dataset"
        );
        if self.dropped() > 0 {
            tracing::warn!(
                path = %path.display(),
                "{} of {} rows dropped: {} longer than max_length (data.truncation: drop), {} without any target token, {} without the response/instruction template; first: {}",
                self.dropped(),
                self.rows,
                self.dropped_too_long,
                self.dropped_no_target,
                self.dropped_template_missing,
                self.dropped_rows.join(", ")
            );
        }
        if self.truncated > 0 {
            tracing::warn!(path = %path.display(), "{} of {} examples truncated to max_length", self.truncated, self.rows);
        }
        if self.eos_not_target > 0 {
            tracing::warn!(
                path = %path.display(),
                "{} examples do not end with an EOS target: {} lost it to keep_start truncation, {} had it masked because pad == EOS under collator.response_template (as TRL does), {} for lack of an EOS token",
                self.eos_not_target,
                self.eos_truncated,
                self.eos_masked_as_pad,
                self.eos_not_target - self.eos_truncated - self.eos_masked_as_pad
            );
        }
    }
}
