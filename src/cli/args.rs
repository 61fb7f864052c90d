//! The flags the commands share, and the one place a `--mode` becomes a conversion.

use anyhow::{bail, Context, Result};
use candle_core::quantized::GgmlDType;
use candle_quant::calibration::Calibration;
use candle_quant::checkpoint::Int8Kind;
use candle_quant::convert::{quantize_dynamic, quantize_ggml, quantize_weight_only, ConversionReport, QuantConfig, Quantizable};
use candle_quant::nn::ActivationQuant;
use candle_quant::{QLinear, WeightQuant};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

/// `--mode`: which int8 layers a model gets.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Dynamic,
    WeightOnly,
    /// Static int8: activations quantized with fixed qparams from --calibration.
    Static,
    /// candle's Q8_0 QMatMul (the baseline; in memory only, not for `quantize`).
    #[value(name = "q8_0")]
    Q8_0,
    /// candle's Q4_0 QMatMul (the 4-bit baseline of the same grid family; in memory only).
    #[value(name = "q4_0")]
    Q4_0,
    /// candle's Q4_K QMatMul (in memory only); layers whose input width is not a multiple of
    /// 256 take Q5_0 instead, as llama.cpp's Q4_K_M does.
    #[value(name = "q4k")]
    Q4K,
}

impl Mode {
    /// The kind of int8 layers a float model is quantized into as it streams from its files
    /// (`--precision int8`, `quantize`); `None` for the modes that convert a loaded float model.
    pub fn streamed(self) -> Option<Int8Kind> {
        match self {
            Mode::Dynamic => Some(Int8Kind::Dynamic),
            Mode::WeightOnly => Some(Int8Kind::WeightOnly),
            Mode::Static | Mode::Q8_0 | Mode::Q4_0 | Mode::Q4K => None,
        }
    }

    /// Converts the selected layers of a loaded float `model` (static: with `calibration`).
    pub fn convert(
        self,
        model: &mut (impl Quantizable + ?Sized),
        cfg: &QuantConfig,
        calibration: Option<&Calibration>,
    ) -> Result<ConversionReport> {
        Ok(match (self, calibration) {
            (Mode::Dynamic, _) => quantize_dynamic(model, cfg)?,
            (Mode::WeightOnly, _) => quantize_weight_only(model, cfg)?,
            (Mode::Q8_0, _) => quantize_ggml(model, cfg, GgmlDType::Q8_0)?,
            (Mode::Q4_0 | Mode::Q4K, _) => {
                let mut report = ConversionReport::default();
                model.visit_linears(&mut |l| {
                    let name = l.name().to_string();
                    if cfg.selects(&name) {
                        self.quantize_layer(l, cfg, None)?;
                        report.converted.push(name);
                    } else {
                        report.skipped.push(name);
                    }
                    Ok(())
                })?;
                report
            }
            (Mode::Static, Some(c)) => c.apply(model, cfg).context("applying the calibration")?,
            (Mode::Static, None) => bail!("--mode static needs --calibration FILE (written by `candle-quant calibrate`)"),
        })
    }

    /// Quantizes one layer as [`Mode::convert`] would quantize it (`sensitivity`).
    pub fn quantize_layer(self, l: &mut QLinear, cfg: &QuantConfig, calibration: Option<&Calibration>) -> candle_core::Result<()> {
        match (self, calibration) {
            (Mode::Static, Some(c)) => l.quantize_static(c.qparams_for(l.name())?),
            (Mode::Static, None) => candle_core::bail!("--mode static needs --calibration FILE"),
            (Mode::WeightOnly, _) => l.quantize_weight_only(cfg.weight_for(l.name())),
            (Mode::Q8_0, _) => l.quantize_ggml(GgmlDType::Q8_0),
            // candle's 4-bit formats, with Q8_0 for the layers kept at 8 bits (--int8-layers).
            (Mode::Q4_0 | Mode::Q4K, _) if cfg.weight_for(l.name()).bits() == 8 => l.quantize_ggml(GgmlDType::Q8_0),
            (Mode::Q4_0, _) => l.quantize_ggml(GgmlDType::Q4_0),
            (Mode::Q4K, _) => l.quantize_ggml(GgmlDType::Q4K),
            (Mode::Dynamic, _) => l.quantize_dynamic(cfg.activation_for(l.name()), cfg.weight_for(l.name()), cfg.outlier_threshold),
        }
    }
}

/// `calibrate --granularity`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GranularityArg {
    /// One affine scale and zero point per layer input.
    PerTensor,
    /// One symmetric scale per group of input channels.
    PerGroup,
}

/// `calibrate --observer`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ObserverArg {
    /// Smallest and largest value seen.
    Minmax,
    /// Running average of each window's min and max.
    MovingAverage,
    /// The range with the least expected quantization error (2048-bin histogram).
    Histogram,
    /// 0.01th to 99.99th percentile.
    Percentile,
}

