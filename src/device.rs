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

/// Peak bytes in use on a CUDA device since it was opened (the high-water mark of the
/// stream-ordered allocator's pool, which candle allocates from): the counterpart of PyTorch's
/// `max_memory_allocated`. None on the CPU or where the driver cannot say.
pub fn gpu_peak_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cd) = device {
        use candle_core::cuda_backend::cudarc::driver::{result, sys};
        let ctx = cd.cuda_stream().context().clone();
        ctx.bind_to_thread().ok()?;
        let mut v: u64 = 0;
        // SAFETY: the device comes from a live context and the attribute is a u64.
        unsafe {
            let pool = result::device::get_default_mem_pool(ctx.cu_device()).ok()?;
            result::mem_pool::get_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut v as *mut u64 as *mut std::ffi::c_void,
            )
            .ok()?;
        }
        return Some(v);
    }
    let _ = device;
    None
}
