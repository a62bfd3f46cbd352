//! The Llama architecture (Llama 2 and 3) with per-token `position_ids` and attention that
//! honours sequence boundaries. Parameters keep transformers' names and layouts, so loading
//! and saving are plain safetensors reads and writes.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::weights::{save_safetensors, CheckpointWeights, WEIGHTS_FILE};
use super::{EvalSums, LossSum, Model, Param};
use crate::attention::{eager_attention, AttnPlan};
use crate::collator::{Batch, SeqLayout};
use crate::error::{Error, Result};
use crate::ops::{apply_rope, nll, nll_sum, rms_norm, silu, RopeTable};

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
    /// x (N, in) → (N, out), computed in x's dtype (the f32 master weight is cast, and the
    /// cast is differentiable, so gradients reach the master weight in f32).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.w.to_dtype(x.dtype())?.t()?)?;
        Ok(match &self.b {
            Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?)?,
            None => y,
        })
    }
}

/// How the forward and backward passes are computed; parameters stay float32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComputeOptions {
    /// F32, or BF16 / F16 compute with float32 master weights, norms, softmax and loss.
    pub dtype: DType,
    /// Keep only each layer's input in the forward pass and recompute the layer in the
    /// backward pass: activation memory of one layer instead of all.
    pub gradient_checkpointing: bool,
}

impl Default for ComputeOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            gradient_checkpointing: false,
        }
    }
}

