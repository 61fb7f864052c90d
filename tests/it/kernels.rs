//! kernels/: the scalar reference GEMM and the fused int8 linear built on it.

use crate::common;

use candle_core::{DType, Device, Tensor};
use candle_quant::kernels::{int8_linear, int8_linear_with, reference, PackedInt8Weights, QuantizedActivations, WeightQuant};
use candle_quant::quant::{Granularity, QDType, QParams, QScheme, QSpec, QuantizedTensor};
use candle_quant::runtime::Isa;
use proptest::prelude::*;

#[test]
fn reference_gemm_golden() {
    // a = [[1, 2], [3, 4]] with a_zp = 1 -> [[0, 1], [2, 3]]; b rows [5, 6] and [7, 8]:
    // out = [[0·5 + 1·6, 0·7 + 1·8], [2·5 + 3·6, 2·7 + 3·8]] = [[6, 8], [28, 38]].
    let mut out = [0i32; 4];
    reference::gemm_i8_i32(&[1, 2, 3, 4], 1, &[5, 6, 7, 8], 0, 2, 2, 2, &mut out).unwrap();
    assert_eq!(out, [6, 8, 28, 38]);
    // Extremes accumulate exactly: 1000 · (-128 · -128) = 16 384 000.
    let (a, b) = (vec![-128i8; 1000], vec![-128i8; 1000]);
    reference::gemm_i8_i32(&a, 0, &b, 0, 1, 1, 1000, &mut out[..1]).unwrap();
    assert!(reference::gemm_i8_i32(&a, 0, &b, 0, 2, 1, 1000, &mut out[..1]).is_err(), "too-small buffers are an error");
    assert_eq!(out[0], 16_384_000);
}

