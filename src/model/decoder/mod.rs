#![doc = include_str!("README.md")]

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{backprop::GradStore, DType, Device, Tensor, D};
use rand::SeedableRng;
use serde_json::Value;

use super::families;
use super::spec::*;
use super::weights::{save_safetensors, CheckpointWeights, WEIGHTS_FILE};
use super::{EvalSums, LossScale, LossSum, Model, Param};
use crate::collate::{Batch, SeqLayout};
use crate::error::{Error, Result};
use crate::nn::attention::{AttentionImpl, AttnPlan};
use crate::nn::graph;
use crate::nn::kernels;
use crate::nn::ops::{weighted_sum, RopeTable};

mod adapters;
mod backward;
mod cache;
mod checkpointing;
mod copies;
mod forward;
mod head;
mod init;
mod parts;
mod pullbacks;
mod stacked;
#[cfg(test)]
mod testing;

pub use adapters::LoraSetup;
use adapters::{lora_build, lora_finish, stack_frozen_qkv, DropoutKey, LoraState};
use backward::{embed_lookup, hand_written_run, layers_node};
pub use cache::{BatchKvCache, KvCache};
use forward::router_aux;
use head::{lm_head_nll_node, lm_head_node};
use init::{check_all_read, Builder, Init, Source};
use parts::{CopyVars, FwdCtx, Layer, Lin, LocalCtx, Norm};

pub use super::weights::CONFIG_FILE;

/// How the forward and backward passes are computed; parameters stay float32 either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComputeOptions {
    /// F32, or BF16 / F16 compute with float32 master weights, norms, softmax and loss.
    pub dtype: DType,
    /// Keep only each layer's input in the forward pass and recompute the layer in the
    /// backward pass: activation memory of one layer instead of all.
    pub gradient_checkpointing: bool,
    /// Eager attention, the flash kernels, or whichever can run (`auto`).
    pub attention: AttentionImpl,
    /// Differentiate every layer with candle's autograd instead of the hand-written layer
    /// backward (src/model/decoder/backward.rs): same gradients, slower; kept for checks.
    pub autograd_layers: bool,
}

impl Default for ComputeOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            gradient_checkpointing: false,
            attention: AttentionImpl::Auto,
            autograd_layers: false,
        }
    }
}

/// A causal decoder of any supported family, with float32 parameters under their Hugging Face
/// names: built from a checkpoint (`from_pretrained`) or a config (`new_random`).
pub struct DecoderModel {
    /// The architecture, derived from config.json.
    pub spec: ArchSpec,
    /// config.json as read (unknown fields kept), written back on save.
    raw_config: Value,
    params: Vec<Param>,
    embed: Tensor,
    layers: Vec<Layer>,
    final_norm: Norm,
    lm_head: Lin,
    /// Rows [0, P) the default table; with LongRoPE rows [P, 2P) the long one.
    rope: RopeTable,
    /// Gemma 3: the local layers' rotary table (`ArchSpec::local_rope`).
    local_rope: Option<RopeTable>,
    device: Device,
    /// How passes are computed; `ComputeOptions::default()` after loading, set by the caller.
    pub compute: ComputeOptions,
    /// The compute-dtype copies of the weight matrices on CUDA, kept between steps and
    /// rewritten in place from the master weights at every forward/backward: no allocation and
    /// no extra copy to make them variables (see `with_compute_weights`).
    weight_copies: std::sync::Mutex<Option<CopyVars>>,
    /// The copies hold bf16 of the current weights (the optimizer wrote them with the update).
    copies_fresh: std::sync::atomic::AtomicBool,
    /// LoRA: the configuration, what it targets and the frozen base; `None`: full fine-tuning.
    lora: Option<LoraState>,
}

