//! Fake-quantized linear for quantization-aware training.

use super::observed::lock;
use crate::kernels::{PackedInt8Weights, WeightQuant};
use crate::observer::Observer;
use crate::quant::{fake_quantize, fake_quantize_learned, Granularity, QParams, QSpec};
use candle_core::{Module, Result, Tensor, Var};
use candle_nn::Linear;
use std::sync::{Arc, Mutex};

/// `y = fq_a(x) · fq_w(W)ᵀ + b`: weights fake-quantized per output channel with the int8 weight
/// spec, inputs with the qparams of a (moving-average) observer that keeps learning while
/// `observing` is on — or, after [`learn_activation_range`](Self::learn_activation_range), with
/// a step size learned by gradient descent. `W` and `b` are `Var`s, so gradients reach them
/// through the straight-through estimator.
#[derive(Debug, Clone)]
pub struct FakeQuantLinear {
    weight: Var,
    bias: Option<Var>,
    observer: Arc<Mutex<Box<dyn Observer>>>,
    observing: Arc<std::sync::atomic::AtomicBool>,
    learned: Option<LearnedRange>,
    /// `fq(W)` computed once, when the weights are frozen (ranges-only training).
    frozen: Option<Tensor>,
}

/// A per-tensor input range trained with the loss: step size `s = exp(log_scale)` (the log
/// keeps it positive and makes an optimizer's steps relative), zero point fixed.
#[derive(Debug, Clone)]
struct LearnedRange {
    log_scale: Var,
    zero_point: i32,
    spec: QSpec,
}

impl FakeQuantLinear {
    /// Trainable copy of `linear` whose weights and inputs are fake-quantized, the inputs' range learned by `observer`.
    pub fn new(linear: &Linear, observer: Box<dyn Observer>) -> Result<Self> {
        Ok(Self {
            weight: Var::from_tensor(linear.weight())?,
            bias: linear.bias().map(Var::from_tensor).transpose()?,
            observer: Arc::new(Mutex::new(observer)),
            observing: Arc::new(true.into()),
            learned: None,
            frozen: None,
        })
    }

    /// Stops training the weights: `fq(W)` is computed once and reused as a constant, so a
    /// training step neither fake-quantizes every weight again nor computes weight gradients
    /// (what is left to train is the learned input range, if any). [`vars`](Self::vars) is then
    /// empty.
    pub fn freeze_weights(&mut self) -> Result<()> {
        let w = self.weight.as_tensor().detach();
        self.frozen = Some(fake_quantize(&w, &self.weight_qparams()?)?.detach());
        Ok(())
    }

    /// From now on the input step size is trained with the loss (learned step size, LSQ),
    /// starting from the per-tensor `init` (e.g. a calibration's); the observer stops.
    pub fn learn_activation_range(&mut self, init: &QParams) -> Result<()> {
        if init.granularity() != Granularity::PerTensor {
            candle_core::bail!("a learned activation range starts from per-tensor qparams, got {:?}", init.granularity())
        }
        let log_scale = Var::new(&[init.scales()[0].ln()], self.weight.device())?;
        self.learned = Some(LearnedRange { log_scale, zero_point: init.zero_points()[0], spec: init.spec() });
        self.set_observing(false);
        Ok(())
    }

    /// The trained log step size, if the range is learned (for an optimizer; see
    /// [`learn_activation_range`](Self::learn_activation_range)).
    pub fn range_var(&self) -> Option<Var> {
        self.learned.as_ref().map(|l| l.log_scale.clone())
    }

    /// The trainable variables (weight, then bias if any), for an optimizer; none once frozen.
    pub fn vars(&self) -> Vec<Var> {
        if self.frozen.is_some() {
            return vec![];
        }
        std::iter::once(self.weight.clone()).chain(self.bias.clone()).collect()
    }

    /// Freezes (`false`) or resumes (`true`) the activation observer.
    pub fn set_observing(&self, on: bool) {
        self.observing.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The input qparams learned so far (an error before any input was seen).
    pub fn activation_qparams(&self) -> Result<QParams> {
        match &self.learned {
            Some(l) => {
                let s = l.log_scale.as_tensor().exp()?.flatten_all()?.to_vec1::<f32>()?[0];
                QParams::new(l.spec, Granularity::PerTensor, vec![s], vec![l.zero_point])
            }
            None => lock(&self.observer)?.qparams(),
        }
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
        let (wq, bias) = match &self.frozen {
            Some(wq) => (wq.clone(), self.bias.as_ref().map(|b| b.as_tensor().detach())),
            None => {
                let wq = fake_quantize(self.weight.as_tensor(), &self.weight_qparams()?)?;
                (wq, self.bias.as_ref().map(|b| b.as_tensor().clone()))
            }
        };
        if let Some(l) = &self.learned {
            let xq = fake_quantize_learned(x, &l.log_scale.as_tensor().exp()?, l.zero_point, &l.spec)?;
            return Linear::new(wq, bias).forward(&xq);
        }
        let act_params = {
            let mut obs = lock(&self.observer)?;
            if self.observing.load(std::sync::atomic::Ordering::Relaxed) {
                obs.observe(&x.detach())?;
            }
            obs.qparams()?
        };
        let xq = fake_quantize(x, &act_params)?;
        Linear::new(wq, bias).forward(&xq)
    }
}
