//! Where a decoder's parameters come from: a checkpoint's tensors under their Hugging Face names,
//! or transformers' initialisation (normal(0, initializer_range) for matrices, ones for norm
//! weights, zeros for biases) from a seeded generator. Every tensor taken becomes a [`Param`].

use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;

use super::super::lora::{self, LoraConfig, LoraInit};
use super::super::spec::*;
use super::super::weights::CheckpointWeights;
use super::parts::{Adapter, Experts, Layer, Lin, Mlp, Norm, Qkv};
use crate::error::{Error, Result};
use crate::nn::param::Param;

/// Where parameters come from: a checkpoint, or a seeded random initialisation.
pub(super) enum Source {
    Checkpoint(CheckpointWeights),
    /// A checkpoint's headers only: every tensor checked for its name and shape, none loaded
    /// (the parts hold zero-sized broadcast placeholders; the model is not for computing).
    Shapes(CheckpointWeights),
    Random {
        rng: rand_chacha::ChaCha8Rng,
        std: f64,
        /// Draw on the device (its own generator, not reproducible across machines): for
        /// benchmarks of large shapes, whose host-side draws would take minutes.
        on_device: bool,
    },
}

#[derive(Clone, Copy)]
pub(super) enum Init {
    Normal,
    Zeros,
    Ones,
}

pub(super) struct Builder<'a> {
    pub(super) src: Source,
    pub(super) device: &'a Device,
    pub(super) params: Vec<Param>,
    /// With LoRA: which modules get adapters, where adapters come from; `None`: every tensor
    /// is a trainable parameter.
    pub(super) lora: Option<LoraBuild>,
    /// Frozen tensors (LoRA's base), by Hugging Face name.
    pub(super) frozen: Vec<(String, Tensor)>,
}

/// What the builder needs to freeze the base and attach adapters.
pub(super) struct LoraBuild {
    pub(super) cfg: LoraConfig,
    /// The module paths that get adapters (`lora::resolve_targets`).
    pub(super) selected: std::collections::HashSet<String>,
    /// The adapter file to take A, B and saved modules from, when continuing an adapter.
    pub(super) adapter: Option<CheckpointWeights>,
    pub(super) rng: rand_chacha::ChaCha8Rng,
    /// The dtype frozen matrices are kept in (bf16 for bf16 compute: no float32 copy).
    pub(super) frozen_dtype: DType,
    /// Module paths that got adapters, in build order.
    pub(super) targeted: Vec<String>,
}

impl LoraBuild {
    /// Whether tensor `name` belongs to a module trained in full (`modules_to_save`).
    fn saves(&self, name: &str) -> bool {
        let module = name.rsplit_once('.').map(|(m, _)| m).unwrap_or(name);
        lora::module_matches(module, &self.cfg.modules_to_save)
    }
}

