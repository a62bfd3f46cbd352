//! Decoding with a KV cache: each layer keeps the keys (rotated) and values of every position
//! decoded so far, so a new token costs one position of every layer instead of the whole
//! sequence. The same layers and the same attention arithmetic as the full forward
//! (`Layer::forward_with`, `Layer::qkv`): the new queries see the cached keys causally (and within
//! the sliding window), as the eager attention's mask lets them.
//!
//! Two caches: [`KvCache`] holds one sequence (`DecoderModel::decode`); [`BatchKvCache`] holds a
//! batch of sequences decoded in step (`DecoderModel::prefill`, `DecoderModel::decode_step`),
//! right-aligned in one tensor per layer so that a step attends with a few products for the
//! whole batch. Attending sequence by sequence had cost about 20 launches and a mask upload per
//! sequence and layer: on an H100, batch 8 decoded only 2x the tokens/s of batch 1
//! (docs/BENCHMARKS.md).

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

/// The keys and values of a batch of sequences decoded in step. Row `b` holds its positions in
/// columns `pad[b]..cols` (prompts right-aligned to the longest), so each step writes one column
/// for every row.
pub struct BatchKvCache {
    /// Per layer: keys and values (rows, kv_heads, capacity, head_dim), written in place.
    layers: Vec<(Tensor, Tensor)>,
    /// Each row's leading empty columns (its prompt's shortfall from the longest).
    pad: Vec<usize>,
    /// Columns written so far.
    cols: usize,
}

impl BatchKvCache {
    /// Sequences held.
    pub fn rows(&self) -> usize {
        self.pad.len()
    }

    /// Positions held by row `b` (its prompt and the tokens decoded after it).
    pub fn len_of(&self, b: usize) -> usize {
        self.cols - self.pad[b]
    }

    /// Keeps only the rows `keep` (indices among the current rows, in the order given): a
    /// finished sequence leaves the batch, and later steps no longer compute it.
    pub fn retain(&mut self, keep: &[usize]) -> Result<()> {
        if let Some(&b) = keep.iter().find(|&&b| b >= self.rows()) {
            return Err(Error::Config(format!(
                "batch cache: row {b} kept of {} rows",
                self.rows()
            )));
        }
        if keep.len() == self.rows() && keep.iter().enumerate().all(|(i, &b)| i == b) {
            return Ok(());
        }
        let Some((k0, _)) = self.layers.first() else {
            return Err(Error::Config("batch cache: nothing prefilled".into()));
        };
        let idx: Vec<u32> = keep.iter().map(|&b| b as u32).collect();
        let idx = Tensor::new(idx.as_slice(), k0.device())?;
        for (k, v) in &mut self.layers {
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        self.pad = keep.iter().map(|&b| self.pad[b]).collect();
        // Columns every remaining row leaves empty are dropped from the front.
        let drop = self.pad.iter().copied().min().unwrap_or(0);
        if drop > 0 {
            for (k, v) in &mut self.layers {
                let cap = k.dim(2)?;
                *k = k.narrow(2, drop, cap - drop)?.contiguous()?;
                *v = v.narrow(2, drop, cap - drop)?.contiguous()?;
            }
            self.pad.iter_mut().for_each(|p| *p -= drop);
            self.cols -= drop;
        }
        Ok(())
    }

    /// Room for `more` columns after those written, the buffers doubled when full.
    fn reserve(&mut self, more: usize) -> Result<()> {
        for (k, v) in &mut self.layers {
            let (rows, nkv, cap, d) = k.dims4()?;
            if self.cols + more <= cap {
                continue;
            }
            let grown = (self.cols + more).max(2 * cap);
            for t in [k, v] {
                let bigger = Tensor::zeros((rows, nkv, grown, d), t.dtype(), t.device())?;
                bigger.slice_set(t, 2, 0)?;
                *t = bigger;
            }
        }
        Ok(())
    }

    /// The additive mask (rows, 1, 1, cols + 1) of a step's queries, one per row at column
    /// `cols`: a row sees its own columns, within `window` keys of its query; None where every
    /// row sees every column.
    fn step_mask(&self, window: Option<usize>, device: &Device) -> Result<Option<Tensor>> {
        let t = self.cols + 1;
        let first = |b: usize| match window {
            Some(w) => self.pad[b].max(t.saturating_sub(w)),
            None => self.pad[b],
        };
        if (0..self.rows()).all(|b| first(b) == 0) {
            return Ok(None);
        }
        let mut mask = vec![0f32; self.rows() * t];
        for b in 0..self.rows() {
            mask[b * t..b * t + first(b)].fill(f32::NEG_INFINITY);
        }
        Ok(Some(Tensor::from_vec(
            mask,
            (self.rows(), 1, 1, t),
            device,
        )?))
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

/// Where one prompt's tokens sit among a prefill's flattened tokens: the first row, and how many.
#[derive(Clone, Copy)]
struct Segment {
    row: usize,
    n: usize,
}

impl Layer {
    /// [`Layer::attention`] for the new positions of one sequence: their keys and values
    /// appended to its cache (`cache.layers[l]`) and its queries attending to that cache.
    fn attention_cached(
        &self,
        s: &ArchSpec,
        h: &Tensor,
        ctx: &FwdCtx,
        cache: &mut KvCache,
        l: usize,
    ) -> Result<Tensor> {
        let (q, k, v) = self.qkv(s, h, ctx)?;
        let slot = &mut cache.layers[l];
        let (kc, vc) = match slot.take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 0)?, Tensor::cat(&[&pv, &v], 0)?),
        };
        let (scale, cap) = (s.attn_scale, s.attn_softcap);
        let a = attend_cached(&q, &kc, &vc, cache.len, s.window_of(l), scale, cap)?;
        *slot = Some((kc, vc));
        self.o.fwd(&a.to_dtype(h.dtype())?)
    }
}