/// What every layer of one forward pass shares.
struct FwdCtx {
    ids: Tensor,
    cos: Tensor,
    sin: Tensor,
    plan: AttnPlan,
    n: usize,
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
    pub compute: ComputeOptions,
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
            compute: ComputeOptions::default(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn ctx(&self, batch: &Batch) -> Result<FwdCtx> {
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
        let pos = batch.position_ids.flatten_all()?;
        let (cos, sin) = self.rope.gather(&pos, self.compute.dtype)?;
        Ok(FwdCtx {
            ids: batch.input_ids.flatten_all()?,
            cos,
            sin,
            plan: AttnPlan::new(&batch.layout, batch.row_len, &self.device)?,
            n: batch.rows * batch.row_len,
        })
    }

    fn embed_fwd(&self, ctx: &FwdCtx) -> Result<Tensor> {
        Ok(self.embed.index_select(&ctx.ids, 0)?.to_dtype(self.compute.dtype)?)
    }

    /// One decoder layer: x (N, H) → (N, H).
    fn layer_fwd(&self, layer: &Layer, x: &Tensor, ctx: &FwdCtx) -> Result<Tensor> {
        let c = &self.config;
        let (n, nh, nkv, hd) = (ctx.n, c.num_attention_heads, c.kv_heads(), c.head_dim());
        let h = rms_norm(x, &layer.ln1, c.rms_norm_eps)?;
        let q = apply_rope(&layer.q.forward(&h)?.reshape((n, nh, hd))?, &ctx.cos, &ctx.sin)?;
        let k = apply_rope(&layer.k.forward(&h)?.reshape((n, nkv, hd))?, &ctx.cos, &ctx.sin)?;
        let v = layer.v.forward(&h)?.reshape((n, nkv, hd))?;
        let a = eager_attention(&q, &k, &v, &ctx.plan, 1.0 / (hd as f64).sqrt())?;
        let x = (x + layer.o.forward(&a)?)?;
        let h = rms_norm(&x, &layer.ln2, c.rms_norm_eps)?;
        let m = (silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?;
        Ok((x + layer.down.forward(&m)?)?)
    }

    /// Final norm, then the vocabulary projection of the rows that carry loss: (n_targets, V).
    fn target_logits(&self, h: &Tensor, batch: &Batch) -> Result<Tensor> {
        let h = rms_norm(h, &self.norm, self.config.rms_norm_eps)?;
        self.logits(&h.index_select(&batch.target_rows, 0)?)
    }

    /// Final hidden states (rows * row_len, hidden) after the last norm.
    pub fn hidden_states(&self, batch: &Batch) -> Result<Tensor> {
        let ctx = self.ctx(batch)?;
        let mut x = self.embed_fwd(&ctx)?;
        for layer in &self.layers {
            x = self.layer_fwd(layer, &x, &ctx)?;
        }
        rms_norm(&x, &self.norm, self.config.rms_norm_eps)
    }

    /// The pre-norm hidden states of every layer boundary, computed without keeping any graph.
    fn checkpoints(&self, ctx: &FwdCtx) -> Result<Vec<Tensor>> {
        let mut xs = vec![self.embed_fwd(ctx)?.detach()];
        for layer in &self.layers {
            let x = self.layer_fwd(layer, xs.last().unwrap(), ctx)?.detach();
            xs.push(x);
        }
        Ok(xs)
    }

    /// Gradient checkpointing: forward keeping only layer inputs, then the head's backward,
    /// then each layer recomputed from its input and back-propagated with the gradient that
    /// reached its output, last layer first, then the embedding.
    fn forward_backward_checkpointed(&self, batch: &Batch, scale: f64) -> Result<(LossSum, GradStore)> {
        let ctx = self.ctx(batch)?;
        let xs = self.checkpoints(&ctx)?;
        let top = Var::from_tensor(xs.last().unwrap())?;
        let logits = self.target_logits(top.as_tensor(), batch)?;
        let sum = nll_sum(&logits, &batch.target_ids, batch.target_weights.as_ref())?;
        let mut grads = (&sum * scale)?.backward()?;
        let mut g_out = grads
            .remove(top.as_tensor())
            .ok_or_else(|| Error::Training("no gradient reached the last hidden state".into()))?;
        let merge = |grads: &mut GradStore, part: GradStore| -> Result<()> {
            for p in &self.params {
                if let Some(g) = part.get(p.var.as_tensor()) {
                    let sum = match grads.remove(p.var.as_tensor()) {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    };
                    grads.insert(p.var.as_tensor(), sum);
                }
            }
            Ok(())
        };
        for (l, layer) in self.layers.iter().enumerate().rev() {
            let x_in = Var::from_tensor(&xs[l])?;
            let out = self.layer_fwd(layer, x_in.as_tensor(), &ctx)?;
            let mut part = (out * &g_out)?.sum_all()?.backward()?;
            g_out = part
                .remove(x_in.as_tensor())
                .ok_or_else(|| Error::Training(format!("no gradient reached the input of layer {l}")))?;
            merge(&mut grads, part)?;
        }
        let e = self.embed_fwd(&ctx)?;
        let part = (e * &g_out)?.sum_all()?.backward()?;
        merge(&mut grads, part)?;
        Ok((
            LossSum {
                sum,
                n_tokens: batch.n_targets,
            },
            grads,
        ))
    }

    /// Logits (rows, vocab) of the given hidden-state rows.
    pub fn logits(&self, hidden_rows: &Tensor) -> Result<Tensor> {
        Ok(hidden_rows.matmul(&self.lm_head.to_dtype(hidden_rows.dtype())?.t()?)?)
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
        let ctx = self.ctx(batch)?;
        let mut x = self.embed_fwd(&ctx)?;
        for layer in &self.layers {
            x = self.layer_fwd(layer, &x, &ctx)?;
        }
        // Only positions that carry loss go through the vocabulary projection.
        let logits = self.target_logits(&x, batch)?;
        Ok(LossSum {
            sum: nll_sum(&logits, &batch.target_ids, batch.target_weights.as_ref())?,
            n_tokens: batch.n_targets,
        })
    }

    fn forward_backward(&self, batch: &Batch, scale: f64) -> Result<(LossSum, GradStore)> {
        if self.compute.gradient_checkpointing && batch.n_targets > 0 {
            return self.forward_backward_checkpointed(batch, scale);
        }
        let l = self.loss(batch)?;
        let grads = (&l.sum * scale)?.backward()?;
        Ok((l, grads))
    }

    fn eval_sums(&self, batch: &Batch) -> Result<EvalSums> {
        if batch.n_targets == 0 {
            return Ok(EvalSums { loss_sum: 0.0, n_tokens: 0, n_correct: Some(0) });
        }
        let ctx = self.ctx(batch)?;
        let mut x = self.embed_fwd(&ctx)?.detach();
        for layer in &self.layers {
            x = self.layer_fwd(layer, &x, &ctx)?.detach();
        }
        let logits = self.target_logits(&x, batch)?.detach();
        let loss_sum = nll(&logits, &batch.target_ids)?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let pred = logits.argmax(candle_core::D::Minus1)?;
        let n_correct = pred.eq(&batch.target_ids)?.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? as usize;
        Ok(EvalSums { loss_sum, n_tokens: batch.n_targets, n_correct: Some(n_correct) })
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
