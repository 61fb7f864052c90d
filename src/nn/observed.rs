//! Observed linear: a float layer that records the range of its inputs (calibration).

use crate::observer::Observer;
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
}

impl ObservedLinear {
    /// `linear`, unchanged, with `observer` watching its inputs.
    pub fn new(linear: Linear, observer: Box<dyn Observer>) -> Self {
        Self { linear, observer: Arc::new(Mutex::new(observer)), channel_absmax: Arc::default() }
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
        Ok(self.channel_absmax.lock().map_err(|_| candle_core::Error::Msg("channel maxima lock poisoned".into()))?.clone())
    }

    /// NaN/±Inf inputs seen (and left out of the range).
    pub fn nonfinite_count(&self) -> Result<u64> {
        Ok(lock(&self.observer)?.nonfinite_count())
    }
}

pub(crate) fn lock(observer: &Mutex<Box<dyn Observer>>) -> Result<std::sync::MutexGuard<'_, Box<dyn Observer>>> {
    observer.lock().map_err(|_| candle_core::Error::Msg("observer lock poisoned by a panic in another thread".into()))
}

impl Module for ObservedLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        lock(&self.observer)?.observe(x)?;
        let k = x.dim(candle_core::D::Minus1)?;
        let rows = crate::quant::float_values(x, "observed input")?;
        let mut maxima = self.channel_absmax.lock().map_err(|_| candle_core::Error::Msg("channel maxima lock poisoned".into()))?;
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
