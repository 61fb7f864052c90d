//! aarch64 NEON kernels over the block layout of [`PackedInt8Weights`].
//!
//! A weight quad (32 bytes: four input channels of eight output channels, byte `4r + t` =
//! `w[8b + r, 4q + t]`) is two 128-bit registers, channels 0–3 and 4–7. With the dot-product
//! extension (`FEAT_DotProd`: Apple M1 on, Graviton 2 on, Cortex-A55/A76 on) one `sdot` per
//! register multiplies each channel's four bytes by the row's four activations (broadcast as
//! one 32-bit word) and adds the sum to that channel's `i32` lane: signed × signed, exact, no
//! saturation to guard against. Without it, `smull` gives `i16` products (|a·w| ≤ 128·127 fits)
//! and `sadalp` adds neighbouring pairs into `i32` lanes — two lanes per channel, folded with
//! `addp` at the end of each segment.
//!
//! Tiles are `R` activation rows × `V` blocks (eight outputs each); per segment the lanes are
//! converted once and scaled by `sa[m,g] · sw[n,g]`, as on x86 (`x86.rs`), and float outliers
//! are added inside the tile with the weight quad sign-extended lane-wise.
//!
//! Int4 blocks hold a pair of quads in the same 32 bytes, quad `2p` in the low nibbles and
//! `2p + 1` in the high ones: masking (`and 15`) or shifting (`ushr 4`) and taking the zero
//! point off gives each quad as the two signed-byte registers an int8 quad is, and the same
//! multiply follows (`|u − z| ≤ 15`).

// Register tiles are indexed by row and block on purpose: the loops mirror the tile's shape.
#![allow(clippy::needless_range_loop)]

use super::tiles::{segments, weight_only_tiles, BlockOutputs, Int8Operands, Sink};
use super::{PackedInt8Weights, BLOCK_ROWS};
use half::f16;
use std::arch::aarch64::*;
use std::arch::asm;
use std::ops::Range;

/// Whether this CPU has the dot-product extension (`sdot`).
pub fn dotprod_available() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// `acc[l] += Σ_{t<4} a[4l + t] · b[4l + t]` (`sdot`; Rust's `vdotq_s32` is not stable yet).
///
/// # Safety
/// The CPU has the dot-product extension.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: register-only instruction; dotprod is enabled for this function.
    unsafe {
        asm!("sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b", acc = inout(vreg) acc, a = in(vreg) a, b = in(vreg) b,
         options(pure, nomem, nostack, preserves_flags))
    };
    acc
}

/// Eight output lanes of one (row, block) pair being summed: `DOT` uses `lanes[0..2]` (channels
/// 0–3, 4–7); without it each channel has two neighbouring lanes in `lanes[0..4]`.
type Lanes = [int32x4_t; 4];

/// Adds one quad's products: `w` the block's two weight registers, `a` the row's four
/// activations broadcast to every 32-bit lane.
///
/// # Safety
/// NEON; with `DOT`, the dot-product extension.
#[inline(always)]
unsafe fn multiply_add<const DOT: bool>(acc: &mut Lanes, w: [int8x16_t; 2], a: int8x16_t) {
    if DOT {
        // SAFETY: `sdot` needs the dot-product extension, which DOT promises (the contract).
        acc[0] = unsafe { sdot(acc[0], w[0], a) };
        // SAFETY: as above.
        acc[1] = unsafe { sdot(acc[1], w[1], a) };
    } else {
        // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
        let a8 = unsafe { vget_low_s8(a) };
        for h in 0..2 {
            // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
            acc[2 * h] = unsafe { vpadalq_s16(acc[2 * h], vmull_s8(vget_low_s8(w[h]), a8)) };
            // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
            acc[2 * h + 1] = unsafe { vpadalq_s16(acc[2 * h + 1], vmull_high_s8(w[h], a)) };
        }
    }
}

