//! Side-by-side timing of one linear layer: the crate's dynamic int8 `QLinear`, candle's f32
//! `Linear`, and candle's `QMatMul` in Q8_0 — measured alternately in one process so that
//! ratios are fair on a noisy machine. A benchmark, never a test.

use crate::args::ActScheme;
use crate::probe::stream_sum;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Module, Result, Tensor};
use candle_nn::Linear;
use candle_quant::convert::{quantize_dynamic, quantize_ggml, QuantConfig};
use candle_quant::kernels::{int8_linear, PackedInt8Weights, QuantizedActivations, WeightQuant};
use candle_quant::nn::ActivationQuant;
use candle_quant::QLinear;
use std::time::Instant;

/// One measured configuration; times are medians in microseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRecord {
    #[serde(rename = "in")]
    pub in_features: usize,
    #[serde(rename = "out")]
    pub out_features: usize,
    pub m: usize,
    pub threads: usize,
    /// The int8 kernel path that ran (`Isa::best()`: "Avx2", "NeonDot", …).
    pub isa: String,
    /// Bits per weight of the crate's layer (8, or 4: int4 in groups of 32); the `int8_*`
    /// fields are that layer's.
    pub bits: u32,
    /// candle's `QMatMul` format it is compared with (`q8_0_*` fields): Q8_0, or Q4_0 for int4.
    pub baseline: String,
    pub int8_us: f64,
    pub f32_us: f64,
    pub q8_0_us: f64,
    /// int8 time / f32 time.
    pub ratio_f32: f64,
    /// int8 time / Q8_0 time.
    pub ratio_q8_0: f64,
    /// Bytes of int8 weights and scales streamed per second by the int8 layer, in GB/s.
    pub int8_gb_s: f64,
    /// Multiply-adds per second of the int8 layer, in billions.
    pub int8_gmac_s: f64,
    /// `int8_gb_s` as a percentage of the machine's measured read bandwidth with as many threads
    /// ([`Bounds::read_bound`]).
    pub bandwidth_pct: f64,
    /// `int8_gmac_s` as a percentage of the kernel's in-cache peak × threads ([`Bounds`]).
    pub peak_pct: f64,
    /// The bounds those percentages divide by, as measured in this run: memory read GB/s with
    /// `threads` threads, and the one-thread in-cache kernel peak in GMAC/s.
    pub read_bound_gb_s: f64,
    pub int8_peak_gmac_s: f64,
}

/// What a linear layer could reach on this machine, measured once per benchmark run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Bounds {
    /// One thread streaming a 256 MiB buffer as eight parts side by side, as the decoding tile
    /// reads its weight blocks ([`stream_sum`], best of 5), GB/s.
    pub read_gb_s: f64,
    /// `(threads, GB/s)`: that many threads streaming their own share of the buffer at once (best
    /// of 5; bytes over the slowest thread's time) — what a layer split over them could read.
    pub read_gb_s_by_threads: Vec<(usize, f64)>,
    /// The int8 kernel on one thread with its operands in L1/L2 (128 rows × 64 outputs ×
    /// K = 512: 32 KiB of weights, 64 KiB of activations — the M = 128 tiles with the per-call
    /// work amortised), billions of multiply-adds per second.
    pub int8_peak_gmac_s: f64,
    /// The int8 kernel on one thread decoding (M = 1) through 128 distinct 576×1536 layers —
    /// `int8_stream_bytes` of weights and scales (~120 MB), far more than the L3 cache — GB/s of
    /// weights read: the decode regime, to compare with `read_gb_s`.
    pub int8_stream_gb_s: f64,
    pub int8_stream_bytes: usize,
}

impl Bounds {
    /// Runs the probes, the kernel ones on a one-thread pool; the read bound also with each of
    /// `thread_counts` threads.
    pub fn measure(thread_counts: &[usize]) -> Result<Self> {
        let pool =
            rayon::ThreadPoolBuilder::new().num_threads(1).build().map_err(|e| candle_core::Error::Msg(format!("thread pool: {e}")))?;
        pool.install(|| Self::probe(thread_counts))
    }

    /// The read bound for `threads` threads (one thread's where that count was not measured).
    pub fn read_bound(&self, threads: usize) -> f64 {
        self.read_gb_s_by_threads.iter().find(|&&(t, _)| t == threads).map_or(self.read_gb_s, |&(_, gb)| gb)
    }

