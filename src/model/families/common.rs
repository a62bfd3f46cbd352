//! What the families share: typed reads of config.json (`Cfg`, which records the keys read and
//! rejects what is not computed), RoPE variants, Llama-style parameter names, dimensions, and
//! the spec most families start from.

use serde_json::Value;

use super::super::spec::*;
use crate::error::{Error, Result};

/// Typed reads of a config.json object; absent and `null` are the same, as in transformers.
pub struct Cfg<'a> {
    pub(super) v: &'a Value,
    pub(super) family: &'a str,
    /// Top-level keys read so far (None for nested objects), to name keys nothing reads.
    pub(super) read: Option<&'a std::cell::RefCell<std::collections::BTreeSet<String>>>,
}

impl<'a> Cfg<'a> {
    pub fn new(
        v: &'a Value,
        family: &'a str,
        read: &'a std::cell::RefCell<std::collections::BTreeSet<String>>,
    ) -> Self {
        Self {
            v,
            family,
            read: Some(read),
        }
    }
    pub(super) fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::Config(format!("config.json ({}): {msg}", self.family))
    }
    pub(super) fn get(&self, k: &str) -> Option<&'a Value> {
        if let Some(r) = self.read {
            r.borrow_mut().insert(k.to_string());
        }
        self.v.get(k).filter(|x| !x.is_null())
    }
    pub(super) fn sub(&self, k: &str) -> Cfg<'a> {
        Cfg {
            v: self.get(k).unwrap_or(&Value::Null),
            family: self.family,
            read: None,
        }
    }
    pub fn opt_usize(&self, k: &str) -> Result<Option<usize>> {
        match self.get(k) {
            None => Ok(None),
            Some(x) => x
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(format!("`{k}` must be a non-negative integer, got {x}"))),
        }
    }
    pub fn usize(&self, k: &str) -> Result<usize> {
        self.opt_usize(k)?
            .ok_or_else(|| self.err(format!("missing `{k}`")))
    }
    pub fn usize_or(&self, k: &str, d: usize) -> Result<usize> {
        Ok(self.opt_usize(k)?.unwrap_or(d))
    }
    pub fn opt_f64(&self, k: &str) -> Result<Option<f64>> {
        match self.get(k) {
            None => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(format!("`{k}` must be a number, got {x}"))),
        }
    }
    pub fn f64_or(&self, k: &str, d: f64) -> Result<f64> {
        Ok(self.opt_f64(k)?.unwrap_or(d))
    }
    pub fn bool_or(&self, k: &str, d: bool) -> Result<bool> {
        match self.get(k) {
            None => Ok(d),
            Some(x) => x
                .as_bool()
                .ok_or_else(|| self.err(format!("`{k}` must be true or false, got {x}"))),
        }
    }
    pub fn str_or(&self, k: &str, d: &str) -> Result<String> {
        match self.get(k) {
            None => Ok(d.to_string()),
            Some(x) => x
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| self.err(format!("`{k}` must be a string, got {x}"))),
        }
    }
    pub(super) fn reject(&self, cond: bool, msg: impl std::fmt::Display) -> Result<()> {
        if cond {
            return Err(self.err(format!("{msg} is not supported")));
        }
        Ok(())
    }
    /// packsft trains without dropout; a config that asks for it is trained without, and told.
    pub(super) fn warn_dropout(&self, keys: &[&str]) -> Result<()> {
        for k in keys {
            if self.f64_or(k, 0.0)? > 0.0 {
                tracing::warn!(
                    family = self.family,
                    field = *k,
                    "dropout is not applied by packsft"
                );
            }
        }
        Ok(())
    }
    pub(super) fn padding_idx(&self, default: Option<usize>) -> Result<Option<u32>> {
        Ok(match self.get("pad_token_id") {
            None => default.map(|d| d as u32),
            Some(v) => Some(
                v.as_u64()
                    .ok_or_else(|| self.err("`pad_token_id` must be an integer"))?
                    as u32,
            ),
        })
    }
}

pub fn act(cfg: &Cfg, name: &str, field: &str) -> Result<Act> {
    Ok(match name {
        "silu" | "swish" => Act::Silu,
        "gelu" => Act::GeluErf,
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Act::GeluTanh,
        other => return Err(cfg.err(format!("{field} = {other:?} is not supported (silu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast)"))),
    })
}

pub(super) fn base_inv_freq(theta: f64, dim: usize) -> Vec<f64> {
    (0..dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64))
        .collect()
}

