//! The fused CUDA layers (RMSNorm, RoPE, SiLU-gated product) against the differentiable
//! formulations the CPU tests pin to transformers: outputs and gradients, and a whole bf16
//! model on the GPU against the float32 model on the CPU. Needs `--features cuda` and a GPU.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{examples, rel_diff, tiny_config};
use packsft::internals::ops::{apply_rope, rms_norm, RopeTable};
use packsft::ComputeOptions;
use packsft::{Collator, CompletionOnlyCollator, DecoderModel};

fn cuda() -> Device {
    Device::new_cuda(0).expect("these tests need a CUDA device")
}

fn rand(shape: &[usize], seed: u64, dev: &Device) -> Tensor {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect();
    Tensor::from_vec(v, shape, dev).unwrap()
}

/// Gradients of sum(f(inputs) * r) for each input.
fn grads(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Tensor, r: &Tensor) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts).to_dtype(DType::F32).unwrap();
    let g = (&out * r).unwrap().sum_all().unwrap().backward().unwrap();
    let gs = vars
        .iter()
        .map(|v| {
            g.get(v.as_tensor())
                .expect("a gradient")
                .to_dtype(DType::F32)
                .unwrap()
        })
        .collect();
    (out, gs)
}

fn assert_close(name: &str, a: &Tensor, b: &Tensor, tol: f64) {
    let e = rel_diff(
        &a.to_device(&Device::Cpu).unwrap(),
        &b.to_device(&Device::Cpu).unwrap(),
    );
    eprintln!("{name}: relative error {e:.2e}");
    assert!(e < tol, "{name}: relative error {e:.3e}");
}

/// bf16 cos and sin (tokens, d) of full rotation at positions 0, step, 2 step, ... (mod 64).
fn rope_rows(tokens: usize, d: usize, step: u32, dev: &Device) -> (Tensor, Tensor) {
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32))
        .collect();
    let table = RopeTable::new(&inv, 64, dev).unwrap();
    let pos: Vec<u32> = (0..tokens as u32).map(|i| (i * step) % 64).collect();
    table
        .gather(&Tensor::new(pos, dev).unwrap(), DType::BF16)
        .unwrap()
}

/// The float32 bits of every element (bf16 widens exactly), for bit-for-bit comparisons.
fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

#[test]
fn fused_rms_norm_matches_reference() {
    let dev = cuda();
    // Hidden sizes for the kernel's instances of 1, 2, 8 and 24 columns a thread (the last
    // with unused columns).
    for h in [64, 300, 2048, 5000] {
        let x = rand(&[37, h], 1, &dev).to_dtype(DType::BF16).unwrap();
        let w = rand(&[h], 2, &dev).affine(0.25, 1.0).unwrap();
        let r = rand(&[37, h], 3, &dev);
        let (fo, fg) = grads(
            &[x.clone(), w.clone()],
            |t| packsft::internals::fused::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            &r,
        );
        let (eo, eg) = grads(
            &[x.to_dtype(DType::F32).unwrap(), w],
            |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            &r,
        );
        assert_close(&format!("rms_norm h={h} out"), &fo, &eo, 1e-2);
        assert_close(&format!("rms_norm h={h} dx"), &fg[0], &eg[0], 1e-2);
        assert_close(&format!("rms_norm h={h} dw"), &fg[1], &eg[1], 1e-2);
    }
}

#[test]
fn fused_rope_matches_reference() {
    let dev = cuda();
    // Full rotation (Llama) and partial rotation (Phi, StableLM: rotary_dim < head_dim).
    for (d, rot) in [(64usize, 64usize), (80, 32)] {
        let inv: Vec<f32> = (0..rot / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / rot as f32))
            .collect();
        let table = RopeTable::new(&inv, 128, &dev).unwrap();
        let pos: Vec<u32> = (0..50u32).map(|i| (i * 7) % 128).collect();
        let pos = Tensor::new(pos, &dev).unwrap();
        let (cb, sb) = table.gather(&pos, DType::BF16).unwrap();
        let (cf, sf) = table.gather(&pos, DType::F32).unwrap();
        let x = rand(&[50, 3, d], 4, &dev).to_dtype(DType::BF16).unwrap();
        let r = rand(&[50, 3, d], 5, &dev);
        let (fo, fg) = grads(
            std::slice::from_ref(&x),
            |t| packsft::internals::fused::apply_rope(&t[0], &cb, &sb).unwrap(),
            &r,
        );
        let (eo, eg) = grads(
            &[x.to_dtype(DType::F32).unwrap()],
            |t| apply_rope(&t[0], &cf, &sf).unwrap(),
            &r,
        );
        assert_close(&format!("rope d={d} rot={rot} out"), &fo, &eo, 1e-2);
        assert_close(&format!("rope d={d} rot={rot} dx"), &fg[0], &eg[0], 1e-2);
    }
}