/// Adds quad `q` of rows `a` times each block's weight registers `wv` to the tile's lanes.
///
/// # Safety
/// NEON (and the dot-product extension with `DOT`); every row holds quad `q`'s four bytes.
#[inline(always)]
unsafe fn add_quad<const R: usize, const V: usize, const DOT: bool>(
    acc: &mut [[Lanes; V]; R],
    a: &[*const i8; R],
    q: usize,
    wv: &[[int8x16_t; 2]; V],
) {
    for r in 0..R {
        // SAFETY: the row holds quad q (caller).
        let word = unsafe { (a[r].add(4 * q) as *const i32).read_unaligned() };
        // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
        let act = unsafe { vreinterpretq_s8_s32(vdupq_n_s32(word)) };
        for v in 0..V {
            // SAFETY: with DOT the caller vouches for the dot-product extension.
            unsafe { multiply_add::<DOT>(&mut acc[r][v], wv[v], act) };
        }
    }
}

/// The eight channels' sums, channels 0–3 and 4–7.
#[inline(always)]
unsafe fn channel_sums<const DOT: bool>(acc: &Lanes) -> [int32x4_t; 2] {
    if DOT {
        [acc[0], acc[1]]
    } else {
        // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
        [unsafe { vpaddq_s32(acc[0], acc[1]) }, unsafe { vpaddq_s32(acc[2], acc[3]) }]
    }
}

/// Four `f16` weight scales widened to `f32` (`fcvtl`, base AArch64; Rust's `f16` vector
/// intrinsics are not stable yet).
///
/// # Safety
/// `p` points at four readable scales.
#[inline(always)]
unsafe fn load_scales(p: *const f16) -> float32x4_t {
    // SAFETY: four f16 are 8 readable bytes (caller).
    let h = unsafe { vld1_u16(p as *const u16) };
    let out: float32x4_t;
    // SAFETY: register-only instruction of the base instruction set.
    unsafe { asm!("fcvtl {out:v}.4s, {h:v}.4h", out = out(vreg) out, h = in(vreg) h, options(pure, nomem, nostack, preserves_flags)) };
    out
}

/// The zero points of one int4 block for one group as the bytes of two registers (channels
/// 0–3 and 4–7, each channel's in the four bytes of its lane); 8 everywhere when `zeros` is
/// null (symmetric weights).
///
/// # Safety
/// `zeros`, unless null, points at eight readable bytes.
#[inline(always)]
unsafe fn int4_zero_bytes(zeros: *const u8) -> [int8x16_t; 2] {
    if zeros.is_null() {
        // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
        return [unsafe { vdupq_n_s8(8) }; 2];
    }
    std::array::from_fn(|h| {
        // SAFETY: bytes 4h..4h + 4 of the eight (caller).
        let lanes: [u8; 16] = std::array::from_fn(|i| unsafe { *zeros.add(4 * h + i / 4) });
        // SAFETY: `lanes` is 16 readable bytes.
        unsafe { vreinterpretq_s8_u8(vld1q_u8(lanes.as_ptr())) }
    })
}

/// Quads `q` and `q + 1` (`q` even) of an int4 block as signed bytes `u − z`, each in the two
/// registers an int8 quad takes: the 32 bytes of pair `q/2`, low nibbles (quad `q`) and high
/// nibbles (quad `q + 1`).
///
/// # Safety
/// `block` points at an int4 block that holds quads `q` and `q + 1`.
#[inline(always)]
unsafe fn int4_quad_pair(block: *const i8, q: usize, z: [int8x16_t; 2]) -> [[int8x16_t; 2]; 2] {
    // SAFETY: pair q/2 is the 32 bytes at 16·q (caller); NEON register arithmetic otherwise.
    unsafe {
        let raw = [vld1q_u8(block.add(16 * q) as *const u8), vld1q_u8(block.add(16 * q + 16) as *const u8)];
        let low = vdupq_n_u8(15);
        [
            [0, 1].map(|h| vsubq_s8(vreinterpretq_s8_u8(vandq_u8(raw[h], low)), z[h])),
            [0, 1].map(|h| vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(raw[h])), z[h])),
        ]
    }
}