fn weights_from(values: &[i8], n: usize, k: usize, scales: Vec<f32>) -> PackedInt8Weights {
    let params = QParams::new(QSpec::WEIGHT, Granularity::PerChannel { axis: 0 }, scales, vec![0; n]).unwrap();
    let ints: Vec<i32> = values.iter().map(|&v| v as i32).collect();
    PackedInt8Weights::from_quantized_tensor(&QuantizedTensor::from_values(&ints, (n, k), params).unwrap()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// The fused dynamic int8 linear equals `Σ_g sa·sw·gemm_g + bias`, with each group's
    /// integer sum taken from the reference GEMM.
    #[test]
    fn dynamic_int8_linear_matches_reference(seed in any::<u64>(), m in 1usize..6, k in 1usize..80, n in 1usize..9, group in 1usize..40) {
        let mut rng = common::Rng::new(seed);
        let x = rng.normals(m * k, 2.0);
        let qw = rng.i8s(n * k, -127, 127);
        // Scales the packed weights hold exactly (they store f16).
        let sw: Vec<f32> = (0..n).map(|_| half::f16::from_f32(0.01 + rng.uniform()).to_f32()).collect();
        let bias: Vec<f32> = rng.normals(n, 1.0);
        let w = weights_from(&qw, n, k, sw.clone());
        let acts = QuantizedActivations::quantize_dynamic(&x, m, k, group, None).unwrap();
        let mut got = vec![0f32; m * n];
        int8_linear(&acts, &w, Some(&bias), &mut got).unwrap();

        let g = acts.group_size();
        for i in 0..m {
            for j in 0..n {
                let (mut want, mut abs_terms) = (0f64, bias[j].abs() as f64);
                for (gi, &sa) in acts.row_scales(i).iter().enumerate() {
                    let r = gi * g..((gi + 1) * g).min(k);
                    let len = r.len();
                    let a: Vec<i8> = acts.row(i)[r.clone()].to_vec();
                    let b: Vec<i8> = qw[j * k..(j + 1) * k][r].to_vec();
                    let mut acc = [0i32];
                    reference::gemm_i8_i32(&a, 0, &b, 0, 1, 1, len, &mut acc).unwrap();
                    want += sa as f64 * acc[0] as f64;
                    abs_terms += (sa as f64 * acc[0] as f64 * sw[j] as f64).abs();
                }
                let want = want * sw[j] as f64 + bias[j] as f64;
                // Each group's term is rounded twice (scales, product) and once when summed.
                let adds = 3 * acts.row_scales(i).len() + 2;
                prop_assert!(common::within_sum_rounding(got[i * n + j], want, abs_terms, adds), "({i},{j}) {} vs {want}", got[i * n + j]);
            }
        }
    }

    /// Static activations with a zero point: `sa·sw·Σ(qa − za)·qw` against the reference GEMM
    /// that subtracts the zero point before multiplying (quint8 and qint8 activations), on every
    /// path this CPU has.
    #[test]
    fn static_int8_linear_matches_reference(seed in any::<u64>(), m in 1usize..5, k in 1usize..70, n in 1usize..7, unsigned in any::<bool>()) {
        let mut rng = common::Rng::new(seed);
        let x = rng.normals(m * k, 1.5);
        let qw = rng.i8s(n * k, -127, 127);
        let w = weights_from(&qw, n, k, vec![0.5; n]);
        let spec = QSpec::new(if unsigned { QDType::QUInt8 } else { QDType::QInt8 }, QScheme::Affine);
        let (scale, zp) = spec.scale_zero_point(-2.0, 5.0).unwrap();
        let acts = QuantizedActivations::quantize_static(&x, m, k, &spec, scale, zp).unwrap();
        for isa in Isa::supported() {
        let mut got = vec![0f32; m * n];
        int8_linear_with(isa, &acts, &w, None, &mut got).unwrap();
        // Reference on the true integer values q (not the shifted storage).
        let q: Vec<i32> = x.iter().map(|&v| spec.quantize_value(v, scale, zp)).collect();
        // The kernel sums the stored values (q − 128 for quint8) and subtracts the stored zero
        // point's term in f32: both parts' magnitudes bound the rounding.
        let shift = if unsigned { 128 } else { 0 };
        for i in 0..m {
            for j in 0..n {
                let acc: i64 = (0..k).map(|p| (q[i * k + p] - zp) as i64 * qw[j * k + p] as i64).sum();
                let want = acc as f64 * scale as f64 * 0.5;
                let stored: i64 = (0..k).map(|p| ((q[i * k + p] - shift).abs() + (zp - shift).abs()) as i64 * (qw[j * k + p] as i64).abs()).sum();
                let abs_terms = stored as f64 * scale as f64 * 0.5;
                prop_assert!(common::within_sum_rounding(got[i * n + j], want, abs_terms, 6), "{isa:?} ({i},{j}) {} vs {want}", got[i * n + j]);
            }
        }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Affine activations on every path this CPU has: the output equals
    /// `Σ_g sw[n,g]·(sa[i,g]·Σ_{k∈g} q·qw + o[i,g]·Σ_{k∈g} qw) + bias`, each group's integer sums
    /// from the reference GEMM; groups shared by both sides, or one scale and offset per token
    /// over grouped or per-channel weights.
    #[test]
    fn affine_int8_linear_matches_reference(seed in any::<u64>(), m in 1usize..6, k in 1usize..80, n in 1usize..19, group in 1usize..40, per_token in any::<bool>(), per_channel in any::<bool>()) {
        let mut rng = common::Rng::new(seed);
        let x: Vec<f32> = rng.normals(m * k, 2.0).into_iter().map(|v| v.abs() - 0.3).collect();
        let weight = if per_token && per_channel { WeightQuant::PerChannel } else { WeightQuant::PerGroup(group) };
        let w = PackedInt8Weights::quantize(&rng.tensor(&[n, k], 1.0).unwrap(), weight).unwrap();
        let act_group = if per_token { k } else { group };
        let threshold = (seed % 3 == 0).then_some(3.0);
        let acts = QuantizedActivations::quantize_dynamic_affine(&x, m, k, act_group, threshold).unwrap();
        prop_assert!(acts.is_affine());
        let bias: Vec<f32> = rng.normals(n, 1.0);
        let (ga, gw) = (acts.group_size(), w.group_size());
        for isa in Isa::supported() {
            let mut got = vec![0f32; m * n];
            int8_linear_with(isa, &acts, &w, Some(&bias), &mut got).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let (qa, qw) = (acts.row(i), w.row(j));
                    let (mut want, mut abs_terms) = (bias[j] as f64, bias[j].abs() as f64);
                    for c in 0..k {
                        // x̂ = sa·q + o of c's activation group, ŵ = qw · sw of c's weight group.
                        let (sa, o) = (acts.row_scales(i)[c / ga] as f64, acts.row_offsets(i)[c / ga] as f64);
                        let wv = qw[c] as f64 * w.scale(j, c / gw) as f64;
                        want += (sa * qa[c] as f64 + o) * wv;
                        abs_terms += (sa * qa[c] as f64).abs() * wv.abs() + o.abs() * wv.abs();
                    }
                    for &(c, r) in acts.row_outliers(i) {
                        let wv = qw[c as usize] as f64 * w.scale(j, c as usize / gw) as f64;
                        want += r as f64 * wv;
                        abs_terms += (r as f64 * wv).abs();
                    }
                    let adds = 5 * k.div_ceil(ga.min(gw)) + 2 * acts.row_outliers(i).len() + 4;
                    prop_assert!(common::within_sum_rounding(got[i * n + j], want, abs_terms, adds), "{isa:?} ({i},{j}) {} vs {want}", got[i * n + j]);
                }
            }
        }
    }

    /// Affine quantization keeps every value within half a step of `sa·q + o`; a value beyond
    /// the threshold sits in slot -128 and its set-aside remainder restores it; a constant group
    /// is exact.
    #[test]
    fn affine_activations_stay_within_half_a_step(seed in any::<u64>(), m in 1usize..4, k in 1usize..100, group in 1usize..50) {
        let mut rng = common::Rng::new(seed);
        let mut x: Vec<f32> = rng.normals(m * k, 1.0).into_iter().map(|v| v * 3.0 + 1.0).collect();
        if seed % 4 == 0 {
            x.iter_mut().take(group.min(k)).for_each(|v| *v = 0.75);
        }
        let threshold = (seed % 2 == 0).then_some(4.0);
        let acts = QuantizedActivations::quantize_dynamic_affine(&x, m, k, group, threshold).unwrap();
        let g = acts.group_size();
        for i in 0..m {
            let outliers = acts.row_outliers(i);
            for c in 0..k {
                let (sa, o, q) = (acts.row_scales(i)[c / g], acts.row_offsets(i)[c / g], acts.row(i)[c]);
                let v = x[i * k + c];
                let back = sa * q as f32 + o;
                match outliers.iter().find(|&&(oc, _)| oc as usize == c) {
                    Some(&(_, r)) => {
                        prop_assert!(v.abs() > 4.0 && q == -128, "({i},{c}) {v} set aside in slot {q}");
                        prop_assert!((back + r - v).abs() <= 1e-5 * v.abs(), "({i},{c}) {back} + {r} != {v}");
                    }
                    None => prop_assert!((back - v).abs() <= 0.5 * sa + 1e-5 * (v.abs() + o.abs()), "({i},{c}) {v} -> {q}: {back}, step {sa}"),
                }
            }
        }
    }
}

/// Golden affine groups: `[0, 1, 2, 255]` spans 255 with 255 steps of 1, so `q = x − 128` and
/// `o = 0 + 128·1 = 128`; `[-1, -1]` is constant: step 0, `q = -128`, `o = -1`.
#[test]
fn affine_activations_golden() {
    let q = QuantizedActivations::quantize_dynamic_affine(&[0.0, 1.0, 2.0, 255.0, -1.0, -1.0], 1, 6, 4, None).unwrap();
    assert_eq!(q.row(0), &[-128, -127, -126, 127, -128, -128]);
    assert_eq!(q.row_scales(0), &[1.0, 0.0]);
    assert_eq!(q.row_offsets(0), &[128.0, -1.0]);
    // Against weights [1, 1, 1, 1 | 2, 2] (one scale of 1, groups of 4): y = 0 + 1 + 2 + 255 + 2·(-1) + 2·(-1) = 254.
    let w = PackedInt8Weights::pack(1, 6, 4, &[1, 1, 1, 1, 2, 2], &[half::f16::ONE, half::f16::ONE]).unwrap();
    for isa in Isa::supported() {
        let mut y = [0f32];
        int8_linear_with(isa, &q, &w, None, &mut y).unwrap();
        assert_eq!(y[0], 254.0, "{isa:?}");
    }
    // Groups that are not the weights' are refused, naming both.
    let per_channel = PackedInt8Weights::pack(1, 6, 6, &[1, 1, 1, 1, 2, 2], &[half::f16::ONE]).unwrap();
    let e = int8_linear(&q, &per_channel, None, &mut [0f32]).unwrap_err().to_string();
    assert!(e.contains("affine activations in groups of 4") && e.contains("groups of 6"), "{e}");
}

/// Int4 packing, golden: one row `q = [−8, −1, 0, 1, 2, 3, 7, −3]` with scale 0.5 (symmetric,
/// `u = q + 8 = [0, 7, 8, 9, 10, 11, 15, 5]`) is stored two to a byte, low nibble first:
/// `[0x70, 0x98, 0xBA, 0x5F]`; every path multiplies it exactly: against eight ones the
/// weight-only output is `0.5 · Σq = 0.5 · 1 = 0.5`, and eight ones quantized per token
/// (scale 1/127, every value 127) give the integer sum `Σ 127·q = 127`.
#[test]
fn int4_weights_golden() {
    use candle_quant::kernels::{group_sums_with, weight_only_linear_with, Int8Rows};
    let q = vec![-8i8, -1, 0, 1, 2, 3, 7, -3];
    let rows = Int8Rows::new_int4(1, 8, 8, q.clone(), vec![half::f16::from_f32(0.5)], None).unwrap();
    assert_eq!(rows.int4_bytes(), [0x70, 0x98, 0xBA, 0x5F]);
    let back = Int8Rows::from_int4_bytes(1, 8, 8, &rows.int4_bytes(), rows.scales().to_vec(), None).unwrap();
    assert_eq!(back, rows);
    let w = PackedInt8Weights::from_rows(&rows).unwrap();
    assert_eq!((w.bits(), w.row(0)), (4, q.clone()));
    assert_eq!(w.to_rows(), rows);
    let acts = QuantizedActivations::quantize_dynamic(&[1.0; 8], 1, 8, 8, None).unwrap();
    for isa in Isa::supported() {
        let mut y = [0f32];
        weight_only_linear_with(isa, &[1.0; 8], 1, &w, None, &mut y).unwrap();
        assert_eq!(y, [0.5], "{isa:?}");
        assert_eq!(group_sums_with(isa, &acts, &w).unwrap(), [127], "{isa:?}");
    }
    // With a zero point of 3: u = q + 3 must lie in [0, 15].
    let asym = Int8Rows::new_int4(1, 8, 8, vec![-3, 12, 0, 0, 0, 0, 0, 0], vec![half::f16::ONE], Some(vec![3])).unwrap();
    assert_eq!(asym.int4_bytes()[0], 0xF0);
    let err = |r: candle_core::Result<Int8Rows>| r.unwrap_err().to_string();
    assert!(
        err(Int8Rows::new_int4(1, 8, 8, vec![-4, 0, 0, 0, 0, 0, 0, 0], vec![half::f16::ONE], Some(vec![3]))).contains("row 0, column 0")
    );
    assert!(err(Int8Rows::new_int4(1, 8, 8, vec![0; 8], vec![half::f16::ONE], Some(vec![16]))).contains("[0, 15]"));
    assert!(err(Int8Rows::new_int4(1, 24, 12, vec![0; 24], vec![half::f16::ONE; 2], None)).contains("multiple of 8"));
    assert!(err(Int8Rows::from_int4_bytes(2, 8, 8, &[0; 7], vec![half::f16::ONE; 2], None)).contains("2×4 bytes"));
    assert!(PackedInt8Weights::quantize(
        &Tensor::ones((2, 24), DType::F32, &Device::Cpu).unwrap(),
        WeightQuant::Int4 { group: 12, zero_point: false }
    )
    .unwrap_err()
    .to_string()
    .contains("multiple of 8"));
}

/// Int4 round to nearest on the searched grid: every value within half a step of its weight
/// (or clipped at the grid's end), and the bytes half those of int8.
#[test]
fn int4_quantization_stays_within_half_a_step() {
    let mut rng = common::Rng::new(7);
    for zero_point in [false, true] {
        let (n, k) = (24, 200);
        let t = rng.tensor(&[n, k], 1.0).unwrap();
        let w = PackedInt8Weights::quantize(&t, WeightQuant::Int4 { group: 32, zero_point }).unwrap();
        let int8 = PackedInt8Weights::quantize(&t, WeightQuant::PerGroup(32)).unwrap();
        assert!(w.nbytes() * 10 < int8.nbytes() * 6, "{} vs {}", w.nbytes(), int8.nbytes());
        let f = t.to_vec2::<f32>().unwrap();
        let mut err2 = 0f64;
        let mut norm2 = 0f64;
        for (j, floats) in f.iter().enumerate() {
            let mut row = vec![0f32; k];
            w.dequantize_row(j, &mut row).unwrap();
            for (c, (&d, &x)) in row.iter().zip(floats).enumerate() {
                let s = w.scale(j, c / 32).abs();
                let level = w.value(j, c) as i32 + w.zero_point(j, c / 32) as i32;
                assert!((0..=15).contains(&level));
                // Inside the grid a value rounds to its nearest level; at either end it may clip.
                if level > 0 && level < 15 {
                    assert!((d - x).abs() <= 0.5 * s * 1.0001, "row {j} col {c}: {x} -> {d} (step {s})");
                }
                err2 += ((d - x) as f64).powi(2);
                norm2 += (x as f64).powi(2);
            }
        }
        // Normal weights in groups of 32 on 16 levels: relative RMS error about 0.1.
        let rel = (err2 / norm2).sqrt();
        assert!(rel < 0.13, "zero point {zero_point}: relative error {rel}");
    }
}

#[test]
fn kernel_shape_errors() {
    let w = weights_from(&[1, 2, 3, 4, 5, 6], 2, 3, vec![1.0, 1.0]);
    let acts = QuantizedActivations::quantize_dynamic(&[1.0; 8], 2, 4, 4, None).unwrap();
    let e = int8_linear(&acts, &w, None, &mut [0.0; 4]).unwrap_err().to_string();
    assert!(e.contains("4 columns") && e.contains("expect 3"), "{e}");
    let acts = QuantizedActivations::quantize_dynamic(&[1.0; 6], 2, 3, 3, None).unwrap();
    assert!(int8_linear(&acts, &w, None, &mut [0.0; 3]).is_err());
    assert!(int8_linear(&acts, &w, Some(&[0.0]), &mut [0.0; 4]).is_err());
    assert!(QuantizedActivations::quantize_dynamic(&[1.0; 5], 2, 3, 3, None).is_err());
    assert!(QuantizedActivations::quantize_dynamic(&[f32::NAN, 1.0, 1.0], 1, 3, 3, None).is_err());
    // Weights outside the narrow range or with a zero point are refused.
    let wide = QSpec::new(QDType::QInt8, QScheme::Symmetric);
    let p = QParams::new(wide, Granularity::PerTensor, vec![1.0], vec![0]).unwrap();
    let q = QuantizedTensor::from_values(&[-128, 0], (1, 2), p).unwrap();
    assert!(PackedInt8Weights::from_quantized_tensor(&q).unwrap_err().to_string().contains("-127"));
}

#[test]
fn weight_scales_are_stored_as_f16() {
    // 0.1 = 1.6·2⁻⁴; f16 keeps 10 fraction bits: 0.6·1024 = 614.4 → 614, so the stored scale is
    // (1024 + 614)/1024 · 2⁻⁴ = 1638/16384 = 0.0999755859375.
    let w = weights_from(&[1, -2, 3], 1, 3, vec![0.1]);
    assert_eq!(w.scale(0, 0), 0.099_975_586);
    // Zero-point term: scale · Σq = 0.0999755859375 · 2.
    assert_eq!(w.zero_point_term(0), 0.199_951_17);
    // 2 bytes of scale per output channel (one block of 8 rows, padded K = CHUNK bytes each).
    assert_eq!(w.nbytes(), 8 * w.padded_in_features() + 8 * 2);
    // Group sum S = 1 − 2 + 3 = 2, and an offset of 1 adds scale · S; once made, the sums
    // hold 2 bytes per output channel and group.
    assert!(w.prepare_group_sums());
    assert_eq!(w.block_group_sums(0)[0], 2);
    assert_eq!(w.group_term(0, 0), 0.199_951_17);
    assert_eq!(w.nbytes(), 8 * w.padded_in_features() + 8 * 2 + 8 * 2);

    // Quantizing floats rounds the scales first, so q·scale reproduces every weight within half
    // a step of the scale actually stored: [0.3, -1.1, 0.77] → scale f16(1.1/127).
    let x = Tensor::new(&[[0.3f32, -1.1, 0.77]], &Device::Cpu).unwrap();
    let w = PackedInt8Weights::quantize(&x, WeightQuant::PerChannel).unwrap();
    let s = w.scale(0, 0);
    assert_eq!(s, half::f16::from_f32(1.1 / 127.0).to_f32());
    for (c, &v) in [0.3f32, -1.1, 0.77].iter().enumerate() {
        assert!((w.value(0, c) as f32 * s - v).abs() <= s / 2.0, "column {c}");
    }
    // A scale beyond f16::MAX (65504) is an error that says so: |w| = 1e7 needs 1e7/127 ≈ 78740.
    let e = PackedInt8Weights::quantize(&Tensor::new(&[[1e7f32, 1.0]], &Device::Cpu).unwrap(), WeightQuant::PerChannel)
        .unwrap_err()
        .to_string();
    assert!(e.contains("f16"), "{e}");
}

/// Every output lands in its own column however the work is split: one or several rows, `N`
/// a multiple of 8 (the tiles write into the output directly) or not (through a scratch
/// buffer), one to four threads. Checked against `Σ_g sa·sw·sum_g + bias` from the reference
/// path's exact segment sums, which never go through the split.
#[test]
fn outputs_land_in_their_columns_on_every_split() {
    use candle_quant::kernels::group_sums_with;
    let mut rng = common::Rng::new(99);
    let k = 576;
    for (m, n) in [(1, 512), (1, 520), (1, 1000), (3, 512), (5, 264), (2, 1001)] {
        let w = PackedInt8Weights::quantize(&rng.tensor(&[n, k], 1.0).unwrap(), WeightQuant::PerGroup(32)).unwrap();
        let acts = QuantizedActivations::quantize_dynamic(&rng.normals(m * k, 1.0), m, k, 32, None).unwrap();
        let bias = rng.normals(n, 1.0);
        let sums = group_sums_with(Isa::Reference, &acts, &w).unwrap();
        let segs = k / 32;
        for threads in 1..=4 {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut got = vec![f32::NAN; m * n];
            pool.install(|| int8_linear(&acts, &w, Some(&bias), &mut got)).unwrap();
            for i in 0..m {
                for j in 0..n {
                    let terms: Vec<f64> = (0..segs)
                        .map(|g| acts.row_scales(i)[g] as f64 * w.scale(j, g) as f64 * sums[(i * n + j) * segs + g] as f64)
                        .collect();
                    let want = terms.iter().sum::<f64>() + bias[j] as f64;
                    let abs_terms = terms.iter().map(|t| t.abs()).sum::<f64>() + bias[j].abs() as f64;
                    let y = got[i * n + j];
                    assert!(
                        common::within_sum_rounding(y, want, abs_terms, 3 * segs + 2),
                        "{m}x{k}x{n}, {threads} threads, ({i},{j}): {y} vs {want}"
                    );
                }
            }
        }
    }
}

/// Every SIMD path this CPU supports against the scalar reference on 10,000 random shapes
/// (`CANDLE_QUANT_TEST_SHAPES` overrides the count):
/// the integer sums of every segment equal exactly, and the fused outputs agree up to float
/// summation order.
#[test]
fn simd_paths_equal_the_reference() {
    use candle_quant::kernels::{group_sums_with, int8_linear_with, weight_only_linear_with, WeightQuant};
    let paths: Vec<Isa> = Isa::supported().into_iter().filter(|&i| i != Isa::Reference).collect();
    println!("SIMD paths exercised: {paths:?}");
    let mut rng = common::Rng::new(2024);
    let ks = [1usize, 3, 17, 63, 64, 576, 1000, 1536];
    // 10,000 by default; fewer where the tests run under an emulator (scripts/test-aarch64.sh).
    let shapes = std::env::var("CANDLE_QUANT_TEST_SHAPES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    for shape in 0..shapes {
        let m = match rng.next_u64() % 20 {
            0 => 64,
            1 => 128,
            2..=5 => 1, // decoding: the single-row panels
            r => 1 + (r as usize % 17),
        };
        let k = ks[(rng.next_u64() % ks.len() as u64) as usize];
        // Odd, from one partial block of 8 outputs to two eight-block panels and a remainder.
        let n = 1 + 2 * (rng.next_u64() % 65) as usize;
        let (act_group, weight) = match rng.next_u64() % 7 {
            0 => (k, WeightQuant::PerChannel),
            1 => (32, WeightQuant::PerGroup(32)),
            2 => (64, WeightQuant::PerChannel),
            3 => (k, WeightQuant::PerGroup(128)),
            // Int4: nibbles unpacked in the tiles, symmetric or with zero points.
            4 => (32, WeightQuant::Int4 { group: 32, zero_point: false }),
            5 => (k, WeightQuant::Int4 { group: 64, zero_point: true }),
            _ => (128, WeightQuant::Int4 { group: 128, zero_point: true }),
        };
        let outliers = rng.next_u64().is_multiple_of(3).then_some(2.5);
        let w = rng.tensor(&[n, k], 1.0).unwrap();
        let w = PackedInt8Weights::quantize(&w, weight).unwrap();
        // Skewed rows, so that affine offsets matter.
        let x: Vec<f32> = rng.normals(m * k, 1.0).into_iter().map(|v| v + 0.5).collect();
        // Affine where its groups are the weights' (or one per token): offsets added by the
        // tiles per segment, or after them per row.
        let affine = act_group != 64 && rng.next_u64().is_multiple_of(2);
        let acts = if affine {
            QuantizedActivations::quantize_dynamic_affine(&x, m, k, act_group, outliers).unwrap()
        } else {
            QuantizedActivations::quantize_dynamic(&x, m, k, act_group, outliers).unwrap()
        };
        let bias = rng.normals(n, 1.0);
        let mut want = vec![0f32; m * n];
        int8_linear_with(Isa::Reference, &acts, &w, Some(&bias), &mut want).unwrap();
        // Σ_p |x̂_p·ŵ_p| + |b| bounds the magnitude both sides sum (x̂ = the dequantized
        // activation, within max|x|/254 of x): by Cauchy–Schwarz at most
        // ‖x‖₂·‖ŵ‖₂ + max|x|/127·‖ŵ‖₁ + |b|, cheap to take per row and output.
        let w_rows: Vec<(f64, f64)> = (0..n)
            .map(|j| {
                let mut row = vec![0f32; k];
                w.dequantize_row(j, &mut row).unwrap();
                (row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt(), row.iter().map(|v| v.abs() as f64).sum())
            })
            .collect();
        let abs_terms = |i: usize, j: usize| {
            let x = &x[i * k..(i + 1) * k];
            let x_norm = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            let x_max = x.iter().fold(0f64, |a, &v| a.max(v.abs() as f64));
            // Affine: each group's two terms, sa·Σq·ŵ and o·Σŵ, are at most 2·max|x|·‖ŵ‖₁ each.
            let offsets = if affine { 4.0 * x_max * w_rows[j].1 } else { 0.0 };
            x_norm * w_rows[j].0 + x_max / 127.0 * w_rows[j].1 + bias[j].abs() as f64 + offsets
        };
        let segments = k.div_ceil(act_group.min(w.group_size()));
        for &isa in &paths {
            let mut got = vec![0f32; m * n];
            int8_linear_with(isa, &acts, &w, Some(&bias), &mut got).unwrap();
            for (o, (g, e)) in got.iter().zip(&want).enumerate() {
                let (i, j) = (o / n, o % n);
                // Per segment: two scale products and an add (and an offset term's product
                // and add); per outlier a product and an add.
                let adds = 5 * segments + 2 * acts.row_outliers(i).len() + 2;
                assert!(
                    common::within_sum_rounding(*g, *e as f64, abs_terms(i, j), adds),
                    "shape {shape} ({m}x{k}x{n}, {weight:?}) {isa:?} affine {affine}: {g} vs {e}"
                );
            }
            assert_eq!(
                group_sums_with(isa, &acts, &w).unwrap(),
                group_sums_with(Isa::Reference, &acts, &w).unwrap(),
                "shape {shape} ({m}x{k}x{n}, {weight:?}) {isa:?}: integer segment sums"
            );
            let mut want_wo = vec![0f32; m * n];
            weight_only_linear_with(Isa::Reference, &x, m, &w, Some(&bias), &mut want_wo).unwrap();
            weight_only_linear_with(isa, &x, m, &w, Some(&bias), &mut got).unwrap();
            for (o, (g, e)) in got.iter().zip(&want_wo).enumerate() {
                // K products and K adds in the longest chain (the reference is sequential).
                assert!(
                    common::within_sum_rounding(*g, *e as f64, abs_terms(o / n, o % n), 2 * k + 2),
                    "shape {shape} ({m}x{k}x{n}, {weight:?}) {isa:?} weight-only: {g} vs {e}"
                );
            }
        }
    }
}

/// The vectorised dynamic activation quantizer gives the same bits, scales and outliers as the
/// scalar one — including ties: with max |x| = 127 the scale is exactly 1, so halves such as
/// 2.5 → 2 and −3.5 → −4 exercise rounding half to even.
#[test]
fn simd_activation_quantizer_equals_the_reference() {
    let mut rng = common::Rng::new(7);
    for case in 0..2_000 {
        let (m, k) = (1 + (rng.next_u64() % 4) as usize, 1 + (rng.next_u64() % 300) as usize);
        let group = [k, 32, 8, 17][(rng.next_u64() % 4) as usize];
        let threshold = rng.next_u64().is_multiple_of(2).then_some(2.0);
        let x: Vec<f32> = if case % 2 == 0 {
            rng.normals(m * k, 1.5)
        } else {
            (0..m * k).map(|i| if i % 7 == 0 { 127.0 } else { (rng.next_u64() % 255) as f32 - 127.0 + 0.5 }).collect()
        };
        let want = QuantizedActivations::quantize_dynamic_with(Isa::Reference, &x, m, k, group, threshold).unwrap();
        let want_affine = QuantizedActivations::quantize_dynamic_affine_with(Isa::Reference, &x, m, k, group, threshold).unwrap();
        for isa in Isa::supported() {
            let got = QuantizedActivations::quantize_dynamic_with(isa, &x, m, k, group, threshold).unwrap();
            let got_affine = QuantizedActivations::quantize_dynamic_affine_with(isa, &x, m, k, group, threshold).unwrap();
            for i in 0..m {
                for (what, got, want) in [("symmetric", &got, &want), ("affine", &got_affine, &want_affine)] {
                    assert_eq!(got.row(i), want.row(i), "case {case} {what} {isa:?} row {i}");
                    assert_eq!(got.row_scales(i), want.row_scales(i), "case {case} {what} {isa:?} row {i}");
                    assert_eq!(got.row_offsets(i), want.row_offsets(i), "case {case} {what} {isa:?} row {i}");
                    assert_eq!(got.row_outliers(i), want.row_outliers(i), "case {case} {what} {isa:?} row {i}");
                }
            }
        }
    }
    // Rows of whole groups of 32 take the x86 one-pass quantizer (groups with outliers finished
    // apart): the same bits, scales and outliers; NaN or ±Inf anywhere in a row is an error.
    for (case, k) in [32, 64, 384, 576].into_iter().enumerate() {
        let x = rng.normals(3 * k, 1.5);
        for threshold in [None, Some(2.0), Some(0.1)] {
            let want = QuantizedActivations::quantize_dynamic_with(Isa::Reference, &x, 3, k, 32, threshold).unwrap();
            for isa in Isa::supported() {
                let got = QuantizedActivations::quantize_dynamic_with(isa, &x, 3, k, 32, threshold).unwrap();
                for i in 0..3 {
                    assert_eq!(got.row(i), want.row(i), "k {k} {threshold:?} {isa:?} row {i}");
                    assert_eq!(got.row_scales(i), want.row_scales(i), "k {k} {threshold:?} {isa:?} row {i}");
                    assert_eq!(got.row_outliers(i), want.row_outliers(i), "k {k} {threshold:?} {isa:?} row {i}");
                }
            }
        }
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut y = x.clone();
            y[k + 7 * case + 5] = bad;
            for isa in Isa::supported() {
                assert!(QuantizedActivations::quantize_dynamic_with(isa, &y, 3, k, 32, Some(2.0)).is_err(), "k {k} {bad} {isa:?}");
            }
        }
    }
    // Golden: 127 sets the scale to 1; 2.5 → 2, 3.5 → 4, −0.5 → 0 (half to even).
    let q = QuantizedActivations::quantize_dynamic(&[127.0, 2.5, 3.5, -0.5], 1, 4, 4, None).unwrap();
    assert_eq!(q.row(0), &[127, 2, 4, 0]);
    for isa in Isa::supported() {
        assert!(QuantizedActivations::quantize_dynamic_with(isa, &[1.0, f32::INFINITY], 1, 2, 2, None).is_err());
    }
}

