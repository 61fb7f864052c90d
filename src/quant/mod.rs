//! The maths of quantization: integer types, schemes, granularities, the scale/zero-point
//! formula, quantize/dequantize and fake quantization. Everything else in the crate builds on it.

mod fake;
mod params;
mod qtensor;
mod spec;

pub use fake::{fake_quantize, fake_quantize_learned, fake_quantize_values, quantization_mse};
pub use params::{QParams, SlotLayout};
pub use qtensor::{float_values, slot_min_max, QuantizedTensor};
pub use spec::{dequantize_value, quantize_value, Granularity, QDType, QScheme, QSpec, SCALE_EPS};
