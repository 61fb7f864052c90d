//! Percentile observer: clip the range at the `p`-th and `(100 - p)`-th percentiles.

use super::histogram::{observe_into, RunningHistogram};
use super::Observer;
use crate::quant::{QParams, QSpec};
use candle_core::{bail, Result, Tensor};

/// Range `[P(100 - p), P(p)]` of everything observed, read off a running histogram
/// (linear interpolation inside a bin). `p = 100` is the plain min/max.
#[derive(Debug, Clone)]
pub struct PercentileObserver {
    spec: QSpec,
    percentile: f64,
    hist: RunningHistogram,
    nonfinite: u64,
}

impl PercentileObserver {
    /// `percentile` in (50, 100], e.g. 99.99; `bins` histogram bins (2048 is a good default).
    pub fn new(spec: QSpec, percentile: f64, bins: usize) -> Result<Self> {
        if !(percentile > 50.0 && percentile <= 100.0) {
            bail!("percentile must lie in (50, 100], got {percentile}")
        }
        Ok(Self { spec, percentile, hist: RunningHistogram::new(bins)?, nonfinite: 0 })
    }
}

impl Observer for PercentileObserver {
    fn observe(&mut self, x: &Tensor) -> Result<()> {
        observe_into(&mut self.hist, &mut self.nonfinite, x)
    }

    fn qparams(&self) -> Result<QParams> {
        if self.hist.is_empty() {
            bail!("percentile observer has not observed any finite value yet: run calibration data through it first")
        }
        let tail = 1.0 - self.percentile / 100.0;
        QParams::per_tensor(self.spec, self.hist.quantile(tail), self.hist.quantile(1.0 - tail))
    }

    fn reset(&mut self) {
        self.hist.clear();
        self.nonfinite = 0;
    }

    fn spec(&self) -> QSpec {
        self.spec
    }

    fn nonfinite_count(&self) -> u64 {
        self.nonfinite
    }
}
