//! Integer types, schemes and the one scale/zero-point formula the whole crate uses.

use candle_core::{bail, Result};

/// The smallest scale ever produced. A constant or all-zero tensor gets this scale,
/// so `x / scale` is always finite and `0.0` still maps to the zero point exactly.
pub const SCALE_EPS: f32 = f32::EPSILON;

/// Integer type of quantized values.
///
/// `#[non_exhaustive]`: sub-byte types (int4) will join as new variants with their own ranges.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QDType {
    /// Signed 8-bit, `[-128, 127]`.
    QInt8,
    /// Unsigned 8-bit, `[0, 255]`.
    QUInt8,
}

impl QDType {
    /// Full `(qmin, qmax)` of the type.
    pub fn full_range(self) -> (i32, i32) {
        match self {
            QDType::QInt8 => (-128, 127),
            QDType::QUInt8 => (0, 255),
        }
    }
}

/// How a real range maps onto the integer range.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QScheme {
    /// `scale = (max - min) / (qmax - qmin)`, `zero_point = qmin - round(min / scale)`;
    /// the range is first widened to contain 0.0.
    Affine,
    /// `scale = max(|min|, |max|) / ((qmax - qmin) / 2)`, `zero_point = (qmin + qmax + 1) / 2`
    /// (0 for qint8, 128 for quint8).
    Symmetric,
}

/// Which elements share one scale and zero point.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Granularity {
    /// One pair for the whole tensor.
    PerTensor,
    /// One pair per index along `axis` (weights: axis 0 = output channel).
    PerChannel {
        /// The dimension whose indices each get a pair.
        axis: usize,
    },
    /// One pair per row of the last dimension (activations: one per token).
    PerToken,
    /// One pair per run of `size` consecutive values along the last dimension of each row
    /// (the last group of a row may be shorter).
    PerGroup {
        /// Values per group.
        size: usize,
    },
}

/// Everything that decides the integer range and the mapping: type, scheme and range options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QSpec {
    /// Integer type.
    pub dtype: QDType,
    /// Affine or symmetric.
    pub scheme: QScheme,
    /// Use one bit less (7-bit range), as fbgemm does for activations so that
    /// `u8 * i8` pair sums cannot saturate 16-bit intermediates.
    pub reduce_range: bool,
    /// Drop the most negative value of a signed type (`[-127, 127]`), so the range is symmetric
    /// around 0 and `|q|` always fits in 7 bits. The crate's int8 weights use it.
    pub narrow_range: bool,
}

impl QSpec {
    /// Per-channel symmetric `[-127, 127]` qint8: the crate's weight format.
    pub const WEIGHT: QSpec = QSpec { dtype: QDType::QInt8, scheme: QScheme::Symmetric, reduce_range: false, narrow_range: true };
    /// Symmetric `[-127, 127]` qint8: dynamic activations (per token or per group).
    pub const DYNAMIC_ACTIVATION: QSpec = QSpec::WEIGHT;

    /// Full integer range, no `reduce_range`, no `narrow_range`.
    pub fn new(dtype: QDType, scheme: QScheme) -> Self {
        Self { dtype, scheme, reduce_range: false, narrow_range: false }
    }

    /// One bit less of range (PyTorch's `reduce_range`, for `u8 × i8` kernels that would saturate).
    pub fn with_reduce_range(mut self, on: bool) -> Self {
        self.reduce_range = on;
        self
    }

    /// Drops the most negative value (`[-127, 127]` for qint8), so the range is symmetric.
    pub fn with_narrow_range(mut self, on: bool) -> Self {
        self.narrow_range = on;
        self
    }

    /// `(qmin, qmax)` after `reduce_range` and `narrow_range`.
    pub fn qrange(&self) -> (i32, i32) {
        let (mut qmin, mut qmax) = self.dtype.full_range();
        if self.reduce_range {
            // Keep the midpoint, halve the span: qint8 -> [-64, 63], quint8 -> [0, 127].
            match self.dtype {
                QDType::QInt8 => (qmin, qmax) = (qmin / 2, qmax / 2),
                QDType::QUInt8 => qmax /= 2,
            }
        }
        if self.narrow_range && qmin < 0 {
            qmin = -qmax;
        }
        (qmin, qmax)
    }

    /// Scale and zero point for the real range `[min, max]` — the only place this formula lives.
    ///
    /// The range is widened to include 0.0 (so 0.0 is exact); the scale is floored at
    /// [`SCALE_EPS`]; non-finite or inverted bounds are an error.
    pub fn scale_zero_point(&self, min: f32, max: f32) -> Result<(f32, i32)> {
        if !min.is_finite() || !max.is_finite() || min > max {
            bail!("cannot compute qparams for the range [{min}, {max}]: bounds must be finite and ordered")
        }
        Ok(self.scale_zero_point_unchecked(min, max))
    }

    /// [`Self::scale_zero_point`] for bounds already known to be finite and ordered
    /// (the activation quantizers of the hot path).
    #[inline]
    pub fn scale_zero_point_unchecked(&self, min: f32, max: f32) -> (f32, i32) {
        let (qmin, qmax) = self.qrange();
        let (min, max) = (min.min(0.0), max.max(0.0));
        match self.scheme {
            QScheme::Symmetric => {
                let amax = (-min).max(max);
                let scale = (amax / ((qmax - qmin) as f32 / 2.0)).max(SCALE_EPS);
                (scale, (qmin + qmax + 1).div_euclid(2))
            }
            QScheme::Affine => {
                let scale = ((max - min) / (qmax - qmin) as f32).max(SCALE_EPS);
                let zp = qmin - (min / scale).round_ties_even() as i32;
                (scale, zp.clamp(qmin, qmax))
            }
        }
    }

    /// `q = clamp(round(x / scale) + zero_point, qmin, qmax)`, rounding half to even.
    #[inline]
    pub fn quantize_value(&self, x: f32, scale: f32, zero_point: i32) -> i32 {
        let (qmin, qmax) = self.qrange();
        quantize_value(x, 1.0 / scale, zero_point, qmin, qmax)
    }
}

/// `clamp(round_half_even(x * inv_scale) + zero_point, qmin, qmax)`; NaN maps to the zero point.
///
/// Multiplying by the reciprocal (rather than dividing) is what the vectorised quantizers do,
/// so every quantizer in the crate calls this and agrees bit for bit.
#[inline]
pub fn quantize_value(x: f32, inv_scale: f32, zero_point: i32, qmin: i32, qmax: i32) -> i32 {
    let r = x * inv_scale;
    // NaN becomes 0, i.e. the zero point; written as a select (no early return) so that loops
    // over this function vectorise.
    let r = if r.is_nan() { 0.0 } else { r };
    // Clamping to the integer bounds first and rounding after gives the same result as rounding
    // first. Once |r| < 2²², r + 1.5·2²³ lies in [2²³, 2²⁴), where floats are whole numbers:
    // the addition rounds half to even in hardware, and the sum's bits are those of 1.5·2²³
    // plus round(r) — an integer read straight off the bits (no libm, no saturating cast, so
    // loops over this function vectorise).
    const MAGIC: f32 = 12_582_912.0;
    const MAGIC_BITS: i32 = 0x4B40_0000;
    let r = r.max((qmin - zero_point) as f32).min((qmax - zero_point) as f32);
    ((r + MAGIC).to_bits() as i32 - MAGIC_BITS + zero_point).clamp(qmin, qmax)
}

/// `x = (q - zero_point) * scale`.
#[inline]
pub fn dequantize_value(q: i32, scale: f32, zero_point: i32) -> f32 {
    (q - zero_point) as f32 * scale
}
