//! Quantization-aware training of SmolLM2-135M-Instruct: `prepare_qat` (fake-quantized weights
//! and inputs), a short fine-tune with the next-token loss on one text, `convert` to static int8
//! (per-tensor ranges) — compared on another text with static int8 calibrated on the same
//! training text, and with f32.
//!
//! The input ranges start from that calibration and are trained with the loss (learned step
//! size, `--range-lr`, on the log of each step size); `--range-lr 0` leaves them to min/max
//! observers instead, as PyTorch's default QAT does. `--lr` trains the weights (0: frozen, and
//! their fake-quantized values computed once, which makes a step about five times cheaper).
//! Both learning rates decay to 0 along a cosine over the run.
//!
//! `cargo run --release --example qat_llm -- [--steps 200] [--seq-len 64] [--range-lr 0.05]
//!   [--lr 0] [--train models/texts/lcet10.txt] [--eval models/texts/alice29.txt] [--eval-tokens 8192]`

use candle_core::{Result, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use candle_quant::calibration::{calibrate, ObserverKind, StaticGranularity};
use candle_quant::convert::{convert, freeze_qat_weights, learn_activation_ranges, prepare_qat, qat_vars, QuantConfig};
use candle_quant::eval::evaluate;
use candle_quant::generate::encode_text;
use candle_quant::io::{self, ModelSource};
use candle_quant::CausalLm;

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> Result<()> {
    let (steps, seq_len, lr, range_lr) =
        (arg("--steps", 200usize), arg("--seq-len", 64usize), arg("--lr", 0f64), arg("--range-lr", 0.05f64));
    let train_file = arg("--train", io::models_dir().join("texts/lcet10.txt").display().to_string());
    let eval_file = arg("--eval", io::models_dir().join("texts/alice29.txt").display().to_string());
    let eval_tokens = arg("--eval-tokens", 8192usize);
    let read = |p: &str| std::fs::read_to_string(p).map_err(|e| candle_core::Error::Msg(format!("{p}: {e}")));

    let lm = io::load_decoder(&ModelSource::Gguf(io::models_dir().join(io::DEFAULT_GGUF)), &mut |_| {})?;
    let train = encode_text(&lm, &read(&train_file)?)?;
    let mut test = encode_text(&lm, &read(&eval_file)?)?;
    test.truncate(eval_tokens);
    let windows: Vec<Vec<u32>> = train.chunks(seq_len).filter(|w| w.len() == seq_len).map(<[u32]>::to_vec).collect();
    if windows.len() < 8 {
        candle_core::bail!("{train_file}: {} windows of {seq_len} tokens, at least 8 needed", windows.len())
    }

    // Static int8 calibrated on the training text (min/max, the QAT observers' kind).
    let mut plain = lm.model.clone();
    let c = calibrate(&mut plain, &train_file, ObserverKind::Minmax, StaticGranularity::PerTensor, &windows[..8], |_| {})?;
    c.apply(&mut plain, &QuantConfig::default())?;
    let r_static = evaluate(&lm.model, &plain, &test, 512, |_| {})?;
    println!(
        "static int8 (min/max calibration): perplexity {:.3} ({:+.2}%), KL {:.4}, top-1 {:.2}%",
        r_static.candidate_ppl,
        r_static.ppl_delta_pct,
        r_static.kld,
        100.0 * r_static.top1_agreement
    );

    // QAT: fake-quantized layers; input ranges from the calibration, trained (or observed).
    let mut qat = lm.model.clone();
    prepare_qat(&mut qat, &QuantConfig::default())?;
    qat.set_differentiable(true);
    if lr == 0.0 {
        // Ranges only: the fake-quantized weights become constants, computed once.
        freeze_qat_weights(&mut qat)?;
    }
    let ranges = if range_lr > 0.0 { learn_activation_ranges(&mut qat, |l| c.qparams_for(l.name()).map(Some))? } else { vec![] };
    let adam = |vars, lr| AdamW::new(vars, ParamsAdamW { lr, weight_decay: 0.0, ..Default::default() });
    let mut optimizers = vec![];
    if lr > 0.0 {
        optimizers.push(adam(qat_vars(&mut qat)?, lr)?);
    }
    if !ranges.is_empty() {
        optimizers.push(adam(ranges, range_lr)?);
    }
    let base_lrs: Vec<f64> = optimizers.iter().map(|o| o.learning_rate()).collect();
    // The windows after the calibration's eight, so that training sees other text.
    let train_windows = &windows[8.min(windows.len() - 1)..];
    let start = std::time::Instant::now();
    for step in 0..steps {
        let w = &train_windows[step % train_windows.len()];
        let logits = qat.forward(w, &mut qat.new_cache(), true)?;
        let targets = Tensor::new(&w[1..], logits.device())?;
        let loss = candle_nn::loss::cross_entropy(&logits.narrow(0, 0, w.len() - 1)?, &targets)?;
        let grads = loss.backward()?;
        // Cosine decay to 0 over the run: late steps refine instead of wandering.
        let decay = 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / steps as f64).cos());
        for (opt, base) in optimizers.iter_mut().zip(&base_lrs) {
            opt.set_learning_rate(base * decay);
            opt.step(&grads)?;
        }
        if step % 10 == 0 || step + 1 == steps {
            println!("step {step:>4}: loss {:.4} ({:.1} s)", loss.to_scalar::<f32>()?, start.elapsed().as_secs_f64());
        }
    }
    convert(&mut qat)?;
    qat.set_differentiable(false);
    let r_qat = evaluate(&lm.model, &qat, &test, 512, |_| {})?;
    println!(
        "QAT static int8 ({steps} steps of {seq_len} tokens, weight lr {lr}, range lr {range_lr}): perplexity {:.3} ({:+.2}%), KL {:.4}, top-1 {:.2}%",
        r_qat.candidate_ppl,
        r_qat.ppl_delta_pct,
        r_qat.kld,
        100.0 * r_qat.top1_agreement
    );
    let recovered = 100.0 * (r_static.candidate_ppl - r_qat.candidate_ppl) / (r_static.candidate_ppl - r_static.reference_ppl);
    println!("f32 perplexity {:.3}; QAT recovers {recovered:.1}% of static int8's perplexity loss", r_static.reference_ppl);
    Ok(())
}
