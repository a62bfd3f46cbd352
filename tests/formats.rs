//! Dataset formats, files, templates and masks: what each row becomes, token by token.

use std::path::{Path, PathBuf};

use packsft::internals::split_mask;
use packsft::{
    DataLimits, DataSpec, Dataset, Format, LoadOptions, LossOn, Pipeline, TokenTemplate, Truncation,
};
use packsft::{Example, TextTokenizer};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tok() -> TextTokenizer {
    TextTokenizer::load(&root().join("recipes/quickstart/tokenizer.json")).unwrap()
}

fn opts(max_length: usize, truncation: Truncation) -> LoadOptions {
    LoadOptions {
        max_length,
        truncation,
        vocab_size: 313,
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn load_with(
    tok: &TextTokenizer,
    text: &str,
    name: &str,
    spec: DataSpec,
    o: LoadOptions,
) -> Dataset {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), name, text);
    Pipeline::new(Some(tok), spec, o)
        .unwrap()
        .load(&p)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn load(text: &str, spec: DataSpec) -> Dataset {
    load_with(&tok(), text, "d.jsonl", spec, opts(1024, Truncation::Error))
}

/// The text of the tokens that carry loss (never the first token), special tokens kept.
fn trained(tok: &TextTokenizer, ex: &Example) -> String {
    let ids: Vec<u32> = ex
        .input_ids
        .iter()
        .zip(&ex.loss_mask)
        .enumerate()
        .filter(|(t, (_, &m))| *t > 0 && m)
        .map(|(_, (&id, _))| id)
        .collect();
    tok.inner().decode(&ids, false).unwrap()
}

fn full(tok: &TextTokenizer, ex: &Example) -> String {
    tok.inner().decode(&ex.input_ids, false).unwrap()
}

fn spec_template(t: &str) -> DataSpec {
    DataSpec {
        template: Some(t.into()),
        ..Default::default()
    }
}

const CONV: &str = r#"{"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Sort: c a b"}, {"role": "assistant", "content": "a b c"}]}"#;

#[test]
fn prompt_completion_and_text_rows() {
    let t = tok();
    let ds = load(
        "{\"prompt\": \"Task: copy\\nInput: h j\\nOutput:\", \"completion\": \" h j\"}\n",
        DataSpec::default(),
    );
    let ex = &ds.examples[0];
    assert_eq!(ex.input_ids[0], 1, "BOS first");
    assert_eq!(trained(&t, ex), " h j</s>");
    assert_eq!(full(&t, ex), "<s>Task: copy\nInput: h j\nOutput: h j</s>");
    assert_eq!(
        (ds.report.format.as_str(), ds.report.loss_on.as_str()),
        ("prompt_completion", "completion")
    );

    // Text rows: language modelling, every token after the first is a target, EOS appended.
    let ds = load("{\"text\": \"a b c\"}\n", DataSpec::default());
    let ex = &ds.examples[0];
    assert_eq!(full(&t, ex), "<s>a b c</s>");
    assert_eq!(ex.n_targets(), ex.len() - 1);
    assert_eq!(ds.report.format, "text");

    // loss_on: all on prompt/completion rows trains the prompt too.
    let ds = load(
        "{\"prompt\": \"ab\", \"completion\": \"cd\"}\n",
        DataSpec {
            loss_on: Some(LossOn::All),
            ..Default::default()
        },
    );
    assert_eq!(trained(&t, &ds.examples[0]), "abcd</s>");
}

#[test]
fn chat_templates_train_assistant_turns_and_their_closing_tokens() {
    let t = tok();
    // (template, trained text of CONV): the assistant contents, each with the template's
    // end-of-turn marker, and the EOS that ends the example (appended when the template has none).
    let cases = [
        ("llama3", "Hi.<|eot_id|>a b c<|eot_id|></s>"),
        ("qwen2", "Hi.<|im_end|>a b c<|im_end|></s>"),
        ("mistral", "Hi.</s>a b c</s>"),
        ("gemma", "Hi.<end_of_turn>a b c<end_of_turn></s>"),
        ("phi3", "Hi.<|end|>a b c<|end|>\n</s>"),
        ("llama2", " Hi. </s> a b c </s>"),
        ("granite", "Hi.<|end_of_text|>a b c<|end_of_text|></s>"),
        ("starcoder2", "Hi.</s>a b c</s>"),
        ("qwen3", "Hi.<|im_end|>a b c<|im_end|></s>"),
        ("gemma3", "Hi.<end_of_turn>a b c<end_of_turn></s>"),
        ("olmo2", "Hi.</s>a b c</s>"),
    ];
    for (name, want) in cases {
        let ds = load(&format!("{CONV}\n"), spec_template(name));
        let ex = &ds.examples[0];
        assert_eq!(trained(&t, ex), want, "{name}: {}", full(&t, ex));
        assert_eq!(ds.report.loss_on, "assistant");
        // A template that prints BOS is not given a second one.
        assert!(!full(&t, ex).starts_with("<s><s>"), "{name}");
    }
    // Only the last assistant turn.
    let ds = load(
        &format!("{CONV}\n"),
        DataSpec {
            loss_on: Some(LossOn::LastAssistant),
            ..spec_template("llama3")
        },
    );
    assert_eq!(trained(&t, &ds.examples[0]), "a b c<|eot_id|></s>");
    // Everything.
    let ds = load(
        &format!("{CONV}\n"),
        DataSpec {
            loss_on: Some(LossOn::All),
            ..spec_template("qwen2")
        },
    );
    let ex = &ds.examples[0];
    assert_eq!(ex.n_targets(), ex.len() - 1);
}

#[test]
fn tool_turns_and_conversations_ending_with_the_user() {
    let t = tok();
    let row = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Looking."}, {"role": "tool", "content": "22.0"}, {"role": "assistant", "content": "22 degrees."}, {"role": "user", "content": "Thanks"}]}"#;
    let ds = load(&format!("{row}\n"), spec_template("llama3"));
    let ex = &ds.examples[0];
    // The tool result and the final user turn are context; no EOS after a user turn.
    assert_eq!(trained(&t, ex), "Looking.<|eot_id|>22 degrees.<|eot_id|>");
    assert!(
        full(&t, ex).contains("<|start_header_id|>ipython<|end_header_id|>\n\n\"22.0\"<|eot_id|>")
    );
    assert_eq!(*ex.input_ids.last().unwrap(), t.encode(">").unwrap()[0]);
}

#[test]
fn sharegpt_alpaca_columns_and_field_mapping() {
    let t = tok();
    let msgs = load(&format!("{CONV}\n"), spec_template("qwen2"));
    let sg = load(
        r#"{"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi."}, {"from": "human", "value": "Sort: c a b"}, {"from": "gpt", "value": "a b c"}]}
"#,
        spec_template("qwen2"),
    );
    assert_eq!(sg.examples, msgs.examples);
    assert_eq!(sg.report.format, "sharegpt");

    // Alpaca: the alpaca template by default; columns renamed by data.fields.
    let mut spec = DataSpec::default();
    for (k, v) in [("instruction", "q"), ("input", "ctx"), ("output", "a")] {
        spec.fields.insert(k.into(), v.into());
    }
    let ds = load(
        "{\"q\": \"Sort the letters.\", \"ctx\": \"g i e\", \"a\": \"e g i\"}\n{\"q\": \"Say hi.\", \"a\": \"hi\"}\n",
        spec,
    );
    assert_eq!(ds.report.format, "alpaca");
    assert_eq!(ds.report.template.as_deref(), Some("alpaca.jinja"));
    assert_eq!(trained(&t, &ds.examples[0]), "e g i</s>");
    assert!(full(&t, &ds.examples[0]).contains("### Input:\ng i e\n\n### Response:e g i</s>"));
    assert!(full(&t, &ds.examples[1]).contains("Write a response that appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:hi"));

    // Any columns through a prompt template.
    let ds = load(
        "{\"question\": \"What is 2 + 2?\", \"answer\": \"4\"}\n",
        spec_template("question_answer"),
    );
    assert_eq!(ds.report.format, "columns");
    assert_eq!(
        full(&t, &ds.examples[0]),
        "<s>### Question: What is 2 + 2?\n ### Answer: 4</s>"
    );
    assert_eq!(trained(&t, &ds.examples[0]), " 4</s>");

    // Prompt/completion rows through the chatml prompt template, with a system column.
    let ds = load(
        "{\"prompt\": \"Copy: h j\", \"completion\": \"h j\", \"system\": \"Be brief.\"}\n",
        spec_template("chatml"),
    );
    assert_eq!(
        full(&t, &ds.examples[0]),
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCopy: h j<|im_end|>\n<|im_start|>assistant\nh j<|im_end|></s>"
    );
    assert_eq!(trained(&t, &ds.examples[0]), "h j<|im_end|></s>");

    // Prompt/completion rows through a chat template become a user and an assistant turn.
    let ds = load(
        "{\"prompt\": \"Hello\", \"completion\": \"Hi.\"}\n",
        spec_template("qwen2"),
    );
    assert_eq!(trained(&t, &ds.examples[0]), "Hi.<|im_end|></s>");
}

#[test]
fn pretokenized_rows_and_their_masks() {
    let ds = load(
        "{\"input_ids\": [1, 5, 6, 2], \"completion_mask\": [0, 0, 1, 1]}\n{\"input_ids\": [1, 5, 6, 2], \"labels\": [-100, -100, 6, 2]}\n{\"input_ids\": [1, 5, 6, 2], \"assistant_masks\": [0, 1, 1, 0]}\n{\"input_ids\": [1, 5, 6]}\n",
        DataSpec::default(),
    );
    let masks: Vec<Vec<bool>> = ds.examples.iter().map(|e| e.loss_mask.clone()).collect();
    assert_eq!(
        masks,
        vec![
            vec![false, false, true, true],
            vec![false, false, true, true],
            vec![false, true, true, false],
            vec![true, true, true]
        ]
    );
    assert_eq!(ds.report.format, "tokens");
    let ds = load(
        "{\"input_ids\": [1, 5, 6, 2], \"completion_mask\": [0, 0, 0, 1]}\n",
        DataSpec {
            loss_on: Some(LossOn::All),
            ..Default::default()
        },
    );
    assert_eq!(ds.examples[0].n_targets(), 3);
}

#[test]
fn json_arrays_parquet_directories_and_globs() {
    let t = tok();
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "a.json",
        "[\n  {\"prompt\": \"x\", \"completion\": \"y\"},\n  {\"prompt\": \"[,]\", \"completion\": \"}{\"}\n]\n",
    );
    write(
        d.path(),
        "b.jsonl",
        "{\"prompt\": \"p\", \"completion\": \"q\"}\n",
    );
    write(d.path(), "notes.txt", "not data");
    let pipe = Pipeline::new(Some(&t), DataSpec::default(), opts(512, Truncation::Error)).unwrap();
    let ds = pipe.load(&d.path().join("a.json")).unwrap();
    assert_eq!(ds.examples.len(), 2);
    assert_eq!(trained(&t, &ds.examples[1]), "}{</s>");
    assert_eq!(
        ds.origins[1].to_string(),
        format!("{}:3", d.path().join("a.json").display())
    );
    // A directory: its .json/.jsonl/.parquet files in name order.
    let ds = pipe.load(d.path()).unwrap();
    assert_eq!(ds.examples.len(), 3);
    assert_eq!(trained(&t, &ds.examples[2]), "q</s>");
    // A glob.
    let ds = pipe.load(&d.path().join("*.jsonl")).unwrap();
    assert_eq!(ds.examples.len(), 1);

    // Parquet (tests/fixtures/data/make_parquet_fixtures.py): Alpaca columns with a null input,
    // two row groups; and list<struct> messages.
    let fx = root().join("tests/fixtures/data");
    let ds = pipe.load(&fx.join("alpaca.parquet")).unwrap();
    assert_eq!(ds.report.format, "alpaca");
    assert_eq!(ds.examples.len(), 3);
    assert_eq!(trained(&t, &ds.examples[2]), "A B</s>");
    assert!(
        full(&t, &ds.examples[1]).contains("a task. Write a response"),
        "null input = no input"
    );
    assert_eq!(
        ds.origins[2].to_string(),
        format!("{}: row 3", fx.join("alpaca.parquet").display())
    );
    let pipe = Pipeline::new(
        Some(&t),
        spec_template("llama3"),
        opts(256, Truncation::Error),
    )
    .unwrap();
    let ds = pipe.load(&fx.join("messages.parquet")).unwrap();
    assert_eq!(trained(&t, &ds.examples[1]), "a b c<|eot_id|></s>");
    assert!(full(&t, &ds.examples[1]).contains("Be brief.<|eot_id|>"));
}

