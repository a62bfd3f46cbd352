//! Fused CUDA kernels for bf16 training, each measured against the chain of candle ops it
//! replaces (docs/BENCHMARKS.md):
//! - the optimizer step (src/cuda/kernels/optim.cu): the gradient norm, then clip + AdamW, each one
//!   multi-tensor launch over all parameters that reads the norm from device memory; AdamW can
//!   write the next step's bf16 weight copies in the same pass. No host round trip (the norm is
//!   read later, for the log), one pass over each weight and its moments instead of ~20;
//! - RMSNorm, rotary embedding, SiLU-gated products, the masked cross-entropy and row gathers
//!   with their backward passes, and a vectorised add (src/cuda/kernels/fused_ops.cu), as candle
//!   custom ops: one kernel each way instead of a chain, and no float32 intermediates kept for
//!   the backward.
//!
//! The model uses them for bf16 compute on CUDA ([`usable`]); everywhere else, and as the
//! reference in tests/gpu_ops.rs, it uses the differentiable formulations of the reference ops (`nn::ops`).

use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape,
    Storage, Tensor, D,
};
use half::bf16;

use crate::error::{Error, Result};
use crate::pullback::{PairGrads, Pullback};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/optim.ptx"));
const MODULE: &str = "packsft_optim";
const OPS_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused_ops.ptx"));
const OPS_MODULE: &str = "packsft_fused_ops";

/// One parameter's tensors for [`adamw_step`]: weight, gradient and moments, float32 (the
/// gradient float32 or bf16), contiguous, on the same CUDA device.
pub struct AdamWSlot<'a> {
    pub param: &'a Tensor,
    /// Read as float32 either way: a bf16 gradient (what cuBLAS writes for a weight matrix in
    /// bf16 compute, as under PyTorch's autocast) is widened exactly, in registers.
    pub grad: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    /// A bf16 tensor of the weight's shape to receive bf16(new weight), or none.
    pub copy: Option<&'a Tensor>,
    pub decay: bool,
    /// Bias corrections 1 - beta^t for this parameter's update count t.
    pub bc1: f32,
    pub bc2: f32,
}

/// Hyper-parameters of one step.
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
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
/// norm NaN and so also stops the update.
pub fn adamw_step(
    slots: &[AdamWSlot<'_>],
    h: &AdamWStep,
    guard: Option<&Tensor>,
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
    let f = kernel(dev, MODULE, PTX, "adamw_multi")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&t.slots).arg(&t.prefix).arg(&t.n).arg(&sumsq);
    b.arg(&h.max_grad_norm)
        .arg(&h.lr)
        .arg(&h.beta1)
        .arg(&h.beta2)
        .arg(&h.eps);
    unsafe { b.launch(t.resident_cfg(dev, &f)?) }.w()?;
    Ok(wrap(sumsq, dev, 1, first.param)?)
}

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

struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "packsft-add"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cerr("fused add: CUDA only"))
    }
    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = al.shape().elem_count();
        let dev = a.device.clone();
        let (av, bv) = (cview::<bf16>(a, al)?, cview::<bf16>(b, bl)?);
        let y = unsafe { dev.alloc::<bf16>(n)? };
        let f = ops_func(&dev, "add_bf16")?;
        let stream = dev.cuda_stream();
        let mut l = stream.launch_builder(&f);
        let n64 = n as u64;
        l.arg(&av).arg(&bv).arg(&y).arg(&n64);
        unsafe { l.launch(grid_cfg(n.div_ceil(256 * 8), 8)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), al.shape().clone()))
    }
    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(dy.clone()), Some(dy.clone())))
    }
}

/// a + b for bf16 tensors of one shape on CUDA in one vectorised pass (candle's strided add
/// reads at about a third of the card's bandwidth: the gradient sums and residuals of every
/// layer); anything else through candle's add. Differentiable either way.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if usable(a) && usable(b) && a.dims() == b.dims() {
        let (a, b) = (a.contiguous()?, b.contiguous()?);
        return Ok(a.apply_op2(&b, Add)?);
    }
    Ok((a + b)?)
}

/// Whether the fused layers apply to `x`: bf16 on a CUDA device.
pub fn usable(x: &Tensor) -> bool {
    x.device().is_cuda() && x.dtype() == DType::BF16
}

/// A kernel of one of this project's PTX modules (loaded once per device by candle).
pub(crate) fn kernel(
    dev: &CudaDevice,
    module: &str,
    ptx: &'static str,
    name: &str,
) -> candle_core::Result<CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(name, module, ptx)?
        .into_cuda_function())
}

fn ops_func(dev: &CudaDevice, name: &str) -> candle_core::Result<CudaFunction> {
    kernel(dev, OPS_MODULE, OPS_PTX, name)
}

