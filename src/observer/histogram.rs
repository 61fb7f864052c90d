//! Histogram observer: keeps a fixed-size histogram whose range grows with the data, and picks
//! the clipping range that minimises the expected squared quantization error.

use super::{finite_min_max, Observer};
use crate::quant::{float_values, QParams, QScheme, QSpec};
use candle_core::{bail, Result, Tensor};

/// A histogram of `bins` equal-width bins over `[lo, hi]` that widens (re-binning its counts
/// proportionally) when data falls outside.
#[derive(Debug, Clone)]
struct RunningHistogram {
    counts: Vec<f64>,
    lo: f32,
    hi: f32,
    total: f64,
}

impl RunningHistogram {
    fn new(bins: usize) -> Result<Self> {
        if bins < 2 {
            bail!("a histogram needs at least 2 bins, got {bins}")
        }
        Ok(Self { counts: vec![0.0; bins], lo: 0.0, hi: 0.0, total: 0.0 })
    }

    fn is_empty(&self) -> bool {
        self.total == 0.0
    }

    fn clear(&mut self) {
        self.counts.iter_mut().for_each(|c| *c = 0.0);
        self.total = 0.0;
    }

    fn width(&self) -> f64 {
        (self.hi as f64 - self.lo as f64) / self.counts.len() as f64
    }

    fn bin_of(&self, v: f32) -> usize {
        let w = self.width();
        if w == 0.0 {
            return 0;
        }
        (((v as f64 - self.lo as f64) / w) as usize).min(self.counts.len() - 1)
    }

    /// Adds the finite values of a batch whose finite extremes are `(bmin, bmax)`.
    fn add(&mut self, values: &[f32], bmin: f32, bmax: f32) {
        if self.is_empty() {
            (self.lo, self.hi) = (bmin, bmax);
        } else if bmin < self.lo || bmax > self.hi {
            self.grow(bmin.min(self.lo), bmax.max(self.hi));
        }
        for &v in values.iter().filter(|v| v.is_finite()) {
            let b = self.bin_of(v);
            self.counts[b] += 1.0;
            self.total += 1.0;
        }
    }

    /// Re-bins onto `[lo, hi]` ⊇ the current range, splitting each old bin's count over the new
    /// bins it overlaps in proportion to the overlap.
    fn grow(&mut self, lo: f32, hi: f32) {
        let bins = self.counts.len();
        let old = std::mem::replace(&mut self.counts, vec![0.0; bins]);
        let (old_lo, old_w) = (self.lo as f64, self.width());
        (self.lo, self.hi) = (lo, hi);
        let (new_lo, new_w, n) = (lo as f64, self.width(), old.len());
        for (i, &c) in old.iter().enumerate().filter(|(_, c)| **c > 0.0) {
            let (a, b) = (old_lo + i as f64 * old_w, old_lo + (i + 1) as f64 * old_w);
            if old_w == 0.0 {
                let j = (((a - new_lo) / new_w) as usize).min(n - 1);
                self.counts[j] += c;
                continue;
            }
            let first = (((a - new_lo) / new_w).floor().max(0.0) as usize).min(n - 1);
            let last = ((((b - new_lo) / new_w).ceil() as usize).saturating_sub(1)).clamp(first, n - 1);
            for j in first..=last {
                let (ja, jb) = (new_lo + j as f64 * new_w, new_lo + (j + 1) as f64 * new_w);
                let overlap = (b.min(jb) - a.max(ja)).max(0.0);
                self.counts[j] += c * overlap / old_w;
            }
        }
    }

    /// Value below which a fraction `q` of the mass lies (linear inside a bin).
    fn quantile(&self, q: f64) -> f32 {
        let target = q.clamp(0.0, 1.0) * self.total;
        let w = self.width();
        let mut acc = 0.0;
        for (i, &c) in self.counts.iter().enumerate() {
            if acc + c >= target && c > 0.0 {
                let frac = (target - acc) / c;
                return (self.lo as f64 + (i as f64 + frac) * w) as f32;
            }
            acc += c;
        }
        self.hi
    }

