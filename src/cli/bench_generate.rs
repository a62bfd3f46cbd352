//! `packsft bench-generate`: decoding throughput. A random model at a bench shape (`bench::shape`)
//! continues `--batch-size` random prompts of `--prompt-len` tokens greedily by `--new-tokens`
//! each (no EOS, so every prompt runs the whole budget), through the KV cache and batched
//! decoding; new tokens per second after a warm-up, beside `benches/gpu/generate_peer.py`
//! (transformers' `generate` at the same shape, prompts and budget).

use std::time::Instant;

use clap::Args;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::generate::{generate_batch_ids, Sampling};
use crate::model::DecoderModel;

#[derive(Args)]
pub(crate) struct BenchGenerateCmd {
    /// A shape of `packsft bench` (llama-1.1b, llama-8b, qwen3-8b, gemma2-2b, llama-cpu-tiny, ...)
    #[arg(long, default_value = "llama-cpu-tiny")]
    shape: String,
    /// Prompts decoded together
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// Timed runs after one warm-up (the best is reported, as the peer does)
    #[arg(long, default_value_t = 2)]
    repeats: usize,
    /// `cpu`, `cuda` or `cuda:N` (float32)
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Serialize)]
struct BenchGenerateResult {
    peer: &'static str,
    shape: String,
    device: String,
    batch_size: usize,
    prompt_len: usize,
    new_tokens: usize,
    /// Wall seconds of the best timed run: prefill and every decoding step.
    seconds: f64,
    /// New tokens (all prompts) per second of that run.
    new_tokens_per_s: f64,
    peak_gib: f64,
}

pub(crate) fn run(c: BenchGenerateCmd) -> Result<()> {
    if c.batch_size == 0 || c.prompt_len == 0 || c.new_tokens == 0 || c.repeats == 0 {
        return Err(Error::Config(
            "bench-generate: --batch-size, --prompt-len, --new-tokens and --repeats must be positive"
                .into(),
        ));
    }
    let device = crate::device::open(&c.device)?;
    let cfg = super::bench::shape(&c.shape)?;
    let vocab = cfg["vocab_size"].as_u64().unwrap_or(0) as u32;
    let model = DecoderModel::new_random_for_bench(cfg, &device, None)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let prompts: Vec<Vec<u32>> = (0..c.batch_size)
        .map(|_| (0..c.prompt_len).map(|_| rng.gen_range(0..vocab)).collect())
        .collect();
    let greedy = Sampling::default();
    let run = |n: usize| -> Result<f64> {
        let t = Instant::now();
        let out = generate_batch_ids(&model, prompts.clone(), n, &greedy, &[], |_, _| Ok(false))?;
        device.synchronize()?;
        let secs = t.elapsed().as_secs_f64();
        if out.iter().any(|o| o.len() != n) {
            return Err(Error::Training(
                "bench-generate: a prompt ended before its budget".into(),
            ));
        }
        Ok(secs)
    };
    run(c.new_tokens.min(8))?;
    let mut best = f64::INFINITY;
    for _ in 0..c.repeats {
        best = best.min(run(c.new_tokens)?);
    }
    let peak = crate::device::gpu_peak_bytes(&device).unwrap_or_else(super::bench::peak_rss_bytes);
    let r = BenchGenerateResult {
        peer: "packsft",
        shape: c.shape,
        device: c.device,
        batch_size: c.batch_size,
        prompt_len: c.prompt_len,
        new_tokens: c.new_tokens,
        seconds: best,
        new_tokens_per_s: (c.batch_size * c.new_tokens) as f64 / best,
        peak_gib: peak as f64 / (1u64 << 30) as f64,
    };
    println!(
        "{}",
        serde_json::to_string(&r).expect("a result serialises")
    );
    Ok(())
}
