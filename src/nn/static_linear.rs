//! Static int8 linear: activation qparams fixed ahead of time by calibration.

use crate::kernels::{int8_linear, PackedInt8Weights, QuantizedActivations};
use crate::quant::{Granularity, QParams};
use candle_core::{bail, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// `y = sw ⊙ sa · ((qa − za) · qwᵀ) + b` with one calibrated `(sa, za)` for all inputs.
#[derive(Debug, Clone)]
pub struct StaticLinear {
    weights: PackedInt8Weights,
    bias: Option<Vec<f32>>,
    act: QParams,
    /// Inputs that fell outside the calibrated range and were clamped (shared by clones).
    clamped: Arc<AtomicU64>,
}

impl StaticLinear {
    /// `act` must be per-tensor qparams (from an observer).
    pub fn new(weights: PackedInt8Weights, bias: Option<Vec<f32>>, act: QParams) -> Result<Self> {
        if act.granularity != Granularity::PerTensor || act.scales.len() != 1 {
            bail!("static activation qparams must be per tensor, got {:?}", act.granularity)
        }
        Ok(Self { weights, bias, act, clamped: Arc::default() })
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

    /// Inputs clamped to the calibrated range so far: how often calibration missed the range.
    pub fn clamped_count(&self) -> u64 {
        self.clamped.load(Ordering::Relaxed)
    }

    pub(crate) fn forward_rows(&self, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
        let k = self.weights.in_features();
        let (scale, zp) = (self.act.scales[0], self.act.zero_points[0]);
        let (qmin, qmax) = self.act.spec.qrange();
        let inv = 1.0 / scale;
        let clamped = x.iter().filter(|&&v| !((qmin as f32)..=(qmax as f32)).contains(&((v * inv).round_ties_even() + zp as f32))).count();
        if clamped > 0 {
            self.clamped.fetch_add(clamped as u64, Ordering::Relaxed);
        }
        let acts = QuantizedActivations::quantize_static(x, m, k, &self.act.spec, scale, zp)?;
        int8_linear(&acts, &self.weights, self.bias(), out)
    }
}
