//! The fused CUDA optimizer step (clip + AdamW in one kernel per parameter) against the CPU
//! step it replaces. Needs `--features cuda` and a CUDA device.
#![cfg(feature = "cuda")]

mod common;

use candle_core::Device;
use common::{examples, rel_diff, tiny_config};
use packsft::optim::{AdamWConfig, LrSchedule, Schedule};
use packsft::trainer::{Trainer, TrainerConfig};
use packsft::{CompletionOnlyCollator, DecoderModel, Model};

fn run(dev: &Device) -> (Vec<f64>, Vec<f64>, Vec<candle_core::Tensor>) {
    let model = DecoderModel::new_random(tiny_config(64), 5, dev).unwrap();
    let cfg = TrainerConfig {
        batch_size: 4,
        adamw: AdamWConfig {
            lr: 3e-3,
            weight_decay: 0.1,
            ..Default::default()
        },
        // Small enough that clipping is active on every step.
        max_grad_norm: 0.05,
        progress: false,
        ..Default::default()
    };
    let mut t = Trainer::new(
        model,
        CompletionOnlyCollator::new(true, 0),
        cfg,
        dev.clone(),
    )
    .unwrap();
    let sched = LrSchedule::new(Schedule::Linear, 3e-3, 1, 4);
    let (mut losses, mut norms) = (vec![], vec![]);
    for step in 0..4 {
        let exs = examples(&[9, 14, 5, 20], 64, step as u64);
        let m = t.train_step(step, &exs, &sched).unwrap();
        losses.push(m.loss);
        norms.push(m.grad_norm);
    }
    let params = t
        .model
        .params()
        .iter()
        .map(|p| p.var.as_tensor().to_device(&Device::Cpu).unwrap())
        .collect();
    (losses, norms, params)
}

#[test]
fn fused_adamw_matches_the_cpu_step() {
    let (lc, nc, pc) = run(&Device::Cpu);
    let (lg, ng, pg) = run(&Device::new_cuda(0).expect("a CUDA device"));
    eprintln!("losses cpu {lc:?} gpu {lg:?}; norms cpu {nc:?} gpu {ng:?}");
    assert!(
        nc.iter().all(|&n| n > 0.05),
        "clipping was not exercised: {nc:?}"
    );
    for (a, b) in lc.iter().zip(&lg).chain(nc.iter().zip(&ng)) {
        assert!((a - b).abs() / a.abs() < 1e-4, "{a} vs {b}");
    }
    let worst = pc
        .iter()
        .zip(&pg)
        .map(|(a, b)| rel_diff(b, a))
        .fold(0f64, f64::max);
    eprintln!("worst parameter rel diff {worst:.2e}");
    assert!(worst < 1e-4, "{worst}");
}