/// One `R × V` tile at activation row `i0` and weight block `b0`.
///
/// # Safety
/// NEON (and the dot-product extension with `DOT`); rows `i0..i0+R` and blocks `b0..b0+V`
/// exist; `op.seg` satisfies [`Int8Operands::seg`]'s rule; with `SUMS` false, `sink.out` has `R`
/// rows of `8·V` writable floats at stride `row_len`; with `SUMS` true, `sink.sums` holds
/// `M · N_pad · segments` values.
#[inline(always)]
unsafe fn tile<const R: usize, const V: usize, const SUMS: bool, const DOT: bool, const W4: bool>(
    op: &Int8Operands,
    i0: usize,
    b0: usize,
    sink: Sink,
) {
    let quads = op.weights.padded_in_features() / 4;
    let (segs, seg_quads) = op.segments();
    let (a_step, w_step) = op.scale_steps();
    let (a, sa) = op.row_pointers::<R>(i0);
    let (w, sw) = op.block_pointers::<V>(b0);
    // Values between a block's consecutive groups in the scales, zero points and sums.
    let ss: [usize; V] = std::array::from_fn(|v| op.weights.side_stride(b0 + v));
    let (ao, ws) = op.offset_pointers::<R, V>(i0, b0);
    // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
    let zero = unsafe { vdupq_n_s32(0) };
    // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
    let mut y = [[[unsafe { vdupq_n_f32(0.0) }; 2]; V]; R];
    // Int4: each block's zero points (null when symmetric).
    let zp: [*const u8; V] = std::array::from_fn(|v| {
        let z = op.weights.block_zero_points(b0 + v);
        if z.is_empty() {
            std::ptr::null()
        } else {
            z.as_ptr()
        }
    });
    // SAFETY: with zero points a block has 8 per group (group g's at ss[v]·g when grouped).
    let zeros_of = |v: usize, g: usize| unsafe { int4_zero_bytes(if zp[v].is_null() { zp[v] } else { zp[v].add(ss[v] * g) }) };
    for g in 0..segs {
        let mut acc = [[[zero; 4]; V]; R];
        let q_end = ((g + 1) * seg_quads).min(quads);
        if W4 {
            let z: [[int8x16_t; 2]; V] = std::array::from_fn(|v| zeros_of(v, g * w_step));
            // Segments are whole pairs of quads (the int4 group rule).
            for q in (g * seg_quads..q_end).step_by(2) {
                // SAFETY: an int4 block holds 16·quads bytes, pair q/2 at 16·q.
                let pairs: [[[int8x16_t; 2]; 2]; V] = std::array::from_fn(|v| unsafe { int4_quad_pair(w[v], q, z[v]) });
                for half in 0..2 {
                    // SAFETY: a padded row holds stride = 4·quads bytes (quads q and q + 1); DOT
                    // as the caller vouches.
                    unsafe { add_quad::<R, V, DOT>(&mut acc, &a, q + half, &std::array::from_fn(|v| pairs[v][half])) };
                }
            }
        } else {
            for q in g * seg_quads..q_end {
                // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
                let mut wv = [[unsafe { vdupq_n_s8(0) }; 2]; V];
                for v in 0..V {
                    // SAFETY: a block holds 8·stride = 32·quads bytes.
                    wv[v] = [unsafe { vld1q_s8(w[v].add(32 * q)) }, unsafe { vld1q_s8(w[v].add(32 * q + 16)) }];
                }
                // SAFETY: a padded row holds stride = 4·quads bytes; DOT as the caller vouches.
                unsafe { add_quad::<R, V, DOT>(&mut acc, &a, q, &wv) };
            }
        }
        for r in 0..R {
            for v in 0..V {
                // SAFETY: NEON register arithmetic only (channel_sums has no other requirement).
                let sums = unsafe { channel_sums::<DOT>(&acc[r][v]) };
                if SUMS {
                    let mut lanes = [0i32; BLOCK_ROWS];
                    // SAFETY: `lanes` holds 8 i32: the two stores write lanes 0–3 and 4–7.
                    unsafe { (vst1q_s32(lanes.as_mut_ptr(), sums[0]), vst1q_s32(lanes.as_mut_ptr().add(4), sums[1])) };
                    // SAFETY: the sums buffer holds M·N_pad·segs values (caller).
                    unsafe { sink.put_sums(op, i0 + r, b0 + v, g, &lanes) };
                } else {
                    // SAFETY: one activation scale per row or per segment; a block has 8
                    // scales per weight group (one group when w_step is 0).
                    let (s, scales) = unsafe { (*sa[r].add(g * a_step), sw[v].add(ss[v] * g * w_step)) };
                    for h in 0..2 {
                        // SAFETY: scales h·4..h·4 + 4 of the block's 8 for this group.
                        let scale = unsafe { vmulq_n_f32(load_scales(scales.add(4 * h)), s) };
                        // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
                        y[r][v][h] = unsafe { vfmaq_f32(y[r][v][h], vcvtq_f32_s32(sums[h]), scale) };
                    }
                    if op.offsets {
                        // Affine activations: y += o[i,g] · sw[n,g] · S[n,g] (offsets only where
                        // the segments are the weight groups, or one segment spans the row).
                        // SAFETY: with offsets each row has one offset per segment (or one), and
                        // a block 8 sums per group beside its scales.
                        let (o, group_sums) = unsafe { (*ao[r].add(g * a_step), ws[v].add(ss[v] * g * w_step)) };
                        for h in 0..2 {
                            // SAFETY: sums and scales h·4..h·4 + 4 of the group's 8.
                            let terms = unsafe {
                                vmulq_f32(load_scales(scales.add(4 * h)), vcvtq_f32_s32(vmovl_s16(vld1_s16(group_sums.add(4 * h)))))
                            };
                            // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
                            y[r][v][h] = unsafe { vfmaq_n_f32(y[r][v][h], terms, o) };
                        }
                    }
                }
            }
        }
    }
    if !SUMS {
        // Float outliers (LLM.int8()-style): y += x · q[n,c] · sw[n,c/group]. Byte c%4 of each
        // 32-bit lane is shifted to the top and arithmetic-shifted back down.
        for r in 0..R {
            for &(c, x) in op.acts.row_outliers(i0 + r) {
                let c = c as usize;
                // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
                let to_top = unsafe { vdupq_n_s32(24 - 8 * (c % 4) as i32) };
                let g = c / op.weights.group_size();
                for v in 0..V {
                    // SAFETY: c < K, so quad c/4 (and its pair) and group g exist in every block.
                    let int4 = W4.then(|| unsafe { int4_quad_pair(w[v], c / 8 * 2, zeros_of(v, g)) });
                    for h in 0..2 {
                        // SAFETY: c < K, so quad c/4 and group g exist in every block.
                        let quad = unsafe {
                            vreinterpretq_s32_s8(match int4 {
                                Some(pair) => pair[(c / 4) % 2][h],
                                None => vld1q_s8(w[v].add(32 * (c / 4) + 16 * h)),
                            })
                        };
                        // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
                        let q = unsafe { vshrq_n_s32::<24>(vshlq_s32(quad, to_top)) };
                        // SAFETY: group g's 8 scales exist in every block (c < K); half h of them.
                        let wf = unsafe { vmulq_f32(vcvtq_f32_s32(q), load_scales(sw[v].add(ss[v] * g + 4 * h))) };
                        // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
                        y[r][v][h] = unsafe { vfmaq_n_f32(y[r][v][h], wf, x) };
                    }
                }
            }
        }
        if let Some(bias) = op.bias {
            for v in 0..V {
                for h in 0..2 {
                    // SAFETY: the bias holds 8·blocks values (Int8Operands::bias).
                    let b = unsafe { vld1q_f32(bias.as_ptr().add(BLOCK_ROWS * (b0 + v) + 4 * h)) };
                    for r in 0..R {
                        // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
                        y[r][v][h] = unsafe { vaddq_f32(y[r][v][h], b) };
                    }
                }
            }
        }
        for r in 0..R {
            for v in 0..V {
                for h in 0..2 {
                    // SAFETY: the caller gives R rows of 8·V floats at stride row_len.
                    unsafe { vst1q_f32(sink.out.add(r * sink.row_len + BLOCK_ROWS * v + 4 * h), y[r][v][h]) };
                }
            }
        }
    }
}