#[test]
fn eval_split_is_seeded_and_disjoint() {
    let t = tok();
    let rows: String = (0..20)
        .map(|i| format!("{{\"prompt\": \"n{i}\", \"completion\": \" {i}\"}}\n"))
        .collect();
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "d.jsonl", &rows);
    let pipe = Pipeline::new(Some(&t), DataSpec::default(), opts(64, Truncation::Error)).unwrap();
    let (tr, ev) = pipe.load_split(&p, 0.25, 7).unwrap();
    assert_eq!((tr.examples.len(), ev.examples.len()), (15, 5));
    assert_eq!((tr.report.rows, ev.report.rows), (15, 5));
    let (tr2, ev2) = pipe.load_split(&p, 0.25, 7).unwrap();
    assert_eq!(
        (tr.examples.clone(), ev.examples.clone()),
        (tr2.examples, ev2.examples)
    );
    let (_, ev3) = pipe.load_split(&p, 0.25, 8).unwrap();
    assert_ne!(ev.examples, ev3.examples, "another seed draws other rows");
    let mut all: Vec<String> = tr
        .origins
        .iter()
        .chain(&ev.origins)
        .map(|l| l.to_string())
        .collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 20);
    assert_eq!(split_mask(10, 0.01, 0).iter().filter(|&&b| b).count(), 1);
}

