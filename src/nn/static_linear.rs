//! Static int8 linear: activation qparams fixed ahead of time by calibration.

use crate::kernels::{int8_linear, PackedInt8Weights, QuantizedActivations};
use crate::quant::{Granularity, QParams};
use candle_core::{bail, Result};

/// `y = sw ⊙ sa · ((qa − za) · qwᵀ) + b` with one calibrated `(sa, za)` for all inputs.
#[derive(Debug, Clone)]
pub struct StaticLinear {
    weights: PackedInt8Weights,
    bias: Option<Vec<f32>>,
    act: QParams,
}

impl StaticLinear {
    /// `act` must be per-tensor qparams (from an observer).
    pub fn new(weights: PackedInt8Weights, bias: Option<Vec<f32>>, act: QParams) -> Result<Self> {
        if act.granularity != Granularity::PerTensor || act.scales.len() != 1 {
            bail!("static activation qparams must be per tensor, got {:?}", act.granularity)
        }
        Ok(Self { weights, bias, act })
    }

    /// The packed int8 weights.
    pub fn weights(&self) -> &PackedInt8Weights {
        &self.weights
    }

    /// The float bias.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// The fixed input qparams from calibration.
    pub fn activation_qparams(&self) -> &QParams {
        &self.act
    }

    pub(crate) fn forward_rows(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        let k = self.weights.in_features();
        let (scale, zp) = (self.act.scales[0], self.act.zero_points[0]);
        let acts = QuantizedActivations::quantize_static(x, m, k, &self.act.spec, scale, zp)?;
        int8_linear(&acts, &self.weights, self.bias(), out)
    }
}
