//! Which examples each optimizer step takes. The order of an epoch is a pure function of (seed,
//! epoch, lengths), so every run with the same data and settings visits the same examples in the
//! same steps, and a resumed run rebuilds the order from the saved (epoch, cursor).

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::config::TrainerConfig;
use crate::data::Example;

/// The order in which examples are visited in `epoch`: a seeded shuffle (seed + epoch), so a
/// run is reproducible, each epoch differs, and a resumed run rebuilds the same order.
pub fn epoch_order(lengths: &[usize], epoch: usize, cfg: &TrainerConfig) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    if cfg.shuffle || cfg.group_by_length {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(epoch as u64));
        idx.shuffle(&mut rng);
    }
    if cfg.group_by_length {
        let window = 50 * cfg.batch_size * cfg.grad_accum;
        for chunk in idx.chunks_mut(window.max(1)) {
            chunk.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        }
    }
    idx
}

/// FNV-1a over every example's token ids and mask, in order.
pub(crate) fn data_hash(examples: &[Example]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    let mut eat = |x: u64| {
        h ^= x;
        h = h.wrapping_mul(0x100000001b3);
    };
    for e in examples {
        eat(e.input_ids.len() as u64);
        for (&id, &m) in e.input_ids.iter().zip(&e.loss_mask) {
            eat(((id as u64) << 1) | m as u64);
        }
    }
    h
}

/// How many examples of `lens` (the lengths of the rest of an epoch's order) each micro-batch of
/// the next optimizer step takes: `batch_size` each, or with a token budget as many as keep the
/// micro-batch's computed positions (rows x longest, which bounds the padded and the padding-free
/// layout alike) within it, at least one.
pub fn step_sizes(lens: &[usize], cfg: &TrainerConfig) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut pos = 0;
    for _ in 0..cfg.grad_accum {
        if pos >= lens.len() {
            break;
        }
        let take = match cfg.max_tokens_per_batch {
            None => cfg.batch_size.min(lens.len() - pos),
            Some(budget) => {
                let cost = |k: usize| k * lens[pos..pos + k].iter().max().copied().unwrap_or(0);
                let mut k = 1;
                while pos + k < lens.len() && cost(k + 1) <= budget {
                    k += 1;
                }
                k
            }
        };
        sizes.push(take);
        pos += take;
    }
    sizes
}

/// Optimizer steps of epoch `epoch` over examples of these lengths.
fn steps_per_epoch(lengths: &[usize], epoch: usize, cfg: &TrainerConfig) -> usize {
    let order = epoch_order(lengths, epoch, cfg);
    let lens: Vec<usize> = order.iter().map(|&i| lengths[i]).collect();
    let mut pos = 0;
    let mut steps = 0;
    while pos < lens.len() {
        pos += step_sizes(&lens[pos..], cfg).iter().sum::<usize>();
        steps += 1;
    }
    steps
}

/// Optimizer steps a run over examples of these lengths takes.
pub fn total_steps(lengths: &[usize], cfg: &TrainerConfig) -> usize {
    if cfg.max_steps > 0 {
        return cfg.max_steps;
    }
    match cfg.max_tokens_per_batch {
        None => cfg.epochs * lengths.len().div_ceil(cfg.batch_size * cfg.grad_accum),
        Some(_) => (0..cfg.epochs)
            .map(|e| steps_per_epoch(lengths, e, cfg))
            .sum(),
    }
}

/// Where the next step's examples start: the epoch and how many examples of its order were
/// taken. Advancing past an epoch's end starts the next epoch's order.
pub(crate) struct StepPlan {
    /// The epoch being read.
    pub epoch: usize,
    /// Examples of this epoch's order already taken.
    pub cursor: usize,
    order: Vec<usize>,
}

impl StepPlan {
    /// The plan at (epoch, cursor).
    pub fn at(lengths: &[usize], epoch: usize, cursor: usize, cfg: &TrainerConfig) -> Self {
        Self {
            epoch,
            cursor,
            order: epoch_order(lengths, epoch, cfg),
        }
    }

    /// The example indices of the next optimizer step, one list per micro-batch.
    pub fn next_step(&mut self, lengths: &[usize], cfg: &TrainerConfig) -> Vec<Vec<usize>> {
        if self.cursor >= self.order.len() {
            *self = Self::at(lengths, self.epoch + 1, 0, cfg);
        }
        let rest: Vec<usize> = self.order[self.cursor..]
            .iter()
            .map(|&i| lengths[i])
            .collect();
        let mut out = Vec::new();
        for take in step_sizes(&rest, cfg) {
            out.push(self.order[self.cursor..self.cursor + take].to_vec());
            self.cursor += take;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan takes every example of an epoch exactly once, in `epoch_order`, and rolls over
    /// into the next epoch's order.
    #[test]
    fn the_plan_visits_each_epoch_in_its_order() {
        let lengths = [5, 9, 3, 7, 2, 8, 4];
        let cfg = TrainerConfig {
            batch_size: 2,
            grad_accum: 2,
            ..Default::default()
        };
        let mut plan = StepPlan::at(&lengths, 0, 0, &cfg);
        let mut seen = Vec::new();
        while plan.epoch == 0 && plan.cursor < lengths.len() {
            for mb in plan.next_step(&lengths, &cfg) {
                assert!(mb.len() <= 2);
                seen.extend(mb);
            }
        }
        assert_eq!(seen, epoch_order(&lengths, 0, &cfg));
        assert_eq!(total_steps(&lengths, &cfg), 2);
        let next: Vec<usize> = plan.next_step(&lengths, &cfg).concat();
        assert_eq!(plan.epoch, 1);
        assert_eq!(next, epoch_order(&lengths, 1, &cfg)[..4].to_vec());
        assert_ne!(
            epoch_order(&lengths, 0, &cfg),
            epoch_order(&lengths, 1, &cfg)
        );
    }
}
