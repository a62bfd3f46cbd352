//! The commands end to end on the shipped quickstart (shortened): train writes a Hugging Face
//! directory and metrics, eval prints its JSON line, generate decodes.

use std::path::Path;
use std::process::Command;

mod common;
use common::packsft;

fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().expect("some stdout"))
        .expect("last stdout line is JSON")
}

#[test]
fn train_eval_generate_on_the_quickstart() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("run");
    let out_s = out.to_string_lossy().to_string();
    let before = {
        // The untrained model's eval loss: a fresh init of the recipe's model, evaluated.
        let (ok, stdout, stderr) = packsft(&[
            "eval",
            "recipes/quickstart.yaml",
            "data.eval=recipes/quickstart/eval.jsonl",
        ]);
        assert!(ok, "{stderr}");
        last_json(&stdout)
    };
    let (ok, stdout, stderr) = packsft(&[
        "train",
        "recipes/quickstart.yaml",
        "train.max_steps=60",
        "train.warmup_steps=5",
        "train.eval_steps=30",
        "logging.eval_samples=2",
        "logging.eval_sample_tokens=8",
        &format!("output_dir={out_s}"),
    ]);
    assert!(ok, "{stderr}");
    let summary = last_json(&stdout);
    assert_eq!(summary["steps"], 60);

    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "metrics.jsonl",
        "recipe.yaml",
    ] {
        assert!(
            out.join(f).exists(),
            "{f} missing from the output directory"
        );
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");

    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<&serde_json::Value> = rows.iter().filter(|r| r.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 60);
    for (i, r) in steps.iter().enumerate() {
        assert_eq!(r["step"], i + 1);
        for k in ["loss", "lr", "grad_norm", "tokens", "target_tokens"] {
            assert!(r[k].is_number(), "metrics row {i} lacks {k}");
        }
    }
    let evals: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| r.get("eval_loss").is_some())
        .collect();
    assert_eq!(evals.len(), 2);
    // Each evaluation logs two eval prompts continued by the model (logging.eval_samples),
    // decoded with the recipe's tokenizer, beside the eval set's answers.
    for e in &evals {
        let samples = e["samples"].as_array().expect("eval samples");
        assert_eq!(samples.len(), 2);
        for s in samples {
            assert!(s["prompt"].as_str().unwrap().contains("Task:"), "{s}");
            assert!(!s["reference"].as_str().unwrap().trim().is_empty(), "{s}");
            assert!(s["completion"].is_string(), "{s}");
        }
    }

    // eval of the trained directory: a lower loss than the untrained model's, same token count.
    let (ok, stdout, stderr) = packsft(&[
        "eval",
        "recipes/quickstart.yaml",
        &format!("model.path={out_s}"),
        "model.config=null",
        "model.tokenizer=null",
    ]);
    assert!(ok, "{stderr}");
    let after = last_json(&stdout);
    assert_eq!(after["eval_tokens"], before["eval_tokens"]);
    let (b, a) = (
        before["eval_loss"].as_f64().unwrap(),
        after["eval_loss"].as_f64().unwrap(),
    );
    assert!(a < 0.75 * b, "eval loss {b} -> {a}");
    // The eval loss the trainer logged at the end equals the one `eval` computes.
    assert!((summary["eval_loss"].as_f64().unwrap() - a).abs() < 1e-6);

    let (ok, stdout, stderr) = packsft(&[
        "generate",
        &out_s,
        "--prompt",
        "Task: copy\nInput: a b c\nOutput:",
        "--max-new-tokens",
        "8",
    ]);
    assert!(ok, "{stderr}");
    let prompt = "Task: copy\nInput: a b c\nOutput:";
    let continuation = stdout
        .strip_prefix(prompt)
        .unwrap_or_else(|| panic!("{stdout}"))
        .trim_end_matches('\n');
    // The same greedy continuation computed independently: every position's logits of the
    // whole sequence (`all_logits`), arg-max of the last, until EOS or 8 tokens.
    let dir = Path::new(&out_s);
    let model = packsft::DecoderModel::from_pretrained(dir, &candle_core::Device::Cpu).unwrap();
    let tok = packsft::TextTokenizer::load(dir).unwrap();
    let mut ids: Vec<u32> = tok.bos_id.filter(|_| tok.add_bos).into_iter().collect();
    ids.extend(tok.encode(prompt).unwrap());
    let n_prompt = ids.len();
    for _ in 0..8 {
        let ex = packsft::Example::new(ids.clone(), vec![false; ids.len()]);
        let batch = packsft::Batch::packed(
            &[ex],
            packsft::LossNormalization::Tokens,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let logits = model.all_logits(&batch).unwrap();
        let last = logits.get(ids.len() - 1).unwrap().to_vec1::<f32>().unwrap();
        let next = (0..last.len())
            .max_by(|&a, &b| last[a].total_cmp(&last[b]).then(b.cmp(&a)))
            .unwrap() as u32;
        if Some(next) == tok.eos_id {
            break;
        }
        ids.push(next);
    }
    let want = tok.decode(&ids[n_prompt..]).unwrap();
    assert_eq!(continuation, want);
    assert!(!want.is_empty(), "a trained model continues the prompt");
    assert!(Path::new(&out_s).join("model.safetensors").exists());
}

