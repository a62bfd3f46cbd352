//! `packsft bench`: training throughput of padded vs padding-free batches on pre-tokenized
//! data, reported in the fields `shared/bench/hf_peer.py` prints so the two compare directly.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use candle_core::Device;
use serde::Serialize;

use crate::collate::CompletionOnlyCollator;
use crate::data::{load_jsonl, LoadOptions, Truncation};
use crate::error::{Error, Result};
use crate::model::lora::{LoraConfig, Targets};
use crate::model::{DecoderModel, LoraSetup};
use crate::train::{AdamWConfig, LrSchedule, Schedule};
use crate::train::{Trainer, TrainerConfig};

#[derive(Args)]
pub(crate) struct BenchAttnCmd {
    data: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    bs: usize,
    /// Batches of DATA to time
    #[arg(long, default_value_t = 10)]
    batches: usize,
    /// B sequences of L tokens, e.g. 8x2048 (instead of DATA)
    #[arg(long, conflicts_with = "data")]
    equal: Option<String>,
    #[arg(long, default_value_t = 32)]
    heads: usize,
    #[arg(long, default_value_t = 4)]
    kv_heads: usize,
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    #[arg(long, default_value_t = 10)]
    iters: usize,
    #[arg(long, default_value = "cuda")]
    device: String,
    #[arg(long, default_value = "auto")]
    attention: String,
}

