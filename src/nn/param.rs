//! Trainable parameters and the sums of their gradients: what the model exposes and the optimizer
//! updates, kept below both so neither imports the other.

use candle_core::{backprop::GradStore, DType, Tensor, Var};

use crate::error::Result;

/// A trainable parameter under its Hugging Face name.
#[derive(Debug, Clone)]
pub struct Param {
    /// The tensor name it is loaded and saved under (`model.layers.0.self_attn.q_proj.weight`,
    /// ...), also the key of its optimizer state.
    pub name: String,
    /// The tensor the optimizer updates in place (float32 in `DecoderModel`).
    pub var: Var,
    /// Whether AdamW's weight decay applies (not to biases and norm weights, as in transformers).
    pub decay: bool,
}

/// Two gradients of one parameter added: in their dtype where both are float32 or float64,
/// else in float32. The weight matrices' gradients of bf16 compute on CUDA arrive in bf16 for
/// float32 parameters (src/model/decoder/manual.rs), and their sums, like PyTorch's gradient
/// accumulation into a float32 `.grad`, must not round to bf16.
pub fn add_grad(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let wide = |t: &Tensor| matches!(t.dtype(), DType::F32 | DType::F64);
    if a.dtype() == b.dtype() && wide(a) {
        return Ok((a + b)?);
    }
    Ok((a.to_dtype(DType::F32)? + b.to_dtype(DType::F32)?)?)
}

/// Adds the parameter gradients of `src` into `acc`.
pub fn add_grads(acc: &mut GradStore, src: GradStore, params: &[Param]) -> Result<()> {
    for p in params {
        if let Some(g) = src.get(p.var.as_tensor()) {
            let sum = match acc.remove(p.var.as_tensor()) {
                Some(prev) => add_grad(&prev, g)?,
                None => g.clone(),
            };
            acc.insert(p.var.as_tensor(), sum);
        }
    }
    Ok(())
}

/// Adds `src` into `acc` (gradient accumulation over micro-batches).
pub fn accumulate(acc: &mut Option<GradStore>, src: GradStore, params: &[Param]) -> Result<()> {
    match acc {
        None => *acc = Some(src),
        Some(a) => add_grads(a, src, params)?,
    }
    Ok(())
}

/// The name of the first parameter holding a NaN or an infinity, if any (one reduction per
/// parameter: `sum(x * 0)` is NaN exactly when some x is not finite).
pub fn first_non_finite(params: &[Param]) -> Result<Option<String>> {
    for p in params {
        let z = (p.var.as_tensor() * 0.0)?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        if !z.is_finite() {
            return Ok(Some(p.name.clone()));
        }
    }
    Ok(None)
}
