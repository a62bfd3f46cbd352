#![doc = include_str!("README.md")]

pub mod build;
mod schema;

pub use schema::*;
