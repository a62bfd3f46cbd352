//! Decoding, so a user can see what a model learned: greedy (temperature 0) or sampled
//! (temperature, top-k, top-p, a seed), stopping at EOS, a stop string or the token budget, from
//! a plain prompt or a chat rendered with the tokenizer's chat template. The prompt runs once and
//! each new token one position, through the model's KV cache (`DecoderModel::decode`); LongRoPE
//! models recompute the sequence for each token.

use candle_core::D;
use rand::{Rng, SeedableRng};

use crate::collate::{Collator, CompletionOnlyCollator};
use crate::data::template::{special_tokens, tokenizer_chat_template, Template};
use crate::data::tokenizer::TextTokenizer;
use crate::data::Example;
use crate::error::{Error, Result};
use crate::model::{BatchKvCache, DecoderModel};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0: greedy (arg-max, the first of equal maxima); otherwise logits are divided by it.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the most likely tokens whose probabilities sum to at least `p` (nucleus).
    pub top_p: Option<f64>,
    /// Seed of the draws: the same seed, model and prompt give the same text.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

/// What `generate` does.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerateOptions {
    /// New tokens at most.
    pub max_new_tokens: usize,
    /// How tokens are chosen.
    pub sampling: Sampling,
    /// Stop (and cut the text) where any of these appears in the new text.
    pub stop: Vec<String>,
    /// End-of-sequence ids besides the tokenizer's EOS: a chat model's end of turn
    /// (`generation_config.json`'s `eos_token_id`, [`generation_config_eos`]). Not part of the
    /// text.
    pub eos_ids: Vec<u32>,
}

/// The end-of-sequence ids of `generation_config.json` in `dir` (`eos_token_id`: one id or a
/// list, as transformers' `generate` reads it); none without the file or the key.
pub fn generation_config_eos(dir: &std::path::Path) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::model(&path, format!("invalid JSON at line {}: {e}", e.line())))?;
    let bad = |x: &serde_json::Value| {
        Error::model(
            &path,
            format!("eos_token_id: expected a token id or a list of them, got {x}"),
        )
    };
    let id = |x: &serde_json::Value| -> Result<u32> {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(x))
    };
    match &v["eos_token_id"] {
        serde_json::Value::Null => Ok(Vec::new()),
        serde_json::Value::Array(a) => a.iter().map(id).collect(),
        x => Ok(vec![id(x)?]),
    }
}

/// The token ids of `prompt`: BOS (where the tokenizer adds one) and the encoded text.
pub fn prompt_ids(tok: &TextTokenizer, prompt: &str) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    if tok.add_bos {
        ids.extend(tok.bos_id);
    }
    ids.extend(tok.encode(prompt)?);
    Ok(ids)
}

/// The token ids of a chat: `messages` (`{role, content}` objects) rendered by the tokenizer's
/// chat template with the generation prompt, as `apply_chat_template(add_generation_prompt=True)`
/// (the template writes BOS itself), with `kwargs` as its `**kwargs` (Qwen3's `enable_thinking`).
pub fn chat_ids(
    tok: &TextTokenizer,
    messages: &[serde_json::Value],
    kwargs: &std::collections::BTreeMap<String, serde_json::Value>,
) -> Result<Vec<u32>> {
    let source = tokenizer_chat_template(tok)?;
    let t = Template::from_source("tokenizer chat_template", &source, special_tokens(tok))?
        .with_kwargs(kwargs)?;
    let msgs: Vec<minijinja::Value> = messages
        .iter()
        .map(minijinja::Value::from_serialize)
        .collect();
    let text = t
        .render_chat(&msgs, true)
        .map_err(|e| Error::Config(e.to_string()))?;
    tok.encode(&text)
}

