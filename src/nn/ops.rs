//! Fused float operations of the models as candle ops: RMSNorm and LayerNorm (each also fused
//! with the residual add before it) and SwiGLU's `silu(gate) · up`, run on the kernels as
//! [`CustomOp2`] / [`CustomOp3`] (the candle-nn `ops.rs` pattern), bit for bit as candle's own
//! ops compute them.
//!
//! Each function takes the kernels' path for contiguous `f32` CPU tensors that carry no
//! gradient and candle's ops otherwise, so a model calls one function and
//! stays differentiable where it must be. The kernels' ops have no backward pass.

use crate::kernels;
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D};
use std::mem::MaybeUninit;

/// Whether the kernels can read `t` in place and replace candle's op on it: a contiguous `f32`
/// CPU tensor that carries no gradient.
pub(crate) fn kernel_ready(t: &Tensor) -> bool {
    t.dtype() == DType::F32 && t.device().is_cpu() && t.is_contiguous() && !t.track_op()
}

/// `a + b` (a residual connection): on two contiguous `f32` CPU tensors of one shape, one plain
/// pass on this thread — candle's element-wise ops hand work this size to a pool whose thread
/// then spins for a while, taking a core from the kernels' threads — else candle's op (which
/// also carries gradients).
pub(crate) fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !kernel_ready(a) || !kernel_ready(b) || a.shape() != b.shape() {
        return a + b;
    }
    let sum: Vec<f32> =
        with_float_values(a, "addend", |a| with_float_values(b, "addend", |b| Ok(a.iter().zip(b).map(|(x, y)| x + y).collect())))?;
    Tensor::from_vec(sum, a.shape(), a.device())
}

/// Runs `f` on `x`'s values as `f32`: borrowed from a contiguous `f32` CPU tensor (the usual
/// case: no copy), converted into a new buffer otherwise; `name` says what `x` is in errors.
pub(crate) fn with_float_values<T>(x: &Tensor, name: &str, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    if x.dtype() == DType::F32 {
        let (storage, layout) = x.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            return f(&cpu.as_slice::<f32>()?[start..end]);
        }
    }
    f(&crate::quant::float_values(x, name)?)
}

/// The `f32` values of a contiguous CPU storage seen through `layout`.
fn values<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<f32>()?[start..end]),
        None => bail!("{what}: the kernels read contiguous tensors only"),
    }
}

/// `w` as a contiguous `f32` tensor (a norm's weight or bias, converted if stored otherwise).
fn float_weight(w: &Tensor) -> Result<Tensor> {
    w.to_dtype(DType::F32)?.contiguous()
}

/// [`rms_norm`] on the kernels: `(x, α)`.
struct RmsNormOp {
    eps: f32,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "candle-quant-rms-norm"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout, alpha: &CpuStorage, la: &Layout) -> Result<(CpuStorage, Shape)> {
        let (xs, alpha) = (values(x, lx, "rms norm input")?, values(alpha, la, "rms norm weight")?);
        let out = filled(xs.len(), |out| kernels::rms_norm_into(xs, alpha.len(), alpha, self.eps, out))?;
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }
}

/// RMSNorm over the last dimension, `y = x / √(mean(x²) + ε) · α`, bit for bit as candle's
/// fused `candle_nn::ops::rms_norm` (the sums of squares added in order); on the kernels for a
/// contiguous `f32` CPU tensor, as candle-nn's `RmsNorm` layer otherwise.
pub fn rms_norm(x: &Tensor, alpha: &Tensor, eps: f32) -> Result<Tensor> {
    if !kernel_ready(x) {
        // candle-nn's RmsNorm layer: its fused op on contiguous input, basic ops otherwise.
        return candle_core::Module::forward(&candle_nn::RmsNorm::new(alpha.clone(), eps as f64), x);
    }
    check_last_dim(x, alpha, "rms norm weight")?;
    x.apply_op2_no_bwd(&float_weight(alpha)?, &RmsNormOp { eps })
}

/// [`add_rms_norm`] on the kernels: `(x, h, α)`, the sum and its norm written side by side as
/// `[2, len]`.
struct AddRmsNormOp {
    eps: f32,
}

