#![doc = include_str!("README.md")]

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

pub mod env;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod retire;
pub mod tcp;
pub mod threads;
pub mod watchdog;

pub use env::World;

/// The collectives data-parallel training needs, over the ranks of one run. Every rank calls
/// every collective in the same order with tensors of the same shape and dtype; sums are taken
/// in rank order, so every rank gets the same bits.
pub trait Collective: Send {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// How many ranks the run has.
    fn world_size(&self) -> usize;
    /// The element-wise sum of `t` over all ranks, on every rank.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// `root`'s `t`, on every rank.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
    /// [`Collective::all_reduce_sum`] of a tensor this rank made and nothing else reads (a
    /// gradient bucket): a transport may sum in its buffer instead of a new one.
    fn all_reduce_sum_owned(&self, t: Tensor) -> Result<Tensor> {
        self.all_reduce_sum(&t)
    }
    /// The element-wise sum of `t` over all ranks, on `root` (`None` on the other ranks, which
    /// give their `t` up): the sharded optimizer's reduction of a bucket to the rank that owns
    /// it, half the traffic of an all-reduce.
    fn reduce_sum_owned(&self, t: Tensor, root: usize) -> Result<Option<Tensor>> {
        let s = self.all_reduce_sum(&t)?;
        Ok((self.rank() == root).then_some(s))
    }
    /// Makes what the device computes next wait for every collective enqueued so far. The sum
    /// [`Collective::reduce_sum_owned`] hands its root is final only after this (a transport
    /// may run it beside the compute, to overlap the backward); the other collectives' results
    /// are final when they return. A transport whose collectives are done in order with the
    /// compute has nothing to do.
    fn settle(&self) -> Result<()> {
        Ok(())
    }
    /// [`Collective::broadcast`] of a tensor this rank made and nothing else reads (the other
    /// ranks' is the buffer to receive into): a transport may broadcast in its buffer.
    fn broadcast_owned(&self, t: Tensor, root: usize) -> Result<Tensor> {
        self.broadcast(&t, root)
    }
    /// The element-wise sum of host numbers over all ranks (step sizes, flags): on the CPU for
    /// every transport, so a GPU run's host never waits for its device to exchange them.
    fn all_reduce_host(&self, v: &[f64]) -> Result<Vec<f64>> {
        let t = Tensor::from_slice(v, v.len(), &candle_core::Device::Cpu)?;
        Ok(self.all_reduce_sum(&t)?.to_vec1::<f64>()?)
    }
    /// Sets every rank's `tensors` to `root`'s, in place (the same shapes and dtypes on every
    /// rank; each a variable's tensor or a contiguous view of one, such as a weight's rows of a
    /// stacked bf16 copy): the sharded optimizer's gathering of what each owner updated. By
    /// default one [`Collective::broadcast_owned`] of the tensors laid end to end in float32
    /// ([`broadcast_in_place_flat`]); a transport may send each from and into its own buffer.
    fn broadcast_in_place(&self, tensors: &[&Tensor], root: usize) -> Result<()> {
        broadcast_in_place_flat(self, tensors, root)
    }
    /// Waits until every rank has called it.
    fn barrier(&self) -> Result<()> {
        let one = Tensor::zeros(1, DType::F32, &candle_core::Device::Cpu)?;
        self.all_reduce_sum(&one).map(|_| ())
    }
}

/// [`Collective::broadcast_in_place`] through one buffer: `root` lays its tensors end to end in
/// float32 (exact for bf16 and float32 values), the others receive into zeros of that size and
/// write each part back into its tensor's storage.
pub fn broadcast_in_place_flat<C: Collective + ?Sized>(
    comm: &C,
    tensors: &[&Tensor],
    root: usize,
) -> Result<()> {
    let Some(first) = tensors.first() else {
        return Ok(());
    };
    let total: usize = tensors.iter().map(|t| t.elem_count()).sum();
    let flat = if comm.rank() == root {
        let parts = (tensors.iter())
            .map(|t| t.flatten_all()?.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)?
    } else {
        Tensor::zeros(total, DType::F32, first.device())?
    };
    let flat = comm.broadcast_owned(flat, root)?;
    if comm.rank() == root {
        return Ok(());
    }
    let mut at = 0;
    for t in tensors {
        let n = t.elem_count();
        let part = flat
            .narrow(0, at, n)?
            .reshape(t.shape())?
            .to_dtype(t.dtype())?;
        // Into the tensor's own storage (a view's rows of its variable), as NCCL writes it.
        t.slice_set(&part, 0, 0)?;
        at += n;
    }
    Ok(())
}