#[test]
fn truncation_drops_and_eos_are_counted() {
    let t = tok();
    let rows = "{\"prompt\": \"abcdef\", \"completion\": \"ghij\"}\n{\"prompt\": \"ab\", \"completion\": \"c\"}\n";
    let n_long = 1 + t.encode("abcdefghij").unwrap().len() + 1;
    let ml = n_long - 1;
    let ds = load_with(
        &t,
        rows,
        "d.jsonl",
        DataSpec::default(),
        opts(ml, Truncation::KeepStart),
    );
    assert_eq!(
        (
            ds.report.truncated,
            ds.report.eos_truncated,
            ds.report.eos_not_target
        ),
        (1, 1, 1)
    );
    assert_ne!(*ds.examples[0].input_ids.last().unwrap(), 2);
    let ds = load_with(
        &t,
        rows,
        "d.jsonl",
        DataSpec::default(),
        opts(ml, Truncation::KeepEnd),
    );
    assert_eq!(*ds.examples[0].input_ids.last().unwrap(), 2);
    assert_eq!(ds.report.eos_not_target, 0);
    let ds = load_with(
        &t,
        rows,
        "d.jsonl",
        DataSpec::default(),
        opts(ml, Truncation::Drop),
    );
    assert_eq!((ds.examples.len(), ds.report.dropped_too_long), (1, 1));
    // Cut before the completion: no target left, dropped and counted.
    let short = 1 + t.encode("abcdef").unwrap().len();
    let ds = load_with(
        &t,
        rows,
        "d.jsonl",
        DataSpec::default(),
        opts(short, Truncation::KeepStart),
    );
    assert_eq!((ds.examples.len(), ds.report.dropped_no_target), (1, 1));
    assert!(
        ds.report.dropped_rows[0].ends_with("d.jsonl:1 (no target token)"),
        "{:?}",
        ds.report.dropped_rows
    );
    // Thresholds.
    let limits = DataLimits {
        max_dropped_fraction: Some(0.4),
        ..Default::default()
    };
    let e = ds
        .report
        .check(&limits, Path::new("d.jsonl"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("1 of 2 rows dropped") && e.contains("data.max_dropped_fraction = 0.4"),
        "{e}"
    );
    assert!(ds
        .report
        .check(
            &DataLimits {
                max_dropped_fraction: Some(0.5),
                ..Default::default()
            },
            Path::new("d")
        )
        .is_ok());
    let e = ds
        .report
        .check(
            &DataLimits {
                min_supervised_ratio: Some(0.9),
                ..Default::default()
            },
            Path::new("d"),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("data.min_supervised_ratio = 0.9"), "{e}");
}

#[test]
fn response_template_method_counts_misses_and_pad_eos() {
    let t = tok();
    let spec = DataSpec {
        response_template: Some(TokenTemplate::Text("### Answer:".into())),
        ..Default::default()
    };
    let rows =
        "{\"text\": \"### Question: a\\n ### Answer: b\"}\n{\"text\": \"no template here\"}\n";
    let ds = load_with(
        &t,
        rows,
        "d.jsonl",
        spec.clone(),
        opts(64, Truncation::Error),
    );
    assert_eq!(ds.examples.len(), 1);
    assert_eq!(trained(&t, &ds.examples[0]), " b</s>");
    assert_eq!(
        (
            ds.report.response_template_missing,
            ds.report.dropped_template_missing
        ),
        (1, 1)
    );
    assert_eq!(ds.report.method, "response_template");
    let e = ds
        .report
        .check(
            &DataLimits {
                max_template_missing_fraction: Some(0.1),
                ..Default::default()
            },
            Path::new("d"),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_template_missing_fraction"), "{e}");

    // pad == EOS: as TRL, the EOS loses its label, and the report says so.
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(
        root().join("recipes/quickstart/tokenizer.json"),
        d.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        d.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "add_bos_token": true}"#,
    )
    .unwrap();
    let t2 = TextTokenizer::load(d.path()).unwrap();
    let ds = load_with(&t2, rows, "d.jsonl", spec, opts(64, Truncation::Error));
    assert_eq!(trained(&t2, &ds.examples[0]), " b");
    assert_eq!(
        (ds.report.eos_masked_as_pad, ds.report.eos_not_target),
        (1, 1)
    );
    // The default span method keeps EOS a target whatever the pad token.
    let ds = load_with(
        &t2,
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n",
        "d.jsonl",
        DataSpec::default(),
        opts(64, Truncation::Error),
    );
    assert_eq!(trained(&t2, &ds.examples[0]), "b</s>");
}

#[test]
fn tokenizer_truncation_settings_do_not_cut_examples() {
    let d = tempfile::tempdir().unwrap();
    let mut j: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("recipes/quickstart/tokenizer.json")).unwrap(),
    )
    .unwrap();
    j["truncation"] = serde_json::json!({"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0});
    std::fs::write(d.path().join("tokenizer.json"), j.to_string()).unwrap();
    let t = TextTokenizer::load(d.path()).unwrap();
    assert!(t.encode("a b c d e f g").unwrap().len() > 4);
}

#[test]
fn explicit_formats_and_bad_combinations() {
    let t = tok();
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "d.jsonl", &format!("{CONV}\n"));
    let err = |spec: DataSpec| match Pipeline::new(Some(&t), spec, opts(256, Truncation::Error))
        .and_then(|p2| p2.load(&p))
    {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    };
    let e = err(DataSpec::default());
    assert!(
        e.contains("need a chat template") && e.contains("llama3"),
        "{e}"
    );
    let e = err(spec_template("alpaca"));
    assert!(
        e.contains("need a chat template") && e.contains("prompt template"),
        "{e}"
    );
    let e = err(DataSpec {
        loss_on: Some(LossOn::Completion),
        ..spec_template("qwen2")
    });
    assert!(e.contains("data.loss_on: completion"), "{e}");
    let e = err(DataSpec {
        format: Format::Text,
        ..Default::default()
    });
    assert!(e.contains("missing field `text`"), "{e}");
    let e = err(DataSpec {
        response_template: Some(TokenTemplate::Ids(vec![5])),
        loss_on: Some(LossOn::All),
        ..spec_template("qwen2")
    });
    assert!(e.contains("contradicts collator.response_template"), "{e}");
}

