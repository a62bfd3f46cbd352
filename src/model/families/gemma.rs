//! Gemma (transformers 4.46.3 `modeling_gemma.py`): RMSNorm with a one offset, scaled
//! embeddings, GELU-tanh. Gemma 2 and Gemma 3's text decoder (4.51.3 `modeling_gemma2.py`,
//! `modeling_gemma3.py`): the same with norms before and after attention and the MLP
//! (`Block::Sandwich`), `query_pre_attn_scalar` for the score scale, local layers attending
//! within `sliding_window` beside global ones; Gemma 2 soft-caps attention scores and logits,
//! Gemma 3 norms q and k per head and gives its local layers their own RoPE base.

use serde_json::Value;

use super::super::spec::*;
use super::common::*;
use crate::error::Result;

pub(super) fn gemma(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    let (d, act, ab) = gemma_common(c, 16, 8192)?;
    let rope = rope(c, c.f64_or("rope_theta", 10000.0)?, d.head_dim, false)?;
    let mlp = gated_mlps(&d, act, false, false);
    let mut s = spec(
        "gemma",
        &d,
        gemma_norm(c)?,
        Block::Sequential,
        QkvLayout::Separate,
        ab,
        ab,
        mlp,
        rope,
        c.bool_or("tie_word_embeddings", true)?,
    );
    s.embedding_multiplier = (d.hidden as f64).sqrt();
    s.padding_idx = c.padding_idx(Some(0))?;
    Ok((s, llama_gated(d.layers, ab, ab, false)))
}

/// Gemma 2: even layers local, attention scores and logits soft-capped (50 and 30 unless the
/// config says otherwise; null turns either off).
pub(super) fn gemma2(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    let (d, act, ab) = gemma_common(c, 4, 8192)?;
    let rope = rope(c, c.f64_or("rope_theta", 10000.0)?, d.head_dim, true)?;
    let mut s = sandwich(c, "gemma2", &d, act, ab, rope)?;
    s.attn_softcap = softcap(c, "attn_logit_softcapping", Some(50.0))?;
    s.final_softcap = softcap(c, "final_logit_softcapping", Some(30.0))?;
    s.local_layers = Some((0..d.layers).map(|l| l % 2 == 0).collect());
    Ok((s, sandwich_names(d.layers, ab)))
}

/// Gemma 3's text decoder: every `sliding_window_pattern`-th layer global, the others local
/// with RoPE base `rope_local_base_freq` and no scaling (the global layers take `rope_theta`
/// and `rope_scaling`); q and k normed per head; soft-capping off unless the config sets it.
pub(super) fn gemma3_text(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
    let (d, act, ab) = gemma_common(c, 4, 131072)?;
    let rope = rope(c, c.f64_or("rope_theta", 1e6)?, d.head_dim, true)?;
    let mut s = sandwich(c, "gemma3_text", &d, act, ab, rope)?;
    s.attn_softcap = softcap(c, "attn_logit_softcapping", None)?;
    s.final_softcap = softcap(c, "final_logit_softcapping", None)?;
    let pattern = c.usize_or("sliding_window_pattern", 6)?;
    c.reject(pattern == 0, "sliding_window_pattern = 0")?;
    s.local_layers = Some((0..d.layers).map(|l| (l + 1) % pattern != 0).collect());
    let local_theta = c.f64_or("rope_local_base_freq", 10000.0)?;
    s.local_rope = Some(RopeSpec {
        theta: local_theta,
        rotary_dim: d.head_dim,
        inv_freq: (base_inv_freq(local_theta, d.head_dim).into_iter())
            .map(|x| x as f32)
            .collect(),
        long: None,
        attention_factor: 1.0,
    });
    s.qk_norm = Some(QkNorm::SharedRmsOneOffset);
    let mut names = sandwich_names(d.layers, ab);
    for (l, layer) in names.layers.iter_mut().enumerate() {
        let p = format!("model.layers.{l}.self_attn");
        layer.q_norm = vec![format!("{p}.q_norm.weight")];
        layer.k_norm = vec![format!("{p}.k_norm.weight")];
    }
    Ok((s, names))
}

