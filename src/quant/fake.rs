//! Fake quantization: `dequantize(quantize(x))` in float, with a straight-through gradient.

use super::params::QParams;
use super::qtensor::float_values;
use super::spec::{dequantize_value, quantize_value};
use candle_core::{DType, Result, Tensor};

/// `fq(x) = (clamp(round(x / s) + z, qmin, qmax) - z) * s`, in the dtype of `x`.
///
/// Gradient (straight-through estimator): `d fq / d x = 1` where `round(x / s) + z` lies inside
/// `[qmin, qmax]` and `0` where the value was clipped. Built as
/// `x * mask + (fq(x) - x * mask).detach()`, so candle's autograd sees only `x * mask`.
/// Scales and zero points are constants here (no learned step size).
pub fn fake_quantize(x: &Tensor, params: &QParams) -> Result<Tensor> {
    let values = float_values(x, "fake_quantize input")?;
    let layout = params.layout(x.shape())?;
    let (qmin, qmax) = params.spec.qrange();
    let mut fq = vec![0f32; values.len()];
    let mut mask = vec![0f32; values.len()];
    layout.for_each_run(values.len(), |s, r| {
        let (scale, zp) = (params.scales[s], params.zero_points[s]);
        for i in r {
            let v = values[i];
            fq[i] = dequantize_value(quantize_value(v, 1.0 / scale, zp, qmin, qmax), scale, zp);
            let unclipped = (v * (1.0 / scale)).round_ties_even() + zp as f32;
            mask[i] = if unclipped >= qmin as f32 && unclipped <= qmax as f32 { 1.0 } else { 0.0 };
        }
    });
    let dtype = x.dtype();
    let fq = Tensor::from_vec(fq, x.shape(), x.device())?.to_dtype(dtype)?;
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(dtype)?;
    let passed = x.mul(&mask)?;
    passed.add(&fq.sub(&passed)?.detach())
}

/// The fake-quantized values without the gradient plumbing (for evaluation).
pub fn fake_quantize_values(x: &Tensor, params: &QParams) -> Result<Tensor> {
    fake_quantize(&x.detach(), params)
}

/// Mean squared error between `x` and its fake-quantized self: the quantization noise.
pub fn quantization_mse(x: &Tensor, params: &QParams) -> Result<f32> {
    let fq = fake_quantize_values(x, params)?;
    x.to_dtype(DType::F32)?.sub(&fq.to_dtype(DType::F32)?)?.sqr()?.mean_all()?.to_scalar::<f32>()
}
