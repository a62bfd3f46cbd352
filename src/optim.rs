//! AdamW with float32 moments, global-norm gradient clipping and learning-rate schedules,
//! following PyTorch's `AdamW` and transformers' schedules step for step.

use candle_core::{backprop::GradStore, DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::Param;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

struct Slot {
    var: Var,
    decay: bool,
    m: Var,
    v: Var,
}

pub struct AdamW {
    pub config: AdamWConfig,
    slots: Vec<Slot>,
    step: usize,
}

impl AdamW {
    pub fn new(params: &[Param], config: AdamWConfig) -> Result<Self> {
        let slots = params
            .iter()
            .map(|p| {
                let t = p.var.as_tensor();
                Ok(Slot {
                    var: p.var.clone(),
                    decay: p.decay,
                    m: Var::zeros(t.shape(), DType::F32, t.device())?,
                    v: Var::zeros(t.shape(), DType::F32, t.device())?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            config,
            slots,
            step: 0,
        })
    }

    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// One update with learning rate `lr` from the accumulated `grads` (already normalised and
    /// clipped). Parameters without a gradient are left untouched, as PyTorch does.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for s in &self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
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

/// The global L2 norm of all gradients; if it exceeds `max_norm` (> 0) every gradient is scaled
/// by `max_norm / (norm + 1e-6)` as `torch.nn.utils.clip_grad_norm_` does. Returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, params: &[Param], max_norm: f64) -> Result<f64> {
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
    let norm = total.sqrt();
    if !norm.is_finite() {
        return Ok(norm);
    }
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for p in params {
                if let Some(g) = grads.remove(p.var.as_tensor()) {
                    grads.insert(p.var.as_tensor(), (g * coef)?);
                }
            }
        }
    }
    Ok(norm)
}

/// Learning-rate schedules of transformers (`get_scheduler`), as a multiplier of the peak lr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    #[default]
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy)]
pub struct LrSchedule {
    pub kind: Schedule,
    pub peak: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LrSchedule {
    /// The lr of optimizer step `step` (0-based), as transformers' LambdaLR applies it.
    pub fn lr(&self, step: usize) -> f64 {
        let (s, w, t) = (step as f64, self.warmup_steps as f64, self.total_steps as f64);
        if step < self.warmup_steps {
            return self.peak * s / w.max(1.0);
        }
        let f = match self.kind {
            Schedule::Constant => 1.0,
            Schedule::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            Schedule::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        };
        self.peak * f
    }
}

/// Adds `src` into `acc` (gradient accumulation over micro-batches).
pub fn accumulate(acc: &mut Option<GradStore>, src: GradStore, params: &[Param]) -> Result<()> {
    match acc {
        None => *acc = Some(src),
        Some(a) => {
            for p in params {
                if let Some(g) = src.get(p.var.as_tensor()) {
                    let sum = match a.get(p.var.as_tensor()) {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    };
                    a.insert(p.var.as_tensor(), sum);
                }
            }
        }
    }
    Ok(())
}

/// The gradient of each parameter in a store, by name (for tests and checks).
pub fn named_grads(grads: &GradStore, params: &[Param]) -> Result<Vec<(String, Option<Tensor>)>> {
    Ok(params
        .iter()
        .map(|p| (p.name.clone(), grads.get(p.var.as_tensor()).cloned()))
        .collect())
}

/// Fails with the parameter's name if any gradient holds a NaN or infinity.
pub fn check_finite(grads: &GradStore, params: &[Param]) -> Result<()> {
    for p in params {
        if let Some(g) = grads.get(p.var.as_tensor()) {
            let s = g.to_dtype(DType::F32)?.abs()?.sum_all()?.to_scalar::<f32>()?;
            if !s.is_finite() {
                return Err(Error::Training(format!("gradient of {} is not finite", p.name)));
            }
        }
    }
    Ok(())
}
