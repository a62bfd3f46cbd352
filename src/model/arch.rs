//! `packsft arch`: what packsft understood of a checkpoint, read from its config.json and the
//! safetensors headers (no weights are loaded).

use std::fmt;
use std::path::Path;

use super::families;
use super::spec::{ArchSpec, Block, MlpSpec, NormKind, QkNorm, QkvLayout};
use super::weights::CheckpointWeights;
use super::weights::CONFIG_FILE;
use crate::error::{Error, Result};

/// What `packsft arch` prints: the spec a checkpoint's config.json maps to, and its size.
pub struct ArchReport {
    /// Every structural choice of the decoder.
    pub spec: ArchSpec,
    /// Parameters in the checkpoint's tensors (None without weights).
    pub n_params: Option<usize>,
    /// Tensors in the checkpoint (None without weights).
    pub n_tensors: Option<usize>,
}

/// The report of the checkpoint in `dir`, from its config.json and safetensors headers.
pub fn describe(dir: &Path) -> Result<ArchReport> {
    let p = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::model(&p, format!("invalid JSON at line {}: {e}", e.line())))?;
    let (spec, _) = families::from_config(&v).map_err(|e| Error::model(&p, e.to_string()))?;
    // Without weights (a config alone) the report is the config's; weights that are present
    // must open and agree with it, or `arch` would describe a checkpoint that cannot load.
    let has_weights = dir.join(super::weights::WEIGHTS_FILE).exists()
        || dir.join(super::weights::WEIGHTS_INDEX_FILE).exists();
    let (n_params, n_tensors) = if has_weights {
        let shapes = CheckpointWeights::open(dir)?.shapes();
        super::decoder::DecoderModel::check_checkpoint(dir)?;
        (
            Some(shapes.iter().map(|s| s.iter().product::<usize>()).sum()),
            Some(shapes.len()),
        )
    } else {
        (None, None)
    };
    Ok(ArchReport {
        spec,
        n_params,
        n_tensors,
    })
}

impl fmt::Display for ArchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.spec;
        writeln!(f, "family          {}", s.family)?;
        if let (Some(n), Some(t)) = (self.n_params, self.n_tensors) {
            writeln!(f, "parameters      {n} in {t} tensors")?;
        }
        writeln!(f, "vocab / hidden  {} / {}", s.vocab, s.hidden)?;
        writeln!(f, "layers          {}", s.layers)?;
        let kind = if s.kv_heads == s.heads {
            "MHA"
        } else if s.kv_heads == 1 {
            "MQA"
        } else {
            "GQA"
        };
        writeln!(
            f,
            "attention       {} heads, {} kv heads ({kind}), head_dim {}, scale {:.6}",
            s.heads, s.kv_heads, s.head_dim, s.attn_scale
        )?;
        let qkv = qkv_desc(s.qkv);
        writeln!(
            f,
            "projections     {qkv}; qkv bias {}, output bias {}",
            s.qkv_bias, s.o_bias
        )?;
        writeln!(
            f,
            "clip_qkv        {}",
            s.clip_qkv.map_or("none".into(), |c| c.to_string())
        )?;
        write_attention_extras(f, s)?;
        let long = if s.rope.long.is_some() {
            ", LongRoPE"
        } else {
            ""
        };
        let local = match &s.local_rope {
            Some(r) => format!(" (local layers: theta {})", r.theta),
            None => String::new(),
        };
        writeln!(
            f,
            "rope            theta {}, rotary dim {} of {}{long}{local}",
            s.rope.theta, s.rope.rotary_dim, s.head_dim
        )?;
        let norm = match s.norm.kind {
            NormKind::Rms => "RMSNorm".to_string(),
            NormKind::RmsOneOffset => "RMSNorm (1 + w)".to_string(),
            NormKind::LayerNorm { bias } => {
                format!("LayerNorm{}", if bias { "" } else { " without bias" })
            }
            NormKind::NonParametric => "LayerNorm without parameters".to_string(),
        };
        writeln!(f, "norm            {norm}, eps {}", s.norm.eps)?;
        let block = match s.block {
            Block::Sequential => "sequential",
            Block::Parallel { shared_norm: true } => "parallel attention + MLP, one shared norm",
            Block::Parallel { shared_norm: false } => "parallel attention + MLP, two norms",
            Block::PostNorm => "norms after attention and after the MLP (none before)",
            Block::Sandwich => "norms before and after attention and the MLP",
        };
        writeln!(f, "residual        {block}")?;
        write_mlp_runs(f, &s.mlp)?;
        writeln!(
            f,
            "multipliers     embedding {}, residual {}, logits / {}",
            s.embedding_multiplier, s.residual_multiplier, s.logits_scaling
        )?;
        writeln!(
            f,
            "lm head         {}{}",
            if s.tie_embeddings {
                "tied to the embedding"
            } else {
                "separate"
            },
            if s.lm_head_bias { ", with bias" } else { "" }
        )?;
        writeln!(
            f,
            "padding_idx     {}",
            s.padding_idx.map_or("none".into(), |p| p.to_string())
        )?;
        writeln!(
            f,
            "router aux loss {}",
            s.router_aux_loss_coef
                .map_or("off".into(), |c| format!("coefficient {c}"))
        )?;
        writeln!(f, "max positions   {}", s.max_positions)
    }
}

