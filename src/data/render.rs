//! Rows to text with the byte ranges that carry loss: a prompt template's blocks, a chat template
//! (each trained assistant turn found by rendering the chat with that message replaced), or plain
//! concatenation.

use std::ops::Range;

use minijinja::value::{Value, ValueKind};

use super::pipeline::*;
use super::source::Loc;
use super::spec::*;
use super::template::{Template, TemplateKind};
use crate::error::{Error, Result};

pub(super) fn one_span(start: usize, end: usize) -> Vec<Range<usize>> {
    let r = start..end;
    vec![r]
}

impl<'a> Pipeline<'a> {
    pub(super) fn render_err(&self, loc: &Loc, e: crate::data::template::RenderError) -> Error {
        loc.err(e.to_string())
    }

    /// Byte range of message `i`'s content in `text` (the rendered conversation): where the
    /// text differs from the same conversation with that message's content replaced.
    pub(super) fn turn_span(
        &self,
        t: &Template,
        msgs: &[Value],
        i: usize,
        text: &str,
        loc: &Loc,
    ) -> Result<Option<Range<usize>>> {
        let content = msgs[i].get_attr("content").unwrap_or_default();
        let c = content.as_str().unwrap_or_default();
        let dummy = if c.starts_with('\u{e000}') || c.ends_with('\u{e000}') {
            "\u{e001}"
        } else {
            "\u{e000}"
        };
        let mut dm = msgs.to_vec();
        dm[i] = Value::from_iter([
            ("role", msgs[i].get_attr("role").unwrap_or_default()),
            ("content", Value::from(dummy)),
        ]);
        let d = t
            .render_chat(&dm, false)
            .map_err(|e| self.render_err(loc, e))?;
        if d == text {
            return Ok(None);
        }
        let (a, b) = (text.as_bytes(), d.as_bytes());
        let mut p = a.iter().zip(b).take_while(|(x, y)| x == y).count();
        while !text.is_char_boundary(p) {
            p -= 1;
        }
        let max_s = (a.len() - p).min(b.len() - p);
        let mut s = a[p..]
            .iter()
            .rev()
            .zip(b[p..].iter().rev())
            .take(max_s)
            .take_while(|(x, y)| x == y)
            .count();
        while !text.is_char_boundary(a.len() - s) {
            s -= 1;
        }
        Ok(Some(p..a.len() - s))
    }

    pub(super) fn render_chat(&self, r: &Resolved, msgs: &[Value], loc: &Loc) -> Result<Rendered> {
        let t = r.template.as_ref().expect("chat rows have a template");
        let text = t
            .render_chat(msgs, false)
            .map_err(|e| self.render_err(loc, e))?;
        let last_is_assistant = msgs
            .last()
            .and_then(|m| m.get_attr("role").ok())
            .map(|r| r.as_str() == Some("assistant"))
            .unwrap_or(false);
        if r.loss_on == LossOn::All {
            let n = text.len();
            return Ok(Rendered {
                text,
                spans: one_span(0, n),
                ends_with_target: true,
                add_bos: false,
            });
        }
        if self.response_ids.is_some() {
            return Ok(Rendered {
                text,
                spans: Vec::new(),
                ends_with_target: last_is_assistant,
                add_bos: false,
            });
        }
        let mut turns: Vec<usize> = msgs
            .iter()
            .enumerate()
            .filter(|(_, m)| {
                m.get_attr("role")
                    .map(|r| r.as_str() == Some("assistant"))
                    .unwrap_or(false)
            })
            .map(|(i, _)| i)
            .collect();
        if r.loss_on == LossOn::LastAssistant {
            turns = turns.last().copied().into_iter().collect();
        }
        let mut spans = Vec::new();
        for &i in &turns {
            let Some(span) = self.turn_span(t, msgs, i, &text, loc)? else {
                return Err(loc.err(format!(
                    "template {} renders the conversation the same whatever assistant message {i} says: the turn is not in the text, so it cannot be trained",
                    t.name
                )));
            };
            let bound = if i + 1 < msgs.len() {
                self.turn_span(t, msgs, i + 1, &text, loc)?
                    .map(|s| s.start)
                    .unwrap_or(text.len())
                    .max(span.end)
            } else {
                text.len()
            };
            // The turn's closing marker (`<|eot_id|>`, `<|im_end|>`, EOS, ...) is trained too.
            let region = &text[span.end..bound];
            let close = self
                .markers
                .iter()
                .filter_map(|m| region.find(m.as_str()).map(|p| (p, p + m.len())))
                .min_by_key(|&(p, end)| (p, std::cmp::Reverse(end)))
                .map(|(_, end)| end)
                .unwrap_or(0);
            spans.push(span.start..span.end + close);
        }
        let ends_with_target = last_is_assistant && turns.last() == Some(&(msgs.len() - 1));
        Ok(Rendered {
            text,
            spans,
            ends_with_target,
            add_bos: false,
        })
    }

