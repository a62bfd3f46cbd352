//! Data parallelism on the CPU: ranks as threads (`internals::dist::threads`) must compute the
//! optimizer steps one process computes with the same global batch, under ZeRO 0, 1 and 2,
//! for 2, 3 and 4 ranks, padded and padding-free, and with LoRA adapters on a frozen base; a
//! sharded run's checkpoint resumes on another number of ranks.

mod common;

use std::path::Path;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use common::{examples, max_abs_diff, tiny_config, tiny_model};
use packsft::internals::dist::threads::{group, ThreadComm};
use packsft::{
    AdamWConfig, Collective, CompletionOnlyCollator, DataParallel, DecoderModel, LoraConfig,
    LoraSetup, Model, ReduceDtype, Schedule, Targets, Trainer, TrainerConfig, ZeroStage,
};

const BATCH: usize = 12;

fn cfg(batch_size: usize, out: Option<&Path>) -> TrainerConfig {
    TrainerConfig {
        batch_size,
        grad_accum: 2,
        max_steps: 4,
        adamw: AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.01,
            ..Default::default()
        },
        schedule: Schedule::Cosine,
        warmup_steps: 1,
        max_grad_norm: 0.5,
        save_steps: 2,
        output_dir: out.map(Path::to_path_buf),
        progress: false,
        ..Default::default()
    }
}

fn data() -> Vec<packsft::Example> {
    examples(
        &[
            5, 9, 14, 3, 22, 7, 11, 6, 2, 17, 8, 4, 13, 10, 19, 5, 12, 9, 21, 6, 3, 15, 7, 11,
        ],
        64,
        21,
    )
    .into_iter()
    .cycle()
    .take(4 * 2 * BATCH)
    .collect()
}

fn collator(padding_free: bool) -> CompletionOnlyCollator {
    if padding_free {
        CompletionOnlyCollator::padding_free(0)
    } else {
        CompletionOnlyCollator::padded(0)
    }
}

/// The tiny model with new LoRA adapters (r 4, every linear layer) on its frozen base; the
/// adapters' B starts non-zero (`gaussian`-like seeding is not PEFT's default, but a zero B
/// would leave A without a gradient in the first step).
fn lora_model() -> DecoderModel {
    let setup = LoraSetup {
        config: LoraConfig {
            r: 4,
            alpha: 8.0,
            targets: Targets::AllLinear,
            seed: 5,
            ..Default::default()
        },
        frozen_dtype: DType::F32,
    };
    DecoderModel::new_random_with_lora(tiny_config(64), 3, &Device::Cpu, &setup).unwrap()
}

/// (per-step losses, final parameters) of one process with the global batch.
fn single(padding_free: bool) -> (Vec<f64>, Vec<Tensor>) {
    single_of(tiny_model(3), padding_free)
}

/// [`single`] for `model`.
fn single_of(model: DecoderModel, padding_free: bool) -> (Vec<f64>, Vec<Tensor>) {
    let mut t = Trainer::new(model, collator(padding_free), cfg(BATCH, None), Device::Cpu).unwrap();
    let s = t.train(&data(), None).unwrap();
    (
        s.steps.iter().map(|m| m.loss).collect(),
        params_of(&t.model),
    )
}

/// The same with `n` ranks as threads, each with `BATCH / n` examples a micro-batch.
fn parallel(n: usize, zero: ZeroStage, padding_free: bool) -> Vec<(Vec<f64>, Vec<Tensor>)> {
    parallel_with(n, zero, padding_free, ReduceDtype::F32)
}

/// [`parallel`] with gradients summed in `reduce`.
fn parallel_with(
    n: usize,
    zero: ZeroStage,
    padding_free: bool,
    reduce: ReduceDtype,
) -> Vec<(Vec<f64>, Vec<Tensor>)> {
    parallel_of(|| tiny_model(3), n, zero, padding_free, reduce)
}