/// Texts that exercise the pre-tokenizer: whitespace runs, contractions, digits, punctuation,
/// non-ASCII letters, combining marks, CJK, emoji, special tokens.
fn probe_texts() -> Vec<String> {
    let atoms = [
        "a",
        "Zebra",
        "it's",
        "we'LL",
        "don't",
        "12",
        "3.14159",
        "x1",
        " ",
        "  ",
        "   ",
        "\n",
        "\n\n",
        "\t",
        "\r\n",
        " \n ",
        "!",
        "?!",
        "...",
        "###",
        "—",
        "«",
        "»",
        "é",
        "naïve",
        "e\u{301}",
        "中文",
        "テキスト",
        "😀",
        "👍🏽",
        "<s>",
        "</s>",
        "<pad>",
        "\u{a0}",
        "\u{2028}",
        "ß",
        "İ",
        "ǅ",
        "٣",
        "Ⅻ",
        "'",
        "''",
        "'s",
    ];
    let mut out: Vec<String> = atoms.iter().map(|s| s.to_string()).collect();
    let mut s: u64 = 0x9e3779b97f4a7c15;
    for _ in 0..400 {
        let mut t = String::new();
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let n = 1 + (s >> 59) as usize;
        for _ in 0..n * 3 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            t.push_str(atoms[(s >> 33) as usize % atoms.len()]);
        }
        out.push(t);
    }
    // Real rendered text.
    for f in ["llama3", "qwen2", "gemma", "prompt_templates"] {
        let j = std::fs::read_to_string(root().join(format!("tests/fixtures/templates/{f}.json")))
            .unwrap();
        out.push(j);
    }
    out
}

