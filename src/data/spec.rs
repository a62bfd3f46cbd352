//! How a dataset is read, as a recipe's `data:` section says it: the row [`Format`], which parts
//! carry loss ([`LossOn`]), the template, and the field names.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How the rows of a dataset are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Decided from the first row's fields (after `data.fields` renaming).
    #[default]
    Auto,
    /// `{"text": ...}`: language modelling (loss on every token unless a response template
    /// says otherwise).
    Text,
    /// `{"prompt": ..., "completion": ...}`.
    #[serde(alias = "completion")]
    PromptCompletion,
    /// `{"messages": [{"role": ..., "content": ...}, ...]}` with system, user, assistant and
    /// tool roles.
    #[serde(alias = "chat")]
    Messages,
    /// ShareGPT: `{"conversations": [{"from": "human", "value": ...}, ...]}`.
    #[serde(alias = "conversations")]
    Sharegpt,
    /// Alpaca: `instruction`, optional `input`, `output`, through a prompt template (`alpaca`
    /// unless `data.template` names another).
    Alpaca,
    /// Any named columns through a prompt template (its variables are the row's columns).
    Columns,
    /// Pre-tokenized: `input_ids` with an optional `completion_mask` (1 = loss), `labels` (-100
    /// = no loss) or `assistant_masks`.
    #[serde(alias = "pretokenized", alias = "tokenized")]
    Tokens,
}

impl Format {
    /// The name a recipe's `data.format` uses for this format (`auto`, `prompt_completion`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Text => "text",
            Format::PromptCompletion => "prompt_completion",
            Format::Messages => "messages",
            Format::Sharegpt => "sharegpt",
            Format::Alpaca => "alpaca",
            Format::Columns => "columns",
            Format::Tokens => "tokens",
        }
    }
}

/// Which tokens carry loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossOn {
    /// The completion (prompt/completion, Alpaca, columns; pre-tokenized rows: their mask).
    Completion,
    /// Every assistant turn of a conversation.
    Assistant,
    /// The last assistant turn only.
    LastAssistant,
    /// Every token.
    All,
}

impl LossOn {
    /// The name a recipe's `data.loss_on` uses for this mode (`completion`, `all`, ...).
    pub fn name(self) -> &'static str {
        match self {
            LossOn::Completion => "completion",
            LossOn::Assistant => "assistant",
            LossOn::LastAssistant => "last_assistant",
            LossOn::All => "all",
        }
    }
}

/// A response or instruction template of the TRL-compatible method: text (encoded alone,
/// without special tokens, as TRL does) or token ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenTemplate {
    /// Token ids, searched for as they are; must not be empty.
    Ids(Vec<u32>),
    /// Text, encoded with the tokenizer (which must then be given) to the ids searched for.
    Text(String),
}

/// What a recipe says about turning rows into examples.
#[derive(Debug, Clone, Default)]
pub struct DataSpec {
    /// The row format; `Auto` detects it from the first row.
    pub format: Format,
    /// A shipped template name, a `.jinja` path, or `tokenizer`.
    pub template: Option<String>,
    /// Canonical field (`prompt`, `completion`, `messages`, `instruction`, `role`, ...) → the
    /// column or key that holds it.
    pub fields: BTreeMap<String, String>,
    /// Extra role names → `system`, `user`, `assistant` or `tool` (messages and ShareGPT).
    pub roles: BTreeMap<String, String>,
    /// Which tokens carry loss; `None`: the format's default (`all` for text, `assistant` for
    /// conversations, `completion` otherwise), or with a response template `last_assistant`
    /// (`assistant` when an instruction template is given too).
    pub loss_on: Option<LossOn>,
    /// Set: the TRL-compatible masking method instead of spans.
    pub response_template: Option<TokenTemplate>,
    /// With `response_template`: TRL's multi-turn mode, where the stretch from each instruction
    /// template to the next response template is masked. Needs `response_template`.
    pub instruction_template: Option<TokenTemplate>,
    /// Strings that end an assistant turn, besides EOS and the usual ones (`<|eot_id|>`, ...).
    pub end_of_turn: Vec<String>,
    /// Extra variables of every template render (`apply_chat_template(**kwargs)`), e.g.
    /// Qwen3's `enable_thinking`.
    pub chat_template_kwargs: BTreeMap<String, serde_json::Value>,
}

/// The roles a message may have after `data.roles` renamed it.
pub const ROLES: &[&str] = &["system", "user", "assistant", "tool"];

impl DataSpec {
    /// `data.roles` maps names found in rows onto roles: a target that is not a role would pass
    /// the message on under a name no chat template knows.
    pub fn check_roles(&self) -> std::result::Result<(), String> {
        match self
            .roles
            .iter()
            .find(|(_, to)| !ROLES.contains(&to.as_str()))
        {
            Some((from, to)) => Err(format!(
                "data.roles maps `{from}` to `{to}`, which is not a role (roles: {})",
                ROLES.join(", ")
            )),
            None => Ok(()),
        }
    }
}
