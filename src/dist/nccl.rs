//! NCCL through cudarc (candle's `nccl` feature): the collectives of GPU runs, on a stream of
//! their own beside candle's, so a gradient bucket's reduction overlaps the backward that goes on
//! making the next ones. packsft turns cudarc's per-buffer events off (`device::open`), so the
//! order between the two streams is explicit here: the collectives' stream waits for candle's
//! before every collective (its buffer is final); candle's waits for the collectives' after
//! every collective whose result is used at once (all-reduce, broadcast) and, for a sum
//! reduced to this rank, at [`Collective::settle`]; a buffer given up to another rank's sum
//! is held in [`Retired`] until its reduction completes (freed at once, its memory could be
//! reused by candle's stream while NCCL still sends it).
//!
//! Host numbers (step sizes, flags) and NCCL's unique id go over the run's TCP channel
//! ([`TcpComm`]), which also did the rendezvous and its hash check. A [`Watchdog`] follows the
//! initialisation and every collective: one that has not completed within `dist.timeout_s` (a
//! rank died or hangs) ends this process with an error naming it, and the launcher then stops
//! the others.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaSlice, CudaStream};
use candle_core::cuda_backend::cudarc::nccl::result::{group_end, group_start};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, DType, Device, InplaceOp1, Layout, Shape, Tensor,
};

use super::retire::Retired;
use super::tcp::TcpComm;
use super::watchdog::Watchdog;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{broadcast_in_place_flat, comm_err, Collective};
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
    /// candle's stream, where gradients are made and sums used.
    compute: Arc<CudaStream>,
    watchdog: Watchdog,
    /// Buckets reduced to another rank, held until the reduction (the event) has read them.
    retired: Mutex<Retired<(Tensor, Arc<CudaEvent>)>>,
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
        compute: dev.cuda_stream(),
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
        after_compute(self.comm, s)?;
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

/// Makes the collectives' stream wait for what candle's stream (the one `s` lives on) has
/// queued so far: the buffers the collective reads are then final, and those it writes
/// allocated.
fn after_compute(comm: &Comm, s: &CudaStorage) -> candle_core::Result<()> {
    (comm.stream().join(&s.device().cuda_stream()))
        .map_err(|e| candle_core::Error::Cuda(format!("NCCL stream order: {e:?}").into()))
}

/// A collective in a tensor's own buffer (one this rank made and nothing else reads): a sum to
/// every rank or to one, or a broadcast, without a second buffer or copy.
struct InPlace<'a> {
    comm: &'a Comm,
    kind: InPlaceKind,
    /// Whether the collectives' stream must first wait for candle's (false inside a group whose
    /// caller ordered the streams once for all of its collectives).
    order: bool,
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
        if self.order {
            after_compute(self.comm, s)?;
        }
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
    fn cuda_err(&self, what: &str, e: impl std::fmt::Debug) -> crate::error::Error {
        comm_err(self.rank(), format!("{what}: {e:?}"))
    }

    /// An event after everything enqueued on the collectives' stream so far.
    fn comm_event(&self) -> Result<Arc<CudaEvent>> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
        let event = (self.comm.0.stream())
            .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(|e| self.cuda_err("CUDA event", e))?;
        Ok(Arc::new(event))
    }

    /// A host query of whether `event` has completed.
    fn query(event: &Arc<CudaEvent>) -> Box<dyn Fn() -> bool + Send> {
        let event = event.clone();
        let ctx = event.context().clone();
        Box::new(move || ctx.bind_to_thread().is_ok() && event.is_complete())
    }

    /// Follows the collective just enqueued (`what`, of `n` elements) until its stream
    /// passes it; returns the event that marks it.
    fn watch(&self, what: &str, n: usize) -> Result<Arc<CudaEvent>> {
        let event = self.comm_event()?;
        self.watchdog.watch(
            format!("rank {}: NCCL {what} of {n} elements", self.rank()),
            Self::query(&event),
        );
        Ok(event)
    }

    /// Makes candle's stream wait for `event` (a collective's end) before what it runs next.
    fn compute_waits(&self, event: &CudaEvent) -> Result<()> {
        (self.compute.wait(event)).map_err(|e| self.cuda_err("NCCL stream order", e))
    }

    /// Lets go of `t`, a buffer the collective marked by `event` still reads: held until the
    /// collective completes (see [`Retired`]), then freed after candle's stream waited for it.
    fn retire(&self, t: Tensor, event: Arc<CudaEvent>) -> Result<()> {
        let bytes = t.elem_count() * t.dtype().size_in_bytes();
        let done = Self::query(&event);
        let released = (self.retired.lock())
            .map_err(|_| comm_err(self.rank(), "retired buffers: poisoned lock"))?
            .hold((t, event), bytes, done);
        self.free(released)
    }

    /// Drops the held buffers whose collective has completed (at every collective, so a step's
    /// last buckets do not stay held through the next step's forward).
    fn release_done(&self) -> Result<()> {
        let released = (self.retired.lock())
            .map_err(|_| comm_err(self.rank(), "retired buffers: poisoned lock"))?
            .release_done();
        self.free(released)
    }

    /// Frees held buffers on candle's stream, behind their collective (a wait that costs
    /// nothing for one already complete; the buffer's memory is then reused only after it).
    fn free(&self, released: Vec<(Tensor, Arc<CudaEvent>)>) -> Result<()> {
        for (t, event) in released {
            self.compute_waits(&event)?;
            drop(t);
        }
        Ok(())
    }

    /// `kind` in `t`'s own buffer (see [`InPlace`]); through [`Self::collective`] where `t`
    /// is not a contiguous CUDA tensor. A reduction to a rank leaves candle's stream free to
    /// go on (see [`Collective::settle`]); an all-reduce or broadcast is final on return.
    fn in_place(&self, t: Tensor, kind: InPlaceKind) -> Result<(Tensor, Option<Arc<CudaEvent>>)> {
        self.release_done()?;
        if !t.device().is_cuda() || !t.is_contiguous() {
            let root = match kind {
                InPlaceKind::AllReduce | InPlaceKind::ReduceTo(_) => None,
                InPlaceKind::BroadcastFrom(r) => Some(r),
            };
            return Ok((self.collective(&t, root)?, None));
        }
        t.inplace_op1(&InPlace {
            comm: &self.comm.0,
            kind,
            order: true,
        })?;
        let what = match kind {
            InPlaceKind::AllReduce => "all-reduce".to_string(),
            InPlaceKind::ReduceTo(r) => format!("reduce to rank {r}"),
            InPlaceKind::BroadcastFrom(r) => format!("broadcast from rank {r}"),
        };
        let event = self.watch(&what, t.elem_count())?;
        if !matches!(kind, InPlaceKind::ReduceTo(_)) {
            self.compute_waits(&event)?;
        }
        Ok((t, Some(event)))
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
        let event = self.watch(&what, t.elem_count())?;
        // The result is used at once, and `t` is freed on candle's stream when it goes.
        self.compute_waits(&event)?;
        Ok(out)
    }
}