/// The attention's per-family extras: q/k norms, sliding windows (and which layers have
/// them), soft-capping.
fn write_attention_extras(f: &mut fmt::Formatter<'_>, s: &ArchSpec) -> fmt::Result {
    writeln!(
        f,
        "qk norm         {}",
        match s.qk_norm {
            Some(QkNorm::PerHeadLayerNorm) => "per-head layer norm",
            Some(QkNorm::SharedRms) => "RMS norm over head_dim, one weight for every head",
            Some(QkNorm::WholeRms) => "RMS norm over the whole projection (all heads)",
            Some(QkNorm::SharedRmsOneOffset) => {
                "RMS norm (1 + w) over head_dim, one weight for every head"
            }
            None => "none",
        }
    )?;
    let window = match (s.sliding_window, &s.local_layers) {
        (None, _) => "none".to_string(),
        (Some(w), None) => format!("{w} keys"),
        (Some(w), Some(local)) => {
            let ids: Vec<String> = (local.iter().enumerate())
                .filter(|(_, &is)| is)
                .map(|(l, _)| l.to_string())
                .collect();
            format!(
                "{w} keys in the local layers ({}), none in the others",
                ids.join(", ")
            )
        }
    };
    writeln!(f, "sliding window  {window}")?;
    let cap = |c: Option<f64>| c.map_or("none".into(), |c| format!("{c} tanh(x / {c})"));
    writeln!(
        f,
        "soft-capping    attention scores {}, logits {}",
        cap(s.attn_softcap),
        cap(s.final_softcap)
    )?;
    Ok(())
}

/// One line per run of layers with the same MLP.
fn write_mlp_runs(f: &mut fmt::Formatter<'_>, mlp: &[MlpSpec]) -> fmt::Result {
    let mut i = 0;
    while i < mlp.len() {
        let j = (i..mlp.len())
            .take_while(|&j| mlp[j] == mlp[i])
            .last()
            .unwrap_or(i);
        let desc = match &mlp[i] {
            MlpSpec::Gated {
                hidden,
                act,
                bias,
                fused,
            } => format!(
                "gated {act:?}, width {hidden}, bias {bias}{}",
                if *fused { ", fused gate_up" } else { "" }
            ),
            MlpSpec::Plain { hidden, act, bias } => {
                format!("plain {act:?}, width {hidden}, bias {bias}")
            }
            MlpSpec::Moe(m) => format!(
                "MoE {} experts top-{} ({:?} routing), expert width {}{}",
                m.experts,
                m.top_k,
                m.routing,
                m.expert_hidden,
                m.shared_expert.map_or(String::new(), |w| format!(
                    ", shared expert width {w} with sigmoid gate"
                ))
            ),
        };
        writeln!(
            f,
            "mlp layers {i}-{j}{:width$}{desc}",
            "",
            width = 5usize.saturating_sub(format!("{i}-{j}").len())
        )?;
        i = j + 1;
    }
    Ok(())
}

