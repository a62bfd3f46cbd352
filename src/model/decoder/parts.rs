//! The decoder's parts as data: linear layers (with the step's compute copies of their
//! weights), norms, the attention's q/k/v projections, MLPs and experts, a layer, and what one
//! forward pass shares. `forward.rs` computes with them, `backward.rs` differentiates them.

use candle_core::{DType, Tensor, Var, D};

use super::super::spec::*;
use crate::error::Result;
use crate::nn::attention::AttnPlan;
use crate::nn::kernels;
use crate::nn::ops::{layer_norm, rms_norm};

pub(super) struct Lin {
    /// The weight: a float32 master variable, or a frozen tensor (not a variable, possibly
    /// bf16) under LoRA.
    pub(super) w: Tensor,
    pub(super) b: Option<Tensor>,
    /// A LoRA adapter on this layer: y = x W^T + b + s · (dropout(x) A^T) B^T.
    pub(super) lora: Option<Adapter>,
}

/// A LoRA adapter: A (r, in) and B (out, r), float32 master variables.
pub(super) struct Adapter {
    pub(super) a: Tensor,
    pub(super) b: Tensor,
    /// alpha / r, or alpha / √r with rsLoRA.
    pub(super) scale: f64,
    /// Dropout probability on the adapter's input while training.
    pub(super) dropout: f64,
    /// The adapter's place in the model, which keys its dropout stream.
    pub(super) index: u64,
}

thread_local! {
    /// (seed, forward/backward count) of the running training forward/backward, which keys the
    /// adapters' dropout masks; `None` outside one (evaluation, generation: no dropout).
    pub(super) static DROPOUT_KEY: std::cell::Cell<Option<(u64, u64)>> =
        const { std::cell::Cell::new(None) };
}

impl Adapter {
    /// The dropout mask of input x (N, in) for this adapter, already scaled by 1 / (1 - p), in
    /// x's dtype; `None` with no dropout or outside training. Drawn on the host from a ChaCha
    /// stream keyed by (seed, forward/backward count, adapter): the same on every machine,
    /// again in gradient checkpointing's recomputation, and after a resume.
    pub(super) fn mask(&self, x: &Tensor) -> Result<Option<Tensor>> {
        use rand::{Rng, SeedableRng};
        let Some((seed, call)) = DROPOUT_KEY.with(|k| k.get()) else {
            return Ok(None);
        };
        if self.dropout == 0.0 {
            return Ok(None);
        }
        let key = seed
            ^ call.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ self.index.wrapping_mul(0xD1B5_4A32_D192_ED03);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(key);
        let keep = (1.0 / (1.0 - self.dropout)) as f32;
        let p = self.dropout as f32;
        let n = x.elem_count();
        let v: Vec<f32> = (0..n)
            .map(|_| if rng.gen::<f32>() < p { 0.0 } else { keep })
            .collect();
        Ok(Some(
            Tensor::from_vec(v, x.shape(), x.device())?.to_dtype(x.dtype())?,
        ))
    }

    /// A and B in `dtype`: the step's copies if there are any, else (differentiable) casts.
    pub(super) fn weights(&self, dtype: DType) -> Result<(Tensor, Tensor)> {
        Ok((compute_copy(&self.a, dtype)?, compute_copy(&self.b, dtype)?))
    }
}

/// `master` in `dtype`: the step's low-precision copy if there is one, else a (differentiable)
/// cast.
fn compute_copy(master: &Tensor, dtype: DType) -> Result<Tensor> {
    let copy = COMPUTE_WEIGHTS.with(|m| m.borrow().get(&master.id()).cloned());
    Ok(match copy {
        Some(v) if v.dtype() == dtype => v,
        _ => master.to_dtype(dtype)?,
    })
}

