//! Every bad input of the data layer names its file, line (or row) and field, and a run that
//! meets one (or crosses a recipe threshold) stops before writing anything.

use std::path::{Path, PathBuf};
use std::process::Command;

use packsft::TextTokenizer;
use packsft::{DataSpec, LoadOptions, Pipeline, TokenTemplate, Truncation};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tok() -> TextTokenizer {
    TextTokenizer::load(&root().join("recipes/quickstart/tokenizer.json")).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn load_err(path: &Path, spec: DataSpec) -> String {
    let t = tok();
    let o = LoadOptions {
        max_length: 512,
        truncation: Truncation::Error,
        vocab_size: 313,
    };
    match Pipeline::new(Some(&t), spec, o).and_then(|p| p.load(path)) {
        Ok(_) => panic!("expected an error for {}", path.display()),
        Err(e) => e.to_string(),
    }
}

fn template(t: &str) -> DataSpec {
    DataSpec {
        template: Some(t.into()),
        ..Default::default()
    }
}

#[test]
fn malformed_json_arrays_name_the_line() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "a.json",
        "[\n {\"text\": \"a\"},\n {\"text\": \"b\",}\n]\n",
    );
    let e = load_err(&p, DataSpec::default());
    assert!(e.contains("a.json:3:") && e.contains("invalid JSON"), "{e}");
    let p = write(d.path(), "b.json", "[\n {\"text\": \"a\"},\n 7\n]\n");
    let e = load_err(&p, DataSpec::default());
    assert!(
        e.contains("b.json:3:") && e.contains("expected a JSON object, got a number"),
        "{e}"
    );
}

#[test]
fn missing_and_mistyped_fields_are_named() {
    let d = tempfile::tempdir().unwrap();
    let mut spec = DataSpec::default();
    spec.fields.insert("prompt".into(), "question".into());
    let p = write(
        d.path(),
        "a.jsonl",
        "{\"question\": \"q\", \"completion\": \"c\"}\n{\"question\": 3, \"completion\": \"c\"}\n",
    );
    let e = load_err(&p, spec.clone());
    assert!(
        e.contains("a.jsonl:2:")
            && e.contains("field `question` (data.fields.prompt) must be a string, got a number"),
        "{e}"
    );
    let p = write(d.path(), "b.jsonl", "{\"completion\": \"c\"}\n");
    let e = load_err(&p, spec);
    assert!(
        e.contains("b.jsonl:1:") && e.contains("missing field `question` (data.fields.prompt)"),
        "{e}"
    );
    let p = write(
        d.path(),
        "c.jsonl",
        "{\"messages\": [{\"role\": \"user\"}]}\n",
    );
    let e = load_err(&p, template("qwen2"));
    assert!(
        e.contains("c.jsonl:1:") && e.contains("`messages[0]` has no `content`"),
        "{e}"
    );
    let p = write(d.path(), "d.jsonl", "{\"messages\": \"hi\"}\n");
    let e = load_err(&p, template("qwen2"));
    assert!(
        e.contains("`messages` must be an array of messages, got a string"),
        "{e}"
    );
    let p = write(
        d.path(),
        "e.jsonl",
        "{\"instruction\": \"i\", \"input\": 4, \"output\": \"o\"}\n",
    );
    let e = load_err(&p, DataSpec::default());
    assert!(
        e.contains("e.jsonl:1:") && e.contains("field `input` must be a string, got a number"),
        "{e}"
    );
    let p = write(
        d.path(),
        "f.jsonl",
        "{\"input_ids\": [1, 2], \"labels\": [-100, 5]}\n",
    );
    let e = load_err(&p, DataSpec::default());
    assert!(
        e.contains("f.jsonl:1:")
            && e.contains("labels[1] = 5 is neither -100 nor input_ids[1] = 2"),
        "{e}"
    );
    let p = write(d.path(), "g.jsonl", "{\"txt\": \"x\"}\n");
    let e = load_err(&p, DataSpec::default());
    assert!(
        e.contains("g.jsonl:1:") && e.contains("cannot tell the format") && e.contains("(txt)"),
        "{e}"
    );
}

