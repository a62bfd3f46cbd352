//! What each supported family's config.json means: one function per `model_type` mapping the
//! config onto an `ArchSpec` and transformers' parameter names. Structural choices come from
//! transformers 4.46.3 (docs/FAMILIES.md); features packsft does not compute are rejected with
//! an error that names the field, never ignored.

use serde_json::Value;

use super::spec::*;
use crate::error::{Error, Result};

pub const SUPPORTED: &[&str] = &[
    "llama",
    "mistral",
    "mixtral",
    "granite",
    "dbrx",
    "falcon",
    "gemma",
    "olmo",
    "phi",
    "phi3",
    "qwen2",
    "qwen2_moe",
    "stablelm",
    "starcoder2",
];

/// Typed reads of a config.json object; absent and `null` are the same, as in transformers.
pub struct Cfg<'a> {
    v: &'a Value,
    family: &'a str,
    /// Top-level keys read so far (None for nested objects), to name keys nothing reads.
    read: Option<&'a std::cell::RefCell<std::collections::BTreeSet<String>>>,
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
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::Config(format!("config.json ({}): {msg}", self.family))
    }
    fn get(&self, k: &str) -> Option<&'a Value> {
        if let Some(r) = self.read {
            r.borrow_mut().insert(k.to_string());
        }
        self.v.get(k).filter(|x| !x.is_null())
    }
    fn sub(&self, k: &str) -> Cfg<'a> {
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
    fn reject(&self, cond: bool, msg: impl std::fmt::Display) -> Result<()> {
        if cond {
            return Err(self.err(format!("{msg} is not supported")));
        }
        Ok(())
    }
    /// packsft trains without dropout; a config that asks for it is trained without, and told.
    fn warn_dropout(&self, keys: &[&str]) -> Result<()> {
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
    fn padding_idx(&self, default: Option<usize>) -> Result<Option<u32>> {
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

fn base_inv_freq(theta: f64, dim: usize) -> Vec<f64> {
    (0..dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f64 / dim as f64))
        .collect()
}

/// RoPE with the scaling types of transformers' `ROPE_INIT_FUNCTIONS` that packsft computes:
/// default, linear, llama3. Others are named in the error.
fn rope(cfg: &Cfg, theta: f64, rotary_dim: usize, scaling_allowed: bool) -> Result<RopeSpec> {
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

fn norm_names(prefix: String) -> NormNames {
    NormNames { prefix }
}

/// The Llama-style layer naming shared by most families.
fn llama_layer(l: usize, qkv_bias: bool, o_bias: bool, mlp: MlpNames) -> LayerNames {
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
        mlp,
    }
}

fn gated_names(prefix: &str, bias: bool) -> MlpNames {
    MlpNames::Gated {
        gate: LinearNames::new(&format!("{prefix}.gate_proj"), bias),
        up: LinearNames::new(&format!("{prefix}.up_proj"), bias),
        down: LinearNames::new(&format!("{prefix}.down_proj"), bias),
    }
}

fn llama_names(layers: Vec<LayerNames>, lm_bias: bool) -> ModelNames {
    ModelNames {
        embed: "model.embed_tokens.weight".into(),
        final_norm: norm_names("model.norm".into()),
        lm_head: LinearNames::new("lm_head", lm_bias),
        layers,
    }
}

/// Llama-style names for `layers` layers with a gated `gate/up/down_proj` MLP.
fn llama_gated(layers: usize, qkv_bias: bool, o_bias: bool, mlp_bias: bool) -> ModelNames {
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
struct Dims {
    vocab: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
    max_positions: usize,
}

fn dims(
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

#[allow(clippy::too_many_arguments)]
fn spec(
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
        qk_norm: false,
        sliding_window: None,
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
fn aux_coef(c: &Cfg, key: &str, default: f64) -> Result<Option<f64>> {
    Ok(if c.bool_or("output_router_logits", false)? {
        Some(c.f64_or(key, default)?)
    } else {
        None
    })
}

fn llama_like(c: &Cfg, family: &str) -> Result<(ArchSpec, ModelNames)> {
    let d = dims(c, None, family == "llama", 2048)?;
    let act = act(c, &c.str_or("hidden_act", "silu")?, "hidden_act")?;
    let (ab, mb) = (
        c.bool_or("attention_bias", false)?,
        c.bool_or("mlp_bias", false)?,
    );
    c.warn_dropout(&["attention_dropout"])?;
    let rope = rope(c, c.f64_or("rope_theta", 10000.0)?, d.head_dim, true)?;
    let mlp = vec![
        MlpSpec::Gated {
            hidden: d.intermediate,
            act,
            bias: mb,
            fused: false
        };
        d.layers
    ];
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
    if family == "granite" {
        s.embedding_multiplier = c.f64_or("embedding_multiplier", 1.0)?;
        s.residual_multiplier = c.f64_or("residual_multiplier", 1.0)?;
        s.attn_scale = c.f64_or("attention_multiplier", 1.0)?;
        s.logits_scaling = c.f64_or("logits_scaling", 1.0)?;
    }
    Ok((s, llama_gated(d.layers, ab, ab, mb)))
}

fn mistral(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    let d = dims(c, Some(8), true, 131072)?;
    let act = act(c, &c.str_or("hidden_act", "silu")?, "hidden_act")?;
    c.warn_dropout(&["attention_dropout"])?;
    let rope = rope(c, c.f64_or("rope_theta", 10000.0)?, d.head_dim, false)?;
    let mlp = vec![
        MlpSpec::Gated {
            hidden: d.intermediate,
            act,
            bias: false,
            fused: false
        };
        d.layers
    ];
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

fn experts_names(prefix: &str, n: usize, gate: &str, up: &str, down: &str) -> ExpertNames {
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

fn mixtral(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    let d = dims(c, Some(8), false, 131072)?;
    let act = act(c, &c.str_or("hidden_act", "silu")?, "hidden_act")?;
    c.warn_dropout(&["attention_dropout"])?;
    c.reject(
        c.f64_or("router_jitter_noise", 0.0)? != 0.0,
        "router_jitter_noise != 0",
    )?;
    let rope = rope(c, c.f64_or("rope_theta", 1e6)?, d.head_dim, false)?;
    let (e, k) = (
        c.usize_or("num_local_experts", 8)?,
        c.usize_or("num_experts_per_tok", 2)?,
    );
    c.reject(
        k == 0 || k > e,
        format!("num_experts_per_tok = {k} with {e} experts"),
    )?;
    let moe = MoeSpec {
        experts: e,
        top_k: k,
        expert_hidden: d.intermediate,
        act,
        routing: Routing::Renormalize,
        aux_from_probs: false,
        fused_experts: false,
        shared_expert: None,
    };
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
                    experts: experts_names(&p, e, "w1", "w3", "w2"),
                    shared: None,
                },
            )
        })
        .collect();
    Ok((s, llama_names(layers, false)))
}

fn dbrx(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
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

fn falcon(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    c.reject(c.bool_or("alibi", false)?, "alibi = true")?;
    let hidden = c.usize("hidden_size")?;
    let heads = c.usize("num_attention_heads")?;
    c.reject(
        heads == 0 || hidden % heads != 0,
        format!("hidden_size {hidden} not a multiple of num_attention_heads {heads}"),
    )?;
    let new_arch = c.bool_or("new_decoder_architecture", false)?;
    let parallel = c.bool_or("parallel_attn", true)?;
    let multi_query = c.bool_or("multi_query", true)?;
    let num_ln = c.opt_usize("num_ln_in_parallel_attn")?;
    let (qkv, kv_heads) = if new_arch {
        let kv = c.usize_or("num_kv_heads", heads)?;
        c.reject(
            kv == 0 || heads % kv != 0,
            format!("num_attention_heads {heads} not a multiple of num_kv_heads {kv}"),
        )?;
        (QkvLayout::FusedGrouped, kv)
    } else if multi_query {
        (QkvLayout::FusedConcat, 1)
    } else {
        (QkvLayout::FusedInterleaved, heads)
    };
    let (block, two_norms) = match (new_arch, parallel, num_ln) {
        (true, true, None | Some(2)) => (Block::Parallel { shared_norm: false }, true),
        (true, true, Some(1)) | (false, true, None | Some(1)) => (Block::Parallel { shared_norm: true }, false),
        (false, false, _) => (Block::Sequential, true),
        _ => return Err(c.err(format!("new_decoder_architecture = {new_arch}, parallel_attn = {parallel}, num_ln_in_parallel_attn = {num_ln:?} is not supported"))),
    };
    c.warn_dropout(&["hidden_dropout", "attention_dropout"])?;
    let d = Dims {
        vocab: c.usize("vocab_size")?,
        hidden,
        layers: c.usize("num_hidden_layers")?,
        heads,
        kv_heads,
        head_dim: hidden / heads,
        intermediate: c.usize_or("ffn_hidden_size", 4 * hidden)?,
        max_positions: c.usize_or("max_position_embeddings", 2048)?,
    };
    let bias = c.bool_or("bias", false)?;
    let act = act(c, &c.str_or("activation", "gelu")?, "activation")?;
    let rope = rope(c, c.f64_or("rope_theta", 10000.0)?, d.head_dim, true)?;
    let ln = NormSpec {
        kind: NormKind::LayerNorm { bias: true },
        eps: c.f64_or("layer_norm_epsilon", 1e-5)?,
    };
    let s = spec(
        "falcon",
        &d,
        ln,
        block,
        qkv,
        bias,
        bias,
        vec![
            MlpSpec::Plain {
                hidden: d.intermediate,
                act,
                bias
            };
            d.layers
        ],
        rope,
        c.bool_or("tie_word_embeddings", true)?,
    );
    let layers = (0..d.layers)
        .map(|l| {
            let p = format!("transformer.h.{l}");
            let (n1, n2) = match (two_norms, block) {
                (true, Block::Parallel { .. }) => {
                    (format!("{p}.ln_attn"), Some(format!("{p}.ln_mlp")))
                }
                (true, _) => (
                    format!("{p}.input_layernorm"),
                    Some(format!("{p}.post_attention_layernorm")),
                ),
                (false, _) => (format!("{p}.input_layernorm"), None),
            };
            LayerNames {
                norm1: norm_names(n1),
                norm2: n2.map(norm_names),
                qkv: QkvNames::Fused(LinearNames::new(
                    &format!("{p}.self_attention.query_key_value"),
                    bias,
                )),
                o: LinearNames::new(&format!("{p}.self_attention.dense"), bias),
                q_norm: vec![],
                k_norm: vec![],
                mlp: MlpNames::Plain {
                    fc1: LinearNames::new(&format!("{p}.mlp.dense_h_to_4h"), bias),
                    fc2: LinearNames::new(&format!("{p}.mlp.dense_4h_to_h"), bias),
                },
            }
        })
        .collect();
    Ok((
        s,
        ModelNames {
            embed: "transformer.word_embeddings.weight".into(),
            final_norm: norm_names("transformer.ln_f".into()),
            lm_head: LinearNames::new("lm_head", false),
            layers,
        },
    ))
}

fn gemma(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    let hidden = c.usize("hidden_size")?;
    let heads = c.usize("num_attention_heads")?;
    let kv_heads = c.usize_or("num_key_value_heads", 16)?;
    c.reject(
        heads == 0 || kv_heads == 0 || heads % kv_heads != 0,
        format!("num_attention_heads {heads} not a multiple of num_key_value_heads {kv_heads}"),
    )?;
    let d = Dims {
        vocab: c.usize("vocab_size")?,
        hidden,
        layers: c.usize("num_hidden_layers")?,
        heads,
        kv_heads,
        head_dim: c.usize_or("head_dim", 256)?,
        intermediate: c.usize("intermediate_size")?,
        max_positions: c.usize_or("max_position_embeddings", 8192)?,
    };
    // transformers ignores hidden_act here: hidden_activation, else gelu_pytorch_tanh.
    let act = act(
        c,
        &c.str_or("hidden_activation", "gelu_pytorch_tanh")?,
        "hidden_activation",
    )?;
    let ab = c.bool_or("attention_bias", false)?;
    c.warn_dropout(&["attention_dropout"])?;
    let rope = rope(c, c.f64_or("rope_theta", 10000.0)?, d.head_dim, false)?;
    let mlp = vec![
        MlpSpec::Gated {
            hidden: d.intermediate,
            act,
            bias: false,
            fused: false
        };
        d.layers
    ];
    let mut s = spec(
        "gemma",
        &d,
        NormSpec {
            kind: NormKind::RmsOneOffset,
            eps: c.f64_or("rms_norm_eps", 1e-6)?,
        },
        Block::Sequential,
        QkvLayout::Separate,
        ab,
        ab,
        mlp,
        rope,
        c.bool_or("tie_word_embeddings", true)?,
    );
    s.embedding_multiplier = (hidden as f64).sqrt();
    s.padding_idx = c.padding_idx(Some(0))?;
    Ok((s, llama_gated(d.layers, ab, ab, false)))
}

fn olmo(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
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
    let mlp = vec![
        MlpSpec::Gated {
            hidden: d.intermediate,
            act,
            bias: false,
            fused: false
        };
        d.layers
    ];
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

fn phi(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
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

fn phi3(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
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
    let mlp = vec![
        MlpSpec::Gated {
            hidden: d.intermediate,
            act,
            bias: false,
            fused: true
        };
        d.layers
    ];
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

fn qwen2_common(c: &Cfg, family: &str) -> Result<(Dims, RopeSpec, Act, NormSpec)> {
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

fn qwen2(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    let (d, rope, act, norm) = qwen2_common(c, "qwen2")?;
    let mlp = vec![
        MlpSpec::Gated {
            hidden: d.intermediate,
            act,
            bias: false,
            fused: false
        };
        d.layers
    ];
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

fn qwen2_moe(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
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

fn stablelm(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    let d = dims(c, Some(32), false, 4096)?;
    let act = act(c, &c.str_or("hidden_act", "silu")?, "hidden_act")?;
    c.warn_dropout(&["hidden_dropout", "attention_dropout"])?;
    let rot = (d.head_dim as f64 * c.f64_or("partial_rotary_factor", 0.25)?) as usize;
    let rope = rope(c, c.f64_or("rope_theta", 10000.0)?, rot, true)?;
    let qkv_bias = c.bool_or("use_qkv_bias", false)?;
    let parallel = c.bool_or("use_parallel_residual", false)?;
    let qk_norm = c.bool_or("qk_layernorm", false)?;
    let ln = NormSpec {
        kind: NormKind::LayerNorm { bias: true },
        eps: c.f64_or("layer_norm_eps", 1e-5)?,
    };
    let block = if parallel {
        Block::Parallel { shared_norm: true }
    } else {
        Block::Sequential
    };
    let mlp = vec![
        MlpSpec::Gated {
            hidden: d.intermediate,
            act,
            bias: false,
            fused: false
        };
        d.layers
    ];
    let mut s = spec(
        "stablelm",
        &d,
        ln,
        block,
        QkvLayout::Separate,
        qkv_bias,
        false,
        mlp,
        rope,
        c.bool_or("tie_word_embeddings", false)?,
    );
    s.qk_norm = qk_norm;
    s.padding_idx = c.padding_idx(None)?;
    let layers = (0..d.layers)
        .map(|l| {
            let p = format!("model.layers.{l}.self_attn");
            let mut names = llama_layer(
                l,
                qkv_bias,
                false,
                gated_names(&format!("model.layers.{l}.mlp"), false),
            );
            if parallel {
                names.norm2 = None;
            }
            if qk_norm {
                names.q_norm = (0..d.heads)
                    .map(|h| format!("{p}.q_layernorm.norms.{h}.weight"))
                    .collect();
                names.k_norm = (0..d.kv_heads)
                    .map(|h| format!("{p}.k_layernorm.norms.{h}.weight"))
                    .collect();
            }
            names
        })
        .collect();
    Ok((s, llama_names(layers, false)))
}

fn starcoder2(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    let d = dims(c, Some(2), false, 4096)?;
    let act = act(
        c,
        &c.str_or("hidden_act", "gelu_pytorch_tanh")?,
        "hidden_act",
    )?;
    c.warn_dropout(&["embedding_dropout", "residual_dropout", "attention_dropout"])?;
    let bias = c.bool_or("use_bias", true)?;
    let rope = rope(c, c.f64_or("rope_theta", 10000.0)?, d.head_dim, true)?;
    let ln = NormSpec {
        kind: NormKind::LayerNorm { bias: true },
        eps: c.f64_or("norm_epsilon", 1e-5)?,
    };
    let mut s = spec(
        "starcoder2",
        &d,
        ln,
        Block::Sequential,
        QkvLayout::Separate,
        bias,
        bias,
        vec![
            MlpSpec::Plain {
                hidden: d.intermediate,
                act,
                bias
            };
            d.layers
        ],
        rope,
        c.bool_or("tie_word_embeddings", true)?,
    );
    s.sliding_window = c.opt_usize("sliding_window")?;
    s.padding_idx = c.padding_idx(None)?;
    let layers = (0..d.layers)
        .map(|l| {
            let p = format!("model.layers.{l}.mlp");
            llama_layer(
                l,
                bias,
                bias,
                MlpNames::Plain {
                    fc1: LinearNames::new(&format!("{p}.c_fc"), bias),
                    fc2: LinearNames::new(&format!("{p}.c_proj"), bias),
                },
            )
        })
        .collect();
    Ok((s, llama_names(layers, false)))
}

/// The spec and parameter names of a config.json, dispatched on `model_type`.
pub fn from_config(config: &Value) -> Result<(ArchSpec, ModelNames)> {
    from_config_tracked(config).map(|(s, n, _)| (s, n))
}

/// `from_config`, plus the top-level keys the family reads (for rejecting typos in configs
/// written by hand, such as a recipe's inline `model.config`).
pub fn from_config_tracked(
    config: &Value,
) -> Result<(ArchSpec, ModelNames, std::collections::BTreeSet<String>)> {
    let read = std::cell::RefCell::new(std::collections::BTreeSet::new());
    let mt = config
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("");
    let c = Cfg::new(config, mt, &read);
    let (spec, names) = match mt {
        "llama" | "granite" => llama_like(&c, mt)?,
        "mistral" => mistral(&c)?,
        "mixtral" => mixtral(&c)?,
        "dbrx" => dbrx(&c)?,
        "falcon" => falcon(&c)?,
        "gemma" => gemma(&c)?,
        "olmo" => olmo(&c)?,
        "phi" => phi(&c)?,
        "phi3" => phi3(&c)?,
        "qwen2" => qwen2(&c)?,
        "qwen2_moe" => qwen2_moe(&c)?,
        "stablelm" => stablelm(&c)?,
        "starcoder2" => starcoder2(&c)?,
        other => {
            return Err(Error::Config(format!(
                "config.json: model_type {other:?} is not supported (supported: {})",
                SUPPORTED.join(", ")
            )))
        }
    };
    if spec.hidden == 0 || spec.layers == 0 || spec.vocab == 0 {
        return Err(c.err("vocab_size, hidden size and layer count must be positive"));
    }
    for k in [
        "model_type",
        "architectures",
        "pad_token_id",
        "initializer_range",
        "bos_token_id",
        "eos_token_id",
        "torch_dtype",
        "transformers_version",
        "use_cache",
    ] {
        read.borrow_mut().insert(k.into());
    }
    let keys = read.into_inner();
    Ok((spec, names, keys))
}

/// The `architectures` entry transformers expects for a family.
pub fn architecture(model_type: &str) -> &'static str {
    match model_type {
        "llama" => "LlamaForCausalLM",
        "mistral" => "MistralForCausalLM",
        "mixtral" => "MixtralForCausalLM",
        "granite" => "GraniteForCausalLM",
        "dbrx" => "DbrxForCausalLM",
        "falcon" => "FalconForCausalLM",
        "gemma" => "GemmaForCausalLM",
        "olmo" => "OlmoForCausalLM",
        "phi" => "PhiForCausalLM",
        "phi3" => "Phi3ForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        "qwen2_moe" => "Qwen2MoeForCausalLM",
        "stablelm" => "StableLmForCausalLM",
        "starcoder2" => "Starcoder2ForCausalLM",
        _ => "",
    }
}
