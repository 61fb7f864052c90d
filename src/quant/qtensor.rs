//! `QuantizedTensor`: integer values plus their [`QParams`] and shape.

use super::params::{QParams, SlotLayout};
use super::spec::{dequantize_value, quantize_value, Granularity, QSpec};
use candle_core::{bail, DType, Device, Result, Shape, Tensor};

/// A quantized tensor. Values are kept as `i8` storing `q - offset` (offset 0 for qint8, 128 for
/// quint8); that choice stays inside this type: use [`QuantizedTensor::values`] or [`QuantizedTensor::dequantize`].
#[derive(Debug, Clone)]
pub struct QuantizedTensor {
    storage: Vec<i8>,
    offset: i32,
    shape: Shape,
    params: QParams,
}

/// Flattens a float tensor (f16, bf16, f32 or f64) to `f32` values; `what` names it in errors.
pub fn float_values(x: &Tensor, what: &str) -> Result<Vec<f32>> {
    match x.dtype() {
        DType::F32 | DType::F16 | DType::BF16 | DType::F64 => x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>(),
        dt => bail!("{what}: expected a float tensor (f32, f16, bf16 or f64), got {dt:?} with shape {:?}", x.shape()),
    }
}

/// Minimum and maximum of the finite values in each slot (NaN and ±Inf are skipped).
/// A slot with no finite value gets `(+inf, -inf)`.
pub fn slot_min_max(values: &[f32], layout: &SlotLayout) -> (Vec<f32>, Vec<f32>) {
    let mut min = vec![f32::INFINITY; layout.slots];
    let mut max = vec![f32::NEG_INFINITY; layout.slots];
    layout.for_each_run(values.len(), |s, r| {
        // Non-finite values are swapped for neutral ones, so the fold has no branches.
        let (lo, hi) = values[r].iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            let finite = v.is_finite();
            (lo.min(if finite { v } else { f32::INFINITY }), hi.max(if finite { v } else { f32::NEG_INFINITY }))
        });
        min[s] = min[s].min(lo);
        max[s] = max[s].max(hi);
    });
    (min, max)
}

impl QParams {
    /// Parameters that cover the finite values of `x` exactly (min/max of each slot).
    pub fn from_tensor(spec: QSpec, granularity: Granularity, x: &Tensor) -> Result<Self> {
        if x.elem_count() == 0 {
            bail!("cannot compute qparams from an empty tensor of shape {:?}", x.shape())
        }
        let values = float_values(x, "qparams input")?;
        let layout = SlotLayout::new(granularity, x.shape())?;
        let (mut min, mut max) = slot_min_max(&values, &layout);
        // A slot with only non-finite values still needs a valid (eps) scale.
        for (lo, hi) in min.iter_mut().zip(max.iter_mut()) {
            if lo > hi {
                (*lo, *hi) = (0.0, 0.0);
            }
        }
        Self::from_min_max(spec, granularity, &min, &max)
    }
}

impl QuantizedTensor {
    /// `q = clamp(round(x / scale) + zero_point, qmin, qmax)` element by element, each element
    /// with the parameters of its slot.
    pub fn quantize(x: &Tensor, params: &QParams) -> Result<Self> {
        let values = float_values(x, "quantize input")?;
        let layout = params.layout(x.shape())?;
        let (qmin, qmax) = params.spec.qrange();
        let inv: Vec<f32> = params.scales.iter().map(|s| 1.0 / s).collect();
        let offset = params.spec.dtype.full_range().0 + 128;
        let mut storage = vec![0i8; values.len()];
        // Symmetric narrow-range qint8 (every int8 weight): the stored bytes are the values.
        let narrow_symmetric = (qmin, qmax, offset) == (-127, 127, 0);
        layout.for_each_run(values.len(), |s, r| {
            let (inv, zp) = (inv[s], params.zero_points[s]);
            if narrow_symmetric && zp == 0 {
                return crate::kernels::quantize_symmetric(&values[r.clone()], inv, &mut storage[r]);
            }
            for (q, &v) in storage[r.clone()].iter_mut().zip(&values[r]) {
                *q = (quantize_value(v, inv, zp, qmin, qmax) - offset) as i8;
            }
        });
        Ok(Self { storage, offset, shape: x.shape().clone(), params: params.clone() })
    }

    /// Builds a tensor from integer values already on the grid (checked against the range).
    pub fn from_values(values: &[i32], shape: impl Into<Shape>, params: QParams) -> Result<Self> {
        let shape = shape.into();
        if values.len() != shape.elem_count() {
            bail!("{} quantized values cannot fill a tensor of shape {shape:?}", values.len())
        }
        params.layout(&shape)?;
        let (qmin, qmax) = params.spec.qrange();
        if let Some(v) = values.iter().find(|v| !(qmin..=qmax).contains(*v)) {
            bail!("quantized value {v} is outside the integer range [{qmin}, {qmax}]")
        }
        let offset = params.spec.dtype.full_range().0 + 128;
        let storage = values.iter().map(|v| (v - offset) as i8).collect();
        Ok(Self { storage, offset, shape, params })
    }

    /// `x = (q - zero_point) * scale`, as an f32 tensor of the original shape.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let layout = self.params.layout(&self.shape)?;
        let mut data = vec![0f32; self.storage.len()];
        layout.for_each_run(data.len(), |s, r| {
            let (scale, zp) = (self.params.scales[s], self.params.zero_points[s]);
            for (x, &q) in data[r.clone()].iter_mut().zip(&self.storage[r]) {
                *x = dequantize_value(q as i32 + self.offset, scale, zp);
            }
        });
        Tensor::from_vec(data, self.shape.clone(), device)
    }

    /// The integer values `q`, row-major.
    pub fn values(&self) -> Vec<i32> {
        self.storage.iter().map(|&q| q as i32 + self.offset).collect()
    }

    /// Raw `i8` storage (`q - offset`); for qint8 this is `q` itself.
    pub fn storage(&self) -> &[i8] {
        &self.storage
    }

    /// The tensor's shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// Its scales and zero points.
    pub fn params(&self) -> &QParams {
        &self.params
    }

    /// Bytes held by values and parameters.
    pub fn nbytes(&self) -> usize {
        self.storage.len() + self.params.scales.len() * 4 + self.params.zero_points.len() * 4
    }
}
