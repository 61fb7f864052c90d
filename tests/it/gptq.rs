//! gptq: the damped inverse factor, and rounding that beats round-to-nearest on the inputs it
//! was calibrated with.

use crate::common;
use candle_core::{Device, Module};
use candle_nn::Linear;
use candle_quant::convert::{quantize_weight_only, QuantConfig};
use candle_quant::gptq::{collect_hessians, gptq_rows, inverse_cholesky, quantize_gptq, DAMPING};
use candle_quant::kernels::{PackedInt8Weights, WeightQuant};
use candle_quant::QLinear;

/// `Uᵀ·U = (H + λI)⁻¹` with `λ = 1 %` of the mean diagonal: for `H = diag(1, 4, 9)` (mean
/// 14/3, λ = 0.04667) `U` is diagonal with `U[i,i] = 1/√(H[i,i] + λ)`: 0.97744, 0.49708, 0.33248.
#[test]
fn inverse_factor_golden() {
    let h = [1.0, 0.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 9.0];
    let u = inverse_cholesky(&h, 3).unwrap();
    let lambda = DAMPING * 14.0 / 3.0;
    for (i, d) in [1.0f64, 4.0, 9.0].into_iter().enumerate() {
        assert!((u[i * 3 + i] - 1.0 / (d + lambda).sqrt()).abs() < 1e-12);
    }
    assert!(u.iter().enumerate().filter(|(i, _)| i / 3 != i % 3).all(|(_, &v)| v == 0.0));
    // A full matrix: Uᵀ·U·(H + λI) = I, U upper.
    let mut rng = common::Rng::new(3);
    let k = 24;
    let a = rng.normals(k * 40, 1.0);
    let mut h = vec![0f64; k * k];
    for t in 0..40 {
        for r in 0..k {
            for c in 0..k {
                h[r * k + c] += (a[t * k + r] * a[t * k + c]) as f64;
            }
        }
    }
    let u = inverse_cholesky(&h, k).unwrap();
    let lambda = DAMPING * (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
    for r in 0..k {
        for c in 0..k {
            if c < r {
                assert_eq!(u[r * k + c], 0.0);
            }
            // (Uᵀ·U·H_λ)[r, c]
            let v: f64 = (0..k)
                .map(|t| (0..k).map(|s| u[s * k + r] * u[s * k + t]).sum::<f64>() * (h[t * k + c] + if t == c { lambda } else { 0.0 }))
                .sum();
            assert!((v - if r == c { 1.0 } else { 0.0 }).abs() < 1e-9, "({r}, {c}): {v}");
        }
    }
}

/// On correlated inputs, GPTQ's int4 layer reproduces the float layer's outputs on those inputs
/// better than round to nearest: `‖X·(W − Ŵ)ᵀ‖` at most 0.8 of RTN's, symmetric and with zero
/// points; the library path (observe, collect, round, convert) gives the same weights.
#[test]
fn gptq_beats_round_to_nearest_on_its_calibration_inputs() {
    let mut rng = common::Rng::new(11);
    let (n, k, tokens) = (32, 128, 512);
    let w = rng.tensor(&[n, k], 0.5).unwrap();
    // Inputs with a few strong shared directions, as real activations have.
    let z = rng.tensor(&[tokens, 8], 1.0).unwrap();
    let mix = rng.tensor(&[8, k], 1.0).unwrap();
    let x = (z.matmul(&mix).unwrap() + rng.tensor(&[tokens, k], 0.1).unwrap()).unwrap();
    let xv = x.to_vec2::<f32>().unwrap();
    let mut h = vec![0f64; k * k];
    for row in &xv {
        for r in 0..k {
            for c in 0..k {
                h[r * k + c] += (row[r] * row[c]) as f64;
            }
        }
    }
    let u = inverse_cholesky(&h, k).unwrap();
    let flat = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let out_err = |packed: &PackedInt8Weights| -> f32 {
        let wq = packed.dequantize(&Device::Cpu).unwrap();
        let d = x.matmul(&(&w - wq).unwrap().t().unwrap()).unwrap();
        d.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt()
    };
    for zero_point in [false, true] {
        let how = WeightQuant::Int4 { group: 32, zero_point };
        let rtn = PackedInt8Weights::quantize(&w, how).unwrap();
        let gptq = PackedInt8Weights::from_rows(&gptq_rows(&flat, n, k, &u, how).unwrap()).unwrap();
        let (e_rtn, e_gptq) = (out_err(&rtn), out_err(&gptq));
        assert!(e_gptq < 0.8 * e_rtn, "zero point {zero_point}: GPTQ {e_gptq} vs RTN {e_rtn}");

        // The same through the library: a layer observed over the batch, then rounded.
        let mut layer = vec![QLinear::from_linear(&Linear::new(w.clone(), None), "proj").unwrap()];
        let cfg = QuantConfig::default().weight(how);
        let hs = collect_hessians(&mut layer, &cfg, |l| l[0].forward(&x).map(|_| ())).unwrap();
        assert_eq!(layer[0].kind_name(), "float", "the layer is put back");
        quantize_gptq(&mut layer, &cfg, &hs, |_, _| {}).unwrap();
        quantize_weight_only(&mut layer, &cfg).unwrap();
        let (kept, _) = layer[0].int8_parts().unwrap();
        // The same rounding up to the Hessian's f32 summation order: nearly every value equal.
        let same = (0..n).flat_map(|j| (0..k).map(move |c| (j, c))).filter(|&(j, c)| kept.value(j, c) == gptq.value(j, c)).count();
        assert!(same * 100 >= n * k * 97, "{same} of {}", n * k);
        assert!(out_err(kept) < 0.8 * e_rtn);
    }
}

/// The factor is the same to the last bit however rayon splits the work: at `K` = 600 (both
/// steps parallel) it equals a plain one-thread evaluation of the same recurrences:
/// `R[i,j] = (H[i,j] − Σ_{t>j} R[i,t]·R[j,t]) / R[j,j]` from the last column, then
/// `U[i,c] = (δ_ic − Σ_{i<t≤c} R[i,t]·U[t,c]) / R[i,i]` from the last row, sums in order.
#[test]
fn inverse_factor_does_not_depend_on_the_split() {
    let k = 600;
    let mut rng = common::Rng::new(5);
    let a = rng.normals(k * 2 * k, 1.0);
    let mut h = vec![0f64; k * k];
    for t in 0..2 * k {
        for r in 0..k {
            for c in 0..k {
                h[r * k + c] += (a[t * k + r] * a[t * k + c]) as f64;
            }
        }
    }
    let got = inverse_cholesky(&h, k).unwrap();
    let lambda = DAMPING * (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
    let mut r = vec![0f64; k * k];
    for j in (0..k).rev() {
        let s: f64 = (j + 1..k).map(|t| r[j * k + t] * r[j * k + t]).sum();
        r[j * k + j] = (h[j * k + j] + lambda - s).sqrt();
        for i in 0..j {
            let s: f64 = (j + 1..k).map(|t| r[i * k + t] * r[j * k + t]).sum();
            r[i * k + j] = (h[i * k + j] - s) / r[j * k + j];
        }
    }
    let mut u = vec![0f64; k * k];
    for i in (0..k).rev() {
        for c in i..k {
            let mut x = if c == i { 1.0 } else { 0.0 };
            for t in i + 1..=c {
                x -= r[i * k + t] * u[t * k + c];
            }
            u[i * k + c] = x / r[i * k + i];
        }
    }
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(bits(&got) == bits(&u), "the factor differs from the one-thread recurrences");
}
