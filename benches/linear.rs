//! Criterion benchmarks of one linear layer: int8 dynamic QLinear vs candle f32 Linear vs
//! candle Q8_0 QMatMul, on SmolLM2's 576→1536 and 1536→576 shapes at M = 1 and 128.
//! Run: `cargo bench --bench linear`

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Module, Tensor};
use candle_nn::Linear;
use candle_quant::convert::{quantize_dynamic, quantize_ggml, QuantConfig};
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
        let mut q8 = QLinear::from_linear(&float, "bench").unwrap();
        quantize_ggml(&mut q8, &config, GgmlDType::Q8_0).unwrap();
        let mut group = c.benchmark_group(format!("linear_{k}x{n}"));
        for m in [1usize, 128] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            group.bench_with_input(BenchmarkId::new("int8", m), &x, |b, x| b.iter(|| int8.forward(x).unwrap()));
            group.bench_with_input(BenchmarkId::new("f32", m), &x, |b, x| b.iter(|| float.forward(x).unwrap()));
            group.bench_with_input(BenchmarkId::new("q8_0", m), &x, |b, x| b.iter(|| q8.forward(x).unwrap()));
        }
        group.finish();
    }
}

criterion_group!(benches, linear);
criterion_main!(benches);
