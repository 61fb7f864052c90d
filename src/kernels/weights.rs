//! Int8 weights in the layout the kernels read.

use super::CHUNK;
use crate::quant::{float_values, Granularity, QDType, QParams, QSpec, QuantizedTensor};
use candle_core::{bail, Device, Result, Tensor};
use half::f16;
use rayon::prelude::*;
use std::sync::Arc;

/// Largest `K` for which an `i32` dot product of int8 values cannot overflow (`K·128·128 < 2³¹`).
pub const MAX_IN_FEATURES: usize = 1 << 17;

/// How weights are quantized: int8 per output channel or per group, or int4 per group.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightQuant {
    /// Int8, one scale per output channel.
    PerChannel,
    /// Int8, one scale per run of `n` input channels within each output channel (like candle's
    /// Q8_0 blocks of 32).
    PerGroup(usize),
    /// Int4, one `f16` scale per run of `group` input channels (a multiple of 8, or at least
    /// `K` for one group per row). Symmetric: `w ≈ sw · q`, `q ∈ [−8, 7]` (4.5 bits per weight
    /// with groups of 32); with `zero_point`, each group also has an integer zero point
    /// `z ∈ [0, 15]`: `w ≈ sw · (u − z)`, `u ∈ [0, 15]` (4.75 bits per weight at 32).
    Int4 {
        /// Input channels per scale.
        group: usize,
        /// Whether each group has its own integer zero point (else symmetric).
        zero_point: bool,
    },
}

impl WeightQuant {
    /// Bits per stored weight value: 8 or 4.
    pub fn bits(self) -> u32 {
        match self {
            WeightQuant::Int4 { .. } => 4,
            _ => 8,
        }
    }

    /// Input channels per scale for a `K`-wide weight (`K` when per channel; a group of 0 stays
    /// 0, which the quantizers refuse).
    pub fn group_in(self, k: usize) -> usize {
        match self {
            WeightQuant::PerChannel => k,
            WeightQuant::PerGroup(g) | WeightQuant::Int4 { group: g, .. } => g.min(k),
        }
    }

    /// The group size when the weights have more than one group per row of `K`.
    pub fn group_below(self, k: usize) -> Option<usize> {
        Some(self.group_in(k)).filter(|&g| g < k)
    }
}

impl Default for WeightQuant {
    /// Groups of 32: on SmolLM2-135M per-channel weight scales alone cost about half of the KL
    /// divergence of the dynamic int8 model (docs/accuracy.md).
    fn default() -> Self {
        WeightQuant::PerGroup(32)
    }
}

/// Output channels per packed block: one 256-bit register of `i32` or `f32` lanes.
pub const BLOCK_ROWS: usize = 8;

/// `N×K` int8 weights (symmetric, zero point 0, range `[-127, 127]`) with one scale per
/// `(output channel, group of input channels)` — a single group means per channel — and each
/// row's zero-point term (for activation zero points).
///
/// Scales are stored as `f16` (like candle's Q8_0 blocks): with groups of 32 that is 34 bytes
/// per 32 weights instead of 36, and decoding is bound by the bytes it streams. `f16` keeps 11
/// significant bits, so rounding a scale moves it by at most 2⁻¹² of itself, a sixteenth of
/// the int8 rounding step; [`Self::quantize`] rounds the scales first and quantizes with the
/// rounded ones, so values and scales agree exactly.
///
/// Packed for the kernels: output channels in blocks of [`BLOCK_ROWS`]; inside a block, four
/// consecutive input channels of each of the eight channels lie side by side, so byte
/// `32·q + 4·r + t` of block `b` is `w[8b + r, 4q + t]`. One 32-byte load then holds a "quad" of
/// input channels for eight outputs: a u8×i8 multiply-add of four byte pairs per 32-bit lane
/// (`vpdpbusd` on VNNI, `vpmaddubsw` + `vpmaddwd` on AVX2) leaves eight outputs' partial sums in
/// eight lanes, with no horizontal reduction. `K` is zero-padded to a multiple of [`CHUNK`] and
/// `N` to a multiple of 8 (padding rows have scale 0). Blocks are stored in stream order
/// (`stream_slot`) so that a decoding tile's eight streams run on across panels. Scales are
/// eight per block and group, one vector load each, laid out panel by panel (`side_offset`):
/// in a panel of `P` blocks starting at block `8p`, `sw[8b + r, g]` is at
/// `64·p·groups + (g·P + b − 8p)·8 + r`, so a decoding tile's scales for one group are one
/// contiguous run, and the scales of a whole layer one memory stream.
///
/// Int4 weights ([`WeightQuant::Int4`]) keep the same blocks at half the bytes: byte
/// `32·p + 4·r + t` of a block holds `w[8b + r, 8p + t]` in its low nibble and
/// `w[8b + r, 8p + 4 + t]` in its high one, each as the unsigned `u = q + z` (`z` = 8 when
/// symmetric, else the group's zero point, laid out like the scales). One 32-byte
/// load then gives two quads: `u & 15` and `(u >> 4) & 15`, minus `z`, are the signed bytes the
/// int8 tiles multiply.
#[derive(Debug, Clone)]
pub struct PackedInt8Weights {
    n: usize,
    k: usize,
    group: usize,
    stride: usize,
    /// 8, or 4 for nibbles.
    bits: u32,
    /// Int4 zero points `z[n,g] ∈ [0, 15]` laid out like the scales; `None`: 8 for
    /// symmetric int4 (and 0 for int8).
    zero_points: Option<Arc<Vec<u8>>>,
    /// Shared: the packed weights never change, so clones (a model copied to compare it with
    /// its float self, a layer given another kind) cost nothing.
    data: Arc<Vec<i8>>,
    scales: Arc<Vec<f16>>,
    /// `Σ_g sw[n,g] · Σ_{k∈g} qw[n,k]`: what an activation zero point of 1 would add to row `n`.
    zero_point_terms: Arc<Vec<f32>>,
    /// `S[n,g] = Σ_{k∈g} qw[n,k]` laid out like the scales, for
    /// activations with a per-group offset (`|S| ≤ 127·group` fits `i16` for groups of at most
    /// [`MAX_SUMMED_GROUP`]): made from the packed bytes the first time a layer asks
    /// ([`Self::prepare_group_sums`]), so weight-only, static and symmetric layers do not hold them.
    group_sums: Arc<std::sync::OnceLock<Vec<i16>>>,
}

/// Largest weight group whose per-group sums are kept ([`PackedInt8Weights::block_group_sums`]):
/// `127 · 256 < 2¹⁵`.
pub const MAX_SUMMED_GROUP: usize = 256;

