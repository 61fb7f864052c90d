//! Int8 weights in the layout the kernels read.

use super::CHUNK;
use crate::quant::{Granularity, QParams, QSpec, QTensor};
use candle_core::{bail, Device, Result, Tensor};

/// Largest `K` for which an `i32` dot product of int8 values cannot overflow (`K·128·128 < 2³¹`).
pub const MAX_IN_FEATURES: usize = 1 << 17;

/// How int8 weights are scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightQuant {
    /// One scale per output channel.
    PerChannel,
    /// One scale per run of `n` input channels within each output channel (like candle's Q8_0
    /// blocks of 32).
    PerGroup(usize),
}

impl Default for WeightQuant {
    /// Groups of 32: measured on SmolLM2-135M, per-channel weight scales alone cost about half of
    /// the KL divergence of the dynamic int8 model (see README).
    fn default() -> Self {
        WeightQuant::PerGroup(32)
    }
}

/// `N×K` int8 weights (symmetric, zero point 0, range `[-127, 127]`) with one f32 scale per
/// `(output channel, group of input channels)` — a single group means per channel — and each
/// group's integer sum (for activation zero-point compensation). Rows are stored with a stride
/// of `K` rounded up to [`CHUNK`] bytes, zero-padded, so SIMD kernels read whole chunks.
#[derive(Debug, Clone)]
pub struct PackedInt8Weights {
    n: usize,
    k: usize,
    group: usize,
    stride: usize,
    data: Vec<i8>,
    scales: Vec<f32>,
    /// `Σ_g sw[n,g] · Σ_{k∈g} qw[n,k]`: what an activation zero point of 1 would add to row `n`.
    zero_point_terms: Vec<f32>,
}

impl PackedInt8Weights {
    /// Quantizes a float `[out, in]` weight with [`QSpec::WEIGHT`] per channel or per group.
    pub fn quantize(weight: &Tensor, how: WeightQuant) -> Result<Self> {
        let granularity = match how {
            WeightQuant::PerChannel => Granularity::PerChannel { axis: 0 },
            WeightQuant::PerGroup(size) => Granularity::PerGroup { size },
        };
        let params = QParams::from_tensor(QSpec::WEIGHT, granularity, weight)?;
        Self::from_qtensor(&QTensor::quantize(weight, &params)?)
    }

    /// Packs an already quantized `[out, in]` weight; it must be symmetric signed with zero
    /// point 0 — per tensor, per output channel or per group — and inside `[-127, 127]`.
    pub fn from_qtensor(q: &QTensor) -> Result<Self> {
        let &[n, k] = q.shape().dims() else { bail!("int8 weights must be 2-D [out, in], got shape {:?}", q.shape()) };
        if n == 0 || k == 0 {
            bail!("int8 weights must not be empty, got shape {:?}", q.shape())
        }
        if k > MAX_IN_FEATURES {
            bail!("int8 weights with {k} input features would overflow i32 accumulation (max {MAX_IN_FEATURES})")
        }
        let p = q.params();
        if p.zero_points.iter().any(|&z| z != 0) || p.spec.qrange().0 >= 0 {
            bail!("int8 weights must be signed with zero point 0 (symmetric qint8), got {:?}", p.spec)
        }
        let (group, scales) = match p.granularity {
            Granularity::PerTensor => (k, vec![p.scales[0]; n]),
            Granularity::PerChannel { axis: 0 } => (k, p.scales.clone()),
            Granularity::PerGroup { size } => (size.min(k), p.scales.clone()),
            g => bail!("int8 weights must be quantized per tensor, per output channel (axis 0) or per group, got {g:?}"),
        };
        let values = q.values();
        if values.iter().any(|&v| v < -127) {
            bail!("int8 weights must lie in [-127, 127] (narrow range); -128 found")
        }
        let stride = k.next_multiple_of(CHUNK);
        let mut data = vec![0i8; n * stride];
        for (dst, src) in data.chunks_mut(stride).zip(values.chunks(k)) {
            dst.iter_mut().zip(src).for_each(|(d, &v)| *d = v as i8);
        }
        let groups = k.div_ceil(group);
        let zero_point_terms = values
            .chunks(k)
            .zip(scales.chunks(groups))
            .map(|(row, s)| row.chunks(group).zip(s).map(|(g, &sw)| sw * g.iter().sum::<i32>() as f32).sum())
            .collect();
        Ok(Self { n, k, group, stride, data, scales, zero_point_terms })
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    pub fn in_features(&self) -> usize {
        self.k
    }

    /// Input channels per scale (`K` when per channel).
    pub fn group_size(&self) -> usize {
        self.group
    }

    /// Scales per output channel.
    pub fn groups(&self) -> usize {
        self.k.div_ceil(self.group)
    }

    /// Quantized weights of output channel `j`.
    #[inline]
    pub fn row(&self, j: usize) -> &[i8] {
        &self.data[j * self.stride..j * self.stride + self.k]
    }

    /// Row `j` with its zero padding (`stride` bytes).
    #[inline]
    pub fn padded_row(&self, j: usize) -> &[i8] {
        &self.data[j * self.stride..(j + 1) * self.stride]
    }

    /// Bytes between consecutive rows (`K` rounded up to a whole chunk).
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Scales of output channel `j`, one per group.
    #[inline]
    pub fn row_scales(&self, j: usize) -> &[f32] {
        let g = self.groups();
        &self.scales[j * g..(j + 1) * g]
    }

    /// All scales, `N × groups` row-major.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    #[inline]
    pub fn zero_point_term(&self, j: usize) -> f32 {
        self.zero_point_terms[j]
    }

    /// The float weights these integers stand for: `w[n,k] = q[n,k] · scale[n, k / group]`.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let data: Vec<f32> = (0..self.n)
            .flat_map(|j| {
                let s = self.row_scales(j);
                self.row(j).iter().enumerate().map(move |(i, &q)| q as f32 * s[i / self.group])
            })
            .collect();
        Tensor::from_vec(data, (self.n, self.k), device)
    }

    /// Bytes of integer weights plus scales.
    pub fn nbytes(&self) -> usize {
        self.n * self.k + self.scales.len() * 4
    }
}
