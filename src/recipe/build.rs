//! From a recipe to a run: everything the `train` and `eval` commands do, reusable from Rust.
//! All inputs are read and checked before anything is written, so bad input leaves no partial
//! output behind.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::Device;

use crate::collate::CompletionOnlyCollator;
use crate::data::tokenizer::TextTokenizer;
use crate::data::{Dataset, Example, LoadOptions, Pipeline};
use crate::error::{Error, Result};
use crate::model::{ComputeOptions, DecoderModel, LoraSetup, Model};
use crate::recipe::{Recipe, TrainData};
use crate::train::callback::{Callback, EarlyStopping};
use crate::train::AdamWConfig;
use crate::train::{DataParallel, EvalSampler, TrainSummary, Trainer, TrainerConfig};

/// The inputs of a run, loaded and validated.
pub struct Prepared {
    pub model: DecoderModel,
    /// None for a checkpoint without tokenizer files trained on pre-tokenized rows.
    pub tokenizer: Option<TextTokenizer>,
    pub train: Dataset,
    pub eval: Option<Dataset>,
    pub collator: CompletionOnlyCollator,
}

/// A recipe's inline `model.config`: a config.json written by hand. The family defaults to
/// llama; vocabulary and special tokens default to the tokenizer's; a key the family does not
/// read is a typo and an error, not silently ignored.
fn inline_config(
    v: &serde_json::Value,
    tok: &TextTokenizer,
    recipe_path: &Path,
) -> Result<serde_json::Value> {
    let err = |msg: String| Error::Recipe {
        path: recipe_path.to_path_buf(),
        line: None,
        column: None,
        msg: format!("model.config: {msg}"),
    };
    let mut map = v
        .as_object()
        .ok_or_else(|| err("must be a mapping of config.json fields".into()))?
        .clone();
    map.entry("model_type").or_insert("llama".into());
    map.entry("vocab_size").or_insert(tok.vocab_size().into());
    for (key, id) in [
        ("bos_token_id", tok.bos_id),
        ("eos_token_id", tok.eos_id),
        ("pad_token_id", tok.pad_id),
    ] {
        if let Some(id) = id {
            map.entry(key).or_insert(id.into());
        }
    }
    let cfg = serde_json::Value::Object(map);
    // Typos first: parse a copy with the structural keys every family requires filled in, so
    // the keys the family reads are known even when the config is incomplete.
    let mut probe = cfg.clone();
    let filler = [
        ("vocab_size", 8),
        ("hidden_size", 8),
        ("intermediate_size", 8),
        ("num_hidden_layers", 1),
        ("num_attention_heads", 1),
        ("d_model", 8),
        ("n_heads", 1),
        ("n_layers", 1),
    ];
    for (k, v) in filler {
        probe
            .as_object_mut()
            .expect("object")
            .entry(k)
            .or_insert(v.into());
    }
    if let Ok((_, _, read)) = crate::model::families::from_config_tracked(&probe) {
        let obj = cfg.as_object().expect("built as an object");
        if let Some(k) = obj.keys().find(|k| !read.contains(k.as_str())) {
            let mt = obj["model_type"].as_str().unwrap_or_default();
            return Err(err(format!(
                "unknown field `{k}` (a {mt} config does not read it)"
            )));
        }
    }
    crate::model::families::from_config(&cfg).map_err(|e| err(e.to_string()))?;
    Ok(cfg)
}

