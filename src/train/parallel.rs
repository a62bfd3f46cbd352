//! Data parallelism: every rank computes the same global step plan, trains on its share of each
//! micro-batch (balanced by cost), and normalises by the step's global loss units, so N ranks
//! compute the optimizer step one process computes with the same global batch (up to the order
//! of the gradient sums).
//!
//! - ZeRO 0: the step's gradients are all-reduced; every rank updates every parameter.
//! - ZeRO 1: the optimizer state is sharded. Each parameter has an owner (contiguous runs of
//!   whole tensors, `dist::owners`); after the step's last backward its gradient is reduced to
//!   the owner only, the clipping norm is one scalar sum, each rank updates what it owns and the
//!   owners' new weights go to every rank.
//! - ZeRO 2: as ZeRO 1, but each micro-batch's gradients are reduced to their owners bucket by
//!   bucket while its backward runs (as the hand-written layer backward hands them over, see
//!   [`Zero2Step`]), and a rank keeps only the gradients it owns.
//!
//! Gradients travel in buckets: whole tensors widened to float32 and laid end to end by one
//! kernel (`nn::kernels::flatten_f32`), one collective a bucket, summed in the bucket's own
//! buffer.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{backprop::GradStore, DType, Tensor, TensorId};

use crate::data::Example;
use crate::dist::{balanced_shares, example_cost, owners, Collective, ReduceDtype, ZeroStage};
use crate::error::Result;
use crate::model::Param;
use crate::nn::graph;
use crate::nn::kernels::flatten_f32;
use crate::nn::param::add_grad;

/// Gradient elements summed in one collective after the backward (ZeRO 0 and 1): 64 Mi float32,
/// 256 MiB, NCCL's sweet spot and a bounded extra buffer for large models.
const BUCKET_ELEMENTS: usize = 64 << 20;

/// Gradient elements of one ZeRO 2 bucket, reduced while the backward goes on: 16 Mi float32
/// (64 MiB), so that a rank holds little more than the buckets in flight (an 8B model's layer
/// is about 13 buckets; a larger tensor is a bucket of its own).
const ZERO2_BUCKET_ELEMENTS: usize = 16 << 20;

/// A trainer's ranks: the collective, the stage, and who owns which parameter.
pub struct DataParallel {
    comm: Box<dyn Collective>,
    zero: ZeroStage,
    /// The owning rank of each parameter (index into `Model::params`).
    owners: Vec<usize>,
    /// Each parameter's place among those this rank updates ([`DataParallel::owned`], the
    /// sharded optimizer's slots); `None` for another rank's.
    slots: Vec<Option<usize>>,
    /// ZeRO 2's buckets: runs of parameter indices with one owner, in the order the backward
    /// produces them (the last parameters first).
    buckets: Vec<Vec<usize>>,
    /// What gradient buckets travel in (`dist.reduce_dtype`).
    reduce_dtype: ReduceDtype,
    /// The float32 masters of other ranks' weight matrices are behind their owners' (only their
    /// bf16 copies were gathered, [`DataParallel::sync_copies`]); the same on every rank.
    masters_stale: AtomicBool,
}

impl DataParallel {
    /// Data parallelism over `comm` for a model with these parameters.
    pub fn new(comm: Box<dyn Collective>, zero: ZeroStage, params: &[Param]) -> Self {
        let sizes: Vec<usize> = params.iter().map(|p| p.var.elem_count()).collect();
        let owners = owners(&sizes, comm.world_size());
        let buckets = zero2_buckets(&sizes, &owners, ZERO2_BUCKET_ELEMENTS);
        let (rank, sharded) = (comm.rank(), zero != ZeroStage::Zero0);
        let mut slots = Vec::with_capacity(owners.len());
        let mut held = 0;
        for &o in &owners {
            if !sharded || o == rank {
                slots.push(Some(held));
                held += 1;
            } else {
                slots.push(None);
            }
        }
        Self {
            comm,
            zero,
            owners,
            slots,
            buckets,
            reduce_dtype: ReduceDtype::F32,
            masters_stale: AtomicBool::new(false),
        }
    }

