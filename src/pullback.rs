//! Pieces of a hand-written backward pass: a forward that returns its output together with its
//! pullback, the function from the output's gradient to the inputs' gradients (a
//! vector-Jacobian product). The decoder layers use them (src/model/decoder/manual.rs) to
//! differentiate a whole layer without candle's autograd, whose bookkeeping (a zero-filled
//! buffer and an add for every edge of the graph) cost more GPU time than the layers' matrix
//! products on the padding-free benchmark.

use candle_core::{Tensor, Var};

use crate::error::{Error, Result};

/// Maps the gradient of a piece's output to what the piece hands back (its inputs' gradients).
pub type Pullback<T> = Box<dyn FnOnce(&Tensor) -> Result<T> + Send>;

/// The gradients of a two-input piece (x and a norm's weight; a gated product's two inputs).
pub type PairGrads = (Tensor, Tensor);

/// The gradients of an attention's q, k and v.
pub type QkvGrads = (Tensor, Tensor, Tensor);

/// Runs `f` on leaf variables that share `inputs`' storage and keeps its graph: the output
/// (detached) and a pullback through candle's autograd, one gradient per input (`None` where
/// the output does not depend on it). For pieces without a backward of their own.
pub fn through_autograd(
    inputs: &[&Tensor],
    f: impl FnOnce(&[Tensor]) -> Result<Tensor>,
) -> Result<(Tensor, Pullback<Vec<Option<Tensor>>>)> {
    let leaves = inputs
        .iter()
        .map(|t| Ok(Var::from_tensor(&t.detach())?.as_tensor().clone()))
        .collect::<Result<Vec<Tensor>>>()?;
    let out = f(&leaves)?;
    let detached = out.detach();
    let back = move |dy: &Tensor| -> Result<Vec<Option<Tensor>>> {
        // d/d(leaves) of sum(out * dy) is the vector-Jacobian product with dy.
        let dy = dy.to_dtype(out.dtype())?.detach();
        let grads = (&out * dy)?.sum_all()?.backward()?;
        Ok(leaves.iter().map(|t| grads.get(t).cloned()).collect())
    };
    Ok((detached, Box::new(back)))
}

/// The gradient a pullback returned for `like`, zeros where the piece gave none (an input its
/// output does not read).
pub fn grad_or_zeros(g: Option<Tensor>, like: &Tensor) -> Result<Tensor> {
    match g {
        Some(g) => Ok(g),
        None => Ok(like.zeros_like()?),
    }
}

/// An error of a hand-written backward as candle reports errors inside its backward pass.
pub fn to_candle(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn through_autograd_gives_the_vector_jacobian_product() -> Result<()> {
        let dev = Device::Cpu;
        let a = Tensor::new(&[1f32, 2., 3.], &dev)?;
        let b = Tensor::new(&[4f32, 5., 6.], &dev)?;
        let unused = Tensor::new(&[7f32], &dev)?;
        let (y, back) = through_autograd(&[&a, &b, &unused], |t| Ok((&t[0] * &t[1])?.sqr()?))?;
        assert_eq!(y.to_vec1::<f32>()?, vec![16., 100., 324.]);
        let dy = Tensor::new(&[1f32, 0.5, -1.], &dev)?;
        let g = back(&dy)?;
        // y = (ab)^2: dy/da = 2 a b^2, dy/db = 2 a^2 b.
        assert_eq!(
            g[0].as_ref().unwrap().to_vec1::<f32>()?,
            vec![32., 50., -216.]
        );
        assert_eq!(
            g[1].as_ref().unwrap().to_vec1::<f32>()?,
            vec![8., 20., -108.]
        );
        assert!(g[2].is_none());
        Ok(())
    }
}
