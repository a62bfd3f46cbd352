//! Decoder layers with a hand-written backward.
//!
//! candle's autograd zero-fills a gradient buffer and adds into it for every edge of the graph,
//! and reaches a weight's gradient through the transpose of the weight (a strided add), then a
//! cast to float32: on the padding-free GPU benchmark those adds and casts took 52 of the
//! step's 117 ms of GPU time (ncu, `benches/gpu/gpu_profile.sh`), more than the matrix
//! products. Here a layer's forward runs outside the graph on detached tensors and keeps what
//! its backward reads; the layer joins the graph as a single node ([`Attach`]) whose backward
//! runs the layer's backward: one matrix product per input gradient and one per weight
//! gradient, each written once, weight gradients handed to the float32 master weights as they
//! come ([`side_grad`]). Pieces without a backward of their own (LayerNorm, GELU, eager
//! attention, ...) go through candle's autograd locally ([`through_autograd`]), so every layer
//! but the mixture-of-experts ones takes this path. Only inside [`scope`], which merges those
//! weight gradients into the gradients `backward` returns: elsewhere (evaluation, a caller's
//! own `loss().backward()`, gradient checkpointing's recomputation) layers stay plain autograd
//! graphs.

use std::cell::RefCell;
use std::sync::Mutex;

use candle_core::{backprop::GradStore, CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

use super::{activate, head_norm, stacked_qkv, DecoderModel, FwdCtx, Layer, Lin, Mlp, Norm, Qkv};
use crate::error::{Error, Result};
#[cfg(feature = "cuda")]
use crate::model::spec::NormKind;
use crate::model::spec::{Act, Block};
use crate::model::LossSum;
use crate::vjp::{grad_or_zeros, through_autograd, to_candle, PairGrads, Pullback};

type Back = Pullback<Tensor>;

thread_local! {
    /// Parameter gradients of the hand-written backward passes of the running
    /// forward/backward; `None` outside [`scope`].
    static SIDE_GRADS: RefCell<Option<Vec<(Tensor, Tensor)>>> = const { RefCell::new(None) };
}

/// Runs a forward/backward in which layers may take their hand-written backward, and adds the
/// parameter gradients those produced to the ones `f`'s backward returned.
pub(super) fn scope(
    f: impl FnOnce() -> Result<(LossSum, GradStore)>,
) -> Result<(LossSum, GradStore)> {
    // A scope inside another (a model's forward/backward calling another's) keeps its own list.
    let outer = SIDE_GRADS.with(|s| s.borrow_mut().replace(Vec::new()));
    let r = f();
    let side = SIDE_GRADS
        .with(|s| std::mem::replace(&mut *s.borrow_mut(), outer))
        .unwrap_or_default();
    let (l, mut grads) = r?;
    for (p, g) in side {
        let g = match grads.remove(&p) {
            Some(other) => crate::optim::add_grad(&other, &g)?,
            None => g,
        };
        grads.insert(&p, g);
    }
    Ok((l, grads))
}

thread_local! {
    static HAND_BACKWARDS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many layer backward passes this thread ran by hand so far (for tests that must know the
/// hand-written path ran, not the autograd fallback).
#[doc(hidden)]
pub fn hand_written_backwards() -> usize {
    HAND_BACKWARDS.with(|c| c.get())
}

fn in_scope() -> bool {
    SIDE_GRADS.with(|s| s.borrow().is_some())
}

/// Hands the gradient `g` of parameter `p` (a float32 master) to the running [`scope`], in the
/// parameter's dtype.
fn side_grad(p: &Tensor, g: Tensor) -> Result<()> {
    push_side_grad(p, g.to_dtype(p.dtype())?)
}

/// Hands `g` over in the dtype it has (see [`hand_weight_grad`]).
fn push_side_grad(p: &Tensor, g: Tensor) -> Result<()> {
    SIDE_GRADS.with(|s| match s.borrow_mut().as_mut() {
        Some(v) => {
            v.push((p.clone(), g));
            Ok(())
        }
        None => Err(Error::Config(
            "a hand-written layer backward ran outside its forward/backward scope".into(),
        )),
    })
}

/// The graph node of a layer: output `y` (computed outside the graph) for input `x`; its
/// backward is the layer's pullback, which returns x's gradient, or `None` where x is a
/// parameter whose gradient it handed to the scope itself.
struct Attach(Mutex<Option<Pullback<Option<Tensor>>>>);

impl Attach {
    fn new(back: Back) -> Self {
        Attach(Mutex::new(Some(Box::new(move |d: &Tensor| {
            back(d).map(Some)
        }))))
    }
}

impl CustomOp2 for Attach {
    fn name(&self) -> &'static str {
        "packsft-layer"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        // A same-dtype conversion is a contiguous copy that honours the layout.
        Ok((y.to_dtype(yl, y.dtype())?, yl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        y: &candle_core::CudaStorage,
        yl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::{CudaDType, WrapErr};
        fn copy<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
            y: &candle_core::CudaStorage,
            yl: &Layout,
        ) -> candle_core::Result<candle_core::CudaStorage> {
            let v = crate::fused::cview::<T>(y, yl)?;
            let dev = y.device.clone();
            let c = dev.cuda_stream().clone_dtod(&v).w()?;
            Ok(candle_core::CudaStorage::wrap_cuda_slice(c, dev))
        }
        let out = match y.dtype() {
            DType::BF16 => copy::<half::bf16>(y, yl)?,
            DType::F16 => copy::<half::f16>(y, yl)?,
            DType::F32 => copy::<f32>(y, yl)?,
            d => return Err(candle_core::Error::Msg(format!("layer output in {d:?}"))),
        };
        Ok((out, yl.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let back = self
            .0
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| candle_core::Error::Msg("layer backward ran twice".into()))?;
        Ok((back(dout).map_err(to_candle)?, None))
    }
}

/// x (N, in) → x W^T (+ b); the pullback returns dx and hands dW = dy^T x (and db) over.
fn lin_vjp(lin: &Lin, x: &Tensor) -> Result<(Tensor, Back)> {
    let w = lin.compute_weight(x.dtype())?.detach();
    let y = x.matmul(&w.t()?)?;
    let y = match &lin.b {
        Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?.detach())?,
        None => y,
    };
    let (x, master, bias) = (x.clone(), lin.w.clone(), lin.b.clone());
    let back = move |dy: &Tensor| -> Result<Tensor> {
        let dy = dy.to_dtype(x.dtype())?.contiguous()?;
        hand_weight_grad(&master, &dy, &x)?;
        if let Some(b) = &bias {
            side_grad(b, dy.to_dtype(DType::F32)?.sum(0)?)?;
        }
        Ok(dy.matmul(&w)?)
    };
    Ok((y, Box::new(back)))
}

/// Hands the weight gradient dy^T x of `master` to the scope. For bf16 on CUDA it stays the
/// bf16 matrix cuBLAS writes, as PyTorch's autocast makes a float32 weight's gradient (a bf16
/// product, widened afterwards): the gradient's users widen it where they need float32 (the
/// fused optimizer in registers, gradient sums and clipping in `optim`), and the step keeps no
/// float32 copy of every weight's gradient. Elsewhere, candle's matmul and the master's dtype.
fn hand_weight_grad(master: &Tensor, dy: &Tensor, x: &Tensor) -> Result<()> {
    hand_weight_grads(&[(master.clone(), 0, dy.dim(1)?)], dy, x)
}

/// [`hand_weight_grad`] for several masters whose rows are stacked in dy's columns, as
/// (master, first row, rows): one product, each master's rows handed over as a view of it.
fn hand_weight_grads(masters: &[(Tensor, usize, usize)], dy: &Tensor, x: &Tensor) -> Result<()> {
    #[cfg(feature = "cuda")]
    if crate::fused::usable(dy) && crate::fused::usable(x) && x.rank() == 2 {
        let dw = crate::fused::weight_grad_bf16(dy, x)?;
        for (m, row, rows) in masters {
            push_side_grad(m, dw.narrow(0, *row, *rows)?)?;
        }
        return Ok(());
    }
    let dw = dy.t()?.matmul(x)?;
    for (m, row, rows) in masters {
        side_grad(m, dw.narrow(0, *row, *rows)?)?;
    }
    Ok(())
}

/// x (N, in) → y (N, sum of rows) for linear layers of one input whose compute weights `w` are
/// stacked by rows (a layer's q, k and v): one matrix product forward, and one each for dx and
/// the weight gradients, instead of one each per layer and the adds of their input gradients
/// (cuBLAS runs TinyLlama's one (N, 2,560) product faster than a (N, 2,048) and two (N, 256)
/// ones: benches/gpu/gemm_shapes.py). The pullback takes dy (N, sum of rows).
fn stacked_lin_vjp(lins: &[&Lin], w: &Tensor, x: &Tensor) -> Result<(Tensor, Back)> {
    let w = w.detach();
    let y = x.matmul(&w.t()?)?;
    let mut masters = Vec::with_capacity(lins.len());
    let mut row = 0;
    for l in lins {
        let rows = l.w.dim(0)?;
        masters.push((l.w.clone(), row, rows));
        row += rows;
    }
    let y = if lins.iter().any(|l| l.b.is_some()) {
        let b = lins
            .iter()
            .map(|l| match &l.b {
                Some(b) => b.to_dtype(x.dtype()),
                None => Tensor::zeros(l.w.dim(0)?, x.dtype(), x.device()),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        y.broadcast_add(&Tensor::cat(&b, 0)?.detach())?
    } else {
        y
    };
    let biases: Vec<Option<Tensor>> = lins.iter().map(|l| l.b.clone()).collect();
    let x = x.clone();
    let back = move |dy: &Tensor| -> Result<Tensor> {
        let dy = dy.to_dtype(x.dtype())?.contiguous()?;
        hand_weight_grads(&masters, &dy, &x)?;
        if biases.iter().any(|b| b.is_some()) {
            let db = dy.to_dtype(DType::F32)?.sum(0)?;
            for (b, (_, row, rows)) in biases.iter().zip(&masters) {
                if let Some(b) = b {
                    side_grad(b, db.narrow(0, *row, *rows)?)?;
                }
            }
        }
        Ok(dy.matmul(&w)?)
    };
    Ok((y, Box::new(back)))
}

fn norm_vjp(norm: &Norm, x: &Tensor) -> Result<(Tensor, Back)> {
    #[cfg(feature = "cuda")]
    if norm.spec.kind == NormKind::Rms && crate::fused::usable(x) {
        let w = norm.w.as_ref().expect("rms weight");
        if let Some((y, back)) = crate::fused::rms_norm_vjp(x, w, norm.spec.eps)? {
            let w = w.clone();
            let back = move |dy: &Tensor| -> Result<Tensor> {
                let (dx, dw) = back(dy)?;
                side_grad(&w, dw)?;
                Ok(dx)
            };
            return Ok((y, Box::new(back)));
        }
    }
    let params: Vec<Tensor> = norm.w.iter().chain(norm.b.iter()).cloned().collect();
    let mut inputs = vec![x];
    inputs.extend(params.iter());
    let (has_w, spec) = (norm.w.is_some(), norm.spec);
    let (y, back) = through_autograd(&inputs, |t| {
        let local = Norm {
            spec,
            w: if has_w { Some(t[1].clone()) } else { None },
            b: if has_w { t.get(2).cloned() } else { None },
        };
        local.fwd(&t[0])
    })?;
    Ok((y, x_then_params(back, x.clone(), params)))
}

/// The pullback of a piece through autograd whose inputs are `x` and then parameters: returns
/// dx and hands the parameters' gradients over.
fn x_then_params(back: Pullback<Vec<Option<Tensor>>>, x: Tensor, params: Vec<Tensor>) -> Back {
    Box::new(move |dy: &Tensor| -> Result<Tensor> {
        let mut g = back(dy)?.into_iter();
        let dx = grad_or_zeros(g.next().flatten(), &x)?;
        for (p, gp) in params.iter().zip(g) {
            if let Some(gp) = gp {
                side_grad(p, gp)?;
            }
        }
        Ok(dx)
    })
}

fn rope_vjp(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Back)> {
    #[cfg(feature = "cuda")]
    if crate::fused::usable(x) {
        return crate::fused::apply_rope_vjp(x, cos, sin);
    }
    let (y, back) = through_autograd(&[x], |t| crate::ops::apply_rope(&t[0], cos, sin))?;
    let x = x.clone();
    let back = move |dy: &Tensor| grad_or_zeros(back(dy)?.pop().flatten(), &x);
    Ok((y, Box::new(back)))
}

/// act(g) * u with its pullback (dg, du).
fn gated_vjp(g: &Tensor, u: &Tensor, act: Act) -> Result<(Tensor, Pullback<PairGrads>)> {
    #[cfg(feature = "cuda")]
    if act == Act::Silu && crate::fused::usable(g) && g.dims() == u.dims() {
        return crate::fused::silu_mul_vjp(g, u);
    }
    let (y, back) = through_autograd(&[g, u], |t| Ok((activate(&t[0], act)? * &t[1])?))?;
    let (g, u) = (g.clone(), u.clone());
    let back = move |dy: &Tensor| -> Result<PairGrads> {
        let mut r = back(dy)?.into_iter();
        Ok((
            grad_or_zeros(r.next().flatten(), &g)?,
            grad_or_zeros(r.next().flatten(), &u)?,
        ))
    };
    Ok((y, Box::new(back)))
}

fn act_vjp(a: &Tensor, act: Act) -> Result<(Tensor, Back)> {
    act_like(a, move |x| activate(x, act))
}

/// An elementwise piece `f` of one input, through autograd.
fn act_like(a: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<(Tensor, Back)> {
    let (y, back) = through_autograd(&[a], |t| f(&t[0]))?;
    let a = a.clone();
    let back = move |dy: &Tensor| grad_or_zeros(back(dy)?.pop().flatten(), &a);
    Ok((y, Box::new(back)))
}

/// [`head_norm`] with its pullback; the weights' gradients go to their parameters.
fn head_norm_vjp(x: &Tensor, ws: &[Tensor], eps: f64) -> Result<(Tensor, Back)> {
    let mut inputs = vec![x];
    inputs.extend(ws.iter());
    let (y, back) = through_autograd(&inputs, |t| head_norm(&t[0], &t[1..], eps))?;
    Ok((y, x_then_params(back, x.clone(), ws.to_vec())))
}

/// Adds the input gradients of several pullbacks of one input.
fn sum_backs(backs: Vec<(Back, Tensor)>) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (back, dy) in backs {
        let d = back(&dy)?;
        total = Some(match total {
            Some(t) => add(&t, &d)?,
            None => d,
        });
    }
    total.ok_or_else(|| Error::Config("no gradient to add".into()))
}

/// `table.index_select(ids, 0)` as one graph node whose backward hands the table's gradient
/// (the rows of dy added into a zero table) straight to the scope; `None` outside [`scope`].
/// Through autograd, candle adds every gradient that reaches a tensor into a zero tensor of its
/// size: for an embedding table (TinyLlama's 32,000 x 2,048 float32 weights) that is a 262 MB
/// fill and a 786 MB add a step on top of the scatter's own table, the same in padded and
/// padding-free steps.
pub(super) fn embed_lookup(table: &Tensor, ids: &Tensor) -> Result<Option<Tensor>> {
    if !in_scope() {
        return Ok(None);
    }
    let y = crate::ops::index_rows(&table.detach(), ids)?;
    let (t, ids) = (table.clone(), ids.clone());
    let back: Pullback<Option<Tensor>> = Box::new(move |dy: &Tensor| {
        side_grad(&t, crate::ops::index_rows_grad(&t, &ids, dy)?)?;
        Ok(None)
    });
    Ok(Some(table.apply_op2(&y, Attach(Mutex::new(Some(back))))?))
}

impl DecoderModel {
    /// Whether `layer` can take the hand-written backward: every layer but the
    /// mixture-of-experts ones (which keep candle's autograd).
    fn manual_backward_fits(&self, layer: &Layer) -> bool {
        !self.compute.autograd_layers && !matches!(layer.mlp, Mlp::Moe { .. })
    }

    /// How many of `layers`, from the first, can take the hand-written backward here (inside
    /// [`scope`]); 0: run the first as an autograd graph.
    pub(super) fn manual_run(&self, layers: &[Layer]) -> usize {
        if !in_scope() {
            return 0;
        }
        layers
            .iter()
            .take_while(|l| self.manual_backward_fits(l))
            .count()
    }

    /// Consecutive layers as one graph node whose backward runs their pullbacks in reverse: one
    /// graph edge for the whole run, not one per layer (autograd zero-fills, adds and keeps a
    /// copy of the hidden states at every edge). Needs [`DecoderModel::manual_run`] to cover
    /// `layers`.
    pub(super) fn layers_fwd_manual(
        &self,
        layers: &[Layer],
        x: &Tensor,
        ctx: &FwdCtx,
    ) -> Result<Tensor> {
        let mut h = x.detach();
        let mut backs = Vec::with_capacity(layers.len());
        for layer in layers {
            let (y, back) = self.layer_vjp(layer, &h, ctx)?;
            backs.push(back);
            h = y;
        }
        let back: Back = Box::new(move |dy: &Tensor| -> Result<Tensor> {
            let mut d = dy.clone();
            for b in backs.into_iter().rev() {
                d = b(&d)?;
                HAND_BACKWARDS.with(|c| c.set(c.get() + 1));
            }
            Ok(d)
        });
        let y = h.contiguous()?;
        Ok(x.apply_op2(&y, Attach::new(back))?)
    }

    /// The vocabulary projection as one graph node whose backward hands the weight gradient
    /// straight to the master weight (autograd would make a gradient of the weight copy, then
    /// cast and add it); `None` outside [`scope`], with autograd layers, and
    /// off the GPU's bf16 path, where there is no cast to save and the node's copy of the
    /// float32 logits would cost time and memory.
    pub(super) fn lm_head_manual(&self, lin: &Lin, h: &Tensor) -> Result<Option<Tensor>> {
        if !self.manual_head(h) {
            return Ok(None);
        }
        let (y, back) = lin_vjp(lin, &h.detach())?;
        let y = y.contiguous()?;
        Ok(Some(h.apply_op2(&y, Attach::new(back))?))
    }

    /// Whether the vocabulary projection of `h` joins the graph as a node of its own: inside
    /// [`scope`], with hand-written layers, on the GPU's bf16 path.
    fn manual_head(&self, h: &Tensor) -> bool {
        in_scope()
            && !self.compute.autograd_layers
            && h.device().is_cuda()
            && h.dtype() == DType::BF16
    }

    /// The vocabulary projection and the per-row loss (negative log-likelihood of `targets`) as
    /// one graph node, on the same terms as [`Self::lm_head_manual`] and for unscaled logits:
    /// autograd then holds only per-row and hidden-sized gradients. As two nodes, it added the
    /// logits' gradient (rows x vocab) into a zero-filled tensor of that size every step.
    pub(super) fn lm_head_nll_manual(
        &self,
        lin: &Lin,
        h: &Tensor,
        targets: &Tensor,
    ) -> Result<Option<Tensor>> {
        if !self.manual_head(h) || self.spec.logits_scaling != 1.0 {
            return Ok(None);
        }
        #[cfg(feature = "cuda")]
        {
            let (logits, lin_back) = lin_vjp(lin, &h.detach())?;
            // ce_back keeps the logits for the backward, as the cross-entropy node did.
            let (nll, ce_back) = crate::fused::nll_with_backward(&logits, targets)?;
            let back = move |g: &Tensor| -> Result<Tensor> { lin_back(&ce_back(g)?) };
            Ok(Some(h.apply_op2(&nll, Attach::new(Box::new(back)))?))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (lin, targets);
            Ok(None)
        }
    }

    /// The layer's output for x and its pullback (dx; weight gradients go to the scope).
    fn layer_vjp(&self, layer: &Layer, x: &Tensor, ctx: &FwdCtx) -> Result<(Tensor, Back)> {
        let (h1, n1) = norm_vjp(&layer.norm1, x)?;
        let (a, attn) = self.attention_vjp(layer, &h1, ctx)?;
        match self.spec.block {
            Block::Sequential => {
                let rm = self.spec.residual_multiplier;
                let x2 = add(x, &scale(&a, rm)?)?;
                let norm2 = layer
                    .norm2
                    .as_ref()
                    .expect("sequential blocks have two norms");
                let (h2, n2) = norm_vjp(norm2, &x2)?;
                let (m, mlp) = self.mlp_vjp(&layer.mlp, &h2)?;
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
                let (h2, n2) = if shared_norm {
                    (h1.clone(), None)
                } else {
                    let (h2, n2) = norm_vjp(layer.norm2.as_ref().expect("two norms"), x)?;
                    (h2, Some(n2))
                };
                let (m, mlp) = self.mlp_vjp(&layer.mlp, &h2)?;
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
        }
    }

    /// The attention block as [`DecoderModel::attention`] computes it: h (N, H) → (N, H).
    fn attention_vjp(&self, layer: &Layer, h: &Tensor, ctx: &FwdCtx) -> Result<(Tensor, Back)> {
        let s = &self.spec;
        let (n, nh, nkv, d) = (ctx.n, s.heads, s.kv_heads, s.head_dim);
        let split = s.qkv_split();
        enum Proj {
            Separate(Back, Back, Back),
            /// q, k and v weights stacked: one product; the pullback takes the stacked gradient.
            Stacked(Back),
            Fused(Back),
        }
        let ((q, k, v), proj) = match &layer.qkv {
            Qkv::Separate(lq, lk, lv) => match stacked_qkv(lq).filter(|w| w.dtype() == h.dtype()) {
                Some(w) => {
                    let (y, back) = stacked_lin_vjp(&[lq, lk, lv], &w, h)?;
                    // Stacked only where nothing comes between projection and rotation
                    // (`copy_layout`); the pieces below remain for buffers the kernel rejects.
                    if let Some((o, to_y)) = self.stacked_rope_attention(layer, &y, ctx)? {
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
        if !layer.q_norm.is_empty() {
            let (nq, bq) = head_norm_vjp(&q, &layer.q_norm, s.norm.eps)?;
            let (nk, bk) = head_norm_vjp(&k, &layer.k_norm, s.norm.eps)?;
            (q, k) = (nq, nk);
            pre_q.push(bq);
            pre_k.push(bk);
        }
        let (q, rq) = rope_vjp(&q, &ctx.cos, &ctx.sin)?;
        let (k, rk) = rope_vjp(&k, &ctx.cos, &ctx.sin)?;
        let (a, attend) = ctx.plan.attend_vjp(&q, &k, &v, s.attn_scale)?;
        let (o, out) = lin_vjp(&layer.o, &a)?;
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
    /// gradient, one pass each ([`crate::fused::rope_split_stacked`]) instead of strided copies
    /// and a concatenation. Returns the block's output and its pullback to dy; `None` (nothing
    /// done) where that kernel does not apply, and off CUDA.
    fn stacked_rope_attention(
        &self,
        layer: &Layer,
        y: &Tensor,
        ctx: &FwdCtx,
    ) -> Result<Option<(Tensor, Back)>> {
        #[cfg(feature = "cuda")]
        {
            let s = &self.spec;
            let dims = (s.heads, s.kv_heads, s.head_dim);
            let Some((q, k, v)) = crate::fused::rope_split_stacked(y, dims, &ctx.cos, &ctx.sin)?
            else {
                return Ok(None);
            };
            let (a, attend) = ctx.plan.attend_vjp(&q, &k, &v, s.attn_scale)?;
            let (o, out) = lin_vjp(&layer.o, &a)?;
            let (cos, sin) = (ctx.cos.clone(), ctx.sin.clone());
            let back = move |dy: &Tensor| -> Result<Tensor> {
                let (dq, dk, dv) = attend(&out(dy)?)?;
                crate::fused::rope_join_stacked(&dq, &dk, &dv, &cos, &sin)
            };
            Ok(Some((o, Box::new(back))))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (layer, y, ctx);
            Ok(None)
        }
    }

    /// The MLP as [`DecoderModel::mlp_fwd`] computes it (dense MLPs only).
    fn mlp_vjp(&self, mlp: &Mlp, h: &Tensor) -> Result<(Tensor, Back)> {
        match mlp {
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

fn scale(t: &Tensor, s: f64) -> Result<Tensor> {
    Ok(if s != 1.0 { (t * s)? } else { t.clone() })
}

/// a + b: one vectorised kernel for bf16 on CUDA (the residuals and gradient sums of every
/// layer), candle's add elsewhere.
fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    return crate::fused::add(a, b);
    #[cfg(not(feature = "cuda"))]
    Ok((a + b)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(shape: &[usize], seed: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i as f32 + 1.0) * seed).sin()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// What `f` returns, and the parameter gradients it handed over.
    fn with_side_grads(f: impl FnOnce() -> Result<Tensor>) -> (Tensor, Vec<(Tensor, Tensor)>) {
        SIDE_GRADS.with(|s| *s.borrow_mut() = Some(Vec::new()));
        let r = f().unwrap();
        let side = SIDE_GRADS.with(|s| s.borrow_mut().take()).unwrap();
        (r, side)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
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
                    n_tokens: 5,
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
    #[test]
    fn stacked_projection_matches_separate_ones() {
        let lins = [
            Lin {
                w: values(&[6, 4], 0.3),
                b: Some(values(&[6], 0.7)),
            },
            Lin {
                w: values(&[2, 4], 0.5),
                b: None,
            },
            Lin {
                w: values(&[2, 4], 0.9),
                b: Some(values(&[2], 1.1)),
            },
        ];
        let x = values(&[5, 4], 1.3);
        let dy = values(&[5, 10], 1.7);
        let w = Tensor::cat(&[&lins[0].w, &lins[1].w, &lins[2].w], 0).unwrap();
        let refs: Vec<&Lin> = lins.iter().collect();
        let (y, back) = stacked_lin_vjp(&refs, &w, &x).unwrap();
        let (dx, side) = with_side_grads(|| back(&dy));

        let mut col = 0;
        let mut dx_sep: Option<Tensor> = None;
        let mut side_sep = Vec::new();
        for l in &lins {
            let rows = l.w.dim(0).unwrap();
            let (yi, bi) = lin_vjp(l, &x).unwrap();
            assert_eq!(max_diff(&y.narrow(1, col, rows).unwrap(), &yi), 0.0);
            let (dxi, si) = with_side_grads(|| bi(&dy.narrow(1, col, rows)?));
            dx_sep = Some(match dx_sep {
                Some(t) => (t + dxi).unwrap(),
                None => dxi,
            });
            side_sep.extend(si);
            col += rows;
        }
        assert!(max_diff(&dx, &dx_sep.unwrap()) < 1e-5);
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
}
