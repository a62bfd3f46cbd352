//! Hand-written backward passes joined to candle's graph.
//!
//! candle's autograd zero-fills a gradient buffer and adds into it for every edge of the graph,
//! and reaches a weight's gradient through the transpose of the weight (a strided add), then a
//! cast to float32: on the padding-free GPU benchmark those adds and casts took 52 of the
//! step's 117 ms of GPU time (ncu, `benches/gpu/gpu_profile.sh`), more than the matrix
//! products. So a piece of the model (a run of layers, the vocabulary projection, the embedding
//! lookup) may run outside the graph on detached tensors and join it as one node ([`Attach`])
//! whose backward is the piece's pullback; weight gradients go straight to the float32 master
//! weights ([`side_grad`]), collected by the running [`scope`] and merged into the gradients
//! `backward` returns. Outside a scope (evaluation, a caller's own `loss().backward()`,
//! gradient checkpointing's recomputation) pieces stay plain autograd graphs.

use std::cell::{Cell, RefCell};
use std::sync::Mutex;

use candle_core::{backprop::GradStore, CpuStorage, CudaStorage, CustomOp2, Layout, Shape, Tensor};

use super::kernels;
use crate::error::{Error, Result};
use crate::pullback::{to_candle, Pullback};

thread_local! {
    /// Parameter gradients of the hand-written backward passes of the running
    /// forward/backward; `None` outside [`scope`].
    static SIDE_GRADS: RefCell<Option<Vec<(Tensor, Tensor)>>> = const { RefCell::new(None) };
}

/// Runs a forward/backward in which layers may take their hand-written backward, and adds the
/// parameter gradients those produced to the ones `f`'s backward returned.
pub fn scope<L>(f: impl FnOnce() -> Result<(L, GradStore)>) -> Result<(L, GradStore)> {
    // A scope inside another (a model's forward/backward calling another's) keeps its own list.
    let (r, side) = with_side_grads(f);
    let (l, mut grads) = r?;
    for (p, g) in side {
        let g = match grads.remove(&p) {
            Some(other) => crate::nn::param::add_grad(&other, &g)?,
            None => g,
        };
        grads.insert(&p, g);
    }
    Ok((l, grads))
}

/// Runs `f` with a fresh list of handed-over parameter gradients and returns them beside its
/// result (what [`scope`] merges; tests read them directly).
pub fn with_side_grads<T>(f: impl FnOnce() -> Result<T>) -> (Result<T>, Vec<(Tensor, Tensor)>) {
    let outer = SIDE_GRADS.with(|s| s.borrow_mut().replace(Vec::new()));
    let r = f();
    let side = SIDE_GRADS
        .with(|s| std::mem::replace(&mut *s.borrow_mut(), outer))
        .unwrap_or_default();
    (r, side)
}

thread_local! {
    /// Layer backward passes this thread ran by hand.
    static HAND_BACKWARDS: Cell<usize> = const { Cell::new(0) };
    /// Frozen vocabulary heads this thread ran with their gradient made in the forward.
    static FROZEN_HEADS: Cell<usize> = const { Cell::new(0) };
}

type Counter = std::thread::LocalKey<Cell<usize>>;

fn count(c: &'static Counter) {
    c.with(|c| c.set(c.get() + 1));
}

/// How many layer backward passes this thread ran by hand so far (for tests that must know the
/// hand-written path ran, not the autograd fallback).
#[doc(hidden)]
pub fn hand_written_backwards() -> usize {
    HAND_BACKWARDS.with(Cell::get)
}

/// Counts one hand-written layer backward (see [`hand_written_backwards`]).
pub fn count_hand_backward() {
    count(&HAND_BACKWARDS);
}

/// How many frozen vocabulary heads this thread ran with their gradient made in the forward,
/// a chunk of rows at a time (for tests that must know that path ran).
#[doc(hidden)]
pub fn frozen_heads() -> usize {
    FROZEN_HEADS.with(Cell::get)
}

/// Counts one frozen head (see [`frozen_heads`]).
pub fn count_frozen_head() {
    count(&FROZEN_HEADS);
}

/// Whether a [`scope`] is running on this thread.
pub fn in_scope() -> bool {
    SIDE_GRADS.with(|s| s.borrow().is_some())
}

/// Hands the gradient `g` of parameter `p` (a float32 master) to the running [`scope`], in the
/// parameter's dtype.
pub fn side_grad(p: &Tensor, g: Tensor) -> Result<()> {
    push_side_grad(p, g.to_dtype(p.dtype())?)
}