/// RoPE with the scaling types of transformers' `ROPE_INIT_FUNCTIONS` that packsft computes:
/// default, linear, llama3. Others are named in the error.
pub(super) fn rope(
    cfg: &Cfg,
    theta: f64,
    rotary_dim: usize,
    scaling_allowed: bool,
) -> Result<RopeSpec> {
    if rotary_dim == 0 || rotary_dim % 2 != 0 {
        return Err(cfg.err(format!(
            "rotary dimension {rotary_dim} must be even and positive"
        )));
    }
    let base = base_inv_freq(theta, rotary_dim);
    let rs = cfg.sub("rope_scaling");
    let kind = match cfg.get("rope_scaling") {
        None => None,
        Some(_) => Some(rs.str_or("rope_type", &rs.str_or("type", "default")?)?),
    };
    if kind.is_some() && !scaling_allowed {
        return Err(cfg.err("rope_scaling is ignored by transformers for this family; a non-null value is not supported"));
    }
    let inv: Vec<f64> = match kind.as_deref() {
        None | Some("default") => base,
        Some("linear") => {
            let f = rs
                .opt_f64("factor")?
                .ok_or_else(|| cfg.err("rope_scaling needs `factor`"))?;
            base.iter().map(|x| x / f).collect()
        }
        Some("llama3") => {
            let need = |k: &str| {
                rs.opt_f64(k)?
                    .ok_or_else(|| cfg.err(format!("rope_scaling needs `{k}`")))
            };
            let (factor, lo, hi) = (
                need("factor")?,
                need("low_freq_factor")?,
                need("high_freq_factor")?,
            );
            let old = need("original_max_position_embeddings")?;
            let (lo_wl, hi_wl) = (old / lo, old / hi);
            base.iter()
                .map(|&f| {
                    let wl = 2.0 * std::f64::consts::PI / f;
                    if wl < hi_wl {
                        f
                    } else if wl > lo_wl {
                        f / factor
                    } else {
                        let s = (old / wl - lo) / (hi - lo);
                        (1.0 - s) * f / factor + s * f
                    }
                })
                .collect()
        }
        Some(other) => {
            return Err(cfg.err(format!(
                "rope_scaling type {other:?} is not supported (supported: default, linear, llama3)"
            )))
        }
    };
    Ok(RopeSpec {
        theta,
        rotary_dim,
        inv_freq: inv.into_iter().map(|x| x as f32).collect(),
        long: None,
        attention_factor: 1.0,
    })
}

pub(super) fn norm_names(prefix: String) -> NormNames {
    NormNames { prefix }
}

/// The Llama-style layer naming shared by most families.
pub(super) fn llama_layer(l: usize, qkv_bias: bool, o_bias: bool, mlp: MlpNames) -> LayerNames {
    let p = format!("model.layers.{l}");
    LayerNames {
        norm1: norm_names(format!("{p}.input_layernorm")),
        norm2: Some(norm_names(format!("{p}.post_attention_layernorm"))),
        qkv: QkvNames::Separate {
            q: LinearNames::new(&format!("{p}.self_attn.q_proj"), qkv_bias),
            k: LinearNames::new(&format!("{p}.self_attn.k_proj"), qkv_bias),
            v: LinearNames::new(&format!("{p}.self_attn.v_proj"), qkv_bias),
        },
        o: LinearNames::new(&format!("{p}.self_attn.o_proj"), o_bias),
        q_norm: vec![],
        k_norm: vec![],
        post_norms: None,
        mlp,
    }
}

pub(super) fn gated_names(prefix: &str, bias: bool) -> MlpNames {
    MlpNames::Gated {
        gate: LinearNames::new(&format!("{prefix}.gate_proj"), bias),
        up: LinearNames::new(&format!("{prefix}.up_proj"), bias),
        down: LinearNames::new(&format!("{prefix}.down_proj"), bias),
    }
}

pub(super) fn llama_names(layers: Vec<LayerNames>, lm_bias: bool) -> ModelNames {
    ModelNames {
        embed: "model.embed_tokens.weight".into(),
        final_norm: norm_names("model.norm".into()),
        lm_head: LinearNames::new("lm_head", lm_bias),
        layers,
    }
}

/// Llama-style names for `layers` layers with a gated `gate/up/down_proj` MLP.
pub(super) fn llama_gated(
    layers: usize,
    qkv_bias: bool,
    o_bias: bool,
    mlp_bias: bool,
) -> ModelNames {
    let layers = (0..layers)
        .map(|l| {
            llama_layer(
                l,
                qkv_bias,
                o_bias,
                gated_names(&format!("model.layers.{l}.mlp"), mlp_bias),
            )
        })
        .collect();
    llama_names(layers, false)
}