pub(crate) fn cerr(msg: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Cuda(msg.into().into())
}

pub(crate) fn cview<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    if !l.is_contiguous() {
        return Err(cerr("fused op: non-contiguous input"));
    }
    let n = l.shape().elem_count();
    Ok(s.as_cuda_slice::<T>()?
        .slice(l.start_offset()..l.start_offset() + n))
}

/// Runs `f` with the CUDA storage and layout of each tensor.
pub(crate) fn with_storages<R>(
    ts: &[&Tensor],
    f: impl FnOnce(&[(&CudaStorage, &Layout)]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut v = Vec::with_capacity(ts.len());
    for (g, l) in &guards {
        match &**g {
            Storage::Cuda(s) => v.push((s, *l)),
            _ => return Err(cerr("fused op: tensor not on CUDA")),
        }
    }
    f(&v)
}

/// A tensor around a device buffer a kernel just wrote (a custom op that only hands it over).
struct Emit(Mutex<Option<CudaStorage>>, Shape);

impl CustomOp1 for Emit {
    fn name(&self) -> &'static str {
        "packsft-emit"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cerr("packsft-emit: CUDA only"))
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let s = self
            .0
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| cerr("emitted twice"))?;
        Ok((s, self.1.clone()))
    }
}

pub(crate) fn wrap<T: candle_core::cuda_backend::CudaDType>(
    slice: CudaSlice<T>,
    dev: &CudaDevice,
    shape: impl Into<Shape>,
    like: &Tensor,
) -> candle_core::Result<Tensor> {
    let op = Emit(
        Mutex::new(Some(CudaStorage::wrap_cuda_slice(slice, dev.clone()))),
        shape.into(),
    );
    like.apply_op1_no_bwd(&op)
}

/// Blocks of 256 threads: `blocks` of them (at least one), at most `blocks_per_sm` on each of an
/// H100's 132 SMs; the kernels stride over what a smaller grid leaves.
fn grid_cfg(blocks: usize, blocks_per_sm: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.clamp(1, 132 * blocks_per_sm) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One thread per element.
pub(crate) fn elementwise_cfg(n: usize) -> LaunchConfig {
    grid_cfg(n.div_ceil(256), 32)
}

const NORM_MAX_HIDDEN: usize = 256 * 32;

/// Whether the fused RMSNorm kernels take rows of `x`'s width.
pub fn rms_norm_fits(x: &Tensor) -> bool {
    x.dims().last().is_some_and(|&h| h <= NORM_MAX_HIDDEN)
}

/// The RMSNorm backward instance (`rms_norm_bwd_c{COLS}` in fused_ops.cu) with the fewest columns
/// a thread that still covers `h` with 256 threads.
fn rms_norm_bwd_kernel(h: usize) -> &'static str {
    const INSTANCES: [(usize, &str); 8] = [
        (1, "rms_norm_bwd_c1"),
        (2, "rms_norm_bwd_c2"),
        (4, "rms_norm_bwd_c4"),
        (8, "rms_norm_bwd_c8"),
        (12, "rms_norm_bwd_c12"),
        (16, "rms_norm_bwd_c16"),
        (24, "rms_norm_bwd_c24"),
        (32, "rms_norm_bwd_c32"),
    ];
    let cols = h.div_ceil(256);
    INSTANCES
        .iter()
        .find(|(c, _)| *c >= cols)
        .map_or("rms_norm_bwd_c32", |(_, name)| name)
}

