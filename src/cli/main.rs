//! The `candle-quant` command line: argument parsing and dispatch over the library.

mod args;
mod commands;
mod fetch;
mod models;
mod progress;
mod writers;

use anyhow::Result;
use args::{parse_percent, parse_size, ActScheme, Format, GenArgs, GranularityArg, ModelArgs, ObserverArg, Precision, SamplingArgs};
use candle_quant::calibration::StaticGranularity;
use clap::{Parser, Subcommand};
use commands::*;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "candle-quant",
    version,
    about = "Int8 quantization of language models and sentence encoders, on candle",
    long_about = "Int8 quantization of language models and sentence encoders, on candle: generate, compare f32 \
                  with int8, evaluate, quantize to a folder, calibrate static int8, rank layer sensitivity, \
                  embed sentences, benchmark a layer.\n\nModels: the Llama family (SmolLM2, TinyLlama, \
                  Llama 2/3), Qwen2, Mistral, Phi-3 and Gemma 3 decoders, and BERT encoders (MiniLM), from a \
                  hub id, a local Hugging Face folder, a GGUF file or an int8 folder written by `quantize`. \
                  Other architectures: use the candle-quant library on your own candle model \
                  (`qlinear`, `quantizable!`, `quantize_dynamic`).",
    after_help = "Examples:\n  candle-quant compare\n  candle-quant generate --prompt \"Tell me a story\" --precision int8\n  \
                  candle-quant eval --text models/texts/alice29.txt --json\n  candle-quant quantize --model org/name --out name-int8"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text with the model in one precision.
    #[command(
        after_help = "Examples:\n  candle-quant generate --prompt \"Tell me a story\" --max-new-tokens 64\n  candle-quant generate --model smollm2-int8 --temperature 0.7"
    )]
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
    #[command(
        after_help = "Examples:\n  candle-quant compare\n  candle-quant compare --prompt-file text.txt --max-prompt-tokens 512 --repeats 3 --threads 2 --json\n  candle-quant compare --model smollm2-int8 --reference HuggingFaceTB/SmolLM2-135M-Instruct"
    )]
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
        /// A prompt set instead of one prompt: a text file with one chat message per line
        /// (blank lines and lines starting with `#` skipped); reports on how many of them int8's
        /// greedy text equals f32's.
        #[arg(long, conflicts_with_all = ["prompt", "prompt_file"])]
        prompts: Option<PathBuf>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Perplexity of f32 and int8 over a text, KL(f32 ‖ int8) and top-1 agreement.
    #[command(
        after_help = "Examples:\n  candle-quant eval --text models/texts/alice29.txt\n  candle-quant eval --text models/texts/alice29.txt --mode static --calibration calib.json --json"
    )]
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
    #[command(after_help = "Examples:\n  candle-quant bench --m 1 --m 128 --threads 1\n  candle-quant bench --in 576 --json")]
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
        /// How the int8 layers quantize their inputs.
        #[arg(long, value_enum, default_value_t = ActScheme::Affine)]
        act_scheme: ActScheme,
        /// Weights of the crate's layer: 8 (int8, against candle's Q8_0) or 4 (int4 in groups of
        /// 32, against candle's Q4_0).
        #[arg(long, default_value_t = 8)]
        bits: u32,
        #[arg(long)]
        json: bool,
    },
    /// Run sample windows of a text through the float model and write each linear layer's
    /// activation range and static int8 qparams to a calibration file (for --mode static).
    #[command(
        after_help = "Examples:\n  candle-quant calibrate --text models/texts/lcet10.txt --smooth-alpha 0.5 --out calib.json\n  candle-quant eval --text models/texts/alice29.txt --mode static --calibration calib.json"
    )]
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
    #[command(after_help = "Examples:\n  candle-quant sensitivity --text models/texts/asyoulik.txt --budget 1%")]
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
    /// Quantize a model once and save it as an int8 checkpoint folder that --model accepts, or as
    /// a GGUF file that llama.cpp runs. Streams: one tensor in memory at a time. An already
    /// quantized model (an int8 folder, a Q8_0/Q4_0 GGUF) is re-packed in the other format as
    /// stored, without rounding again.
    #[command(
        after_help = "Examples:\n  candle-quant quantize --model HuggingFaceTB/SmolLM2-135M-Instruct --out smollm2-int8\n  candle-quant quantize --model model.gguf --format gguf --out model-q8_0.gguf\n  candle-quant quantize --model smollm2-int8 --format gguf --out smollm2-q8_0.gguf\n  candle-quant quantize --model model.gguf --mode static --calibration calib.json --out model-static\n\n--mode q8_0 (candle's own Q8_0) runs in memory only: quantize refuses it."
    )]
    Quantize {
        #[command(flatten)]
        model: ModelArgs,
        /// Output folder, or file for --format gguf (written under a temporary name, renamed when
        /// complete).
        #[arg(long)]
        out: PathBuf,
        /// What to write: this toolkit's folder, or a GGUF file.
        #[arg(long, value_enum, default_value = "folder")]
        format: Format,
        /// Largest safetensors file, e.g. 2GB, 500MB, or a byte count.
        #[arg(long, default_value = "2GB", value_parser = parse_size)]
        max_shard_size: u64,
        /// Replace --out if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Sentence embeddings of a file's lines (one sentence per line) with a BERT-style encoder
    /// (default: all-MiniLM-L6-v2), in batches: sentences per second, embeddings written out.
    #[command(
        after_help = "Examples:\n  candle-quant embed --file sentences.txt --out embeddings.jsonl\n  candle-quant embed --file sentences.txt --precision f32 --json"
    )]
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
    #[command(after_help = "Examples:\n  candle-quant inspect --precision int8\n  candle-quant inspect --model smollm2-int8")]
    Inspect {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, value_enum, default_value_t = Precision::Int8)]
        precision: Precision,
    },
}

