//! Min/max observers: plain or moving-average, per tensor or per channel.

use super::Observer;
use crate::quant::{float_values, slot_min_max, Granularity, QParams, QSpec, SlotLayout};
use candle_core::{bail, Result, Tensor};

/// Tracks the minimum and maximum of every observed tensor (per tensor or per channel).
///
/// With an averaging constant `c` (moving average), a batch with extremes `(m, M)` updates
/// `min += c * (m - min)`, `max += c * (M - max)`; the first batch sets them directly.
/// PyTorch equivalents: `MinMaxObserver`, `MovingAverageMinMaxObserver`,
/// `PerChannelMinMaxObserver`, `MovingAveragePerChannelMinMaxObserver`.
#[derive(Debug, Clone)]
pub struct MinMaxObserver {
    spec: QSpec,
    granularity: Granularity,
    averaging_constant: Option<f32>,
    min: Vec<f32>,
    max: Vec<f32>,
    nonfinite: u64,
}

impl MinMaxObserver {
    /// Running min/max of the whole tensor.
    pub fn new(spec: QSpec) -> Self {
        Self::build(spec, Granularity::PerTensor, None)
    }

    /// Exponential moving average of each batch's min/max, with `averaging_constant` in (0, 1].
    pub fn moving_average(spec: QSpec, averaging_constant: f32) -> Result<Self> {
        check_constant(averaging_constant)?;
        Ok(Self::build(spec, Granularity::PerTensor, Some(averaging_constant)))
    }

    /// Running min/max of each slice along `axis`.
    pub fn per_channel(spec: QSpec, axis: usize) -> Self {
        Self::build(spec, Granularity::PerChannel { axis }, None)
    }

    /// Moving average of each slice's min/max along `axis`.
    pub fn moving_average_per_channel(spec: QSpec, axis: usize, averaging_constant: f32) -> Result<Self> {
        check_constant(averaging_constant)?;
        Ok(Self::build(spec, Granularity::PerChannel { axis }, Some(averaging_constant)))
    }

    fn build(spec: QSpec, granularity: Granularity, averaging_constant: Option<f32>) -> Self {
        Self { spec, granularity, averaging_constant, min: vec![], max: vec![], nonfinite: 0 }
    }

    /// The observed `(min, max)` of each slot, if anything finite was seen.
    pub fn range(&self) -> Option<(&[f32], &[f32])> {
        (!self.min.is_empty() && self.min.iter().zip(&self.max).all(|(lo, hi)| lo <= hi)).then_some((&self.min[..], &self.max[..]))
    }
}

fn check_constant(c: f32) -> Result<()> {
    if !(c > 0.0 && c <= 1.0) {
        bail!("averaging constant must lie in (0, 1], got {c}")
    }
    Ok(())
}

impl Observer for MinMaxObserver {
    fn observe(&mut self, x: &Tensor) -> Result<()> {
        if x.elem_count() == 0 {
            bail!("observer was given an empty tensor of shape {:?}", x.shape())
        }
        let values = float_values(x, "observed tensor")?;
        self.nonfinite += values.iter().filter(|v| !v.is_finite()).count() as u64;
        let layout = SlotLayout::new(self.granularity, x.shape())?;
        if matches!(self.granularity, Granularity::PerToken | Granularity::PerGroup { .. }) {
            bail!("min/max observers track per-tensor or per-channel ranges, not {:?}", self.granularity)
        }
        let (bmin, bmax) = slot_min_max(&values, &layout);
        if self.min.is_empty() {
            self.min = vec![f32::INFINITY; layout.slots];
            self.max = vec![f32::NEG_INFINITY; layout.slots];
        } else if self.min.len() != layout.slots {
            bail!(
                "observer tracks {} channels but a tensor of shape {:?} has {} along {:?}",
                self.min.len(),
                x.shape(),
                layout.slots,
                self.granularity
            )
        }
        for s in 0..layout.slots {
            if bmin[s] > bmax[s] {
                continue; // no finite value in this slot
            }
            let first = self.min[s] > self.max[s];
            match self.averaging_constant {
                Some(c) if !first => {
                    self.min[s] += c * (bmin[s] - self.min[s]);
                    self.max[s] += c * (bmax[s] - self.max[s]);
                }
                Some(_) => (self.min[s], self.max[s]) = (bmin[s], bmax[s]),
                None => (self.min[s], self.max[s]) = (self.min[s].min(bmin[s]), self.max[s].max(bmax[s])),
            }
        }
        Ok(())
    }

    fn qparams(&self) -> Result<QParams> {
        let Some((min, max)) = self.range() else {
            bail!("min/max observer has not observed any finite value yet: run calibration data through it first")
        };
        QParams::from_min_max(self.spec, self.granularity, min, max)
    }

    fn reset(&mut self) {
        self.min.clear();
        self.max.clear();
        self.nonfinite = 0;
    }

    fn spec(&self) -> QSpec {
        self.spec
    }

    fn nonfinite_count(&self) -> u64 {
        self.nonfinite
    }

    fn observed_range(&self) -> Option<(f32, f32)> {
        let (lo, hi) = self.range()?;
        Some((lo.iter().copied().fold(f32::INFINITY, f32::min), hi.iter().copied().fold(f32::NEG_INFINITY, f32::max)))
    }
}
