//! The Llama architecture (Llama 2 and 3) with per-token `position_ids` and attention that
//! honours sequence boundaries. Parameters keep transformers' names and layouts, so loading
//! and saving are plain safetensors reads and writes.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::weights::{save_safetensors, CheckpointWeights, WEIGHTS_FILE};
use super::{LossSum, Model, Param};
use crate::attention::{eager_attention, AttnPlan};
use crate::collator::{Batch, SeqLayout};
use crate::error::{Error, Result};
use crate::ops::{apply_rope, nll_sum, rms_norm, silu, RopeTable};

pub const CONFIG_FILE: &str = "config.json";

fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10000.0
}
fn default_max_pos() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}
fn default_init() -> f64 {
    0.02
}

/// The fields of a Llama `config.json` that shape the computation. Unknown fields are kept
/// verbatim by the loader and written back on save.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<serde_json::Value>,
}

impl LlamaConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// Rejects what this implementation does not compute, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("config.json: {m}")));
        if self.hidden_act != "silu" {
            return bad(format!(
                "hidden_act = {:?} is not supported for llama (only \"silu\")",
                self.hidden_act
            ));
        }
        if self.num_attention_heads == 0 || self.kv_heads() == 0 {
            return bad("num_attention_heads and num_key_value_heads must be positive".into());
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            return bad(format!(
                "num_attention_heads = {} is not a multiple of num_key_value_heads = {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if self.head_dim() % 2 != 0 {
            return bad(format!(
                "head_dim = {} must be even for rotary embeddings",
                self.head_dim()
            ));
        }
        if let Some(kind) = self.rope_scaling_kind()? {
            if !matches!(kind.as_str(), "default" | "linear" | "llama3") {
                return bad(format!(
                    "rope_scaling type {kind:?} is not supported (supported: default, linear, llama3)"
                ));
            }
        }
        Ok(())
    }

    fn rope_scaling_kind(&self) -> Result<Option<String>> {
        let Some(rs) = &self.rope_scaling else {
            return Ok(None);
        };
        if rs.is_null() {
            return Ok(None);
        }
        let kind = rs
            .get("rope_type")
            .or_else(|| rs.get("type"))
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::Config("config.json: rope_scaling has no `rope_type`".into()))?;
        Ok(Some(kind.to_string()))
    }

    fn scaling_f64(&self, key: &str) -> Result<f64> {
        self.rope_scaling
            .as_ref()
            .and_then(|r| r.get(key))
            .and_then(|v| v.as_f64())
            .ok_or_else(|| {
                Error::Config(format!("config.json: rope_scaling needs a number `{key}`"))
            })
    }

    /// Inverse frequencies of the rotary embedding, with Llama-3 / linear scaling applied
    /// exactly as transformers' `ROPE_INIT_FUNCTIONS` compute them.
    pub fn inv_freq(&self) -> Result<Vec<f32>> {
        let dim = self.head_dim();
        let base: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / dim as f64))
            .collect();
        let scaled = match self.rope_scaling_kind()?.as_deref() {
            None | Some("default") => base,
            Some("linear") => {
                let f = self.scaling_f64("factor")?;
                base.iter().map(|x| x / f).collect()
            }
            Some("llama3") => {
                let factor = self.scaling_f64("factor")?;
                let lo = self.scaling_f64("low_freq_factor")?;
                let hi = self.scaling_f64("high_freq_factor")?;
                let old = self.scaling_f64("original_max_position_embeddings")?;
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
                return Err(Error::Config(format!(
                    "config.json: rope_scaling type {other:?} is not supported"
                )))
            }
        };
        Ok(scaled.into_iter().map(|x| x as f32).collect())
    }
}

struct Linear {
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    /// x (N, in) → (N, out)
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.w.t()?)?;
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    ln1: Tensor,
    ln2: Tensor,
}

pub struct LlamaModel {
    pub config: LlamaConfig,
    /// config.json as read (unknown fields kept), written back on save.
    raw_config: serde_json::Value,
    params: Vec<Param>,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    rope: RopeTable,
    device: Device,
    dtype: DType,
}

