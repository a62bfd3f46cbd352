//! What a Rust application embedding packsft can do with the public face alone (`packsft::X`,
//! nothing under `packsft::internals`): its own collator building `Batch`es, its own model, its
//! own callback, training on another thread, training twice, evaluating without a trainer.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var, D};
use packsft::{
    evaluate, AdamWConfig, Batch, Callback, Collator, CompletionOnlyCollator, Control, Example,
    LossNormalization, LossSum, Model, Param, StepMetrics, Trainer, TrainerConfig,
};

const VOCAB: usize = 8;

/// A collator of the application's own: packs each micro-batch longest example first.
struct LongestFirst;

impl Collator for LongestFirst {
    type Batch = Batch;
    fn collate(&self, examples: &[Example], device: &Device) -> packsft::Result<Batch> {
        let mut sorted = examples.to_vec();
        sorted.sort_by_key(|e| std::cmp::Reverse(e.len()));
        Batch::packed(&sorted, LossNormalization::Tokens, device)
    }
}

/// A bigram model of the application's own: the logits of the next token are a row of a table
/// indexed by the current token. It reads the crate's `Batch` through its accessors.
struct Bigram {
    params: Vec<Param>,
}

impl Bigram {
    fn new() -> Self {
        let table = Var::zeros((VOCAB, VOCAB), DType::F32, &Device::Cpu).unwrap();
        Bigram {
            params: vec![Param {
                name: "table".into(),
                var: table,
                decay: false,
            }],
        }
    }
}

impl Model for Bigram {
    type Batch = Batch;
    fn loss(&self, batch: &Batch) -> packsft::Result<LossSum> {
        let ids = batch.input_ids().flatten_all()?;
        let rows = ids.index_select(batch.target_rows(), 0)?;
        let logits = self.params[0].var.as_tensor().index_select(&rows, 0)?;
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let picked = logp.gather(&batch.target_ids().unsqueeze(1)?, 1)?;
        Ok(LossSum {
            sum: picked.neg()?.sum_all()?,
            n_targets: batch.n_targets(),
            aux: None,
        })
    }
    fn params(&self) -> &[Param] {
        &self.params
    }
    fn save(&self, _dir: &std::path::Path) -> packsft::Result<()> {
        Ok(())
    }
}

/// A callback that keeps every step's loss where the test can read it, and asks to stop after
/// `stop_after` steps.
struct Recorder {
    losses: Arc<Mutex<Vec<f64>>>,
    stop_after: Option<usize>,
}

impl Callback for Recorder {
    fn on_step_end(&mut self, m: &StepMetrics) -> packsft::Result<Control> {
        self.losses.lock().unwrap().push(m.loss);
        Ok(match self.stop_after {
            Some(n) if m.step >= n => Control::Stop,
            _ => Control::Continue,
        })
    }
}

/// Sequences where token t is always followed by t + 1 (mod VOCAB): a bigram table learns it.
fn examples() -> Vec<Example> {
    (0..12)
        .map(|i| {
            let len = 3 + i % 4;
            let ids: Vec<u32> = (0..len).map(|t| ((i + t) % VOCAB) as u32).collect();
            Example::new(ids, vec![true; len])
        })
        .collect()
}

fn config(max_steps: usize) -> TrainerConfig {
    TrainerConfig {
        batch_size: 4,
        max_steps,
        adamw: AdamWConfig {
            lr: 0.5,
            ..Default::default()
        },
        progress: false,
        ..Default::default()
    }
}

#[test]
fn an_own_collator_model_and_callback_train_on_another_thread() {
    let data = examples();
    let losses = Arc::new(Mutex::new(Vec::new()));
    let mut trainer = Trainer::new(Bigram::new(), LongestFirst, config(20), Device::Cpu).unwrap();
    trainer.add_callback(Box::new(Recorder {
        losses: losses.clone(),
        stop_after: None,
    }));
    let before = trainer.evaluate(&data).unwrap().loss;
    assert!((before - (VOCAB as f64).ln()).abs() < 1e-6, "{before}");
    // The trainer (model, collator, callbacks) moves to a worker thread and back.
    let worker = std::thread::spawn(move || {
        let summary = trainer.train(&data, None).unwrap();
        (trainer, summary)
    });
    let (mut trainer, summary) = worker.join().unwrap();
    assert_eq!(summary.steps.len(), 20);
    let seen = losses.lock().unwrap().clone();
    assert_eq!(
        seen,
        summary.steps.iter().map(|m| m.loss).collect::<Vec<_>>()
    );
    let after = evaluate(
        &trainer.model,
        &trainer.collator,
        &examples(),
        4,
        &Device::Cpu,
    )
    .unwrap();
    assert!(after.loss < 0.2 * before, "{before} -> {}", after.loss);
    assert_eq!(after, trainer.evaluate(&examples()).unwrap());
    // The callbacks come back out.
    assert_eq!(trainer.take_callbacks().len(), 1);
    assert!(trainer.take_callbacks().is_empty());
}