impl PackedInt8Weights {
    /// Quantizes a float `[out, in]` weight (both cores: rows in parallel, see
    /// [`quantize_weight_rows`]) and packs it.
    pub fn quantize(weight: &Tensor, how: WeightQuant) -> Result<Self> {
        let &[n, k] = weight.dims() else { bail!("int8 weights must be 2-D [out, in], got shape {:?}", weight.shape()) };
        let rows = quantize_weight_rows(&float_values(weight, "weight")?, n, k, how)?;
        Self::from_rows(&rows)
    }

    /// The qparams int8 weights get: [`QSpec::WEIGHT`] per channel or per group, each scale
    /// rounded to the `f16` that will be stored (fake quantization uses these too, so that
    /// training simulates exactly what conversion produces).
    pub fn qparams(weight: &Tensor, how: WeightQuant) -> Result<QParams> {
        let granularity = match how {
            WeightQuant::PerChannel => Granularity::PerChannel { axis: 0 },
            WeightQuant::PerGroup(size) => Granularity::PerGroup { size },
            WeightQuant::Int4 { .. } => bail!("int4 weights have no int8 qparams: fake quantization simulates int8 weights"),
        };
        let mut params = QParams::from_tensor(QSpec::WEIGHT, granularity, weight)?;
        for s in params.scales.iter_mut() {
            *s = to_f16(*s)?.to_f32();
        }
        Ok(params)
    }

    /// Packs an already quantized `[out, in]` weight; it must be symmetric signed with zero
    /// point 0 — per tensor, per output channel or per group — and inside `[-127, 127]`.
    /// Its scales are rounded to the nearest `f16` (an error if one exceeds `f16::MAX`).
    pub fn from_quantized_tensor(q: &QuantizedTensor) -> Result<Self> {
        let &[n, k] = q.shape().dims() else { bail!("int8 weights must be 2-D [out, in], got shape {:?}", q.shape()) };
        let p = q.params();
        if p.zero_points.iter().any(|&z| z != 0) || p.spec.qrange().0 >= 0 || p.spec.dtype != QDType::QInt8 {
            bail!("int8 weights must be signed with zero point 0 (symmetric qint8), got {:?}", p.spec)
        }
        let (group, row_scales) = match p.granularity {
            Granularity::PerTensor => (k, vec![p.scales[0]; n]),
            Granularity::PerChannel { axis: 0 } => (k, p.scales.clone()),
            Granularity::PerGroup { size } => (size.min(k), p.scales.clone()),
            g => bail!("int8 weights must be quantized per tensor, per output channel (axis 0) or per group, got {g:?}"),
        };
        let scales = row_scales.into_iter().map(to_f16).collect::<Result<Vec<_>>>()?;
        // Signed with zero point 0 means qint8, whose storage is the values themselves.
        Self::from_rows(&Int8Rows::new(n, k, group, q.storage().to_vec(), scales)?)
    }

    /// Packs row-major int8 or int4 weights (as quantized, or as read from a checkpoint).
    pub fn from_rows(rows: &Int8Rows) -> Result<Self> {
        if rows.bits == 4 {
            return Ok(Self::pack_int4(rows));
        }
        Ok(Self::pack_checked(rows.n, rows.k, rows.group, &rows.values, &rows.scales))
    }

    /// Int4 rows into nibble blocks (see the type's docs): `u = q + z`, padding `u = z` (a zero).
    fn pack_int4(rows: &Int8Rows) -> Self {
        let (k, group, groups) = (rows.k, rows.group, rows.groups());
        Self::pack_nibbles(rows.n, k, group, &rows.scales, &rows.zero_points, |j, u| {
            for (g, (run, u)) in rows.values[j * k..(j + 1) * k].chunks(group).zip(u.chunks_mut(group)).enumerate() {
                let z = rows.zero_points.get(j * groups + g).copied().unwrap_or(8) as i32;
                run.iter().zip(u).for_each(|(&q, u)| *u = (q as i32 + z) as u8);
            }
        })
    }

    /// Packs int4 weights straight from a checkpoint's bytes (two a byte, column `c` in the low
    /// nibble of byte `c/2` when even: the unsigned `u = q + z`), with `f16` scales and, when
    /// asymmetric, zero points `[n, groups]` in `[0, 15]` (else `z = 8`): no row-major copy.
    pub fn from_int4_bytes(n: usize, k: usize, group: usize, bytes: &[u8], scales: &[f16], zero_points: Option<&[u8]>) -> Result<Self> {
        let row_bytes = k.div_ceil(2);
        if n.checked_mul(row_bytes) != Some(bytes.len()) {
            bail!("int4 weights {n}×{k}: expected {n}×{row_bytes} bytes (two values a byte), got {}", bytes.len())
        }
        let group = check_scales(n, k, check_int4_group(k, group)?, scales, true)?;
        let zero_points = zero_points.unwrap_or_default();
        check_zero_points(n, k, group, zero_points)?;
        Ok(Self::pack_nibbles(n, k, group, scales, zero_points, |j, u| {
            for (c, u) in u.iter_mut().enumerate() {
                *u = (bytes[j * row_bytes + c / 2] >> (4 * (c % 2))) & 15;
            }
        }))
    }

    /// Int4 weights into nibble blocks: `row(j, u)` writes row `j`'s unsigned nibbles
    /// `u = q + z` (`K` of them); padding columns and rows get `u = z` (a zero weight).
    /// `zero_points` empty means symmetric (`z = 8`).
    fn pack_nibbles(n: usize, k: usize, group: usize, scales: &[f16], zero_points: &[u8], row: impl Fn(usize, &mut [u8]) + Sync) -> Self {
        let mut packed = Self::pack_checked(n, k, group, &[], scales);
        let stride = packed.stride;
        let (groups, blocks) = (k.div_ceil(group), n.div_ceil(BLOCK_ROWS));
        let zero = |j: usize, g: usize| zero_points.get(j * groups + g).copied().unwrap_or(8);
        let mut data = super::memory::zeroed::<i8>(blocks * BLOCK_ROWS * stride / 2);
        let block_of_slot = blocks_in_stream_order(blocks);
        // Each block's rows, and `Σ_g sw · Σ_{c∈g} q` of each row (the zero-point terms).
        let terms: Vec<[f32; BLOCK_ROWS]> = data
            .par_chunks_mut(BLOCK_ROWS * stride / 2)
            .zip(&block_of_slot)
            .map_init(
                || vec![0u8; k],
                |u, (dst, &b)| {
                    let mut terms = [0f32; BLOCK_ROWS];
                    for (r, term) in terms.iter_mut().enumerate() {
                        let j = b * BLOCK_ROWS + r;
                        // Column c's nibble: pair c/8, quad c/4 (low nibbles when even), lane r, byte c%4.
                        let mut put = |c: usize, u: u8| dst[32 * (c / 8) + 4 * r + c % 4] |= (u << (4 * ((c / 4) % 2))) as i8;
                        if j >= n {
                            (0..stride).for_each(|c| put(c, 8));
                            continue;
                        }
                        row(j, u);
                        for (c, &v) in u.iter().enumerate() {
                            put(c, v);
                        }
                        // Padding: the last group's zero point, a zero weight.
                        (k..stride).for_each(|c| put(c, zero(j, groups - 1)));
                        *term = u
                            .chunks(group)
                            .enumerate()
                            .map(|(g, run)| {
                                let z = zero(j, g) as i32;
                                scales[j * groups + g].to_f32() * run.iter().map(|&v| v as i32 - z).sum::<i32>() as f32
                            })
                            .sum();
                    }
                    terms
                },
            )
            .collect();
        let mut zero_point_terms = vec![0f32; n];
        for (&b, terms) in block_of_slot.iter().zip(&terms) {
            for (r, &t) in terms.iter().enumerate() {
                if let Some(slot) = zero_point_terms.get_mut(b * BLOCK_ROWS + r) {
                    *slot = t;
                }
            }
        }
        if !zero_points.is_empty() {
            let mut zp = vec![8u8; blocks * BLOCK_ROWS * groups];
            for j in 0..n {
                for g in 0..groups {
                    zp[side_offset(groups, blocks, j, g)] = zero(j, g);
                }
            }
            packed.zero_points = Some(Arc::new(zp));
        }
        packed.zero_point_terms = Arc::new(zero_point_terms);
        packed.bits = 4;
        packed.data = Arc::new(data);
        packed
    }

