//! Batches equal the references on the same token ids and tokenizer (fixtures made by
//! tests/fixtures/make_collator_fixtures.py with TRL 0.12.2 and transformers 4.46.3):
//! `DataCollatorForCompletionOnlyLM` single- and multi-turn, padded and padding-free, in every
//! corner case, and `DataCollatorWithFlattening`; through the library and through
//! `packsft inspect --json`.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use packsft::internals::masking::response_template_mask;
use packsft::{Collator, CompletionOnlyCollator, Example, HostBatch, TextTokenizer};
use packsft::{DataSpec, LoadOptions, LossOn, Pipeline, TokenTemplate, Truncation};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> serde_json::Value {
    let p = root().join(format!("tests/fixtures/collators/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn rows_u32(v: &serde_json::Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(ids).collect()
}

fn rows_i64(v: &serde_json::Value) -> Vec<Vec<i64>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect()
}

fn tokenizer() -> TextTokenizer {
    TextTokenizer::load(&root().join("recipes/quickstart/tokenizer.json")).unwrap()
}

/// Compares a packsft batch with a reference output, field by field.
fn assert_same(host: &HostBatch, out: &serde_json::Value, what: &str) {
    assert_eq!(
        host.input_ids,
        rows_u32(&out["input_ids"]),
        "{what}: input_ids"
    );
    assert_eq!(host.labels, rows_i64(&out["labels"]), "{what}: labels");
    if out.get("position_ids").is_some() {
        assert_eq!(
            host.position_ids,
            rows_u32(&out["position_ids"]),
            "{what}: position_ids"
        );
    }
    if let Some(am) = out.get("attention_mask") {
        let want: Vec<Vec<u8>> = rows_u32(am)
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as u8).collect())
            .collect();
        assert_eq!(
            host.attention_mask.as_ref().unwrap(),
            &want,
            "{what}: attention_mask"
        );
    }
}

#[test]
fn response_template_masking_equals_trl() {
    let mut n = 0;
    for file in ["trl_single_turn", "trl_multi_turn", "trl_pitfalls"] {
        let fx = fixture(file);
        for case in fx["cases"].as_array().unwrap() {
            let name = format!("{file}/{}", case["name"].as_str().unwrap());
            let c = &case["collator"];
            let response = ids(&c["response_token_ids"]);
            let instruction = c["instruction_token_ids"]
                .as_array()
                .map(|_| ids(&c["instruction_token_ids"]));
            let pad = case["tokenizer"]["pad_token_id"].as_u64().unwrap() as u32;
            let mut examples = Vec::new();
            let (mut resp_missing, mut instr_missing) = (0, 0);
            for e in case["examples"].as_array().unwrap() {
                let input = ids(&e["input_ids"]);
                let (mask, found) =
                    response_template_mask(&input, Some(pad), &response, instruction.as_deref());
                resp_missing += usize::from(found.response_missing);
                instr_missing += usize::from(found.instruction_missing);
                examples.push(Example::new(input, mask));
            }
            let kwargs = &c["kwargs"];
            let mut col = if kwargs["padding_free"].as_bool().unwrap() {
                CompletionOnlyCollator::padding_free(pad)
            } else {
                CompletionOnlyCollator::padded(pad)
            };
            col.pad_to_multiple_of = kwargs["pad_to_multiple_of"].as_u64().map(|m| m as usize);
            let b = col.collate(&examples, &Device::Cpu).unwrap();
            assert_same(b.host(), &case["output"], &name);
            // TRL's warnings, one per example whose template is missing.
            let warns: Vec<&str> = case["warnings"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w.as_str().unwrap())
                .collect();
            let count = |p: &str| warns.iter().filter(|w| w.starts_with(p)).count();
            assert_eq!(resp_missing, count("Could not find response key"), "{name}");
            assert_eq!(
                instr_missing,
                count("Could not find instruction key"),
                "{name}"
            );
            n += 1;
        }
    }
    assert!(n >= 16, "only {n} cases");
}

