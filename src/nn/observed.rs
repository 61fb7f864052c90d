//! Observed linear: a float layer that records the range of its inputs (calibration).

use crate::observer::{GroupHistogram, Observer};
use crate::quant::QParams;
use candle_core::{Module, Result, Tensor};
use candle_nn::Linear;
use std::sync::{Arc, Mutex};

/// Float forward; every input passes through the observer first. The observer sits behind a
/// mutex because `Module::forward` takes `&self`; clones share it.
#[derive(Debug, Clone)]
pub struct ObservedLinear {
    linear: Linear,
    observer: Arc<Mutex<Box<dyn Observer>>>,
    /// Each input channel's largest finite `|x|` so far (SmoothQuant's `max |X_j|`).
    channel_absmax: Arc<Mutex<Vec<f32>>>,
    /// `|x|` histograms per group of input channels, when asked for (static per-group ranges).
    groups: Option<Arc<Mutex<GroupHistogram>>>,
}

impl ObservedLinear {
    /// `linear`, unchanged, with `observer` watching its inputs.
    pub fn new(linear: Linear, observer: Box<dyn Observer>) -> Self {
        Self { linear, observer: Arc::new(Mutex::new(observer)), channel_absmax: Arc::default(), groups: None }
    }

    /// Also keeps a histogram of `|x|` per run of `group` input channels ([`GroupHistogram`]).
    pub fn with_group_histogram(mut self, group: usize) -> Result<Self> {
        let k = self.linear.weight().dim(1)?;
        self.groups = Some(Arc::new(Mutex::new(GroupHistogram::new(k, group)?)));
        Ok(self)
    }

    /// The per-group histogram, if kept.
    pub fn group_histogram(&self) -> Result<Option<GroupHistogram>> {
        self.groups.as_ref().map(|g| Ok(g.lock().map_err(|_| poisoned())?.clone())).transpose()
    }

    /// The float layer.
    pub fn linear(&self) -> &Linear {
        &self.linear
    }

    /// Activation qparams from what the observer has seen.
    pub fn activation_qparams(&self) -> Result<QParams> {
        lock(&self.observer)?.qparams()
    }

    /// The finite input range the observer saw, if it keeps one.
    pub fn observed_range(&self) -> Result<Option<(f32, f32)>> {
        Ok(lock(&self.observer)?.observed_range())
    }

    /// Each input channel's largest finite `|x|` seen (empty before any input).
    pub fn channel_absmax(&self) -> Result<Vec<f32>> {
        Ok(self.channel_absmax.lock().map_err(|_| poisoned())?.clone())
    }

    /// NaN/±Inf inputs seen (and left out of the range).
    pub fn nonfinite_count(&self) -> Result<u64> {
        Ok(lock(&self.observer)?.nonfinite_count())
    }
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("input statistics lock poisoned by a panic in another thread".into())
}

pub(crate) fn lock(observer: &Mutex<Box<dyn Observer>>) -> Result<std::sync::MutexGuard<'_, Box<dyn Observer>>> {
    observer.lock().map_err(|_| candle_core::Error::Msg("observer lock poisoned by a panic in another thread".into()))
}

impl Module for ObservedLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        lock(&self.observer)?.observe(x)?;
        let k = x.dim(candle_core::D::Minus1)?;
        let rows = crate::quant::float_values(x, "observed input")?;
        if let Some(groups) = &self.groups {
            groups.lock().map_err(|_| poisoned())?.observe(&rows)?;
        }
        let mut maxima = self.channel_absmax.lock().map_err(|_| poisoned())?;
        if maxima.len() != k {
            *maxima = vec![0.0; k];
        }
        for row in rows.chunks(k) {
            for (m, v) in maxima.iter_mut().zip(row) {
                if v.is_finite() {
                    *m = m.max(v.abs());
                }
            }
        }
        drop(maxima);
        self.linear.forward(x)
    }
}
