//! The recipe's `dist:` section: how the ranks of a multi-process run (`packsft launch`,
//! torchrun, Slurm) share the work. Read only when the environment says this process is a rank.

use serde::{Deserialize, Serialize};

use crate::dist::{ReduceDtype, ZeroStage};

/// `dist:`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DistSection {
    /// `0`: every rank keeps the whole optimizer state; `1`: the state is sharded over the
    /// ranks (each updates the parameters it owns and broadcasts them).
    #[serde(default)]
    pub zero: ZeroStage,
    /// The dtype gradients are summed over ranks in: `f32` (exact to float32 rounding), or
    /// `bf16` (half the traffic; each sum rounded to bf16's 8 bits of mantissa before the
    /// optimizer widens it back).
    #[serde(default)]
    pub reduce_dtype: ReduceDtype,
    /// Seconds a rank waits for the others (at the rendezvous and in every exchange) before it
    /// gives up with an error naming them.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
}

fn default_timeout() -> u64 {
    600
}

impl Default for DistSection {
    fn default() -> Self {
        Self {
            zero: ZeroStage::default(),
            reduce_dtype: ReduceDtype::default(),
            timeout_s: default_timeout(),
        }
    }
}