impl Layer {
    /// [`Layer::attention`] for the prompts of a batch cache: every prompt's projections in one
    /// product each, each prompt's queries attending to its own keys (once per generation), and
    /// its keys and values written right-aligned into row `b` of the layer's buffers.
    fn attention_prefill(
        &self,
        s: &ArchSpec,
        h: &Tensor,
        ctx: &FwdCtx,
        segments: &[Segment],
        kv: &(Tensor, Tensor),
        l: usize,
    ) -> Result<Tensor> {
        let (q, k, v) = self.qkv(s, h, ctx)?;
        let cols = segments.iter().map(|g| g.n).max().unwrap_or(0);
        let mut outs = Vec::with_capacity(segments.len());
        for (b, g) in segments.iter().enumerate() {
            let (kn, vn) = (k.narrow(0, g.row, g.n)?, v.narrow(0, g.row, g.n)?);
            let qn = q.narrow(0, g.row, g.n)?;
            let (scale, cap) = (s.attn_scale, s.attn_softcap);
            outs.push(attend_cached(&qn, &kn, &vn, 0, s.window_of(l), scale, cap)?);
            // (n, kv_heads, d) → (1, kv_heads, n, d) at columns cols - n.. of row b.
            let put = |buf: &Tensor, x: &Tensor| -> Result<()> {
                let x = x.transpose(0, 1)?.unsqueeze(0)?.to_dtype(buf.dtype())?;
                let x = x.contiguous()?;
                Ok(buf.narrow(0, b, 1)?.slice_set(&x, 2, cols - g.n)?)
            };
            put(&kv.0, &kn)?;
            put(&kv.1, &vn)?;
        }
        let a = if outs.len() == 1 {
            outs.pop().expect("one")
        } else {
            Tensor::cat(&outs, 0)?
        };
        self.o.fwd(&a.to_dtype(h.dtype())?)
    }

