use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use packsft::{app, bench, generate, recipe::Recipe, DecoderModel, TextTokenizer};

#[derive(Parser)]
#[command(
    name = "packsft",
    version,
    about = "Supervised fine-tuning with padding-free packing"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train as a recipe says: packsft train recipes/quickstart.yaml [train.lr=1e-3 ...]
    Train {
        recipe: PathBuf,
        /// Dotted overrides of recipe keys, e.g. train.max_steps=100
        overrides: Vec<String>,
    },
    /// Loss on the recipe's data.eval; the last stdout line is {"eval_loss": .., "eval_tokens": ..}
    Eval {
        recipe: PathBuf,
        overrides: Vec<String>,
    },
    /// What packsft understood of a checkpoint: family, sizes, every structural choice
    Arch {
        model_dir: PathBuf,
        /// Print the full specification as JSON
        #[arg(long)]
        json: bool,
    },
    /// Mask audit: the dataset report and the first batches token by token, trained tokens
    /// highlighted (--json: input_ids, labels, position_ids, cu_seq_lens per batch)
    Inspect {
        recipe: PathBuf,
        overrides: Vec<String>,
        /// Micro-batches to show
        #[arg(long, default_value_t = 2)]
        n: usize,
        /// One JSON object per batch, in transformers' and TRL's field layout
        #[arg(long)]
        json: bool,
        /// The evaluation set instead of the training set
        #[arg(long)]
        eval: bool,
    },
    /// Throughput of the data pipeline: the recipe's training rows to padding-free batches
    BenchData {
        recipe: PathBuf,
        overrides: Vec<String>,
        /// Runs; the best is reported
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Worker threads (default: all cores)
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Attention alone, forward and forward+backward: the lengths of real batches of DATA, or
    /// `--equal BxL` sequences of L tokens
    BenchAttn {
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
    },
    /// Greedy continuation of one or more prompts with a saved model directory
    Generate {
        model_dir: PathBuf,
        #[arg(long = "prompt", required = true)]
        prompts: Vec<String>,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
    },
    /// Training throughput on pre-tokenized data (shared/bench/make_bench_data.py)
    Bench {
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
    },
}

