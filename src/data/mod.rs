#![doc = include_str!("README.md")]

mod cache;
mod encode;
mod example;
pub mod masking;
mod messages;
mod pipeline;
pub mod pretok;
mod pycompat;
mod render;
mod report;
pub mod source;
mod spec;
pub mod template;
pub mod tokenizer;

pub use cache::TokenCache;
pub use example::{Dataset, Example, LoadOptions, Truncation};
pub use pipeline::{load_jsonl, split_mask, Pipeline};
pub use report::{DataLimits, DataReport};
pub use spec::{DataSpec, Format, LossOn, TokenTemplate};