#[test]
fn text_templates_encode_as_trl_does() {
    // TRL encodes a text template alone, without special tokens; so does packsft.
    let tok = tokenizer();
    for file in ["trl_single_turn", "trl_multi_turn", "trl_pitfalls"] {
        for case in fixture(file)["cases"].as_array().unwrap() {
            let c = &case["collator"];
            if let Some(t) = c["kwargs"]["response_template"].as_str() {
                assert_eq!(tok.encode(t).unwrap(), ids(&c["response_token_ids"]));
            }
        }
    }
}

#[test]
fn flattening_equals_transformers_on_the_quickstart_rows() {
    let fx = fixture("flattening");
    let tok = tokenizer();
    let opts = LoadOptions {
        max_length: 128,
        truncation: Truncation::Error,
        vocab_size: tok.vocab_size(),
    };
    let d = tempfile::tempdir().unwrap();
    let col = CompletionOnlyCollator::padding_free(0);
    for case in fx["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let with_labels = case["collator"]["features"].as_array().unwrap().len() == 2;
        let mut jsonl = String::new();
        for e in case["examples"].as_array().unwrap() {
            if e["prompt"] == "" {
                // The 1-token example: pre-tokenized (nothing to render).
                jsonl += &serde_json::json!({"input_ids": e["input_ids"], "completion_mask": e["completion_mask"]}).to_string();
            } else {
                jsonl += &serde_json::json!({"prompt": e["prompt"], "completion": e["completion"]})
                    .to_string();
            }
            jsonl.push('\n');
        }
        let p = d.path().join(format!("{name}.jsonl"));
        std::fs::write(&p, jsonl).unwrap();
        let spec = DataSpec {
            loss_on: (!with_labels).then_some(LossOn::All),
            ..Default::default()
        };
        let pipe = Pipeline::new(Some(&tok), spec, opts.clone()).unwrap();
        let examples: Vec<Example> = if name.contains("one_token") {
            // Mixed formats are not one dataset: load the rows one by one.
            case["examples"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    let q = d.path().join("one.jsonl");
                    let row = if e["prompt"] == "" {
                        serde_json::json!({"input_ids": e["input_ids"], "completion_mask": [1]})
                    } else {
                        serde_json::json!({"prompt": e["prompt"], "completion": e["completion"]})
                    };
                    std::fs::write(&q, row.to_string()).unwrap();
                    let ds = Pipeline::new(
                        Some(&tok),
                        DataSpec::default(),
                        LoadOptions {
                            max_length: 128,
                            truncation: Truncation::Error,
                            vocab_size: 313,
                        },
                    )
                    .unwrap()
                    .load(&q);
                    match ds {
                        Ok(ds) => ds.examples[0].clone(),
                        // One token can carry no target: packsft drops it; the reference keeps
                        // it. Any other error is a failure.
                        Err(err) => {
                            let msg = err.to_string();
                            assert!(
                                msg.contains("no usable example")
                                    && msg.contains("without any target token"),
                                "{msg}"
                            );
                            assert_eq!(e["input_ids"].as_array().unwrap().len(), 1, "{msg}");
                            Example::new(ids(&e["input_ids"]), vec![false])
                        }
                    }
                })
                .collect()
        } else {
            pipe.load(&p).unwrap().examples
        };
        for (ex, e) in examples.iter().zip(case["examples"].as_array().unwrap()) {
            assert_eq!(ex.input_ids, ids(&e["input_ids"]), "{name}: tokenization");
        }
        let b = col.collate(&examples, &Device::Cpu).unwrap();
        assert_same(b.host(), &case["output"], name);
    }
}

