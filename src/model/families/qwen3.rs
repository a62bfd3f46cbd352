//! Qwen3 and Qwen3-MoE (transformers 4.51.3 `modeling_qwen3.py`, `modeling_qwen3_moe.py`): Qwen2's
//! decoder without q/k/v biases (`attention_bias`, false by default), `head_dim` its own key, and
//! an RMSNorm over head_dim on each head of q and k before RoPE, one weight shared by all heads
//! (`q_norm`, `k_norm`); Qwen3-MoE's experts are Qwen2-MoE's without the shared expert.

use super::super::spec::*;
use super::common::*;
use super::qwen2::qwen_moe;
use crate::error::Result;

pub(super) fn qwen3(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    // Qwen3Config's head_dim is 128 whatever the hidden size; transformers reads it from the
    // config, which always has it.
    let (d, rope, act, norm, bias) = qwen3_common(c, 32, Some(128))?;
    let mlp = gated_mlps(&d, act, false, false);
    let names = llama_gated(d.layers, bias, bias, false);
    finish(c, "qwen3", d, rope, norm, bias, mlp, names, None)
}

pub(super) fn qwen3_moe(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    // Qwen3MoeConfig has no head_dim attribute: hidden / heads unless the config names one.
    let (d, rope, act, norm, bias) = qwen3_common(c, 4, None)?;
    let moe = qwen_moe(c, &d, act, (128, 8, 768), false)?;
    let layers = (moe.names.into_iter().enumerate())
        .map(|(l, mlp)| llama_layer(l, bias, bias, mlp))
        .collect();
    let names = llama_names(layers, false);
    finish(
        c,
        "qwen3_moe",
        d,
        rope,
        norm,
        bias,
        moe.mlp,
        names,
        moe.aux_coef,
    )
}

/// Sizes, rotary table, activation, norm and attention bias of both; `kv_default` is the
/// config class's `num_key_value_heads`, `head_dim_default` its head_dim where it has one.
fn qwen3_common(
    c: &Cfg,
    kv_default: usize,
    head_dim_default: Option<usize>,
) -> Result<(Dims, RopeSpec, Act, NormSpec, bool)> {
    c.reject(
        c.bool_or("use_sliding_window", false)?,
        "use_sliding_window = true (the sliding layers of Qwen3 are not computed here)",
    )?;
    let mut d = dims(c, Some(kv_default), true, 32768)?;
    if let (None, Some(hd)) = (c.get("head_dim"), head_dim_default) {
        d.head_dim = hd;
    }
    let act = act(c, &c.str_or("hidden_act", "silu")?, "hidden_act")?;
    c.warn_dropout(&["attention_dropout"])?;
    let rope = rope(c, c.f64_or("rope_theta", 10000.0)?, d.head_dim, true)?;
    let norm = NormSpec {
        kind: NormKind::Rms,
        eps: c.f64_or("rms_norm_eps", 1e-6)?,
    };
    Ok((d, rope, act, norm, c.bool_or("attention_bias", false)?))
}

/// The spec with Qwen3's q/k norms, and their names in every layer.
#[allow(clippy::too_many_arguments)]
fn finish(
    c: &Cfg,
    family: &str,
    d: Dims,
    rope: RopeSpec,
    norm: NormSpec,
    bias: bool,
    mlp: Vec<MlpSpec>,
    mut names: ModelNames,
    aux_coef: Option<f64>,
) -> Result<(ArchSpec, ModelNames)> {
    let mut s = spec(
        family,
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
    s.router_aux_loss_coef = aux_coef;
    for (l, layer) in names.layers.iter_mut().enumerate() {
        let p = format!("model.layers.{l}.self_attn");
        layer.q_norm = vec![format!("{p}.q_norm.weight")];
        layer.k_norm = vec![format!("{p}.k_norm.weight")];
    }
    Ok((s, names))
}
