//! `packsft inspect` (token view and JSON, train and eval sets) and `packsft bench-data` on the
//! quickstart recipe.

mod common;
use common::packsft;

#[test]
fn inspect_shows_the_report_and_trained_tokens() {
    let (ok, out, err) = packsft(&["inspect", "recipes/quickstart.yaml", "--n", "1"]);
    assert!(ok, "{err}");
    assert!(out.contains("4000 rows, format prompt_completion, template none, masking spans (loss on completion)"), "{out}");
    assert!(out.contains("supervised 21957 of 79914 tokens"), "{out}");
    assert!(out.contains("batch 1 (step 1): 16 examples"), "{out}");
    // Not a terminal: no escape codes, trained runs between ⟦ and ⟧, the completion and its EOS.
    assert!(!out.contains('\u{1b}'));
    let first = out
        .lines()
        .find(|l| l.trim_start().starts_with("<s>Task:"))
        .unwrap();
    assert!(
        first.contains("\\nOutput:⟦ ") && first.ends_with("</s>⟧"),
        "{first}"
    );
    assert_eq!(
        out.lines()
            .filter(|l| l.trim_start().starts_with("<s>Task:"))
            .count(),
        16
    );
    assert!(
        err.contains("dataset") && err.contains("supervised_ratio"),
        "{err}"
    );

    // JSON: per batch, the layout of transformers' DataCollatorWithFlattening.
    let (ok, out, err) = packsft(&[
        "inspect",
        "recipes/quickstart.yaml",
        "--json",
        "--n",
        "3",
        "train.batch_size=4",
    ]);
    assert!(ok, "{err}");
    let batches: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(batches.len(), 3);
    for b in &batches {
        let ids = b["input_ids"][0].as_array().unwrap();
        let labels = b["labels"][0].as_array().unwrap();
        let pos = b["position_ids"][0].as_array().unwrap();
        let cu: Vec<usize> = b["cu_seq_lens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(
            (ids.len(), labels.len(), pos.len()),
            (*cu.last().unwrap(), ids.len(), ids.len())
        );
        assert_eq!(cu.len(), 5);
        for w in cu.windows(2) {
            assert_eq!(pos[w[0]], 0);
            assert_eq!(labels[w[0]], -100);
            assert_eq!(labels[w[1] - 1], 2, "each example ends with a trained EOS");
        }
        assert_eq!(b["rows"].as_array().unwrap().len(), 4);
    }
    // Padded: attention_mask instead of cu_seq_lens.
    let (ok, out, _) = packsft(&[
        "inspect",
        "recipes/quickstart.yaml",
        "--json",
        "--n",
        "1",
        "collator.padding_free=false",
    ]);
    assert!(ok);
    let b: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert!(b.get("cu_seq_lens").is_none() && b["attention_mask"].as_array().unwrap().len() == 16);
    // The eval set, in evaluation order.
    let (ok, out, _) = packsft(&["inspect", "recipes/quickstart.yaml", "--eval", "--n", "1"]);
    assert!(ok);
    assert!(
        out.contains("recipes/quickstart/eval.jsonl: 200 rows") && out.contains("eval.jsonl:1 ·"),
        "{out}"
    );
    let (ok, _, err) = packsft(&[
        "inspect",
        "recipes/quickstart.yaml",
        "--eval",
        "data.eval=null",
        "train.eval_steps=0",
    ]);
    assert!(!ok && err.contains("no data.eval"), "{err}");
    // A held-out share instead of an eval file.
    let (ok, out, err) = packsft(&[
        "inspect",
        "recipes/quickstart.yaml",
        "--eval",
        "--n",
        "0",
        "data.eval=null",
        "data.eval_ratio=0.1",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("train.jsonl: 400 rows"), "{out}");
}

#[test]
fn bench_data_reports_throughput() {
    let (ok, out, err) = packsft(&[
        "bench-data",
        "recipes/quickstart.yaml",
        "--repeat",
        "1",
        "--threads",
        "1",
    ]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(
        (
            r["rows"].as_u64(),
            r["examples"].as_u64(),
            r["batches"].as_u64()
        ),
        (Some(4000), Some(4000), Some(250))
    );
    assert_eq!(r["tokens"].as_u64(), Some(79914));
    assert!(r["examples_per_s"].as_f64().unwrap() > 0.0);
}