#[test]
fn fused_rope_vector_and_scalar_paths_agree_bit_for_bit() {
    let dev = cuda();
    // Whole heads rotated: four pairs a thread where every buffer is 8-byte aligned, one pair a
    // thread otherwise. cos/sin viewed from 2 bytes past an aligned address send the same
    // values down the one-pair path, forward and backward.
    for (tokens, heads, d) in [(37usize, 5usize, 64usize), (9, 2, 128)] {
        let (cb, sb) = rope_rows(tokens, d, 5, &dev);
        let shifted = |t: &Tensor| {
            let flat = t.flatten_all().unwrap();
            let pad = Tensor::zeros(1, DType::BF16, &dev).unwrap();
            Tensor::cat(&[&pad, &flat], 0)
                .unwrap()
                .narrow(0, 1, flat.elem_count())
                .unwrap()
                .reshape(t.shape())
                .unwrap()
        };
        let (cu, su) = (shifted(&cb), shifted(&sb));
        let x = rand(&[tokens, heads, d], 21, &dev)
            .to_dtype(DType::BF16)
            .unwrap();
        let r = rand(&[tokens, heads, d], 22, &dev);
        let run = |c: &Tensor, s: &Tensor| {
            grads(
                std::slice::from_ref(&x),
                |t| packsft::internals::fused::apply_rope(&t[0], c, s).unwrap(),
                &r,
            )
        };
        let (vo, vg) = run(&cb, &sb);
        let (so, sg) = run(&cu, &su);
        assert_eq!(bits(&vo), bits(&so), "rope d={d} out");
        assert_eq!(bits(&vg[0]), bits(&sg[0]), "rope d={d} dx");
        let n = tokens * heads * d;
        assert!(bits(&vo).iter().filter(|&&b| b != 0).count() > n / 2);
        assert!(bits(&vg[0]).iter().filter(|&&b| b != 0).count() > n / 2);
    }
}

#[test]
fn stacked_qkv_split_and_join_match_narrowing_rotating_and_concatenating() {
    let dev = cuda();
    // One stacked q/k/v projection: 4 query heads on 2 key/value heads, and a batch of one row.
    for (n, nh, nkv, d) in [(37usize, 4usize, 2usize, 64usize), (1, 2, 1, 128)] {
        let (cb, sb) = rope_rows(n, d, 3, &dev);
        let bf = |shape: &[usize], seed| rand(shape, seed, &dev).to_dtype(DType::BF16).unwrap();
        let y = bf(&[n, (nh + 2 * nkv) * d], 31);
        let (q, k, v) = packsft::internals::fused::rope_split_stacked(&y, (nh, nkv, d), &cb, &sb)
            .unwrap()
            .expect("the stacked kernel applies");
        let part = |first: usize, heads: usize| {
            y.narrow(1, first * d, heads * d)
                .unwrap()
                .reshape((n, heads, d))
                .unwrap()
        };
        let rot = |t: &Tensor| packsft::internals::fused::apply_rope(t, &cb, &sb).unwrap();
        assert_eq!(bits(&q), bits(&rot(&part(0, nh))), "q");
        assert_eq!(bits(&k), bits(&rot(&part(nh, nkv))), "k");
        assert_eq!(bits(&v), bits(&part(nh + nkv, nkv)), "v");
        // The join is the split's transpose: rotated back and concatenated.
        let (dq, dk, dv) = (
            bf(&[n, nh, d], 32),
            bf(&[n, nkv, d], 33),
            bf(&[n, nkv, d], 34),
        );
        let joined = packsft::internals::fused::rope_join_stacked(&dq, &dk, &dv, &cb, &sb).unwrap();
        let back = |g: &Tensor, x: &Tensor| {
            let (_, pull) = packsft::internals::fused::apply_rope_vjp(x, &cb, &sb).unwrap();
            pull(g).unwrap().reshape((n, ())).unwrap()
        };
        let want = Tensor::cat(
            &[
                back(&dq, &part(0, nh)),
                back(&dk, &part(nh, nkv)),
                dv.reshape((n, ())).unwrap(),
            ],
            1,
        )
        .unwrap();
        assert_eq!(joined.dims(), want.dims());
        assert_eq!(bits(&joined), bits(&want), "joined gradient");
        let nonzero = bits(&joined).iter().filter(|&&b| b != 0).count();
        assert!(nonzero > joined.elem_count() / 2);
    }
}

