//! What the SIMD paths' register tiles share, whatever the instruction set: the operands of
//! one int8 linear, how a padded row splits into segments, and where a tile's results go.

use super::{PackedInt8Weights, QuantizedActivations, BLOCK_ROWS};
use std::ops::Range;

/// Everything one int8 linear call shares between its tiles.
pub struct Int8Operands<'a> {
    pub acts: &'a QuantizedActivations,
    /// `|a|` of every padded activation row, laid out like them — the unsigned operand of
    /// AVX2's `vpmaddubsw`; empty for the other paths.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub abs: &'a [u8],
    /// `0xff` where the padded activation is negative, else 0, laid out like them: the mask
    /// AVX2's `vpmaddubsw` tiles flip the weights' bits with; empty for the other paths.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub neg_mask: &'a [u8],
    /// Where the x86 tiles start each segment sum, per row `i` and segment `g`
    /// (`[M][segments]`): `−128·Σ_{k∈g} a[i,k]` for the `vpdpbusd` tiles (fed `w + 128`),
    /// `−Σ_{k∈g, a<0} a[i,k]` for the `vpmaddubsw` tiles (fed `!w` where `a < 0`), which their
    /// byte products then cancel; empty for the other paths.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub shift_terms: &'a [i32],
    pub weights: &'a PackedInt8Weights,
    /// Input channels per segment: `K`, or a multiple of 4 that is the activation and/or
    /// weight group size.
    pub seg: usize,
    /// A bias the tiles add to each output as they store it, after everything else (so the
    /// output is the same float as adding it afterwards): `8·blocks` values, zeros past `N`.
    /// `None`: no bias, or the caller adds it.
    pub bias: Option<&'a [f32]>,
    /// Affine activations whose offsets the tiles add, per segment:
    /// `y += o[i,g] · sw[n,g] · S[n,g]` ([`super::linear::offsets_in_tiles`]).
    pub offsets: bool,
}

impl Int8Operands<'_> {
    /// `(segments, quads per segment)`.
    pub(super) fn segments(&self) -> (usize, usize) {
        segments(self.acts.cols(), self.weights.padded_in_features(), self.seg)
    }

    /// Rows `i0..i0+R`: their padded `i8` data and their scales.
    #[inline]
    pub(super) fn row_pointers<const R: usize>(&self, i0: usize) -> ([*const i8; R], [*const f32; R]) {
        (std::array::from_fn(|r| self.acts.padded_row(i0 + r).as_ptr()), std::array::from_fn(|r| self.acts.row_scales(i0 + r).as_ptr()))
    }

    /// With `offsets`, rows `i0..i0+R`'s offsets and blocks `b0..b0+V`'s weight sums per group;
    /// null otherwise (never read then, and symmetric layers never make the sums).
    #[inline]
    pub(super) fn offset_pointers<const R: usize, const V: usize>(&self, i0: usize, b0: usize) -> ([*const f32; R], [*const i16; V]) {
        if !self.offsets {
            return ([std::ptr::null(); R], [std::ptr::null(); V]);
        }
        (
            std::array::from_fn(|r| self.acts.row_offsets(i0 + r).as_ptr()),
            std::array::from_fn(|v| self.weights.block_group_sums(b0 + v).as_ptr()),
        )
    }

    /// Blocks `b0..b0+V`: their packed weights and their scales.
    #[inline]
    pub(super) fn block_pointers<const V: usize>(&self, b0: usize) -> ([*const i8; V], [*const half::f16; V]) {
        (std::array::from_fn(|v| self.weights.block(b0 + v).as_ptr()), std::array::from_fn(|v| self.weights.block_scales(b0 + v).as_ptr()))
    }

    /// `(activation scale step, weight scale step)` per segment: 1 for the grouped side(s),
    /// 0 for a side with one scale per row.
    pub(super) fn scale_steps(&self) -> (usize, usize) {
        ((self.acts.groups() > 1) as usize, (self.weights.groups() > 1) as usize)
    }
}

/// `(segments, quads per segment)` for rows of `k` values padded to `stride` bytes, walked in
/// segments of `seg` values (`seg >= k`: one segment covering the padded row).
pub(super) fn segments(k: usize, stride: usize, seg: usize) -> (usize, usize) {
    if seg >= k {
        (1, stride / 4)
    } else {
        (k.div_ceil(seg), seg / 4)
    }
}

