//! Activation quantization for the int8 kernels: per token, per group, or static per tensor.

use super::{Isa, CHUNK};
use crate::quant::{quantize_value, QSpec};
use candle_core::{bail, Result};
use std::ops::Range;

/// `M×K` int8 activations with one scale per `(row, group)` and one zero point for all, or —
/// affine — one scale and one float offset per `(row, group)`: `x ≈ sa·q + o`. Rows are
/// zero-padded to a whole number of [`CHUNK`]s, like the weights.
#[derive(Debug, Clone)]
pub struct QuantizedActivations {
    m: usize,
    k: usize,
    stride: usize,
    group: usize,
    data: Vec<i8>,
    scales: Vec<f32>,
    /// Affine activations: `o[i,g]`, laid out like the scales (`x ≈ sa·q + o`); empty when
    /// symmetric.
    offsets: Vec<f32>,
    zero_point: i32,
    /// Values kept in float (LLM.int8()-style decomposition), row by row: `(column, value)`,
    /// the value being what the int8 slot misses — `x` itself when symmetric (the slot holds 0),
    /// `x − (sa·(−128) + o)` when affine (the slot holds −128). Row `i`'s are
    /// `outliers[outlier_start[i]..outlier_start[i + 1]]`.
    outliers: Vec<(u32, f32)>,
    outlier_start: Vec<usize>,
    /// What the int8 tiles of one path take besides the rows, for one segment length and weight
    /// width (8 or 4 bits): built by the first layer that multiplies these activations, reused
    /// by the others.
    tile_operands: std::sync::OnceLock<((Isa, usize, u32), super::TileOperands)>,
}

impl QuantizedActivations {
    /// Dynamic symmetric quantization ([`QSpec::DYNAMIC_ACTIVATION`], `[-127, 127]`): each run of
    /// `group` values in a row gets `scale = max|x| / 127`. `group >= k` means one scale per row
    /// (per token). Non-finite inputs are an error (they would make the scale meaningless).
    ///
    /// With `outlier_threshold = Some(t)`, values with `|x| > t` are set aside in float (the
    /// kernel adds `x · ŵ` for them exactly) and the group's scale is computed without them, so a
    /// rare huge activation no longer flattens the rest of its group.
    pub fn quantize_dynamic(x: &[f32], m: usize, k: usize, group: usize, outlier_threshold: Option<f32>) -> Result<Self> {
        Self::quantize_dynamic_with(Isa::best(), x, m, k, group, outlier_threshold)
    }

    /// Dynamic affine quantization: each run of `group` values in a row spans its own range
    /// `[lo, hi]` with 256 steps, `sa = (hi − lo) / 255`, `q = round((x − lo) / sa) − 128` in
    /// `[-128, 127]` and the offset `o = lo + 128·sa`, so that `x ≈ sa·q + o`. Against the
    /// symmetric `max|x| / 127`, the step shrinks by the group's skew, and never grows.
    /// `group >= k` means one scale and offset per row. The kernels add `o · Σ_{k∈g} ŵ[n,k]`
    /// per group, from sums kept with the weights.
    ///
    /// With `outlier_threshold = Some(t)`, values with `|x| > t` leave the range and are
    /// multiplied in float: their int8 slot holds `-128` (the value `sa·(-128) + o`) and what
    /// it misses, `x − (sa·(-128) + o)`, is set aside.
    pub fn quantize_dynamic_affine(x: &[f32], m: usize, k: usize, group: usize, outlier_threshold: Option<f32>) -> Result<Self> {
        Self::quantize_dynamic_affine_with(Isa::best(), x, m, k, group, outlier_threshold)
    }

    /// [`quantize_dynamic_affine`](Self::quantize_dynamic_affine) on a chosen path; every path
    /// gives the same bits.
    pub fn quantize_dynamic_affine_with(
        isa: Isa,
        x: &[f32],
        m: usize,
        k: usize,
        group: usize,
        outlier_threshold: Option<f32>,
    ) -> Result<Self> {
        check_dims(x, m, k)?;
        Self::quantize_dynamic_from(isa, Source::Rows(x), m, k, group, outlier_threshold, true)
    }