impl Drop for NcclComm {
    /// The buffers still held are freed behind their collectives, as [`NcclComm::free`] does.
    fn drop(&mut self) {
        let held = match self.retired.get_mut() {
            Ok(r) => r.release_all(),
            Err(poisoned) => poisoned.into_inner().release_all(),
        };
        for (t, event) in held {
            let _ = self.compute.wait(&event);
            drop(t);
        }
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
        Ok(self.in_place(t, InPlaceKind::AllReduce)?.0)
    }

    fn reduce_sum_owned(&self, t: Tensor, root: usize) -> Result<Option<Tensor>> {
        let (t, event) = self.in_place(t, InPlaceKind::ReduceTo(root))?;
        if self.rank() == root {
            return Ok(Some(t));
        }
        if let Some(event) = event {
            self.retire(t, event)?;
        }
        Ok(None)
    }

    fn broadcast_owned(&self, t: Tensor, root: usize) -> Result<Tensor> {
        Ok(self.in_place(t, InPlaceKind::BroadcastFrom(root))?.0)
    }

    /// One broadcast a tensor, from and into the tensor's own buffer (a view's rows of its
    /// variable), in one NCCL group (one launch): no buffer the size of the owner's share (an 8B
    /// model's half under ZeRO 1 on 2 GPUs is 16 GB in float32), and no copies in or out of one.
    fn broadcast_in_place(&self, tensors: &[&Tensor], root: usize) -> Result<()> {
        if tensors.is_empty() {
            return Ok(());
        }
        if (tensors.iter()).any(|t| !t.device().is_cuda() || !t.is_contiguous()) {
            return broadcast_in_place_flat(self, tensors, root);
        }
        self.release_done()?;
        // One wait for candle's stream covers every var of the group.
        (self.comm.0.stream().join(&self.compute))
            .map_err(|e| self.cuda_err("NCCL stream order", e))?;
        let nccl_err = |e| self.cuda_err("NCCL group", e);
        group_start().map_err(nccl_err)?;
        let sent = (tensors.iter()).try_for_each(|t| {
            t.inplace_op1(&InPlace {
                comm: &self.comm.0,
                kind: InPlaceKind::BroadcastFrom(root),
                order: false,
            })
        });
        // The group is closed whatever happened inside it, or NCCL stays in group mode.
        let ended = group_end().map_err(nccl_err);
        sent?;
        ended?;
        let n = tensors.iter().map(|t| t.elem_count()).sum();
        let what = format!("broadcast of {} tensors from rank {root}", tensors.len());
        let event = self.watch(&what, n)?;
        self.compute_waits(&event)
    }

    fn settle(&self) -> Result<()> {
        (self.compute.join(&self.comm.0.stream()))
            .map_err(|e| self.cuda_err("NCCL stream order", e))
    }
}