/// Walks the weight-only tiles of `blocks` for `m` float rows: `tile(rows, i, b, at)` with
/// `rows` 4 while four rows are left, else 1, and `at` the tile's first output in `out`.
pub(super) fn weight_only_tiles(m: usize, blocks: Range<usize>, out: BlockOutputs, mut tile: impl FnMut(usize, usize, usize, *mut f32)) {
    for b in blocks.clone() {
        let mut i = 0;
        while i < m {
            let rows = if m - i >= 4 { 4 } else { 1 };
            tile(rows, i, b, out.at(i, b - blocks.start));
            i += rows;
        }
    }
}

/// Where the outputs of a run of weight blocks go: row `i`'s eight outputs of the run's `b`-th
/// block are the floats at `ptr + i·row_len + 8·b`. Either the run's own columns of the whole
/// `M × N` output, written in place (`row_len = N`; the tasks of one call own disjoint columns),
/// or a scratch buffer of the run's own (`row_len = 8·blocks`).
#[derive(Clone, Copy)]
pub struct BlockOutputs {
    ptr: *mut f32,
    row_len: usize,
}

// SAFETY: a `BlockOutputs` is an address; what may be written through it, and by which thread,
// is the contract of the unsafe methods and of the kernels that take one.
unsafe impl Send for BlockOutputs {}
// SAFETY: as above.
unsafe impl Sync for BlockOutputs {}

impl BlockOutputs {
    /// Outputs at `ptr` with rows `row_len` floats apart (nothing is accessed here).
    pub fn new(ptr: *mut f32, row_len: usize) -> Self {
        Self { ptr, row_len }
    }

    /// The outputs of the run's blocks from its `b`-th on (a run starting `b` blocks later).
    pub fn skip_blocks(self, b: usize) -> Self {
        Self { ptr: self.ptr.wrapping_add(BLOCK_ROWS * b), ..self }
    }

    pub fn row_len(self) -> usize {
        self.row_len
    }

    /// The address of row `i`'s first output of the run's `b`-th block.
    pub fn at(self, i: usize, b: usize) -> *mut f32 {
        self.ptr.wrapping_add(i * self.row_len + BLOCK_ROWS * b)
    }

    /// Writes row `i`'s output `col` (counted from the run's first).
    ///
    /// # Safety
    /// It is writable, and no reference to it is alive.
    pub unsafe fn write(self, i: usize, col: usize, value: f32) {
        // SAFETY: the caller's contract.
        unsafe { self.at(i, 0).add(col).write(value) }
    }

    /// Row `i`'s first `width` outputs (once written).
    ///
    /// # Safety
    /// They are writable, and no other reference to them is alive while this one is.
    pub unsafe fn row<'a>(self, i: usize, width: usize) -> &'a mut [f32] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.at(i, 0), width) }
    }
}

/// Where a tile's results go: fused `f32` outputs (`out` points at row `i0`'s outputs of block
/// `b0`, rows `row_len` apart), or — for exactness tests — every segment's raw `i32` sum
/// into `sums[((i·N_pad) + n)·segments + g]` (`N_pad = 8·blocks`).
#[derive(Clone, Copy)]
pub(super) struct Sink {
    pub out: *mut f32,
    pub row_len: usize,
    pub sums: *mut i32,
}

impl Sink {
    /// Fused outputs into `out`.
    pub fn outputs(out: BlockOutputs) -> Sink {
        Sink { out: out.ptr, row_len: out.row_len, sums: std::ptr::null_mut() }
    }

    /// Raw segment sums into `sums`.
    pub fn sums(sums: &mut [i32]) -> Sink {
        Sink { out: std::ptr::null_mut(), row_len: 0, sums: sums.as_mut_ptr() }
    }

    /// The sink for a tile whose first row is `i` and whose first block is the `b`-th of the
    /// buffer (no access happens here, so a null `out` stays harmless).
    pub fn at(self, i: usize, b: usize) -> Sink {
        Sink { out: self.out.wrapping_add(i * self.row_len + BLOCK_ROWS * b), ..self }
    }

    /// Writes segment `g`'s eight lane sums of activation row `i` and weight block `b`.
    ///
    /// # Safety
    /// `sums` holds `M · N_pad · segments` values, with `i`, `b` and `g` within them.
    pub unsafe fn put_sums(self, op: &Int8Operands, i: usize, b: usize, g: usize, lanes: &[i32; BLOCK_ROWS]) {
        let (n_pad, segs) = (op.weights.blocks() * BLOCK_ROWS, op.segments().0);
        for (l, &s) in lanes.iter().enumerate() {
            // SAFETY: in bounds by the caller's contract.
            unsafe { *self.sums.add(((i * n_pad) + b * BLOCK_ROWS + l) * segs + g) = s };
        }
    }
}
