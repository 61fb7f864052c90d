//! Fake-quantized linear for quantization-aware training.

use super::observed::lock;
use crate::kernels::{PackedInt8Weights, WeightQuant};
use crate::observer::Observer;
use crate::quant::{fake_quantize, QParams};
use candle_core::{Module, Result, Tensor, Var};
use candle_nn::Linear;
use std::sync::{Arc, Mutex};

/// `y = fq_a(x) · fq_w(W)ᵀ + b`: weights fake-quantized per output channel with the int8 weight
/// spec, inputs with the qparams of a (moving-average) observer that keeps learning while
/// `observing` is on. `W` and `b` are `Var`s, so gradients reach them through the
/// straight-through estimator.
#[derive(Debug, Clone)]
pub struct FakeQuantLinear {
    weight: Var,
    bias: Option<Var>,
    observer: Arc<Mutex<Box<dyn Observer>>>,
    observing: Arc<std::sync::atomic::AtomicBool>,
}

impl FakeQuantLinear {
    /// Trainable copy of `linear` whose weights and inputs are fake-quantized, the inputs' range learned by `observer`.
    pub fn new(linear: &Linear, observer: Box<dyn Observer>) -> Result<Self> {
        Ok(Self {
            weight: Var::from_tensor(linear.weight())?,
            bias: linear.bias().map(Var::from_tensor).transpose()?,
            observer: Arc::new(Mutex::new(observer)),
            observing: Arc::new(true.into()),
        })
    }

    /// The trainable variables (weight, then bias if any), for an optimizer.
    pub fn vars(&self) -> Vec<Var> {
        std::iter::once(self.weight.clone()).chain(self.bias.clone()).collect()
    }

    /// Freezes (`false`) or resumes (`true`) the activation observer.
    pub fn set_observing(&self, on: bool) {
        self.observing.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The input qparams learned so far (an error before any input was seen).
    pub fn activation_qparams(&self) -> Result<QParams> {
        lock(&self.observer)?.qparams()
    }

    /// Weight qparams: per output channel from the current weights, as the converted int8 layer
    /// will store them.
    pub fn weight_qparams(&self) -> Result<QParams> {
        PackedInt8Weights::qparams(self.weight.as_tensor(), WeightQuant::PerChannel)
    }

    /// The current float weights as a plain `Linear`.
    pub fn float_linear(&self) -> Result<Linear> {
        let bias = self.bias.as_ref().map(|b| b.as_tensor().detach());
        Ok(Linear::new(self.weight.as_tensor().detach(), bias))
    }

    pub(crate) fn weight_bytes(&self) -> usize {
        let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        bytes(self.weight.as_tensor()) + self.bias.as_ref().map_or(0, |b| bytes(b.as_tensor()))
    }
}

impl Module for FakeQuantLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let act_params = {
            let mut obs = lock(&self.observer)?;
            if self.observing.load(std::sync::atomic::Ordering::Relaxed) {
                obs.observe(&x.detach())?;
            }
            obs.qparams()?
        };
        let xq = fake_quantize(x, &act_params)?;
        let wq = fake_quantize(self.weight.as_tensor(), &self.weight_qparams()?)?;
        let bias = self.bias.as_ref().map(|b| b.as_tensor().clone());
        Linear::new(wq, bias).forward(&xq)
    }
}