#[test]
fn unknown_roles_are_named() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "m.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"bot\", \"content\": \"b\"}]}\n",
    );
    let e = load_err(&p, template("qwen2"));
    assert!(
        e.contains("m.jsonl:2:") && e.contains("`messages[1].role`: unknown role `bot`"),
        "{e}"
    );
    // data.roles maps it.
    let mut spec = template("qwen2");
    spec.roles.insert("bot".into(), "assistant".into());
    let t = tok();
    let ds = Pipeline::new(
        Some(&t),
        spec,
        LoadOptions {
            max_length: 512,
            truncation: Truncation::Error,
            vocab_size: 313,
        },
    )
    .unwrap()
    .load(&p)
    .unwrap();
    assert_eq!(ds.examples.len(), 2);
    let p = write(d.path(), "s.jsonl", "{\"conversations\": [{\"from\": \"human\", \"value\": \"a\"}, {\"from\": \"robot\", \"value\": \"b\"}]}\n");
    let e = load_err(&p, template("qwen2"));
    assert!(
        e.contains("s.jsonl:1:") && e.contains("`conversations[1].from`: unknown role `robot`"),
        "{e}"
    );
}

#[test]
fn template_failures_name_the_template_and_line() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "g.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n",
    );
    let e = load_err(&p, template("gemma"));
    assert!(
        e.contains("g.jsonl:2:")
            && e.contains("template chat/gemma.jinja line 1: System role not supported"),
        "{e}"
    );
    // A user template that fails at run time.
    let j = write(
        d.path(),
        "mine.jinja",
        "{% for m in messages %}\n{{ m.content | nosuchfilter }}\n{% endfor %}",
    );
    let e = load_err(&p, template(j.to_str().unwrap()));
    assert!(
        e.contains("g.jsonl:1:") && e.contains("mine.jinja line 2") && e.contains("nosuchfilter"),
        "{e}"
    );
    // An Alpaca row without instruction under a custom column template.
    let p = write(d.path(), "q.jsonl", "{\"question\": \"q\"}\n");
    let e = load_err(&p, template("question_answer"));
    assert!(
        e.contains("q.jsonl:1:")
            && e.contains("question_answer.jinja line")
            && e.contains("the row has no `answer`"),
        "{e}"
    );
    // A template that drops assistant turns cannot be trained on.
    let j = write(
        d.path(),
        "users.jinja",
        "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}",
    );
    let p = write(d.path(), "u.jsonl", "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n");
    let e = load_err(&p, template(j.to_str().unwrap()));
    assert!(
        e.contains("u.jsonl:1:") && e.contains("the turn is not in the text"),
        "{e}"
    );
}

#[test]
fn a_response_template_found_nowhere_is_an_error_with_a_fix() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "t.jsonl",
        "{\"text\": \"### Human: hi\\n### Assistant: yo\"}\n{\"text\": \"### Human: a\\n### Assistant: b\"}\n",
    );
    // "Assistant:" alone encodes differently than inside "### Assistant:" (TRL's classic pitfall).
    let e = load_err(
        &p,
        DataSpec {
            response_template: Some(TokenTemplate::Text("Assistant:".into())),
            ..Default::default()
        },
    );
    let ctx = tok().encode(" Assistant:").unwrap();
    assert!(
        e.contains("t.jsonl") && e.contains("found in none of the 2 rows"),
        "{e}"
    );
    assert!(
        e.contains(&format!("set collator.response_template: {ctx:?}")),
        "{e}"
    );
    let e = load_err(
        &p,
        DataSpec {
            response_template: Some(TokenTemplate::Text("### Answer:".into())),
            ..Default::default()
        },
    );
    assert!(
        e.contains("does not occur in the rendered rows either"),
        "{e}"
    );
    let e = load_err(
        &p,
        DataSpec {
            response_template: Some(TokenTemplate::Text("### Assistant:".into())),
            instruction_template: Some(TokenTemplate::Text("### User:".into())),
            ..Default::default()
        },
    );
    assert!(
        e.contains("collator.instruction_template") && e.contains("found in none of the 2 rows"),
        "{e}"
    );
}

