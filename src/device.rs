//! Device names in recipes and on the command line, and the device's clock.

use std::time::Instant;

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

/// A point in the work a device was given, where a span of device time starts or ends. On the
/// CPU, whose work is done when each call returns, the moment itself; on a GPU, an event on
/// candle's stream, so the host never waits for the device to take it (the span is read after
/// the step, when the device has long passed it).
pub struct Mark(MarkAt);

enum MarkAt {
    Host(Instant),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::cuda_backend::cudarc::driver::CudaEvent),
}

impl Mark {
    /// Where the device's work stands now: after everything enqueued on it so far.
    pub fn now(device: &Device) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cd) = device {
            use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
            use candle_core::cuda_backend::WrapErr;
            // A timing event (the default flags): the others cannot be measured between.
            let e = (cd.cuda_stream())
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .w()?;
            return Ok(Self(MarkAt::Cuda(e)));
        }
        let _ = device;
        Ok(Self(MarkAt::Host(Instant::now())))
    }

    /// Seconds of device time from this mark to `end`, a later mark of the same device; waits
    /// until the device has reached `end`.
    pub fn seconds_to(&self, end: &Mark) -> Result<f64> {
        match (&self.0, &end.0) {
            (MarkAt::Host(a), MarkAt::Host(b)) => Ok(b.saturating_duration_since(*a).as_secs_f64()),
            #[cfg(feature = "cuda")]
            (MarkAt::Cuda(a), MarkAt::Cuda(b)) => {
                use candle_core::cuda_backend::WrapErr;
                b.synchronize().w()?;
                Ok(f64::from(a.elapsed_ms(b).w()?) / 1e3)
            }
            #[cfg(feature = "cuda")]
            _ => Err(Error::Training(
                "a span of device time must start and end on the same device".into(),
            )),
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
