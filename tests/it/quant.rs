//! quant/: the scale/zero-point formula, quantize/dequantize, fake quantization.

use crate::common;

use candle_core::{DType, Device, Tensor, Var};
use candle_quant::quant::{fake_quantize, Granularity, QDType, QParams, QScheme, QSpec, QuantizedTensor, SCALE_EPS};
use proptest::prelude::*;

const AFFINE_U8: QSpec = QSpec { dtype: QDType::QUInt8, scheme: QScheme::Affine, reduce_range: false, narrow_range: false };
const SYM_I8: QSpec = QSpec { dtype: QDType::QInt8, scheme: QScheme::Symmetric, reduce_range: false, narrow_range: false };
const AFFINE_I8: QSpec = QSpec { dtype: QDType::QInt8, scheme: QScheme::Affine, reduce_range: false, narrow_range: false };

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-6 * b.abs().max(1.0)
}

#[test]
fn golden_affine_quint8() {
    // [-1, 3] on [0, 255]: scale = (3 - (-1)) / (255 - 0) = 4/255 ≈ 0.0156863,
    // zero_point = 0 - round(-1 / (4/255)) = round(63.75) = 64.
    let (s, z) = AFFINE_U8.scale_zero_point(-1.0, 3.0).unwrap();
    assert!(close(s, 4.0 / 255.0));
    assert_eq!(z, 64);
}

#[test]
fn golden_symmetric() {
    // max(|-2|, |1|) = 2 over (127 - (-128)) / 2 = 127.5: scale = 2/127.5; zero_point (-128+127+1)/2 = 0.
    let (s, z) = SYM_I8.scale_zero_point(-2.0, 1.0).unwrap();
    assert!(close(s, 2.0 / 127.5));
    assert_eq!(z, 0);
    // quint8: same scale, zero_point (0 + 255 + 1) / 2 = 128.
    let sym_u8 = QSpec::new(QDType::QUInt8, QScheme::Symmetric);
    assert_eq!(sym_u8.scale_zero_point(-2.0, 1.0).unwrap(), (s, 128));
    // Narrow range [-127, 127]: scale = 2 / 127, zero_point 0 — the crate's weight format.
    let (s, z) = QSpec::WEIGHT.scale_zero_point(-2.0, 1.0).unwrap();
    assert!(close(s, 2.0 / 127.0));
    assert_eq!(z, 0);
}

#[test]
fn golden_reduce_range_and_widening() {
    // reduce_range quint8 is [0, 127]; [0, 1.27] -> scale 1.27/127 = 0.01, zero_point 0.
    let spec = AFFINE_U8.with_reduce_range(true);
    assert_eq!(spec.qrange(), (0, 127));
    let (s, z) = spec.scale_zero_point(0.0, 1.27).unwrap();
    assert!(close(s, 0.01));
    assert_eq!(z, 0);
    // reduce_range qint8 is [-64, 63].
    assert_eq!(SYM_I8.with_reduce_range(true).qrange(), (-64, 63));
    // [2, 4] is widened to [0, 4] so 0.0 stays exact: scale 4/255, zero_point 0.
    let (s, z) = AFFINE_U8.scale_zero_point(2.0, 4.0).unwrap();
    assert!(close(s, 4.0 / 255.0));
    assert_eq!(z, 0);
    // [-4, -2] -> [-4, 0]: zero_point = 0 - round(-4 / (4/255)) = 255.
    assert_eq!(AFFINE_U8.scale_zero_point(-4.0, -2.0).unwrap().1, 255);
}

#[test]
fn constant_and_zero_tensors_get_valid_scales() {
    // All zeros: the range [0, 0] gives the floor scale and 0.0 maps to the zero point.
    let (s, z) = AFFINE_U8.scale_zero_point(0.0, 0.0).unwrap();
    assert_eq!((s, z), (SCALE_EPS, 0));
    let x = Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap();
    let p = QParams::from_tensor(SYM_I8, Granularity::PerChannel { axis: 0 }, &x).unwrap();
    let q = QuantizedTensor::quantize(&x, &p).unwrap();
    assert!(q.values().iter().all(|&v| v == 0));
    // A constant 5.0 tensor is representable: scale 5/255 (affine u8), 5.0 maps to 255 and back.
    let x = Tensor::full(5f32, (2, 2), &Device::Cpu).unwrap();
    let p = QParams::from_tensor(AFFINE_U8, Granularity::PerTensor, &x).unwrap();
    let back = QuantizedTensor::quantize(&x, &p).unwrap().dequantize(&Device::Cpu).unwrap();
    assert!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| close(*v, 5.0)));
}

