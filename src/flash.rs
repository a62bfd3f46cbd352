//! Variable-length flash attention on CUDA: this project's own kernels
//! (src/kernels/flash_attn.cu, FlashAttention-2: tiled online softmax, the forward saves the
//! log-sum-exp, the backward recomputes the tiles), wired in as a candle custom op with a
//! backward. Only built with the `flash-attn` feature; [`crate::attention`] picks it.
//!
//! Scores never exist as a tensor: memory is linear in the number of tokens, and a sequence's
//! queries only visit the key tiles they can see (causal, sliding window, their own sequence).

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor,
};

use crate::error::{Error, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attn.ptx"));
const MODULE: &str = "packsft_flash_attn";
/// Query rows of a forward tile and keys of a backward tile (src/kernels/flash_attn.cu).
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
        fwd.sort_by(|a, b| b.0.cmp(&a.0));
        bwd.sort_by(|a, b| b.0.cmp(&a.0));
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
        Ok(Self {
            tokens,
            seq_start: up(seqs.iter().map(|s| s.0 as u32).collect())?,
            seq_len: up(seqs.iter().map(|s| s.1 as u32).collect())?,
            n_fwd: fwd.len(),
            n_bwd: bwd.len(),
            fwd_tiles: up(flat(&fwd))?,
            bwd_tiles: up(flat(&bwd))?,
        })
    }
}

/// Whether the kernels can run this attention: CUDA, bf16, a compiled head dimension.
pub fn supported(device: &Device, dtype: DType, head_dim: usize) -> bool {
    device.is_cuda() && dtype == DType::BF16 && HEAD_DIMS.contains(&head_dim)
}

/// q (N, heads, D), k and v (N, kv_heads, D), bf16 on CUDA → (N, heads, D). `window`: keys a
/// query sees including itself (None: all earlier keys of its sequence).
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    plan: &Arc<FlashPlan>,
    scale: f64,
    window: Option<usize>,
) -> Result<Tensor> {
    let (n, nh, d) = q.dims3()?;
    let nkv = k.dim(1)?;
    if !HEAD_DIMS.contains(&d) || nh % nkv != 0 || n != plan.tokens {
        return Err(Error::Config(format!(
            "flash attention: head_dim {d} (compiled: {HEAD_DIMS:?}), {nh} heads on {nkv} kv \
             heads, {n} tokens for a plan of {}",
            plan.tokens
        )));
    }
    let op = FlashAttn {
        plan: plan.clone(),
        scale: scale as f32,
        window: window.map_or(0, |w| w.min(i32::MAX as usize) as i32),
        lse: Mutex::new(None),
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

struct FlashAttn {
    plan: Arc<FlashPlan>,
    scale: f32,
    window: i32,
    /// Log-sum-exp of every (head, query), log2 domain, saved by the forward for the backward.
    lse: Mutex<Option<Arc<CudaSlice<f32>>>>,
}

fn cuda_err(msg: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Cuda(msg.into().into())
}

/// A contiguous CUDA view of a custom-op argument.
fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> candle_core::Result<CudaView<'a, T>> {
    if !l.is_contiguous() {
        return Err(cuda_err("flash attention: non-contiguous input"));
    }
    let len = l.shape().elem_count();
    Ok(s.as_cuda_slice::<T>()?
        .slice(l.start_offset()..l.start_offset() + len))
}

/// Runs `f` with the CUDA storage of a tensor the op holds (not one of its arguments).
fn with_cuda<R>(
    t: &Tensor,
    f: impl FnOnce(&CudaStorage, &Layout) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cuda(s) => f(s, l),
        _ => Err(cuda_err("flash attention: tensor not on a CUDA device")),
    }
}

fn load(
    dev: &candle_core::CudaDevice,
    name: &str,
    smem: usize,
) -> candle_core::Result<CudaFunction> {
    let func = dev
        .get_or_load_custom_func(name, MODULE, PTX)?
        .into_cuda_function();
    func.set_attribute(
        CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        smem as i32,
    )
    .w()?;
    Ok(func)
}

fn fwd_smem(d: usize) -> usize {
    let bn = if d > 128 { 32 } else { 64 };
    (TILE + 2 * bn) * (d + 8) * 2
}

