//! Dataset rows to token-level examples.
//!
//! Rows come from JSONL, JSON arrays or Parquet files (`source`), in one of the formats of
//! [`Format`] (detected from the first row by default). Text rows are rendered (a prompt template's
//! blocks, a chat template, or plain concatenation), tokenized once, and masked: by default each
//! trained part is a byte range of the rendered text mapped to tokens through the tokenizer's
//! offsets; with a response template, TRL's token-id search (`masking`). EOS ends every
//! completion and final assistant turn as a target. Then the length policy, and rows left without
//! a target are dropped and counted in the [`DataReport`].

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use minijinja::value::{Value, ValueKind};

use super::cache::{KeyHasher, TokenCache};
use super::example::*;
use super::masking::TemplateSearch;
use super::report::DataReport;
use super::source::{Loc, RawRow, SourceFiles};
use super::spec::*;
use super::template::{Template, TemplateKind, END_OF_TURN};
use super::tokenizer::TextTokenizer;
use crate::error::{Error, Result};

pub(super) fn kind_name(v: &Value) -> &'static str {
    match v.kind() {
        ValueKind::Undefined => "nothing",
        ValueKind::None => "null",
        ValueKind::Bool => "a boolean",
        ValueKind::Number => "a number",
        ValueKind::String => "a string",
        ValueKind::Bytes => "bytes",
        ValueKind::Seq => "an array",
        ValueKind::Map => "an object",
        _ => "a value",
    }
}

/// Text with the byte ranges that carry loss.
pub(super) struct Rendered {
    pub(super) text: String,
    pub(super) spans: Vec<Range<usize>>,
    /// The text ends with a trained part, so the example must end with an EOS target.
    pub(super) ends_with_target: bool,
    /// Prepend BOS (when the tokenizer adds one): not for chat templates, which print it.
    pub(super) add_bos: bool,
}

/// What one row became.
#[derive(Default)]
pub(super) struct RowOut {
    pub(super) example: Option<Example>,
    pub(super) truncated: bool,
    pub(super) too_long: bool,
    pub(super) no_target: bool,
    pub(super) template_missing: bool,
    pub(super) search: TemplateSearch,
    pub(super) eos_not_target: bool,
    pub(super) eos_truncated: bool,
    pub(super) eos_masked: bool,
    /// The rendered text of a row whose response template was not found (for the hint).
    pub(super) miss_text: Option<String>,
}

/// The format, template and loss mode a dataset is read with, once detected.
pub(super) struct Resolved {
    pub(super) format: Format,
    pub(super) template: Option<Arc<Template>>,
    pub(super) loss_on: LossOn,
}

/// Rows to examples, as a `DataSpec` says.
pub struct Pipeline<'a> {
    pub(super) tok: Option<&'a TextTokenizer>,
    pub(super) spec: DataSpec,
    pub(super) opts: LoadOptions,
    pub(super) template: Option<Arc<Template>>,
    pub(super) response_ids: Option<Vec<u32>>,
    pub(super) instruction_ids: Option<Vec<u32>>,
    pub(super) markers: Vec<String>,
    pub(super) threads: usize,
    /// Set (by a signal handler) to stop reading rows.
    pub(super) stop: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Where encoded datasets are kept between runs, if anywhere.
    pub(super) cache: Option<TokenCache>,
}

pub(super) fn cfg_err(msg: impl Into<String>) -> Error {
    Error::Config(msg.into())
}

/// The template `name` with the spec's `chat_template_kwargs` passed to every render.
fn load_template(
    name: &str,
    tok: Option<&TextTokenizer>,
    spec: &DataSpec,
) -> Result<Arc<Template>> {
    let t = Template::load(name, tok)?.with_kwargs(&spec.chat_template_kwargs)?;
    Ok(Arc::new(t))
}

