//! AdamW with float32 moments, global-norm gradient clipping and learning-rate schedules,
//! following PyTorch's `AdamW` and transformers' schedules step for step.

use candle_core::{backprop::GradStore, DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::nn::param::Param;

/// AdamW's hyper-parameters, as `torch.optim.AdamW` names them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Peak learning rate (the schedule scales it).
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the second moment's square root.
    pub eps: f64,
    /// Decoupled weight decay (not on biases and norm weights).
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// An error naming the first hyper-parameter out of its range (NaN included): `lr` and
    /// `weight_decay` >= 0, betas in [0, 1), `eps` > 0 (0 writes NaN into every weight without a
    /// gradient at the first step).
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(crate::error::Error::Config(format!("AdamW: {msg}")));
        for (name, v) in [("lr", self.lr), ("weight_decay", self.weight_decay)] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(format!("{name} = {v} must be a number >= 0"));
            }
        }
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return bad(format!("{name} = {v} must be in [0, 1)"));
            }
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return bad(format!("eps = {} must be a positive number", self.eps));
        }
        Ok(())
    }
}

impl Default for AdamWConfig {
    /// TRL's `SFTConfig` defaults (learning rate 2e-5) and PyTorch's AdamW betas and epsilon.
    fn default() -> Self {
        Self {
            lr: 2e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    m: Var,
    v: Var,
    /// Updates this parameter has had: PyTorch counts per parameter and skips parameters
    /// without a gradient (an unrouted expert), so its bias correction starts at its own
    /// first update.
    t: u64,
}

/// PyTorch's AdamW over a fixed list of parameters, with one float32 first and second moment
/// per parameter and a per-parameter update count.
pub struct AdamW {
    /// The hyper-parameters; its `lr` is not read here, as every step is given its own
    /// learning rate (the schedule's).
    pub config: AdamWConfig,
    slots: Vec<Slot>,
    step: usize,
}

impl AdamW {
    /// An optimizer for `params` (their order is kept), with zero moments and no step taken.
    pub fn new(params: &[Param], config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let slots = params
            .iter()
            .map(|p| {
                let t = p.var.as_tensor();
                Ok(Slot {
                    name: p.name.clone(),
                    var: p.var.clone(),
                    decay: p.decay,
                    m: Var::zeros(t.shape(), DType::F32, t.device())?,
                    v: Var::zeros(t.shape(), DType::F32, t.device())?,
                    t: 0,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            config,
            slots,
            step: 0,
        })
    }

    /// The moments as `exp_avg.<param>` / `exp_avg_sq.<param>` and the update count as
    /// `step.<param>` (PyTorch's names), for checkpoints.
    pub fn state_tensors(&self) -> Result<std::collections::BTreeMap<String, Tensor>> {
        let mut m = std::collections::BTreeMap::new();
        for s in &self.slots {
            m.insert(format!("exp_avg.{}", s.name), s.m.as_tensor().clone());
            m.insert(format!("exp_avg_sq.{}", s.name), s.v.as_tensor().clone());
            m.insert(
                format!("step.{}", s.name),
                Tensor::new(&[s.t as f64], &candle_core::Device::Cpu)?,
            );
        }
        Ok(m)
    }

    /// Restores what `state_tensors` wrote and the optimizer step count; every moment must be
    /// present with its parameter's shape, or nothing changes. A checkpoint without per-parameter
    /// update counts (an earlier packsft) counts `step` updates for every parameter.
    ///
    /// The file is mapped, checked whole from its header, then read one moment at a time straight
    /// onto its parameter's device: a rank of a sharded run reads only the moments it owns, and
    /// no device ever holds the whole state a second time (an 8B model's is 64 GB in float32).
    pub fn load_state(&mut self, path: &std::path::Path, step: usize) -> Result<()> {
        use crate::error::Error;
        // SAFETY: mapped read-only; a checkpoint modified while it is read is outside what any
        // loader can guard against.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
            .map_err(|e| Error::model(path, format!("cannot read optimizer state: {e}")))?;
        let shapes: std::collections::HashMap<String, Vec<usize>> = (st.tensors().into_iter())
            .map(|(name, view)| (name, view.shape().to_vec()))
            .collect();
        let mut counts = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            for k in [
                format!("exp_avg.{}", s.name),
                format!("exp_avg_sq.{}", s.name),
            ] {
                match shapes.get(&k) {
                    None => return Err(Error::model(path, format!("missing `{k}`"))),
                    Some(dims) if dims.as_slice() != s.var.dims() => {
                        return Err(Error::model(
                            path,
                            format!("`{k}` has shape {dims:?}, the parameter {:?}", s.var.dims()),
                        ))
                    }
                    Some(_) => {}
                }
            }
            let key = format!("step.{}", s.name);
            counts.push(if shapes.contains_key(&key) {
                let x = st.load(&key, &candle_core::Device::Cpu)?;
                let v = x.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
                match v.as_slice() {
                    [c] if *c >= 0.0 && c.fract() == 0.0 => *c as u64,
                    _ => {
                        return Err(Error::model(
                            path,
                            format!("`{key}` is {v:?}, not one update count"),
                        ))
                    }
                }
            } else {
                step as u64
            });
        }
        for (s, count) in self.slots.iter_mut().zip(counts) {
            let device = s.var.device().clone();
            let read =
                |k: String| -> Result<Tensor> { Ok(st.load(&k, &device)?.to_dtype(DType::F32)?) };
            s.m.set(&read(format!("exp_avg.{}", s.name))?)?;
            s.v.set(&read(format!("exp_avg_sq.{}", s.name))?)?;
            s.t = count;
        }
        self.step = step;
        Ok(())
    }

    /// Clips `grads` to a global norm of `max_norm` (if > 0) and applies one update, as
    /// [`clip_grad_norm`] then [`AdamW::step`] do; on CUDA with float32 weights as one fused
    /// kernel per parameter. Returns the norm before clipping; if it is not finite the weights,
    /// moments and step count are left as they were.
    pub fn clip_and_step(
        &mut self,
        grads: &mut GradStore,
        params: &[Param],
        max_norm: f64,
        lr: f64,
    ) -> Result<f64> {
        let pending = self.enqueue_clip_and_step(grads, params, max_norm, lr, None, &[], None)?;
        self.settle(pending)
    }

    /// [`AdamW::clip_and_step`] without waiting for the device where it can (the fused CUDA
    /// path): the norm is read by [`AdamW::settle`], so the host can go on enqueueing work. A
    /// `guard` (a scalar, e.g. the step's loss) that is not finite stops the update as a
    /// non-finite norm does, also on the device. `copies` (index into `params`, bf16 tensor of
    /// that parameter's shape) receive the updated weights in the same pass where the fused path
    /// runs ([`PendingUpdate::wrote_copies`]). With `sum_squares` (a sharded optimizer: each
    /// rank holds the gradients of the parameters it owns) the clipping norm is that of every
    /// rank's gradients.
    #[allow(clippy::too_many_arguments)]
    pub fn enqueue_clip_and_step(
        &mut self,
        grads: &mut GradStore,
        params: &[Param],
        max_norm: f64,
        lr: f64,
        guard: Option<&Tensor>,
        copies: &[(usize, Tensor)],
        sum_squares: Option<SumSquares<'_>>,
    ) -> Result<PendingUpdate> {
        #[cfg(feature = "cuda")]
        if self.slots.first().is_some_and(|s| s.var.device().is_cuda())
            && self.slots.iter().all(|s| s.var.dtype() == DType::F32)
        {
            return self.fused_step(grads, max_norm, lr, guard, copies, sum_squares);
        }
        let _ = copies;
        let ready = |norm: f64| PendingUpdate {
            norm: PendingNorm::Ready(norm),
            counted: Vec::new(),
            wrote_copies: false,
        };
        if let Some(g) = guard {
            let g = g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            if g.iter().any(|x| !x.is_finite()) {
                return Ok(ready(f64::NAN));
            }
        }
        let norm = clip_grad_norm_summed(grads, params, max_norm, sum_squares)?;
        if norm.is_finite() {
            self.step(grads, lr)?;
        }
        Ok(ready(norm))
    }

    /// The gradient norm of an enqueued update (waiting for the device). If it is not finite
    /// the update changed nothing, and the update counts it advanced are taken back.
    pub fn settle(&mut self, p: PendingUpdate) -> Result<f64> {
        // One variant without the `cuda` feature.
        #[allow(clippy::infallible_destructuring_match)]
        let norm = match p.norm {
            PendingNorm::Ready(n) => n,
            #[cfg(feature = "cuda")]
            PendingNorm::Device(sumsq) => sumsq.read()?[0].sqrt(),
        };
        if !norm.is_finite() && !p.counted.is_empty() {
            self.step -= 1;
            for i in p.counted {
                self.slots[i].t -= 1;
            }
        }
        Ok(norm)
    }

    #[cfg(feature = "cuda")]
    fn fused_step(
        &mut self,
        grads: &GradStore,
        max_norm: f64,
        lr: f64,
        guard: Option<&Tensor>,
        copies: &[(usize, Tensor)],
        sum_squares: Option<SumSquares<'_>>,
    ) -> Result<PendingUpdate> {
        use crate::cuda::{adamw_step, AdamWSlot, AdamWStep};
        let c = self.config;
        let mut copy_of: Vec<Option<&Tensor>> = vec![None; self.slots.len()];
        for (i, t) in copies {
            if let Some(slot) = copy_of.get_mut(*i) {
                *slot = Some(t);
            }
        }
        let mut owned = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(g) = grads.get(s.var.as_tensor()) {
                // A bf16 gradient is read as it is (widened in the kernel).
                let g = match g.dtype() {
                    DType::BF16 | DType::F32 => g.contiguous()?,
                    _ => g.to_dtype(DType::F32)?.contiguous()?,
                };
                owned.push((i, g));
            }
        }
        let slots: Vec<AdamWSlot<'_>> = owned
            .iter()
            .map(|(i, g)| {
                let s = &self.slots[*i];
                let t = s.t as i32 + 1;
                AdamWSlot {
                    param: s.var.as_tensor(),
                    grad: g,
                    m: s.m.as_tensor(),
                    v: s.v.as_tensor(),
                    copy: copy_of[*i],
                    decay: s.decay && c.weight_decay != 0.0,
                    bc1: (1.0 - c.beta1.powi(t)) as f32,
                    bc2: (1.0 - c.beta2.powi(t)) as f32,
                }
            })
            .collect();
        let sumsq = adamw_step(
            &slots,
            &AdamWStep {
                lr: lr as f32,
                beta1: c.beta1 as f32,
                beta2: c.beta2 as f32,
                eps: c.eps as f32,
                weight_decay: c.weight_decay as f32,
                max_grad_norm: max_norm as f32,
            },
            guard,
            sum_squares,
        )?;
        drop(slots);
        // Read later without waiting for work enqueued after this step (the next step).
        let sumsq = crate::train::readback::Readback::enqueue(vec![sumsq])?;
        // Counted now so that a next step enqueued before this one settles uses the right
        // bias corrections; `settle` takes them back if the device skipped the update.
        self.step += 1;
        let counted: Vec<usize> = owned.iter().map(|(i, _)| *i).collect();
        for i in &counted {
            self.slots[*i].t += 1;
        }
        Ok(PendingUpdate {
            norm: PendingNorm::Device(sumsq),
            counted,
            wrote_copies: !copies.is_empty(),
        })
    }

    /// One update with learning rate `lr` from the accumulated `grads` (already normalised and
    /// clipped). Parameters without a gradient are left untouched, as PyTorch does.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            s.t += 1;
            let bc1 = 1.0 - c.beta1.powi(s.t as i32);
            let bc2 = 1.0 - c.beta2.powi(s.t as i32);
            let g = g.to_dtype(DType::F32)?;
            let m = ((s.m.as_tensor() * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((s.v.as_tensor() * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let p = s.var.as_tensor().to_dtype(DType::F32)?;
            // Decoupled decay first, as torch.optim.AdamW: p *= 1 - lr * wd.
            let p = if s.decay && c.weight_decay != 0.0 {
                (p * (1.0 - lr * c.weight_decay))?
            } else {
                p
            };
            let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
            let update = ((&m / bc1)? / denom)?;
            let p = (p - (update * lr)?)?;
            s.var.set(&p.to_dtype(s.var.dtype())?)?;
            s.m.set(&m)?;
            s.v.set(&v)?;
        }
        Ok(())
    }
}

/// An optimizer update that may still be running on the device ([`AdamW::settle`] reads it).
#[must_use = "settle the update to learn its gradient norm and whether it was applied"]
pub struct PendingUpdate {
    norm: PendingNorm,
    /// Slots whose update count the enqueue advanced.
    counted: Vec<usize>,
    wrote_copies: bool,
}

impl PendingUpdate {
    /// Whether the update also writes the `copies` it was given (if it is applied at all; a
    /// skipped update leaves weights and copies as they were, so they still agree).
    pub fn wrote_copies(&self) -> bool {
        self.wrote_copies
    }
}

enum PendingNorm {
    Ready(f64),
    /// The squared norm (a float64 device tensor of one element) once the step is done.
    #[cfg(feature = "cuda")]
    Device(crate::train::readback::Readback),
}

/// The global L2 norm of all gradients; if it exceeds `max_norm` (> 0) every gradient is scaled
/// by `max_norm / (norm + 1e-6)` as `torch.nn.utils.clip_grad_norm_` does. Returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, params: &[Param], max_norm: f64) -> Result<f64> {
    clip_grad_norm_summed(grads, params, max_norm, None)
}

/// Sums a squared gradient norm (a float64 scalar tensor) over the ranks of a sharded
/// optimizer, each of which holds the gradients of the parameters it owns.
pub type SumSquares<'a> = &'a dyn Fn(&Tensor) -> Result<Tensor>;

/// [`clip_grad_norm`] where `grads` may be one rank's share: the squared norm is summed over
/// the ranks by `sum_squares` before anything is clipped.
pub(crate) fn clip_grad_norm_summed(
    grads: &mut GradStore,
    params: &[Param],
    max_norm: f64,
    sum_squares: Option<SumSquares<'_>>,
) -> Result<f64> {
    let mut total = 0f64;
    for p in params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            total += g
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()? as f64;
        }
    }
    if let Some(sum) = sum_squares {
        let t = Tensor::new(&[total], &candle_core::Device::Cpu)?;
        total = sum(&t)?.to_vec1::<f64>()?[0];
    }
    let norm = total.sqrt();
    if !norm.is_finite() {
        return Ok(norm);
    }
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for p in params {
                if let Some(g) = grads.remove(p.var.as_tensor()) {
                    // Scaled in the parameter's dtype: a bf16 gradient of a float32 weight
                    // would round again.
                    let g = g.to_dtype(p.var.dtype())?;
                    grads.insert(p.var.as_tensor(), (g * coef)?);
                }
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::param::{add_grad, add_grads};
    use candle_core::Device;

    fn param(values: &[f32], decay: bool) -> Param {
        Param {
            name: "p".into(),
            var: Var::new(values, &Device::Cpu).unwrap(),
            decay,
        }
    }

    fn grads_for(p: &Param, g: &[f32]) -> GradStore {
        // A store holding exactly `g` for `p`: the gradient of sum(p * g).
        let c = Tensor::new(g, &Device::Cpu).unwrap();
        (p.var.as_tensor() * c)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    }

    #[test]
    fn adamw_matches_torch() {
        // torch 2.5.1: AdamW([p], lr=0.1, weight_decay=0.1), two steps.
        let p = param(&[1.0, -2.0, 3.0], true);
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(std::slice::from_ref(&p), cfg).unwrap();
        let want = [
            [0.889999986f64, -2.079999924, 3.069999933],
            [0.794995368, -2.085833788, 3.106305838],
        ];
        for (g, w) in [[0.1f32, 0.2, -0.3], [0.5, -0.1, 0.0]].iter().zip(want) {
            opt.step(&grads_for(&p, g), 0.1).unwrap();
            let got = p.var.as_tensor().to_vec1::<f32>().unwrap();
            for (a, b) in got.iter().zip(w) {
                assert!((*a as f64 - b).abs() < 1e-6, "{got:?} vs {w:?}");
            }
        }
    }

    #[test]
    fn no_decay_for_excluded_params() {
        let p = param(&[1.0], false);
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..Default::default()
        };
        let mut opt = AdamW::new(std::slice::from_ref(&p), cfg).unwrap();
        opt.step(&grads_for(&p, &[0.0]), 0.1).unwrap();
        assert_eq!(p.var.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0]);
    }

