//! TensorBoard event files: every field of `metrics.jsonl` as a scalar and the run's recipe as
//! text, in the format TensorBoard (and W&B's `wandb sync --sync-tensorboard`, MLflow's
//! TensorBoard import) read. Written by hand rather than through a crate: an event file is a
//! sequence of TFRecords (length, CRC-32C, bytes, CRC-32C) of `Event` protocol buffers, and the
//! three messages used here take a few dozen lines to encode; the TensorBoard crates on
//! crates.io pull in a protobuf toolchain for the same.
//!
//! `tests/fixtures/check_tensorboard.py` (pinned tensorboard) reads a file this writes with
//! TensorBoard's own `EventAccumulator`; `train::tensorboard::tests` pins the bytes.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::callback::{Callback, Control};
use super::metrics::{EvalMetrics, StepMetrics};
use crate::error::{Error, Result};

/// CRC-32C (Castagnoli), as TFRecord frames use it.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// TFRecord's masked CRC.
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Protocol-buffer encoding of the few field kinds an `Event` needs.
#[derive(Default)]
struct Proto(Vec<u8>);

impl Proto {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn key(&mut self, field: u32, wire: u8) {
        self.varint(((field as u64) << 3) | wire as u64);
    }
    fn double(mut self, field: u32, v: f64) -> Self {
        self.key(field, 1);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn float(mut self, field: u32, v: f32) -> Self {
        self.key(field, 5);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn int(mut self, field: u32, v: i64) -> Self {
        self.key(field, 0);
        self.varint(v as u64);
        self
    }
    fn bytes(mut self, field: u32, v: &[u8]) -> Self {
        self.key(field, 2);
        self.varint(v.len() as u64);
        self.0.extend_from_slice(v);
        self
    }
    fn message(self, field: u32, m: Proto) -> Self {
        self.bytes(field, &m.0)
    }
}

/// `Summary.Value` with a scalar: tag 1, simple_value 2.
fn scalar_value(tag: &str, v: f32) -> Proto {
    Proto::default().bytes(1, tag.as_bytes()).float(2, v)
}

/// `Summary.Value` with text, as TensorBoard's text plugin stores it: tag 1, metadata 9
/// (`SummaryMetadata.plugin_data.plugin_name = "text"`), tensor 8 (a scalar `DT_STRING` tensor:
/// dtype 1 = 7, an empty shape 2, string_val 8).
fn text_value(tag: &str, text: &str) -> Proto {
    let plugin = Proto::default().bytes(1, b"text");
    let metadata = Proto::default().message(1, plugin);
    let tensor = Proto::default()
        .int(1, 7)
        .message(2, Proto::default())
        .bytes(8, text.as_bytes());
    Proto::default()
        .bytes(1, tag.as_bytes())
        .message(9, metadata)
        .message(8, tensor)
}

/// An `Event`: wall_time 1, step 2, and file_version 3 or summary 5 (`Summary.value` 1).
fn event(wall_time: f64, step: i64, values: Vec<Proto>) -> Proto {
    let summary = values
        .into_iter()
        .fold(Proto::default(), |s, v| s.message(1, v));
    Proto::default()
        .double(1, wall_time)
        .int(2, step)
        .message(5, summary)
}

/// One TFRecord frame of `data`.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// An event file being written.
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
    clock: fn() -> f64,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    /// A new event file in `dir` (created if missing), named as TensorBoard looks for them
    /// (`events.out.tfevents.<seconds>.<host>.<pid>`), beginning with its version record.
    pub fn create(dir: &Path) -> Result<Self> {
        Self::with_clock(dir, now)
    }

    fn with_clock(dir: &Path, clock: fn() -> f64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}",
            clock() as u64,
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut w = Self { file, path, clock };
        let version = Proto::default()
            .double(1, (w.clock)())
            .bytes(3, b"brain.Event:2");
        w.write(&version)?;
        Ok(w)
    }

    fn write(&mut self, e: &Proto) -> Result<()> {
        self.file
            .write_all(&record(&e.0))
            .and_then(|_| self.file.flush())
            .map_err(|err| Error::io(&self.path, err))
    }

    /// Scalars at `step`, one value each.
    pub fn scalars(&mut self, step: usize, values: &[(&str, f64)]) -> Result<()> {
        let v = values
            .iter()
            .map(|(tag, x)| scalar_value(tag, *x as f32))
            .collect();
        let e = event((self.clock)(), step as i64, v);
        self.write(&e)
    }

    /// Text under `tag` at `step` (TensorBoard's Text tab renders it as Markdown).
    pub fn text(&mut self, step: usize, tag: &str, text: &str) -> Result<()> {
        let e = event((self.clock)(), step as i64, vec![text_value(tag, text)]);
        self.write(&e)
    }
}

/// Every numeric field of a metrics row, as (`train/<field>` or `eval/<field>`, value); `step`
/// is the event's step, not a scalar.
fn fields(prefix: &str, row: &serde_json::Value) -> Vec<(String, f64)> {
    let Some(map) = row.as_object() else {
        return Vec::new();
    };
    map.iter()
        .filter(|(k, _)| k.as_str() != "step")
        .filter_map(|(k, v)| {
            let x = v.as_f64().or_else(|| v.as_bool().map(|b| b as u8 as f64))?;
            let k = k.strip_prefix("eval_").unwrap_or(k);
            Some((format!("{prefix}/{k}"), x))
        })
        .collect()
}

