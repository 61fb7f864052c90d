//! Static int8 linear: activation qparams fixed ahead of time by calibration.

use crate::kernels::{int8_linear_into, Isa, PackedInt8Weights, QuantizedActivations};
use crate::quant::{Granularity, QParams, QSpec};
use candle_core::{bail, Result};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// `y = sw ⊙ Σ_g sa_g · ((qa_g − za) · qw_gᵀ) + b` with calibrated activation qparams:
/// - per tensor (PyTorch's static scheme): one affine `(sa, za)`; inputs outside the calibrated
///   range are clamped;
/// - per group of input channels: one symmetric `sa_g` per group, the same for every token;
///   inputs beyond `127·sa_g` are multiplied in float (exactly) instead of clamped.
#[derive(Debug, Clone)]
pub struct StaticLinear {
    weights: PackedInt8Weights,
    bias: Option<Vec<f32>>,
    act: QParams,
    /// Inputs clamped (per tensor) or set aside in float (per group), shared by clones.
    out_of_range: Arc<AtomicU64>,
}

impl StaticLinear {
    /// `act` is per tensor (any spec), or per group of input channels with the symmetric
    /// `[-127, 127]` spec ([`QSpec::DYNAMIC_ACTIVATION`]), zero points 0 and one scale per group
    /// of `weights`' input width.
    pub fn new(weights: PackedInt8Weights, bias: Option<Vec<f32>>, act: QParams) -> Result<Self> {
        let k = weights.in_features();
        match act.granularity {
            Granularity::PerTensor if act.scales.len() == 1 => {}
            Granularity::PerGroup { size } if size > 0 => {
                if act.spec != QSpec::DYNAMIC_ACTIVATION || act.zero_points.iter().any(|&z| z != 0) {
                    bail!("static per-group activation qparams must be symmetric int8 in [-127, 127] with zero points 0")
                }
                if act.scales.len() != k.div_ceil(size) {
                    bail!("static activation groups of {size} over {k} inputs need {} scales, got {}", k.div_ceil(size), act.scales.len())
                }
                let seg = weights.group_size();
                if weights.groups() > 1 && size.min(k) != seg {
                    bail!("static activation groups of {size} do not line up with weight groups of {seg}")
                }
            }
            g => bail!("static activation qparams must be per tensor or per group of input channels, got {g:?}"),
        }
        Ok(Self { weights, bias, act, out_of_range: Arc::default() })
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

    /// Input channels per activation scale (`None`: one scale for the whole input).
    pub fn activation_group_size(&self) -> Option<usize> {
        match self.act.granularity {
            Granularity::PerGroup { size } => Some(size),
            _ => None,
        }
    }

    /// Inputs clamped to the calibrated range so far (per-tensor qparams): how often
    /// calibration missed the range.
    pub fn clamped_count(&self) -> u64 {
        if self.activation_group_size().is_some() {
            return 0;
        }
        self.out_of_range.load(Ordering::Relaxed)
    }

    /// Inputs beyond their group's calibrated range so far, multiplied in float (per-group
    /// qparams).
    pub fn float_count(&self) -> u64 {
        if self.activation_group_size().is_none() {
            return 0;
        }
        self.out_of_range.load(Ordering::Relaxed)
    }

    /// Writes every value of `out` (`m × out_features`) on `Ok`.
    pub(crate) fn forward_rows(&self, x: &[f32], m: usize, out: &mut [MaybeUninit<f32>]) -> Result<()> {
        let k = self.weights.in_features();
        let (acts, missed) = match self.act.granularity {
            Granularity::PerGroup { size } => {
                let acts = QuantizedActivations::quantize_static_groups(x, m, k, size, &self.act.scales)?;
                let n = acts.outlier_count();
                (acts, n)
            }
            _ => {
                let (scale, zp) = (self.act.scales[0], self.act.zero_points[0]);
                let (qmin, qmax) = self.act.spec.qrange();
                let inv = 1.0 / scale;
                let range = (qmin as f32)..=(qmax as f32);
                let clamped = x.iter().filter(|&&v| !range.contains(&((v * inv).round_ties_even() + zp as f32))).count();
                (QuantizedActivations::quantize_static(x, m, k, &self.act.spec, scale, zp)?, clamped)
            }
        };
        if missed > 0 {
            self.out_of_range.fetch_add(missed as u64, Ordering::Relaxed);
        }
        int8_linear_into(Isa::best(), &acts, &self.weights, self.bias(), out)
    }
}