impl<'a> Pipeline<'a> {
    /// A pipeline for `spec`: loads its template and encodes its response and instruction
    /// templates. `tok` is needed for all but pre-tokenized rows and templates given as ids.
    /// Fails on settings that contradict each other (e.g. `loss_on: all` with a response
    /// template).
    pub fn new(tok: Option<&'a TextTokenizer>, spec: DataSpec, opts: LoadOptions) -> Result<Self> {
        spec.check_roles().map_err(cfg_err)?;
        let template = match &spec.template {
            Some(t) => Some(load_template(t, tok, &spec)?),
            None => None,
        };
        let ids = |t: &Option<TokenTemplate>, key: &str| -> Result<Option<Vec<u32>>> {
            match t {
                None => Ok(None),
                Some(TokenTemplate::Ids(ids)) if ids.is_empty() => {
                    Err(cfg_err(format!("{key} is an empty list of token ids")))
                }
                Some(TokenTemplate::Ids(ids)) => Ok(Some(ids.clone())),
                Some(TokenTemplate::Text(s)) => {
                    let tok = tok.ok_or_else(|| {
                        cfg_err(format!(
                            "{key} given as text needs a tokenizer (model.tokenizer)"
                        ))
                    })?;
                    let ids = tok.encode(s)?;
                    if ids.is_empty() {
                        return Err(cfg_err(format!("{key} {s:?} encodes to no token")));
                    }
                    Ok(Some(ids))
                }
            }
        };
        let response_ids = ids(&spec.response_template, "collator.response_template")?;
        let instruction_ids = ids(&spec.instruction_template, "collator.instruction_template")?;
        if instruction_ids.is_some() && response_ids.is_none() {
            return Err(cfg_err(
                "collator.instruction_template needs collator.response_template",
            ));
        }
        if response_ids.is_some() {
            match (spec.loss_on, instruction_ids.is_some()) {
                (Some(LossOn::All), _) => {
                    return Err(cfg_err(
                        "data.loss_on: all contradicts collator.response_template (which masks everything up to each response)",
                    ))
                }
                (Some(LossOn::Assistant), false) => {
                    return Err(cfg_err(
                        "data.loss_on: assistant with collator.response_template needs collator.instruction_template (TRL's multi-turn mode)",
                    ))
                }
                (Some(LossOn::Completion | LossOn::LastAssistant), true) => {
                    return Err(cfg_err(
                        "collator.instruction_template trains every assistant turn: use data.loss_on: assistant (or leave it unset)",
                    ))
                }
                _ => {}
            }
        }
        let mut markers: Vec<String> = Vec::new();
        if let Some(t) = tok {
            if let Some((_, v)) = crate::data::template::special_tokens(t)
                .into_iter()
                .find(|(k, _)| k == "eos_token")
            {
                if let Some(s) = v.as_str() {
                    markers.push(s.to_string());
                }
            }
        }
        markers.extend(spec.end_of_turn.iter().cloned());
        markers.extend(END_OF_TURN.iter().map(|s| s.to_string()));
        markers.retain(|m| !m.is_empty());
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(16);
        Ok(Self {
            tok,
            spec,
            opts,
            template,
            response_ids,
            instruction_ids,
            markers,
            threads,
            stop: None,
            cache: None,
        })
    }

    /// Use at most `n` threads (1: sequential).
    pub fn with_threads(mut self, n: usize) -> Self {
        self.threads = n.max(1);
        self
    }

    /// Keeps encoded datasets in `cache`, keyed by everything that decides them: a second load of
    /// the same files with the same tokenizer, template and settings reads them back instead of
    /// encoding again.
    pub fn with_cache(mut self, cache: TokenCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// The cache key of loading `path` (split at `eval_ratio` with `seed`) with this pipeline.
    fn cache_key(&self, path: &Path, eval_ratio: f64, seed: u64) -> Result<String> {
        let mut h = KeyHasher::default();
        // This build: encoding may change between commits of one version.
        h.part(concat!("packsft tokenized ", env!("CARGO_PKG_VERSION")).as_bytes());
        if let Ok(exe) = std::env::current_exe() {
            h.file(&exe)?;
        }
        for f in super::source::resolve(path)? {
            h.file(&f)?;
        }
        if let Some(t) = self.tok {
            h.file(&t.path)?;
            h.part(format!("{:?}", t.config_json).as_bytes());
        }
        if let Some(t) = self
            .spec
            .template
            .as_deref()
            .map(Path::new)
            .filter(|p| p.is_file())
        {
            h.file(t)?;
        }
        h.part(format!("{:?} {:?} {eval_ratio} {seed}", self.spec, self.opts).as_bytes());
        Ok(h.finish())
    }

    /// Stops encoding (with an error) once `flag` is set, e.g. by the first Ctrl-C: data
    /// preparation of a large dataset can take minutes.
    pub fn with_stop(mut self, flag: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.stop = Some(flag);
        self
    }

    /// An error once the stop flag is set.
    pub(super) fn check_stop(&self) -> Result<()> {
        match &self.stop {
            Some(f) if f.load(std::sync::atomic::Ordering::SeqCst) => Err(Error::Training(
                "interrupted while preparing the data".into(),
            )),
            _ => Ok(()),
        }
    }

    pub(super) fn field<'f>(&'f self, name: &'f str) -> &'f str {
        self.spec
            .fields
            .get(name)
            .map(String::as_str)
            .unwrap_or(name)
    }

    pub(super) fn has(&self, row: &Value, name: &str) -> bool {
        row.get_attr(self.field(name))
            .map(|v| !v.is_undefined())
            .unwrap_or(false)
    }

    pub(super) fn tok(&self, loc: &Loc, what: &str) -> Result<&'a TextTokenizer> {
        self.tok.ok_or_else(|| {
            loc.err(format!(
                "{what} rows need a tokenizer (set `model.tokenizer` or use a model directory with tokenizer.json)"
            ))
        })
    }