/// The (step, loss) rows of `metrics.jsonl`, read while a run may be writing it: only the
/// lines already ended (the last one may be half written).
fn metric_losses(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("loss").is_some())
        .map(|r| format!("{} {}", r["step"], r["loss"]))
        .collect()
}

#[test]
fn sigterm_checkpoints_and_resume_from_latest_finishes_the_same_run() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("straight"), d.path().join("interrupted"));
    let common = [
        "train.max_steps=150",
        "train.eval_steps=0",
        "train.save_steps=1000",
        "data.eval=null",
    ];
    let (ok, _, stderr) = packsft(
        &[
            &[
                "train",
                "recipes/quickstart.yaml",
                &format!("output_dir={}", a.display()),
            ][..],
            &common[..],
        ]
        .concat(),
    );
    assert!(ok, "{stderr}");

    let child = Command::new(env!("CARGO_BIN_EXE_packsft"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "train",
            "recipes/quickstart.yaml",
            &format!("output_dir={}", b.display()),
        ])
        .args(common)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until a few steps are done, then ask it to stop.
    let t0 = std::time::Instant::now();
    while !b.join("metrics.jsonl").exists() || metric_losses(&b).len() < 5 {
        assert!(t0.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an interrupted run must not report success"
    );
    assert!(stderr.contains("interrupted: saved"), "{stderr}");
    let (step, ckpt) = packsft::internals::checkpoint::list(&b)
        .pop()
        .expect("a checkpoint after SIGTERM");
    assert!((5..150).contains(&step), "stopped at {step}");
    assert!(
        !b.join("model.safetensors").exists(),
        "no final model for an interrupted run"
    );
    assert!(ckpt.join("tokenizer.json").exists() && ckpt.join("recipe.yaml").exists());

    let (ok, _, stderr) = packsft(
        &[
            &[
                "train",
                "recipes/quickstart.yaml",
                &format!("output_dir={}", b.display()),
                "resume_from=latest",
            ][..],
            &common[..],
        ]
        .concat(),
    );
    assert!(ok, "{stderr}");
    assert_eq!(
        metric_losses(&b),
        metric_losses(&a),
        "resumed run differs from the uninterrupted one"
    );
    assert_eq!(
        std::fs::read(a.join("model.safetensors")).unwrap(),
        std::fs::read(b.join("model.safetensors")).unwrap()
    );
}

#[test]
fn bad_resume_and_eval_settings_fail_before_training() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let o = format!("output_dir={}", out.display());
    let (ok, _, stderr) = packsft(&[
        "train",
        "recipes/quickstart.yaml",
        &o,
        "resume_from=/nonexistent/checkpoint-3",
    ]);
    assert!(
        !ok && stderr.contains("/nonexistent/checkpoint-3 is not a packsft checkpoint"),
        "{stderr}"
    );
    let (ok, _, stderr) = packsft(&[
        "train",
        "recipes/quickstart.yaml",
        &o,
        "data.eval=recipes/quickstart/missing.jsonl",
    ]);
    assert!(!ok && stderr.contains("missing.jsonl"), "{stderr}");
    let (ok, _, stderr) = packsft(&["train", "recipes/quickstart.yaml", &o, "data.eval=null"]);
    assert!(
        !ok && stderr
            .contains("train.eval_steps = 250 but data.eval (or data.eval_ratio) is not set"),
        "{stderr}"
    );
    assert!(
        !out.exists(),
        "a run that failed on its input created {}",
        out.display()
    );
}