    /// [`quantize_dynamic`](Self::quantize_dynamic) on a chosen path; every path gives the
    /// same bits (tests compare them).
    pub fn quantize_dynamic_with(isa: Isa, x: &[f32], m: usize, k: usize, group: usize, outlier_threshold: Option<f32>) -> Result<Self> {
        check_dims(x, m, k)?;
        Self::quantize_dynamic_from(isa, Source::Rows(x), m, k, group, outlier_threshold, false)
    }

    /// [`quantize_dynamic`](Self::quantize_dynamic) of SwiGLU's product `silu(gate) · up`
    /// (`m × k` each), each row computed just before it is quantized — the same values and bits
    /// as quantizing [`super::silu_mul`]'s output, without writing it out (affine or not).
    pub(crate) fn quantize_dynamic_swiglu(
        gate: &[f32],
        up: &[f32],
        m: usize,
        k: usize,
        group: usize,
        outlier_threshold: Option<f32>,
        affine: bool,
    ) -> Result<Self> {
        check_dims(gate, m, k)?;
        check_dims(up, m, k)?;
        Self::quantize_dynamic_from(Isa::best(), Source::SwiGlu(gate, up), m, k, group, outlier_threshold, affine)
    }

    /// [`quantize_dynamic`](Self::quantize_dynamic) of `gelu_erf(x)` (`m × k`), each row's GELU
    /// computed just before it is quantized — the same values and bits as quantizing
    /// [`super::gelu_erf`]'s output, without writing it out.
    pub(crate) fn quantize_dynamic_gelu(
        x: &[f32],
        m: usize,
        k: usize,
        group: usize,
        outlier_threshold: Option<f32>,
        affine: bool,
    ) -> Result<Self> {
        check_dims(x, m, k)?;
        Self::quantize_dynamic_from(Isa::best(), Source::Gelu(x), m, k, group, outlier_threshold, affine)
    }

    fn quantize_dynamic_from(
        isa: Isa,
        x: Source,
        m: usize,
        k: usize,
        group: usize,
        outlier_threshold: Option<f32>,
        affine: bool,
    ) -> Result<Self> {
        let kernels = super::Kernels::of(isa).map_err(|e| e.context("activations"))?;
        let group = group.clamp(1, k.max(1));
        let groups = k.div_ceil(group);
        let stride = k.next_multiple_of(CHUNK);
        // Affine rows keep an offset beside each scale: `[scale, offset]` pairs while quantizing.
        let per_group = if affine { 2 } else { 1 };
        let mut scales = vec![0f32; m * groups * per_group];
        let limit = outlier_threshold.unwrap_or(f32::INFINITY);
        let (data, (outliers, outlier_start)) =
            over_row_pieces(m, k, stride, &mut scales, groups * per_group, |rows, data, scales, outliers, ends| {
                let rows = RowPiece { x: x.rows(rows, k), k, group, stride, limit, data, scales, outliers, ends };
                #[cfg(target_arch = "x86_64")]
                if kernels.isa() != Isa::Reference {
                    // SAFETY: every x86 path but the portable one has AVX2+FMA+F16C.
                    return unsafe {
                        if affine {
                            quantize_affine_rows_avx2(&kernels, rows)
                        } else {
                            quantize_dynamic_rows_avx2(&kernels, rows)
                        }
                    };
                }
                if affine {
                    quantize_affine_rows(&kernels, rows)
                } else {
                    quantize_dynamic_rows(&kernels, rows)
                }
            })?;
        let (scales, offsets) = if affine {
            (scales.iter().step_by(2).copied().collect(), scales.iter().skip(1).step_by(2).copied().collect())
        } else {
            (scales, Vec::new())
        };
        Ok(Self { m, k, stride, group, data, scales, offsets, zero_point: 0, outliers, outlier_start, tile_operands: Default::default() })
    }

    /// Static symmetric quantization with fixed scales, one per run of `group` input channels
    /// shared by every row (`scales.len() == k.div_ceil(group)`): `q = round(x / s_g)` in
    /// `[-127, 127]`. A value with `|x| > 127·s_g` is set aside in float rather than clamped
    /// (the kernel adds `x · ŵ` for it exactly). Non-finite inputs are an error.
    pub fn quantize_static_groups(x: &[f32], m: usize, k: usize, group: usize, scales: &[f32]) -> Result<Self> {
        Self::quantize_static_groups_with(Isa::best(), x, m, k, group, scales)
    }

