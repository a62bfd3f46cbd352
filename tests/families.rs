//! The 16 families against transformers 4.46.3, Qwen3 and Qwen3-MoE against 4.51.3 (fixtures from
//! tests/fixtures/make_family_fixtures.py): logits, loss and every parameter's gradient, padded
//! and padding-free, against per-example forwards; the MoE router loss and its gradient; save
//! round trips; and a few training steps that lower the loss.

mod common;

use common::{fixture_name as name, reference, Reference};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{max_abs_diff, rel_diff, sq_norm, within};
use packsft::{AdamWConfig, Schedule};
use packsft::{Collator, CompletionOnlyCollator, DecoderModel, Example, Model};
use packsft::{Trainer, TrainerConfig};

/// The tiny family checkpoints: every one must carry its transformers reference (a fixture
/// without one is an error, not a silent skip), and all 23 (20 families, 3 variants) are there.
fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families");
    let mut v: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    v.sort();
    let missing: Vec<_> = v
        .iter()
        .filter(|p| !p.join("reference.json").exists() || !p.join("reference.safetensors").exists())
        .collect();
    assert!(
        missing.is_empty(),
        "fixtures without a reference: {missing:?}"
    );
    assert_eq!(v.len(), 23, "family fixtures: {v:?}");
    v
}