    /// Gradient buckets summed in `dtype`: bf16 halves the bytes each collective moves; the
    /// sums are widened back to float32 for the optimizer.
    pub fn with_reduce_dtype(mut self, dtype: ReduceDtype) -> Self {
        self.reduce_dtype = dtype;
        self
    }

    /// ZeRO 2 buckets of at most `elements` gradient elements (a larger tensor is a bucket of
    /// its own): smaller buckets hold less memory in flight and start reducing earlier in the
    /// backward, larger ones make fewer collectives.
    pub fn with_bucket_elements(mut self, params: &[Param], elements: usize) -> Self {
        let sizes: Vec<usize> = params.iter().map(|p| p.var.elem_count()).collect();
        self.buckets = zero2_buckets(&sizes, &self.owners, elements);
        self
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

    /// Whether each rank updates only the parameters it owns (ZeRO 1 and 2).
    pub(crate) fn sharded(&self) -> bool {
        self.zero != ZeroStage::Zero0
    }

    /// This rank's examples of each micro-batch of a step every rank planned alike (empty where
    /// it has none: it still joins that micro-batch's collectives).
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

    /// The sum of a tensor (a loss, a squared norm) over ranks.
    pub(crate) fn sum(&self, t: &Tensor) -> Result<Tensor> {
        self.comm.all_reduce_sum(t)
    }

    /// For each parameter, how many ranks have a gradient for it (`local` is this rank's).
    fn presence(&self, local: Option<&GradStore>, params: &[Param]) -> Result<Vec<f64>> {
        let mine: Vec<f64> = params
            .iter()
            .map(|p| local.and_then(|g| g.get(p.var.as_tensor())).is_some() as u8 as f64)
            .collect();
        self.sum_host(&mine)
    }

    /// The step's gradients after the last backward: summed over ranks on every rank (ZeRO 0),
    /// or on each parameter's owner only, the other ranks keeping none (ZeRO 1). A parameter
    /// gets a gradient if some rank has one (a rank without contributes zeros), and none where
    /// no rank has (an expert no token was routed to anywhere: AdamW then skips it, as one
    /// process would). `None` when no rank has any gradient.
    pub(crate) fn reduce_grads(
        &self,
        local: Option<GradStore>,
        params: &[Param],
    ) -> Result<Option<GradStore>> {
        let anywhere = self.presence(local.as_ref(), params)?;
        if anywhere.iter().all(|&x| x == 0.0) {
            return Ok(None);
        }
        let mut local = local.map_or_else(empty_store, Ok)?;
        let items = params
            .iter()
            .enumerate()
            .filter(|(i, _)| anywhere[*i] > 0.0)
            .map(|(i, p)| match local.remove(p.var.as_tensor()) {
                Some(g) => Ok((i, g)),
                None => Ok((i, zeros_of(p)?)),
            });
        let mut out = empty_store()?;
        for (i, g) in self.reduce_buckets(items)? {
            out.insert(params[i].var.as_tensor(), g);
        }
        // The optimizer reads the sums next.
        self.comm.settle()?;
        Ok(Some(out))
    }

    /// Sums `items` (parameter index and gradient, in parameter order) over ranks in buckets of
    /// whole tensors of about `BUCKET_ELEMENTS`: to every rank, or under ZeRO 1 and 2 to each
    /// parameter's owner (a bucket never spans two owners). Returns the sums this rank receives;
    /// the items are taken as they come, so a bucket's gradients are freed once it is summed.
    fn reduce_buckets(
        &self,
        items: impl Iterator<Item = Result<(usize, Tensor)>>,
    ) -> Result<Vec<(usize, Tensor)>> {
        let flush = |bucket: Vec<(usize, Tensor)>| {
            let owner = bucket.first().map(|(i, _)| self.owners[*i]);
            self.reduce_bucket(bucket, owner.filter(|_| self.sharded()))
        };
        let mut out = Vec::new();
        let mut bucket: Vec<(usize, Tensor)> = Vec::new();
        let mut filled = 0;
        for item in items {
            let (i, g) = item?;
            let other_owner =
                (bucket.last()).is_some_and(|(j, _)| self.owners[*j] != self.owners[i]);
            if filled >= BUCKET_ELEMENTS || (self.sharded() && other_owner) {
                out.extend(flush(std::mem::take(&mut bucket))?);
                filled = 0;
            }
            filled += g.elem_count();
            bucket.push((i, g));
        }
        out.extend(flush(bucket)?);
        Ok(out)
    }

    /// Sums one bucket over ranks, to every rank (`owner` `None`) or to `owner` only, and
    /// returns each item's sum in its shape (nothing on a rank that is not the owner).
    fn reduce_bucket(
        &self,
        items: Vec<(usize, Tensor)>,
        owner: Option<usize>,
    ) -> Result<Vec<(usize, Tensor)>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let grads: Vec<Tensor> = items
            .iter()
            .map(|(_, g)| g.contiguous())
            .collect::<candle_core::Result<_>>()?;
        let flat = match self.reduce_dtype {
            ReduceDtype::F32 => flatten_f32(&grads.iter().collect::<Vec<_>>())?,
            // Laid end to end in bf16 at once (the weight matrices' gradients are bf16 already
            // on the GPU): one pass, not a float32 bucket and its cast.
            ReduceDtype::Bf16 => {
                let parts = (grads.iter())
                    .map(|g| g.to_dtype(DType::BF16)?.flatten_all())
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)?
            }
        };
        drop(grads);
        let summed = match owner {
            None => Some(self.comm.all_reduce_sum_owned(flat)?),
            Some(o) => self.comm.reduce_sum_owned(flat, o)?,
        };
        let Some(summed) = summed else {
            return Ok(Vec::new());
        };
        if summed.dtype() != DType::F32 {
            // The widening reads the sum: wait for it (a float32 sum is only viewed here).
            self.comm.settle()?;
        }
        let summed = summed.to_dtype(DType::F32)?;
        let mut at = 0;
        let mut out = Vec::with_capacity(items.len());
        for (i, g) in items {
            let n = g.elem_count();
            out.push((i, summed.narrow(0, at, n)?.reshape(g.shape())?));
            at += n;
        }
        Ok(out)
    }

    /// A ZeRO 2 step's gradient reduction, fed by the micro-batches' backward passes.
    pub(crate) fn zero2_step<'a>(&'a self, params: &'a [Param]) -> Zero2Step<'a> {
        let mut bucket_of = vec![0; params.len()];
        for (b, members) in self.buckets.iter().enumerate() {
            for &i in members {
                bucket_of[i] = b;
            }
        }
        Zero2Step {
            dp: self,
            params,
            index: params
                .iter()
                .enumerate()
                .map(|(i, p)| (p.var.as_tensor().id(), i))
                .collect(),
            bucket_of,
            pending: vec![None; params.len()],
            flushed: 0,
            late: vec![None; params.len()],
            owned: vec![None; params.len()],
            present: vec![0.0; params.len()],
        }
    }

    /// Where parameter `i` (of the model's, in order) stands among those this rank updates;
    /// `None` if another rank updates it.
    pub(crate) fn slot_of(&self, i: usize) -> Option<usize> {
        self.slots[i]
    }

    /// The parameters this rank updates: all of them, or under ZeRO 1 and 2 its own.
    pub(crate) fn owned(&self, params: &[Param]) -> Vec<Param> {
        (params.iter().enumerate())
            .filter(|(i, _)| self.slots[*i].is_some())
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// Under ZeRO 1 and 2, every parameter from its owner after the owners' updates: each
    /// owner's parameters in one [`Collective::broadcast_in_place`] (together an all-gather).
    pub(crate) fn sync_params(&self, params: &[Param]) -> Result<()> {
        if !self.sharded() {
            return Ok(());
        }
        self.broadcast_from_owners(|i, out| out.push(params[i].var.as_tensor()))
    }

    /// For each owner in turn, the tensors `pick` names for each of its parameters (by index),
    /// broadcast in place from it in one [`Collective::broadcast_in_place`].
    fn broadcast_from_owners<'a>(&self, pick: impl Fn(usize, &mut Vec<&'a Tensor>)) -> Result<()> {
        for owner in 0..self.world_size() {
            let mut mine: Vec<&Tensor> = Vec::new();
            for i in (0..self.owners.len()).filter(|&i| self.owners[i] == owner) {
                pick(i, &mut mine);
            }
            self.comm.broadcast_in_place(&mine, owner)?;
        }
        Ok(())
    }

    /// Under ZeRO 1 and 2 with bf16 compute copies kept between steps (`copies`: parameter index
    /// and copy, the same on every rank), what the next forward reads, from each owner: the bf16
    /// copies of its weight matrices, half the bytes of their float32 masters, and its other
    /// parameters (norms, biases) whole. The masters of other ranks' matrices are then stale
    /// until [`DataParallel::sync_masters`].
    /// `masters_read`: parameters whose float32 weight the forward reads beside the copy
    /// ([`crate::model::Model::masters_read`]), sent whole as well.
    pub(crate) fn sync_copies(
        &self,
        params: &[Param],
        copies: &[(usize, Tensor)],
        masters_read: &[usize],
    ) -> Result<()> {
        if !self.sharded() {
            return Ok(());
        }
        let mut copy_of: Vec<Option<&Tensor>> = vec![None; params.len()];
        for (i, c) in copies {
            copy_of[*i] = Some(c);
        }
        self.broadcast_from_owners(|i, out| {
            let master = params[i].var.as_tensor();
            match copy_of[i] {
                Some(c) if masters_read.contains(&i) => out.extend([c, master]),
                Some(c) => out.push(c),
                None => out.push(master),
            }
        })?;
        // Alike on every rank (with several ranks, each has matrices another rank updates), so
        // every rank joins `sync_masters`' broadcasts or none does.
        if self.world_size() > 1 && !copies.is_empty() {
            self.masters_stale.store(true, Ordering::SeqCst);
        }
        COPIES_GATHERED.with(|c| c.set(c.get() + 1));
        Ok(())
    }

    /// Every parameter's float32 master from its owner, where [`DataParallel::sync_copies`] left
    /// them stale: before anything reads them (a checkpoint, an evaluation, the end of `train`, a
    /// step that casts its copies anew). Every rank calls it at the same points of the loop.
    pub(crate) fn sync_masters(&self, params: &[Param]) -> Result<()> {
        if !self.masters_stale.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        self.sync_params(params)
    }

    /// Every rank's masters were just set alike (a resume read them all from a checkpoint).
    pub(crate) fn masters_loaded(&self) {
        self.masters_stale.store(false, Ordering::SeqCst);
    }

    /// The whole optimizer state on rank 0 (the other ranks get an empty map): under ZeRO 1
    /// and 2 each parameter's moments and count come from its owner, one tensor at a time, and
    /// rank 0 keeps them on the host, so a checkpoint holds what one process would have written
    /// and resumes on any number of ranks.
    pub(crate) fn gather_state(
        &self,
        mine: BTreeMap<String, Tensor>,
        params: &[Param],
    ) -> Result<BTreeMap<String, Tensor>> {
        if !self.sharded() {
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
                    // To the host at once: rank 0's device holds one gathered tensor at a
                    // time, not the whole state (64 GB for an 8B model's moments).
                    all.insert(key, t.to_device(&candle_core::Device::Cpu)?);
                }
            }
        }
        Ok(all)
    }
}