#[derive(Args)]
pub(crate) struct BenchCmd {
    data: PathBuf,
    #[arg(long, default_value = "llama-cpu-tiny")]
    shape: String,
    #[arg(long, default_value_t = 8)]
    bs: usize,
    #[arg(long, default_value_t = 15)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Padded batches (default: padding-free)
    #[arg(long, conflicts_with_all = ["padding_free", "compare"])]
    padded: bool,
    #[arg(long, conflicts_with = "compare")]
    padding_free: bool,
    /// Run padded and padding-free in two fresh processes and print the ratios
    #[arg(long)]
    compare: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: f32, bf16 or f16 (float32 master weights); auto: bf16 on CUDA (as the
    /// peer's autocast), f32 on the CPU
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Recompute each layer in the backward pass
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Attention: auto (flash kernels where they can run), eager or flash
    #[arg(long, default_value = "auto")]
    attention: String,
    /// Differentiate the layers with candle's autograd instead of their hand-written
    /// backward (for comparison)
    #[arg(long)]
    autograd_layers: bool,
    /// Read each step's loss before enqueueing the next one (the CPU's way; for comparison)
    #[arg(long)]
    no_overlap: bool,
    /// LoRA of this rank on every linear layer but lm_head, alpha 2R, on a frozen base in the
    /// compute dtype (as strong_peer.py --lora R)
    #[arg(long)]
    lora: Option<usize>,
}

pub(crate) fn run_bench_attn(c: BenchAttnCmd) -> Result<()> {
    let batches = match (&c.data, &c.equal) {
        (Some(path), _) => batch_lengths(path, c.bs, c.batches)?,
        (None, Some(e)) => {
            let bad = || Error::Config(format!("--equal {e:?}: expected BxL, e.g. 8x2048"));
            let (b, l) = e.split_once('x').ok_or_else(bad)?;
            let (b, l): (usize, usize) =
                (b.parse().map_err(|_| bad())?, l.parse().map_err(|_| bad())?);
            vec![vec![l; b]]
        }
        (None, None) => return Err(Error::Config("bench-attn needs DATA or --equal BxL".into())),
    };
    let r = attn_bench(&AttnBenchArgs {
        batches,
        heads: c.heads,
        kv_heads: c.kv_heads,
        head_dim: c.head_dim,
        iters: c.iters,
        device: crate::device::open(&c.device)?,
        attention: c.attention.parse()?,
    })?;
    println!("{}", serde_json::to_string(&r).expect("result serialises"));
    Ok(())
}

pub(crate) fn run_bench(c: BenchCmd) -> Result<()> {
    let compute = crate::model::ComputeOptions {
        dtype: match c.dtype.as_str() {
            "auto" if crate::device::parse(&c.device)?.is_some() => candle_core::DType::BF16,
            "auto" | "f32" => candle_core::DType::F32,
            "bf16" => candle_core::DType::BF16,
            "f16" => candle_core::DType::F16,
            other => {
                return Err(Error::Config(format!(
                    "unknown dtype {other:?} (auto, f32, bf16, f16)"
                )))
            }
        },
        gradient_checkpointing: c.gradient_checkpointing,
        attention: c.attention.parse()?,
        autograd_layers: c.autograd_layers,
    };
    if c.compare {
        return compare(&c);
    }
    let args = BenchArgs {
        data: c.data,
        shape: c.shape,
        bs: c.bs,
        steps: c.steps,
        warmup: c.warmup,
        padding_free: !c.padded,
        device: crate::device::open(&c.device)?,
        compute,
        overlap: !c.no_overlap,
        lora: c.lora,
    };
    let r = run(&args)?;
    println!("{}", serde_json::to_string(&r).expect("result serialises"));
    Ok(())
}

/// `bench --compare`: padded and padding-free in two fresh processes, then the ratios.
fn compare(c: &BenchCmd) -> Result<()> {
    let exe = std::env::current_exe().map_err(|e| Error::io("current executable", e))?;
    let mut rows = Vec::new();
    for mode in ["--padded", "--padding-free"] {
        let out = std::process::Command::new(&exe)
            .args([
                "bench",
                &c.data.to_string_lossy(),
                "--shape",
                &c.shape,
                "--device",
                &c.device,
            ])
            .args(["--bs", &c.bs.to_string(), "--steps", &c.steps.to_string()])
            .args(["--warmup", &c.warmup.to_string(), mode, "--dtype", &c.dtype])
            .args(["--attention", &c.attention])
            .args(
                c.gradient_checkpointing
                    .then_some("--gradient-checkpointing"),
            )
            .args(c.autograd_layers.then_some("--autograd-layers"))
            .args(c.no_overlap.then_some("--no-overlap"))
            .args(
                c.lora
                    .iter()
                    .flat_map(|r| ["--lora".to_string(), r.to_string()]),
            )
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| Error::io(&exe, e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or_default().to_string();
        if !out.status.success() {
            return Err(Error::Training(format!("bench {mode} failed: {text}")));
        }
        println!("{line}");
        rows.push(
            serde_json::from_str::<serde_json::Value>(&line)
                .map_err(|e| Error::Training(format!("bench {mode} printed {line:?}: {e}")))?,
        );
    }
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "{}",
        serde_json::json!({
            "compare": "packed/padded",
            "speedup": f(&rows[1], "tokens_per_s") / f(&rows[0], "tokens_per_s"),
            "peak_ratio": f(&rows[1], "peak_gib") / f(&rows[0], "peak_gib"),
            "loss_padded": f(&rows[0], "final_loss"),
            "loss_packed": f(&rows[1], "final_loss"),
        })
    );
    Ok(())
}

/// Model shapes for benchmarks (random init), as config.json objects.
pub fn shape(name: &str) -> Result<serde_json::Value> {
    let (v, h, i, l, nh, nkv, theta, positions) = match name {
        // Qwen3-8B's config.json (head_dim 128, q/k norms, untied), as benches/gpu/family_peer.py.
        "qwen3-8b" => {
            return Ok(serde_json::json!({
                "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096,
                "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
                "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
                "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": false,
            }))
        }
        // Gemma-2-2B's config.json (head_dim 256 != hidden / heads, sandwich norms, scores and
        // logits soft-capped, even layers local), as benches/gpu/family_peer.py.
        "gemma2-2b" => {
            return Ok(serde_json::json!({
                "model_type": "gemma2", "vocab_size": 256000, "hidden_size": 2304,
                "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
                "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "query_pre_attn_scalar": 256,
                "sliding_window": 4096, "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh",
                "tie_word_embeddings": true,
            }))
        }
        // TinyLlama-1.1B, as hf_peer.py.
        "llama-1.1b" => (32000, 2048, 5632, 22, 32, 4, 10000.0, 4096),
        // Llama-3-8B, as hf_peer.py and strong_peer.py.
        "llama-8b" => (128256, 4096, 14336, 32, 32, 8, 500000.0, 8192),
        "llama-160m" => (32000, 768, 2048, 12, 12, 12, 10000.0, 4096),
        // A Llama small enough to train on a 2-core CPU in seconds per step.
        "llama-cpu-tiny" => (32000, 256, 704, 4, 4, 2, 10000.0, 4096),
        other => {
            return Err(Error::Config(format!(
                "unknown shape {other:?} (known: llama-1.1b, llama-8b, llama-160m, llama-cpu-tiny, \
                 qwen3-8b, gemma2-2b)"
            )))
        }
    };
    Ok(serde_json::json!({
        "model_type": "llama", "vocab_size": v, "hidden_size": h, "intermediate_size": i,
        "num_hidden_layers": l, "num_attention_heads": nh, "num_key_value_heads": nkv,
        "max_position_embeddings": positions, "rms_norm_eps": 1e-6, "rope_theta": theta,
    }))
}

#[derive(Debug, Clone)]
pub struct BenchArgs {
    pub data: PathBuf,
    pub shape: String,
    pub bs: usize,
    pub steps: usize,
    pub warmup: usize,
    pub padding_free: bool,
    pub device: Device,
    pub compute: crate::model::ComputeOptions,
    /// Enqueue each step before reading the one before it, as `Trainer::train` does on a GPU.
    pub overlap: bool,
    /// LoRA rank (all-linear, alpha 2R), or full fine-tuning.
    pub lora: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub peer: &'static str,
    pub shape: String,
    pub attn: &'static str,
    pub mode: &'static str,
    pub device: String,
    pub bs: usize,
    pub steps: usize,
    /// Real (non-pad) tokens per second.
    pub tokens_per_s: f64,
    pub step_s: f64,
    pub pad_frac: f64,
    /// Peak memory in GiB: on CUDA the device allocator's high-water mark (as the peer's
    /// `torch.cuda.max_memory_allocated`), on the CPU the process's peak resident set.
    pub peak_gib: f64,
    /// Model FLOPs utilisation against 790 TFLOP/s (the peer's H100 bf16 figure); None on CPU.
    pub mfu: Option<f64>,
    pub final_loss: f64,
    pub dtype: String,
    pub gradient_checkpointing: bool,
    /// Host time a timed step spends enqueueing its work (collate, forward, backward,
    /// optimizer), and waiting to read the step before it: a step whose enqueue time is close to
    /// `step_s` is bound by the host, not the device.
    pub host_enqueue_s: f64,
    pub host_wait_s: f64,
    /// LoRA rank, or None for full fine-tuning.
    pub lora_r: Option<usize>,
    /// Parameters the optimizer updates.
    pub trainable_params: usize,
}

/// Peak resident set size of this process (VmHWM), in bytes; 0 where /proc is unavailable.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// The benchmark's pre-tokenized examples: enough for (steps + warmup) x bs.
fn bench_examples(args: &BenchArgs, cfg: &serde_json::Value) -> Result<Vec<crate::data::Example>> {
    let opts = LoadOptions {
        max_length: 4096,
        truncation: Truncation::Error,
        vocab_size: cfg["vocab_size"].as_u64().unwrap_or(0) as usize,
    };
    let data = load_jsonl(&args.data, None, &opts)?;
    let need = (args.steps + args.warmup) * args.bs;
    if data.examples.len() < need {
        return Err(Error::Dataset {
            path: args.data.clone(),
            msg: format!(
                "{} examples, the benchmark needs {need} ((steps + warmup) x bs)",
                data.examples.len()
            ),
        });
    }
    Ok(data.examples)
}

/// A freshly initialised model of the shape, in a trainer at a constant 1e-5.
fn bench_trainer(
    args: &BenchArgs,
    cfg: serde_json::Value,
) -> Result<Trainer<DecoderModel, CompletionOnlyCollator>> {
    let lora = args.lora.map(|r| LoraSetup {
        config: LoraConfig {
            r,
            alpha: 2.0 * r as f64,
            targets: Targets::AllLinear,
            ..Default::default()
        },
        frozen_dtype: args.compute.dtype,
    });
    // Full fine-tuning keeps the seeded host-side init every earlier number was measured with.
    let mut model = match &lora {
        None => DecoderModel::new_random(cfg, 0, &args.device)?,
        Some(l) => DecoderModel::new_random_for_bench(cfg, &args.device, Some(l))?,
    };
    model.compute = args.compute;
    let collator = if args.padding_free {
        CompletionOnlyCollator::padding_free(0)
    } else {
        CompletionOnlyCollator::padded(0)
    };
    let tc = TrainerConfig {
        batch_size: args.bs,
        adamw: AdamWConfig {
            lr: 1e-5,
            ..Default::default()
        },
        max_grad_norm: 1.0,
        progress: false,
        ..Default::default()
    };
    Trainer::new(model, collator, tc, args.device.clone())
}

/// `packsft bench`: tokens per second of training steps after a warmup, on the GPU with each
/// step enqueued before the previous one is read (as `Trainer::train` runs).
pub fn run(args: &BenchArgs) -> Result<BenchResult> {
    let cfg = shape(&args.shape)?;
    let examples = bench_examples(args, &cfg)?;
    let head_dim = cfg["head_dim"].as_u64().unwrap_or(
        cfg["hidden_size"].as_u64().unwrap_or(0) / cfg["num_attention_heads"].as_u64().unwrap_or(1),
    ) as usize;
    let flash = args
        .compute
        .attention
        .use_flash(&args.device, args.compute.dtype, head_dim)?;
    let mut trainer = bench_trainer(args, cfg)?;
    let (trainable, n_params) = trainer.model.param_counts();
    // Model FLOPs per token: 6N for full fine-tuning; 4N with a frozen base (forward and input
    // gradient, no weight gradient), as strong_peer.py counts LoRA.
    let flops_per_param = if args.lora.is_some() { 4.0 } else { 6.0 };
    let schedule = LrSchedule::new(Schedule::Constant, 1e-5, 0, args.steps + args.warmup);
    let (mut real, mut slots) = (0usize, 0usize);
    let mut t0 = Instant::now();
    let mut last_loss = f64::NAN;
    // As `Trainer::train` runs on a GPU: each step is enqueued before the previous one is read.
    let mut in_flight = None;
    let (mut enqueue_s, mut wait_s) = (0f64, 0f64);
    let mut finish = |trainer: &mut Trainer<_, _>, p, timed: bool| -> Result<()> {
        let t = Instant::now();
        let m = trainer.finish_step(p)?;
        if timed {
            wait_s += t.elapsed().as_secs_f64();
        }
        last_loss = m.loss;
        if m.step > args.warmup {
            real += m.tokens;
            slots += m.positions;
        }
        Ok(())
    };
    for (i, chunk) in examples
        .chunks(args.bs)
        .take(args.steps + args.warmup)
        .enumerate()
    {
        if i == args.warmup {
            if let Some(p) = in_flight.take() {
                finish(&mut trainer, p, false)?;
            }
            args.device.synchronize()?;
            t0 = Instant::now();
        }
        let timed = i >= args.warmup;
        let t = Instant::now();
        let p = trainer.enqueue_step_with(i, &[chunk], &schedule, true)?;
        if timed {
            enqueue_s += t.elapsed().as_secs_f64();
        }
        if let Some(prev) = in_flight.replace(p) {
            finish(&mut trainer, prev, timed)?;
        }
        if !args.overlap {
            let p = in_flight.take().expect("just enqueued");
            finish(&mut trainer, p, timed)?;
        }
    }
    if let Some(p) = in_flight.take() {
        finish(&mut trainer, p, true)?;
    }
    args.device.synchronize()?;
    let dt = t0.elapsed().as_secs_f64();
    let tps = real as f64 / dt;
    Ok(BenchResult {
        peer: "packsft",
        shape: args.shape.clone(),
        attn: if flash {
            "flash-varlen"
        } else {
            "eager-varlen"
        },
        mode: if args.padding_free {
            "packed"
        } else {
            "padded"
        },
        device: format!("{:?}", args.device.location()),
        bs: args.bs,
        steps: args.steps,
        tokens_per_s: tps,
        step_s: dt / args.steps as f64,
        pad_frac: 1.0 - real as f64 / slots as f64,
        peak_gib: crate::device::gpu_peak_bytes(&args.device).unwrap_or_else(peak_rss_bytes) as f64
            / (1u64 << 30) as f64,
        mfu: args
            .device
            .is_cuda()
            .then(|| flops_per_param * n_params as f64 * tps / 790e12),
        final_loss: last_loss,
        dtype: format!("{:?}", args.compute.dtype).to_lowercase(),
        gradient_checkpointing: args.compute.gradient_checkpointing,
        host_enqueue_s: enqueue_s / args.steps as f64,
        host_wait_s: wait_s / args.steps as f64,
        lora_r: args.lora,
        trainable_params: trainable,
    })
}

/// `packsft bench-attn`: attention forward and forward+backward throughput alone, on the
/// sequence lengths of real batches or on equal-length ones (to set next to PyTorch's flash
/// SDPA, which only takes equal lengths).
#[derive(Debug, Clone)]
pub struct AttnBenchArgs {
    /// Sequence lengths of each batch to time.
    pub batches: Vec<Vec<usize>>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub iters: usize,
    pub device: Device,
    pub attention: crate::nn::attention::AttentionImpl,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttnBenchResult {
    pub bench: &'static str,
    pub attn: &'static str,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub batches: usize,
    pub tokens_per_batch: f64,
    pub fwd_ms: f64,
    pub fwd_bwd_ms: f64,
    /// Causal attention FLOPs (4 * visible query-key pairs * head_dim * heads forward, 2.5x that
    /// backward) per second.
    pub fwd_tflops: f64,
    pub fwd_bwd_tflops: f64,
}

/// Lengths of the first `n` batches of `bs` examples of a pre-tokenized JSONL file.
pub fn batch_lengths(path: &std::path::Path, bs: usize, n: usize) -> Result<Vec<Vec<usize>>> {
    let opts = LoadOptions {
        max_length: usize::MAX,
        truncation: Truncation::Error,
        vocab_size: u32::MAX as usize,
    };
    let data = load_jsonl(path, None, &opts)?;
    Ok(data
        .examples
        .chunks(bs)
        .take(n)
        .map(|c| c.iter().map(|e| e.input_ids.len()).collect())
        .collect())
}

pub fn attn_bench(args: &AttnBenchArgs) -> Result<AttnBenchResult> {
    use crate::collate::SeqLayout;
    use crate::nn::attention::{eager_attention, AttnPlan};
    use candle_core::{DType, Tensor, Var};
    let dev = &args.device;
    let dtype = if dev.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    };
    let flash = args.attention.use_flash(dev, dtype, args.head_dim)?;
    let (nh, nkv, d) = (args.heads, args.kv_heads, args.head_dim);
    let scale = 1.0 / (d as f64).sqrt();
    let mut setups = Vec::new();
    let (mut pairs, mut tokens) = (0f64, 0usize);
    for lens in &args.batches {
        let mut cu = vec![0usize];
        for l in lens {
            cu.push(cu.last().unwrap() + l);
            pairs += (l * (l + 1) / 2) as f64;
        }
        let n = *cu.last().unwrap();
        tokens += n;
        let layout = SeqLayout::Packed {
            cu_seqlens: cu,
            max_seqlen: lens.iter().copied().max().unwrap_or(0),
        };
        let plan = AttnPlan::new(&layout, n, None, None, dev, flash)?;
        let r = |h: usize| -> Result<Var> {
            Ok(Var::from_tensor(
                &Tensor::randn(0f32, 1f32, (n, h, d), dev)?.to_dtype(dtype)?,
            )?)
        };
        let w = Tensor::randn(0f32, 1f32, (n, nh * d), dev)?.to_dtype(dtype)?;
        setups.push((plan, r(nh)?, r(nkv)?, r(nkv)?, w));
    }
    let attend = |s: &(AttnPlan, Var, Var, Var, Tensor)| -> Result<Tensor> {
        if flash {
            s.0.attend(&s.1, &s.2, &s.3, scale)
        } else {
            eager_attention(&s.1, &s.2, &s.3, &s.0, scale)
        }
    };
    let time = |backward: bool| -> Result<f64> {
        let once = || -> Result<()> {
            for s in &setups {
                let o = attend(s)?;
                if backward {
                    let g = (o * &s.4)?.sum_all()?.backward()?;
                    drop(g);
                }
            }
            Ok(())
        };
        once()?; // warm-up: module load, allocator
        dev.synchronize()?;
        let t0 = Instant::now();
        for _ in 0..args.iters {
            once()?;
        }
        dev.synchronize()?;
        Ok(t0.elapsed().as_secs_f64() / args.iters as f64)
    };
    let fwd = time(false)?;
    let both = time(true)?;
    let fwd_flops = 4.0 * pairs * (d * nh) as f64;
    Ok(AttnBenchResult {
        bench: "attention",
        attn: if flash {
            "packsft-flash-varlen"
        } else {
            "packsft-eager"
        },
        heads: nh,
        kv_heads: nkv,
        head_dim: d,
        batches: args.batches.len(),
        tokens_per_batch: tokens as f64 / args.batches.len().max(1) as f64,
        fwd_ms: fwd * 1e3 / args.batches.len().max(1) as f64,
        fwd_bwd_ms: both * 1e3 / args.batches.len().max(1) as f64,
        fwd_tflops: fwd_flops / fwd / 1e12,
        fwd_bwd_tflops: 3.5 * fwd_flops / both / 1e12,
    })
}

#[cfg(test)]
mod tests {
    use super::shape;
    use crate::model::families::from_config;