/// Sizes every family reads the same way.
pub(super) struct Dims {
    pub(super) vocab: usize,
    pub(super) hidden: usize,
    pub(super) layers: usize,
    pub(super) heads: usize,
    pub(super) kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) intermediate: usize,
    pub(super) max_positions: usize,
}

pub(super) fn dims(
    c: &Cfg,
    kv_default: Option<usize>,
    head_dim_key: bool,
    max_pos_default: usize,
) -> Result<Dims> {
    let hidden = c.usize("hidden_size")?;
    let heads = c.usize("num_attention_heads")?;
    if heads == 0 || hidden % heads != 0 && !head_dim_key {
        return Err(c.err(format!(
            "hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        )));
    }
    let kv_heads = c.usize_or("num_key_value_heads", kv_default.unwrap_or(heads))?;
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(c.err(format!(
            "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )));
    }
    let natural = hidden / heads;
    let head_dim = if head_dim_key {
        c.usize_or("head_dim", natural)?
    } else {
        // transformers ignores a head_dim key here for attention but uses it for RoPE.
        let hd = c.usize_or("head_dim", natural)?;
        c.reject(
            hd != natural,
            format!("head_dim = {hd} different from hidden_size / num_attention_heads = {natural}"),
        )?;
        natural
    };
    Ok(Dims {
        vocab: c.usize("vocab_size")?,
        hidden,
        layers: c.usize("num_hidden_layers")?,
        heads,
        kv_heads,
        head_dim,
        intermediate: c.usize("intermediate_size")?,
        max_positions: c.usize_or("max_position_embeddings", max_pos_default)?,
    })
}

/// The same gated MLP (`down(act(gate(h)) * up(h))`) in every layer, as most families have;
/// `fused` marks checkpoints that store gate and up as one `gate_up_proj`.
pub(super) fn gated_mlps(d: &Dims, act: Act, bias: bool, fused: bool) -> Vec<MlpSpec> {
    vec![
        MlpSpec::Gated {
            hidden: d.intermediate,
            act,
            bias,
            fused,
        };
        d.layers
    ]
}

#[allow(clippy::too_many_arguments)]
pub(super) fn spec(
    family: &str,
    d: &Dims,
    norm: NormSpec,
    block: Block,
    qkv: QkvLayout,
    qkv_bias: bool,
    o_bias: bool,
    mlp: Vec<MlpSpec>,
    rope: RopeSpec,
    tie: bool,
) -> ArchSpec {
    ArchSpec {
        family: family.into(),
        vocab: d.vocab,
        hidden: d.hidden,
        layers: d.layers,
        heads: d.heads,
        kv_heads: d.kv_heads,
        head_dim: d.head_dim,
        norm,
        block,
        qkv,
        qkv_bias,
        o_bias,
        clip_qkv: None,
        qk_norm: None,
        sliding_window: None,
        local_layers: None,
        local_rope: None,
        attn_softcap: None,
        final_softcap: None,
        attn_scale: 1.0 / (d.head_dim as f64).sqrt(),
        mlp,
        rope,
        max_positions: d.max_positions,
        embedding_multiplier: 1.0,
        residual_multiplier: 1.0,
        logits_scaling: 1.0,
        tie_embeddings: tie,
        lm_head_bias: false,
        padding_idx: None,
        router_aux_loss_coef: None,
    }
}

/// Aux loss coefficient when the config asks for router logits (`output_router_logits`).
pub(super) fn aux_coef(c: &Cfg, key: &str, default: f64) -> Result<Option<f64>> {
    Ok(if c.bool_or("output_router_logits", false)? {
        Some(c.f64_or(key, default)?)
    } else {
        None
    })
}

pub(super) fn experts_names(
    prefix: &str,
    n: usize,
    gate: &str,
    up: &str,
    down: &str,
) -> ExpertNames {
    ExpertNames::Separate(
        (0..n)
            .map(|e| {
                (
                    LinearNames::new(&format!("{prefix}.experts.{e}.{gate}"), false),
                    LinearNames::new(&format!("{prefix}.experts.{e}.{up}"), false),
                    LinearNames::new(&format!("{prefix}.experts.{e}.{down}"), false),
                )
            })
            .collect(),
    )
}