thread_local! {
    /// Low-precision copies of the float32 weight matrices, made once per forward/backward
    /// (see `DecoderModel::with_compute_weights`), keyed by master weight: a variable, or rows of
    /// one (a layer's q, k and v stacked).
    pub(super) static COMPUTE_WEIGHTS: std::cell::RefCell<std::collections::HashMap<candle_core::TensorId, Tensor>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
    /// The stacked q/k/v copy of a layer, keyed by its q master weight, for the layer's single
    /// projection product (backward.rs).
    pub(super) static STACKED_QKV: std::cell::RefCell<std::collections::HashMap<candle_core::TensorId, Tensor>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// The step's copy of a layer's q, k and v weights stacked by rows, if there is one.
pub(super) fn stacked_qkv(q: &Lin) -> Option<Tensor> {
    STACKED_QKV.with(|m| m.borrow().get(&q.w.id()).cloned())
}

/// Compute-dtype copies of the weight matrices: each variable holds one matrix, or the q, k and
/// v matrices of a layer stacked by rows so that one matrix product computes all three (rows of
/// a row-major matrix are a contiguous view: the optimizer writes each member in place).
#[derive(Clone)]
pub(super) struct CopyVars(pub(super) Vec<(Var, Vec<Member>)>);

/// A weight matrix's rows in a [`CopyVars`] variable.
#[derive(Clone)]
pub(super) struct Member {
    pub(super) param: usize,
    pub(super) row: usize,
    pub(super) rows: usize,
}

impl CopyVars {
    /// Member `m`'s rows of `t` (a copy variable, or its gradient): `t` itself where the member
    /// is all of it, else a view (autograd reaches the variable through the view).
    pub(super) fn rows_of(t: &Tensor, m: &Member) -> Result<Tensor> {
        Ok(if m.row == 0 && m.rows == t.dim(0)? {
            t.clone()
        } else {
            t.narrow(0, m.row, m.rows)?
        })
    }

    /// (index into params, copy) for every member.
    pub(super) fn views(&self) -> Result<Vec<(usize, Tensor)>> {
        let mut out = Vec::new();
        for (var, members) in &self.0 {
            for m in members {
                out.push((m.param, Self::rows_of(var.as_tensor(), m)?));
            }
        }
        Ok(out)
    }
}

impl Lin {
    /// x (N, in) → (N, out) in x's dtype: through the step's low-precision copy of the weight
    /// if there is one, else a differentiable cast of the f32 master weight.
    /// With an adapter, PEFT's order: the base layer (bias included), then s · B A dropout(x).
    pub(super) fn fwd(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.compute_weight(x.dtype())?.t()?)?;
        let y = match &self.b {
            Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?)?,
            None => y,
        };
        let Some(ad) = &self.lora else {
            return Ok(y);
        };
        let (a, b) = ad.weights(x.dtype())?;
        let xd = match ad.mask(x)? {
            Some(m) => (x * m)?,
            None => x.clone(),
        };
        let u = (xd.matmul(&a.t()?)? * ad.scale)?;
        Ok((y + u.matmul(&b.t()?)?)?)
    }

    /// The weight in `dtype`: the step's copy if there is one, else a (differentiable) cast.
    pub(super) fn compute_weight(&self, dtype: DType) -> Result<Tensor> {
        compute_copy(&self.w, dtype)
    }
}

pub(super) struct Norm {
    pub(super) spec: NormSpec,
    pub(super) w: Option<Tensor>,
    pub(super) b: Option<Tensor>,
}

impl Norm {
    pub(super) fn fwd(&self, x: &Tensor) -> Result<Tensor> {
        match self.spec.kind {
            NormKind::Rms => {
                kernels::rms_norm(x, self.w.as_ref().expect("rms weight"), self.spec.eps)
            }
            NormKind::RmsOneOffset => {
                let dtype = x.dtype();
                let xf = x.to_dtype(DType::F32)?;
                let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.spec.eps)?
                    .sqrt()?
                    .recip()?;
                let w = (self.w.as_ref().expect("rms weight").to_dtype(DType::F32)? + 1.0)?;
                Ok(xf.broadcast_mul(&inv)?.broadcast_mul(&w)?.to_dtype(dtype)?)
            }
            NormKind::LayerNorm { .. } | NormKind::NonParametric => {
                layer_norm(x, self.w.as_ref(), self.b.as_ref(), self.spec.eps)
            }
        }
    }
}

