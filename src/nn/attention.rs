//! Attention over sequences that never see each other.
//!
//! The eager backend computes, per block of sequences of equal (padded) length, causal
//! attention with differentiable ops. Padding-free batches are attended one sequence at a time
//! (cost: the sum of squared lengths, not the square of the total); padded batches in one
//! block with a key-padding mask. It is the reference every faster backend is tested against.
//!
//! With the `flash-attn` feature, batches on CUDA in bf16 go to this project's variable-length
//! flash-attention kernels instead (`cuda::flash`): same semantics, no score matrices.

use std::collections::HashMap;
#[cfg(feature = "flash-attn")]
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::collate::SeqLayout;
use crate::error::{Error, Result};
use crate::nn::ops::softmax_last;
use crate::pullback::{grad_or_zeros, through_autograd, Pullback, QkvGrads};

/// Which attention implementation a model runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionImpl {
    /// Flash attention where it can run (CUDA, bf16, a compiled head dimension, a build with
    /// `flash-attn`), eager attention elsewhere.
    #[default]
    Auto,
    /// Always the eager backend: differentiable candle ops, the reference implementation.
    Eager,
    /// Flash attention or an error saying why it cannot run.
    Flash,
}

impl std::str::FromStr for AttentionImpl {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "eager" => Ok(Self::Eager),
            "flash" => Ok(Self::Flash),
            other => Err(Error::Config(format!(
                "unknown attention {other:?} (auto, eager, flash)"
            ))),
        }
    }
}

impl AttentionImpl {
    /// Whether to use the flash kernels for this device, compute dtype and head dimension. The
    /// kernels compute soft-capped scores (Gemma 2's `attn_logit_softcapping`) and sliding
    /// windows themselves, so neither decides here.
    pub fn use_flash(self, device: &Device, dtype: DType, head_dim: usize) -> Result<bool> {
        #[cfg(feature = "flash-attn")]
        let ok = crate::cuda::flash::supported(device, dtype, head_dim);
        #[cfg(not(feature = "flash-attn"))]
        let ok = {
            let _ = (device, dtype, head_dim);
            false
        };
        match self {
            Self::Eager => Ok(false),
            Self::Auto => Ok(ok),
            Self::Flash if ok => Ok(true),
            Self::Flash => Err(Error::Config(format!(
                "attention: flash needs a build with --features flash-attn, a CUDA device, bf16 \
                 compute and head_dim in 64/80/96/128/256 (here: {}, {}, {dtype:?}, head_dim {head_dim})",
                if cfg!(feature = "flash-attn") { "flash-attn built" } else { "built without flash-attn" },
                if device.is_cuda() { "cuda" } else { "cpu" },
            ))),
        }
    }
}

/// Where each sequence of a batch lives among the flattened tokens, with what the attention
/// needs built once per forward pass and shared by every layer.
pub struct AttnPlan {
    blocks: Vec<Block>,
    #[cfg_attr(not(feature = "flash-attn"), allow(dead_code))]
    window: Option<usize>,
    /// Scores become `c * tanh(s / c)` before the mask (Gemma 2), in both attentions.
    softcap: Option<f64>,
    #[cfg(feature = "flash-attn")]
    flash: Option<Arc<crate::cuda::flash::FlashPlan>>,
}

struct Block {
    /// First flattened token of the block, and the number of rows of `len` tokens it spans.
    start: usize,
    rows: usize,
    len: usize,
    /// Additive mask (rows, 1, 1, len, len): 0 where attention is allowed, -inf elsewhere.
    mask: Tensor,
}

