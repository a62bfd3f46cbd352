//! The optimizer step in three multi-tensor launches (src/cuda/kernels/optim.cu): the gradient
//! norm, then clip + AdamW reading the norm from device memory (and writing the next step's bf16
//! weight copies), and the bf16 casts alone; each one launch over all parameters through a device
//! table of addresses, with only as many blocks as the device holds at once.

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaSlice, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, DType, Tensor};
use half::bf16;

use super::launch::*;
use crate::error::{Error, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/optim.ptx"));

const MODULE: &str = "packsft_optim";

/// One parameter's tensors for [`adamw_step`]: weight, gradient and moments, float32 (the
/// gradient float32 or bf16), contiguous, on the same CUDA device.
pub struct AdamWSlot<'a> {
    /// The float32 weight, updated in place.
    pub param: &'a Tensor,
    /// Read as float32 either way: a bf16 gradient (what cuBLAS writes for a weight matrix in
    /// bf16 compute, as under PyTorch's autocast) is widened exactly, in registers.
    pub grad: &'a Tensor,
    /// First moment, float32, updated in place.
    pub m: &'a Tensor,
    /// Second moment, float32, updated in place.
    pub v: &'a Tensor,
    /// A bf16 tensor of the weight's shape to receive bf16(new weight), or none.
    pub copy: Option<&'a Tensor>,
    /// Whether weight decay applies.
    pub decay: bool,
    /// Bias corrections 1 - beta^t for this parameter's update count t.
    pub bc1: f32,
    /// The second moment's bias correction.
    pub bc2: f32,
}

/// Hyper-parameters of one step.
pub struct AdamWStep {
    /// Learning rate of this step.
    pub lr: f32,
    /// Decay of the first moment.
    pub beta1: f32,
    /// Decay of the second moment.
    pub beta2: f32,
    /// Added to the second moment's square root.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// The global gradient-norm clip, as `TrainerConfig::max_grad_norm`.
    pub max_grad_norm: f32,
}

/// One parameter of a multi-tensor launch: `struct Slot` of src/cuda/kernels/optim.cu.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Slot {
    p: u64,
    g: u64,
    m: u64,
    v: u64,
    copy: u64,
    n: u64,
    decay: f32,
    bc1: f32,
    bc2_sqrt: f32,
    /// 1: `g` points to bf16, 0: to float32.
    g_bf16: u32,
}

/// Elements per chunk of a multi-tensor launch (`CHUNK` in optim.cu).
const CHUNK: u64 = 16384;

/// The slot table and chunk prefix of a multi-tensor launch, on the device: the kernels find a
/// block's slot by binary search over the prefix.
struct SlotTable {
    slots: CudaSlice<u8>,
    prefix: CudaSlice<u32>,
    n: i32,
    chunks: usize,
}

impl SlotTable {
    fn upload(dev: &CudaDevice, slots: &[Slot]) -> Result<Self> {
        let mut prefix = Vec::with_capacity(slots.len() + 1);
        let mut total = 0u64;
        for s in slots {
            prefix.push(total as u32);
            total += s.n.div_ceil(CHUNK);
        }
        prefix.push(total as u32);
        if total > u32::MAX as u64 {
            return Err(Error::Training(
                "multi-tensor launch: too many chunks".into(),
            ));
        }
        let bytes: Vec<u8> = slots
            .iter()
            .flat_map(|s| {
                // SAFETY: Slot is repr(C) plain data without padding bytes (6 u64, 4 x 4 bytes).
                unsafe {
                    std::slice::from_raw_parts(
                        (s as *const Slot).cast::<u8>(),
                        std::mem::size_of::<Slot>(),
                    )
                }
                .to_vec()
            })
            .collect();
        let stream = dev.cuda_stream();
        Ok(Self {
            slots: stream.clone_htod(&bytes).w()?,
            prefix: stream.clone_htod(&prefix).w()?,
            n: slots.len() as i32,
            chunks: total as usize,
        })
    }