    /// The format of a dataset from its first row.
    pub(super) fn detect(&self, row: &Value, loc: &Loc) -> Result<Format> {
        if self.spec.format != Format::Auto {
            return Ok(self.spec.format);
        }
        if row.kind() != ValueKind::Map {
            return Err(loc.err(format!("expected a JSON object, got {}", kind_name(row))));
        }
        let prompt_tmpl = self
            .template
            .as_ref()
            .map(|t| t.kind == TemplateKind::Prompt)
            .unwrap_or(false);
        let f = if self.has(row, "input_ids") {
            Format::Tokens
        } else if self.has(row, "messages") {
            Format::Messages
        } else if self.has(row, "conversations") {
            Format::Sharegpt
        } else if self.has(row, "prompt") || self.has(row, "completion") {
            Format::PromptCompletion
        } else if self.has(row, "instruction") || self.has(row, "output") {
            Format::Alpaca
        } else if self.has(row, "text") {
            Format::Text
        } else if prompt_tmpl {
            Format::Columns
        } else {
            let keys: Vec<String> = row
                .try_iter()
                .map(|it| it.map(|k| k.to_string()).collect())
                .unwrap_or_default();
            return Err(loc.err(format!(
                "cannot tell the format of the row from its fields ({}): expected `text`, `prompt`/`completion`, `messages`, `conversations`, `instruction`/`output` or `input_ids`, or `input_ids` (set data.format, data.fields or a prompt template in data.template)",
                if keys.is_empty() { "none".to_string() } else { keys.join(", ") }
            )));
        };
        Ok(f)
    }

