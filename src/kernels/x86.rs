//! x86_64 AVX2 int8 kernels.
//!
//! `u8 × i8` is the only byte multiply AVX2 has (`vpmaddubsw`), so signed activations are fed
//! as `|a|` with the sign moved onto the weight: `a·w = |a| · (sign(a)·w)`. Weights are kept in
//! `[-127, 127]`, so each 16-bit pair sum is at most `2·128·127 = 32512` and never saturates;
//! `vpmaddwd` with ones then widens pairs to `i32`. All sums are exact.

use std::arch::x86_64::*;

/// Whether this CPU can run the AVX2 kernels.
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Eight `i32` lanes of `Σ a·w` over 32-byte chunks `chunks` of `a` and `w`.
///
/// # Safety
/// AVX2 must be available; `a` and `w` must hold at least `32 · chunks.end` bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn chunk_sums(a: *const i8, w: *const i8, chunks: std::ops::Range<usize>) -> __m256i {
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_si256();
    for c in chunks {
        // SAFETY: the caller guarantees 32 readable bytes at offset 32·c of both rows.
        let va = _mm256_loadu_si256(a.add(32 * c) as *const __m256i);
        let vw = _mm256_loadu_si256(w.add(32 * c) as *const __m256i);
        let prod = _mm256_maddubs_epi16(_mm256_abs_epi8(va), _mm256_sign_epi8(vw, va));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(prod, ones));
    }
    acc
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum_f32(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0b01));
    _mm_cvtss_f32(s)
}

/// Integer sums of each group (`group_chunks` chunks of 32 per group) of one row pair:
/// the exact quantity the fused kernel rescales. Rows are zero-padded to `32 · n_chunks`.
pub fn group_sums(a: &[i8], w: &[i8], group_chunks: usize, n_chunks: usize, out: &mut Vec<i32>) -> candle_core::Result<()> {
    if !available() || a.len() < 32 * n_chunks || w.len() < 32 * n_chunks || group_chunks == 0 {
        candle_core::bail!("AVX2 group sums: CPU without AVX2, rows shorter than {n_chunks} chunks, or empty groups")
    }
    out.clear();
    let mut c = 0;
    while c < n_chunks {
        let end = (c + group_chunks).min(n_chunks);
        // SAFETY: AVX2 checked above; both rows hold 32·n_chunks bytes.
        out.push(unsafe { hsum_i32(chunk_sums(a.as_ptr(), w.as_ptr(), c..end)) });
        c = end;
    }
    Ok(())
}

/// `y[r] = Σ_g sa_r[g·a_step] · sw[g·w_step] · Σ_{chunks of g} a_r·w` for `R` activation rows
/// sharing one weight row (segments of `seg_chunks` chunks). Float accumulation in registers:
/// two accumulators per row (even and odd segments) to hide the FMA latency.
///
/// # Safety
/// AVX2+FMA available; each row in `rows` and `w` hold `32 · n_chunks` bytes; with
/// `segs = n_chunks.div_ceil(seg_chunks)`, each `sa` slice holds `segs` values if `a_step` is 1
/// (else 1) and `sw` holds `segs` values if `w_step` is 1 (else 1).
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_rows<const R: usize>(
    rows: &[&[i8]; R],
    sa: &[&[f32]; R],
    a_step: usize,
    w: &[i8],
    sw: &[f32],
    w_step: usize,
    seg_chunks: usize,
    n_chunks: usize,
) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    let (mut c, mut g) = (0, 0);
    while c < n_chunks {
        let end = (c + seg_chunks).min(n_chunks);
        let wscale = *sw.get_unchecked(g * w_step);
        for r in 0..R {
            // SAFETY: row, weight and scale lengths as promised by the caller.
            let s = _mm256_cvtepi32_ps(chunk_sums(rows[r].as_ptr(), w.as_ptr(), c..end));
            acc[r] = _mm256_fmadd_ps(s, _mm256_set1_ps(*sa[r].get_unchecked(g * a_step) * wscale), acc[r]);
        }
        c = end;
        g += 1;
    }
    let mut out = [0f32; R];
    for r in 0..R {
        out[r] = hsum_f32(acc[r]);
    }
    out
}

/// `Σ_k x[k] · w[k]` with int8 weights widened to f32 in registers (weight-only path).
///
/// # Safety
/// AVX2+FMA available; `w` holds at least `x.len()` bytes.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_f32_i8(x: &[f32], w: &[i8]) -> f32 {
    let k = x.len();
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= k {
        // SAFETY: i + 8 <= k and w.len() >= k.
        let wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(w.as_ptr().add(i) as *const __m128i)));
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(i)), wv, acc);
        i += 8;
    }
    let mut s = hsum_f32(acc);
    while i < k {
        s += x[i] * w[i] as f32;
        i += 1;
    }
    s
}