/// Everything a run needs, read and checked before anything is written: tokenizer, model, data,
/// collator. `stop` (the CLI's signal flag) interrupts the data preparation.
pub fn prepare(
    recipe: &Recipe,
    recipe_path: &Path,
    device: &Device,
    stop: Option<&Arc<AtomicBool>>,
) -> Result<Prepared> {
    let tokenizer = recipe_tokenizer(recipe)?;
    let lora = match &recipe.lora {
        Some(l) => Some(LoraSetup {
            config: l
                .to_config(recipe.train.seed)
                .map_err(|msg| Error::Recipe {
                    path: recipe_path.to_path_buf(),
                    line: None,
                    column: None,
                    msg,
                })?,
            // The frozen base in the compute dtype: bf16 compute keeps no float32 copy of it.
            frozen_dtype: recipe.train.dtype.dtype(),
        }),
        None => None,
    };
    let model = match (&recipe.model.path, &recipe.model.config, &lora) {
        (Some(dir), _, None) => DecoderModel::from_pretrained(dir, device)?,
        (Some(dir), _, Some(setup)) => DecoderModel::from_pretrained_with_lora(dir, device, setup)?,
        (None, Some(cfg), _) => {
            let cfg = inline_config(
                cfg,
                tokenizer
                    .as_ref()
                    .expect("recipe validation requires model.tokenizer with model.config"),
                recipe_path,
            )?;
            match &lora {
                None => DecoderModel::new_random(cfg, recipe.train.seed, device)?,
                Some(setup) => {
                    DecoderModel::new_random_with_lora(cfg, recipe.train.seed, device, setup)?
                }
            }
        }
        (None, None, _) => unreachable!("recipe validation requires a model source"),
    };
    if lora.is_some() {
        let (trainable, total) = model.param_counts();
        tracing::info!(
            "LoRA: {trainable} trainable parameters of {total} ({:.3}%) in {} adapted modules",
            100.0 * trainable as f64 / total.max(1) as f64,
            model.lora_targets().len()
        );
    }
    if let Some(t) = tokenizer
        .as_ref()
        .filter(|t| t.vocab_size() > model.spec.vocab)
    {
        return Err(Error::Config(format!(
            "tokenizer {} has {} tokens but the model's vocab_size is {}",
            t.path.display(),
            t.vocab_size(),
            model.spec.vocab
        )));
    }
    let (train, eval) = load_recipe_data(
        recipe,
        tokenizer.as_ref(),
        model.spec.vocab,
        Some(model.spec.max_positions),
        stop,
    )?;
    let collator = recipe_collator(recipe, tokenizer.as_ref());
    let mut model = model;
    model.compute = ComputeOptions {
        dtype: recipe.train.dtype.dtype(),
        gradient_checkpointing: recipe.train.gradient_checkpointing,
        attention: recipe.train.attention,
        ..Default::default()
    };
    Ok(Prepared {
        model,
        tokenizer,
        train,
        eval,
        collator,
    })
}

pub fn trainer_config(recipe: &Recipe) -> TrainerConfig {
    let t = &recipe.train;
    TrainerConfig {
        batch_size: t.batch_size,
        grad_accum: t.grad_accum,
        max_steps: t.max_steps,
        epochs: t.epochs,
        adamw: AdamWConfig {
            lr: t.lr,
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_epsilon,
            weight_decay: t.weight_decay,
        },
        schedule: t.lr_scheduler,
        warmup_steps: t.warmup_steps,
        warmup_ratio: t.warmup_ratio,
        min_lr_ratio: t.min_lr_ratio,
        decay_ratio: t.decay_ratio,
        max_tokens_per_batch: t.max_tokens_per_batch,
        group_by_length: t.group_by_length,
        max_grad_norm: t.max_grad_norm,
        seed: t.seed,
        shuffle: t.shuffle,
        logging_steps: t.logging_steps,
        eval_steps: t.eval_steps,
        save_steps: t.save_steps,
        save_total_limit: t.save_total_limit,
        output_dir: Some(recipe.output_dir.clone()),
        progress: true,
        overlap_steps: t.overlap_steps,
    }
}

/// Writes the tokenizer and the recipe into every checkpoint, so each is a complete model
/// directory that `packsft eval`, `generate` and transformers can read.
struct CheckpointExtras {
    tokenizer: Option<TextTokenizer>,
    recipe_yaml: String,
}

impl Callback for CheckpointExtras {
    fn on_save(&mut self, dir: &Path, _step: usize) -> Result<()> {
        if let Some(t) = &self.tokenizer {
            t.save(dir)?;
        }
        crate::io::write_atomic(&dir.join("recipe.yaml"), self.recipe_yaml.as_bytes())
    }
}