#[test]
fn golden_quantize_rounding_and_clamping() {
    // scale 0.5, zero_point 10, qint8: 1.25/0.5 = 2.5 rounds half-to-even to 2 -> 12;
    // 1.75/0.5 = 3.5 -> 4 -> 14; 100/0.5 = 200 -> +10 = 210 clamps to 127; -100 -> -128;
    // dequantize 12 -> (12 - 10) * 0.5 = 1.0.
    let p = QParams::new(AFFINE_I8, Granularity::PerTensor, vec![0.5], vec![10]).unwrap();
    let x = Tensor::new(&[1.25f32, 1.75, 100.0, -100.0, 0.0], &Device::Cpu).unwrap();
    let q = QuantizedTensor::quantize(&x, &p).unwrap();
    assert_eq!(q.values(), vec![12, 14, 127, -128, 10]);
    let back = q.dequantize(&Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(back, vec![1.0, 2.0, 58.5, -69.0, 0.0]);
}

#[test]
fn quint8_storage_round_trips() {
    // quint8 values 0 and 255 survive the i8 storage offset.
    let p = QParams::new(AFFINE_U8, Granularity::PerTensor, vec![1.0], vec![0]).unwrap();
    let x = Tensor::new(&[0f32, 255.0, 128.0, 300.0], &Device::Cpu).unwrap();
    assert_eq!(QuantizedTensor::quantize(&x, &p).unwrap().values(), vec![0, 255, 128, 255]);
}

#[test]
fn half_precision_inputs() {
    let x = Tensor::new(&[-1f32, 0.5, 3.0], &Device::Cpu).unwrap();
    let p = QParams::from_tensor(AFFINE_U8, Granularity::PerTensor, &x).unwrap();
    let want = QuantizedTensor::quantize(&x, &p).unwrap().values();
    for dt in [DType::F16, DType::BF16] {
        assert_eq!(QuantizedTensor::quantize(&x.to_dtype(dt).unwrap(), &p).unwrap().values(), want, "{dt:?}");
    }
}

#[test]
fn per_group_layout() {
    // Row of 5 with groups of 2: slots [0,0,1,1,2] then [3,3,4,4,5].
    let x = Tensor::new(&[[1.5f32, -2.0, 4.0, 0.5, 8.0], [0.0, 0.0, 1.0, 1.0, -1.0]], &Device::Cpu).unwrap();
    let p = QParams::from_tensor(SYM_I8.with_narrow_range(true), Granularity::PerGroup { size: 2 }, &x).unwrap();
    // Group maxima 2, 4, 8, 0, 1, 1 -> scales m/127 (0 floors to eps);
    // 1.5 / (2/127) = 95.25 -> 95, 0.5 / (4/127) = 15.875 -> 16.
    let want = [2.0f32, 4.0, 8.0, 0.0, 1.0, 1.0].map(|m| (m / 127.0).max(SCALE_EPS));
    assert_eq!(p.scales(), want);
    let q = QuantizedTensor::quantize(&x, &p).unwrap().values();
    assert_eq!(q, vec![95, -127, 127, 16, 127, 0, 0, 127, 127, -127]);
}

#[test]
fn fake_quant_straight_through_gradient() {
    // scale 0.1, zero_point 0, qint8 range [-128, 127] covers [-12.8, 12.7]:
    // 0.26 -> 0.3, -0.04 -> -0.0, 20 -> 12.7 (clipped), -13 -> -12.8 (clipped).
    let p = QParams::new(SYM_I8, Granularity::PerTensor, vec![0.1], vec![0]).unwrap();
    let x = Var::new(&[0.26f32, -0.04, 20.0, -13.0], &Device::Cpu).unwrap();
    let y = fake_quantize(x.as_tensor(), &p).unwrap();
    let got = y.to_vec1::<f32>().unwrap();
    for (g, w) in got.iter().zip([0.3f32, 0.0, 12.7, -12.8]) {
        assert!((g - w).abs() < 1e-6, "{got:?}");
    }
    // d(Σ 3·fq(x))/dx = 3 inside the range, 0 where clipped.
    let grads = (y * 3.0).unwrap().sum_all().unwrap().backward().unwrap();
    let g = grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(g, vec![3.0, 3.0, 0.0, 0.0]);
}

#[test]
fn learned_step_size_gradients() {
    // s = 0.1, z = 0, [-128, 127]: the same values as above, and d fq / d s per element:
    // 0.26 → r = 2.6, round 3: 3 − 2.6 = 0.4; −0.04 → −0.4, round 0: 0.4;
    // 20 clipped to 127: 127; −13 clipped to −128: −128. Σ = 0.4 + 0.4 + 127 − 128 = −0.2.
    let x = Var::new(&[0.26f32, -0.04, 20.0, -13.0], &Device::Cpu).unwrap();
    let s = Var::new(&[0.1f32], &Device::Cpu).unwrap();
    let y = candle_quant::quant::fake_quantize_learned(x.as_tensor(), s.as_tensor(), 0, &SYM_I8).unwrap();
    let got = y.to_vec1::<f32>().unwrap();
    for (g, w) in got.iter().zip([0.3f32, 0.0, 12.7, -12.8]) {
        assert!((g - w).abs() < 1e-6, "{got:?}");
    }
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert_eq!(grads.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 1.0, 0.0, 0.0]);
    let gs = grads.get(s.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0];
    assert!((gs + 0.2).abs() < 1e-5, "d/ds = {gs}");
    // A step size that is not a positive number is an error, not NaNs.
    let bad = Tensor::new(&[-0.1f32], &Device::Cpu).unwrap();
    assert!(candle_quant::quant::fake_quantize_learned(x.as_tensor(), &bad, 0, &SYM_I8).is_err());
}