    pub(super) fn resolve(&self, format: Format, loc: &Loc) -> Result<Resolved> {
        let kind = self.template.as_ref().map(|t| t.kind);
        let name =
            |t: &Option<Arc<Template>>| t.as_ref().map(|t| t.name.clone()).unwrap_or_default();
        let template = match format {
            Format::Auto => unreachable!("detected before"),
            Format::Text | Format::Tokens => {
                if self.template.is_some() {
                    return Err(cfg_err(format!(
                        "data.template {} does not apply to {} rows (first row {loc})",
                        name(&self.template),
                        format.name()
                    )));
                }
                None
            }
            Format::PromptCompletion => self.template.clone(),
            Format::Alpaca | Format::Columns => match kind {
                Some(TemplateKind::Prompt) => self.template.clone(),
                Some(TemplateKind::Chat) => {
                    return Err(cfg_err(format!(
                        "{} rows need a prompt template (with `prompt` and `completion` blocks); {} is a chat template",
                        format.name(),
                        name(&self.template)
                    )))
                }
                None if format == Format::Alpaca => Some(load_template("alpaca", self.tok, &self.spec)?),
                None => {
                    return Err(cfg_err(
                        "data.format: columns needs a prompt template in data.template",
                    ))
                }
            },
            Format::Messages | Format::Sharegpt => match kind {
                Some(TemplateKind::Chat) => self.template.clone(),
                Some(TemplateKind::Prompt) => {
                    return Err(cfg_err(format!(
                        "{} rows need a chat template; {} is a prompt template (for prompt/completion or column rows)",
                        format.name(),
                        name(&self.template)
                    )))
                }
                None => {
                    let from_tok = self.tok.filter(|t| {
                        crate::data::template::tokenizer_chat_template(t).is_ok()
                    });
                    match from_tok {
                        Some(_) => Some(load_template("tokenizer", self.tok, &self.spec)?),
                        None => {
                            return Err(cfg_err(format!(
                                "{} rows need a chat template: the tokenizer has none, so set data.template to a shipped one ({}), a .jinja file, or `tokenizer`",
                                format.name(),
                                crate::data::template::SHIPPED
                                    .iter()
                                    .filter(|(_, f, _)| f.starts_with("chat/"))
                                    .map(|(n, _, _)| *n)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )))
                        }
                    }
                }
            },
        };
        let trl = self.response_ids.is_some();
        let default = match format {
            Format::Text => LossOn::All,
            Format::Messages | Format::Sharegpt => LossOn::Assistant,
            _ => LossOn::Completion,
        };
        let loss_on = match (self.spec.loss_on, trl) {
            (None, false) => default,
            (None, true) => {
                if self.instruction_ids.is_some() {
                    LossOn::Assistant
                } else {
                    LossOn::LastAssistant
                }
            }
            (Some(l), _) => l,
        };
        if !trl {
            let bad = match (format, loss_on) {
                (_, LossOn::All) => None,
                (Format::Text, _) => Some("text rows have no completion: use data.loss_on: all, or collator.response_template to mask by template"),
                (Format::Messages | Format::Sharegpt, LossOn::Completion) => Some("conversations have no completion: use data.loss_on: assistant or last_assistant"),
                (Format::Tokens, LossOn::Assistant | LossOn::LastAssistant) => Some("pre-tokenized rows carry their own mask: use data.loss_on: completion (the mask) or all"),
                _ => None,
            };
            if let Some(msg) = bad {
                return Err(cfg_err(format!("data.loss_on: {}: {msg}", loss_on.name())));
            }
        }
        Ok(Resolved {
            format,
            template,
            loss_on,
        })
    }

    pub(super) fn str_field(&self, row: &Value, name: &str, loc: &Loc) -> Result<String> {
        let col = self.field(name);
        let mapped = if col != name {
            format!(" (data.fields.{name})")
        } else {
            String::new()
        };
        match row.get_attr(col) {
            Ok(v) if v.kind() == ValueKind::String => {
                Ok(v.as_str().unwrap_or_default().to_string())
            }
            Ok(v) if v.is_undefined() => Err(loc.err(format!("missing field `{col}`{mapped}"))),
            Ok(v) => Err(loc.err(format!(
                "field `{col}`{mapped} must be a string, got {}",
                kind_name(&v)
            ))),
            Err(e) => Err(loc.err(format!("field `{col}`: {e}"))),
        }
    }

    /// The row's columns, plus each canonical name of `data.fields` bound to its column.
    pub(super) fn vars(&self, row: &Value) -> Value {
        let mut items: Vec<(Value, Value)> = Vec::new();
        if let Ok(keys) = row.try_iter() {
            for k in keys {
                let v = row.get_item(&k).unwrap_or_default();
                items.push((k, v));
            }
        }
        for (canon, col) in &self.spec.fields {
            if let Ok(v) = row.get_attr(col) {
                if !v.is_undefined() {
                    items.push((Value::from(canon.as_str()), v));
                }
            }
        }
        Value::from_iter(items)
    }

    /// Reads and encodes one dataset; `eval_ratio` > 0 also splits off an evaluation set.
    pub(super) fn load_parts(
        &self,
        path: &Path,
        eval_ratio: f64,
        seed: u64,
    ) -> Result<(Dataset, Option<Dataset>)> {
        let Some(cache) = &self.cache else {
            return self.encode_parts(path, eval_ratio, seed);
        };
        let key = self.cache_key(path, eval_ratio, seed)?;
        if let Some(mut sets) = cache
            .load(&key)
            .filter(|s| s.len() == 1 + (eval_ratio > 0.0) as usize)
        {
            tracing::info!(data = %path.display(), key, "tokenization cache: read the encoded examples");
            let eval = (sets.len() == 2).then(|| sets.pop().expect("two"));
            return Ok((sets.pop().expect("one"), eval));
        }
        let (train, eval) = self.encode_parts(path, eval_ratio, seed)?;
        let sets: Vec<&Dataset> = std::iter::once(&train).chain(eval.as_ref()).collect();
        cache.store(&key, &sets)?;
        tracing::info!(data = %path.display(), key, "tokenization cache: encoded and stored");
        Ok((train, eval))
    }

