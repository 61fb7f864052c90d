//! Weight-only int8 linear: int8 weights, float activations.

use crate::kernels::{weight_only_linear_into, Isa, PackedInt8Weights};
use candle_core::Result;
use std::mem::MaybeUninit;

/// `y = x · (qw ⊙ sw)ᵀ + b`, weights widened to f32 inside the dot product.
#[derive(Debug, Clone)]
pub struct WeightOnlyLinear {
    weights: PackedInt8Weights,
    bias: Option<Vec<f32>>,
}

impl WeightOnlyLinear {
    /// A layer over packed int8 weights with float inputs.
    pub fn new(weights: PackedInt8Weights, bias: Option<Vec<f32>>) -> Self {
        Self { weights, bias }
    }

    /// The packed int8 weights.
    pub fn weights(&self) -> &PackedInt8Weights {
        &self.weights
    }

    /// The float bias.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// Writes every value of `out` (`m × out_features`) on `Ok`.
    pub(crate) fn forward_rows(&self, x: &[f32], m: usize, out: &mut [MaybeUninit<f32>]) -> Result<()> {
        weight_only_linear_into(Isa::best(), x, m, &self.weights, self.bias(), out)
    }
}
