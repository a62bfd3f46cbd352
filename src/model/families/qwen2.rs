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
    let moe = qwen_moe(c, &d, act, (60, 4, 1408), true)?;
    let mut s = spec(
        "qwen2_moe",
        &d,
        norm,
        Block::Sequential,
        QkvLayout::Separate,
        true,
        false,
        moe.mlp,
        rope,
        c.bool_or("tie_word_embeddings", false)?,
    );
    s.padding_idx = c.padding_idx(None)?;
    s.router_aux_loss_coef = moe.aux_coef;
    let layers = (moe.names.into_iter().enumerate())
        .map(|(l, mlp)| llama_layer(l, true, false, mlp))
        .collect();
    Ok((s, llama_names(layers, false)))
}

/// The MLPs of a Qwen mixture-of-experts model (Qwen2-MoE, Qwen3-MoE), per layer with their
/// names: layer `l` is sparse iff `l` is not in `mlp_only_layers`, there are experts and
/// `(l + 1) % decoder_sparse_step == 0`; otherwise a dense GLU of `intermediate_size`. Qwen2-MoE
/// adds a shared expert with a sigmoid gate (`shared`).
pub(super) struct QwenMoe {
    pub(super) mlp: Vec<MlpSpec>,
    pub(super) names: Vec<MlpNames>,
    pub(super) aux_coef: Option<f64>,
}

pub(super) fn qwen_moe(
    c: &Cfg,
    d: &Dims,
    act: Act,
    (experts_default, top_k_default, width_default): (usize, usize, usize),
    shared: bool,
) -> Result<QwenMoe> {
    let (e, k) = (
        c.usize_or("num_experts", experts_default)?,
        c.usize_or("num_experts_per_tok", top_k_default)?,
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
    let shared_width = match shared {
        true => Some(c.usize_or("shared_expert_intermediate_size", 5632)?),
        false => None,
    };
    let moe = MoeSpec {
        experts: e,
        top_k: k,
        expert_hidden: c.usize_or("moe_intermediate_size", width_default)?,
        act,
        routing: if c.bool_or("norm_topk_prob", false)? {
            Routing::Renormalize
        } else {
            Routing::Raw
        },
        aux_from_probs: false,
        fused_experts: false,
        shared_expert: shared_width,
    };
    let sparse = |l: usize| !only.contains(&l) && e > 0 && step > 0 && (l + 1) % step == 0;
    c.reject(
        e > 0 && (k == 0 || k > e),
        format!("num_experts_per_tok = {k} with {e} experts"),
    )?;
    let mut mlp = Vec::with_capacity(d.layers);
    let mut names = Vec::with_capacity(d.layers);
    for l in 0..d.layers {
        let p = format!("model.layers.{l}.mlp");
        if sparse(l) {
            mlp.push(MlpSpec::Moe(moe.clone()));
            names.push(MlpNames::Moe {
                router: LinearNames::new(&format!("{p}.gate"), false),
                experts: experts_names(&p, e, "gate_proj", "up_proj", "down_proj"),
                shared: shared.then(|| {
                    (
                        Box::new(gated_names(&format!("{p}.shared_expert"), false)),
                        LinearNames::new(&format!("{p}.shared_expert_gate"), false),
                    )
                }),
            });
        } else {
            mlp.push(MlpSpec::Gated {
                hidden: d.intermediate,
                act,
                bias: false,
                fused: false,
            });
            names.push(gated_names(&p, false));
        }
    }
    Ok(QwenMoe {
        mlp,
        names,
        aux_coef: aux_coef(c, "router_aux_loss_coef", 0.001)?,
    })
}
