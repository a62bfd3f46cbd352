//! Rotary embedding as a custom op with its backward, and the stacked q/k/v forms: q and k rotated
//! and v copied straight out of one stacked projection, and their gradients joined back.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Shape, Tensor, D,
};
use half::bf16;

use super::launch::*;
use crate::error::Result;
use crate::pullback::Pullback;

struct Rope;

/// The rotation (or its transpose, the gradient) of x (n, heads, d) by cos/sin (n, rot).
fn rope_kernel(
    dev: &CudaDevice,
    x: &CudaView<'_, bf16>,
    cos: &CudaView<'_, bf16>,
    sin: &CudaView<'_, bf16>,
    (n, heads, d): (usize, usize, usize),
    rot: usize,
    backward: bool,
) -> candle_core::Result<CudaSlice<bf16>> {
    let mut y = unsafe { dev.alloc::<bf16>(n * heads * d)? };
    let stream = dev.cuda_stream();
    if rot == d && heads_fit(&stream, &[x, cos, sin], n, heads, d) {
        let row = heads * d;
        let mode = if backward {
            HEADS_ROTATE_BACK
        } else {
            HEADS_ROTATE
        };
        let mut out = y.slice_mut(..);
        rope_heads(
            dev,
            (x, row),
            (cos, sin),
            (&mut out, row),
            (n, heads, d),
            mode,
        )?;
        return Ok(y);
    }
    let f = ops_func(dev, "rope_bf16")?;
    let mut b = stream.launch_builder(&f);
    let (ni, hi, di, ri, bw) = (
        n as i32,
        heads as i32,
        d as i32,
        rot as i32,
        backward as i32,
    );
    b.arg(x)
        .arg(cos)
        .arg(sin)
        .arg(&y)
        .arg(&ni)
        .arg(&hi)
        .arg(&di)
        .arg(&ri)
        .arg(&bw);
    unsafe { b.launch(elementwise_cfg(n * heads * (d - rot / 2))) }.w()?;
    Ok(y)
}

const HEADS_ROTATE: i32 = 0;

const HEADS_ROTATE_BACK: i32 = 1;

const HEADS_COPY: i32 = 2;