    fn probe(thread_counts: &[usize]) -> Result<Self> {
        let buf: Vec<u64> = (0..(256usize << 20) / 8).map(|i| i as u64).collect();
        let read_gb_s = parallel_read_gb_s(&buf, 1);
        let read_gb_s_by_threads =
            thread_counts.iter().map(|&t| (t, if t == 1 { read_gb_s } else { parallel_read_gb_s(&buf, t) })).collect();
        drop(buf);

        let (m, k, n) = (128, 512, 64);
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let weights = PackedInt8Weights::quantize(&w, WeightQuant::default())?;
        let x: Vec<f32> = Tensor::randn(0f32, 1.0, (m * k,), &Device::Cpu)?.to_vec1()?;
        let acts = QuantizedActivations::quantize_dynamic(&x, m, k, 32, None)?;
        let mut out = vec![0f32; m * n];
        let reps = 300;
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..reps {
                int8_linear(&acts, &weights, None, &mut out)?;
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let int8_peak_gmac_s = (reps * m * k * n) as f64 / best / 1e9;

        let (k, n) = (576, 1536);
        let layers = (0..128)
            .map(|_| PackedInt8Weights::quantize(&Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?, WeightQuant::default()))
            .collect::<Result<Vec<_>>>()?;
        let x: Vec<f32> = Tensor::randn(0f32, 1.0, (k,), &Device::Cpu)?.to_vec1()?;
        let acts = QuantizedActivations::quantize_dynamic(&x, 1, k, 32, None)?;
        let mut out = vec![0f32; n];
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for w in &layers {
                int8_linear(&acts, w, None, &mut out)?;
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let bytes: usize = layers.iter().map(|w| w.nbytes()).sum();
        Ok(Self {
            read_gb_s,
            read_gb_s_by_threads,
            int8_peak_gmac_s,
            int8_stream_gb_s: bytes as f64 / best / 1e9,
            int8_stream_bytes: bytes,
        })
    }
}

/// GB/s of `threads` threads each summing its own share of `buf` at the same time, best of 5
/// rounds; a round lasts as long as its slowest thread.
fn parallel_read_gb_s(buf: &[u64], threads: usize) -> f64 {
    let threads = threads.max(1);
    let start = std::sync::Barrier::new(threads);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let slowest = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(buf.len().div_ceil(threads))
                .map(|part| {
                    let start = &start;
                    s.spawn(move || {
                        start.wait();
                        let t = Instant::now();
                        std::hint::black_box(stream_sum(part));
                        t.elapsed().as_secs_f64()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(f64::MAX)).fold(0f64, f64::max)
        });
        best = best.min(slowest);
    }
    (buf.len() * 8) as f64 / best / 1e9
}

/// The shapes of the standard table: SmolLM2's projections and larger LLM layers.
pub const SHAPES: [(usize, usize); 6] = [(576, 1536), (1536, 576), (576, 576), (2048, 2048), (2048, 8192), (4096, 4096)];

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times the three layers on an `m × in` input, alternating them, on a rayon pool of `threads`
/// (candle's CPU matmul follows `RAYON_NUM_THREADS`, which is set for the duration).
pub fn bench_linear(
    in_features: usize,
    out_features: usize,
    m: usize,
    threads: usize,
    config: &QuantConfig,
    baseline: GgmlDType,
    bounds: &Bounds,
) -> Result<BenchRecord> {
    let dev = Device::Cpu;
    let w = (Tensor::randn(0f32, 1.0, (out_features, in_features), &dev)? / (in_features as f64).sqrt())?;
    let float = Linear::new(w, None);
    let mut int8 = QLinear::from_linear(&float, "bench")?;
    quantize_dynamic(&mut int8, config)?;
    let mut q8 = QLinear::from_linear(&float, "bench")?;
    quantize_ggml(&mut q8, config, baseline)?;
    let x = Tensor::randn(0f32, 1.0, (m, in_features), &dev)?;
    let pool =
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().map_err(|e| candle_core::Error::Msg(format!("thread pool: {e}")))?;
    let previous = std::env::var("RAYON_NUM_THREADS").ok();
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let result = pool.install(|| -> Result<[f64; 3]> {
        let layers: [&dyn Module; 3] = [&int8, &float, &q8];
        for l in layers {
            l.forward(&x)?; // warm-up
        }
        // Each timed batch is a run of consecutive calls (about 1 ms), as a model calls its
        // layers back to back; the three layers' batches alternate, enough rounds for ~0.3 s of
        // f32 batches (between 5 and 200).
        let t = Instant::now();
        layers[1].forward(&x)?;
        let once = t.elapsed().as_secs_f64().max(1e-6);
        let reps = ((1e-3 / once) as usize).clamp(1, 100);
        let rounds = ((0.3 / (once * reps as f64)) as usize).clamp(5, 200);
        let mut times = [vec![], vec![], vec![]];
        for _ in 0..rounds {
            for (i, l) in layers.iter().enumerate() {
                // One untimed call first: in a model the previous layer has just run, so a
                // parked helper thread (after the other layers' batches) is not part of the cost.
                l.forward(&x)?;
                let t = Instant::now();
                for _ in 0..reps {
                    l.forward(&x)?;
                }
                times[i].push(t.elapsed().as_secs_f64() * 1e6 / reps as f64);
            }
        }
        Ok([median(&mut times[0]), median(&mut times[1]), median(&mut times[2])])
    });
    match previous {
        Some(v) => std::env::set_var("RAYON_NUM_THREADS", v),
        None => std::env::remove_var("RAYON_NUM_THREADS"),
    }
    let [int8_us, f32_us, q8_0_us] = result?;
    let int8_gb_s = int8.weight_bytes() as f64 / int8_us / 1e3;
    let int8_gmac_s = (m * in_features * out_features) as f64 / int8_us / 1e3;
    let read_bound_gb_s = bounds.read_bound(threads);
    Ok(BenchRecord {
        in_features,
        out_features,
        m,
        threads,
        isa: format!("{:?}", candle_quant::runtime::Isa::best()),
        bits: config.weight.bits(),
        baseline: format!("{baseline:?}"),
        int8_us,
        f32_us,
        q8_0_us,
        ratio_f32: int8_us / f32_us,
        ratio_q8_0: int8_us / q8_0_us,
        int8_gb_s,
        int8_gmac_s,
        bandwidth_pct: 100.0 * int8_gb_s / read_bound_gb_s,
        peak_pct: 100.0 * int8_gmac_s / (bounds.int8_peak_gmac_s * threads as f64),
        read_bound_gb_s,
        int8_peak_gmac_s: bounds.int8_peak_gmac_s,
    })
}

/// The `bench` command: every shape of [`SHAPES`] (or those with the given input sizes) at each M
/// and thread count, as a table or JSON records.
pub fn run(m: Vec<usize>, threads: Vec<usize>, in_features: &[usize], act_scheme: ActScheme, bits: u32, json: bool) -> anyhow::Result<()> {
    let ms = if m.is_empty() { vec![1, 16, 128] } else { m };
    let ts = if threads.is_empty() { vec![1, 2] } else { threads };
    if let Some(bad) = ms.iter().chain(&ts).find(|&&v| v == 0) {
        anyhow::bail!("bench: --m and --threads must be at least 1, got {bad}")
    }
    let mut config = QuantConfig::default().activation(ActivationQuant::with_group(act_scheme == ActScheme::Affine, Some(32)));
    let (label, baseline) = match bits {
        8 => ("int8", GgmlDType::Q8_0),
        4 => {
            config = config.weight(WeightQuant::Int4 { group: 32, zero_point: false });
            ("int4", GgmlDType::Q4_0)
        }
        b => anyhow::bail!("bench: --bits {b}: weights are int8 (8) or int4 (4)"),
    };
    let base = format!("{baseline:?}").to_lowercase();
    let bounds = Bounds::measure(&ts)?;
    let mut records = vec![];
    if !json {
        println!("{label} kernel path: {:?}", candle_quant::runtime::Isa::best());
        let reads: Vec<String> = bounds.read_gb_s_by_threads.iter().map(|(t, gb)| format!("{gb:.1} GB/s with {t}")).collect();
        println!("memory read bound (threads streaming at once): {}", reads.join(", "));
        println!(
            "one thread: int8 decode streaming {:.0} MB of weights {:.1} GB/s ({:.0} % of its read bound); int8 kernel in cache {:.1} GMAC/s",
            bounds.int8_stream_bytes as f64 / 1e6,
            bounds.int8_stream_gb_s,
            100.0 * bounds.int8_stream_gb_s / bounds.read_gb_s,
            bounds.int8_peak_gmac_s
        );
        println!(
            "%bw: {label} weight bytes per second / memory read bound at that thread count (over 100: served from cache); \
             %peak: GMAC/s / int8 in-cache peak × threads"
        );
        println!(
            "{:>5} {:>5} {:>4} {:>3} {:>10} {:>10} {:>10} {:>9} {:>10} {:>7} {:>6}",
            "in",
            "out",
            "m",
            "thr",
            format!("{label} µs"),
            "f32 µs",
            format!("{base} µs"),
            format!("{label}/f32"),
            format!("{label}/{base}"),
            "%bw",
            "%peak"
        );
    }
    for &(i, o) in SHAPES.iter().filter(|(i, _)| in_features.is_empty() || in_features.contains(i)) {
        for &mm in &ms {
            for &t in &ts {
                let r = bench_linear(i, o, mm, t, &config, baseline, &bounds)?;
                if !json {
                    println!(
                        "{:>5} {:>5} {:>4} {:>3} {:>10.1} {:>10.1} {:>10.1} {:>9.3} {:>10.3} {:>7.1} {:>6.1}",
                        r.in_features,
                        r.out_features,
                        r.m,
                        r.threads,
                        r.int8_us,
                        r.f32_us,
                        r.q8_0_us,
                        r.ratio_f32,
                        r.ratio_q8_0,
                        r.bandwidth_pct,
                        r.peak_pct
                    );
                }
                records.push(r);
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&records)?);
    }
    Ok(())
}