/// ZeRO 2's reduction of one optimizer step. The backward hands each parameter gradient to
/// [`Zero2Step::push`] as it is made; when a bucket (`DataParallel::buckets`) has all of its
/// gradients, it and every bucket before it still open are reduced to their owners, in bucket
/// order, with zeros where this rank has no gradient yet: every rank reduces the same buckets
/// in the same order whatever its data, so the collectives match. At the end of a micro-batch
/// (also one this rank had no examples for) the buckets still open are reduced. A gradient
/// that arrives after its bucket went (one the graph's own backward returns at the end, such as
/// a final norm's, or a tied embedding's second part) waits for the step's end, where such late
/// gradients are reduced for every parameter any rank has one for. Only the owner keeps a sum.
pub(crate) struct Zero2Step<'a> {
    dp: &'a DataParallel,
    params: &'a [Param],
    index: HashMap<TensorId, usize>,
    bucket_of: Vec<usize>,
    /// This micro-batch's gradients whose bucket is still open.
    pending: Vec<Option<Tensor>>,
    /// Buckets reduced in this micro-batch.
    flushed: usize,
    /// Gradients that came after their bucket was reduced, summed over the step.
    late: Vec<Option<Tensor>>,
    /// The sums over ranks and micro-batches of the parameters this rank owns.
    owned: Vec<Option<Tensor>>,
    /// 1 where this rank had a gradient in some micro-batch.
    present: Vec<f64>,
}

