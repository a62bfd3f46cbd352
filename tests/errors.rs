//! Bad input gets a clear error that names the file, line, field or value at fault, and leaves
//! no partial output behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use packsft::{load_jsonl, LoadOptions, Truncation};
use packsft::{DecoderModel, Error, Recipe};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn opts(max_length: usize, truncation: Truncation) -> LoadOptions {
    LoadOptions {
        max_length,
        truncation,
        vocab_size: 100,
    }
}

fn err_text(r: packsft::Result<impl Sized>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn malformed_json_names_file_and_line() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "bad.jsonl",
        "{\"input_ids\": [1, 2, 3]}\n\n{\"input_ids\": [1, 2,\n",
    );
    let e = err_text(load_jsonl(&p, None, &opts(16, Truncation::Error)));
    assert!(e.contains("bad.jsonl:3:"), "{e}");
    assert!(e.contains("invalid JSON"), "{e}");
}

#[test]
fn missing_and_mistyped_fields_are_named() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "a.jsonl", "{\"prompt\": \"hi\"}\n");
    let e = err_text(load_jsonl(&p, None, &opts(16, Truncation::Error)));
    assert!(
        e.contains("a.jsonl:1:") && e.contains("missing field `completion`"),
        "{e}"
    );

    let p = write(
        d.path(),
        "b.jsonl",
        "{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, \"x\"]}\n",
    );
    let e = err_text(load_jsonl(&p, None, &opts(16, Truncation::Error)));
    assert!(
        e.contains("b.jsonl:2:") && e.contains("`input_ids`[1]"),
        "{e}"
    );

    let p = write(d.path(), "c.jsonl", "{\"txt\": \"no such format\"}\n");
    let e = err_text(load_jsonl(&p, None, &opts(16, Truncation::Error)));
    assert!(
        e.contains("c.jsonl:1:") && e.contains("cannot tell the format") && e.contains("(txt)"),
        "{e}"
    );

    let p = write(
        d.path(),
        "d.jsonl",
        "{\"input_ids\": [1, 2, 3], \"completion_mask\": [0, 1]}\n",
    );
    let e = err_text(load_jsonl(&p, None, &opts(16, Truncation::Error)));
    assert!(
        e.contains("d.jsonl:1:") && e.contains("`completion_mask` has 2 entries"),
        "{e}"
    );

    let p = write(d.path(), "e.jsonl", "{\"input_ids\": [1, 200]}\n");
    let e = err_text(load_jsonl(&p, None, &opts(16, Truncation::Error)));
    assert!(
        e.contains("e.jsonl:1:") && e.contains("input_ids[1] = 200"),
        "{e}"
    );

    let p = write(d.path(), "f.jsonl", "[1, 2]\n");
    let e = err_text(load_jsonl(&p, None, &opts(16, Truncation::Error)));
    assert!(
        e.contains("f.jsonl:1:") && e.contains("expected a JSON object"),
        "{e}"
    );
}

#[test]
fn empty_dataset_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "empty.jsonl", "\n\n");
    let e = err_text(load_jsonl(&p, None, &opts(16, Truncation::Error)));
    assert!(e.contains("empty.jsonl") && e.contains("empty"), "{e}");
    // Rows exist but none has a target token.
    let p = write(
        d.path(),
        "nolabel.jsonl",
        "{\"input_ids\": [1, 2], \"completion_mask\": [0, 0]}\n",
    );
    let e = err_text(load_jsonl(&p, None, &opts(16, Truncation::Error)));
    assert!(
        e.contains("no usable example") && e.contains("1 without any target token"),
        "{e}"
    );
}

#[test]
fn long_examples_follow_the_truncation_policy() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "long.jsonl",
        "{\"input_ids\": [1, 2, 3], \"completion_mask\": [0, 1, 1]}\n{\"input_ids\": [1, 2, 3, 4, 5, 6], \"completion_mask\": [0, 0, 0, 1, 1, 1]}\n",
    );
    let e = err_text(load_jsonl(&p, None, &opts(4, Truncation::Error)));
    assert!(
        e.contains("long.jsonl:2:") && e.contains("6 tokens") && e.contains("max_length = 4"),
        "{e}"
    );

    let ds = load_jsonl(&p, None, &opts(4, Truncation::Drop)).unwrap();
    assert_eq!((ds.examples.len(), ds.report.dropped_too_long), (1, 1));

    let ds = load_jsonl(&p, None, &opts(4, Truncation::KeepStart)).unwrap();
    assert_eq!(ds.examples[1].input_ids, vec![1, 2, 3, 4]);
    assert_eq!(ds.examples[1].loss_mask, vec![false, false, false, true]);
    assert_eq!(ds.report.truncated, 1);

    let ds = load_jsonl(&p, None, &opts(4, Truncation::KeepEnd)).unwrap();
    assert_eq!(ds.examples[1].input_ids, vec![3, 4, 5, 6]);

    // Truncation that leaves no target drops the example and counts it.
    let ds = load_jsonl(&p, None, &opts(3, Truncation::KeepStart)).unwrap();
    assert_eq!((ds.examples.len(), ds.report.dropped_no_target), (1, 1));
}

