//! Decoding attention in float: one query position against the cached keys and values of its
//! key/value head. A decoding step does this for every head of every layer (a few hundred
//! cached positions × 64 values each), between int8 layers, so it lives with the kernels: AVX2 +
//! FMA on x86_64, chosen at run time (the crate is built for baseline x86_64, where the compiler
//! only has SSE2), and portable code elsewhere (aarch64's baseline NEON is auto-vectorised).

use super::Isa;
use candle_core::{bail, Result};

/// `y = softmax(scale · q·Kᵀ) · V` for one query head: `keys` and `values` hold `t` rows of
/// `d = q.len()` values each, `y` has `d` values.
pub fn attend(q: &[f32], keys: &[f32], values: &[f32], scale: f32, y: &mut [f32]) -> Result<()> {
    attend_with(Isa::best(), q, keys, values, scale, y)
}

/// [`attend`] on a chosen path (errors if this CPU lacks it); paths agree up to float
/// summation order.
pub fn attend_with(isa: Isa, q: &[f32], keys: &[f32], values: &[f32], scale: f32, y: &mut [f32]) -> Result<()> {
    let d = q.len();
    if d == 0 || y.len() != d || keys.len() != values.len() || !keys.len().is_multiple_of(d) || keys.is_empty() {
        bail!("attention: query of {d}, keys of {}, values of {}, output of {}: keys and values must be whole rows of the query's length, at least one", keys.len(), values.len(), y.len())
    }
    if !isa.is_supported() {
        bail!("attention: this CPU cannot run the {isa:?} kernels")
    }
    let mut p = vec![0f32; keys.len() / d];
    match isa {
        // SAFETY: AVX2 checked above; keys hold p.len() rows of d.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { super::x86::attention_scores(q, keys, scale, &mut p) },
        _ => p.iter_mut().zip(keys.chunks_exact(d)).for_each(|(p, k)| *p = scale * dot(q, k)),
    }
    // Softmax, normalised once at the end: y = Σ_j e^(s_j − max) · v_j / Σ_j e^(s_j − max).
    let max = p.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    p.iter_mut().for_each(|s| *s = (*s - max).exp());
    let inv = 1.0 / p.iter().sum::<f32>();
    match isa {
        // SAFETY: AVX2 checked above; values hold p.len() rows of y.len() = d.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { super::x86::weighted_rows(&p, values, y) },
        _ => {
            y.fill(0.0);
            for (&w, v) in p.iter().zip(values.chunks_exact(d)) {
                y.iter_mut().zip(v).for_each(|(y, v)| *y += w * v);
            }
        }
    }
    y.iter_mut().for_each(|y| *y *= inv);
    Ok(())
}

/// `Σ a·b` with eight independent partial sums, so that the portable path vectorises too.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        acc.iter_mut().zip(x.iter().zip(y)).for_each(|(s, (x, y))| *s += x * y);
    }
    acc.iter().sum::<f32>() + tail
}
