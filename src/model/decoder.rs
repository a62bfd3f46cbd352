//! One decoder for every supported family, configured by an `ArchSpec`. Parameters keep their
//! Hugging Face names and layouts (fused tensors stay fused), so loading and saving are plain
//! safetensors reads and writes, and per-token `position_ids` with per-sequence attention make
//! padded and padding-free batches compute the same thing.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{backprop::GradStore, DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use serde_json::Value;

use super::families;
use super::spec::*;
use super::weights::{save_safetensors, CheckpointWeights, WEIGHTS_FILE};
use super::{EvalSums, LossScale, LossSum, Model, Param};
use crate::attention::{AttentionImpl, AttnPlan};
use crate::collator::{Batch, SeqLayout};
use crate::error::{Error, Result};
use crate::ops::{
    fast_apply_rope, fast_rms_norm, fast_silu_mul, layer_norm, nll, nll_sum, softmax_last,
    weighted_sum, RopeTable,
};
use crate::optim::add_grads;

mod manual;

pub use manual::hand_written_backwards;

pub const CONFIG_FILE: &str = "config.json";

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
    /// backward (src/model/decoder/manual.rs): same gradients, slower; kept for checks.
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

struct Lin {
    w: Tensor,
    b: Option<Tensor>,
}

thread_local! {
    /// Low-precision copies of the float32 weight matrices, made once per forward/backward
    /// (see `DecoderModel::with_compute_weights`), keyed by master weight: a variable, or rows of
    /// one (a layer's q, k and v stacked).
    static COMPUTE_WEIGHTS: std::cell::RefCell<std::collections::HashMap<candle_core::TensorId, Tensor>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
    /// The stacked q/k/v copy of a layer, keyed by its q master weight, for the layer's single
    /// projection product (src/model/decoder/manual.rs).
    static STACKED_QKV: std::cell::RefCell<std::collections::HashMap<candle_core::TensorId, Tensor>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// The step's copy of a layer's q, k and v weights stacked by rows, if there is one.
fn stacked_qkv(q: &Lin) -> Option<Tensor> {
    STACKED_QKV.with(|m| m.borrow().get(&q.w.id()).cloned())
}

/// Compute-dtype copies of the weight matrices: each variable holds one matrix, or the q, k and
/// v matrices of a layer stacked by rows so that one matrix product computes all three (rows of
/// a row-major matrix are a contiguous view: the optimizer writes each member in place).
#[derive(Clone)]
struct CopyVars(Vec<(Var, Vec<Member>)>);

/// A weight matrix's rows in a [`CopyVars`] variable.
#[derive(Clone)]
struct Member {
    param: usize,
    row: usize,
    rows: usize,
}

impl CopyVars {
    /// Member `m`'s rows of `t` (a copy variable, or its gradient): `t` itself where the member
    /// is all of it, else a view (autograd reaches the variable through the view).
    fn rows_of(t: &Tensor, m: &Member) -> Result<Tensor> {
        Ok(if m.row == 0 && m.rows == t.dim(0)? {
            t.clone()
        } else {
            t.narrow(0, m.row, m.rows)?
        })
    }

    /// (index into params, copy) for every member.
    fn views(&self) -> Result<Vec<(usize, Tensor)>> {
        let mut out = Vec::new();
        for (var, members) in &self.0 {
            for m in members {
                out.push((m.param, Self::rows_of(var.as_tensor(), m)?));
            }
        }
        Ok(out)
    }
}

impl Lin {
    /// x (N, in) → (N, out) in x's dtype: through the step's low-precision copy of the weight
    /// if there is one, else a differentiable cast of the f32 master weight.
    fn fwd(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.compute_weight(x.dtype())?.t()?)?;
        Ok(match &self.b {
            Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?)?,
            None => y,
        })
    }

    /// The weight in `dtype`: the step's copy if there is one, else a (differentiable) cast.
    fn compute_weight(&self, dtype: DType) -> Result<Tensor> {
        let copy = COMPUTE_WEIGHTS.with(|m| m.borrow().get(&self.w.id()).cloned());
        Ok(match copy {
            Some(v) if v.dtype() == dtype => v,
            _ => self.w.to_dtype(dtype)?,
        })
    }
}

struct Norm {
    spec: NormSpec,
    w: Option<Tensor>,
    b: Option<Tensor>,
}

impl Norm {
    fn fwd(&self, x: &Tensor) -> Result<Tensor> {
        match self.spec.kind {
            NormKind::Rms => fast_rms_norm(x, self.w.as_ref().expect("rms weight"), self.spec.eps),
            NormKind::RmsOneOffset => {
                let dtype = x.dtype();
                let xf = x.to_dtype(DType::F32)?;
                let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.spec.eps)?
                    .sqrt()?
                    .recip()?;
                let w = (self.w.as_ref().expect("rms weight").to_dtype(DType::F32)? + 1.0)?;
                Ok(xf.broadcast_mul(&inv)?.broadcast_mul(&w)?.to_dtype(dtype)?)
            }
            NormKind::LayerNorm { .. } | NormKind::NonParametric => {
                layer_norm(x, self.w.as_ref(), self.b.as_ref(), self.spec.eps)
            }
        }
    }
}

enum Qkv {
    Separate(Lin, Lin, Lin),
    Fused(Lin),
}

enum Experts {
    Separate(Vec<(Lin, Lin, Lin)>),
    /// (E * F, H) each; w2 is applied untransposed, as DBRX stores it.
    Fused {
        w1: Tensor,
        v1: Tensor,
        w2: Tensor,
    },
}

