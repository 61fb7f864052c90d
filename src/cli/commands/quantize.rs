//! `quantize`: a float model streamed into an int8 folder, a GGUF file or a compressed-tensors
//! folder (static and GPTQ: loaded, converted, saved); a quantized model re-packed in another
//! format as stored.

use crate::args::{quant_config, Format, Method, Mode, ModelArgs};
use crate::models::{open_model, quantized};
use crate::progress::{bytes_bar, Bars};
use anyhow::{bail, Result};
use candle_quant::checkpoint::{quantized_tensors, write_checkpoint, CheckpointScheme, SaveOptions};
use candle_quant::io::gguf::write::{write_gguf, GgufExport, GgufReport};
use candle_quant::io::gguf::Value;
use candle_quant::io::{compressed_tensors, OpenedDecoder};
use candle_quant::models::DecoderConfig;
use candle_quant::progress::Progress;
use candle_quant::source::{TensorSource, WriteReport};
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
    let options = SaveOptions { max_shard_bytes: max_shard_size, overwrite: force, ..Default::default() };
    let target = Target::of(&opened, out, format, &options)?;
    let start = std::time::Instant::now();
    if let Some(stored) = &opened.quantization {
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
        target.write(&*opened.tensors, stored)?;
    } else if matches!(model.mode, Mode::Q8_0 | Mode::Q4_0 | Mode::Q4K) {
        bail!("quantize writes this toolkit's int8/int4 layers: --mode dynamic, weight-only or static (candle's ggml modes run in memory only)")
    } else if let Some(kind) = model.mode.streamed().filter(|_| model.method == Method::Rtn) {
        let (view, quantization) = opened.quantized_view(&quant_config(model)?, kind)?;
        target.write(&view, &quantization)?;
    } else {
        // Static layers and GPTQ need the whole float model (calibration runs): loaded,
        // converted, then written from memory.
        let (mut q, _) = quantized(&Bars::around(|p| opened.load(p))?, model)?;
        let (tensors, quantization) = quantized_tensors(&mut q.model)?;
        target.write(&*tensors, &quantization)?;
    }
    println!("wrote {} in {:.1} s", out.display(), start.elapsed().as_secs_f64());
    Ok(())
}

/// Where and how the quantized model goes: taken from the opened model before it is loaded
/// (loading consumes it), so that every path writes through [`Target::write`].
struct Target<'a> {
    out: &'a Path,
    format: Format,
    config: DecoderConfig,
    /// The folder formats' options, completed with the model's config and tokenizer files.
    options: SaveOptions,
    /// GGUF's metadata (only built for `--format gguf`: other formats need none).
    metadata: Option<Vec<(String, Value)>>,
}

impl<'a> Target<'a> {
    fn of(opened: &OpenedDecoder, out: &'a Path, format: Format, options: &SaveOptions) -> Result<Self> {
        let options = opened.save_options_for(out, options)?;
        let metadata = if format == Format::Gguf { Some(opened.gguf_metadata()?) } else { None };
        Ok(Self { out, format, config: opened.config.clone(), options, metadata })
    }

    /// `tensors` (a checkpoint's, with `quantization`) written to `out` as `format`.
    fn write(self, tensors: &dyn TensorSource, quantization: &CheckpointScheme) -> Result<()> {
        let pb = bytes_bar("quantizing and writing");
        let progress = |p: Progress| {
            pb.set_length(p.total);
            pb.set_position(p.done);
        };
        let (out, options) = (self.out, &self.options);
        let written = match (self.format, self.metadata) {
            (Format::Gguf, Some(metadata)) => {
                let export = GgufExport { config: &self.config, tensors, quantization, metadata };
                write_gguf(out, &export, options.overwrite, progress).map(Written::Gguf)
            }
            (Format::CompressedTensors, _) => {
                compressed_tensors::write_compressed_tensors(out, tensors, quantization, options, progress).map(Written::CompressedTensors)
            }
            _ => write_checkpoint(out, tensors, quantization, options, progress).map(Written::Folder),
        };
        pb.finish_and_clear();
        match written? {
            Written::Folder(w) => println!(
                "{} safetensors file{}, {:.1} MB of tensors",
                w.files.len(),
                if w.files.len() == 1 { "" } else { "s" },
                w.tensor_bytes as f64 / 1e6
            ),
            Written::CompressedTensors(r) => {
                println!("compressed-tensors: {:.1} MB of tensors", r.written.tensor_bytes as f64 / 1e6);
                for dropped in &r.dropped {
                    println!("  not stored: {dropped}");
                }
            }
            Written::Gguf(r) => print_gguf(&r),
        }
        Ok(())
    }
}

/// What a writer reports.
enum Written {
    Folder(WriteReport),
    CompressedTensors(compressed_tensors::CompressedTensorsReport),
    Gguf(GgufReport),
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
