//! Greedy decoding, so a user can see what a model learned.

use candle_core::D;

use crate::collate::{Collator, CompletionOnlyCollator};
use crate::data::tokenizer::TextTokenizer;
use crate::data::Example;
use crate::error::{Error, Result};
use crate::model::DecoderModel;

/// Continues `prompt` greedily for up to `max_new_tokens`, stopping at EOS; returns the new
/// text only. The whole sequence is recomputed each token (no KV cache): this serves small
/// models and spot checks, not serving.
pub fn greedy(
    model: &DecoderModel,
    tok: &TextTokenizer,
    prompt: &str,
    max_new_tokens: usize,
) -> Result<String> {
    let mut ids = Vec::new();
    if tok.add_bos {
        ids.extend(tok.bos_id);
    }
    ids.extend(tok.encode(prompt)?);
    let prompt_len = ids.len();
    let collator = CompletionOnlyCollator::padding_free(tok.pad_or_eos());
    let limit = model.max_positions();
    if prompt_len >= limit {
        return Err(Error::Config(format!(
            "the prompt has {prompt_len} tokens: nothing can follow it within the model's \
             max_position_embeddings = {limit}"
        )));
    }
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
        let last = h.narrow(0, ids.len() - 1, 1)?;
        let next = model
            .logits(&last)?
            .argmax(D::Minus1)?
            .flatten_all()?
            .to_vec1::<u32>()?[0];
        if Some(next) == tok.eos_id {
            break;
        }
        ids.push(next);
    }
    tok.decode(&ids[prompt_len..])
}
