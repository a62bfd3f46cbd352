//! Helpers shared by the integration tests.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use packsft::{Batch, DecoderModel, Example, Model};

/// One training-path forward/backward of `model` on `batch` with the loss per target token, checked
/// against a reference loss `want` (relative 1e-5) and for the layers that took the hand-written
/// backward (every one; none under gradient checkpointing, which recomputes through autograd;
/// mixture-of-experts models keep autograd and are not counted). Mismatches go to `failures`
/// under `label`; returns the gradients.
pub fn step_by_hand(
    model: &DecoderModel,
    batch: &Batch,
    want: f64,
    label: &str,
    failures: &mut Vec<String>,
) -> candle_core::backprop::GradStore {
    let before = packsft::internals::graph::hand_written_backwards();
    let scale = packsft::LossScale {
        per_unit: 1.0 / batch.n_targets() as f64,
        aux: 0.0,
    };
    let (l, grads) = model.forward_backward(batch, scale).unwrap();
    let by_hand = packsft::internals::graph::hand_written_backwards() - before;
    let want_by_hand = if model.compute.gradient_checkpointing {
        0
    } else {
        model.spec.layers
    };
    if model.spec.moe_layers() == 0 && by_hand != want_by_hand {
        failures.push(format!(
            "{label}: {by_hand} layers differentiated by hand, want {want_by_hand}"
        ));
    }
    let loss = l.sum.to_scalar::<f32>().unwrap() as f64 / l.n_targets as f64;
    if !within((loss - want).abs() / want, 1e-5) {
        failures.push(format!("{label}: loss {loss} vs {want}"));
    }
    grads
}

/// A fixture directory's reference from its script: `reference.json` (loss, model type,
/// examples, ...) and `reference.safetensors` (logits, gradients).
pub struct Reference {
    pub json: serde_json::Value,
    pub examples: Vec<Example>,
    pub tensors: std::collections::HashMap<String, Tensor>,
}

/// The reference a fixture directory holds.
pub fn reference(dir: &std::path::Path) -> Reference {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let examples = examples_from_json(&json["examples"]);
    let tensors =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    Reference {
        json,
        examples,
        tensors,
    }
}

/// `model`'s logits of each example of `batch` (made of `r.examples`) against the reference's
/// `logits.{i}` (max abs 1e-4), and its loss through `Model::loss` against the reference's
/// (relative 1e-5); mismatches go to `failures` under `label`. Returns autograd's gradients of
/// the mean loss.
pub fn check_logits_and_loss(
    model: &DecoderModel,
    batch: &Batch,
    r: &Reference,
    label: &str,
    failures: &mut Vec<String>,
) -> candle_core::backprop::GradStore {
    let logits = model.all_logits(batch).unwrap();
    let mut start = 0;
    for (i, ex) in r.examples.iter().enumerate() {
        let at = match batch.layout() {
            packsft::SeqLayout::Packed { .. } => start,
            _ => i * batch.row_len(),
        };
        let d = max_abs_diff(
            &logits.narrow(0, at, ex.len()).unwrap(),
            &r.tensors[&format!("logits.{i}")],
        );
        if !within(d, 1e-4) {
            failures.push(format!("{label} example {i}: logits max |diff| {d:e}"));
        }
        start += ex.len();
    }
    let l = model.loss(batch).unwrap();
    let loss = l.sum.to_scalar::<f32>().unwrap() as f64 / l.n_targets as f64;
    let want = r.json["loss"].as_f64().unwrap();
    if !within((loss - want).abs() / want, 1e-5) {
        failures.push(format!("{label}: loss {loss} vs {want}"));
    }
    (l.sum / l.n_targets as f64).unwrap().backward().unwrap()
}

/// A fixture directory's name: the family (and variant) it holds.
pub fn fixture_name(dir: &std::path::Path) -> String {
    dir.file_name().unwrap().to_string_lossy().into_owned()
}

/// ||a - b|| / ||b|| over all elements (float32).
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(candle_core::DType::F64).unwrap();
    let b = b.to_dtype(candle_core::DType::F64).unwrap();
    let num = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt();
    let den = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt();
    num / den.max(1e-30)
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

