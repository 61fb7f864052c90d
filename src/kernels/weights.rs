//! Int8 weights in the layout the kernels read.

use crate::quant::{Granularity, QParams, QSpec, QTensor};
use candle_core::{bail, Device, Result, Tensor};

/// Largest `K` for which an `i32` dot product of int8 values cannot overflow (`K·128·128 < 2³¹`).
pub const MAX_IN_FEATURES: usize = 1 << 17;

/// `N×K` int8 weights (symmetric, zero point 0, range `[-127, 127]`), one f32 scale per output
/// channel, and each row's integer sum (for activation zero-point compensation).
#[derive(Debug, Clone)]
pub struct PackedInt8Weights {
    n: usize,
    k: usize,
    data: Vec<i8>,
    scales: Vec<f32>,
    row_sums: Vec<i32>,
}

impl PackedInt8Weights {
    /// Quantizes a float `[out, in]` weight per output channel with [`QSpec::WEIGHT`].
    pub fn quantize(weight: &Tensor) -> Result<Self> {
        let params =
            QParams::from_tensor(QSpec::WEIGHT, Granularity::PerChannel { axis: 0 }, weight)?;
        Self::from_qtensor(&QTensor::quantize(weight, &params)?)
    }

    /// Packs an already quantized `[out, in]` weight; it must be symmetric signed with zero
    /// point 0, per tensor or per output channel, and inside `[-127, 127]`.
    pub fn from_qtensor(q: &QTensor) -> Result<Self> {
        let &[n, k] = q.shape().dims() else {
            bail!(
                "int8 weights must be 2-D [out, in], got shape {:?}",
                q.shape()
            )
        };
        if n == 0 || k == 0 {
            bail!("int8 weights must not be empty, got shape {:?}", q.shape())
        }
        if k > MAX_IN_FEATURES {
            bail!("int8 weights with {k} input features would overflow i32 accumulation (max {MAX_IN_FEATURES})")
        }
        let p = q.params();
        if p.zero_points.iter().any(|&z| z != 0) || p.spec.qrange().0 >= 0 {
            bail!(
                "int8 weights must be signed with zero point 0 (symmetric qint8), got {:?}",
                p.spec
            )
        }
        let scales = match p.granularity {
            Granularity::PerTensor => vec![p.scales[0]; n],
            Granularity::PerChannel { axis: 0 } => p.scales.clone(),
            g => bail!("int8 weights must be quantized per tensor or per output channel (axis 0), got {g:?}"),
        };
        let values = q.values();
        if values.iter().any(|&v| v < -127) {
            bail!("int8 weights must lie in [-127, 127] (narrow range); -128 found")
        }
        let data: Vec<i8> = values.iter().map(|&v| v as i8).collect();
        let row_sums = data
            .chunks(k)
            .map(|r| r.iter().map(|&v| v as i32).sum())
            .collect();
        Ok(Self {
            n,
            k,
            data,
            scales,
            row_sums,
        })
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    pub fn in_features(&self) -> usize {
        self.k
    }

    /// Quantized weights of output channel `j`.
    #[inline]
    pub fn row(&self, j: usize) -> &[i8] {
        &self.data[j * self.k..(j + 1) * self.k]
    }

    #[inline]
    pub fn scale(&self, j: usize) -> f32 {
        self.scales[j]
    }

    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    #[inline]
    pub fn row_sum(&self, j: usize) -> i32 {
        self.row_sums[j]
    }

    /// The float weights these integers stand for: `w[n,k] = q[n,k] · scale[n]`.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let data: Vec<f32> = self
            .data
            .iter()
            .enumerate()
            .map(|(i, &q)| q as f32 * self.scales[i / self.k])
            .collect();
        Tensor::from_vec(data, (self.n, self.k), device)
    }

    /// Bytes of integer weights plus scales.
    pub fn nbytes(&self) -> usize {
        self.data.len() + self.scales.len() * 4
    }
}
