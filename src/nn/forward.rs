//! How a [`QLinear`] runs: [`Module::forward`] for every kind, the int8 kinds on the kernels over
//! the input's rows (the output buffer never zeroed first), and the fused forms the models use —
//! an activation function applied inside the int8 layer that follows it, and one quantization
//! of an input shared by the layers that read it.

use super::dynamic::DynamicLinear;
use super::ops::with_float_values;
use super::{QLinear, QLinearKind};
use crate::kernels::filled_vec;
use crate::quant::float_values;
use candle_core::{bail, DType, Module, Result, Tensor, D};
use std::mem::MaybeUninit;

impl QLinear {
    /// `forward(silu(gate) · up)` for a dynamic int8 layer on `f32` inputs: SwiGLU's product is
    /// computed row by row inside the activation quantizer instead of written out whole (same
    /// values, same bits). `None` for other kinds, which take the product as a tensor.
    pub(crate) fn forward_swiglu(&self, gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
        let QLinearKind::Dynamic(d) = &self.kind else { return Ok(None) };
        if gate.dtype() != DType::F32 || up.dtype() != DType::F32 || gate.shape() != up.shape() {
            return Ok(None);
        }
        check_input(gate, self.in_features, &self.name)?;
        let m = gate.elem_count() / self.in_features.max(1);
        let out = with_float_values(gate, &self.name, |g| {
            with_float_values(up, &self.name, |u| self.forward_acts(d, d.quantize_swiglu(g, u, m)?, m))
        })
        .map_err(|e| e.context(format!("layer '{}'", self.name)))?;
        rows_tensor(gate, self.out_features, out).map(Some)
    }

    /// `forward(gelu_erf(x))` for a dynamic int8 layer on an `f32` input: the exact GELU is
    /// computed row by row inside the activation quantizer (same values, same bits). `None` for
    /// other kinds.
    pub(crate) fn forward_gelu(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let QLinearKind::Dynamic(d) = &self.kind else { return Ok(None) };
        if x.dtype() != DType::F32 {
            return Ok(None);
        }
        check_input(x, self.in_features, &self.name)?;
        let m = x.elem_count() / self.in_features.max(1);
        let out = with_float_values(x, &self.name, |xs| self.forward_acts(d, d.quantize_gelu(xs, m)?, m))
            .map_err(|e| e.context(format!("layer '{}'", self.name)))?;
        rows_tensor(x, self.out_features, out).map(Some)
    }

    /// The `m × out_features` outputs of dynamic layer `d` on its quantized input.
    fn forward_acts(&self, d: &DynamicLinear, acts: crate::kernels::QuantizedActivations, m: usize) -> Result<Vec<f32>> {
        // SAFETY: forward_quantized writes every output on Ok.
        unsafe { filled_vec(m * self.out_features, |out| d.forward_quantized(&acts, out)) }
    }

    /// [`Module::forward`] followed by `activation` applied in place to the output values, in
    /// f32 (an activation fused after the matmul): int8 kinds run it on the buffer their kernel
    /// just wrote, before any tensor exists; other kinds on a copy of their output. Not
    /// differentiable.
    pub(crate) fn forward_then(&self, x: &Tensor, activation: impl Fn(&mut [f32])) -> Result<Tensor> {
        check_input(x, self.in_features, &self.name)?;
        let (n, name) = (self.out_features, &self.name);
        match &self.kind {
            // SAFETY: forward_rows writes every output on Ok.
            QLinearKind::Dynamic(d) => unsafe { rows_forward_then(x, n, name, |xs, m, out| d.forward_rows(xs, m, out), activation) },
            // SAFETY: forward_rows writes every output on Ok.
            QLinearKind::Static(s) => unsafe { rows_forward_then(x, n, name, |xs, m, out| s.forward_rows(xs, m, out), activation) },
            // SAFETY: forward_rows writes every output on Ok.
            QLinearKind::WeightOnly(w) => unsafe { rows_forward_then(x, n, name, |xs, m, out| w.forward_rows(xs, m, out), activation) },
            _ => {
                let y = self.forward(x)?;
                let mut v = float_values(&y, name)?;
                activation(&mut v);
                Tensor::from_vec(v, y.shape(), y.device())?.to_dtype(y.dtype())
            }
        }
    }
}

