//! The compute-dtype copies of the weight matrices (bf16 on the GPU): made once per
//! forward/backward as variables of their own, or (bf16) kept between steps, written by the
//! optimizer's update pass on CUDA; their gradients are folded back into the float32 masters.

use candle_core::{backprop::GradStore, DType, Tensor, Var};

use super::parts::{CopyVars, Member, Qkv, COMPUTE_WEIGHTS, STACKED_QKV};
use super::DecoderModel;
use crate::error::Result;
use crate::model::LossSum;
use crate::nn::kernels;

impl DecoderModel {
    /// Runs a forward/backward with each float32 weight matrix cast once to the compute dtype
    /// as a variable of its own, and folds those copies' gradients into the master weights'.
    /// Same values as casting inside the graph, without the cast node's backward: autograd
    /// would otherwise zero-fill and accumulate a gradient buffer for the cast and the master
    /// weight of every matrix, a float32 copy of the whole model per step.
    pub(super) fn with_compute_weights(
        &self,
        f: impl FnOnce() -> Result<(LossSum, GradStore)>,
    ) -> Result<(LossSum, GradStore)> {
        let copies = self.compute_copies_now()?;
        let weights: Vec<_> = copies
            .views()?
            .into_iter()
            .map(|(i, c)| (self.params[i].var.id(), c))
            .collect();
        let stacked: Vec<_> = copies
            .0
            .iter()
            .filter(|(_, members)| members.len() > 1)
            .map(|(var, members)| {
                (
                    self.params[members[0].param].var.id(),
                    var.as_tensor().clone(),
                )
            })
            .collect();
        COMPUTE_WEIGHTS.with(|m| {
            let mut m = m.borrow_mut();
            m.clear();
            m.extend(weights);
        });
        STACKED_QKV.with(|m| {
            let mut m = m.borrow_mut();
            m.clear();
            m.extend(stacked);
        });
        let r = f();
        COMPUTE_WEIGHTS.with(|m| m.borrow_mut().clear());
        STACKED_QKV.with(|m| m.borrow_mut().clear());
        let (l, mut grads) = r?;
        for (var, members) in &copies.0 {
            let Some(g) = grads.remove(var.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?;
            for m in members {
                let master = self.params[m.param].var.as_tensor();
                let gm = CopyVars::rows_of(&g, m)?;
                let gm = match grads.remove(master) {
                    Some(other) => crate::nn::param::add_grad(&other, &gm)?,
                    None => gm,
                };
                grads.insert(master, gm);
            }
        }
        Ok((l, grads))
    }

    /// Indices (into `params`) of the float32 weight matrices, which compute through copies.
    pub(super) fn copied_params(&self) -> Vec<usize> {
        self.params
            .iter()
            .enumerate()
            .filter(|(_, p)| p.var.rank() == 2 && p.var.dtype() == DType::F32)
            .map(|(i, _)| i)
            .collect()
    }

    /// Which float32 weight matrices share a copy variable: a layer's separate q, k and v
    /// (stacked, one matrix product for the three) where nothing comes between projection and a
    /// whole-head rotation (no q/k clipping or norms, no partial rotary: the hand-written layer
    /// rotates them straight out of the stacked product), every other matrix alone.
    pub(super) fn copy_layout(&self) -> Vec<Vec<usize>> {
        let s = &self.spec;
        let plain_rope = s.clip_qkv.is_none() && s.rope.rotary_dim == s.head_dim;
        let idx = self.copied_params();
        let index: std::collections::HashMap<candle_core::TensorId, usize> =
            idx.iter().map(|&i| (self.params[i].var.id(), i)).collect();
        let mut grouped = std::collections::HashSet::new();
        let mut layout = Vec::new();
        for layer in &self.layers {
            if let (Qkv::Separate(q, k, v), true) =
                (&layer.qkv, plain_rope && layer.q_norm.is_empty())
            {
                let ids: Option<Vec<usize>> = [q, k, v]
                    .iter()
                    .map(|l| index.get(&l.w.id()).copied())
                    .collect();
                let Some(ids) = ids else { continue };
                let cols = |i: usize| self.params[i].var.dims().get(1).copied();
                if ids.iter().all(|&i| cols(i) == cols(ids[0])) {
                    grouped.extend(ids.iter().copied());
                    layout.push(ids);
                }
            }
        }
        layout.extend(
            idx.into_iter()
                .filter(|i| !grouped.contains(i))
                .map(|i| vec![i]),
        );
        layout
    }

    /// The bf16 copies kept between steps (allocated on first use), on any device; `None` where
    /// the model casts per step instead (other dtypes, gradient checkpointing). On CUDA the
    /// optimizer's fused update writes them; elsewhere they are cast anew when stale, as the
    /// per-step copies were, and a sharded optimizer gathers them from their owners.
    pub(super) fn kept_copies(&self) -> Result<Option<CopyVars>> {
        if self.compute.dtype != DType::BF16 || self.compute.gradient_checkpointing {
            return Ok(None);
        }
        let mut kept = self.weight_copies.lock().unwrap();
        if kept.is_none() {
            let mut vars = Vec::new();
            for ids in self.copy_layout() {
                let mut members = Vec::with_capacity(ids.len());
                let mut row = 0;
                for &i in &ids {
                    let rows = self.params[i].var.dim(0)?;
                    members.push(Member {
                        param: i,
                        row,
                        rows,
                    });
                    row += rows;
                }
                let cols = self.params[ids[0]].var.dim(1)?;
                vars.push((Var::zeros((row, cols), DType::BF16, &self.device)?, members));
            }
            *kept = Some(CopyVars(vars));
            self.copies_fresh
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(kept.clone())
    }

    /// The compute-dtype copies of every float32 weight matrix, up to date.
    pub(super) fn compute_copies_now(&self) -> Result<CopyVars> {
        if let Some(kept) = self.kept_copies()? {
            if !self.copies_fresh.load(std::sync::atomic::Ordering::SeqCst) {
                let views = kept.views()?;
                let pairs: Vec<(&Tensor, &Tensor)> = views
                    .iter()
                    .map(|(i, c)| (self.params[*i].var.as_tensor(), c))
                    .collect();
                kernels::cast_bf16_into(&pairs)?;
            }
            return Ok(kept);
        }
        // Cast per step, one variable a matrix.
        let vars = self
            .copied_params()
            .into_iter()
            .map(|i| {
                let t = self.params[i].var.as_tensor();
                let c = Var::from_tensor(&t.to_dtype(self.compute.dtype)?)?;
                let rows = t.dim(0)?;
                Ok((
                    c,
                    vec![Member {
                        param: i,
                        row: 0,
                        rows,
                    }],
                ))
            })
            .collect::<Result<_>>()?;
        Ok(CopyVars(vars))
    }
}
