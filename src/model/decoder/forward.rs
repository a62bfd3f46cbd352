//! The decoder's forward pass, piece by piece: each part computes itself (`Layer::forward`,
//! `Layer::attention`, `Mlp::forward`, the experts), and `backward.rs` mirrors each with its
//! hand-written backward.

use candle_core::{DType, Tensor};

use super::super::spec::*;
use super::parts::{activate, head_norm, Experts, FwdCtx, Layer, Lin, Mlp, Qkv};
use crate::error::Result;
use crate::nn::kernels;
use crate::nn::ops::softmax_last;

impl Layer {
    /// One decoder layer: x (N, H) → (N, H), plus the router output of a MoE layer. The
    /// residual variants (`Block`), with `rm` the residual multiplier (Granite; 1 elsewhere):
    ///
    /// ```text
    /// Sequential (Llama and most):          Parallel (Falcon, Phi, StableLM-2 ...):
    ///
    ///   x ──┬──────────────────────(+)─ x2    x ──┬───────────────────────────(+)─ y
    ///       └─ norm1 ─ attention ─ ×rm ┘          ├─ norm1 ─ attention ────────(+)
    ///  x2 ──┬──────────────────────(+)─ y         └─ norm2 ─ mlp ──────────────(+)
    ///       └─ norm2 ─ mlp ─────── ×rm ┘          (shared_norm: mlp reads norm1's output)
    ///
    /// PostNorm (OLMo 2):                    Sandwich (Gemma 2 and 3):
    ///
    ///   x ──┬──────────────────────(+)─ x2    x ──┬───────────────────────────────(+)─ x2
    ///       └─ attention ─ norm1 ──────┘          └─ norm1 ─ attention ─ post1 ───┘
    ///  x2 ──┬──────────────────────(+)─ y    x2 ──┬───────────────────────────────(+)─ y
    ///       └─ mlp ─ norm2 ────────────┘          └─ norm2 ─ mlp ─ post2 ─────────┘
    /// ```
    ///
    /// The hand-written backward (`backward.rs`, `Layer::forward_vjp`) mirrors each branch.
    pub(super) fn forward(
        &self,
        spec: &ArchSpec,
        x: &Tensor,
        ctx: &FwdCtx,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.forward_with(spec, x, |h| self.attention(spec, h, ctx))
    }

    /// [`Layer::forward`] with the attention block given: the residual structure is the same
    /// whether the attention reads the whole sequence or a KV cache (`cache.rs`).
    pub(super) fn forward_with(
        &self,
        spec: &ArchSpec,
        x: &Tensor,
        attention: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let rm = spec.residual_multiplier;
        let scaled = |t: Tensor| -> Result<Tensor> { Ok(if rm != 1.0 { (t * rm)? } else { t }) };
        let norm2 = || self.norm2.as_ref().expect("this block has two norms");
        Ok(match spec.block {
            Block::Sequential => {
                let a = attention(&self.norm1.fwd(x)?)?;
                let x = (x + scaled(a)?)?;
                let (m, r) = self.mlp.forward(&norm2().fwd(&x)?)?;
                ((x + scaled(m)?)?, r)
            }
            Block::Parallel { shared_norm } => {
                let h1 = self.norm1.fwd(x)?;
                let a = attention(&h1)?;
                let h2 = if shared_norm { h1 } else { norm2().fwd(x)? };
                let (m, r) = self.mlp.forward(&h2)?;
                (((x + a)? + m)?, r)
            }
            Block::PostNorm => {
                let x = (x + self.norm1.fwd(&attention(x)?)?)?;
                let (m, r) = self.mlp.forward(&x)?;
                ((&x + norm2().fwd(&m)?)?, r)
            }
            Block::Sandwich => {
                let (post1, post2) = self.post_norms.as_ref().expect("sandwich post-norms");
                let a = attention(&self.norm1.fwd(x)?)?;
                let x = (x + post1.fwd(&a)?)?;
                let (m, r) = self.mlp.forward(&norm2().fwd(&x)?)?;
                ((&x + post2.fwd(&m)?)?, r)
            }
        })
    }

