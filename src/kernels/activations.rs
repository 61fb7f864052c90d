//! Activation quantization for the int8 kernels: per token, per group, or static per tensor.

use crate::quant::{quantize_value, QSpec};
use candle_core::{bail, Result};

/// `M×K` int8 activations with one scale per `(row, group)` and one zero point for all.
#[derive(Debug, Clone)]
pub struct QuantizedActivations {
    m: usize,
    k: usize,
    group: usize,
    data: Vec<i8>,
    scales: Vec<f32>,
    zero_point: i32,
}

impl QuantizedActivations {
    /// Dynamic symmetric quantization ([`QSpec::DYNAMIC_ACTIVATION`], `[-127, 127]`): each run of
    /// `group` values in a row gets `scale = max|x| / 127`. `group >= k` means one scale per row
    /// (per token). Non-finite inputs are an error (they would make the scale meaningless).
    pub fn quantize_dynamic(x: &[f32], m: usize, k: usize, group: usize) -> Result<Self> {
        check_dims(x, m, k)?;
        let group = group.clamp(1, k.max(1));
        let groups = k.div_ceil(group);
        let spec = QSpec::DYNAMIC_ACTIVATION;
        let (qmin, qmax) = spec.qrange();
        let mut data = vec![0i8; m * k];
        let mut scales = Vec::with_capacity(m * groups);
        for (xr, qr) in x.chunks(k).zip(data.chunks_mut(k)) {
            for (xg, qg) in xr.chunks(group).zip(qr.chunks_mut(group)) {
                // `f32::max` skips NaN, so NaN is caught by the sum (NaN + anything = NaN).
                let (amax, probe) = xg
                    .iter()
                    .fold((0f32, 0f32), |(a, p), v| (a.max(v.abs()), p + v * 0.0));
                if !amax.is_finite() || probe.is_nan() {
                    bail!("activation row contains a non-finite value (NaN or ±Inf)")
                }
                let (scale, zp) = spec.scale_zero_point_unchecked(-amax, amax);
                let inv = 1.0 / scale;
                for (q, &v) in qg.iter_mut().zip(xg) {
                    *q = quantize_value(v, inv, zp, qmin, qmax) as i8;
                }
                scales.push(scale);
            }
        }
        Ok(Self {
            m,
            k,
            group,
            data,
            scales,
            zero_point: 0,
        })
    }

    /// Static quantization with fixed per-tensor `scale` and `zero_point` under `spec`
    /// (qint8 or quint8; quint8 values are shifted by -128 into i8 storage, zero point with them).
    pub fn quantize_static(
        x: &[f32],
        m: usize,
        k: usize,
        spec: &QSpec,
        scale: f32,
        zero_point: i32,
    ) -> Result<Self> {
        check_dims(x, m, k)?;
        let (qmin, qmax) = spec.qrange();
        let shift = if qmin >= 0 { 128 } else { 0 };
        let inv = 1.0 / scale;
        let data = x
            .iter()
            .map(|&v| (quantize_value(v, inv, zero_point, qmin, qmax) - shift) as i8)
            .collect();
        Ok(Self {
            m,
            k,
            group: k.max(1),
            data,
            scales: vec![scale; m],
            zero_point: zero_point - shift,
        })
    }

    pub fn rows(&self) -> usize {
        self.m
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    pub fn group_size(&self) -> usize {
        self.group
    }

    /// Groups per row.
    pub fn groups(&self) -> usize {
        self.k.div_ceil(self.group)
    }

    pub fn zero_point(&self) -> i32 {
        self.zero_point
    }

    #[inline]
    pub fn row(&self, i: usize) -> &[i8] {
        &self.data[i * self.k..(i + 1) * self.k]
    }

    #[inline]
    pub fn row_scales(&self, i: usize) -> &[f32] {
        let g = self.groups();
        &self.scales[i * g..(i + 1) * g]
    }
}

fn check_dims(x: &[f32], m: usize, k: usize) -> Result<()> {
    if x.len() != m * k || k == 0 {
        bail!(
            "activations: {} values do not form {m} rows of {k}",
            x.len()
        )
    }
    Ok(())
}
