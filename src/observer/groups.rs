//! Per-group ranges of input channels, for static activations with one scale per group.

use candle_core::{bail, Result};

/// A bucket is a float's exponent and its top 4 mantissa bits: 16 buckets per octave of `|x|`,
/// each at most 6.25 % wide.
const MANTISSA_BITS_KEPT: u32 = 4;
const SHIFT: u32 = 23 - MANTISSA_BITS_KEPT;
/// Bucket 0 holds `|x| < 2⁻²⁴` (zeros included); the last holds `|x| ≥ 2¹⁶`.
const LOWEST: u32 = (127 - 24) << MANTISSA_BITS_KEPT;
const HIGHEST: u32 = (127 + 16) << MANTISSA_BITS_KEPT;
const BUCKETS: usize = (HIGHEST - LOWEST) as usize + 1;

/// A histogram of `|x|` for each run of `group` consecutive input channels (log-spaced
/// buckets, 16 per octave, `2⁻²⁴ … 2¹⁶`), with the largest `|x|` that fell in each bucket.
///
/// [`clip`](Self::clip)`(f)` is, per group, the smallest value seen with at most a fraction `f`
/// of the values above its bucket (a value actually seen, so no range is wider than the
/// inputs needed): with that as the group's
/// static range, `f` is the share of inputs left outside it, so `f` trades the resolution of
/// every other input against how many go through float.
#[derive(Debug, Clone)]
pub struct GroupHistogram {
    group: usize,
    width: usize,
    counts: Vec<u64>,
    /// Per group and bucket, the largest `|x|` in it.
    tops: Vec<f32>,
    nonfinite: u64,
}

impl GroupHistogram {
    /// For rows of `width` values in groups of `group` (the last may be shorter).
    pub fn new(width: usize, group: usize) -> Result<Self> {
        if width == 0 || group == 0 {
            bail!("group ranges need a width and a group size of at least 1 (got {width} and {group})")
        }
        let group = group.min(width);
        let groups = width.div_ceil(group);
        Ok(Self { group, width, counts: vec![0; groups * BUCKETS], tops: vec![0.0; groups * BUCKETS], nonfinite: 0 })
    }

    /// Values per group.
    pub fn group_size(&self) -> usize {
        self.group
    }

    /// Groups per row.
    pub fn groups(&self) -> usize {
        self.counts.len() / BUCKETS
    }

    /// NaN/±Inf values seen (left out).
    pub fn nonfinite_count(&self) -> u64 {
        self.nonfinite
    }

    /// Adds rows of `width` values (`rows.len()` a multiple of it).
    pub fn observe(&mut self, rows: &[f32]) -> Result<()> {
        if !rows.len().is_multiple_of(self.width) {
            bail!("group ranges: {} values are not rows of {}", rows.len(), self.width)
        }
        for row in rows.chunks(self.width) {
            for (g, values) in row.chunks(self.group).enumerate() {
                let buckets = g * BUCKETS..(g + 1) * BUCKETS;
                let (counts, tops) = (&mut self.counts[buckets.clone()], &mut self.tops[buckets]);
                for &v in values {
                    if !v.is_finite() {
                        self.nonfinite += 1;
                        continue;
                    }
                    let b = ((v.abs().to_bits() >> SHIFT).clamp(LOWEST, HIGHEST) - LOWEST) as usize;
                    counts[b] += 1;
                    tops[b] = tops[b].max(v.abs());
                }
            }
        }
        Ok(())
    }

    /// Per group, the range `c` with at most `fraction` of the values seen above it: the
    /// largest value of the bucket where the values counted from the top pass that share (so
    /// slightly fewer than `fraction` may lie above). 0 for a group that saw only zeros.
    pub fn clip(&self, fraction: f64) -> Result<Vec<f32>> {
        if !(0.0..1.0).contains(&fraction) {
            bail!("the share of inputs left outside a static range must be in [0, 1), got {fraction}")
        }
        Ok(self
            .counts
            .chunks(BUCKETS)
            .zip(self.tops.chunks(BUCKETS))
            .map(|(counts, tops)| {
                let total: u64 = counts.iter().sum();
                let allowed = (fraction * total as f64).floor() as u64;
                let mut above = 0;
                for (&n, &top) in counts.iter().zip(tops).rev() {
                    if above + n > allowed {
                        return top;
                    }
                    above += n;
                }
                0.0
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_leaves_the_asked_share_above() {
        // One group of 4 channels; 1000 rows with |x| = 1, 2, 3, 4 and one row of 1000s.
        let mut h = GroupHistogram::new(4, 4).unwrap();
        let mut rows: Vec<f32> = (0..1000).flat_map(|_| [1.0, -2.0, 3.0, -4.0]).collect();
        rows.extend([1000.0, 0.0, 0.0, -1000.0]);
        h.observe(&rows).unwrap();
        // Fraction 0: everything inside, the exact largest value.
        assert_eq!(h.clip(0.0).unwrap(), vec![1000.0]);
        // 4004 values, 0.1 % may lie above: floor(4.004) = 4 ≥ the two 1000s, and the 1000 4s
        // are too many, so the clip is the largest value of 4's bucket.
        assert_eq!(h.clip(0.001).unwrap(), vec![4.0]);
        // 30 %: floor(1201.2) = 1201 may lie above; the 1000s (2) and 4s (1000) fit, the 3s do
        // not: the clip is 3.
        assert_eq!(h.clip(0.3).unwrap(), vec![3.0]);
        assert!(h.clip(1.0).is_err());
    }

    #[test]
    fn groups_are_independent_and_nonfinite_values_are_left_out() {
        let mut h = GroupHistogram::new(5, 2).unwrap();
        // Groups: channels 0–1, 2–3 and 4 alone (zeros only: clip 0).
        h.observe(&[0.5, -0.25, 8.0, f32::NAN, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0]).unwrap();
        assert_eq!(h.groups(), 3);
        assert_eq!(h.nonfinite_count(), 1);
        assert_eq!(h.clip(0.0).unwrap(), vec![0.5, 8.0, 0.0]);
        assert!(h.observe(&[1.0; 7]).is_err());
    }
}
