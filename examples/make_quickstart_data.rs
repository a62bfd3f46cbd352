//! Writes the quickstart's data and tokenizer into `recipes/quickstart/` (or the directory
//! given as the first argument):
//! - `train.jsonl` / `eval.jsonl`: prompt/completion rows of four letter tasks a small model
//!   learns in minutes on a CPU (copy, reverse, uppercase, sort), eval inputs disjoint from train;
//! - `tokenizer.json`: a byte-level BPE trained on the training text with the `tokenizers` crate;
//! - `tokenizer_config.json`: its special tokens, as transformers reads them.
//!
//! Run: cargo run --release --example make_quickstart_data [-- OUT_DIR]

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

const LETTERS: &[u8] = b"abcdefghijkl";
const TASKS: &[&str] = &["copy", "reverse", "uppercase", "sort"];

fn example(rng: &mut impl Rng) -> (String, String) {
    let n = rng.gen_range(3..=6);
    let word: Vec<char> = (0..n)
        .map(|_| LETTERS[rng.gen_range(0..LETTERS.len())] as char)
        .collect();
    let task = TASKS[rng.gen_range(0..TASKS.len())];
    let out: Vec<char> = match task {
        "copy" => word.clone(),
        "reverse" => word.iter().rev().copied().collect(),
        "uppercase" => word.iter().map(|c| c.to_ascii_uppercase()).collect(),
        "sort" => {
            let mut w = word.clone();
            w.sort();
            w
        }
        _ => unreachable!(),
    };
    let spaced = |cs: &[char]| cs.iter().map(|c| format!(" {c}")).collect::<String>();
    (
        format!("Task: {task}\nInput:{}\nOutput:", spaced(&word)),
        spaced(&out),
    )
}

fn write_jsonl(path: &PathBuf, rows: &[(String, String)]) {
    let mut f = std::fs::File::create(path).expect("create jsonl");
    for (p, c) in rows {
        writeln!(f, "{}", serde_json::json!({"prompt": p, "completion": c})).unwrap();
    }
}

fn main() {
    let out: PathBuf = std::env::args()
        .nth(1)
        .map(Into::into)
        .unwrap_or_else(|| "recipes/quickstart".into());
    std::fs::create_dir_all(&out).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20261127);
    let mut seen = HashSet::new();
    let mut train = Vec::new();
    while train.len() < 4000 {
        let ex = example(&mut rng);
        seen.insert(ex.0.clone());
        train.push(ex);
    }
    let mut eval = Vec::new();
    while eval.len() < 200 {
        let ex = example(&mut rng);
        // Held out: no eval prompt appears in training.
        if seen.insert(ex.0.clone()) {
            eval.push(ex);
        }
    }
    write_jsonl(&out.join("train.jsonl"), &train);
    write_jsonl(&out.join("eval.jsonl"), &eval);

    let corpus = out.join(".corpus.txt");
    let text: String = train.iter().map(|(p, c)| format!("{p}{c}\n")).collect();
    std::fs::write(&corpus, text).unwrap();
    let specials: Vec<AddedToken> = ["<pad>", "<s>", "</s>"]
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer: tokenizers::models::TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(320)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect::<HashSet<char>>())
        .build()
        .into();
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.train_from_files(&mut trainer, vec![corpus.to_string_lossy().into_owned()])
        .expect("train tokenizer");
    std::fs::remove_file(&corpus).unwrap();
    tok.save(out.join("tokenizer.json"), false)
        .expect("save tokenizer");
    let cfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "add_bos_token": true,
        "add_eos_token": false,
        "model_max_length": 256,
    });
    std::fs::write(
        out.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    println!(
        "wrote {} train and {} eval rows, tokenizer of {} tokens, to {}",
        train.len(),
        eval.len(),
        tok.get_vocab_size(true),
        out.display()
    );
}