/// Every parameter's gradient against transformers' (relative difference ≤ 1e-4).
fn compare_grads(
    model: &DecoderModel,
    grads: &candle_core::backprop::GradStore,
    r: &Reference,
    label: &str,
    failures: &mut Vec<String>,
) {
    for p in model.params() {
        let want = &r.tensors[&format!("grad.{}", p.name)];
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
}

#[test]
fn every_supported_family_is_covered() {
    let types: std::collections::BTreeSet<String> = fixtures()
        .iter()
        .map(|d| {
            reference(d).json["model_type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let want: std::collections::BTreeSet<String> = packsft::internals::families::SUPPORTED
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(types, want);
}

#[test]
fn logits_loss_and_gradients_match_transformers() {
    let mut failures = Vec::new();
    for dir in fixtures() {
        let fam = name(&dir);
        let r = reference(&dir);
        let model = DecoderModel::from_pretrained(&dir, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{fam}: {e}"));
        for padding_free in [true, false] {
            let batch = (if padding_free {
                CompletionOnlyCollator::padding_free(0)
            } else {
                CompletionOnlyCollator::padded(0)
            })
            .collate(&r.examples, &Device::Cpu)
            .unwrap();
            let label = format!("{fam} pf={padding_free}");
            let grads = common::check_logits_and_loss(&model, &batch, &r, &label, &mut failures);
            compare_grads(&model, &grads, &r, &label, &mut failures);
            let n_ref = r.tensors.keys().filter(|k| k.starts_with("grad.")).count();
            if n_ref != model.params().len() {
                failures.push(format!(
                    "{fam}: {} parameters, transformers has {n_ref}",
                    model.params().len()
                ));
            }
            // The MoE router loss over all real tokens, and its gradient.
            if let Some(want) = r.json.get("aux_loss").and_then(|v| v.as_f64()) {
                let aux = model
                    .router_aux_loss(&batch)
                    .unwrap()
                    .expect("a MoE model has a router loss");
                let got = aux.to_scalar::<f32>().unwrap() as f64;
                if !within((got - want).abs() / want, 1e-5) {
                    failures.push(format!("{fam} pf={padding_free}: aux loss {got} vs {want}"));
                }
                let g = aux.backward().unwrap();
                for p in model.params() {
                    let Some(want) = r.tensors.get(&format!("aux_grad.{}", p.name)) else {
                        continue;
                    };
                    let wn = want
                        .sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    let ok = match g.get(p.var.as_tensor()) {
                        None => wn == 0.0,
                        Some(got) if wn == 0.0 => max_abs_diff(got, want) <= 1e-7,
                        Some(got) => rel_diff(got, want) <= 1e-4,
                    };
                    if !ok {
                        failures.push(format!(
                            "{fam} pf={padding_free} {}: aux gradient differs",
                            p.name
                        ));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The training path (`forward_backward`) differentiates each dense layer by hand
/// (src/model/decoder/backward.rs); gradient checkpointing recomputes layers with autograd. Both
/// must give transformers' gradients, like `Model::loss` + backward above.
#[test]
fn hand_written_layer_backward_matches_transformers() {
    let mut failures = Vec::new();
    for dir in fixtures() {
        let fam = name(&dir);
        let r = reference(&dir);
        let mut model = DecoderModel::from_pretrained(&dir, &Device::Cpu).unwrap();
        // Padding-free and padded; then with gradient checkpointing (layers recomputed).
        for (padding_free, ckpt) in [(true, false), (false, false), (true, true)] {
            model.compute.gradient_checkpointing = ckpt;
            let batch = (if padding_free {
                CompletionOnlyCollator::padding_free(0)
            } else {
                CompletionOnlyCollator::padded(0)
            })
            .collate(&r.examples, &Device::Cpu)
            .unwrap();
            let label = format!("{fam} pf={padding_free} ckpt={ckpt}");
            let want = r.json["loss"].as_f64().unwrap();
            let grads = common::step_by_hand(&model, &batch, want, &label, &mut failures);
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
fn saving_keeps_names_values_and_config() {
    for dir in fixtures() {
        let fam = name(&dir);
        let model = DecoderModel::from_pretrained(&dir, &Device::Cpu).unwrap();
        let out = tempfile::tempdir().unwrap();
        model.save(out.path()).unwrap();
        common::assert_same_safetensors(
            &dir.join("model.safetensors"),
            &out.path().join("model.safetensors"),
            &fam,
        );
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
                .unwrap();
        let orig: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["model_type"], orig["model_type"], "{fam}");
        assert_eq!(cfg["architectures"], orig["architectures"], "{fam}");
        let again = DecoderModel::from_pretrained(out.path(), &Device::Cpu).unwrap();
        assert_eq!(again.spec, model.spec, "{fam}");
    }
}

#[test]
fn a_few_steps_lower_the_loss_and_reach_every_parameter() {
    for dir in fixtures() {
        let fam = name(&dir);
        let r = reference(&dir);
        let model = DecoderModel::from_pretrained(&dir, &Device::Cpu).unwrap();
        let cfg = TrainerConfig {
            batch_size: 6,
            max_steps: 6,
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
        let sg = t.step_grads(&r.examples).unwrap();
        for p in t.model.params() {
            let g = sg
                .grads
                .get(p.var.as_tensor())
                .unwrap_or_else(|| panic!("{fam} {}: no gradient", p.name));
            let n = sq_norm(g);
            assert!(
                n > 0.0 && n.is_finite(),
                "{fam} {}: gradient norm^2 {n}",
                p.name
            );
        }
        let before = t.evaluate(&r.examples).unwrap().loss;
        t.train(&r.examples, None).unwrap();
        let after = t.evaluate(&r.examples).unwrap().loss;
        assert!(after < 0.9 * before, "{fam}: loss {before} -> {after}");
    }
}

fn fixture(n: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/families")
        .join(n)
}

/// A copy of a fixture's config.json with `edit` applied, and its weights.
fn edited(n: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(n).join("config.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        fixture(n).join("model.safetensors"),
        d.path().join("model.safetensors"),
    )
    .unwrap();
    d
}

fn load_err(d: &Path) -> String {
    DecoderModel::from_pretrained(d, &Device::Cpu)
        .err()
        .expect("expected an error")
        .to_string()
}

#[test]
fn unsupported_config_features_are_named_not_ignored() {
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "falcon_mq",
            Box::new(|c| c["alibi"] = true.into()),
            "alibi = true is not supported",
        ),
        (
            "llama",
            Box::new(|c| {
                c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 2.0})
            }),
            "rope_scaling type \"yarn\"",
        ),
        (
            "llama",
            Box::new(|c| {
                c["rope_scaling"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0})
            }),
            "rope_scaling type \"dynamic\"",
        ),
        (
            "mistral",
            Box::new(|c| c["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0})),
            "rope_scaling",
        ),
        (
            "phi",
            Box::new(|c| c["qk_layernorm"] = true.into()),
            "qk_layernorm = true",
        ),
        (
            "mixtral",
            Box::new(|c| c["router_jitter_noise"] = 0.1.into()),
            "router_jitter_noise",
        ),
        (
            "qwen2",
            Box::new(|c| c["use_sliding_window"] = true.into()),
            "use_sliding_window",
        ),
        (
            "starcoder2",
            Box::new(|c| c["head_dim"] = 5.into()),
            "head_dim = 5",
        ),
        (
            "llama",
            Box::new(|c| c["hidden_act"] = "relu2".into()),
            "hidden_act = \"relu2\"",
        ),
        (
            "llama",
            Box::new(|c| c["model_type"] = "gpt_neox".into()),
            "model_type \"gpt_neox\" is not supported (supported: llama, mistral",
        ),
        (
            "llama",
            Box::new(|c| c["hidden_size"] = "big".into()),
            "`hidden_size` must be a non-negative integer",
        ),
        (
            "gemma2",
            Box::new(|c| c["attn_logit_softcapping"] = (-1.0).into()),
            "attn_logit_softcapping = -1 (must be positive",
        ),
        (
            "gemma3_text",
            Box::new(|c| c["final_logit_softcapping"] = 0.0.into()),
            "final_logit_softcapping = 0 (must be positive",
        ),
        (
            "gemma3_text",
            Box::new(|c| c["sliding_window_pattern"] = 0.into()),
            "sliding_window_pattern = 0",
        ),
        (
            "gemma3_text",
            Box::new(|c| {
                c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 8.0})
            }),
            "rope_scaling type \"yarn\"",
        ),
        (
            "granitemoe",
            Box::new(|c| c["num_experts_per_tok"] = 5.into()),
            "num_experts_per_tok = 5 with 4 experts",
        ),
    ];
    for (fam, edit, want) in cases {
        let d = edited(fam, edit);
        let e = load_err(d.path());
        assert!(e.contains(want) && e.contains("config.json"), "{fam}: {e}");
    }
    // Weights that do not fit the config are named too.
    let d = edited("llama", |c| c["intermediate_size"] = 40.into());
    let e = load_err(d.path());
    assert!(
        e.contains("model.layers.0.mlp.gate_proj.weight") && e.contains("shape"),
        "{e}"
    );
}

#[test]
fn sharded_and_bf16_checkpoints_load() {
    let src = fixture("qwen2_moe");
    let tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), d.path().join("config.json")).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (part, file) in [
        (a, "model-00001-of-00002.safetensors"),
        (b, "model-00002-of-00002.safetensors"),
    ] {
        // One shard in bf16: the loader converts to float32.
        let shard: HashMap<String, Tensor> = part
            .iter()
            .map(|n| {
                let t = &tensors[*n];
                let t = if file.starts_with("model-00002") {
                    t.to_dtype(candle_core::DType::BF16).unwrap()
                } else {
                    t.clone()
                };
                ((*n).clone(), t)
            })
            .collect();
        candle_core::safetensors::save(&shard, d.path().join(file)).unwrap();
        for n in part {
            map.insert((*n).clone(), file.into());
        }
    }
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let model = DecoderModel::from_pretrained(d.path(), &Device::Cpu).unwrap();
    let reference = DecoderModel::from_pretrained(&src, &Device::Cpu).unwrap();
    for (p, q) in model.params().iter().zip(reference.params()) {
        assert_eq!(p.var.dtype(), candle_core::DType::F32);
        let want = if b.contains(&&p.name) {
            q.var
                .to_dtype(candle_core::DType::BF16)
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap()
        } else {
            q.var.as_tensor().clone()
        };
        assert_eq!(max_abs_diff(p.var.as_tensor(), &want), 0.0, "{}", p.name);
    }
    // A shard listed in the index but missing is named.
    std::fs::remove_file(d.path().join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("model-00002-of-00002.safetensors") && e.contains("does not exist"),
        "{e}"
    );
}

#[test]
fn arch_prints_what_was_understood() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_packsft"))
        .arg("arch")
        .arg(fixture("dbrx"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "family          dbrx",
        "fused [q | k | v]",
        "clip_qkv        0.5",
        "MoE 4 experts top-2",
        "LayerNorm without bias",
        "router aux loss coefficient 0.05",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_packsft"))
        .args(["arch", "--json"])
        .arg(fixture("stablelm"))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["rope"]["rotary_dim"].as_u64().unwrap() * 4,
        v["head_dim"].as_u64().unwrap()
    );
    assert_eq!(v["qk_norm"], "PerHeadLayerNorm");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_packsft"))
        .args(["arch", "--json"])
        .arg(fixture("qwen3"))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["qk_norm"], "SharedRms");
    assert_eq!(v["head_dim"], 12);
}

/// Trains each family a few steps and saves it under target/family-saves/<fixture>/ with the
/// loss packsft computes for the reference examples; a reload must give the same loss.
/// `tests/fixtures/check_saved_families.py` then loads every directory with transformers and
/// compares its loss with `packsft_loss.json`.
#[test]
fn trained_models_save_and_reload_with_the_same_loss() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/family-saves");
    for dir in fixtures() {
        let fam = name(&dir);
        let r = reference(&dir);
        let model = DecoderModel::from_pretrained(&dir, &Device::Cpu).unwrap();
        let cfg = TrainerConfig {
            batch_size: 6,
            max_steps: 3,
            adamw: AdamWConfig {
                lr: 1e-2,
                ..Default::default()
            },
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
        t.train(&r.examples, None).unwrap();
        let loss = t.evaluate(&r.examples).unwrap().loss;
        let out = root.join(&fam);
        t.model.save(&out).unwrap();
        let again = DecoderModel::from_pretrained(&out, &Device::Cpu).unwrap();
        let t2 = Trainer::new(
            again,
            CompletionOnlyCollator::padded(0),
            TrainerConfig {
                batch_size: 6,
                progress: false,
                ..Default::default()
            },
            Device::Cpu,
        )
        .unwrap();
        let loss2 = t2.evaluate(&r.examples).unwrap().loss;
        assert!(
            (loss - loss2).abs() / loss <= 1e-6,
            "{fam}: {loss} vs reloaded {loss2}"
        );
        let examples: Vec<serde_json::Value> = r.json["examples"].as_array().unwrap().clone();
        std::fs::write(
            out.join("packsft_loss.json"),
            serde_json::json!({"loss": loss, "examples": examples}).to_string(),
        )
        .unwrap();
    }
}

#[test]
fn packsft_eval_gives_transformers_loss_for_every_family() {
    for dir in fixtures() {
        let fam = name(&dir);
        let r = reference(&dir);
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("eval.jsonl");
        let rows: String = r.json["examples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| format!("{e}\n"))
            .collect();
        std::fs::write(&data, rows).unwrap();
        let recipe = d.path().join("r.yaml");
        std::fs::write(
            &recipe,
            format!(
                "model:\n  path: {}\ndata:\n  train: {}\n  eval: {}\noutput_dir: {}\n",
                dir.display(),
                data.display(),
                data.display(),
                d.path().join("out").display()
            ),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_packsft"))
            .arg("eval")
            .arg(&recipe)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{fam}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        let (got, want) = (
            v["eval_loss"].as_f64().unwrap(),
            r.json["loss"].as_f64().unwrap(),
        );
        assert!(
            within((got - want).abs() / want, 1e-5),
            "{fam}: packsft eval {got} vs transformers {want}"
        );
        assert_eq!(v["eval_tokens"], r.json["n_targets"], "{fam}");
    }
}

#[test]
fn the_pad_tokens_embedding_row_gets_no_gradient_from_lookups() {
    // transformers builds the embedding as nn.Embedding(..., padding_idx=pad_token_id): looking
    // up the pad id gives its row, but no gradient flows back into it.
    let mut cfg = common::tiny_config(64);
    cfg["pad_token_id"] = serde_json::json!(5);
    let ex = Example::new(
        vec![7, 5, 9, 5, 11, 12],
        vec![false, false, true, true, true, true],
    );
    let loss_and_embed_grad = |cfg: serde_json::Value| {
        let model = DecoderModel::new_random(cfg, 3, &Device::Cpu).unwrap();
        let batch = CompletionOnlyCollator::padding_free(0)
            .collate(std::slice::from_ref(&ex), &Device::Cpu)
            .unwrap();
        let l = model.loss(&batch).unwrap();
        let g = l.sum.backward().unwrap();
        let emb = model
            .params()
            .iter()
            .find(|p| p.name == "model.embed_tokens.weight")
            .expect("an embedding");
        let ge = g.get(emb.var.as_tensor()).expect("a gradient").clone();
        (l.sum.to_scalar::<f32>().unwrap(), ge)
    };
    let (with_pad, g) = loss_and_embed_grad(cfg.clone());
    let row = |i: usize| sq_norm(&g.get(i).unwrap());
    assert_eq!(row(5), 0.0, "the pad row must get no gradient");
    assert!(row(7) > 0.0 && row(9) > 0.0, "other looked-up rows do");
    // The forward pass is unchanged: the same loss without pad_token_id, and there the pad
    // id's row does get a gradient.
    cfg.as_object_mut().unwrap().remove("pad_token_id");
    let (without, g) = loss_and_embed_grad(cfg);
    assert_eq!(with_pad, without);
    assert!(sq_norm(&g.get(5).unwrap()) > 0.0);
}

/// Decoding with a KV cache gives, position by position, the logits of the full forward (the
/// forward `logits_loss_and_gradients_match_transformers` pins to transformers), for every family
/// but LongRoPE's, which the cache refuses.
#[test]
fn kv_cache_decoding_equals_the_full_forward() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for dir in fixtures() {
        let fam = name(&dir);
        let r = reference(&dir);
        let model = DecoderModel::from_pretrained(&dir, &Device::Cpu).unwrap();
        let ids = r.examples[0].input_ids.clone();
        let batch = CompletionOnlyCollator::padding_free(0)
            .collate(
                &[Example::new(ids.clone(), vec![false; ids.len()])],
                &Device::Cpu,
            )
            .unwrap();
        let full = model.all_logits(&batch).unwrap();
        let mut cache = model.kv_cache();
        if model.spec.rope.long.is_some() {
            assert!(model.decode(&ids[..1], &mut cache).is_err(), "{fam}");
            continue;
        }
        // A prompt of a third, then one token at a time.
        let split = (ids.len() / 3).max(1);
        let mut steps = vec![(0, split)];
        steps.extend((split..ids.len()).map(|i| (i, i + 1)));
        for (a, b) in steps {
            let got = model.decode(&ids[a..b], &mut cache).unwrap();
            let want = full.narrow(0, b - 1, 1).unwrap();
            let d = common::max_abs_diff(&got, &want);
            if d > 1e-4 {
                failures.push(format!("{fam} position {}: max abs diff {d:e}", b - 1));
            }
        }
        assert_eq!(cache.len(), ids.len());
        checked += 1;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(checked, 22, "every fixture but phi3_longrope");
}

/// Llama 3.2 and 3.3 and Phi-4 are not new families: their published config.json files
/// (meta-llama/Llama-3.2-1B, meta-llama/Llama-3.3-70B-Instruct, microsoft/phi-4) load as
/// `llama` and `phi3`, every key understood (a key the family does not compute would be an
/// error naming it).
#[test]
fn llama_3_2_and_3_3_and_phi_4_load_as_llama_and_phi3() {
    let llama3_rope = |factor: f64| {
        serde_json::json!({"factor": factor, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3"})
    };
    let llama_3_2_1b = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": llama3_rope(32.0),
        "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
        "transformers_version": "4.45.0.dev0", "use_cache": true, "vocab_size": 128256
    });
    let llama_3_3_70b = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 8192, "initializer_range": 0.02,
        "intermediate_size": 28672, "max_position_embeddings": 131072, "mlp_bias": false,
        "model_type": "llama", "num_attention_heads": 64, "num_hidden_layers": 80,
        "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": llama3_rope(8.0), "rope_theta": 500000.0, "tie_word_embeddings": false,
        "torch_dtype": "bfloat16", "transformers_version": "4.47.0.dev0", "use_cache": true,
        "vocab_size": 128256
    });
    let phi_4 = serde_json::json!({
        "architectures": ["Phi3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
        "bos_token_id": 100257, "embd_pdrop": 0.0, "eos_token_id": 100265, "hidden_act": "silu",
        "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 17920,
        "max_position_embeddings": 16384, "model_type": "phi3", "num_attention_heads": 40,
        "num_hidden_layers": 40, "num_key_value_heads": 10,
        "original_max_position_embeddings": 16384, "pad_token_id": 100349, "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05, "rope_scaling": null, "rope_theta": 250000, "sliding_window": null,
        "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.47.0",
        "use_cache": true, "vocab_size": 100352
    });
    let (s, _) = packsft::internals::families::from_config(&llama_3_2_1b).unwrap();
    assert_eq!(
        (s.family.as_str(), s.head_dim, s.tie_embeddings),
        ("llama", 64, true)
    );
    // Llama-3 RoPE scaling: the lowest frequencies divided by the factor, the highest kept.
    let base = 1.0 / 500000f64.powf(62.0 / 64.0);
    assert!((s.rope.inv_freq[31] as f64 - base / 32.0).abs() < 1e-3 * base / 32.0);
    assert_eq!(s.rope.inv_freq[0], 1.0);
    let (s, _) = packsft::internals::families::from_config(&llama_3_3_70b).unwrap();
    assert_eq!(
        (s.layers, s.heads, s.kv_heads, s.head_dim),
        (80, 64, 8, 128)
    );
    let (s, _) = packsft::internals::families::from_config(&phi_4).unwrap();
    assert_eq!(
        (s.family.as_str(), s.kv_heads, s.head_dim),
        ("phi3", 10, 128)
    );
    assert_eq!((s.sliding_window, s.rope.long.is_none()), (None, true));
}
