//! Variable-length flash attention on CUDA: this project's own kernels
//! (src/cuda/kernels/flash_attn.cu, FlashAttention-2: tiled online softmax, the forward saves the
//! log-sum-exp, the backward recomputes the tiles), wired in as a candle custom op with a
//! backward. Only built with the `flash-attn` feature; `nn::attention` picks it.
//!
//! The backward runs four kernels: delta = rowsum(dO * O); a pass over key tiles for dK and dV
//! (per query head, float32); a pass over query tiles for dQ, which owns its rows and needs no
//! atomics; and the reduction of dK, dV over each GQA group to bf16.
//!
//! Scores never exist as a tensor: memory is linear in the number of tokens, and a sequence's
//! queries only visit the key tiles they can see (causal, sliding window, their own sequence).

use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};

use super::launch::{cerr, cview, elementwise_cfg, kernel, with_storages, wrap};
use crate::error::{Error, Result};
use crate::pullback::{Pullback, QkvGrads};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attn.ptx"));
const MODULE: &str = "packsft_flash_attn";
/// Query rows of a forward tile and keys of a backward tile (src/cuda/kernels/flash_attn.cu).
const TILE: usize = 64;
const THREADS: u32 = 128;

/// Head dimensions with a compiled kernel: those of the 14 supported families.
pub const HEAD_DIMS: [usize; 5] = [64, 80, 96, 128, 256];

/// The sequences of one batch as the kernels read them, uploaded once per forward pass and
/// shared by every layer: starts and lengths in flattened tokens, and the tile lists.
pub struct FlashPlan {
    tokens: usize,
    seq_start: Tensor,
    seq_len: Tensor,
    /// (sequence, first query row) of each forward block, most work first.
    fwd_tiles: Tensor,
    /// (sequence, first key) of each backward block, most work first.
    bwd_tiles: Tensor,
    n_fwd: usize,
    n_bwd: usize,
    /// The sequences tile all `tokens` (padding-free batches): the kernels write every row of
    /// their outputs, so these need no zeroing (a memset of ~60 MB a layer for TinyLlama's
    /// backward, which no kernel timing shows).
    covers_all: bool,
}

impl FlashPlan {
    /// `seqs`: (first token, length) of every sequence among `tokens` flattened tokens; tokens
    /// outside them (padding) are neither queries nor keys.
    pub fn new(seqs: &[(usize, usize)], tokens: usize, device: &Device) -> Result<Self> {
        let seqs: Vec<(usize, usize)> = seqs.iter().copied().filter(|s| s.1 > 0).collect();
        let mut fwd = Vec::new();
        let mut bwd = Vec::new();
        for (i, &(_, len)) in seqs.iter().enumerate() {
            for t0 in (0..len).step_by(TILE) {
                // Causal work of a query tile grows with its position, of a key tile with the
                // queries after it: launch the largest first so the last wave is short.
                fwd.push((t0 + TILE, i, t0));
                bwd.push((len - t0, i, t0));
            }
        }
        fwd.sort_by_key(|t| std::cmp::Reverse(t.0));
        bwd.sort_by_key(|t| std::cmp::Reverse(t.0));
        let flat = |v: &[(usize, usize, usize)]| -> Vec<u32> {
            v.iter()
                .flat_map(|&(_, s, t)| [s as u32, t as u32])
                .collect()
        };
        let up = |v: Vec<u32>| -> Result<Tensor> {
            let n = v.len().max(1);
            let v = if v.is_empty() { vec![0] } else { v };
            Ok(Tensor::from_vec(v, n, device)?)
        };
        let mut spans: Vec<(usize, usize)> = seqs.clone();
        spans.sort_unstable();
        let mut end = 0;
        let mut covers_all = true;
        for &(start, len) in &spans {
            covers_all &= start == end;
            end = start + len;
        }
        covers_all &= end == tokens;
        Ok(Self {
            covers_all,
            tokens,
            seq_start: up(seqs.iter().map(|s| s.0 as u32).collect())?,
            seq_len: up(seqs.iter().map(|s| s.1 as u32).collect())?,
            n_fwd: fwd.len(),
            n_bwd: bwd.len(),
            fwd_tiles: up(flat(&fwd))?,
            bwd_tiles: up(flat(&bwd))?,
        })
    }

