//! Learning-rate schedules as transformers' `get_scheduler` makes them, step for step.

use serde::{Deserialize, Serialize};

/// Learning-rate schedules of transformers (`get_scheduler`), as a multiplier of the peak lr,
/// each after a linear warmup from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// The peak lr after warmup (transformers' `constant_with_warmup`).
    Constant,
    /// Linear decay from the peak to 0 at `total_steps` (`linear`).
    #[default]
    Linear,
    /// Half a cosine from the peak to 0 at `total_steps` (`cosine`).
    Cosine,
    /// Cosine down to `min_lr_ratio` x peak (`cosine_with_min_lr`).
    CosineWithMinLr,
    /// Warmup, constant, then a cosine decay over the last `decay_steps` to `min_lr_ratio`
    /// (`warmup_stable_decay`).
    WarmupStableDecay,
}

/// A schedule with its settings: the learning rate of every optimizer step of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// The shape of the schedule.
    pub kind: Schedule,
    /// The learning rate reached at the end of warmup.
    pub peak: f64,
    /// Optimizer steps of the linear warmup from 0 to `peak` (0: start at the peak).
    pub warmup_steps: usize,
    /// Optimizer steps of the whole run; the decaying schedules reach their end here.
    pub total_steps: usize,
    /// The floor as a fraction of `peak` (`cosine_with_min_lr` and warmup-stable-decay; 0 by
    /// default).
    pub min_lr_ratio: f64,
    /// Warmup-stable-decay only.
    pub decay_steps: usize,
}

impl LrSchedule {
    /// A schedule with `min_lr_ratio` and `decay_steps` at 0 (set them for the schedules that
    /// read them).
    pub fn new(kind: Schedule, peak: f64, warmup_steps: usize, total_steps: usize) -> Self {
        Self {
            kind,
            peak,
            warmup_steps,
            total_steps,
            min_lr_ratio: 0.0,
            decay_steps: 0,
        }
    }

    /// The lr of optimizer step `step` (0-based), as transformers' LambdaLR applies it.
    pub fn lr(&self, step: usize) -> f64 {
        let (s, w, t) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < self.warmup_steps {
            return self.peak * s / w.max(1.0);
        }
        let cosine = |progress: f64| 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        let floor = self.min_lr_ratio;
        let f = match self.kind {
            Schedule::Constant => 1.0,
            Schedule::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            Schedule::Cosine => cosine((s - w) / (t - w).max(1.0)).max(0.0),
            Schedule::CosineWithMinLr => {
                (cosine((s - w) / (t - w).max(1.0)) * (1.0 - floor) + floor).max(0.0)
            }
            Schedule::WarmupStableDecay => {
                let stable_end = self
                    .total_steps
                    .saturating_sub(self.decay_steps)
                    .max(self.warmup_steps);
                if step < stable_end {
                    1.0
                } else if step < stable_end + self.decay_steps {
                    let progress = (step - stable_end) as f64 / self.decay_steps as f64;
                    (1.0 - floor) * cosine(progress).max(0.0) + floor
                } else {
                    floor
                }
            }
        };
        self.peak * f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_transformers() {
        // transformers 4.46.3 get_{linear,cosine}_schedule_with_warmup(warmup=3, total=10).
        let lin = [
            0.0,
            0.333333333,
            0.666666667,
            1.0,
            0.857142857,
            0.714285714,
            0.571428571,
            0.428571429,
            0.285714286,
            0.142857143,
            0.0,
        ];
        let cos = [
            0.0,
            0.333333333,
            0.666666667,
            1.0,
            0.950484434,
            0.811744901,
            0.611260467,
            0.388739533,
            0.188255099,
            0.049515566,
            0.0,
        ];
        for (kind, want) in [(Schedule::Linear, lin), (Schedule::Cosine, cos)] {
            let s = LrSchedule::new(kind, 1.0, 3, 10);
            for (i, w) in want.iter().enumerate() {
                assert!(
                    (s.lr(i) - w).abs() < 1e-8,
                    "{kind:?} step {i}: {} vs {w}",
                    s.lr(i)
                );
            }
        }
        let c = LrSchedule::new(Schedule::Constant, 2.0, 2, 5);
        assert_eq!((c.lr(0), c.lr(1), c.lr(2), c.lr(4)), (0.0, 1.0, 2.0, 2.0));
        // transformers 4.46.3 get_cosine_with_min_lr_schedule_with_warmup(3, 10, min_lr_rate=0.1)
        // and get_wsd_schedule(2, num_stable_steps=5, num_decay_steps=3, min_lr_ratio=0.1).
        let min_lr = [
            0.0,
            0.333333333,
            0.666666667,
            1.0,
            0.955435991,
            0.830570411,
            0.65013442,
            0.44986558,
            0.269429589,
            0.144564009,
            0.1,
        ];
        let wsd = [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.775, 0.325, 0.1];
        let mut a = LrSchedule::new(Schedule::CosineWithMinLr, 1.0, 3, 10);
        a.min_lr_ratio = 0.1;
        let mut b = LrSchedule::new(Schedule::WarmupStableDecay, 1.0, 2, 10);
        b.min_lr_ratio = 0.1;
        b.decay_steps = 3;
        for (s, want) in [(a, min_lr), (b, wsd)] {
            for (i, w) in want.iter().enumerate() {
                assert!(
                    (s.lr(i) - w).abs() < 1e-8,
                    "{:?} step {i}: {} vs {w}",
                    s.kind,
                    s.lr(i)
                );
            }
        }
    }
}