#[test]
fn fused_silu_mul_matches_reference() {
    let dev = cuda();
    let g = rand(&[100, 300], 6, &dev).to_dtype(DType::BF16).unwrap();
    let u = rand(&[100, 300], 7, &dev).to_dtype(DType::BF16).unwrap();
    let r = rand(&[100, 300], 8, &dev);
    let (fo, fg) = grads(
        &[g.clone(), u.clone()],
        |t| packsft::internals::fused::silu_mul(&t[0], &t[1]).unwrap(),
        &r,
    );
    let (eo, eg) = grads(
        &[
            g.to_dtype(DType::F32).unwrap(),
            u.to_dtype(DType::F32).unwrap(),
        ],
        |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
        &r,
    );
    assert_close("silu_mul out", &fo, &eo, 1e-2);
    assert_close("silu_mul dg", &fg[0], &eg[0], 1e-2);
    assert_close("silu_mul du", &fg[1], &eg[1], 1e-2);
}

#[test]
fn fused_silu_mul_vector_and_scalar_paths_agree_bit_for_bit() {
    let dev = cuda();
    let n = 8 * 250 + 5; // 16-byte accesses, then a tail of five
    let g = rand(&[n + 1], 11, &dev).to_dtype(DType::BF16).unwrap();
    let u = rand(&[n + 1], 12, &dev).to_dtype(DType::BF16).unwrap();
    let r = rand(&[n], 13, &dev);
    // Views from element 1 start 2 bytes past an aligned address: the kernels take their
    // one-element path for all of them. Copies of the same values are aligned.
    let unaligned = [g.narrow(0, 1, n).unwrap(), u.narrow(0, 1, n).unwrap()];
    let aligned = [unaligned[0].copy().unwrap(), unaligned[1].copy().unwrap()];
    let f = |t: &[Tensor]| packsft::internals::fused::silu_mul(&t[0], &t[1]).unwrap();
    let (ao, ag) = grads(&aligned, f, &r);
    let (uo, ug) = grads(&unaligned, f, &r);
    assert_eq!(bits(&ao), bits(&uo), "silu_mul out");
    assert_eq!(bits(&ag[0]), bits(&ug[0]), "silu_mul dg");
    assert_eq!(bits(&ag[1]), bits(&ug[1]), "silu_mul du");
    // And neither path is trivially zero.
    assert!(bits(&ao).iter().filter(|&&b| b != 0).count() > n / 2);
}

fn loss_and_grads(dev: &Device, dtype: DType) -> (f64, Vec<Tensor>) {
    let mut m = DecoderModel::new_random(tiny_config(64), 3, dev).unwrap();
    m.compute = ComputeOptions {
        dtype,
        ..Default::default()
    };
    let exs = examples(&[40, 9, 1, 23], 64, 2);
    let batch = CompletionOnlyCollator::padding_free(0)
        .collate(&exs, dev)
        .unwrap();
    common::mean_loss_and_grads(&m, &batch)
}

#[test]
fn bf16_model_on_gpu_tracks_f32_on_cpu() {
    let (lc, gc) = loss_and_grads(&Device::Cpu, DType::F32);
    let (lg, gg) = loss_and_grads(&cuda(), DType::BF16);
    eprintln!("loss cpu f32 {lc}, gpu bf16 {lg}");
    assert!((lc - lg).abs() / lc < 1e-2, "{lc} vs {lg}");
    let worst = gc
        .iter()
        .zip(&gg)
        .map(|(c, g)| rel_diff(g, c))
        .fold(0f64, f64::max);
    eprintln!("worst gradient relative error {worst:.2e}");
    assert!(worst < 5e-2, "{worst}");
}

