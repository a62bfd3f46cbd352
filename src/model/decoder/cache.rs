//! Decoding with a KV cache: each layer keeps the keys (rotated) and values of every position
//! decoded so far, so a new token costs one position of every layer instead of the whole
//! sequence. The same layers and the same attention arithmetic as the full forward
//! (`Layer::forward_with`, `Layer::qkv`): the new queries see the cached keys causally (and within
//! the sliding window), as the eager attention's mask lets them.

use candle_core::{DType, Device, Tensor};

use super::parts::{FwdCtx, Layer, LocalCtx};
use super::DecoderModel;
use crate::collate::SeqLayout;
use crate::error::{Error, Result};
use crate::model::spec::ArchSpec;
use crate::nn::attention::AttnPlan;
use crate::nn::ops::softmax_last;

/// The keys and values of the positions decoded so far, per layer.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was decoded yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Attention of `q` (n, heads, d) at positions `start..start + n` against every key of the
/// cache (T, kv_heads, d), causal and within `window`, with `scale`.
fn attend_cached(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    start: usize,
    window: Option<usize>,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (n, nh, d) = q.dims3()?;
    let (t, nkv, _) = k.dims3()?;
    let group = nh / nkv;
    let widen = |x: &Tensor| -> Result<Tensor> {
        Ok(x.to_dtype(DType::F32)?
            .unsqueeze(2)?
            .broadcast_as((t, nkv, group, d))?
            .reshape((t, nh, d))?
            .transpose(0, 1)?
            .contiguous()?)
    };
    let (k, v) = (widen(k)?, widen(v)?);
    let q = q.to_dtype(DType::F32)?.transpose(0, 1)?.contiguous()?;
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = match softcap {
        Some(c) => ((scores / c)?.tanh()? * c)?,
        None => scores,
    };
    let mut mask = vec![0f32; n * t];
    for i in 0..n {
        let pos = start + i;
        for j in 0..t {
            if j > pos || window.is_some_and(|w| pos - j >= w) {
                mask[i * t + j] = f32::NEG_INFINITY;
            }
        }
    }
    let mask = Tensor::from_vec(mask, (1, n, t), q.device())?;
    let p = softmax_last(&scores.broadcast_add(&mask)?)?;
    Ok(p.matmul(&v)?.transpose(0, 1)?.reshape((n, nh * d))?)
}

/// Where one sequence's new tokens sit in a decoding batch: the first row among the batch's
/// flattened tokens, how many, and the position of the first (the length its cache holds).
#[derive(Clone, Copy)]
struct Segment {
    row: usize,
    n: usize,
    start: usize,
}

impl Layer {
    /// [`Layer::attention`] for the new positions of every sequence of a decoding batch: the
    /// projections of all of them in one product each, then each sequence's keys and values
    /// appended to its cache (`caches[i].layers[l]`) and its queries attending to that cache.
    fn attention_cached(
        &self,
        s: &ArchSpec,
        h: &Tensor,
        ctx: &FwdCtx,
        segments: &[Segment],
        caches: &mut [KvCache],
        l: usize,
    ) -> Result<Tensor> {
        let (q, k, v) = self.qkv(s, h, ctx)?;
        let window = s.window_of(l);
        let single = segments.len() == 1;
        let mut outs = Vec::with_capacity(segments.len());
        for (seg, cache) in segments.iter().zip(caches.iter_mut()) {
            // A sequence's own rows, copied out of a batch's so its cache does not keep the
            // whole batch's keys alive.
            let own = |t: &Tensor| -> Result<Tensor> {
                Ok(if single {
                    t.clone()
                } else {
                    t.narrow(0, seg.row, seg.n)?.copy()?
                })
            };
            let (kn, vn) = (own(&k)?, own(&v)?);
            let slot = &mut cache.layers[l];
            let (kc, vc) = match slot.take() {
                None => (kn, vn),
                Some((pk, pv)) => (Tensor::cat(&[&pk, &kn], 0)?, Tensor::cat(&[&pv, &vn], 0)?),
            };
            let qn = q.narrow(0, seg.row, seg.n)?;
            let (scale, cap) = (s.attn_scale, s.attn_softcap);
            outs.push(attend_cached(&qn, &kc, &vc, seg.start, window, scale, cap)?);
            *slot = Some((kc, vc));
        }
        let a = if single {
            outs.pop().expect("one")
        } else {
            Tensor::cat(&outs, 0)?
        };
        self.o.fwd(&a.to_dtype(h.dtype())?)
    }
}

impl DecoderModel {
    /// An empty cache for this model.
    pub fn kv_cache(&self) -> KvCache {
        KvCache {
            layers: vec![None; self.layers.len()],
            len: 0,
        }
    }

    /// Runs the tokens `ids` at the positions after those `cache` holds, appending their keys and
    /// values, and returns the logits (1, vocab) of the last of them. Refused for LongRoPE
    /// (whose table depends on the whole sequence's length, which a cache cannot know ahead).
    pub fn decode(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        self.decode_batch(&[ids], std::slice::from_mut(cache))
    }

