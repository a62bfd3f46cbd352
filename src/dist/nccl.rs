//! NCCL through cudarc (candle's `nccl` feature): the collectives of GPU runs, on a stream of
//! their own beside candle's, so a gradient bucket's reduction overlaps the backward that goes on
//! making the next ones. The order between the two streams is cudarc's: every buffer carries
//! the events of its last read and write, a stream waits for them before it touches the buffer,
//! and a buffer is freed only after every stream that used it has passed (which is why a bucket
//! this rank gives up is held in [`Retired`] until its reduction completes). Host numbers (step sizes, flags) and NCCL's unique id go over the run's TCP
//! channel ([`TcpComm`]), which also did the rendezvous and its hash check. A [`Watchdog`]
//! follows the initialisation and every collective: one that has not completed within
//! `dist.timeout_s` (a rank died or hangs) ends this process with an error naming it, and the
//! launcher then stops the others.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::CudaSlice;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, Device, InplaceOp1, Layout, Shape, Tensor,
};

use super::retire::Retired;
use super::tcp::TcpComm;
use super::watchdog::Watchdog;
use std::sync::Mutex;
use std::time::Duration;

use super::{comm_err, Collective};
use crate::error::Result;

/// A cudarc communicator that one thread at a time uses (the trainer's).
struct OwnedComm(Comm);
// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap; `NcclComm` is only ever driven by the one thread that owns the trainer.
unsafe impl Send for OwnedComm {}
// SAFETY: as above; shared references are only used by that thread.
unsafe impl Sync for OwnedComm {}

/// Bytes of given-up buckets held while their reduction runs (see [`Retired`]): four of
/// ZeRO 2's 64 MiB buckets, enough for the reductions in flight behind one layer's backward.
const RETIRED_BYTES_MAX: usize = 256 << 20;

/// The GPU transport of a rank: NCCL for device tensors, TCP for host numbers.
pub struct NcclComm {
    comm: OwnedComm,
    host: TcpComm,
    watchdog: Watchdog,
    /// Buckets reduced to another rank, held until the reduction has read them.
    retired: Mutex<Retired<Tensor>>,
}

/// Joins the NCCL communicator of the ranks `host` connects, on `device` (this rank's GPU):
/// rank 0 makes the unique id and sends it over the TCP channel.
pub fn connect(host: TcpComm, device: &Device, timeout: Duration) -> Result<NcclComm> {
    let Device::Cuda(dev) = device else {
        return Err(comm_err(host.rank(), "NCCL needs a CUDA device"));
    };
    let rank = host.rank();
    // The process cannot go on: the host would wait for the device forever. Exiting releases
    // the GPU and its communicator; the launcher sees the status and stops the other ranks.
    let watchdog = Watchdog::new(
        timeout,
        Duration::from_millis(200),
        Box::new(move |what| {
            tracing::error!("{what}; exiting");
            eprintln!("packsft: {what}; exiting");
            std::process::exit(3);
        }),
    );
    let initialised = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = initialised.clone();
    watchdog.watch(
        format!("rank {rank}: NCCL initialisation"),
        Box::new(move || flag.load(std::sync::atomic::Ordering::SeqCst)),
    );
    let id = if host.rank() == 0 {
        Id::new().map_err(|e| {
            comm_err(
                0,
                format!("NCCL unique id: {e:?} (is libnccl.so.2 on LD_LIBRARY_PATH?)"),
            )
        })?
    } else {
        Id::uninit([0; 128])
    };
    let raw: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
    let raw = host.broadcast_bytes(&raw, 0)?;
    let mut internal = [0 as std::ffi::c_char; 128];
    for (d, s) in internal.iter_mut().zip(&raw) {
        *d = *s as std::ffi::c_char;
    }
    // The collectives' own stream, after everything candle's stream has queued so far.
    let stream = (dev.cuda_stream().fork())
        .map_err(|e| comm_err(rank, format!("CUDA stream for NCCL: {e:?}")))?;
    let comm = Comm::from_rank(stream, host.rank(), host.world_size(), Id::uninit(internal))
        .map_err(|e| comm_err(host.rank(), format!("NCCL init: {e:?}")))?;
    initialised.store(true, std::sync::atomic::Ordering::SeqCst);
    Ok(NcclComm {
        comm: OwnedComm(comm),
        host,
        watchdog,
        retired: Mutex::new(Retired::new(RETIRED_BYTES_MAX)),
    })
}