/// Runs every row tile over blocks `blocks`. Shapes are chosen to keep accumulators, outputs
/// and operands within the 32 vector registers: with `sdot`, panels of 4 blocks for one row and
/// 4 rows × 1 block otherwise; without it (twice the accumulators), 1 × 2 and 2 × 1.
///
/// # Safety
/// As [`tile`], for every row and every block in `blocks`; `sink.out` (if used) is
/// `M × 8·blocks.len()` and points at its start.
#[inline(always)]
unsafe fn run_tiles<const SUMS: bool, const DOT: bool>(op: &Int8Operands, blocks: Range<usize>, sink: Sink) {
    if op.weights.bits() == 4 {
        // SAFETY: this function's contract, passed on.
        unsafe { run_tiles_of::<SUMS, DOT, true>(op, blocks, sink) }
    } else {
        // SAFETY: as above.
        unsafe { run_tiles_of::<SUMS, DOT, false>(op, blocks, sink) }
    }
}

/// [`run_tiles`] for int8 weights or (`W4`) int4 ones.
///
/// # Safety
/// As [`run_tiles`].
#[inline(always)]
unsafe fn run_tiles_of<const SUMS: bool, const DOT: bool, const W4: bool>(op: &Int8Operands, blocks: Range<usize>, sink: Sink) {
    let m = op.acts.rows();
    let (panel, rows) = match (DOT, m) {
        (true, 1) => (4, 1),
        (true, _) => (1, 4),
        (false, 1) => (2, 1),
        (false, _) => (1, 2),
    };
    let mut b = blocks.start;
    while b < blocks.end {
        let v = [4, 2, 1].into_iter().find(|&v| v <= panel && v <= blocks.end - b).unwrap_or(1);
        let mut i = 0;
        while i < m {
            let r = (m - i).min(rows);
            let at = sink.at(i, b - blocks.start);
            // SAFETY: rows i..i+r < M and blocks b..b+v ≤ blocks.end exist, `at` is row i, block b
            // of the sink; operands, segments and (with DOT) the extension are this function's
            // contract, which is tile's.
            unsafe {
                match (r, v) {
                    (1, 4) => tile::<1, 4, SUMS, DOT, W4>(op, i, b, at),
                    (1, 2) => tile::<1, 2, SUMS, DOT, W4>(op, i, b, at),
                    (1, _) => tile::<1, 1, SUMS, DOT, W4>(op, i, b, at),
                    (2, _) => tile::<2, 1, SUMS, DOT, W4>(op, i, b, at),
                    (3, _) => tile::<3, 1, SUMS, DOT, W4>(op, i, b, at),
                    _ => tile::<4, 1, SUMS, DOT, W4>(op, i, b, at),
                }
            }
            i += r;
        }
        b += v;
    }
}

