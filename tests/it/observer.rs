//! observer/: min/max (plain, moving average, per channel), histogram, percentile.

use crate::common;

use candle_core::{Device, Tensor};
use candle_quant::observer::{HistogramObserver, MinMaxObserver, Observer};
use candle_quant::quant::{quantization_mse, QDType, QScheme, QSpec};
use proptest::prelude::*;

const AFFINE_U8: QSpec = QSpec { dtype: QDType::QUInt8, scheme: QScheme::Affine, reduce_range: false, narrow_range: false };

fn t(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

#[test]
fn minmax_golden() {
    // Batches [-1, 2] and [0.5, 3] -> range [-1, 3] -> scale 4/255, zero_point round(63.75) = 64.
    let mut o = MinMaxObserver::new(AFFINE_U8);
    o.observe(&t(&[-1.0, 2.0])).unwrap();
    o.observe(&t(&[0.5, 3.0])).unwrap();
    let p = o.qparams().unwrap();
    assert_eq!((p.scales()[0], p.zero_points()[0]), (4.0 / 255.0, 64));
}

#[test]
fn moving_average_golden() {
    // c = 0.5: first batch sets [-1, 1]; second [-3, 5] gives min = -1 + 0.5(-3 + 1) = -2,
    // max = 1 + 0.5(5 - 1) = 3 -> scale 5/255, zero_point 0 - round(-2 / (5/255)) = 102.
    let mut o = MinMaxObserver::moving_average(AFFINE_U8, 0.5).unwrap();
    o.observe(&t(&[-1.0, 1.0])).unwrap();
    o.observe(&t(&[-3.0, 5.0])).unwrap();
    assert_eq!(o.range().unwrap(), (&[-2.0f32][..], &[3.0f32][..]));
    let p = o.qparams().unwrap();
    assert_eq!((p.scales()[0], p.zero_points()[0]), (5.0 / 255.0, 102));
    assert!(MinMaxObserver::moving_average(AFFINE_U8, 0.0).is_err());
    assert!(MinMaxObserver::moving_average(AFFINE_U8, 1.5).is_err());
}

#[test]
fn per_channel_golden() {
    // Rows [1, -2] and [3, 4] along axis 0: ranges [-2, 1] and [0, 4] (widened to 0);
    // narrow symmetric scales 2/127 and 4/127.
    let mut o = MinMaxObserver::per_channel(QSpec::WEIGHT, 0);
    o.observe(&Tensor::new(&[[1f32, -2.0], [3.0, 4.0]], &Device::Cpu).unwrap()).unwrap();
    let p = o.qparams().unwrap();
    assert_eq!(p.scales(), vec![2.0 / 127.0, 4.0 / 127.0]);
    // Moving-average per channel: second batch [[3, 0], [1, 2]] -> channel 0 [-2 + 0.5·2, 1 + 0.5·2] = [-1, 2].
    let mut o = MinMaxObserver::moving_average_per_channel(QSpec::WEIGHT, 0, 0.5).unwrap();
    o.observe(&Tensor::new(&[[1f32, -2.0], [3.0, 4.0]], &Device::Cpu).unwrap()).unwrap();
    o.observe(&Tensor::new(&[[3f32, 0.0], [1.0, 2.0]], &Device::Cpu).unwrap()).unwrap();
    assert_eq!(o.range().unwrap().0[0], -1.0);
    assert_eq!(o.range().unwrap().1[0], 2.0);
    // A tensor with a different channel count is refused.
    let e = o.observe(&Tensor::ones((3, 2), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap_err();
    assert!(e.to_string().contains("tracks 2 channels"), "{e}");
}

#[test]
fn non_finite_values_are_skipped_and_counted() {
    let mut o = MinMaxObserver::new(AFFINE_U8);
    o.observe(&t(&[f32::NAN, -1.0, f32::INFINITY, 3.0, f32::NEG_INFINITY])).unwrap();
    assert_eq!(o.nonfinite_count(), 3);
    assert_eq!(o.qparams().unwrap().zero_points()[0], 64);
    let mut h = HistogramObserver::new(AFFINE_U8, 64).unwrap();
    h.observe(&t(&[f32::NAN, f32::NAN])).unwrap();
    assert_eq!(h.nonfinite_count(), 2);
    assert!(h.qparams().is_err(), "only NaN seen: no range yet");
}

#[test]
fn empty_observers_and_inputs_are_errors() {
    let observers: Vec<Box<dyn Observer>> = vec![
        Box::new(MinMaxObserver::new(AFFINE_U8)),
        Box::new(MinMaxObserver::per_channel(AFFINE_U8, 0)),
        Box::new(HistogramObserver::new(AFFINE_U8, 128).unwrap()),
        Box::new(HistogramObserver::percentile(AFFINE_U8, 99.9, 128).unwrap()),
    ];
    for mut o in observers {
        let e = o.qparams().unwrap_err().to_string();
        assert!(e.contains("has not observed"), "{e}");
        let empty = Tensor::zeros((0, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(o.observe(&empty).unwrap_err().to_string().contains("empty"));
        let ints = Tensor::new(&[1u8, 2], &Device::Cpu).unwrap();
        assert!(o.observe(&ints).unwrap_err().to_string().contains("float"));
        o.observe(&t(&[1.0, 2.0])).unwrap();
        assert!(o.qparams().is_ok());
        o.reset();
        assert!(o.qparams().is_err(), "reset forgets");
    }
    assert!(HistogramObserver::new(AFFINE_U8, 1).is_err());
    assert!(HistogramObserver::percentile(AFFINE_U8, 40.0, 128).is_err());
}

#[test]
fn histogram_beats_minmax_with_an_outlier() {
    // 1M standard normal values and one outlier at 50. Min/max must cover 50, so its step is
    // ~55/255 ≈ 0.22 and its MSE ≈ 0.22²/12 ≈ 4e-3; clipping near 5 costs (50-5)²/1e6 ≈ 2e-3 for
    // the outlier but shrinks everyone's step tenfold.
    let mut rng = common::Rng::new(7);
    let mut v = rng.normals(1_000_000, 1.0);
    v[123] = 50.0;
    let x = Tensor::from_vec(v, 1_000_000, &Device::Cpu).unwrap();
    let mut mm = MinMaxObserver::new(AFFINE_U8);
    let mut hist = HistogramObserver::new(AFFINE_U8, 2048).unwrap();
    // Observe in chunks so the histogram has to grow its range.
    for chunk in 0..4 {
        let part = x.narrow(0, chunk * 250_000, 250_000).unwrap();
        mm.observe(&part).unwrap();
        hist.observe(&part).unwrap();
    }
    let (mse_mm, mse_hist) =
        (quantization_mse(&x, &mm.qparams().unwrap()).unwrap(), quantization_mse(&x, &hist.qparams().unwrap()).unwrap());
    assert!(mse_hist < 0.8 * mse_mm, "histogram MSE {mse_hist} vs min/max {mse_mm}");
}

#[test]
fn histogram_keeps_the_full_range_when_clipping_does_not_pay() {
    // Uniform data: nothing to clip, the chosen range must stay close to [min, max].
    let v: Vec<f32> = (0..10_000).map(|i| i as f32 / 10_000.0 * 4.0 - 1.0).collect();
    let x = Tensor::from_vec(v, 10_000, &Device::Cpu).unwrap();
    let mut mm = MinMaxObserver::new(AFFINE_U8);
    let mut hist = HistogramObserver::new(AFFINE_U8, 2048).unwrap();
    mm.observe(&x).unwrap();
    hist.observe(&x).unwrap();
    let (a, b) = (mm.qparams().unwrap().scales()[0], hist.qparams().unwrap().scales()[0]);
    assert!((a - b).abs() / a < 0.02, "min/max scale {a}, histogram scale {b}");
}

#[test]
fn percentile_clips_tails() {
    // 0, 1, ..., 9999 (and nothing else): the 99th percentile is ≈ 9900 (within a bin of
    // 10000/1000 = 10) and the 1st ≈ 100; symmetric takes max(|lo|, |hi|) ≈ 9900.
    let v: Vec<f32> = (0..10_000).map(|i| i as f32).collect();
    let mut o = HistogramObserver::percentile(QSpec::WEIGHT, 99.0, 1000).unwrap();
    o.observe(&Tensor::from_vec(v, 10_000, &Device::Cpu).unwrap()).unwrap();
    let s = o.qparams().unwrap().scales()[0];
    assert!((s * 127.0 - 9900.0).abs() < 20.0, "scale {s} → range {}", s * 127.0);
}

proptest! {
    #[test]
    fn minmax_does_not_depend_on_batch_order(seed in any::<u64>(), batches in 1usize..6, per_channel in any::<bool>()) {
        let mut rng = common::Rng::new(seed);
        let xs: Vec<Tensor> = (0..batches).map(|_| rng.tensor(&[3, 5], 2.0).unwrap()).collect();
        let make = || if per_channel { MinMaxObserver::per_channel(AFFINE_U8, 1) } else { MinMaxObserver::new(AFFINE_U8) };
        let (mut fwd, mut rev) = (make(), make());
        xs.iter().for_each(|x| fwd.observe(x).unwrap());
        xs.iter().rev().for_each(|x| rev.observe(x).unwrap());
        prop_assert_eq!(fwd.qparams().unwrap(), rev.qparams().unwrap());
        // Same as seeing everything at once.
        let mut all = make();
        all.observe(&Tensor::cat(&xs, 0).unwrap()).unwrap();
        prop_assert_eq!(fwd.qparams().unwrap(), all.qparams().unwrap());
    }
}