/// `quantize --format`: what the quantized model is written as.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// This toolkit's folder: config.json with its quantization_config, safetensors, tokenizer.
    Folder,
    /// One GGUF file for llama.cpp, ollama and candle's quantized models (int8 as Q8_0, int4 as
    /// Q4_0/Q4_1).
    Gguf,
    /// A Hugging Face compressed-tensors folder for vLLM, SGLang and transformers
    /// (int-quantized, naive-quantized or pack-quantized).
    CompressedTensors,
}

/// `--precision`: the model as float, or quantized as `--mode` says.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    F32,
    Int8,
}

#[derive(Args)]
pub struct ModelArgs {
    /// Hub id (org/name[@revision]), local HF folder (float, or an int8 checkpoint written by
    /// `quantize`, which keeps the scheme it was saved with: the flags below do not apply to
    /// it), or .gguf file. Default: SmolLM2-135M-Instruct (offline copy if present, else the
    /// hub, else the offline copy is fetched).
    #[arg(long)]
    pub model: Option<String>,
    /// Activation group size for int8 (input channels per scale); 0 = one scale per token.
    /// Default: the weight group (--weight-group), or 32 with per-channel weights.
    #[arg(long)]
    pub act_group: Option<usize>,
    /// Dynamic activations: affine (each group's own range, a scale and an offset) or
    /// symmetric (max |x| / 127 per group).
    #[arg(long, value_enum, default_value_t = ActScheme::Affine)]
    pub act_scheme: ActScheme,
    /// Weight group size (input channels per scale); 0 = one scale per output channel (int8 only).
    #[arg(long, default_value_t = 32)]
    pub weight_group: usize,
    /// Bits per weight for --mode dynamic and weight-only: 8, or 4 (int4 in groups of
    /// --weight-group, a multiple of 8: 32, 64 or 128).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(4..=8))]
    pub bits: u32,
    /// Int4 weights with an integer zero point per group (asymmetric) instead of symmetric.
    #[arg(long)]
    pub weight_zero_point: bool,
    /// With --bits 4 (or --mode q4_0 / q4k): layer-name patterns that keep 8-bit weights (int8,
    /// or Q8_0; glob, repeatable; mixed precision). Default: lm_head (also the tied embedding),
    /// as llama.cpp's 4-bit files keep their output layer at 6 bits or more; `none` makes every
    /// layer 4-bit. An untied embedding table is int8 rows whenever lm_head is quantized.
    #[arg(long)]
    pub int8_layers: Vec<String>,
    /// How int4 weights are rounded: rtn (round to nearest on a per-group searched grid, no
    /// data); or, from a calibration run over --calibration-text, gptq (error-compensating
    /// rounding), awq (activation-aware channel scaling, then round to nearest) or awq-gptq (both).
    #[arg(long, value_enum, default_value_t = Method::Rtn)]
    pub method: Method,
    /// Text whose windows calibrate --method gptq/awq/awq-gptq (use another text than the one you evaluate on).
    #[arg(long)]
    pub calibration_text: Option<PathBuf>,
    /// Windows of 512 tokens of --calibration-text that a calibrated --method runs.
    #[arg(long, default_value_t = 16)]
    pub calibration_windows: usize,
    /// Multiply activations with |x| above this in float (LLM.int8()-style); 0 = off.
    #[arg(long, default_value_t = candle_quant::convert::DEFAULT_OUTLIER_THRESHOLD)]
    pub outlier_threshold: f32,
    /// Keep lm_head in float.
    #[arg(long)]
    pub float_lm_head: bool,
    /// int8 layer kind: dynamic (int8 weights and activations), weight-only (float activations),
    /// or candle's q8_0 (the baseline).
    #[arg(long, value_enum, default_value_t = Mode::Dynamic)]
    pub mode: Mode,
    /// Layer-name patterns to keep in float (glob, `*` = anything), repeatable.
    #[arg(long)]
    pub exclude: Vec<String>,
    /// Calibration file written by `calibrate`, for --mode static.
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// Compute threads (candle's and ours); default: all cores.
    #[arg(long)]
    pub threads: Option<usize>,
}

impl ModelArgs {
    /// What the quantized side is called in reports: int8, int4, or candle's format.
    pub fn label(&self) -> &'static str {
        match (self.mode, self.bits) {
            (Mode::Q8_0, _) => "q8_0",
            (Mode::Q4_0, _) => "q4_0",
            (Mode::Q4K, _) => "q4k",
            (_, 4) => "int4",
            _ => "int8",
        }
    }
}

#[derive(Args)]
pub struct GenArgs {
    /// The user's message (with the model's chat template), or the text to continue.
    #[arg(long, default_value = "What is the capital of France?")]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Feed the prompt as-is, without the model's chat template.
    #[arg(long)]
    pub no_chat_template: bool,
    /// Take the prompt from this text file instead, fed as-is (a long prompt: prefill speed).
    #[arg(long, conflicts_with = "prompt")]
    pub prompt_file: Option<PathBuf>,
    /// Keep at most this many prompt tokens (with --prompt-file: its first N).
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
}

