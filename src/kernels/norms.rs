//! RMSNorm and LayerNorm over rows, bit for bit as candle's CPU kernels compute them, each
//! fusable with the residual add before it; rows shared out over the kernel team.

use super::memory::{as_unfilled, assume_filled};
use super::team::{run_on_items, run_on_parts, team_threads};
use super::Kernels;
use candle_core::{bail, Result};
use std::mem::MaybeUninit;

/// RMSNorm of every row of `n` values of `x` into `out`, bit for bit as candle's CPU kernel
/// computes it: `Σ x²` of each row added in order (`x·x` rounded, then added),
/// `m = √(Σ/n + ε)`, `y = x / m · α`. The sums of eight rows at a time run in the lanes of one
/// register on x86 (a row per lane, still in order); the rows are shared out over the kernel
/// team when there are many.
pub fn rms_norm(x: &[f32], n: usize, alpha: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    rms_norm_into(x, n, alpha, eps, as_unfilled(out))
}

/// [`rms_norm`] into memory that need not hold values yet: on `Ok`, every value of `out` is written.
pub(crate) fn rms_norm_into(x: &[f32], n: usize, alpha: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) -> Result<()> {
    rms_norm_rows(x, None, n, alpha, eps, out)
}

/// A residual connection and the RMSNorm after it in one pass: `sum = x + h` into `sum`, and
/// [`rms_norm`] of `sum` into `out` (each piece of rows normalised while it is in cache); on
/// `Ok`, every value of both is written.
pub(crate) fn add_rms_norm_into(
    x: &[f32],
    h: &[f32],
    n: usize,
    alpha: &[f32],
    eps: f32,
    sum: &mut [MaybeUninit<f32>],
    out: &mut [MaybeUninit<f32>],
) -> Result<()> {
    if h.len() != x.len() || sum.len() != x.len() {
        bail!("residual rms norm: {} inputs, {} residuals and {} sums differ", x.len(), h.len(), sum.len())
    }
    rms_norm_rows(x, Some((h, sum)), n, alpha, eps, out)
}

/// The body of [`rms_norm_into`] and [`add_rms_norm_into`]: with a residual `(h, sum)`, the rows
/// normalised are `x + h`, written to `sum` first.
fn rms_norm_rows(
    x: &[f32],
    residual: Option<(&[f32], &mut [MaybeUninit<f32>])>,
    n: usize,
    alpha: &[f32],
    eps: f32,
    out: &mut [MaybeUninit<f32>],
) -> Result<()> {
    if n == 0 || !x.len().is_multiple_of(n) || alpha.len() != n || out.len() != x.len() {
        bail!("rms norm: {} inputs, {} outputs and {} weights are not rows of {n}", x.len(), out.len(), alpha.len())
    }
    let kernels = Kernels::best();
    let rows = x.len() / n;
    let per = norm_piece_rows(n);
    let (h, sum) = match residual {
        Some((h, sum)) => (h, sum),
        None => (&[][..], &mut [][..]),
    };
    let mut sums = sum.chunks_mut(per * n);
    let parts: Vec<_> = out.chunks_mut(per * n).map(|out| (out, sums.next())).collect();
    run_on_items(parts, team_threads(rows > per), |p, (out, sum)| {
        let x = &x[p * per * n..][..out.len()];
        let x: &[f32] = match sum {
            Some(sum) => {
                sum.iter_mut().zip(x).zip(&h[p * per * n..]).for_each(|((s, &a), &b)| _ = s.write(a + b));
                // SAFETY: every value was just written.
                unsafe { assume_filled(sum) }
            }
            None => x,
        };
        let mut sums = vec![0f32; out.len() / n];
        kernels.sums_of_squares(x, n, &mut sums);
        for ((row, y), sum) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)).zip(sums) {
            let m = (sum / n as f32 + eps).sqrt();
            y.iter_mut().zip(row).zip(alpha).for_each(|((y, &v), &a)| _ = y.write(v / m * a));
        }
    });
    Ok(())
}

/// Rows of `n` values per piece of a norm on the kernel team: about 64 K values (in cache while
/// summed and normalised), a multiple of the eight rows the x86 sums take at once.
fn norm_piece_rows(n: usize) -> usize {
    (65_536 / n).next_multiple_of(8).max(8)
}