pub fn tiny_config(vocab: usize) -> serde_json::Value {
    serde_json::json!({
        "vocab_size": vocab, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    })
}

pub fn tiny_model(seed: u64) -> DecoderModel {
    DecoderModel::new_random(tiny_config(64), seed, &Device::Cpu).unwrap()
}

/// Deterministic pseudo-random examples with lengths `lens`; the first `lens[i] / 3` tokens of
/// each are prompt (no loss).
pub fn examples(lens: &[usize], vocab: u32, seed: u64) -> Vec<Example> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    lens.iter()
        .map(|&n| {
            let ids = (0..n)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    3 + ((s >> 33) as u32) % (vocab - 3)
                })
                .collect();
            let mask = (0..n).map(|i| i >= n / 3).collect();
            Example::new(ids, mask)
        })
        .collect()
}

/// Examples as the fixture scripts write them: `{"input_ids": [...], "completion_mask": [...]}`.
pub fn examples_from_json(v: &serde_json::Value) -> Vec<Example> {
    v.as_array()
        .expect("a list of examples")
        .iter()
        .map(|e| {
            Example::new(
                e["input_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect(),
                e["completion_mask"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() == 1)
                    .collect(),
            )
        })
        .collect()
}

/// `x <= tol`, false for NaN: a comparison that a NaN cannot pass.
pub fn within(x: f64, tol: f64) -> bool {
    x <= tol
}

/// Runs the packsft binary from the repository root: (success, stdout, stderr).
pub fn packsft(args: &[&str]) -> (bool, String, String) {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_packsft"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// The squared L2 norm of a tensor.
pub fn sq_norm(t: &Tensor) -> f32 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The mean loss over a batch's targets and every parameter's gradient of it (copied to the
/// CPU), in `model.params()` order.
pub fn mean_loss_and_grads(model: &DecoderModel, batch: &Batch) -> (f64, Vec<Tensor>) {
    // The training path: hand-written layer backward, compute-dtype weight copies.
    let scale = packsft::LossScale {
        per_unit: 1.0 / batch.n_targets() as f64,
        aux: 0.0,
    };
    let (l, g) = packsft::Model::forward_backward(model, batch, scale).unwrap();
    let loss = l
        .sum
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        / l.n_targets as f64;
    let grads = model
        .params()
        .iter()
        .map(|p| {
            g.get(p.var.as_tensor())
                .unwrap_or_else(|| panic!("{} has no gradient", p.name))
                .to_device(&Device::Cpu)
                .unwrap()
        })
        .collect();
    (loss, grads)
}

/// Both safetensors files hold the same tensor names with bit-identical values.
pub fn assert_same_safetensors(a: &std::path::Path, b: &std::path::Path, what: &str) {
    let original = candle_core::safetensors::load(a, &Device::Cpu).unwrap();
    let saved = candle_core::safetensors::load(b, &Device::Cpu).unwrap();
    let mut ka: Vec<_> = original.keys().collect();
    let mut kb: Vec<_> = saved.keys().collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb, "{what}: tensor names differ");
    for (k, t) in &original {
        assert_eq!(max_abs_diff(t, &saved[k]), 0.0, "{what} {k}");
    }
}

/// `packsft train` on the quickstart recipe for `steps` steps without evaluation into `out`,
/// plus `extra` overrides: (success, stderr).
pub fn train_quickstart(out: &std::path::Path, steps: usize, extra: &[&str]) -> (bool, String) {
    let (steps, out) = (
        format!("train.max_steps={steps}"),
        format!("output_dir={}", out.display()),
    );
    let mut args = vec![
        "train",
        "recipes/quickstart.yaml",
        &steps,
        "train.eval_steps=0",
        "data.eval=null",
        &out,
    ];
    args.extend_from_slice(extra);
    let (ok, _, stderr) = packsft(&args);
    (ok, stderr)
}

/// A callback that stops training after step `.0` (a run interrupted there, to resume).
pub struct StopAt(pub usize);

impl packsft::Callback for StopAt {
    fn on_step_end(&mut self, m: &packsft::StepMetrics) -> packsft::Result<packsft::Control> {
        Ok(if m.step == self.0 {
            packsft::Control::Stop
        } else {
            packsft::Control::Continue
        })
    }
}