impl CustomOp3 for AddRmsNormOp {
    fn name(&self) -> &'static str {
        "candle-quant-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        h: &CpuStorage,
        lh: &Layout,
        alpha: &CpuStorage,
        la: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xs, hs, alpha) = (values(x, lx, "residual")?, values(h, lh, "residual branch")?, values(alpha, la, "rms norm weight")?);
        let len = xs.len();
        let both = filled(2 * len, |both| {
            let (sum, out) = both.split_at_mut(len);
            kernels::add_rms_norm_into(xs, hs, alpha.len(), alpha, self.eps, sum, out)
        })?;
        Ok((CpuStorage::F32(both), Shape::from((2, len))))
    }
}

/// A residual connection and the RMSNorm after it, `(s, rms_norm(s))` with `s = x + h`: in one
/// pass on the kernels for contiguous `f32` CPU tensors of one shape (bit for bit as an add
/// then [`rms_norm`]), through those two otherwise.
pub fn add_rms_norm(x: &Tensor, h: &Tensor, alpha: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    if !kernel_ready(x) || !kernel_ready(h) || x.shape() != h.shape() {
        let sum = add(x, h)?;
        let y = rms_norm(&sum, alpha, eps)?;
        return Ok((sum, y));
    }
    check_last_dim(x, alpha, "rms norm weight")?;
    let both = x.apply_op3_no_bwd(h, &float_weight(alpha)?, &AddRmsNormOp { eps })?;
    // Two views of one buffer: rows 0 and 1 are each contiguous, reshaped without a copy.
    Ok((both.get(0)?.reshape(x.shape())?, both.get(1)?.reshape(x.shape())?))
}

/// [`add_layer_norm`] on the kernels: `(x, h, α)` with the bias `β` held by the op.
struct AddLayerNormOp {
    beta: Tensor,
    eps: f32,
}

impl CustomOp3 for AddLayerNormOp {
    fn name(&self) -> &'static str {
        "candle-quant-add-layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        h: &CpuStorage,
        lh: &Layout,
        alpha: &CpuStorage,
        la: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (xs, hs, alpha) = (values(x, lx, "residual")?, values(h, lh, "residual branch")?, values(alpha, la, "layer norm weight")?);
        let out = with_float_values(&self.beta, "layer norm bias", |beta| {
            filled(xs.len(), |out| kernels::layer_norm_into(xs, Some(hs), alpha.len(), alpha, beta, self.eps, out))
        })?;
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }
}

/// `LayerNorm(x + h)` over the last dimension, `y = (s − μ) / √(σ² + ε) · α + β` with
/// `s = x + h` (a residual connection and its norm; the sum is never written out): in one pass
/// on the kernels for contiguous `f32` CPU tensors of one shape, bit for bit as an add then
/// candle's fused `candle_nn::ops::layer_norm`; through those two otherwise.
pub fn add_layer_norm(x: &Tensor, h: &Tensor, alpha: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    if !kernel_ready(x) || !kernel_ready(h) || x.shape() != h.shape() {
        return candle_nn::ops::layer_norm(&add(x, h)?, alpha, beta, eps);
    }
    check_last_dim(x, alpha, "layer norm weight")?;
    check_last_dim(x, beta, "layer norm bias")?;
    x.apply_op3_no_bwd(h, &float_weight(alpha)?, &AddLayerNormOp { beta: float_weight(beta)?, eps })
}

/// [`silu_mul`] on the kernels: `(gate, up)`.
struct SiluMulOp;

impl CustomOp2 for SiluMulOp {
    fn name(&self) -> &'static str {
        "candle-quant-silu-mul"
    }

    fn cpu_fwd(&self, gate: &CpuStorage, lg: &Layout, up: &CpuStorage, lu: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (values(gate, lg, "SwiGLU gate")?, values(up, lu, "SwiGLU up")?);
        let out = filled(g.len(), |out| kernels::silu_mul_into(g, u, out))?;
        Ok((CpuStorage::F32(out), lg.shape().clone()))
    }
}

/// SwiGLU's product `silu(gate) · up`, `silu(x) = x / (1 + e^(−x))`: in one pass on the kernels
/// (no intermediate tensor) for `f32` CPU tensors of one shape — a strided one (half of a fused
/// projection) is read through a contiguous copy — candle's ops otherwise. Not differentiable
/// on the kernels' path: a model in training calls `candle_nn::ops::silu` itself.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let fast = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
    if !fast(gate) || !fast(up) || gate.shape() != up.shape() {
        return candle_nn::ops::silu(gate)? * up;
    }
    gate.contiguous()?.apply_op2_no_bwd(&up.contiguous()?, &SiluMulOp)
}

