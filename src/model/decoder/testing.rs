//! What the decoder's unit tests share: deterministic inputs and the distance between tensors.

use candle_core::{Device, Tensor};

/// A tensor of `shape` filled with sin((i + 1) · seed): smooth, deterministic, different per seed.
pub(super) fn values(shape: &[usize], seed: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| ((i as f32 + 1.0) * seed).sin()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// The largest absolute difference of two float32 tensors of one shape.
pub(super) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
    d.max(0).unwrap().to_scalar::<f32>().unwrap()
}
