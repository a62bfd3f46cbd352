//! `packsft inspect`: the mask audit (examples token by token, trained tokens highlighted, and the
//! batches exactly as the trainer builds them), and `packsft bench-data`: the throughput of
//! rows → padding-free batches.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use candle_core::Device;

use crate::collate::{Collator, HostBatch};
use crate::data::tokenizer::TextTokenizer;
use crate::data::{Example, LoadOptions, Pipeline};
use crate::error::{Error, Result};
use crate::recipe::build::{load_recipe_data, model_limits, recipe_collator, required_tokenizer};
use crate::recipe::Recipe;
use crate::train::{epoch_order, TrainerConfig};

#[derive(Args)]
pub(crate) struct InspectCmd {
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
}

#[derive(Args)]
pub(crate) struct BenchDataCmd {
    recipe: PathBuf,
    overrides: Vec<String>,
    /// Runs; the best is reported
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Worker threads (default: all cores)
    #[arg(long)]
    threads: Option<usize>,
}

pub(crate) fn run_inspect(c: InspectCmd) -> Result<()> {
    let r = Recipe::load(&c.recipe, &c.overrides)?;
    let opts = InspectOptions {
        n: c.n,
        json: c.json,
        eval: c.eval,
        color: !c.json && std::io::IsTerminal::is_terminal(&std::io::stdout()),
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    inspect(&r, &opts, &mut out)?;
    out.flush().map_err(|e| Error::io("stdout", e))
}

pub(crate) fn run_bench_data(c: BenchDataCmd) -> Result<()> {
    let r = Recipe::load(&c.recipe, &c.overrides)?;
    let b = bench_data(&r, c.repeat, c.threads)?;
    println!("{}", serde_json::to_string(&b).expect("result serialises"));
    Ok(())
}

/// Micro-batches (lists of example indices) of the first epoch, in the trainer's order and
/// split: a seeded shuffle, `grad_accum` micro-batches a step of `batch_size` examples each, or
/// as many as fit `max_tokens_per_batch` (rows × longest).
pub fn train_micro_batches(lengths: &[usize], cfg: &TrainerConfig) -> Vec<(usize, Vec<usize>)> {
    let order = epoch_order(lengths, 0, cfg);
    let mut out = Vec::new();
    let mut pos = 0;
    let mut step = 0;
    while pos < order.len() {
        step += 1;
        let rest: Vec<usize> = order[pos..].iter().map(|&i| lengths[i]).collect();
        for take in crate::train::step_sizes(&rest, cfg) {
            out.push((step, order[pos..pos + take].to_vec()));
            pos += take;
        }
    }
    out
}

fn token_piece(tok: &TextTokenizer, id: u32) -> String {
    let s = tok.inner().decode(&[id], false).unwrap_or_default();
    let s = if s.is_empty() || s.contains('\u{fffd}') {
        tok.token_text(id)
    } else {
        s
    };
    s.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('\t', "\\t")
        .replace('\r', "\\r")
}

/// One example token by token: trained tokens (those with a label) highlighted in colour on a
/// terminal, or between ⟦ and ⟧ otherwise; token boundaries alternate shades in colour.
pub fn render_example(tok: &TextTokenizer, ex: &Example, color: bool) -> String {
    let mut s = String::new();
    let mut open = false;
    for (t, &id) in ex.input_ids.iter().enumerate() {
        let trained = t > 0 && ex.loss_mask[t];
        let piece = token_piece(tok, id);
        if color {
            let style = match (trained, t % 2 == 0) {
                (true, true) => "\x1b[30;42m",
                (true, false) => "\x1b[30;102m",
                (false, true) => "\x1b[48;5;236m",
                (false, false) => "\x1b[48;5;239m",
            };
            s.push_str(style);
            s.push_str(&piece);
            s.push_str("\x1b[0m");
        } else {
            if trained && !open {
                s.push('⟦');
                open = true;
            }
            if !trained && open {
                s.push('⟧');
                open = false;
            }
            s.push_str(&piece);
        }
    }
    if open {
        s.push('⟧');
    }
    s
}

/// What `packsft inspect` shows.
pub struct InspectOptions {
    /// Micro-batches to show.
    pub n: usize,
    /// One JSON object a batch (transformers/TRL fields) instead of the token view.
    pub json: bool,
    /// The evaluation set (in evaluation order) instead of the training set.
    pub eval: bool,
    pub color: bool,
}

/// The mask audit of a recipe: its dataset report, then the first `n` micro-batches as the
/// trainer builds them. Loads no model weights.
pub fn inspect(recipe: &Recipe, opts: &InspectOptions, out: &mut dyn Write) -> Result<()> {
    let tok = required_tokenizer(recipe)?;
    let (vocab, max_pos) = model_limits(recipe, Some(&tok))?;
    let (train, eval) = load_recipe_data(recipe, Some(&tok), vocab, max_pos, None)?;
    let ds = if opts.eval {
        eval.ok_or_else(|| {
            Error::Config("--eval: the recipe has no data.eval or data.eval_ratio".into())
        })?
    } else {
        train
    };
    let collator = recipe_collator(recipe, Some(&tok));
    let cfg = crate::recipe::build::trainer_config(recipe);
    let lengths: Vec<usize> = ds.examples.iter().map(Example::len).collect();
    let batches: Vec<(usize, Vec<usize>)> = if opts.eval {
        (0..ds.examples.len())
            .collect::<Vec<_>>()
            .chunks(cfg.batch_size)
            .map(|c| (0, c.to_vec()))
            .collect()
    } else {
        train_micro_batches(&lengths, &cfg)
    };
    let io = |e: std::io::Error| Error::io("stdout", e);
    if !opts.json {
        write_report(out, &ds, opts.color)?;
    }
    for (k, (step, idx)) in batches.iter().take(opts.n).enumerate() {
        let exs: Vec<Example> = idx.iter().map(|&i| ds.examples[i].clone()).collect();
        let b = collator.collate(&exs, &Device::Cpu)?;
        let host: &HostBatch = b.host();
        if opts.json {
            let mut v = serde_json::to_value(host).expect("batches serialise");
            let m = v.as_object_mut().expect("an object");
            m.insert("batch".into(), (k + 1).into());
            if !opts.eval {
                m.insert("step".into(), (*step).into());
            }
            m.insert(
                "rows".into(),
                idx.iter()
                    .map(|&i| serde_json::Value::from(ds.origins[i].to_string()))
                    .collect(),
            );
            writeln!(out, "{}", serde_json::to_string(&v).expect("JSON")).map_err(io)?;
            continue;
        }
        let layout = match &host.cu_seq_lens {
            Some(cu) => format!("padding-free, cu_seq_lens {cu:?}"),
            None => format!("padded to {} a row", host.input_ids[0].len()),
        };
        writeln!(
            out,
            "\nbatch {}{}: {} examples, {} tokens, {} targets, {layout}",
            k + 1,
            if opts.eval {
                String::new()
            } else {
                format!(" (step {step})")
            },
            exs.len(),
            exs.iter().map(Example::len).sum::<usize>(),
            exs.iter().map(Example::n_targets).sum::<usize>(),
        )
        .map_err(io)?;
        for (j, (&i, ex)) in idx.iter().zip(&exs).enumerate() {
            writeln!(
                out,
                "  [{}] {} · {} tokens · {} targets\n    {}",
                j + 1,
                ds.origins[i],
                ex.len(),
                ex.n_targets(),
                render_example(&tok, ex, opts.color)
            )
            .map_err(io)?;
        }
    }
    Ok(())
}

/// The dataset report's lines, as `inspect` prints them before the batches.
fn write_report(out: &mut dyn Write, ds: &crate::data::Dataset, color: bool) -> Result<()> {
    let io = |e: std::io::Error| Error::io("stdout", e);
    let r = &ds.report;
    writeln!(
        out,
        "{}: {} rows, format {}, template {}, masking {} (loss on {})",
        ds.path.display(),
        r.rows,
        r.format,
        r.template.as_deref().unwrap_or("none"),
        r.method,
        r.loss_on
    )
    .map_err(io)?;
    writeln!(
        out,
        "  examples {} · dropped {} (too long {}, no target {}, template missing {}) · truncated {} · EOS not a target {} · supervised {} of {} tokens ({:.1}%)",
        r.examples,
        r.dropped(),
        r.dropped_too_long,
        r.dropped_no_target,
        r.dropped_template_missing,
        r.truncated,
        r.eos_not_target,
        r.target_tokens,
        r.tokens,
        100.0 * r.supervised_ratio()
    )
    .map_err(io)?;
    if !r.dropped_rows.is_empty() {
        writeln!(
            out,
            "  dropped rows (first {}): {}",
            r.dropped_rows.len(),
            r.dropped_rows.join(", ")
        )
        .map_err(io)?;
    }
    if !color {
        writeln!(
            out,
            "  trained tokens (those with a label) are between ⟦ and ⟧"
        )
        .map_err(io)?;
    }
    Ok(())
}

/// What `packsft bench-data` measured: rows → padding-free batches.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DataBench {
    pub rows: usize,
    pub examples: usize,
    pub tokens: usize,
    pub target_tokens: usize,
    pub batches: usize,
    pub method: String,
    pub threads: usize,
    /// Best of `repeat` runs.
    pub seconds: f64,
    pub examples_per_s: f64,
    pub tokens_per_s: f64,
    pub all_seconds: Vec<f64>,
}

