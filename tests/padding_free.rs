//! The padding-free contract: the batch layout of transformers' DataCollatorWithFlattening,
//! and the same loss and gradients as padding, with no example seeing another.

mod common;

use candle_core::{Device, Tensor};
use common::{examples, max_abs_diff, rel_diff, sq_norm, tiny_model};
use packsft::{Collator, CompletionOnlyCollator, Example, Model, SeqLayout};
use packsft::{Trainer, TrainerConfig};

#[test]
fn packed_layout_matches_the_worked_example() {
    // A = [a0 a1 a2 a3] with loss on a2 a3; B = [b0 b1 b2] with loss on b1 b2.
    let a = Example::new(vec![10, 11, 12, 13], vec![false, false, true, true]);
    let b = Example::new(vec![20, 21, 22], vec![false, true, true]);
    let batch = CompletionOnlyCollator::padding_free(0)
        .collate(&[a.clone(), b.clone()], &Device::Cpu)
        .unwrap();
    assert_eq!(
        batch.host().input_ids,
        vec![vec![10, 11, 12, 13, 20, 21, 22]]
    );
    assert_eq!(batch.host().position_ids, vec![vec![0, 1, 2, 3, 0, 1, 2]]);
    assert_eq!(
        batch.host().labels,
        vec![vec![-100, -100, 12, 13, -100, 21, 22]]
    );
    assert_eq!(batch.host().cu_seq_lens, Some(vec![0, 4, 7]));
    assert_eq!(
        *batch.layout(),
        SeqLayout::Packed {
            cu_seqlens: vec![0, 4, 7],
            max_seqlen: 4
        }
    );
    assert!(batch.host().attention_mask.is_none());
    // Shifted targets: row 1 predicts a2, row 2 predicts a3, row 4 (b0) predicts b1, row 5 b2.
    assert_eq!(
        batch.target_rows().to_vec1::<u32>().unwrap(),
        vec![1, 2, 4, 5]
    );
    assert_eq!(
        batch.target_ids().to_vec1::<u32>().unwrap(),
        vec![12, 13, 21, 22]
    );
    assert_eq!(
        batch.cu_seqlens().unwrap().to_vec1::<u32>().unwrap(),
        vec![0, 4, 7]
    );
    assert_eq!((batch.n_targets(), batch.n_tokens()), (4, 7));

    // The first token of an example is never a target even if its mask says so.
    let c = Example::new(vec![30, 31], vec![true, true]);
    let batch = CompletionOnlyCollator::padding_free(0)
        .collate(&[a, c], &Device::Cpu)
        .unwrap();
    assert_eq!(batch.host().labels[0][4], -100);
    assert_eq!(batch.host().labels[0][5], 31);
}

#[test]
fn padded_layout_pads_right_and_never_targets_pads() {
    let a = Example::new(vec![10, 11, 12, 13], vec![false, false, true, true]);
    let b = Example::new(vec![20, 21, 22], vec![false, true, true]);
    let mut c = CompletionOnlyCollator::padded(7);
    let batch = c.collate(&[a.clone(), b.clone()], &Device::Cpu).unwrap();
    assert_eq!(
        batch.host().input_ids,
        vec![vec![10, 11, 12, 13], vec![20, 21, 22, 7]]
    );
    assert_eq!(
        batch.host().labels,
        vec![vec![-100, -100, 12, 13], vec![-100, 21, 22, -100]]
    );
    assert_eq!(
        batch.host().attention_mask,
        Some(vec![vec![1, 1, 1, 1], vec![1, 1, 1, 0]])
    );
    assert_eq!(
        batch.target_rows().to_vec1::<u32>().unwrap(),
        vec![1, 2, 4, 5]
    );
    assert_eq!(
        *batch.layout(),
        SeqLayout::Padded {
            lengths: vec![4, 3]
        }
    );

    c.pad_to_multiple_of = Some(8);
    let batch = c.collate(&[a, b], &Device::Cpu).unwrap();
    assert_eq!(batch.row_len(), 8);
    assert_eq!(batch.host().input_ids[1], vec![20, 21, 22, 7, 7, 7, 7, 7]);
    assert_eq!(batch.n_targets(), 4);
}

fn grads_of(model: &packsft::DecoderModel, batch: &packsft::Batch) -> (f64, Vec<(String, Tensor)>) {
    let (loss, grads) = common::mean_loss_and_grads(model, batch);
    let names = model.params().iter().map(|p| p.name.clone());
    (loss, names.zip(grads).collect())
}

