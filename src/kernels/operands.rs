//! What a path's int8 tiles read besides the quantized rows, built once per set of quantized
//! activations (x86 only: NEON and the portable code need none).

#[cfg(target_arch = "x86_64")]
use super::{
    team::{run_on_items, team_threads},
    x86,
};
use super::{tiles, Isa, PackedInt8Weights, QuantizedActivations};

/// What a path's int8 tiles take besides the rows ([`tiles::Int8Operands`]): built once per
/// set of quantized activations and kept with them, so that layers sharing an input
/// ([`crate::nn::forward_shared`]) build them once.
#[derive(Debug, Clone, Default)]
pub(crate) struct TileOperands {
    abs: Vec<u8>,
    neg_mask: Vec<u8>,
    shift_terms: Vec<i32>,
}

impl TileOperands {
    /// The operands `isa`'s tiles read (none for NEON and the portable code).
    pub(super) fn new(isa: Isa, acts: &QuantizedActivations, weights: &PackedInt8Weights, seg: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        return x86_operands(isa, acts, weights, seg);
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (isa, acts, weights, seg);
            Self::default()
        }
    }

    pub(super) fn view<'a>(
        &'a self,
        acts: &'a QuantizedActivations,
        weights: &'a PackedInt8Weights,
        seg: usize,
        bias: Option<&'a [f32]>,
        offsets: bool,
    ) -> tiles::Int8Operands<'a> {
        tiles::Int8Operands { acts, abs: &self.abs, neg_mask: &self.neg_mask, shift_terms: &self.shift_terms, weights, seg, bias, offsets }
    }
}

/// What the x86 int8 tiles of `isa` take besides the rows:
/// - `vpmaddubsw` (AVX2) multiplies unsigned by signed bytes; it gets `|a|` and a mask of the
///   negative `a`, and multiplies `|a|` by the weight with its bits flipped where `a < 0`:
///   `|a|·!w = |a|·(−w − 1) = a·w − |a|` there, so a segment sums `Σ a·w + Σ_{a<0} a`, and the
///   second term comes off at its end (`!w` lies in `[−128, 126]`, so a pair of products stays
///   within `±2·127·128`, below `vpmaddubsw`'s saturation);
/// - `vpdpbusd` gets `w + 128` as its unsigned side, so a segment sums `Σ a·w + 128·Σ a`;
/// - int4 weights go in as their unsigned nibbles `u = w + z` on both, against `a` itself
///   (`|u·a|` ≤ 15·128, far from saturating), so a segment sums `Σ a·w + z·Σ a`: the tiles take
///   back `z` (per output channel) times `Σ a`, stored here negated.
#[cfg(target_arch = "x86_64")]
fn x86_operands(isa: Isa, acts: &QuantizedActivations, weights: &PackedInt8Weights, seg: usize) -> TileOperands {
    let (m, k, stride) = (acts.rows(), acts.cols(), weights.padded_in_features());
    let (segs, _) = tiles::segments(k, stride, seg);
    let seg = seg.min(stride);
    let avx2 = match isa {
        Isa::Avx2 => weights.bits() == 8,
        Isa::VnniOnAvx2 | Isa::AvxVnni | Isa::Avx512Vnni => false,
        _ => return TileOperands::default(),
    };
    let factor = if weights.bits() == 4 { -1 } else { -128 };
    let bytes = if avx2 { m * stride } else { 0 };
    let mut ops = TileOperands { abs: vec![0; bytes], neg_mask: vec![0; bytes], shift_terms: vec![0; m * segs] };
    // Pieces of whole rows, about 32 KB of activations each, over the kernel team.
    let rows = (32_768 / stride.max(1)).max(1);
    let data = acts.padded_data();
    let mut pieces: Vec<_> = ops.shift_terms.chunks_mut(rows * segs).map(|terms| (terms, &mut [][..], &mut [][..])).collect();
    if avx2 {
        for ((piece, abs), neg) in pieces.iter_mut().zip(ops.abs.chunks_mut(rows * stride)).zip(ops.neg_mask.chunks_mut(rows * stride)) {
            (piece.1, piece.2) = (abs, neg);
        }
    }
    run_on_items(pieces, team_threads(m > rows), |p, (terms, abs, neg)| {
        let data = &data[p * rows * stride..][..terms.len() / segs * stride];
        if avx2 {
            // `|a|`, the mask of `a < 0`, and `−Σ_{a<0} a` per segment.
            abs.iter_mut().zip(data).for_each(|(u, &v)| *u = v.unsigned_abs());
            neg.iter_mut().zip(data).for_each(|(u, &v)| *u = (v >> 7) as u8);
            let negatives: Vec<i8> = data.iter().map(|&v| v.min(0)).collect();
            // SAFETY: every x86 SIMD path has AVX2; terms holds segs values per row of data.
            unsafe { x86::segment_sums(&negatives, stride, seg, segs, -1, terms) };
        } else {
            // `−128·Σ a` (int8 on `vpdpbusd`) or `−Σ a` (int4) per segment (the padding is
            // zeros, which add nothing).
            // SAFETY: as above.
            unsafe { x86::segment_sums(data, stride, seg, segs, factor, terms) };
        }
    });
    ops
}