fn set_threads(threads: Option<usize>) {
    if let Some(t) = threads {
        // Read by candle's CPU kernels and by rayon when their pools start (first use).
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
}

fn main() -> Result<()> {
    candle_quant::runtime::keep_freed_buffers();
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
        Command::Generate { model, precision, gen, sampling } => generate::run(&model, precision, &gen, &sampling),
        Command::Compare { model, reference, gen, repeats, prompts: Some(prompts), json } => {
            compare::run_prompt_set(&model, reference.as_deref(), &prompts, gen.max_new_tokens, repeats as usize, json)
        }
        Command::Compare { model, reference, gen, repeats, prompts: None, json } => {
            compare::run(&model, reference.as_deref(), &gen, repeats as usize, json)
        }
        Command::Eval { model, reference, text, max_tokens, window, json } => {
            eval::run(&model, reference.as_deref(), &text, max_tokens, window, json)
        }
        Command::Bench { m, threads, in_features, act_scheme, bits, json } => bench::run(m, threads, &in_features, act_scheme, bits, json),
        Command::Quantize { model, out, format, max_shard_size, force } => quantize::run(&model, &out, format, max_shard_size, force),
        Command::Calibrate { model, text, samples, seq_len, observer, granularity, group_size, float_fraction, smooth_alpha, out } => {
            let granularity = match granularity {
                GranularityArg::PerTensor => StaticGranularity::PerTensor,
                GranularityArg::PerGroup => StaticGranularity::PerGroup { size: group_size, float_fraction },
            };
            calibrate::run(&model, &text, (samples, seq_len), (observer, granularity), smooth_alpha, &out)
        }
        Command::Sensitivity { model, text, samples, seq_len, budget, top, json } => {
            sensitivity::run(&model, &text, samples, seq_len, budget, top, json)
        }
        Command::Embed { model, file, batch_size, precision, out, json } => {
            embed::run(&model, &file, batch_size as usize, precision, out.as_deref(), json)
        }
        Command::Inspect { model, precision } => inspect::run(&model, precision),
    }
}