/// A prompt's or a batch's rows are quantized in pieces on the kernel team: the same bits,
/// scales and float outliers (in row order) as quantizing each row alone; a non-finite value in
/// any piece is still an error.
#[test]
fn quantizers_split_over_rows_equal_one_row_at_a_time() {
    let mut rng = common::Rng::new(13);
    let (m, k, group) = (67, 600, 32); // 40 200 inputs: above the split threshold, 67 rows: uneven pieces
    let mut x = rng.normals(m * k, 1.5);
    let scales: Vec<f32> = (0..k.div_ceil(group)).map(|g| (1.0 + g as f32 / 8.0) / 127.0).collect();
    let together = [
        QuantizedActivations::quantize_dynamic(&x, m, k, group, Some(3.0)).unwrap(),
        QuantizedActivations::quantize_static_groups(&x, m, k, group, &scales).unwrap(),
    ];
    for i in 0..m {
        let row = &x[i * k..(i + 1) * k];
        let alone = [
            QuantizedActivations::quantize_dynamic(row, 1, k, group, Some(3.0)).unwrap(),
            QuantizedActivations::quantize_static_groups(row, 1, k, group, &scales).unwrap(),
        ];
        for (t, a) in together.iter().zip(&alone) {
            assert_eq!((t.row(i), t.row_scales(i), t.row_outliers(i)), (a.row(0), a.row_scales(0), a.row_outliers(0)), "row {i}");
        }
    }
    assert!(together.iter().map(|t| t.outlier_count()).min().unwrap() > 0, "the data should hold values set aside");
    x[(m - 1) * k + 5] = f32::NAN;
    assert!(QuantizedActivations::quantize_dynamic(&x, m, k, group, Some(3.0)).is_err());
    assert!(QuantizedActivations::quantize_static_groups(&x, m, k, group, &scales).is_err());
}