/// Whether `rope_heads_bf16` applies: d a multiple of 8, every buffer 8-byte aligned, and its
/// 32-bit thread index enough.
fn heads_fit(
    stream: &std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    bufs: &[&CudaView<'_, bf16>],
    n: usize,
    heads: usize,
    d: usize,
) -> bool {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    d % 8 == 0
        && n * heads * d / 8 < i32::MAX as usize
        && bufs.iter().all(|b| b.device_ptr(stream).0 % 8 == 0)
}

/// `rope_heads_bf16`: (n, heads, d) heads from `input` (rows `in_row` apart) to `out` (rows
/// `out_row` apart), rotated, rotated back or copied (`mode`). cos and sin (n, d) are not read
/// for a copy.
fn rope_heads(
    dev: &CudaDevice,
    (input, in_row): (&CudaView<'_, bf16>, usize),
    (cos, sin): (&CudaView<'_, bf16>, &CudaView<'_, bf16>),
    (out, out_row): (&mut CudaViewMut<'_, bf16>, usize),
    (n, heads, d): (usize, usize, usize),
    mode: i32,
) -> candle_core::Result<()> {
    let f = ops_func(dev, "rope_heads_bf16")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    let (ir, or) = (in_row as i64, out_row as i64);
    let (ni, hi, di) = (n as i32, heads as i32, d as i32);
    b.arg(input).arg(&ir).arg(cos).arg(sin).arg(out).arg(&or);
    b.arg(&ni).arg(&hi).arg(&di).arg(&mode);
    unsafe { b.launch(elementwise_cfg(n * heads * d / 8)) }.w()?;
    Ok(())
}

/// q, k and v of a layer's stacked projection y (n, (heads + 2 kv_heads) d), bf16 on CUDA, as
/// contiguous (n, heads, d), (n, kv_heads, d), (n, kv_heads, d): q and k rotated by cos and sin
/// (n, d), v copied; one pass over y instead of strided copies and then the rotation. `None`
/// where the kernel does not apply (partial rotation, d not a multiple of 8, unaligned buffers).
pub fn rope_split_stacked(
    y: &Tensor,
    (heads, kv_heads, d): (usize, usize, usize),
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let (n, cols) = y.dims2()?;
    let cos = cos.to_dtype(DType::BF16)?.contiguous()?;
    let sin = sin.to_dtype(DType::BF16)?.contiguous()?;
    if cols != (heads + 2 * kv_heads) * d || cos.dim(D::Minus1)? != d || !usable(y) {
        return Ok(None);
    }
    let y = y.contiguous()?;
    Ok(with_storages(&[&y, &cos, &sin], |s| {
        let dev = s[0].0.device.clone();
        let (yv, cv, sv) = (
            cview::<bf16>(s[0].0, s[0].1)?,
            cview::<bf16>(s[1].0, s[1].1)?,
            cview::<bf16>(s[2].0, s[2].1)?,
        );
        if !heads_fit(
            &dev.cuda_stream(),
            &[&yv, &cv, &sv],
            n,
            heads + 2 * kv_heads,
            d,
        ) {
            return Ok(None);
        }
        let mut q = unsafe { dev.alloc::<bf16>((n * heads * d).max(1))? };
        let mut k = unsafe { dev.alloc::<bf16>((n * kv_heads * d).max(1))? };
        let mut v = unsafe { dev.alloc::<bf16>((n * kv_heads * d).max(1))? };
        let parts = [
            (&mut q, 0, heads, HEADS_ROTATE),
            (&mut k, heads, kv_heads, HEADS_ROTATE),
            (&mut v, heads + kv_heads, kv_heads, HEADS_COPY),
        ];
        for (out, first, count, mode) in parts {
            let input = yv.slice(first * d..);
            let mut out = out.slice_mut(..);
            rope_heads(
                &dev,
                (&input, cols),
                (&cv, &sv),
                (&mut out, count * d),
                (n, count, d),
                mode,
            )?;
        }
        Ok(Some((
            wrap(q, &dev, (n, heads, d), &y)?,
            wrap(k, &dev, (n, kv_heads, d), &y)?,
            wrap(v, &dev, (n, kv_heads, d), &y)?,
        )))
    })?)
}

/// The gradient of [`rope_split_stacked`]'s input from its outputs' gradients dq (n, heads, d),
/// dk and dv (n, kv_heads, d): (n, (heads + 2 kv_heads) d), dq and dk rotated back and dv
/// copied, each into its columns in one pass; where the kernel does not apply, rotated back one
/// by one and concatenated.
pub fn rope_join_stacked(
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let (n, heads, d) = dq.dims3()?;
    let kv_heads = dk.dim(1)?;
    let cols = (heads + 2 * kv_heads) * d;
    let cos = cos.to_dtype(DType::BF16)?.contiguous()?;
    let sin = sin.to_dtype(DType::BF16)?.contiguous()?;
    let bf = |t: &Tensor| t.to_dtype(DType::BF16)?.contiguous();
    let (dq, dk, dv) = (bf(dq)?, bf(dk)?, bf(dv)?);
    let shapes_fit = dk.dims3()? == (n, kv_heads, d)
        && dv.dims3()? == (n, kv_heads, d)
        && cos.dim(D::Minus1)? == d
        && usable(&dq);
    if shapes_fit {
        let joined = with_storages(&[&dq, &dk, &dv, &cos, &sin], |s| {
            let dev = s[0].0.device.clone();
            let v = |i: usize| cview::<bf16>(s[i].0, s[i].1);
            let (qv, kv, vv, cv, sv) = (v(0)?, v(1)?, v(2)?, v(3)?, v(4)?);
            let stream = dev.cuda_stream();
            if !heads_fit(
                &stream,
                &[&qv, &kv, &vv, &cv, &sv],
                n,
                heads + 2 * kv_heads,
                d,
            ) {
                return Ok(None);
            }
            let mut dy = unsafe { dev.alloc::<bf16>((n * cols).max(1))? };
            let parts = [
                (&qv, 0, heads, HEADS_ROTATE_BACK),
                (&kv, heads, kv_heads, HEADS_ROTATE_BACK),
                (&vv, heads + kv_heads, kv_heads, HEADS_COPY),
            ];
            for (input, first, count, mode) in parts {
                let mut out = dy.slice_mut(first * d..);
                rope_heads(
                    &dev,
                    (input, count * d),
                    (&cv, &sv),
                    (&mut out, cols),
                    (n, count, d),
                    mode,
                )?;
            }
            Ok(Some(wrap(dy, &dev, (n, cols), &dq)?))
        })?;
        if let Some(t) = joined {
            return Ok(t);
        }
    }
    let back = |g: &Tensor| -> Result<Tensor> {
        let (dx, _, _) = Rope.bwd(g, &cos, &sin, g, g)?;
        let dx = dx.ok_or_else(|| cerr("rope: no dx"))?;
        Ok(dx.reshape((n, ()))?)
    };
    Ok(Tensor::cat(
        &[back(&dq)?, back(&dk)?, dv.reshape((n, ()))?],
        1,
    )?)
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "packsft-rope"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cerr("fused RoPE: CUDA only"))
    }
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        cs: &CudaStorage,
        cl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dims = xl.shape().dims3()?;
        let rot = cl.shape().dims().last().copied().unwrap_or(0);
        let dev = xs.device.clone();
        let (xv, cv, sv) = (
            cview::<bf16>(xs, xl)?,
            cview::<bf16>(cs, cl)?,
            cview::<bf16>(ss, sl)?,
        );
        let y = rope_kernel(&dev, &xv, &cv, &sv, dims, rot, false)?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), xl.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.to_dtype(DType::BF16)?.contiguous()?;
        let dims = dy.dims3()?;
        let rot = cos.dim(candle_core::D::Minus1)?;
        let dx = with_storages(&[&dy, cos, sin], |s| {
            let dev = s[0].0.device.clone();
            let (dv, cv, sv) = (
                cview::<bf16>(s[0].0, s[0].1)?,
                cview::<bf16>(s[1].0, s[1].1)?,
                cview::<bf16>(s[2].0, s[2].1)?,
            );
            let y = rope_kernel(&dev, &dv, &cv, &sv, dims, rot, true)?;
            wrap(y, &dev, dims, &dy)
        })?;
        Ok((Some(dx), None, None))
    }
}

/// Rotary embedding as the reference `nn::ops::apply_rope`: x bf16 (tokens, heads, head_dim), cos and
/// sin (tokens, 1, rotary_dim); no gradient to cos and sin (they are constants).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let cos = cos.to_dtype(DType::BF16)?.contiguous()?;
    let sin = sin.to_dtype(DType::BF16)?.contiguous()?;
    Ok(x.contiguous()?.apply_op3(&cos, &sin, Rope)?)
}

/// [`apply_rope`] with its pullback.
pub fn apply_rope_vjp(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<(Tensor, Pullback<Tensor>)> {
    let cos = cos.to_dtype(DType::BF16)?.contiguous()?.detach();
    let sin = sin.to_dtype(DType::BF16)?.contiguous()?.detach();
    let x = x.contiguous()?.detach();
    let y = x.apply_op3(&cos, &sin, Rope)?;
    let y2 = y.clone();
    let back = move |dy: &Tensor| -> Result<Tensor> {
        let (dx, _, _) = Rope.bwd(&x, &cos, &sin, &y2, dy)?;
        Ok(dx.ok_or_else(|| cerr("rope: no dx"))?)
    };
    Ok((y, Box::new(back)))
}
