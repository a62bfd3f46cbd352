//! This project's CUDA kernels (feature `cuda`; flash attention with `flash-attn`), each measured
//! against the chain of candle ops it replaces (docs/BENCHMARKS.md) and tested against the
//! reference formulation in `nn::ops` (tests/gpu_ops.rs, tests/flash_attn.rs, tests/gpu_optim.rs).
//! Only `nn::kernels` and `nn::attention` choose them; this room imports nothing above the
//! ground floor.

#[cfg(feature = "flash-attn")]
pub mod flash;
mod gather;
mod gemm;
pub(crate) mod launch;
mod layers;
mod loss;
mod optim;
mod rope;

pub use gather::{index_rows, index_rows_grad};
pub use gemm::weight_grad_bf16;
pub use launch::usable;
pub use layers::{add, rms_norm, rms_norm_fits, rms_norm_vjp, silu_mul, silu_mul_vjp};
pub use loss::{nll, nll_with_backward};
pub use optim::{adamw_step, cast_bf16_into, read_norm, AdamWSlot, AdamWStep};
pub use rope::{apply_rope, apply_rope_vjp, rope_join_stacked, rope_split_stacked};