const GOOD: &str = "model:\n  path: m\ndata:\n  train: t.jsonl\noutput_dir: out\n";

#[test]
fn recipe_errors_carry_line_and_column() {
    let p = Path::new("r.yaml");
    let text = "model:\n  path: m\ndata:\n  train: t.jsonl\n  shuffle_seed: 3\noutput_dir: out\n";
    let e = Recipe::parse(text, p, &[]).unwrap_err();
    let s = e.to_string();
    assert!(matches!(e, Error::Recipe { line: Some(5), .. }), "{s}");
    assert!(
        s.starts_with("r.yaml:5:") && s.contains("unknown field `shuffle_seed`"),
        "{s}"
    );

    let text = "model:\n  path: m\ndata:\n  train: t.jsonl\ntrain:\n  batch_size: eight\noutput_dir: out\n";
    let s = Recipe::parse(text, p, &[]).unwrap_err().to_string();
    assert!(
        s.starts_with("r.yaml:6:") && s.contains("batch_size"),
        "{s}"
    );

    let s = Recipe::parse("model: [\n", p, &[]).unwrap_err().to_string();
    assert!(s.starts_with("r.yaml:"), "{s}");

    let s = Recipe::parse(GOOD, p, &["train.lrr=1".into()])
        .unwrap_err()
        .to_string();
    assert!(
        s.contains("unknown field `lrr`") && s.contains("train.lrr=1"),
        "{s}"
    );
    let s = Recipe::parse(GOOD, p, &["train.lr".into()])
        .unwrap_err()
        .to_string();
    assert!(s.contains("key.path=value"), "{s}");
    let s = Recipe::parse(GOOD, p, &["train.batch_size=0".into()])
        .unwrap_err()
        .to_string();
    assert!(s.contains("train.batch_size must be at least 1"), "{s}");
    let s = Recipe::parse("data:\n  train: t\noutput_dir: o\nmodel: {}\n", p, &[])
        .unwrap_err()
        .to_string();
    assert!(s.contains("set model.path"), "{s}");
}

#[test]
fn overrides_set_typed_values() {
    let r = Recipe::parse(
        GOOD,
        Path::new("r.yaml"),
        &[
            "train.lr=3e-4".into(),
            "collator.padding_free=false".into(),
            "data.eval=e.jsonl".into(),
        ],
    )
    .unwrap();
    assert_eq!(r.train.lr, 3e-4);
    assert!(!r.collator.padding_free);
    assert_eq!(r.data.eval, Some(PathBuf::from("e.jsonl")));
}

#[test]
fn model_directories_without_config_or_weights_are_rejected() {
    let d = tempfile::tempdir().unwrap();
    let e = DecoderModel::from_pretrained(d.path(), &candle_core::Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no config.json"), "{e}");
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_tiny/config.json");
    std::fs::copy(fixture, d.path().join("config.json")).unwrap();
    let e = DecoderModel::from_pretrained(d.path(), &candle_core::Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no model.safetensors"), "{e}");
    let e = DecoderModel::from_pretrained(&d.path().join("nope"), &candle_core::Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
    std::fs::write(d.path().join("config.json"), "{\"model_type\": \"gpt2\"}").unwrap();
    let e = DecoderModel::from_pretrained(d.path(), &candle_core::Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("\"gpt2\" is not supported") && e.contains("llama"),
        "{e}"
    );
}

#[test]
fn a_failed_run_leaves_no_output_directory() {
    let d = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = write(
        d.path(),
        "train.jsonl",
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": 3}\n",
    );
    let out = d.path().join("out");
    let recipe = write(
        d.path(),
        "r.yaml",
        &format!(
            "model:\n  tokenizer: {}\n  config: {{hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2}}\ndata:\n  train: {}\noutput_dir: {}\n",
            root.join("recipes/quickstart/tokenizer.json").display(),
            data.display(),
            out.display()
        ),
    );
    let o = Command::new(env!("CARGO_BIN_EXE_packsft"))
        .arg("train")
        .arg(&recipe)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("train.jsonl:2:") && stderr.contains("`prompt` must be a string"),
        "{stderr}"
    );
    assert!(
        !out.exists(),
        "output_dir was created by a run that failed on its input"
    );

    // A typo in the inline model config is named, not ignored.
    let recipe2 = write(
        d.path(),
        "r2.yaml",
        &std::fs::read_to_string(&recipe)
            .unwrap()
            .replace("hidden_size", "hiden_size"),
    );
    let o = Command::new(env!("CARGO_BIN_EXE_packsft"))
        .arg("train")
        .arg(&recipe2)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("model.config: unknown field `hiden_size`"),
        "{stderr}"
    );
}

#[test]
fn token_ids_outside_the_vocabulary_are_named_before_any_kernel_runs() {
    use packsft::{Collator, CompletionOnlyCollator, Example, Model};
    let config = serde_json::json!({
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    });
    let dev = candle_core::Device::Cpu;
    let model = DecoderModel::new_random(config, 1, &dev).unwrap();
    let good = Example::new(vec![5, 6, 7, 8], vec![false, true, true, true]);
    let bad = Example::new(vec![5, 6, 70, 8], vec![false, true, true, true]);
    let loss_err = |b: &packsft::Batch| err_text(model.loss(b).map(|l| l.n_targets));
    for padding_free in [true, false] {
        let batch = (if padding_free {
            CompletionOnlyCollator::padding_free(0)
        } else {
            CompletionOnlyCollator::padded(0)
        })
        .collate(&[good.clone(), bad.clone()], &dev)
        .unwrap();
        let e = loss_err(&batch);
        // Packed: the second example starts at position 4 of the one row; padded: row 1.
        let at = if padding_free {
            "batch row 0, position 6"
        } else {
            "batch row 1, position 2"
        };
        assert!(
            e.contains(at) && e.contains("input id 70 is outside the model's vocabulary (size 64)"),
            "{e}"
        );
        assert!(err_text(model.eval_sums(&batch).map(|s| s.n_targets)).contains("input id 70"));
    }
    // A pad id past the vocabulary is caught where it pads.
    let short = Example::new(vec![5, 6], vec![false, true]);
    let batch = CompletionOnlyCollator::padded(99)
        .collate(&[good.clone(), short], &dev)
        .unwrap();
    let e = loss_err(&batch);
    assert!(e.contains("batch row 1, position 2: input id 99"), "{e}");
    // With the ids in range, the same pieces go through.
    let batch = CompletionOnlyCollator::padded(0)
        .collate(&[good, Example::new(vec![5, 6], vec![false, true])], &dev)
        .unwrap();
    assert!(model.loss(&batch).is_ok());
}

/// A copy of the tiny Llama fixture, with its config edited.
fn tiny_llama_copy(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama_tiny");
    let d = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), d.path().join(f)).unwrap();
    }
    let p = d.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    d
}