impl DecoderModel {
    fn build(
        raw_config: Value,
        src: Source,
        device: &Device,
        lora: Option<&LoraSetup>,
    ) -> Result<Self> {
        let (spec, names) = families::from_config(&raw_config)?;
        let model_type = raw_config["model_type"].as_str().unwrap_or_default();
        let lora = match lora {
            Some(setup) => Some(lora_build(setup, model_type, &spec, &names)?),
            None => None,
        };
        let mut b = Builder {
            src,
            device,
            params: Vec::new(),
            lora,
            frozen: Vec::new(),
        };
        let h = spec.hidden;
        let embed = b.take(&names.embed, &[spec.vocab, h], Init::Normal)?;
        let mut layers = (names.layers.iter().enumerate())
            .map(|(l, ln)| b.layer(&spec, l, ln))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = b.norm(spec.norm, &names.final_norm, h)?;
        let lm_head = if spec.tie_embeddings {
            Lin {
                w: embed.clone(),
                b: match &names.lm_head.bias {
                    Some(n) if spec.lm_head_bias => Some(b.take(n, &[spec.vocab], Init::Zeros)?),
                    _ => None,
                },
                lora: None,
            }
        } else {
            let mut n = names.lm_head.clone();
            if !spec.lm_head_bias {
                n.bias = None;
            }
            b.lin(&n, spec.vocab, h)?
        };
        check_all_read(&b.src, &spec, &names)?;
        let scale_table = |t: &Tensor| -> Result<Tensor> { Ok((t * spec.rope.attention_factor)?) };
        let mut table = RopeTable::new(&spec.rope.inv_freq, spec.max_positions, device)?;
        if let Some(long) = &spec.rope.long {
            let lt = RopeTable::new(&long.inv_freq, spec.max_positions, device)?;
            table.cos = Tensor::cat(&[&table.cos, &lt.cos], 0)?;
            table.sin = Tensor::cat(&[&table.sin, &lt.sin], 0)?;
        }
        table.cos = scale_table(&table.cos)?;
        table.sin = scale_table(&table.sin)?;
        let local_rope = match &spec.local_rope {
            Some(r) => Some(RopeTable::new(&r.inv_freq, spec.max_positions, device)?),
            None => None,
        };
        let lora = match b.lora.take() {
            Some(l) => {
                let mut frozen = std::mem::take(&mut b.frozen);
                stack_frozen_qkv(&spec, &mut layers, &mut frozen)?;
                Some(lora_finish(l, frozen, &b.params)?)
            }
            None => None,
        };
        Ok(Self {
            spec,
            raw_config,
            params: b.params,
            embed,
            layers,
            final_norm,
            lm_head,
            rope: table,
            local_rope,
            device: device.clone(),
            compute: ComputeOptions::default(),
            weight_copies: std::sync::Mutex::new(None),
            copies_fresh: std::sync::atomic::AtomicBool::new(false),
            lora,
        })
    }

    /// A freshly initialised model from a config.json object (transformers' init: normal(0,
    /// initializer_range) for matrices, ones for norm weights, zeros for biases).
    pub fn new_random(config: Value, seed: u64, device: &Device) -> Result<Self> {
        Self::new_random_inner(config, seed, device, None, false)
    }

    /// A random model drawn on the device's own generator (fast, not reproducible across
    /// machines), with LoRA if given: what `packsft bench` times.
    #[doc(hidden)]
    pub fn new_random_for_bench(
        config: Value,
        device: &Device,
        lora: Option<&LoraSetup>,
    ) -> Result<Self> {
        Self::new_random_inner(config, 0, device, lora, true)
    }

    /// [`Self::new_random`] with LoRA adapters on a frozen base.
    pub fn new_random_with_lora(
        config: Value,
        seed: u64,
        device: &Device,
        lora: &LoraSetup,
    ) -> Result<Self> {
        Self::new_random_inner(config, seed, device, Some(lora), false)
    }

    fn new_random_inner(
        mut config: Value,
        seed: u64,
        device: &Device,
        lora: Option<&LoraSetup>,
        on_device: bool,
    ) -> Result<Self> {
        let mt = config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("llama")
            .to_string();
        config["model_type"] = mt.clone().into();
        config["architectures"] = serde_json::json!([families::architecture(&mt)]);
        let std = config
            .get("initializer_range")
            .and_then(Value::as_f64)
            .unwrap_or(0.02);
        let src = Source::Random {
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
            std,
            on_device,
        };
        Self::build(config, src, device, lora)
    }

    /// Loads a Hugging Face checkpoint directory (config.json + safetensors).
    pub fn from_pretrained(dir: &Path, device: &Device) -> Result<Self> {
        Self::from_pretrained_inner(dir, device, None)
    }

