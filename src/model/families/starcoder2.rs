//! StarCoder2 (transformers 4.46.3 `modeling_starcoder2.py`): LayerNorm, biases, plain GELU MLP, sliding window.

use super::super::spec::*;
use super::common::*;
use crate::error::Result;

pub(super) fn starcoder2(c: &Cfg) -> Result<(ArchSpec, ModelNames)> {
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
