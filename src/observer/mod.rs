//! Observers watch float tensors (weights, or activations during calibration) and turn what
//! they saw into [`QParams`].
//!
//! Non-finite values (NaN, ±Inf) never enter a range: they are skipped and counted
//! ([`Observer::nonfinite_count`]), so one bad activation cannot blow a scale up to infinity.
//! An observer that has seen no finite value refuses to produce qparams.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use candle_quant::observer::{HistogramObserver, MinMaxObserver, Observer};
//! use candle_quant::{QDType, QScheme, QSpec};
//!
//! # fn main() -> candle_core::Result<()> {
//! let spec = QSpec::new(QDType::QUInt8, QScheme::Affine);
//! let mut minmax = MinMaxObserver::new(spec);
//! minmax.observe(&Tensor::new(&[-1.0f32, 0.5, 3.0], &Device::Cpu)?)?;
//! let p = minmax.qparams()?;
//! // Range [-1, 3] over 255 steps: scale 4/255, zero point 0 - round(-1 / (4/255)) = 64.
//! assert_eq!((p.scales()[0], p.zero_points()[0]), (4.0 / 255.0, 64));
//!
//! // A histogram observer clips a rare outlier that min/max would have to cover.
//! let mut hist = HistogramObserver::new(spec, 2048)?;
//! let mut values = vec![0.0f32; 10_000];
//! values.iter_mut().enumerate().for_each(|(i, v)| *v = (i % 100) as f32 / 100.0);
//! values[0] = 50.0;
//! hist.observe(&Tensor::new(values.as_slice(), &Device::Cpu)?)?;
//! assert!(hist.qparams()?.scales()[0] < 50.0 / 255.0);
//! # Ok(()) }
//! ```

mod groups;
mod histogram;
mod minmax;

pub use groups::GroupHistogram;
pub use histogram::HistogramObserver;
pub use minmax::MinMaxObserver;

use crate::quant::{QParams, QSpec};
use candle_core::{Result, Tensor};

/// Something that learns a quantization range from the tensors it is shown.
pub trait Observer: std::fmt::Debug + Send + Sync {
    /// Folds `x` into the observed range.
    fn observe(&mut self, x: &Tensor) -> Result<()>;
    /// The parameters for what was observed so far; an error if nothing finite was observed.
    fn qparams(&self) -> Result<QParams>;
    /// Forgets everything observed.
    fn reset(&mut self);
    /// Integer type, scheme and range options the observer produces parameters for.
    fn spec(&self) -> QSpec;
    /// NaN/±Inf values seen and skipped.
    fn nonfinite_count(&self) -> u64;
    /// The finite `(min, max)` seen so far over the whole tensor (moving averages for a
    /// moving-average observer), if the observer keeps it.
    fn observed_range(&self) -> Option<(f32, f32)> {
        None
    }
}

/// The finite extremes of `values` and how many values were not finite; `None` if none was.
pub(crate) fn finite_min_max(values: &[f32]) -> (Option<(f32, f32)>, u64) {
    let mut nonfinite = 0u64;
    let mut range: Option<(f32, f32)> = None;
    for &v in values {
        if !v.is_finite() {
            nonfinite += 1;
            continue;
        }
        range = Some(match range {
            None => (v, v),
            Some((lo, hi)) => (lo.min(v), hi.max(v)),
        });
    }
    (range, nonfinite)
}