    /// [`Self::from_pretrained`] with LoRA adapters on the frozen checkpoint: new ones, or the
    /// PEFT adapter `lora.config.adapter` names. `base_model_name_or_path` of the adapter files
    /// written is `dir` until [`Self::set_base_model_name`].
    pub fn from_pretrained_with_lora(
        dir: &Path,
        device: &Device,
        lora: &LoraSetup,
    ) -> Result<Self> {
        Self::from_pretrained_inner(dir, device, Some(lora))
    }

    fn from_pretrained_inner(
        dir: &Path,
        device: &Device,
        lora: Option<&LoraSetup>,
    ) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::model(dir, "model directory does not exist"));
        }
        let cfg_path = dir.join(CONFIG_FILE);
        if !cfg_path.exists() {
            return Err(Error::model(dir, "no config.json in the model directory"));
        }
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| {
            Error::model(
                &cfg_path,
                format!(
                    "invalid JSON at line {} column {}: {e}",
                    e.line(),
                    e.column()
                ),
            )
        })?;
        // Validate the config before touching the weights, so its errors come first.
        families::from_config(&raw).map_err(|e| Error::model(&cfg_path, e.to_string()))?;
        let w = CheckpointWeights::open(dir)?;
        let mut model =
            Self::build(raw, Source::Checkpoint(w), device, lora).map_err(|e| match e {
                Error::Config(m) => Error::model(dir, m),
                e => e,
            })?;
        // Non-finite weights would give a NaN loss (`eval`) or nothing (`generate`) later, far
        // from their cause: name the tensor now (one reduction per tensor).
        let frozen = model
            .lora
            .as_ref()
            .map(|l| l.frozen.as_slice())
            .unwrap_or(&[]);
        if let Some(name) = crate::nn::param::first_non_finite(&model.params)?.or_else(|| {
            frozen
                .iter()
                .find(|(_, t)| !super::all_finite(t).unwrap_or(false))
                .map(|(n, _)| n.clone())
        }) {
            return Err(Error::model(
                dir,
                format!("weight `{name}` holds NaN or infinity"),
            ));
        }
        if let Some(l) = &mut model.lora {
            l.base_model = dir.display().to_string();
        }
        Ok(model)
    }

    /// Checks a checkpoint directory against its config.json without loading a weight: every
    /// tensor the config implies exists with its shape, and none is left over (what
    /// `from_pretrained` would find, read from the safetensors headers).
    pub fn check_checkpoint(dir: &Path) -> Result<()> {
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let raw: Value = serde_json::from_str(&text).map_err(|e| {
            Error::model(&cfg_path, format!("invalid JSON at line {}: {e}", e.line()))
        })?;
        let w = CheckpointWeights::open(dir)?;
        Self::build(raw, Source::Shapes(w), &Device::Cpu, None)
            .map(|_| ())
            .map_err(|e| match e {
                Error::Config(m) => Error::model(dir, m),
                e => e,
            })
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// config.json as read (unknown fields kept); `save` writes it back as float32.
    pub fn raw_config(&self) -> &Value {
        &self.raw_config
    }

    /// The longest sequence the model accepts (`max_position_embeddings`).
    pub fn max_positions(&self) -> usize {
        self.spec.max_positions
    }

    fn ctx(&self, batch: &Batch) -> Result<FwdCtx> {
        let (lengths, longest): (Vec<usize>, usize) = match batch.layout() {
            SeqLayout::Packed {
                cu_seqlens,
                max_seqlen,
            } => (
                cu_seqlens.windows(2).map(|w| w[1] - w[0]).collect(),
                *max_seqlen,
            ),
            SeqLayout::Padded { lengths } => (lengths.clone(), batch.row_len()),
        };
        if longest > self.spec.max_positions {
            return Err(Error::Config(format!(
                "a sequence of {longest} tokens exceeds max_position_embeddings = {} of the model (lower data.max_length)",
                self.spec.max_positions
            )));
        }
        // On CUDA the gather and cross-entropy kernels trust their indices (checking on the device
        // would mean reading back every forward): an id from a tokenizer larger than the model (or
        // a pad id past its vocabulary) is an error that names it, not a read outside the table.
        batch.check_vocab(self.spec.vocab)?;
        let pos = batch.position_ids().flatten_all()?;
        // LongRoPE picks its table per sequence by that sequence's own length, as a forward of
        // the example alone would (not by the padded row length).
        let pos = match &self.spec.rope.long {
            None => pos,
            Some(long) => {
                // Rows [P, 2P) of the table are the long factors: an offset of P per token of a
                // long sequence, built from the layout on the host (reading the positions back
                // would stall a GPU every forward).
                let p = self.spec.max_positions as u32;
                let off = |len: usize| if len > long.original_max { p } else { 0 };
                let offsets: Vec<u32> = match batch.layout() {
                    SeqLayout::Packed { cu_seqlens, .. } => cu_seqlens
                        .windows(2)
                        .flat_map(|w| std::iter::repeat_n(off(w[1] - w[0]), w[1] - w[0]))
                        .collect(),
                    SeqLayout::Padded { lengths } => lengths
                        .iter()
                        .flat_map(|&len| std::iter::repeat_n(off(len), batch.row_len()))
                        .collect(),
                };
                let n = offsets.len();
                (pos + Tensor::from_vec(offsets, n, &self.device)?)?
            }
        };
        let (cos, sin) = self.rope.gather(&pos, self.compute.dtype)?;
        let real_rows = match batch.layout() {
            SeqLayout::Padded { .. } => {
                let rows: Vec<u32> = lengths
                    .iter()
                    .enumerate()
                    .flat_map(|(b, &len)| (0..len).map(move |t| (b * batch.row_len() + t) as u32))
                    .collect();
                let n = rows.len();
                Some(Tensor::from_vec(rows, n, &self.device)?)
            }
            SeqLayout::Packed { .. } => None,
        };
        let s = &self.spec;
        let flash =
            (self.compute.attention).use_flash(&self.device, self.compute.dtype, s.head_dim)?;
        let plan = |window| -> Result<AttnPlan> {
            let (layout, row_len) = (batch.layout(), batch.row_len());
            AttnPlan::new(layout, row_len, window, s.attn_softcap, &self.device, flash)
        };
        // Local and global layers mixed (Gemma 2 and 3): a plan for each, and the local
        // layers' own rotary rows where they have their own base (Gemma 3).
        let (global_window, local) = match &s.local_layers {
            None => (s.sliding_window, None),
            Some(_) => {
                let (cos, sin) = match &self.local_rope {
                    Some(t) => t.gather(&pos, self.compute.dtype)?,
                    None => (cos.clone(), sin.clone()),
                };
                let plan = plan(s.sliding_window)?;
                (None, Some(LocalCtx { plan, cos, sin }))
            }
        };
        Ok(FwdCtx {
            ids: batch.input_ids().flatten_all()?,
            cos,
            sin,
            plan: plan(global_window)?,
            n: batch.rows() * batch.row_len(),
            real_rows,
            local,
        })
    }

    fn embed_fwd(&self, ctx: &FwdCtx) -> Result<Tensor> {
        let mut x = match embed_lookup(&self.embed, &ctx.ids)? {
            Some(x) => x,
            None => kernels::index_rows(&self.embed, &ctx.ids)?,
        };
        if let Some(pad) = self.spec.padding_idx {
            // transformers' nn.Embedding(padding_idx): the pad row gets no gradient from lookups.
            // Masked on the device: reading the ids back to skip this would stall a GPU every
            // forward.
            let mask = ctx.ids.eq(pad)?.unsqueeze(1)?.broadcast_as(x.shape())?;
            x = mask.where_cond(&x.detach(), &x)?;
        }
        let x = x.to_dtype(self.compute.dtype)?;
        Ok(if self.spec.embedding_multiplier != 1.0 {
            (x * self.spec.embedding_multiplier)?
        } else {
            x
        })
    }

    /// Final norm and the vocabulary projection of the given rows of the pre-norm stream.
    fn head(&self, x: &Tensor, rows: Option<&Tensor>) -> Result<Tensor> {
        self.logits(&self.head_rows(x, rows)?)
    }

    /// Final-norm hidden states of `rows` (every position with `None`): what the vocabulary
    /// projection takes.
    fn head_rows(&self, x: &Tensor, rows: Option<&Tensor>) -> Result<Tensor> {
        let h = self.final_norm.fwd(x)?;
        Ok(match rows {
            Some(r) => kernels::index_rows(&h, r)?,
            None => h,
        })
    }

    /// Embedding and every layer: the pre-norm residual stream and the MoE router outputs.
    /// `keep_graph: false` drops the graph after each layer (evaluation keeps no activations).
    fn trunk(&self, batch: &Batch, keep_graph: bool) -> Result<(FwdCtx, Tensor, Vec<Tensor>)> {
        let ctx = self.ctx(batch)?;
        let cut = |t: Tensor| if keep_graph { t } else { t.detach() };
        let mut x = cut(self.embed_fwd(&ctx)?);
        let mut routers = Vec::new();
        let mut i = 0;
        while i < self.layers.len() {
            let run = hand_written_run(&self.layers[i..], self.compute.autograd_layers);
            if run > 0 {
                x = cut(layers_node(&self.layers[i..i + run], &self.spec, &x, &ctx)?);
                i += run;
                continue;
            }
            let (y, r) = self.layers[i].forward(&self.spec, &x, &ctx)?;
            x = cut(y);
            routers.extend(r);
            i += 1;
        }
        Ok((ctx, x, routers))
    }

    /// Hidden states after the final norm, every position: (rows * row_len, hidden).
    pub fn hidden_states(&self, batch: &Batch) -> Result<Tensor> {
        self.final_norm.fwd(&self.trunk(batch, true)?.1)
    }

    /// Logits (rows, vocab) of rows of final hidden states (as `hidden_states` returns them).
    pub fn logits(&self, hidden_rows: &Tensor) -> Result<Tensor> {
        let logits = match lm_head_node(&self.lm_head, hidden_rows, self.compute.autograd_layers)? {
            Some(l) => l,
            None => self.lm_head.fwd(hidden_rows)?,
        };
        let logits = if self.spec.logits_scaling != 1.0 {
            (logits / self.spec.logits_scaling)?
        } else {
            logits
        };
        Ok(match self.spec.final_softcap {
            Some(c) => ((logits / c)?.tanh()? * c)?,
            None => logits,
        })
    }

    /// Logits of every position: (rows * row_len, vocab).
    pub fn all_logits(&self, batch: &Batch) -> Result<Tensor> {
        self.head(&self.trunk(batch, true)?.1, None)
    }

    /// The router auxiliary loss of a batch (without coefficient), for checks.
    pub fn router_aux_loss(&self, batch: &Batch) -> Result<Option<Tensor>> {
        let (ctx, _, routers) = self.trunk(batch, true)?;
        router_aux(&self.spec, &routers, &ctx)
    }

    /// Every parameter by its Hugging Face name, as `save` writes them (a tied LM head shares
    /// the embedding's entry).
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
            .collect()
    }

    fn loss_inner(&self, batch: &Batch) -> Result<LossSum> {
        let (ctx, x, routers) = self.trunk(batch, true)?;
        // Only positions that carry loss go through the vocabulary projection.
        let h = self.head_rows(&x, Some(batch.target_rows()))?;
        let per_token = match lm_head_nll_node(
            &self.lm_head,
            &h,
            batch.target_ids(),
            &self.spec,
            self.compute.autograd_layers,
        )? {
            Some(nll) => nll,
            None => kernels::nll(&self.logits(&h)?, batch.target_ids())?,
        };
        let aux = match self.spec.router_aux_loss_coef {
            Some(coef) => router_aux(&self.spec, &routers, &ctx)?
                .map(|a| a * coef)
                .transpose()?,
            None => None,
        };
        Ok(LossSum {
            sum: weighted_sum(&per_token, batch.target_weights())?,
            n_targets: batch.n_targets(),
            aux,
        })
    }
}