fn assert_fast_path_agrees(t: &TextTokenizer) {
    assert!(t.has_fast_path());
    for text in probe_texts() {
        let want = t.inner().encode(text.as_str(), false).unwrap();
        let (ids, offs) = t.encode_with_offsets(&text).unwrap();
        assert_eq!(ids, want.get_ids(), "{text:?}");
        assert_eq!(offs, want.get_offsets(), "{text:?}");
        assert_eq!(t.encode(&text).unwrap(), want.get_ids(), "{text:?}");
    }
}

#[test]
fn the_fast_pre_tokenizer_path_equals_the_tokenizers_crate() {
    // GPT-2 style: ByteLevel(use_regex=true).
    assert_fast_path_agrees(&tok());
    // Llama 3 / Qwen2 style: Split(regex, Isolated) + ByteLevel(use_regex=false).
    let d = tempfile::tempdir().unwrap();
    let mut j: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("recipes/quickstart/tokenizer.json")).unwrap(),
    )
    .unwrap();
    j["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]});
    std::fs::write(d.path().join("tokenizer.json"), j.to_string()).unwrap();
    assert_fast_path_agrees(&TextTokenizer::load(d.path()).unwrap());
    // Anything else keeps the standard path.
    j["pre_tokenizer"] = serde_json::json!({"type": "Whitespace"});
    std::fs::write(d.path().join("tokenizer.json"), j.to_string()).unwrap();
    assert!(!TextTokenizer::load(d.path()).unwrap().has_fast_path());
}