struct RmsNorm {
    eps: f32,
    rstd: Mutex<Option<Arc<CudaSlice<f32>>>>,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "packsft-rms-norm"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cerr("fused RMSNorm: CUDA only"))
    }
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, h) = xl.shape().dims2()?;
        let dev = xs.device.clone();
        let (x, w) = (cview::<bf16>(xs, xl)?, cview::<f32>(ws, wl)?);
        let y = unsafe { dev.alloc::<bf16>(rows * h)? };
        let rstd = unsafe { dev.alloc::<f32>(rows.max(1))? };
        let f = ops_func(&dev, "rms_norm_fwd")?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let (r, hh) = (rows as i32, h as i32);
        b.arg(&x)
            .arg(&w)
            .arg(&y)
            .arg(&rstd)
            .arg(&r)
            .arg(&hh)
            .arg(&self.eps);
        unsafe { b.launch(grid_cfg(rows, 8)) }.w()?;
        *self.rstd.lock().unwrap() = Some(Arc::new(rstd));
        Ok((CudaStorage::wrap_cuda_slice(y, dev), xl.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, h) = x.dims2()?;
        let rstd = self
            .rstd
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| cerr("no forward"))?;
        let dy = dy.to_dtype(DType::BF16)?.contiguous()?;
        with_storages(&[x, w, &dy], |s| {
            let dev = s[0].0.device.clone();
            let (xv, wv, dyv) = (
                cview::<bf16>(s[0].0, s[0].1)?,
                cview::<f32>(s[1].0, s[1].1)?,
                cview::<bf16>(s[2].0, s[2].1)?,
            );
            let dx = unsafe { dev.alloc::<bf16>(rows * h)? };
            let dw = dev.alloc_zeros::<f32>(h)?;
            let f = ops_func(&dev, rms_norm_bwd_kernel(h))?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let (r, hh) = (rows as i32, h as i32);
            b.arg(&xv)
                .arg(&wv)
                .arg(&dyv)
                .arg(rstd.as_ref())
                .arg(&dx)
                .arg(&dw)
                .arg(&r)
                .arg(&hh);
            // Four blocks an SM at most: each then strides over more rows, and fewer blocks
            // end with an atomic add of every column of the weight's gradient.
            unsafe { b.launch(grid_cfg(rows, 4)) }.w()?;
            Ok((
                Some(wrap(dx, &dev, (rows, h), x)?),
                Some(wrap(dw, &dev, h, x)?),
            ))
        })
    }
}

/// RMSNorm as the reference `nn::ops::rms_norm` (x bf16 (.., hidden), float32 weight (hidden)), fused;
/// the weight's gradient is float32. Only for rows that [`rms_norm_fits`].
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let h = *dims.last().unwrap_or(&0);
    if !rms_norm_fits(x) {
        return Err(Error::Training(format!(
            "fused RMSNorm takes rows of at most {NORM_MAX_HIDDEN} values, not {h}"
        )));
    }
    let x2 = x.reshape(((), h))?.contiguous()?;
    let w = w.to_dtype(DType::F32)?.contiguous()?;
    let op = RmsNorm {
        eps: eps as f32,
        rstd: Mutex::new(None),
    };
    Ok(x2.apply_op2(&w, op)?.reshape(dims)?)
}

struct Rope;

/// The rotation (or its transpose, the gradient) of x (n, heads, d) by cos/sin (n, rot).
fn rope_kernel(
    dev: &CudaDevice,
    x: &CudaView<'_, bf16>,
    cos: &CudaView<'_, bf16>,
    sin: &CudaView<'_, bf16>,
    (n, heads, d): (usize, usize, usize),
    rot: usize,
    backward: bool,
) -> candle_core::Result<CudaSlice<bf16>> {
    let mut y = unsafe { dev.alloc::<bf16>(n * heads * d)? };
    let stream = dev.cuda_stream();
    if rot == d && heads_fit(&stream, &[x, cos, sin], n, heads, d) {
        let row = heads * d;
        let mode = if backward {
            HEADS_ROTATE_BACK
        } else {
            HEADS_ROTATE
        };
        let mut out = y.slice_mut(..);
        rope_heads(
            dev,
            (x, row),
            (cos, sin),
            (&mut out, row),
            (n, heads, d),
            mode,
        )?;
        return Ok(y);
    }
    let f = ops_func(dev, "rope_bf16")?;
    let mut b = stream.launch_builder(&f);
    let (ni, hi, di, ri, bw) = (
        n as i32,
        heads as i32,
        d as i32,
        rot as i32,
        backward as i32,
    );
    b.arg(x)
        .arg(cos)
        .arg(sin)
        .arg(&y)
        .arg(&ni)
        .arg(&hi)
        .arg(&di)
        .arg(&ri)
        .arg(&bw);
    unsafe { b.launch(elementwise_cfg(n * heads * (d - rot / 2))) }.w()?;
    Ok(y)
}

const HEADS_ROTATE: i32 = 0;
const HEADS_ROTATE_BACK: i32 = 1;
const HEADS_COPY: i32 = 2;