/// [`parallel_with`] for the models `make` builds (one a rank, all the same).
fn parallel_of(
    make: fn() -> DecoderModel,
    n: usize,
    zero: ZeroStage,
    padding_free: bool,
    reduce: ReduceDtype,
) -> Vec<(Vec<f64>, Vec<Tensor>)> {
    on_ranks(n, move |c| {
        let model = make();
        // Buckets of about one weight matrix: several reduced during each backward.
        let dp = DataParallel::new(Box::new(c), zero, model.params())
            .with_bucket_elements(model.params(), 4096)
            .with_reduce_dtype(reduce);
        let config = cfg(BATCH / n, None);
        let mut t = Trainer::new(model, collator(padding_free), config, Device::Cpu).unwrap();
        t.set_data_parallel(dp).unwrap();
        let before = packsft::internals::parallel::zero2_buckets_reduced_in_backward();
        let gathered = packsft::internals::parallel::copies_gathered();
        let s = t.train(&data(), None).unwrap();
        let during = packsft::internals::parallel::zero2_buckets_reduced_in_backward();
        // Sharded bf16 runs gather the owners' bf16 copies at every step; the others none.
        let gathered = packsft::internals::parallel::copies_gathered() - gathered;
        let bf16_sharded = t.model.compute.dtype == DType::BF16 && zero != ZeroStage::Zero0;
        assert_eq!(gathered, if bf16_sharded { s.steps.len() } else { 0 });
        // ZeRO 2 reduces buckets while the backward runs; the others after it.
        assert_eq!(
            during > before,
            zero == ZeroStage::Zero2,
            "{zero:?}: {} buckets reduced during backward passes",
            during - before
        );
        (
            s.steps.iter().map(|m| m.loss).collect(),
            params_of(&t.model),
        )
    })
}

/// Copies of `model`'s parameters, in order.
fn params_of(model: &DecoderModel) -> Vec<Tensor> {
    (model.params().iter())
        .map(|p| p.var.as_tensor().copy().unwrap())
        .collect()
}

