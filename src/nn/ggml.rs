//! candle's own block-quantized matmul (`QMatMul`, e.g. Q8_0), as a `QLinear` kind: the speed
//! and accuracy baseline the crate's int8 kernels are measured against.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Module, Result, Tensor};

/// `y = x · dequant_ggml(W)ᵀ + b` through candle's `QMatMul` (which quantizes activations on
/// the fly for Q8_0-family dot products).
#[derive(Debug, Clone)]
pub struct GgmlLinear {
    matmul: QMatMul,
    bias: Option<Tensor>,
    dtype: GgmlDType,
    weight_bytes: usize,
}

impl GgmlLinear {
    /// Quantizes a float `[out, in]` weight to `dtype` (the input size must be a multiple of the
    /// type's block size). A k-quant (blocks of 256) over an input width it does not divide
    /// takes the 32-block type llama.cpp falls back to for it: Q4_K → Q5_0, Q5_K → Q5_1,
    /// Q6_K → Q8_0 ([`Self::dtype`] tells which was used).
    pub fn new(weight: &Tensor, bias: Option<Tensor>, dtype: GgmlDType) -> Result<Self> {
        let k = weight.dims().last().copied().unwrap_or(0);
        let dtype = match dtype {
            GgmlDType::Q4K if k % dtype.block_size() != 0 => GgmlDType::Q5_0,
            GgmlDType::Q5K if k % dtype.block_size() != 0 => GgmlDType::Q5_1,
            GgmlDType::Q6K if k % dtype.block_size() != 0 => GgmlDType::Q8_0,
            d => d,
        };
        let q = QTensor::quantize(weight, dtype)?;
        let weight_bytes = q.storage_size_in_bytes();
        Ok(Self { matmul: QMatMul::from_qtensor(q)?, bias, dtype, weight_bytes })
    }

    /// candle's block format (Q8_0, …).
    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// Bytes of quantized weights.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes + self.bias.as_ref().map_or(0, |b| b.elem_count() * 4)
    }

    /// The float weights these blocks stand for.
    pub fn dequantized_weight(&self) -> Result<Tensor> {
        match &self.matmul {
            QMatMul::QTensor(q) => q.dequantize(&candle_core::Device::Cpu),
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.to_dtype(candle_core::DType::F32),
        }
    }

    /// The float bias.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for GgmlLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.matmul.forward(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}
