//! Prompt and chat templates, rendered with minijinja the way transformers renders chat templates.
//!
//! Two kinds of template:
//! - a **prompt template** formats one row and has two blocks, `prompt` and `completion`; each is
//!   rendered on its own (so the boundary between them is a character offset, never a string
//!   search), and the text of the row is `prompt + completion`;
//! - a **chat template** is a Hugging Face `chat_template`: it renders `messages`.
//!
//! The environment copies transformers 4.46 (`ImmutableSandboxedEnvironment(trim_blocks=True,
//! lstrip_blocks=True)` with loop controls): lenient undefined values, one trailing newline of the
//! source dropped, `raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` filter that writes what
//! Python's `json.dumps(x, ensure_ascii=False, indent=..)` writes (`", "` and `": "` separators,
//! key order kept, no HTML escaping), Python string methods (`.strip()`, `.startswith()`, ...),
//! `tools` and `documents` defined as none, and the tokenizer's special tokens as strings.
//! `{% generation %}` / `{% endgeneration %}` (a transformers-only tag) are accepted and ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::value::Value;
use minijinja::{Environment, ErrorKind, UndefinedBehavior};

use super::pycompat::{raise_exception, strftime_now, tojson};
use crate::data::tokenizer::TextTokenizer;
use crate::error::{Error, Result};

/// Assistant turns end at the first of these after their content (besides EOS).
pub const END_OF_TURN: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<end_of_turn>",
    "<|end|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "</s>",
    "<|END_OF_TURN_TOKEN|>",
    "<|end_of_turn|>",
    "<｜end▁of▁sentence｜>",
];

/// The templates shipped in `templates/`, compiled into the binary: (name, file, source).
pub const SHIPPED: &[(&str, &str, &str)] = &[
    (
        "alpaca",
        "alpaca.jinja",
        include_str!("../../templates/alpaca.jinja"),
    ),
    (
        "question_answer",
        "question_answer.jinja",
        include_str!("../../templates/question_answer.jinja"),
    ),
    (
        "chatml",
        "chatml.jinja",
        include_str!("../../templates/chatml.jinja"),
    ),
    (
        "llama2",
        "chat/llama2.jinja",
        include_str!("../../templates/chat/llama2.jinja"),
    ),
    (
        "llama3",
        "chat/llama3.jinja",
        include_str!("../../templates/chat/llama3.jinja"),
    ),
    (
        "mistral",
        "chat/mistral.jinja",
        include_str!("../../templates/chat/mistral.jinja"),
    ),
    (
        "gemma",
        "chat/gemma.jinja",
        include_str!("../../templates/chat/gemma.jinja"),
    ),
    (
        "phi3",
        "chat/phi3.jinja",
        include_str!("../../templates/chat/phi3.jinja"),
    ),
    (
        "qwen2",
        "chat/qwen2.jinja",
        include_str!("../../templates/chat/qwen2.jinja"),
    ),
    (
        "granite",
        "chat/granite.jinja",
        include_str!("../../templates/chat/granite.jinja"),
    ),
    (
        "starcoder2",
        "chat/starcoder2.jinja",
        include_str!("../../templates/chat/starcoder2.jinja"),
    ),
    (
        "qwen3",
        "chat/qwen3.jinja",
        include_str!("../../templates/chat/qwen3.jinja"),
    ),
    (
        "gemma3",
        "chat/gemma3.jinja",
        include_str!("../../templates/chat/gemma3.jinja"),
    ),
    (
        "olmo2",
        "chat/olmo2.jinja",
        include_str!("../../templates/chat/olmo2.jinja"),
    ),
];

/// Which kind a template is, decided from its source: prompt templates define the blocks
/// `prompt` and `completion`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateKind {
    /// Formats one row through its `prompt` and `completion` blocks.
    Prompt,
    /// A Hugging Face chat template that renders `messages`.
    Chat,
}

/// A template that failed to render: which template, where in it, and its message (for
/// `raise_exception(msg)`, exactly `msg`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderError {
    /// The template's name, as `Template::name`.
    pub template: String,
    /// The line of the template source at fault, when minijinja reports one.
    pub line: Option<usize>,
    /// What went wrong.
    pub message: String,
}

impl std::fmt::Display for RenderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "template {} line {l}: {}", self.template, self.message),
            None => write!(f, "template {}: {}", self.template, self.message),
        }
    }
}

/// Template instructions one render may run (minijinja's fuel): chat templates of long
/// conversations take thousands; a nested loop that never ends is stopped here.
pub const RENDER_FUEL: u64 = 20_000_000;
/// Bytes one render may write: far above any example a context window holds.
pub const RENDER_MAX_BYTES: usize = 64 << 20;

