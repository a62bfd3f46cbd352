#![doc = include_str!("README.md")]

pub mod attention;
pub mod graph;
pub mod kernels;
pub mod ops;
pub mod param;