/// Sizes (head_dim its own key, 256 by default), activation (`hidden_activation`; transformers
/// ignores `hidden_act` here) and attention bias of every Gemma.
fn gemma_common(c: &Cfg, kv_default: usize, max_pos: usize) -> Result<(Dims, Act, bool)> {
    let hidden = c.usize("hidden_size")?;
    let heads = c.usize("num_attention_heads")?;
    let kv_heads = c.usize_or("num_key_value_heads", kv_default)?;
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
        max_positions: c.usize_or("max_position_embeddings", max_pos)?,
    };
    let act = act(
        c,
        &c.str_or("hidden_activation", "gelu_pytorch_tanh")?,
        "hidden_activation",
    )?;
    c.warn_dropout(&["attention_dropout"])?;
    Ok((d, act, c.bool_or("attention_bias", false)?))
}

fn gemma_norm(c: &Cfg) -> Result<NormSpec> {
    Ok(NormSpec {
        kind: NormKind::RmsOneOffset,
        eps: c.f64_or("rms_norm_eps", 1e-6)?,
    })
}

/// What Gemma 2 and 3 share: the sandwich block, the score scale
/// `query_pre_attn_scalar ^ -1/2`, the window of the local layers.
fn sandwich(
    c: &Cfg,
    family: &str,
    d: &Dims,
    act: Act,
    ab: bool,
    rope: RopeSpec,
) -> Result<ArchSpec> {
    let mlp = gated_mlps(d, act, false, false);
    let tie = c.bool_or("tie_word_embeddings", true)?;
    let norm = gemma_norm(c)?;
    let mut s = spec(
        family,
        d,
        norm,
        Block::Sandwich,
        QkvLayout::Separate,
        ab,
        ab,
        mlp,
        rope,
        tie,
    );
    s.embedding_multiplier = (d.hidden as f64).sqrt();
    s.padding_idx = c.padding_idx(Some(0))?;
    let scalar = c.f64_or("query_pre_attn_scalar", 256.0)?;
    c.reject(scalar <= 0.0, format!("query_pre_attn_scalar = {scalar}"))?;
    s.attn_scale = scalar.powf(-0.5);
    s.sliding_window = Some(c.usize_or("sliding_window", 4096)?);
    c.reject(s.sliding_window == Some(0), "sliding_window = 0")?;
    // Read for the typo check: how transformers caches keys when generating.
    let _ = c.get("cache_implementation");
    Ok(s)
}

/// A soft-capping value: `default` when the key is absent, off when it is null; a value that
/// is not positive is an error (it would divide by zero or flip the scores).
fn softcap(c: &Cfg, key: &str, default: Option<f64>) -> Result<Option<f64>> {
    let _ = c.get(key); // read: a null here is meaningful
    let cap = match c.v.get(key) {
        None => default,
        Some(Value::Null) => None,
        Some(_) => c.opt_f64(key)?,
    };
    if let Some(x) = cap.filter(|&x| x <= 0.0 || !x.is_finite()) {
        return Err(c.err(format!("{key} = {x} (must be positive, or null for none)")));
    }
    Ok(cap)
}

/// Llama's names with the sandwich's four norms: `input_layernorm` and
/// `pre_feedforward_layernorm` before, `post_attention_layernorm` and
/// `post_feedforward_layernorm` after.
fn sandwich_names(layers: usize, ab: bool) -> ModelNames {
    let mut names = llama_gated(layers, ab, ab, false);
    for (l, layer) in names.layers.iter_mut().enumerate() {
        let p = format!("model.layers.{l}");
        layer.norm2 = Some(norm_names(format!("{p}.pre_feedforward_layernorm")));
        layer.post_norms = Some((
            norm_names(format!("{p}.post_attention_layernorm")),
            norm_names(format!("{p}.post_feedforward_layernorm")),
        ));
    }
    names
}
