//! The hand-written backward of decoder layers, mirroring `forward.rs` function for function:
//! `Layer::forward_vjp` is `Layer::forward`, `attention_vjp` is `attention`, `Mlp::forward_vjp` is
//! `Mlp::forward`. Each returns the piece's output and its pullback: one matrix product per input
//! gradient and one per weight gradient, each written once, weight gradients handed to the float32
//! master weights as they come (`nn::graph::side_grad`). Pieces without a backward of their own
//! (LayerNorm, GELU, eager attention, ...) go through candle's autograd locally
//! (`through_autograd`), so every layer but the mixture-of-experts ones takes this path (why:
//! `nn::graph`).

use candle_core::Tensor;

use super::super::spec::{ArchSpec, Block};
use super::parts::{stacked_qkv, FwdCtx, Layer, Mlp, Qkv};
use super::pullbacks::{
    act_like, act_vjp, gated_vjp, head_norm_vjp, lin_vjp, norm_vjp, rope_vjp, stacked_lin_vjp,
    sum_backs, Back,
};
use crate::error::{Error, Result};
use crate::nn::graph::{count_hand_backward, in_scope, side_grad, Attach};
use crate::nn::kernels::{self, add};
use crate::pullback::Pullback;

/// `table.index_select(ids, 0)` as one graph node whose backward hands the table's gradient
/// (the rows of dy added into a zero table) straight to the scope; `None` outside [`scope`].
/// Through autograd, candle adds every gradient that reaches a tensor into a zero tensor of its
/// size: for an embedding table (TinyLlama's 32,000 x 2,048 float32 weights) that is a 262 MB
/// fill and a 786 MB add a step on top of the scatter's own table, the same in padded and
/// padding-free steps.
pub(super) fn embed_lookup(table: &Tensor, ids: &Tensor) -> Result<Option<Tensor>> {
    if !in_scope() || !table.is_variable() {
        return Ok(None);
    }
    let y = kernels::index_rows(&table.detach(), ids)?;
    let (t, ids) = (table.clone(), ids.clone());
    let back: Pullback<Option<Tensor>> = Box::new(move |dy: &Tensor| {
        side_grad(&t, kernels::index_rows_grad(&t, &ids, dy)?)?;
        Ok(None)
    });
    Ok(Some(table.apply_op2(&y, Attach::for_param(back))?))
}

