//! Parity with transformers (fixtures from tests/fixtures/make_llama_fixtures.py, torch 2.5.1,
//! transformers 4.46.3, float32 CPU): logits, loss and the gradient of every parameter, for
//! padded and padding-free batches. References are per-example forwards, so a packed batch
//! whose examples see each other cannot match.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{max_abs_diff, rel_diff};
use packsft::{Collator, CompletionOnlyCollator, DecoderModel, Example, Model};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Reference {
    examples: Vec<Example>,
    loss: f64,
    n_targets: usize,
    tensors: std::collections::HashMap<String, Tensor>,
}

fn reference(dir: &Path) -> Reference {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let examples = common::examples_from_json(&v["examples"]);
    Reference {
        examples,
        loss: v["loss"].as_f64().unwrap(),
        n_targets: v["n_targets"].as_u64().unwrap() as usize,
        tensors: candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
            .unwrap(),
    }
}

fn check(name: &str) {
    let dir = fixture(name);
    let r = reference(&dir);
    let model = DecoderModel::from_pretrained(&dir, &Device::Cpu).unwrap();
    for padding_free in [true, false] {
        let c = if padding_free {
            CompletionOnlyCollator::padding_free(0)
        } else {
            CompletionOnlyCollator::padded(0)
        };
        let batch = c.collate(&r.examples, &Device::Cpu).unwrap();

        // Logits of every real position equal transformers' per-example logits.
        let logits = model.all_logits(&batch).unwrap();
        for (i, ex) in r.examples.iter().enumerate() {
            let start = if padding_free {
                r.examples[..i].iter().map(Example::len).sum()
            } else {
                i * batch.row_len()
            };
            let ours = logits.narrow(0, start, ex.len()).unwrap();
            let d = max_abs_diff(&ours, &r.tensors[&format!("logits.{i}")]);
            assert!(
                d <= 1e-4,
                "{name} padding_free={padding_free} example {i}: logits max |diff| {d:e}"
            );
        }

        let l = model.loss(&batch).unwrap();
        assert_eq!(l.n_targets, r.n_targets);
        let loss = l.sum.to_scalar::<f32>().unwrap() as f64 / l.n_targets as f64;
        let rel = (loss - r.loss).abs() / r.loss.abs();
        assert!(
            rel <= 1e-5,
            "{name} padding_free={padding_free}: loss {loss} vs transformers {} (rel {rel:e})",
            r.loss
        );

        let grads = (l.sum / l.n_targets as f64).unwrap().backward().unwrap();
        let mut checked = 0;
        for p in model.params() {
            let want = &r.tensors[&format!("grad.{}", p.name)];
            let got = grads
                .get(p.var.as_tensor())
                .unwrap_or_else(|| panic!("{}: no gradient", p.name));
            let d = rel_diff(got, want);
            assert!(
                d <= 1e-4,
                "{name} padding_free={padding_free} {}: gradient rel diff {d:e}",
                p.name
            );
            checked += 1;
        }
        // transformers' parameter list (tied lm_head counted once) is exactly ours.
        let n_ref = r.tensors.keys().filter(|k| k.starts_with("grad.")).count();
        assert_eq!(
            checked, n_ref,
            "{name}: parameter count differs from transformers"
        );
    }
}

#[test]
fn llama_gqa_matches_transformers() {
    check("llama_tiny");
}

#[test]
fn llama3_tied_biased_mqa_rope_scaled_matches_transformers() {
    check("llama3_tiny");
}

#[test]
fn save_writes_what_was_loaded() {
    for name in ["llama_tiny", "llama3_tiny"] {
        let model = DecoderModel::from_pretrained(&fixture(name), &Device::Cpu).unwrap();
        let out = tempfile::tempdir().unwrap();
        model.save(out.path()).unwrap();
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["model_type"], "llama");
        assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
        common::assert_same_safetensors(
            &fixture(name).join("model.safetensors"),
            &out.path().join("model.safetensors"),
            name,
        );
        let reloaded = DecoderModel::from_pretrained(out.path(), &Device::Cpu).unwrap();
        assert_eq!(reloaded.spec, model.spec);
    }
}