    /// Checks and packs row-major int8 weights held elsewhere (e.g. a checkpoint's bytes), with
    /// the rules of [`Int8Rows::new`]: no copy beyond the packed one.
    pub fn pack(n: usize, k: usize, group: usize, values: &[i8], scales: &[f16]) -> Result<Self> {
        let group = check_rows(n, k, group, values, scales)?;
        Ok(Self::pack_checked(n, k, group, values, scales))
    }

    /// Packs int8 weights that passed [`check_rows`], blocks of eight rows in parallel (no
    /// values: scales only, for [`Self::pack_int4`] to fill in).
    fn pack_checked(n: usize, k: usize, group: usize, values: &[i8], scales: &[f16]) -> Self {
        let stride = k.next_multiple_of(CHUNK);
        let groups = k.div_ceil(group);
        let blocks = n.div_ceil(BLOCK_ROWS);
        let block_of_slot = blocks_in_stream_order(blocks);
        let rows_of = |b: usize| (b * BLOCK_ROWS..((b + 1) * BLOCK_ROWS).min(n)).enumerate();
        let mut data = super::memory::zeroed::<i8>(if values.is_empty() { 0 } else { blocks * BLOCK_ROWS * stride });
        data.par_chunks_mut(BLOCK_ROWS * stride).zip(&block_of_slot).for_each(|(dst, &b)| {
            // Byte 32·q + 4·r + t of the block is w[8b + r, 4q + t].
            for (r, j) in rows_of(b) {
                for (q, quad) in values[j * k..(j + 1) * k].chunks(4).enumerate() {
                    dst[32 * q + 4 * r..32 * q + 4 * r + quad.len()].copy_from_slice(quad);
                }
            }
        });
        let mut packed_scales = vec![f16::ZERO; blocks * BLOCK_ROWS * groups];
        // One panel's scales per task: row j of its block v, group g, at (g·width + v)·8 + j % 8.
        packed_scales.par_chunks_mut(PANEL_BLOCKS * BLOCK_ROWS * groups).enumerate().for_each(|(p, dst)| {
            let first = p * PANEL_BLOCKS;
            for b in first..(first + PANEL_BLOCKS).min(blocks) {
                for (_, j) in rows_of(b) {
                    for g in 0..groups {
                        dst[side_offset(groups, blocks, j, g) - first * BLOCK_ROWS * groups] = scales[j * groups + g];
                    }
                }
            }
        });
        let zero_point_terms = values
            .par_chunks(k)
            .zip(scales.par_chunks(groups))
            .map(|(row, s)| row.chunks(group).zip(s).map(|(g, &sw)| sw.to_f32() * g.iter().map(|&v| v as i32).sum::<i32>() as f32).sum())
            .collect();
        Self {
            n,
            k,
            group,
            stride,
            bits: 8,
            zero_points: None,
            data: Arc::new(data),
            scales: Arc::new(packed_scales),
            zero_point_terms: Arc::new(zero_point_terms),
            group_sums: Default::default(),
        }
    }

    /// The weights unpacked to row-major order, as a checkpoint stores them.
    pub fn to_rows(&self) -> Int8Rows {
        let (k, groups) = (self.k, self.groups());
        let mut values = vec![0i8; self.n * k];
        let mut scales = vec![f16::ZERO; self.n * groups];
        for (j, (row, sw)) in values.chunks_mut(k).zip(scales.chunks_mut(groups)).enumerate() {
            row.iter_mut().enumerate().for_each(|(c, v)| *v = self.value(j, c));
            for (g, s) in sw.iter_mut().enumerate() {
                *s = self.scales[self.side_offset(j, g)];
            }
        }
        let zero_points = match &self.zero_points {
            Some(_) => (0..self.n).flat_map(|j| (0..groups).map(move |g| self.zero_point(j, g))).collect(),
            None => Vec::new(),
        };
        Int8Rows { n: self.n, k, group: self.group, bits: self.bits, values, scales, zero_points }
    }

    /// Where the byte holding `w[j, c]` lies in the packed data (of `blocks` blocks).
    #[inline]
    fn offset(&self, j: usize, c: usize) -> usize {
        let slot = stream_slot(j / BLOCK_ROWS, self.blocks());
        if self.bits == 4 {
            return slot * BLOCK_ROWS * self.stride / 2 + (c / 8) * 32 + (j % BLOCK_ROWS) * 4 + c % 4;
        }
        slot * BLOCK_ROWS * self.stride + (c / 4) * 32 + (j % BLOCK_ROWS) * 4 + c % 4
    }

    /// Bits per stored value: 8, or 4 for int4 weights.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// Whether int4 weights carry their own zero points (else 8, symmetric).
    pub fn has_zero_points(&self) -> bool {
        self.zero_points.is_some()
    }

    /// The integer zero point of output channel `j`, group `g`: the group's own for asymmetric
    /// int4, 8 for symmetric int4, 0 for int8.
    #[inline]
    pub fn zero_point(&self, j: usize, g: usize) -> u8 {
        match (&self.zero_points, self.bits) {
            (Some(z), _) => z[self.side_offset(j, g)],
            (None, 4) => 8,
            _ => 0,
        }
    }