    /// The clipping range `[a, b]` (containing 0) that minimises, over the histogram,
    /// `Σ_inside count·Δ²/12 + Σ_clipped count·(distance to the range)²` with
    /// `Δ = (b - a) / (qmax - qmin)`. Candidates are bin edges; bins are represented by their
    /// centres; prefix sums make each candidate O(1).
    fn best_range(&self, spec: &QSpec) -> (f32, f32) {
        let (qmin, qmax) = spec.qrange();
        let levels = (qmax - qmin) as f64;
        let n = self.counts.len();
        let w = self.width();
        if w == 0.0 {
            return (self.lo, self.hi);
        }
        let lo = self.lo as f64;
        let centre = |j: usize| lo + (j as f64 + 0.5) * w;
        // prefix[j] = Σ_{i<j} (c, c·x, c·x²)
        let mut prefix = vec![(0.0f64, 0.0f64, 0.0f64); n + 1];
        for j in 0..n {
            let (c, x) = (self.counts[j], centre(j));
            let p = prefix[j];
            prefix[j + 1] = (p.0 + c, p.1 + c * x, p.2 + c * x * x);
        }
        let sums = |a: usize, b: usize| {
            let (p, q) = (prefix[a], prefix[b]);
            (q.0 - p.0, q.1 - p.1, q.2 - p.2)
        };
        // Error of the real range [ra, rb] (already containing 0).
        let error = |ra: f64, rb: f64| {
            let left = (((ra - lo) / w - 0.5).ceil().max(0.0) as usize).min(n);
            let right = ((((rb - lo) / w - 0.5).floor() + 1.0).max(left as f64) as usize).min(n);
            let (cl, sl, ql) = sums(0, left);
            let (cr, sr, qr) = sums(right, n);
            let (cm, _, _) = sums(left, right);
            let step = (rb - ra) / levels;
            cm * step * step / 12.0 + (ra * ra * cl - 2.0 * ra * sl + ql) + (rb * rb * cr - 2.0 * rb * sr + qr)
        };
        let edge = |j: usize| lo + j as f64 * w;
        let mut best = (f64::INFINITY, self.lo as f64, self.hi as f64);
        let mut consider = |ra: f64, rb: f64| {
            let (ra, rb) = (ra.min(0.0), rb.max(0.0));
            let e = error(ra, rb);
            if e < best.0 {
                best = (e, ra, rb);
            }
        };
        match spec.scheme {
            QScheme::Symmetric => {
                for j in 0..=n {
                    let t = edge(j).abs();
                    consider(-t, t);
                }
            }
            QScheme::Affine => {
                // Left edges at or below 0, right edges at or above 0.
                let zero = ((-lo / w).floor().max(0.0) as usize).min(n);
                for a in 0..=zero {
                    for b in zero..=n {
                        consider(edge(a), edge(b));
                    }
                }
            }
        }
        (best.1 as f32, best.2 as f32)
    }
}

/// How a histogram observer turns its histogram into a range.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RangeRule {
    /// The clipping range with the lowest expected quantization MSE.
    MinimiseMse,
    /// `[P(100 - p), P(p)]`.
    Percentile(f64),
}

/// Histogram observers: accumulate a histogram of everything seen (fixed bins, the range grows
/// with the data), then pick the range by one of two rules —
/// [`HistogramObserver::new`]: the clipping range with the lowest expected quantization MSE (the
/// idea of PyTorch's `HistogramObserver`, written from the idea): clipping a few rare outliers
/// buys a finer step for everything else;
/// [`HistogramObserver::percentile`]: the `p`-th and `(100 - p)`-th percentiles (linear inside a
/// bin); `p = 100` is the plain min/max.
#[derive(Debug, Clone)]
pub struct HistogramObserver {
    spec: QSpec,
    rule: RangeRule,
    hist: RunningHistogram,
    nonfinite: u64,
}

impl HistogramObserver {
    /// MSE-minimising range over `bins` fixed-width bins (2048 is a good default).
    pub fn new(spec: QSpec, bins: usize) -> Result<Self> {
        Ok(Self { spec, rule: RangeRule::MinimiseMse, hist: RunningHistogram::new(bins)?, nonfinite: 0 })
    }

    /// Percentile range, `percentile` in (50, 100], e.g. 99.99.
    pub fn percentile(spec: QSpec, percentile: f64, bins: usize) -> Result<Self> {
        if !(percentile > 50.0 && percentile <= 100.0) {
            bail!("percentile must lie in (50, 100], got {percentile}")
        }
        Ok(Self { spec, rule: RangeRule::Percentile(percentile), hist: RunningHistogram::new(bins)?, nonfinite: 0 })
    }
}

impl Observer for HistogramObserver {
    fn observe(&mut self, x: &Tensor) -> Result<()> {
        if x.elem_count() == 0 {
            bail!("observer was given an empty tensor of shape {:?}", x.shape())
        }
        let values = float_values(x, "observed tensor")?;
        let (range, bad) = finite_min_max(&values);
        self.nonfinite += bad;
        if let Some((lo, hi)) = range {
            self.hist.add(&values, lo, hi);
        }
        Ok(())
    }

    fn qparams(&self) -> Result<QParams> {
        if self.hist.is_empty() {
            bail!("histogram observer has not observed any finite value yet: run calibration data through it first")
        }
        let (lo, hi) = match self.rule {
            RangeRule::MinimiseMse => self.hist.best_range(&self.spec),
            RangeRule::Percentile(p) => {
                let tail = 1.0 - p / 100.0;
                (self.hist.quantile(tail), self.hist.quantile(1.0 - tail))
            }
        };
        QParams::per_tensor(self.spec, lo, hi)
    }

    fn reset(&mut self) {
        self.hist.clear();
        self.nonfinite = 0;
    }

    fn spec(&self) -> QSpec {
        self.spec
    }

    fn nonfinite_count(&self) -> u64 {
        self.nonfinite
    }

    fn observed_range(&self) -> Option<(f32, f32)> {
        (!self.hist.is_empty()).then_some((self.hist.lo, self.hist.hi))
    }
}