#[test]
fn assistant_tool_calls_are_trained_as_the_template_writes_them() {
    let t = tok();
    let row = r#"{"messages": [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}}]}, {"role": "tool", "content": "22"}, {"role": "assistant", "content": "22 C."}]}"#;
    let ds = load(&format!("{row}\n"), spec_template("llama3"));
    // Key order kept and Python's json.dumps separators, as transformers renders it.
    assert_eq!(
        trained(&t, &ds.examples[0]),
        "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\", \"unit\": \"C\"}}<|eot_id|>22 C.<|eot_id|></s>"
    );
}

/// The tokenization cache: a second load of the same data reads the encoded examples back (it
/// succeeds even with encoding stopped), a changed file or template is encoded again, and a
/// damaged cache file is rebuilt.
#[test]
fn the_tokenization_cache_serves_unchanged_data_and_only_that() {
    let d = tempfile::tempdir().unwrap();
    let cache_dir = d.path().join("cache");
    let p = write(
        d.path(),
        "rows.jsonl",
        "{\"prompt\": \"Task: copy\\nInput: a b\\nOutput:\", \"completion\": \" a b\"}\n{\"prompt\": \"x\", \"completion\": \" y\"}\n",
    );
    let t = tok();
    let pipe = |stopped: bool, spec: DataSpec| {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(stopped));
        Pipeline::new(Some(&t), spec, opts(64, Truncation::Error))
            .unwrap()
            .with_stop(stop)
            .with_cache(packsft::TokenCache::new(&cache_dir))
    };
    let entries = || std::fs::read_dir(&cache_dir).map_or(0, |r| r.count());
    let first = pipe(false, DataSpec::default()).load(&p).unwrap();
    assert_eq!(entries(), 1);
    let again = pipe(true, DataSpec::default()).load(&p).unwrap();
    assert_eq!(again.examples, first.examples);
    assert_eq!(again.report, first.report);
    let origins = |ds: &Dataset| ds.origins.iter().map(|o| o.to_string()).collect::<Vec<_>>();
    assert_eq!(origins(&again), origins(&first));
    // Another template: another key, encoded (so a stopped pipeline fails).
    let e = pipe(true, spec_template("alpaca"))
        .load(&p)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("interrupted"), "{e}");
    // A changed file: encoded again, with its new rows.
    std::fs::write(&p, "{\"prompt\": \"z\", \"completion\": \" w\"}\n").unwrap();
    let changed = pipe(false, DataSpec::default()).load(&p).unwrap();
    assert_eq!(changed.examples.len(), 1);
    assert_eq!(entries(), 2);
    // A damaged cache file is encoded again and rewritten.
    for e in std::fs::read_dir(&cache_dir).unwrap() {
        std::fs::write(e.unwrap().path(), b"PKSFTTC1 but cut").unwrap();
    }
    let rebuilt = pipe(false, DataSpec::default()).load(&p).unwrap();
    assert_eq!(rebuilt.examples, changed.examples);
    assert_eq!(
        pipe(true, DataSpec::default()).load(&p).unwrap().examples,
        changed.examples
    );
}