#[test]
fn bench_and_bench_attn_print_one_json_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("bench.jsonl");
    let rows: Vec<String> = (0..6)
        .map(|i| {
            let n = 12 + 5 * i;
            let ids: Vec<u32> = (0..n).map(|t| 3 + (t * 7 + i) as u32 % 500).collect();
            let mask: Vec<u8> = (0..n).map(|t| (t >= n / 2) as u8).collect();
            serde_json::json!({"input_ids": ids, "completion_mask": mask}).to_string()
        })
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let path = data.to_str().unwrap();
    let run = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec!["bench", path, "--bs", "2", "--steps", "2", "--warmup", "1"];
        args.extend_from_slice(extra);
        let (ok, out, err) = common::packsft(&args);
        assert!(ok, "{err}");
        serde_json::from_str(out.lines().last().unwrap()).unwrap()
    };
    let packed = run(&[]);
    let padded = run(&["--padded"]);
    // On the CPU the default dtype is f32 and attention the eager reference.
    assert_eq!(packed["dtype"], "f32");
    assert_eq!(packed["attn"], "eager-varlen");
    assert_eq!(packed["mode"], "packed");
    assert_eq!(packed["pad_frac"], 0.0);
    assert!(padded["pad_frac"].as_f64().unwrap() > 0.0);
    assert!(packed["tokens_per_s"].as_f64().unwrap() > 0.0);
    // Same examples, same loss either way (f32).
    let (a, b) = (
        packed["final_loss"].as_f64().unwrap(),
        padded["final_loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() / a < 1e-5, "{a} vs {b}");
    // The layers through candle's autograd (for comparison): the same loss.
    let auto = run(&["--autograd-layers"])["final_loss"].as_f64().unwrap();
    assert!((auto - a).abs() / a < 1e-5, "{auto} vs {a}");
    let (ok, _, err) = common::packsft(&["bench", path, "--dtype", "fp8"]);
    assert!(!ok && err.contains("fp8") && err.contains("auto"), "{err}");

    let (ok, out, err) = common::packsft(&[
        "bench-attn",
        "--device",
        "cpu",
        "--equal",
        "2x16",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--head-dim",
        "8",
        "--iters",
        "1",
    ]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(r["attn"], "packsft-eager");
    assert_eq!(r["tokens_per_batch"], 32.0);
    assert!(r["fwd_bwd_ms"].as_f64().unwrap() > 0.0);
    let (ok, _, err) = common::packsft(&["bench-attn", "--device", "cpu", "--equal", "2by16"]);
    assert!(!ok && err.contains("2by16"), "{err}");
}

/// A recipe run logs to TensorBoard in `output_dir/runs`: a version record, the recipe as text,
/// one event per step and per evaluation (the format itself is pinned against TensorBoard's
/// reader by `train::tensorboard::tests`).
#[test]
fn training_writes_tensorboard_events() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("tb");
    let (ok, _, stderr) = packsft(&[
        "train",
        "recipes/quickstart.yaml",
        "train.max_steps=3",
        "train.eval_steps=0",
        &format!("output_dir={}", out.display()),
    ]);
    assert!(ok, "{stderr}");
    let files: Vec<_> = std::fs::read_dir(out.join("runs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("events.out.tfevents."));
    let bytes = std::fs::read(&files[0]).unwrap();
    let (mut at, mut records) = (0, Vec::new());
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        records.push(&bytes[at + 12..at + 12 + len]);
        at += 16 + len;
    }
    assert_eq!(at, bytes.len());
    // Version, recipe, 3 steps, the final evaluation.
    assert_eq!(records.len(), 6);
    let has = |r: &[u8], s: &str| r.windows(s.len()).any(|w| w == s.as_bytes());
    assert!(has(records[0], "brain.Event:2"));
    assert!(has(records[1], "recipe") && has(records[1], "max_steps: 3"));
    assert!(records[2..5]
        .iter()
        .all(|r| has(r, "train/loss") && has(r, "train/grad_norm")));
    assert!(has(records[5], "eval/loss") && has(records[5], "eval/accuracy"));
}

/// `generate` samples reproducibly by seed, stops at stop strings, and reads prompts and chats
/// from a JSONL file into one (chats through the tokenizer's chat template).
#[test]
fn generate_samples_stops_and_reads_and_writes_files() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("m");
    let (ok, stderr) = common::train_quickstart(&out, 30, &[]);
    assert!(ok, "{stderr}");
    let dir = out.display().to_string();
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            &dir,
            "--prompt",
            "Task: sort\nInput: c a b\nOutput:",
        ];
        args.extend_from_slice(extra);
        let (ok, stdout, stderr) = packsft(&args);
        assert!(ok, "{stderr}");
        stdout
    };
    let greedy = gen(&[]);
    assert_eq!(gen(&["--temperature", "0"]), greedy);
    assert_eq!(gen(&["--temperature", "1", "--top-k", "1"]), greedy);
    let a = gen(&[
        "--temperature",
        "1.5",
        "--seed",
        "7",
        "--max-new-tokens",
        "24",
    ]);
    assert_eq!(
        a,
        gen(&[
            "--temperature",
            "1.5",
            "--seed",
            "7",
            "--max-new-tokens",
            "24"
        ])
    );
    let others: Vec<String> = (8..12)
        .map(|s| {
            gen(&[
                "--temperature",
                "1.5",
                "--seed",
                &s.to_string(),
                "--max-new-tokens",
                "24",
            ])
        })
        .collect();
    assert!(
        others.iter().any(|o| *o != a),
        "seeds should matter: {a:?} {others:?}"
    );
    // A stop string that the greedy continuation contains cuts it there.
    let cont = greedy.trim_end_matches('\n');
    let cont = &cont["Task: sort\nInput: c a b\nOutput:".len()..];
    if let Some(ch) = cont.chars().nth(2) {
        let stop = ch.to_string();
        let cut = gen(&["--stop", &stop]);
        let want = &cont[..cont.find(&stop).unwrap()];
        assert_eq!(
            cut.trim_end_matches('\n'),
            format!("Task: sort\nInput: c a b\nOutput:{want}")
        );
    }
    // Files: a prompt row and a chat row (a chat template beside the tokenizer).
    std::fs::write(
        out.join("chat_template.jinja"),
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
    )
    .unwrap();
    let input = d.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"prompt\": \"Task: copy\\nInput: a b\\nOutput:\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"id\": 7}\n",
    )
    .unwrap();
    let output = d.path().join("out.jsonl");
    let (ok, _, stderr) = packsft(&[
        "generate",
        &dir,
        "--input",
        &input.display().to_string(),
        "--output",
        &output.display().to_string(),
        "--max-new-tokens",
        "6",
    ]);
    assert!(ok, "{stderr}");
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert!(rows[0]["completion"].is_string() && rows[1]["completion"].is_string());
    assert_eq!(rows[1]["id"], 7);
    // Prompts decoded together give what they give one at a time (greedy, and sampled with a
    // stop string), in batches of any size.
    std::fs::write(
        &input,
        "{\"prompt\": \"Task: copy\\nInput: a b\\nOutput:\"}\n{\"prompt\": \"Task: sort\\nInput: c a b\\nOutput:\"}\n{\"prompt\": \"Task\"}\n{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n{\"prompt\": \"Task: reverse\\nInput: x y z w\\nOutput:\"}\n",
    )
    .unwrap();
    let batched = |batch: &str, sample: &[&str]| {
        let mut args = vec![
            "generate",
            &dir,
            "--input",
            input.to_str().unwrap(),
            "--max-new-tokens",
            "12",
            "--batch-size",
            batch,
            "--output",
            output.to_str().unwrap(),
        ];
        args.extend_from_slice(sample);
        let (ok, _, stderr) = packsft(&args);
        assert!(ok, "{stderr}");
        std::fs::read_to_string(&output).unwrap()
    };
    let sampled = ["--temperature", "1.3", "--seed", "3", "--stop", "a"];
    for sample in [&[][..], &sampled[..]] {
        let one = batched("1", sample);
        assert_eq!(one.lines().count(), 5, "{one}");
        assert_eq!(batched("2", sample), one);
        assert_eq!(batched("8", sample), one);
    }
    // A bad row names its line.
    std::fs::write(&input, "{\"prompt\": \"x\"}\n{\"text\": 1}\n").unwrap();
    let (ok, _, stderr) = packsft(&["generate", &dir, "--input", &input.display().to_string()]);
    assert!(
        !ok && stderr.contains("in.jsonl:2") && stderr.contains("`prompt`"),
        "{stderr}"
    );
    // Chat-template variables: a JSON object; a name the render sets itself is refused.
    std::fs::write(
        &input,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
    )
    .unwrap();
    let kwargs = |value: &str| {
        let input = input.display().to_string();
        packsft(&[
            "generate",
            &dir,
            "--input",
            &input,
            "--chat-template-kwargs",
            value,
        ])
    };
    let (ok, _, stderr) = kwargs("[1]");
    assert!(
        !ok && stderr.contains("a JSON object of template variables"),
        "{stderr}"
    );
    let (ok, _, stderr) = kwargs("{\"add_generation_prompt\": false}");
    assert!(
        !ok && stderr.contains("`add_generation_prompt`"),
        "{stderr}"
    );
    let (ok, stdout, stderr) = kwargs("{\"enable_thinking\": false}");
    assert!(ok, "{stdout}{stderr}");
}