/// Whether `rope_heads_bf16` applies: d a multiple of 8, every buffer 8-byte aligned, and its
/// 32-bit thread index enough.
fn heads_fit(
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    bufs: &[&CudaView<'_, bf16>],
    n: usize,
    heads: usize,
    d: usize,
) -> bool {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    d % 8 == 0
        && n * heads * d / 8 < i32::MAX as usize
        && bufs.iter().all(|b| b.device_ptr(stream).0 % 8 == 0)
}

/// `rope_heads_bf16`: (n, heads, d) heads from `input` (rows `in_row` apart) to `out` (rows
/// `out_row` apart), rotated, rotated back or copied (`mode`). cos and sin (n, d) are not read
/// for a copy.
fn rope_heads(
    dev: &CudaDevice,
    (input, in_row): (&CudaView<'_, bf16>, usize),
    (cos, sin): (&CudaView<'_, bf16>, &CudaView<'_, bf16>),
    (out, out_row): (&mut CudaViewMut<'_, bf16>, usize),
    (n, heads, d): (usize, usize, usize),
    mode: i32,
) -> candle_core::Result<()> {
    let f = ops_func(dev, "rope_heads_bf16")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    let (ir, or) = (in_row as i64, out_row as i64);
    let (ni, hi, di) = (n as i32, heads as i32, d as i32);
    b.arg(input).arg(&ir).arg(cos).arg(sin).arg(out).arg(&or);
    b.arg(&ni).arg(&hi).arg(&di).arg(&mode);
    unsafe { b.launch(elementwise_cfg(n * heads * d / 8)) }.w()?;
    Ok(())
}

/// q, k and v of a layer's stacked projection y (n, (heads + 2 kv_heads) d), bf16 on CUDA, as
/// contiguous (n, heads, d), (n, kv_heads, d), (n, kv_heads, d): q and k rotated by cos and sin
/// (n, d), v copied; one pass over y instead of strided copies and then the rotation. `None`
/// where the kernel does not apply (partial rotation, d not a multiple of 8, unaligned buffers).
pub fn rope_split_stacked(
    y: &Tensor,
    (heads, kv_heads, d): (usize, usize, usize),
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let (n, cols) = y.dims2()?;
    let cos = cos.to_dtype(DType::BF16)?.contiguous()?;
    let sin = sin.to_dtype(DType::BF16)?.contiguous()?;
    if cols != (heads + 2 * kv_heads) * d || cos.dim(D::Minus1)? != d || !usable(y) {
        return Ok(None);
    }
    let y = y.contiguous()?;
    Ok(with_storages(&[&y, &cos, &sin], |s| {
        let dev = s[0].0.device.clone();
        let (yv, cv, sv) = (
            cview::<bf16>(s[0].0, s[0].1)?,
            cview::<bf16>(s[1].0, s[1].1)?,
            cview::<bf16>(s[2].0, s[2].1)?,
        );
        if !heads_fit(
            &dev.cuda_stream(),
            &[&yv, &cv, &sv],
            n,
            heads + 2 * kv_heads,
            d,
        ) {
            return Ok(None);
        }
        let mut q = unsafe { dev.alloc::<bf16>((n * heads * d).max(1))? };
        let mut k = unsafe { dev.alloc::<bf16>((n * kv_heads * d).max(1))? };
        let mut v = unsafe { dev.alloc::<bf16>((n * kv_heads * d).max(1))? };
        let parts = [
            (&mut q, 0, heads, HEADS_ROTATE),
            (&mut k, heads, kv_heads, HEADS_ROTATE),
            (&mut v, heads + kv_heads, kv_heads, HEADS_COPY),
        ];
        for (out, first, count, mode) in parts {
            let input = yv.slice(first * d..);
            let mut out = out.slice_mut(..);
            rope_heads(
                &dev,
                (&input, cols),
                (&cv, &sv),
                (&mut out, count * d),
                (n, count, d),
                mode,
            )?;
        }
        Ok(Some((
            wrap(q, &dev, (n, heads, d), &y)?,
            wrap(k, &dev, (n, kv_heads, d), &y)?,
            wrap(v, &dev, (n, kv_heads, d), &y)?,
        )))
    })?)
}

/// The gradient of [`rope_split_stacked`]'s input from its outputs' gradients dq (n, heads, d),
/// dk and dv (n, kv_heads, d): (n, (heads + 2 kv_heads) d), dq and dk rotated back and dv
/// copied, each into its columns in one pass; where the kernel does not apply, rotated back one
/// by one and concatenated.
pub fn rope_join_stacked(
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let (n, heads, d) = dq.dims3()?;
    let kv_heads = dk.dim(1)?;
    let cols = (heads + 2 * kv_heads) * d;
    let cos = cos.to_dtype(DType::BF16)?.contiguous()?;
    let sin = sin.to_dtype(DType::BF16)?.contiguous()?;
    let bf = |t: &Tensor| t.to_dtype(DType::BF16)?.contiguous();
    let (dq, dk, dv) = (bf(dq)?, bf(dk)?, bf(dv)?);
    let shapes_fit = dk.dims3()? == (n, kv_heads, d)
        && dv.dims3()? == (n, kv_heads, d)
        && cos.dim(D::Minus1)? == d
        && usable(&dq);
    if shapes_fit {
        let joined = with_storages(&[&dq, &dk, &dv, &cos, &sin], |s| {
            let dev = s[0].0.device.clone();
            let v = |i: usize| cview::<bf16>(s[i].0, s[i].1);
            let (qv, kv, vv, cv, sv) = (v(0)?, v(1)?, v(2)?, v(3)?, v(4)?);
            let stream = dev.cuda_stream();
            if !heads_fit(
                &stream,
                &[&qv, &kv, &vv, &cv, &sv],
                n,
                heads + 2 * kv_heads,
                d,
            ) {
                return Ok(None);
            }
            let mut dy = unsafe { dev.alloc::<bf16>((n * cols).max(1))? };
            let parts = [
                (&qv, 0, heads, HEADS_ROTATE_BACK),
                (&kv, heads, kv_heads, HEADS_ROTATE_BACK),
                (&vv, heads + kv_heads, kv_heads, HEADS_COPY),
            ];
            for (input, first, count, mode) in parts {
                let mut out = dy.slice_mut(first * d..);
                rope_heads(
                    &dev,
                    (input, count * d),
                    (&cv, &sv),
                    (&mut out, cols),
                    (n, count, d),
                    mode,
                )?;
            }
            Ok(Some(wrap(dy, &dev, (n, cols), &dq)?))
        })?;
        if let Some(t) = joined {
            return Ok(t);
        }
    }
    let back = |g: &Tensor| -> Result<Tensor> {
        let (dx, _, _) = Rope.bwd(g, &cos, &sin, g, g)?;
        let dx = dx.ok_or_else(|| cerr("rope: no dx"))?;
        Ok(dx.reshape((n, ()))?)
    };
    Ok(Tensor::cat(
        &[back(&dq)?, back(&dk)?, dv.reshape((n, ()))?],
        1,
    )?)
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "packsft-rope"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cerr("fused RoPE: CUDA only"))
    }
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        cs: &CudaStorage,
        cl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dims = xl.shape().dims3()?;
        let rot = cl.shape().dims().last().copied().unwrap_or(0);
        let dev = xs.device.clone();
        let (xv, cv, sv) = (
            cview::<bf16>(xs, xl)?,
            cview::<bf16>(cs, cl)?,
            cview::<bf16>(ss, sl)?,
        );
        let y = rope_kernel(&dev, &xv, &cv, &sv, dims, rot, false)?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), xl.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.to_dtype(DType::BF16)?.contiguous()?;
        let dims = dy.dims3()?;
        let rot = cos.dim(candle_core::D::Minus1)?;
        let dx = with_storages(&[&dy, cos, sin], |s| {
            let dev = s[0].0.device.clone();
            let (dv, cv, sv) = (
                cview::<bf16>(s[0].0, s[0].1)?,
                cview::<bf16>(s[1].0, s[1].1)?,
                cview::<bf16>(s[2].0, s[2].1)?,
            );
            let y = rope_kernel(&dev, &dv, &cv, &sv, dims, rot, true)?;
            wrap(y, &dev, dims, &dy)
        })?;
        Ok((Some(dx), None, None))
    }
}

