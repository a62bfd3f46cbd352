#![doc = include_str!("README.md")]

pub mod build;
mod dist;
mod lora;
mod schema;

pub use dist::DistSection;
pub use lora::LoraSection;
pub use schema::*;