/// Where `resume_from` points, checked before training starts.
fn resume_dir(recipe: &Recipe, recipe_path: &Path) -> Result<Option<std::path::PathBuf>> {
    match recipe.resume_from.as_deref() {
        None => Ok(None),
        Some("latest") => Ok(crate::train::checkpoint::latest_complete(
            &recipe.output_dir,
        )),
        Some(p) => {
            let dir = std::path::PathBuf::from(p);
            if !dir.join(crate::train::checkpoint::STATE_FILE).exists() {
                return Err(Error::Recipe {
                    path: recipe_path.to_path_buf(),
                    line: None,
                    column: None,
                    msg: format!(
                        "resume_from: {p} is not a packsft checkpoint (no {})",
                        crate::train::checkpoint::STATE_FILE
                    ),
                });
            }
            Ok(Some(dir))
        }
    }
}

/// Builds the trainer a recipe describes, resumed if the recipe says so.
pub fn build_trainer(
    recipe: &Recipe,
    recipe_path: &Path,
    device: &Device,
    stop: Option<&Arc<AtomicBool>>,
) -> Result<(Trainer<DecoderModel, CompletionOnlyCollator>, RunData)> {
    let resume = resume_dir(recipe, recipe_path)?;
    let p = prepare(recipe, recipe_path, device, stop)?;
    // A rank of a multi-process run (packsft launch, torchrun, Slurm): only rank 0 writes.
    let world = crate::dist::World::from_env()?;
    let rank0 = world.as_ref().is_none_or(|w| w.rank == 0);
    let mut config = trainer_config(recipe);
    if !rank0 {
        config.output_dir = None;
        config.progress = false;
    }
    let dp = match &world {
        Some(w) => {
            let hash = run_hash(recipe, &p.train)?;
            let timeout = std::time::Duration::from_secs(recipe.dist.timeout_s);
            let host = crate::dist::tcp::connect(w, hash, timeout)?;
            let comm = connect_devices(host, device, timeout)?;
            tracing::info!(
                rank = w.rank,
                world_size = w.size,
                zero = ?recipe.dist.zero,
                reduce_dtype = ?recipe.dist.reduce_dtype,
                "data parallel: {} examples a step",
                recipe.train.batch_size * w.size * recipe.train.grad_accum
            );
            Some(
                DataParallel::new(comm, recipe.dist.zero, p.model.params())
                    .with_reduce_dtype(recipe.dist.reduce_dtype),
            )
        }
        None => None,
    };
    let mut trainer = Trainer::new(p.model, p.collator, config, device.clone())?;
    if let Some(dp) = dp {
        trainer.set_data_parallel(dp)?;
    }
    if let (true, Some(tok)) = (recipe.logging.eval_samples > 0, &p.tokenizer) {
        let t = tok.clone();
        trainer.set_eval_sampler(EvalSampler {
            prompts: recipe.logging.eval_samples,
            max_new_tokens: recipe.logging.eval_sample_tokens,
            eos: tok.eos_id,
            decode: Box::new(move |ids| t.decode(ids)),
        });
    }
    if rank0 {
        trainer.add_callback(Box::new(CheckpointExtras {
            tokenizer: p.tokenizer.clone(),
            recipe_yaml: recipe.to_yaml(),
        }));
        let runs =
            (recipe.logging.tensorboard.clone()).unwrap_or_else(|| recipe.output_dir.join("runs"));
        trainer.add_callback(Box::new(
            crate::train::TensorBoard::new(runs).with_text("recipe", &recipe.to_yaml()),
        ));
    }
    if recipe.train.early_stopping_patience > 0 {
        trainer.add_callback(Box::new(EarlyStopping::new(
            recipe.train.early_stopping_patience,
            0.0,
        )));
    }
    if let Some(dir) = resume {
        trainer.resume_from(&dir)?;
    }
    Ok((
        trainer,
        RunData {
            tokenizer: p.tokenizer,
            train: p.train,
            eval: p.eval,
        },
    ))
}

/// The data and tokenizer of a prepared run, once the model and collator went to the trainer.
pub struct RunData {
    pub tokenizer: Option<TextTokenizer>,
    pub train: Dataset,
    pub eval: Option<Dataset>,
}