#[test]
fn unreadable_parquet_files_are_named() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "bad.parquet", "PAR1 this is not parquet PAR1");
    let e = load_err(&p, DataSpec::default());
    assert!(
        e.contains("bad.parquet") && e.contains("unreadable Parquet"),
        "{e}"
    );
    let z = root().join("tests/fixtures/data/zstd.parquet");
    let e = load_err(&z, DataSpec::default());
    assert!(
        e.contains("zstd.parquet")
            && e.contains("unreadable Parquet")
            && e.to_lowercase().contains("zstd"),
        "{e}"
    );
    // A Parquet row without the column its format needs: file, row and field.
    let m = root().join("tests/fixtures/data/messages.parquet");
    let e = load_err(
        &m,
        DataSpec {
            format: packsft::Format::Alpaca,
            ..Default::default()
        },
    );
    assert!(
        e.contains("messages.parquet: row 1: missing field `instruction`"),
        "{e}"
    );
    let e = load_err(&d.path().join("none.parquet"), DataSpec::default());
    assert!(e.contains("none.parquet"), "{e}");
    let e = load_err(&d.path().join("*.nothing"), DataSpec::default());
    assert!(e.contains("matches no file"), "{e}");
}

fn recipe(dir: &Path, data: &Path, extra: &str) -> PathBuf {
    write(
        dir,
        "r.yaml",
        &format!(
            "model:\n  tokenizer: {}\n  config: {{hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, max_position_embeddings: 64}}\ndata:\n  train: {}\n  max_length: 64\n{extra}train:\n  max_steps: 1\noutput_dir: {}\n",
            root().join("recipes/quickstart/tokenizer.json").display(),
            data.display(),
            dir.join("out").display()
        ),
    )
}

