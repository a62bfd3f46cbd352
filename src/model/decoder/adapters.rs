//! LoRA on the decoder: the setup (`LoraSetup`), the state a model with adapters keeps (the
//! configuration, the modules adapted, the frozen base, the dropout stream's position), the
//! checks made before any weight is read, and the adapter files `save` writes and
//! `load_params` reads (PEFT's). The adapters themselves live on the linear layers
//! (`parts.rs`, `Lin::lora`); their forward and backward are the layers' (`parts.rs`,
//! `backward.rs`).

use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::Value;

use super::super::lora::{self, LoraConfig, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
use super::super::spec::{ArchSpec, ModelNames};
use super::super::weights::{save_safetensors, CheckpointWeights};
use super::super::{Model, Param};
use super::init::LoraBuild;
use super::parts::{Layer, Qkv};
use super::{parts, DecoderModel};
use crate::error::{Error, Result};

/// A decoder's LoRA adapters: `params` holds only the adapters (and `modules_to_save`).
pub(super) struct LoraState {
    pub(super) cfg: LoraConfig,
    /// Module paths with an adapter, in model order.
    pub(super) targeted: Vec<String>,
    /// The frozen base tensors by Hugging Face name.
    pub(super) frozen: Vec<(String, Tensor)>,
    /// `base_model_name_or_path` of the adapter files written.
    pub(super) base_model: String,
    /// Training forward/backward passes so far: with the seed, the key of the dropout masks.
    pub(super) calls: std::sync::atomic::AtomicU64,
}

/// How a decoder is fine-tuned with LoRA: the adapters' configuration and the dtype its frozen
/// matrices are kept in (bfloat16 for bf16 compute: no float32 copy, no gradient, no
/// optimizer state for them).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSetup {
    /// The adapters: rank, scaling, targets, dropout, and an adapter to continue.
    pub config: LoraConfig,
    /// The dtype of the frozen weight matrices (norms and biases stay float32).
    pub frozen_dtype: DType,
}

/// The file a LoRA checkpoint keeps its dropout stream's position in (only with dropout).
const DROPOUT_STATE_FILE: &str = "lora_dropout_state.json";

/// Checks a LoRA setup against the family's linear modules before any weight is read, and
/// resolves its targets.
pub(super) fn lora_build(
    setup: &LoraSetup,
    model_type: &str,
    spec: &ArchSpec,
    names: &ModelNames,
) -> Result<LoraBuild> {
    use rand::SeedableRng;
    let cfg = &setup.config;
    cfg.validate()?;
    let lm_head = names
        .lm_head
        .weight
        .strip_suffix(".weight")
        .unwrap_or_default();
    let selected = lora::resolve_targets(
        cfg,
        model_type,
        &names.linear_modules(),
        (!spec.tie_embeddings).then_some(lm_head),
    )?;
    if spec.tie_embeddings {
        let tied: Vec<String> = [&names.embed, &names.lm_head.weight]
            .iter()
            .map(|n| {
                n.rsplit_once('.')
                    .map(|(m, _)| m.to_string())
                    .unwrap_or_default()
            })
            .collect();
        if let Some(m) = cfg.modules_to_save.iter().find(|m| {
            tied.iter()
                .any(|t| lora::module_matches(t, &[m.to_string()]))
        }) {
            return Err(Error::Config(format!(
                "lora.modules_to_save: `{m}` is tied to the other of embed_tokens / lm_head in this \
                 model (tie_word_embeddings); training one copy would untie them"
            )));
        }
    }
    let adapter = match &cfg.adapter {
        Some(dir) => Some(CheckpointWeights::open_file(
            &dir.join(ADAPTER_WEIGHTS_FILE),
        )?),
        None => None,
    };
    Ok(LoraBuild {
        cfg: cfg.clone(),
        selected: selected.into_iter().collect(),
        adapter,
        rng: rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed),
        frozen_dtype: setup.frozen_dtype,
        targeted: Vec::new(),
    })
}