/// Trains as the recipe says and writes the model, tokenizer, recipe and metrics to
/// `output_dir` in Hugging Face layout. A stop request (signal) ends with a checkpoint and
/// without the final model files.
pub fn train(
    recipe: &Recipe,
    recipe_path: &Path,
    device: &Device,
    stop: Option<Arc<AtomicBool>>,
) -> Result<TrainSummary> {
    let (mut trainer, p) = build_trainer(recipe, recipe_path, device, stop.as_ref())?;
    if let Some(stop) = stop {
        trainer.set_stop_flag(stop);
    }
    let eval = p.eval.as_ref().map(|d| d.examples.as_slice());
    let rank0 = trainer.rank() == 0;
    // Held until the final files are written: the trainer takes the same lock for its loop.
    let _lock = match rank0 {
        true => Some(crate::train::lock::OutputLock::acquire(&recipe.output_dir)?),
        false => None,
    };
    let summary = trainer.train(&p.train.examples, eval)?;
    if summary.interrupted || !rank0 {
        return Ok(summary);
    }
    let out = &recipe.output_dir;
    if let Some(name) = crate::nn::param::first_non_finite(trainer.model.params())? {
        return Err(Error::Training(format!(
            "parameter {name} holds NaN or infinity after training: the model is not saved"
        )));
    }
    trainer.model.save(out)?;
    if let Some(t) = &p.tokenizer {
        t.save(out)?;
    }
    crate::io::write_atomic(&out.join("recipe.yaml"), recipe.to_yaml().as_bytes())?;
    if let (Some(l), Some(base)) = (&recipe.lora, &recipe.model.path) {
        if l.merge {
            let merged = out.join("merged");
            let r = crate::model::lora::merge(base, out, &merged, candle_core::DType::F32)?;
            tracing::info!(
                merged = %merged.display(),
                "merged {} adapted matrices into the base ({} tensors)",
                r.merged,
                r.tensors
            );
        }
    }
    tracing::info!(output_dir = %out.display(), "saved");
    Ok(summary)
}

/// Mean loss per target token of the recipe's model on `data.eval`.
pub fn eval(recipe: &Recipe, recipe_path: &Path, device: &Device) -> Result<(f64, usize)> {
    if !recipe.data.has_eval() {
        return Err(Error::Recipe {
            path: recipe_path.to_path_buf(),
            line: None,
            column: None,
            msg: "neither data.eval nor data.eval_ratio is set: nothing to evaluate".into(),
        });
    }
    let p = prepare(recipe, recipe_path, device, None)?;
    let eval = p.eval.expect("data.eval or data.eval_ratio was set");
    let trainer = Trainer::new(p.model, p.collator, trainer_config(recipe), device.clone())?;
    let r = trainer.evaluate(&eval.examples)?;
    Ok((r.loss, r.tokens))
}

/// The tokenizer a recipe names: `model.tokenizer`, else the one in `model.path` if it holds
/// one. None only for a checkpoint without tokenizer files, which can still train and evaluate
/// on pre-tokenized rows (text rows then fail naming the missing tokenizer).
pub fn recipe_tokenizer(recipe: &Recipe) -> Result<Option<TextTokenizer>> {
    match (&recipe.model.tokenizer, &recipe.model.path) {
        (Some(p), _) => TextTokenizer::load(p).map(Some),
        (None, Some(dir)) if dir.join(crate::data::tokenizer::TOKENIZER_FILE).exists() => {
            TextTokenizer::load(dir).map(Some)
        }
        _ => Ok(None),
    }
}

/// `recipe_tokenizer` where tokens must be shown or text encoded.
pub(crate) fn required_tokenizer(recipe: &Recipe) -> Result<TextTokenizer> {
    recipe_tokenizer(recipe)?.ok_or_else(|| {
        Error::Config("this command needs a tokenizer: set model.tokenizer (the model directory has no tokenizer.json)".into())
    })
}

