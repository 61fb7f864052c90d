//! Hugging Face architectures whose linear layers are [`crate::nn::QLinear`]s, loading from
//! checkpoint names and implementing [`crate::convert::Quantizable`].

mod attention;
pub mod bert;
pub mod llama;