/// The LoRA state of a built model; every tensor of a continued adapter must have been used
/// and every `modules_to_save` entry must name a module.
pub(super) fn lora_finish(
    l: LoraBuild,
    frozen: Vec<(String, Tensor)>,
    params: &[Param],
) -> Result<LoraState> {
    if let Some(w) = &l.adapter {
        if let Some(extra) = w.unused().first() {
            return Err(Error::Config(format!(
                "adapter tensor `{extra}` matches no module this configuration adapts or saves"
            )));
        }
    }
    for m in &l.cfg.modules_to_save {
        let hit = params.iter().any(|p| {
            let n = p.name.strip_prefix(lora::PEFT_PREFIX).unwrap_or(&p.name);
            let module = n.rsplit_once('.').map(|(m, _)| m).unwrap_or(n);
            lora::module_matches(module, std::slice::from_ref(m))
        });
        if !hit {
            return Err(Error::Config(format!(
                "lora.modules_to_save: `{m}` matches no module of the model"
            )));
        }
    }
    Ok(LoraState {
        cfg: l.cfg,
        targeted: l.targeted,
        frozen,
        base_model: String::new(),
        calls: std::sync::atomic::AtomicU64::new(0),
    })
}

impl DecoderModel {
    /// The LoRA configuration, if the model trains adapters.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref().map(|l| &l.cfg)
    }

    /// Module paths with a LoRA adapter (empty for full fine-tuning).
    pub fn lora_targets(&self) -> &[String] {
        self.lora
            .as_ref()
            .map(|l| l.targeted.as_slice())
            .unwrap_or(&[])
    }

    /// The frozen base tensors by Hugging Face name (empty for full fine-tuning).
    pub fn frozen_tensors(&self) -> Vec<(String, Tensor)> {
        self.lora
            .as_ref()
            .map(|l| l.frozen.clone())
            .unwrap_or_default()
    }

    /// Sets `base_model_name_or_path` of the adapter files `save` writes (a Hub id, say).
    pub fn set_base_model_name(&mut self, name: &str) {
        if let Some(l) = &mut self.lora {
            l.base_model = name.to_string();
        }
    }

    /// (trainable, total) parameter counts: with LoRA, adapters (and saved modules) against
    /// everything, the frozen base included.
    pub fn param_counts(&self) -> (usize, usize) {
        let trainable: usize = self.params.iter().map(|p| p.var.elem_count()).sum();
        let frozen: usize = self
            .lora
            .as_ref()
            .map(|l| l.frozen.iter().map(|(_, t)| t.elem_count()).sum())
            .unwrap_or(0);
        (trainable, trainable + frozen)
    }

    /// The adapter files (PEFT's): `adapter_config.json` and `adapter_model.safetensors`, and,
    /// with dropout, the position of the dropout stream (for a bit-exact resume).
    pub(super) fn save_adapter(&self, l: &LoraState, dir: &Path) -> Result<()> {
        crate::io::write_atomic(
            &dir.join(ADAPTER_CONFIG_FILE),
            l.cfg
                .adapter_config_json(&l.targeted, &l.base_model)
                .as_bytes(),
        )?;
        if !l.cfg.modules_to_save.is_empty() {
            tracing::warn!(
                "the adapter in {} holds modules_to_save ({}): PEFT loads it, vLLM refuses it                  (merge it with `packsft merge` to serve it)",
                dir.display(),
                l.cfg.modules_to_save.join(", ")
            );
        }
        if l.cfg.dropout > 0.0 {
            let calls = l.calls.load(std::sync::atomic::Ordering::SeqCst);
            crate::io::write_atomic(
                &dir.join(DROPOUT_STATE_FILE),
                serde_json::json!({ "forward_backward_calls": calls })
                    .to_string()
                    .as_bytes(),
            )?;
        }
        save_safetensors(&self.tensors(), &dir.join(ADAPTER_WEIGHTS_FILE))
    }

    /// Loads the adapter (and saved modules) a LoRA checkpoint in `dir` holds, names and
    /// shapes checked first, as `Model::load_params` does for full checkpoints.
    pub(super) fn load_adapter(&self, l: &LoraState, dir: &Path) -> Result<()> {
        let path = dir.join(ADAPTER_WEIGHTS_FILE);
        let mut w = CheckpointWeights::open_file(&path)?;
        let loaded = super::super::read_params(&self.params, &mut w, &path)?;
        let state = dir.join(DROPOUT_STATE_FILE);
        let calls = if state.is_file() {
            let text = std::fs::read_to_string(&state).map_err(|e| Error::io(&state, e))?;
            serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["forward_backward_calls"].as_u64())
                .ok_or_else(|| Error::model(&state, "no integer forward_backward_calls"))?
        } else {
            0
        };
        for (p, t) in self.params.iter().zip(loaded) {
            p.var.set(&t)?;
        }
        l.calls.store(calls, std::sync::atomic::Ordering::SeqCst);
        self.set_compute_copies_fresh(false);
        Ok(())
    }
}