impl Model for DecoderModel {
    type Batch = Batch;

    fn greedy_continuation(
        &self,
        ids: &[u32],
        n: usize,
        eos: Option<u32>,
    ) -> Result<Option<Vec<u32>>> {
        super::generate::greedy(self, ids, n, eos).map(Some)
    }

    /// The prompts decoded together through one batch cache: each gets the continuation it
    /// gets alone (`tests/generate.rs`).
    fn greedy_continuations(
        &self,
        prompts: &[&[u32]],
        n: usize,
        eos: Option<u32>,
    ) -> Result<Option<Vec<Vec<u32>>>> {
        let prompts = prompts.iter().map(|p| p.to_vec()).collect();
        let eos: Vec<u32> = eos.into_iter().collect();
        let sampling = super::generate::Sampling::default();
        super::generate::generate_batch_ids(self, prompts, n, &sampling, &eos, |_, _| Ok(false))
            .map(Some)
    }

    fn loss(&self, batch: &Batch) -> Result<LossSum> {
        if batch.n_targets() == 0 {
            return Ok(LossSum {
                sum: Tensor::zeros((), DType::F32, &self.device)?,
                n_targets: 0,
                aux: None,
            });
        }
        self.loss_inner(batch)
    }

    fn params(&self) -> &[Param] {
        &self.params
    }

