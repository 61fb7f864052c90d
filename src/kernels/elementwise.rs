//! Element-wise activation functions on the kernels' paths: exact GELU (BERT) and SwiGLU's
//! `silu(gate) · up` (Llama), each with the scalar function its vector code must match.

use super::memory::as_unfilled;
use super::team::{run_on_parts, team_threads};
use super::Kernels;
use candle_core::{bail, Result};
use std::mem::MaybeUninit;

/// `p` and `a1..a5` of Abramowitz & Stegun 7.1.26: for `z ≥ 0`, with `t = 1/(1 + p·z)`,
/// `erf(z) ≈ 1 − t·(a1 + a2·t + a3·t² + a4·t³ + a5·t⁴)·e^(−z²)`, absolute error below 1.5e-7.
pub(super) const ERF_COEFFS: [f32; 6] = [0.327_591_1, 0.254_829_6, -0.284_496_74, 1.421_413_7, -1.453_152, 1.061_405_4];

/// Exact GELU in place, `x ↦ x·Φ(x) = x/2 · (1 + erf(x/√2))` (BERT's activation), on the best
/// path. With `z = |x|/√2` and `c = x/2 · t·P(t) · e^(−z²)` (the tail `1 − erf(z)` of
/// `ERF_COEFFS`, times `x/2`): `x − c` for `x ≥ 0` and `c` for `x < 0`, so the negative side,
/// where the result is small, keeps its relative precision.
pub fn gelu_erf(x: &mut [f32]) {
    if !Kernels::best().gelu_erf(x) {
        x.iter_mut().for_each(|v| *v = gelu_erf_scalar(*v))
    }
}

/// SwiGLU's product `out[i] = silu(gate[i]) · up[i]`, `silu(x) = x / (1 + e^(−x))`, on the best
/// path (Llama's MLP between its gate/up and down projections). With `e = e^(−|x|) ≤ 1`:
/// `σ(x) = 1/(1 + e)` for `x ≥ 0` and `e/(1 + e)` for `x < 0`, so the exponential never
/// overflows.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
    silu_mul_into(gate, up, as_unfilled(out))
}

/// [`silu_mul`] into memory that need not hold values yet (every value is written on `Ok`), in
/// pieces of 64 K values over the kernel team when there are several.
pub(crate) fn silu_mul_into(gate: &[f32], up: &[f32], out: &mut [MaybeUninit<f32>]) -> Result<()> {
    if gate.len() != up.len() || out.len() != gate.len() {
        bail!("silu_mul: gate of {}, up of {} and output of {} values must match", gate.len(), up.len(), out.len())
    }
    const PIECE: usize = 1 << 16;
    let kernels = Kernels::best();
    run_on_parts(out.chunks_mut(PIECE).collect(), team_threads(gate.len() > PIECE), |p, out| {
        let (gate, up) = (&gate[p * PIECE..][..out.len()], &up[p * PIECE..][..out.len()]);
        if !kernels.silu_mul(gate, up, out) {
            out.iter_mut().zip(gate.iter().zip(up)).for_each(|(o, (&g, &u))| _ = o.write(silu_scalar(g) * u))
        }
    });
    Ok(())
}

/// `x / (1 + e^(−x))` (the portable path of [`silu_mul`]).
pub fn silu_scalar(x: f32) -> f32 {
    let e = (-x.abs()).exp();
    let r = 1.0 / (1.0 + e);
    x * if x >= 0.0 { r } else { e * r }
}

/// [`gelu_erf`] of one value (the portable path).
pub fn gelu_erf_scalar(x: f32) -> f32 {
    let [p, a1, a2, a3, a4, a5] = ERF_COEFFS;
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + p * z);
    let tail = t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5)))) * (-z * z).exp();
    let c = 0.5 * x * tail;
    if x >= 0.0 {
        x - c
    } else {
        c
    }
}
