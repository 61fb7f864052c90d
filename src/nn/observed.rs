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
}

impl ObservedLinear {
    /// `linear`, unchanged, with `observer` watching its inputs.
    pub fn new(linear: Linear, observer: Box<dyn Observer>) -> Self {
        Self { linear, observer: Arc::new(Mutex::new(observer)) }
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
        self.linear.forward(x)
    }
}