/// Rotary embedding as the reference `nn::ops::apply_rope`: x bf16 (tokens, heads, head_dim), cos and
/// sin (tokens, 1, rotary_dim); no gradient to cos and sin (they are constants).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let cos = cos.to_dtype(DType::BF16)?.contiguous()?;
    let sin = sin.to_dtype(DType::BF16)?.contiguous()?;
    Ok(x.contiguous()?.apply_op3(&cos, &sin, Rope)?)
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "packsft-silu-mul"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cerr("fused SiLU-mul: CUDA only"))
    }
    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        us: &CudaStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = gl.shape().elem_count();
        let dev = gs.device.clone();
        let (g, u) = (cview::<bf16>(gs, gl)?, cview::<bf16>(us, ul)?);
        let y = unsafe { dev.alloc::<bf16>(n)? };
        let f = ops_func(&dev, "silu_mul_fwd")?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let nn = n as i64;
        b.arg(&g).arg(&u).arg(&y).arg(&nn);
        unsafe { b.launch(elementwise_cfg(n)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), gl.shape().clone()))
    }
    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.to_dtype(DType::BF16)?.contiguous()?;
        let n = g.elem_count();
        with_storages(&[g, u, &dy], |s| {
            let dev = s[0].0.device.clone();
            let (gv, uv, dv) = (
                cview::<bf16>(s[0].0, s[0].1)?,
                cview::<bf16>(s[1].0, s[1].1)?,
                cview::<bf16>(s[2].0, s[2].1)?,
            );
            let dg = unsafe { dev.alloc::<bf16>(n)? };
            let du = unsafe { dev.alloc::<bf16>(n)? };
            let f = ops_func(&dev, "silu_mul_bwd")?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let nn = n as i64;
            b.arg(&gv).arg(&uv).arg(&dv).arg(&dg).arg(&du).arg(&nn);
            unsafe { b.launch(elementwise_cfg(n)) }.w()?;
            Ok((
                Some(wrap(dg, &dev, g.shape().clone(), g)?),
                Some(wrap(du, &dev, u.shape().clone(), g)?),
            ))
        })
    }
}