    /// [`quantize_static_groups`](Self::quantize_static_groups) on a chosen path; every path
    /// gives the same bits.
    pub fn quantize_static_groups_with(isa: Isa, x: &[f32], m: usize, k: usize, group: usize, scales: &[f32]) -> Result<Self> {
        check_dims(x, m, k)?;
        let kernels = super::Kernels::of(isa).map_err(|e| e.context("activations"))?;
        let group = group.clamp(1, k);
        let groups = k.div_ceil(group);
        if scales.len() != groups {
            bail!("static activations: {} scales for {groups} groups of {group} in rows of {k}", scales.len())
        }
        if let Some(s) = scales.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            bail!("static activations: scale {s} is not a finite positive number")
        }
        let inv: Vec<f32> = scales.iter().map(|s| 1.0 / s).collect();
        // |x| ≤ 127·s rounds into [-127, 127].
        let limits: Vec<f32> = scales.iter().map(|s| 127.0 * s).collect();
        let stride = k.next_multiple_of(CHUNK);
        let (data, (outliers, outlier_start)) = over_row_pieces(m, k, stride, &mut [], 0, |rows, data, _, outliers, ends| {
            for (xr, qr) in x[rows.start * k..rows.end * k].chunks(k).zip(data.chunks_mut(stride)) {
                for (g, (xg, qg)) in xr.chunks(group).zip(qr.chunks_mut(group)).enumerate() {
                    let (a, finite) = kernels.abs_max(xg);
                    if !finite {
                        bail!("activation row contains a non-finite value (NaN or ±Inf)")
                    }
                    kernels.quantize_symmetric(xg, inv[g], qg);
                    if a > limits[g] {
                        set_aside_above(limits[g], xg, g * group, qg, outliers);
                    }
                }
                ends.push(outliers.len());
            }
            Ok(())
        })?;
        let scales = scales.repeat(m);
        Ok(Self {
            m,
            k,
            stride,
            group,
            data,
            scales,
            offsets: Vec::new(),
            zero_point: 0,
            outliers,
            outlier_start,
            tile_operands: Default::default(),
        })
    }

    /// Static quantization with fixed per-tensor `scale` and `zero_point` under `spec`
    /// (qint8 or quint8; quint8 values are shifted by -128 into i8 storage, zero point with them).
    pub fn quantize_static(x: &[f32], m: usize, k: usize, spec: &QSpec, scale: f32, zero_point: i32) -> Result<Self> {
        check_dims(x, m, k)?;
        let (qmin, qmax) = spec.qrange();
        let shift = if qmin >= 0 { 128 } else { 0 };
        let inv = 1.0 / scale;
        let stride = k.next_multiple_of(CHUNK);
        let mut data = vec![0i8; m * stride];
        for (xr, qr) in x.chunks(k).zip(data.chunks_mut(stride)) {
            for (q, &v) in qr.iter_mut().zip(xr) {
                *q = (quantize_value(v, inv, zero_point, qmin, qmax) - shift) as i8;
            }
        }
        Ok(Self {
            m,
            k,
            stride,
            group: k.max(1),
            data,
            scales: vec![scale; m],
            offsets: Vec::new(),
            zero_point: zero_point - shift,
            outliers: vec![],
            outlier_start: vec![0; m + 1],
            tile_operands: Default::default(),
        })
    }

    /// The tile operands of path `isa` for segments of `seg` and weights of `bits`: the ones
    /// kept with these activations, built by `build` if none are kept yet; `None` when other ones
    /// are kept (another path, segment length or weight width), which the caller then builds for
    /// itself.
    pub(super) fn tile_operands(
        &self,
        isa: Isa,
        seg: usize,
        bits: u32,
        build: impl FnOnce() -> super::TileOperands,
    ) -> Option<&super::TileOperands> {
        let (kept, ops) = self.tile_operands.get_or_init(|| ((isa, seg, bits), build()));
        (*kept == (isa, seg, bits)).then_some(ops)
    }

    /// Rows `M` (tokens).
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Columns `K` (input channels), without the padding.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Input channels per scale (`K` when one scale per row).
    pub fn group_size(&self) -> usize {
        self.group
    }

    /// Groups per row.
    pub fn groups(&self) -> usize {
        self.k.div_ceil(self.group)
    }

    /// Values of row `i` set aside in float: `(column, what its int8 slot misses)`.
    #[inline]
    pub fn row_outliers(&self, i: usize) -> &[(u32, f32)] {
        &self.outliers[self.outlier_start[i]..self.outlier_start[i + 1]]
    }

    /// Number of values set aside in float, all rows together.
    pub fn outlier_count(&self) -> usize {
        self.outliers.len()
    }

    /// The zero point `za` shared by every row (0 when symmetric).
    pub fn zero_point(&self) -> i32 {
        self.zero_point
    }

    /// Whether the rows carry offsets (affine: `x ≈ sa·q + o`).
    pub fn is_affine(&self) -> bool {
        !self.offsets.is_empty()
    }

    /// The offsets of row `i`, one per group (empty when symmetric).
    #[inline]
    pub fn row_offsets(&self, i: usize) -> &[f32] {
        let g = self.groups();
        self.offsets.get(i * g..(i + 1) * g).unwrap_or_default()
    }

    /// The `K` quantized values of row `i`.
    #[inline]
    pub fn row(&self, i: usize) -> &[i8] {
        &self.data[i * self.stride..i * self.stride + self.k]
    }

    /// Row `i` with its zero padding.
    #[inline]
    pub fn padded_row(&self, i: usize) -> &[i8] {
        &self.data[i * self.stride..(i + 1) * self.stride]
    }

    /// All padded rows, `M × padded stride` bytes.
    pub fn padded_data(&self) -> &[i8] {
        &self.data
    }

    /// The scales of row `i`, one per group.
    #[inline]
    pub fn row_scales(&self, i: usize) -> &[f32] {
        let g = self.groups();
        &self.scales[i * g..(i + 1) * g]
    }
}

