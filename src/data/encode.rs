//! Rendered rows to examples: one tokenization with offsets, the mask (byte spans, or TRL's
//! response-template search), BOS and the EOS target, the length policy; rows encoded on all
//! cores.

use minijinja::value::{Value, ValueKind};

use super::example::*;
use super::masking::{mask_from_spans, response_template_mask};
use super::pipeline::*;
use super::source::{Loc, RawRow};
use super::spec::*;
use crate::error::Result;

impl<'a> Pipeline<'a> {
    pub(super) fn tokens_row(
        &self,
        row: &Value,
        r: &Resolved,
        loc: &Loc,
    ) -> Result<(Vec<u32>, Vec<bool>)> {
        let ints = |name: &str| -> Result<Option<Vec<i64>>> {
            let col = self.field(name);
            let v = row.get_attr(col).unwrap_or_default();
            if v.is_undefined() || v.is_none() {
                return Ok(None);
            }
            if v.kind() != ValueKind::Seq {
                return Err(loc.err(format!(
                    "field `{col}` must be an array of integers, got {}",
                    kind_name(&v)
                )));
            }
            let mut out = Vec::with_capacity(v.len().unwrap_or(0));
            for (i, x) in v
                .try_iter()
                .map_err(|e| loc.err(e.to_string()))?
                .enumerate()
            {
                match x.as_i64() {
                    Some(n) if x.is_integer() => out.push(n),
                    _ => {
                        return Err(loc.err(format!(
                            "field `{col}`[{i}] must be an integer, got {}",
                            if x.kind() == ValueKind::String {
                                format!("{:?}", x.as_str().unwrap_or_default())
                            } else {
                                x.to_string()
                            }
                        )))
                    }
                }
            }
            Ok(Some(out))
        };
        let col = self.field("input_ids");
        let ids = ints("input_ids")?.ok_or_else(|| loc.err(format!("missing field `{col}`")))?;
        if ids.is_empty() {
            return Err(loc.err(format!("field `{col}` is empty")));
        }
        if let Some((i, &id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id < 0 || id >= self.opts.vocab_size as i64)
        {
            return Err(loc.err(format!(
                "{col}[{i}] = {id} is outside the model's vocabulary (size {})",
                self.opts.vocab_size
            )));
        }
        let ids: Vec<u32> = ids.into_iter().map(|i| i as u32).collect();
        let masks = ["completion_mask", "assistant_masks", "labels"];
        let present: Vec<&str> = masks.iter().copied().filter(|m| self.has(row, m)).collect();
        if present.len() > 1 {
            return Err(loc.err(format!(
                "row has {}: give one mask",
                present
                    .iter()
                    .map(|m| format!("`{}`", self.field(m)))
                    .collect::<Vec<_>>()
                    .join(" and ")
            )));
        }
        if self.response_ids.is_some() {
            if let Some(m) = present.first() {
                return Err(loc.err(format!(
                    "row carries `{}` but collator.response_template masks by searching the ids: remove one",
                    self.field(m)
                )));
            }
            return Ok((ids, Vec::new()));
        }
        let mask = match present.first() {
            None => vec![true; ids.len()],
            Some(&name) => {
                let col = self.field(name);
                let m = ints(name)?.expect("present");
                if m.len() != ids.len() {
                    return Err(loc.err(format!(
                        "field `{col}` has {} entries but `{}` has {}",
                        m.len(),
                        self.field("input_ids"),
                        ids.len()
                    )));
                }
                if name == "labels" {
                    let mut mask = Vec::with_capacity(m.len());
                    for (i, (&l, &id)) in m.iter().zip(&ids).enumerate() {
                        if l == -100 {
                            mask.push(false);
                        } else if l == id as i64 {
                            mask.push(true);
                        } else {
                            return Err(loc.err(format!(
                                "{col}[{i}] = {l} is neither -100 nor input_ids[{i}] = {id} (labels are the ids, unshifted, with -100 where no loss)"
                            )));
                        }
                    }
                    mask
                } else {
                    if let Some((i, v)) = m.iter().enumerate().find(|(_, &v)| v != 0 && v != 1) {
                        return Err(loc.err(format!("{col}[{i}] = {v}: entries must be 0 or 1")));
                    }
                    m.into_iter().map(|v| v == 1).collect()
                }
            }
        };
        let mask = if r.loss_on == LossOn::All {
            vec![true; ids.len()]
        } else {
            mask
        };
        Ok((ids, mask))
    }

    /// One row to an example (or the reason it was dropped).
    pub(super) fn encode_row(&self, r: &Resolved, raw: &RawRow) -> Result<RowOut> {
        self.check_stop()?;
        let loc = &raw.loc;
        let row = raw.value()?;
        if row.kind() != ValueKind::Map {
            return Err(loc.err(format!("expected a JSON object, got {}", kind_name(&row))));
        }
        let mut out = RowOut::default();
        let (ids, mut mask, ends_with_target, text) = if r.format == Format::Tokens {
            let (ids, mask) = self.tokens_row(&row, r, loc)?;
            (ids, mask, false, None)
        } else {
            let rd = self.render(r, &row, loc)?;
            let tok = self.tok(loc, r.format.name())?;
            let (mut ids, mut mask) = if self.response_ids.is_some() {
                (tok.encode_fast(&rd.text)?, Vec::new())
            } else {
                let (ids, offsets) = tok.encode_with_offsets(&rd.text)?;
                let mask = mask_from_spans(&offsets, &rd.spans);
                (ids, mask)
            };
            if rd.add_bos && tok.add_bos {
                let bos = tok.bos_id.expect("add_bos implies a BOS id");
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                    if !mask.is_empty() {
                        mask.insert(0, false);
                    }
                }
            }
            if rd.ends_with_target {
                match tok.eos_id {
                    None => out.eos_not_target = true,
                    Some(eos) if self.response_ids.is_some() => {
                        if ids.last() != Some(&eos) {
                            ids.push(eos);
                        }
                    }
                    Some(eos) => match mask.iter().rposition(|&m| m) {
                        // Nothing trained: the example is dropped below anyway.
                        None => {}
                        Some(last) if ids[last] == eos => {}
                        Some(last) => match ids[last + 1..].iter().position(|&t| t == eos) {
                            // The template writes EOS after the turn: train up to it.
                            Some(j) => mask[last + 1..=last + 1 + j]
                                .iter_mut()
                                .for_each(|m| *m = true),
                            None => {
                                ids.push(eos);
                                mask.push(true);
                            }
                        },
                    },
                }
            }
            (ids, mask, rd.ends_with_target, Some(rd.text))
        };
        if ids.is_empty() {
            return Err(loc.err("the row renders to no token"));
        }
        if let Some(resp) = &self.response_ids {
            let pad = self.tok.map(|t| t.pad_or_eos());
            let (m, found) =
                response_template_mask(&ids, pad, resp, self.instruction_ids.as_deref());
            mask = m;
            out.search = found;
            if found.response_missing || found.instruction_missing {
                out.template_missing = true;
                out.miss_text = text;
            }
            let eos = self.tok.and_then(|t| t.eos_id);
            if ends_with_target
                && !out.template_missing
                && eos.is_some()
                && ids.last() == eos.as_ref()
                && !mask.last().copied().unwrap_or(false)
                && pad == eos
            {
                out.eos_masked = true;
                out.eos_not_target = true;
            }
        }
        let mut ex = Example::new(ids, mask);
        if !self.fit_length(&mut ex, ends_with_target, &mut out, loc)? {
            return Ok(out);
        }
        if ex.n_targets() == 0 {
            if !out.template_missing {
                out.no_target = true;
            }
            return Ok(out);
        }
        out.example = Some(ex);
        Ok(out)
    }