/// (name, shape, is_matrix) of every parameter in transformers' order.
fn param_specs(c: &LlamaConfig) -> Vec<(String, Vec<usize>, bool)> {
    let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
    let (qd, kvd) = (
        c.num_attention_heads * c.head_dim(),
        c.kv_heads() * c.head_dim(),
    );
    let mut specs = vec![("model.embed_tokens.weight".to_string(), vec![v, h], true)];
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let lin = |specs: &mut Vec<_>, name: &str, out: usize, inp: usize, bias: bool| {
            specs.push((format!("{p}.{name}.weight"), vec![out, inp], true));
            if bias {
                specs.push((format!("{p}.{name}.bias"), vec![out], false));
            }
        };
        lin(&mut specs, "self_attn.q_proj", qd, h, c.attention_bias);
        lin(&mut specs, "self_attn.k_proj", kvd, h, c.attention_bias);
        lin(&mut specs, "self_attn.v_proj", kvd, h, c.attention_bias);
        lin(&mut specs, "self_attn.o_proj", h, qd, c.attention_bias);
        lin(&mut specs, "mlp.gate_proj", i, h, c.mlp_bias);
        lin(&mut specs, "mlp.up_proj", i, h, c.mlp_bias);
        lin(&mut specs, "mlp.down_proj", h, i, c.mlp_bias);
        specs.push((format!("{p}.input_layernorm.weight"), vec![h], false));
        specs.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            false,
        ));
    }
    specs.push(("model.norm.weight".to_string(), vec![h], false));
    if !c.tie_word_embeddings {
        specs.push(("lm_head.weight".to_string(), vec![v, h], true));
    }
    specs
}

/// Standard normal samples from a seeded ChaCha stream (Box-Muller), so an initialisation is
/// the same on every machine.
fn normal_vec(rng: &mut rand_chacha::ChaCha8Rng, n: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
        let u2: f64 = rng.gen();
        let r = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        out.push((r * th.cos() * std) as f32);
        if out.len() < n {
            out.push((r * th.sin() * std) as f32);
        }
    }
    out
}