impl Zero2Step<'_> {
    /// Takes the gradient `g` of `p` if `p` is a parameter (`Some(g)` back otherwise), and
    /// reduces every bucket that is complete.
    pub(crate) fn push(&mut self, p: &Tensor, g: Tensor) -> Result<Option<Tensor>> {
        let Some(&i) = self.index.get(&p.id()) else {
            return Ok(Some(g));
        };
        self.push_index(i, g)?;
        Ok(None)
    }

    fn push_index(&mut self, i: usize, g: Tensor) -> Result<()> {
        self.present[i] = 1.0;
        let slot = if self.bucket_of[i] < self.flushed {
            &mut self.late[i]
        } else {
            &mut self.pending[i]
        };
        *slot = Some(match slot.take() {
            Some(prev) => add_grad(&prev, &g)?,
            None => g,
        });
        let b = self.bucket_of[i];
        if b >= self.flushed
            && self.dp.buckets[b]
                .iter()
                .all(|&j| self.pending[j].is_some())
        {
            // The buckets before it go too, in order, whatever they hold: every rank reduces
            // the same buckets in the same order, and what comes for them later is late.
            while self.flushed <= b {
                self.flush_next()?;
            }
        }
        Ok(())
    }

    /// Reduces the next bucket to its owner (zeros where this rank has no gradient).
    fn flush_next(&mut self) -> Result<()> {
        if graph::in_scope() {
            BUCKETS_IN_BACKWARD.with(|c| c.set(c.get() + 1));
        }
        let members = &self.dp.buckets[self.flushed];
        let items = members
            .iter()
            .map(|&i| {
                let g = match self.pending[i].take() {
                    Some(g) => g,
                    None => zeros_of(&self.params[i])?,
                };
                Ok((i, g))
            })
            .collect::<Result<Vec<_>>>()?;
        let owner = self.dp.owners[members[0]];
        let sums = self.dp.reduce_bucket(items, Some(owner))?;
        if sums.iter().any(|(i, _)| self.owned[*i].is_some()) {
            // Accumulating reads the sum: wait for it (the first micro-batch's sums are only
            // kept, and the backward goes on beside their reduction).
            self.dp.comm.settle()?;
        }
        for (i, g) in sums {
            add_into(&mut self.owned[i], g)?;
        }
        self.flushed += 1;
        Ok(())
    }

    /// Ends a micro-batch: the gradients its backward returned through the graph (`None` for
    /// a micro-batch this rank had nothing to compute for), then every bucket still open.
    pub(crate) fn end_micro_batch(&mut self, mut rest: Option<GradStore>) -> Result<()> {
        if let Some(store) = &mut rest {
            for (i, p) in self.params.iter().enumerate() {
                if let Some(g) = store.remove(p.var.as_tensor()) {
                    self.push_index(i, g)?;
                }
            }
        }
        while self.flushed < self.dp.buckets.len() {
            self.flush_next()?;
        }
        self.flushed = 0;
        Ok(())
    }

    /// The step's gradients of the parameters this rank owns, summed over ranks and
    /// micro-batches; as in [`DataParallel::reduce_grads`], none for a parameter no rank has a
    /// gradient for, and `None` when no rank has any.
    pub(crate) fn finish(mut self) -> Result<Option<GradStore>> {
        let dp = self.dp;
        // The sums kept so far are read (or freed) from here on.
        dp.comm.settle()?;
        let mut flags = self.present.clone();
        flags.extend(self.late.iter().map(|g| g.is_some() as u8 as f64));
        let counts = dp.sum_host(&flags)?;
        let (anywhere, late) = counts.split_at(self.params.len());
        if anywhere.iter().all(|&x| x == 0.0) {
            return Ok(None);
        }
        // Late gradients, for every parameter some rank has one for (zeros where this has none).
        let items = (0..self.params.len())
            .filter(|&i| late[i] > 0.0)
            .map(|i| match self.late[i].take() {
                Some(g) => Ok((i, g)),
                None => Ok((i, zeros_of(&self.params[i])?)),
            })
            .collect::<Result<Vec<_>>>()?;
        let sums = dp.reduce_buckets(items.into_iter().map(Ok))?;
        // Every bucket's sum is read from here on (late additions, then the optimizer).
        dp.comm.settle()?;
        for (k, g) in sums {
            add_into(&mut self.owned[k], g)?;
        }
        let mut out = empty_store()?;
        for (i, g) in self.owned.into_iter().enumerate() {
            if let Some(g) = g.filter(|_| anywhere[i] > 0.0) {
                out.insert(self.params[i].var.as_tensor(), g);
            }
        }
        Ok(Some(out))
    }
}

