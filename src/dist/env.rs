//! Where this process stands in a run of several: torchrun's variables (`RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, what `packsft launch` sets),
//! or Slurm's (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_NTASKS_PER_NODE`) with
//! `MASTER_ADDR` / `MASTER_PORT` from the job script.

use crate::error::{Error, Result};

/// This process's place in a multi-process run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    /// Global rank, 0-based.
    pub rank: usize,
    /// Ranks in the run.
    pub size: usize,
    /// Rank on this node: the GPU it uses.
    pub local_rank: usize,
    /// Ranks on this node.
    pub local_size: usize,
    /// Rank 0's host, where the others meet.
    pub master_addr: String,
    /// Rank 0's port.
    pub master_port: u16,
}

impl World {
    /// The run described by the environment, `None` outside a launcher (a plain process).
    /// Variables that are present but wrong (a rank past the size, a port that is no number)
    /// are errors naming them.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`World::from_env`] over any variable lookup (tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let num = |k: &str| -> Result<Option<usize>> {
            match var(k) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    Error::Config(format!("environment variable {k}={v:?} is not a number"))
                }),
            }
        };
        let (rank, size, local_rank, local_size) = match (num("RANK")?, num("WORLD_SIZE")?) {
            (Some(r), Some(s)) => (
                r,
                s,
                num("LOCAL_RANK")?.unwrap_or(r),
                num("LOCAL_WORLD_SIZE")?.unwrap_or(s),
            ),
            (None, None) => match (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
                (Some(r), Some(s)) if s > 1 => (
                    r,
                    s,
                    num("SLURM_LOCALID")?.unwrap_or(0),
                    num("SLURM_NTASKS_PER_NODE")?.unwrap_or(1),
                ),
                _ => return Ok(None),
            },
            _ => {
                return Err(Error::Config(
                    "set both RANK and WORLD_SIZE (torchrun's variables) or neither".into(),
                ))
            }
        };
        if size == 0 || rank >= size {
            return Err(Error::Config(format!(
                "RANK {rank} is not below WORLD_SIZE {size}"
            )));
        }
        if local_rank >= local_size.max(1) {
            return Err(Error::Config(format!(
                "LOCAL_RANK {local_rank} is not below LOCAL_WORLD_SIZE {local_size}"
            )));
        }
        let master_addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let master_port = match var("MASTER_PORT") {
            None => 29500,
            Some(p) => p.trim().parse().map_err(|_| {
                Error::Config(format!(
                    "environment variable MASTER_PORT={p:?} is not a port"
                ))
            })?,
        };
        Ok(Some(World {
            rank,
            size,
            local_rank,
            local_size,
            master_addr,
            master_port,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn world(vars: &[(&str, &str)]) -> Result<Option<World>> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        World::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_and_slurm_variables_are_read_and_checked() {
        assert_eq!(world(&[]).unwrap(), None);
        let w = world(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "3"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29511"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((w.rank, w.size, w.local_rank, w.local_size), (3, 8, 3, 4));
        assert_eq!((w.master_addr.as_str(), w.master_port), ("node0", 29511));
        let w = world(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS_PER_NODE", "4"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((w.rank, w.size, w.local_rank), (5, 8, 1));
        // A one-task Slurm job is a plain run.
        assert_eq!(
            world(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]).unwrap(),
            None
        );
        let e = world(&[("RANK", "4"), ("WORLD_SIZE", "4")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK 4"), "{e}");
        let e = world(&[("RANK", "x"), ("WORLD_SIZE", "4")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK=\"x\""), "{e}");
        let e = world(&[("RANK", "0")]).unwrap_err().to_string();
        assert!(e.contains("WORLD_SIZE"), "{e}");
    }
}