    /// Reads, renders, tokenizes and masks the rows of `path`.
    fn encode_parts(
        &self,
        path: &Path,
        eval_ratio: f64,
        seed: u64,
    ) -> Result<(Dataset, Option<Dataset>)> {
        let files = SourceFiles::read(path)?;
        let rows = files.rows();
        if rows.is_empty() {
            return Err(Error::Dataset {
                path: path.to_path_buf(),
                msg: "dataset is empty (no rows)".into(),
            });
        }
        let first = rows[0].value()?;
        let format = self.detect(&first, &rows[0].loc)?;
        let r = self.resolve(format, &rows[0].loc)?;
        self.check_prompt_template(&r, format, &first, &rows[0].loc)?;
        let outs = self.encode_all(&r, &rows)?;
        let is_eval: Vec<bool> = if eval_ratio > 0.0 {
            split_mask(rows.len(), eval_ratio, seed)
        } else {
            vec![false; rows.len()]
        };
        let base = DataReport {
            format: format.name().to_string(),
            template: r.template.as_ref().map(|t| t.name.clone()),
            method: if self.response_ids.is_some() {
                "response_template"
            } else {
                "spans"
            }
            .to_string(),
            loss_on: r.loss_on.name().to_string(),
            ..Default::default()
        };
        self.check_templates_found(path, &outs, &rows)?;
        let mut parts = [
            (base.clone(), Vec::new(), Vec::new()),
            (base, Vec::new(), Vec::new()),
        ];
        for ((o, raw), &ev) in outs.into_iter().zip(&rows).zip(&is_eval) {
            let (rep, exs, origins) = &mut parts[usize::from(ev)];
            if let Some(ex) = count(rep, o, &raw.loc) {
                exs.push(ex);
                origins.push(raw.loc.clone());
            }
        }
        let [(mut tr, tex, tor), (mut er, eex, eor)] = parts;
        tr.examples = tex.len();
        er.examples = eex.len();
        let finish =
            |report, examples, origins, what| dataset(path, report, examples, origins, what);
        let train = finish(tr, tex, tor, "training")?;
        let eval = if eval_ratio > 0.0 {
            Some(finish(er, eex, eor, "evaluation")?)
        } else {
            None
        };
        Ok((train, eval))
    }

    /// A prompt template must render as prompt + completion and nothing else (checked on the
    /// first row).
    fn check_prompt_template(
        &self,
        r: &Resolved,
        format: Format,
        first: &Value,
        loc: &Loc,
    ) -> Result<()> {
        if let (Some(t), Format::Alpaca | Format::Columns) = (&r.template, format) {
            let vars = self.vars(first);
            if let (Ok(p), Ok(c), Ok(w)) = (
                t.render_prompt_block(&vars),
                t.render_completion_block(&vars),
                t.render_whole(&vars),
            ) {
                if w != format!("{p}{c}") {
                    return Err(cfg_err(format!(
                        "template {} renders text outside its `prompt` and `completion` blocks (row {}): the whole template must be exactly prompt + completion",
                        t.name, loc
                    )));
                }
            }
        }
        Ok(())
    }