/// Fails unless `w` has one value per element of `x`'s last dimension.
fn check_last_dim(x: &Tensor, w: &Tensor, what: &str) -> Result<()> {
    let n = x.dim(D::Minus1)?;
    if w.dims() != [n] {
        bail!("{what} has shape {:?}, the input's rows have {n} values", w.dims())
    }
    Ok(())
}

/// A vector of `len` floats that `fill` writes, checked: the kernels' `_into` functions write
/// every value they are given when they return `Ok`.
fn filled(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>]) -> Result<()>) -> Result<Vec<f32>> {
    // SAFETY: every `fill` passed here is a kernels `_into` function (or a split of its buffer
    // between two of them), each of which writes all the values of its output on `Ok`.
    unsafe { kernels::filled_vec(len, fill) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn wave(len: usize, f: f32, c: f32) -> Vec<f32> {
        (0..len).map(|i| (i as f32 * f).sin() * (1 + i % 7) as f32 + c).collect()
    }

    fn bits(t: &Tensor) -> Result<Vec<u32>> {
        Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
    }

    /// The ops on the kernels give candle's own fused ops bit for bit (and the candle fallback
    /// is taken for a strided input): rows fewer and more than eight, whole 8-value vectors
    /// and not.
    #[test]
    fn fused_ops_equal_candles_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        for (rows, n) in [(3, 20), (13, 384), (300, 576), (9, 7)] {
            let x = Tensor::from_vec(wave(rows * n, 0.37, 0.5), (rows, n), &dev)?;
            let h = Tensor::from_vec(wave(rows * n, 1.91, -0.2), (rows, n), &dev)?;
            let (alpha, beta) = (Tensor::from_vec(wave(n, 0.11, 1.0), n, &dev)?, Tensor::from_vec(wave(n, 0.05, 0.0), n, &dev)?);
            let sum = (&x + &h)?;
            assert_eq!(bits(&rms_norm(&x, &alpha, 1e-5)?)?, bits(&candle_nn::ops::rms_norm(&x, &alpha, 1e-5)?)?);
            let (s, y) = add_rms_norm(&x, &h, &alpha, 1e-5)?;
            assert_eq!(bits(&s)?, bits(&sum)?);
            assert_eq!(bits(&y)?, bits(&candle_nn::ops::rms_norm(&sum, &alpha, 1e-5)?)?);
            let want = candle_nn::ops::layer_norm(&sum, &alpha, &beta, 1e-12)?;
            assert_eq!(bits(&add_layer_norm(&x, &h, &alpha, &beta, 1e-12)?)?, bits(&want)?);
            // A strided input goes through candle-nn's RmsNorm layer: the same values to rounding.
            let (strided, ones) = (x.t()?, Tensor::ones(rows, DType::F32, &dev)?);
            let (got, want) = (rms_norm(&strided, &ones, 1e-5)?, rms_norm(&strided.contiguous()?, &ones, 1e-5)?);
            let err = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-5, "strided rms norm off by {err}");
        }
        let x = Tensor::ones((2, 4), DType::F32, &dev)?;
        let e = rms_norm(&x, &Tensor::ones(3, DType::F32, &dev)?, 1e-5).unwrap_err().to_string();
        assert!(e.contains("[3]") && e.contains('4'), "{e}");
        Ok(())
    }

    /// SwiGLU's product on the kernels against `silu(g)·u` from f64 (within 1e-6 relative), on
    /// a contiguous pair and on the two halves of a fused projection (strided views).
    #[test]
    fn silu_mul_matches_a_direct_sigmoid() -> Result<()> {
        let fused = Tensor::from_vec(wave(5 * 64, 0.7, 0.0), (5, 64), &Device::Cpu)?;
        let (gate, up) = (fused.narrow(1, 0, 32)?, fused.narrow(1, 32, 32)?);
        let got = silu_mul(&gate, &up)?.to_vec2::<f32>()?;
        for (i, row) in got.iter().enumerate() {
            for (j, &y) in row.iter().enumerate() {
                let (g, u) = (gate.get(i)?.get(j)?.to_scalar::<f32>()? as f64, up.get(i)?.get(j)?.to_scalar::<f32>()? as f64);
                let want = g / (1.0 + (-g).exp()) * u;
                assert!((y as f64 - want).abs() <= 1e-6 * (g.abs() * u.abs()).max(1e-30), "({i},{j}): {y} vs {want}");
            }
        }
        Ok(())
    }
}
