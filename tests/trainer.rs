//! The trainer: exact normalisation, trajectory parity with PyTorch, checkpoints, bit-exact
//! resume, stop requests, NaN handling, callbacks, memory levers.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;

use candle_core::{DType, Device, Tensor};
use common::{examples, rel_diff, tiny_model};
use packsft::{AdamWConfig, Schedule};
use packsft::{Callback, Control, EarlyStopping};
use packsft::{CompletionOnlyCollator, DecoderModel, Example, LossNormalization, Model};
use packsft::{EvalMetrics, Trainer, TrainerConfig};

fn cfg(out: Option<&Path>) -> TrainerConfig {
    TrainerConfig {
        batch_size: 2,
        grad_accum: 2,
        max_steps: 8,
        adamw: AdamWConfig {
            lr: 3e-3,
            weight_decay: 0.01,
            ..Default::default()
        },
        schedule: Schedule::Cosine,
        warmup_steps: 2,
        save_steps: 3,
        output_dir: out.map(Path::to_path_buf),
        progress: false,
        ..Default::default()
    }
}

fn data() -> Vec<Example> {
    examples(&[5, 9, 14, 3, 22, 7, 11, 6, 2, 17, 8, 4, 13], 64, 21)
}

fn grads(t: &Trainer<DecoderModel, CompletionOnlyCollator>, exs: &[Example]) -> Vec<Tensor> {
    let sg = t.step_grads(exs).unwrap();
    t.model
        .params()
        .iter()
        .map(|p| sg.grads.get(p.var.as_tensor()).unwrap().clone())
        .collect()
}

