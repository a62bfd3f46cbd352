//! One run per output directory: a lock file (`.packsft.lock`, holding the pid and host of the
//! run) created exclusively before anything is written, removed when the run ends. A second run
//! on the same directory is refused while the first holds it, instead of interleaving metrics and
//! checkpoints; a lock left by a process that no longer runs on this host is taken over with a
//! warning. Re-entrant within one process (the recipe runner holds it around `Trainer::train`,
//! which takes it too).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The lock file's name inside the output directory.
pub const LOCK_FILE: &str = ".packsft.lock";

/// A held lock; dropping it removes the file if this holder created it.
#[derive(Debug)]
pub struct OutputLock {
    path: PathBuf,
    created: bool,
}

/// This machine's host name (`/proc/sys/kernel/hostname`, else `HOSTNAME`, else `unknown`).
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Whether process `pid` runs on this host. Without `/proc` (not Linux) every process counts as
/// running, so a stale lock is refused rather than taken over.
fn running(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.is_dir() || proc.join(pid.to_string()).exists()
}

impl OutputLock {
    /// Takes the lock of `dir` (created if missing).
    pub fn acquire(dir: &Path) -> Result<Self> {
        if dir.exists() && !dir.is_dir() {
            return Err(Error::Training(format!(
                "output_dir {} is a file, not a directory",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(LOCK_FILE);
        let (me, here) = (std::process::id(), host());
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    writeln!(f, "{me} {here}").map_err(|e| Error::io(&path, e))?;
                    return Ok(Self {
                        path,
                        created: true,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io(&path, e)),
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let mut it = text.split_whitespace();
            let pid: Option<u32> = it.next().and_then(|p| p.parse().ok());
            let holder_host = it.next().unwrap_or("").to_string();
            match pid {
                Some(p) if p == me && holder_host == here => {
                    return Ok(Self {
                        path,
                        created: false,
                    })
                }
                Some(p) if holder_host == here && running(p) => {
                    return Err(Error::Training(format!(
                        "{} is in use by another packsft run (pid {p} on {here}, lock file {}): \
                         wait for it to finish or use another output_dir",
                        dir.display(),
                        path.display()
                    )));
                }
                Some(p) if holder_host != here => {
                    return Err(Error::Training(format!(
                        "{} is locked by a packsft run on host {holder_host} (pid {p}, lock file \
                         {}): if that run has ended, remove the lock file",
                        dir.display(),
                        path.display()
                    )));
                }
                _ => {
                    tracing::warn!(
                        lock = %path.display(),
                        holder = text.trim(),
                        "taking over the lock of a run that no longer runs"
                    );
                    std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
                }
            }
        }
        Err(Error::Training(format!(
            "could not take the lock {} (another run took it first)",
            path.display()
        )))
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        if self.created {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_holder_is_refused_a_dead_one_taken_over_and_the_holder_reenters() {
        let dir = tempfile::tempdir().unwrap();
        let lock = dir.path().join(LOCK_FILE);
        // Held by a process that runs: pid 1 on this host.
        std::fs::write(&lock, format!("1 {}\n", host())).unwrap();
        let e = OutputLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(e.contains("in use by another packsft run (pid 1"), "{e}");
        // Held on another host: refused, with the way out.
        std::fs::write(&lock, "1 elsewhere-host\n").unwrap();
        let e = OutputLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("host elsewhere-host") && e.contains("remove the lock"),
            "{e}"
        );
        // Held by a process that has ended: taken over.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        std::fs::write(&lock, format!("{dead} {}\n", host())).unwrap();
        let held = OutputLock::acquire(dir.path()).unwrap();
        let text = std::fs::read_to_string(&lock).unwrap();
        assert_eq!(text, format!("{} {}\n", std::process::id(), host()));
        // The holder re-enters; only the first acquisition removes the file.
        let again = OutputLock::acquire(dir.path()).unwrap();
        drop(again);
        assert!(lock.exists());
        drop(held);
        assert!(!lock.exists());
    }

    #[test]
    fn an_output_dir_that_is_a_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("out");
        std::fs::write(&file, "x").unwrap();
        let e = OutputLock::acquire(&file).unwrap_err().to_string();
        assert!(e.contains("is a file, not a directory"), "{e}");
    }
}