/// The tiles with `sdot`, compiled where the extension is enabled.
///
/// # Safety
/// As [`run_tiles`]; the CPU has the dot-product extension.
#[target_feature(enable = "neon,dotprod")]
unsafe fn run_tiles_dot<const SUMS: bool>(op: &Int8Operands, blocks: Range<usize>, sink: Sink) {
    // SAFETY: run_tiles' contract is this function's, passed on; the dot-product extension it
    // then needs is enabled here (and present: the caller's contract).
    unsafe { run_tiles::<SUMS, true>(op, blocks, sink) }
}

/// `out[i, 8·(b − blocks.start) + l] = Σ_g sa[i,g] · sw[8b+l,g] · Σ_{k∈g} a[i,k]·w[8b+l,k]`
/// `+ Σ_outliers x[i,c] · ŵ[8b+l,c]` for every activation row `i` and every block `b` in
/// `blocks`; `dot` picks the `sdot` tiles.
///
/// # Safety
/// With `dot`, the CPU has the dot-product extension (see [`dotprod_available`]); `op.seg` is
/// `K` or a multiple of 4 matching the grouped side(s); `blocks` lies within the weights'
/// blocks; `out` has `M` writable rows of `8·blocks.len()` floats.
pub unsafe fn int8_blocks(op: &Int8Operands, dot: bool, blocks: Range<usize>, out: BlockOutputs) {
    let sink = Sink::outputs(out);
    // SAFETY: run_tiles' contract is this function's (its `out` as the sink); `dot` only where the
    // extension is present.
    unsafe {
        if dot {
            run_tiles_dot::<false>(op, blocks, sink)
        } else {
            run_tiles::<false, false>(op, blocks, sink)
        }
    }
}