#[test]
fn an_own_collator_computes_what_the_crate_collator_computes() {
    let data = examples();
    let ours = Bigram::new();
    ours.params[0]
        .var
        .set(
            &Tensor::arange(0f32, (VOCAB * VOCAB) as f32, &Device::Cpu)
                .unwrap()
                .reshape((VOCAB, VOCAB))
                .unwrap()
                .affine(0.01, 0.0)
                .unwrap(),
        )
        .unwrap();
    let a = LongestFirst.collate(&data[..5], &Device::Cpu).unwrap();
    let b = CompletionOnlyCollator::padding_free(0)
        .collate(&data[..5], &Device::Cpu)
        .unwrap();
    let c = CompletionOnlyCollator::padded(0)
        .collate(&data[..5], &Device::Cpu)
        .unwrap();
    let loss = |batch: &Batch| ours.loss(batch).unwrap().sum.to_scalar::<f32>().unwrap();
    assert_eq!(a.n_targets(), b.n_targets());
    assert_eq!(a.n_targets(), c.n_targets());
    assert!((loss(&a) - loss(&b)).abs() < 1e-4);
    assert!((loss(&a) - loss(&c)).abs() < 1e-4);
    // Each example's first token is never a target: 5 examples, 5 fewer targets than tokens.
    assert_eq!(a.n_targets() + 5, a.n_tokens());
}

#[test]
fn a_batch_names_an_id_outside_the_vocabulary_whatever_its_dump_holds() {
    let mut data = examples()[..3].to_vec();
    data[1].input_ids[2] = 70;
    let b = Batch::packed(&data, LossNormalization::Tokens, &Device::Cpu).unwrap();
    let e = b.check_vocab(VOCAB).unwrap_err().to_string();
    assert!(e.contains("input id 70") && e.contains("position"), "{e}");
    assert!(b.check_vocab(71).is_ok());
    let mismatched = Example {
        input_ids: vec![1, 2, 3],
        loss_mask: vec![true, true],
    };
    let e = Batch::padded(
        &[mismatched],
        0,
        None,
        LossNormalization::Tokens,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("3 ids but 2 mask entries"), "{e}");
}

#[test]
fn training_twice_runs_twice_and_a_stop_request_ends_only_its_run() {
    let data = examples();
    let mut trainer = Trainer::new(Bigram::new(), LongestFirst, config(6), Device::Cpu).unwrap();
    trainer
        .stop_flag()
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let first = trainer.train(&data, None).unwrap();
    assert!(first.stopped && first.interrupted);
    assert_eq!(first.steps.len(), 1);
    let second = trainer.train(&data, None).unwrap();
    assert!(!second.stopped && !second.interrupted);
    assert_eq!(second.steps.len(), 6);
    // A callback's stop is a stop, not an interruption.
    trainer.add_callback(Box::new(Recorder {
        losses: Arc::default(),
        stop_after: Some(2),
    }));
    let third = trainer.train(&data, None).unwrap();
    assert!(third.stopped && !third.interrupted);
    assert_eq!(third.steps.len(), 2);
}

#[test]
fn a_second_run_into_the_same_output_dir_says_how_to_resume_from_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(2);
    cfg.output_dir = Some(dir.path().to_path_buf());
    cfg.save_steps = 1;
    let mut trainer = Trainer::new(Bigram::new(), LongestFirst, cfg, Device::Cpu).unwrap();
    trainer.train(&examples(), None).unwrap();
    let e = trainer.train(&examples(), None).unwrap_err().to_string();
    assert!(
        e.contains("already holds checkpoints") && e.contains("Trainer::resume_from"),
        "{e}"
    );
}

#[test]
fn a_step_without_any_target_is_skipped_and_counted() {
    let mut data = examples()[..8].to_vec();
    for ex in &mut data[4..] {
        ex.loss_mask.iter_mut().for_each(|m| *m = false);
    }
    let mut cfg = config(0);
    cfg.shuffle = false;
    let mut trainer = Trainer::new(Bigram::new(), LongestFirst, cfg, Device::Cpu).unwrap();
    let summary = trainer.train(&data, None).unwrap();
    assert_eq!(summary.steps.len(), 2);
    assert_eq!(summary.skipped_steps, 1);
    let (kept, skipped) = (&summary.steps[0], &summary.steps[1]);
    assert!(!kept.skipped && kept.loss > 0.0 && kept.target_tokens > 0);
    assert!(skipped.skipped && skipped.loss == 0.0 && skipped.target_tokens == 0);
    let line = serde_json::to_string(skipped).unwrap();
    assert!(line.contains("\"skipped\":true"), "{line}");
    assert!(!serde_json::to_string(kept).unwrap().contains("skipped"));
    // The skipped step left the weights as the first step made them.
    let after_first = {
        let mut t = Trainer::new(Bigram::new(), LongestFirst, config(1), Device::Cpu).unwrap();
        t.config.shuffle = false;
        t.train(&data[..4], None).unwrap();
        t.model.params()[0]
            .var
            .as_tensor()
            .to_vec2::<f32>()
            .unwrap()
    };
    let table = trainer.model.params()[0]
        .var
        .as_tensor()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(table, after_first);
}

#[test]
fn the_trainer_of_the_crate_parts_is_send() {
    fn send<T: Send>() {}
    send::<Trainer<packsft::DecoderModel, CompletionOnlyCollator>>();
    send::<Trainer<Bigram, LongestFirst>>();
}