/// `chat_template_kwargs` reach every render as `apply_chat_template(**kwargs)` passes them: a
/// template that prints a variable renders the value given (and nothing without it), a kwarg
/// takes the place of the special token of the same name, and a name the render sets itself
/// (`add_generation_prompt`) is refused, naming it.
#[test]
fn chat_template_kwargs_reach_every_render() {
    let d = tempfile::tempdir().unwrap();
    let template = write(
        d.path(),
        "greet.jinja",
        "{% for m in messages %}{% if m.role == 'user' %}{{ greeting }}{% endif %}\
         {{ m.content }}{{ eos_token }}{% endfor %}",
    );
    let row = r#"{"messages": [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c d"}]}"#;
    let spec = |kwargs: serde_json::Value| DataSpec {
        template: Some(template.display().to_string()),
        chat_template_kwargs: serde_json::from_value(kwargs).unwrap(),
        ..Default::default()
    };
    let t = tok();
    let text = |kwargs| full(&t, &load(&format!("{row}\n"), spec(kwargs)).examples[0]);
    assert_eq!(text(serde_json::json!({})), "a b</s>c d</s>");
    assert_eq!(
        text(serde_json::json!({"greeting": "x y "})),
        "x y a b</s>c d</s>"
    );
    // eos_token given as a kwarg replaces the tokenizer's in the render.
    assert_eq!(
        text(serde_json::json!({"eos_token": " k"})),
        "a b kc d k</s>"
    );
    let err = Pipeline::new(
        Some(&t),
        spec(serde_json::json!({"add_generation_prompt": true})),
        opts(1024, Truncation::Error),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(err.contains("`add_generation_prompt`"), "{err}");
}