impl LlamaModel {
    /// A freshly initialised model (transformers' init: normal(0, initializer_range) for
    /// matrices, ones for norm weights, zeros for biases).
    pub fn new_random(config: LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = BTreeMap::new();
        for (name, shape, is_matrix) in param_specs(&config) {
            let n: usize = shape.iter().product();
            let t = if is_matrix {
                Tensor::from_vec(
                    normal_vec(&mut rng, n, config.initializer_range),
                    shape,
                    device,
                )?
            } else if name.ends_with(".bias") {
                Tensor::zeros(shape, DType::F32, device)?
            } else {
                Tensor::ones(shape, DType::F32, device)?
            };
            tensors.insert(name, t);
        }
        let mut raw = serde_json::to_value(&config).expect("config serialises");
        raw["model_type"] = "llama".into();
        raw["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        Self::assemble(config, raw, tensors, device)
    }

    /// Loads a Hugging Face checkpoint directory (config.json + safetensors).
    pub fn from_pretrained(dir: &Path, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::model(dir, "model directory does not exist"));
        }
        let cfg_path = dir.join(CONFIG_FILE);
        if !cfg_path.exists() {
            return Err(Error::model(dir, "no config.json in the model directory"));
        }
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let raw: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            Error::model(
                &cfg_path,
                format!(
                    "invalid JSON at line {} column {}: {e}",
                    e.line(),
                    e.column()
                ),
            )
        })?;
        let model_type = raw.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
        if model_type != "llama" {
            return Err(Error::model(
                &cfg_path,
                format!("model_type {model_type:?} is not supported (supported: llama)"),
            ));
        }
        let config: LlamaConfig = serde_json::from_value(raw.clone())
            .map_err(|e| Error::model(&cfg_path, e.to_string()))?;
        config
            .validate()
            .map_err(|e| Error::model(&cfg_path, e.to_string()))?;
        let mut w = CheckpointWeights::open(dir)?;
        let mut tensors = BTreeMap::new();
        for (name, shape, _) in param_specs(&config) {
            let t = w.get(&name, &shape, DType::F32, device)?;
            tensors.insert(name, t);
        }
        let unused: Vec<String> = w
            .unused()
            .into_iter()
            .filter(|n| !n.ends_with("rotary_emb.inv_freq"))
            .filter(|n| !(config.tie_word_embeddings && n == "lm_head.weight"))
            .collect();
        if !unused.is_empty() {
            return Err(Error::model(
                dir,
                format!(
                    "checkpoint has weights the llama config does not use: {}",
                    unused.join(", ")
                ),
            ));
        }
        Self::assemble(config, raw, tensors, device)
    }

    fn assemble(
        config: LlamaConfig,
        raw_config: serde_json::Value,
        tensors: BTreeMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let mut params = Vec::new();
        let mut get = |name: &str| -> Tensor {
            let t = &tensors[name];
            let var = Var::from_tensor(t).expect("tensor to var");
            let out = var.as_tensor().clone();
            params.push(Param {
                name: name.to_string(),
                // transformers decays every matrix and no bias or norm weight.
                decay: t.rank() >= 2,
                var,
            });
            out
        };
        let lin = |get: &mut dyn FnMut(&str) -> Tensor, p: &str, bias: bool| Linear {
            w: get(&format!("{p}.weight")),
            b: bias.then(|| get(&format!("{p}.bias"))),
        };
        let embed = get("model.embed_tokens.weight");
        let mut layers = Vec::new();
        for l in 0..config.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let (ab, mb) = (config.attention_bias, config.mlp_bias);
            layers.push(Layer {
                q: lin(&mut get, &format!("{p}.self_attn.q_proj"), ab),
                k: lin(&mut get, &format!("{p}.self_attn.k_proj"), ab),
                v: lin(&mut get, &format!("{p}.self_attn.v_proj"), ab),
                o: lin(&mut get, &format!("{p}.self_attn.o_proj"), ab),
                gate: lin(&mut get, &format!("{p}.mlp.gate_proj"), mb),
                up: lin(&mut get, &format!("{p}.mlp.up_proj"), mb),
                down: lin(&mut get, &format!("{p}.mlp.down_proj"), mb),
                ln1: get(&format!("{p}.input_layernorm.weight")),
                ln2: get(&format!("{p}.post_attention_layernorm.weight")),
            });
        }
        let norm = get("model.norm.weight");
        let lm_head = if config.tie_word_embeddings {
            embed.clone()
        } else {
            get("lm_head.weight")
        };
        let rope = RopeTable::new(&config.inv_freq()?, config.max_position_embeddings, device)?;
        Ok(Self {
            config,
            raw_config,
            params,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            device: device.clone(),
            dtype: DType::F32,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Final hidden states (rows * row_len, hidden) after the last norm.
    pub fn hidden_states(&self, batch: &Batch) -> Result<Tensor> {
        let c = &self.config;
        let longest = match &batch.layout {
            SeqLayout::Packed { max_seqlen, .. } => *max_seqlen,
            SeqLayout::Padded { .. } => batch.row_len,
        };
        if longest > self.rope.max_positions() {
            return Err(Error::Config(format!(
                "a sequence of {longest} tokens exceeds max_position_embeddings = {} of the model \
                 (lower data.max_length)",
                self.rope.max_positions()
            )));
        }
        let n = batch.rows * batch.row_len;
        let (nh, nkv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let ids = batch.input_ids.flatten_all()?;
        let pos = batch.position_ids.flatten_all()?;
        let (cos, sin) = self.rope.gather(&pos, self.dtype)?;
        let plan = AttnPlan::new(&batch.layout, batch.row_len, &self.device)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x = self.embed.index_select(&ids, 0)?; // (N, H)
        for layer in &self.layers {
            let h = rms_norm(&x, &layer.ln1, c.rms_norm_eps)?;
            let q = apply_rope(&layer.q.forward(&h)?.reshape((n, nh, hd))?, &cos, &sin)?;
            let k = apply_rope(&layer.k.forward(&h)?.reshape((n, nkv, hd))?, &cos, &sin)?;
            let v = layer.v.forward(&h)?.reshape((n, nkv, hd))?;
            let a = eager_attention(&q, &k, &v, &plan, scale)?;
            x = (x + layer.o.forward(&a)?)?;
            let h = rms_norm(&x, &layer.ln2, c.rms_norm_eps)?;
            let m = (silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
            x = (x + layer.down.forward(&m)?)?;
        }
        rms_norm(&x, &self.norm, c.rms_norm_eps)
    }

    /// Logits (rows, vocab) of the given hidden-state rows.
    pub fn logits(&self, hidden_rows: &Tensor) -> Result<Tensor> {
        Ok(hidden_rows.matmul(&self.lm_head.t()?)?)
    }

    /// Logits of every position: (rows * row_len, vocab).
    pub fn all_logits(&self, batch: &Batch) -> Result<Tensor> {
        self.logits(&self.hidden_states(batch)?)
    }

    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
            .collect()
    }

    pub fn raw_config(&self) -> &serde_json::Value {
        &self.raw_config
    }
}

impl Model for LlamaModel {
    type Batch = Batch;

    fn loss(&self, batch: &Batch) -> Result<LossSum> {
        if batch.n_targets == 0 {
            return Ok(LossSum {
                sum: Tensor::zeros((), DType::F32, &self.device)?,
                n_tokens: 0,
            });
        }
        let h = self.hidden_states(batch)?;
        // Only positions that carry loss go through the vocabulary projection.
        let rows = h.index_select(&batch.target_rows, 0)?;
        let logits = self.logits(&rows)?;
        Ok(LossSum {
            sum: nll_sum(&logits, &batch.target_ids)?,
            n_tokens: batch.n_targets,
        })
    }

    fn params(&self) -> &[Param] {
        &self.params
    }

    fn save(&self, dir: &Path) -> Result<()> {
        let mut raw = self.raw_config.clone();
        raw["torch_dtype"] = "float32".into();
        crate::io::write_atomic(
            &dir.join(CONFIG_FILE),
            serde_json::to_string_pretty(&raw)
                .expect("JSON serialises")
                .as_bytes(),
        )?;
        save_safetensors(&self.tensors(), &dir.join(WEIGHTS_FILE))
    }
}
