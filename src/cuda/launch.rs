//! What every kernel launch here shares: loading this project's PTX modules, views of candle's
//! CUDA buffers, wrapping a kernel's output as a tensor, launch grids.

use std::sync::Mutex;

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaView, LaunchConfig};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Layout, Shape, Storage, Tensor,
};

pub(crate) const OPS_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused_ops.ptx"));

pub(crate) const OPS_MODULE: &str = "packsft_fused_ops";

/// Whether the fused layers apply to `x`: bf16 on a CUDA device.
pub fn usable(x: &Tensor) -> bool {
    x.device().is_cuda() && x.dtype() == DType::BF16
}

/// A kernel of one of this project's PTX modules (loaded once per device by candle).
pub(crate) fn kernel(
    dev: &CudaDevice,
    module: &str,
    ptx: &'static str,
    name: &str,
) -> candle_core::Result<CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(name, module, ptx)?
        .into_cuda_function())
}

pub(crate) fn ops_func(dev: &CudaDevice, name: &str) -> candle_core::Result<CudaFunction> {
    kernel(dev, OPS_MODULE, OPS_PTX, name)
}

pub(crate) fn cerr(msg: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Cuda(msg.into().into())
}

pub(crate) fn cview<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    if !l.is_contiguous() {
        return Err(cerr("fused op: non-contiguous input"));
    }
    let n = l.shape().elem_count();
    Ok(s.as_cuda_slice::<T>()?
        .slice(l.start_offset()..l.start_offset() + n))
}

/// Runs `f` with the CUDA storage and layout of each tensor.
pub(crate) fn with_storages<R>(
    ts: &[&Tensor],
    f: impl FnOnce(&[(&CudaStorage, &Layout)]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut v = Vec::with_capacity(ts.len());
    for (g, l) in &guards {
        match &**g {
            Storage::Cuda(s) => v.push((s, *l)),
            _ => return Err(cerr("fused op: tensor not on CUDA")),
        }
    }
    f(&v)
}

/// A tensor around a device buffer a kernel just wrote (a custom op that only hands it over).
pub(crate) struct Emit(Mutex<Option<CudaStorage>>, Shape);

impl CustomOp1 for Emit {
    fn name(&self) -> &'static str {
        "packsft-emit"
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cerr("packsft-emit: CUDA only"))
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let s = self
            .0
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| cerr("emitted twice"))?;
        Ok((s, self.1.clone()))
    }
}

pub(crate) fn wrap<T: candle_core::cuda_backend::CudaDType>(
    slice: CudaSlice<T>,
    dev: &CudaDevice,
    shape: impl Into<Shape>,
    like: &Tensor,
) -> candle_core::Result<Tensor> {
    let op = Emit(
        Mutex::new(Some(CudaStorage::wrap_cuda_slice(slice, dev.clone()))),
        shape.into(),
    );
    like.apply_op1_no_bwd(&op)
}

/// Blocks of 256 threads: `blocks` of them (at least one), at most `blocks_per_sm` on each of an
/// H100's 132 SMs; the kernels stride over what a smaller grid leaves.
pub(crate) fn grid_cfg(blocks: usize, blocks_per_sm: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.clamp(1, 132 * blocks_per_sm) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One thread per element.
pub(crate) fn elementwise_cfg(n: usize) -> LaunchConfig {
    grid_cfg(n.div_ceil(256), 32)
}