thread_local! {
    /// ZeRO 2 buckets this thread reduced while a backward was still running.
    static BUCKETS_IN_BACKWARD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

thread_local! {
    /// Steps whose weights this thread gathered as bf16 copies.
    static COPIES_GATHERED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many steps' weights this thread gathered as bf16 copies, not float32 masters (for tests
/// that must know that path ran).
#[doc(hidden)]
pub fn copies_gathered() -> usize {
    COPIES_GATHERED.with(|c| c.get())
}

/// How many ZeRO 2 buckets this thread reduced while a backward was still running (for tests
/// that must know the reduction overlapped the backward, not waited for its end).
#[doc(hidden)]
pub fn zero2_buckets_reduced_in_backward() -> usize {
    BUCKETS_IN_BACKWARD.with(|c| c.get())
}

/// ZeRO 2's buckets: runs of parameter indices with one owner and at most `elements` elements
/// (or one larger tensor), in the order the backward produces them (the last parameters first).
fn zero2_buckets(sizes: &[usize], owners: &[usize], elements: usize) -> Vec<Vec<usize>> {
    let mut buckets: Vec<Vec<usize>> = Vec::new();
    let mut filled = 0;
    for i in (0..sizes.len()).rev() {
        let joins = buckets
            .last()
            .is_some_and(|b| owners[b[0]] == owners[i] && filled + sizes[i] <= elements);
        if joins {
            buckets.last_mut().expect("a bucket").push(i);
            filled += sizes[i];
        } else {
            buckets.push(vec![i]);
            filled = sizes[i];
        }
    }
    buckets
}

/// An empty gradient store: the gradients of a scalar that depends on nothing.
fn empty_store() -> Result<GradStore> {
    Ok(Tensor::zeros((), DType::F32, &candle_core::Device::Cpu)?.backward()?)
}

/// A zero float32 gradient of `p`'s shape, on its device: a rank's part of a sum it has no
/// gradient for.
fn zeros_of(p: &Param) -> Result<Tensor> {
    Ok(Tensor::zeros(p.var.shape(), DType::F32, p.var.device())?)
}

/// `acc += g`.
fn add_into(acc: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    *acc = Some(match acc.take() {
        Some(prev) => add_grad(&prev, &g)?,
        None => g,
    });
    Ok(())
}