/// The vectorised add and the in-place bf16 cast give candle's results bit for bit, on
/// lengths with a tail and on views that start off the 16-byte grid; the add passes its
/// gradient to both inputs.
#[test]
fn fused_add_and_cast_match_candle_exactly() {
    let dev = cuda();
    for (n, off) in [(4096usize, 0usize), (1027, 0), (1027, 3), (8, 1)] {
        let a = rand(&[n + off], 20, &dev).to_dtype(DType::BF16).unwrap();
        let b = rand(&[n + off], 21, &dev).to_dtype(DType::BF16).unwrap();
        let (a, b) = (a.narrow(0, off, n).unwrap(), b.narrow(0, off, n).unwrap());
        let want = (&a + &b).unwrap().to_dtype(DType::F32).unwrap();
        let got = packsft::internals::fused::add(&a, &b)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(
            got.to_vec1::<f32>().unwrap(),
            want.to_vec1::<f32>().unwrap(),
            "add n={n} off={off}"
        );

        // Two tensors in one launch, one of them a view off the 16-byte grid.
        let x = rand(&[n + off], 22, &dev).narrow(0, off, n).unwrap();
        let x2 = rand(&[3 * n], 23, &dev);
        let (dst, dst2) = (
            Tensor::zeros(n, DType::BF16, &dev).unwrap(),
            Tensor::zeros(3 * n, DType::BF16, &dev).unwrap(),
        );
        packsft::internals::fused::cast_bf16_into(&[(&x, &dst), (&x2, &dst2)]).unwrap();
        for (src, dst) in [(&x, &dst), (&x2, &dst2)] {
            let want = src
                .to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            assert_eq!(
                dst.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
                want.to_vec1::<f32>().unwrap(),
                "cast n={n} off={off}"
            );
        }
    }
    let a = Var::from_tensor(&rand(&[33], 23, &dev).to_dtype(DType::BF16).unwrap()).unwrap();
    let b = Var::from_tensor(&rand(&[33], 24, &dev).to_dtype(DType::BF16).unwrap()).unwrap();
    let r = rand(&[33], 25, &dev).to_dtype(DType::BF16).unwrap();
    let g = (packsft::internals::fused::add(a.as_tensor(), b.as_tensor()).unwrap() * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for v in [&a, &b] {
        assert_eq!(
            g.get(v.as_tensor())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            r.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
        );
    }
}

/// The fused cross-entropy (bf16 logits, no float32 copy) against the float32 reference chain,
/// loss and logits' gradient, on a vocabulary that is not a multiple of the block.
#[test]
fn fused_cross_entropy_matches_reference() {
    let dev = cuda();
    let (rows, vocab) = (37, 5003);
    let logits = (rand(&[rows, vocab], 30, &dev) * 4.0)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let t: Vec<u32> = (0..rows as u32)
        .map(|i| (i * 7919) % vocab as u32)
        .collect();
    let targets = Tensor::new(t.as_slice(), &dev).unwrap();
    let r = rand(&[rows], 31, &dev);
    let reference = |x: &Tensor| -> Tensor {
        let x = x.to_dtype(DType::F32).unwrap();
        let lse = packsft::internals::ops::logsumexp_last(&x)
            .unwrap()
            .squeeze(1)
            .unwrap();
        let picked = x
            .gather(&targets.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        (lse - picked).unwrap()
    };
    let (want, gw) = grads(std::slice::from_ref(&logits), |t| reference(&t[0]), &r);
    let (got, gg) = grads(
        std::slice::from_ref(&logits),
        |t| packsft::internals::fused::nll(&t[0], &targets).unwrap(),
        &r,
    );
    assert_close("cross-entropy loss", &got, &want, 1e-6);
    assert_close("cross-entropy dlogits", &gg[0], &gw[0], 1e-2);
}

/// The fused row gather gives index_select's rows exactly, and its backward (atomics) the
/// same table gradient as candle's index_add, repeated indices included.
#[test]
fn fused_row_gather_matches_index_select() {
    let dev = cuda();
    let idx = Tensor::new(&[3u32, 0, 3, 7, 1, 3, 9, 0], &dev).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let table = rand(&[10, 70], 40, &dev).to_dtype(dtype).unwrap();
        let r = rand(&[8, 70], 41, &dev);
        let (want, gw) = grads(
            std::slice::from_ref(&table),
            |t| t[0].index_select(&idx, 0).unwrap(),
            &r,
        );
        let (got, gg) = grads(
            std::slice::from_ref(&table),
            |t| packsft::internals::fused::index_rows(&t[0], &idx).unwrap(),
            &r,
        );
        let host = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(host(&got), host(&want), "{dtype:?} rows");
        let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
        assert_close(&format!("{dtype:?} table gradient"), &gg[0], &gw[0], tol);
    }
}

/// The LoRA products through cuBLAS (factor in the product, sum into an existing buffer) against
/// candle's bf16 matmul, scale and add: both transposes, with and without the accumulator, and
/// the scaled weight gradient; what the CPU computes the same way up to bf16 rounding.
#[test]
fn scaled_products_match_matmul_scale_and_add() {
    use packsft::internals::kernels::{scaled_matmul, weight_grad, weight_grad_scaled};
    let dev = cuda();
    let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
    let (n, k, out) = (37, 16, 96);
    let u = bf(rand(&[n, k], 1, &dev));
    let b_nt = bf(rand(&[out, k], 2, &dev)); // (out, r): used transposed
    let b_kn = bf(rand(&[k, out], 3, &dev)); // (r, out): used as it is
    let acc = bf(rand(&[n, out], 4, &dev));
    for (b, transposed) in [(&b_nt, true), (&b_kn, false)] {
        let plain = if transposed {
            u.matmul(&b.t().unwrap()).unwrap()
        } else {
            u.matmul(b).unwrap()
        };
        let want = (acc.to_dtype(DType::F32).unwrap()
            + (plain.to_dtype(DType::F32).unwrap() * 2.0).unwrap())
        .unwrap();
        let fresh = acc.copy().unwrap();
        let got = scaled_matmul(&u, b, transposed, 2.0, Some(fresh)).unwrap();
        assert_close(
            &format!("acc + 2 u op(b), transposed {transposed}"),
            &got.to_dtype(DType::F32).unwrap(),
            &want,
            2e-2,
        );
        let alone = scaled_matmul(&u, b, transposed, 0.5, None).unwrap();
        assert_close(
            &format!("0.5 u op(b), transposed {transposed}"),
            &alone.to_dtype(DType::F32).unwrap(),
            &(plain.to_dtype(DType::F32).unwrap() * 0.5).unwrap(),
            2e-2,
        );
    }
    let dy = bf(rand(&[n, out], 5, &dev));
    let g1 = weight_grad(&dy, &u).unwrap().expect("the CUDA kernel");
    let g2 = weight_grad_scaled(&dy, &u, 2.0)
        .unwrap()
        .expect("the CUDA kernel");
    // Times 2 is exact in bf16: the same bits.
    assert_eq!(
        bits(&(g1.to_dtype(DType::F32).unwrap() * 2.0).unwrap()),
        bits(&g2.to_dtype(DType::F32).unwrap())
    );
}

/// Batched decoding on the GPU: one `BatchKvCache` (prompts right-aligned, one column a step,
/// the keys read through strided views by cuBLAS) gives the logits of one cache a sequence, in
/// float32 and in bf16, with a row leaving the batch; and the float32 GPU logits track the CPU's.
#[test]
fn batch_cache_on_the_gpu_matches_one_cache_a_sequence() {
    let prompts: [&[u32]; 3] = [&[5, 9, 3, 17, 22, 8, 30], &[11], &[40, 2, 7, 7]];
    let run = |dev: &Device, dtype: DType| -> Vec<Tensor> {
        let mut m = DecoderModel::new_random(tiny_config(64), 5, dev).unwrap();
        m.compute = ComputeOptions {
            dtype,
            ..Default::default()
        };
        let to_f32 = |t: Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap()
        };
        let (first, mut batch) = m.prefill(&prompts, 2).unwrap();
        let mut own: Vec<_> = prompts.iter().map(|_| m.kv_cache()).collect();
        let mut all = vec![to_f32(first.clone())];
        let limit = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let d = rel_diff(&to_f32(a.clone()), &to_f32(b.clone()));
            assert!(d < limit, "{dtype:?} {what}: {d:.3e}");
        };
        for (r, p) in prompts.iter().enumerate() {
            let want = m.decode(p, &mut own[r]).unwrap();
            close(
                &first.narrow(0, r, 1).unwrap(),
                &want,
                &format!("prompt {r}"),
            );
        }
        let mut rows: Vec<usize> = vec![0, 1, 2];
        for step in 0..5u32 {
            if step == 2 {
                batch.retain(&[1, 2]).unwrap();
                rows = vec![1, 2];
            }
            let next: Vec<u32> = (rows.iter())
                .map(|&r| (step * 7 + r as u32 * 3 + 1) % 64)
                .collect();
            let got = m.decode_step(&next, &mut batch).unwrap();
            for (i, &r) in rows.iter().enumerate() {
                let want = m.decode(&next[i..i + 1], &mut own[r]).unwrap();
                close(
                    &got.narrow(0, i, 1).unwrap(),
                    &want,
                    &format!("step {step} row {r}"),
                );
            }
            all.push(to_f32(got));
        }
        all
    };
    let cpu = run(&Device::Cpu, DType::F32);
    let gpu = run(&cuda(), DType::F32);
    for (i, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        let d = rel_diff(g, c);
        assert!(d < 1e-4, "call {i}: GPU float32 vs CPU {d:.3e}");
    }
    run(&cuda(), DType::BF16);
}
