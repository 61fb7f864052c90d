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

/// Fake quantization with a learned per-tensor step size (LSQ, Esser et al. 2020): `scale` is
/// a one-element tensor in the autograd graph, `zero_point` and `spec`'s range fixed.
///
/// Value: `fq(x) = (c − z) · s` with `c = clamp(round(x / s) + z, qmin, qmax)`.
/// Gradients: `d fq / d x = 1` inside the range, 0 where clipped (straight-through);
/// `d fq / d s = round(x / s) − x / s` inside the range and `c − z` where clipped, so the step
/// size learns both to shrink rounding error and to stop clipping. Built as
/// `x · mask + s · t` with `t` the constant of those `d fq / d s` (in range
/// `x + s·(round(x/s) − x/s) = s·round(x/s)`: the value is exact).
pub fn fake_quantize_learned(x: &Tensor, scale: &Tensor, zero_point: i32, spec: &super::QSpec) -> Result<Tensor> {
    let values = float_values(x, "fake_quantize input")?;
    let s = scale.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let [s] = s.as_slice() else { candle_core::bail!("a learned step size is one value, got {}", s.len()) };
    if !(s.is_finite() && *s > 0.0) {
        candle_core::bail!("the learned step size became {s}: lower the learning rate")
    }
    let (qmin, qmax) = spec.qrange();
    let (inv, z) = (1.0 / s, zero_point as f32);
    let mut mask = vec![0f32; values.len()];
    let mut t = vec![0f32; values.len()];
    for ((m, t), &v) in mask.iter_mut().zip(t.iter_mut()).zip(&values) {
        let r = v * inv;
        let q = r.round_ties_even() + z;
        if q >= qmin as f32 && q <= qmax as f32 {
            (*m, *t) = (1.0, r.round_ties_even() - r);
        } else {
            *t = q.clamp(qmin as f32, qmax as f32) - z;
        }
    }
    let dtype = x.dtype();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(dtype)?;
    let t = Tensor::from_vec(t, x.shape(), x.device())?.to_dtype(dtype)?;
    x.mul(&mask)?.add(&t.broadcast_mul(&scale.to_dtype(dtype)?.reshape(())?)?)
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
