//! The read-bandwidth probe of `bench`: how fast this machine streams memory when read the way
//! the decoding tile reads its weights, the bound a layer's GB/s is judged against.

/// Parts the probe reads side by side: as many as the weight blocks a decoding tile streams at
/// once (one stream alone reads memory slower than eight side by side).
const STREAMS: usize = 8;

/// Wrapping sum of `buf`, read as [`STREAMS`] equal parts side by side (32 bytes of each in turn
/// on AVX2), like the decoding tile reads its eight weight blocks.
pub fn stream_sum(buf: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected, the one feature the function needs.
        return unsafe { stream_sum_avx2(buf) };
    }
    let part = buf.len() / STREAMS;
    let mut acc = [0u64; STREAMS];
    for i in 0..part {
        for (s, a) in acc.iter_mut().enumerate() {
            *a = a.wrapping_add(buf[s * part + i]);
        }
    }
    buf[STREAMS * part..].iter().chain(&acc).fold(0, |a, &b| a.wrapping_add(b))
}

/// [`stream_sum`] compiled for AVX2, so that it reads at the speed memory can deliver.
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn stream_sum_avx2(buf: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let part = buf.len() / STREAMS / 4 * 4;
    let mut acc = [_mm256_setzero_si256(); STREAMS];
    for i in (0..part).step_by(4) {
        for (s, a) in acc.iter_mut().enumerate() {
            // SAFETY: s·part + i + 4 ≤ STREAMS·part ≤ buf.len(): four whole u64 inside `buf`.
            *a = _mm256_add_epi64(*a, unsafe { _mm256_loadu_si256(buf.as_ptr().add(s * part + i) as *const __m256i) });
        }
    }
    let mut lanes = [0u64; 4];
    for a in acc {
        let mut l = [0u64; 4];
        // SAFETY: `l` holds four u64, the 32 bytes stored.
        unsafe { _mm256_storeu_si256(l.as_mut_ptr() as *mut __m256i, a) };
        lanes.iter_mut().zip(l).for_each(|(x, y)| *x = x.wrapping_add(y));
    }
    let rest = buf[STREAMS * part..].iter().fold(0u64, |a, &b| a.wrapping_add(b));
    lanes.iter().fold(rest, |a, &b| a.wrapping_add(b))
}

#[cfg(test)]
mod tests {
    /// The probe's sum is the plain wrapping sum, whatever the length (parts, tails).
    #[test]
    fn stream_sum_is_the_sum() {
        for n in [0u64, 1, 31, 32, 33, 1000, 4099] {
            let buf: Vec<u64> = (0..n).collect();
            assert_eq!(super::stream_sum(&buf), n * n.saturating_sub(1) / 2, "n = {n}");
        }
    }
}