/// The model's vocabulary size and position limit as its config.json (or the recipe's inline
/// `model.config`) states them, without loading weights.
pub fn model_limits(
    recipe: &Recipe,
    tok: Option<&TextTokenizer>,
) -> Result<(usize, Option<usize>)> {
    let cfg = match (&recipe.model.config, &recipe.model.path) {
        (Some(c), _) => Some(c.clone()),
        (None, Some(dir)) => {
            let p = dir.join("config.json");
            match std::fs::read_to_string(&p) {
                Ok(text) => Some(
                    serde_json::from_str::<serde_json::Value>(&text)
                        .map_err(|e| Error::model(&p, format!("line {}: {e}", e.line())))?,
                ),
                Err(e) => return Err(Error::io(&p, e)),
            }
        }
        (None, None) => None,
    };
    let Some(mut cfg) = cfg else {
        return Ok((tok.map_or(usize::MAX, TextTokenizer::vocab_size), None));
    };
    // Read through the family's own defaults (a Mistral without max_position_embeddings allows
    // 131072 positions), exactly as the model will be built.
    if let Some(m) = cfg.as_object_mut() {
        m.entry("model_type").or_insert("llama".into());
        if let Some(t) = tok {
            m.entry("vocab_size").or_insert(t.vocab_size().into());
        }
    }
    let (spec, _) =
        crate::model::families::from_config(&cfg).map_err(|e| match &recipe.model.path {
            Some(dir) if recipe.model.config.is_none() => {
                Error::model(dir.join("config.json"), e.to_string())
            }
            _ => Error::Config(format!("model.config: {e}")),
        })?;
    Ok((spec.vocab, Some(spec.max_positions)))
}

/// The recipe's datasets: read, encoded, reported (logged) and checked against its thresholds.
pub fn load_recipe_data(
    recipe: &Recipe,
    tok: Option<&TextTokenizer>,
    vocab_size: usize,
    max_positions: Option<usize>,
    stop: Option<&Arc<AtomicBool>>,
) -> Result<(Dataset, Option<Dataset>)> {
    let d = &recipe.data;
    let opts = LoadOptions {
        max_length: d.max_length.min(max_positions.unwrap_or(usize::MAX)),
        truncation: d.truncation,
        vocab_size,
    };
    let pipeline = |spec| -> Result<Pipeline> {
        let mut pipe = Pipeline::new(tok, spec, opts.clone())?;
        if d.cache {
            pipe = pipe.with_cache(crate::data::TokenCache::new(
                crate::data::TokenCache::default_dir(),
            ));
        }
        Ok(match stop {
            Some(flag) => pipe.with_stop(flag.clone()),
            None => pipe,
        })
    };
    let limits = d.limits();
    let checked = |ds: Dataset| -> Result<Dataset> {
        ds.report.log(&ds.path);
        ds.report.check(&limits, &ds.path)?;
        Ok(ds)
    };
    let pipe = pipeline(recipe.data_spec())?;
    let eval = match &d.eval {
        Some(p) => Some(checked(pipe.load(p)?)?),
        None => None,
    };
    let train = match &d.train {
        TrainData::Path(p) if d.eval_ratio > 0.0 => {
            let seed = d.split_seed.unwrap_or(recipe.train.seed);
            let (t, e) = pipe.load_split(p, d.eval_ratio, seed)?;
            return Ok((checked(t)?, Some(checked(e)?)));
        }
        TrainData::Path(p) => checked(pipe.load(p)?)?,
        TrainData::Mix(sources) => {
            let mut parts = Vec::with_capacity(sources.len());
            for s in sources {
                let mut spec = recipe.data_spec();
                spec.format = s.format.unwrap_or(spec.format);
                spec.template = s.template.clone().or(spec.template);
                spec.fields = s.fields.clone().unwrap_or(spec.fields);
                spec.loss_on = s.loss_on.or(spec.loss_on);
                parts.push((checked(pipeline(spec)?.load(&s.path)?)?, s.weight));
            }
            interleave(parts, recipe.train.seed)
        }
    };
    Ok((train, eval))
}

