pub mod build;
mod schema;

pub use schema::*;