/// LayerNorm of every row of `n` values of `x` (plus `residual`, when given: the rows normalised
/// are `x + residual`, summed piece by piece in cache and never written out) into `out`, bit for
/// bit as candle's CPU kernel computes it: `Σ x` and `Σ x²` of each row added in order,
/// `μ = Σ/n`, `σ² = Σx²/n − μ²`, `y = (x − μ) · (1/√(σ² + ε)) · α + β`. The sums of eight rows
/// at a time run in the lanes of a register on x86; the rows are shared out over the team.
/// On `Ok`, every value of `out` is written.
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_norm_into(
    x: &[f32],
    residual: Option<&[f32]>,
    n: usize,
    alpha: &[f32],
    beta: &[f32],
    eps: f32,
    out: &mut [MaybeUninit<f32>],
) -> Result<()> {
    if n == 0
        || !x.len().is_multiple_of(n)
        || alpha.len() != n
        || beta.len() != n
        || out.len() != x.len()
        || residual.is_some_and(|h| h.len() != x.len())
    {
        bail!(
            "layer norm: {} inputs, {} outputs, {} weights and {} biases are not rows of {n}",
            x.len(),
            out.len(),
            alpha.len(),
            beta.len()
        )
    }
    let kernels = Kernels::best();
    let rows = x.len() / n;
    let per = norm_piece_rows(n);
    run_on_parts(out.chunks_mut(per * n).collect(), team_threads(rows > per), |p, out| {
        let x = &x[p * per * n..][..out.len()];
        let summed: Vec<f32>;
        let x = match residual {
            Some(h) => {
                summed = x.iter().zip(&h[p * per * n..]).map(|(a, b)| a + b).collect();
                &summed[..]
            }
            None => x,
        };
        let (mut sums, mut squares) = (vec![0f32; out.len() / n], vec![0f32; out.len() / n]);
        kernels.sums_and_squares(x, n, &mut sums, &mut squares);
        for (((row, y), sum), sum2) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)).zip(sums).zip(squares) {
            let mean = sum / n as f32;
            let var = sum2 / n as f32 - mean * mean;
            let inv_std = (var + eps).sqrt().recip();
            y.iter_mut().zip(row).zip(alpha.iter().zip(beta)).for_each(|((y, &v), (&a, &b))| _ = y.write((v - mean) * inv_std * a + b));
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused residual + RMSNorm writes `x + h` and the RMSNorm of it bit for bit as an add
    /// followed by [`rms_norm`]: rows fewer and more than eight, several pieces of rows.
    #[test]
    fn residual_rms_norm_equals_add_then_norm() -> Result<()> {
        let wave = |len: usize, f: f32| (0..len).map(|i| (i as f32 * f).sin() * (1 + i % 7) as f32).collect::<Vec<f32>>();
        for (rows, n) in [(3, 24), (300, 576)] {
            let (x, h, alpha) = (wave(rows * n, 0.37), wave(rows * n, 1.91), wave(n, 0.11));
            let want_sum: Vec<f32> = x.iter().zip(&h).map(|(a, b)| a + b).collect();
            let mut want = vec![0f32; rows * n];
            rms_norm(&want_sum, n, &alpha, 1e-5, &mut want)?;
            let (mut sum, mut got) = (vec![f32::NAN; rows * n], vec![f32::NAN; rows * n]);
            add_rms_norm_into(&x, &h, n, &alpha, 1e-5, as_unfilled(&mut sum), as_unfilled(&mut got))?;
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&sum), bits(&want_sum), "{rows} rows of {n}: sums");
            assert_eq!(bits(&got), bits(&want), "{rows} rows of {n}: norms");
        }
        assert!(add_rms_norm_into(
            &[1.0; 4],
            &[1.0; 3],
            4,
            &[1.0; 4],
            1e-5,
            &mut [MaybeUninit::uninit(); 4],
            &mut [MaybeUninit::uninit(); 4]
        )
        .is_err());
        Ok(())
    }

    /// LayerNorm on the kernels gives candle's fused LayerNorm bit for bit, on `x` and on a
    /// residual sum `x + h`: rows fewer and more than eight, of whole 8-value vectors and not,
    /// several pieces of rows; lengths that do not fit are errors.
    #[test]
    fn layer_norm_equals_candles_bit_for_bit() -> Result<()> {
        use candle_core::{Device, Tensor};
        let wave = |len: usize, f: f32, c: f32| (0..len).map(|i| (i as f32 * f).sin() * (1 + i % 7) as f32 + c).collect::<Vec<f32>>();
        for (rows, n) in [(3, 20), (13, 384), (300, 384), (9, 7)] {
            let (x, h, alpha, beta) = (wave(rows * n, 0.37, 0.5), wave(rows * n, 1.91, -0.2), wave(n, 0.11, 1.0), wave(n, 0.05, 0.0));
            let tensor = |v: &[f32], shape: &[usize]| Tensor::from_vec(v.to_vec(), shape, &Device::Cpu);
            let sum: Vec<f32> = x.iter().zip(&h).map(|(a, b)| a + b).collect();
            for residual in [None, Some(&h[..])] {
                let normed = if residual.is_some() { &sum } else { &x };
                let want = candle_nn::ops::layer_norm(&tensor(normed, &[rows, n])?, &tensor(&alpha, &[n])?, &tensor(&beta, &[n])?, 1e-12)?;
                let want: Vec<u32> = want.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect();
                let mut got = vec![f32::NAN; rows * n];
                layer_norm_into(&x, residual, n, &alpha, &beta, 1e-12, as_unfilled(&mut got))?;
                let got: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "{rows} rows of {n}, residual {}", residual.is_some());
            }
        }
        let mut out = [MaybeUninit::uninit(); 8];
        assert!(layer_norm_into(&[1.0; 8], Some(&[1.0; 4]), 4, &[1.0; 4], &[0.0; 4], 1e-5, &mut out).is_err());
        assert!(layer_norm_into(&[1.0; 8], None, 4, &[1.0; 4], &[0.0; 3], 1e-5, &mut out).is_err());
        Ok(())
    }
}
