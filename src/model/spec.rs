//! The plain-data description of a decoder that `families` derives from a config.json and
//! `decoder` computes: every structural choice the 14 supported families make, as closed enums.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Act {
    Silu,
    /// Exact erf GELU (`gelu`).
    GeluErf,
    /// tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum NormKind {
    /// `w * x / sqrt(mean(x^2) + eps)` (the product after casting back, as Llama).
    Rms,
    /// Gemma: `x / sqrt(mean(x^2) + eps) * (1 + w)` in float32.
    RmsOneOffset,
    /// `torch.nn.LayerNorm`, with or without bias.
    LayerNorm { bias: bool },
    /// OLMo: layer norm without any parameter.
    NonParametric,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct NormSpec {
    pub kind: NormKind,
    pub eps: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Block {
    /// `x += attn(norm1(x)); x += mlp(norm2(x))`
    Sequential,
    /// `x += attn(norm1(x)) + mlp(norm1(x))` with one shared norm, or with `norm2(x)`.
    Parallel { shared_norm: bool },
    /// OLMo 2: `x += norm1(attn(x)); x += norm2(mlp(x))`, no norm before either.
    PostNorm,
    /// Gemma 2 and 3: `x += post1(attn(norm1(x))); x += post2(mlp(norm2(x)))`.
    Sandwich,
}

/// How the query/key/value projections are stored.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum QkvLayout {
    Separate,
    /// One matrix, rows `[q | k | v]` (Phi-3, DBRX, Falcon multi-query).
    FusedConcat,
    /// Falcon new decoder architecture: rows viewed `(kv_heads, heads/kv_heads + 2, head_dim)`.
    FusedGrouped,
    /// Falcon without multi-query: rows viewed `(heads, 3, head_dim)`.
    FusedInterleaved,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Routing {
    /// Softmax, top-k, weights renormalised to sum 1 (Mixtral; Qwen2-MoE with norm_topk_prob).
    Renormalize,
    /// Softmax, top-k, raw probabilities (Qwen2-MoE default).
    Raw,
    /// Softmax, top-k, divided by their p-norm (DBRX `moe_normalize_expert_weights`).
    PNorm(f64),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MoeSpec {
    pub experts: usize,
    pub top_k: usize,
    pub expert_hidden: usize,
    pub act: Act,
    pub routing: Routing,
    /// DBRX: the router's softmax probabilities (not logits) feed the auxiliary loss.
    pub aux_from_probs: bool,
    /// DBRX: experts stored as three (E * F, H) tensors; Granite MoE: as two stacks (see
    /// `ExpertNames`).
    pub fused_experts: bool,
    /// Qwen2-MoE: a shared expert of this width with a sigmoid gate.
    pub shared_expert: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum MlpSpec {
    /// `down(act(gate(h)) * up(h))`; `fused`: one `gate_up` matrix, gate rows first.
    Gated {
        hidden: usize,
        act: Act,
        bias: bool,
        fused: bool,
    },
    /// `fc2(act(fc1(h)))`.
    Plain {
        hidden: usize,
        act: Act,
        bias: bool,
    },
    Moe(MoeSpec),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RopeSpec {
    pub theta: f64,
    /// Leading channels of each head that rotate (partial rotary below head_dim).
    pub rotary_dim: usize,
    pub inv_freq: Vec<f32>,
    /// Phi-3 LongRoPE: inverse frequencies for sequences longer than `original_max`.
    pub long: Option<LongRope>,
    /// cos and sin are multiplied by this (LongRoPE's attention factor; 1 otherwise).
    pub attention_factor: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LongRope {
    pub inv_freq: Vec<f32>,
    pub original_max: usize,
}

/// Everything the decoder needs to know about one model's architecture, read from its
/// config.json by `families::from_config`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ArchSpec {
    /// The config's `model_type` (`llama`, `granite`, `qwen2_moe`, ...).
    pub family: String,
    /// Vocabulary size: rows of the embedding and of the LM head.
    pub vocab: usize,
    /// Width of the residual stream (`hidden_size`).
    pub hidden: usize,
    /// Number of decoder layers.
    pub layers: usize,
    /// Number of query heads.
    pub heads: usize,
    /// Number of key/value heads (equal to `heads` without grouped-query attention).
    pub kv_heads: usize,
    /// Channels per attention head.
    pub head_dim: usize,
    /// The kind and epsilon of every norm (both per-layer norms and the final one).
    pub norm: NormSpec,
    /// How attention and MLP are arranged in a layer (sequential or parallel).
    pub block: Block,
    /// How the query/key/value projections are stored.
    pub qkv: QkvLayout,
    /// Whether the q/k/v projections have a bias.
    pub qkv_bias: bool,
    /// Whether the attention output projection has a bias.
    pub o_bias: bool,
    /// Clamp q, k and v to [-c, c] after projection.
    pub clip_qkv: Option<f64>,
    /// A norm of each head of q and k before RoPE: StableLM's per-head LayerNorm, Qwen3's
    /// RMSNorm over head_dim with one weight for every head.
    pub qk_norm: Option<QkNorm>,
    /// Query t sees keys t-W < j <= t (transformers' eager semantics), in every layer or, with
    /// `local_layers`, in the local ones.
    pub sliding_window: Option<usize>,
    /// Gemma 2 and 3: which layers are local (attend within `sliding_window`; the others see
    /// every earlier key). `None`: the window, if any, applies to every layer.
    pub local_layers: Option<Vec<bool>>,
    /// Gemma 3: the rotary settings of the local layers (their own base, no scaling).
    pub local_rope: Option<RopeSpec>,
    /// Gemma 2: attention scores become `c * tanh(s / c)` before the mask and the softmax.
    pub attn_softcap: Option<f64>,
    /// Gemma 2: logits become `c * tanh(l / c)` (after `logits_scaling`).
    pub final_softcap: Option<f64>,
    /// Factor applied to `q . k` before the softmax: `1 / sqrt(head_dim)`, or Granite's
    /// `attention_multiplier`.
    pub attn_scale: f64,
    /// One entry per layer (Qwen2-MoE mixes dense and sparse layers).
    pub mlp: Vec<MlpSpec>,
    /// Rotary position embedding settings.
    pub rope: RopeSpec,
    /// `max_position_embeddings`: the longest sequence the model accepts, and the rows of the
    /// rotary tables.
    pub max_positions: usize,
    /// Granite's embedding multiplier, Gemma's sqrt(hidden).
    pub embedding_multiplier: f64,
    /// In a sequential block, the attention and MLP outputs are multiplied by this before they
    /// join the residual stream (Granite; 1 otherwise).
    pub residual_multiplier: f64,
    /// Logits are divided by this (Granite).
    pub logits_scaling: f64,
    /// Whether the LM head reuses the embedding matrix instead of having its own weight.
    pub tie_embeddings: bool,
    /// Whether the LM head has a bias (Phi).
    pub lm_head_bias: bool,
    /// The embedding's `padding_idx`: that row gets no gradient from input lookups.
    pub padding_idx: Option<u32>,
    /// Coefficient of the router load-balancing loss added to the training loss (None: off).
    pub router_aux_loss_coef: Option<f64>,
}

impl ArchSpec {
    /// Whether layer `l` attends within `sliding_window` while others do not (Gemma 2 and 3).
    pub fn is_local_layer(&self, l: usize) -> bool {
        self.local_layers.as_ref().is_some_and(|v| v[l])
    }

    /// The window layer `l` attends within (None: every earlier key).
    pub fn window_of(&self, l: usize) -> Option<usize> {
        match &self.local_layers {
            None => self.sliding_window,
            Some(v) => self.sliding_window.filter(|_| v[l]),
        }
    }

    /// The number of layers whose MLP is a mixture of experts.
    pub fn moe_layers(&self) -> usize {
        self.mlp
            .iter()
            .filter(|m| matches!(m, MlpSpec::Moe(_)))
            .count()
    }
}

/// How q and k are normalised per head before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum QkNorm {
    /// A LayerNorm without bias for each head, each with its own weight (StableLM).
    PerHeadLayerNorm,
    /// One RMSNorm over head_dim whose weight every head shares (Qwen3).
    SharedRms,
    /// One RMSNorm over the whole projection, all heads together (OLMo 2's `q_norm` of width
    /// heads * head_dim, `k_norm` of kv_heads * head_dim).
    WholeRms,
    /// Gemma 3: one RMSNorm over head_dim, every head sharing its weight, computed as Gemma's
    /// norms are (float32, `(1 + w)`).
    SharedRmsOneOffset,
}

/// Hugging Face parameter names of a linear layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearNames {
    pub weight: String,
    pub bias: Option<String>,
}

impl LinearNames {
    pub fn new(prefix: &str, bias: bool) -> Self {
        Self {
            weight: format!("{prefix}.weight"),
            bias: bias.then(|| format!("{prefix}.bias")),
        }
    }
}

/// Names of a norm's parameters (none for a non-parametric norm).
#[derive(Debug, Clone, PartialEq)]
pub struct NormNames {
    pub prefix: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum QkvNames {
    Separate {
        q: LinearNames,
        k: LinearNames,
        v: LinearNames,
    },
    Fused(LinearNames),
}

#[derive(Debug, Clone, PartialEq)]
pub enum MlpNames {
    Gated {
        gate: LinearNames,
        up: LinearNames,
        down: LinearNames,
    },
    GatedFused {
        gate_up: LinearNames,
        down: LinearNames,
    },
    Plain {
        fc1: LinearNames,
        fc2: LinearNames,
    },
    Moe {
        router: LinearNames,
        /// Per expert (gate, up, down), or for fused experts the three (E * F, H) tensors.
        experts: ExpertNames,
        shared: Option<(Box<MlpNames>, LinearNames)>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum ExpertNames {
    Separate(Vec<(LinearNames, LinearNames, LinearNames)>),
    Fused {
        w1: String,
        v1: String,
        w2: String,
    },
    /// Granite MoE: `gate_up` (E, 2F, H), gate rows first, and `down` (E, H, F).
    Stacked {
        gate_up: String,
        down: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct LayerNames {
    pub norm1: NormNames,
    /// None for a parallel block with one shared norm.
    pub norm2: Option<NormNames>,
    pub qkv: QkvNames,
    pub o: LinearNames,
    /// Per-head q / k norm weights (StableLM qk_layernorm).
    pub q_norm: Vec<String>,
    pub k_norm: Vec<String>,
    /// `Block::Sandwich`: the norms after attention and after the MLP.
    pub post_norms: Option<(NormNames, NormNames)>,
    pub mlp: MlpNames,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelNames {
    pub embed: String,
    pub final_norm: NormNames,
    pub lm_head: LinearNames,
    pub layers: Vec<LayerNames>,
}

impl ModelNames {
    /// The module path of every linear layer but the output projection, in layer order
    /// (`model.layers.0.self_attn.q_proj`, ...): what LoRA's `all-linear` targets.
    pub fn linear_modules(&self) -> Vec<String> {
        fn module(n: &LinearNames) -> String {
            n.weight
                .strip_suffix(".weight")
                .unwrap_or(&n.weight)
                .to_string()
        }
        fn mlp(m: &MlpNames, out: &mut Vec<String>) {
            match m {
                MlpNames::Gated { gate, up, down } => {
                    out.extend([module(gate), module(up), module(down)])
                }
                MlpNames::GatedFused { gate_up, down } => {
                    out.extend([module(gate_up), module(down)])
                }
                MlpNames::Plain { fc1, fc2 } => out.extend([module(fc1), module(fc2)]),
                MlpNames::Moe {
                    router,
                    experts,
                    shared,
                } => {
                    out.push(module(router));
                    if let ExpertNames::Separate(v) = experts {
                        for (g, u, d) in v {
                            out.extend([module(g), module(u), module(d)]);
                        }
                    }
                    if let Some((m, gate)) = shared {
                        mlp(m, out);
                        out.push(module(gate));
                    }
                }
            }
        }
        let mut out = Vec::new();
        for l in &self.layers {
            match &l.qkv {
                QkvNames::Separate { q, k, v } => out.extend([module(q), module(k), module(v)]),
                QkvNames::Fused(n) => out.push(module(n)),
            }
            out.push(module(&l.o));
            mlp(&l.mlp, &mut out);
        }
        out
    }
}