/// Input values from which a quantizer splits its rows over the kernel team (a prompt's or a
/// batch's, not a decoding step's).
const PARALLEL_MIN_VALUES: usize = 1 << 15;

/// Float values set aside, all rows' in row order, and where each row's begin (`rows + 1`).
type SetAside = (Vec<(u32, f32)>, Vec<usize>);

/// Runs `quantize(x, data, scales, outliers, ends)` on pieces of whole rows — `K` inputs,
/// `stride` bytes and `groups` scales each — on the kernel team when the input is large; each
/// piece appends its rows' float outliers and, per row, how many it has set aside so far. The
/// pieces' outliers are then joined in row order.
/// Where the dynamic quantizer's rows come from.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// Rows of `k` values.
    Rows(&'a [f32]),
    /// SwiGLU's `silu(gate) · up`, row by row from the two.
    SwiGlu(&'a [f32], &'a [f32]),
    /// Exact GELU of rows of `k` values, row by row.
    Gelu(&'a [f32]),
}

impl<'a> Source<'a> {
    /// Rows `rows` of `k` values.
    fn rows(self, rows: Range<usize>, k: usize) -> Source<'a> {
        let at = rows.start * k..rows.end * k;
        match self {
            Source::Rows(x) => Source::Rows(&x[at]),
            Source::SwiGlu(gate, up) => Source::SwiGlu(&gate[at.clone()], &up[at]),
            Source::Gelu(x) => Source::Gelu(&x[at]),
        }
    }

    /// Row `i` of `k` values: borrowed, or computed into `scratch` (`k` values).
    fn row<'s>(self, i: usize, k: usize, kernels: &super::Kernels, scratch: &'s mut [f32]) -> &'s [f32]
    where
        'a: 's,
    {
        match self {
            Source::Rows(x) => &x[i * k..(i + 1) * k],
            Source::SwiGlu(gate, up) => {
                let (g, u) = (&gate[i * k..(i + 1) * k], &up[i * k..(i + 1) * k]);
                if !kernels.silu_mul(g, u, super::as_unfilled(scratch)) {
                    scratch.iter_mut().zip(g.iter().zip(u)).for_each(|(o, (&g, &u))| *o = super::silu_scalar(g) * u);
                }
                scratch
            }
            Source::Gelu(x) => {
                scratch.copy_from_slice(&x[i * k..(i + 1) * k]);
                if !kernels.gelu_erf(scratch) {
                    scratch.iter_mut().for_each(|v| *v = super::gelu_erf_scalar(*v));
                }
                scratch
            }
        }
    }
}

