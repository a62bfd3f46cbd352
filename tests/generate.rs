//! Greedy generation against transformers: for every tiny family checkpoint, packsft's
//! `generate_ids` (KV cache: the prompt once, then one position a token; LongRoPE recomputing)
//! chooses the tokens `model.generate(do_sample=False)` chose, for prompts of 1, 6 and 13 tokens
//! (fixtures from tests/fixtures/make_generate_fixtures.py, each with the transformers release its
//! family fixture is pinned to: 4.46.3, or 4.51.3 for the newer families); and batched decoding
//! against one prompt at a time.

use std::path::Path;

use candle_core::Device;
use packsft::{generate_batch_ids, generate_ids, DecoderModel, Sampling};

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

/// Decoding several prompts together gives each the continuation it gets alone: greedy and
/// sampled (each prompt's own seeded stream), a prompt leaving the batch at its EOS while the
/// others go on, in families with sliding windows, local and global layers, soft-capping, MoE
/// routing and post-norms.
#[test]
fn batched_generation_equals_one_prompt_at_a_time() {
    let prompts: Vec<Vec<u32>> = vec![vec![5, 9, 3, 17, 22, 8, 30], vec![11], vec![40, 2, 7, 7]];
    let samplings = [
        Sampling::default(),
        Sampling {
            temperature: 0.9,
            top_k: Some(20),
            top_p: Some(0.95),
            seed: 7,
        },
    ];
    for name in ["mistral", "gemma2", "gemma3_text", "granitemoe", "olmo2"] {
        let model = DecoderModel::from_pretrained(
            &Path::new("tests/fixtures/families").join(name),
            &Device::Cpu,
        )
        .unwrap();
        for s in &samplings {
            let alone: Vec<Vec<u32>> = (prompts.iter())
                .map(|p| generate_ids(&model, p.clone(), 10, s, None, |_| Ok(false)).unwrap())
                .collect();
            let together =
                generate_batch_ids(&model, prompts.clone(), 10, s, &[], |_, _| Ok(false)).unwrap();
            assert_eq!(together, alone, "{name} {s:?}");
            // The second prompt's fourth token as EOS: that prompt (and any other that draws it)
            // stops there, the rest go on as before.
            // Two end-of-sequence ids (EOS and an end of turn): the second prompt's fourth
            // token and the first prompt's third; each prompt stops at whichever comes first.
            let eos = [alone[1][3], alone[0][2]];
            let cut = |v: &Vec<u32>| {
                v.iter()
                    .take_while(|t| !eos.contains(t))
                    .copied()
                    .collect::<Vec<_>>()
            };
            let want: Vec<Vec<u32>> = alone.iter().map(cut).collect();
            let got =
                generate_batch_ids(&model, prompts.clone(), 10, s, &eos, |_, _| Ok(false)).unwrap();
            assert_eq!(got, want, "{name} {s:?} eos {eos:?}");
            assert!(
                got[0].len() <= 2,
                "{name}: the first prompt stopped at its end of turn"
            );
            assert!(
                got[1].len() <= 3,
                "{name}: the second prompt stopped at its EOS"
            );
        }
    }
}