    /// An output buffer of `n` elements (at least one): uninitialised where the kernels write
    /// every row, zeroed where padding rows stay unwritten.
    fn alloc<T>(&self, dev: &candle_core::CudaDevice, n: usize) -> candle_core::Result<CudaSlice<T>>
    where
        T: candle_core::cuda_backend::cudarc::driver::DeviceRepr
            + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits,
    {
        Ok(if self.covers_all {
            // SAFETY: every element is written by the kernel that owns the buffer before
            // anything reads it (covers_all: every row belongs to a sequence).
            unsafe { dev.alloc::<T>(n.max(1))? }
        } else {
            dev.alloc_zeros::<T>(n.max(1))?
        })
    }
}

/// Whether the kernels can run this attention: CUDA, bf16, a compiled head dimension.
pub fn supported(device: &Device, dtype: DType, head_dim: usize) -> bool {
    device.is_cuda() && dtype == DType::BF16 && HEAD_DIMS.contains(&head_dim)
}

/// q (N, heads, D), k and v (N, kv_heads, D), bf16 on CUDA → (N, heads, D). `window`: keys a
/// query sees including itself (None: all earlier keys of its sequence); `softcap`: scores
/// become `c * tanh(score / c)` before the softmax (Gemma 2).
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    plan: &Arc<FlashPlan>,
    scale: f64,
    window: Option<usize>,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let op = FlashAttn::new(q, k, plan, scale, window, softcap)?;
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// [`flash_attention`] with its pullback (dq, dk, dv), for a hand-written backward.
pub fn flash_attention_vjp(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    plan: &Arc<FlashPlan>,
    scale: f64,
    window: Option<usize>,
    softcap: Option<f64>,
) -> Result<(Tensor, Pullback<QkvGrads>)> {
    // The forward leaves the log-sum-exp in the op for its backward: keep a handle on it.
    let op: Arc<Box<dyn CustomOp3 + Send + Sync>> = Arc::new(Box::new(FlashAttn::new(
        q, k, plan, scale, window, softcap,
    )?));
    let q = q.contiguous()?.detach();
    let k = k.contiguous()?.detach();
    let v = v.contiguous()?.detach();
    let out = q.apply_op3_arc(&k, &v, op.clone())?;
    let o = out.clone();
    let back = move |dout: &Tensor| -> Result<QkvGrads> {
        let (dq, dk, dv) = op.bwd(&q, &k, &v, &o, dout)?;
        let missing = || cerr("flash attention backward: missing gradient");
        Ok((
            dq.ok_or_else(missing)?,
            dk.ok_or_else(missing)?,
            dv.ok_or_else(missing)?,
        ))
    };
    Ok((out, Box::new(back)))
}

struct FlashAttn {
    plan: Arc<FlashPlan>,
    scale: f32,
    window: i32,
    /// The soft-cap of the scores, 0 for none (then the plain kernels run).
    softcap: f32,
    /// Log-sum-exp of every (head, query), log2 domain, saved by the forward for the backward.
    lse: Mutex<Option<Arc<CudaSlice<f32>>>>,
}

