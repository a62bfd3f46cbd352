//! Chat rows to messages: `messages`, ShareGPT `conversations` and prompt/completion pairs become
//! one list of `{role, content}` objects with roles checked and renamed (`data.roles`).

use minijinja::value::{Value, ValueKind};

use super::pipeline::*;
use super::source::Loc;
use super::spec::*;
use crate::error::Result;

pub(super) fn sharegpt_role(from: &str) -> Option<&'static str> {
    Some(match from {
        "system" => "system",
        "human" | "user" => "user",
        "gpt" | "assistant" | "model" | "chatgpt" | "bard" | "bing" | "function_call" => {
            "assistant"
        }
        "tool" | "function_response" | "observation" | "ipython" => "tool",
        _ => return None,
    })
}

impl<'a> Pipeline<'a> {
    pub(super) fn role(&self, raw: &str) -> Option<String> {
        if let Some(r) = self.spec.roles.get(raw) {
            return Some(r.clone());
        }
        ROLES.contains(&raw).then(|| raw.to_string())
    }

    /// A `messages` or ShareGPT list as chat-template messages (role names normalised).
    pub(super) fn messages(&self, row: &Value, format: Format, loc: &Loc) -> Result<Vec<Value>> {
        let (list_key, role_key, content_key) = match format {
            Format::Sharegpt => ("conversations", self.field("from"), self.field("value")),
            _ => ("messages", self.field("role"), self.field("content")),
        };
        let col = self.field(list_key);
        let list = row.get_attr(col).unwrap_or_default();
        if list.is_undefined() {
            return Err(loc.err(format!("missing field `{col}`")));
        }
        if list.kind() != ValueKind::Seq {
            return Err(loc.err(format!(
                "field `{col}` must be an array of messages, got {}",
                kind_name(&list)
            )));
        }
        let mut out = Vec::new();
        for (i, m) in list
            .try_iter()
            .map_err(|e| loc.err(e.to_string()))?
            .enumerate()
        {
            let at = format!("{col}[{i}]");
            if m.kind() != ValueKind::Map {
                return Err(loc.err(format!("`{at}` must be an object, got {}", kind_name(&m))));
            }
            let raw_role = m.get_attr(role_key).unwrap_or_default();
            let Some(raw_role) = raw_role.as_str().map(str::to_owned) else {
                return Err(loc.err(if raw_role.is_undefined() {
                    format!("`{at}` has no `{role_key}`")
                } else {
                    format!(
                        "`{at}.{role_key}` must be a string, got {}",
                        kind_name(&raw_role)
                    )
                }));
            };
            let role = match format {
                Format::Sharegpt => self
                    .spec
                    .roles
                    .get(&raw_role)
                    .cloned()
                    .or_else(|| sharegpt_role(&raw_role).map(str::to_owned)),
                _ => self.role(&raw_role),
            };
            let Some(role) = role else {
                return Err(loc.err(format!(
                    "`{at}.{role_key}`: unknown role `{raw_role}` (known: {}{}; map others with data.roles)",
                    if format == Format::Sharegpt {
                        "system, human, user, gpt, assistant, model, tool, function_call, function_response, observation"
                    } else {
                        "system, user, assistant, tool"
                    },
                    if self.spec.roles.is_empty() {
                        String::new()
                    } else {
                        format!(", {}", self.spec.roles.keys().cloned().collect::<Vec<_>>().join(", "))
                    }
                )));
            };
            let content = m.get_attr(content_key).unwrap_or_default();
            let has_tool_calls = m
                .get_attr("tool_calls")
                .map(|v| !v.is_undefined() && !v.is_none())
                .unwrap_or(false);
            match content.kind() {
                ValueKind::String => {}
                ValueKind::Seq | ValueKind::Map => {}
                ValueKind::Undefined | ValueKind::None if has_tool_calls => {}
                ValueKind::Undefined => {
                    return Err(loc.err(format!("`{at}` has no `{content_key}`")));
                }
                _ => {
                    return Err(loc.err(format!(
                        "`{at}.{content_key}` must be a string, got {}",
                        kind_name(&content)
                    )))
                }
            }
            // Keep every other key (tool_calls, name, ...) for templates that read them.
            let mut items: Vec<(Value, Value)> = vec![
                (Value::from("role"), Value::from(role)),
                (Value::from("content"), content),
            ];
            if let Ok(keys) = m.try_iter() {
                for k in keys {
                    let ks = k.as_str().unwrap_or_default();
                    if ks != role_key && ks != content_key && ks != "role" && ks != "content" {
                        items.push((k.clone(), m.get_item(&k).unwrap_or_default()));
                    }
                }
            }
            out.push(Value::from_iter(items));
        }
        if out.is_empty() {
            return Err(loc.err(format!("`{col}` is empty")));
        }
        Ok(out)
    }
}
