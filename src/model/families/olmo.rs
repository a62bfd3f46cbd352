//! OLMo (transformers 4.46.3 `modeling_olmo.py`): non-parametric LayerNorm, q/k/v clipping; OLMo 2
//! (4.51.3 `modeling_olmo2.py`): post-norms and q/k norms over the whole projection.

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

/// OLMo 2 (transformers 4.51.3 `modeling_olmo2.py`): Llama's projections and gated MLP, the
/// norms after attention and after the MLP instead of before (`post_attention_layernorm`,
/// `post_feedforward_layernorm`), and an RMSNorm over the whole q and k projections (all heads
/// together) before RoPE.
pub(super) fn olmo2(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    let d = dims(c, None, true, 2048)?;
    let act = act(c, &c.str_or("hidden_act", "silu")?, "hidden_act")?;
    let ab = c.bool_or("attention_bias", false)?;
    c.warn_dropout(&["attention_dropout"])?;
    let rope = rope(c, c.f64_or("rope_theta", 10000.0)?, d.head_dim, true)?;
    let mlp = gated_mlps(&d, act, false, false);
    let mut s = spec(
        "olmo2",
        &d,
        NormSpec {
            kind: NormKind::Rms,
            eps: c.f64_or("rms_norm_eps", 1e-5)?,
        },
        Block::PostNorm,
        QkvLayout::Separate,
        ab,
        ab,
        mlp,
        rope,
        c.bool_or("tie_word_embeddings", false)?,
    );
    s.qk_norm = Some(QkNorm::WholeRms);
    s.padding_idx = c.padding_idx(Some(1))?;
    let mut names = llama_gated(d.layers, ab, ab, false);
    for (l, layer) in names.layers.iter_mut().enumerate() {
        let p = format!("model.layers.{l}");
        layer.norm1 = norm_names(format!("{p}.post_attention_layernorm"));
        layer.norm2 = Some(norm_names(format!("{p}.post_feedforward_layernorm")));
        layer.q_norm = vec![format!("{p}.self_attn.q_norm.weight")];
        layer.k_norm = vec![format!("{p}.self_attn.k_norm.weight")];
    }
    Ok((s, names))
}