/// Two sources mixed by weight: a seeded draw in their proportions until the first runs out,
/// each source read with its own format, the same mix on every load (so a resumed run continues
/// the same data), and weights checked.
#[test]
fn training_sources_mix_by_weight() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.jsonl");
    let b = d.path().join("b.jsonl");
    let rows_a: String = (0..300)
        .map(|i| {
            format!(
                "{{\"prompt\": \"Task: copy\\nInput: a {i}\\nOutput:\", \"completion\": \" a\"}}\n"
            )
        })
        .collect();
    let rows_b: String = (0..300)
        .map(|i| format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"b {i}\"}}, {{\"role\": \"assistant\", \"content\": \"b\"}}]}}\n"))
        .collect();
    std::fs::write(&a, rows_a).unwrap();
    std::fs::write(&b, rows_b).unwrap();
    let recipe = d.path().join("mix.yaml");
    let base = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/quickstart.yaml"),
    )
    .unwrap();
    let mix = format!(
        "  train:\n    - {{path: {}, weight: 0.75}}\n    - {{path: {}, weight: 0.25, format: messages, template: qwen2}}\n",
        a.display(),
        b.display()
    );
    let text = base.replace("  train: recipes/quickstart/train.jsonl\n", &mix);
    assert_ne!(text, base);
    std::fs::write(&recipe, text).unwrap();
    let inspect = || {
        let (ok, stdout, stderr) = packsft(&[
            "inspect",
            &recipe.display().to_string(),
            "--json",
            "--n",
            "1000",
        ]);
        assert!(ok, "{stderr}");
        stdout
    };
    let first = inspect();
    assert_eq!(first, inspect(), "the mix is the same on every load");
    let rows: Vec<String> = first
        .lines()
        .flat_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["rows"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    let from_a = rows.iter().filter(|r| r.contains("a.jsonl")).count();
    let from_b = rows.iter().filter(|r| r.contains("b.jsonl")).count();
    // The first exhausted is a (300 rows at 3/4 of the draws): about 100 from b.
    assert_eq!(from_a, 300, "{from_a} {from_b}");
    assert!((60..=140).contains(&from_b), "{from_a} {from_b}");
    // Bad weights are named.
    let bad = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("weight: 0.25", "weight: 0");
    std::fs::write(&recipe, bad).unwrap();
    let (ok, _, stderr) = packsft(&["inspect", &recipe.display().to_string()]);
    assert!(
        !ok && stderr.contains("data.train[1]") && stderr.contains("weight 0"),
        "{stderr}"
    );
}

/// `packsft bench-generate` times batched greedy decoding at a bench shape and reports new
/// tokens per second; every prompt runs its whole budget.
#[test]
fn bench_generate_reports_new_tokens_per_second() {
    let (ok, stdout, stderr) = packsft(&[
        "bench-generate",
        "--batch-size",
        "3",
        "--prompt-len",
        "5",
        "--new-tokens",
        "4",
        "--repeats",
        "1",
    ]);
    assert!(ok, "{stderr}");
    let r: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        (r["batch_size"].as_u64(), r["new_tokens"].as_u64()),
        (Some(3), Some(4))
    );
    let (secs, tps) = (
        r["seconds"].as_f64().unwrap(),
        r["new_tokens_per_s"].as_f64().unwrap(),
    );
    assert!(secs > 0.0 && (tps * secs - 12.0).abs() < 1e-6, "{r}");
    let (ok, _, stderr) = packsft(&["bench-generate", "--batch-size", "0"]);
    assert!(!ok && stderr.contains("--batch-size"), "{stderr}");
}