/// Static per-group activations: every path gives the reference's bits, values beyond
/// `127·s_g` are set aside in float exactly (never clamped), and the int8 linear over them
/// equals the float product of the dequantized inputs plus the set-aside ones.
#[test]
fn static_group_quantizer_sets_aside_what_is_beyond_its_range() {
    let mut rng = common::Rng::new(11);
    for case in 0..1_000 {
        let (m, k) = (1 + (rng.next_u64() % 4) as usize, 1 + (rng.next_u64() % 200) as usize);
        let group = [k, 32, 8, 17][(rng.next_u64() % 4) as usize];
        let groups = k.div_ceil(group.min(k));
        let scales: Vec<f32> = (0..groups).map(|_| (0.5 + (rng.next_u64() % 100) as f32 / 50.0) / 127.0).collect();
        let x = rng.normals(m * k, 1.5);
        let want = QuantizedActivations::quantize_static_groups_with(Isa::Reference, &x, m, k, group, &scales).unwrap();
        for isa in Isa::supported() {
            let got = QuantizedActivations::quantize_static_groups_with(isa, &x, m, k, group, &scales).unwrap();
            for i in 0..m {
                assert_eq!(got.row(i), want.row(i), "case {case} {isa:?} row {i}");
                assert_eq!(got.row_outliers(i), want.row_outliers(i), "case {case} {isa:?} row {i}");
            }
        }
        for i in 0..m {
            let outliers = want.row_outliers(i);
            for c in 0..k {
                let (v, s) = (x[i * k + c], scales[c / group.min(k)]);
                let set_aside = outliers.iter().find(|(col, _)| *col as usize == c);
                assert_eq!(set_aside.is_some(), v.abs() > 127.0 * s, "case {case} ({i},{c}) {v} with scale {s}");
                assert_eq!(set_aside.map_or(0.0, |o| o.1), if v.abs() > 127.0 * s { v } else { 0.0 });
            }
            assert_eq!(want.row_scales(i), scales.as_slice());
        }
        // The linear: Σ_c ŵ_jc · (q_c·s_g or the float value), within summation rounding.
        let n = 1 + (rng.next_u64() % 5) as usize;
        let qw = rng.i8s(n * k, -127, 127);
        let w = weights_from(&qw, n, k, vec![0.25; n]);
        let mut got = vec![0f32; m * n];
        int8_linear(&want, &w, None, &mut got).unwrap();
        for i in 0..m {
            for j in 0..n {
                let deq = |c: usize| -> f64 {
                    match want.row_outliers(i).iter().find(|(col, _)| *col as usize == c) {
                        Some(&(_, v)) => v as f64,
                        None => want.row(i)[c] as f64 * scales[c / group.min(k)] as f64,
                    }
                };
                let terms: Vec<f64> = (0..k).map(|c| deq(c) * qw[j * k + c] as f64 * 0.25).collect();
                let want_y: f64 = terms.iter().sum();
                let abs_terms: f64 = terms.iter().map(|t| t.abs()).sum();
                assert!(
                    common::within_sum_rounding(got[i * n + j], want_y, abs_terms, 3 * groups + 2),
                    "case {case} ({i},{j}) {} vs {want_y}",
                    got[i * n + j]
                );
            }
        }
    }
    // Golden: scale 1/127 for both groups of 2: 0.5·127 = 63.5 → 64 (half to even), −1 → −127,
    // 1.5 is beyond 127·(1/127) = 1 and goes to float, 0.25·127 = 31.75 → 32.
    let q = QuantizedActivations::quantize_static_groups(&[0.5, -1.0, 1.5, 0.25], 1, 4, 2, &[1.0 / 127.0; 2]).unwrap();
    assert_eq!((q.row(0), q.row_outliers(0)), (&[64i8, -127, 0, 32][..], &[(2u32, 1.5f32)][..]));
    // Wrong scale count, a non-positive scale, a non-finite input: errors.
    assert!(QuantizedActivations::quantize_static_groups(&[0.0; 4], 1, 4, 2, &[1.0]).is_err());
    assert!(QuantizedActivations::quantize_static_groups(&[0.0; 4], 1, 4, 2, &[1.0, 0.0]).is_err());
    assert!(QuantizedActivations::quantize_static_groups(&[f32::NAN, 0.0, 0.0, 0.0], 1, 4, 2, &[1.0, 1.0]).is_err());
}

