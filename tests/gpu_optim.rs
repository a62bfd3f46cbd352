//! The fused CUDA optimizer step (clip + AdamW in one kernel per parameter) against the CPU
//! step it replaces. Needs `--features cuda` and a CUDA device.
#![cfg(feature = "cuda")]

mod common;

use candle_core::Device;
use common::{examples, rel_diff, tiny_config};
use packsft::{AdamWConfig, LrSchedule, Schedule};
use packsft::{CompletionOnlyCollator, DecoderModel, Model};
use packsft::{Trainer, TrainerConfig};

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
        CompletionOnlyCollator::padding_free(0),
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

/// `n` values in [-1, 1) that differ with `seed`, the same on every run.
fn pattern(n: usize, seed: u64) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
        .collect()
}

/// Lengths with a tail after the 4-wide loads, one spanning several chunks of a launch.
const SIZES: [usize; 3] = [1027, 3, 40_001];

/// The start of a single fused step on `SIZES`: weights, first and second moments from
/// `pattern`, and zeroed bf16 weight copies.
fn start_state(dev: &Device) -> [Vec<candle_core::Tensor>; 4] {
    use candle_core::{DType, Tensor};
    let t = |v: Vec<f32>| Tensor::from_vec(v.clone(), v.len(), dev).unwrap();
    let of = |f: &dyn Fn(usize) -> Vec<f32>| SIZES.iter().map(|&n| t(f(n))).collect();
    [
        of(&|n| pattern(n, 1)),
        of(&|n| pattern(n, 3)),
        of(&|n| pattern(n, 4).iter().map(|x| x * x).collect()),
        SIZES
            .iter()
            .map(|&n| Tensor::zeros(n, DType::BF16, dev).unwrap())
            .collect(),
    ]
}

/// The hyper-parameters of the single fused steps below: decay on, clipping at 1.
fn step_hyper() -> packsft::internals::fused::AdamWStep {
    packsft::internals::fused::AdamWStep {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        max_grad_norm: 1.0,
    }
}

/// One fused step on buffers whose lengths leave a tail after the 4-wide loads, against
/// PyTorch's AdamW written out on the host; a non-finite guard (the step's loss) leaves
/// everything as it was and reads back as a non-finite norm.
#[test]
fn fused_step_matches_adamw_on_odd_lengths_and_a_bad_loss_changes_nothing() {
    use candle_core::Tensor;
    use packsft::internals::fused::{adamw_step, read_norm, AdamWSlot};
    let dev = Device::new_cuda(0).expect("a CUDA device");
    let h = step_hyper();
    let sizes = SIZES;
    let t = |v: Vec<f32>| Tensor::from_vec(v.clone(), v.len(), &dev).unwrap();
    let [params, ms, vs, copies] = start_state(&dev);
    let grads: Vec<Tensor> = sizes.iter().map(|&n| t(pattern(n, 2))).collect();
    let slots = |_: ()| -> Vec<AdamWSlot<'_>> {
        (0..sizes.len())
            .map(|i| AdamWSlot {
                param: &params[i],
                grad: &grads[i],
                m: &ms[i],
                v: &vs[i],
                copy: (i != 1).then_some(&copies[i]),
                decay: i != 1,
                bc1: 1.0 - 0.9f32.powi(3),
                bc2: 1.0 - 0.999f32.powi(3),
            })
            .collect()
    };
    let host =
        |ts: &[Tensor]| -> Vec<Vec<f32>> { ts.iter().map(|x| x.to_vec1().unwrap()).collect() };
    let before = (host(&params), host(&ms), host(&vs));
    let bad = Tensor::new(&[f64::INFINITY], &dev).unwrap();
    let norm = read_norm(&adamw_step(&slots(()), &h, Some(&bad), None).unwrap()).unwrap();
    assert!(!norm.is_finite(), "{norm}");
    assert_eq!((host(&params), host(&ms), host(&vs)), before);
    let zeros = |t: &Tensor| {
        t.to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|&x| x == 0.0)
    };
    assert!(
        zeros(&copies[0]) && zeros(&copies[2]),
        "a skipped update wrote the copies"
    );

    let good = Tensor::new(&[2.5f64], &dev).unwrap();
    let norm = read_norm(&adamw_step(&slots(()), &h, Some(&good), None).unwrap()).unwrap();
    let g_all: Vec<f32> = sizes.iter().flat_map(|&n| pattern(n, 2)).collect();
    let want_norm = g_all
        .iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt();
    assert!(
        (norm - want_norm).abs() / want_norm < 1e-6,
        "{norm} vs {want_norm}"
    );
    let coef = (1.0 / (want_norm + 1e-6)).min(1.0) as f32;
    let (p1, m1, v1) = (host(&params), host(&ms), host(&vs));
    let mut worst = 0f32;
    for i in 0..sizes.len() {
        let g = pattern(sizes[i], 2);
        for j in 0..sizes[i] {
            let gi = g[j] * coef;
            let m = 0.9 * before.1[i][j] + 0.1 * gi;
            let v = 0.999 * before.2[i][j] + 0.001 * gi * gi;
            let decay = if i != 1 { 1.0 - 1e-2 * 0.1 } else { 1.0 };
            let bc1 = 1.0 - 0.9f32.powi(3);
            let bc2 = 1.0 - 0.999f32.powi(3);
            let p = before.0[i][j] * decay - 1e-2 * ((m / bc1) / (v.sqrt() / bc2.sqrt() + 1e-8));
            for (got, want) in [(p1[i][j], p), (m1[i][j], m), (v1[i][j], v)] {
                worst = worst.max((got - want).abs() / want.abs().max(1e-3));
            }
        }
    }
    // The copies hold bf16 of the new weights, bit for bit as candle casts them.
    for i in [0, 2] {
        let want = params[i]
            .to_dtype(candle_core::DType::BF16)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let got = copies[i].to_dtype(candle_core::DType::F32).unwrap();
        assert_eq!(
            got.to_vec1::<f32>().unwrap(),
            want.to_vec1::<f32>().unwrap()
        );
    }
    eprintln!("fused step vs host AdamW: worst rel diff {worst:.2e}");
    // The device contracts multiply-adds (FMA): a few float32 ulps apart.
    assert!(worst < 1e-4, "{worst}");
}

