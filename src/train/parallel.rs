//! Data parallelism: every rank computes the same global step plan, trains on its share of each
//! micro-batch (balanced by cost), and normalises by the step's global loss units, so N ranks
//! compute the optimizer step one process computes with the same global batch (up to the order
//! of the gradient sums). ZeRO 0: gradients summed on every rank, every rank updates every
//! parameter. ZeRO 1: the optimizer state is sharded; each rank updates the parameters it owns
//! (contiguous runs of whole tensors, `dist::owners`) and broadcasts them.

use std::collections::BTreeMap;

use candle_core::{backprop::GradStore, DType, Tensor};

use crate::data::Example;
use crate::dist::{balanced_shares, example_cost, owners, Collective, ZeroStage};
use crate::error::Result;
use crate::model::Param;

/// Gradient elements summed in one collective (64 Mi float32: 256 MiB, NCCL's sweet spot and a
/// bounded extra copy for large models).
const BUCKET_ELEMENTS: usize = 64 << 20;

/// A trainer's ranks: the collective, the stage, and who owns which parameter.
pub struct DataParallel {
    comm: Box<dyn Collective>,
    zero: ZeroStage,
    /// The owning rank of each parameter (index into `Model::params`).
    owners: Vec<usize>,
}

impl DataParallel {
    /// Data parallelism over `comm` for a model with these parameters.
    pub fn new(comm: Box<dyn Collective>, zero: ZeroStage, params: &[Param]) -> Self {
        let sizes: Vec<usize> = params.iter().map(|p| p.var.elem_count()).collect();
        let owners = owners(&sizes, comm.world_size());
        Self { comm, zero, owners }
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    /// Ranks in the run.
    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// The sharding stage.
    pub fn zero(&self) -> ZeroStage {
        self.zero
    }

    /// This rank's examples of each micro-batch of a step every rank planned alike.
    pub(crate) fn share(&self, micro_batches: &[&[Example]]) -> Vec<Vec<Example>> {
        micro_batches
            .iter()
            .map(|mb| {
                let costs: Vec<f64> = mb.iter().map(|e| example_cost(e.len())).collect();
                let shares = balanced_shares(&costs, self.world_size());
                shares[self.rank()].iter().map(|&i| mb[i].clone()).collect()
            })
            .collect()
    }

    /// The sum over ranks of host numbers (step sizes, flags).
    pub(crate) fn sum_host(&self, v: &[f64]) -> Result<Vec<f64>> {
        self.comm.all_reduce_host(v)
    }

    /// Whether any rank says yes (a stop request: every rank must stop at the same step).
    pub(crate) fn any(&self, yes: bool) -> Result<bool> {
        Ok(self.sum_host(&[yes as u8 as f64])?[0] > 0.0)
    }

    /// The sum of a device tensor (a loss) over ranks.
    pub(crate) fn sum(&self, t: &Tensor) -> Result<Tensor> {
        self.comm.all_reduce_sum(t)
    }

    /// The gradients summed over ranks. A parameter gets a gradient if some rank has one (a
    /// rank without contributes zeros), and none where no rank has (an expert no token was
    /// routed to anywhere: AdamW then skips it, as one process would).
    pub(crate) fn sum_grads(
        &self,
        local: Option<GradStore>,
        params: &[Param],
    ) -> Result<Option<GradStore>> {
        let presence: Vec<f64> = params
            .iter()
            .map(|p| {
                local
                    .as_ref()
                    .and_then(|g| g.get(p.var.as_tensor()))
                    .is_some() as u8 as f64
            })
            .collect();
        let anywhere = self.sum_host(&presence)?;
        if anywhere.iter().all(|&x| x == 0.0) {
            return Ok(None);
        }
        let mut out = match local {
            Some(g) => g,
            None => {
                // An empty store: the gradients of a scalar that depends on nothing.
                let z = Tensor::zeros((), DType::F32, params[0].var.device())?;
                z.backward()?
            }
        };
        // Summed in buckets of whole tensors, flattened and joined: one collective a bucket
        // instead of one a parameter (each NCCL call and TCP exchange has a fixed cost).
        let mut bucket: Vec<(&Param, Tensor)> = Vec::new();
        let mut filled = 0;
        for (p, n) in params.iter().zip(&anywhere) {
            if *n == 0.0 {
                continue;
            }
            let t = p.var.as_tensor();
            let g = match out.remove(t) {
                Some(g) => g.to_dtype(DType::F32)?,
                None => t.to_dtype(DType::F32)?.zeros_like()?,
            };
            filled += g.elem_count();
            bucket.push((p, g));
            if filled >= BUCKET_ELEMENTS {
                self.sum_bucket(std::mem::take(&mut bucket), &mut out)?;
                filled = 0;
            }
        }
        self.sum_bucket(bucket, &mut out)?;
        Ok(Some(out))
    }

    /// Sums the gradients of one bucket over ranks as one flat tensor and puts each back.
    fn sum_bucket(&self, bucket: Vec<(&Param, Tensor)>, out: &mut GradStore) -> Result<()> {
        if bucket.is_empty() {
            return Ok(());
        }
        let flat: Vec<Tensor> = bucket
            .iter()
            .map(|(_, g)| g.flatten_all())
            .collect::<candle_core::Result<_>>()?;
        let summed = self.comm.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
        let mut at = 0;
        for (p, g) in bucket {
            let n = g.elem_count();
            out.insert(
                p.var.as_tensor(),
                summed.narrow(0, at, n)?.reshape(g.shape())?,
            );
            at += n;
        }
        Ok(())
    }

    /// The parameters this rank updates: all of them, or under ZeRO 1 its own.
    pub(crate) fn owned(&self, params: &[Param]) -> Vec<Param> {
        params
            .iter()
            .zip(&self.owners)
            .filter(|(_, &o)| self.zero == ZeroStage::Zero0 || o == self.rank())
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// Under ZeRO 1, every parameter from its owner after the owners' updates.
    pub(crate) fn sync_params(&self, params: &[Param]) -> Result<()> {
        if self.zero == ZeroStage::Zero0 {
            return Ok(());
        }
        for (p, &o) in params.iter().zip(&self.owners) {
            let t = self.comm.broadcast(p.var.as_tensor(), o)?;
            if o != self.rank() {
                p.var.set(&t)?;
            }
        }
        Ok(())
    }

    /// The whole optimizer state on rank 0 (the other ranks get an empty map): under ZeRO 1
    /// each parameter's moments and count come from its owner, so a checkpoint holds what one
    /// process would have written and resumes on any number of ranks.
    pub(crate) fn gather_state(
        &self,
        mine: BTreeMap<String, Tensor>,
        params: &[Param],
    ) -> Result<BTreeMap<String, Tensor>> {
        if self.zero == ZeroStage::Zero0 {
            return Ok(if self.rank() == 0 {
                mine
            } else {
                BTreeMap::new()
            });
        }
        let mut all = BTreeMap::new();
        for (p, &o) in params.iter().zip(&self.owners) {
            for (key, like) in [
                (
                    format!("exp_avg.{}", p.name),
                    p.var.as_tensor().zeros_like()?,
                ),
                (
                    format!("exp_avg_sq.{}", p.name),
                    p.var.as_tensor().zeros_like()?,
                ),
                (
                    format!("step.{}", p.name),
                    Tensor::zeros(1, DType::F64, &candle_core::Device::Cpu)?,
                ),
            ] {
                let t = match mine.get(&key) {
                    Some(t) if o == self.rank() => t.clone(),
                    _ => like,
                };
                let t = self.comm.broadcast(&t, o)?;
                if self.rank() == 0 {
                    all.insert(key, t);
                }
            }
        }
        Ok(all)
    }
}