    /// The int4 zero points of block `b` from its group 0 on, laid out like its scales; empty
    /// when there are none (int8 or symmetric int4).
    #[inline]
    pub fn block_zero_points(&self, b: usize) -> &[u8] {
        self.zero_points.as_deref().map_or(&[], |z| &z[self.side_run(z, b)])
    }

    /// Where output channel `j`'s group `g` lies in the per-group arrays (scales, zero points,
    /// group sums).
    #[inline]
    fn side_offset(&self, j: usize, g: usize) -> usize {
        side_offset(self.groups(), self.blocks(), j, g)
    }

    /// Block `b`'s values in a per-group array, from its group 0 to its panel's end: group `g`'s
    /// eight start [`Self::side_stride`]`(b) · g` values in.
    #[inline]
    fn side_run<T>(&self, side: &'_ [T], b: usize) -> std::ops::Range<usize> {
        let panel_end = (b / PANEL_BLOCKS * PANEL_BLOCKS + PANEL_BLOCKS).min(self.blocks());
        let end = (panel_end * BLOCK_ROWS * self.groups()).min(side.len());
        side_offset(self.groups(), self.blocks(), b * BLOCK_ROWS, 0).min(end)..end
    }

    /// How far apart two consecutive groups of block `b` lie in the per-group arrays (scales,
    /// zero points, group sums), in values: eight per block of its panel.
    #[inline]
    pub fn side_stride(&self, b: usize) -> usize {
        BLOCK_ROWS * panel_width(b, self.blocks())
    }

    /// Output channels `N`.
    pub fn out_features(&self) -> usize {
        self.n
    }

    /// Input channels `K`, without the padding.
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

    /// The packed bytes of block `b` (`8 · padded_in_features()` of them, half that for int4).
    #[inline]
    pub fn block(&self, b: usize) -> &[i8] {
        let (len, at) = (BLOCK_ROWS * self.stride * self.bits as usize / 8, stream_slot(b, self.blocks()));
        &self.data[at * len..(at + 1) * len]
    }

    /// The scales of block `b` from its group 0 on: eight per group, one per output channel,
    /// group `g`'s at [`Self::side_stride`]`(b) · g` (the panel's other blocks lie between).
    #[inline]
    pub fn block_scales(&self, b: usize) -> &[f16] {
        &self.scales[self.side_run(&self.scales, b)]
    }

    /// Makes the per-group weight sums that affine activations need (once; clones share them):
    /// false when the groups are larger than [`MAX_SUMMED_GROUP`].
    pub fn prepare_group_sums(&self) -> bool {
        self.has_group_sums() && !self.group_sums().is_empty()
    }

    /// The sums, made from the packed bytes on first use: block `b`'s quads hold
    /// `w[8b + r, 4q + t]` at byte `32q + 4r + t`.
    fn group_sums(&self) -> &[i16] {
        if !self.has_group_sums() {
            return &[];
        }
        // One plain pass (no parallel tasks inside the initialisation: a worker waiting on them
        // could otherwise be handed another task that asks for these same sums).
        self.group_sums.get_or_init(|| {
            let (groups, blocks, quads) = (self.groups(), self.blocks(), self.stride / 4);
            let mut sums = vec![0i16; blocks * BLOCK_ROWS * groups];
            // Per block, straight from its bytes: quad q (columns 4q..4q + 4, all in one group
            // as groups are multiples of 4 or span the row) of row r is bytes 32q + 4r.. for
            // int8, and for int4 the low (q even) or high nibbles of bytes 32·⌊q/2⌋ + 4r.., as
            // u = w + z. Padding columns hold zeros (u = z), so whole padded groups are summed.
            if groups > 1 && !self.group.is_multiple_of(4) {
                // Groups that split quads (int8 only): value by value.
                for j in 0..self.n {
                    for g in 0..groups {
                        let columns = g * self.group..((g + 1) * self.group).min(self.k);
                        sums[self.side_offset(j, g)] = columns.map(|c| self.value(j, c) as i16).sum();
                    }
                }
                return sums;
            }
            let mut raw = vec![0i32; BLOCK_ROWS * groups];
            for b in 0..blocks {
                raw.fill(0);
                let block = self.block(b);
                for q in 0..quads {
                    let g = (4 * q / self.group).min(groups - 1);
                    for r in 0..BLOCK_ROWS {
                        let quad = if self.bits == 4 {
                            let shift = 4 * (q % 2);
                            block[32 * (q / 2) + 4 * r..][..4].iter().map(|&v| ((v as u8 >> shift) & 15) as i32).sum::<i32>()
                        } else {
                            block[32 * q + 4 * r..][..4].iter().map(|&v| v as i32).sum::<i32>()
                        };
                        raw[g * BLOCK_ROWS + r] += quad;
                    }
                }
                for g in 0..groups {
                    // Columns of group g as padded (the last group takes the padding).
                    let columns = if g + 1 == groups { self.stride - g * self.group } else { self.group };
                    for r in 0..BLOCK_ROWS.min(self.n.saturating_sub(b * BLOCK_ROWS)) {
                        let j = b * BLOCK_ROWS + r;
                        let z = self.zero_point(j, g) as i32 * (self.bits == 4) as i32;
                        // |Σ| ≤ 127·256 < 2¹⁵.
                        sums[self.side_offset(j, g)] = (raw[g * BLOCK_ROWS + r] - z * columns as i32) as i16;
                    }
                }
            }
            sums
        })
    }

    /// The weight sums of block `b` from its group 0 on, laid out like its scales (`S[8b + r, g]`
    /// at `side_stride(b)·g + r`);
    /// empty when the groups are larger than [`MAX_SUMMED_GROUP`].
    #[inline]
    pub fn block_group_sums(&self, b: usize) -> &[i16] {
        let sums = self.group_sums();
        &sums[self.side_run(sums, b)]
    }

    /// Whether per-group weight sums can be kept (groups of at most [`MAX_SUMMED_GROUP`]).
    pub fn has_group_sums(&self) -> bool {
        self.group <= MAX_SUMMED_GROUP
    }

    /// `Σ_{k∈g} ŵ[j,k] = sw[j,g] · S[j,g]`: what an activation offset of 1 over group `g` adds to
    /// output `j` (needs [`Self::has_group_sums`]; 0 otherwise).
    #[inline]
    pub fn group_term(&self, j: usize, g: usize) -> f32 {
        self.group_sums().get(self.side_offset(j, g)).map_or(0.0, |&s| self.scale(j, g) * s as f32)
    }

    /// The quantized weight `w[j, c]` (for int4, `u − z`).
    #[inline]
    pub fn value(&self, j: usize, c: usize) -> i8 {
        let byte = self.data[self.offset(j, c)];
        if self.bits == 4 {
            let u = (byte as u8 >> (4 * ((c / 4) % 2))) & 15;
            return u as i8 - self.zero_point(j, c / self.group) as i8;
        }
        byte
    }