    /// [`DecoderModel::decode`] for several sequences at once, each with its own cache: their
    /// new tokens go through every projection and MLP as one batch of rows (the products a
    /// single decoding step leaves one row wide), and each attends to its own cache. Returns
    /// the logits (sequences, vocab) of each sequence's last new token.
    pub fn decode_batch(&self, new: &[&[u32]], caches: &mut [KvCache]) -> Result<Tensor> {
        if self.spec.rope.long.is_some() {
            return Err(Error::Config(
                "decoding with a KV cache does not support LongRoPE (phi3 long context); \
                 recompute the sequence instead"
                    .into(),
            ));
        }
        if new.len() != caches.len() || new.is_empty() {
            return Err(Error::Config(format!(
                "decode: {} sequences of new tokens for {} caches",
                new.len(),
                caches.len()
            )));
        }
        let (mut ids, mut positions, mut segments) = (Vec::new(), Vec::new(), Vec::new());
        for (seq, cache) in new.iter().zip(caches.iter()) {
            let (start, n) = (cache.len, seq.len());
            if n == 0 {
                return Err(Error::Config("decode: no token to run".into()));
            }
            if start + n > self.spec.max_positions {
                return Err(Error::Config(format!(
                    "decode: {} positions exceed max_position_embeddings = {}",
                    start + n,
                    self.spec.max_positions
                )));
            }
            if let Some(&id) = seq.iter().find(|&&id| id as usize >= self.spec.vocab) {
                return Err(Error::Config(format!(
                    "decode: token id {id} is outside the model's vocabulary (size {})",
                    self.spec.vocab
                )));
            }
            segments.push(Segment {
                row: ids.len(),
                n,
                start,
            });
            ids.extend_from_slice(seq);
            positions.extend((start..start + n).map(|p| p as u32));
        }
        let ctx = self.decode_ctx(&ids, &positions)?;
        let mut x = self.embed_fwd(&ctx)?.detach();
        for (l, layer) in self.layers.iter().enumerate() {
            let (y, _) = layer.forward_with(&self.spec, &x, |h| {
                layer.attention_cached(&self.spec, h, &ctx, &segments, caches, l)
            })?;
            x = y.detach();
        }
        for (seg, cache) in segments.iter().zip(caches.iter_mut()) {
            cache.len += seg.n;
        }
        let last: Vec<u32> = segments.iter().map(|s| (s.row + s.n - 1) as u32).collect();
        let last = Tensor::new(last.as_slice(), &self.device)?;
        let last = self.final_norm.fwd(&x.index_select(&last, 0)?)?;
        Ok(self.logits(&last)?.detach())
    }

    /// The forward context of decoding `ids` at `positions`: their rotary rows (and the local
    /// layers' own); the attention plans it carries are unused (the cached attention reads the
    /// caches).
    fn decode_ctx(&self, ids: &[u32], positions: &[u32]) -> Result<FwdCtx> {
        let dev: &Device = &self.device;
        let n = ids.len();
        let positions = Tensor::new(positions, dev)?;
        let (cos, sin) = self.rope.gather(&positions, self.compute.dtype)?;
        // A one-token plan: never read (the cached attention reads the caches), and one of all
        // n tokens would build an n x n mask on the host for nothing (a batch's prefill).
        let layout = SeqLayout::Packed {
            cu_seqlens: vec![0, 1],
            max_seqlen: 1,
        };
        let plan = || AttnPlan::new(&layout, 1, None, None, dev, false);
        let local = match (&self.spec.local_layers, &self.local_rope) {
            (None, _) => None,
            (Some(_), table) => {
                let (cos, sin) = match table {
                    Some(t) => t.gather(&positions, self.compute.dtype)?,
                    None => (cos.clone(), sin.clone()),
                };
                Some(LocalCtx {
                    plan: plan()?,
                    cos,
                    sin,
                })
            }
        };
        Ok(FwdCtx {
            ids: Tensor::new(ids, dev)?,
            cos,
            sin,
            plan: plan()?,
            n,
            real_rows: None,
            local,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::D;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        ((a - b).unwrap().abs().unwrap().flatten_all().unwrap())
            .max(D::Minus1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The cached attention of the new positions equals their rows of the full causal attention
    /// (the training path's eager attention), with and without a window and soft-capping.
    #[test]
    fn cached_attention_matches_the_full_causal_attention() {
        let dev = Device::Cpu;
        let rand = |shape: (usize, usize, usize), seed: f32| {
            let n = shape.0 * shape.1 * shape.2;
            let v: Vec<f32> = (0..n).map(|i| ((i as f32 + 1.0) * seed).sin()).collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        let (t, nh, nkv, d) = (7, 4, 2, 8);
        let (q, k, v) = (
            rand((t, nh, d), 0.3),
            rand((t, nkv, d), 0.7),
            rand((t, nkv, d), 1.1),
        );
        let layout = SeqLayout::Packed {
            cu_seqlens: vec![0, t],
            max_seqlen: t,
        };
        for window in [None, Some(3)] {
            for softcap in [None, Some(0.5)] {
                let plan = AttnPlan::new(&layout, t, window, softcap, &dev, false).unwrap();
                let full = crate::nn::attention::eager_attention(&q, &k, &v, &plan, 0.35).unwrap();
                for start in [0, 3, 6] {
                    let part = attend_cached(
                        &q.narrow(0, start, t - start).unwrap(),
                        &k,
                        &v,
                        start,
                        window,
                        0.35,
                        softcap,
                    )
                    .unwrap();
                    let want = full.narrow(0, start, t - start).unwrap();
                    let diff = max_diff(&part, &want);
                    assert!(
                        diff < 1e-6,
                        "window {window:?} cap {softcap:?} start {start}: {diff}"
                    );
                }
            }
        }
        // Soft-capping at 0.5 changes these scores (so the loop above checked it).
        let plan = |c| AttnPlan::new(&layout, t, None, c, &dev, false).unwrap();
        let eager = |c| crate::nn::attention::eager_attention(&q, &k, &v, &plan(c), 0.35).unwrap();
        assert!(max_diff(&eager(None), &eager(Some(0.5))) > 1e-3);
    }
}
