//! StableLM (transformers 4.46.3 `modeling_stablelm.py`): LayerNorm, partial rotary, optional per-head q/k norms and parallel residual.

use super::super::spec::*;
use super::common::*;
use crate::error::Result;

pub(super) fn stablelm(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    let d = dims(c, Some(32), false, 4096)?;
    let act = act(c, &c.str_or("hidden_act", "silu")?, "hidden_act")?;
    c.warn_dropout(&["hidden_dropout", "attention_dropout"])?;
    let rot = (d.head_dim as f64 * c.f64_or("partial_rotary_factor", 0.25)?) as usize;
    let rope = rope(c, c.f64_or("rope_theta", 10000.0)?, rot, true)?;
    let qkv_bias = c.bool_or("use_qkv_bias", false)?;
    let parallel = c.bool_or("use_parallel_residual", false)?;
    let qk_norm = c.bool_or("qk_layernorm", false)?;
    let ln = NormSpec {
        kind: NormKind::LayerNorm { bias: true },
        eps: c.f64_or("layer_norm_eps", 1e-5)?,
    };
    let block = if parallel {
        Block::Parallel { shared_norm: true }
    } else {
        Block::Sequential
    };
    let mlp = gated_mlps(&d, act, false, false);
    let mut s = spec(
        "stablelm",
        &d,
        ln,
        block,
        QkvLayout::Separate,
        qkv_bias,
        false,
        mlp,
        rope,
        c.bool_or("tie_word_embeddings", false)?,
    );
    s.qk_norm = qk_norm.then_some(QkNorm::PerHeadLayerNorm);
    s.padding_idx = c.padding_idx(None)?;
    let layers = (0..d.layers)
        .map(|l| {
            let p = format!("model.layers.{l}.self_attn");
            let mut names = llama_layer(
                l,
                qkv_bias,
                false,
                gated_names(&format!("model.layers.{l}.mlp"), false),
            );
            if parallel {
                names.norm2 = None;
            }
            if qk_norm {
                names.q_norm = (0..d.heads)
                    .map(|h| format!("{p}.q_layernorm.norms.{h}.weight"))
                    .collect();
                names.k_norm = (0..d.kv_heads)
                    .map(|h| format!("{p}.k_layernorm.norms.{h}.weight"))
                    .collect();
            }
            names
        })
        .collect();
    Ok((s, llama_names(layers, false)))
}