/// Splits items of the given costs among `ranks` so that the largest load is small: the
/// costliest first, each to the least loaded rank (ties to the lowest rank). A pure function
/// of the costs, so every rank computes the same split; indices keep their order within a
/// share. A rank may get nothing (fewer items than ranks): it still joins every collective.
pub fn balanced_shares(costs: &[f64], ranks: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..costs.len()).collect();
    order.sort_by(|&a, &b| costs[b].total_cmp(&costs[a]).then(a.cmp(&b)));
    let mut load = vec![0f64; ranks];
    let mut shares = vec![Vec::new(); ranks];
    for i in order {
        let r = (0..ranks)
            .min_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b)))
            .expect("at least one rank");
        load[r] += costs[i];
        shares[r].push(i);
    }
    for s in &mut shares {
        s.sort_unstable();
    }
    shares
}

/// The cost of an example of `len` tokens in a step: its tokens, plus attention's quadratic
/// term (a 4,096-token example costs about twice its length in a 1B model's step).
pub fn example_cost(len: usize) -> f64 {
    len as f64 + (len as f64).powi(2) / 4096.0
}

/// Which rank owns each of the parameters of these sizes (in order) under a sharded optimizer:
/// N contiguous runs of whole parameters, each close to 1/N of the elements (a boundary never
/// splits a tensor, so the fused per-tensor update and PyTorch-named state apply unchanged).
pub fn owners(sizes: &[usize], ranks: usize) -> Vec<usize> {
    let total: usize = sizes.iter().sum();
    let mut out = Vec::with_capacity(sizes.len());
    let mut before = 0usize;
    for &s in sizes {
        // The rank whose slice of the flattened space holds this tensor's middle element.
        let mid = before + s / 2;
        let r = (mid * ranks).checked_div(total).unwrap_or(0).min(ranks - 1);
        out.push(r);
        before += s;
    }
    out
}

/// The dtype gradient buckets are summed over ranks in (`dist.reduce_dtype`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReduceDtype {
    /// float32: the sums of one process, up to the order of additions.
    #[default]
    F32,
    /// bf16: half the bytes NCCL moves; each rank's gradient and each partial sum rounded to
    /// bf16.
    Bf16,
}

/// Which data-parallel scheme a run uses (`dist.zero: 0 | 1 | 2` in a recipe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZeroStage {
    /// Every rank holds the whole optimizer state; gradients are all-reduced.
    #[default]
    Zero0,
    /// The optimizer state is sharded: the step's gradients are reduced to each parameter's
    /// owner, which updates it and sends it to the other ranks.
    Zero1,
    /// As `Zero1`, and the gradients are reduced to their owners bucket by bucket during the
    /// backward: a rank keeps only the gradients it owns.
    Zero2,
}

impl serde::Serialize for ZeroStage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_u64(match self {
            ZeroStage::Zero0 => 0,
            ZeroStage::Zero1 => 1,
            ZeroStage::Zero2 => 2,
        })
    }
}

impl<'de> serde::Deserialize<'de> for ZeroStage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        match u64::deserialize(d)? {
            0 => Ok(ZeroStage::Zero0),
            1 => Ok(ZeroStage::Zero1),
            2 => Ok(ZeroStage::Zero2),
            n => Err(serde::de::Error::custom(format!(
                "dist.zero {n}: packsft has ZeRO stages 0, 1 and 2"
            ))),
        }
    }
}

/// An error of a collective: the rank and what failed.
pub(crate) fn comm_err(rank: usize, what: impl std::fmt::Display) -> Error {
    Error::Training(format!("rank {rank}: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_balance_the_cost_and_cover_every_item_once() {
        let costs: Vec<f64> = [900, 10, 10, 10, 450, 440, 20, 30]
            .iter()
            .map(|&x| x as f64)
            .collect();
        let s = balanced_shares(&costs, 2);
        let load = |v: &Vec<usize>| v.iter().map(|&i| costs[i]).sum::<f64>();
        assert_eq!(load(&s[0]) + load(&s[1]), costs.iter().sum::<f64>());
        assert!((load(&s[0]) - load(&s[1])).abs() <= 30.0, "{s:?}");
        let mut all: Vec<usize> = s.concat();
        all.sort();
        assert_eq!(all, (0..8).collect::<Vec<_>>());
        // Fewer items than ranks: some ranks get nothing.
        let s = balanced_shares(&[5.0], 3);
        assert_eq!(s, vec![vec![0], vec![], vec![]]);
    }

    #[test]
    fn owners_are_contiguous_runs_close_to_equal() {
        let sizes = [100, 10, 10, 10, 100, 10, 10, 100, 50];
        for n in 1..=4 {
            let o = owners(&sizes, n);
            assert!(o.windows(2).all(|w| w[0] <= w[1]), "{o:?}");
            assert_eq!(*o.first().unwrap(), 0);
            let per: Vec<usize> = (0..n)
                .map(|r| {
                    sizes
                        .iter()
                        .zip(&o)
                        .filter(|(_, &x)| x == r)
                        .map(|(s, _)| s)
                        .sum()
                })
                .collect();
            let total: usize = sizes.iter().sum();
            assert!(per.iter().all(|&p| p <= total / n + 100), "{n}: {per:?}");
        }
    }
}