fn load(
    dev: &candle_core::CudaDevice,
    name: &str,
    smem: usize,
) -> candle_core::Result<CudaFunction> {
    let func = kernel(dev, MODULE, PTX, name)?;
    // Tiles above 48 KiB of shared memory need the opt-in.
    func.set_attribute(
        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .w()?;
    Ok(func)
}

/// Key tile of the forward and dQ kernels (src/cuda/kernels/flash_attn.cu: 32 for head_dim 256).
fn key_tile(d: usize) -> usize {
    if d > 128 {
        32
    } else {
        64
    }
}

/// One block of THREADS per (tile, head).
fn tiles_cfg(tiles: usize, heads: usize, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (tiles as u32, heads as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

// Shared memory of each kernel (src/cuda/kernels/flash_attn.cu): the forward and dQ kernels double
// buffer their key/value tiles, the dK/dV kernel its query/dO tiles and their statistics (single
// buffer for head_dim 256, to stay within an Ampere card's 163 KiB).
fn fwd_smem(d: usize) -> usize {
    (TILE + 4 * key_tile(d)) * (d + 8) * 2
}

fn bwd_smem(d: usize) -> usize {
    let bufs = if d <= 128 { 2 } else { 1 };
    (2 + 2 * bufs) * TILE * (d + 8) * 2 + bufs * 2 * TILE * 4
}

fn bwd_dq_smem(d: usize) -> usize {
    (2 * TILE + 4 * key_tile(d)) * (d + 8) * 2
}

impl FlashAttn {
    /// q (N, heads, D), k (N, kv_heads, D) checked against the compiled kernels and the plan.
    fn new(
        q: &Tensor,
        k: &Tensor,
        plan: &Arc<FlashPlan>,
        scale: f64,
        window: Option<usize>,
        softcap: Option<f64>,
    ) -> Result<Self> {
        let (n, nh, d) = q.dims3()?;
        let nkv = k.dim(1)?;
        if !HEAD_DIMS.contains(&d) || nh % nkv != 0 || n != plan.tokens {
            return Err(Error::Config(format!(
                "flash attention: head_dim {d} (compiled: {HEAD_DIMS:?}), {nh} heads on {nkv} kv \
                 heads, {n} tokens for a plan of {}",
                plan.tokens
            )));
        }
        if let Some(c) = softcap.filter(|c| !(*c > 0.0 && c.is_finite())) {
            return Err(Error::Config(format!(
                "flash attention: soft-cap {c} (must be a positive number)"
            )));
        }
        Ok(Self {
            plan: plan.clone(),
            scale: scale as f32,
            window: window.map_or(0, |w| w.min(i32::MAX as usize) as i32),
            softcap: softcap.unwrap_or(0.0) as f32,
            lse: Mutex::new(None),
        })
    }

    /// The compiled kernel `kind` (fwd, bwd, bwd_dq) for head_dim `d`: the soft-capped variant
    /// when the scores are capped.
    fn kernel_name(&self, kind: &str, d: usize) -> String {
        let cap = if self.softcap > 0.0 { "cap_" } else { "" };
        format!("flash_{kind}_{cap}d{d}")
    }
}

impl CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "packsft-flash-attn"
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
        Err(cerr(
            "flash attention runs on CUDA only (use the eager attention on CPU)",
        ))
    }

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (n, nh, d) = ql.shape().dims3()?;
        let nkv = kl.shape().dims3()?.1;
        let dev = qs.device.clone();
        let (q, k, v) = (
            cview::<half::bf16>(qs, ql)?,
            cview::<half::bf16>(ks, kl)?,
            cview::<half::bf16>(vs, vl)?,
        );
        let p = &self.plan;
        // Padding rows are no query: their output must read 0, their lse is never read.
        let out = p.alloc::<half::bf16>(&dev, n * nh * d)?;
        let lse = p.alloc::<f32>(&dev, nh * n)?;
        if p.n_fwd > 0 {
            let smem = fwd_smem(d);
            let func = load(&dev, &self.kernel_name("fwd", d), smem)?;
            with_storages(&[&p.fwd_tiles, &p.seq_start, &p.seq_len], |s| {
                let u = |i: usize| cview::<u32>(s[i].0, s[i].1);
                let (tiles, starts, lens) = (u(0)?, u(1)?, u(2)?);
                let (tokens, heads, kvh) = (n as i32, nh as i32, nkv as i32);
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&func);
                b.arg(&q).arg(&k).arg(&v).arg(&out).arg(&lse);
                b.arg(&tiles).arg(&starts).arg(&lens);
                b.arg(&tokens)
                    .arg(&heads)
                    .arg(&kvh)
                    .arg(&self.scale)
                    .arg(&self.window)
                    .arg(&self.softcap);
                let cfg = tiles_cfg(p.n_fwd, nh, smem);
                unsafe { b.launch(cfg) }.w()?;
                Ok(())
            })?;
        }
        *self.lse.lock().unwrap() = Some(Arc::new(lse));
        Ok((CudaStorage::wrap_cuda_slice(out, dev), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, nh, d) = q.dims3()?;
        let nkv = k.dim(1)?;
        let lse = self
            .lse
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| cerr("flash attention backward before its forward"))?;
        let dout = grad_out.to_dtype(DType::BF16)?.contiguous()?;
        let p = &self.plan;
        let ts = [
            q,
            k,
            v,
            out,
            &dout,
            &p.bwd_tiles,
            &p.seq_start,
            &p.seq_len,
            &p.fwd_tiles,
        ];
        with_storages(&ts, |s| {
            let dev = s[0].0.device.clone();
            let bf = |i: usize| cview::<half::bf16>(s[i].0, s[i].1);
            let (qv, kv, vv, ov, dov) = (bf(0)?, bf(1)?, bf(2)?, bf(3)?, bf(4)?);
            let u = |i: usize| cview::<u32>(s[i].0, s[i].1);
            let (tiles, starts, lens, ftiles) = (u(5)?, u(6)?, u(7)?, u(8)?);
            let stream = dev.cuda_stream();
            let (tokens, heads, kvh, di) = (n as i32, nh as i32, nkv as i32, d as i32);
            let delta = launch_delta(&dev, &ov, &dov, (n, nh, d))?;
            // Rows outside every sequence (padding) are never written and must read 0.
            let per = n * nh * d;
            let dk_exp = p.alloc::<f32>(&dev, per)?;
            let dv_exp = p.alloc::<f32>(&dev, per)?;
            let dq = p.alloc::<half::bf16>(&dev, per)?;
            let dk = unsafe { dev.alloc::<half::bf16>((n * nkv * d).max(1))? };
            let dv = unsafe { dev.alloc::<half::bf16>((n * nkv * d).max(1))? };
            if p.n_bwd > 0 {
                let smem = bwd_smem(d);
                let f = load(&dev, &self.kernel_name("bwd", d), smem)?;
                let mut b = stream.launch_builder(&f);
                b.arg(&qv)
                    .arg(&kv)
                    .arg(&vv)
                    .arg(&dov)
                    .arg(lse.as_ref())
                    .arg(&delta);
                b.arg(&dk_exp).arg(&dv_exp);
                b.arg(&tiles).arg(&starts).arg(&lens);
                b.arg(&tokens)
                    .arg(&heads)
                    .arg(&kvh)
                    .arg(&self.scale)
                    .arg(&self.window)
                    .arg(&self.softcap);
                let cfg = tiles_cfg(p.n_bwd, nh, smem);
                unsafe { b.launch(cfg) }.w()?;
                let smem = bwd_dq_smem(d);
                let f = load(&dev, &self.kernel_name("bwd_dq", d), smem)?;
                let mut b = stream.launch_builder(&f);
                b.arg(&qv)
                    .arg(&kv)
                    .arg(&vv)
                    .arg(&dov)
                    .arg(lse.as_ref())
                    .arg(&delta);
                b.arg(&dq);
                b.arg(&ftiles).arg(&starts).arg(&lens);
                b.arg(&tokens)
                    .arg(&heads)
                    .arg(&kvh)
                    .arg(&self.scale)
                    .arg(&self.window)
                    .arg(&self.softcap);
                let cfg = tiles_cfg(p.n_fwd, nh, smem);
                unsafe { b.launch(cfg) }.w()?;
            }
            let f = load(&dev, "flash_bwd_finalize", 0)?;
            let mut b = stream.launch_builder(&f);
            b.arg(&dk_exp).arg(&dv_exp).arg(&dk).arg(&dv);
            b.arg(&tokens)
                .arg(&heads)
                .arg(&kvh)
                .arg(&di)
                .arg(&self.scale);
            unsafe { b.launch(elementwise_cfg(n * nkv * d)) }.w()?;
            Ok((
                Some(wrap(dq, &dev, (n, nh, d), q)?),
                Some(wrap(dk, &dev, (n, nkv, d), q)?),
                Some(wrap(dv, &dev, (n, nkv, d), q)?),
            ))
        })
    }
}