impl Layer {
    /// [`Layer::forward`] with its pullback (dx; weight gradients go to the scope), branch for
    /// branch.
    pub(super) fn forward_vjp(
        &self,
        spec: &ArchSpec,
        x: &Tensor,
        ctx: &FwdCtx,
    ) -> Result<(Tensor, Back)> {
        let norm2 = || self.norm2.as_ref().expect("this block has two norms");
        match spec.block {
            Block::Sequential => {
                let rm = spec.residual_multiplier;
                let (h1, n1) = norm_vjp(&self.norm1, x)?;
                let (a, attn) = self.attention_vjp(spec, &h1, ctx)?;
                let x2 = add(x, &scale(&a, rm)?)?;
                let (h2, n2) = norm_vjp(norm2(), &x2)?;
                let (m, mlp) = self.mlp.forward_vjp(&h2)?;
                let y = add(&x2, &scale(&m, rm)?)?;
                let back = move |dy: &Tensor| -> Result<Tensor> {
                    let dh2 = mlp(&scale(dy, rm)?)?;
                    let dx2 = add(dy, &n2(&dh2)?)?;
                    let dh1 = attn(&scale(&dx2, rm)?)?;
                    add(&dx2, &n1(&dh1)?)
                };
                Ok((y, Box::new(back)))
            }
            Block::Parallel { shared_norm } => {
                let (h1, n1) = norm_vjp(&self.norm1, x)?;
                let (a, attn) = self.attention_vjp(spec, &h1, ctx)?;
                let (h2, n2) = if shared_norm {
                    (h1.clone(), None)
                } else {
                    let (h2, n2) = norm_vjp(norm2(), x)?;
                    (h2, Some(n2))
                };
                let (m, mlp) = self.mlp.forward_vjp(&h2)?;
                let y = add(&add(x, &a)?, &m)?;
                let back = move |dy: &Tensor| -> Result<Tensor> {
                    let dh1 = attn(dy)?;
                    let dh2 = mlp(dy)?;
                    Ok(match n2 {
                        None => add(dy, &n1(&add(&dh1, &dh2)?)?)?,
                        Some(n2) => add(&add(dy, &n1(&dh1)?)?, &n2(&dh2)?)?,
                    })
                };
                Ok((y, Box::new(back)))
            }
            Block::PostNorm => {
                let (a, attn) = self.attention_vjp(spec, x, ctx)?;
                let (na, n1) = norm_vjp(&self.norm1, &a)?;
                let x2 = add(x, &na)?;
                let (m, mlp) = self.mlp.forward_vjp(&x2)?;
                let (nm, n2) = norm_vjp(norm2(), &m)?;
                let y = add(&x2, &nm)?;
                let back = move |dy: &Tensor| -> Result<Tensor> {
                    let dx2 = add(dy, &mlp(&n2(dy)?)?)?;
                    add(&dx2, &attn(&n1(&dx2)?)?)
                };
                Ok((y, Box::new(back)))
            }
            Block::Sandwich => {
                let (post1, post2) = self.post_norms.as_ref().expect("sandwich post-norms");
                let (h1, n1) = norm_vjp(&self.norm1, x)?;
                let (a, attn) = self.attention_vjp(spec, &h1, ctx)?;
                let (pa, p1) = norm_vjp(post1, &a)?;
                let x2 = add(x, &pa)?;
                let (h2, n2) = norm_vjp(norm2(), &x2)?;
                let (m, mlp) = self.mlp.forward_vjp(&h2)?;
                let (pm, p2) = norm_vjp(post2, &m)?;
                let y = add(&x2, &pm)?;
                let back = move |dy: &Tensor| -> Result<Tensor> {
                    let dx2 = add(dy, &n2(&mlp(&p2(dy)?)?)?)?;
                    add(&dx2, &n1(&attn(&p1(&dx2)?)?)?)
                };
                Ok((y, Box::new(back)))
            }
        }
    }

