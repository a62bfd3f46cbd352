//! Property tests: whatever bytes or overrides come in, the readers and the override parser give
//! a row or an error, never a panic or a hang.

use std::path::Path;

use packsft::{load_jsonl, DataSpec, LoadOptions, Pipeline, Recipe, TextTokenizer, Truncation};
use proptest::prelude::*;

const BASE: &str = "model: {path: m}\ndata: {train: t.jsonl}\noutput_dir: out\n";

fn opts() -> LoadOptions {
    LoadOptions {
        max_length: 64,
        truncation: Truncation::Drop,
        vocab_size: 313,
    }
}

fn tok() -> TextTokenizer {
    TextTokenizer::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/quickstart/tokenizer.json"),
    )
    .unwrap()
}

/// Bytes that look like JSON rows more often than uniform bytes would.
fn jsonish() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"{\"prompt\": \"a\", \"completion\": \" b\"}\n".to_vec()),
        Just(b"{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n".to_vec()),
        Just(b"{\"input_ids\": [1, 2, 3]}\n".to_vec()),
        Just(b"[".to_vec()),
        Just(b"]".to_vec()),
        Just(b",".to_vec()),
        Just(b"\xef\xbb\xbf".to_vec()),
        prop::collection::vec(any::<u8>(), 0..12),
    ];
    prop::collection::vec(piece, 0..8).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn overrides_parse_or_fail_but_never_panic(o in "[a-z_.]{0,24}(=[ -~]{0,24})?") {
        let _ = Recipe::parse(BASE, Path::new("r.yaml"), &[o]);
    }

    #[test]
    fn recipe_text_parses_or_fails_but_never_panics(text in "[ -~\n]{0,200}") {
        let _ = Recipe::parse(&text, Path::new("r.yaml"), &[]);
    }

    #[test]
    fn row_readers_give_rows_or_errors_for_any_bytes(bytes in jsonish(), ext in prop::sample::select(vec!["jsonl", "json"])) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(format!("rows.{ext}"));
        std::fs::write(&p, &bytes).unwrap();
        let _ = load_jsonl(&p, None, &opts());
        let t = tok();
        let _ = Pipeline::new(Some(&t), DataSpec::default(), opts()).and_then(|pipe| pipe.load(&p));
    }
}