/// Times reading, rendering, tokenizing and masking the recipe's training rows and collating
/// them into padding-free batches of `train.batch_size` (on the CPU), `repeat` times.
pub fn bench_data(recipe: &Recipe, repeat: usize, threads: Option<usize>) -> Result<DataBench> {
    let tok = required_tokenizer(recipe)?;
    let (vocab, max_pos) = model_limits(recipe, Some(&tok))?;
    let opts = LoadOptions {
        max_length: recipe.data.max_length.min(max_pos.unwrap_or(usize::MAX)),
        truncation: recipe.data.truncation,
        vocab_size: vocab,
    };
    let mut collator = recipe_collator(recipe, Some(&tok));
    collator.padding_free = true;
    let bs = recipe.train.batch_size;
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..repeat.max(1) {
        let t0 = Instant::now();
        let mut pipe = Pipeline::new(Some(&tok), recipe.data_spec(), opts.clone())?;
        if let Some(n) = threads {
            pipe = pipe.with_threads(n);
        }
        let crate::recipe::TrainData::Path(train) = &recipe.data.train else {
            return Err(Error::Config(
                "bench-data reads one source: set data.train to a path".into(),
            ));
        };
        let ds = pipe.load(train)?;
        let mut batches = 0;
        for chunk in ds.examples.chunks(bs) {
            let b = collator.collate(chunk, &Device::Cpu)?;
            std::hint::black_box(&b);
            batches += 1;
        }
        times.push(t0.elapsed().as_secs_f64());
        last = Some((ds, batches));
    }
    let (ds, batches) = last.expect("at least one run");
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    let r = &ds.report;
    Ok(DataBench {
        rows: r.rows,
        examples: r.examples,
        tokens: r.tokens,
        target_tokens: r.target_tokens,
        batches,
        method: r.method.clone(),
        threads: threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
        seconds: best,
        examples_per_s: r.examples as f64 / best,
        tokens_per_s: r.tokens as f64 / best,
        all_seconds: times,
    })
}
