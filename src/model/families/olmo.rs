//! OLMo (transformers 4.46.3 `modeling_olmo.py`): non-parametric LayerNorm, q/k/v clipping.

use super::super::spec::*;
use super::common::*;
use crate::error::Result;

pub(super) fn olmo(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    let d = dims(c, None, false, 2048)?;
    let act = act(c, &c.str_or("hidden_act", "silu")?, "hidden_act")?;
    let ab = c.bool_or("attention_bias", false)?;
    c.warn_dropout(&["attention_dropout"])?;
    let rs = c.sub("rope_scaling");
    c.reject(
        c.get("rope_scaling").is_some() && rs.str_or("type", "")? == "dynamic",
        "rope_scaling type \"dynamic\"",
    )?;
    let rope = rope(c, c.f64_or("rope_theta", 10000.0)?, d.head_dim, true)?;
    let mlp = gated_mlps(&d, act, false, false);
    let mut s = spec(
        "olmo",
        &d,
        NormSpec {
            kind: NormKind::NonParametric,
            eps: 1e-5,
        },
        Block::Sequential,
        QkvLayout::Separate,
        ab,
        ab,
        mlp,
        rope,
        c.bool_or("tie_word_embeddings", false)?,
    );
    s.clip_qkv = c.opt_f64("clip_qkv")?;
    s.padding_idx = c.padding_idx(Some(1))?;
    Ok((s, llama_gated(d.layers, ab, ab, false)))
}
