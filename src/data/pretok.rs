//! A faster path through the regex pre-tokenizer of byte-level BPE tokenizers (GPT-2's
//! `ByteLevel(use_regex=true)`, and the `Split(regex) + ByteLevel` of Llama 3, Qwen2 and others).
//!
//! The `tokenizers` crate (built with fancy-regex here) runs their pattern, whose `\s+(?!\S)`
//! needs look-ahead, on a backtracking engine: that was most of the data pipeline's time. The same
//! splits come from the `regex` crate on the pattern without that look-ahead, `A|\s+`, by giving back
//! the last character of a whitespace run that is followed by text (what `\s+(?!\S)` does) whenever
//! `A` itself does not match there; each piece is mapped to GPT-2's byte alphabet directly and given
//! to the tokenizer's own BPE model (added tokens are split off by the tokenizer's own code too).
//! A tokenizer gets this path only if it has no normalizer, a BPE model, one of those two
//! pre-tokenizers, and the ids and offsets of a set of probe strings equal the standard path's;
//! otherwise it keeps the standard path. `tests/formats.rs` compares both paths on many texts.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokenizers::{Model, OffsetReferential, OffsetType};

/// Token ids and each token's byte range in the encoded text.
pub type IdsOffsets = (Vec<u32>, Vec<(usize, usize)>);

/// GPT-2's pattern (what `ByteLevel(use_regex=true)` splits with).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const TAIL: &str = r"|\s+(?!\S)|\s+";

/// The split of a pre-tokenizer pattern of the form `A|\s+(?!\S)|\s+`.
#[derive(Debug, Clone)]
pub struct FastSplit {
    all: regex::Regex,
    head: regex::Regex,
}

impl FastSplit {
    pub fn new(pattern: &str) -> Option<Self> {
        let a = pattern.strip_suffix(TAIL)?;
        if a.contains("(?=") || a.contains("(?!") || a.contains("(?<") {
            return None;
        }
        Some(Self {
            all: regex::Regex::new(&format!("{a}|\\s+")).ok()?,
            head: regex::Regex::new(&format!("^(?:{a})")).ok()?,
        })
    }

    /// Byte ranges of the pieces of `s`, as the original pattern splits it (every piece is a
    /// match); `None` if some character matches nothing.
    pub fn split(&self, s: &str) -> Option<Vec<(usize, usize)>> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < s.len() {
            let m = self.all.find_at(s, pos)?;
            if m.start() != pos {
                return None;
            }
            let mut end = m.end();
            let piece = m.as_str();
            if end < s.len()
                && piece.chars().nth(1).is_some()
                && piece.chars().all(char::is_whitespace)
                && !self.head.is_match(&s[pos..])
            {
                // `\s+(?!\S)`: the run gives back its last character to the text after it.
                end -= piece.chars().next_back().map(char::len_utf8).unwrap_or(0);
            }
            out.push((pos, end));
            pos = end;
        }
        Some(out)
    }
}

/// The fast encoder of one tokenizer.
#[derive(Debug, Clone)]
pub struct FastEncoder {
    split: FastSplit,
    bytes_char: [char; 256],
    /// Tells this encoder's entries of the per-thread word cache from another's.
    id: usize,
}

/// Words (pieces of the split) already tokenized, per thread: (encoder id, word → (id, start,
/// end) with offsets relative to the word). Cleared when it reaches `WORD_CACHE` words. BPE is a
/// function of the word alone (dropout is refused), so a hit is what the model would return.
type WordCache = (usize, HashMap<String, Arc<[(u32, u32, u32)]>>);
thread_local! {
    static WORDS: RefCell<WordCache> = RefCell::new((usize::MAX, HashMap::new()));
}
const WORD_CACHE: usize = 200_000;
static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

const PROBES: &[&str] = &[
    "Hello, world! It's 2024: naïve café — 中文 テキスト 😀.",
    "  two  spaces\n\nand\ttabs\r\n  \n end   ",
    "### Instruction:\nSort the letters.\n\n### Response: e g i",
    "they'll we've I'm you'd it's DON'T 12345 3.14 a1b2",
    "<s>special</s><pad> tokens <|im_end|>\n",
    " ",
    "\n",
    "x",
];