    /// The scale of output channel `j` for input group `g`.
    #[inline]
    pub fn scale(&self, j: usize, g: usize) -> f32 {
        self.scales[self.side_offset(j, g)].to_f32()
    }

    /// Quantized weights of output channel `j`, unpacked.
    pub fn row(&self, j: usize) -> Vec<i8> {
        (0..self.k).map(|c| self.value(j, c)).collect()
    }

    /// Scales of output channel `j`, one per group.
    pub fn row_scales(&self, j: usize) -> Vec<f32> {
        (0..self.groups()).map(|g| self.scale(j, g)).collect()
    }

    /// `Σ_k ŵ[j,k]` of output channel `j` (dequantized weights): what an activation zero point
    /// takes off each output, times `za · sa`.
    #[inline]
    pub fn zero_point_term(&self, j: usize) -> f32 {
        self.zero_point_terms[j]
    }

    /// The float weights these integers stand for: `w[n,k] = q[n,k] · scale[n, k / group]`.
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let mut data = vec![0f32; self.n * self.k];
        for (j, row) in data.chunks_mut(self.k).enumerate() {
            self.dequantize_row(j, row)?;
        }
        Tensor::from_vec(data, (self.n, self.k), device)
    }

    /// Output channel `j` as floats into `out` (`K` of them): `out[c] = q[j,c] · scale[j, c / group]`
    /// — e.g. a token's embedding when these are the weights of a tied `lm_head`.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) -> Result<()> {
        if j >= self.n || out.len() != self.k {
            bail!("int{} weights {}×{}: cannot write row {j} into {} values", self.bits, self.n, self.k, out.len())
        }
        for (g, part) in out.chunks_mut(self.group).enumerate() {
            let scale = self.scale(j, g);
            for (i, y) in part.iter_mut().enumerate() {
                *y = self.value(j, g * self.group + i) as f32 * scale;
            }
        }
        Ok(())
    }

    /// Bytes held: packed integer weights plus scales (and group sums once made), padding included.
    pub fn nbytes(&self) -> usize {
        self.data.len()
            + self.scales.len() * std::mem::size_of::<f16>()
            + self.zero_points.as_ref().map_or(0, |z| z.len())
            + self.group_sums.get().map_or(0, |s| s.len() * std::mem::size_of::<i16>())
    }
}

/// `N×K` int8 (or int4) weights in row-major order with their `f16` scales, checked: what a
/// checkpoint stores and what [`PackedInt8Weights`] is packed from. `values[j·K + c] = qw[j, c]`
/// in `[-127, 127]`; `scales[j·G + g] = sw[j, g]` finite and positive, `G = ⌈K / group⌉`.
/// Int4 values are `q = u − z` with `u ∈ [0, 15]` and `z` = 8 (symmetric, no zero points
/// kept) or the group's own zero point `zero_points[j·G + g] ∈ [0, 15]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Rows {
    n: usize,
    k: usize,
    group: usize,
    bits: u32,
    values: Vec<i8>,
    scales: Vec<f16>,
    zero_points: Vec<u8>,
}

impl Int8Rows {
    /// Checks shapes, the value range and the scales; every error says which rule broke.
    pub fn new(n: usize, k: usize, group: usize, values: Vec<i8>, scales: Vec<f16>) -> Result<Self> {
        let group = check_rows(n, k, group, &values, &scales)?;
        Ok(Self { n, k, group, bits: 8, values, scales, zero_points: Vec::new() })
    }

    /// Int4 rows: `values` are `q = u − z` (`u ∈ [0, 15]`), with `zero_points` `[N, G]` for
    /// asymmetric weights or `None` for symmetric ones (`z = 8`, `q ∈ [−8, 7]`). The group
    /// must be a multiple of 8 or span the row (the tiles unpack two quads per load).
    pub fn new_int4(n: usize, k: usize, group: usize, values: Vec<i8>, scales: Vec<f16>, zero_points: Option<Vec<u8>>) -> Result<Self> {
        let group = check_int4_group(k, group)?;
        check_shapes(n, k, group, &values, &scales, true)?;
        let groups = k.div_ceil(group);
        let zero_points = zero_points.unwrap_or_default();
        check_zero_points(n, k, group, &zero_points)?;
        // Rows in parallel, a group at a time (one zero point each).
        let outside = values.par_chunks(k).enumerate().find_map_first(|(j, row)| {
            row.chunks(group).enumerate().find_map(|(g, run)| {
                let z = zero_points.get(j * groups + g).copied().unwrap_or(8) as i32;
                run.iter().position(|&q| !(0..=15).contains(&(q as i32 + z))).map(|t| (j, g * group + t, run[t], z))
            })
        });
        if let Some((j, c, q, z)) = outside {
            bail!("int4 weight at row {j}, column {c} is {q}: with zero point {z} it must lie in [{}, {}]", -z, 15 - z)
        }
        Ok(Self { n, k, group, bits: 4, values, scales, zero_points })
    }

    /// Bits per value: 8, or 4.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// Asymmetric int4 zero points, `groups()` per row; `None` for int8 and symmetric int4.
    pub fn zero_points(&self) -> Option<&[u8]> {
        Some(self.zero_points.as_slice()).filter(|z| !z.is_empty())
    }

    /// Int4 values as a checkpoint stores them: `⌈K / 2⌉` bytes per row, column `c` in the low
    /// nibble of byte `c / 2` when `c` is even and in the high nibble when odd, as `u = q + z`
    /// (an odd `K` leaves the last high nibble 0).
    pub fn int4_bytes(&self) -> Vec<u8> {
        let (k, groups) = (self.k, self.groups());
        let mut bytes = vec![0u8; self.n * k.div_ceil(2)];
        bytes.par_chunks_mut(k.div_ceil(2)).zip(self.values.par_chunks(k)).enumerate().for_each(|(j, (dst, row))| {
            for (g, run) in row.chunks(self.group).enumerate() {
                let z = self.zero_points.get(j * groups + g).copied().unwrap_or(8) as i32;
                for (c, &q) in (g * self.group..).zip(run) {
                    dst[c / 2] |= ((q as i32 + z) as u8) << (4 * (c % 2));
                }
            }
        });
        bytes
    }