#[test]
fn bad_inputs_are_errors() {
    let dev = Device::Cpu;
    // Integer dtype.
    let xi = Tensor::new(&[1u32, 2], &dev).unwrap();
    let e = QParams::from_tensor(SYM_I8, Granularity::PerTensor, &xi).unwrap_err().to_string();
    assert!(e.contains("expected a float tensor"), "{e}");
    // Empty tensor.
    let empty = Tensor::zeros((0, 4), DType::F32, &dev).unwrap();
    let e = QParams::from_tensor(SYM_I8, Granularity::PerTensor, &empty).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
    // Axis out of range, parameter count mismatch, bad scale, zero point out of range.
    let x = Tensor::ones((2, 3), DType::F32, &dev).unwrap();
    assert!(QParams::from_tensor(SYM_I8, Granularity::PerChannel { axis: 2 }, &x).unwrap_err().to_string().contains("axis 2"));
    let p = QParams::new(SYM_I8, Granularity::PerChannel { axis: 0 }, vec![1.0; 3], vec![0; 3]).unwrap();
    assert!(QuantizedTensor::quantize(&x, &p).unwrap_err().to_string().contains("needs 2"));
    assert!(QParams::new(SYM_I8, Granularity::PerTensor, vec![0.0], vec![0]).is_err());
    assert!(QParams::new(AFFINE_U8, Granularity::PerTensor, vec![1.0], vec![300]).is_err());
    assert!(SYM_I8.scale_zero_point(f32::NAN, 1.0).is_err());
    assert!(SYM_I8.scale_zero_point(2.0, 1.0).is_err());
    assert!(QParams::from_tensor(SYM_I8, Granularity::PerGroup { size: 0 }, &x).is_err());
}

fn spec_strategy() -> impl Strategy<Value = QSpec> {
    (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(u8_, sym, rr, narrow)| QSpec {
        dtype: if u8_ { QDType::QUInt8 } else { QDType::QInt8 },
        scheme: if sym { QScheme::Symmetric } else { QScheme::Affine },
        reduce_range: rr,
        narrow_range: narrow,
    })
}