    /// [`Layer::attention`] with its pullback: h (N, H) → (N, H).
    fn attention_vjp(&self, s: &ArchSpec, h: &Tensor, ctx: &FwdCtx) -> Result<(Tensor, Back)> {
        let (n, nh, nkv, d) = (ctx.n, s.heads, s.kv_heads, s.head_dim);
        let split = s.qkv_split();
        enum Proj {
            Separate(Back, Back, Back),
            /// q, k and v weights stacked: one product; the pullback takes the stacked gradient.
            Stacked(Back),
            Fused(Back),
        }
        let ((q, k, v), proj) = match &self.qkv {
            Qkv::Separate(lq, lk, lv) => match stacked_qkv(lq)
                .filter(|_| [lq, lk, lv].iter().all(|l| l.lora.is_none()))
                .or_else(|| self.frozen_qkv.clone())
                .filter(|w| w.dtype() == h.dtype())
            {
                Some(w) => {
                    let (y, back) = stacked_lin_vjp(&[lq, lk, lv], &w, h)?;
                    // Stacked only where nothing comes between projection and rotation
                    // (`copy_layout`); the pieces below remain for buffers the kernel rejects.
                    if let Some((o, to_y)) = self.stacked_rope_attention(s, &y, ctx)? {
                        let back = move |dy: &Tensor| back(&to_y(dy)?);
                        return Ok((o, Box::new(back)));
                    }
                    let qkv = (
                        y.narrow(1, 0, nh * d)?,
                        y.narrow(1, nh * d, nkv * d)?,
                        y.narrow(1, (nh + nkv) * d, nkv * d)?,
                    );
                    (qkv, Proj::Stacked(back))
                }
                None => {
                    let (q, bq) = lin_vjp(lq, h)?;
                    let (k, bk) = lin_vjp(lk, h)?;
                    let (v, bv) = lin_vjp(lv, h)?;
                    ((q, k, v), Proj::Separate(bq, bk, bv))
                }
            },
            Qkv::Fused(lin) => {
                let (y, b) = lin_vjp(lin, h)?;
                (split.split(&y, n)?, Proj::Fused(b))
            }
        };
        let q = q.reshape((n, nh, d))?;
        let k = k.reshape((n, nkv, d))?;
        let v = v.reshape((n, nkv, d))?;
        // Clipping and q/k norms: small elementwise pieces, through autograd.
        let mut pre_q: Vec<Back> = Vec::new();
        let mut pre_k: Vec<Back> = Vec::new();
        let (mut q, mut k, mut v) = (q, k, v);
        let mut pre_v: Option<Back> = None;
        if let Some(c) = s.clip_qkv {
            let clip = |t: &Tensor| act_like(t, move |x| Ok(x.clamp(-c, c)?));
            let (cq, bq) = clip(&q)?;
            let (ck, bk) = clip(&k)?;
            let (cv, bv) = clip(&v)?;
            (q, k, v) = (cq, ck, cv);
            pre_q.push(bq);
            pre_k.push(bk);
            pre_v = Some(bv);
        }
        if let (Some(kind), false) = (s.qk_norm, self.q_norm.is_empty()) {
            let (nq, bq) = head_norm_vjp(&q, &self.q_norm, s.norm.eps, kind)?;
            let (nk, bk) = head_norm_vjp(&k, &self.k_norm, s.norm.eps, kind)?;
            (q, k) = (nq, nk);
            pre_q.push(bq);
            pre_k.push(bk);
        }
        let (plan, cos, sin) = ctx.for_layer(self.local);
        let (q, rq) = rope_vjp(&q, cos, sin)?;
        let (k, rk) = rope_vjp(&k, cos, sin)?;
        let (a, attend) = plan.attend_vjp(&q, &k, &v, s.attn_scale)?;
        let (o, out) = lin_vjp(&self.o, &a)?;
        let back = move |dy: &Tensor| -> Result<Tensor> {
            let da = out(dy)?;
            let (dq, dk, dv) = attend(&da)?;
            let (mut dq, mut dk) = (rq(&dq)?, rk(&dk)?);
            for b in pre_q.into_iter().rev() {
                dq = b(&dq)?;
            }
            for b in pre_k.into_iter().rev() {
                dk = b(&dk)?;
            }
            let dv = match pre_v {
                Some(b) => b(&dv)?,
                None => dv,
            };
            match proj {
                Proj::Separate(bq, bk, bv) => sum_backs(vec![
                    (bq, dq.reshape((n, nh * d))?),
                    (bk, dk.reshape((n, nkv * d))?),
                    (bv, dv.reshape((n, nkv * d))?),
                ]),
                Proj::Stacked(b) => b(&Tensor::cat(
                    &[
                        dq.reshape((n, nh * d))?,
                        dk.reshape((n, nkv * d))?,
                        dv.reshape((n, nkv * d))?,
                    ],
                    1,
                )?),
                Proj::Fused(b) => b(&split.join(&dq, &dk, &dv, n)?),
            }
        };
        Ok((o, Box::new(back)))
    }