    /// A response (or instruction) template that no row contains is an error with a fix, not a
    /// dataset of dropped rows.
    fn check_templates_found(&self, path: &Path, outs: &[RowOut], rows: &[RawRow]) -> Result<()> {
        if let Some(ids) = &self.response_ids {
            let missing_r = outs.iter().filter(|o| o.search.response_missing).count();
            let missing_i = outs
                .iter()
                .filter(|o| o.search.instruction_missing && !o.search.response_missing)
                .count();
            if missing_r == outs.len() {
                let (o, loc) = outs
                    .iter()
                    .zip(rows)
                    .map(|(o, r)| (o, &r.loc))
                    .next()
                    .expect("non-empty");
                let hint = o
                    .miss_text
                    .as_deref()
                    .map(|t| self.template_hint(t, loc))
                    .unwrap_or_default();
                return Err(Error::Dataset {
                    path: path.to_path_buf(),
                    msg: format!(
                        "collator.response_template {} (token ids {ids:?}) is found in none of the {} rows{hint}",
                        match &self.spec.response_template { Some(TokenTemplate::Text(t)) => format!("{t:?}"), _ => "given as ids".into() },
                        outs.len()
                    ),
                });
            }
            if let (Some(instr), true) =
                (&self.instruction_ids, missing_i + missing_r == outs.len())
            {
                return Err(Error::Dataset {
                    path: path.to_path_buf(),
                    msg: format!(
                        "collator.instruction_template (token ids {:?}) is found in none of the {} rows",
                        instr,
                        outs.len()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Reads one dataset (a file, a directory of files, or a glob).
    pub fn load(&self, path: &Path) -> Result<Dataset> {
        Ok(self.load_parts(path, 0.0, 0)?.0)
    }

    /// Reads one dataset and holds out `eval_ratio` of its rows (a seeded draw) for evaluation.
    pub fn load_split(
        &self,
        path: &Path,
        eval_ratio: f64,
        seed: u64,
    ) -> Result<(Dataset, Dataset)> {
        if !(eval_ratio > 0.0 && eval_ratio < 1.0) {
            return Err(cfg_err(format!(
                "data.eval_ratio = {eval_ratio} must be in (0, 1)"
            )));
        }
        let (t, e) = self.load_parts(path, eval_ratio, seed)?;
        Ok((t, e.expect("a ratio was given")))
    }
}

/// `true` for the rows held out for evaluation: `round(n * ratio)` of them (at least one, and
/// at least one row left for training), drawn with `seed`.
pub fn split_mask(n: usize, ratio: f64, seed: u64) -> Vec<bool> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let k = ((n as f64 * ratio).round() as usize).clamp(1, n.saturating_sub(1).max(1));
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let mut out = vec![false; n];
    for &i in &idx[..k.min(n)] {
        out[i] = true;
    }
    out
}

/// Reads a dataset of `prompt`/`completion`, `text`, `messages` (with the tokenizer's chat
/// template) or pre-tokenized rows with the default settings (format detected, span masking).
pub fn load_jsonl(path: &Path, tok: Option<&TextTokenizer>, opts: &LoadOptions) -> Result<Dataset> {
    Pipeline::new(tok, DataSpec::default(), opts.clone())?.load(path)
}

/// A dataset of the examples kept, or an error saying why none was.
fn dataset(
    path: &Path,
    report: DataReport,
    examples: Vec<Example>,
    origins: Vec<Loc>,
    what: &str,
) -> Result<Dataset> {
    if examples.is_empty() {
        let msg = if report.rows == 0 {
            format!("the {what} split is empty")
        } else {
            format!(
                "no usable example among {} rows ({} longer than max_length dropped, {} without any target token, {} without the response/instruction template)",
                report.rows, report.dropped_too_long, report.dropped_no_target, report.dropped_template_missing
            )
        };
        return Err(Error::Dataset {
            path: path.to_path_buf(),
            msg,
        });
    }
    Ok(Dataset {
        path: path.to_path_buf(),
        examples,
        origins,
        report,
    })
}

/// Counts one encoded row in `rep`; its example if it has one.
fn count(rep: &mut DataReport, o: RowOut, loc: &Loc) -> Option<Example> {
    rep.rows += 1;
    rep.truncated += usize::from(o.truncated);
    rep.dropped_too_long += usize::from(o.too_long);
    rep.dropped_no_target += usize::from(o.no_target);
    rep.response_template_missing += usize::from(o.search.response_missing);
    rep.instruction_template_missing += usize::from(o.search.instruction_missing);
    rep.eos_not_target += usize::from(o.eos_not_target);
    rep.eos_truncated += usize::from(o.eos_truncated);
    rep.eos_masked_as_pad += usize::from(o.eos_masked);
    match o.example {
        Some(ex) => {
            rep.tokens += ex.len();
            rep.target_tokens += ex.n_targets();
            Some(ex)
        }
        None => {
            let reason = if o.too_long {
                "longer than max_length"
            } else if o.template_missing {
                rep.dropped_template_missing += 1;
                "response/instruction template missing"
            } else {
                "no target token"
            };
            if rep.dropped_rows.len() < 5 {
                rep.dropped_rows.push(format!("{loc} ({reason})"));
            }
            None
        }
    }
}
