//! Llama 2/3 and Granite (`llama_like`: Granite adds its multipliers), Mistral, Mixtral (transformers 4.46.3 `modeling_llama.py`, `modeling_granite.py`, `modeling_mistral.py`, `modeling_mixtral.py`); Granite MoE (4.51.3 `modeling_granitemoe.py`).

use serde_json::Value;

use super::super::spec::*;
use super::common::*;
use crate::error::Result;

pub(super) fn llama_like(c: &Cfg, family: &str) -> Result<(ArchSpec, ModelNames)> {
    let d = dims(c, None, family == "llama", 2048)?;
    let act = act(c, &c.str_or("hidden_act", "silu")?, "hidden_act")?;
    let (ab, mb) = (
        c.bool_or("attention_bias", false)?,
        c.bool_or("mlp_bias", false)?,
    );
    c.warn_dropout(&["attention_dropout"])?;
    let rope = rope(c, c.f64_or("rope_theta", 10000.0)?, d.head_dim, true)?;
    let mlp = gated_mlps(&d, act, mb, false);
    let mut s = spec(
        family,
        &d,
        NormSpec {
            kind: NormKind::Rms,
            eps: c.f64_or("rms_norm_eps", 1e-6)?,
        },
        Block::Sequential,
        QkvLayout::Separate,
        ab,
        ab,
        mlp,
        rope,
        c.bool_or("tie_word_embeddings", false)?,
    );
    s.padding_idx = c.padding_idx(None)?;
    if family.starts_with("granite") {
        granite_multipliers(c, &mut s)?;
    }
    Ok((s, llama_gated(d.layers, ab, ab, mb)))
}

/// Granite's four multipliers: of the embedding, of each branch joining the residual stream,
/// of `q . k` (instead of 1 / sqrt(head_dim)), and the logits' divisor.
fn granite_multipliers(c: &Cfg, s: &mut ArchSpec) -> Result<()> {
    s.embedding_multiplier = c.f64_or("embedding_multiplier", 1.0)?;
    s.residual_multiplier = c.f64_or("residual_multiplier", 1.0)?;
    s.attn_scale = c.f64_or("attention_multiplier", 1.0)?;
    s.logits_scaling = c.f64_or("logits_scaling", 1.0)?;
    Ok(())
}

/// Granite MoE (transformers 4.51.3 `modeling_granitemoe.py`): Granite's layer and multipliers
/// with a top-k mixture of experts for every MLP. The router takes the softmax of the k largest
/// logits, which equals the top-k probabilities renormalised (`Routing::Renormalize`); the
/// experts are two stacks (`input_linear` (E, 2F, H), gate rows first; `output_linear`
/// (E, H, F)); the auxiliary loss is Mixtral's.
pub(super) fn granitemoe(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    // Granite's layer, multipliers and defaults, every MLP then a mixture of experts.
    let (mut s, mut names) = llama_like(c, "granitemoe")?;
    let Some(&MlpSpec::Gated {
        hidden, act, bias, ..
    }) = s.mlp.first()
    else {
        return Err(c.err("vocab_size, hidden size and layer count must be positive"));
    };
    c.reject(bias, "mlp_bias = true (Granite MoE's experts have no bias)")?;
    let moe = top_k_moe(c, hidden, act, true)?;
    s.mlp = vec![MlpSpec::Moe(moe); s.layers];
    s.router_aux_loss_coef = aux_coef(c, "router_aux_loss_coef", 0.001)?;
    for (l, layer) in names.layers.iter_mut().enumerate() {
        let p = format!("model.layers.{l}.block_sparse_moe");
        layer.mlp = MlpNames::Moe {
            router: LinearNames::new(&format!("{p}.router.layer"), false),
            experts: ExpertNames::Stacked {
                gate_up: format!("{p}.input_linear.weight"),
                down: format!("{p}.output_linear.weight"),
            },
            shared: None,
        };
    }
    Ok((s, names))
}

pub(super) fn mistral(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    let d = dims(c, Some(8), true, 131072)?;
    let act = act(c, &c.str_or("hidden_act", "silu")?, "hidden_act")?;
    c.warn_dropout(&["attention_dropout"])?;
    let rope = rope(c, c.f64_or("rope_theta", 10000.0)?, d.head_dim, false)?;
    let mlp = gated_mlps(&d, act, false, false);
    let mut s = spec(
        "mistral",
        &d,
        NormSpec {
            kind: NormKind::Rms,
            eps: c.f64_or("rms_norm_eps", 1e-6)?,
        },
        Block::Sequential,
        QkvLayout::Separate,
        false,
        false,
        mlp,
        rope,
        c.bool_or("tie_word_embeddings", false)?,
    );
    // An absent key means 4096 in transformers; an explicit null disables the window.
    let _ = c.get("sliding_window"); // read: a null here is meaningful
    s.sliding_window = match c.v.get("sliding_window") {
        None => Some(4096),
        Some(Value::Null) => None,
        Some(_) => c.opt_usize("sliding_window")?,
    };
    s.padding_idx = c.padding_idx(None)?;
    Ok((s, llama_gated(d.layers, false, false, false)))
}

pub(super) fn mixtral(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    let d = dims(c, Some(8), false, 131072)?;
    let act = act(c, &c.str_or("hidden_act", "silu")?, "hidden_act")?;
    c.warn_dropout(&["attention_dropout"])?;
    c.reject(
        c.f64_or("router_jitter_noise", 0.0)? != 0.0,
        "router_jitter_noise != 0",
    )?;
    let rope = rope(c, c.f64_or("rope_theta", 1e6)?, d.head_dim, false)?;
    let moe = top_k_moe(c, d.intermediate, act, false)?;
    let experts = moe.experts;
    let mut s = spec(
        "mixtral",
        &d,
        NormSpec {
            kind: NormKind::Rms,
            eps: c.f64_or("rms_norm_eps", 1e-5)?,
        },
        Block::Sequential,
        QkvLayout::Separate,
        false,
        false,
        vec![MlpSpec::Moe(moe); d.layers],
        rope,
        c.bool_or("tie_word_embeddings", false)?,
    );
    s.sliding_window = c.opt_usize("sliding_window")?;
    s.padding_idx = c.padding_idx(None)?;
    s.router_aux_loss_coef = aux_coef(c, "router_aux_loss_coef", 0.001)?;
    let layers = (0..d.layers)
        .map(|l| {
            let p = format!("model.layers.{l}.block_sparse_moe");
            llama_layer(
                l,
                false,
                false,
                MlpNames::Moe {
                    router: LinearNames::new(&format!("{p}.gate"), false),
                    experts: experts_names(&p, experts, "w1", "w3", "w2"),
                    shared: None,
                },
            )
        })
        .collect();
    Ok((s, llama_names(layers, false)))
}

/// Mixtral's and Granite MoE's experts: `num_local_experts` (8) of width `hidden`
/// (`intermediate_size`), the top `num_experts_per_tok` (2) renormalised; `stacked`: stored as
/// stacks, not per expert.
fn top_k_moe(c: &Cfg, hidden: usize, act: Act, stacked: bool) -> Result<MoeSpec> {
    let (e, k) = (
        c.usize_or("num_local_experts", 8)?,
        c.usize_or("num_experts_per_tok", 2)?,
    );
    c.reject(
        k == 0 || k > e,
        format!("num_experts_per_tok = {k} with {e} experts"),
    )?;
    Ok(MoeSpec {
        experts: e,
        top_k: k,
        expert_hidden: hidden,
        act,
        routing: Routing::Renormalize,
        aux_from_probs: false,
        fused_experts: stacked,
        shared_expert: None,
    })
}
