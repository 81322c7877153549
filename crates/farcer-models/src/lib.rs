//! farcer's models as pure maths, in the style of candle-transformers: each block has
//! `load(vb, cfg)` and a forward that takes whether it trains (and the dropout stream)
//! as an argument, so one loaded model serves many callers at once. Weight paths mirror
//! the Hugging Face names. The models never ask which device they are on: the op set of
//! [`farcer_nn`] was chosen once, when the model was loaded.
//!
//! - [`llama`]: the Llama-family LLM, with a KV cache, packed masks, segments and LoRA;
//! - [`vit`]: the ViT / DINOv2 image encoder;
//! - [`projection`]: the trainable map from an image vector to the LLM's embeddings;
//! - [`lora`], [`dropout`]: adapters and their seeded dropout;
//! - [`Rng`]: the seeded generator every draw uses.

pub mod dropout;
pub mod llama;
pub mod lora;
pub mod projection;
mod rng;
pub mod vit;

pub use farcer_nn as nn;
pub use rng::Rng;