proptest! {
    #[test]
    fn round_trip_error_within_half_scale(spec in spec_strategy(), lo in -1e3f32..1e3, span in 1e-3f32..1e3, t in 0f32..=1.0) {
        let hi = lo + span;
        let (scale, zp) = spec.scale_zero_point(lo, hi).unwrap();
        // Any x inside the widened range [min(lo,0), max(hi,0)] comes back within scale/2
        // (plus float rounding of x * (1/scale)).
        let (a, b) = (lo.min(0.0), hi.max(0.0));
        let x = a + t * (b - a);
        let q = spec.quantize_value(x, scale, zp);
        let back = candle_quant::quant::dequantize_value(q, scale, zp);
        // Symmetric qint8 reaches -amax but its top code is amax - scale/2: allow that edge.
        prop_assert!((back - x).abs() <= scale * 0.5 * (1.0 + 1e-4) + 1e-4 * x.abs(), "x={x} back={back} scale={scale}");
    }

    #[test]
    fn zero_is_exact(spec in spec_strategy(), lo in -1e4f32..1e4, span in 0f32..1e4) {
        let (scale, zp) = spec.scale_zero_point(lo, lo + span).unwrap();
        let q = spec.quantize_value(0.0, scale, zp);
        prop_assert_eq!(q, zp);
        prop_assert_eq!(candle_quant::quant::dequantize_value(q, scale, zp), 0.0);
    }

    #[test]
    fn symmetric_zero_points(lo in -1e3f32..1e3, span in 0f32..1e3, rr in any::<bool>()) {
        let s8 = QSpec::new(QDType::QInt8, QScheme::Symmetric).with_reduce_range(rr);
        let u8_ = QSpec::new(QDType::QUInt8, QScheme::Symmetric).with_reduce_range(rr);
        prop_assert_eq!(s8.scale_zero_point(lo, lo + span).unwrap().1, 0);
        prop_assert_eq!(u8_.scale_zero_point(lo, lo + span).unwrap().1, if rr { 64 } else { 128 });
    }

    /// Weights (symmetric narrow-range qint8, quantized with the CPU's vectors) get exactly the
    /// scalar formula's values, element by element — ties (scale 1 when max |x| = 127, halves
    /// round to even), groups that hold NaN or ±Inf (scalar fallback) and ragged groups included.
    #[test]
    fn weight_quantization_equals_the_scalar_formula(seed in any::<u64>(), rows in 1usize..4, cols in 1usize..200, group in 1usize..80, ties in any::<bool>(), bad in any::<bool>()) {
        let mut rng = common::Rng::new(seed);
        let mut v: Vec<f32> = if ties {
            (0..rows * cols).map(|i| if i % 5 == 0 { 127.0 } else { (rng.next_u64() % 255) as f32 - 127.0 + 0.5 }).collect()
        } else {
            rng.normals(rows * cols, 2.0)
        };
        if bad {
            let i = (rng.next_u64() % v.len() as u64) as usize;
            v[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][i % 3];
        }
        let x = Tensor::from_vec(v.clone(), (rows, cols), &Device::Cpu).unwrap();
        let p = QParams::from_tensor(QSpec::WEIGHT, Granularity::PerGroup { size: group }, &x).unwrap();
        let q = QuantizedTensor::quantize(&x, &p).unwrap().values();
        let groups = cols.div_ceil(group);
        for (i, (&qi, &xi)) in q.iter().zip(&v).enumerate() {
            let scale = p.scales()[(i / cols) * groups + (i % cols) / group];
            prop_assert_eq!(qi, QSpec::WEIGHT.quantize_value(xi, scale, 0), "element {} = {}", i, xi);
        }
    }

    #[test]
    fn per_channel_equals_per_tensor_per_slice(spec in spec_strategy(), seed in any::<u64>(), rows in 1usize..6, cols in 1usize..9, axis in 0usize..2) {
        let mut rng = common::Rng::new(seed);
        let x = rng.tensor(&[rows, cols], 3.0).unwrap();
        let p = QParams::from_tensor(spec, Granularity::PerChannel { axis }, &x).unwrap();
        let q = QuantizedTensor::quantize(&x, &p).unwrap().values();
        let channels = if axis == 0 { rows } else { cols };
        for c in 0..channels {
            let slice = x.narrow(axis, c, 1).unwrap().contiguous().unwrap();
            let ps = QParams::from_tensor(spec, Granularity::PerTensor, &slice).unwrap();
            prop_assert_eq!(ps.scales()[0], p.scales()[c]);
            let qs = QuantizedTensor::quantize(&slice, &ps).unwrap().values();
            let from_full: Vec<i32> = (0..qs.len()).map(|i| if axis == 0 { q[c * cols + i] } else { q[i * cols + c] }).collect();
            prop_assert_eq!(qs, from_full);
        }
    }
}