/// A piece of rows for the dynamic quantizer and where its results go.
struct RowPiece<'a> {
    x: Source<'a>,
    k: usize,
    group: usize,
    stride: usize,
    /// Values with `|x|` above it are set aside in float.
    limit: f32,
    data: &'a mut [i8],
    scales: &'a mut [f32],
    outliers: &'a mut Vec<(u32, f32)>,
    ends: &'a mut Vec<usize>,
}

/// [`quantize_dynamic_rows`] compiled for AVX2: the per-group loops between the kernel calls
/// (scales, reciprocals, outlier groups) run eight groups per instruction.
///
/// # Safety
/// AVX2+FMA+F16C available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_dynamic_rows_avx2(kernels: &super::Kernels, rows: RowPiece) -> Result<()> {
    quantize_dynamic_rows(kernels, rows)
}

/// Dynamic symmetric quantization of a piece of rows: three passes over each row, each one
/// kernel call or one plain loop: max |x| of every group, then the scales and their reciprocals
/// (the divisions of all groups side by side), then the values; groups holding values above
/// the limit then set those aside in float.
#[inline(always)]
fn quantize_dynamic_rows(kernels: &super::Kernels, p: RowPiece) -> Result<()> {
    let RowPiece { x, k, group, stride, limit, data, scales, outliers, ends } = p;
    let groups = k.div_ceil(group);
    let (mut inv, mut outlier_groups) = (vec![0f32; groups], Vec::new());
    let one_pass = group == 32 && k.is_multiple_of(32);
    let mut scratch = match x {
        Source::Rows(_) => Vec::new(),
        Source::SwiGlu(..) | Source::Gelu(_) => vec![0f32; k],
    };
    for (i, (qr, sr)) in data.chunks_mut(stride).zip(scales.chunks_mut(groups)).enumerate() {
        let xr = x.row(i, k, kernels, &mut scratch);
        outlier_groups.clear();
        let scale_of = |m: f32| QSpec::DYNAMIC_ACTIVATION.scale_zero_point_unchecked(-m, m).0;
        let fused = if one_pass { kernels.quantize_row_groups32(xr, limit, sr, qr, &mut outlier_groups) } else { None };
        if let Some(finite) = fused {
            // Groups of 32 in one pass; the groups holding outliers are quantized here.
            if !finite {
                bail!("activation row contains a non-finite value (NaN or ±Inf)")
            }
            for &g in &outlier_groups {
                let run = g * group..(g + 1) * group;
                sr[g] = scale_of(abs_max_within(&xr[run.clone()], limit));
                kernels.quantize_groups(&xr[run.clone()], group, &[1.0 / sr[g]], &mut qr[run]);
            }
        } else {
            if !kernels.group_abs_max(xr, group, sr) {
                bail!("activation row contains a non-finite value (NaN or ±Inf)")
            }
            for (g, s) in sr.iter_mut().enumerate() {
                // Rare: the group holds outliers; they stay in float and leave the scale.
                if *s > limit {
                    outlier_groups.push(g);
                    *s = abs_max_within(&xr[g * group..(g * group + group).min(k)], limit);
                }
            }
            for (s, inv) in sr.iter_mut().zip(inv.iter_mut()) {
                *s = scale_of(*s);
                *inv = 1.0 / *s;
            }
            kernels.quantize_groups(xr, group, &inv, qr);
        }
        for &g in &outlier_groups {
            let run = g * group..((g + 1) * group).min(k);
            set_aside_above(limit, &xr[run.clone()], run.start, &mut qr[run], outliers);
        }
        ends.push(outliers.len());
    }
    Ok(())
}

/// [`quantize_affine_rows`] compiled for AVX2.
///
/// # Safety
/// AVX2+FMA+F16C available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_affine_rows_avx2(kernels: &super::Kernels, rows: RowPiece) -> Result<()> {
    quantize_affine_rows(kernels, rows)
}

