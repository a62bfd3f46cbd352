//! Qwen2 and Qwen2-MoE (transformers 4.46.3 `modeling_qwen2.py`, `modeling_qwen2_moe.py`): q/k/v biases, sliding windows, experts with a gated shared expert.

use serde_json::Value;

use super::super::spec::*;
use super::common::*;
use crate::error::Result;

pub(super) fn qwen2_common(c: &Cfg, family: &str) -> Result<(Dims, RopeSpec, Act, NormSpec)> {
    c.reject(
        c.bool_or("use_sliding_window", false)?,
        "use_sliding_window = true (transformers' backends disagree on which layers it covers)",
    )?;
    let d = dims(
        c,
        Some(if family == "qwen2" { 32 } else { 16 }),
        false,
        32768,
    )?;
    let act = act(c, &c.str_or("hidden_act", "silu")?, "hidden_act")?;
    c.warn_dropout(&["attention_dropout"])?;
    let rope = rope(c, c.f64_or("rope_theta", 10000.0)?, d.head_dim, true)?;
    Ok((
        d,
        rope,
        act,
        NormSpec {
            kind: NormKind::Rms,
            eps: c.f64_or("rms_norm_eps", 1e-6)?,
        },
    ))
}

pub(super) fn qwen2(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    let (d, rope, act, norm) = qwen2_common(c, "qwen2")?;
    let mlp = gated_mlps(&d, act, false, false);
    let mut s = spec(
        "qwen2",
        &d,
        norm,
        Block::Sequential,
        QkvLayout::Separate,
        true,
        false,
        mlp,
        rope,
        c.bool_or("tie_word_embeddings", false)?,
    );
    s.padding_idx = c.padding_idx(None)?;
    Ok((s, llama_gated(d.layers, true, false, false)))
}

pub(super) fn qwen2_moe(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    let (d, rope, act, norm) = qwen2_common(c, "qwen2_moe")?;
    let (e, k) = (
        c.usize_or("num_experts", 60)?,
        c.usize_or("num_experts_per_tok", 4)?,
    );
    let step = c.usize_or("decoder_sparse_step", 1)?;
    let only: Vec<usize> = c
        .get("mlp_only_layers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64().map(|v| v as usize))
                .collect()
        })
        .unwrap_or_default();
    let moe = MoeSpec {
        experts: e,
        top_k: k,
        expert_hidden: c.usize_or("moe_intermediate_size", 1408)?,
        act,
        routing: if c.bool_or("norm_topk_prob", false)? {
            Routing::Renormalize
        } else {
            Routing::Raw
        },
        aux_from_probs: false,
        fused_experts: false,
        shared_expert: Some(c.usize_or("shared_expert_intermediate_size", 5632)?),
    };
    let sparse = |l: usize| !only.contains(&l) && e > 0 && step > 0 && (l + 1) % step == 0;
    c.reject(
        e > 0 && (k == 0 || k > e),
        format!("num_experts_per_tok = {k} with {e} experts"),
    )?;
    let mlp = (0..d.layers)
        .map(|l| {
            if sparse(l) {
                MlpSpec::Moe(moe.clone())
            } else {
                MlpSpec::Gated {
                    hidden: d.intermediate,
                    act,
                    bias: false,
                    fused: false,
                }
            }
        })
        .collect();
    let mut s = spec(
        "qwen2_moe",
        &d,
        norm,
        Block::Sequential,
        QkvLayout::Separate,
        true,
        false,
        mlp,
        rope,
        c.bool_or("tie_word_embeddings", false)?,
    );
    s.padding_idx = c.padding_idx(None)?;
    s.router_aux_loss_coef = aux_coef(c, "router_aux_loss_coef", 0.001)?;
    let layers = (0..d.layers)
        .map(|l| {
            let p = format!("model.layers.{l}.mlp");
            let mlp = if sparse(l) {
                MlpNames::Moe {
                    router: LinearNames::new(&format!("{p}.gate"), false),
                    experts: experts_names(&p, e, "gate_proj", "up_proj", "down_proj"),
                    shared: Some((
                        Box::new(gated_names(&format!("{p}.shared_expert"), false)),
                        LinearNames::new(&format!("{p}.shared_expert_gate"), false),
                    )),
                }
            } else {
                gated_names(&p, false)
            };
            llama_layer(l, true, false, mlp)
        })
        .collect();
    Ok((s, llama_names(layers, false)))
}