pub(super) enum Qkv {
    Separate(Lin, Lin, Lin),
    Fused(Lin),
}

pub(super) enum Experts {
    Separate(Vec<(Lin, Lin, Lin)>),
    /// (E * F, H) each; w2 is applied untransposed, as DBRX stores it.
    Fused {
        w1: Tensor,
        v1: Tensor,
        w2: Tensor,
    },
    /// (E, 2F, H) with gate rows first, and (E, H, F): Granite MoE's stacks.
    Stacked {
        gate_up: Tensor,
        down: Tensor,
    },
}

pub(super) enum Mlp {
    Gated {
        gate: Lin,
        up: Lin,
        down: Lin,
        act: Act,
    },
    GatedFused {
        gate_up: Lin,
        down: Lin,
        act: Act,
        hidden: usize,
    },
    Plain {
        fc1: Lin,
        fc2: Lin,
        act: Act,
    },
    Moe {
        spec: MoeSpec,
        router: Lin,
        experts: Experts,
        shared: Option<(Box<Mlp>, Lin)>,
    },
}

pub(super) struct Layer {
    pub(super) norm1: Norm,
    pub(super) norm2: Option<Norm>,
    /// `Block::Sandwich`: the norms after attention and after the MLP.
    pub(super) post_norms: Option<(Norm, Norm)>,
    /// Attends within the sliding window while other layers do not (`ArchSpec::local_layers`):
    /// reads the context's `local` plan and rotary rows.
    pub(super) local: bool,
    pub(super) qkv: Qkv,
    pub(super) o: Lin,
    pub(super) q_norm: Vec<Tensor>,
    pub(super) k_norm: Vec<Tensor>,
    pub(super) mlp: Mlp,
    /// Under LoRA, the frozen q, k and v weights stacked by rows (`q.w`, `k.w`, `v.w` are views
    /// of it): one product for the three in the hand-written backward.
    pub(super) frozen_qkv: Option<Tensor>,
}

/// The per-head q/k norm (StableLM's qk_layernorm) of x (N, heads, D): LayerNorm without
/// parameters, then each head's weight.
/// q or k (N, heads, head_dim) normalised per head: a LayerNorm with each head's weight of `ws`
/// (StableLM), or an RMSNorm with the one weight `ws[0]` (Qwen3).
pub(super) fn head_norm(x: &Tensor, ws: &[Tensor], eps: f64, kind: QkNorm) -> Result<Tensor> {
    Ok(match kind {
        QkNorm::PerHeadLayerNorm => {
            let w = Tensor::stack(ws, 0)?.to_dtype(x.dtype())?;
            layer_norm(x, None, None, eps)?.broadcast_mul(&w)?
        }
        QkNorm::SharedRms => rms_norm(x, &ws[0], eps)?,
        QkNorm::SharedRmsOneOffset => {
            let xf = x.to_dtype(DType::F32)?;
            let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
                .sqrt()?
                .recip()?;
            let w = (ws[0].to_dtype(DType::F32)? + 1.0)?;
            (xf.broadcast_mul(&inv)?.broadcast_mul(&w)?).to_dtype(x.dtype())?
        }
        QkNorm::WholeRms => {
            let (n, h, d) = x.dims3()?;
            rms_norm(&x.reshape((n, h * d))?, &ws[0], eps)?.reshape((n, h, d))?
        }
    })
}

pub(super) fn activate(x: &Tensor, act: Act) -> Result<Tensor> {
    Ok(match act {
        Act::Silu => x.silu()?,
        Act::GeluErf => x.gelu_erf()?,
        Act::GeluTanh => x.gelu()?,
    })
}

