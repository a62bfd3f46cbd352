//! Embedding packsft in a Rust program: build examples in memory, pick a collator and a model,
//! train, evaluate, save in Hugging Face layout.
//!
//! Run: cargo run --release --example embed_trainer

use candle_core::Device;
use packsft::{CompletionOnlyCollator, DecoderModel, Example, Model, TextTokenizer};
use packsft::{Trainer, TrainerConfig};

fn main() -> packsft::Result<()> {
    let device = Device::Cpu;
    let tok = TextTokenizer::load("recipes/quickstart/tokenizer.json".as_ref())?;

    // Examples: BOS + prompt (no loss) + completion + EOS (loss), as the prompt/completion
    // loader builds them. Any source of token ids works.
    let make = |prompt: &str, completion: &str| -> packsft::Result<Example> {
        let mut ids = vec![tok.bos_id.unwrap()];
        ids.extend(tok.encode(prompt)?);
        let n_prompt = ids.len();
        ids.extend(tok.encode(completion)?);
        ids.push(tok.eos_id.unwrap());
        let mask = (0..ids.len()).map(|i| i >= n_prompt).collect();
        Ok(Example::new(ids, mask))
    };
    let letters = ["a b c", "d e f g", "h i", "j k l a", "b d f", "c e g i k"];
    let mut train = Vec::new();
    for w in letters {
        let upper = w.to_uppercase();
        train.push(make(
            &format!("Task: uppercase\nInput: {w}\nOutput:"),
            &format!(" {upper}"),
        )?);
    }

    let config = serde_json::json!({
        "vocab_size": tok.vocab_size(), "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128,
    });
    let model = DecoderModel::new_random(config, 0, &device)?;
    // Padding-free: one row per micro-batch, position_ids restarting per example.
    let collator = CompletionOnlyCollator::padding_free(tok.pad_or_eos());
    let cfg = TrainerConfig {
        batch_size: 3,
        grad_accum: 2,
        max_steps: 40,
        warmup_steps: 4,
        adamw: packsft::AdamWConfig {
            lr: 3e-3,
            ..Default::default()
        },
        progress: false,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model, collator, cfg, device)?;
    let before = trainer.evaluate(&train)?.loss;
    let summary = trainer.train(&train, None)?;
    let after = trainer.evaluate(&train)?;
    println!(
        "{} steps: loss {before:.3} -> {:.3}, token accuracy {:.2}, over {} target tokens (last step loss {:.3})",
        summary.steps.len(),
        after.loss,
        after.accuracy.unwrap_or(f64::NAN),
        after.tokens,
        summary.steps.last().unwrap().loss
    );
    let out = std::env::temp_dir().join("packsft-embed-example");
    trainer.model.save(&out)?;
    tok.save(&out)?;
    println!("saved to {}", out.display());
    Ok(())
}