/// The exact `i32` sum of every segment, `sums[((i·N_pad) + n)·segments + g]` — the quantities
/// [`int8_blocks`] rescales, computed by the very same tiles.
///
/// # Safety
/// As [`int8_blocks`] over all blocks; `sums` holds `M · 8·blocks · segments` values.
pub unsafe fn int8_segment_sums(op: &Int8Operands, dot: bool, sums: &mut [i32]) {
    let (blocks, sink) = (0..op.weights.blocks(), Sink::sums(sums));
    // SAFETY: run_tiles' contract over all blocks, `sums` sized for them (caller); `dot` only
    // where the extension is present.
    unsafe {
        if dot {
            run_tiles_dot::<true>(op, blocks, sink)
        } else {
            run_tiles::<true, false>(op, blocks, sink)
        }
    }
}

/// One weight quad, its two registers of signed bytes (channels 0–3, then 4–7, four inputs
/// each), widened to floats: entry `t` holds `w[8b + l, 4q + t]` for channels 0–3 (`[t][0]`)
/// and 4–7 (`[t][1]`). A table lookup turns each register's 4×4 (channel × input) bytes
/// around, then each run of four is sign-extended twice and converted.
#[inline(always)]
fn widen_quad(quad: [int8x16_t; 2]) -> [[float32x4_t; 2]; 4] {
    const TRANSPOSE: [u8; 16] = [0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15];
    // SAFETY: TRANSPOSE is 16 bytes, the one register loaded.
    let index = unsafe { vld1q_u8(TRANSPOSE.as_ptr()) };
    // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
    let mut out = [[unsafe { vdupq_n_f32(0.0) }; 2]; 4];
    for h in 0..2 {
        // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
        let v = unsafe { vqtbl1q_s8(quad[h], index) };
        // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
        let (lo, hi) = (unsafe { vmovl_s8(vget_low_s8(v)) }, unsafe { vmovl_high_s8(v) });
        // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
        out[0][h] = unsafe { vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))) };
        // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
        out[1][h] = unsafe { vcvtq_f32_s32(vmovl_high_s16(lo)) };
        // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
        out[2][h] = unsafe { vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))) };
        // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
        out[3][h] = unsafe { vcvtq_f32_s32(vmovl_high_s16(hi)) };
    }
    out
}