#[test]
fn a_config_without_model_type_is_named() {
    let d = tiny_llama_copy(|c| {
        c.as_object_mut().unwrap().remove("model_type");
    });
    let e = err_text(DecoderModel::from_pretrained(
        d.path(),
        &candle_core::Device::Cpu,
    ));
    assert!(
        e.contains("config.json") && e.contains("has no `model_type`"),
        "{e}"
    );
}

#[test]
fn arch_refuses_truncated_weights_and_weights_that_contradict_the_config() {
    let ok = tiny_llama_copy(|_| {});
    let (success, stdout, stderr) = common::packsft(&["arch", &ok.path().display().to_string()]);
    assert!(success, "{stderr}");
    assert!(stdout.contains("family          llama"), "{stdout}");
    let wider = tiny_llama_copy(|c| {
        c["intermediate_size"] = (c["intermediate_size"].as_u64().unwrap() * 2).into()
    });
    let (success, _, stderr) = common::packsft(&["arch", &wider.path().display().to_string()]);
    assert!(
        !success,
        "arch must not describe weights the config contradicts"
    );
    assert!(
        stderr.contains("has shape") && stderr.contains("config.json implies"),
        "{stderr}"
    );
    let cut = tiny_llama_copy(|_| {});
    let w = cut.path().join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() - 100]).unwrap();
    let (success, _, stderr) = common::packsft(&["arch", &cut.path().display().to_string()]);
    assert!(!success && stderr.contains("model.safetensors"), "{stderr}");
}

#[test]
fn data_roles_must_map_onto_roles() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "c.jsonl",
        "{\"messages\": [{\"role\": \"human\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n",
    );
    let tok = packsft::TextTokenizer::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/quickstart/tokenizer.json"),
    )
    .unwrap();
    let spec = packsft::DataSpec {
        template: Some("chatml".into()),
        roles: [("human".to_string(), "person".to_string())].into(),
        ..Default::default()
    };
    let e = err_text(
        packsft::Pipeline::new(Some(&tok), spec, opts(64, Truncation::Error))
            .and_then(|pipe| pipe.load(&p)),
    );
    assert!(
        e.contains("data.roles maps `human` to `person`, which is not a role"),
        "{e}"
    );
}

#[test]
fn generate_names_the_position_limit_and_output_dir_must_be_a_directory() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("m");
    let out_s = out.display().to_string();
    let (ok, stderr) = common::train_quickstart(&out, 1, &[]);
    assert!(ok, "{stderr}");
    // max_position_embeddings is 256: a prompt of 300 letters has more tokens than that.
    let long = "a ".repeat(300);
    let (ok, _, stderr) = common::packsft(&["generate", &out_s, "--prompt", &long]);
    assert!(
        !ok && stderr.contains("max_position_embeddings = 256"),
        "{stderr}"
    );
    let near = "a ".repeat(120);
    let (ok, _, stderr) = common::packsft(&[
        "generate",
        &out_s,
        "--prompt",
        &near,
        "--max-new-tokens",
        "400",
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("stopped at the model's max_position_embeddings"),
        "{stderr}"
    );
    // An output_dir that is a file.
    let file = d.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let (ok, stderr) = common::train_quickstart(&file, 1, &[]);
    assert!(
        !ok && stderr.contains("is a file, not a directory"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
}