    /// The attention block: h (N, H) → (N, H); every sequence attends only to itself (`ctx.plan`).
    pub(super) fn attention(&self, s: &ArchSpec, h: &Tensor, ctx: &FwdCtx) -> Result<Tensor> {
        let (q, k, v) = self.qkv(s, h, ctx)?;
        let a = ctx
            .for_layer(self.local)
            .0
            .attend(&q, &k, &v, s.attn_scale)?;
        self.o.fwd(&a)
    }

    /// q, k and v of the attention block for h (N, H): projected, clipped and normed as the
    /// family does, q and k rotated by the context's positions. (N, heads, d) and
    /// (N, kv_heads, d) each.
    pub(super) fn qkv(
        &self,
        s: &ArchSpec,
        h: &Tensor,
        ctx: &FwdCtx,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, nh, nkv, d) = (ctx.n, s.heads, s.kv_heads, s.head_dim);
        let (q, k, v) = match &self.qkv {
            Qkv::Separate(q, k, v) => (q.fwd(h)?, k.fwd(h)?, v.fwd(h)?),
            Qkv::Fused(lin) => s.qkv_split().split(&lin.fwd(h)?, n)?,
        };
        let (mut q, mut k, mut v) = (
            q.reshape((n, nh, d))?,
            k.reshape((n, nkv, d))?,
            v.reshape((n, nkv, d))?,
        );
        if let Some(c) = s.clip_qkv {
            q = q.clamp(-c, c)?;
            k = k.clamp(-c, c)?;
            v = v.clamp(-c, c)?;
        }
        if let (Some(kind), false) = (s.qk_norm, self.q_norm.is_empty()) {
            q = head_norm(&q, &self.q_norm, s.norm.eps, kind)?;
            k = head_norm(&k, &self.k_norm, s.norm.eps, kind)?;
        }
        let (_, cos, sin) = ctx.for_layer(self.local);
        let q = kernels::apply_rope(&q, cos, sin)?;
        let k = kernels::apply_rope(&k, cos, sin)?;
        Ok((q, k, v))
    }
}

impl Mlp {
    /// MLP output, and for a mixture of experts the router output the auxiliary loss reads.
    pub(super) fn forward(&self, h: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        Ok(match self {
            Mlp::Gated {
                gate,
                up,
                down,
                act,
            } => {
                let (g, u) = (gate.fwd(h)?, up.fwd(h)?);
                let y = match act {
                    Act::Silu => kernels::silu_mul(&g, &u)?,
                    _ => (activate(&g, *act)? * u)?,
                };
                (down.fwd(&y)?, None)
            }
            Mlp::GatedFused {
                gate_up,
                down,
                act,
                hidden,
            } => {
                let y = gate_up.fwd(h)?;
                let (g, u) = (y.narrow(1, 0, *hidden)?, y.narrow(1, *hidden, *hidden)?);
                let y = match act {
                    Act::Silu => kernels::silu_mul(&g, &u)?,
                    _ => (activate(&g, *act)? * u)?,
                };
                (down.fwd(&y)?, None)
            }
            Mlp::Plain { fc1, fc2, act } => (fc2.fwd(&activate(&fc1.fwd(h)?, *act)?)?, None),
            Mlp::Moe {
                spec,
                router,
                experts,
                shared,
            } => {
                let (y, r) = moe_forward(spec, router, experts, h)?;
                let y = match shared {
                    Some((mlp, gate)) => {
                        let (sy, _) = mlp.forward(h)?;
                        let g = gate.fwd(h)?;
                        let sig = (g.neg()?.exp()? + 1.0)?.recip()?;
                        (y + sy.broadcast_mul(&sig)?)?
                    }
                    None => y,
                };
                (y, Some(r))
            }
        })
    }
}