fn bwd_smem(d: usize) -> usize {
    4 * TILE * (d + 8) * 2 + TILE * (TILE + 8) * 2 + 2 * TILE * 4
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
        Err(cuda_err(
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
        let dev = qs.device().clone();
        let (q, k, v) = (
            view::<half::bf16>(qs, ql)?,
            view::<half::bf16>(ks, kl)?,
            view::<half::bf16>(vs, vl)?,
        );
        let out = dev.alloc_zeros::<half::bf16>(n * nh * d)?;
        // Rows no query of the batch reaches keep +inf; harmless, never read.
        let lse = dev.alloc_zeros::<f32>(nh * n)?;
        let p = &self.plan;
        if p.n_fwd > 0 {
            let smem = fwd_smem(d);
            let func = load(&dev, &format!("flash_fwd_d{d}"), smem)?;
            with_cuda(&p.fwd_tiles, |ts, tl| {
                with_cuda(&p.seq_start, |ss, sl| {
                    with_cuda(&p.seq_len, |ls, ll| {
                        let (tiles, starts, lens) = (
                            view::<u32>(ts, tl)?,
                            view::<u32>(ss, sl)?,
                            view::<u32>(ls, ll)?,
                        );
                        let (tokens, heads, kvh) = (n as i32, nh as i32, nkv as i32);
                        let stream = dev.cuda_stream();
                        let mut b = stream.launch_builder(&func);
                        b.arg(&q).arg(&k).arg(&v).arg(&out).arg(&lse);
                        b.arg(&tiles).arg(&starts).arg(&lens);
                        b.arg(&tokens)
                            .arg(&heads)
                            .arg(&kvh)
                            .arg(&self.scale)
                            .arg(&self.window);
                        let cfg = LaunchConfig {
                            grid_dim: (p.n_fwd as u32, nh as u32, 1),
                            block_dim: (THREADS, 1, 1),
                            shared_mem_bytes: smem as u32,
                        };
                        unsafe { b.launch(cfg) }.w()?;
                        Ok(())
                    })
                })
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
            .ok_or_else(|| cuda_err("flash attention backward before its forward"))?;
        let dout = grad_out.to_dtype(DType::BF16)?.contiguous()?;
        // delta = rowsum(dO * O) per (head, query), as the kernel reads it.
        let delta = (dout.to_dtype(DType::F32)? * out.to_dtype(DType::F32)?)?
            .sum(2)?
            .t()?
            .contiguous()?;
        let op = FlashAttnBwd {
            plan: self.plan.clone(),
            scale: self.scale,
            window: self.window,
            dout,
            delta,
            lse,
        };
        let g = q.apply_op3_no_bwd(k, v, &op)?; // (3, N, heads, D) float32
        let scale = self.scale as f64;
        let dq = (g.get(0)? * scale)?.to_dtype(q.dtype())?;
        let group =
            |t: Tensor| -> candle_core::Result<Tensor> { t.reshape((n, nkv, nh / nkv, d))?.sum(2) };
        let dk = (group(g.get(1)?)? * scale)?.to_dtype(k.dtype())?;
        let dv = group(g.get(2)?)?.to_dtype(v.dtype())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

struct FlashAttnBwd {
    plan: Arc<FlashPlan>,
    scale: f32,
    window: i32,
    dout: Tensor,
    delta: Tensor,
    lse: Arc<CudaSlice<f32>>,
}

impl CustomOp3 for FlashAttnBwd {
    fn name(&self) -> &'static str {
        "packsft-flash-attn-bwd"
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
        Err(cuda_err("flash attention runs on CUDA only"))
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
        let dev = qs.device().clone();
        let (q, k, v) = (
            view::<half::bf16>(qs, ql)?,
            view::<half::bf16>(ks, kl)?,
            view::<half::bf16>(vs, vl)?,
        );
        let per = n * nh * d;
        let mut grads = dev.alloc_zeros::<f32>(3 * per)?;
        let p = &self.plan;
        if p.n_bwd > 0 {
            let smem = bwd_smem(d);
            let func = load(&dev, &format!("flash_bwd_d{d}"), smem)?;
            let (mut dq, mut rest) = grads.split_at_mut(per);
            let (mut dk, mut dv) = rest.split_at_mut(per);
            let lse = self.lse.as_view();
            with_cuda(&self.dout, |os, ol| {
                with_cuda(&self.delta, |es, el| {
                    with_cuda(&p.bwd_tiles, |ts, tl| {
                        with_cuda(&p.seq_start, |ss, sl| {
                            with_cuda(&p.seq_len, |ls, ll| {
                                let dout = view::<half::bf16>(os, ol)?;
                                let delta = view::<f32>(es, el)?;
                                let (tiles, starts, lens) = (
                                    view::<u32>(ts, tl)?,
                                    view::<u32>(ss, sl)?,
                                    view::<u32>(ls, ll)?,
                                );
                                let (tokens, heads, kvh) = (n as i32, nh as i32, nkv as i32);
                                let stream = dev.cuda_stream();
                                let mut b = stream.launch_builder(&func);
                                b.arg(&q).arg(&k).arg(&v).arg(&dout).arg(&lse).arg(&delta);
                                b.arg(&mut dq).arg(&mut dk).arg(&mut dv);
                                b.arg(&tiles).arg(&starts).arg(&lens);
                                b.arg(&tokens)
                                    .arg(&heads)
                                    .arg(&kvh)
                                    .arg(&self.scale)
                                    .arg(&self.window);
                                let cfg = LaunchConfig {
                                    grid_dim: (p.n_bwd as u32, nh as u32, 1),
                                    block_dim: (THREADS, 1, 1),
                                    shared_mem_bytes: smem as u32,
                                };
                                unsafe { b.launch(cfg) }.w()?;
                                Ok(())
                            })
                        })
                    })
                })
            })?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(grads, dev),
            Shape::from((3, n, nh, d)),
        ))
    }
}
