#![doc = include_str!("README.md")]

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
pub use gemm::{matmul_bf16, weight_grad_bf16, weight_grad_bf16_scaled};
pub use launch::usable;
pub use layers::{add, rms_norm, rms_norm_fits, rms_norm_vjp, silu_mul, silu_mul_vjp};
pub use loss::{nll, nll_with_backward};
pub use optim::{
    adamw_step, cast_bf16_into, flatten_f32, read_norm, AdamWSlot, AdamWStep, SumSquares,
};
pub use rope::{apply_rope, apply_rope_vjp, rope_join_stacked, rope_split_stacked};