fn run(cli: Cli) -> packsft::Result<()> {
    match cli.cmd {
        Cmd::Train { recipe, overrides } => {
            let r = Recipe::load(&recipe, &overrides)?;
            // First SIGINT/SIGTERM: checkpoint after the current step and exit; a second one
            // exits at once.
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register_conditional_shutdown(sig, 130, stop.clone())
                    .and_then(|_| signal_hook::flag::register(sig, stop.clone()))
                    .map_err(|e| packsft::Error::io("signal handler", e))?;
            }
            let dev = packsft::device::open(&r.train.device)?;
            let summary = app::train(&r, &recipe, &dev, Some(stop))?;
            if summary.interrupted {
                let at = summary
                    .last_checkpoint
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                eprintln!("interrupted: saved {at}; resume with resume_from=latest");
                return Err(packsft::Error::Training("interrupted".into()));
            }
            if let (Some(first), Some(last)) = (summary.steps.first(), summary.steps.last()) {
                println!(
                    "{}",
                    serde_json::json!({
                        "steps": last.step,
                        "first_loss": first.loss,
                        "final_loss": last.loss,
                        "eval_loss": summary.evals.last().map(|e| e.eval_loss),
                        "output_dir": r.output_dir,
                    })
                );
            }
        }
        Cmd::Eval { recipe, overrides } => {
            let r = Recipe::load(&recipe, &overrides)?;
            let dev = packsft::device::open(&r.train.device)?;
            let (loss, n) = app::eval(&r, &recipe, &dev)?;
            println!(
                "{}",
                serde_json::json!({"eval_loss": loss, "eval_tokens": n})
            );
        }
        Cmd::Arch { model_dir, json } => {
            let report = packsft::model::arch::describe(&model_dir)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report.spec).expect("spec serialises")
                );
            } else {
                print!("{report}");
            }
        }
        Cmd::Inspect {
            recipe,
            overrides,
            n,
            json,
            eval,
        } => {
            let r = Recipe::load(&recipe, &overrides)?;
            let opts = packsft::inspect::InspectOptions {
                n,
                json,
                eval,
                color: !json && std::io::IsTerminal::is_terminal(&std::io::stdout()),
            };
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            packsft::inspect::inspect(&r, &opts, &mut out)?;
            std::io::Write::flush(&mut out).map_err(|e| packsft::Error::io("stdout", e))?;
        }
        Cmd::BenchData {
            recipe,
            overrides,
            repeat,
            threads,
        } => {
            let r = Recipe::load(&recipe, &overrides)?;
            let b = packsft::inspect::bench_data(&r, repeat, threads)?;
            println!("{}", serde_json::to_string(&b).expect("result serialises"));
        }
        Cmd::BenchAttn {
            data,
            bs,
            batches,
            equal,
            heads,
            kv_heads,
            head_dim,
            iters,
            device,
            attention,
        } => {
            let batches = match (data, equal) {
                (Some(path), _) => bench::batch_lengths(&path, bs, batches)?,
                (None, Some(e)) => {
                    let bad = || {
                        packsft::Error::Config(format!("--equal {e:?}: expected BxL, e.g. 8x2048"))
                    };
                    let (b, l) = e.split_once('x').ok_or_else(bad)?;
                    let (b, l): (usize, usize) =
                        (b.parse().map_err(|_| bad())?, l.parse().map_err(|_| bad())?);
                    vec![vec![l; b]]
                }
                (None, None) => {
                    return Err(packsft::Error::Config(
                        "bench-attn needs DATA or --equal BxL".into(),
                    ))
                }
            };
            let r = bench::attn_bench(&bench::AttnBenchArgs {
                batches,
                heads,
                kv_heads,
                head_dim,
                iters,
                device: packsft::device::open(&device)?,
                attention: attention.parse()?,
            })?;
            println!("{}", serde_json::to_string(&r).expect("result serialises"));
        }
        Cmd::Generate {
            model_dir,
            prompts,
            max_new_tokens,
        } => {
            let dev = candle_core::Device::Cpu;
            let model = DecoderModel::from_pretrained(&model_dir, &dev)?;
            let tok = TextTokenizer::load(&model_dir)?;
            for p in prompts {
                let out = generate::greedy(&model, &tok, &p, max_new_tokens)?;
                println!("{p}{out}");
            }
        }
        Cmd::Bench {
            data,
            shape,
            bs,
            steps,
            warmup,
            padded,
            padding_free: _,
            compare,
            device: dev,
            dtype,
            gradient_checkpointing,
            attention,
            autograd_layers,
            no_overlap,
        } => {
            let compute = packsft::model::ComputeOptions {
                dtype: match dtype.as_str() {
                    "auto" if packsft::device::parse(&dev)?.is_some() => candle_core::DType::BF16,
                    "auto" | "f32" => candle_core::DType::F32,
                    "bf16" => candle_core::DType::BF16,
                    "f16" => candle_core::DType::F16,
                    other => {
                        return Err(packsft::Error::Config(format!(
                            "unknown dtype {other:?} (auto, f32, bf16, f16)"
                        )))
                    }
                },
                gradient_checkpointing,
                attention: attention.parse()?,
                autograd_layers,
            };
            if compare {
                let exe = std::env::current_exe()
                    .map_err(|e| packsft::Error::io("current executable", e))?;
                let mut rows = Vec::new();
                for mode in ["--padded", "--padding-free"] {
                    let out = std::process::Command::new(&exe)
                        .args([
                            "bench",
                            &data.to_string_lossy(),
                            "--shape",
                            &shape,
                            "--device",
                            &dev,
                        ])
                        .args(["--bs", &bs.to_string(), "--steps", &steps.to_string()])
                        .args(["--warmup", &warmup.to_string(), mode, "--dtype", &dtype])
                        .args(["--attention", &attention])
                        .args(gradient_checkpointing.then_some("--gradient-checkpointing"))
                        .args(autograd_layers.then_some("--autograd-layers"))
                        .args(no_overlap.then_some("--no-overlap"))
                        .stderr(std::process::Stdio::inherit())
                        .output()
                        .map_err(|e| packsft::Error::io(&exe, e))?;
                    let text = String::from_utf8_lossy(&out.stdout);
                    let line = text.lines().last().unwrap_or_default().to_string();
                    if !out.status.success() {
                        return Err(packsft::Error::Training(format!(
                            "bench {mode} failed: {text}"
                        )));
                    }
                    println!("{line}");
                    rows.push(
                        serde_json::from_str::<serde_json::Value>(&line).map_err(|e| {
                            packsft::Error::Training(format!("bench {mode} printed {line:?}: {e}"))
                        })?,
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
            } else {
                let args = bench::BenchArgs {
                    data,
                    shape,
                    bs,
                    steps,
                    warmup,
                    padding_free: !padded,
                    device: packsft::device::open(&dev)?,
                    compute,
                    overlap: !no_overlap,
                };
                let r = bench::run(&args)?;
                println!("{}", serde_json::to_string(&r).expect("result serialises"));
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