/// The fused step reading bf16 gradients (the weight matrices' gradients of bf16 compute)
/// gives bit for bit the step of their float32 widening: same norm, weights, moments and
/// copies, with a tail after the wide loads and a gradient spanning several chunks. A bf16
/// gradient 2 bytes off the 8-byte grid takes the one-element path: same values up to the
/// order of the norm's sum.
#[test]
fn fused_step_on_bf16_gradients_matches_their_float32_widening() {
    use candle_core::{DType, Tensor};
    use packsft::internals::fused::{adamw_step, read_norm, AdamWSlot};
    let dev = Device::new_cuda(0).expect("a CUDA device");
    let h = step_hyper();
    let sizes = SIZES;
    let t = |v: Vec<f32>| Tensor::from_vec(v.clone(), v.len(), &dev).unwrap();
    // bf16 gradients; `offset` 1: each a view one element into a larger buffer.
    let grads16 = |offset: usize| -> Vec<Tensor> {
        sizes
            .iter()
            .map(|&n| {
                let g = t(pattern(n + offset, 2)).to_dtype(DType::BF16).unwrap();
                g.narrow(0, offset, n).unwrap()
            })
            .collect()
    };
    // One step from the same start on copies of the state; returns everything it wrote.
    let step = |grads: &[Tensor]| -> (f64, Vec<Vec<f32>>) {
        let [params, ms, vs, copies] = start_state(&dev);
        let slots: Vec<AdamWSlot<'_>> = (0..sizes.len())
            .map(|i| AdamWSlot {
                param: &params[i],
                grad: &grads[i],
                m: &ms[i],
                v: &vs[i],
                copy: Some(&copies[i]),
                decay: i != 1,
                bc1: 1.0 - 0.9f32.powi(2),
                bc2: 1.0 - 0.999f32.powi(2),
            })
            .collect();
        let norm = read_norm(&adamw_step(&slots, &h, None, None).unwrap()).unwrap();
        let mut out = Vec::new();
        for ts in [&params, &ms, &vs, &copies] {
            for x in ts.iter() {
                out.push(x.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap());
            }
        }
        (norm, out)
    };
    let aligned = grads16(0);
    assert!(aligned.iter().all(|g| g.dtype() == DType::BF16));
    let widened: Vec<Tensor> = aligned
        .iter()
        .map(|g| g.to_dtype(DType::F32).unwrap())
        .collect();
    let (n16, s16) = step(&aligned);
    let (n32, s32) = step(&widened);
    let start = step(
        &widened
            .iter()
            .map(|g| g.zeros_like().unwrap())
            .collect::<Vec<_>>(),
    );
    assert!(n16 > 1.0, "clipping not exercised: norm {n16}");
    assert_eq!(n16, n32);
    assert!(
        s16 == s32,
        "bf16 and float32 gradients gave different steps"
    );
    assert!(s16 != start.1, "the step changed nothing");

    let off = grads16(1);
    let (n_off, s_off) = step(&off);
    let want: Vec<Tensor> = off
        .iter()
        .map(|g| g.to_dtype(DType::F32).unwrap())
        .collect();
    let (n_want, s_want) = step(&want);
    assert!(
        (n_off - n_want).abs() / n_want < 1e-12,
        "{n_off} vs {n_want}"
    );
    let worst = s_off
        .iter()
        .flatten()
        .zip(s_want.iter().flatten())
        .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
        .fold(0f32, f32::max);
    assert!(
        worst < 1e-5,
        "unaligned bf16 gradients: worst rel diff {worst:.2e}"
    );
}