#[test]
fn thresholds_stop_the_run_before_anything_is_written() {
    let d = tempfile::tempdir().unwrap();
    let data = write(
        d.path(),
        "t.jsonl",
        "{\"text\": \"### Q: a\\n### A: b\"}\n{\"text\": \"no template\"}\n{\"text\": \"nor here\"}\n",
    );
    let r = recipe(
        d.path(),
        &data,
        "collator:\n  response_template: \"### A:\"\n",
    );
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_packsft"))
            .arg("train")
            .arg(&r)
            .args(args)
            .output()
            .unwrap()
    };
    // 2 of 3 rows dropped: over the default max_dropped_fraction of 0.5.
    let o = run(&[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("2 of 3 rows dropped")
            && stderr.contains("data.max_dropped_fraction = 0.5"),
        "{stderr}"
    );
    assert!(!d.path().join("out").exists());
    let o = run(&[
        "data.max_dropped_fraction=null",
        "data.max_template_missing_fraction=0.5",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("without the response or instruction template")
            && stderr.contains("max_template_missing_fraction = 0.5"),
        "{stderr}"
    );
    assert!(!d.path().join("out").exists());
    // Allowed: the run trains on the one example left, and the report warned about the rest.
    let o = run(&["data.max_dropped_fraction=0.7"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("2 of 3 rows dropped"), "{stderr}");
}

/// A template that comes with a model may be hostile: one that never ends and one that writes
/// without bound are stopped by the render budget, naming the template and the row, instead of
/// hanging or exhausting memory.
#[test]
fn render_budgets_stop_endless_and_unbounded_templates_naming_them() {
    let d = tempfile::tempdir().unwrap();
    let rows = "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n";
    let p = write(d.path(), "c.jsonl", &rows.repeat(3));
    let endless = write(
        d.path(),
        "endless.jinja",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}",
    );
    let t0 = std::time::Instant::now();
    let e = load_err(&p, template(endless.to_str().unwrap()));
    assert!(
        e.contains("c.jsonl:1:") && e.contains("endless.jinja") && e.contains("budget"),
        "{e}"
    );
    assert!(t0.elapsed().as_secs() < 60, "took {:?}", t0.elapsed());
    let huge = write(
        d.path(),
        "huge.jinja",
        "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}",
    );
    let e = load_err(&p, template(huge.to_str().unwrap()));
    assert!(
        e.contains("c.jsonl:1:") && e.contains("huge.jinja") && e.contains("renders more than"),
        "{e}"
    );
}

/// The stop flag (the first Ctrl-C of `packsft train`) stops data preparation.
#[test]
fn a_stop_request_ends_data_preparation() {
    let d = tempfile::tempdir().unwrap();
    let rows = "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n";
    let p = write(d.path(), "c.jsonl", &rows.repeat(20_000));
    // Slow but within budget: about a million template steps a row.
    let slow = write(
        d.path(),
        "slow.jinja",
        "{% for i in range(1000) %}{% for j in range(300) %}{% endfor %}{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}",
    );
    let t = tok();
    let o = LoadOptions {
        max_length: 512,
        truncation: Truncation::Error,
        vocab_size: 313,
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let t0 = std::time::Instant::now();
    let e = Pipeline::new(Some(&t), template(slow.to_str().unwrap()), o)
        .unwrap()
        .with_stop(stop)
        .load(&p)
        .err()
        .expect("stopped")
        .to_string();
    assert!(e.contains("interrupted while preparing the data"), "{e}");
    assert!(t0.elapsed().as_secs() < 20, "took {:?}", t0.elapsed());
}

/// A byte-order mark is accepted; invalid UTF-8 names its line; compressed files say so.
#[test]
fn byte_order_marks_invalid_utf8_and_compressed_files() {
    let d = tempfile::tempdir().unwrap();
    let rows = "{\"prompt\": \"a\", \"completion\": \" b\"}\n{\"prompt\": \"c\", \"completion\": \" d\"}\n";
    let t = tok();
    let o = || LoadOptions {
        max_length: 512,
        truncation: Truncation::Error,
        vocab_size: 313,
    };
    for (name, text) in [
        ("bom.jsonl", format!("\u{feff}{rows}")),
        (
            "bom.json",
            format!("\u{feff}[{}]", rows.trim().replace('\n', ",")),
        ),
    ] {
        let p = write(d.path(), name, &text);
        let ds = Pipeline::new(Some(&t), DataSpec::default(), o())
            .unwrap()
            .load(&p)
            .unwrap();
        assert_eq!(ds.examples.len(), 2, "{name}");
    }
    let p = d.path().join("latin1.jsonl");
    let mut bytes = rows.as_bytes().to_vec();
    bytes.extend_from_slice(b"{\"prompt\": \"caf\xe9\", \"completion\": \" x\"}\n");
    std::fs::write(&p, bytes).unwrap();
    let e = load_err(&p, DataSpec::default());
    assert!(
        e.contains("latin1.jsonl:3:") && e.contains("invalid UTF-8"),
        "{e}"
    );
    for (name, magic) in [
        ("a.jsonl.gz", &[0x1f, 0x8b, 8, 0][..]),
        ("a.jsonl.zst", &[0x28, 0xb5, 0x2f, 0xfd][..]),
    ] {
        let p = d.path().join(name);
        std::fs::write(&p, magic).unwrap();
        let e = load_err(&p, DataSpec::default());
        assert!(
            e.contains(name) && e.contains("compressed: decompress it first"),
            "{e}"
        );
    }
}