impl Builder<'_> {
    pub(super) fn take(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        if let Some(l) = &mut self.lora {
            if l.saves(name) {
                // Trained in full and saved under PEFT's key; continuing an adapter, its copy.
                let key = lora::saved_key(name);
                if let Some(a) = l.adapter.as_mut() {
                    let t = a.get(&key, shape, DType::F32, self.device)?;
                    // The base's own tensor is replaced, not left over.
                    if let Source::Checkpoint(w) = &mut self.src {
                        w.check(name, shape)?;
                    }
                    return self.param(key, t);
                }
                let t = self.read(name, shape, init, DType::F32)?;
                return self.param(key, t);
            }
            let dtype = if shape.len() >= 2 {
                l.frozen_dtype
            } else {
                DType::F32
            };
            let t = self.read(name, shape, init, dtype)?;
            self.frozen.push((name.to_string(), t.clone()));
            return Ok(t);
        }
        let t = self.read(name, shape, init, DType::F32)?;
        self.param(name.to_string(), t)
    }

    /// `t` as a trainable parameter named `name`.
    fn param(&mut self, name: String, t: Tensor) -> Result<Tensor> {
        if matches!(self.src, Source::Shapes(_)) {
            // A header-only placeholder: no variable is made.
            return Ok(t);
        }
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        // transformers decays every matrix and no bias or norm weight.
        self.params.push(Param {
            name,
            decay: t.rank() >= 2,
            var,
        });
        Ok(out)
    }

    /// Tensor `name` from the source, in `dtype`.
    fn read(&mut self, name: &str, shape: &[usize], init: Init, dtype: DType) -> Result<Tensor> {
        let t = match &mut self.src {
            Source::Checkpoint(w) => w.get(name, shape, dtype, self.device)?,
            Source::Shapes(w) => {
                w.check(name, shape)?;
                // A broadcast scalar: the shape without the memory (no variable is made).
                return Ok(Tensor::zeros(1, DType::F32, self.device)?.broadcast_as(shape)?);
            }
            Source::Random {
                rng,
                std,
                on_device,
            } => {
                let n: usize = shape.iter().product();
                match init {
                    Init::Normal if *on_device && !self.device.is_cpu() => {
                        Tensor::randn(0f32, *std as f32, shape, self.device)?
                    }
                    Init::Normal => Tensor::from_vec(normal_vec(rng, n, *std), shape, self.device)?,
                    Init::Zeros => Tensor::zeros(shape, DType::F32, self.device)?,
                    Init::Ones => Tensor::ones(shape, DType::F32, self.device)?,
                }
                .to_dtype(dtype)?
            }
        };
        Ok(t)
    }

    /// Layer `l` under its names `ln`: norms (and the sandwich's post-norms), the attention's
    /// projections and q/k norms, the MLP.
    pub(super) fn layer(&mut self, spec: &ArchSpec, l: usize, ln: &LayerNames) -> Result<Layer> {
        let (h, nh, nkv, d) = (spec.hidden, spec.heads, spec.kv_heads, spec.head_dim);
        let norm1 = self.norm(spec.norm, &ln.norm1, h)?;
        let qkv = match &ln.qkv {
            QkvNames::Separate { q, k, v } => Qkv::Separate(
                self.lin(q, nh * d, h)?,
                self.lin(k, nkv * d, h)?,
                self.lin(v, nkv * d, h)?,
            ),
            QkvNames::Fused(n) => {
                let rows = match spec.qkv {
                    QkvLayout::FusedInterleaved => 3 * nh * d,
                    _ => (nh + 2 * nkv) * d,
                };
                Qkv::Fused(self.lin(n, rows, h)?)
            }
        };
        let o = self.lin(&ln.o, h, nh * d)?;
        // OLMo 2 norms the whole projection, the others each head.
        let whole = spec.qk_norm == Some(QkNorm::WholeRms);
        let q_norm = (ln.q_norm.iter())
            .map(|n| self.take(n, &[if whole { nh * d } else { d }], Init::Ones))
            .collect::<Result<_>>()?;
        let k_norm = (ln.k_norm.iter())
            .map(|n| self.take(n, &[if whole { nkv * d } else { d }], Init::Ones))
            .collect::<Result<_>>()?;
        let norm2 = match &ln.norm2 {
            Some(n) => Some(self.norm(spec.norm, n, h)?),
            None => None,
        };
        let post_norms = match &ln.post_norms {
            Some((p1, p2)) => Some((self.norm(spec.norm, p1, h)?, self.norm(spec.norm, p2, h)?)),
            None => None,
        };
        let mlp = self.mlp(&spec.mlp[l], &ln.mlp, h)?;
        Ok(Layer {
            norm1,
            norm2,
            post_norms,
            local: spec.is_local_layer(l),
            qkv,
            o,
            q_norm,
            k_norm,
            mlp,
            frozen_qkv: None,
        })
    }

    pub(super) fn lin(&mut self, n: &LinearNames, out: usize, inp: usize) -> Result<Lin> {
        let w = self.take(&n.weight, &[out, inp], Init::Normal)?;
        let b = match &n.bias {
            Some(b) => Some(self.take(b, &[out], Init::Zeros)?),
            None => None,
        };
        let module = n.weight.strip_suffix(".weight").unwrap_or(&n.weight);
        let lora = self.adapter(module, out, inp)?;
        Ok(Lin { w, b, lora })
    }

    /// The adapter of linear module `module` (out, inp) if the LoRA configuration targets it:
    /// A and B from the adapter being continued, or newly initialised (B zero, as PEFT).
    fn adapter(&mut self, module: &str, out: usize, inp: usize) -> Result<Option<Adapter>> {
        let Some(l) = &mut self.lora else {
            return Ok(None);
        };
        if !l.selected.contains(module) || matches!(self.src, Source::Shapes(_)) {
            return Ok(None);
        }
        let r = l.cfg.r;
        let (ka, kb) = lora::adapter_keys(module);
        let (a, b) = match l.adapter.as_mut() {
            Some(w) => (
                w.get(&ka, &[r, inp], DType::F32, self.device)?,
                w.get(&kb, &[out, r], DType::F32, self.device)?,
            ),
            None => {
                let a = match l.cfg.init {
                    // kaiming_uniform_(a=√5): gain √(1/3), bound √3 · gain / √in = 1/√in.
                    LoraInit::Default => {
                        let bound = 1.0 / (inp as f64).sqrt();
                        let v: Vec<f32> = (0..r * inp)
                            .map(|_| l.rng.gen_range(-bound..bound) as f32)
                            .collect();
                        Tensor::from_vec(v, (r, inp), self.device)?
                    }
                    LoraInit::Gaussian => Tensor::from_vec(
                        normal_vec(&mut l.rng, r * inp, 1.0 / r as f64),
                        (r, inp),
                        self.device,
                    )?,
                };
                (a, Tensor::zeros((out, r), DType::F32, self.device)?)
            }
        };
        let (scale, dropout) = (l.cfg.scaling(), l.cfg.dropout);
        let index = l.targeted.len() as u64;
        l.targeted.push(module.to_string());
        let a = self.param(ka, a)?;
        let b = self.param(kb, b)?;
        Ok(Some(Adapter {
            a,
            b,
            scale,
            dropout,
            index,
        }))
    }

    pub(super) fn norm(&mut self, spec: NormSpec, n: &NormNames, dim: usize) -> Result<Norm> {
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

    pub(super) fn mlp(&mut self, spec: &MlpSpec, names: &MlpNames, h: usize) -> Result<Mlp> {
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
                    ExpertNames::Stacked { gate_up, down } => Experts::Stacked {
                        gate_up: self.take(gate_up, &[m.experts, 2 * f, h], Init::Normal)?,
                        down: self.take(down, &[m.experts, h, f], Init::Normal)?,
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
pub(super) fn normal_vec(rng: &mut rand_chacha::ChaCha8Rng, n: usize, std: f64) -> Vec<f32> {
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

/// A checkpoint tensor no part of the model read is an error (a config that does not describe
/// the weights), but for buffers transformers also ignores and a tied LM head's copy.
pub(super) fn check_all_read(src: &Source, spec: &ArchSpec, names: &ModelNames) -> Result<()> {
    if let Source::Checkpoint(w) | Source::Shapes(w) = src {
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
    Ok(())
}