/// Dynamic affine quantization of a piece of rows ([`QuantizedActivations::quantize_dynamic_affine`]):
/// per group, the range of the values within the limit, then `q = round((x − lo)·inv) − 128`;
/// `scales` takes `[sa, o]` per group. Vectorised on x86 (`x86::affine_range`,
/// `x86::quantize_affine`), the same bits on every path.
#[inline(always)]
fn quantize_affine_rows(kernels: &super::Kernels, p: RowPiece) -> Result<()> {
    let RowPiece { x, k, group, stride, limit, data, scales, outliers, ends } = p;
    let groups = k.div_ceil(group);
    let mut scratch = match x {
        Source::Rows(_) => Vec::new(),
        Source::SwiGlu(..) | Source::Gelu(_) => vec![0f32; k],
    };
    #[cfg(target_arch = "x86_64")]
    let simd = kernels.isa() != Isa::Reference;
    #[cfg(not(target_arch = "x86_64"))]
    let simd = false;
    let mut beyond = Vec::new();
    for (i, (qr, sr)) in data.chunks_mut(stride).zip(scales.chunks_mut(2 * groups)).enumerate() {
        let xr = x.row(i, k, kernels, &mut scratch);
        beyond.clear();
        if simd && group == 32 && k.is_multiple_of(32) {
            // SAFETY: every x86 path but the portable one has AVX2+FMA+F16C; sr holds 2 values
            // per group and qr a padded row.
            #[cfg(target_arch = "x86_64")]
            if !unsafe { super::x86::quantize_row_affine32(xr, limit, sr, qr, &mut beyond) } {
                bail!("activation row contains a non-finite value (NaN or ±Inf)")
            }
        } else {
            for (g, ((xg, qg), so)) in xr.chunks(group).zip(qr.chunks_mut(group)).zip(sr.chunks_mut(2)).enumerate() {
                let vector = simd && xg.len().is_multiple_of(8);
                let (lo, hi, finite, out_of_range) = affine_range(vector, xg, limit);
                if !finite {
                    bail!("activation row contains a non-finite value (NaN or ±Inf)")
                }
                let (lo, sa, inv, offset) = affine_params(lo, hi);
                quantize_affine(vector, xg, lo, inv, qg);
                (so[0], so[1]) = (sa, offset);
                if out_of_range {
                    beyond.push(g);
                }
            }
        }
        for &g in &beyond {
            // What the slot (-128, the value sa·(-128) + o) misses is multiplied in float.
            let run = g * group..((g + 1) * group).min(k);
            let slot = sr[2 * g] * -128.0 + sr[2 * g + 1];
            for (c, (q, &v)) in qr[run.clone()].iter_mut().zip(&xr[run.clone()]).enumerate() {
                if v.abs() > limit {
                    *q = -128;
                    outliers.push(((run.start + c) as u32, v - slot));
                }
            }
        }
        ends.push(outliers.len());
    }
    Ok(())
}

/// [`range_within`], vectorised where `vector` (x86 paths with AVX2, runs of whole 8s).
#[inline(always)]
fn affine_range(vector: bool, xg: &[f32], limit: f32) -> (f32, f32, bool, bool) {
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: `vector` only on x86 paths with AVX2+FMA+F16C; the length is a multiple of 8.
        return unsafe { super::x86::affine_range(xg, limit) };
    }
    let _ = vector;
    range_within(xg, limit)
}

/// [`affine_value`] of every value of `xg` into `qg`, vectorised where `vector` (as above; the
/// values finite).
#[inline(always)]
fn quantize_affine(vector: bool, xg: &[f32], lo: f32, inv: f32, qg: &mut [i8]) {
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: as in affine_range; qg is as long as xg and the values are finite.
        return unsafe { super::x86::quantize_affine(xg, lo, inv, qg) };
    }
    let _ = vector;
    qg.iter_mut().zip(xg).for_each(|(q, &v)| *q = affine_value(v, lo, inv));
}

/// `(lo, sa, inv, o)` of a group whose values within the limit span `[lo, hi]` (`lo > hi`: none,
/// taken as `[0, 0]`): `sa = (hi − lo) / 255`, `inv = 1 / sa` (0 when `sa` is), `o = lo + 128·sa`.
#[inline(always)]
pub(super) fn affine_params(lo: f32, hi: f32) -> (f32, f32, f32, f32) {
    let (lo, hi) = if lo <= hi { (lo, hi) } else { (0.0, 0.0) };
    let sa = (hi - lo) / 255.0;
    let inv = if sa > 0.0 { 1.0 / sa } else { 0.0 };
    (lo, sa, inv, lo + 128.0 * sa)
}

/// One affine value: `round_half_even(clamp((x − lo) · inv, 0, 255)) − 128`.
#[inline(always)]
pub(super) fn affine_value(x: f32, lo: f32, inv: f32) -> i8 {
    (((x - lo) * inv).round_ties_even().clamp(0.0, 255.0) as i32 - 128) as i8
}