    fn save(&self, dir: &Path) -> Result<()> {
        if let Some(l) = &self.lora {
            return self.save_adapter(l, dir);
        }
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

    fn load_params(&self, dir: &Path) -> Result<()> {
        match &self.lora {
            Some(l) => self.load_adapter(l, dir),
            None => super::load_params_from(self, dir),
        }
    }

    fn forward_backward(&self, batch: &Batch, scale: LossScale) -> Result<(LossSum, GradStore)> {
        let _dropout = DropoutKey::set(self);
        if self.compute.gradient_checkpointing && batch.n_targets() > 0 {
            return self.forward_backward_checkpointed(batch, scale);
        }
        if self.compute.dtype != DType::F32 {
            return self.with_compute_weights(|| self.forward_backward_plain(batch, scale));
        }
        self.forward_backward_plain(batch, scale)
    }

    fn compute_copies(&self) -> Result<Vec<(usize, Tensor)>> {
        match self.kept_copies()? {
            Some(kept) => kept.views(),
            None => Ok(Vec::new()),
        }
    }

    /// The embedding table: `embed_fwd` looks its rows up in float32 (and hands the table a
    /// float32 gradient) and casts the rows, whatever copy a tied head computes with.
    fn masters_read(&self) -> Vec<usize> {
        let embed = self.embed.id();
        (self.params.iter().enumerate())
            .filter(|(_, p)| p.var.id() == embed)
            .map(|(i, _)| i)
            .collect()
    }

    fn set_compute_copies_fresh(&self, fresh: bool) {
        self.copies_fresh
            .store(fresh, std::sync::atomic::Ordering::SeqCst);
    }

    fn eval_sums(&self, batch: &Batch) -> Result<EvalSums> {
        if batch.n_targets() == 0 {
            return Ok(EvalSums {
                loss_sum: 0.0,
                n_targets: 0,
                n_correct: Some(0),
            });
        }
        self.eval_sums_inner(batch)
    }
}

impl DecoderModel {
    fn forward_backward_plain(
        &self,
        batch: &Batch,
        scale: LossScale,
    ) -> Result<(LossSum, GradStore)> {
        graph::scope(|| self.forward_backward_graph(batch, scale))
    }