/// What every layer of one forward pass shares.
pub(super) struct FwdCtx {
    pub(super) ids: Tensor,
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
    pub(super) plan: AttnPlan,
    pub(super) n: usize,
    /// Flattened indices of real (non-pad) tokens, for the router loss of padded batches.
    pub(super) real_rows: Option<Tensor>,
    /// Gemma 2 and 3: the plan with the sliding window and the rotary rows of the local layers
    /// (`plan`, `cos`, `sin` are then the global layers').
    pub(super) local: Option<LocalCtx>,
}

/// What a forward shares among the local layers of a model that mixes local and global ones.
pub(super) struct LocalCtx {
    pub(super) plan: AttnPlan,
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
}

impl FwdCtx {
    /// The attention plan and rotary rows (cos, sin) of a layer (`Layer::local`).
    pub(super) fn for_layer(&self, local: bool) -> (&AttnPlan, &Tensor, &Tensor) {
        match (&self.local, local) {
            (Some(l), true) => (&l.plan, &l.cos, &l.sin),
            _ => (&self.plan, &self.cos, &self.sin),
        }
    }
}

/// How a fused q/k/v projection's rows split into q, k and v (plain data, cheap to copy into a
/// backward closure).
#[derive(Clone, Copy)]
pub(super) struct QkvSplit {
    pub(super) layout: QkvLayout,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
}

impl ArchSpec {
    pub(super) fn qkv_split(&self) -> QkvSplit {
        QkvSplit {
            layout: self.qkv,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }
}

impl QkvSplit {
    /// q, k, v of a fused projection's output (n, (heads + 2 kv_heads) * head_dim), as views in
    /// the checkpoint's row layout.
    pub(super) fn split(&self, y: &Tensor, n: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (nh, nkv, d) = (self.heads, self.kv_heads, self.head_dim);
        Ok(match self.layout {
            QkvLayout::FusedGrouped => {
                let g = nh / nkv;
                let y = y.reshape((n, nkv, g + 2, d))?;
                (
                    y.narrow(2, 0, g)?,
                    y.narrow(2, g, 1)?,
                    y.narrow(2, g + 1, 1)?,
                )
            }
            QkvLayout::FusedInterleaved => {
                let y = y.reshape((n, nh, 3, d))?;
                (y.narrow(2, 0, 1)?, y.narrow(2, 1, 1)?, y.narrow(2, 2, 1)?)
            }
            _ => (
                y.narrow(1, 0, nh * d)?,
                y.narrow(1, nh * d, nkv * d)?,
                y.narrow(1, (nh + nkv) * d, nkv * d)?,
            ),
        })
    }

    /// The inverse of [`QkvSplit::split`] for gradients: dq (n, heads, d), dk and dv
    /// (n, kv_heads, d) → (n, (heads + 2 kv_heads) * d) in the fused rows' layout.
    pub(super) fn join(&self, dq: &Tensor, dk: &Tensor, dv: &Tensor, n: usize) -> Result<Tensor> {
        let (nh, nkv, d) = (self.heads, self.kv_heads, self.head_dim);
        let (parts, dim) = match self.layout {
            QkvLayout::FusedGrouped => (
                [
                    dq.reshape((n, nkv, nh / nkv, d))?,
                    dk.reshape((n, nkv, 1, d))?,
                    dv.reshape((n, nkv, 1, d))?,
                ],
                2,
            ),
            QkvLayout::FusedInterleaved => (
                [
                    dq.reshape((n, nh, 1, d))?,
                    dk.reshape((n, nh, 1, d))?,
                    dv.reshape((n, nh, 1, d))?,
                ],
                2,
            ),
            _ => (
                [
                    dq.reshape((n, nh * d))?,
                    dk.reshape((n, nkv * d))?,
                    dv.reshape((n, nkv * d))?,
                ],
                1,
            ),
        };
        Ok(Tensor::cat(&parts, dim)?.reshape((n, ()))?)
    }
}
