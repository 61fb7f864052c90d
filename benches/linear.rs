//! Criterion benchmarks of one linear layer: int8 dynamic QLinear vs weight-only int8 vs
//! candle f32 Linear vs candle Q8_0 QMatMul, on SmolLM2's 576→1536 and 1536→576 shapes at
//! M = 1 and 128; and the dynamic activation quantizer on its own.
//! Run: `cargo bench --bench linear`

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Module, Tensor};
use candle_nn::Linear;
use candle_quant::convert::{quantize_dynamic, quantize_ggml, quantize_weight_only, QuantConfig};
use candle_quant::kernels::QuantizedActivations;
use candle_quant::QLinear;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn linear(c: &mut Criterion) {
    let dev = Device::Cpu;
    let config = QuantConfig::default();
    for (k, n) in [(576, 1536), (1536, 576)] {
        let w = (Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap() / (k as f64).sqrt()).unwrap();
        let float = Linear::new(w, None);
        let mut int8 = QLinear::from_linear(&float, "bench").unwrap();
        quantize_dynamic(&mut int8, &config).unwrap();
        let mut weight_only = QLinear::from_linear(&float, "bench").unwrap();
        quantize_weight_only(&mut weight_only, &config).unwrap();
        let mut q8 = QLinear::from_linear(&float, "bench").unwrap();
        quantize_ggml(&mut q8, &config, GgmlDType::Q8_0).unwrap();
        let mut group = c.benchmark_group(format!("linear_{k}x{n}"));
        for m in [1usize, 128] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            group.bench_with_input(BenchmarkId::new("int8", m), &x, |b, x| b.iter(|| int8.forward(x).unwrap()));
            group.bench_with_input(BenchmarkId::new("int8_weight_only", m), &x, |b, x| b.iter(|| weight_only.forward(x).unwrap()));
            group.bench_with_input(BenchmarkId::new("f32", m), &x, |b, x| b.iter(|| float.forward(x).unwrap()));
            group.bench_with_input(BenchmarkId::new("q8_0", m), &x, |b, x| b.iter(|| q8.forward(x).unwrap()));
        }
        group.finish();
    }
}

/// Per-group dynamic quantization of activations (groups of 32, outliers above 3 kept in float).
fn activations(c: &mut Criterion) {
    let mut group = c.benchmark_group("quantize_activations");
    for (m, k) in [(1usize, 1536usize), (128, 1536)] {
        let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m * k,), &Device::Cpu).unwrap().to_vec1().unwrap();
        group.bench_with_input(BenchmarkId::new(format!("k{k}"), m), &x, |b, x| {
            b.iter(|| QuantizedActivations::quantize_dynamic(x, m, k, 32, Some(3.0)).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, linear, activations);
criterion_main!(benches);