/// silu(g) * u for bf16 g and u of one shape, fused.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    Ok(g.contiguous()?.apply_op2(&u.contiguous()?, SiluMul)?)
}

/// [`rms_norm`] with its pullback (dx, float32 dw) for a hand-written backward; `None` where the
/// fused kernel does not apply (hidden size above its limit).
pub fn rms_norm_vjp(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
) -> Result<Option<(Tensor, Pullback<PairGrads>)>> {
    let dims = x.dims().to_vec();
    let h = *dims.last().unwrap_or(&0);
    if h > NORM_MAX_HIDDEN {
        return Ok(None);
    }
    let x2 = x.reshape(((), h))?.contiguous()?.detach();
    let w = w.to_dtype(DType::F32)?.contiguous()?.detach();
    // The forward leaves rstd in the op for its backward: keep a handle on it.
    let op: Arc<Box<dyn CustomOp2 + Send + Sync>> = Arc::new(Box::new(RmsNorm {
        eps: eps as f32,
        rstd: Mutex::new(None),
    }));
    let y2 = x2.apply_op2_arc(&w, op.clone())?;
    let y = y2.reshape(dims.as_slice())?;
    let back = move |dy: &Tensor| -> Result<PairGrads> {
        let dy = dy.reshape(((), h))?;
        let (dx, dw) = op.bwd(&x2, &w, &y2, &dy)?;
        let dx = dx.ok_or_else(|| cerr("rms_norm: no dx"))?;
        Ok((
            dx.reshape(dims.as_slice())?,
            dw.ok_or_else(|| cerr("rms_norm: no dw"))?,
        ))
    };
    Ok(Some((y, Box::new(back))))
}

/// [`apply_rope`] with its pullback.
pub fn apply_rope_vjp(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Pullback<Tensor>)> {
    let cos = cos.to_dtype(DType::BF16)?.contiguous()?.detach();
    let sin = sin.to_dtype(DType::BF16)?.contiguous()?.detach();
    let x = x.contiguous()?.detach();
    let y = x.apply_op3(&cos, &sin, Rope)?;
    let y2 = y.clone();
    let back = move |dy: &Tensor| -> Result<Tensor> {
        let (dx, _, _) = Rope.bwd(&x, &cos, &sin, &y2, dy)?;
        Ok(dx.ok_or_else(|| cerr("rope: no dx"))?)
    };
    Ok((y, Box::new(back)))
}

/// [`silu_mul`] with its pullback (dg, du).
pub fn silu_mul_vjp(g: &Tensor, u: &Tensor) -> Result<(Tensor, Pullback<PairGrads>)> {
    let g = g.contiguous()?.detach();
    let u = u.contiguous()?.detach();
    let y = g.apply_op2(&u, SiluMul)?;
    let y2 = y.clone();
    let back = move |dy: &Tensor| -> Result<PairGrads> {
        let (dg, du) = SiluMul.bwd(&g, &u, &y2, dy)?;
        Ok((
            dg.ok_or_else(|| cerr("silu_mul: no dg"))?,
            du.ok_or_else(|| cerr("silu_mul: no du"))?,
        ))
    };
    Ok((y, Box::new(back)))
}