    #[test]
    fn clipping_scales_to_the_max_norm_and_reports_the_norm_before() {
        let p = param(&[0.0, 0.0], true);
        let mut g = grads_for(&p, &[3.0, 4.0]);
        let norm = clip_grad_norm(&mut g, std::slice::from_ref(&p), 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        let clipped = g.get(p.var.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
        assert!(
            (clipped[0] - 0.6).abs() < 1e-6 && (clipped[1] - 0.8).abs() < 1e-6,
            "{clipped:?}"
        );
        // Below the threshold nothing changes.
        let mut g = grads_for(&p, &[0.3, 0.4]);
        clip_grad_norm(&mut g, std::slice::from_ref(&p), 1.0).unwrap();
        assert_eq!(
            g.get(p.var.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            vec![0.3, 0.4]
        );
    }

    /// A bf16 gradient of a float32 weight (bf16 compute on CUDA) gives the same sums,
    /// clipping and update as its exact float32 widening, and nothing is rounded to bf16 on the
    /// way: sums and the clipped gradient come out float32.
    #[test]
    fn bf16_gradients_of_float32_weights_are_widened_not_rounded() {
        let p = param(&[0.5, -1.0, 2.0], true);
        // Exactly representable in bf16; 1 + 2^-9 is not (it needs 9 fraction bits).
        let g16 = Tensor::new(&[1f32, 0.5, -3.0], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let tiny = Tensor::new(&[2f32.powi(-9), 0.0, 0.0], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let sum = add_grad(&g16, &tiny).unwrap();
        assert_eq!(sum.dtype(), DType::F32);
        assert_eq!(
            sum.to_vec1::<f32>().unwrap(),
            vec![1.0 + 2f32.powi(-9), 0.5, -3.0],
            "the sum was rounded to bf16"
        );
        let f32_sum = add_grad(&sum, &sum).unwrap();
        assert_eq!(
            f32_sum.to_vec1::<f32>().unwrap(),
            vec![2.0 + 2f32.powi(-8), 1.0, -6.0]
        );

        let mut acc = grads_for(&p, &[0.0, 0.0, 0.0]);
        acc.insert(p.var.as_tensor(), g16.clone());
        let mut more = grads_for(&p, &[0.0, 0.0, 0.0]);
        more.insert(p.var.as_tensor(), tiny);
        add_grads(&mut acc, more, std::slice::from_ref(&p)).unwrap();
        assert_eq!(
            acc.get(p.var.as_tensor())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            vec![1.0 + 2f32.powi(-9), 0.5, -3.0]
        );

        // Clipping and AdamW on the bf16 gradient against the float32 one.
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.1,
            ..Default::default()
        };
        let run = |g: Tensor| -> (f64, Vec<f32>) {
            let p = param(&[0.5, -1.0, 2.0], true);
            let mut store = grads_for(&p, &[0.0, 0.0, 0.0]);
            store.insert(p.var.as_tensor(), g);
            let mut opt = AdamW::new(std::slice::from_ref(&p), cfg).unwrap();
            let norm = opt
                .clip_and_step(&mut store, std::slice::from_ref(&p), 1.0, 0.1)
                .unwrap();
            let clipped = store.get(p.var.as_tensor()).unwrap();
            assert_eq!(clipped.dtype(), DType::F32, "clipped in bf16");
            (norm, p.var.as_tensor().to_vec1::<f32>().unwrap())
        };
        let (n16, p16) = run(g16.clone());
        let (n32, p32) = run(g16.to_dtype(DType::F32).unwrap());
        assert!((n16 - (1f64 + 0.25 + 9.0).sqrt()).abs() < 1e-6, "{n16}");
        assert_eq!((n16, p16), (n32, p32));
    }
}
