//! farcer: FARCER (Nonaka & Valles, 2024), a multimodal LLM for emotion recognition in
//! conversations, in Rust.
//!
//! The modules follow the data: [`data`] (dialogues from corpora and files) ->
//! [`prompt`] (where a dialogue becomes tokens) -> [`model`] (the LLM) -> [`decode`],
//! [`eval`], [`metrics`], [`report`]. The CLI in `main.rs` is a thin layer over them.

pub mod data;
pub mod decode;
pub mod error;
pub mod eval;
pub mod face;
pub mod farcer;
pub mod fetch;
pub mod gemm;
pub mod grid;
pub mod infer;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod pack;
pub mod pipeline;
pub mod plot;
pub mod prompt;
pub mod report;
pub mod selftest;
pub mod train;
pub mod util;
pub mod vision;

pub use error::{Error, Result};