/// `layers[i].forward(x)` for every layer reading the same input `x` (q/k/v projections,
/// gate/up): when all are dynamic int8 layers that quantize inputs alike, `x` is quantized once
/// for all of them (same values as separate calls).
pub(crate) fn forward_shared<const N: usize>(x: &Tensor, layers: [&QLinear; N]) -> Result<[Tensor; N]> {
    let dynamic: Option<Vec<&DynamicLinear>> = layers
        .iter()
        .map(|l| match &l.kind {
            QLinearKind::Dynamic(d) => Some(d),
            _ => None,
        })
        .collect();
    let outputs: Vec<Tensor> = match dynamic.filter(|d| d.len() > 1 && d.iter().all(|o| o.quantizes_like(d[0]))) {
        None => layers.iter().map(|l| l.forward(x)).collect::<Result<_>>()?,
        Some(dynamic) => {
            for l in layers {
                check_input(x, l.in_features, &l.name)?;
            }
            let name = &layers[0].name;
            let k = x.dim(D::Minus1)?;
            let m = x.elem_count().checked_div(k).unwrap_or(0);
            let acts =
                with_float_values(x, name, |xs| dynamic[0].quantize_input(xs, m)).map_err(|e| e.context(format!("layer '{name}'")))?;
            layers
                .iter()
                .zip(dynamic)
                .map(|(l, d)| {
                    // SAFETY: forward_quantized writes every output on Ok.
                    let out = unsafe { filled_vec(m * l.out_features, |out| d.forward_quantized(&acts, out)) }
                        .map_err(|e| e.context(format!("layer '{}'", l.name)))?;
                    rows_tensor(x, l.out_features, out)
                })
                .collect::<Result<_>>()?
        }
    };
    outputs.try_into().map_err(|_| candle_core::Error::Msg("forward_shared: one output per layer".into()))
}

impl Module for QLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_input(x, self.in_features, &self.name)?;
        let (n, name) = (self.out_features, &self.name);
        match &self.kind {
            QLinearKind::Float(l) => l.forward(x),
            QLinearKind::Observed(o) => o.forward(x),
            QLinearKind::FakeQuant(f) => f.forward(x),
            QLinearKind::Ggml(g) => g.forward(x),
            // SAFETY: forward_rows writes every output on Ok.
            QLinearKind::Dynamic(d) => unsafe { rows_forward(x, n, name, |xs, m, out| d.forward_rows(xs, m, out)) },
            // SAFETY: forward_rows writes every output on Ok.
            QLinearKind::Static(s) => unsafe { rows_forward(x, n, name, |xs, m, out| s.forward_rows(xs, m, out)) },
            // SAFETY: forward_rows writes every output on Ok.
            QLinearKind::WeightOnly(w) => unsafe { rows_forward(x, n, name, |xs, m, out| w.forward_rows(xs, m, out)) },
        }
    }
}

fn check_input(x: &Tensor, in_features: usize, name: &str) -> Result<()> {
    match x.dims().last() {
        Some(&k) if k == in_features && x.rank() >= 1 => Ok(()),
        _ => bail!("layer '{name}': expected an input whose last dimension is {in_features}, got shape {:?}", x.shape()),
    }
}

/// Runs an int8 kernel over `x` viewed as `M×K` rows of f32 and reshapes the `M×N` result
/// back to `x`'s leading dims, in `x`'s dtype. The output buffer is not zeroed first.
///
/// # Safety
/// `kernel` writes every value of its output on `Ok`.
unsafe fn rows_forward(
    x: &Tensor,
    out_features: usize,
    name: &str,
    kernel: impl FnOnce(&[f32], usize, &mut [MaybeUninit<f32>]) -> Result<()>,
) -> Result<Tensor> {
    // SAFETY: the caller's contract.
    unsafe { rows_forward_then(x, out_features, name, kernel, |_| {}) }
}

/// [`rows_forward`] with `then` applied to the outputs in place before they become a tensor.
///
/// # Safety
/// As [`rows_forward`].
unsafe fn rows_forward_then(
    x: &Tensor,
    out_features: usize,
    name: &str,
    kernel: impl FnOnce(&[f32], usize, &mut [MaybeUninit<f32>]) -> Result<()>,
    then: impl FnOnce(&mut [f32]),
) -> Result<Tensor> {
    let k = x.dim(D::Minus1)?;
    let m = x.elem_count().checked_div(k).unwrap_or(0);
    // SAFETY: the kernel writes every output on Ok (the caller's contract).
    let mut out = with_float_values(x, name, |xs| unsafe { filled_vec(m * out_features, |out| kernel(xs, m, out)) })
        .map_err(|e| e.context(format!("layer '{name}'")))?;
    then(&mut out);
    rows_tensor(x, out_features, out)
}

/// `M×N` outputs `out` of a layer as a tensor shaped like its input `x` but for the last
/// dimension, in `x`'s dtype.
fn rows_tensor(x: &Tensor, out_features: usize, out: Vec<f32>) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out_features;
    }
    let y = Tensor::from_vec(out, dims, x.device())?;
    if x.dtype() == DType::F32 {
        Ok(y)
    } else {
        y.to_dtype(x.dtype())
    }
}