    /// As many blocks of 256 threads as the device holds at once (at most one per chunk): the
    /// kernels stride over the chunks, so a larger grid only leaves a second wave of blocks that
    /// runs after the first at partial occupancy (AdamW's 45 registers a thread fit 5 blocks an
    /// SM, not 8). `PACKSFT_OPTIM_BLOCKS_PER_SM` overrides the blocks an SM, for measurements.
    fn resident_cfg(&self, dev: &CudaDevice, f: &CudaFunction) -> Result<LaunchConfig> {
        let per_sm = match std::env::var("PACKSFT_OPTIM_BLOCKS_PER_SM") {
            Ok(v) => v.parse::<usize>().map_err(|_| {
                Error::Config(format!("PACKSFT_OPTIM_BLOCKS_PER_SM: not a number: {v:?}"))
            })?,
            Err(_) => f
                .occupancy_max_active_blocks_per_multiprocessor(256, 0, None)
                .w()? as usize,
        };
        let sms = dev
            .cuda_stream()
            .context()
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .w()? as usize;
        Ok(LaunchConfig {
            grid_dim: (self.chunks.clamp(1, sms * per_sm.max(1)) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }
}

/// The device address of a contiguous tensor's first element.
fn address<T: candle_core::cuda_backend::CudaDType>(t: &Tensor) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    Ok(with_storages(&[t], |st| {
        let v = cview::<T>(st[0].0, st[0].1)?;
        let stream = st[0].0.device.cuda_stream();
        let (ptr, _guard) = v.device_ptr(&stream);
        Ok(ptr)
    })?)
}

/// Clips all gradients to a global norm of `max_grad_norm` (if > 0) and applies one AdamW
/// step to every slot, in place, writing the bf16 copies of the new weights where slots have
/// them, without waiting for the device: one launch for the norm and one for the update over
/// all parameters. Returns the squared norm before clipping as a float64 device tensor of one
/// element (read it with [`read_norm`]); if it is not finite nothing was changed. A `guard` (a
/// float64 scalar on the device, e.g. the step's loss) that is not finite makes the squared
/// norm NaN and so also stops the update. With `sum_squares`, the norm is that of every rank's
/// gradients (see [`SumSquares`]).
pub fn adamw_step(
    slots: &[AdamWSlot<'_>],
    h: &AdamWStep,
    guard: Option<&Tensor>,
    sum_squares: Option<SumSquares<'_>>,
) -> Result<Tensor> {
    let Some(first) = slots.first() else {
        return Ok(Tensor::zeros(1, DType::F64, &candle_core::Device::Cpu)?);
    };
    let candle_core::Device::Cuda(dev) = first.param.device() else {
        return Err(Error::Training("fused AdamW needs a CUDA device".into()));
    };
    let mut table = Vec::with_capacity(slots.len());
    for s in slots {
        for (what, t) in [
            ("weight", s.param),
            ("gradient", s.grad),
            ("first moment", s.m),
            ("second moment", s.v),
        ] {
            let dtype_ok =
                t.dtype() == DType::F32 || (what == "gradient" && t.dtype() == DType::BF16);
            if !dtype_ok || t.dims() != s.param.dims() || !t.is_contiguous() {
                return Err(Error::Training(format!(
                    "fused AdamW: the {what} must be a contiguous float32 tensor (the gradient \
                     may be bf16) of the weight's shape {:?}, got {:?} {:?}",
                    s.param.dims(),
                    t.dtype(),
                    t.dims()
                )));
            }
        }
        let g_bf16 = s.grad.dtype() == DType::BF16;
        let copy = match s.copy {
            Some(c)
                if c.dtype() == DType::BF16 && c.dims() == s.param.dims() && c.is_contiguous() =>
            {
                address::<bf16>(c)?
            }
            Some(c) => {
                return Err(Error::Training(format!(
                    "fused AdamW: the weight copy must be contiguous bf16 {:?}, got {:?} {:?}",
                    s.param.dims(),
                    c.dtype(),
                    c.dims()
                )))
            }
            None => 0,
        };
        table.push(Slot {
            p: address::<f32>(s.param)?,
            g: if g_bf16 {
                address::<bf16>(s.grad)?
            } else {
                address::<f32>(s.grad)?
            },
            m: address::<f32>(s.m)?,
            v: address::<f32>(s.v)?,
            copy,
            n: s.param.elem_count() as u64,
            decay: if s.decay {
                1.0 - h.lr * h.weight_decay
            } else {
                1.0
            },
            bc1: s.bc1,
            bc2_sqrt: s.bc2.sqrt(),
            g_bf16: g_bf16 as u32,
        });
    }
    let t = SlotTable::upload(dev, &table)?;
    let sumsq = dev.alloc_zeros::<f64>(1)?;
    let stream = dev.cuda_stream();
    if let Some(g) = guard {
        let g = g.to_dtype(DType::F64)?.flatten_all()?.contiguous()?;
        with_storages(&[&g], |st| {
            let gv = cview::<f64>(st[0].0, st[0].1)?;
            let f = kernel(dev, MODULE, PTX, "sumsq_guard")?;
            let mut b = stream.launch_builder(&f);
            b.arg(&gv).arg(&sumsq);
            unsafe { b.launch(LaunchConfig::for_num_elems(1)) }.w()?;
            Ok(())
        })?;
    }
    // The kernels read and write the tensors through the table's addresses: the weights,
    // moments and copies are the optimizer's and the model's own buffers, and nothing else
    // touches them meanwhile (one stream); every tensor outlives the launches in stream order.
    let f = kernel(dev, MODULE, PTX, "grad_sumsq_multi")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&t.slots).arg(&t.prefix).arg(&t.n).arg(&sumsq);
    // Each block ends with one atomic add to the shared sum: ~1,000 of them are nothing, and a
    // full SM (8 blocks of 256 threads at 30 registers) keeps more loads in flight than 4 did.
    unsafe { b.launch(t.resident_cfg(dev, &f)?) }.w()?;
    let mut sumsq = wrap(sumsq, dev, 1, first.param)?;
    if let Some(sum) = sum_squares {
        // A sharded optimizer's ranks each summed the squares of their own gradients: the
        // global norm is the sum over ranks, on the device, before anyone clips.
        sumsq = sum(&sumsq)?.contiguous()?;
    }
    let f = kernel(dev, MODULE, PTX, "adamw_multi")?;
    let cfg = t.resident_cfg(dev, &f)?;
    with_storages(&[&sumsq], |st| {
        let norm = cview::<f64>(st[0].0, st[0].1)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&t.slots).arg(&t.prefix).arg(&t.n).arg(&norm);
        b.arg(&h.max_grad_norm)
            .arg(&h.lr)
            .arg(&h.beta1)
            .arg(&h.beta2)
            .arg(&h.eps);
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    })?;
    Ok(sumsq)
}

/// Sums a squared gradient norm (a float64 scalar tensor) over the ranks of a sharded
/// optimizer, each of which holds the gradients of the parameters it owns.
pub type SumSquares<'a> = &'a dyn Fn(&Tensor) -> Result<Tensor>;

/// The gradient norm from [`adamw_step`]'s squared norm (waits for the device).
pub fn read_norm(sumsq: &Tensor) -> Result<f64> {
    Ok(sumsq
        .to_vec1::<f64>()?
        .first()
        .copied()
        .unwrap_or(0.0)
        .sqrt())
}

/// Writes bf16(`src`) into `dst` in place for every (src, dst) pair in one launch: contiguous
/// tensors of one shape, float32 and bf16, on one CUDA device; each `dst` is a buffer its owner
/// rewrites every step (the compute-weight copies), read by nothing else meanwhile.
pub fn cast_bf16_into(pairs: &[(&Tensor, &Tensor)]) -> Result<()> {
    let Some((first, _)) = pairs.first() else {
        return Ok(());
    };
    let candle_core::Device::Cuda(dev) = first.device() else {
        return Err(Error::Training("cast_bf16_into needs a CUDA device".into()));
    };
    let mut table = Vec::with_capacity(pairs.len());
    for (src, dst) in pairs {
        if src.dtype() != DType::F32
            || dst.dtype() != DType::BF16
            || src.dims() != dst.dims()
            || !src.is_contiguous()
            || !dst.is_contiguous()
        {
            return Err(Error::Training(format!(
                "cast_bf16_into: contiguous float32 {:?} into bf16 of the same shape expected, got {:?} {:?}",
                src.dims(),
                dst.dtype(),
                dst.dims()
            )));
        }
        table.push(Slot {
            p: address::<f32>(src)?,
            copy: address::<bf16>(dst)?,
            n: src.elem_count() as u64,
            ..Default::default()
        });
    }
    let t = SlotTable::upload(dev, &table)?;
    let f = kernel(dev, MODULE, PTX, "cast_bf16_multi")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&t.slots).arg(&t.prefix).arg(&t.n);
    unsafe { b.launch(t.resident_cfg(dev, &f)?) }.w()?;
    Ok(())
}