/// A data-parallel gradient bucket: bf16 (aligned and one element off the grid) and float32
/// tensors widened and laid end to end in one launch give what casts and a concatenation give.
#[test]
fn flattened_buckets_match_casts_and_a_concatenation() {
    use candle_core::{DType, Tensor};
    use packsft::internals::fused::flatten_f32;
    let dev = Device::new_cuda(0).expect("a CUDA device");
    let t = |v: Vec<f32>| Tensor::from_vec(v.clone(), v.len(), &dev).unwrap();
    let parts = [
        t(pattern(40_003, 1)).to_dtype(DType::BF16).unwrap(),
        t(pattern(17, 2))
            .to_dtype(DType::BF16)
            .unwrap()
            .narrow(0, 1, 16)
            .unwrap(),
        t(pattern(33_000, 3)).reshape((100, 330)).unwrap(),
        t(pattern(5, 4)),
    ];
    let refs: Vec<&Tensor> = parts.iter().collect();
    let got = flatten_f32(&refs).unwrap().to_vec1::<f32>().unwrap();
    let want: Vec<f32> = parts
        .iter()
        .flat_map(|p| {
            p.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect();
    assert_eq!(got.len(), 40_003 + 16 + 33_000 + 5);
    assert!(got == want, "the flattened bucket differs from the casts");
}

/// A sharded optimizer's norm: the squared norm summed over ranks (here: a stand-in sum that
/// quadruples it) is the one the step clips with and reports.
#[test]
fn the_summed_squared_norm_is_the_one_the_step_clips_with() {
    use candle_core::Tensor;
    use packsft::internals::fused::{adamw_step, read_norm, AdamWSlot};
    let dev = Device::new_cuda(0).expect("a CUDA device");
    let h = step_hyper();
    let t = |v: Vec<f32>| Tensor::from_vec(v.clone(), v.len(), &dev).unwrap();
    let run = |sum: Option<packsft::internals::fused::SumSquares<'_>>| {
        let [params, ms, vs, _] = start_state(&dev);
        let grads: Vec<Tensor> = SIZES.iter().map(|&n| t(pattern(n, 7))).collect();
        let slots: Vec<AdamWSlot<'_>> = (0..SIZES.len())
            .map(|i| AdamWSlot {
                param: &params[i],
                grad: &grads[i],
                m: &ms[i],
                v: &vs[i],
                copy: None,
                decay: true,
                bc1: 1.0 - 0.9f32.powi(2),
                bc2: 1.0 - 0.999f32.powi(2),
            })
            .collect();
        let norm = read_norm(&adamw_step(&slots, &h, None, sum).unwrap()).unwrap();
        let p: Vec<Vec<f32>> = params.iter().map(|p| p.to_vec1().unwrap()).collect();
        (norm, p)
    };
    let (plain, p_plain) = run(None);
    let four = |x: &Tensor| -> packsft::Result<Tensor> { Ok((x * 4.0)?) };
    let (summed, p_summed) = run(Some(&four));
    assert!(plain > 1.0, "clipping not exercised: norm {plain}");
    assert!(
        (summed - 2.0 * plain).abs() < 1e-9 * plain,
        "{summed} vs {plain}"
    );
    // Clipped by a norm twice as large: a different update.
    assert!(p_plain != p_summed);
}

/// (loss, gradient norm) of six `Trainer::train` steps of the tiny model on `dev`: lr 3e-3 and
/// clipping at 0.05, so that every step moves the weights and clips.
fn six_steps(dev: &Device, dtype: candle_core::DType, overlap: bool) -> Vec<(f64, f64)> {
    let mut model = DecoderModel::new_random(tiny_config(64), 5, dev).unwrap();
    model.compute.dtype = dtype;
    let cfg = TrainerConfig {
        batch_size: 4,
        max_steps: 6,
        adamw: AdamWConfig {
            lr: 3e-3,
            ..Default::default()
        },
        max_grad_norm: 0.05,
        progress: false,
        overlap_steps: Some(overlap),
        ..Default::default()
    };
    let mut t = Trainer::new(
        model,
        CompletionOnlyCollator::padding_free(0),
        cfg,
        dev.clone(),
    )
    .unwrap();
    let exs = examples(&[9, 14, 5, 20, 7, 11, 3, 16], 64, 3);
    let s = t.train(&exs, None).unwrap();
    s.steps
        .iter()
        .map(|m| (m.loss, m.grad_norm))
        .collect::<Vec<_>>()
}

/// Training with steps overlapped on the GPU (the default there) gives what the sequential
/// loop gives.
#[test]
fn overlapped_gpu_steps_match_sequential_ones() {
    let dev = Device::new_cuda(0).expect("a CUDA device");
    let f32 = candle_core::DType::F32;
    let (a, b) = (six_steps(&dev, f32, false), six_steps(&dev, f32, true));
    eprintln!("sequential {a:?}\noverlapped {b:?}");
    assert_eq!(a.len(), 6);
    for ((la, na), (lb, nb)) in a.iter().zip(&b) {
        // Not bit for bit: the embedding gradient adds repeated tokens' rows with atomics.
        assert!((la - lb).abs() / la.abs() < 1e-5 && (na - nb).abs() / na < 1e-5);
    }
}

/// bf16 training in `Trainer::train`, where the optimizer writes the next step's bf16 weight
/// copies and the model skips its own cast, gives the steps of `train_step` called one at a
/// time, which casts the weights afresh every step.
#[test]
fn optimizer_written_weight_copies_match_a_fresh_cast() {
    let dev = Device::new_cuda(0).expect("a CUDA device");
    let exs = examples(&[9, 14, 5, 20, 7, 11, 3, 16], 64, 3);
    let make = || {
        let mut model = DecoderModel::new_random(tiny_config(64), 5, &dev).unwrap();
        model.compute.dtype = candle_core::DType::BF16;
        let cfg = TrainerConfig {
            batch_size: 4,
            max_steps: 6,
            adamw: AdamWConfig {
                lr: 3e-3,
                ..Default::default()
            },
            schedule: Schedule::Constant,
            progress: false,
            shuffle: false,
            ..Default::default()
        };
        Trainer::new(
            model,
            CompletionOnlyCollator::padding_free(0),
            cfg,
            dev.clone(),
        )
        .unwrap()
    };
    let mut t = make();
    let kept: Vec<f64> = t
        .train(&exs, None)
        .unwrap()
        .steps
        .iter()
        .map(|m| m.loss)
        .collect();
    let mut t = make();
    let sched = LrSchedule::new(Schedule::Constant, 3e-3, 0, 6);
    let fresh: Vec<f64> = (0..6)
        .map(|s| {
            let chunk = &exs[(s % 2) * 4..(s % 2) * 4 + 4];
            t.train_step(s, chunk, &sched).unwrap().loss
        })
        .collect();
    eprintln!("kept copies {kept:?}\nfresh casts {fresh:?}");
    for (a, b) in kept.iter().zip(&fresh) {
        // Not bit for bit: the embedding gradient adds repeated tokens' rows with atomics.
        assert!((a - b).abs() / a.abs() < 1e-4, "{a} vs {b}");
    }
    // The losses moved: the updates (and so the copies) took effect.
    assert!(kept[4] < kept[0], "{kept:?}");
}

/// A device from `packsft::open_device` (what the command line and `packsft bench` use) has
/// cudarc's per-buffer events off, so the trainer reads each step's loss and gradient norm
/// through an event and a copy stream of its own (`streams::Readback`) while the next step is
/// already enqueued; a device opened through candle directly reads on candle's stream. The
/// two give the same steps.
#[test]
fn steps_read_through_the_copy_stream_match_plain_reads() {
    let bf16 = candle_core::DType::BF16;
    let plain = six_steps(&Device::new_cuda(0).expect("a CUDA device"), bf16, true);
    let opened = six_steps(&packsft::open_device("cuda").unwrap(), bf16, true);
    eprintln!("candle's device {plain:?}\ndevice::open {opened:?}");
    assert_eq!(opened.len(), 6);
    for ((la, na), (lb, nb)) in plain.iter().zip(&opened) {
        // Not bit for bit: the embedding gradient adds repeated tokens' rows with atomics.
        assert!((la - lb).abs() / la.abs() < 1e-4 && (na - nb).abs() / na < 1e-4);
    }
    // The updates took effect: the loss fell over the six steps.
    assert!(opened[4].0 < opened[0].0, "{opened:?}");
}