/// Picks the next token from `logits` (float32, one row).
fn pick(logits: &[f32], s: &Sampling, rng: &mut rand_chacha::ChaCha8Rng) -> u32 {
    if s.temperature <= 0.0 || s.top_k == Some(1) {
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if let Some(k) = s.top_k {
        order.truncate(k.max(1));
    }
    let top = logits[order[0]] as f64;
    let mut p: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - top) / s.temperature).exp())
        .collect();
    let total: f64 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= total);
    if let Some(top_p) = s.top_p {
        let mut acc = 0.0;
        let keep = p
            .iter()
            .position(|&x| {
                acc += x;
                acc >= top_p
            })
            .map_or(p.len(), |i| i + 1);
        p.truncate(keep);
        order.truncate(keep);
    }
    let total: f64 = p.iter().sum();
    let mut u = rng.gen::<f64>() * total;
    for (&i, &x) in order.iter().zip(&p) {
        if u < x {
            return i as u32;
        }
        u -= x;
    }
    *order.last().expect("at least one token") as u32
}

/// Continues the token ids `ids` as `opts` says; returns the new text only.
pub fn generate(
    model: &DecoderModel,
    tok: &TextTokenizer,
    ids: Vec<u32>,
    opts: &GenerateOptions,
) -> Result<String> {
    Ok(generate_batch(model, tok, vec![ids], opts)?
        .pop()
        .expect("one prompt, one text"))
}

/// [`generate`] for several prompts decoded together ([`generate_batch_ids`]); the texts in
/// prompt order, each cut at its first stop string.
pub fn generate_batch(
    model: &DecoderModel,
    tok: &TextTokenizer,
    prompts: Vec<Vec<u32>>,
    opts: &GenerateOptions,
) -> Result<Vec<String>> {
    let mut cuts = vec![None; prompts.len()];
    let eos: Vec<u32> = tok
        .eos_id
        .into_iter()
        .chain(opts.eos_ids.iter().copied())
        .collect();
    let new = generate_batch_ids(
        model,
        prompts,
        opts.max_new_tokens,
        &opts.sampling,
        &eos,
        |i, new| {
            if opts.stop.is_empty() {
                return Ok(false);
            }
            let text = tok.decode(new)?;
            cuts[i] = opts.stop.iter().filter_map(|s| text.find(s.as_str())).min();
            Ok(cuts[i].is_some())
        },
    )?;
    (new.iter().zip(cuts))
        .map(|(ids, cut)| {
            let text = tok.decode(ids)?;
            Ok(match cut {
                Some(c) => text[..c].to_string(),
                None => text,
            })
        })
        .collect()
}

/// The greedy continuation of `ids` (at most `n` new tokens, ending before `eos`).
pub fn greedy(model: &DecoderModel, ids: &[u32], n: usize, eos: Option<u32>) -> Result<Vec<u32>> {
    generate_ids(model, ids.to_vec(), n, &Sampling::default(), eos, |_| {
        Ok(false)
    })
}

/// The token ids that continue `ids`: at most `max_new_tokens`, chosen as `sampling` says,
/// ending before `eos` and after the token for which `stop` (given the new ids so far) says yes.
/// With a KV cache: the prompt once, then one position a token.
pub fn generate_ids(
    model: &DecoderModel,
    ids: Vec<u32>,
    max_new_tokens: usize,
    sampling: &Sampling,
    eos: Option<u32>,
    mut stop: impl FnMut(&[u32]) -> Result<bool>,
) -> Result<Vec<u32>> {
    let eos: Vec<u32> = eos.into_iter().collect();
    let mut out = generate_batch_ids(
        model,
        vec![ids],
        max_new_tokens,
        sampling,
        &eos,
        |_, new| stop(new),
    )?;
    Ok(out.pop().expect("one prompt, one continuation"))
}