/// `f` run on `n` ranks, each a thread with its end of one in-process group; the results in
/// rank order.
fn on_ranks<T: Send + 'static>(
    n: usize,
    f: impl Fn(ThreadComm) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = std::sync::Arc::new(f);
    let handles: Vec<_> = group(n, Duration::from_secs(60))
        .into_iter()
        .map(|c| {
            let f = f.clone();
            std::thread::spawn(move || f(c))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn assert_close(label: &str, a: &(Vec<f64>, Vec<Tensor>), b: &(Vec<f64>, Vec<Tensor>)) {
    assert_eq!(a.0.len(), b.0.len(), "{label}: steps");
    for (x, y) in a.0.iter().zip(&b.0) {
        assert!((x - y).abs() / y.abs() < 1e-5, "{label}: loss {x} vs {y}");
    }
    for (i, (x, y)) in a.1.iter().zip(&b.1).enumerate() {
        let d = max_abs_diff(x, y);
        assert!(d < 2e-6, "{label}: parameter {i} differs by {d:e}");
    }
}

#[test]
fn n_ranks_compute_the_steps_of_one_process() {
    for padding_free in [true, false] {
        let one = single(padding_free);
        for zero in [ZeroStage::Zero0, ZeroStage::Zero1, ZeroStage::Zero2] {
            for n in [2, 3, 4] {
                let ranks = parallel(n, zero, padding_free);
                for (r, got) in ranks.iter().enumerate() {
                    let label = format!("pf={padding_free} {zero:?} n={n} rank {r}");
                    assert_close(&label, got, &one);
                    // Every rank holds the same bits.
                    assert_eq!(
                        got.1
                            .iter()
                            .zip(&ranks[0].1)
                            .map(|(a, b)| max_abs_diff(a, b))
                            .fold(0.0, f64::max),
                        0.0,
                        "{label}: ranks disagree"
                    );
                }
            }
        }
    }
}

/// LoRA composes with data parallelism: only the adapters are parameters (the frozen base is
/// neither reduced nor sharded), and N ranks train them as one process does, under every stage.
#[test]
fn lora_adapters_train_data_parallel_as_one_process() {
    let one = single_of(lora_model(), true);
    let model = lora_model();
    let names: Vec<&str> = model.params().iter().map(|p| p.name.as_str()).collect();
    assert!(
        !model.frozen_tensors().is_empty() && names.iter().all(|n| n.contains("lora_")),
        "adapters only: {names:?}"
    );
    for zero in [ZeroStage::Zero0, ZeroStage::Zero1, ZeroStage::Zero2] {
        for n in [2, 3] {
            let ranks = parallel_of(lora_model, n, zero, true, ReduceDtype::F32);
            for (r, got) in ranks.iter().enumerate() {
                assert_close(&format!("LoRA {zero:?} n={n} rank {r}"), got, &one);
            }
        }
    }
    // The adapters moved: the comparison above is not between untrained copies.
    let start = params_of(&lora_model());
    let moved = (one.1.iter().zip(&start))
        .map(|(a, b)| max_abs_diff(a, b))
        .fold(0.0, f64::max);
    assert!(moved > 1e-4, "adapters moved by {moved:e}");
}

/// `dist.reduce_dtype: bf16`: gradient buckets summed in bf16 (half the bytes) give one
/// process's steps up to bf16's rounding of the gradients, not bit for bit; every rank still
/// holds the same bits.
#[test]
fn bf16_reduction_tracks_the_float32_steps() {
    let one = single(true);
    for zero in [ZeroStage::Zero0, ZeroStage::Zero1, ZeroStage::Zero2] {
        let ranks = parallel_with(2, zero, true, ReduceDtype::Bf16);
        let worst = (ranks[0].1.iter().zip(&one.1))
            .map(|(a, b)| max_abs_diff(a, b))
            .fold(0.0, f64::max);
        // The distance README quotes (`-- --nocapture` shows it).
        eprintln!("{zero:?}: largest parameter difference from one process {worst:.1e}");
        // Rounded sums: not float32's bits. Four AdamW steps at lr 1e-2 move a parameter by at
        // most about 4e-2; bf16's relative rounding (2^-9) of the gradients moves the update
        // direction by far less than that.
        assert!(worst > 0.0 && worst < 4e-3, "{zero:?}: {worst:e}");
        for (x, y) in ranks[0].0.iter().zip(&one.0) {
            assert!((x - y).abs() / y < 1e-2, "{zero:?}: loss {x} vs {y}");
        }
        let spread = (ranks[1].1.iter().zip(&ranks[0].1))
            .map(|(a, b)| max_abs_diff(a, b))
            .fold(0.0, f64::max);
        assert_eq!(spread, 0.0, "{zero:?}: ranks disagree");
    }
}

/// Under ZeRO 1 and 2 with bf16 compute (copies kept between steps), every rank takes the bf16
/// copies of other ranks' weight matrices from their owners, not the float32 masters, and those
/// masters catch up before a checkpoint and at the end: 2 and 3 ranks track one bf16 process,
/// every rank ends with the same weights, and the last checkpoint holds them.
#[test]
fn bf16_copies_gathered_from_their_owners_track_one_process() {
    fn bf16() -> DecoderModel {
        let mut m = tiny_model(3);
        m.compute.dtype = DType::BF16;
        m
    }
    let one = single_of(bf16(), true);
    for zero in [ZeroStage::Zero1, ZeroStage::Zero2] {
        for n in [2, 3] {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().to_path_buf();
            let ranks = on_ranks(n, move |c| {
                let model = bf16();
                let rank0 = c.rank() == 0;
                let dp = DataParallel::new(Box::new(c), zero, model.params());
                let config = cfg(BATCH / n, rank0.then_some(out.as_path()));
                let mut t = Trainer::new(model, collator(true), config, Device::Cpu).unwrap();
                t.set_data_parallel(dp).unwrap();
                let before = packsft::internals::parallel::copies_gathered();
                let s = t.train(&data(), None).unwrap();
                let gathered = packsft::internals::parallel::copies_gathered() - before;
                assert_eq!(
                    gathered,
                    s.steps.len(),
                    "{zero:?} n={n}: steps gathered as copies"
                );
                (
                    s.steps.iter().map(|m| m.loss).collect::<Vec<f64>>(),
                    params_of(&t.model),
                )
            });
            let label = format!("{zero:?} n={n}");
            for (r, rank) in ranks.iter().enumerate() {
                for (a, b) in rank.1.iter().zip(&ranks[0].1) {
                    assert_eq!(
                        max_abs_diff(a, b),
                        0.0,
                        "{label}: rank {r} differs from rank 0"
                    );
                }
            }
            // bf16 products of each rank's share, summed in float32, against one process's
            // products of the whole batch: rounding apart, the same steps (gathering the float32
            // masters instead gives 2.5e-3 and 3.4e-3 here; the copies without the embedding
            // table's master, which the lookup reads, gave 1.6e-2).
            let worst = (ranks[0].1.iter().zip(&one.1))
                .map(|(a, b)| common::rel_diff(a, b))
                .fold(0.0, f64::max);
            eprintln!(
                "{label}: largest relative parameter difference from one process {worst:.1e}"
            );
            assert!(worst < 6e-3, "{label}: {worst:e}");
            for (x, y) in ranks[0].0.iter().zip(&one.0) {
                assert!((x - y).abs() / y < 1e-2, "{label}: loss {x} vs {y}");
            }
            // The checkpoint after the last step holds every owner's float32 weights.
            let saved = candle_core::safetensors::load(
                dir.path().join("checkpoint-4/model.safetensors"),
                &Device::Cpu,
            )
            .unwrap();
            let model = bf16();
            for (p, want) in model.params().iter().zip(&ranks[0].1) {
                let got = saved.get(&p.name).unwrap_or_else(|| panic!("{}", p.name));
                assert_eq!(max_abs_diff(got, want), 0.0, "{label}: saved {}", p.name);
            }
        }
    }
    // LoRA adapters in bf16: their copies are gathered the same way.
    fn lora_bf16() -> DecoderModel {
        let mut m = lora_model();
        m.compute.dtype = DType::BF16;
        m
    }
    let one = single_of(lora_bf16(), true);
    let ranks = parallel_of(lora_bf16, 2, ZeroStage::Zero1, true, ReduceDtype::F32);
    let worst = (ranks[0].1.iter().zip(&one.1))
        .map(|(a, b)| common::rel_diff(a, b))
        .fold(0.0, f64::max);
    eprintln!("LoRA bf16 n=2: largest relative adapter difference from one process {worst:.1e}");
    assert!(worst < 6e-3, "LoRA: {worst:e}");
    // Without checkpoints, an evaluation (every 2 steps), and else the end of `train`, brings the
    // masters up to date: every rank evaluates, and ends with, the same weights.
    for with_eval in [true, false] {
        let runs = on_ranks(2, move |c| {
            let model = bf16();
            let dp = DataParallel::new(Box::new(c), ZeroStage::Zero1, model.params());
            let config = TrainerConfig {
                save_steps: 0,
                eval_steps: if with_eval { 2 } else { 0 },
                ..cfg(BATCH / 2, None)
            };
            let mut t = Trainer::new(model, collator(true), config, Device::Cpu).unwrap();
            t.set_data_parallel(dp).unwrap();
            let eval = data()[..6].to_vec();
            let s = t
                .train(&data(), with_eval.then_some(eval.as_slice()))
                .unwrap();
            let evals: Vec<f64> = s.evals.iter().map(|e| e.eval_loss).collect();
            (evals, params_of(&t.model))
        });
        assert_eq!(runs[0].0.len(), if with_eval { 2 } else { 0 });
        assert_eq!(
            runs[0].0, runs[1].0,
            "the ranks evaluated different weights"
        );
        for (a, b) in runs[0].1.iter().zip(&runs[1].1) {
            assert_eq!(
                max_abs_diff(a, b),
                0.0,
                "eval {with_eval}: the ranks end apart"
            );
        }
    }
}

/// A ZeRO 1 or 2 run on 2 ranks saves a checkpoint holding the whole optimizer state; one
/// process resumes it (with the same global batch) and ends where the uninterrupted run ends.
#[test]
fn a_sharded_checkpoint_resumes_on_another_number_of_ranks() {
    for zero in [ZeroStage::Zero1, ZeroStage::Zero2] {
        sharded_checkpoint_resumes(zero);
    }
}

fn sharded_checkpoint_resumes(zero: ZeroStage) {
    let (one_losses, one_params) = single(true);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_path_buf();
    let to = out.clone();
    let parts = on_ranks(2, move |c| {
        let model = tiny_model(3);
        let rank0 = c.rank() == 0;
        let dp = DataParallel::new(Box::new(c), zero, model.params());
        let mut config = cfg(BATCH / 2, rank0.then_some(to.as_path()));
        config.max_steps = 4;
        let mut t = Trainer::new(model, collator(true), config, Device::Cpu).unwrap();
        t.set_data_parallel(dp).unwrap();
        t.add_callback(Box::new(common::StopAt(2)));
        t.train(&data(), None).unwrap()
    });
    assert!(parts.iter().all(|p| p.steps.len() == 2 && p.stopped));
    let ckpt = out.join("checkpoint-2");
    let state =
        candle_core::safetensors::load(ckpt.join("optimizer.safetensors"), &Device::Cpu).unwrap();
    let model = tiny_model(3);
    for p in model.params() {
        assert!(
            state.contains_key(&format!("exp_avg.{}", p.name)),
            "{}",
            p.name
        );
    }
    // On 3 ranks of the same stage: each reads only the moments it owns.
    let from = ckpt.clone();
    let resumed = on_ranks(3, move |c| {
        let model = tiny_model(3);
        let dp = DataParallel::new(Box::new(c), zero, model.params());
        let mut t = Trainer::new(model, collator(true), cfg(BATCH / 3, None), Device::Cpu).unwrap();
        t.set_data_parallel(dp).unwrap();
        t.resume_from(&from).unwrap();
        let rest = t.train(&data(), None).unwrap();
        (
            rest.steps.iter().map(|m| m.loss).collect::<Vec<f64>>(),
            params_of(&t.model),
        )
    });
    for (r, (rest, params)) in resumed.into_iter().enumerate() {
        let losses = (parts[0].steps.iter().map(|m| m.loss))
            .chain(rest)
            .collect();
        assert_close(
            &format!("{zero:?} resumed on 3 ranks, rank {r}"),
            &(losses, params),
            &(one_losses.clone(), one_params.clone()),
        );
    }
    let mut t = Trainer::new(model, collator(true), cfg(BATCH, Some(&out)), Device::Cpu).unwrap();
    t.resume_from(&ckpt).unwrap();
    let rest = t.train(&data(), None).unwrap();
    let losses: Vec<f64> = parts[0]
        .steps
        .iter()
        .chain(&rest.steps)
        .map(|m| m.loss)
        .collect();
    assert_close(
        "resumed on one rank",
        &(losses, params_of(&t.model)),
        &(one_losses, one_params),
    );
}

/// Every rank's step reports each rank's compute time and their spread, the same on every rank;
/// a rank with no example in a step computed nothing, so the busy rank is the slower one. One
/// process reports neither.
#[test]
fn ranks_report_each_ones_compute_time_and_the_spread() {
    // One example a step: rank 0 trains on it, rank 1 has none and only joins the sums.
    let one = examples(&[40], 64, 9);
    let config = || TrainerConfig {
        grad_accum: 1,
        max_steps: 6,
        epochs: 6,
        ..cfg(1, None)
    };
    let data = one.clone();
    let runs = on_ranks(2, move |c| {
        let model = tiny_model(3);
        let dp = DataParallel::new(Box::new(c), ZeroStage::Zero0, model.params());
        let mut t = Trainer::new(model, collator(true), config(), Device::Cpu).unwrap();
        t.set_data_parallel(dp).unwrap();
        t.train(&data, None).unwrap()
    });
    assert_eq!(runs[0].steps.len(), 6);
    let (mut busy, mut idle) = (0.0, 0.0);
    for (a, b) in runs[0].steps.iter().zip(&runs[1].steps) {
        let times = a
            .rank_compute_s
            .clone()
            .expect("rank 0 reports the ranks' times");
        assert_eq!(Some(&times), b.rank_compute_s.as_ref(), "step {}", a.step);
        assert_eq!(times.len(), 2);
        // Every rank measured a span, the idle one too (its loop over no batch).
        assert!(times.iter().all(|t| t.is_finite() && *t > 0.0), "{times:?}");
        let spread = a.rank_spread.expect("and their spread");
        let want = (times[0].max(times[1]) - times[0].min(times[1])) / times[0].max(times[1]);
        assert!((spread - want).abs() < 1e-12, "{spread} vs {want}");
        (busy, idle) = (busy + times[0], idle + times[1]);
    }
    // Summed over the steps, so one preempted moment of the idle rank cannot turn it round.
    assert!(
        idle < busy / 2.0,
        "the rank without examples took {idle} s, the busy one {busy} s"
    );
    let mut t = Trainer::new(tiny_model(3), collator(true), config(), Device::Cpu).unwrap();
    let s = t.train(&one, None).unwrap();
    assert!(s
        .steps
        .iter()
        .all(|m| m.rank_compute_s.is_none() && m.rank_spread.is_none()));
}

fn final_loss(stdout: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    v["final_loss"].as_f64().unwrap()
}

/// `packsft launch` runs ranks as processes over TCP: 2 ranks of 8 examples give the losses of
/// one process of 16, under ZeRO 0, 1 and 2; only rank 0 writes.
#[test]
fn launched_ranks_train_as_one_process_with_the_same_global_batch() {
    let base = [
        "recipes/quickstart.yaml",
        "train.max_steps=5",
        "train.eval_steps=0",
        "data.eval=null",
    ];
    let one = tempfile::tempdir().unwrap();
    let mut args = vec!["train"];
    args.extend(base);
    let out1 = format!("output_dir={}", one.path().display());
    args.extend(["train.batch_size=16", &out1]);
    let (ok, stdout, err) = common::packsft(&args);
    assert!(ok, "{err}");
    let want = final_loss(&stdout);
    for zero in ["0", "1", "2"] {
        let two = tempfile::tempdir().unwrap();
        let out2 = format!("output_dir={}", two.path().display());
        let z = format!("dist.zero={zero}");
        let mut args = vec!["launch", "--nproc-per-node", "2", "--", "train"];
        args.extend(base);
        args.extend(["train.batch_size=8", &out2, &z]);
        let (ok, stdout, err) = common::packsft(&args);
        assert!(ok, "{err}");
        let got = final_loss(&stdout);
        assert!(
            (got - want).abs() / want < 1e-5,
            "zero {zero}: {got} vs {want}"
        );
        let rows = std::fs::read_to_string(two.path().join("metrics.jsonl")).unwrap();
        assert_eq!(
            rows.lines().count(),
            5,
            "zero {zero}: one metrics row a step"
        );
        assert!(two.path().join("model.safetensors").is_file());
    }
}

/// Ranks started with different recipes meet and refuse to train together, naming the hash.
#[test]
fn a_rank_of_another_recipe_is_refused_at_the_rendezvous() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let spawn = move |rank: usize, lr: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_packsft"))
            .args([
                "train",
                "recipes/quickstart.yaml",
                "train.max_steps=2",
                "train.eval_steps=0",
                "data.eval=null",
                "dist.timeout_s=30",
                &format!("output_dir={}", root.join(rank.to_string()).display()),
                &format!("train.lr={lr}"),
            ])
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", "2")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .output()
            .unwrap()
    };
    let first = spawn.clone();
    let r0 = std::thread::spawn(move || first(0, "1e-3"));
    let r1 = spawn(1, "2e-3");
    let r0 = r0.join().unwrap();
    for (rank, o) in [(0, &r0), (1, &r1)] {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "rank {rank} trained: {err}");
        assert!(
            err.contains("another recipe, data or binary"),
            "rank {rank}: {err}"
        );
    }
}

/// A rank killed mid-run: the launcher stops the others and exits non-zero naming the rank.
#[test]
fn a_killed_rank_stops_the_run_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let launcher = std::process::Command::new(env!("CARGO_BIN_EXE_packsft"))
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--grace-s",
            "5",
            "--",
            "train",
            "recipes/quickstart.yaml",
            "train.max_steps=100000",
            "train.eval_steps=0",
            "data.eval=null",
            &format!("output_dir={}", dir.path().display()),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let children_file = format!("/proc/{0}/task/{0}/children", launcher.id());
    // Wait until both ranks are training (metrics rows appear).
    let start = std::time::Instant::now();
    while !dir.path().join("metrics.jsonl").exists() {
        assert!(start.elapsed().as_secs() < 120, "the run never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    let children: Vec<i32> = std::fs::read_to_string(&children_file)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(children.len(), 2, "{children:?}");
    std::process::Command::new("kill")
        .args(["-9", &children[1].to_string()])
        .status()
        .unwrap();
    let out = launcher.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("rank 1 failed") && err.contains("signal: 9"),
        "{err}"
    );
    // Nothing is left running.
    for pid in children {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists() || {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                stat.contains(") Z ")
            }
        );
    }
}
