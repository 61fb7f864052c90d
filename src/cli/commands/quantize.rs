//! `quantize`: a float model streamed into an int8 folder or a GGUF file (static and GPTQ:
//! loaded, converted, saved); a quantized model re-packed in the other format as stored.

use crate::args::{quant_config, Format, Method, Mode, ModelArgs};
use crate::models::{open_model, quantized};
use crate::progress::{bytes_bar, Bars};
use anyhow::{bail, Result};
use candle_quant::checkpoint::{quantized_tensors, write_checkpoint, CheckpointScheme, SaveOptions};
use candle_quant::io::gguf::write::{write_gguf, GgufExport, GgufReport};
use candle_quant::io::{compressed_tensors, OpenedDecoder};
use candle_quant::source::TensorSource;
use std::path::Path;

/// `quantize`: the model named by `--model` quantized as `--mode`/`--bits` say and written as
/// `format`, with a progress bar of bytes.
pub fn run(model: &ModelArgs, out: &Path, format: Format, max_shard_size: u64, force: bool) -> Result<()> {
    if out.exists() && !force {
        bail!("{}: already exists (choose another --out, or replace it on purpose with --force)", out.display())
    }
    if model.model.is_none() {
        eprintln!("quantize: no --model given: quantizing the default model, {}", candle_quant::io::DEFAULT_HUB_MODEL);
    }
    let opened = open_model(model.model.as_deref())?;
    opened.check_output(out)?;
    let options = SaveOptions { max_shard_bytes: max_shard_size, overwrite: force, ..Default::default() };
    if let Some(stored) = opened.quantization.clone() {
        return repack(&opened, stored, out, format, &options);
    }
    if model.mode == Mode::Q8_0 || model.mode == Mode::Q4_0 || model.mode == Mode::Q4K {
        bail!("quantize writes this toolkit's int8/int4 layers: --mode dynamic, weight-only or static (candle's ggml modes run in memory only)")
    }
    let start = std::time::Instant::now();
    match model.mode.streamed().filter(|_| model.method == Method::Rtn) {
        Some(kind) => {
            let (view, quantization) = opened.quantized_view(&quant_config(model)?, kind)?;
            write(&opened, &view, &quantization, out, format, &options)?;
        }
        None => {
            // Static layers and GPTQ need the whole float model (calibration runs): loaded,
            // converted, then written from memory.
            let metadata = if format == Format::Gguf { Some(opened.gguf_metadata()?) } else { None };
            let (config, options) = (opened.config.clone(), opened.save_options_for(out, &options)?);
            let (mut q, _) = quantized(&Bars::around(|p| opened.load(p))?, model)?;
            let (tensors, quantization) = quantized_tensors(&mut q.model)?;
            match (format, metadata) {
                (_, Some(metadata)) => {
                    let export = GgufExport { config: &config, tensors: &*tensors, quantization: &quantization, metadata };
                    print_gguf(&gguf_with_bar(out, &export, force)?);
                }
                (Format::CompressedTensors, None) => {
                    let report = compressed_tensors::write_compressed_tensors(out, &*tensors, &quantization, &options, |_| {})?;
                    for dropped in &report.dropped {
                        println!("  not stored: {dropped}");
                    }
                }
                _ => {
                    write_checkpoint(out, &*tensors, &quantization, &options, |_| {})?;
                }
            }
        }
    }
    println!("wrote {} in {:.1} s", out.display(), start.elapsed().as_secs_f64());
    Ok(())
}

