//! `quantize`: a float model streamed into an int8 folder (static: loaded, converted, saved).

use crate::args::{quant_config, Mode, ModelArgs};
use crate::models::{open_model, quantized};
use crate::progress::{bytes_bar, Bars};
use anyhow::{bail, Result};
use candle_quant::checkpoint::SaveOptions;
use std::path::Path;

/// `quantize`: a float model streamed into an int8 folder, with a progress bar of bytes.
pub fn run(model: &ModelArgs, out: &Path, max_shard_size: u64, force: bool) -> Result<()> {
    if out.exists() && !force {
        bail!("{}: already exists (choose another --out, or replace it on purpose with --force)", out.display())
    }
    if model.model.is_none() {
        eprintln!("quantize: no --model given: quantizing the default model, {}", candle_quant::io::DEFAULT_HUB_MODEL);
    }
    let opened = open_model(model.model.as_deref())?;
    if opened.is_quantized() {
        bail!("{}: is already an int8 checkpoint", opened.source)
    }
    let options = SaveOptions { max_shard_bytes: max_shard_size, overwrite: force, ..Default::default() };
    let kind = match model.mode.streamed() {
        Some(kind) => kind,
        None if model.mode == Mode::Q8_0 => {
            bail!("quantize writes this toolkit's int8 format: --mode dynamic, weight-only or static (q8_0 runs in memory only)")
        }
        None => {
            // Static layers need the whole float model (smoothing, calibration): loaded, then saved.
            let options = opened.save_options_for(out, &options)?;
            let (mut q, report) = quantized(&Bars::around(|p| opened.load(p))?, model)?;
            let start = std::time::Instant::now();
            let written = candle_quant::checkpoint::save_quantized(&mut q.model, out, &options)?;
            println!(
                "wrote {} ({} static int8 layers, {:.1} MB of tensors) in {:.1} s",
                out.display(),
                report.converted.len(),
                written.tensor_bytes as f64 / 1e6,
                start.elapsed().as_secs_f64()
            );
            return Ok(());
        }
    };
    let pb = bytes_bar("quantizing and writing");
    let start = std::time::Instant::now();
    let written = opened.quantize_to(out, &quant_config(model)?, kind, &options, |p| {
        pb.set_length(p.total);
        pb.set_position(p.done);
    });
    pb.finish_and_clear();
    let written = written?;
    println!(
        "wrote {} ({} safetensors file{}, {:.1} MB of tensors) in {:.1} s",
        out.display(),
        written.files.len(),
        if written.files.len() == 1 { "" } else { "s" },
        written.tensor_bytes as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
