#![doc = include_str!("README.md")]

pub mod build;
mod lora;
mod schema;

pub use lora::LoraSection;
pub use schema::*;