    /// Every bench shape is a config the decoder accepts, with the family's own choices (a
    /// shape that fell back to Llama's would measure the wrong model).
    #[test]
    fn every_bench_shape_is_a_model_the_decoder_builds() {
        for name in ["llama-1.1b", "llama-8b", "llama-160m", "llama-cpu-tiny"] {
            let (s, _) = from_config(&shape(name).unwrap()).unwrap();
            assert_eq!(s.family, "llama", "{name}");
        }
        let (q, _) = from_config(&shape("qwen3-8b").unwrap()).unwrap();
        assert_eq!(
            (q.family.as_str(), q.layers, q.head_dim),
            ("qwen3", 36, 128)
        );
        assert!(q.qk_norm.is_some() && !q.tie_embeddings);
        let (g, _) = from_config(&shape("gemma2-2b").unwrap()).unwrap();
        assert_eq!(
            (g.family.as_str(), g.layers, g.head_dim),
            ("gemma2", 26, 256)
        );
        assert_eq!((g.attn_softcap, g.final_softcap), (Some(50.0), Some(30.0)));
        let local = g.local_layers.as_ref().unwrap();
        assert_eq!(local.iter().filter(|&&l| l).count(), 13);
        assert!(shape("gemma-7b")
            .unwrap_err()
            .to_string()
            .contains("gemma2-2b"));
    }
}
