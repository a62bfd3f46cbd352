//! `packsft launch`: one process per GPU (or CPU rank) on this node, with torchrun's variables,
//! so the same `packsft train` also runs under torchrun or Slurm without it. Signals are
//! forwarded to every rank; when one rank fails the others are stopped and the launcher exits
//! non-zero naming it. NCCL's settings (`NCCL_NVLS_ENABLE`, ...) pass through as set: the
//! launcher never turns NVLink multicast on.

use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use crate::error::{Error, Result};

#[derive(Args)]
pub(crate) struct LaunchCmd {
    /// Processes on this node (one per GPU)
    #[arg(long, default_value_t = 1)]
    nproc_per_node: usize,
    /// Nodes in the run
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This node's index
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// Rank 0's host (the first node)
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// Rank 0's port; on one node a free one is picked when left out
    #[arg(long)]
    master_port: Option<u16>,
    /// Seconds the other ranks get to stop after one failed or a signal came, before they are
    /// killed
    #[arg(long, default_value_t = 30)]
    grace_s: u64,
    /// The packsft command each rank runs, after `--`: train recipe.yaml [overrides]
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// A port nothing listens on now (the OS's pick), for a one-node run's rendezvous.
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("a free port", e))?;
    Ok(l.local_addr()
        .map_err(|e| Error::io("a free port", e))?
        .port())
}

/// Sends `sig` to a child (SIGTERM: checkpoint and exit; SIGKILL).
fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a pid this process spawned and has not yet reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

pub(crate) fn launch(c: LaunchCmd) -> Result<()> {
    if c.nproc_per_node == 0 || c.nnodes == 0 || c.node_rank >= c.nnodes {
        return Err(Error::Config(format!(
            "--nproc-per-node {} --nnodes {} --node-rank {}: need at least one process and node, and a node rank below the node count",
            c.nproc_per_node, c.nnodes, c.node_rank
        )));
    }
    let port = match (c.master_port, c.nnodes) {
        (Some(p), _) => p,
        (None, 1) => free_port()?,
        (None, _) => {
            return Err(Error::Config(
                "--master-port is required with several nodes".into(),
            ))
        }
    };
    let world = c.nproc_per_node * c.nnodes;
    let exe = std::env::current_exe().map_err(|e| Error::io("current executable", e))?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| Error::io("signal handler", e))?;
    }
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(c.nproc_per_node);
    for local in 0..c.nproc_per_node {
        let rank = c.node_rank * c.nproc_per_node + local;
        let child = Command::new(&exe)
            .args(&c.command)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", c.nproc_per_node.to_string())
            .env("MASTER_ADDR", &c.master_addr)
            .env("MASTER_PORT", port.to_string())
            .spawn()
            .map_err(|e| Error::io(&exe, e))?;
        children.push((rank, child));
    }
    tracing::info!(
        world_size = world,
        port,
        "launched {} ranks",
        c.nproc_per_node
    );
    let mut failed: Option<(usize, String)> = None;
    let mut forwarded = false;
    let mut deadline: Option<Instant> = None;
    let mut running: Vec<bool> = vec![true; children.len()];
    while running.iter().any(|&r| r) {
        if stop.load(Ordering::SeqCst) && !forwarded {
            // Each rank checkpoints at the step all of them agree on, then exits.
            for (i, (_, ch)) in children.iter().enumerate() {
                if running[i] {
                    signal(ch, signal_hook::consts::SIGTERM);
                }
            }
            forwarded = true;
            deadline = Some(Instant::now() + Duration::from_secs(c.grace_s));
        }
        for (i, (rank, ch)) in children.iter_mut().enumerate() {
            if !running[i] {
                continue;
            }
            if let Some(status) = ch.try_wait().map_err(|e| Error::io("a rank", e))? {
                running[i] = false;
                if !status.success() && failed.is_none() && !forwarded {
                    failed = Some((*rank, status.to_string()));
                    deadline = Some(Instant::now() + Duration::from_secs(c.grace_s));
                }
            }
        }
        if failed.is_some() && !forwarded {
            // The others would wait for the failed rank until their timeout: stop them now.
            for (i, (_, ch)) in children.iter().enumerate() {
                if running[i] {
                    signal(ch, signal_hook::consts::SIGTERM);
                }
            }
            forwarded = true;
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            for (i, (_, ch)) in children.iter_mut().enumerate() {
                if running[i] {
                    let _ = ch.kill();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    match failed {
        Some((rank, status)) => Err(Error::Training(format!(
            "rank {rank} failed ({status}); the other ranks were stopped"
        ))),
        None if stop.load(Ordering::SeqCst) => Err(Error::Training(
            "interrupted: every rank was asked to checkpoint and stop".into(),
        )),
        None => {
            let codes: Vec<String> = children
                .iter_mut()
                .filter_map(|(r, ch)| match ch.wait() {
                    Ok(s) if !s.success() => Some(format!("rank {r}: {s}")),
                    _ => None,
                })
                .collect();
            if codes.is_empty() {
                Ok(())
            } else {
                Err(Error::Training(codes.join("; ")))
            }
        }
    }
}