#[test]
fn padded_and_padding_free_give_the_same_loss_and_gradients() {
    let model = tiny_model(3);
    let exs = examples(&[5, 17, 1, 9, 30, 2, 11], 64, 5);
    let packed = CompletionOnlyCollator::padding_free(0)
        .collate(&exs, &Device::Cpu)
        .unwrap();
    let padded = CompletionOnlyCollator::padded(0)
        .collate(&exs, &Device::Cpu)
        .unwrap();
    let (lp, gp) = grads_of(&model, &packed);
    let (ld, gd) = grads_of(&model, &padded);
    assert!(
        (lp - ld).abs() / ld.abs() <= 1e-5,
        "loss packed {lp} vs padded {ld}"
    );
    for ((name, a), (_, b)) in gp.iter().zip(&gd) {
        let r = rel_diff(a, b);
        assert!(r <= 1e-5, "{name}: relative gradient difference {r:e}");
    }
}

#[test]
fn every_parameter_receives_a_nonzero_gradient() {
    let model = tiny_model(4);
    let exs = examples(&[6, 13, 8], 64, 6);
    let batch = CompletionOnlyCollator::padding_free(0)
        .collate(&exs, &Device::Cpu)
        .unwrap();
    let (_, grads) = grads_of(&model, &batch);
    assert_eq!(grads.len(), model.params().len());
    for (name, g) in grads {
        let norm = sq_norm(&g);
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{name}: gradient norm^2 {norm}"
        );
    }
}

#[test]
fn a_packed_forward_equals_the_per_example_forwards() {
    let model = tiny_model(5);
    let exs = examples(&[4, 19, 7, 1, 12], 64, 7);
    let c = CompletionOnlyCollator::padding_free(0);
    let packed = model
        .all_logits(&c.collate(&exs, &Device::Cpu).unwrap())
        .unwrap();
    let mut start = 0;
    for ex in &exs {
        let alone = model
            .all_logits(&c.collate(std::slice::from_ref(ex), &Device::Cpu).unwrap())
            .unwrap();
        let part = packed.narrow(0, start, ex.len()).unwrap();
        let d = max_abs_diff(&part, &alone);
        assert!(
            d <= 1e-5,
            "example of length {}: max |diff| {d:e}",
            ex.len()
        );
        start += ex.len();
    }
    // And a change in one example leaves the others' logits untouched.
    let mut changed = exs.clone();
    changed[0].input_ids[2] = (changed[0].input_ids[2] + 1) % 60 + 3;
    let packed2 = model
        .all_logits(&c.collate(&changed, &Device::Cpu).unwrap())
        .unwrap();
    let n0 = exs[0].len();
    let rest = packed.dims()[0] - n0;
    assert_eq!(
        max_abs_diff(
            &packed.narrow(0, n0, rest).unwrap(),
            &packed2.narrow(0, n0, rest).unwrap()
        ),
        0.0
    );
    assert!(
        max_abs_diff(
            &packed.narrow(0, 0, n0).unwrap(),
            &packed2.narrow(0, 0, n0).unwrap()
        ) > 0.0
    );
}

#[test]
fn accumulation_splits_give_the_same_gradients() {
    let exs = examples(
        &[5, 9, 14, 3, 22, 7, 11, 6, 2, 17, 8, 4, 13, 10, 19, 5],
        64,
        8,
    );
    let mut reference: Option<Vec<Tensor>> = None;
    for padding_free in [true, false] {
        for (bs, ga) in [(16, 1), (8, 2), (4, 4), (2, 8)] {
            let cfg = TrainerConfig {
                batch_size: bs,
                grad_accum: ga,
                progress: false,
                ..Default::default()
            };
            let t = Trainer::new(
                tiny_model(9),
                if padding_free {
                    CompletionOnlyCollator::padding_free(0)
                } else {
                    CompletionOnlyCollator::padded(0)
                },
                cfg,
                Device::Cpu,
            )
            .unwrap();
            let sg = t.step_grads(&exs).unwrap();
            let g: Vec<Tensor> = t
                .model
                .params()
                .iter()
                .map(|p| sg.grads.get(p.var.as_tensor()).unwrap().clone())
                .collect();
            match &reference {
                None => reference = Some(g),
                Some(r) => {
                    for ((a, b), p) in g.iter().zip(r).zip(t.model.params()) {
                        let d = rel_diff(a, b);
                        assert!(
                            d <= 1e-5,
                            "padding_free={padding_free} bs={bs} ga={ga} {}: {d:e}",
                            p.name
                        );
                    }
                }
            }
        }
    }
}