fn write_recipe(dir: &Path, data: &Path, extra: &str) -> PathBuf {
    let r = dir.join("r.yaml");
    std::fs::write(
        &r,
        format!(
            "model:\n  tokenizer: {}\n  config: {{hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, max_position_embeddings: 512}}\ndata:\n  train: {}\n  max_length: 512\n{extra}output_dir: {}\n",
            root().join("recipes/quickstart/tokenizer.json").display(),
            data.display(),
            dir.join("out").display()
        ),
    )
    .unwrap();
    r
}

fn inspect_json(recipe: &Path, overrides: &[&str]) -> Vec<serde_json::Value> {
    let o = Command::new(env!("CARGO_BIN_EXE_packsft"))
        .arg("inspect")
        .arg(recipe)
        .args(overrides)
        .args(["--json", "--n", "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn same_json(got: &serde_json::Value, want: &serde_json::Value, what: &str) {
    for k in want.as_object().unwrap().keys() {
        assert_eq!(got[k], want[k], "{what}: {k}");
    }
}

#[test]
fn inspect_json_batches_equal_trl_from_text_rows() {
    let d = tempfile::tempdir().unwrap();
    for (file, instruction) in [("trl_single_turn", false), ("trl_multi_turn", true)] {
        let fx = fixture(file);
        let cases = fx["cases"].as_array().unwrap();
        let texts: String = cases[0]["examples"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| serde_json::json!({"text": e["text"]}).to_string() + "\n")
            .collect();
        let data = d.path().join(format!("{file}.jsonl"));
        std::fs::write(&data, texts).unwrap();
        let extra = format!(
            "collator:\n  response_template: \"### Assistant:\"\n{}train:\n  batch_size: 8\n  shuffle: false\n",
            if instruction { "  instruction_template: \"### Human:\"\n" } else { "" }
        );
        let recipe = write_recipe(d.path(), &data, &extra);
        for case in cases {
            let kw = &case["collator"]["kwargs"];
            let mut ov: Vec<String> = Vec::new();
            if kw["response_template"].is_array() {
                ov.push(format!(
                    "collator.response_template={}",
                    kw["response_template"]
                ));
                if instruction {
                    ov.push(format!(
                        "collator.instruction_template={}",
                        kw["instruction_template"]
                    ));
                }
            }
            if !kw["padding_free"].as_bool().unwrap() {
                ov.push("collator.padding_free=false".into());
            }
            if let Some(m) = kw["pad_to_multiple_of"].as_u64() {
                ov.push(format!("collator.pad_to_multiple_of={m}"));
            }
            let ov: Vec<&str> = ov.iter().map(String::as_str).collect();
            let batches = inspect_json(&recipe, &ov);
            let name = format!("{file}/{}", case["name"].as_str().unwrap());
            same_json(&batches[0], &case["output"], &name);
            if kw["padding_free"].as_bool().unwrap() {
                let n = case["output"]["input_ids"][0].as_array().unwrap().len();
                let cu = batches[0]["cu_seq_lens"].as_array().unwrap();
                assert_eq!(cu.last().unwrap().as_u64().unwrap() as usize, n, "{name}");
            }
        }
    }
}

#[test]
fn spans_and_response_template_agree_where_the_template_tokenizes_alike() {
    // The quickstart's prompt/completion rows: the default span method and TRL's search for
    // "Output:" train the same tokens (completion + EOS).
    let tok = tokenizer();
    let opts = LoadOptions {
        max_length: 128,
        truncation: Truncation::Error,
        vocab_size: 313,
    };
    let data = root().join("recipes/quickstart/eval.jsonl");
    let spans = Pipeline::new(Some(&tok), DataSpec::default(), opts.clone())
        .unwrap()
        .load(&data)
        .unwrap();
    let trl = Pipeline::new(
        Some(&tok),
        DataSpec {
            response_template: Some(TokenTemplate::Text("Output:".into())),
            ..Default::default()
        },
        opts,
    )
    .unwrap()
    .load(&data)
    .unwrap();
    assert_eq!(spans.examples, trl.examples);
    assert_eq!(trl.report.method, "response_template");
}