    /// The length policy (`data.truncation`) for an example over `max_length`: cut it (at the
    /// end or the start), or drop it (`false`), or fail naming the row.
    fn fit_length(
        &self,
        ex: &mut Example,
        ends_with_target: bool,
        out: &mut RowOut,
        loc: &Loc,
    ) -> Result<bool> {
        if ex.len() > self.opts.max_length {
            match self.opts.truncation {
                Truncation::KeepStart => {
                    let had_eos = ends_with_target && ex.loss_mask.last() == Some(&true);
                    ex.input_ids.truncate(self.opts.max_length);
                    ex.loss_mask.truncate(self.opts.max_length);
                    out.truncated = true;
                    if had_eos {
                        out.eos_truncated = true;
                        out.eos_not_target = true;
                    }
                }
                Truncation::KeepEnd => {
                    let cut = ex.len() - self.opts.max_length;
                    ex.input_ids.drain(..cut);
                    ex.loss_mask.drain(..cut);
                    out.truncated = true;
                }
                Truncation::Drop => {
                    out.too_long = true;
                    return Ok(false);
                }
                Truncation::Error => {
                    return Err(loc.err(format!(
                        "example has {} tokens, more than data.max_length = {} (data.truncation: error)",
                        ex.len(),
                        self.opts.max_length
                    )))
                }
            }
        }
        Ok(true)
    }

    /// Encodes rows on `self.threads` threads; the error of the earliest bad row wins.
    pub(super) fn encode_all(&self, r: &Resolved, rows: &[RawRow]) -> Result<Vec<RowOut>> {
        let threads = self.threads.min(rows.len().div_ceil(64)).max(1);
        if threads == 1 {
            return rows.iter().map(|row| self.encode_row(r, row)).collect();
        }
        let chunk = rows.len().div_ceil(threads);
        let parts: Vec<Result<Vec<RowOut>>> = std::thread::scope(|s| {
            let handles: Vec<_> = rows
                .chunks(chunk)
                .map(|c| {
                    s.spawn(move || {
                        c.iter()
                            .map(|row| self.encode_row(r, row))
                            .collect::<Result<Vec<_>>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a data thread panicked"))
                .collect()
        });
        let mut out = Vec::with_capacity(rows.len());
        for p in parts {
            out.extend(p?);
        }
        Ok(out)
    }
}
