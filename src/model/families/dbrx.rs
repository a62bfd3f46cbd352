//! DBRX (transformers 4.46.3 `modeling_dbrx.py`): fused Wqkv, q/k/v clipping, fused expert tensors.

use super::super::spec::*;
use super::common::*;
use crate::error::Result;

pub(super) fn dbrx(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    let (attn, ffn) = (c.sub("attn_config"), c.sub("ffn_config"));
    let hidden = c.usize("d_model")?;
    let heads = c.usize("n_heads")?;
    c.reject(
        heads == 0 || hidden % heads != 0,
        format!("d_model {hidden} not a multiple of n_heads {heads}"),
    )?;
    let kv_heads = attn.usize_or("kv_n_heads", 1)?;
    c.reject(
        kv_heads == 0 || heads % kv_heads != 0,
        format!("n_heads {heads} not a multiple of kv_n_heads {kv_heads}"),
    )?;
    c.reject(
        c.bool_or("tie_word_embeddings", false)?,
        "tie_word_embeddings = true",
    )?;
    c.reject(
        ffn.get("moe_jitter_eps").is_some(),
        "ffn_config.moe_jitter_eps",
    )?;
    let d = Dims {
        vocab: c.usize("vocab_size")?,
        hidden,
        layers: c.usize("n_layers")?,
        heads,
        kv_heads,
        head_dim: hidden / heads,
        intermediate: ffn.usize_or("ffn_hidden_size", 3584)?,
        max_positions: c.usize_or("max_seq_len", 2048)?,
    };
    let act_name = ffn.sub("ffn_act_fn").str_or("name", "silu")?;
    let act = act(c, &act_name, "ffn_config.ffn_act_fn.name")?;
    let (e, k) = (
        ffn.usize_or("moe_num_experts", 4)?,
        ffn.usize_or("moe_top_k", 1)?,
    );
    c.reject(k == 0 || k > e, format!("moe_top_k = {k} with {e} experts"))?;
    let routing = match ffn.get("moe_normalize_expert_weights") {
        None if ffn.v.get("moe_normalize_expert_weights").is_some() => Routing::Raw,
        None => Routing::PNorm(1.0),
        Some(_) => Routing::PNorm(ffn.f64_or("moe_normalize_expert_weights", 1.0)?),
    };
    let moe = MoeSpec {
        experts: e,
        top_k: k,
        expert_hidden: d.intermediate,
        act,
        routing,
        aux_from_probs: true,
        fused_experts: true,
        shared_expert: None,
    };
    let rope = rope(c, attn.f64_or("rope_theta", 10000.0)?, d.head_dim, false)?;
    let ln = NormSpec {
        kind: NormKind::LayerNorm { bias: false },
        eps: 1e-5,
    };
    let mut s = spec(
        "dbrx",
        &d,
        ln,
        Block::Sequential,
        QkvLayout::FusedConcat,
        false,
        false,
        vec![MlpSpec::Moe(moe); d.layers],
        rope,
        false,
    );
    s.clip_qkv = attn.opt_f64("clip_qkv")?;
    s.padding_idx = c.padding_idx(None)?;
    s.router_aux_loss_coef = if c.bool_or("output_router_logits", false)? {
        Some(ffn.f64_or("moe_loss_weight", 0.01)?)
    } else {
        None
    };
    let layers = (0..d.layers)
        .map(|l| {
            let p = format!("transformer.blocks.{l}");
            LayerNames {
                norm1: norm_names(format!("{p}.norm_attn_norm.norm_1")),
                norm2: Some(norm_names(format!("{p}.norm_attn_norm.norm_2"))),
                qkv: QkvNames::Fused(LinearNames::new(
                    &format!("{p}.norm_attn_norm.attn.Wqkv"),
                    false,
                )),
                o: LinearNames::new(&format!("{p}.norm_attn_norm.attn.out_proj"), false),
                q_norm: vec![],
                k_norm: vec![],
                post_norms: None,
                mlp: MlpNames::Moe {
                    router: LinearNames::new(&format!("{p}.ffn.router.layer"), false),
                    experts: ExpertNames::Fused {
                        w1: format!("{p}.ffn.experts.mlp.w1"),
                        v1: format!("{p}.ffn.experts.mlp.v1"),
                        w2: format!("{p}.ffn.experts.mlp.w2"),
                    },
                    shared: None,
                },
            }
        })
        .collect();
    Ok((
        s,
        ModelNames {
            embed: "transformer.wte.weight".into(),
            final_norm: norm_names("transformer.norm_f".into()),
            lm_head: LinearNames::new("lm_head", false),
            layers,
        },
    ))
}