/// Decoding attention on every path this CPU has against a direct f64 softmax: groups of 1 to 9
/// query heads sharing one key/value head (the SIMD path takes up to four at a time), head sizes
/// with and without a whole number of 8- and 16-value vectors, whole or in parts over position
/// ranges merged afterwards; bad lengths are errors.
#[test]
fn attention_paths_agree_with_a_direct_softmax() {
    use candle_quant::kernels::{attend_part_with, attend_with, combine_parts, part_len};
    // Golden: two keys with equal scores weigh both values ½: y = ([1, 2] + [3, 6]) / 2 = [2, 4].
    let mut y = [0f32; 2];
    attend_with(Isa::Reference, &[1.0, 1.0], &[0.5, 0.5, 0.5, 0.5], &[1.0, 2.0, 3.0, 6.0], 2, 1.0, &mut y).unwrap();
    assert_eq!(y, [2.0, 4.0]);
    let mut rng = common::Rng::new(11);
    for (heads, d, t) in [
        (1, 1, 1),
        (1, 7, 2),
        (3, 8, 33),
        (2, 17, 5),
        (5, 40, 300),
        (3, 64, 300),
        (9, 64, 7),
        (4, 80, 33),
        (1, 128, 2),
        (2, 32, 13),
        (4, 32, 38),
        (3, 64, 4),
    ] {
        let (q, k, v) = (rng.normals(heads * d, 1.0), rng.normals(t * d, 1.0), rng.normals(t * d, 1.0));
        let scale = 1.0 / (d as f32).sqrt();
        let mut want = Vec::new();
        for qh in q.chunks(d) {
            let s: Vec<f64> =
                k.chunks(d).map(|k| scale as f64 * qh.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()).collect();
            let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            want.extend((0..d).map(|c| e.iter().enumerate().map(|(j, e)| e * v[j * d + c] as f64).sum::<f64>() / sum));
        }
        let mut simd_bits: Option<Vec<u32>> = None;
        for isa in Isa::supported() {
            let mut y = vec![f32::NAN; heads * d];
            attend_with(isa, &q, &k, &v, d, scale, &mut y).unwrap();
            for (i, (&got, &w)) in y.iter().zip(&want).enumerate() {
                assert!((got as f64 - w).abs() <= 1e-5 * w.abs().max(1.0), "{isa:?} {heads} heads, d {d}, t {t} [{i}]: {got} vs {w}");
            }
            // The vector paths tile scores and value sums by their register files (16 or 32
            // vector registers: 1 to 8 keys per tile, whole or one at a time) but add in the same
            // order: the same bits.
            if isa != Isa::Reference {
                let bits: Vec<u32> = y.iter().map(|x| x.to_bits()).collect();
                assert_eq!(
                    simd_bits.get_or_insert_with(|| bits.clone()),
                    &bits,
                    "{isa:?} {heads} heads, d {d}, t {t}: other bits than the first vector path"
                );
            }
            // The positions cut into 2 or 3 ranges (as decoding threads split them), each part
            // with its own softmax maximum and sum, merged.
            for splits in [2, 3].into_iter().filter(|&s| s <= t) {
                let len = part_len(heads, d);
                let mut parts = vec![f32::NAN; splits * len];
                for (s, part) in parts.chunks_mut(len).enumerate() {
                    let rows = s * t / splits * d..(s + 1) * t / splits * d;
                    attend_part_with(isa, &q, &k[rows.clone()], &v[rows], d, scale, part).unwrap();
                }
                let mut y = vec![f32::NAN; heads * d];
                combine_parts(&parts, splits, d, &mut y).unwrap();
                for (i, (&got, &w)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (got as f64 - w).abs() <= 1e-5 * w.abs().max(1.0),
                        "{isa:?} {splits} parts, {heads} heads, d {d}, t {t} [{i}]: {got} vs {w}"
                    );
                }
            }
        }
    }
    assert!(combine_parts(&[0.0; 7], 2, 1, &mut [0.0; 1]).is_err(), "2 parts of one head of 1 value are 6 values");
    // Keys not whole rows, keys and values of different lengths, no keys, output unlike query:
    // (query, key, value and output lengths), heads of 4.
    for (nq, nk, nv, ny) in [(4, 6, 6, 4), (4, 8, 4, 4), (4, 0, 0, 4), (8, 8, 8, 4)] {
        let (q, k, v) = (vec![1.0; nq], vec![0.0; nk], vec![0.0; nv]);
        let e = attend_with(Isa::best(), &q, &k, &v, 4, 1.0, &mut vec![0.0; ny]).unwrap_err().to_string();
        assert!(e.contains("attention"), "{e}");
    }
}

