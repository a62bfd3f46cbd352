//! Every recipe shipped under recipes/ parses and points at files that exist.

use std::path::Path;

#[test]
fn every_shipped_recipe_parses() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for entry in std::fs::read_dir(root.join("recipes")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let r = packsft::Recipe::load(&p, &[]).unwrap_or_else(|e| panic!("{e}"));
        // Paths in recipes are relative to the repository root (where the README runs them).
        let train = match &r.data.train {
            packsft::TrainData::Path(p) => vec![p.clone()],
            packsft::TrainData::Mix(sources) => sources.iter().map(|s| s.path.clone()).collect(),
        };
        for f in train
            .iter()
            .map(Some)
            .chain([
                r.data.eval.as_ref(),
                r.model.tokenizer.as_ref(),
                r.model.path.as_ref(),
            ])
            .flatten()
        {
            assert!(
                root.join(f).exists(),
                "{}: {} does not exist",
                p.display(),
                f.display()
            );
        }
        n += 1;
    }
    assert!(n >= 1, "no recipe found");
}

/// `data.chat_template_kwargs` reads as a map of JSON values, from the recipe or from an
/// override, and reaches the data spec (and so the tokenization cache's key).
#[test]
fn chat_template_kwargs_read_from_the_recipe_and_overrides() {
    let text = "model: {path: m}\ndata: {train: t.jsonl, chat_template_kwargs: \
                {enable_thinking: false, style: terse}}\noutput_dir: out\n";
    let r = packsft::Recipe::parse(text, std::path::Path::new("r.yaml"), &[]).unwrap();
    let kw = &r.data_spec().chat_template_kwargs;
    assert_eq!(kw["enable_thinking"], serde_json::json!(false));
    assert_eq!(kw["style"], serde_json::json!("terse"));
    let o = vec!["data.chat_template_kwargs.enable_thinking=true".to_string()];
    let r = packsft::Recipe::parse(
        "model: {path: m}\ndata: {train: t.jsonl}\noutput_dir: out\n",
        std::path::Path::new("r.yaml"),
        &o,
    )
    .unwrap();
    assert_eq!(
        r.data_spec().chat_template_kwargs["enable_thinking"],
        serde_json::json!(true)
    );
}

/// A template value holding `: ` unquoted gets an error naming the line and saying to quote it.
#[test]
fn an_unquoted_value_with_a_colon_says_to_quote_it() {
    let text = "model: {path: m}\ndata: {train: t.jsonl}\noutput_dir: out\n\
                collator:\n  response_template: Answer: here\n";
    let e = packsft::Recipe::parse(text, std::path::Path::new("r.yaml"), &[])
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("r.yaml:5:"), "{e}");
    assert!(
        e.contains("`response_template` holds a colon: quote it"),
        "{e}"
    );
    assert!(e.contains("response_template: \"Answer: here\""), "{e}");
}