#[derive(Args)]
pub struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,
}

/// How weights are rounded (`--method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// Round to nearest, each group's grid searched for the least squared error.
    Rtn,
    /// GPTQ: each column's rounding error spread over the columns not yet rounded, weighted by
    /// the layer's calibration inputs.
    Gptq,
    /// AWQ: input channels scaled by their calibration magnitude to the power searched per
    /// group of layers (folded into the norm or layer before), then round to nearest.
    Awq,
    /// AWQ's scaling, then GPTQ's rounding of the scaled weights.
    AwqGptq,
}

impl Method {
    /// Whether the method reads a calibration run.
    pub fn calibrated(self) -> bool {
        self != Method::Rtn
    }
}

/// How dynamic activations are quantized (`--act-scheme`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ActScheme {
    /// A scale and an offset per group: 256 steps over the group's own range.
    Affine,
    /// One scale per group, max |x| / 127.
    Symmetric,
}

pub fn quant_config(args: &ModelArgs) -> Result<QuantConfig> {
    let act_group = args.act_group.unwrap_or(if args.weight_group > 0 { args.weight_group } else { 32 });
    let act = ActivationQuant::with_group(args.act_scheme == ActScheme::Affine, (act_group > 0).then_some(act_group));
    if !matches!(args.bits, 4 | 8) {
        bail!("--bits {}: weights are int8 (8) or int4 (4)", args.bits)
    }
    let weight = match (args.bits, args.weight_group) {
        (4, 0) => bail!("--bits 4 needs --weight-group N (a multiple of 8: 32, 64 or 128)"),
        (4, g) if g % 8 != 0 => bail!("--weight-group {g} does not fit int4 weights: use a multiple of 8 (32, 64 or 128)"),
        (4, group) => WeightQuant::Int4 { group, zero_point: args.weight_zero_point },
        (_, 0) => WeightQuant::PerChannel,
        (_, g) => WeightQuant::PerGroup(g),
    };
    if args.weight_zero_point && args.bits != 4 {
        bail!("--weight-zero-point is for --bits 4 (int8 weights are symmetric)")
    }
    if args.method.calibrated() && args.bits != 4 {
        bail!("--method {} rounds int4 weights: add --bits 4", crate::models::method_name(args.method))
    }
    if args.bits == 4 && !matches!(args.mode, Mode::Dynamic | Mode::WeightOnly) {
        bail!("--bits 4 works with --mode dynamic or weight-only (candle's own 4-bit baselines are --mode q4_0 and q4k)")
    }
    let outliers = (args.outlier_threshold > 0.0).then_some(args.outlier_threshold);
    let mut cfg = QuantConfig::default().activation(act).weight(weight).outlier_threshold(outliers);
    if args.float_lm_head {
        cfg = cfg.exclude("lm_head");
    }
    for p in &args.exclude {
        cfg = cfg.exclude(p.clone());
    }
    let four_bit_baseline = matches!(args.mode, Mode::Q4_0 | Mode::Q4K);
    if four_bit_baseline {
        // Nominal: these layers get candle's 4-bit format, the overrides below Q8_0.
        cfg = cfg.weight(WeightQuant::Int4 { group: 32, zero_point: false });
    }
    if args.bits == 4 || four_bit_baseline {
        let int8 = int8_layer_weights(args);
        match args.int8_layers.as_slice() {
            [] => cfg = cfg.override_weight("lm_head", int8),
            [none] if none == "none" => {}
            patterns => {
                for p in patterns {
                    cfg = cfg.override_weight(p.clone(), int8);
                }
            }
        }
    } else if !args.int8_layers.is_empty() {
        bail!("--int8-layers is for --bits 4, --mode q4_0 and q4k (every layer is int8 already)")
    }
    Ok(cfg)
}

/// The weights of the layers `--int8-layers` keeps at 8 bits beside 4-bit ones: int8 in the
/// same groups.
pub fn int8_layer_weights(args: &ModelArgs) -> WeightQuant {
    WeightQuant::PerGroup(args.weight_group.max(1))
}

/// `2GB`, `500MB`, `64KiB`, `1.5GB` or a plain byte count.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("'{s}' is not a size like 2GB or 500MB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("unknown size unit '{other}' in '{s}' (use B, KB, MB, GB, KiB, MiB or GiB)")),
    };
    let bytes = n * mult;
    if !(1.0..1e18).contains(&bytes) {
        return Err(format!("size '{s}' must be at least one byte"));
    }
    Ok(bytes as u64)
}

/// `--budget`: a percentage, with or without `%`.
pub fn parse_percent(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s.trim().trim_end_matches('%').parse().map_err(|_| format!("'{s}' is not a percentage (e.g. 0.2%)"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("'{s}': the budget must be a non-negative percentage"));
    }
    Ok(v)
}