/// `acc[r] += Σ_t x[i0 + r, 4q + t] · wq[t]`: one widened weight quad ([`widen_quad`]) against
/// quad `q` of `R` float rows.
///
/// # Safety
/// Rows `i0..i0+R` of `x` hold `stride` floats each, quad `q` among them.
#[inline(always)]
unsafe fn add_float_quad<const R: usize>(
    acc: &mut [[float32x4_t; 2]; R],
    wq: &[[float32x4_t; 2]; 4],
    x: &[f32],
    i0: usize,
    stride: usize,
    q: usize,
) {
    for r in 0..R {
        // SAFETY: quad q's four values are inside row i0 + r (caller).
        let xq = unsafe { vld1q_f32(x.as_ptr().add((i0 + r) * stride + 4 * q)) };
        for h in 0..2 {
            // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
            acc[r][h] = unsafe { vfmaq_laneq_f32::<0>(acc[r][h], wq[0][h], xq) };
            // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
            acc[r][h] = unsafe { vfmaq_laneq_f32::<1>(acc[r][h], wq[1][h], xq) };
            // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
            acc[r][h] = unsafe { vfmaq_laneq_f32::<2>(acc[r][h], wq[2][h], xq) };
            // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
            acc[r][h] = unsafe { vfmaq_laneq_f32::<3>(acc[r][h], wq[3][h], xq) };
        }
    }
}

/// `R` float rows against one weight block, weights widened once per quad for all rows; int4
/// weights (`W4`) unpacked a pair of quads at a time, as the int8 tiles take them.
///
/// # Safety
/// `x` rows `i0..i0+R` of `padded` floats exist; `out` has `R` rows of 8 writable floats at
/// stride `row_len`; the weight group size is `K` or a multiple of 4 (of 8 for int4).
#[inline(always)]
unsafe fn weight_only_tile<const R: usize, const W4: bool>(
    x: &[f32],
    i0: usize,
    weights: &PackedInt8Weights,
    b: usize,
    out: *mut f32,
    row_len: usize,
) {
    let (k, stride) = (weights.in_features(), weights.padded_in_features());
    let quads = stride / 4;
    let (segs, seg_quads) = segments(k, stride, weights.group_size());
    let (w, sw) = (weights.block(b).as_ptr(), weights.block_scales(b).as_ptr());
    // Values between the block's consecutive groups in its scales.
    let ss = weights.side_stride(b) * (segs > 1) as usize;
    // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
    let zero = unsafe { vdupq_n_f32(0.0) };
    let mut y = [[zero; 2]; R];
    let zeros = weights.block_zero_points(b);
    for g in 0..segs {
        let mut acc = [[zero; 2]; R];
        let q_end = ((g + 1) * seg_quads).min(quads);
        if W4 {
            // SAFETY: with zero points a block has 8 per group, group g's at ss·g.
            let z = unsafe { int4_zero_bytes(if zeros.is_empty() { std::ptr::null() } else { zeros.as_ptr().add(ss * g) }) };
            // Int4 segments are whole pairs of quads (the int4 group rule).
            for q in (g * seg_quads..q_end).step_by(2) {
                // SAFETY: an int4 block holds 16·quads bytes, pair q/2 at 16·q; each x row holds
                // 4·quads floats (caller), quads q and q + 1 among them.
                for (d, quad) in unsafe { int4_quad_pair(w, q, z) }.into_iter().enumerate() {
                    // SAFETY: quads q and q + 1 are inside every row of x (as above).
                    unsafe { add_float_quad(&mut acc, &widen_quad(quad), x, i0, stride, q + d) };
                }
            }
        } else {
            for q in g * seg_quads..q_end {
                // SAFETY: a block holds 32·quads bytes; each x row holds 4·quads floats (caller).
                unsafe {
                    let quad = [vld1q_s8(w.add(32 * q)), vld1q_s8(w.add(32 * q + 16))];
                    add_float_quad(&mut acc, &widen_quad(quad), x, i0, stride, q);
                }
            }
        }
        for h in 0..2 {
            // SAFETY: 8 scales per group (a single group when per channel).
            let s = unsafe { load_scales(sw.add(ss * g + 4 * h)) };
            for r in 0..R {
                // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
                y[r][h] = unsafe { vfmaq_f32(y[r][h], acc[r][h], s) };
            }
        }
    }
    for r in 0..R {
        for h in 0..2 {
            // SAFETY: R rows of 8 floats at stride row_len (caller).
            unsafe { vst1q_f32(out.add(r * row_len + 4 * h), y[r][h]) };
        }
    }
}