    /// Int4 rows from a checkpoint's bytes ([`Self::int4_bytes`]' layout), checked as
    /// [`Self::new_int4`] does.
    pub fn from_int4_bytes(n: usize, k: usize, group: usize, bytes: &[u8], scales: Vec<f16>, zero_points: Option<Vec<u8>>) -> Result<Self> {
        let row_bytes = k.div_ceil(2);
        if n.checked_mul(row_bytes) != Some(bytes.len()) {
            bail!("int4 weights {n}×{k}: expected {n}×{row_bytes} bytes (two values a byte), got {}", bytes.len())
        }
        let group = check_int4_group(k, group)?;
        let groups = k.div_ceil(group);
        let zero = |j: usize, g: usize| zero_points.as_ref().map_or(8, |z| z.get(j * groups + g).copied().unwrap_or(8)) as i32;
        let mut values = vec![0i8; n * k];
        values.par_chunks_mut(k).zip(bytes.par_chunks(row_bytes)).enumerate().for_each(|(j, (row, src))| {
            for (g, run) in row.chunks_mut(group).enumerate() {
                let z = zero(j, g);
                for (c, v) in (g * group..).zip(run) {
                    *v = (((src[c / 2] >> (4 * (c % 2))) & 15) as i32 - z) as i8;
                }
            }
        });
        Self::new_int4(n, k, group, values, scales, zero_points)
    }

    /// Output channels `N`.
    pub fn out_features(&self) -> usize {
        self.n
    }

    /// Input channels `K`, without the padding.
    pub fn in_features(&self) -> usize {
        self.k
    }

    /// Input channels per scale (`K` when per channel).
    pub fn group_size(&self) -> usize {
        self.group
    }

    /// Scales per row.
    pub fn groups(&self) -> usize {
        self.k.div_ceil(self.group)
    }

    /// The values, row-major.
    pub fn values(&self) -> &[i8] {
        &self.values
    }

    /// The scales, `groups()` per row.
    pub fn scales(&self) -> &[f16] {
        &self.scales
    }

    /// The weight these rows stand for, row-major: `ŵ[j, c] = s[j, c / group] · q[j, c]`
    /// (int4 values are already `u − z`).
    pub fn dequantized(&self) -> Vec<f32> {
        let groups = self.groups();
        let mut out = Vec::with_capacity(self.values.len());
        for (j, row) in self.values.chunks(self.k.max(1)).enumerate() {
            let scales = &self.scales[j * groups..(j + 1) * groups];
            out.extend(row.iter().enumerate().map(|(c, &q)| scales[c / self.group].to_f32() * q as f32));
        }
        out
    }

    /// The values and the scales, moved out.
    pub fn into_parts(self) -> (Vec<i8>, Vec<f16>) {
        (self.values, self.scales)
    }
}

/// The int4 group rule: a multiple of 8 below `K` (the tiles unpack two quads of four per
/// load, so segments start on whole pairs), or one group per row; returns it, at most `k`.
fn check_int4_group(k: usize, group: usize) -> Result<usize> {
    if group == 0 || (group < k && !group.is_multiple_of(8)) {
        bail!("int4 weight groups must be a multiple of 8 input channels (32, 64, 128) or span the row of {k}; got {group}")
    }
    Ok(group.min(k))
}

/// Int4 zero points: none (symmetric), or one per row and group, each in `[0, 15]`.
fn check_zero_points(n: usize, k: usize, group: usize, zero_points: &[u8]) -> Result<()> {
    let groups = k.div_ceil(group);
    if !zero_points.is_empty() && zero_points.len() != n * groups {
        bail!("int4 weights {n}×{k} in groups of {group}: expected {n}×{groups} zero points, got {}", zero_points.len())
    }
    if let Some(i) = zero_points.iter().position(|&z| z > 15) {
        bail!("int4 zero point at row {}, group {} is {}: zero points lie in [0, 15]", i / groups, i % groups, zero_points[i])
    }
    Ok(())
}

/// The rules of [`Int8Rows`]; returns the group size, at most `k`.
fn check_rows(n: usize, k: usize, group: usize, values: &[i8], scales: &[f16]) -> Result<usize> {
    let group = check_shapes(n, k, group, values, scales, false)?;
    if values.contains(&-128) {
        let i = values.iter().position(|&v| v == -128).unwrap_or(0);
        bail!("int8 weights must lie in [-127, 127] (narrow range); -128 found at row {}, column {}", i / k, i % k)
    }
    Ok(group)
}

/// Shapes and scales, whatever the bits (int4 scales may be negative: the sign lets a group's
/// extreme take the level −8); returns the group size, at most `k`.
fn check_shapes(n: usize, k: usize, group: usize, values: &[i8], scales: &[f16], signed: bool) -> Result<usize> {
    if n.checked_mul(k) != Some(values.len()) {
        bail!("int8 weights {n}×{k}: {} values given", values.len())
    }
    check_scales(n, k, group, scales, signed)
}

/// The shape rules every weight shares, and its scales' (one per row and group, finite and
/// positive; `signed` (int4): finite and non-zero); returns the group size, at most `k`.
fn check_scales(n: usize, k: usize, group: usize, scales: &[f16], signed: bool) -> Result<usize> {
    if n == 0 || k == 0 || group == 0 {
        bail!("int8 weights must not be empty: {n}×{k} with groups of {group}")
    }
    if k > MAX_IN_FEATURES {
        bail!("int8 weights with {k} input features would overflow i32 accumulation (max {MAX_IN_FEATURES})")
    }
    let group = group.min(k);
    let groups = k.div_ceil(group);
    if n * groups != scales.len() {
        bail!("int8 weights {n}×{k} in groups of {group}: expected {n}×{groups} scales, got {}", scales.len())
    }
    // f16 bits: positive and finite means sign 0, exponent not all ones, not +0 (int4: the
    // magnitude bits alone).
    let magnitude = |s: &f16| if signed { s.to_bits() & 0x7fff } else { s.to_bits() };
    if let Some(i) = scales.iter().position(|s| !(1..0x7c00).contains(&magnitude(s))) {
        let rule = if signed { "finite and non-zero" } else { "finite and positive" };
        bail!("weight scale at row {}, group {} is {}: scales must be {rule}", i / groups, i % groups, scales[i])
    }
    Ok(group)
}

/// Quantizes a row-major float `N×K` weight: per row and group of input channels,
/// `sw = f16(max|w| / 127)` over the finite values (at least [`crate::quant::SCALE_EPS`]) and
/// `qw = round_half_even(clamp(w / sw, −127, 127))` with the rounded scale, so values and the
/// stored scale agree exactly. Rows are quantized in parallel on rayon's pool. The same
/// numbers as [`QuantizedTensor::quantize`] with [`PackedInt8Weights::qparams`].
pub fn quantize_weight_rows(values: &[f32], n: usize, k: usize, how: WeightQuant) -> Result<Int8Rows> {
    if n.checked_mul(k) != Some(values.len()) {
        bail!("cannot quantize {} values as an {n}×{k} weight", values.len())
    }
    quantize_weight_rows_with(n, k, how, |j, row| row.copy_from_slice(&values[j * k..(j + 1) * k]))
}