/// The vectorised exact GELU against candle's (`x/2 · (1 + erf(x/√2))` with its own erf):
/// Abramowitz & Stegun's erf is within 1.5e-7, so the two agree to ~1e-7 · |x|; large
/// negative inputs give 0 and large positive ones themselves; lengths with and without a whole
/// number of vectors. Golden: GELU(0) = 0 and GELU(−x) = GELU(x) − x.
#[test]
fn gelu_erf_matches_candle() {
    use candle_quant::kernels::{gelu_erf, gelu_erf_scalar};
    let mut rng = common::Rng::new(5);
    for n in [1, 7, 8, 9, 100] {
        let mut x: Vec<f32> = rng.normals(n, 3.0);
        x[0] = [0.0, -12.0, 12.0, -0.5, 40.0][n % 5];
        let want: Vec<f32> = Tensor::new(x.as_slice(), &Device::Cpu).unwrap().gelu_erf().unwrap().to_vec1().unwrap();
        let scalar: Vec<f32> = x.iter().map(|&v| gelu_erf_scalar(v)).collect();
        let mut got = x.clone();
        gelu_erf(&mut got);
        for i in 0..n {
            let tol = 4e-7 * x[i].abs().max(1.0);
            assert!((got[i] - want[i]).abs() <= tol, "x = {}: {} vs candle {}", x[i], got[i], want[i]);
            assert!((scalar[i] - want[i]).abs() <= tol, "scalar x = {}: {} vs candle {}", x[i], scalar[i], want[i]);
        }
    }
    let mut g = [0.0, 1.5, -1.5, -100.0];
    gelu_erf(&mut g);
    assert_eq!(g[0], 0.0);
    assert!((g[2] - (g[1] - 1.5)).abs() <= 1e-6, "{g:?}");
    assert_eq!(g[3], 0.0);
}