/// The tensors (float32 or bf16, contiguous, on one CUDA device) widened to float32 and laid
/// end to end in one new flat tensor, in one launch: a data-parallel gradient bucket.
pub fn flatten_f32(tensors: &[&Tensor]) -> Result<Tensor> {
    let Some(first) = tensors.first() else {
        return Err(Error::Training("flatten_f32: no tensors".into()));
    };
    let candle_core::Device::Cuda(dev) = first.device() else {
        return Err(Error::Training("flatten_f32 needs a CUDA device".into()));
    };
    let total: usize = tensors.iter().map(|t| t.elem_count()).sum();
    // SAFETY: the launch below writes every element before anything reads the buffer (one
    // stream), so it needs no zero fill first.
    let out = wrap(
        unsafe { dev.alloc::<f32>(total.max(1))? },
        dev,
        total,
        first,
    )?;
    let base = address::<f32>(&out)?;
    let mut table = Vec::with_capacity(tensors.len());
    let mut at = 0u64;
    for t in tensors {
        let g_bf16 = match t.dtype() {
            DType::BF16 => true,
            DType::F32 => false,
            dt => {
                return Err(Error::Training(format!(
                    "flatten_f32: float32 or bf16 tensors expected, got {dt:?}"
                )))
            }
        };
        if !t.is_contiguous() {
            return Err(Error::Training(
                "flatten_f32: contiguous tensors expected".into(),
            ));
        }
        table.push(Slot {
            p: base + at * 4,
            g: if g_bf16 {
                address::<bf16>(t)?
            } else {
                address::<f32>(t)?
            },
            n: t.elem_count() as u64,
            g_bf16: g_bf16 as u32,
            ..Default::default()
        });
        at += t.elem_count() as u64;
    }
    let t = SlotTable::upload(dev, &table)?;
    let f = kernel(dev, MODULE, PTX, "widen_into_multi")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&t.slots).arg(&t.prefix).arg(&t.n);
    unsafe { b.launch(t.resident_cfg(dev, &f)?) }.w()?;
    Ok(out)
}
