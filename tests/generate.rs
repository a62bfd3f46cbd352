//! Greedy generation against transformers: for every tiny family checkpoint, packsft's
//! `generate_ids` (KV cache: the prompt once, then one position a token; LongRoPE recomputing)
//! chooses the tokens `model.generate(do_sample=False)` chose, for prompts of 1, 6 and 13 tokens
//! (fixtures from tests/fixtures/make_generate_fixtures.py, each with the transformers release its
//! family fixture is pinned to: 4.46.3, or 4.51.3 for qwen3).

use std::path::Path;

use candle_core::Device;
use packsft::{generate_ids, DecoderModel, Sampling};

#[test]
fn greedy_generation_chooses_transformers_tokens_in_every_family() {
    let dir = Path::new("tests/fixtures/generate");
    let mut checked = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let model = DecoderModel::from_pretrained(
            &Path::new("tests/fixtures/families").join(&name),
            &Device::Cpu,
        )
        .unwrap();
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        let new = r["max_new_tokens"].as_u64().unwrap() as usize;
        let prompts = r["prompts"].as_array().unwrap();
        let want = r["completions"].as_array().unwrap();
        assert_eq!(prompts.len(), 3, "{name}");
        for (p, w) in prompts.iter().zip(want) {
            let got = generate_ids(&model, ids(p), new, &Sampling::default(), None, |_| {
                Ok(false)
            })
            .unwrap();
            assert_eq!(
                got,
                ids(w),
                "{name}: prompt {:?} (transformers' smallest top-2 logit gap {})",
                ids(p),
                r["min_gap"]
            );
        }
        checked.push(name);
    }
    assert_eq!(checked.len(), 23, "families checked: {checked:?}");
}