/// SwiGLU's `silu(gate) · up` on the best path and the portable one against an f64 reference,
/// lengths with and without a whole number of 8-value vectors, values out to where `e^(−|x|)`
/// underflows; golden: silu(0) = 0, silu(x) − silu(−x) = x, NaN stays NaN.
#[test]
fn silu_mul_matches_a_direct_sigmoid() {
    use candle_quant::kernels::{silu_mul, silu_scalar};
    let mut rng = common::Rng::new(9);
    for n in [1, 7, 8, 9, 100, 1536] {
        let mut gate: Vec<f32> = rng.normals(n, 4.0);
        gate[0] = [0.0, -100.0, 100.0, -0.5, 20.0, -20.0][n % 6];
        let up: Vec<f32> = rng.normals(n, 1.0);
        let mut got = vec![0f32; n];
        silu_mul(&gate, &up, &mut got).unwrap();
        for i in 0..n {
            let (g, u) = (gate[i] as f64, up[i] as f64);
            let want = g / (1.0 + (-g).exp()) * u;
            let tol = 1e-6 * (g.abs() * u.abs()).max(1e-30);
            assert!((got[i] as f64 - want).abs() <= tol, "silu({g})·{u}: {} vs {want}", got[i]);
            let scalar = silu_scalar(gate[i]) as f64 * u;
            assert!((scalar - want).abs() <= tol, "scalar silu({g})·{u}: {scalar} vs {want}");
        }
    }
    let mut out = [0f32; 4];
    silu_mul(&[0.0, 2.5, -2.5, f32::NAN], &[1.0; 4], &mut out).unwrap();
    assert_eq!(out[0], 0.0);
    assert!((out[1] - out[2] - 2.5).abs() <= 1e-6, "{out:?}");
    assert!(out[3].is_nan());
    assert!(silu_mul(&[1.0; 3], &[1.0; 2], &mut [0.0; 3]).is_err());
}