    /// The rest of the attention block from a stacked q/k/v product y (N, (heads + 2 kv_heads)
    /// head_dim) where nothing comes between projection and rotation: q and k rotated, and v
    /// copied, straight out of y's columns, and their gradients written back into one stacked
    /// gradient, one pass each (`kernels::rope_split_stacked`) instead of strided copies
    /// and a concatenation. Returns the block's output and its pullback to dy; `None` (nothing
    /// done) where that kernel does not apply, and off CUDA.
    fn stacked_rope_attention(
        &self,
        s: &ArchSpec,
        y: &Tensor,
        ctx: &FwdCtx,
    ) -> Result<Option<(Tensor, Back)>> {
        let dims = (s.heads, s.kv_heads, s.head_dim);
        let (plan, cos, sin) = ctx.for_layer(self.local);
        let Some((q, k, v)) = kernels::rope_split_stacked(y, dims, cos, sin)? else {
            return Ok(None);
        };
        let (a, attend) = plan.attend_vjp(&q, &k, &v, s.attn_scale)?;
        let (o, out) = lin_vjp(&self.o, &a)?;
        let (cos, sin) = (cos.clone(), sin.clone());
        let back = move |dy: &Tensor| -> Result<Tensor> {
            let (dq, dk, dv) = attend(&out(dy)?)?;
            kernels::rope_join_stacked(&dq, &dk, &dv, &cos, &sin)
        };
        Ok(Some((o, Box::new(back))))
    }
}

impl Mlp {
    /// [`Mlp::forward`] with its pullback (dense MLPs only).
    pub(super) fn forward_vjp(&self, h: &Tensor) -> Result<(Tensor, Back)> {
        match self {
            Mlp::Gated {
                gate,
                up,
                down,
                act,
            } => {
                let (g, bg) = lin_vjp(gate, h)?;
                let (u, bu) = lin_vjp(up, h)?;
                let (m, gated) = gated_vjp(&g, &u, *act)?;
                let (y, bd) = lin_vjp(down, &m)?;
                let back = move |dy: &Tensor| -> Result<Tensor> {
                    let (dg, du) = gated(&bd(dy)?)?;
                    sum_backs(vec![(bg, dg), (bu, du)])
                };
                Ok((y, Box::new(back)))
            }
            Mlp::GatedFused {
                gate_up,
                down,
                act,
                hidden,
            } => {
                let (gu, bgu) = lin_vjp(gate_up, h)?;
                let f = *hidden;
                let (m, gated) = gated_vjp(&gu.narrow(1, 0, f)?, &gu.narrow(1, f, f)?, *act)?;
                let (y, bd) = lin_vjp(down, &m)?;
                let back = move |dy: &Tensor| -> Result<Tensor> {
                    let (dg, du) = gated(&bd(dy)?)?;
                    bgu(&Tensor::cat(&[dg, du], 1)?)
                };
                Ok((y, Box::new(back)))
            }
            Mlp::Plain { fc1, fc2, act } => {
                let (a, b1) = lin_vjp(fc1, h)?;
                let (m, ba) = act_vjp(&a, *act)?;
                let (y, b2) = lin_vjp(fc2, &m)?;
                let back = move |dy: &Tensor| -> Result<Tensor> { b1(&ba(&b2(dy)?)?) };
                Ok((y, Box::new(back)))
            }
            Mlp::Moe { .. } => Err(Error::Config(
                "mixture-of-experts layers keep candle's autograd".into(),
            )),
        }
    }
}

/// How many of `layers`, from the first, take the hand-written backward here (inside a
/// `nn::graph::scope`, unless `autograd_layers`): every layer but the mixture-of-experts
/// ones, which keep candle's autograd; 0: run the first as an autograd graph.
pub(super) fn hand_written_run(layers: &[Layer], autograd_layers: bool) -> usize {
    if !in_scope() || autograd_layers {
        return 0;
    }
    layers
        .iter()
        .take_while(|l| !matches!(l.mlp, Mlp::Moe { .. }))
        .count()
}

