//! Falcon (transformers 4.46.3 `modeling_falcon.py`): parallel attention, multi-query or grouped KV, the new and old decoder architectures.

use super::super::spec::*;
use super::common::*;
use crate::error::Result;

pub(super) fn falcon(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    c.reject(c.bool_or("alibi", false)?, "alibi = true")?;
    let hidden = c.usize("hidden_size")?;
    let heads = c.usize("num_attention_heads")?;
    c.reject(
        heads == 0 || hidden % heads != 0,
        format!("hidden_size {hidden} not a multiple of num_attention_heads {heads}"),
    )?;
    let new_arch = c.bool_or("new_decoder_architecture", false)?;
    let parallel = c.bool_or("parallel_attn", true)?;
    let multi_query = c.bool_or("multi_query", true)?;
    let num_ln = c.opt_usize("num_ln_in_parallel_attn")?;
    let (qkv, kv_heads) = if new_arch {
        let kv = c.usize_or("num_kv_heads", heads)?;
        c.reject(
            kv == 0 || heads % kv != 0,
            format!("num_attention_heads {heads} not a multiple of num_kv_heads {kv}"),
        )?;
        (QkvLayout::FusedGrouped, kv)
    } else if multi_query {
        (QkvLayout::FusedConcat, 1)
    } else {
        (QkvLayout::FusedInterleaved, heads)
    };
    let (block, two_norms) = match (new_arch, parallel, num_ln) {
        (true, true, None | Some(2)) => (Block::Parallel { shared_norm: false }, true),
        (true, true, Some(1)) | (false, true, None | Some(1)) => (Block::Parallel { shared_norm: true }, false),
        (false, false, _) => (Block::Sequential, true),
        _ => return Err(c.err(format!("new_decoder_architecture = {new_arch}, parallel_attn = {parallel}, num_ln_in_parallel_attn = {num_ln:?} is not supported"))),
    };
    c.warn_dropout(&["hidden_dropout", "attention_dropout"])?;
    let d = Dims {
        vocab: c.usize("vocab_size")?,
        hidden,
        layers: c.usize("num_hidden_layers")?,
        heads,
        kv_heads,
        head_dim: hidden / heads,
        intermediate: c.usize_or("ffn_hidden_size", 4 * hidden)?,
        max_positions: c.usize_or("max_position_embeddings", 2048)?,
    };
    let bias = c.bool_or("bias", false)?;
    let act = act(c, &c.str_or("activation", "gelu")?, "activation")?;
    let rope = rope(c, c.f64_or("rope_theta", 10000.0)?, d.head_dim, true)?;
    let ln = NormSpec {
        kind: NormKind::LayerNorm { bias: true },
        eps: c.f64_or("layer_norm_epsilon", 1e-5)?,
    };
    let s = spec(
        "falcon",
        &d,
        ln,
        block,
        qkv,
        bias,
        bias,
        vec![
            MlpSpec::Plain {
                hidden: d.intermediate,
                act,
                bias
            };
            d.layers
        ],
        rope,
        c.bool_or("tie_word_embeddings", true)?,
    );
    let layers = (0..d.layers)
        .map(|l| {
            let p = format!("transformer.h.{l}");
            let (n1, n2) = match (two_norms, block) {
                (true, Block::Parallel { .. }) => {
                    (format!("{p}.ln_attn"), Some(format!("{p}.ln_mlp")))
                }
                (true, _) => (
                    format!("{p}.input_layernorm"),
                    Some(format!("{p}.post_attention_layernorm")),
                ),
                (false, _) => (format!("{p}.input_layernorm"), None),
            };
            LayerNames {
                norm1: norm_names(n1),
                norm2: n2.map(norm_names),
                qkv: QkvNames::Fused(LinearNames::new(
                    &format!("{p}.self_attention.query_key_value"),
                    bias,
                )),
                o: LinearNames::new(&format!("{p}.self_attention.dense"), bias),
                q_norm: vec![],
                k_norm: vec![],
                post_norms: None,
                mlp: MlpNames::Plain {
                    fc1: LinearNames::new(&format!("{p}.mlp.dense_h_to_4h"), bias),
                    fc2: LinearNames::new(&format!("{p}.mlp.dense_4h_to_h"), bias),
                },
            }
        })
        .collect();
    Ok((
        s,
        ModelNames {
            embed: "transformer.word_embeddings.weight".into(),
            final_norm: norm_names("transformer.ln_f".into()),
            lm_head: LinearNames::new("lm_head", false),
            layers,
        },
    ))
}