enum Mlp {
    Gated {
        gate: Lin,
        up: Lin,
        down: Lin,
        act: Act,
    },
    GatedFused {
        gate_up: Lin,
        down: Lin,
        act: Act,
        hidden: usize,
    },
    Plain {
        fc1: Lin,
        fc2: Lin,
        act: Act,
    },
    Moe {
        spec: MoeSpec,
        router: Lin,
        experts: Experts,
        shared: Option<(Box<Mlp>, Lin)>,
    },
}

struct Layer {
    norm1: Norm,
    norm2: Option<Norm>,
    qkv: Qkv,
    o: Lin,
    q_norm: Vec<Tensor>,
    k_norm: Vec<Tensor>,
    mlp: Mlp,
}

/// The per-head q/k norm (StableLM's qk_layernorm) of x (N, heads, D): LayerNorm without
/// parameters, then each head's weight.
fn head_norm(x: &Tensor, ws: &[Tensor], eps: f64) -> Result<Tensor> {
    let w = Tensor::stack(ws, 0)?.to_dtype(x.dtype())?;
    Ok(layer_norm(x, None, None, eps)?.broadcast_mul(&w)?)
}

fn activate(x: &Tensor, act: Act) -> Result<Tensor> {
    Ok(match act {
        Act::Silu => x.silu()?,
        Act::GeluErf => x.gelu_erf()?,
        Act::GeluTanh => x.gelu()?,
    })
}

/// Where parameters come from: a checkpoint, or a seeded random initialisation.
enum Source {
    Checkpoint(CheckpointWeights),
    Random {
        rng: rand_chacha::ChaCha8Rng,
        std: f64,
    },
}

#[derive(Clone, Copy)]
enum Init {
    Normal,
    Zeros,
    Ones,
}

struct Builder<'a> {
    src: Source,
    device: &'a Device,
    params: Vec<Param>,
}

impl Builder<'_> {
    fn take(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let t = match &mut self.src {
            Source::Checkpoint(w) => w.get(name, shape, DType::F32, self.device)?,
            Source::Random { rng, std } => {
                let n: usize = shape.iter().product();
                match init {
                    Init::Normal => Tensor::from_vec(normal_vec(rng, n, *std), shape, self.device)?,
                    Init::Zeros => Tensor::zeros(shape, DType::F32, self.device)?,
                    Init::Ones => Tensor::ones(shape, DType::F32, self.device)?,
                }
            }
        };
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        // transformers decays every matrix and no bias or norm weight.
        self.params.push(Param {
            name: name.to_string(),
            decay: shape.len() >= 2,
            var,
        });
        Ok(out)
    }

    fn lin(&mut self, n: &LinearNames, out: usize, inp: usize) -> Result<Lin> {
        Ok(Lin {
            w: self.take(&n.weight, &[out, inp], Init::Normal)?,
            b: match &n.bias {
                Some(b) => Some(self.take(b, &[out], Init::Zeros)?),
                None => None,
            },
        })
    }

    fn norm(&mut self, spec: NormSpec, n: &NormNames, dim: usize) -> Result<Norm> {
        let p = &n.prefix;
        let (w, b) = match spec.kind {
            NormKind::Rms => (
                Some(self.take(&format!("{p}.weight"), &[dim], Init::Ones)?),
                None,
            ),
            // Gemma stores the offset from 1, initialised at 0.
            NormKind::RmsOneOffset => (
                Some(self.take(&format!("{p}.weight"), &[dim], Init::Zeros)?),
                None,
            ),
            NormKind::LayerNorm { bias } => (
                Some(self.take(&format!("{p}.weight"), &[dim], Init::Ones)?),
                if bias {
                    Some(self.take(&format!("{p}.bias"), &[dim], Init::Zeros)?)
                } else {
                    None
                },
            ),
            NormKind::NonParametric => (None, None),
        };
        Ok(Norm { spec, w, b })
    }

    fn mlp(&mut self, spec: &MlpSpec, names: &MlpNames, h: usize) -> Result<Mlp> {
        Ok(match (spec, names) {
            (MlpSpec::Gated { hidden, act, .. }, MlpNames::Gated { gate, up, down }) => {
                Mlp::Gated {
                    gate: self.lin(gate, *hidden, h)?,
                    up: self.lin(up, *hidden, h)?,
                    down: self.lin(down, h, *hidden)?,
                    act: *act,
                }
            }
            (MlpSpec::Gated { hidden, act, .. }, MlpNames::GatedFused { gate_up, down }) => {
                Mlp::GatedFused {
                    gate_up: self.lin(gate_up, 2 * hidden, h)?,
                    down: self.lin(down, h, *hidden)?,
                    act: *act,
                    hidden: *hidden,
                }
            }
            (MlpSpec::Plain { hidden, act, .. }, MlpNames::Plain { fc1, fc2 }) => Mlp::Plain {
                fc1: self.lin(fc1, *hidden, h)?,
                fc2: self.lin(fc2, h, *hidden)?,
                act: *act,
            },
            (
                MlpSpec::Moe(m),
                MlpNames::Moe {
                    router,
                    experts,
                    shared,
                },
            ) => {
                let f = m.expert_hidden;
                let router = self.lin(router, m.experts, h)?;
                let experts = match experts {
                    ExpertNames::Separate(v) => Experts::Separate(
                        v.iter()
                            .map(|(g, u, d)| {
                                Ok((self.lin(g, f, h)?, self.lin(u, f, h)?, self.lin(d, h, f)?))
                            })
                            .collect::<Result<_>>()?,
                    ),
                    ExpertNames::Fused { w1, v1, w2 } => Experts::Fused {
                        w1: self.take(w1, &[m.experts * f, h], Init::Normal)?,
                        v1: self.take(v1, &[m.experts * f, h], Init::Normal)?,
                        w2: self.take(w2, &[m.experts * f, h], Init::Normal)?,
                    },
                };
                let shared = match (m.shared_expert, shared) {
                    (Some(width), Some((names, gate))) => {
                        let spec = MlpSpec::Gated {
                            hidden: width,
                            act: m.act,
                            bias: false,
                            fused: false,
                        };
                        let mlp = self.mlp(&spec, names, h)?;
                        Some((Box::new(mlp), self.lin(gate, 1, h)?))
                    }
                    _ => None,
                };
                Mlp::Moe {
                    spec: m.clone(),
                    router,
                    experts,
                    shared,
                }
            }
            _ => {
                return Err(Error::Config(
                    "internal: MLP spec and names disagree".into(),
                ))
            }
        })
    }
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

