//! Int8 weights in the layout the kernels read.

use super::CHUNK;
use crate::quant::{Granularity, QDType, QParams, QSpec, QTensor};
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

/// Output channels per packed block: one 256-bit register of `i32` or `f32` lanes.
pub const BLOCK_ROWS: usize = 8;

/// `N×K` int8 weights (symmetric, zero point 0, range `[-127, 127]`) with one f32 scale per
/// `(output channel, group of input channels)` — a single group means per channel — and each
/// row's zero-point term (for activation zero points).
///
/// Packed for the kernels: output channels in blocks of [`BLOCK_ROWS`]; inside a block, four
/// consecutive input channels of each of the eight channels lie side by side, so byte
/// `32·q + 4·r + t` of block `b` is `w[8b + r, 4q + t]`. One 32-byte load then holds a "quad" of
/// input channels for eight outputs: a u8×i8 multiply-add of four byte pairs per 32-bit lane
/// (`vpdpbusd` on VNNI, `vpmaddubsw` + `vpmaddwd` on AVX2) leaves eight outputs' partial sums in
/// eight lanes, with no horizontal reduction. `K` is zero-padded to a multiple of [`CHUNK`] and
/// `N` to a multiple of 8 (padding rows have scale 0). Scales are stored the same way:
/// `scales[(b·groups + g)·8 + r] = sw[8b + r, g]`, one vector load per block and group.
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
        let (group, row_scales) = match p.granularity {
            Granularity::PerTensor => (k, vec![p.scales[0]; n]),
            Granularity::PerChannel { axis: 0 } => (k, p.scales.clone()),
            Granularity::PerGroup { size } => (size.min(k), p.scales.clone()),
            g => bail!("int8 weights must be quantized per tensor, per output channel (axis 0) or per group, got {g:?}"),
        };
        // Signed with zero point 0 means qint8, whose storage is the values themselves.
        let values = q.storage();
        if p.spec.dtype != QDType::QInt8 {
            bail!("int8 weights must be qint8, got {:?}", p.spec.dtype)
        }
        if values.contains(&-128) {
            bail!("int8 weights must lie in [-127, 127] (narrow range); -128 found")
        }
        let stride = k.next_multiple_of(CHUNK);
        let groups = k.div_ceil(group);
        let blocks = n.div_ceil(BLOCK_ROWS);
        let mut data = vec![0i8; blocks * BLOCK_ROWS * stride];
        let mut scales = vec![0f32; blocks * BLOCK_ROWS * groups];
        for (j, (row, sw)) in values.chunks(k).zip(row_scales.chunks(groups)).enumerate() {
            let block = &mut data[Self::offset(stride, j, 0)..];
            for (qi, quad) in row.chunks(4).enumerate() {
                block[32 * qi..32 * qi + quad.len()].copy_from_slice(quad);
            }
            for (g, &s) in sw.iter().enumerate() {
                scales[Self::scale_offset(groups, j, g)] = s;
            }
        }
        let zero_point_terms = values
            .chunks(k)
            .zip(row_scales.chunks(groups))
            .map(|(row, s)| row.chunks(group).zip(s).map(|(g, &sw)| sw * g.iter().map(|&v| v as i32).sum::<i32>() as f32).sum())
            .collect();
        Ok(Self { n, k, group, stride, data, scales, zero_point_terms })
    }

    /// Where `w[j, c]` lies in the packed data.
    #[inline]
    fn offset(stride: usize, j: usize, c: usize) -> usize {
        (j / BLOCK_ROWS) * BLOCK_ROWS * stride + (c / 4) * 32 + (j % BLOCK_ROWS) * 4 + c % 4
    }

    #[inline]
    fn scale_offset(groups: usize, j: usize, g: usize) -> usize {
        ((j / BLOCK_ROWS) * groups + g) * BLOCK_ROWS + j % BLOCK_ROWS
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

    /// Blocks of [`BLOCK_ROWS`] output channels (the last one zero-padded).
    pub fn blocks(&self) -> usize {
        self.n.div_ceil(BLOCK_ROWS)
    }

    /// `K` rounded up to a whole [`CHUNK`]: the packed length of every row.
    pub fn padded_in_features(&self) -> usize {
        self.stride
    }

    /// The packed bytes of block `b` (`8 · padded_in_features()` of them).
    #[inline]
    pub fn block(&self, b: usize) -> &[i8] {
        let len = BLOCK_ROWS * self.stride;
        &self.data[b * len..(b + 1) * len]
    }

    /// The scales of block `b`: `groups()` runs of eight, one per output channel.
    #[inline]
    pub fn block_scales(&self, b: usize) -> &[f32] {
        let len = BLOCK_ROWS * self.groups();
        &self.scales[b * len..(b + 1) * len]
    }

    /// The quantized weight `w[j, c]`.
    #[inline]
    pub fn value(&self, j: usize, c: usize) -> i8 {
        self.data[Self::offset(self.stride, j, c)]
    }

    /// The scale of output channel `j` for input group `g`.
    #[inline]
    pub fn scale(&self, j: usize, g: usize) -> f32 {
        self.scales[Self::scale_offset(self.groups(), j, g)]
    }

    /// Quantized weights of output channel `j`, unpacked.
    pub fn row(&self, j: usize) -> Vec<i8> {
        (0..self.k).map(|c| self.value(j, c)).collect()
    }

    /// Scales of output channel `j`, one per group.
    pub fn row_scales(&self, j: usize) -> Vec<f32> {
        (0..self.groups()).map(|g| self.scale(j, g)).collect()
    }

    #[inline]
    pub fn zero_point_term(&self, j: usize) -> f32 {
        self.zero_point_terms[j]
    }

    /// The float weights these integers stand for: `w[n,k] = q[n,k] · scale[n, k / group]`.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let data: Vec<f32> =
            (0..self.n).flat_map(|j| (0..self.k).map(move |c| self.value(j, c) as f32 * self.scale(j, c / self.group))).collect();
        Tensor::from_vec(data, (self.n, self.k), device)
    }

    /// Bytes held: packed integer weights plus scales, padding included.
    pub fn nbytes(&self) -> usize {
        self.data.len() + self.scales.len() * 4
    }
}