/// [`quantize_weight_rows`] with row `j` written into a `K`-long buffer by `row(j, buf)` — e.g.
/// widened from a checkpoint's bf16 bytes — so no float copy of the whole weight is made.
pub fn quantize_weight_rows_with(n: usize, k: usize, how: WeightQuant, row: impl Fn(usize, &mut [f32]) + Sync) -> Result<Int8Rows> {
    let group = match how {
        WeightQuant::PerChannel => k,
        WeightQuant::PerGroup(0) => bail!("weight group size must be at least 1"),
        WeightQuant::PerGroup(size) => size.min(k),
        WeightQuant::Int4 { group, zero_point } => return super::int4::quantize_int4_rows_with(n, k, group, zero_point, row),
    };
    if n == 0 || k == 0 || k > MAX_IN_FEATURES {
        bail!("cannot quantize an {n}×{k} weight (1 to {MAX_IN_FEATURES} input features)")
    }
    let groups = k.div_ceil(group);
    let mut q = super::memory::zeroed::<i8>(n * k);
    let mut scales = vec![f16::ZERO; n * groups];
    let kernels = super::Kernels::best();
    q.par_chunks_mut(k).zip(scales.par_chunks_mut(groups)).enumerate().with_min_len(16).try_for_each_init(
        || vec![0f32; k],
        |buf, (j, (qrow, srow))| -> Result<()> {
            row(j, buf);
            for ((w, qw), s) in buf.chunks(group).zip(qrow.chunks_mut(group)).zip(srow.iter_mut()) {
                // Symmetric: the scale needs only max|w| over the finite values.
                let (amax, finite) = kernels.abs_max(w);
                let (lo, hi) = if finite {
                    (-amax, amax)
                } else {
                    w.iter().filter(|v| v.is_finite()).fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)))
                };
                *s = to_f16(QSpec::WEIGHT.scale_zero_point(lo, hi)?.0)?;
                let inv = 1.0 / s.to_f32();
                if finite {
                    kernels.quantize_symmetric(w, inv, qw);
                } else {
                    super::quantize_symmetric(w, inv, qw);
                }
            }
            Ok(())
        },
    )?;
    // In range by construction: symmetric narrow-range quantization, scales from `to_f16`.
    Ok(Int8Rows { n, k, group, bits: 8, values: q, scales, zero_points: Vec::new() })
}

/// Blocks a decoding tile reads side by side, one stream each (`x86.rs`, `arm.rs`: panels of
/// eight blocks, 64 outputs).
const PANEL_BLOCKS: usize = 8;

/// The block stored in each slot: the inverse of [`stream_slot`].
fn blocks_in_stream_order(blocks: usize) -> Vec<usize> {
    let mut block_of_slot = vec![0usize; blocks];
    for b in 0..blocks {
        block_of_slot[stream_slot(b, blocks)] = b;
    }
    block_of_slot
}

/// Blocks in block `b`'s panel (of `blocks`): [`PANEL_BLOCKS`], or fewer in a last, partial one.
fn panel_width(b: usize, blocks: usize) -> usize {
    (blocks - b / PANEL_BLOCKS * PANEL_BLOCKS).min(PANEL_BLOCKS)
}

/// Where output channel `j`'s group `g` lies in a per-group array (scales, zero points, group
/// sums) of `blocks` blocks: panel by panel, and within a panel group by group, the eight
/// values of each of its blocks side by side. A decoding tile reads a panel's group `g` for
/// all its blocks at once, so each of these arrays is one memory stream beside the eight of the
/// weights (streams beyond a dozen or so read memory slower: docs/kernels.md).
fn side_offset(groups: usize, blocks: usize, j: usize, g: usize) -> usize {
    let b = j / BLOCK_ROWS;
    let (p, v) = (b / PANEL_BLOCKS, b % PANEL_BLOCKS);
    ((p * PANEL_BLOCKS * groups) + g * panel_width(b, blocks) + v) * BLOCK_ROWS + j % BLOCK_ROWS
}

/// Panels whose blocks are stored stream by stream (see [`stream_slot`]).
const STREAM_PANELS: usize = 8;

/// Where block `b` of `blocks` is stored, counted in blocks. A decoding tile reads the eight
/// blocks of a panel side by side, one memory stream each; within each run of
/// [`STREAM_PANELS`] whole panels, block `v` of panel `p + 1` is stored right after block `v` of
/// panel `p`, so each of the eight streams runs on through the panels of its run (at K = 576 a
/// block is a 4.6 KB stream; a run of eight, 37 KB: eight long streams read memory faster than
/// eight short ones, docs/kernels.md). Panel `p`'s block `v`,
/// in a run starting at panel `p0` and holding `P` panels, goes to `8·p0 + v·P + (p − p0)`;
/// the last, partial panel stays in order. A bijection on `0..blocks`; every block stays
/// contiguous, so tiles over any blocks read them through [`PackedInt8Weights::block`].
fn stream_slot(b: usize, blocks: usize) -> usize {
    let panels = blocks / PANEL_BLOCKS;
    if b >= panels * PANEL_BLOCKS {
        return b;
    }
    let (p, v) = (b / PANEL_BLOCKS, b % PANEL_BLOCKS);
    let p0 = p / STREAM_PANELS * STREAM_PANELS;
    let run = (panels - p0).min(STREAM_PANELS);
    p0 * PANEL_BLOCKS + v * run + (p - p0)
}

/// `s` rounded to the nearest `f16`. Scales are at least [`crate::quant::SCALE_EPS`] (2⁻²³, an
/// `f16` subnormal), so none rounds to zero; one beyond `f16::MAX` (weights over ~8.3·10⁶) is
/// refused.
fn to_f16(s: f32) -> Result<f16> {
    let h = f16::from_f32(s);
    if !h.is_finite() {
        bail!("int8 weight scale {s} does not fit an f16 scale (weights must stay below {})", f16::MAX.to_f32() * 127.0)
    }
    Ok(h)
}