/// The RMSNorm kernel gives candle's fused RMSNorm bit for bit: rows of 1 to 600 values (whole
/// 8-value vectors and not), fewer and more than eight rows (the x86 path sums eight rows per
/// register, the rest one by one), and enough rows to be shared over the kernel team; wrong
/// lengths are errors.
#[test]
fn rms_norm_equals_candles_bit_for_bit() {
    use candle_quant::kernels::rms_norm;
    let mut rng = common::Rng::new(5);
    for (rows, n) in [(1, 1), (3, 7), (8, 8), (13, 64), (9, 576), (300, 576), (67, 600)] {
        let x: Vec<f32> = rng.normals(rows * n, 1.0).iter().enumerate().map(|(i, v)| v * (1 + i % 5) as f32).collect();
        let alpha = rng.normals(n, 1.0);
        let eps = 1e-5;
        let want = candle_nn::ops::rms_norm(
            &Tensor::from_vec(x.clone(), (rows, n), &Device::Cpu).unwrap(),
            &Tensor::from_vec(alpha.clone(), n, &Device::Cpu).unwrap(),
            eps,
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        let mut got = vec![f32::NAN; rows * n];
        rms_norm(&x, n, &alpha, eps, &mut got).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "{rows} rows of {n}");
    }
    assert!(rms_norm(&[1.0; 6], 4, &[1.0; 4], 1e-5, &mut [0.0; 6]).is_err(), "6 values are not rows of 4");
    assert!(rms_norm(&[1.0; 8], 4, &[1.0; 3], 1e-5, &mut [0.0; 8]).is_err(), "3 weights for rows of 4");
}
