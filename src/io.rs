//! File writes that never leave a half-written file behind: write a sibling temporary file,
//! flush it to disk, then rename it over the target (atomic on POSIX file systems).

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Writes `bytes` to `path` through a flushed temporary sibling renamed over it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = tmp_sibling(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// `dir/.name.tmp-<pid>`: hidden, and unique per process so two runs never share one.
pub fn tmp_sibling(path: &Path) -> std::path::PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Gives `path` the permissions a file newly created beside it gets (the process umask applied
/// to 0666): for files written by libraries that create them 0600.
pub fn match_new_file_mode(path: &Path) -> Result<()> {
    let probe = path.with_file_name(format!(".mode-probe.tmp-{}", std::process::id()));
    let perms = std::fs::File::create(&probe)
        .and_then(|f| f.metadata())
        .map(|m| m.permissions());
    let _ = std::fs::remove_file(&probe);
    let perms = perms.map_err(|e| Error::io(&probe, e))?;
    std::fs::set_permissions(path, perms).map_err(|e| Error::io(path, e))
}