/// A quantized source written in another format as stored: no value is rounded again.
fn repack(opened: &OpenedDecoder, stored: CheckpointScheme, out: &Path, format: Format, options: &SaveOptions) -> Result<()> {
    let source_format = if opened.gguf_metadata.is_some() {
        Format::Gguf
    } else if opened.config_json["quantization_config"]["quant_method"] == compressed_tensors::QUANT_METHOD {
        Format::CompressedTensors
    } else {
        Format::Folder
    };
    if format == source_format {
        bail!("{}: is already quantized in this format (--format folder, gguf or compressed-tensors writes another)", opened.source)
    }
    eprintln!("{}: already quantized; written as stored (--mode, --bits and the like do not apply)", opened.source);
    let start = std::time::Instant::now();
    write(opened, &*opened.tensors, &stored, out, format, options)?;
    println!("wrote {} in {:.1} s", out.display(), start.elapsed().as_secs_f64());
    Ok(())
}

/// `tensors` (a checkpoint's, with `quantization`) written to `out` as `format`.
fn write(
    opened: &OpenedDecoder,
    tensors: &dyn TensorSource,
    quantization: &CheckpointScheme,
    out: &Path,
    format: Format,
    options: &SaveOptions,
) -> Result<()> {
    match format {
        Format::Folder => {
            let options = opened.save_options_for(out, options)?;
            let pb = bytes_bar("quantizing and writing");
            let written = write_checkpoint(out, tensors, quantization, &options, |p| {
                pb.set_length(p.total);
                pb.set_position(p.done);
            });
            pb.finish_and_clear();
            let written = written?;
            println!(
                "{} safetensors file{}, {:.1} MB of tensors",
                written.files.len(),
                if written.files.len() == 1 { "" } else { "s" },
                written.tensor_bytes as f64 / 1e6
            );
        }
        Format::Gguf => {
            let export = GgufExport { config: &opened.config, tensors, quantization, metadata: opened.gguf_metadata()? };
            print_gguf(&gguf_with_bar(out, &export, options.overwrite)?);
        }
        Format::CompressedTensors => {
            let options = opened.save_options_for(out, options)?;
            let pb = bytes_bar("quantizing and writing");
            let report = compressed_tensors::write_compressed_tensors(out, tensors, quantization, &options, |p| {
                pb.set_length(p.total);
                pb.set_position(p.done);
            });
            pb.finish_and_clear();
            let report = report?;
            println!("compressed-tensors: {:.1} MB of tensors", report.written.tensor_bytes as f64 / 1e6);
            for dropped in &report.dropped {
                println!("  not stored: {dropped}");
            }
        }
    }
    Ok(())
}

fn gguf_with_bar(out: &Path, export: &GgufExport, overwrite: bool) -> Result<GgufReport> {
    let pb = bytes_bar("quantizing and writing GGUF");
    let report = write_gguf(out, export, overwrite, |p| {
        pb.set_length(p.total);
        pb.set_position(p.done);
    });
    pb.finish_and_clear();
    Ok(report?)
}

/// What a GGUF file holds, and every layer it could not hold exactly.
fn print_gguf(r: &GgufReport) {
    println!("GGUF: {} tensors, {:.1} MB; {} layers block for block as quantized", r.tensors, r.bytes as f64 / 1e6, r.exact_layers);
    // Lossy layers grouped by what they went out as and why, with the range of their errors.
    let mut kinds: Vec<(String, Vec<&candle_quant::io::gguf::write::GgufLoss>)> = vec![];
    for loss in &r.lossy {
        let key = format!("as {:?}: {}", loss.written_as, loss.reason);
        match kinds.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(loss),
            None => kinds.push((key, vec![loss])),
        }
    }
    for (key, losses) in kinds {
        let (lo, hi) = losses.iter().fold((f64::MAX, 0f64), |(lo, hi), l| (lo.min(l.relative_error), hi.max(l.relative_error)));
        let names: Vec<&str> = losses.iter().take(3).map(|l| l.layer.as_str()).collect();
        let more = if losses.len() > 3 { format!(" and {} more", losses.len() - 3) } else { String::new() };
        println!("  {} layer(s) {key}; relative weight error {lo:.2e} to {hi:.2e} ({}{more})", losses.len(), names.join(", "));
    }
    for dropped in &r.dropped {
        println!("  not stored: {dropped}");
    }
}