/// The rendered text, cut off (with an error) at `RENDER_MAX_BYTES`.
#[derive(Default)]
struct CappedText {
    text: String,
    over: bool,
}

impl std::io::Write for CappedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > RENDER_MAX_BYTES {
            self.over = true;
            return Err(std::io::Error::other("render budget"));
        }
        // minijinja writes whole UTF-8 pieces.
        self.text.push_str(&String::from_utf8_lossy(buf));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const MAIN: &str = "main";
const PROMPT_ONLY: &str = "__packsft_prompt_block";
const COMPLETION_ONLY: &str = "__packsft_completion_block";

/// A compiled template with the context transformers would pass it.
pub struct Template {
    env: Environment<'static>,
    /// What the recipe called it: a shipped name, a path, or `tokenizer (<path>)`.
    pub name: String,
    /// Prompt or chat template, decided from the source.
    pub kind: TemplateKind,
    /// bos_token, eos_token, ..., tools, documents: the globals of every render.
    base: Vec<(String, Value)>,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Template")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish()
    }
}

/// Replaces the transformers-only `{% generation %}` / `{% endgeneration %}` tags by an
/// equivalent no-op (`if true` / `endif`), keeping their whitespace control.
fn strip_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(i) = rest.find("{%") {
        out.push_str(&rest[..i]);
        let tag = &rest[i..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (lead, body) = match inner.chars().next() {
            Some(c @ ('-' | '+')) => (c.to_string(), &inner[1..]),
            _ => (String::new(), inner),
        };
        let (body, trail) = match body.chars().last() {
            Some(c @ ('-' | '+')) => (&body[..body.len() - 1], c.to_string()),
            _ => (body, String::new()),
        };
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{lead} if true {trail}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{lead} endif {trail}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Whether `src` defines `{% block <name> %}`.
fn defines_block(src: &str, name: &str) -> bool {
    let mut rest = src;
    while let Some(i) = rest.find("{%") {
        let tag = &rest[i + 2..];
        let tag = tag.trim_start_matches(['-', '+']).trim_start();
        if let Some(after) = tag.strip_prefix("block") {
            let word: String = after
                .trim_start()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if after.starts_with(char::is_whitespace) && word == name {
                return true;
            }
        }
        rest = &rest[i + 2..];
    }
    false
}
/// The special-token globals transformers passes a chat template: those of
/// `tokenizer_config.json` that are set, else the tokens the tokenizer found by itself.
pub fn special_tokens(tok: &TextTokenizer) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let name = |v: &serde_json::Value| -> Option<String> {
        match v {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(m) => m.get("content")?.as_str().map(str::to_owned),
            _ => None,
        }
    };
    let cfg = tok.config_json.as_ref();
    for (key, id) in [
        ("bos_token", tok.bos_id),
        ("eos_token", tok.eos_id),
        ("unk_token", None),
        ("pad_token", tok.pad_id),
    ] {
        let from_cfg = cfg.and_then(|c| c.get(key)).and_then(name);
        if let Some(s) = from_cfg.or_else(|| id.map(|i| tok.token_text(i))) {
            out.push((key.to_string(), Value::from(s)));
        }
    }
    if let Some(list) = cfg
        .and_then(|c| c.get("additional_special_tokens"))
        .and_then(|v| v.as_array())
    {
        let names: Vec<Value> = list.iter().filter_map(name).map(Value::from).collect();
        out.push(("additional_special_tokens".into(), Value::from(names)));
    }
    out
}

/// The chat template of a tokenizer: `chat_template` of its tokenizer_config.json (a string, or
/// the `default` entry of a list of named templates), or a `chat_template.jinja` next to it.
pub fn tokenizer_chat_template(tok: &TextTokenizer) -> Result<String> {
    let dir = tok.path.parent().unwrap_or(Path::new("."));
    let side = dir.join("chat_template.jinja");
    if let Some(t) = tok
        .config_json
        .as_ref()
        .and_then(|c| c.get("chat_template"))
    {
        match t {
            serde_json::Value::String(s) => return Ok(s.clone()),
            serde_json::Value::Array(list) => {
                let named = |n: &str| {
                    list.iter().find_map(|e| {
                        (e.get("name")?.as_str()? == n)
                            .then(|| e.get("template")?.as_str().map(str::to_owned))
                            .flatten()
                    })
                };
                return named("default").ok_or_else(|| Error::Tokenizer {
                    path: dir.join(crate::data::tokenizer::TOKENIZER_CONFIG_FILE),
                    msg: "chat_template is a list without a `default` entry".into(),
                });
            }
            _ => {
                return Err(Error::Tokenizer {
                    path: dir.join(crate::data::tokenizer::TOKENIZER_CONFIG_FILE),
                    msg: "chat_template must be a string or a list of {name, template}".into(),
                })
            }
        }
    }
    if side.exists() {
        return std::fs::read_to_string(&side).map_err(|e| Error::io(&side, e));
    }
    Err(Error::Tokenizer {
        path: tok.path.clone(),
        msg: format!(
            "data.template is `tokenizer` but the tokenizer has no chat template (no `chat_template` in {} and no chat_template.jinja)",
            crate::data::tokenizer::TOKENIZER_CONFIG_FILE
        ),
    })
}

impl Template {
    /// Compiles `source` (named `name` in messages) with `globals` (special tokens) passed to
    /// every render.
    pub fn from_source(name: &str, source: &str, globals: Vec<(String, Value)>) -> Result<Self> {
        let kind = if defines_block(source, "prompt") && defines_block(source, "completion") {
            TemplateKind::Prompt
        } else {
            TemplateKind::Chat
        };
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        // A template can come with a downloaded model: a loop that never ends must end here.
        env.set_fuel(Some(RENDER_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        let bad = |e: minijinja::Error| {
            Error::Config(
                RenderError {
                    template: name.to_string(),
                    line: e.line(),
                    message: format!("does not compile: {}", e.detail().unwrap_or("syntax error")),
                }
                .to_string(),
            )
        };
        env.add_template_owned(MAIN, strip_generation_tags(source))
            .map_err(bad)?;
        if kind == TemplateKind::Prompt {
            env.add_template(
                PROMPT_ONLY,
                "{% extends \"main\" %}{% block completion %}{% endblock %}",
            )
            .map_err(bad)?;
            env.add_template(
                COMPLETION_ONLY,
                "{% extends \"main\" %}{% block prompt %}{% endblock %}",
            )
            .map_err(bad)?;
        }
        let mut base = globals;
        base.push(("tools".into(), Value::from(())));
        base.push(("documents".into(), Value::from(())));
        Ok(Self {
            env,
            name: name.to_string(),
            kind,
            base,
        })
    }

    /// A template as a recipe names it: a shipped name (`alpaca`, `llama3`, ...), a path to a
    /// `.jinja` file, or `tokenizer` (the tokenizer's own chat template).
    pub fn load(spec: &str, tok: Option<&TextTokenizer>) -> Result<Self> {
        let globals = tok.map(special_tokens).unwrap_or_default();
        if spec == "tokenizer" {
            let tok = tok.ok_or_else(|| {
                Error::Config("data.template: tokenizer needs model.tokenizer".into())
            })?;
            let src = tokenizer_chat_template(tok)?;
            return Self::from_source(
                &format!("tokenizer ({})", tok.path.display()),
                &src,
                globals,
            );
        }
        let shipped = spec.strip_prefix("chat/").unwrap_or(spec);
        if let Some((name, file, src)) = SHIPPED.iter().find(|(n, _, _)| *n == shipped) {
            let _ = name;
            return Self::from_source(file, src, globals);
        }
        let path = PathBuf::from(spec);
        if path.extension().and_then(|e| e.to_str()) == Some("jinja") || path.is_file() {
            let src = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            return Self::from_source(spec, &src, globals);
        }
        Err(Error::Config(format!(
            "data.template: `{spec}` is neither a shipped template ({}), a .jinja file, nor `tokenizer`",
            SHIPPED
                .iter()
                .map(|(n, _, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    fn err(&self, e: minijinja::Error) -> RenderError {
        let message = match e.kind() {
            ErrorKind::OutOfFuel => format!(
                "runs past its budget of {RENDER_FUEL} template steps (a loop that does not end?)"
            ),
            // raise_exception(msg): the message alone, as transformers reports it.
            ErrorKind::InvalidOperation => e.detail().unwrap_or("error").to_string(),
            _ => match e.detail() {
                Some(d) => format!("{}: {d}", e.kind()),
                None => e.kind().to_string(),
            },
        };
        RenderError {
            template: self.name.clone(),
            line: e.line(),
            message,
        }
    }

    fn context(&self, extra: Vec<(String, Value)>) -> Value {
        Value::from_iter(self.base.iter().cloned().chain(extra))
    }

    fn render_named(&self, which: &str, ctx: Value) -> std::result::Result<String, RenderError> {
        let t = self.env.get_template(which).map_err(|e| self.err(e))?;
        let mut out = CappedText::default();
        match t.render_captured_to(ctx, &mut out) {
            Ok(_) => Ok(out.text),
            Err(_) if out.over => Err(RenderError {
                template: self.name.clone(),
                line: None,
                message: format!("renders more than {RENDER_MAX_BYTES} bytes (the render budget)"),
            }),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Extra variables for every render, as `apply_chat_template(**kwargs)` passes them (Qwen3's
    /// `enable_thinking`): they take the place of special tokens of the same name; the names
    /// transformers sets itself (`messages`, `add_generation_prompt`, `tools`, `documents`) are
    /// refused.
    pub fn with_kwargs(mut self, kwargs: &BTreeMap<String, serde_json::Value>) -> Result<Self> {
        const SET_BY_RENDER: [&str; 4] =
            ["messages", "add_generation_prompt", "tools", "documents"];
        for (key, value) in kwargs {
            if SET_BY_RENDER.contains(&key.as_str()) {
                return Err(Error::Config(format!(
                    "chat_template_kwargs: `{key}` is set by the render itself (as transformers' \
                     apply_chat_template sets it), not a template variable to pass"
                )));
            }
            self.base.retain(|(k, _)| k != key);
            self.base.push((key.clone(), Value::from_serialize(value)));
        }
        Ok(self)
    }

    /// A chat template applied to `messages`, as `apply_chat_template(tokenize=False)`.
    pub fn render_chat(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
    ) -> std::result::Result<String, RenderError> {
        let ctx = self.context(vec![
            ("messages".into(), Value::from(messages.to_vec())),
            (
                "add_generation_prompt".into(),
                Value::from(add_generation_prompt),
            ),
        ]);
        self.render_named(MAIN, ctx)
    }

    fn vars_context(&self, vars: &Value) -> Value {
        let mut extra = Vec::new();
        if let Ok(keys) = vars.try_iter() {
            for k in keys {
                if let Some(name) = k.as_str() {
                    let v = vars.get_item(&k).unwrap_or_default();
                    extra.push((name.to_string(), v));
                }
            }
        }
        self.context(extra)
    }

    /// The `prompt` block of a prompt template for a row's variables.
    pub fn render_prompt_block(&self, vars: &Value) -> std::result::Result<String, RenderError> {
        self.render_named(PROMPT_ONLY, self.vars_context(vars))
    }

    /// The `completion` block of a prompt template for a row's variables.
    pub fn render_completion_block(
        &self,
        vars: &Value,
    ) -> std::result::Result<String, RenderError> {
        self.render_named(COMPLETION_ONLY, self.vars_context(vars))
    }

    /// The whole template rendered at once (for checking that it is prompt + completion).
    pub fn render_whole(&self, vars: &Value) -> std::result::Result<String, RenderError> {
        self.render_named(MAIN, self.vars_context(vars))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_is_python_json_dumps() {
        let t = Template::from_source(
            "t",
            "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ [] | tojson(indent=4) }}",
            vec![],
        )
        .unwrap();
        let x: Value =
            serde_json::from_str(r#"{"b": 1, "a": [1.0, "<&'é\n>", null, true], "c": {}}"#)
                .unwrap();
        let out = t.render_named(MAIN, Value::from_iter([("x", x)])).unwrap();
        assert_eq!(
            out,
            "{\"b\": 1, \"a\": [1.0, \"<&'é\\n>\", null, true], \"c\": {}}|{\n  \"b\": 1,\n  \"a\": [\n    1.0,\n    \"<&'é\\n>\",\n    null,\n    true\n  ],\n  \"c\": {}\n}|[]"
        );
    }

    #[test]
    fn generation_tags_are_accepted() {
        let src = "{%- for m in messages %}{% generation -%} {{ m.content }} {%- endgeneration %}{% endfor %}";
        assert_eq!(
            strip_generation_tags(src),
            "{%- for m in messages %}{% if true -%} {{ m.content }} {%- endif %}{% endfor %}"
        );
        let t = Template::from_source("t", src, vec![]).unwrap();
        let m = Value::from_iter([("role", "user"), ("content", "hi")]);
        assert_eq!(t.render_chat(&[m], false).unwrap(), "hi");
    }

    #[test]
    fn block_detection() {
        assert!(defines_block(
            "{%- block prompt -%}x{% endblock %}",
            "prompt"
        ));
        assert!(defines_block(
            "{% block completion%}x{% endblock %}",
            "completion"
        ));
        assert!(!defines_block("{% if prompt %}{% endif %}", "prompt"));
        assert!(!defines_block(
            "{% block prompts %}{% endblock %}",
            "prompt"
        ));
    }
}