/// The layout of the q/k/v projections, in words.
fn qkv_desc(q: QkvLayout) -> &'static str {
    match q {
        QkvLayout::Separate => "separate q/k/v",
        QkvLayout::FusedConcat => "fused [q | k | v]",
        QkvLayout::FusedGrouped => "fused, grouped per kv head (falcon new arch)",
        QkvLayout::FusedInterleaved => "fused, interleaved per head",
    }
}

/// What a LoRA configuration adapts in a checkpoint (`packsft arch --lora-...`), from its
/// config.json and safetensors headers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoraReport {
    /// Module paths with an adapter, in model order.
    pub targets: Vec<String>,
    /// alpha / r (or alpha / √r).
    pub scaling: f64,
    /// Adapter parameters plus fully trained (`modules_to_save`) ones.
    pub trainable: usize,
    /// The base's parameters plus the adapters'.
    pub total: usize,
}

/// The modules `cfg` adapts in the checkpoint in `dir` and the trainable parameter count, as
/// training would build them (the same target rule), without loading a weight.
pub fn describe_lora(dir: &Path, cfg: &super::lora::LoraConfig) -> Result<LoraReport> {
    use super::lora;
    let p = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::model(&p, format!("invalid JSON at line {}: {e}", e.line())))?;
    let (spec, names) = families::from_config(&v).map_err(|e| Error::model(&p, e.to_string()))?;
    cfg.validate()?;
    let model_type = v["model_type"].as_str().unwrap_or_default();
    let lm_head = names
        .lm_head
        .weight
        .strip_suffix(".weight")
        .unwrap_or_default();
    let targets = lora::resolve_targets(
        cfg,
        model_type,
        &names.linear_modules(),
        (!spec.tie_embeddings).then_some(lm_head),
    )?;
    let w = CheckpointWeights::open(dir)?;
    let base: usize = w.shapes().iter().map(|s| s.iter().product::<usize>()).sum();
    let mut adapters = 0;
    for m in &targets {
        let s = w.shapes_of(&format!("{m}.weight"))?;
        adapters += cfg.r * (s[0] + s[1]);
    }
    let mut saved = 0;
    for n in w.names() {
        let module = n.rsplit_once('.').map(|(m, _)| m).unwrap_or(n);
        if lora::module_matches(module, &cfg.modules_to_save) {
            saved += w.shapes_of(n)?.iter().product::<usize>();
        }
    }
    Ok(LoraReport {
        targets,
        scaling: cfg.scaling(),
        trainable: adapters + saved,
        total: base + adapters,
    })
}

impl fmt::Display for LoraReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut leaves: Vec<(&str, usize)> = Vec::new();
        for m in &self.targets {
            let l = super::lora::leaf(m);
            match leaves.iter_mut().find(|(n, _)| *n == l) {
                Some((_, c)) => *c += 1,
                None => leaves.push((l, 1)),
            }
        }
        let list: Vec<String> = leaves.iter().map(|(n, c)| format!("{n} x{c}")).collect();
        writeln!(
            f,
            "lora targets    {} modules: {}",
            self.targets.len(),
            list.join(", ")
        )?;
        writeln!(f, "lora scaling    {}", self.scaling)?;
        writeln!(
            f,
            "trainable       {} of {} parameters ({:.3}%)",
            self.trainable,
            self.total,
            100.0 * self.trainable as f64 / self.total.max(1) as f64
        )
    }
}