/// Consecutive layers as one graph node whose backward runs their pullbacks in reverse: one
/// graph edge for the whole run, not one per layer (autograd zero-fills, adds and keeps a
/// copy of the hidden states at every edge). Needs [`hand_written_run`] to cover
/// `layers`.
pub(super) fn layers_node(
    layers: &[Layer],
    spec: &ArchSpec,
    x: &Tensor,
    ctx: &FwdCtx,
) -> Result<Tensor> {
    let mut h = x.detach();
    let mut backs = Vec::with_capacity(layers.len());
    for layer in layers {
        let (y, back) = layer.forward_vjp(spec, &h, ctx)?;
        backs.push(back);
        h = y;
    }
    let back: Back = Box::new(move |dy: &Tensor| -> Result<Tensor> {
        let mut d = dy.clone();
        for b in backs.into_iter().rev() {
            d = b(&d)?;
            count_hand_backward();
        }
        Ok(d)
    });
    let y = h.contiguous()?;
    // Under LoRA the embedding is frozen and its output is no graph node: the run's node then
    // hangs from a leaf variable of its own, or candle would never call its backward.
    let x = if x.track_op() {
        x.clone()
    } else {
        candle_core::Var::from_tensor(x)?.as_tensor().clone()
    };
    Ok(x.apply_op2(&y, Attach::new(back))?)
}

fn scale(t: &Tensor, s: f64) -> Result<Tensor> {
    Ok(if s != 1.0 { (t * s)? } else { t.clone() })
}

#[cfg(test)]
mod tests {
    use super::super::parts::Lin;
    use super::super::testing::{max_diff, values};
    use super::*;
    use crate::model::LossSum;
    use crate::nn::graph::scope;
    use candle_core::Device;

    /// [`values`] as a trainable parameter (a variable: frozen tensors take no gradient).
    fn param(shape: &[usize], seed: f32) -> Tensor {
        candle_core::Var::from_tensor(&values(shape, seed))
            .unwrap()
            .as_tensor()
            .clone()
    }

    /// What `f` returns, and the parameter gradients it handed over.
    fn with_side_grads(f: impl FnOnce() -> Result<Tensor>) -> (Tensor, Vec<(Tensor, Tensor)>) {
        let (r, side) = crate::nn::graph::with_side_grads(f);
        (r.unwrap(), side)
    }