/// `(lo, hi, finite, beyond)` of a run: the least and greatest of its values with `|x| ≤ limit`
/// (`lo > hi` when there is none), whether every value is finite, and whether any is beyond
/// the limit. Eight lanes side by side (minima and maxima do not depend on the order).
#[inline(always)]
fn range_within(xg: &[f32], limit: f32) -> (f32, f32, bool, bool) {
    let (mut lo, mut hi, mut bad, mut beyond) = ([f32::INFINITY; 8], [f32::NEG_INFINITY; 8], [false; 8], [false; 8]);
    let chunks = xg.chunks_exact(8);
    let tail = chunks.remainder();
    let mut lane = |l: usize, v: f32| {
        let within = v.abs() <= limit;
        bad[l] |= !v.is_finite();
        beyond[l] |= !within;
        lo[l] = if within && v < lo[l] { v } else { lo[l] };
        hi[l] = if within && v > hi[l] { v } else { hi[l] };
    };
    for c in chunks {
        for (l, &v) in c.iter().enumerate() {
            lane(l, v);
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        lane(l, v);
    }
    let lo = lo.into_iter().fold(f32::INFINITY, |m, v| if v < m { v } else { m });
    let hi = hi.into_iter().fold(f32::NEG_INFINITY, |m, v| if v > m { v } else { m });
    (lo, hi, !bad.contains(&true), beyond.contains(&true))
}

/// Quantizes `m` rows of `k` values into rows of `stride` bytes, `quantize(rows, data, scales,
/// outliers, ends)` on pieces of whole rows, one per thread of the kernel team. Returns the
/// data, the set-aside values of all rows in order, and where each row's set-aside values begin.
fn over_row_pieces(
    m: usize,
    k: usize,
    stride: usize,
    scales: &mut [f32],
    groups: usize,
    quantize: impl Fn(Range<usize>, &mut [i8], &mut [f32], &mut Vec<(u32, f32)>, &mut Vec<usize>) -> Result<()> + Sync,
) -> Result<(Vec<i8>, SetAside)> {
    let threads = super::team::team_threads(m * k >= PARALLEL_MIN_VALUES).min(m.max(1));
    let rows = m.div_ceil(threads).max(1);
    let mut scale_pieces = scales.chunks_mut((rows * groups).max(1));
    // The rows' memory is zeroed by the task that quantizes them (padding stays zero), in
    // parallel and just before it is written, not in one serial pass beforehand.
    let mut data = Vec::with_capacity(m * stride);
    let pieces: Vec<_> = data.spare_capacity_mut()[..m * stride]
        .chunks_mut(rows * stride)
        .enumerate()
        .map(|(p, data)| {
            let range = p * rows..(p * rows + data.len() / stride.max(1)).min(m);
            std::sync::Mutex::new((range, data, scale_pieces.next().unwrap_or_default(), Vec::new(), Vec::with_capacity(rows), not_run()))
        })
        .collect();
    super::team::run(pieces.len(), threads, &|p| {
        // Each task locks only its own piece; a panic poisons that piece alone and team::run
        // re-raises it once every task has finished.
        if let Ok(mut piece) = pieces[p].lock() {
            let (range, data, scales, outliers, ends, result) = &mut *piece;
            data.fill(std::mem::MaybeUninit::new(0));
            // SAFETY: every value was just initialised; MaybeUninit<i8> and i8 share their layout.
            let data = unsafe { &mut *(std::ptr::from_mut::<[std::mem::MaybeUninit<i8>]>(*data) as *mut [i8]) };
            *result = quantize(range.clone(), data, scales, outliers, ends);
        }
    });
    let (mut outliers, mut starts) = (Vec::new(), vec![0]);
    for piece in pieces {
        let (_, _, _, piece_outliers, ends, result) =
            piece.into_inner().map_err(|_| candle_core::Error::Msg("activation quantizer: a piece of rows panicked".into()))?;
        result?;
        starts.extend(ends.iter().map(|e| outliers.len() + e));
        outliers.extend(piece_outliers);
    }
    // SAFETY: the pieces cover all m·stride values, and each task zeroed its piece first: a
    // piece whose task did not run keeps the error it started with, returned above.
    unsafe { data.set_len(m * stride) };
    Ok((data, (outliers, starts)))
}

fn not_run() -> Result<()> {
    Err(candle_core::Error::Msg("activation quantizer: a piece of rows was not quantized".into()))
}

/// Sets the values of a quantized group with `|x| > limit` aside in float as `(column, value)`,
/// their int8 slots zeroed; `first` is the group's column.
/// Eight values at a time: a run of eight without one costs a vector compare, not eight branches.
fn set_aside_above(limit: f32, xg: &[f32], first: usize, qg: &mut [i8], outliers: &mut Vec<(u32, f32)>) {
    for (run, (qs, xs)) in qg.chunks_mut(8).zip(xg.chunks(8)).enumerate() {
        if !xs.iter().fold(false, |hit, v| hit | (v.abs() > limit)) {
            continue;
        }
        for (c, (q, &v)) in qs.iter_mut().zip(xs).enumerate() {
            if v.abs() > limit {
                *q = 0;
                outliers.push(((first + 8 * run + c) as u32, v));
            }
        }
    }
}

/// The largest `|x|` of `xg` that is not above `limit` (0 if none); `xg` finite. Eight lanes of
/// maxima side by side (the maximum does not depend on the order).
fn abs_max_within(xg: &[f32], limit: f32) -> f32 {
    let (mut lanes, chunks) = ([0f32; 8], xg.chunks_exact(8));
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            let a = if v.abs() <= limit { v.abs() } else { 0.0 };
            *m = if a > *m { a } else { *m };
        }
    }
    tail.iter().map(|v| v.abs()).chain(lanes).fold(0f32, |m, a| if a <= limit && a > m { a } else { m })
}