/// `out[i, 8·(b − blocks.start) + l] = Σ_k x[i,k] · ŵ[8b+l,k]` with float activations: the
/// weight-only path. `x` is `M` rows zero-padded to `padded_in_features()` floats.
///
/// # Safety
/// `x` holds `M · padded_in_features()` floats; the weight group size is `K` or a multiple of 4;
/// `blocks` within the weights; `out` has `M` writable rows of `8·blocks.len()` floats.
pub unsafe fn weight_only_blocks(x: &[f32], m: usize, weights: &PackedInt8Weights, blocks: Range<usize>, out: BlockOutputs) {
    let row_len = out.row_len();
    // SAFETY: the caller's contract (x, the group size); weight_only_tiles keeps rows, blocks
    // and `at` in range.
    weight_only_tiles(m, blocks, out, |rows, i, b, at| unsafe {
        match (rows, weights.bits()) {
            (4, 4) => weight_only_tile::<4, true>(x, i, weights, b, at, row_len),
            (_, 4) => weight_only_tile::<1, true>(x, i, weights, b, at, row_len),
            (4, _) => weight_only_tile::<4, false>(x, i, weights, b, at, row_len),
            _ => weight_only_tile::<1, false>(x, i, weights, b, at, row_len),
        }
    })
}

/// `(max |x|, whether every value is finite)`.
pub fn abs_max(x: &[f32]) -> (f32, bool) {
    let chunks = x.chunks_exact(4);
    let tail = chunks.remainder();
    // SAFETY: NEON is part of every aarch64 target; chunks_exact gives 4 floats.
    let (mut m, mut p) = unsafe {
        let (mut amax, mut probe) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        for c in chunks {
            let v = vld1q_f32(c.as_ptr());
            amax = vmaxq_f32(amax, vabsq_f32(v));
            // x·0 is 0 for finite x and NaN for NaN or ±Inf.
            probe = vaddq_f32(probe, vmulq_n_f32(v, 0.0));
        }
        (vmaxvq_f32(amax), vaddvq_f32(probe))
    };
    for &v in tail {
        m = m.max(v.abs());
        p += v * 0.0;
    }
    (m, p == 0.0)
}

/// `q[i] = round_half_even(clamp(x[i] · inv, −127, 127))`, bit for bit what
/// [`crate::quant::quantize_value`] gives with zero point 0 (`fcvtns` rounds half to even).
///
/// # Safety
/// `x` finite; `q.len() >= x.len()`.
pub unsafe fn quantize_symmetric(x: &[f32], inv: f32, q: &mut [i8]) {
    // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
    let (lo, hi) = (unsafe { vdupq_n_f32(-127.0) }, unsafe { vdupq_n_f32(127.0) });
    let mut i = 0;
    while i + 16 <= x.len() {
        // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
        let mut v = [unsafe { vdupq_n_s32(0) }; 4];
        for (j, vj) in v.iter_mut().enumerate() {
            // SAFETY: i + 16 <= x.len().
            let r = unsafe { vmulq_n_f32(vld1q_f32(x.as_ptr().add(i + 4 * j)), inv) };
            // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
            *vj = unsafe { vcvtnq_s32_f32(vminq_f32(vmaxq_f32(r, lo), hi)) };
        }
        let halves =
            // SAFETY: NEON register arithmetic only; NEON is part of every aarch64 target.
            [unsafe { vcombine_s16(vqmovn_s32(v[0]), vqmovn_s32(v[1])) }, unsafe { vcombine_s16(vqmovn_s32(v[2]), vqmovn_s32(v[3])) }];
        // SAFETY: q has as many bytes as x has floats.
        unsafe { vst1q_s8(q.as_mut_ptr().add(i), vcombine_s8(vqmovn_s16(halves[0]), vqmovn_s16(halves[1]))) };
        i += 16;
    }
    for (qv, &xv) in q[i..].iter_mut().zip(&x[i..]) {
        *qv = crate::quant::quantize_value(xv, inv, 0, -127, 127) as i8;
    }
}
