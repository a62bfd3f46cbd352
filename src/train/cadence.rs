//! When the loop logs, evaluates and saves: decided here and nowhere else, as a pure function of
//! the step (burn-train's policies return actions; the loop carries them out).

use super::config::TrainerConfig;

/// What is due after an optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Due {
    /// Evaluate on the eval set.
    pub eval: bool,
    /// Write a checkpoint.
    pub save: bool,
    /// The run's last step.
    pub last: bool,
}

impl Due {
    /// Whether the host must see this step's result before the next step is enqueued: it
    /// evaluates, saves or ends the run, and a checkpoint must hold the weights it describes.
    pub fn is_barrier(self) -> bool {
        self.eval || self.save || self.last
    }
}

/// The schedule of a run's evaluations and checkpoints.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cadence {
    total: usize,
    eval_steps: usize,
    save_steps: usize,
    has_eval: bool,
}

impl Cadence {
    /// The cadence of a run of `total` steps, with or without an eval set.
    pub fn new(cfg: &TrainerConfig, total: usize, has_eval: bool) -> Self {
        Self {
            total,
            eval_steps: cfg.eval_steps,
            save_steps: cfg.save_steps,
            has_eval,
        }
    }

    /// What is due once `step` (1-based) steps are done: evaluation every `eval_steps` and at
    /// the end (with an eval set), a checkpoint every `save_steps` and at the end (when
    /// `save_steps` is set).
    pub fn after(&self, step: usize) -> Due {
        let every = |n: usize| n > 0 && step % n == 0;
        let last = step >= self.total;
        Due {
            eval: self.has_eval && (every(self.eval_steps) || last),
            save: self.save_steps > 0 && (every(self.save_steps) || last),
            last,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cadence(eval_steps: usize, save_steps: usize, has_eval: bool) -> Cadence {
        let cfg = TrainerConfig {
            eval_steps,
            save_steps,
            ..Default::default()
        };
        Cadence::new(&cfg, 10, has_eval)
    }

    #[test]
    fn evaluation_and_saving_fall_on_their_multiples_and_the_last_step() {
        let c = cadence(4, 3, true);
        let evals: Vec<usize> = (1..=10).filter(|&s| c.after(s).eval).collect();
        let saves: Vec<usize> = (1..=10).filter(|&s| c.after(s).save).collect();
        assert_eq!(evals, [4, 8, 10]);
        assert_eq!(saves, [3, 6, 9, 10]);
        assert!(c.after(10).last && !c.after(9).last);
        let barriers: Vec<usize> = (1..=10).filter(|&s| c.after(s).is_barrier()).collect();
        assert_eq!(barriers, [3, 4, 6, 8, 9, 10]);
    }

    #[test]
    fn nothing_is_due_without_an_eval_set_or_save_steps_but_the_end() {
        let c = cadence(4, 0, false);
        assert!((1..=10).all(|s| !c.after(s).eval && !c.after(s).save));
        assert_eq!(
            c.after(10),
            Due {
                eval: false,
                save: false,
                last: true
            }
        );
        let only_end_eval = cadence(0, 0, true);
        let evals: Vec<usize> = (1..=10).filter(|&s| only_end_eval.after(s).eval).collect();
        assert_eq!(evals, [10]);
    }
}