/// One collective on a CUDA tensor, as a candle op (its output a new buffer).
struct Op<'a> {
    comm: &'a Comm,
    /// `None`: all-reduce (sum); `Some(root)`: broadcast from `root`.
    root: Option<usize>,
}

impl Op<'_> {
    fn run<T>(
        &self,
        src: &CudaSlice<T>,
        s: &CudaStorage,
        n: usize,
    ) -> candle_core::Result<CudaStorage>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::nccl::NcclType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        let dev = s.device().clone();
        // SAFETY: every element is written by the collective before anything reads it.
        let mut dst = unsafe { dev.alloc::<T>(n)? };
        let r = match self.root {
            None => self.comm.all_reduce(src, &mut dst, &ReduceOp::Sum),
            Some(root) => self.comm.broadcast(Some(src), &mut dst, root as i32),
        };
        r.map_err(|e| candle_core::Error::Cuda(format!("NCCL: {e:?}").into()))?;
        Ok(CudaStorage::wrap_cuda_slice(dst, dev))
    }
}

impl CustomOp1 for Op<'_> {
    fn name(&self) -> &'static str {
        "packsft-nccl"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives run on CUDA tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        if !l.is_contiguous() || l.start_offset() != 0 {
            candle_core::bail!("NCCL collectives take whole contiguous tensors");
        }
        let n = l.shape().elem_count();
        let out = match s.dtype() {
            DType::F32 => self.run(s.as_cuda_slice::<f32>()?, s, n)?,
            DType::F64 => self.run(s.as_cuda_slice::<f64>()?, s, n)?,
            DType::BF16 => self.run(s.as_cuda_slice::<half::bf16>()?, s, n)?,
            dt => candle_core::bail!("NCCL collective of {dt:?}"),
        };
        Ok((out, l.shape().clone()))
    }
}

/// A collective in a tensor's own buffer (one this rank made and nothing else reads): a sum to
/// every rank or to one, or a broadcast, without a second buffer or copy.
struct InPlace<'a> {
    comm: &'a Comm,
    kind: InPlaceKind,
}

#[derive(Clone, Copy)]
enum InPlaceKind {
    AllReduce,
    ReduceTo(usize),
    BroadcastFrom(usize),
}

impl InPlace<'_> {
    fn run<T>(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()>
    where
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::nccl::NcclType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    {
        let (at, n) = (l.start_offset(), l.shape().elem_count());
        let slice = s.as_cuda_slice_mut::<T>()?;
        let mut view = slice.slice_mut(at..at + n);
        let r = match self.kind {
            InPlaceKind::AllReduce => self.comm.all_reduce_in_place(&mut view, &ReduceOp::Sum),
            InPlaceKind::ReduceTo(root) => {
                self.comm
                    .reduce_in_place(&mut view, &ReduceOp::Sum, root as i32)
            }
            InPlaceKind::BroadcastFrom(root) => {
                self.comm.broadcast_in_place(&mut view, root as i32)
            }
        };
        r.map(|_| ())
            .map_err(|e| candle_core::Error::Cuda(format!("NCCL: {e:?}").into()))
    }
}

impl InplaceOp1 for InPlace<'_> {
    fn name(&self) -> &'static str {
        "packsft-nccl-in-place"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL collectives run on CUDA tensors")
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        if !l.is_contiguous() {
            candle_core::bail!("NCCL collectives take contiguous tensors");
        }
        match s.dtype() {
            DType::F32 => self.run::<f32>(s, l),
            DType::F64 => self.run::<f64>(s, l),
            DType::BF16 => self.run::<half::bf16>(s, l),
            dt => candle_core::bail!("NCCL collective of {dt:?}"),
        }
    }
}