/// A mixture of experts: each token through its top-k experts (chosen on the host from the
/// router's probabilities), weighted; returns the output and the router output the auxiliary
/// loss reads.
fn moe_forward(
    spec: &MoeSpec,
    router: &Lin,
    experts: &Experts,
    h: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (n, hd) = h.dims2()?;
    let (e_n, k) = (spec.experts, spec.top_k);
    let logits = router.fwd(h)?.to_dtype(DType::F32)?;
    let p = softmax_last(&logits)?;
    let host = p.to_vec2::<f32>()?;
    let mut idx = Vec::with_capacity(n * k);
    let mut per_expert: Vec<(Vec<u32>, Vec<u32>)> = vec![(Vec::new(), Vec::new()); e_n];
    for (t, row) in host.iter().enumerate() {
        let mut order: Vec<usize> = (0..e_n).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for (j, &e) in order.iter().take(k).enumerate() {
            idx.push(e as u32);
            per_expert[e].0.push(t as u32);
            per_expert[e].1.push((t * k + j) as u32);
        }
    }
    let idx_t = Tensor::from_vec(idx, (n, k), h.device())?;
    let w = p.gather(&idx_t, 1)?;
    let w = match spec.routing {
        Routing::Raw => w,
        Routing::Renormalize => w.broadcast_div(&w.sum_keepdim(1)?)?,
        Routing::PNorm(pn) => w.broadcast_div(&w.powf(pn)?.sum_keepdim(1)?.powf(1.0 / pn)?)?,
    };
    let w_flat = w.to_dtype(h.dtype())?.flatten_all()?;
    let f = spec.expert_hidden;
    let mut out = Tensor::zeros((n, hd), h.dtype(), h.device())?;
    for (e, (tokens, slots)) in per_expert.into_iter().enumerate() {
        if tokens.is_empty() {
            continue;
        }
        let m = tokens.len();
        let tokens = Tensor::from_vec(tokens, m, h.device())?;
        let slots = Tensor::from_vec(slots, m, h.device())?;
        let xe = h.index_select(&tokens, 0)?;
        let ye = match experts {
            Experts::Separate(v) => {
                let (g, u, d) = &v[e];
                d.fwd(&(activate(&g.fwd(&xe)?, spec.act)? * u.fwd(&xe)?)?)?
            }
            Experts::Fused { w1, v1, w2 } => {
                let dt = xe.dtype();
                let (w1, v1, w2) = (
                    w1.narrow(0, e * f, f)?.to_dtype(dt)?,
                    v1.narrow(0, e * f, f)?.to_dtype(dt)?,
                    w2.narrow(0, e * f, f)?.to_dtype(dt)?,
                );
                let inter = (activate(&xe.matmul(&w1.t()?)?, spec.act)? * xe.matmul(&v1.t()?)?)?;
                inter.matmul(&w2)?
            }
            Experts::Stacked { gate_up, down } => {
                let dt = xe.dtype();
                let y = xe.matmul(&gate_up.get(e)?.to_dtype(dt)?.t()?)?;
                let inter = (activate(&y.narrow(1, 0, f)?, spec.act)? * y.narrow(1, f, f)?)?;
                inter.matmul(&down.get(e)?.to_dtype(dt)?.t()?)?
            }
        };
        let we = w_flat.index_select(&slots, 0)?.unsqueeze(1)?;
        out = out.index_add(&tokens, &ye.broadcast_mul(&we)?, 0)?;
    }
    Ok((out, if spec.aux_from_probs { p } else { logits }))
}

/// transformers' `load_balancing_loss_func` over the real tokens of the batch, all MoE
/// layers jointly.
pub(super) fn router_aux(
    spec: &ArchSpec,
    routers: &[Tensor],
    ctx: &FwdCtx,
) -> Result<Option<Tensor>> {
    let Some(top_k) = spec.mlp.iter().find_map(|m| match m {
        MlpSpec::Moe(s) => Some(s.top_k),
        _ => None,
    }) else {
        return Ok(None);
    };
    if routers.is_empty() {
        return Ok(None);
    }
    let rows: Vec<Tensor> = routers
        .iter()
        .map(|r| match &ctx.real_rows {
            Some(idx) => r.index_select(idx, 0),
            None => Ok(r.clone()),
        })
        .collect::<candle_core::Result<_>>()?;
    let rows = Tensor::cat(&rows, 0)?;
    let (r_n, e_n) = rows.dims2()?;
    let p = softmax_last(&rows)?;
    let host = p.to_vec2::<f32>()?;
    let mut counts = vec![0f32; e_n];
    for row in &host {
        let mut order: Vec<usize> = (0..e_n).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for &e in order.iter().take(top_k) {
            counts[e] += 1.0 / r_n as f32;
        }
    }
    let f = Tensor::from_vec(counts, e_n, rows.device())?;
    let pm = p.mean(0)?;
    Ok(Some(((pm * f)?.sum_all()? * e_n as f64)?))
}
