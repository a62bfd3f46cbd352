//! Gemma (transformers 4.46.3 `modeling_gemma.py`): RMSNorm with a one offset, scaled embeddings, GELU-tanh.

use super::super::spec::*;
use super::common::*;
use crate::error::Result;

pub(super) fn gemma(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    let hidden = c.usize("hidden_size")?;
    let heads = c.usize("num_attention_heads")?;
    let kv_heads = c.usize_or("num_key_value_heads", 16)?;
    c.reject(
        heads == 0 || kv_heads == 0 || heads % kv_heads != 0,
        format!("num_attention_heads {heads} not a multiple of num_key_value_heads {kv_heads}"),
    )?;
    let d = Dims {
        vocab: c.usize("vocab_size")?,
        hidden,
        layers: c.usize("num_hidden_layers")?,
        heads,
        kv_heads,
        head_dim: c.usize_or("head_dim", 256)?,
        intermediate: c.usize("intermediate_size")?,
        max_positions: c.usize_or("max_position_embeddings", 8192)?,
    };
    // transformers ignores hidden_act here: hidden_activation, else gelu_pytorch_tanh.
    let act = act(
        c,
        &c.str_or("hidden_activation", "gelu_pytorch_tanh")?,
        "hidden_activation",
    )?;
    let ab = c.bool_or("attention_bias", false)?;
    c.warn_dropout(&["attention_dropout"])?;
    let rope = rope(c, c.f64_or("rope_theta", 10000.0)?, d.head_dim, false)?;
    let mlp = gated_mlps(&d, act, false, false);
    let mut s = spec(
        "gemma",
        &d,
        NormSpec {
            kind: NormKind::RmsOneOffset,
            eps: c.f64_or("rms_norm_eps", 1e-6)?,
        },
        Block::Sequential,
        QkvLayout::Separate,
        ab,
        ab,
        mlp,
        rope,
        c.bool_or("tie_word_embeddings", true)?,
    );
    s.embedding_multiplier = (hidden as f64).sqrt();
    s.padding_idx = c.padding_idx(Some(0))?;
    Ok((s, llama_gated(d.layers, ab, ab, false)))
}
