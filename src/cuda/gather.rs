//! Row gathers (embedding lookups, the rows that carry loss) and their atomic scatter-add backward,
//! for float32 and bf16 tables.

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape, Tensor};
use half::bf16;

use super::launch::*;
use crate::error::Result;

struct RowGather;

impl CustomOp2 for RowGather {
    fn name(&self) -> &'static str {
        "packsft-row-gather"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cerr("fused row gather: CUDA only"))
    }
    fn cuda_fwd(
        &self,
        ts: &CudaStorage,
        tl: &Layout,
        is: &CudaStorage,
        il: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (_, cols) = tl.shape().dims2()?;
        let n = il.shape().elem_count();
        let dev = ts.device.clone();
        let idx = cview::<u32>(is, il)?;
        let (ni, ci) = (n as i32, cols as i32);
        let stream = dev.cuda_stream();
        let storage = match candle_core::backend::BackendStorage::dtype(ts) {
            DType::F32 => {
                let (t, y) = (cview::<f32>(ts, tl)?, unsafe {
                    dev.alloc::<f32>(n * cols)?
                });
                let f = ops_func(&dev, "gather_rows_f32")?;
                let mut b = stream.launch_builder(&f);
                b.arg(&t).arg(&idx).arg(&y).arg(&ni).arg(&ci);
                unsafe { b.launch(grid_cfg(n, 16)) }.w()?;
                CudaStorage::wrap_cuda_slice(y, dev.clone())
            }
            DType::BF16 => {
                let (t, y) = (cview::<bf16>(ts, tl)?, unsafe {
                    dev.alloc::<bf16>(n * cols)?
                });
                let f = ops_func(&dev, "gather_rows_bf16")?;
                let mut b = stream.launch_builder(&f);
                b.arg(&t).arg(&idx).arg(&y).arg(&ni).arg(&ci);
                unsafe { b.launch(grid_cfg(n, 16)) }.w()?;
                CudaStorage::wrap_cuda_slice(y, dev.clone())
            }
            other => return Err(cerr(format!("fused row gather: {other:?} table"))),
        };
        Ok((storage, Shape::from((n, cols))))
    }
    fn bwd(
        &self,
        table: &Tensor,
        idx: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(scatter_rows(table, idx, dy)?), None))
    }
}

/// The table gradient of a row gather: a zero table of `table`'s shape and dtype with row i of
/// `dy` added into row `idx[i]` (one atomic per element; repeated indices sum in an unspecified
/// order). `idx` holds u32, contiguous.
fn scatter_rows(table: &Tensor, idx: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, ValidAsZeroBits};
    fn launch<T>(
        table: &Tensor,
        idx: &Tensor,
        dy: &Tensor,
        kernel: &str,
    ) -> candle_core::Result<Tensor>
    where
        T: candle_core::cuda_backend::CudaDType + DeviceRepr + ValidAsZeroBits,
    {
        let (rows, cols) = table.dims2()?;
        let n = idx.elem_count();
        with_storages(&[idx, dy], |s| {
            let dev = s[0].0.device.clone();
            let (iv, d) = (cview::<u32>(s[0].0, s[0].1)?, cview::<T>(s[1].0, s[1].1)?);
            let out = dev.alloc_zeros::<T>(rows * cols)?;
            let f = ops_func(&dev, kernel)?;
            let (ni, ci) = (n as i32, cols as i32);
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&d).arg(&iv).arg(&out).arg(&ni).arg(&ci);
            unsafe { b.launch(grid_cfg(n, 16)) }.w()?;
            wrap(out, &dev, (rows, cols), table)
        })
    }
    let dy = dy.to_dtype(table.dtype())?.contiguous()?;
    match table.dtype() {
        DType::F32 => launch::<f32>(table, idx, &dy, "scatter_add_rows_f32"),
        DType::BF16 => launch::<bf16>(table, idx, &dy, "scatter_add_rows_bf16"),
        other => Err(cerr(format!("fused row scatter: {other:?} table"))),
    }
}

/// `table.index_select(idx, 0)` for a float32 or bf16 table (rows, cols) on CUDA: the same
/// rows, and a backward that adds each row's gradient into its table row with one atomic per
/// element (so repeated indices sum in an unspecified order) instead of candle's index_add,
/// which visits every index for every element of the table.
pub fn index_rows(table: &Tensor, idx: &Tensor) -> Result<Tensor> {
    let idx = idx.to_dtype(DType::U32)?.flatten_all()?.contiguous()?;
    Ok(table.contiguous()?.apply_op2(&idx, RowGather)?)
}

/// The table gradient of [`index_rows`] for `dy` (one row per index), outside the graph.
pub fn index_rows_grad(table: &Tensor, idx: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let idx = idx.to_dtype(DType::U32)?.flatten_all()?.contiguous()?;
    Ok(scatter_rows(table, &idx, dy)?)
}