/// A callback that logs every step's and evaluation's metrics to TensorBoard event files in a
/// directory (the recipe's `output_dir/runs`), and the run's recipe as text when it begins.
/// A resumed run starts a new file in the same directory; TensorBoard reads them as one run.
pub struct TensorBoard {
    dir: PathBuf,
    text: Option<(String, String)>,
    writer: Option<EventWriter>,
}

impl TensorBoard {
    /// Logs to event files in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            text: None,
            writer: None,
        }
    }

    /// Also writes `text` under `tag` at the start of the run (e.g. the resolved recipe).
    pub fn with_text(mut self, tag: &str, text: &str) -> Self {
        self.text = Some((tag.into(), text.into()));
        self
    }

    fn writer(&mut self) -> Result<&mut EventWriter> {
        if self.writer.is_none() {
            self.writer = Some(EventWriter::create(&self.dir)?);
        }
        Ok(self.writer.as_mut().expect("just created"))
    }

    fn log(&mut self, prefix: &str, step: usize, row: &serde_json::Value) -> Result<()> {
        let values = fields(prefix, row);
        let refs: Vec<(&str, f64)> = values.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        self.writer()?.scalars(step, &refs)
    }
}

impl Callback for TensorBoard {
    fn on_train_begin(&mut self, state: &super::checkpoint::TrainerState) -> Result<()> {
        if let Some((tag, text)) = self.text.clone() {
            // Markdown: the YAML as a code block.
            let md = format!("```yaml\n{text}\n```");
            self.writer()?.text(state.global_step, &tag, &md)?;
        }
        Ok(())
    }

    fn on_step_end(&mut self, m: &StepMetrics) -> Result<Control> {
        let row = serde_json::to_value(m).expect("metrics serialise");
        self.log("train", m.step, &row)?;
        Ok(Control::Continue)
    }

    fn on_eval_end(&mut self, e: &EvalMetrics) -> Result<Control> {
        let row = serde_json::to_value(e).expect("metrics serialise");
        self.log("eval", e.step, &row)?;
        if !e.samples.is_empty() {
            // Markdown: one block per sample (prompt, the model's continuation, the answer).
            let md: Vec<String> = e
                .samples
                .iter()
                .map(|s| {
                    format!(
                        "**prompt**\n```\n{}\n```\n**model**\n```\n{}\n```\n**reference**\n```\n{}\n```",
                        s.prompt, s.completion, s.reference
                    )
                })
                .collect();
            self.writer()?
                .text(e.step, "eval/samples", &md.join("\n\n---\n\n"))?;
        }
        Ok(Control::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_and_its_mask_are_tfrecords() {
        // The CRC-32C check value, and TFRecord's mask of the length frame of an empty record.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        let framed = record(b"");
        assert_eq!(framed.len(), 16);
        assert_eq!(&framed[..8], &0u64.to_le_bytes());
    }

    fn fixed_clock() -> f64 {
        1_700_000_000.5
    }

    /// The event file tests/fixtures/tensorboard/ holds was written by exactly these calls; the
    /// fixture script read it with TensorBoard's own reader (tests/fixtures/tensorboard/read.json).
    pub(crate) fn write_fixture(dir: &Path) -> PathBuf {
        let mut w = EventWriter::with_clock(dir, fixed_clock).unwrap();
        w.text(0, "recipe", "```yaml\ntrain:\n  lr: 0.001\n```")
            .unwrap();
        for step in 1..=3usize {
            let loss = 2.0 / step as f64;
            w.scalars(step, &[("train/loss", loss), ("train/lr", 1e-3)])
                .unwrap();
        }
        w.scalars(3, &[("eval/loss", 0.75)]).unwrap();
        w.path.clone()
    }

    /// Rewrites the fixture's event file: `cargo test --release --lib regenerate -- --ignored`,
    /// then `python3 tests/fixtures/check_tensorboard.py`.
    #[test]
    #[ignore = "writes tests/fixtures/tensorboard"]
    fn regenerate_the_tensorboard_fixture() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensorboard");
        let _ = std::fs::remove_dir_all(&fixture);
        write_fixture(&fixture);
    }

    #[test]
    fn the_event_file_is_byte_for_byte_the_one_tensorboard_read() {
        let d = tempfile::tempdir().unwrap();
        let ours = std::fs::read(write_fixture(d.path())).unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensorboard");
        let theirs = std::fs::read_dir(&fixture)
            .unwrap()
            .flatten()
            .find(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("events.out.tfevents.")
            })
            .map(|e| std::fs::read(e.path()).unwrap())
            .expect("the fixture's event file");
        assert_eq!(ours, theirs);
        let read: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture.join("read.json")).unwrap())
                .unwrap();
        assert_eq!(
            read["scalars"]["train/loss"],
            serde_json::json!([[1, 2.0], [2, 1.0], [3, 0.6666666865348816]])
        );
        assert_eq!(read["scalars"]["eval/loss"], serde_json::json!([[3, 0.75]]));
        assert!(read["text"]["recipe"][0]
            .as_str()
            .unwrap()
            .contains("lr: 0.001"));
    }

    #[test]
    fn metrics_rows_become_prefixed_scalars() {
        let row = serde_json::json!({"step": 4, "loss": 1.5, "lr": 0.1, "skipped": true});
        let mut f = fields("train", &row);
        f.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            f,
            [
                ("train/loss".to_string(), 1.5),
                ("train/lr".to_string(), 0.1),
                ("train/skipped".to_string(), 1.0)
            ]
        );
        let e = fields("eval", &serde_json::json!({"step": 4, "eval_loss": 0.5}));
        assert_eq!(e, [("eval/loss".to_string(), 0.5)]);
    }
}
