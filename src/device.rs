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
            let dev = Device::new_cuda(i)?;
            #[cfg(feature = "cuda")]
            if let Device::Cuda(cd) = &dev {
                // SAFETY: packsft runs all its kernels on candle's stream, where the per-buffer
                // events cudarc records for cross-stream ordering are never needed (recording
                // them costs host time on every kernel launch); its one other stream only copies
                // values that an explicit event marks as final (`streams::Readback`).
                unsafe { cd.disable_event_tracking() };
                keep_freed_memory(cd);
            }
            Ok(dev)
        }
    }
}

/// Lets the stream-ordered allocator keep freed blocks for reuse instead of returning them to
/// the driver at every synchronisation (what PyTorch's caching allocator does).
#[cfg(feature = "cuda")]
fn keep_freed_memory(cd: &candle_core::CudaDevice) {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let ctx = cd.cuda_stream().context().clone();
    if ctx.bind_to_thread().is_err() {
        return;
    }
    let mut threshold = u64::MAX;
    // SAFETY: a device of a live context; the attribute is a u64. Failure only costs speed.
    unsafe {
        if let Ok(pool) = result::device::get_default_mem_pool(ctx.cu_device()) {
            let _ = result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut std::ffi::c_void,
            );
        }
    }
}

/// `PACKSFT_PROFILE=1`: synchronise the device between the phases of a training step and log
/// their times (forward, backward, optimizer). Slows training; for finding where time goes.
pub fn profiling() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("PACKSFT_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0"))
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