fn check_dims(x: &[f32], m: usize, k: usize) -> Result<()> {
    if x.len() != m * k || k == 0 {
        bail!("activations: {} values do not form {m} rows of {k}", x.len())
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SwiGLU's product (and GELU) quantized row by row as it is computed gives the bits, scales
    /// and float outliers of quantizing `silu_mul`'s (`gelu_erf`'s) output: rows of whole groups of 32 and not, one piece
    /// and many (over the kernel team), outliers above a threshold and none.
    #[test]
    fn swiglu_rows_quantize_like_the_written_product() -> Result<()> {
        let wave = |len: usize, f: f32, a: f32| (0..len).map(|i| (i as f32 * f).sin() * a * (1 + i % 5) as f32).collect::<Vec<f32>>();
        let quantize = |x: &[f32], m, k, threshold, affine: bool| {
            if affine {
                QuantizedActivations::quantize_dynamic_affine(x, m, k, 32, threshold)
            } else {
                QuantizedActivations::quantize_dynamic(x, m, k, 32, threshold)
            }
        };
        for ((m, k, threshold), affine) in
            [(3, 96, Some(2.0)), (70, 600, Some(3.0)), (5, 40, None)].into_iter().flat_map(|c| [(c, false), (c, true)])
        {
            let (gate, up) = (wave(m * k, 0.71, 2.0), wave(m * k, 0.23, 1.5));
            let mut product = vec![0f32; m * k];
            super::super::silu_mul(&gate, &up, &mut product)?;
            let want = quantize(&product, m, k, threshold, affine)?;
            let got = QuantizedActivations::quantize_dynamic_swiglu(&gate, &up, m, k, 32, threshold, affine)?;
            let mut activated = gate.clone();
            super::super::gelu_erf(&mut activated);
            let want_gelu = quantize(&activated, m, k, threshold, affine)?;
            let got_gelu = QuantizedActivations::quantize_dynamic_gelu(&gate, m, k, 32, threshold, affine)?;
            for (what, got, want) in [("swiglu", &got, &want), ("gelu", &got_gelu, &want_gelu)] {
                for i in 0..m {
                    assert_eq!(got.row(i), want.row(i), "{what} {m}×{k} affine {affine} row {i}");
                    assert_eq!(got.row_scales(i), want.row_scales(i), "{what} {m}×{k} affine {affine} row {i}");
                    assert_eq!(got.row_offsets(i), want.row_offsets(i), "{what} {m}×{k} affine {affine} row {i}");
                    assert_eq!(got.row_outliers(i), want.row_outliers(i), "{what} {m}×{k} affine {affine} row {i}");
                }
            }
        }
        assert!(QuantizedActivations::quantize_dynamic_swiglu(&[1.0; 8], &[1.0; 7], 1, 8, 32, None, true).is_err());
        Ok(())
    }
}