impl FastEncoder {
    /// The fast path for a tokenizer whose tokenizer.json is `json`, if it has one of the two
    /// supported pre-tokenizers and agrees with the standard path on the probes.
    pub fn for_tokenizer(tok: &tokenizers::Tokenizer, json: &serde_json::Value) -> Option<Self> {
        let pre = json.get("pre_tokenizer")?;
        let is_byte_level = |p: &serde_json::Value, regex: bool| {
            {
                p.get("type")?.as_str()? == "ByteLevel"
                    && !p
                        .get("add_prefix_space")
                        .and_then(|v| v.as_bool())
                        .unwrap_or(true)
                    && p.get("use_regex").and_then(|v| v.as_bool()).unwrap_or(true) == regex
            }
            .then_some(())
        };
        let pattern: String = match pre.get("type")?.as_str()? {
            "ByteLevel" => {
                is_byte_level(pre, true)?;
                GPT2.to_string()
            }
            "Sequence" => {
                let list = pre.get("pretokenizers")?.as_array()?;
                let [split, bl] = list.as_slice() else {
                    return None;
                };
                is_byte_level(bl, false)?;
                (split.get("type")?.as_str()? == "Split"
                    && split.get("behavior")?.as_str()? == "Isolated"
                    && !split
                        .get("invert")
                        .and_then(|v| v.as_bool())
                        .unwrap_or(false))
                .then_some(())?;
                split.get("pattern")?.get("Regex")?.as_str()?.to_string()
            }
            _ => return None,
        };
        // Post-processors that leave offsets alone when no special token is added.
        match json.get("post_processor") {
            None | Some(serde_json::Value::Null) => {}
            Some(p) => match p.get("type").and_then(|t| t.as_str()) {
                Some("TemplateProcessing" | "BertProcessing") => {}
                _ => return None,
            },
        }
        let model = json.get("model")?;
        let dropout = model.get("dropout").and_then(|d| d.as_f64()).unwrap_or(0.0);
        if tok.get_normalizer().is_some() || model.get("type")?.as_str()? != "BPE" || dropout != 0.0
        {
            return None;
        }
        let fast = Self {
            split: FastSplit::new(&pattern)?,
            bytes_char: bytes_char(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        };
        for p in PROBES {
            let a = tok.encode(*p, false).ok()?;
            let (ids, offs) = fast.encode(tok, p).ok()?;
            if a.get_ids() != ids.as_slice() || a.get_offsets() != offs.as_slice() {
                return None;
            }
        }
        Some(fast)
    }

    /// `tok.encode(text, false)`'s ids and byte offsets, through the fast split and a direct
    /// byte-to-character mapping (no per-piece normalized-string bookkeeping).
    pub fn encode(
        &self,
        tok: &tokenizers::Tokenizer,
        text: &str,
    ) -> tokenizers::Result<IdsOffsets> {
        let pts = tok
            .get_added_vocabulary()
            .extract_and_normalize(tok.get_normalizer(), text);
        let mut ids = Vec::with_capacity(text.len() / 3);
        let mut offs = Vec::with_capacity(text.len() / 3);
        let mut mapped = String::new();
        let mut back: Vec<usize> = Vec::new();
        for (piece, (ps, _), toks) in pts.get_splits(OffsetReferential::Original, OffsetType::Byte)
        {
            if let Some(toks) = toks {
                for t in toks {
                    ids.push(t.id);
                    offs.push((ps + t.offsets.0, ps + t.offsets.1));
                }
                continue;
            }
            let words = self
                .split
                .split(piece)
                .ok_or("the pre-tokenizer pattern matches no piece of the text")?;
            for (a, b) in words {
                let word = &piece[a..b];
                let base = ps + a;
                let hit = WORDS.with(|w| {
                    let w = w.borrow();
                    (w.0 == self.id).then(|| w.1.get(word).cloned()).flatten()
                });
                if let Some(toks) = hit {
                    for &(id, s0, e0) in toks.iter() {
                        ids.push(id);
                        offs.push((base + s0 as usize, base + e0 as usize));
                    }
                    continue;
                }
                mapped.clear();
                back.clear();
                for (ci, ch) in word.char_indices() {
                    for byte in word[ci..ci + ch.len_utf8()].bytes() {
                        let m = self.bytes_char[byte as usize];
                        back.extend(std::iter::repeat_n(ci, m.len_utf8()));
                        mapped.push(m);
                    }
                }
                let mut toks = Vec::new();
                for t in tok.get_model().tokenize(&mapped)? {
                    let (ms, me) = t.offsets;
                    let start = back[ms];
                    let last = back[me.max(ms + 1) - 1];
                    let end = last + word[last..].chars().next().map(char::len_utf8).unwrap_or(0);
                    toks.push((t.id, start as u32, end as u32));
                    ids.push(t.id);
                    offs.push((base + start, base + end));
                }
                WORDS.with(|w| {
                    let mut w = w.borrow_mut();
                    if w.0 != self.id || w.1.len() >= WORD_CACHE {
                        w.0 = self.id;
                        w.1.clear();
                    }
                    w.1.insert(word.to_string(), toks.into());
                });
            }
        }
        Ok((ids, offs))
    }
}

/// GPT-2's `bytes_to_unicode`: the printable character each byte is written as.
fn bytes_char() -> [char; 256] {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = ['\0'; 256];
    for (b, c) in bs.into_iter().zip(cs) {
        out[b as usize] = char::from_u32(c).expect("valid code point");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_splits_like_the_lookahead_pattern() {
        let f = FastSplit::new(GPT2).unwrap();
        let pieces = |s: &str| -> Vec<String> {
            f.split(s)
                .unwrap()
                .into_iter()
                .map(|(a, b)| s[a..b].to_string())
                .collect()
        };
        assert_eq!(pieces("a  b"), vec!["a", " ", " b"]);
        assert_eq!(pieces("a\n\nb"), vec!["a", "\n", "\n", "b"]);
        assert_eq!(pieces("end  "), vec!["end", "  "]);
        assert_eq!(pieces("it's 12"), vec!["it", "'s", " 12"]);
        assert_eq!(pieces("x \ty"), vec!["x", " ", "\t", "y"]);
    }
}