#[test]
fn sixteen_examples_any_split_same_gradients_both_normalisations() {
    let exs = examples(
        &[5, 9, 14, 3, 22, 7, 11, 6, 2, 17, 8, 4, 13, 10, 19, 5],
        64,
        8,
    );
    for norm in [LossNormalization::Tokens, LossNormalization::Sequences] {
        let mut reference: Option<Vec<Tensor>> = None;
        for padding_free in [true, false] {
            for (bs, ga) in [(8, 1), (4, 2), (2, 4)] {
                let mut c = if padding_free {
                    CompletionOnlyCollator::padding_free(0)
                } else {
                    CompletionOnlyCollator::padded(0)
                };
                c.normalization = norm;
                let tc = TrainerConfig {
                    batch_size: bs,
                    grad_accum: ga,
                    progress: false,
                    ..Default::default()
                };
                let t = Trainer::new(tiny_model(9), c, tc, Device::Cpu).unwrap();
                let g = grads(&t, &exs);
                match &reference {
                    None => reference = Some(g),
                    Some(r) => {
                        for ((a, b), p) in g.iter().zip(r).zip(t.model.params()) {
                            let d = rel_diff(a, b);
                            assert!(
                                d <= 1e-5,
                                "{norm:?} padding_free={padding_free} ({bs},{ga}) {}: {d:e}",
                                p.name
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn sequence_normalisation_is_the_mean_of_per_sequence_means() {
    let exs = examples(&[6, 12, 9], 64, 3);
    let model = tiny_model(2);
    let mut seq = CompletionOnlyCollator::padding_free(0);
    seq.normalization = LossNormalization::Sequences;
    let tc = TrainerConfig {
        batch_size: 3,
        progress: false,
        ..Default::default()
    };
    let t = Trainer::new(model, seq, tc.clone(), Device::Cpu).unwrap();
    let sg = t.step_grads(&exs).unwrap();
    let got = sg.loss_sum / sg.loss_units;
    // Per-sequence mean losses computed one example at a time.
    let tok = CompletionOnlyCollator::padding_free(0);
    let mut want = 0.0;
    for ex in &exs {
        let b = packsft::Collator::collate(&tok, std::slice::from_ref(ex), &Device::Cpu).unwrap();
        let l = t.model.loss(&b).unwrap();
        want += l.sum.to_scalar::<f32>().unwrap() as f64 / l.n_targets as f64;
    }
    want /= exs.len() as f64;
    assert!((got - want).abs() / want < 1e-6, "{got} vs {want}");
}

#[test]
fn five_adamw_steps_track_pytorch() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/fixtures/trajectory.json")).unwrap(),
    )
    .unwrap();
    let exs: Vec<Example> = common::examples_from_json(&fx["examples"]);
    let model =
        DecoderModel::from_pretrained(&root.join("tests/fixtures/llama_tiny"), &Device::Cpu)
            .unwrap();
    let tc = TrainerConfig {
        batch_size: 2,
        max_steps: 5,
        adamw: AdamWConfig {
            lr: 2e-3,
            weight_decay: 0.1,
            ..Default::default()
        },
        schedule: Schedule::Linear,
        warmup_steps: 2,
        max_grad_norm: 1.0,
        progress: false,
        ..Default::default()
    };
    let mut t = Trainer::new(
        model,
        CompletionOnlyCollator::padding_free(0),
        tc,
        Device::Cpu,
    )
    .unwrap();
    let schedule = t.schedule(5);
    for (s, want) in fx["steps"].as_array().unwrap().iter().enumerate() {
        let m = t.train_step(s, &exs[2 * s..2 * s + 2], &schedule).unwrap();
        let (wl, wlr, wn) = (
            want["loss"].as_f64().unwrap(),
            want["lr"].as_f64().unwrap(),
            want["grad_norm"].as_f64().unwrap(),
        );
        assert!(
            (m.loss - wl).abs() / wl <= 1e-4,
            "step {}: loss {} vs torch {wl}",
            s + 1,
            m.loss
        );
        assert!(
            (m.lr - wlr).abs() <= 1e-12,
            "step {}: lr {} vs {wlr}",
            s + 1,
            m.lr
        );
        assert!(
            (m.grad_norm - wn).abs() / wn <= 1e-4,
            "step {}: grad norm {} vs {wn}",
            s + 1,
            m.grad_norm
        );
    }
}

fn trainer(
    out: Option<&Path>,
    padding_free: bool,
) -> Trainer<DecoderModel, CompletionOnlyCollator> {
    Trainer::new(
        tiny_model(11),
        if padding_free {
            CompletionOnlyCollator::padding_free(0)
        } else {
            CompletionOnlyCollator::padded(0)
        },
        cfg(out),
        Device::Cpu,
    )
    .unwrap()
}

#[test]
fn resumed_runs_match_an_uninterrupted_run_bit_for_bit() {
    let exs = data();
    let eval = examples(&[7, 9], 64, 99);
    for padding_free in [true, false] {
        let full_dir = tempfile::tempdir().unwrap();
        let mut full_t = trainer(Some(full_dir.path()), padding_free);
        let full = full_t.train(&exs, Some(&eval)).unwrap();
        assert_eq!(full.steps.len(), 8);

        let dir = tempfile::tempdir().unwrap();
        let mut first = trainer(Some(dir.path()), padding_free);
        first.add_callback(Box::new(common::StopAt(5)));
        let part = first.train(&exs, Some(&eval)).unwrap();
        assert!(part.stopped && part.steps.len() == 5);
        assert_eq!(
            part.last_checkpoint.as_deref(),
            Some(dir.path().join("checkpoint-5").as_path())
        );

        let mut second = trainer(Some(dir.path()), padding_free);
        second
            .resume_from(&dir.path().join("checkpoint-5"))
            .unwrap();
        let rest = second.train(&exs, Some(&eval)).unwrap();
        let resumed: Vec<f64> = part
            .steps
            .iter()
            .chain(&rest.steps)
            .map(|m| m.loss)
            .collect();
        let straight: Vec<f64> = full.steps.iter().map(|m| m.loss).collect();
        assert_eq!(resumed, straight, "padding_free={padding_free}");
        assert_eq!(rest.steps[0].step, 6);
        assert_eq!(
            rest.evals.last().unwrap().eval_loss,
            full.evals.last().unwrap().eval_loss
        );
        // Final weights identical to the bit.
        for (a, b) in second.model.params().iter().zip(full_t.model.params()) {
            let (x, y) = (a.var.flatten_all().unwrap(), b.var.flatten_all().unwrap());
            assert_eq!(
                x.to_vec1::<f32>().unwrap(),
                y.to_vec1::<f32>().unwrap(),
                "{}",
                a.name
            );
        }
        // metrics.jsonl of the resumed run has each step once, in order.
        let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r.get("loss").is_some())
            .map(|r| r["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, (1..=8).collect::<Vec<_>>());
    }
}

#[test]
fn checkpoints_are_complete_and_pruned() {
    let exs = data();
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(Some(dir.path()));
    c.save_steps = 2;
    c.save_total_limit = Some(2);
    let mut t = Trainer::new(
        tiny_model(1),
        CompletionOnlyCollator::padding_free(0),
        c,
        Device::Cpu,
    )
    .unwrap();
    t.train(&exs, None).unwrap();
    let names: Vec<String> = packsft::internals::checkpoint::list(dir.path())
        .into_iter()
        .map(|(_, p)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["checkpoint-6", "checkpoint-8"]);
    for f in [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(dir.path().join("checkpoint-8").join(f).exists(), "{f}");
    }
    // No temporary directory is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // loss.png is a PNG.
    let png = std::fs::read(dir.path().join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

#[test]
fn a_stop_flag_saves_a_checkpoint_and_returns() {
    let exs = data();
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(Some(dir.path()));
    c.save_steps = 0;
    let mut t = Trainer::new(
        tiny_model(1),
        CompletionOnlyCollator::padding_free(0),
        c,
        Device::Cpu,
    )
    .unwrap();
    t.stop_flag().store(true, Ordering::SeqCst);
    let s = t.train(&exs, None).unwrap();
    assert!(s.interrupted && s.stopped);
    assert_eq!(s.steps.len(), 1);
    assert!(dir.path().join("checkpoint-1/trainer_state.json").exists());
}

#[test]
fn a_diverging_run_stops_naming_the_step_and_keeps_the_last_checkpoint() {
    let exs = data();
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(Some(dir.path()));
    c.adamw.lr = 1e30;
    c.warmup_steps = 0;
    c.schedule = Schedule::Constant;
    c.max_grad_norm = 0.0;
    c.save_steps = 1;
    let mut t = Trainer::new(
        tiny_model(1),
        CompletionOnlyCollator::padding_free(0),
        c,
        Device::Cpu,
    )
    .unwrap();
    let e = t.train(&exs, None).unwrap_err().to_string();
    assert!(
        e.contains("step 2:") && (e.contains("NaN") || e.contains("inf")),
        "{e}"
    );
    assert!(dir.path().join("checkpoint-1/model.safetensors").exists());
    assert!(!dir.path().join("checkpoint-2").exists());
}

#[test]
fn resume_rejects_non_checkpoints_and_other_models() {
    let d = tempfile::tempdir().unwrap();
    let mut t = trainer(None, true);
    let e = t.resume_from(d.path()).unwrap_err().to_string();
    assert!(e.contains("not a packsft checkpoint"), "{e}");

    let exs = data();
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(Some(dir.path()));
    c.max_steps = 3;
    trainer_with(tiny_model(1), c).train(&exs, None).unwrap();
    let other = serde_json::json!({
        "vocab_size": 64, "hidden_size": 48, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    });
    let mut t = trainer_with(
        DecoderModel::new_random(other, 0, &Device::Cpu).unwrap(),
        cfg(None),
    );
    let e = t
        .resume_from(&dir.path().join("checkpoint-3"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("different model") && e.contains("model.embed_tokens.weight"),
        "{e}"
    );
}

fn trainer_with(
    model: DecoderModel,
    c: TrainerConfig,
) -> Trainer<DecoderModel, CompletionOnlyCollator> {
    Trainer::new(
        model,
        CompletionOnlyCollator::padding_free(0),
        c,
        Device::Cpu,
    )
    .unwrap()
}

#[test]
fn early_stopping_stops_after_patience_evals_without_improvement() {
    let mut es = EarlyStopping::new(2, 0.0);
    let ev = |step, eval_loss| EvalMetrics {
        step,
        eval_loss,
        eval_accuracy: None,
        eval_tokens: 1,
        samples: Vec::new(),
    };
    assert_eq!(es.on_eval_end(&ev(1, 2.0)).unwrap(), Control::Continue);
    assert_eq!(es.on_eval_end(&ev(2, 1.5)).unwrap(), Control::Continue);
    assert_eq!(es.on_eval_end(&ev(3, 1.6)).unwrap(), Control::Continue);
    assert_eq!(es.on_eval_end(&ev(4, 1.5)).unwrap(), Control::Stop);
}

#[test]
fn token_budget_batches_respect_the_budget_and_cover_the_data() {
    let exs = data();
    let mut c = cfg(None);
    c.max_tokens_per_batch = Some(40);
    c.max_steps = 0;
    c.epochs = 1;
    c.grad_accum = 1;
    let mut t = trainer_with(tiny_model(1), c);
    let s = t.train(&exs, None).unwrap();
    assert_eq!(s.steps.iter().map(|m| m.examples).sum::<usize>(), exs.len());
    assert_eq!(s.steps.len(), t.total_steps(&exs));
    // Padding-free positions = real tokens; each micro-batch's rows x longest <= 40 unless a
    // single example is longer.
    for m in &s.steps {
        assert!(m.tokens <= 40 || m.examples == 1, "{m:?}");
    }
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let exs = examples(&[9, 14, 5, 21], 64, 4);
    let plain = trainer(None, true);
    let mut ck = trainer(None, true);
    ck.model.compute.gradient_checkpointing = true;
    for ((a, b), p) in grads(&ck, &exs)
        .iter()
        .zip(grads(&plain, &exs))
        .zip(plain.model.params())
    {
        let d = rel_diff(a, &b);
        assert!(d <= 1e-6, "{}: {d:e}", p.name);
    }
}

#[test]
fn bf16_compute_keeps_f32_master_weights_and_tracks_the_f32_loss() {
    let exs = data();
    let mut f32_run = trainer(None, true);
    let mut bf16_run = trainer(None, true);
    bf16_run.model.compute.dtype = DType::BF16;
    let a = f32_run.train(&exs, None).unwrap();
    let b = bf16_run.train(&exs, None).unwrap();
    for p in bf16_run.model.params() {
        assert_eq!(p.var.dtype(), DType::F32, "{}", p.name);
    }
    for (x, y) in a.steps.iter().zip(&b.steps) {
        assert!(
            (x.loss - y.loss).abs() / x.loss < 0.02,
            "step {}: f32 {} bf16 {}",
            x.step,
            x.loss,
            y.loss
        );
    }
    assert!(b.steps.last().unwrap().loss < b.steps[0].loss);
}

#[test]
fn a_fresh_run_refuses_an_earlier_runs_checkpoints_and_resume_checks_the_run() {
    let exs = data();
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(Some(dir.path()));
    c.max_steps = 3;
    trainer_with(tiny_model(1), c.clone())
        .train(&exs, None)
        .unwrap();
    // Same output_dir, no resume: refused before any step.
    let e = trainer_with(tiny_model(1), c.clone())
        .train(&exs, None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("already holds checkpoints") && e.contains("checkpoint-3"),
        "{e}"
    );
    // Resume with other total steps, other data: refused, naming what differs.
    let ck = dir.path().join("checkpoint-3");
    let mut longer = c.clone();
    longer.max_steps = 5;
    let mut t = trainer_with(tiny_model(1), longer);
    t.resume_from(&ck).unwrap();
    let e = t.train(&exs, None).unwrap_err().to_string();
    assert!(e.contains("the total steps = 3, this run 5"), "{e}");
    let mut other = exs.clone();
    other[0].input_ids[1] += 1;
    let mut t = trainer_with(tiny_model(1), c);
    t.resume_from(&ck).unwrap();
    let e = t.train(&other, None).unwrap_err().to_string();
    assert!(e.contains("the training data"), "{e}");
}

#[test]
fn early_stopping_resumes_from_the_saved_best_loss() {
    let mut es = EarlyStopping::new(1, 0.0);
    let mut state: packsft::TrainerState = serde_json::from_value(serde_json::json!({
        "format_version": packsft::internals::checkpoint::FORMAT_VERSION, "global_step": 4, "total_steps": 8,
        "epoch": 0, "cursor": 4, "seed": 1, "shuffle": true, "n_train_examples": 8,
        "examples_per_step": 1, "max_tokens_per_batch": null, "group_by_length": false,
        "data_hash": 0, "param_shapes": [], "best_eval_loss": 1.0
    }))
    .unwrap();
    es.on_train_begin(&state).unwrap();
    let ev = EvalMetrics {
        step: 5,
        eval_loss: 1.2,
        eval_accuracy: None,
        eval_tokens: 1,
        samples: Vec::new(),
    };
    // Worse than the best before the resume: with patience 1 that stops at once.
    assert_eq!(es.on_eval_end(&ev).unwrap(), Control::Stop);
    state.best_eval_loss = None;
    let mut fresh = EarlyStopping::new(1, 0.0);
    fresh.on_train_begin(&state).unwrap();
    assert_eq!(fresh.on_eval_end(&ev).unwrap(), Control::Continue);
}

#[test]
fn bf16_weight_copies_give_the_in_graph_cast_gradients() {
    // forward_backward in bf16 casts each weight matrix once to a variable of its own and folds
    // its gradient into the f32 master weight; Model::loss + backward casts inside the graph.
    // Same arithmetic, so the same gradients; tied embeddings get both the lookup's and the
    // lm_head's share. (Layers through autograd here: the hand-written layer backward rounds
    // in another order and is checked against transformers in tests/families.rs.)
    let mut cfg = common::tiny_config(64);
    cfg["tie_word_embeddings"] = serde_json::json!(true);
    let mut model = DecoderModel::new_random(cfg, 9, &Device::Cpu).unwrap();
    model.compute.dtype = DType::BF16;
    model.compute.autograd_layers = true;
    let exs = examples(&[12, 7, 20], 64, 4);
    let batch =
        packsft::Collator::collate(&CompletionOnlyCollator::padding_free(0), &exs, &Device::Cpu)
            .unwrap();
    let scale = packsft::LossScale {
        per_unit: 1.0 / batch.n_targets() as f64,
        aux: 1.0,
    };
    let (_, fused) = model.forward_backward(&batch, scale).unwrap();
    let l = model.loss(&batch).unwrap();
    let reference = (l.sum * scale.per_unit).unwrap().backward().unwrap();
    let mut matrices = 0;
    for p in model.params() {
        let a = fused.get(p.var.as_tensor()).expect("a gradient");
        let b = reference.get(p.var.as_tensor()).expect("a gradient");
        assert_eq!(a.dtype(), DType::F32, "{}", p.name);
        let e = rel_diff(a, b);
        assert!(e < 1e-6, "{}: {e:e}", p.name);
        matrices += (p.var.rank() == 2) as usize;
    }
    assert!(matrices > 5, "the model has weight matrices");
    // The hand-written layer backward in bf16 on the CPU: the same gradients up to bf16 rounding.
    model.compute.autograd_layers = false;
    let (_, by_hand) = model.forward_backward(&batch, scale).unwrap();
    let worst = model
        .params()
        .iter()
        .map(|p| {
            rel_diff(
                by_hand.get(p.var.as_tensor()).expect("a gradient"),
                reference.get(p.var.as_tensor()).unwrap(),
            )
        })
        .fold(0f64, f64::max);
    eprintln!("bf16 hand-written backward vs autograd: worst gradient rel diff {worst:.2e}");
    assert!(worst < 2e-2, "{worst:e}");
}

#[test]
fn adamw_counts_updates_per_parameter_as_pytorch() {
    use candle_core::Var;
    use packsft::internals::optimizer::AdamW;
    use packsft::Param;
    // `b` gets no gradient on the first step (an expert no token was routed to). PyTorch skips
    // it and counts its updates from its own first one: that update is exactly what a fresh
    // optimizer makes with the same gradient.
    let dev = Device::Cpu;
    let param = |name: &str, v: &[f32]| Param {
        name: name.into(),
        var: Var::new(v, &dev).unwrap(),
        decay: true,
    };
    let cfg = AdamWConfig {
        lr: 0.1,
        weight_decay: 0.01,
        ..Default::default()
    };
    let c = Tensor::new(&[0.3f32, -0.7], &dev).unwrap();
    let grad_of = |ps: &[&Param]| {
        let mut s = ps[0].var.as_tensor().clone();
        for p in &ps[1..] {
            s = (s + p.var.as_tensor()).unwrap();
        }
        (s * &c).unwrap().sum_all().unwrap().backward().unwrap()
    };
    let (a, b) = (param("a", &[1.0, -2.0]), param("b", &[0.5, 3.0]));
    let mut opt = AdamW::new(&[a.clone(), b.clone()], cfg).unwrap();
    opt.step(&grad_of(&[&a]), 0.1).unwrap();
    // Written now: the state tensors share the optimizer's buffers, which the next step updates.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");
    packsft::internals::weights::save_safetensors(&opt.state_tensors().unwrap(), &path).unwrap();
    opt.step(&grad_of(&[&a, &b]), 0.1).unwrap();

    let fresh_b = param("b", &[0.5, 3.0]);
    let mut fresh = AdamW::new(std::slice::from_ref(&fresh_b), cfg).unwrap();
    fresh.step(&grad_of(&[&fresh_b]), 0.1).unwrap();
    let got = b.var.as_tensor().to_vec1::<f32>().unwrap();
    assert_eq!(got, fresh_b.var.as_tensor().to_vec1::<f32>().unwrap());
    // A first AdamW update moves each weight by about lr (minus the small decay).
    assert!(
        (got[0] - (0.5 - 0.1 - 0.1 * 0.01 * 0.5)).abs() < 1e-4,
        "{got:?}"
    );

    // The counts travel with checkpoints: restoring the state after step 1 (with a misleading
    // global count) and repeating step 2 gives the same weights.
    let (a2, b2) = (param("a", &[1.0, -2.0]), param("b", &[0.5, 3.0]));
    let mut replay = AdamW::new(&[a2.clone(), b2.clone()], cfg).unwrap();
    replay.step(&grad_of(&[&a2]), 0.1).unwrap();
    let mut resumed = AdamW::new(&[a2.clone(), b2.clone()], cfg).unwrap();
    resumed.load_state(&path, 7).unwrap();
    resumed.step(&grad_of(&[&a2, &b2]), 0.1).unwrap();
    assert_eq!(
        a2.var.as_tensor().to_vec1::<f32>().unwrap(),
        a.var.as_tensor().to_vec1::<f32>().unwrap()
    );
    assert_eq!(b2.var.as_tensor().to_vec1::<f32>().unwrap(), got);
}

#[test]
fn early_stopping_keeps_its_patience_count_across_a_resume() {
    let ev = |step, eval_loss| EvalMetrics {
        step,
        eval_loss,
        eval_accuracy: None,
        eval_tokens: 1,
        samples: Vec::new(),
    };
    let state: packsft::TrainerState = serde_json::from_value(serde_json::json!({
        "format_version": packsft::internals::checkpoint::FORMAT_VERSION, "global_step": 4, "total_steps": 8,
        "epoch": 0, "cursor": 4, "seed": 1, "shuffle": true, "n_train_examples": 8,
        "examples_per_step": 1, "max_tokens_per_batch": null, "group_by_length": false,
        "data_hash": 0, "param_shapes": [], "best_eval_loss": 1.0
    }))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut es = EarlyStopping::new(2, 0.0);
    assert_eq!(es.on_eval_end(&ev(2, 1.0)).unwrap(), Control::Continue);
    assert_eq!(es.on_eval_end(&ev(4, 1.1)).unwrap(), Control::Continue);
    es.on_save(dir.path(), 4).unwrap();
    // Resumed: the evaluation without improvement before the checkpoint still counts.
    let mut resumed = EarlyStopping::new(2, 0.0);
    resumed.on_resume(dir.path()).unwrap();
    resumed.on_train_begin(&state).unwrap();
    assert_eq!(resumed.on_eval_end(&ev(6, 1.2)).unwrap(), Control::Stop);
    // Without the saved state (a checkpoint written without the callback) the count restarts.
    let mut fresh = EarlyStopping::new(2, 0.0);
    fresh
        .on_resume(tempfile::tempdir().unwrap().path())
        .unwrap();
    fresh.on_train_begin(&state).unwrap();
    assert_eq!(fresh.on_eval_end(&ev(6, 1.2)).unwrap(), Control::Continue);
    // A damaged file is an error naming it.
    std::fs::write(dir.path().join("early_stopping.json"), "{oops").unwrap();
    let e = EarlyStopping::new(2, 0.0)
        .on_resume(dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("early_stopping.json"), "{e}");
}

#[test]
fn a_resumed_run_calls_on_resume_with_its_checkpoint_before_on_train_begin() {
    #[derive(Clone, Default)]
    struct Log(std::sync::Arc<std::sync::Mutex<Vec<String>>>);
    impl Callback for Log {
        fn on_resume(&mut self, dir: &Path) -> packsft::Result<()> {
            self.0
                .lock()
                .unwrap()
                .push(format!("resume {}", dir.display()));
            Ok(())
        }
        fn on_train_begin(&mut self, s: &packsft::TrainerState) -> packsft::Result<()> {
            self.0
                .lock()
                .unwrap()
                .push(format!("begin {}", s.global_step));
            Ok(())
        }
    }
    let exs = data();
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(Some(dir.path()));
    c.max_steps = 2;
    let log = Log::default();
    let mut first = trainer_with(tiny_model(1), c.clone());
    first.add_callback(Box::new(log.clone()));
    first.train(&exs, None).unwrap();
    let ck = dir.path().join("checkpoint-2");
    let mut again = trainer_with(tiny_model(1), c);
    again.add_callback(Box::new(log.clone()));
    again.resume_from(&ck).unwrap();
    again.train(&exs, None).unwrap();
    assert_eq!(
        *log.0.lock().unwrap(),
        vec![
            "begin 0".to_string(),
            format!("resume {}", ck.display()),
            "begin 2".to_string()
        ]
    );
}

/// The overlapped loop (the GPU default: each step enqueued before the previous one is read)
/// on the CPU, where it must give what the sequential loop gives: the same steps, evals,
/// checkpoints and weights; a callback's stop after a step lands one step later, with a
/// checkpoint that holds that step, from which a resumed run continues exactly.
#[test]
fn overlapped_steps_match_sequential_steps() {
    let exs = data();
    let eval = examples(&[7, 9], 64, 99);
    let run = |overlap: bool, stop_at: Option<usize>| {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(Some(dir.path()));
        c.eval_steps = 4;
        c.overlap_steps = Some(overlap);
        let mut t = Trainer::new(
            tiny_model(11),
            CompletionOnlyCollator::padding_free(0),
            c,
            Device::Cpu,
        )
        .unwrap();
        if let Some(s) = stop_at {
            t.add_callback(Box::new(common::StopAt(s)));
        }
        let summary = t.train(&exs, Some(&eval)).unwrap();
        (dir, t, summary)
    };
    let (seq_dir, seq_t, seq) = run(false, None);
    let (ovl_dir, ovl_t, ovl) = run(true, None);
    assert_eq!(seq.steps.len(), 8);
    for (a, b) in seq.steps.iter().zip(&ovl.steps) {
        assert_eq!(
            (a.step, a.loss, a.grad_norm, a.lr, a.epoch, a.tokens),
            (b.step, b.loss, b.grad_norm, b.lr, b.epoch, b.tokens)
        );
    }
    assert_eq!(seq.evals, ovl.evals);
    assert_eq!(seq.evals.len(), 2);
    let names = |d: &Path| -> Vec<usize> {
        packsft::internals::checkpoint::list(d)
            .into_iter()
            .map(|(s, _)| s)
            .collect()
    };
    assert_eq!(names(seq_dir.path()), vec![3, 6, 8]);
    assert_eq!(names(ovl_dir.path()), vec![3, 6, 8]);
    for step in [3, 6] {
        let state = |d: &Path| {
            std::fs::read_to_string(d.join(format!("checkpoint-{step}/trainer_state.json")))
                .unwrap()
        };
        assert_eq!(state(seq_dir.path()), state(ovl_dir.path()), "step {step}");
    }
    for (a, b) in seq_t.model.params().iter().zip(ovl_t.model.params()) {
        let (x, y) = (a.var.flatten_all().unwrap(), b.var.flatten_all().unwrap());
        assert_eq!(x.to_vec1::<f32>().unwrap(), y.to_vec1::<f32>().unwrap());
    }

    // A stop asked for after step 4 (an eval step: never overlapped) lands exactly; after
    // step 5 (step 6 already enqueued) it lands after step 6, which the checkpoint holds.
    let (_, _, at4) = run(true, Some(4));
    assert_eq!(at4.steps.len(), 4);
    let (dir, _, at5) = run(true, Some(5));
    assert!(at5.stopped);
    assert_eq!(at5.steps.len(), 6);
    assert_eq!(
        at5.last_checkpoint.as_deref(),
        Some(dir.path().join("checkpoint-6").as_path())
    );
    let mut c = cfg(Some(dir.path()));
    c.eval_steps = 4;
    c.overlap_steps = Some(true);
    let mut resumed = Trainer::new(
        tiny_model(11),
        CompletionOnlyCollator::padding_free(0),
        c,
        Device::Cpu,
    )
    .unwrap();
    resumed
        .resume_from(&dir.path().join("checkpoint-6"))
        .unwrap();
    let rest = resumed.train(&exs, Some(&eval)).unwrap();
    let losses: Vec<f64> = at5
        .steps
        .iter()
        .chain(&rest.steps)
        .map(|m| m.loss)
        .collect();
    let straight: Vec<f64> = seq.steps.iter().map(|m| m.loss).collect();
    assert_eq!(losses, straight);
    for (a, b) in resumed.model.params().iter().zip(seq_t.model.params()) {
        let (x, y) = (a.var.flatten_all().unwrap(), b.var.flatten_all().unwrap());
        assert_eq!(x.to_vec1::<f32>().unwrap(), y.to_vec1::<f32>().unwrap());
    }
}

/// The PyTorch trajectory's first step runs at lr 0 (warmup), and later steps' losses barely
/// move with weight decay, so they cannot see it: here one step at lr 1e-2 with and without
/// decay differ by exactly the decoupled decay, lr * wd * w, on matrices, and not at all on
/// biases and norm weights.
#[test]
fn weight_decay_is_decoupled_and_only_on_matrices() {
    let exs = common::examples(&[9, 12, 7, 10], 64, 11);
    let step = |wd: f64| {
        let tc = TrainerConfig {
            batch_size: 4,
            adamw: AdamWConfig {
                lr: 1e-2,
                weight_decay: wd,
                ..Default::default()
            },
            schedule: Schedule::Constant,
            progress: false,
            ..Default::default()
        };
        let mut t = Trainer::new(
            common::tiny_model(3),
            CompletionOnlyCollator::padding_free(0),
            tc,
            Device::Cpu,
        )
        .unwrap();
        let before: Vec<(String, bool, Tensor)> = t
            .model
            .params()
            .iter()
            .map(|p| (p.name.clone(), p.decay, p.var.as_tensor().copy().unwrap()))
            .collect();
        let schedule = t.schedule(1);
        t.train_step(0, &exs, &schedule).unwrap();
        let after: Vec<Tensor> = t
            .model
            .params()
            .iter()
            .map(|p| p.var.as_tensor().copy().unwrap())
            .collect();
        (before, after)
    };
    let (w0, with) = step(0.1);
    let (_, without) = step(0.0);
    let mut decayed = 0;
    for ((name, decay, w), (a, b)) in w0.iter().zip(with.iter().zip(&without)) {
        let diff = (a - b).unwrap();
        if *decay {
            decayed += 1;
            let want = (w * -1e-3).unwrap();
            let err = common::max_abs_diff(&diff, &want);
            assert!(
                err < 1e-8,
                "{name}: decay differs from lr * wd * w by {err:e}"
            );
            assert!(
                common::max_abs_diff(&diff, &(w * 0.0).unwrap()) > 1e-6,
                "{name}"
            );
        } else {
            assert_eq!(common::max_abs_diff(a, b), 0.0, "{name} must not decay");
        }
    }
    assert!(decayed > 0 && decayed < w0.len());
}

/// Eval samples: at each evaluation the first eval prompts are continued greedily by the model
/// as it stands after that step; the last evaluation's continuations are the trained model's own
/// greedy `generate_ids`, and prompt and reference are the example's two parts.
#[test]
fn eval_samples_are_the_models_greedy_continuations_of_the_eval_prompts() {
    let eval = examples(&[9, 12, 7], 64, 5);
    let mut c = cfg(None);
    c.eval_steps = 4;
    let mut t = Trainer::new(
        tiny_model(11),
        CompletionOnlyCollator::padding_free(0),
        c,
        Device::Cpu,
    )
    .unwrap();
    let show = |ids: &[u32]| -> packsft::Result<String> {
        Ok(ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" "))
    };
    t.set_eval_sampler(packsft::EvalSampler {
        prompts: 2,
        max_new_tokens: 5,
        eos: None,
        decode: Box::new(show),
    });
    let s = t.train(&data(), Some(&eval)).unwrap();
    assert_eq!(s.evals.len(), 2, "evaluations after steps 4 and 8");
    let last = s.evals.last().unwrap();
    assert_eq!(last.samples.len(), 2);
    for (sample, ex) in last.samples.iter().zip(&eval) {
        let first = ex.loss_mask.iter().position(|&m| m).unwrap();
        let prompt = &ex.input_ids[..first];
        let want = packsft::generate_ids(
            &t.model,
            prompt.to_vec(),
            5,
            &packsft::Sampling::default(),
            None,
            |_| Ok(false),
        )
        .unwrap();
        assert_eq!(sample.prompt, show(prompt).unwrap());
        assert_eq!(sample.completion, show(&want).unwrap());
        assert_eq!(sample.completion.split(' ').count(), 5);
        let reference: Vec<u32> = ex.input_ids[first..].to_vec();
        assert_eq!(sample.reference, show(&reference).unwrap());
    }
    // The first evaluation sampled a model 4 steps less trained: its own continuations, also
    // written to metrics rows by `serde` (the `samples` key only when there are some).
    let row = serde_json::to_value(&s.evals[0]).unwrap();
    assert_eq!(row["samples"].as_array().unwrap().len(), 2);
    let plain = serde_json::to_value(EvalMetrics {
        samples: Vec::new(),
        ..s.evals[0].clone()
    })
    .unwrap();
    assert!(plain.get("samples").is_none());
}