pub struct DecoderModel {
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
    device: Device,
    pub compute: ComputeOptions,
    /// The compute-dtype copies of the weight matrices on CUDA, kept between steps and
    /// rewritten in place from the master weights at every forward/backward: no allocation and
    /// no extra copy to make them variables (see `with_compute_weights`).
    weight_copies: std::sync::Mutex<Option<CopyVars>>,
    /// The copies hold bf16 of the current weights (the optimizer wrote them with the update).
    copies_fresh: std::sync::atomic::AtomicBool,
}

/// What every layer of one forward pass shares.
struct FwdCtx {
    ids: Tensor,
    cos: Tensor,
    sin: Tensor,
    plan: AttnPlan,
    n: usize,
    /// Flattened indices of real (non-pad) tokens, for the router loss of padded batches.
    real_rows: Option<Tensor>,
}

/// How a fused q/k/v projection's rows split into q, k and v (plain data, cheap to copy into a
/// backward closure).
#[derive(Clone, Copy)]
struct QkvSplit {
    layout: QkvLayout,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl ArchSpec {
    fn qkv_split(&self) -> QkvSplit {
        QkvSplit {
            layout: self.qkv,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }
}

impl QkvSplit {
    /// q, k, v of a fused projection's output (n, (heads + 2 kv_heads) * head_dim), as views in
    /// the checkpoint's row layout.
    fn split(&self, y: &Tensor, n: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (nh, nkv, d) = (self.heads, self.kv_heads, self.head_dim);
        Ok(match self.layout {
            QkvLayout::FusedGrouped => {
                let g = nh / nkv;
                let y = y.reshape((n, nkv, g + 2, d))?;
                (
                    y.narrow(2, 0, g)?,
                    y.narrow(2, g, 1)?,
                    y.narrow(2, g + 1, 1)?,
                )
            }
            QkvLayout::FusedInterleaved => {
                let y = y.reshape((n, nh, 3, d))?;
                (y.narrow(2, 0, 1)?, y.narrow(2, 1, 1)?, y.narrow(2, 2, 1)?)
            }
            _ => (
                y.narrow(1, 0, nh * d)?,
                y.narrow(1, nh * d, nkv * d)?,
                y.narrow(1, (nh + nkv) * d, nkv * d)?,
            ),
        })
    }

    /// The inverse of [`QkvSplit::split`] for gradients: dq (n, heads, d), dk and dv
    /// (n, kv_heads, d) → (n, (heads + 2 kv_heads) * d) in the fused rows' layout.
    fn join(&self, dq: &Tensor, dk: &Tensor, dv: &Tensor, n: usize) -> Result<Tensor> {
        let (nh, nkv, d) = (self.heads, self.kv_heads, self.head_dim);
        let (parts, dim) = match self.layout {
            QkvLayout::FusedGrouped => (
                [
                    dq.reshape((n, nkv, nh / nkv, d))?,
                    dk.reshape((n, nkv, 1, d))?,
                    dv.reshape((n, nkv, 1, d))?,
                ],
                2,
            ),
            QkvLayout::FusedInterleaved => (
                [
                    dq.reshape((n, nh, 1, d))?,
                    dk.reshape((n, nh, 1, d))?,
                    dv.reshape((n, nh, 1, d))?,
                ],
                2,
            ),
            _ => (
                [
                    dq.reshape((n, nh * d))?,
                    dk.reshape((n, nkv * d))?,
                    dv.reshape((n, nkv * d))?,
                ],
                1,
            ),
        };
        Ok(Tensor::cat(&parts, dim)?.reshape((n, ()))?)
    }
}

impl DecoderModel {
    fn build(raw_config: Value, src: Source, device: &Device) -> Result<Self> {
        let (spec, names) = families::from_config(&raw_config)?;
        let mut b = Builder {
            src,
            device,
            params: Vec::new(),
        };
        let (h, nh, nkv, d) = (spec.hidden, spec.heads, spec.kv_heads, spec.head_dim);
        let embed = b.take(&names.embed, &[spec.vocab, h], Init::Normal)?;
        let mut layers = Vec::with_capacity(spec.layers);
        for (l, ln) in names.layers.iter().enumerate() {
            let norm1 = b.norm(spec.norm, &ln.norm1, h)?;
            let qkv = match &ln.qkv {
                QkvNames::Separate { q, k, v } => Qkv::Separate(
                    b.lin(q, nh * d, h)?,
                    b.lin(k, nkv * d, h)?,
                    b.lin(v, nkv * d, h)?,
                ),
                QkvNames::Fused(n) => {
                    let rows = match spec.qkv {
                        QkvLayout::FusedInterleaved => 3 * nh * d,
                        _ => (nh + 2 * nkv) * d,
                    };
                    Qkv::Fused(b.lin(n, rows, h)?)
                }
            };
            let o = b.lin(&ln.o, h, nh * d)?;
            let q_norm = ln
                .q_norm
                .iter()
                .map(|n| b.take(n, &[d], Init::Ones))
                .collect::<Result<_>>()?;
            let k_norm = ln
                .k_norm
                .iter()
                .map(|n| b.take(n, &[d], Init::Ones))
                .collect::<Result<_>>()?;
            let norm2 = match &ln.norm2 {
                Some(n) => Some(b.norm(spec.norm, n, h)?),
                None => None,
            };
            let mlp = b.mlp(&spec.mlp[l], &ln.mlp, h)?;
            layers.push(Layer {
                norm1,
                norm2,
                qkv,
                o,
                q_norm,
                k_norm,
                mlp,
            });
        }
        let final_norm = b.norm(spec.norm, &names.final_norm, h)?;
        let lm_head = if spec.tie_embeddings {
            Lin {
                w: embed.clone(),
                b: match &names.lm_head.bias {
                    Some(n) if spec.lm_head_bias => Some(b.take(n, &[spec.vocab], Init::Zeros)?),
                    _ => None,
                },
            }
        } else {
            let mut n = names.lm_head.clone();
            if !spec.lm_head_bias {
                n.bias = None;
            }
            b.lin(&n, spec.vocab, h)?
        };
        if let Source::Checkpoint(w) = &b.src {
            let unused: Vec<String> = w
                .unused()
                .into_iter()
                .filter(|n| {
                    !n.ends_with("rotary_emb.inv_freq")
                        && !n.ends_with(".masked_bias")
                        && !n.ends_with(".attn.bias")
                })
                .filter(|n| !(spec.tie_embeddings && n == &names.lm_head.weight))
                .collect();
            if !unused.is_empty() {
                return Err(Error::Config(format!(
                    "checkpoint has weights the {} config does not use: {}",
                    spec.family,
                    unused.join(", ")
                )));
            }
        }
        let scale_table = |t: &Tensor| -> Result<Tensor> { Ok((t * spec.rope.attention_factor)?) };
        let mut table = RopeTable::new(&spec.rope.inv_freq, spec.max_positions, device)?;
        if let Some(long) = &spec.rope.long {
            let lt = RopeTable::new(&long.inv_freq, spec.max_positions, device)?;
            table.cos = Tensor::cat(&[&table.cos, &lt.cos], 0)?;
            table.sin = Tensor::cat(&[&table.sin, &lt.sin], 0)?;
        }
        table.cos = scale_table(&table.cos)?;
        table.sin = scale_table(&table.sin)?;
        Ok(Self {
            spec,
            raw_config,
            params: b.params,
            embed,
            layers,
            final_norm,
            lm_head,
            rope: table,
            device: device.clone(),
            compute: ComputeOptions::default(),
            weight_copies: std::sync::Mutex::new(None),
            copies_fresh: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A freshly initialised model from a config.json object (transformers' init: normal(0,
    /// initializer_range) for matrices, ones for norm weights, zeros for biases).
    pub fn new_random(mut config: Value, seed: u64, device: &Device) -> Result<Self> {
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
        };
        Self::build(config, src, device)
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
        Self::build(raw, Source::Checkpoint(w), device).map_err(|e| match e {
            Error::Config(m) => Error::model(dir, m),
            e => e,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn raw_config(&self) -> &Value {
        &self.raw_config
    }

    pub fn max_positions(&self) -> usize {
        self.spec.max_positions
    }

    fn ctx(&self, batch: &Batch) -> Result<FwdCtx> {
        let (lengths, longest): (Vec<usize>, usize) = match &batch.layout {
            SeqLayout::Packed {
                cu_seqlens,
                max_seqlen,
            } => (
                cu_seqlens.windows(2).map(|w| w[1] - w[0]).collect(),
                *max_seqlen,
            ),
            SeqLayout::Padded { lengths } => (lengths.clone(), batch.row_len),
        };
        if longest > self.spec.max_positions {
            return Err(Error::Config(format!(
                "a sequence of {longest} tokens exceeds max_position_embeddings = {} of the model (lower data.max_length)",
                self.spec.max_positions
            )));
        }
        self.check_token_ids(batch)?;
        let pos = batch.position_ids.flatten_all()?;
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
                let offsets: Vec<u32> = match &batch.layout {
                    SeqLayout::Packed { cu_seqlens, .. } => cu_seqlens
                        .windows(2)
                        .flat_map(|w| std::iter::repeat_n(off(w[1] - w[0]), w[1] - w[0]))
                        .collect(),
                    SeqLayout::Padded { lengths } => lengths
                        .iter()
                        .flat_map(|&len| std::iter::repeat_n(off(len), batch.row_len))
                        .collect(),
                };
                let n = offsets.len();
                (pos + Tensor::from_vec(offsets, n, &self.device)?)?
            }
        };
        let (cos, sin) = self.rope.gather(&pos, self.compute.dtype)?;
        let real_rows = match &batch.layout {
            SeqLayout::Padded { .. } => {
                let rows: Vec<u32> = lengths
                    .iter()
                    .enumerate()
                    .flat_map(|(b, &len)| (0..len).map(move |t| (b * batch.row_len + t) as u32))
                    .collect();
                let n = rows.len();
                Some(Tensor::from_vec(rows, n, &self.device)?)
            }
            SeqLayout::Packed { .. } => None,
        };
        Ok(FwdCtx {
            ids: batch.input_ids.flatten_all()?,
            cos,
            sin,
            plan: AttnPlan::new(
                &batch.layout,
                batch.row_len,
                self.spec.sliding_window,
                &self.device,
                self.compute.attention.use_flash(
                    &self.device,
                    self.compute.dtype,
                    self.spec.head_dim,
                )?,
            )?,
            n: batch.rows * batch.row_len,
            real_rows,
        })
    }

    fn embed_fwd(&self, ctx: &FwdCtx) -> Result<Tensor> {
        let mut x = match manual::embed_lookup(&self.embed, &ctx.ids)? {
            Some(x) => x,
            None => crate::ops::index_rows(&self.embed, &ctx.ids)?,
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

    fn attention(&self, layer: &Layer, h: &Tensor, ctx: &FwdCtx) -> Result<Tensor> {
        let s = &self.spec;
        let (n, nh, nkv, d) = (ctx.n, s.heads, s.kv_heads, s.head_dim);
        let (q, k, v) = match &layer.qkv {
            Qkv::Separate(q, k, v) => (q.fwd(h)?, k.fwd(h)?, v.fwd(h)?),
            Qkv::Fused(lin) => s.qkv_split().split(&lin.fwd(h)?, n)?,
        };
        let (mut q, mut k, mut v) = (
            q.reshape((n, nh, d))?,
            k.reshape((n, nkv, d))?,
            v.reshape((n, nkv, d))?,
        );
        if let Some(c) = s.clip_qkv {
            q = q.clamp(-c, c)?;
            k = k.clamp(-c, c)?;
            v = v.clamp(-c, c)?;
        }
        if !layer.q_norm.is_empty() {
            q = head_norm(&q, &layer.q_norm, s.norm.eps)?;
            k = head_norm(&k, &layer.k_norm, s.norm.eps)?;
        }
        let q = fast_apply_rope(&q, &ctx.cos, &ctx.sin)?;
        let k = fast_apply_rope(&k, &ctx.cos, &ctx.sin)?;
        let a = ctx.plan.attend(&q, &k, &v, s.attn_scale)?;
        layer.o.fwd(&a)
    }

    /// MLP output, and for a mixture of experts the router output the auxiliary loss reads.
    fn mlp_fwd(&self, mlp: &Mlp, h: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        Ok(match mlp {
            Mlp::Gated {
                gate,
                up,
                down,
                act,
            } => {
                let (g, u) = (gate.fwd(h)?, up.fwd(h)?);
                let y = match act {
                    Act::Silu => fast_silu_mul(&g, &u)?,
                    _ => (activate(&g, *act)? * u)?,
                };
                (down.fwd(&y)?, None)
            }
            Mlp::GatedFused {
                gate_up,
                down,
                act,
                hidden,
            } => {
                let y = gate_up.fwd(h)?;
                let (g, u) = (y.narrow(1, 0, *hidden)?, y.narrow(1, *hidden, *hidden)?);
                let y = match act {
                    Act::Silu => fast_silu_mul(&g, &u)?,
                    _ => (activate(&g, *act)? * u)?,
                };
                (down.fwd(&y)?, None)
            }
            Mlp::Plain { fc1, fc2, act } => (fc2.fwd(&activate(&fc1.fwd(h)?, *act)?)?, None),
            Mlp::Moe {
                spec,
                router,
                experts,
                shared,
            } => {
                let (y, r) = self.moe_fwd(spec, router, experts, h)?;
                let y = match shared {
                    Some((mlp, gate)) => {
                        let (sy, _) = self.mlp_fwd(mlp, h)?;
                        let g = gate.fwd(h)?;
                        let sig = (g.neg()?.exp()? + 1.0)?.recip()?;
                        (y + sy.broadcast_mul(&sig)?)?
                    }
                    None => y,
                };
                (y, Some(r))
            }
        })
    }

    fn moe_fwd(
        &self,
        spec: &MoeSpec,
        router: &Lin,
        experts: &Experts,
        h: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (n, hd) = h.dims2()?;
        let (e_n, k) = (spec.experts, spec.top_k);
        let logits = router.fwd(h)?.to_dtype(DType::F32)?;
        let p = softmax_last(&logits)?;
        let host = p.to_vec2::<f32>()?;
        let mut idx = Vec::with_capacity(n * k);
        let mut per_expert: Vec<(Vec<u32>, Vec<u32>)> = vec![(Vec::new(), Vec::new()); e_n];
        for (t, row) in host.iter().enumerate() {
            let mut order: Vec<usize> = (0..e_n).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            for (j, &e) in order.iter().take(k).enumerate() {
                idx.push(e as u32);
                per_expert[e].0.push(t as u32);
                per_expert[e].1.push((t * k + j) as u32);
            }
        }
        let idx_t = Tensor::from_vec(idx, (n, k), &self.device)?;
        let w = p.gather(&idx_t, 1)?;
        let w = match spec.routing {
            Routing::Raw => w,
            Routing::Renormalize => w.broadcast_div(&w.sum_keepdim(1)?)?,
            Routing::PNorm(pn) => w.broadcast_div(&w.powf(pn)?.sum_keepdim(1)?.powf(1.0 / pn)?)?,
        };
        let w_flat = w.to_dtype(h.dtype())?.flatten_all()?;
        let f = spec.expert_hidden;
        let mut out = Tensor::zeros((n, hd), h.dtype(), &self.device)?;
        for (e, (tokens, slots)) in per_expert.into_iter().enumerate() {
            if tokens.is_empty() {
                continue;
            }
            let m = tokens.len();
            let tokens = Tensor::from_vec(tokens, m, &self.device)?;
            let slots = Tensor::from_vec(slots, m, &self.device)?;
            let xe = h.index_select(&tokens, 0)?;
            let ye = match experts {
                Experts::Separate(v) => {
                    let (g, u, d) = &v[e];
                    d.fwd(&(activate(&g.fwd(&xe)?, spec.act)? * u.fwd(&xe)?)?)?
                }
                Experts::Fused { w1, v1, w2 } => {
                    let dt = xe.dtype();
                    let (w1, v1, w2) = (
                        w1.narrow(0, e * f, f)?.to_dtype(dt)?,
                        v1.narrow(0, e * f, f)?.to_dtype(dt)?,
                        w2.narrow(0, e * f, f)?.to_dtype(dt)?,
                    );
                    let inter =
                        (activate(&xe.matmul(&w1.t()?)?, spec.act)? * xe.matmul(&v1.t()?)?)?;
                    inter.matmul(&w2)?
                }
            };
            let we = w_flat.index_select(&slots, 0)?.unsqueeze(1)?;
            out = out.index_add(&tokens, &ye.broadcast_mul(&we)?, 0)?;
        }
        Ok((out, if spec.aux_from_probs { p } else { logits }))
    }

    /// One decoder layer as an autograd graph: x (N, H) → (N, H), plus the router output of a
    /// MoE layer. (`trunk` sends runs of dense layers through `layers_fwd_manual` instead.)
    fn layer_fwd(
        &self,
        layer: &Layer,
        x: &Tensor,
        ctx: &FwdCtx,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let rm = self.spec.residual_multiplier;
        let scaled = |t: Tensor| -> Result<Tensor> { Ok(if rm != 1.0 { (t * rm)? } else { t }) };
        let h1 = layer.norm1.fwd(x)?;
        let a = self.attention(layer, &h1, ctx)?;
        Ok(match self.spec.block {
            Block::Sequential => {
                let x = (x + scaled(a)?)?;
                let h2 = layer
                    .norm2
                    .as_ref()
                    .expect("sequential blocks have two norms")
                    .fwd(&x)?;
                let (m, r) = self.mlp_fwd(&layer.mlp, &h2)?;
                ((x + scaled(m)?)?, r)
            }
            Block::Parallel { shared_norm } => {
                let h2 = if shared_norm {
                    h1
                } else {
                    layer.norm2.as_ref().expect("two norms").fwd(x)?
                };
                let (m, r) = self.mlp_fwd(&layer.mlp, &h2)?;
                (((x + a)? + m)?, r)
            }
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
            Some(r) => crate::ops::index_rows(&h, r)?,
            None => h,
        })
    }

    /// transformers' `load_balancing_loss_func` over the real tokens of the batch, all MoE
    /// layers jointly.
    fn router_aux(&self, routers: &[Tensor], ctx: &FwdCtx) -> Result<Option<Tensor>> {
        let Some(top_k) = self.spec.mlp.iter().find_map(|m| match m {
            MlpSpec::Moe(s) => Some(s.top_k),
            _ => None,
        }) else {
            return Ok(None);
        };
        if routers.is_empty() {
            return Ok(None);
        }
        let rows: Vec<Tensor> = routers
            .iter()
            .map(|r| match &ctx.real_rows {
                Some(idx) => r.index_select(idx, 0),
                None => Ok(r.clone()),
            })
            .collect::<candle_core::Result<_>>()?;
        let rows = Tensor::cat(&rows, 0)?;
        let (r_n, e_n) = rows.dims2()?;
        let p = softmax_last(&rows)?;
        let host = p.to_vec2::<f32>()?;
        let mut counts = vec![0f32; e_n];
        for row in &host {
            let mut order: Vec<usize> = (0..e_n).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            for &e in order.iter().take(top_k) {
                counts[e] += 1.0 / r_n as f32;
            }
        }
        let f = Tensor::from_vec(counts, e_n, &self.device)?;
        let pm = p.mean(0)?;
        Ok(Some(((pm * f)?.sum_all()? * e_n as f64)?))
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
            let run = self.manual_run(&self.layers[i..]);
            if run > 0 {
                x = cut(self.layers_fwd_manual(&self.layers[i..i + run], &x, &ctx)?);
                i += run;
                continue;
            }
            let (y, r) = self.layer_fwd(&self.layers[i], &x, &ctx)?;
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
        let logits = match self.lm_head_manual(&self.lm_head, hidden_rows)? {
            Some(l) => l,
            None => self.lm_head.fwd(hidden_rows)?,
        };
        Ok(if self.spec.logits_scaling != 1.0 {
            (logits / self.spec.logits_scaling)?
        } else {
            logits
        })
    }

    /// Logits of every position: (rows * row_len, vocab).
    pub fn all_logits(&self, batch: &Batch) -> Result<Tensor> {
        self.head(&self.trunk(batch, true)?.1, None)
    }

    /// The router auxiliary loss of a batch (without coefficient), for checks.
    pub fn router_aux_loss(&self, batch: &Batch) -> Result<Option<Tensor>> {
        let (ctx, _, routers) = self.trunk(batch, true)?;
        self.router_aux(&routers, &ctx)
    }

    /// Every id the embedding lookup indexes must be a row of the vocabulary, and so every
    /// target, which the collator takes from the next position's id. On CUDA the gather and
    /// cross-entropy kernels trust their indices (checking on the device would mean reading back
    /// every forward), so the batch's host copy of its ids is checked here: an id from a
    /// tokenizer larger than the model (or a pad id past its vocabulary) is an error that names
    /// it, not a read outside the table.
    fn check_token_ids(&self, batch: &Batch) -> Result<()> {
        let v = self.spec.vocab;
        for (r, row) in batch.host.input_ids.iter().enumerate() {
            if let Some((c, &id)) = row.iter().enumerate().find(|(_, &id)| id as usize >= v) {
                return Err(Error::Config(format!(
                    "batch row {r}, position {c}: input id {id} is outside the model's vocabulary (size {v})"
                )));
            }
        }
        Ok(())
    }

    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
            .collect()
    }

    /// Gradient checkpointing: forward keeping only layer inputs (and router outputs), then the
    /// head's and the router loss's backward, then each layer recomputed from its input and
    /// back-propagated with the gradients that reached its outputs, last layer first.
    /// Layers stay autograd graphs here (outside `manual::scope`): a recompute through the
    /// hand-written backward was tried, ran slower with a higher peak on the CPU, and was not
    /// kept; it has not been tried on a GPU.
    fn forward_backward_checkpointed(
        &self,
        batch: &Batch,
        scale: LossScale,
    ) -> Result<(LossSum, GradStore)> {
        let ctx = self.ctx(batch)?;
        let mut xs = vec![self.embed_fwd(&ctx)?.detach()];
        let mut routers: Vec<Option<Var>> = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (y, r) = self.layer_fwd(layer, xs.last().unwrap(), &ctx)?;
            xs.push(y.detach());
            routers.push(r.map(|r| Var::from_tensor(&r.detach())).transpose()?);
        }
        let top = Var::from_tensor(xs.last().unwrap())?;
        let logits = self.head(top.as_tensor(), Some(&batch.target_rows))?;
        let sum = nll_sum(&logits, &batch.target_ids, batch.target_weights.as_ref())?;
        let mut objective = (&sum * scale.per_unit)?;
        let aux = match self.spec.router_aux_loss_coef {
            Some(coef) => {
                let rs: Vec<Tensor> = routers
                    .iter()
                    .flatten()
                    .map(|v| v.as_tensor().clone())
                    .collect();
                let aux = self.router_aux(&rs, &ctx)?.map(|a| a * coef).transpose()?;
                if let Some(a) = &aux {
                    objective = (objective + (a * scale.aux)?)?;
                }
                aux
            }
            None => None,
        };
        let mut grads = objective.backward()?;
        let mut g_out = grads
            .remove(top.as_tensor())
            .ok_or_else(|| Error::Training("no gradient reached the last hidden state".into()))?;
        for (l, layer) in self.layers.iter().enumerate().rev() {
            let x_in = Var::from_tensor(&xs[l])?;
            let (out, r) = self.layer_fwd(layer, x_in.as_tensor(), &ctx)?;
            let mut obj = (out * &g_out)?.sum_all()?;
            if let (Some(r), Some(rv)) = (r, &routers[l]) {
                if let Some(g) = grads.remove(rv.as_tensor()) {
                    obj = (obj + (r * g)?.sum_all()?)?;
                }
            }
            let mut part = obj.backward()?;
            g_out = part.remove(x_in.as_tensor()).ok_or_else(|| {
                Error::Training(format!("no gradient reached the input of layer {l}"))
            })?;
            add_grads(&mut grads, part, &self.params)?;
        }
        let e = self.embed_fwd(&ctx)?;
        let part = (e * &g_out)?.sum_all()?.backward()?;
        add_grads(&mut grads, part, &self.params)?;
        Ok((
            LossSum {
                sum,
                n_tokens: batch.n_targets,
                aux,
            },
            grads,
        ))
    }

    fn loss_inner(&self, batch: &Batch) -> Result<LossSum> {
        let (ctx, x, routers) = self.trunk(batch, true)?;
        // Only positions that carry loss go through the vocabulary projection.
        let h = self.head_rows(&x, Some(&batch.target_rows))?;
        let per_token = match self.lm_head_nll_manual(&self.lm_head, &h, &batch.target_ids)? {
            Some(nll) => nll,
            None => nll(&self.logits(&h)?, &batch.target_ids)?,
        };
        let aux = match self.spec.router_aux_loss_coef {
            Some(coef) => self
                .router_aux(&routers, &ctx)?
                .map(|a| a * coef)
                .transpose()?,
            None => None,
        };
        Ok(LossSum {
            sum: weighted_sum(&per_token, batch.target_weights.as_ref())?,
            n_tokens: batch.n_targets,
            aux,
        })
    }
}

impl Model for DecoderModel {
    type Batch = Batch;

    fn loss(&self, batch: &Batch) -> Result<LossSum> {
        if batch.n_targets == 0 {
            return Ok(LossSum {
                sum: Tensor::zeros((), DType::F32, &self.device)?,
                n_tokens: 0,
                aux: None,
            });
        }
        self.loss_inner(batch)
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

    fn forward_backward(&self, batch: &Batch, scale: LossScale) -> Result<(LossSum, GradStore)> {
        if self.compute.gradient_checkpointing && batch.n_targets > 0 {
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

    fn set_compute_copies_fresh(&self, fresh: bool) {
        self.copies_fresh
            .store(fresh, std::sync::atomic::Ordering::SeqCst);
    }

    fn eval_sums(&self, batch: &Batch) -> Result<EvalSums> {
        if batch.n_targets == 0 {
            return Ok(EvalSums {
                loss_sum: 0.0,
                n_tokens: 0,
                n_correct: Some(0),
            });
        }
        self.eval_sums_inner(batch)
    }
}

impl DecoderModel {
    /// Runs a forward/backward with each float32 weight matrix cast once to the compute dtype
    /// as a variable of its own, and folds those copies' gradients into the master weights'.
    /// Same values as casting inside the graph, without the cast node's backward: autograd
    /// would otherwise zero-fill and accumulate a gradient buffer for the cast and the master
    /// weight of every matrix, a float32 copy of the whole model per step.
    fn with_compute_weights(
        &self,
        f: impl FnOnce() -> Result<(LossSum, GradStore)>,
    ) -> Result<(LossSum, GradStore)> {
        let copies = self.compute_copies_now()?;
        let weights: Vec<_> = copies
            .views()?
            .into_iter()
            .map(|(i, c)| (self.params[i].var.id(), c))
            .collect();
        let stacked: Vec<_> = copies
            .0
            .iter()
            .filter(|(_, members)| members.len() > 1)
            .map(|(var, members)| {
                (
                    self.params[members[0].param].var.id(),
                    var.as_tensor().clone(),
                )
            })
            .collect();
        COMPUTE_WEIGHTS.with(|m| {
            let mut m = m.borrow_mut();
            m.clear();
            m.extend(weights);
        });
        STACKED_QKV.with(|m| {
            let mut m = m.borrow_mut();
            m.clear();
            m.extend(stacked);
        });
        let r = f();
        COMPUTE_WEIGHTS.with(|m| m.borrow_mut().clear());
        STACKED_QKV.with(|m| m.borrow_mut().clear());
        let (l, mut grads) = r?;
        for (var, members) in &copies.0 {
            let Some(g) = grads.remove(var.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?;
            for m in members {
                let master = self.params[m.param].var.as_tensor();
                let gm = CopyVars::rows_of(&g, m)?;
                let gm = match grads.remove(master) {
                    Some(other) => crate::optim::add_grad(&other, &gm)?,
                    None => gm,
                };
                grads.insert(master, gm);
            }
        }
        Ok((l, grads))
    }

    /// Indices (into `params`) of the float32 weight matrices, which compute through copies.
    fn copied_params(&self) -> Vec<usize> {
        self.params
            .iter()
            .enumerate()
            .filter(|(_, p)| p.var.rank() == 2 && p.var.dtype() == DType::F32)
            .map(|(i, _)| i)
            .collect()
    }

    /// Which float32 weight matrices share a copy variable: a layer's separate q, k and v
    /// (stacked, one matrix product for the three) where nothing comes between projection and a
    /// whole-head rotation (no q/k clipping or norms, no partial rotary: the hand-written layer
    /// rotates them straight out of the stacked product), every other matrix alone.
    fn copy_layout(&self) -> Vec<Vec<usize>> {
        let s = &self.spec;
        let plain_rope = s.clip_qkv.is_none() && s.rope.rotary_dim == s.head_dim;
        let idx = self.copied_params();
        let index: std::collections::HashMap<candle_core::TensorId, usize> =
            idx.iter().map(|&i| (self.params[i].var.id(), i)).collect();
        let mut grouped = std::collections::HashSet::new();
        let mut layout = Vec::new();
        for layer in &self.layers {
            if let (Qkv::Separate(q, k, v), true) =
                (&layer.qkv, plain_rope && layer.q_norm.is_empty())
            {
                let ids: Option<Vec<usize>> = [q, k, v]
                    .iter()
                    .map(|l| index.get(&l.w.id()).copied())
                    .collect();
                let Some(ids) = ids else { continue };
                let cols = |i: usize| self.params[i].var.dims().get(1).copied();
                if ids.iter().all(|&i| cols(i) == cols(ids[0])) {
                    grouped.extend(ids.iter().copied());
                    layout.push(ids);
                }
            }
        }
        layout.extend(
            idx.into_iter()
                .filter(|i| !grouped.contains(i))
                .map(|i| vec![i]),
        );
        layout
    }

    /// The bf16 copies kept on CUDA (allocated on first use); `None` where the model casts per
    /// step instead (CPU, other dtypes).
    fn kept_copies(&self) -> Result<Option<CopyVars>> {
        if !(cfg!(feature = "cuda")
            && self.device.is_cuda()
            && self.compute.dtype == DType::BF16
            && !self.compute.gradient_checkpointing)
        {
            return Ok(None);
        }
        let mut kept = self.weight_copies.lock().unwrap();
        if kept.is_none() {
            let mut vars = Vec::new();
            for ids in self.copy_layout() {
                let mut members = Vec::with_capacity(ids.len());
                let mut row = 0;
                for &i in &ids {
                    let rows = self.params[i].var.dim(0)?;
                    members.push(Member {
                        param: i,
                        row,
                        rows,
                    });
                    row += rows;
                }
                let cols = self.params[ids[0]].var.dim(1)?;
                vars.push((Var::zeros((row, cols), DType::BF16, &self.device)?, members));
            }
            *kept = Some(CopyVars(vars));
            self.copies_fresh
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(kept.clone())
    }

    /// The compute-dtype copies of every float32 weight matrix, up to date.
    fn compute_copies_now(&self) -> Result<CopyVars> {
        if let Some(kept) = self.kept_copies()? {
            #[cfg(feature = "cuda")]
            if !self.copies_fresh.load(std::sync::atomic::Ordering::SeqCst) {
                let views = kept.views()?;
                let pairs: Vec<(&Tensor, &Tensor)> = views
                    .iter()
                    .map(|(i, c)| (self.params[*i].var.as_tensor(), c))
                    .collect();
                crate::fused::cast_bf16_into(&pairs)?;
            }
            return Ok(kept);
        }
        // Cast per step, one variable a matrix.
        let vars = self
            .copied_params()
            .into_iter()
            .map(|i| {
                let t = self.params[i].var.as_tensor();
                let c = Var::from_tensor(&t.to_dtype(self.compute.dtype)?)?;
                let rows = t.dim(0)?;
                Ok((
                    c,
                    vec![Member {
                        param: i,
                        row: 0,
                        rows,
                    }],
                ))
            })
            .collect::<Result<_>>()?;
        Ok(CopyVars(vars))
    }

    fn forward_backward_plain(
        &self,
        batch: &Batch,
        scale: LossScale,
    ) -> Result<(LossSum, GradStore)> {
        manual::scope(|| self.forward_backward_graph(batch, scale))
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
        let logits = self.head(&x, Some(&batch.target_rows))?.detach();
        let loss_sum = nll(&logits, &batch.target_ids)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let pred = logits.argmax(D::Minus1)?;
        let n_correct = pred
            .eq(&batch.target_ids)?
            .to_dtype(DType::U32)?
            .sum_all()?
            .to_scalar::<u32>()? as usize;
        Ok(EvalSums {
            loss_sum,
            n_tokens: batch.n_targets,
            n_correct: Some(n_correct),
        })
    }
}
