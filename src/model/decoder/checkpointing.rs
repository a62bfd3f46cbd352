//! Gradient checkpointing: a forward/backward that keeps only each layer's input and recomputes
//! the layer in the backward, trading one more forward for the activations of every layer.

use candle_core::{backprop::GradStore, Tensor, Var};

use super::forward::router_aux;
use super::head::frozen_head_nll;
use super::DecoderModel;
use crate::collate::Batch;
use crate::error::{Error, Result};
use crate::model::{LossScale, LossSum};
use crate::nn::kernels::nll_sum;
use crate::nn::ops::weighted_sum;
use crate::nn::param::add_grads;

impl DecoderModel {
    /// Gradient checkpointing: forward keeping only layer inputs (and router outputs), then the
    /// head's and the router loss's backward, then each layer recomputed from its input and
    /// back-propagated with the gradients that reached its outputs, last layer first.
    /// Layers stay autograd graphs here (outside `nn::graph::scope`): a recompute through the
    /// hand-written backward was tried, ran slower with a higher peak on the CPU, and was not
    /// kept; it has not been tried on a GPU.
    pub(super) fn forward_backward_checkpointed(
        &self,
        batch: &Batch,
        scale: LossScale,
    ) -> Result<(LossSum, GradStore)> {
        let ctx = self.ctx(batch)?;
        let mut xs = vec![self.embed_fwd(&ctx)?.detach()];
        let mut routers: Vec<Option<Var>> = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (y, r) = layer.forward(&self.spec, xs.last().unwrap(), &ctx)?;
            xs.push(y.detach());
            routers.push(r.map(|r| Var::from_tensor(&r.detach())).transpose()?);
        }
        let top = Var::from_tensor(xs.last().unwrap())?;
        let h = self.head_rows(top.as_tensor(), Some(batch.target_rows()))?;
        // A frozen head (LoRA) never holds the logits: 16 GB for a 32k-token row of Llama 3.
        let sum = match frozen_head_nll(&self.lm_head, &h, batch.target_ids(), &self.spec)? {
            Some(per_token) => weighted_sum(&per_token, batch.target_weights())?,
            None => nll_sum(
                &self.logits(&h)?,
                batch.target_ids(),
                batch.target_weights(),
            )?,
        };
        let mut objective = (&sum * scale.per_unit)?;
        let aux = match self.spec.router_aux_loss_coef {
            Some(coef) => {
                let rs: Vec<Tensor> = routers
                    .iter()
                    .flatten()
                    .map(|v| v.as_tensor().clone())
                    .collect();
                let aux = router_aux(&self.spec, &rs, &ctx)?
                    .map(|a| a * coef)
                    .transpose()?;
                if let Some(a) = &aux {
                    objective = (objective + (a * scale.aux)?)?;
                }
                aux
            }
            None => None,
        };
        let mut grads = objective.backward()?;
        let mut g_out = grads
            .remove(top.as_tensor())
            .ok_or_else(|| Error::Training("no gradient reached the last hidden state".into()))?;
        for (l, layer) in self.layers.iter().enumerate().rev() {
            let x_in = Var::from_tensor(&xs[l])?;
            let (out, r) = layer.forward(&self.spec, x_in.as_tensor(), &ctx)?;
            let mut obj = (out * &g_out)?.sum_all()?;
            if let (Some(r), Some(rv)) = (r, &routers[l]) {
                if let Some(g) = grads.remove(rv.as_tensor()) {
                    obj = (obj + (r * g)?.sum_all()?)?;
                }
            }
            let mut part = obj.backward()?;
            // candle detaches the gradients of inner nodes but not of a leaf: where the layer's
            // first op on its input is a product with a weight (OLMo 2 attends to x itself),
            // x's gradient `dy W` stays a graph over W, and the next layer's backward would
            // differentiate through it again (doubling W's gradient).
            g_out = (part.remove(x_in.as_tensor()))
                .ok_or_else(|| {
                    Error::Training(format!("no gradient reached the input of layer {l}"))
                })?
                .detach();
            add_grads(&mut grads, part, &self.params)?;
        }
        let e = self.embed_fwd(&ctx)?;
        let part = (e * &g_out)?.sum_all()?.backward()?;
        add_grads(&mut grads, part, &self.params)?;
        Ok((
            LossSum {
                sum,
                n_targets: batch.n_targets(),
                aux,
            },
            grads,
        ))
    }
}