/// The weight gradient dy^T x of a linear layer, dy (N, out) and x (N, in) bf16 on CUDA, as a
/// bf16 (out, in) matrix straight from cuBLAS (bf16 products, float32 accumulation): what
/// PyTorch's autocast gives a float32 weight (a bf16 product, then widened). The fused optimizer
/// reads it as it is, so neither a cast pass nor a float32 copy of every weight's gradient is
/// needed.
pub fn weight_grad_bf16(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (n, out) = dy.dims2()?;
    let (n2, inp) = x.dims2()?;
    if n != n2 || dy.dtype() != DType::BF16 || x.dtype() != DType::BF16 {
        return Err(Error::Config(format!(
            "weight gradient of {:?} {:?} and {:?} {:?}",
            dy.shape(),
            dy.dtype(),
            x.shape(),
            x.dtype()
        )));
    }
    let (dy, x) = (dy.contiguous()?, x.contiguous()?);
    Ok(with_storages(&[&dy, &x], |s| {
        let dev = s[0].0.device.clone();
        let (dyv, xv) = (
            cview::<bf16>(s[0].0, s[0].1)?,
            cview::<bf16>(s[1].0, s[1].1)?,
        );
        let dw = unsafe { dev.alloc::<bf16>((out * inp).max(1))? };
        let stream = dev.cuda_stream();
        {
            let (pa, _ga) = xv.device_ptr(&stream);
            let (pb, _gb) = dyv.device_ptr(&stream);
            let (pc, _gc) = dw.device_ptr(&stream);
            let (alpha, beta) = (1f32, 0f32);
            // Column-major view of the row-major product: dW^T (in, out) = x^T (in, N) · dy (N, out).
            unsafe {
                gemm_ex(
                    *dev.cublas_handle().handle(),
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    sys::cublasOperation_t::CUBLAS_OP_T,
                    inp as i32,
                    out as i32,
                    n as i32,
                    &alpha as *const f32 as *const _,
                    pa as *const _,
                    sys::cudaDataType::CUDA_R_16BF,
                    inp as i32,
                    pb as *const _,
                    sys::cudaDataType::CUDA_R_16BF,
                    out as i32,
                    &beta as *const f32 as *const _,
                    pc as *mut _,
                    sys::cudaDataType::CUDA_R_16BF,
                    inp as i32,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| cerr(format!("cublas weight gradient: {e:?}")))?;
        }
        wrap(dw, &dev, (out, inp), &dy)
    })?)
}

struct CrossEntropy {
    lse: Arc<Mutex<Option<Arc<CudaSlice<f32>>>>>,
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "packsft-cross-entropy"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cerr("fused cross-entropy: CUDA only"))
    }
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ts: &CudaStorage,
        tl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, vocab) = xl.shape().dims2()?;
        let dev = xs.device.clone();
        let (x, t) = (cview::<bf16>(xs, xl)?, cview::<u32>(ts, tl)?);
        let lse = unsafe { dev.alloc::<f32>(rows.max(1))? };
        let nll = unsafe { dev.alloc::<f32>(rows.max(1))? };
        let f = ops_func(&dev, "ce_fwd_bf16")?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let (r, v) = (rows as i32, vocab as i32);
        b.arg(&x).arg(&t).arg(&lse).arg(&nll).arg(&r).arg(&v);
        unsafe { b.launch(grid_cfg(rows, 16)) }.w()?;
        *self.lse.lock().unwrap() = Some(Arc::new(lse));
        Ok((CudaStorage::wrap_cuda_slice(nll, dev), Shape::from(rows)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, vocab) = x.dims2()?;
        let lse = self
            .lse
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| cerr("no forward"))?;
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        with_storages(&[x, t, &g], |s| {
            let dev = s[0].0.device.clone();
            let (xv, tv, gv) = (
                cview::<bf16>(s[0].0, s[0].1)?,
                cview::<u32>(s[1].0, s[1].1)?,
                cview::<f32>(s[2].0, s[2].1)?,
            );
            let dx = unsafe { dev.alloc::<bf16>(rows * vocab)? };
            let f = ops_func(&dev, "ce_bwd_bf16")?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let (r, v) = (rows as i32, vocab as i32);
            b.arg(&xv)
                .arg(&tv)
                .arg(lse.as_ref())
                .arg(&gv)
                .arg(&dx)
                .arg(&r)
                .arg(&v);
            unsafe { b.launch(grid_cfg(rows, 16)) }.w()?;
            Ok((Some(wrap(dx, &dev, (rows, vocab), x)?), None))
        })
    }
}

/// Negative log-likelihood (rows,) float32 of u32 `targets` under bf16 `logits` (rows,
/// vocab), as the reference `nn::ops::nll` computes it (float32 log-sum-exp minus the target's logit),
/// in one kernel each way and without float32 logits; a target outside the vocabulary gives NaN.
pub fn nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
    let op = CrossEntropy {
        lse: Arc::new(Mutex::new(None)),
    };
    Ok(logits.contiguous()?.apply_op2(&targets, op)?)
}

/// [`nll`] outside autograd, with its backward (the per-row loss gradient to the logits'
/// gradient) as a function: for a graph node that owns the logits, so that autograd never holds
/// a logits-sized gradient (it would add it into a zero-filled one).
pub fn nll_with_backward(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Pullback<Tensor>)> {
    let (logits, targets) = (
        logits.detach().contiguous()?,
        targets.to_dtype(DType::U32)?.contiguous()?,
    );
    let lse = Arc::new(Mutex::new(None));
    let op = CrossEntropy { lse: lse.clone() };
    let nll = logits.apply_op2_no_bwd(&targets, &op)?;
    let y = nll.clone();
    let back = move |g: &Tensor| -> Result<Tensor> {
        let (dx, _) = CrossEntropy { lse }.bwd(&logits, &targets, &y, g)?;
        dx.ok_or_else(|| Error::Config("cross-entropy backward gave no gradient".into()))
    };
    Ok((nll, Box::new(back)))
}

