//! Qwen3 (transformers 4.51.3 `modeling_qwen3.py`): Qwen2's decoder without q/k/v biases
//! (`attention_bias`, false by default), `head_dim` its own key, and an RMSNorm over head_dim on
//! each head of q and k before RoPE, one weight shared by all heads (`q_norm`, `k_norm`).

use super::super::spec::*;
use super::common::*;
use crate::error::Result;

pub(super) fn qwen3(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    c.reject(
        c.bool_or("use_sliding_window", false)?,
        "use_sliding_window = true (the sliding layers of Qwen3 are not computed here)",
    )?;
    // Qwen3Config's defaults: as many kv heads as heads, and head_dim 128 whatever the hidden
    // size (transformers reads `config.head_dim`, which the config always has).
    let mut d = dims(c, None, true, 32768)?;
    if c.get("head_dim").is_none() {
        d.head_dim = 128;
    }
    let act = act(c, &c.str_or("hidden_act", "silu")?, "hidden_act")?;
    c.warn_dropout(&["attention_dropout"])?;
    let rope = rope(c, c.f64_or("rope_theta", 10000.0)?, d.head_dim, true)?;
    let norm = NormSpec {
        kind: NormKind::Rms,
        eps: c.f64_or("rms_norm_eps", 1e-6)?,
    };
    let bias = c.bool_or("attention_bias", false)?;
    let mlp = gated_mlps(&d, act, false, false);
    let mut s = spec(
        "qwen3",
        &d,
        norm,
        Block::Sequential,
        QkvLayout::Separate,
        bias,
        bias,
        mlp,
        rope,
        c.bool_or("tie_word_embeddings", false)?,
    );
    s.qk_norm = Some(QkNorm::SharedRms);
    s.padding_idx = c.padding_idx(None)?;
    let mut names = llama_gated(d.layers, bias, bias, false);
    for (l, layer) in names.layers.iter_mut().enumerate() {
        let p = format!("model.layers.{l}.self_attn");
        layer.q_norm = vec![format!("{p}.q_norm.weight")];
        layer.k_norm = vec![format!("{p}.k_norm.weight")];
    }
    Ok((s, names))
}