/// Examples drawn from `parts` in proportion to their weights with a seeded generator, each
/// source in its own order, until a draw falls on a source with none left (the first exhausted);
/// as `datasets.interleave_datasets(probabilities=..., stopping_strategy="first_exhausted")`. A
/// pure function of the sources and the seed, so a resumed run rebuilds the same examples.
pub fn interleave(parts: Vec<(Dataset, f64)>, seed: u64) -> Dataset {
    use rand::{Rng, SeedableRng};
    let total: f64 = parts.iter().map(|(_, w)| w).sum();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut next = vec![0usize; parts.len()];
    let (mut examples, mut origins) = (Vec::new(), Vec::new());
    loop {
        let mut u = rng.gen::<f64>() * total;
        let i = parts
            .iter()
            .position(|(_, w)| {
                u -= w;
                u < 0.0
            })
            .unwrap_or(parts.len() - 1);
        let ds = &parts[i].0;
        if next[i] == ds.examples.len() {
            break;
        }
        examples.push(ds.examples[next[i]].clone());
        origins.push(ds.origins[next[i]].clone());
        next[i] += 1;
    }
    let taken: Vec<String> = parts
        .iter()
        .zip(&next)
        .map(|((ds, _), n)| format!("{} of {} from {}", n, ds.examples.len(), ds.path.display()))
        .collect();
    tracing::info!(examples = examples.len(), "mixed: {}", taken.join(", "));
    let report = crate::data::DataReport {
        examples: examples.len(),
        rows: examples.len(),
        tokens: examples.iter().map(Example::len).sum(),
        target_tokens: examples.iter().map(Example::n_targets).sum(),
        ..Default::default()
    };
    Dataset {
        path: std::path::PathBuf::from(format!(
            "mix of {}",
            parts
                .iter()
                .map(|(d, _)| d.path.display().to_string())
                .collect::<Vec<_>>()
                .join(" + ")
        )),
        examples,
        origins,
        report,
    }
}

/// The collator a recipe describes (as `app::prepare` builds it).
pub fn recipe_collator(recipe: &Recipe, tok: Option<&TextTokenizer>) -> CompletionOnlyCollator {
    let pad = tok.map_or(0, TextTokenizer::pad_or_eos);
    let mut c = if recipe.collator.padding_free {
        CompletionOnlyCollator::padding_free(pad)
    } else {
        CompletionOnlyCollator::padded(pad)
    };
    c.pad_to_multiple_of = recipe.collator.pad_to_multiple_of;
    c.normalization = recipe.train.loss_normalization;
    c
}

/// What every rank of a run must agree on before training together: the resolved recipe, the
/// training data and the binary (SHA-256). A rank of another recipe or build is refused at the
/// rendezvous instead of hanging in a collective of another shape.
fn run_hash(recipe: &Recipe, train: &Dataset) -> Result<u64> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(recipe.to_yaml().as_bytes());
    h.update(crate::train::data_hash(&train.examples).to_le_bytes());
    let exe = std::env::current_exe().map_err(|e| Error::io("current executable", e))?;
    let bytes = std::fs::read(&exe).map_err(|e| Error::io(&exe, e))?;
    h.update(&bytes);
    let d = h.finalize();
    Ok(u64::from_le_bytes(d[..8].try_into().expect("8 bytes")))
}

/// The transport of a rank's tensors: NCCL on a GPU of an `nccl` build, else the TCP channel
/// (CPU runs; GPU runs of a build without NCCL, through host copies, with a warning).
fn connect_devices(
    host: crate::dist::tcp::TcpComm,
    device: &Device,
    timeout: std::time::Duration,
) -> Result<Box<dyn crate::dist::Collective>> {
    #[cfg(feature = "nccl")]
    if device.is_cuda() {
        return Ok(Box::new(crate::dist::nccl::connect(host, device, timeout)?));
    }
    let _ = timeout;
    if device.is_cuda() {
        tracing::warn!("this build has no NCCL (feature `nccl`): GPU ranks exchange through host copies over TCP");
    }
    Ok(Box::new(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One source of training defaults: a recipe that sets no `train:` key trains with the
    /// library's `TrainerConfig::default()` (TRL's learning rate 2e-5 included).
    #[test]
    fn a_recipe_without_train_keys_trains_with_the_library_defaults() {
        let text = "model: {path: m}\ndata: {train: t.jsonl}\noutput_dir: out\n";
        let r = Recipe::parse(text, Path::new("r.yaml"), &[]).unwrap();
        let got = trainer_config(&r);
        let want = TrainerConfig {
            output_dir: Some("out".into()),
            ..TrainerConfig::default()
        };
        assert_eq!(format!("{got:?}"), format!("{want:?}"));
        assert_eq!(got.adamw.lr, 2e-5);
    }
}
