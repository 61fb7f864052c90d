//! `calibrate`: windows of a text through the float model, each layer's input range and static
//! qparams written to a calibration file (SmoothQuant first, when asked).

use crate::args::{ModelArgs, ObserverArg};
use crate::models::load_float;
use crate::progress::bar;
use anyhow::{bail, Context, Result};
use candle_quant::calibration::{self, ObserverKind, StaticGranularity};
use candle_quant::generate::encode_text;
use std::path::Path;

/// `calibrate`: windows of `text` through the float model, each layer's range and qparams to `out`.
pub fn run(
    model: &ModelArgs,
    text: &Path,
    (samples, seq_len): (usize, usize),
    (observer, granularity): (ObserverArg, StaticGranularity),
    smooth_alpha: Option<f32>,
    out: &Path,
) -> Result<()> {
    if samples == 0 || seq_len < 2 {
        bail!("calibrate: --samples must be at least 1 and --seq-len at least 2 (got {samples} and {seq_len})")
    }
    let mut lm = load_float(model.model.as_deref(), "calibrate")?;
    let body = std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    let tokens = encode_text(&lm, &body)?;
    let bos = candle_quant::CausalLm::bos_token(&lm.model);
    let per_window = seq_len - bos.is_some() as usize;
    let windows: Vec<Vec<u32>> =
        tokens.chunks(per_window).filter(|c| c.len() >= 2).take(samples).map(|c| bos.iter().chain(c).copied().collect()).collect();
    if windows.is_empty() {
        bail!("{}: holds {} tokens, too few for one calibration window", text.display(), tokens.len())
    }
    let kind = match observer {
        ObserverArg::Minmax => ObserverKind::Minmax,
        ObserverArg::MovingAverage => ObserverKind::MovingAverage,
        ObserverArg::Histogram => ObserverKind::Histogram,
        ObserverArg::Percentile => ObserverKind::Percentile,
    };
    let pb = bar(windows.len(), "calibrating windows");
    let start = std::time::Instant::now();
    let source = lm.source.clone();
    let mut c = calibration::calibrate(&mut lm.model, &source, kind, granularity, &windows, |p| pb.set_position(p.done))?;
    pb.finish_and_clear();
    if let Some(alpha) = smooth_alpha {
        let maxima = c.layers.iter().map(|(n, l)| (n.clone(), l.channel_absmax.clone())).collect();
        let (factors, skipped) = candle_quant::smooth::smooth(&mut lm.model, &maxima, alpha)?;
        let pb = bar(windows.len(), "calibrating the smoothed model");
        c = calibration::calibrate(&mut lm.model, &source, kind, granularity, &windows, |p| pb.set_position(p.done))?;
        pb.finish_and_clear();
        println!("SmoothQuant (alpha {alpha}): {} groups smoothed; not smoothed: {}", factors.len(), skipped.len());
        c.smoothing = Some(calibration::Smoothing { alpha, factors, skipped });
    }
    c.save(out)?;
    println!(
        "calibrated {} layers on {} windows ({} tokens of {}) in {:.1} s; wrote {}",
        c.layers.len(),
        c.windows,
        c.tokens,
        text.display(),
        start.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}