    /// [`Layer::attention`] for one new token of every row of a batch cache: its key and value
    /// written at column `col` of the layer's buffers, then one product for the scores of all
    /// rows and heads (query heads grouped by their key/value head, no widened copies), the
    /// step's `mask`, a softmax and one product with the values.
    fn attention_step(
        &self,
        s: &ArchSpec,
        h: &Tensor,
        ctx: &FwdCtx,
        kv: &(Tensor, Tensor),
        col: usize,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (q, k, v) = self.qkv(s, h, ctx)?;
        let (rows, nh, d) = q.dims3()?;
        let nkv = k.dim(1)?;
        for (buf, x) in [(&kv.0, &k), (&kv.1, &v)] {
            let x = x.unsqueeze(2)?.to_dtype(buf.dtype())?.contiguous()?;
            buf.slice_set(&x, 2, col)?;
        }
        let seen = |buf: &Tensor| -> Result<Tensor> {
            Ok(buf.narrow(2, 0, col + 1)?.to_dtype(DType::F32)?)
        };
        let (keys, values) = (seen(&kv.0)?, seen(&kv.1)?);
        // Query head h reads key/value head h / group: (rows, kv_heads, group, d).
        let q = q.to_dtype(DType::F32)?.reshape((rows, nkv, nh / nkv, d))?;
        let scores = (q.matmul(&keys.t()?)? * s.attn_scale)?;
        let scores = match s.attn_softcap {
            Some(c) => ((scores / c)?.tanh()? * c)?,
            None => scores,
        };
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let a = softmax_last(&scores)?
            .matmul(&values)?
            .reshape((rows, nh * d))?;
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
    /// Several sequences decode together through [`DecoderModel::prefill`] and
    /// [`DecoderModel::decode_step`].
    pub fn decode(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        self.check_cacheable()?;
        let start = cache.len;
        self.check_new(ids, start)?;
        let positions: Vec<u32> = (start..start + ids.len()).map(|p| p as u32).collect();
        let ctx = self.decode_ctx(ids, &positions)?;
        let mut x = self.embed_fwd(&ctx)?.detach();
        for (l, layer) in self.layers.iter().enumerate() {
            let (y, _) = layer.forward_with(&self.spec, &x, |h| {
                layer.attention_cached(&self.spec, h, &ctx, cache, l)
            })?;
            x = y.detach();
        }
        cache.len += ids.len();
        self.last_logits(&x, &[ids.len() as u32 - 1])
    }

    /// Runs every prompt of a batch from position 0 into a new [`BatchKvCache`] with room for
    /// `reserve` more tokens a row (it grows when they run out), and returns the logits
    /// (prompts, vocab) of each prompt's last token. Then [`DecoderModel::decode_step`].
    pub fn prefill(&self, prompts: &[&[u32]], reserve: usize) -> Result<(Tensor, BatchKvCache)> {
        self.check_cacheable()?;
        if prompts.is_empty() {
            return Err(Error::Config("prefill: no prompt".into()));
        }
        let (mut ids, mut positions, mut segments) = (Vec::new(), Vec::new(), Vec::new());
        for seq in prompts {
            self.check_new(seq, 0)?;
            segments.push(Segment {
                row: ids.len(),
                n: seq.len(),
            });
            ids.extend_from_slice(seq);
            positions.extend((0..seq.len()).map(|p| p as u32));
        }
        let cols = segments.iter().map(|g| g.n).max().unwrap_or(0);
        let (rows, cap) = (prompts.len(), cols + reserve.max(1));
        let ctx = self.decode_ctx(&ids, &positions)?;
        let mut cache = BatchKvCache {
            layers: Vec::with_capacity(self.layers.len()),
            pad: segments.iter().map(|g| cols - g.n).collect(),
            cols,
        };
        let mut x = self.embed_fwd(&ctx)?.detach();
        for (l, layer) in self.layers.iter().enumerate() {
            let s = &self.spec;
            let (nkv, d) = (s.kv_heads, s.head_dim);
            let zeros = || Tensor::zeros((rows, nkv, cap, d), self.compute.dtype, &self.device);
            let kv = (zeros()?, zeros()?);
            let (y, _) = layer.forward_with(s, &x, |h| {
                layer.attention_prefill(s, h, &ctx, &segments, &kv, l)
            })?;
            cache.layers.push(kv);
            x = y.detach();
        }
        let last: Vec<u32> = segments.iter().map(|g| (g.row + g.n - 1) as u32).collect();
        Ok((self.last_logits(&x, &last)?, cache))
    }

    /// One token `next[b]` for every row `b` of `cache`, at the position after the row's last:
    /// returns the logits (rows, vocab) of those tokens.
    pub fn decode_step(&self, next: &[u32], cache: &mut BatchKvCache) -> Result<Tensor> {
        if cache.rows() == 0 {
            return Err(Error::Config(
                "decode_step: the batch has no rows left".into(),
            ));
        }
        if next.len() != cache.rows() {
            return Err(Error::Config(format!(
                "decode_step: {} tokens for a batch of {} rows",
                next.len(),
                cache.rows()
            )));
        }
        let mut positions = Vec::with_capacity(next.len());
        for (b, &id) in next.iter().enumerate() {
            let start = cache.len_of(b);
            self.check_new(&[id], start)?;
            positions.push(start as u32);
        }
        cache.reserve(1)?;
        let ctx = self.decode_ctx(next, &positions)?;
        // One mask per distinct window (global and local layers), built once for every layer.
        let mut masks: Vec<(Option<usize>, Option<Tensor>)> = Vec::new();
        let mut x = self.embed_fwd(&ctx)?.detach();
        for (l, layer) in self.layers.iter().enumerate() {
            let window = self.spec.window_of(l);
            if !masks.iter().any(|(w, _)| *w == window) {
                masks.push((window, cache.step_mask(window, &self.device)?));
            }
            let mask = masks
                .iter()
                .find(|(w, _)| *w == window)
                .and_then(|m| m.1.as_ref());
            let kv = &cache.layers[l];
            let (y, _) = layer.forward_with(&self.spec, &x, |h| {
                layer.attention_step(&self.spec, h, &ctx, kv, cache.cols, mask)
            })?;
            x = y.detach();
        }
        cache.cols += 1;
        let last: Vec<u32> = (0..next.len() as u32).collect();
        self.last_logits(&x, &last)
    }

    /// The logits (rows, vocab) of the hidden rows `x[last]`.
    fn last_logits(&self, x: &Tensor, last: &[u32]) -> Result<Tensor> {
        let last = Tensor::new(last, &self.device)?;
        let last = self.final_norm.fwd(&x.index_select(&last, 0)?)?;
        Ok(self.logits(&last)?.detach())
    }

    /// Decoding with a cache needs the rotary rows of a position not to depend on the length of
    /// the whole sequence: LongRoPE's do.
    fn check_cacheable(&self) -> Result<()> {
        if self.spec.rope.long.is_some() {
            return Err(Error::Config(
                "decoding with a KV cache does not support LongRoPE (phi3 long context); \
                 recompute the sequence instead"
                    .into(),
            ));
        }
        Ok(())
    }

    /// New tokens `seq` at positions `start..`: at least one, within the model's positions and
    /// vocabulary.
    fn check_new(&self, seq: &[u32], start: usize) -> Result<()> {
        if seq.is_empty() {
            return Err(Error::Config("decode: no token to run".into()));
        }
        if start + seq.len() > self.spec.max_positions {
            return Err(Error::Config(format!(
                "decode: {} positions exceed max_position_embeddings = {}",
                start + seq.len(),
                self.spec.max_positions
            )));
        }
        if let Some(&id) = seq.iter().find(|&&id| id as usize >= self.spec.vocab) {
            return Err(Error::Config(format!(
                "decode: token id {id} is outside the model's vocabulary (size {})",
                self.spec.vocab
            )));
        }
        Ok(())
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
    use super::super::testing::max_diff;
    use super::*;

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

    /// A batch cache's logits equal those of one cache a sequence, after the prompts and at
    /// every step: prompts of different lengths, the longest leaving the batch (its columns
    /// dropped from the front), buffers grown past the reserve, a window shorter than the
    /// sequences, GQA, and Gemma 2's local and global layers with soft-capped scores.
    #[test]
    fn batch_cache_matches_one_cache_a_sequence() {
        let base = serde_json::json!({
            "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "sliding_window": 5,
        });
        let mut gemma = base.clone();
        let extra = serde_json::json!({
            "model_type": "gemma2", "head_dim": 8, "query_pre_attn_scalar": 8,
            "attn_logit_softcapping": 0.5, "final_logit_softcapping": 3.0,
        });
        for (k, v) in extra.as_object().unwrap() {
            gemma[k] = v.clone();
        }
        let mut mistral = base;
        mistral["model_type"] = "mistral".into();
        let prompts: [&[u32]; 3] = [&[5, 9, 3, 17, 22, 8, 30], &[11], &[40, 2, 7, 7]];
        for cfg in [mistral, gemma] {
            let name = cfg["model_type"].to_string();
            let model = DecoderModel::new_random(cfg, 3, &Device::Cpu).unwrap();
            let (got, mut batch) = model.prefill(&prompts, 2).unwrap();
            let mut own: Vec<KvCache> = prompts.iter().map(|_| model.kv_cache()).collect();
            for (r, p) in prompts.iter().enumerate() {
                let want = model.decode(p, &mut own[r]).unwrap();
                let diff = max_diff(&got.narrow(0, r, 1).unwrap(), &want);
                assert!(diff < 1e-5, "{name} prompt {r}: {diff}");
            }
            let mut rows: Vec<usize> = vec![0, 1, 2];
            for step in 0..6u32 {
                if step == 2 {
                    batch.retain(&[1, 2]).unwrap();
                    rows = vec![1, 2];
                }
                let next: Vec<u32> = (rows.iter())
                    .map(|&r| (step * 7 + r as u32 * 3 + 1) % 64)
                    .collect();
                let got = model.decode_step(&next, &mut batch).unwrap();
                for (i, &r) in rows.iter().enumerate() {
                    let want = model.decode(&next[i..i + 1], &mut own[r]).unwrap();
                    let diff = max_diff(&got.narrow(0, i, 1).unwrap(), &want);
                    assert!(diff < 1e-5, "{name} step {step} row {r}: {diff}");
                    assert_eq!(batch.len_of(i), own[r].len());
                }
            }
        }
    }
}
