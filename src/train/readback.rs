//! Reading a step's results on the host without draining the device's queue.
//!
//! A plain read (`to_scalar`) is a copy on candle's stream (one per device and host thread), so
//! it waits for everything enqueued there before it. When steps overlap (step N+1 enqueued
//! before step N is read) that is all of step N+1: the device's queue ran empty at every read,
//! and each step began with the device waiting for the host to enqueue its first kernels.
//! [`Readback`] marks the end of a step with an event, waits for that event only, and copies on
//! a stream of its own, so the host stays a step ahead and the device never idles between
//! steps. The event covers the work the calling thread enqueued, which is where the trainer
//! enqueues a step and reads it.
//!
//! That path is taken on devices opened by [`crate::device::open`], which turns off cudarc's
//! per-buffer events: on a device with them on, a second stream would make cudarc record and
//! wait on events around every kernel from then on, so there the values are read on candle's
//! stream as before. On the CPU, or without the `cuda` feature, the values are simply read.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

#[cfg(feature = "cuda")]
use candle_core::cuda_backend::cudarc::driver::{sys, CudaEvent, CudaStream};
#[cfg(feature = "cuda")]
use candle_core::cuda_backend::WrapErr;
#[cfg(feature = "cuda")]
use std::sync::{Arc, Mutex};

/// Scalars of an enqueued step, to be read later without draining the device.
pub struct Readback {
    /// Float64, one element each, contiguous.
    values: Vec<Tensor>,
    #[cfg(feature = "cuda")]
    done: Option<(CudaEvent, Arc<CudaStream>)>,
}

impl Readback {
    /// Marks the current end of the device's work as the point where `values` (tensors of one
    /// element) are final.
    pub fn enqueue(values: Vec<Tensor>) -> Result<Self> {
        // Shaped for the copy now, so that `read` enqueues nothing on candle's stream (where it
        // would queue behind the work enqueued since).
        let values = values
            .iter()
            .map(|v| {
                if v.elem_count() != 1 {
                    return Err(Error::Training(format!(
                        "a step's value to read back must be a scalar, got shape {:?}",
                        v.dims()
                    )));
                }
                Ok(v.to_dtype(DType::F64)?.reshape(1)?.contiguous()?)
            })
            .collect::<Result<Vec<_>>>()?;
        #[cfg(feature = "cuda")]
        if let Some(candle_core::Device::Cuda(dev)) = values.first().map(|v| v.device()) {
            let main = dev.cuda_stream();
            let first = values[0].device();
            let one_device = values.iter().all(|v| v.device().same_device(first));
            if one_device && !main.context().is_event_tracking() {
                let done = main
                    .record_event(Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
                    .w()?;
                return Ok(Self {
                    values,
                    done: Some((done, readback_stream(&main)?)),
                });
            }
        }
        Ok(Self {
            values,
            #[cfg(feature = "cuda")]
            done: None,
        })
    }

    /// Waits until the device reached the point of [`Readback::enqueue`] (not for work enqueued
    /// after it, where it can) and reads the values.
    pub fn read(self) -> Result<Vec<f64>> {
        #[cfg(feature = "cuda")]
        if let Some((done, stream)) = &self.done {
            done.synchronize().w()?;
            let mut out = Vec::with_capacity(self.values.len());
            for v in &self.values {
                let x = crate::cuda::launch::with_storages(&[v], |st| {
                    let view = crate::cuda::launch::cview::<f64>(st[0].0, st[0].1)?;
                    // The copy runs on a stream of its own: on candle's it would queue behind
                    // the work enqueued since.
                    let host = stream.clone_dtoh(&view).w()?;
                    stream.synchronize().w()?;
                    Ok(host.first().copied().unwrap_or(f64::NAN))
                })?;
                out.push(x);
            }
            return Ok(out);
        }
        self.values
            .iter()
            .map(|v| Ok(v.to_vec1::<f64>()?[0]))
            .collect()
    }
}

/// One copy stream per CUDA context, created on first use and kept for the process (devices
/// opened on one GPU share its primary context, and so this stream).
#[cfg(feature = "cuda")]
fn readback_stream(main: &Arc<CudaStream>) -> Result<Arc<CudaStream>> {
    static STREAMS: Mutex<Vec<(usize, Arc<CudaStream>)>> = Mutex::new(Vec::new());
    let ctx = main.context();
    let key = ctx.cu_ctx() as usize;
    let mut all = STREAMS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, s)) = all.iter().find(|(k, _)| *k == key) {
        return Ok(s.clone());
    }
    let s = ctx.new_stream().w()?;
    all.push((key, s.clone()));
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_of_any_float_type_read_back_and_others_are_refused() {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::new(2.5f32, &dev).unwrap();
        let b = Tensor::new(&[[-1.25f64]], &dev).unwrap();
        let r = Readback::enqueue(vec![a, b]).unwrap();
        assert_eq!(r.read().unwrap(), vec![2.5, -1.25]);
        let v = Tensor::new(&[1f32, 2.0], &dev).unwrap();
        let e = Readback::enqueue(vec![v])
            .err()
            .expect("a vector is refused");
        assert!(e.to_string().contains("shape [2]"), "{e}");
    }
}
