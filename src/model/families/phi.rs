//! Phi 1/2 and Phi-3 (transformers 4.46.3 `modeling_phi.py`, `modeling_phi3.py`): partial rotary and a shared norm; fused qkv and gate_up with LongRoPE.

use serde_json::Value;

use super::super::spec::*;
use super::common::*;
use crate::error::Result;

pub(super) fn phi(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    c.reject(c.bool_or("qk_layernorm", false)?, "qk_layernorm = true")?;
    let d = dims(c, None, false, 2048)?;
    let act = act(c, &c.str_or("hidden_act", "gelu_new")?, "hidden_act")?;
    c.warn_dropout(&["resid_pdrop", "embd_pdrop", "attention_dropout"])?;
    let rot = (d.head_dim as f64 * c.f64_or("partial_rotary_factor", 0.5)?) as usize;
    let rope = rope(c, c.f64_or("rope_theta", 10000.0)?, rot, true)?;
    let ln = NormSpec {
        kind: NormKind::LayerNorm { bias: true },
        eps: c.f64_or("layer_norm_eps", 1e-5)?,
    };
    let mut s = spec(
        "phi",
        &d,
        ln,
        Block::Parallel { shared_norm: true },
        QkvLayout::Separate,
        true,
        true,
        vec![
            MlpSpec::Plain {
                hidden: d.intermediate,
                act,
                bias: true
            };
            d.layers
        ],
        rope,
        c.bool_or("tie_word_embeddings", false)?,
    );
    s.lm_head_bias = true;
    s.padding_idx = c.padding_idx(None)?;
    let layers = (0..d.layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            let mut names = llama_layer(
                l,
                true,
                true,
                MlpNames::Plain {
                    fc1: LinearNames::new(&format!("{p}.mlp.fc1"), true),
                    fc2: LinearNames::new(&format!("{p}.mlp.fc2"), true),
                },
            );
            names.o = LinearNames::new(&format!("{p}.self_attn.dense"), true);
            names.norm2 = None;
            names
        })
        .collect();
    let mut names = llama_names(layers, true);
    names.final_norm = norm_names("model.final_layernorm".into());
    Ok((s, names))
}

pub(super) fn phi3(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    c.reject(
        c.f64_or("partial_rotary_factor", 1.0)? != 1.0,
        "partial_rotary_factor != 1",
    )?;
    let d = dims(c, None, false, 4096)?;
    let act = act(c, &c.str_or("hidden_act", "silu")?, "hidden_act")?;
    c.warn_dropout(&["resid_pdrop", "embd_pdrop", "attention_dropout"])?;
    let theta = c.f64_or("rope_theta", 10000.0)?;
    let rope = match c.get("rope_scaling") {
        None => rope(c, theta, d.head_dim, false)?,
        Some(_) => {
            let rs = c.sub("rope_scaling");
            let kind = rs.str_or("type", &rs.str_or("rope_type", "")?)?;
            c.reject(
                !matches!(kind.as_str(), "longrope" | "su" | "yarn"),
                format!("rope_scaling type {kind:?}"),
            )?;
            let factors = |k: &str| -> Result<Vec<f64>> {
                let a = rs
                    .get(k)
                    .and_then(Value::as_array)
                    .ok_or_else(|| c.err(format!("rope_scaling needs a list `{k}`")))?;
                let v: Vec<f64> = a.iter().filter_map(Value::as_f64).collect();
                if v.len() != d.head_dim / 2 {
                    return Err(c.err(format!(
                        "rope_scaling.{k} has {} entries, head_dim / 2 = {}",
                        v.len(),
                        d.head_dim / 2
                    )));
                }
                Ok(v)
            };
            let base = base_inv_freq(theta, d.head_dim);
            let scale = |f: Vec<f64>| -> Vec<f32> {
                base.iter().zip(f).map(|(b, e)| (b / e) as f32).collect()
            };
            let original = c.usize_or("original_max_position_embeddings", 4096)?;
            let s = d.max_positions as f64 / original as f64;
            let a = if s <= 1.0 {
                1.0
            } else {
                (1.0 + s.ln() / (original as f64).ln()).sqrt()
            };
            RopeSpec {
                theta,
                rotary_dim: d.head_dim,
                inv_freq: scale(factors("short_factor")?),
                long: Some(LongRope {
                    inv_freq: scale(factors("long_factor")?),
                    original_max: original,
                }),
                attention_factor: a,
            }
        }
    };
    let mlp = gated_mlps(&d, act, false, true);
    let mut s = spec(
        "phi3",
        &d,
        NormSpec {
            kind: NormKind::Rms,
            eps: c.f64_or("rms_norm_eps", 1e-5)?,
        },
        Block::Sequential,
        QkvLayout::FusedConcat,
        false,
        false,
        mlp,
        rope,
        c.bool_or("tie_word_embeddings", false)?,
    );
    s.sliding_window = c.opt_usize("sliding_window")?;
    s.padding_idx = c.padding_idx(Some(32000))?;
    let layers = (0..d.layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            let mut names = llama_layer(
                l,
                false,
                false,
                MlpNames::GatedFused {
                    gate_up: LinearNames::new(&format!("{p}.mlp.gate_up_proj"), false),
                    down: LinearNames::new(&format!("{p}.mlp.down_proj"), false),
                },
            );
            names.qkv =
                QkvNames::Fused(LinearNames::new(&format!("{p}.self_attn.qkv_proj"), false));
            names
        })
        .collect();
    Ok((s, llama_names(layers, false)))
}