    /// Renders a row into text and trained byte ranges.
    pub(super) fn render(&self, r: &Resolved, row: &Value, loc: &Loc) -> Result<Rendered> {
        let all = r.loss_on == LossOn::All;
        let whole = |text: String, add_bos: bool| {
            let n = text.len();
            Rendered {
                text,
                spans: one_span(0, n),
                ends_with_target: true,
                add_bos,
            }
        };
        let pair = |p: String, c: String| {
            let text = format!("{p}{c}");
            let n = text.len();
            if all {
                return whole(text, true);
            }
            Rendered {
                spans: one_span(p.len(), n),
                text,
                ends_with_target: true,
                add_bos: true,
            }
        };
        match r.format {
            Format::Text => Ok(whole(self.str_field(row, "text", loc)?, true)),
            Format::PromptCompletion => {
                let p = self.str_field(row, "prompt", loc)?;
                let c = self.str_field(row, "completion", loc)?;
                match &r.template {
                    None => Ok(pair(p, c)),
                    Some(t) if t.kind == TemplateKind::Prompt => {
                        let mut vars = self.vars(row);
                        vars = Value::from_iter(
                            vars.try_iter()
                                .map(|it| it.collect::<Vec<_>>())
                                .unwrap_or_default()
                                .into_iter()
                                .map(|k| (k.clone(), vars.get_item(&k).unwrap_or_default()))
                                .chain([
                                    (Value::from("prompt"), Value::from(p)),
                                    (Value::from("completion"), Value::from(c)),
                                ]),
                        );
                        self.render_blocks(t, &vars, loc, all)
                    }
                    Some(_) => {
                        let mut msgs = Vec::new();
                        if let Ok(s) = row.get_attr(self.field("system")) {
                            if let Some(s) = s.as_str() {
                                msgs.push(Value::from_iter([("role", "system"), ("content", s)]));
                            }
                        }
                        msgs.push(Value::from_iter([
                            ("role", "user"),
                            ("content", p.as_str()),
                        ]));
                        msgs.push(Value::from_iter([
                            ("role", "assistant"),
                            ("content", c.as_str()),
                        ]));
                        self.render_chat(r, &msgs, loc)
                    }
                }
            }
            Format::Alpaca | Format::Columns => {
                let t = r
                    .template
                    .as_ref()
                    .expect("resolved with a prompt template");
                if r.format == Format::Alpaca {
                    self.str_field(row, "instruction", loc)?;
                    self.str_field(row, "output", loc)?;
                    let col = self.field("input");
                    if let Ok(v) = row.get_attr(col) {
                        if !matches!(
                            v.kind(),
                            ValueKind::String | ValueKind::None | ValueKind::Undefined
                        ) {
                            return Err(loc.err(format!(
                                "field `{col}` must be a string, got {}",
                                kind_name(&v)
                            )));
                        }
                    }
                }
                self.render_blocks(t, &self.vars(row), loc, all)
            }
            Format::Messages | Format::Sharegpt => {
                let msgs = self.messages(row, r.format, loc)?;
                self.render_chat(r, &msgs, loc)
            }
            Format::Tokens | Format::Auto => unreachable!("handled by the caller"),
        }
    }

    pub(super) fn render_blocks(
        &self,
        t: &Template,
        vars: &Value,
        loc: &Loc,
        all: bool,
    ) -> Result<Rendered> {
        let p = t
            .render_prompt_block(vars)
            .map_err(|e| self.render_err(loc, e))?;
        let c = t
            .render_completion_block(vars)
            .map_err(|e| self.render_err(loc, e))?;
        let text = format!("{p}{c}");
        let n = text.len();
        Ok(Rendered {
            spans: one_span(if all { 0 } else { p.len() }, n),
            text,
            ends_with_target: true,
            add_bos: true,
        })
    }

    pub(super) fn template_hint(&self, text: &str, loc: &Loc) -> String {
        let Some(TokenTemplate::Text(t)) = &self.spec.response_template else {
            return String::new();
        };
        let Some(tok) = self.tok else {
            return String::new();
        };
        let Some(at) = text.find(t.as_str()) else {
            return format!(
                "; the text {t:?} does not occur in the rendered rows either (first row: {loc})"
            );
        };
        match tok.encode_with_offsets(text) {
            Ok((ids, offs)) => {
                let ctx: Vec<u32> = ids
                    .iter()
                    .zip(&offs)
                    .filter(|(_, &(s, e))| s < at + t.len() && at < e)
                    .map(|(&id, _)| id)
                    .collect();
                format!(
                    "; the text occurs ({loc}) but tokenizes differently in context, as {ctx:?}: set collator.response_template: {ctx:?}"
                )
            }
            Err(_) => String::new(),
        }
    }
}
