//! The tokenizer of a model: `tokenizer.json` plus the special tokens and BOS policy that
//! Hugging Face keeps in `tokenizer_config.json` next to it.

use std::path::{Path, PathBuf};

use crate::data::pretok::IdsOffsets;
use crate::error::{Error, Result};

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// A Hugging Face tokenizer with the special token ids and BOS policy that the data layer needs.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// The faster regex split for byte-level BPE pre-tokenizers (same ids and offsets).
    fast: Option<std::sync::Arc<crate::data::pretok::FastEncoder>>,
    /// Where tokenizer.json was read from (for messages and for copying into outputs).
    pub path: PathBuf,
    /// The tokenizer_config.json that sat next to it, if any, kept verbatim for saving.
    pub config_json: Option<serde_json::Value>,
    /// Id of `bos_token` from tokenizer_config.json, else of a usual BOS token (`<s>`, ...);
    /// `None` when the vocabulary has none.
    pub bos_id: Option<u32>,
    /// Id of `eos_token`, found the same way; `None`: completions get no EOS target.
    pub eos_id: Option<u32>,
    /// Id of `pad_token`, found the same way; `None`: padding falls back to EOS (`pad_or_eos`).
    pub pad_id: Option<u32>,
    /// Prepend BOS to every example (`add_bos_token`; without it, whether the tokenizer's
    /// post-processor adds BOS).
    pub add_bos: bool,
}

fn special_token_name(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        // AddedToken serialised as an object: {"content": "<s>", ...}
        serde_json::Value::Object(m) => m.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `path`, which is either a tokenizer.json file or a directory that holds one.
    pub fn load(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join(TOKENIZER_FILE)
        } else {
            path.to_path_buf()
        };
        if !file.exists() {
            return Err(Error::Tokenizer {
                path: file,
                msg: "file not found".into(),
            });
        }
        let mut inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| Error::Tokenizer {
            path: file.clone(),
            msg: e.to_string(),
        })?;
        // Lengths are the data layer's business (data.max_length and data.truncation): a
        // truncation or padding setting saved in tokenizer.json must not cut examples silently.
        inner
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer {
                path: file.clone(),
                msg: e.to_string(),
            })?
            .with_padding(None);
        let fast = std::fs::read_to_string(&file)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|j| crate::data::pretok::FastEncoder::for_tokenizer(&inner, &j))
            .map(std::sync::Arc::new);
        let cfg_path = file
            .parent()
            .unwrap_or(Path::new("."))
            .join(TOKENIZER_CONFIG_FILE);
        let config_json = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            Some(
                serde_json::from_str::<serde_json::Value>(&text).map_err(|e| Error::Tokenizer {
                    path: cfg_path.clone(),
                    msg: format!("line {}: {e}", e.line()),
                })?,
            )
        } else {
            None
        };
        let lookup = |key: &str, fallbacks: &[&str]| -> Option<u32> {
            let named = config_json
                .as_ref()
                .and_then(|c| c.get(key))
                .and_then(special_token_name);
            if let Some(name) = named {
                return inner.token_to_id(&name);
            }
            fallbacks.iter().find_map(|t| inner.token_to_id(t))
        };
        let bos_id = lookup("bos_token", &["<s>", "<|begin_of_text|>", "<bos>"]);
        let eos_id = lookup(
            "eos_token",
            &["</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"],
        );
        let pad_id = lookup("pad_token", &["<pad>", "<|pad|>"]);
        // Without an explicit add_bos_token, do what the tokenizer's own post-processor does
        // (transformers' fast tokenizers follow it): Llama's template adds BOS, GPT-2's does not.
        let add_bos = config_json
            .as_ref()
            .and_then(|c| c.get("add_bos_token"))
            .and_then(|v| v.as_bool())
            .unwrap_or_else(|| {
                inner
                    .encode("x", true)
                    .ok()
                    .and_then(|e| e.get_ids().first().copied())
                    .is_some_and(|first| Some(first) == bos_id)
            });
        Ok(Self {
            inner,
            fast,
            path: file,
            config_json,
            bos_id,
            eos_id,
            pad_id,
            add_bos: add_bos && bos_id.is_some(),
        })
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text` without special tokens: BOS/EOS are placed by the caller, so a
    /// tokenizer whose post-processor adds them is not counted twice.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.raw_encode(text, false)?.0)
    }

    fn raw_encode(&self, text: &str, offsets: bool) -> Result<IdsOffsets> {
        let r = match (&self.fast, offsets) {
            (Some(f), _) => f.encode(&self.inner, text),
            (None, true) => self
                .inner
                .encode(text, false)
                .map(|e| (e.get_ids().to_vec(), e.get_offsets().to_vec())),
            (None, false) => self
                .inner
                .encode_fast(text, false)
                .map(|e| (e.get_ids().to_vec(), Vec::new())),
        };
        r.map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            msg: format!("cannot encode {text:?}: {e}"),
        })
    }

    /// Whether encoding takes the fast pre-tokenizer path (`pretok`).
    pub fn has_fast_path(&self) -> bool {
        self.fast.is_some()
    }

    /// Token ids of `text` (no special tokens added) and each token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<IdsOffsets> {
        self.raw_encode(text, true)
    }

    /// Token ids of `text` without offsets (faster; no special tokens added).
    pub fn encode_fast(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.raw_encode(text, false)?.0)
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            msg: format!("cannot decode: {e}"),
        })
    }

    /// The vocabulary entry of `id` as stored (not decoded), or `<id>` for an unknown id.
    pub fn token_text(&self, id: u32) -> String {
        self.inner
            .id_to_token(id)
            .unwrap_or_else(|| format!("<{id}>"))
    }

    /// The pad id used by padded batches: pad, else EOS, else 0. Pads never carry loss, so
    /// reusing EOS is safe (the EOS that ends a completion keeps its own mask).
    pub fn pad_or_eos(&self) -> u32 {
        self.pad_id.or(self.eos_id).unwrap_or(0)
    }

    /// The underlying `tokenizers` tokenizer (truncation and padding turned off).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Writes tokenizer.json and tokenizer_config.json into `dir` (atomically, file by file).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let json = self.inner.to_string(false).map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            msg: format!("cannot serialise: {e}"),
        })?;
        crate::io::write_atomic(&dir.join(TOKENIZER_FILE), json.as_bytes())?;
        let cfg = match &self.config_json {
            Some(c) => c.clone(),
            None => {
                let name = |id: Option<u32>| id.map(|i| self.token_text(i));
                serde_json::json!({
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "bos_token": name(self.bos_id),
                    "eos_token": name(self.eos_id),
                    "pad_token": name(self.pad_id),
                    "add_bos_token": self.add_bos,
                    "add_eos_token": false,
                })
            }
        };
        crate::io::write_atomic(
            &dir.join(TOKENIZER_CONFIG_FILE),
            serde_json::to_string_pretty(&cfg)
                .expect("JSON value serialises")
                .as_bytes(),
        )
    }
}