impl NcclComm {
    /// A query of whether the collectives' stream has passed everything enqueued on it so far.
    fn passed(&self) -> Result<Box<dyn Fn() -> bool + Send>> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
        let stream = self.comm.0.stream();
        let event = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(|e| comm_err(self.rank(), format!("CUDA event: {e:?}")))?;
        let ctx = stream.context().clone();
        Ok(Box::new(move || {
            ctx.bind_to_thread().is_ok() && event.is_complete()
        }))
    }

    /// Follows the collective just enqueued (`what`, of `n` elements) until its stream
    /// passes it.
    fn watch(&self, what: &str, n: usize) -> Result<()> {
        self.watchdog.watch(
            format!("rank {}: NCCL {what} of {n} elements", self.rank()),
            self.passed()?,
        );
        Ok(())
    }

    /// Lets go of `t`, a buffer the collective just enqueued still uses: held until the
    /// collective completes (see [`Retired`]); the buffers let go of now are dropped here.
    fn retire(&self, t: Tensor) -> Result<()> {
        if !t.device().is_cuda() {
            return Ok(());
        }
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        let done = self.passed()?;
        let released = (self.retired.lock())
            .map_err(|_| comm_err(self.rank(), "retired buffers: poisoned lock"))?
            .hold(t, bytes, done);
        drop(released);
        Ok(())
    }

    /// Drops the held buffers whose collective has completed (at every collective, so a step's
    /// last buckets do not stay held through the next step's forward).
    fn release_done(&self) -> Result<()> {
        let released = (self.retired.lock())
            .map_err(|_| comm_err(self.rank(), "retired buffers: poisoned lock"))?
            .release_done();
        drop(released);
        Ok(())
    }

    /// `kind` in `t`'s own buffer (see [`InPlace`]); through [`Self::collective`] where `t`
    /// is not a contiguous CUDA tensor.
    fn in_place(&self, t: Tensor, kind: InPlaceKind) -> Result<Tensor> {
        self.release_done()?;
        if !t.device().is_cuda() || !t.is_contiguous() {
            return self.collective(
                &t,
                match kind {
                    InPlaceKind::AllReduce | InPlaceKind::ReduceTo(_) => None,
                    InPlaceKind::BroadcastFrom(r) => Some(r),
                },
            );
        }
        t.inplace_op1(&InPlace {
            comm: &self.comm.0,
            kind,
        })?;
        let what = match kind {
            InPlaceKind::AllReduce => "all-reduce".to_string(),
            InPlaceKind::ReduceTo(r) => format!("reduce to rank {r}"),
            InPlaceKind::BroadcastFrom(r) => format!("broadcast from rank {r}"),
        };
        self.watch(&what, t.elem_count())?;
        Ok(t)
    }

    fn collective(&self, t: &Tensor, root: Option<usize>) -> Result<Tensor> {
        self.release_done()?;
        if !t.device().is_cuda() {
            return match root {
                None => self.host.all_reduce_sum(t),
                Some(r) => self.host.broadcast(t, r),
            };
        }
        // A fresh contiguous buffer: the collective must not see a view of a larger one.
        let t = t.contiguous()?.copy()?;
        let out = t.apply_op1_no_bwd(&Op {
            comm: &self.comm.0,
            root,
        })?;
        let what = match root {
            None => "all-reduce".to_string(),
            Some(r) => format!("broadcast from rank {r}"),
        };
        self.watch(&what, t.elem_count())?;
        Ok(out)
    }
}

impl Collective for NcclComm {
    fn rank(&self) -> usize {
        self.host.rank()
    }

    fn world_size(&self) -> usize {
        self.host.world_size()
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.collective(t, None)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        self.collective(t, Some(root))
    }

    fn all_reduce_host(&self, v: &[f64]) -> Result<Vec<f64>> {
        self.host.all_reduce_host(v)
    }

    fn all_reduce_sum_owned(&self, t: Tensor) -> Result<Tensor> {
        self.in_place(t, InPlaceKind::AllReduce)
    }

    fn reduce_sum_owned(&self, t: Tensor, root: usize) -> Result<Option<Tensor>> {
        let t = self.in_place(t, InPlaceKind::ReduceTo(root))?;
        if self.rank() == root {
            return Ok(Some(t));
        }
        self.retire(t)?;
        Ok(None)
    }

    fn broadcast_owned(&self, t: Tensor, root: usize) -> Result<Tensor> {
        self.in_place(t, InPlaceKind::BroadcastFrom(root))
    }
}