/// Additive mask: query `t` sees key `s` iff `s <= t`, `s` is a real token, and with a sliding
/// window `W`, `s > t - W` (transformers' eager semantics: W keys including itself).
fn causal_mask(
    lengths: &[usize],
    len: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let mut m = vec![0f32; lengths.len() * len * len];
    for (b, &valid) in lengths.iter().enumerate() {
        for t in 0..len {
            for s in 0..len {
                // A pad query (t >= valid) keeps its own key so that its row, whose output
                // nothing reads, never becomes all -inf (NaN) under a sliding window.
                let pad_self = t >= valid && s == t;
                if !pad_self && (s > t || s >= valid || window.is_some_and(|w| t - s >= w)) {
                    m[(b * len + t) * len + s] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(Tensor::from_vec(
        m,
        (lengths.len(), 1, 1, len, len),
        device,
    )?)
}

impl AttnPlan {
    /// Eager attention (`flash`: false) or the flash kernels, each with the sliding `window`
    /// and the score `softcap` where given.
    pub fn new(
        layout: &SeqLayout,
        row_len: usize,
        window: Option<usize>,
        softcap: Option<f64>,
        device: &Device,
        flash: bool,
    ) -> Result<Self> {
        if flash {
            #[cfg(feature = "flash-attn")]
            {
                let seqs: Vec<(usize, usize)> = match layout {
                    SeqLayout::Packed { cu_seqlens, .. } => {
                        cu_seqlens.windows(2).map(|w| (w[0], w[1] - w[0])).collect()
                    }
                    SeqLayout::Padded { lengths } => lengths
                        .iter()
                        .enumerate()
                        .map(|(b, &l)| (b * row_len, l))
                        .collect(),
                };
                let tokens = match layout {
                    SeqLayout::Packed { cu_seqlens, .. } => *cu_seqlens.last().unwrap_or(&0),
                    SeqLayout::Padded { lengths } => lengths.len() * row_len,
                };
                let plan = crate::cuda::flash::FlashPlan::new(&seqs, tokens, device)?;
                return Ok(Self {
                    blocks: Vec::new(),
                    window,
                    softcap,
                    flash: Some(Arc::new(plan)),
                });
            }
            #[cfg(not(feature = "flash-attn"))]
            return Err(Error::Config(
                "flash attention needs a build with --features flash-attn".into(),
            ));
        }
        let blocks = match layout {
            SeqLayout::Packed { cu_seqlens, .. } => {
                let mut cache: HashMap<usize, Tensor> = HashMap::new();
                let mut blocks = Vec::with_capacity(cu_seqlens.len().saturating_sub(1));
                for w in cu_seqlens.windows(2) {
                    let len = w[1] - w[0];
                    let mask = match cache.get(&len) {
                        Some(m) => m.clone(),
                        None => {
                            let m = causal_mask(&[len], len, window, device)?;
                            cache.insert(len, m.clone());
                            m
                        }
                    };
                    blocks.push(Block {
                        start: w[0],
                        rows: 1,
                        len,
                        mask,
                    });
                }
                blocks
            }
            SeqLayout::Padded { lengths } => vec![Block {
                start: 0,
                rows: lengths.len(),
                len: row_len,
                mask: causal_mask(lengths, row_len, window, device)?,
            }],
        };
        Ok(Self {
            blocks,
            window,
            softcap,
            #[cfg(feature = "flash-attn")]
            flash: None,
        })
    }

    /// Attention of q (N, heads, hd) over k, v (N, kv_heads, hd) → (N, heads * hd).
    pub fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        #[cfg(feature = "flash-attn")]
        if let Some(fp) = &self.flash {
            let (n, nh, hd) = q.dims3()?;
            return Ok(crate::cuda::flash::flash_attention(
                q,
                k,
                v,
                fp,
                scale,
                self.window,
                self.softcap,
            )?
            .reshape((n, nh * hd))?);
        }
        eager_attention(q, k, v, self, scale)
    }
}

impl AttnPlan {
    /// [`AttnPlan::attend`] with its pullback (dq, dk, dv), for a hand-written backward: the
    /// flash kernels' own backward, or candle's autograd through the eager attention.
    pub fn attend_vjp(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
    ) -> Result<(Tensor, Pullback<QkvGrads>)> {
        #[cfg(feature = "flash-attn")]
        if let Some(fp) = &self.flash {
            let (n, nh, hd) = q.dims3()?;
            let (out, back) = crate::cuda::flash::flash_attention_vjp(
                q,
                k,
                v,
                fp,
                scale,
                self.window,
                self.softcap,
            )?;
            let back = move |dy: &Tensor| back(&dy.reshape((n, nh, hd))?);
            return Ok((out.reshape((n, nh * hd))?, Box::new(back)));
        }
        let (q0, k0, v0) = (q.clone(), k.clone(), v.clone());
        let (out, back) = through_autograd(&[q, k, v], |t| {
            eager_attention(&t[0], &t[1], &t[2], self, scale)
        })?;
        let back = move |dy: &Tensor| -> Result<QkvGrads> {
            let mut g = back(dy)?.into_iter();
            let mut next = |like: &Tensor| grad_or_zeros(g.next().flatten(), like);
            Ok((next(&q0)?, next(&k0)?, next(&v0)?))
        };
        Ok((out, Box::new(back)))
    }
}

/// Causal attention for flattened tokens: q (N, heads, hd), k and v (N, kv_heads, hd) →
/// (N, heads * hd). Query head `h` reads key/value head `h / (heads / kv_heads)`, as
/// transformers' `repeat_kv` lays them out; keys are never copied per query head.
pub fn eager_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    plan: &AttnPlan,
    scale: f64,
) -> Result<Tensor> {
    let (_, nh, hd) = q.dims3()?;
    let nkv = k.dim(1)?;
    let g = nh / nkv;
    let q = (q * scale)?;
    let mut outs = Vec::with_capacity(plan.blocks.len());
    for blk in &plan.blocks {
        let (r, l) = (blk.rows, blk.len);
        let n = r * l;
        let qb = q
            .narrow(0, blk.start, n)?
            .reshape((r, l, nkv, g, hd))?
            .permute((0, 2, 3, 1, 4))? // (r, nkv, g, l, hd)
            .contiguous()?
            .reshape((r, nkv, g * l, hd))?;
        let kb = k
            .narrow(0, blk.start, n)?
            .reshape((r, l, nkv, hd))?
            .transpose(1, 2)?; // (r, nkv, l, hd)
        let vb = v
            .narrow(0, blk.start, n)?
            .reshape((r, l, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let kt = kb.transpose(2, 3)?.contiguous()?; // (r, nkv, hd, l)
        let scores = qb.matmul(&kt)?.reshape((r, nkv, g, l, l))?;
        // Softmax in float32 whatever the compute dtype, as transformers' eager attention.
        let scores = scores.to_dtype(DType::F32)?;
        let scores = match plan.softcap {
            Some(c) => ((scores / c)?.tanh()? * c)?,
            None => scores,
        };
        let scores = scores.broadcast_add(&blk.mask)?;
        let probs = softmax_last(&scores)?
            .to_dtype(vb.dtype())?
            .reshape((r, nkv, g * l, l))?;
        let ob = probs
            .matmul(&vb)? // (r, nkv, g*l, hd)
            .reshape((r, nkv, g, l, hd))?
            .permute((0, 3, 1, 2, 4))? // (r, l, nkv, g, hd)
            .contiguous()?
            .reshape((n, nh * hd))?;
        outs.push(ob);
    }
    Ok(if outs.len() == 1 {
        outs.pop().unwrap()
    } else {
        Tensor::cat(&outs, 0)?
    })
}
