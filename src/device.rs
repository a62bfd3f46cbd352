//! Device names in recipes and on the command line.

use candle_core::Device;

use crate::error::{Error, Result};

/// `cpu`, `cuda` (first GPU) or `cuda:N`: the ordinal, None for the CPU.
pub fn parse(name: &str) -> Result<Option<usize>> {
    match name {
        "cpu" => Ok(None),
        "cuda" => Ok(Some(0)),
        _ => name
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Some)
            .ok_or_else(|| Error::Config(format!("unknown device {name:?} (cpu, cuda or cuda:N)"))),
    }
}

/// Opens a device by name; a CUDA device in a build without `--features cuda` is an error
/// that says so.
pub fn open(name: &str) -> Result<Device> {
    match parse(name)? {
        None => Ok(Device::Cpu),
        Some(i) => {
            if !cfg!(feature = "cuda") {
                return Err(Error::Config(format!(
                    "device {name:?}: this packsft was built without CUDA (cargo build --release --features cuda)"
                )));
            }
            Ok(Device::new_cuda(i)?)
        }
    }
}