/// [`generate_ids`] for several prompts decoded together: the prompts run once
/// (`DecoderModel::prefill`), then each step runs the next token of every unfinished prompt as
/// one batch through the model (`decode_step`, one `BatchKvCache`), and a prompt leaves the
/// batch at any of the `eos` ids (not returned), its stop or its budget. `stop` is given the
/// prompt's index and its new ids so far. Each prompt draws from its own stream seeded by
/// `sampling.seed`, so its continuation is the same alone or in any batch.
pub fn generate_batch_ids(
    model: &DecoderModel,
    prompts: Vec<Vec<u32>>,
    max_new_tokens: usize,
    sampling: &Sampling,
    eos: &[u32],
    mut stop: impl FnMut(usize, &[u32]) -> Result<bool>,
) -> Result<Vec<Vec<u32>>> {
    let limit = model.max_positions();
    for (i, p) in prompts.iter().enumerate() {
        if p.len() >= limit {
            return Err(Error::Config(format!(
                "prompt {} has {} tokens: nothing can follow it within the model's \
                 max_position_embeddings = {limit}",
                i + 1,
                p.len()
            )));
        }
    }
    // LongRoPE picks its table by the whole length: those models recompute each sequence.
    if model.spec.rope.long.is_some() {
        return (prompts.into_iter().enumerate())
            .map(|(i, p)| recompute_ids(model, p, max_new_tokens, sampling, eos, |n| stop(i, n)))
            .collect();
    }
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut ids = prompts;
    let mut rngs: Vec<_> = (0..ids.len())
        .map(|_| rand_chacha::ChaCha8Rng::seed_from_u64(sampling.seed))
        .collect();
    // The prompts still decoding, in the order of the batch cache's rows.
    let mut active: Vec<usize> = (0..ids.len()).collect();
    let mut cache: Option<BatchKvCache> = None;
    // Drops the rows whose prompts `done` says are finished, from `active` and from the cache.
    fn leave(
        active: &mut Vec<usize>,
        cache: &mut Option<BatchKvCache>,
        done: &dyn Fn(usize) -> bool,
    ) -> Result<()> {
        let keep: Vec<usize> = (0..active.len()).filter(|&r| !done(active[r])).collect();
        if keep.len() < active.len() {
            *active = keep.iter().map(|&r| active[r]).collect();
            if let Some(c) = cache.as_mut() {
                c.retain(&keep)?;
            }
        }
        Ok(())
    }
    for _ in 0..max_new_tokens {
        leave(&mut active, &mut cache, &|i| {
            let full = ids[i].len() >= limit;
            if full {
                tracing::warn!(
                    "generation of a prompt of {} tokens stopped at the model's \
                     max_position_embeddings = {limit} after {} new tokens",
                    lens[i],
                    ids[i].len() - lens[i]
                );
            }
            full
        })?;
        if active.is_empty() {
            break;
        }
        // The prompts once, then each row's newest token.
        let logits = match cache.as_mut() {
            None => {
                let rows: Vec<&[u32]> = active.iter().map(|&i| ids[i].as_slice()).collect();
                let (logits, c) = model.prefill(&rows, max_new_tokens)?;
                cache = Some(c);
                logits
            }
            Some(c) => {
                let next: Vec<u32> = active.iter().map(|&i| ids[i][ids[i].len() - 1]).collect();
                model.decode_step(&next, c)?
            }
        };
        let next: Vec<u32> = if sampling.temperature <= 0.0 {
            // The device's arg-max: the first of equal maxima, one id per prompt read back.
            logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?
        } else {
            let rows = logits.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
            (active.iter().zip(&rows))
                .map(|(&i, row)| pick(row, sampling, &mut rngs[i]))
                .collect()
        };
        let mut finished = Vec::new();
        for (&i, t) in active.iter().zip(next) {
            if eos.contains(&t) {
                finished.push(i);
                continue;
            }
            ids[i].push(t);
            if stop(i, &ids[i][lens[i]..])? {
                finished.push(i);
            }
        }
        leave(&mut active, &mut cache, &|i| finished.contains(&i))?;
    }
    Ok((ids.into_iter().zip(lens))
        .map(|(mut v, n)| v.split_off(n))
        .collect())
}