/// Hands `g` over in the dtype it has (see [`hand_weight_grad`]). A tensor that is not a
/// variable (a frozen weight under LoRA) takes no gradient: it is dropped here.
fn push_side_grad(p: &Tensor, g: Tensor) -> Result<()> {
    if !p.is_variable() {
        return Ok(());
    }
    let g = match GRAD_SINK.with(|s| s.take()) {
        None => g,
        Some(sink) => {
            // SAFETY: `with_grad_sink` set the pointer from a `&mut` that outlives the call it
            // wraps, on this thread, and takes it back before returning (also on a panic);
            // it is taken out of the cell while the sink runs, so the sink is never entered
            // twice.
            let r = unsafe { (*sink)(p, g) };
            GRAD_SINK.with(|s| s.set(Some(sink)));
            match r? {
                None => return Ok(()),
                Some(g) => g,
            }
        }
    };
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

/// Where the hand-written backward passes hand parameter gradients while [`with_grad_sink`]
/// runs: a sink that takes a gradient (returns `None`) or gives it back for the scope's list.
pub type GradSink<'a> = dyn FnMut(&Tensor, Tensor) -> Result<Option<Tensor>> + 'a;

type StaticSink = *mut GradSink<'static>;

thread_local! {
    /// The running [`with_grad_sink`]'s sink; `None` outside one.
    static GRAD_SINK: std::cell::Cell<Option<StaticSink>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` (a forward/backward) with the parameter gradients of its hand-written backward
/// passes handed to `sink` as each is made, instead of collected for the end of the scope: a
/// data-parallel step reduces them while the rest of the backward runs (ZeRO 2).
pub fn with_grad_sink<T>(sink: &mut GradSink<'_>, f: impl FnOnce() -> Result<T>) -> Result<T> {
    struct Restore(Option<StaticSink>);
    impl Drop for Restore {
        fn drop(&mut self) {
            GRAD_SINK.with(|s| s.set(self.0));
        }
    }
    // SAFETY: only the lifetime is erased; the pointer is used (by `push_side_grad`) only
    // until `Restore` takes it back when this function returns or unwinds.
    let ptr: StaticSink = unsafe { std::mem::transmute(sink as *mut GradSink<'_>) };
    let _restore = Restore(GRAD_SINK.with(|s| s.replace(Some(ptr))));
    f()
}

/// The graph node of a layer: output `y` (computed outside the graph) for input `x`; its
/// backward is the layer's pullback, which returns x's gradient, or `None` where x is a
/// parameter whose gradient it handed to the scope itself.
pub struct Attach(Mutex<Option<Pullback<Option<Tensor>>>>);

impl Attach {
    /// A node whose pullback returns the input's gradient.
    pub fn new(back: Pullback<Tensor>) -> Self {
        Attach(Mutex::new(Some(Box::new(move |d: &Tensor| {
            back(d).map(Some)
        }))))
    }

    /// A node on a parameter whose pullback hands the parameter's gradient to the scope itself
    /// (and returns `None`).
    pub fn for_param(back: Pullback<Option<Tensor>>) -> Self {
        Attach(Mutex::new(Some(back)))
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
        Ok((kernels::copy_cpu(y, yl)?, yl.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        y: &CudaStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        Ok((kernels::copy_cuda(y, yl)?, yl.shape().clone()))
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

/// Hands the weight gradient dy^T x of `master` to the scope. For bf16 on CUDA it stays the
/// bf16 matrix cuBLAS writes, as PyTorch's autocast makes a float32 weight's gradient (a bf16
/// product, widened afterwards): the gradient's users widen it where they need float32 (the
/// fused optimizer in registers, gradient sums and clipping in `train::optimizer`), and the step keeps no
/// float32 copy of every weight's gradient. Elsewhere, candle's matmul and the master's dtype.
pub fn hand_weight_grad(master: &Tensor, dy: &Tensor, x: &Tensor) -> Result<()> {
    hand_weight_grads(&[(master.clone(), 0, dy.dim(1)?)], dy, x)
}

/// [`hand_weight_grad`] of `alpha` dy^T x: the factor applied inside the product on CUDA (a LoRA
/// B's gradient, `scale` dy^T (x A^T), without a pass to scale it).
pub fn hand_weight_grad_scaled(master: &Tensor, dy: &Tensor, x: &Tensor, alpha: f64) -> Result<()> {
    if let Some(dw) = kernels::weight_grad_scaled(dy, x, alpha)? {
        return push_side_grad(master, dw);
    }
    side_grad(master, (dy.t()?.matmul(x)? * alpha)?)
}

/// [`hand_weight_grad`] for several masters whose rows are stacked in dy's columns, as
/// (master, first row, rows): one product, each master's rows handed over as a view of it.
pub fn hand_weight_grads(
    masters: &[(Tensor, usize, usize)],
    dy: &Tensor,
    x: &Tensor,
) -> Result<()> {
    if let Some(dw) = kernels::weight_grad(dy, x)? {
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
