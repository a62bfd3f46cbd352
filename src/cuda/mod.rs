#[cfg(feature = "flash-attn")]
pub mod flash;
pub mod fused;
