//! Scalar reference kernels: the ground truth every faster kernel must equal exactly.

/// `out[m][n] = Σ_k (a[m][k] - a_zp) · (b[n][k] - b_zp)` with `i32` accumulation.
///
/// `a` is `M×K` row-major (activations), `b` is `N×K` row-major (weights, as `Linear` stores
/// them), `out` is `M×N`. The definition, not an optimisation: zero points are subtracted
/// before multiplying.
#[allow(clippy::too_many_arguments)] // the BLAS shape: operands, zero points, sizes, output
pub fn gemm_i8_i32(a: &[i8], a_zp: i32, b: &[i8], b_zp: i32, m: usize, n: usize, k: usize, out: &mut [i32]) -> candle_core::Result<()> {
    if a.len() < m * k || b.len() < n * k || out.len() < m * n {
        candle_core::bail!(
            "reference gemm: buffers of {}, {} and {} values cannot hold {m}×{k}, {n}×{k} and {m}×{n}",
            a.len(),
            b.len(),
            out.len()
        )
    }
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0i32;
            for p in 0..k {
                acc += (a[i * k + p] as i32 - a_zp) * (b[j * k + p] as i32 - b_zp);
            }
            out[i * n + j] = acc;
        }
    }
    Ok(())
}

/// `Σ_k a[k] · b[k]` in `i32`: the inner product every grouped kernel is made of.
#[inline]
pub fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

/// `Σ_k x[k] · w[k]` with int8 weights widened to f32 (weight-only path).
#[inline]
pub fn dot_f32_i8(x: &[f32], w: &[i8]) -> f32 {
    x.iter().zip(w).map(|(&a, &b)| a * b as f32).sum()
}
