//! Hugging Face architectures whose linear layers are [`QLinear`](crate::nn::QLinear)s named as
//! in their checkpoints, each [`Quantizable`](crate::convert::Quantizable):
//! - [`decoder`]: one decoder for Llama, Qwen2, Mistral, Phi-3 and Gemma 3 ([`Decoder`]), its
//!   configuration per family ([`config`]) and its cache of past positions ([`KvCache`]);
//! - [`bert`]: BERT sentence embeddings (all-MiniLM-L6-v2 and kin).
//!
//! The models hold no raw-slice code: their fused float steps are candle ops
//! ([`crate::nn::ops`]) and their fast attention is [`crate::nn`]'s.

pub mod bert;
pub mod config;
pub mod decoder;
mod kv_cache;

pub use config::{DecoderConfig, Variant};
pub use decoder::Decoder;
pub use kv_cache::KvCache;

/// The decoder under its former module name: `models::llama::{Llama, LlamaConfig, KvCache}`.
pub mod llama {
    pub use super::config::{LlamaConfig, RopeScaling, Variant};
    pub use super::decoder::Llama;
    pub use super::kv_cache::KvCache;
}
