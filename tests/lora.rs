//! LoRA adapters against PEFT 0.13.2 (fixtures from tests/fixtures/make_lora_fixtures.py, one
//! adapter on each of the 17 tiny family checkpoints, B initialised non-zero): logits, loss and
//! every lora_A / lora_B gradient, padded and padding-free, through autograd and the
//! hand-written layer backward; the modules targeted and the parameter counts; `merge` against
//! `merge_and_unload()`; saving and reloading; a few training steps that leave the base
//! untouched; and the errors of configurations PEFT would refuse.

mod common;

use common::{fixture_name as name, reference, Reference};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, rel_diff, within};
use packsft::{
    AdamWConfig, Collator, CompletionOnlyCollator, DecoderModel, Example, LoraConfig, LoraSetup,
    LossScale, Model, Schedule, Targets, Trainer, TrainerConfig,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The adapter fixtures: one per family checkpoint, none missing.
fn fixtures() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("lora"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    assert_eq!(v.len(), 17, "adapter fixtures: {v:?}");
    v
}

fn base(dir: &Path) -> PathBuf {
    root().join("families").join(name(dir))
}

/// The fixture's base with the fixture's PEFT adapter, float32.
fn load(dir: &Path) -> DecoderModel {
    let setup = LoraSetup {
        config: LoraConfig::from_peft_dir(dir).unwrap(),
        frozen_dtype: DType::F32,
    };
    DecoderModel::from_pretrained_with_lora(&base(dir), &Device::Cpu, &setup)
        .unwrap_or_else(|e| panic!("{}: {e}", name(dir)))
}

fn collate(examples: &[Example], padding_free: bool) -> packsft::Batch {
    (if padding_free {
        CompletionOnlyCollator::padding_free(0)
    } else {
        CompletionOnlyCollator::padded(0)
    })
    .collate(examples, &Device::Cpu)
    .unwrap()
}

/// Every trainable tensor's gradient against PEFT's (relative difference ≤ 1e-4).
fn compare_grads(
    model: &DecoderModel,
    grads: &candle_core::backprop::GradStore,
    r: &Reference,
    label: &str,
    failures: &mut Vec<String>,
) {
    for p in model.params() {
        let Some(want) = r.tensors.get(&format!("grad.{}", p.name)) else {
            failures.push(format!("{label} {}: PEFT has no such tensor", p.name));
            continue;
        };
        match grads.get(p.var.as_tensor()) {
            None => failures.push(format!("{label} {}: no gradient", p.name)),
            Some(g) => {
                let d = rel_diff(g, want);
                if !within(d, 1e-4) {
                    failures.push(format!("{label} {}: gradient rel diff {d:e}", p.name));
                }
            }
        }
    }
    let n_ref = r.tensors.keys().filter(|k| k.starts_with("grad.")).count();
    if n_ref != model.params().len() {
        failures.push(format!(
            "{label}: {} trainable tensors, PEFT has {n_ref}",
            model.params().len()
        ));
    }
}

#[test]
fn targets_and_parameter_counts_are_pefts() {
    for dir in fixtures() {
        let fam = name(&dir);
        let r = reference(&dir);
        let model = load(&dir);
        let mut got: Vec<String> = model.lora_targets().to_vec();
        got.sort();
        let want: Vec<String> = r.json["targeted_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(got, want, "{fam}: targeted modules");
        let (trainable, total) = model.param_counts();
        assert_eq!(
            trainable as u64,
            r.json["n_trainable"].as_u64().unwrap(),
            "{fam}: trainable parameters"
        );
        // PEFT counts a saved module twice (the frozen original and the trained copy); packsft
        // keeps only the copy: the base plus the adapters.
        let n_lora: usize = r
            .tensors
            .iter()
            .filter(|(k, _)| k.starts_with("grad.") && k.contains(".lora_"))
            .map(|(_, t)| t.elem_count())
            .sum();
        assert_eq!(
            total as u64,
            r.json["n_base"].as_u64().unwrap() + n_lora as u64,
            "{fam}: total parameters"
        );
        let scaling = r.json["scaling"].as_f64().unwrap();
        let cfg = model.lora_config().unwrap();
        assert!((cfg.scaling() - scaling).abs() < 1e-12, "{fam}: scaling");
    }
}

#[test]
fn logits_loss_and_adapter_gradients_match_peft() {
    let mut failures = Vec::new();
    for dir in fixtures() {
        let fam = name(&dir);
        let r = reference(&dir);
        let model = load(&dir);
        for padding_free in [true, false] {
            let batch = collate(&r.examples, padding_free);
            let label = format!("{fam} pf={padding_free}");
            let grads = common::check_logits_and_loss(&model, &batch, &r, &label, &mut failures);
            compare_grads(
                &model,
                &grads,
                &r,
                &format!("{fam} pf={padding_free} autograd"),
                &mut failures,
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The training path: the hand-written layer backward (padded and padding-free) and gradient
/// checkpointing's recomputation give PEFT's adapter gradients.
#[test]
fn hand_written_backward_gives_pefts_adapter_gradients() {
    let mut failures = Vec::new();
    for dir in fixtures() {
        let fam = name(&dir);
        let r = reference(&dir);
        let mut model = load(&dir);
        // A frozen head makes its gradient in the forward, in chunks; mistral's lm_head is
        // trained (modules_to_save) and takes the plain node.
        let head_trains = (r.json["modules_to_save_paths"].as_array().unwrap().iter())
            .any(|p| p.as_str() == Some("lm_head"));
        for (padding_free, ckpt) in [(true, false), (false, false), (true, true)] {
            model.compute.gradient_checkpointing = ckpt;
            let batch = collate(&r.examples, padding_free);
            let label = format!("{fam} pf={padding_free} ckpt={ckpt}");
            let want = r.json["loss"].as_f64().unwrap();
            let heads_before = packsft::internals::graph::frozen_heads();
            let grads = common::step_by_hand(&model, &batch, want, &label, &mut failures);
            let frozen_heads = packsft::internals::graph::frozen_heads() - heads_before;
            if frozen_heads != usize::from(!head_trains) {
                failures.push(format!(
                    "{label}: {frozen_heads} frozen head passes, head trains: {head_trains}"
                ));
            }
            compare_grads(&model, &grads, &r, &label, &mut failures);
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn merge_equals_pefts_merge_and_unload() {
    for dir in fixtures() {
        let fam = name(&dir);
        let r = reference(&dir);
        let out = tempfile::tempdir().unwrap();
        let report = packsft::merge_lora(&base(&dir), &dir, out.path(), DType::F32).unwrap();
        let merged =
            candle_core::safetensors::load(out.path().join("model.safetensors"), &Device::Cpu)
                .unwrap();
        let want: HashMap<&str, &Tensor> = r
            .tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("merged.").map(|n| (n, v)))
            .collect();
        assert_eq!(merged.len(), want.len(), "{fam}: tensor count");
        for (n, w) in &want {
            let got = merged
                .get(*n)
                .unwrap_or_else(|| panic!("{fam}: merged lacks {n}"));
            let d = max_abs_diff(got, w);
            assert!(d <= 1e-5, "{fam} {n}: merged max |diff| {d:e}");
        }
        let n_targets = r.json["targeted_modules"].as_array().unwrap().len();
        assert_eq!(report.merged, n_targets, "{fam}: matrices merged");
        // The merged checkpoint is a plain one with the adapter's loss.
        let m = DecoderModel::from_pretrained(out.path(), &Device::Cpu).unwrap();
        let batch = collate(&r.examples, true);
        let l = m.loss(&batch).unwrap();
        let loss = l.sum.to_scalar::<f32>().unwrap() as f64 / l.n_targets as f64;
        let want = r.json["loss"].as_f64().unwrap();
        assert!(
            within((loss - want).abs() / want, 1e-5),
            "{fam}: merged loss {loss} vs {want}"
        );
    }
}

#[test]
fn saved_adapters_are_pefts_files_and_reload_with_the_same_loss() {
    for dir in fixtures() {
        let fam = name(&dir);
        let r = reference(&dir);
        let model = load(&dir);
        let out = tempfile::tempdir().unwrap();
        model.save(out.path()).unwrap();
        // The same tensor names, shapes and values as the adapter PEFT wrote.
        common::assert_same_safetensors(
            &dir.join("adapter_model.safetensors"),
            &out.path().join("adapter_model.safetensors"),
            &fam,
        );
        let ours: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let peft: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        for key in [
            "peft_type",
            "task_type",
            "r",
            "lora_alpha",
            "lora_dropout",
            "use_rslora",
            "modules_to_save",
            "bias",
        ] {
            assert_eq!(ours[key], peft[key], "{fam}: adapter_config.json `{key}`");
        }
        let set = |v: &serde_json::Value| {
            let mut s: Vec<String> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect();
            s.sort();
            s
        };
        assert_eq!(
            set(&ours["target_modules"]),
            set(&peft["target_modules"]),
            "{fam}: target_modules"
        );
        let mut keys: Vec<&String> = ours.as_object().unwrap().keys().collect();
        let unsorted = keys.clone();
        keys.sort();
        assert_eq!(keys, unsorted, "{fam}: keys sorted");
        let missing: Vec<&String> = peft
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| ours.get(k.as_str()).is_none())
            .collect();
        assert!(
            missing.is_empty(),
            "{fam}: keys PEFT writes and packsft does not: {missing:?}"
        );
        // Reloaded as an adapter directory: the same loss.
        let again = DecoderModel::from_pretrained_with_lora(
            &base(&dir),
            &Device::Cpu,
            &LoraSetup {
                config: LoraConfig::from_peft_dir(out.path()).unwrap(),
                frozen_dtype: DType::F32,
            },
        )
        .unwrap();
        let batch = collate(&r.examples, true);
        let a = model.loss(&batch).unwrap().sum.to_scalar::<f32>().unwrap();
        let b = again.loss(&batch).unwrap().sum.to_scalar::<f32>().unwrap();
        assert_eq!(a, b, "{fam}: reloaded loss");
    }
}

/// New adapters (B = 0) leave the model's loss unchanged; a few steps lower it, every adapter
/// tensor moves, and the frozen base stays bit for bit what was loaded.
#[test]
fn training_moves_adapters_only_and_lowers_the_loss() {
    for fam in ["llama", "phi3", "mixtral", "falcon_new"] {
        let dir = root().join("lora").join(fam);
        let r = reference(&dir);
        let full = DecoderModel::from_pretrained(&base(&dir), &Device::Cpu).unwrap();
        let setup = LoraSetup {
            config: LoraConfig {
                r: 4,
                alpha: 8.0,
                targets: Targets::AllLinear,
                seed: 3,
                ..Default::default()
            },
            frozen_dtype: DType::F32,
        };
        let model =
            DecoderModel::from_pretrained_with_lora(&base(&dir), &Device::Cpu, &setup).unwrap();
        let batch = collate(&r.examples, true);
        let l0 = full.loss(&batch).unwrap().sum.to_scalar::<f32>().unwrap();
        let l1 = model.loss(&batch).unwrap().sum.to_scalar::<f32>().unwrap();
        assert_eq!(l0, l1, "{fam}: a new adapter changes nothing");
        let frozen_before = model.frozen_tensors();
        let start: Vec<Tensor> = model
            .params()
            .iter()
            .map(|p| p.var.as_tensor().copy().unwrap())
            .collect();
        let cfg = TrainerConfig {
            batch_size: 6,
            max_steps: 8,
            adamw: AdamWConfig {
                lr: 1e-2,
                ..Default::default()
            },
            schedule: Schedule::Constant,
            shuffle: false,
            progress: false,
            ..Default::default()
        };
        let mut t = Trainer::new(
            model,
            CompletionOnlyCollator::padding_free(0),
            cfg,
            Device::Cpu,
        )
        .unwrap();
        let before = t.evaluate(&r.examples).unwrap().loss;
        t.train(&r.examples, None).unwrap();
        let after = t.evaluate(&r.examples).unwrap().loss;
        assert!(after < 0.95 * before, "{fam}: loss {before} -> {after}");
        for (p, s) in t.model.params().iter().zip(&start) {
            let moved = max_abs_diff(p.var.as_tensor(), s);
            assert!(moved > 0.0, "{fam} {}: did not move", p.name);
        }
        for ((n, a), (_, b)) in frozen_before.iter().zip(t.model.frozen_tensors()) {
            assert_eq!(max_abs_diff(a, &b), 0.0, "{fam} {n}: frozen weight changed");
        }
    }
}

/// Dropout on the adapters' input: the same masks for the same (seed, pass), so gradient
/// checkpointing's recomputation gives the plain pass's gradients; none in evaluation.
#[test]
fn adapter_dropout_is_seeded_and_training_only() {
    let dir = root().join("lora").join("llama");
    let r = reference(&dir);
    let mut config = LoraConfig::from_peft_dir(&dir).unwrap();
    config.dropout = 0.3;
    let setup = LoraSetup {
        config,
        frozen_dtype: DType::F32,
    };
    let batch = collate(&r.examples, true);
    let scale = LossScale {
        per_unit: 1.0 / batch.n_targets() as f64,
        aux: 0.0,
    };
    let grads_of = |ckpt: bool, skip: usize| -> Vec<Tensor> {
        let mut m =
            DecoderModel::from_pretrained_with_lora(&base(&dir), &Device::Cpu, &setup).unwrap();
        m.compute.gradient_checkpointing = ckpt;
        for _ in 0..skip {
            m.forward_backward(&batch, scale).unwrap();
        }
        let (_, g) = m.forward_backward(&batch, scale).unwrap();
        m.params()
            .iter()
            .map(|p| g.get(p.var.as_tensor()).unwrap().clone())
            .collect()
    };
    let plain = grads_of(false, 0);
    let again = grads_of(false, 0);
    let ckpt = grads_of(true, 0);
    let next = grads_of(false, 1);
    let max = |a: &[Tensor], b: &[Tensor]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| max_abs_diff(x, y))
            .fold(0.0, f64::max)
    };
    assert_eq!(max(&plain, &again), 0.0, "same seed and pass, same masks");
    assert!(
        max(&plain, &ckpt) < 1e-5,
        "recomputation draws the same masks"
    );
    assert!(max(&plain, &next) > 1e-4, "the next pass draws new masks");
    // Evaluation has no dropout: the reference loss exactly as without it.
    let m = DecoderModel::from_pretrained_with_lora(&base(&dir), &Device::Cpu, &setup).unwrap();
    let e = m.eval_sums(&batch).unwrap();
    let want = r.json["loss"].as_f64().unwrap();
    let got = e.loss_sum / e.n_targets as f64;
    assert!(
        within((got - want).abs() / want, 1e-5),
        "eval loss {got} vs {want}"
    );
}

fn load_err(fam: &str, config: LoraConfig) -> String {
    let setup = LoraSetup {
        config,
        frozen_dtype: DType::F32,
    };
    match DecoderModel::from_pretrained_with_lora(
        &root().join("families").join(fam),
        &Device::Cpu,
        &setup,
    ) {
        Ok(_) => panic!("{fam}: loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn configurations_peft_refuses_are_errors_naming_the_value() {
    // No PEFT default for the family: the error lists its linear modules.
    let e = load_err("granite", LoraConfig::default());
    assert!(
        e.contains("target_modules") && e.contains("granite") && e.contains("q_proj"),
        "{e}"
    );
    // A name that matches nothing.
    let e = load_err(
        "llama",
        LoraConfig {
            targets: Targets::Names(vec!["query".into()]),
            ..Default::default()
        },
    );
    assert!(e.contains("`query`") && e.contains("down_proj"), "{e}");
    // DBRX's experts are parameters, not linear layers.
    let e = load_err(
        "dbrx",
        LoraConfig {
            targets: Targets::Names(vec!["w1".into()]),
            ..Default::default()
        },
    );
    assert!(e.contains("`w1`") && e.contains("not linear layers"), "{e}");
    // A saved module that does not exist.
    let e = load_err(
        "mistral",
        LoraConfig {
            modules_to_save: vec!["score".into()],
            ..Default::default()
        },
    );
    assert!(
        e.contains("modules_to_save") && e.contains("`score`"),
        "{e}"
    );
}

/// A LoRA run (adapters with dropout, padding-free, accumulation) stopped at a checkpoint and
/// resumed ends with the uninterrupted run's losses and adapter, bit for bit; checkpoints hold
/// PEFT's files and the adapters' optimizer state.
#[test]
fn resumed_lora_runs_match_an_uninterrupted_run_bit_for_bit() {
    let exs = common::examples(&[5, 9, 14, 3, 22, 7, 11, 6, 2, 17, 8, 4, 13], 48, 21);
    let setup = LoraSetup {
        config: LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.1,
            targets: Targets::AllLinear,
            seed: 7,
            ..Default::default()
        },
        frozen_dtype: DType::F32,
    };
    let trainer = |out: &Path| {
        let model = DecoderModel::from_pretrained_with_lora(
            &root().join("families/llama"),
            &Device::Cpu,
            &setup,
        )
        .unwrap();
        let cfg = TrainerConfig {
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
            output_dir: Some(out.to_path_buf()),
            progress: false,
            ..Default::default()
        };
        Trainer::new(
            model,
            CompletionOnlyCollator::padding_free(0),
            cfg,
            Device::Cpu,
        )
        .unwrap()
    };
    let full_dir = tempfile::tempdir().unwrap();
    let mut full_t = trainer(full_dir.path());
    let full = full_t.train(&exs, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut first = trainer(dir.path());
    first.add_callback(Box::new(common::StopAt(5)));
    let part = first.train(&exs, None).unwrap();
    assert!(part.stopped && part.steps.len() == 5);
    let ckpt = dir.path().join("checkpoint-5");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "lora_dropout_state.json",
    ] {
        assert!(ckpt.join(f).is_file(), "checkpoint lacks {f}");
    }
    assert!(!ckpt.join("model.safetensors").exists());
    let mut second = trainer(dir.path());
    second.resume_from(&ckpt).unwrap();
    let rest = second.train(&exs, None).unwrap();
    let resumed: Vec<f64> = part
        .steps
        .iter()
        .chain(&rest.steps)
        .map(|m| m.loss)
        .collect();
    let straight: Vec<f64> = full.steps.iter().map(|m| m.loss).collect();
    assert_eq!(resumed, straight);
    for (a, b) in second.model.params().iter().zip(full_t.model.params()) {
        assert_eq!(
            max_abs_diff(a.var.as_tensor(), b.var.as_tensor()),
            0.0,
            "{}",
            a.name
        );
    }
}

/// `packsft train` with a `lora:` section: PEFT's files in output_dir with the tokenizer and
/// recipe, the trainable count in the log, the merged model with the adapter's loss, and
/// `packsft merge` writing the same merged weights.
#[test]
fn a_lora_recipe_trains_saves_pefts_files_and_merges() {
    let base = tempfile::tempdir().unwrap();
    let (ok, err) = common::train_quickstart(base.path(), 3, &[]);
    assert!(ok, "{err}");
    let out = tempfile::tempdir().unwrap();
    let (ok, err) = common::train_quickstart(
        out.path(),
        4,
        &[
            &format!("model.path={}", base.path().display()),
            "model.config=null",
            "model.tokenizer=null",
            "lora.r=4",
            "lora.alpha=16",
            "lora.target_modules=all-linear",
            "lora.merge=true",
        ],
    );
    assert!(ok, "{err}");
    assert!(err.contains("trainable parameters of"), "{err}");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "recipe.yaml",
        "metrics.jsonl",
        "merged/model.safetensors",
        "merged/config.json",
        "merged/tokenizer.json",
    ] {
        assert!(out.path().join(f).is_file(), "output lacks {f}");
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 16);
    assert_eq!(
        cfg["base_model_name_or_path"],
        base.path().display().to_string()
    );
    // `packsft merge` in float32 writes what the recipe's merge wrote.
    let again = tempfile::tempdir().unwrap();
    let (ok, _, err) = common::packsft(&[
        "merge",
        &base.path().display().to_string(),
        &out.path().display().to_string(),
        &again.path().display().to_string(),
        "--dtype",
        "f32",
    ]);
    assert!(ok, "{err}");
    common::assert_same_safetensors(
        &out.path().join("merged/model.safetensors"),
        &again.path().join("model.safetensors"),
        "merge",
    );
    // The adapter on its base and the merged model evaluate alike.
    let data = root().join("../../recipes/quickstart/eval.jsonl");
    let eval = |extra: &[&str]| -> f64 {
        let mut args = vec![
            "eval".to_string(),
            "recipes/quickstart.yaml".into(),
            format!("data.eval={}", data.display()),
            "model.config=null".into(),
            "model.tokenizer=null".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, stdout, err) = common::packsft(&refs);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        v["eval_loss"].as_f64().unwrap()
    };
    let adapter = eval(&[
        &format!("model.path={}", base.path().display()),
        &format!("lora.adapter={}", out.path().display()),
    ]);
    let merged = eval(&[&format!(
        "model.path={}",
        out.path().join("merged").display()
    )]);
    assert!(
        (adapter - merged).abs() / merged < 1e-5,
        "adapter {adapter} vs merged {merged}"
    );
    // `generate` reads an adapter directory (on the base it names) as the merged model.
    let generate = |dir: &Path| -> String {
        let (ok, stdout, err) = common::packsft(&[
            "generate",
            &dir.display().to_string(),
            "--prompt",
            "Task: reverse\nInput: a b c\nOutput:",
            "--max-new-tokens",
            "6",
        ]);
        assert!(ok, "{err}");
        stdout
    };
    assert_eq!(generate(out.path()), generate(&out.path().join("merged")));
}

/// bf16 compute over a bf16 frozen base (what the GPU runs) tracks float32: the loss within 2%
/// and every adapter gradient pointing the same way (cosine ≥ 0.99), padded and padding-free.
#[test]
fn a_bf16_frozen_base_tracks_float32() {
    for fam in ["llama", "phi3", "mixtral"] {
        let dir = root().join("lora").join(fam);
        let r = reference(&dir);
        let config = LoraConfig::from_peft_dir(&dir).unwrap();
        let mut bf16 = DecoderModel::from_pretrained_with_lora(
            &base(&dir),
            &Device::Cpu,
            &LoraSetup {
                config,
                frozen_dtype: DType::BF16,
            },
        )
        .unwrap();
        bf16.compute.dtype = DType::BF16;
        let frozen_dtypes: Vec<DType> = bf16
            .frozen_tensors()
            .iter()
            .filter(|(_, t)| t.rank() == 2)
            .map(|(_, t)| t.dtype())
            .collect();
        assert!(frozen_dtypes.iter().all(|d| *d == DType::BF16), "{fam}");
        let f32m = load(&dir);
        for padding_free in [true, false] {
            let batch = collate(&r.examples, padding_free);
            let scale = LossScale {
                per_unit: 1.0 / batch.n_targets() as f64,
                aux: 0.0,
            };
            let (l16, g16) = bf16.forward_backward(&batch, scale).unwrap();
            let (l32, g32) = f32m.forward_backward(&batch, scale).unwrap();
            let (a, b) = (
                l16.sum.to_scalar::<f32>().unwrap() as f64,
                l32.sum.to_scalar::<f32>().unwrap() as f64,
            );
            assert!(
                (a - b).abs() / b < 0.02,
                "{fam} pf={padding_free}: {a} vs {b}"
            );
            for (p, q) in bf16.params().iter().zip(f32m.params()) {
                let x = g16
                    .get(p.var.as_tensor())
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap();
                let y = g32.get(q.var.as_tensor()).unwrap().flatten_all().unwrap();
                let dot = (&x * &y)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let nx = common::sq_norm(&x).sqrt();
                let ny = common::sq_norm(&y).sqrt();
                let cos = dot / (nx * ny);
                assert!(
                    cos >= 0.99,
                    "{fam} pf={padding_free} {}: cosine {cos}",
                    p.name
                );
            }
        }
    }
}

/// packsft's table of PEFT's per-family default targets is PEFT 0.13.2's (as the pinned fixture
/// script read it from `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
#[test]
fn family_default_targets_are_pefts() {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("lora/peft_defaults.json")).unwrap(),
    )
    .unwrap();
    let map = v["default_target_modules"].as_object().unwrap();
    assert_eq!(map.len(), 20);
    for (model_type, want) in map {
        let got = packsft::internals::lora::peft_default_targets(model_type)
            .map(|v| v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let want = want.as_array().map(|a| {
            a.iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        });
        assert_eq!(got, want, "{model_type}");
    }
}