/// The backward's first kernel: delta = rowsum(dO * O) per (head, query), with 16-byte loads
/// where the head size and both buffers allow them.
fn launch_delta(
    dev: &candle_core::CudaDevice,
    o: &CudaView<half::bf16>,
    dout: &CudaView<half::bf16>,
    (n, nh, d): (usize, usize, usize),
) -> candle_core::Result<CudaSlice<f32>> {
    let stream = dev.cuda_stream();
    let (tokens, heads, di) = (n as i32, nh as i32, d as i32);
    let delta = unsafe { dev.alloc::<f32>((nh * n).max(1))? };
    let wide =
        d % 8 == 0 && o.device_ptr(&stream).0 % 16 == 0 && dout.device_ptr(&stream).0 % 16 == 0;
    if wide {
        let lanes = (d / 8).next_power_of_two().min(32);
        let f = load(dev, "flash_bwd_delta_x8", 0)?;
        let mut b = stream.launch_builder(&f);
        let li = lanes as i32;
        b.arg(o).arg(dout).arg(&delta);
        b.arg(&tokens).arg(&heads).arg(&di).arg(&li);
        unsafe { b.launch(elementwise_cfg(lanes * n * nh)) }.w()?;
    } else {
        let f = load(dev, "flash_bwd_delta", 0)?;
        let mut b = stream.launch_builder(&f);
        b.arg(o)
            .arg(dout)
            .arg(&delta)
            .arg(&tokens)
            .arg(&heads)
            .arg(&di);
        unsafe { b.launch(elementwise_cfg(32 * n * nh)) }.w()?;
    }
    Ok(delta)
}
