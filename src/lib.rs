#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]
//! # candle-quant
//!
//! Int8 quantization for [candle](https://github.com/huggingface/candle): observers, int8
//! `Linear` modules (dynamic, static, weight-only), fake quantization for QAT, and the
//! conversion verbs `quantize_dynamic`, `prepare` → `convert`, `prepare_qat` → `convert`.
//!
//! `q = clamp(round(x / scale) + zero_point, qmin, qmax)`, `x ≈ (q − zero_point) · scale`.
//!
//! ```
//! use candle_core::{Device, Module, Tensor};
//! use candle_quant::{quantize_dynamic, QLinear, QuantConfig};
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let w = Tensor::randn(0f32, 1.0, (8, 16), &dev)?;
//! let float = candle_nn::Linear::new(w, None);
//! let mut layer = QLinear::from_linear(&float, "proj")?;
//! let report = quantize_dynamic(&mut layer, &QuantConfig::default())?;
//! assert_eq!(report.converted, ["proj"]);
//! let x = Tensor::randn(0f32, 1.0, (2, 16), &dev)?;
//! let (y, y_ref) = (layer.forward(&x)?, float.forward(&x)?);
//! let err = (y - &y_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(err < 0.1 * y_ref.abs()?.max_all()?.to_scalar::<f32>()?);
//! # Ok(()) }
//! ```
//!
//! Layers, from the maths up: [`quant`] → [`observer`] → [`kernels`] → [`nn`] →
//! [`convert`](mod@convert) → [`checkpoint`], [`models`]; [`runtime`] holds the process-wide
//! settings. The root re-exports what a candle user needs to quantize a model of their own.

pub mod awq;
pub mod calibration;
pub mod checkpoint;
pub mod convert;
pub mod eval;
#[cfg(feature = "hub")]
pub mod generate;
pub mod gptq;
#[cfg(feature = "hub")]
pub mod io;
pub mod kernels;
mod lm;
pub mod models;
pub mod nn;
pub mod observer;
pub mod progress;
pub mod quant;
pub mod sensitivity;
pub mod smooth;
pub mod source;

pub use checkpoint::{load_quantized, save_quantized, SaveOptions};
pub use convert::{
    convert, ensure_quantized, prepare, prepare_qat, quantize_dynamic, quantize_weight_only, ConversionReport, QuantConfig, Quantizable,
};
pub use lm::CausalLm;
pub use nn::{qlinear, qlinear_b, qlinear_no_bias, ActivationQuant, QLinear, QLinearKind, WeightQuant};
pub use progress::Progress;
pub use quant::{Granularity, QDType, QScheme, QSpec};

/// Process-wide settings: which instruction-set path the int8 kernels run on, and how the
/// allocator treats freed layer outputs. Each affects every layer of the process.
pub mod runtime {
    pub use crate::kernels::isa::{force_isa, Isa};
    pub use crate::kernels::memory::keep_freed_buffers;
}

/// candle-core, for the paths [`quantizable!`] expands to (whatever name the user's crate gives it).
#[doc(hidden)]
pub use candle_core as __candle;

/// The README's Rust examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