struct RowGather;

impl CustomOp2 for RowGather {
    fn name(&self) -> &'static str {
        "packsft-row-gather"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cerr("fused row gather: CUDA only"))
    }
    fn cuda_fwd(
        &self,
        ts: &CudaStorage,
        tl: &Layout,
        is: &CudaStorage,
        il: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (_, cols) = tl.shape().dims2()?;
        let n = il.shape().elem_count();
        let dev = ts.device.clone();
        let idx = cview::<u32>(is, il)?;
        let (ni, ci) = (n as i32, cols as i32);
        let stream = dev.cuda_stream();
        let storage = match candle_core::backend::BackendStorage::dtype(ts) {
            DType::F32 => {
                let (t, y) = (cview::<f32>(ts, tl)?, unsafe {
                    dev.alloc::<f32>(n * cols)?
                });
                let f = ops_func(&dev, "gather_rows_f32")?;
                let mut b = stream.launch_builder(&f);
                b.arg(&t).arg(&idx).arg(&y).arg(&ni).arg(&ci);
                unsafe { b.launch(grid_cfg(n, 16)) }.w()?;
                CudaStorage::wrap_cuda_slice(y, dev.clone())
            }
            DType::BF16 => {
                let (t, y) = (cview::<bf16>(ts, tl)?, unsafe {
                    dev.alloc::<bf16>(n * cols)?
                });
                let f = ops_func(&dev, "gather_rows_bf16")?;
                let mut b = stream.launch_builder(&f);
                b.arg(&t).arg(&idx).arg(&y).arg(&ni).arg(&ci);
                unsafe { b.launch(grid_cfg(n, 16)) }.w()?;
                CudaStorage::wrap_cuda_slice(y, dev.clone())
            }
            other => return Err(cerr(format!("fused row gather: {other:?} table"))),
        };
        Ok((storage, Shape::from((n, cols))))
    }
    fn bwd(
        &self,
        table: &Tensor,
        idx: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(scatter_rows(table, idx, dy)?), None))
    }
}

/// The table gradient of a row gather: a zero table of `table`'s shape and dtype with row i of
/// `dy` added into row `idx[i]` (one atomic per element; repeated indices sum in an unspecified
/// order). `idx` holds u32, contiguous.
fn scatter_rows(table: &Tensor, idx: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
    fn launch<T>(
        table: &Tensor,
        idx: &Tensor,
        dy: &Tensor,
        kernel: &str,
    ) -> candle_core::Result<Tensor>
    where
        T: candle_core::cuda_backend::CudaDType + DeviceRepr + ValidAsZeroBits,
    {
        let (rows, cols) = table.dims2()?;
        let n = idx.elem_count();
        with_storages(&[idx, dy], |s| {
            let dev = s[0].0.device.clone();
            let (iv, d) = (cview::<u32>(s[0].0, s[0].1)?, cview::<T>(s[1].0, s[1].1)?);
            let out = dev.alloc_zeros::<T>(rows * cols)?;
            let f = ops_func(&dev, kernel)?;
            let (ni, ci) = (n as i32, cols as i32);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&d).arg(&iv).arg(&out).arg(&ni).arg(&ci);
            unsafe { b.launch(grid_cfg(n, 16)) }.w()?;
            wrap(out, &dev, (rows, cols), table)
        })
    }
    let dy = dy.to_dtype(table.dtype())?.contiguous()?;
    match table.dtype() {
        DType::F32 => launch::<f32>(table, idx, &dy, "scatter_add_rows_f32"),
        DType::BF16 => launch::<bf16>(table, idx, &dy, "scatter_add_rows_bf16"),
        other => Err(cerr(format!("fused row scatter: {other:?} table"))),
    }
}

/// `table.index_select(idx, 0)` for a float32 or bf16 table (rows, cols) on CUDA: the same
/// rows, and a backward that adds each row's gradient into its table row with one atomic per
/// element (so repeated indices sum in an unspecified order) instead of candle's index_add,
/// which visits every index for every element of the table.
pub fn index_rows(table: &Tensor, idx: &Tensor) -> Result<Tensor> {
    let idx = idx.to_dtype(DType::U32)?.flatten_all()?.contiguous()?;
    Ok(table.contiguous()?.apply_op2(&idx, RowGather)?)
}

/// The table gradient of [`index_rows`] for `dy` (one row per index), outside the graph.
pub fn index_rows_grad(table: &Tensor, idx: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let idx = idx.to_dtype(DType::U32)?.flatten_all()?.contiguous()?;
    Ok(scatter_rows(table, &idx, dy)?)
}