/// [`Kernels::quantize_symmetric`] on the best path, for any input: a run holding a non-finite
/// value goes through the scalar quantizer (weights quantized at load time use this).
pub(crate) fn quantize_symmetric(x: &[f32], inv: f32, q: &mut [i8]) {
    let best = super::Kernels::best();
    let kernels = if best.abs_max(x).1 { best } else { super::Kernels::PORTABLE };
    kernels.quantize_symmetric(x, inv, q)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packing a checkpoint's int4 bytes directly gives the very blocks, scales, zero points
    /// and zero-point terms that unpacking them to rows and packing those does: odd `K`, rows
    /// not a multiple of 8, one group per row, with and without zero points.
    #[test]
    fn int4_bytes_pack_as_their_rows_do() {
        let mut state = 777u32;
        let mut next = move |m: u32| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) % m
        };
        for (n, k, group, asym) in
            [(13usize, 67usize, 32usize, true), (16, 64, 64, false), (9, 40, 8, true), (70, 96, 32, false), (3, 5, 5, true)]
        {
            let groups = k.div_ceil(group);
            let bytes: Vec<u8> = (0..n * k.div_ceil(2)).map(|_| next(256) as u8).collect();
            // An odd K's last high nibble is 0, as the format says.
            let bytes: Vec<u8> =
                bytes.iter().enumerate().map(|(i, &b)| if k % 2 == 1 && i % k.div_ceil(2) == k / 2 { b & 15 } else { b }).collect();
            let scales: Vec<f16> =
                (0..n * groups).map(|_| f16::from_f32((next(1000) as f32 + 1.0) * 1e-4 * if next(2) == 0 { -1.0 } else { 1.0 })).collect();
            let zero_points: Option<Vec<u8>> = asym.then(|| (0..n * groups).map(|_| next(16) as u8).collect());
            let direct = PackedInt8Weights::from_int4_bytes(n, k, group, &bytes, &scales, zero_points.as_deref()).unwrap();
            let rows = Int8Rows::from_int4_bytes(n, k, group, &bytes, scales.clone(), zero_points.clone()).unwrap();
            let via_rows = PackedInt8Weights::from_rows(&rows).unwrap();
            let shape = |p: &PackedInt8Weights| (p.n, p.k, p.group, p.stride, p.bits);
            assert_eq!(shape(&direct), shape(&via_rows), "{n}×{k}/{group}");
            assert_eq!(direct.data, via_rows.data, "{n}×{k}/{group}: blocks");
            assert_eq!(direct.scales, via_rows.scales);
            assert_eq!(direct.zero_points, via_rows.zero_points);
            let bits = |p: &PackedInt8Weights| p.zero_point_terms.iter().map(|t| t.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&direct), bits(&via_rows), "{n}×{k}/{group}: zero-point terms");
        }
        let err = |r: Result<PackedInt8Weights>| r.unwrap_err().to_string();
        let one = [f16::ONE; 2];
        assert!(err(PackedInt8Weights::from_int4_bytes(2, 8, 8, &[0; 7], &one, None)).contains("2×4 bytes"));
        assert!(err(PackedInt8Weights::from_int4_bytes(2, 8, 8, &[0; 8], &one, Some(&[3, 16]))).contains("zero point at row 1"));
        assert!(err(PackedInt8Weights::from_int4_bytes(2, 8, 8, &[0; 8], &one[..1], None)).contains("scales"));
    }

    #[test]
    fn group_sums_are_the_sums_of_the_values() {
        // A small LCG: values in [-127, 127] (int8) or [0, 15] as u (int4), zero points in [0, 15].
        let mut state = 12345u32;
        let mut next = move |m: u32| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) % m
        };
        // (n, k, group, bits, zero points): grouped, per channel, tails in both directions.
        for (n, k, group, bits, asym) in [
            (13usize, 70usize, 32usize, 8u32, false),
            (9, 40, 40, 8, false),
            (70, 96, 32, 8, false),
            (17, 72, 24, 4, false),
            (75, 67, 32, 4, true),
        ] {
            let groups = k.div_ceil(group);
            let values: Vec<i8> =
                (0..n * k).map(|_| if bits == 4 { (next(16) as i32 - 8) as i8 } else { (next(255) as i32 - 127) as i8 }).collect();
            let zero_points: Vec<u8> = if asym { (0..n * groups).map(|_| next(16) as u8).collect() } else { vec![] };
            // Int4 values as u − z stay in [−z, 15 − z].
            let values = if asym {
                values
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| ((v + 8) as u8 as i32 - zero_points[(i / k) * groups + (i % k) / group] as i32) as i8)
                    .collect()
            } else {
                values
            };
            let scales = vec![f16::ONE; n * groups];
            let rows = Int8Rows { n, k, group, bits, values: values.clone(), scales, zero_points };
            let w = PackedInt8Weights::from_rows(&rows).unwrap();
            assert!(w.prepare_group_sums());
            for j in 0..n {
                for g in 0..groups {
                    let want: i32 = values[j * k + g * group..j * k + ((g + 1) * group).min(k)].iter().map(|&v| v as i32).sum();
                    let (b, r) = (j / BLOCK_ROWS, j % BLOCK_ROWS);
                    assert_eq!(
                        w.block_group_sums(b)[w.side_stride(b) * g + r] as i32,
                        want,
                        "{n}×{k}/{group} int{bits}: row {j}, group {g}"
                    );
                }
            }
        }
    }

    #[test]
    fn side_offsets_are_a_permutation() {
        for blocks in 0..20 {
            for groups in 1..5 {
                let mut seen = vec![false; blocks * BLOCK_ROWS * groups];
                for j in 0..blocks * BLOCK_ROWS {
                    for g in 0..groups {
                        let at = side_offset(groups, blocks, j, g);
                        assert!(at < seen.len() && !seen[at], "{blocks} blocks, {groups} groups: row {j}, group {g} -> {at}");
                        seen[at] = true;
                    }
                }
            }
        }
        // 9 blocks of 3 groups: a whole panel, then a panel of one block. Row 21 is block 2,
        // row 5; its group 1 is at (1·8 + 2)·8 + 5 = 85. Row 67 is block 8 (the last panel, one
        // block wide, starting at 8·3·8 = 192), row 3; its group 2 is at 192 + (2·1 + 0)·8 + 3.
        assert_eq!(side_offset(3, 9, 21, 1), 85);
        assert_eq!(side_offset(3, 9, 67, 2), 211);
        assert_eq!((panel_width(2, 9), panel_width(8, 9)), (8, 1));
    }

    #[test]
    fn stream_slots_are_a_permutation() {
        for blocks in 0..300 {
            let mut seen = vec![false; blocks];
            for b in 0..blocks {
                let s = stream_slot(b, blocks);
                assert!(s < blocks && !seen[s], "{blocks} blocks: block {b} -> slot {s}");
                seen[s] = true;
            }
        }
        // 72 blocks (SmolLM2's 576 outputs): panels 0–7 are one run of eight, so block v of
        // panel p sits at 8·v + p (block 8·2 + 3 = 19 at 8·3 + 2 = 26); panel 8 is a run of one.
        assert_eq!(stream_slot(19, 72), 26);
        assert_eq!(stream_slot(67, 72), 67);
        // 20 blocks: two whole panels (one run of two: block 8·1 + 5 = 13 at 5·2 + 1 = 11), then a
        // partial panel in order.
        assert_eq!(stream_slot(13, 20), 11);
        assert_eq!(stream_slot(17, 20), 17);
    }
}