/// Sets the dropout key of LoRA adapters for one training forward/backward and clears it after.
pub(super) struct DropoutKey;

impl DropoutKey {
    pub(super) fn set(model: &DecoderModel) -> Option<Self> {
        let l = model.lora.as_ref().filter(|l| l.cfg.dropout > 0.0)?;
        let call = l.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        parts::DROPOUT_KEY.with(|k| k.set(Some((l.cfg.seed, call))));
        Some(DropoutKey)
    }
}

impl Drop for DropoutKey {
    fn drop(&mut self) {
        parts::DROPOUT_KEY.with(|k| k.set(None));
    }
}

/// Under LoRA, stacks each layer's frozen q, k and v weights by rows where the hand-written
/// layer can take one product for the three (nothing between projection and a whole-head
/// rotation, adapters on all three or none, no adapter dropout): the layer keeps the stack and
/// q, k and v become views of it, as do their entries in `frozen` (no second copy).
pub(super) fn stack_frozen_qkv(
    spec: &ArchSpec,
    layers: &mut [Layer],
    frozen: &mut [(String, Tensor)],
) -> Result<()> {
    let plain_rope = spec.clip_qkv.is_none() && spec.rope.rotary_dim == spec.head_dim;
    for layer in layers.iter_mut() {
        let Qkv::Separate(q, k, v) = &mut layer.qkv else {
            continue;
        };
        let lins = [&*q, &*k, &*v];
        let n_adapters = lins.iter().filter(|l| l.lora.is_some()).count();
        let stackable = plain_rope
            && layer.q_norm.is_empty()
            && lins
                .iter()
                .all(|l| !l.w.is_variable() && l.w.dtype() == q.w.dtype())
            && lins.iter().all(|l| l.w.dim(1).ok() == q.w.dim(1).ok())
            && (n_adapters == 0 || n_adapters == 3)
            && lins
                .iter()
                .filter_map(|l| l.lora.as_ref())
                .all(|a| a.dropout == 0.0 && Some(a.scale) == q.lora.as_ref().map(|x| x.scale));
        if !stackable {
            continue;
        }
        let stacked = Tensor::cat(&[&q.w, &k.w, &v.w], 0)?;
        let mut row = 0;
        for lin in [&mut *q, &mut *k, &mut *v] {
            let rows = lin.w.dim(0)?;
            let view = stacked.narrow(0, row, rows)?;
            if let Some(entry) = frozen.iter_mut().find(|(_, t)| t.id() == lin.w.id()) {
                entry.1 = view.clone();
            }
            lin.w = view;
            row += rows;
        }
        layer.frozen_qkv = Some(stacked);
    }
    Ok(())
}