/// [`generate_ids`] without a cache: the whole sequence recomputed for each token (LongRoPE).
fn recompute_ids(
    model: &DecoderModel,
    mut ids: Vec<u32>,
    max_new_tokens: usize,
    sampling: &Sampling,
    eos: &[u32],
    mut stop: impl FnMut(&[u32]) -> Result<bool>,
) -> Result<Vec<u32>> {
    let prompt_len = ids.len();
    let collator = CompletionOnlyCollator::padding_free(eos.first().copied().unwrap_or(0));
    let limit = model.max_positions();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(sampling.seed);
    for _ in 0..max_new_tokens {
        if ids.len() >= limit {
            tracing::warn!(
                "generation stopped at the model's max_position_embeddings = {limit} after {} \
                 new tokens",
                ids.len() - prompt_len
            );
            break;
        }
        let ex = Example::new(ids.clone(), vec![false; ids.len()]);
        let batch = collator.collate(&[ex], model.device())?;
        let h = model.hidden_states(&batch)?;
        let logits = model.logits(&h.narrow(0, ids.len() - 1, 1)?)?;
        let row = logits
            .to_dtype(candle_core::DType::F32)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        let next = pick(&row, sampling, &mut rng);
        if eos.contains(&next) {
            break;
        }
        ids.push(next);
        if stop(&ids[prompt_len..])? {
            break;
        }
    }
    Ok(ids.split_off(prompt_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `generation_config.json`'s `eos_token_id`, one id or a list; none without it; a value
    /// that is not an id names the file and the key.
    #[test]
    fn generation_config_eos_ids_are_read_as_transformers_reads_them() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(generation_config_eos(d.path()).unwrap(), Vec::<u32>::new());
        let write = |v: &str| std::fs::write(d.path().join("generation_config.json"), v).unwrap();
        write(r#"{"bos_token_id": 1, "eos_token_id": [128001, 128008, 128009]}"#);
        assert_eq!(
            generation_config_eos(d.path()).unwrap(),
            vec![128001, 128008, 128009]
        );
        write(r#"{"eos_token_id": 1}"#);
        assert_eq!(generation_config_eos(d.path()).unwrap(), vec![1]);
        write(r#"{"eos_token_id": "</s>"}"#);
        let e = generation_config_eos(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("generation_config.json") && e.contains("eos_token_id"),
            "{e}"
        );
    }

    fn rng() -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(5)
    }

    #[test]
    fn greedy_top_one_and_filters_pick_as_they_say() {
        let logits = [0.1f32, 2.0, 1.9, -1.0];
        let greedy = Sampling::default();
        assert_eq!(pick(&logits, &greedy, &mut rng()), 1);
        let top1 = Sampling {
            temperature: 1.0,
            top_k: Some(1),
            ..Default::default()
        };
        assert_eq!(pick(&logits, &top1, &mut rng()), 1);
        // top-k 2: only tokens 1 and 2 are ever drawn; with a tiny top-p only token 1.
        let top2 = Sampling {
            temperature: 1.0,
            top_k: Some(2),
            ..Default::default()
        };
        let mut r = rng();
        let drawn: std::collections::BTreeSet<u32> =
            (0..200).map(|_| pick(&logits, &top2, &mut r)).collect();
        assert_eq!(drawn, [1, 2].into());
        let nucleus = Sampling {
            temperature: 1.0,
            top_p: Some(0.1),
            ..Default::default()
        };
        let mut r = rng();
        assert!((0..50).all(|_| pick(&logits, &nucleus, &mut r) == 1));
    }

    #[test]
    fn sampling_follows_the_softmax_at_its_temperature() {
        // Two tokens whose logits differ by ln 3 at temperature 1: drawn 3:1.
        let logits = [(3f32).ln(), 0.0];
        let s = Sampling {
            temperature: 1.0,
            ..Default::default()
        };
        let mut r = rng();
        let n = 20_000;
        let first = (0..n).filter(|_| pick(&logits, &s, &mut r) == 0).count();
        let share = first as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.015, "{share}");
        // At temperature 0.5 the odds square: 9:1.
        let s = Sampling {
            temperature: 0.5,
            ..Default::default()
        };
        let first = (0..n).filter(|_| pick(&logits, &s, &mut r) == 0).count();
        let share = first as f64 / n as f64;
        assert!((share - 0.9).abs() < 0.015, "{share}");
    }
}