    /// Inside a scope the embedding lookup gives index_select's rows, and the table gets the
    /// gradient autograd gives it (repeated ids summed, unused rows zero) from the scope instead
    /// of from candle's graph (whose zero-filled table and add are what it avoids); outside a
    /// scope it steps aside.
    #[test]
    fn embedding_lookup_hands_the_table_autograds_gradient() {
        let table = candle_core::Var::from_tensor(&values(&[5, 3], 0.4)).unwrap();
        let t = table.as_tensor();
        let ids = Tensor::new(&[3u32, 1, 3, 0, 3], &Device::Cpu).unwrap();
        let w = values(&[5, 3], 0.9);
        assert!(embed_lookup(t, &ids).unwrap().is_none());
        let reference = t.index_select(&ids, 0).unwrap();
        let autograd = (&reference * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_ref = autograd.get(t).unwrap();
        let (_, grads) = scope(|| {
            let y = embed_lookup(t, &ids)?.expect("inside a scope");
            assert_eq!(max_diff(&y, &reference), 0.0);
            let sum = (&y * &w)?.sum_all()?;
            let graph = sum.backward()?;
            assert!(
                graph.get(t).is_none(),
                "the graph itself gives the table nothing"
            );
            Ok((
                LossSum {
                    sum,
                    n_targets: 5,
                    aux: None,
                },
                graph,
            ))
        })
        .unwrap();
        let g = grads
            .get(t)
            .expect("the scope hands the table its gradient");
        assert_eq!(max_diff(g, g_ref), 0.0);
        let row_sums = g.abs().unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(row_sums[2], 0.0);
        assert_eq!(row_sums[4], 0.0);
        assert!(row_sums[3] > 0.1 && row_sums[0] > 0.1 && row_sums[1] > 0.1);
    }

    /// A layer's q, k and v through one stacked product (biases on two of them) give the outputs,
    /// input gradient and weight and bias gradients of three separate products.
    /// What the stacked projection of `lins` and the separate ones give for the same x and dy:
    /// each layer's (stacked columns, separate output), the input gradients (stacked,
    /// separate) and the handed-over parameter gradients (stacked, separate).
    type Grads = Vec<(Tensor, Tensor)>;

    fn stacked_and_separate(lins: &[Lin]) -> (Grads, Tensor, Tensor, Grads, Grads) {
        let x = values(&[5, 4], 1.3);
        let dy = values(&[5, 10], 1.7);
        let ws: Vec<&Tensor> = lins.iter().map(|l| &l.w).collect();
        let w = Tensor::cat(&ws, 0).unwrap();
        let refs: Vec<&Lin> = lins.iter().collect();
        let (y, back) = stacked_lin_vjp(&refs, &w, &x).unwrap();
        let (dx, side) = with_side_grads(|| back(&dy));
        let mut col = 0;
        let mut outputs = Vec::new();
        let mut dx_sep: Option<Tensor> = None;
        let mut side_sep = Vec::new();
        for l in lins {
            let rows = l.w.dim(0).unwrap();
            let (yi, bi) = lin_vjp(l, &x).unwrap();
            outputs.push((y.narrow(1, col, rows).unwrap(), yi));
            let (dxi, si) = with_side_grads(|| bi(&dy.narrow(1, col, rows)?));
            dx_sep = Some(match dx_sep {
                Some(t) => (t + dxi).unwrap(),
                None => dxi,
            });
            side_sep.extend(si);
            col += rows;
        }
        (outputs, dx, dx_sep.unwrap(), side, side_sep)
    }

    #[test]
    fn stacked_projection_matches_separate_ones() {
        let lins = [
            Lin {
                lora: None,
                w: param(&[6, 4], 0.3),
                b: Some(param(&[6], 0.7)),
            },
            Lin {
                lora: None,
                w: param(&[2, 4], 0.5),
                b: None,
            },
            Lin {
                lora: None,
                w: param(&[2, 4], 0.9),
                b: Some(param(&[2], 1.1)),
            },
        ];
        let (outputs, dx, dx_sep, side, side_sep) = stacked_and_separate(&lins);
        for (y, yi) in &outputs {
            assert_eq!(max_diff(y, yi), 0.0);
        }
        assert!(max_diff(&dx, &dx_sep) < 1e-5);
        // Three weight and two bias gradients, each for its own parameter.
        assert_eq!(side.len(), 5);
        assert_eq!(side_sep.len(), 5);
        for (p, g) in &side_sep {
            let (_, gs) = side
                .iter()
                .find(|(q, _)| q.id() == p.id())
                .expect("the stacked pullback hands every parameter a gradient");
            assert!(max_diff(gs, g) < 1e-5, "{:?}", p.dims());
            assert!(
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.1
            );
        }
    }

    /// q, k and v of a frozen base with adapters, stacked (one product, A stacked, B
    /// block-diagonal), give what three separate adapted layers give: outputs, input gradient,
    /// and every A and B gradient; the frozen weights get none.
    #[test]
    fn stacked_adapters_match_separate_ones() {
        use super::super::parts::Adapter;
        let lin = |out: usize, seed: f32, index: u64| Lin {
            w: values(&[out, 4], seed),
            b: None,
            lora: Some(Adapter {
                a: param(&[2, 4], seed + 0.1),
                b: param(&[out, 2], seed + 0.2),
                scale: 1.5,
                dropout: 0.0,
                index,
            }),
        };
        let lins = [lin(6, 0.3, 0), lin(2, 0.5, 1), lin(2, 0.9, 2)];
        let (outputs, dx, dx_sep, side, side_sep) = stacked_and_separate(&lins);
        for (y, yi) in &outputs {
            assert!(max_diff(y, yi) < 1e-5);
        }
        assert!(max_diff(&dx, &dx_sep) < 1e-5);
        // Three A and three B gradients, none for the frozen weights.
        assert_eq!(side.len(), 6);
        assert_eq!(side_sep.len(), 6);
        for (p, g) in &side_sep {
            let (_, gs) = side
                .iter()
                .find(|(q, _)| q.id() == p.id())
                .expect("every adapter tensor gets its gradient");
            assert!(max_diff(gs, g) < 1e-5, "{:?}", p.dims());
        }
    }
}