    fn forward_backward_graph(
        &self,
        batch: &Batch,
        scale: LossScale,
    ) -> Result<(LossSum, GradStore)> {
        if !crate::device::profiling() {
            return super::backward_of(self.loss(batch)?, scale);
        }
        let t = std::time::Instant::now();
        let ms = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3;
        let l = self.loss(batch)?;
        let fwd_host = ms(t);
        self.device.synchronize()?;
        let fwd = ms(t);
        let t = std::time::Instant::now();
        let r = super::backward_of(l, scale)?;
        let bwd_host = ms(t);
        self.device.synchronize()?;
        // Host time is graph building and kernel launches; when it is close to the total,
        // launch overhead, not the GPU, bounds the step.
        tracing::info!(
            "profile forward {fwd:.1} ms (host {fwd_host:.1}), backward {:.1} ms (host {bwd_host:.1})",
            ms(t)
        );
        Ok(r)
    }

    fn eval_sums_inner(&self, batch: &Batch) -> Result<EvalSums> {
        let (_, x, _) = self.trunk(batch, false)?;
        let logits = self.head(&x, Some(batch.target_rows()))?.detach();
        let loss_sum = kernels::nll(&logits, batch.target_ids())?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let pred = logits.argmax(D::Minus1)?;
        let n_correct = pred
            .eq(batch.target_ids())?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()? as usize;
        Ok(EvalSums {
            loss_sum,
            n_targets: batch.n_targets(),
            n_correct: Some(n_correct),
        })
    }
}
