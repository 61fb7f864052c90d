//! Perplexity of a GGUF file computed the way llama.cpp's `llama-perplexity` does, by candle's
//! own quantized models (`candle-transformers`' `quantized_llama` / `quantized_gemma3`, ggml
//! kernels) or by candle-quant (the file's Q8_0/Q4_0 blocks as int8/int4 layers), on the same
//! tokens; and greedy text from either engine. `scripts/check-gguf-llamacpp.sh` sets these beside
//! llama.cpp's own figures.
//!
//! The text is tokenized once (with the BOS token when the model wants one) and cut into chunks
//! of `--ctx` tokens; each chunk starts with BOS when the model wants one, and the tokens of its
//! second half are scored, each from the logits at the position before it:
//! `PPL = exp(mean over chunks and scored tokens of −log p(token))`.
//!
//! Run: `cargo run --release --example gguf_perplexity -- --model model.gguf --text
//! models/texts/alice29.txt --ctx 512 --chunks 8 --engine candle` (`--engine candle-quant`; add
//! `--generate "PROMPT" --tokens 32` for greedy text instead).

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device, IndexOp, Tensor, D};
use candle_quant::io::{self, ModelSource};
use candle_quant::models::llama::KvCache;
use std::path::PathBuf;

/// What the example is asked to do.
struct Args {
    model: PathBuf,
    text: Option<PathBuf>,
    ctx: usize,
    chunks: usize,
    engine: String,
    generate: Option<String>,
    tokens: usize,
}

fn parse() -> Result<Args> {
    let mut args = Args { model: PathBuf::new(), text: None, ctx: 512, chunks: 8, engine: "candle".into(), generate: None, tokens: 32 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => args.model = value()?.into(),
            "--text" => args.text = Some(value()?.into()),
            "--ctx" => args.ctx = value()?.parse().context("--ctx")?,
            "--chunks" => args.chunks = value()?.parse().context("--chunks")?,
            "--engine" => args.engine = value()?,
            "--generate" => args.generate = Some(value()?),
            "--tokens" => args.tokens = value()?.parse().context("--tokens")?,
            other => bail!("unknown argument {other}"),
        }
    }
    if args.model.as_os_str().is_empty() {
        bail!("--model FILE.gguf is required")
    }
    if !matches!(args.engine.as_str(), "candle" | "candle-quant") {
        bail!("--engine {}: expected candle or candle-quant", args.engine)
    }
    if args.ctx < 4 {
        bail!("--ctx {} is too small", args.ctx)
    }
    Ok(args)
}

/// One of the two engines, reading the same file.
enum Engine {
    /// candle-transformers' quantized Llama.
    Llama(candle_transformers::models::quantized_llama::ModelWeights),
    /// candle-transformers' quantized Gemma 3.
    Gemma3(candle_transformers::models::quantized_gemma3::ModelWeights),
    /// candle-quant's decoder on the file's blocks.
    Ours(Box<io::LanguageModel>),
}

impl Engine {
    fn open(args: &Args) -> Result<Self> {
        if args.engine == "candle-quant" {
            let lm = io::load_decoder(&ModelSource::Gguf(args.model.clone()), &mut |_| {})?;
            return Ok(Engine::Ours(Box::new(lm)));
        }
        let mut file = std::fs::File::open(&args.model).with_context(|| format!("opening {}", args.model.display()))?;
        let content = Content::read(&mut file).with_context(|| format!("reading {}", args.model.display()))?;
        let arch = content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        Ok(match arch.as_str() {
            "llama" => {
                Engine::Llama(candle_transformers::models::quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?)
            }
            "gemma3" => {
                Engine::Gemma3(candle_transformers::models::quantized_gemma3::ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?)
            }
            other => bail!("{}: architecture '{other}' (llama or gemma3 here)", args.model.display()),
        })
    }

    /// Log-probabilities `[n, vocab]` of the tokens after positions `from..chunk.len() − 1` of
    /// `chunk` (a fresh sequence). candle's models give the last position's logits only, so the
    /// chunk up to `from` is one prefill and the rest goes a token at a time on the KV cache.
    fn log_probs(&mut self, chunk: &[u32], from: usize) -> Result<Tensor> {
        let rows = match self {
            Engine::Ours(lm) => {
                let logits = lm.model.forward(&chunk[..chunk.len() - 1], &mut KvCache::default(), true)?;
                logits.i(from..)?
            }
            Engine::Llama(_) | Engine::Gemma3(_) => {
                let mut rows = vec![self.step(&chunk[..=from], 0)?];
                for p in from + 1..chunk.len() - 1 {
                    rows.push(self.step(&chunk[p..=p], p)?);
                }
                Tensor::cat(&rows, 0)?
            }
        };
        Ok(candle_nn::ops::log_softmax(&rows.to_dtype(DType::F32)?, D::Minus1)?)
    }

    /// candle's models: the last position's logits `[1, vocab]` for `tokens` at `pos`.
    fn step(&mut self, tokens: &[u32], pos: usize) -> Result<Tensor> {
        let x = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
        let logits = match self {
            Engine::Llama(m) => m.forward(&x, pos)?,
            Engine::Gemma3(m) => m.forward(&x, pos)?,
            Engine::Ours(_) => bail!("step is for candle's models"),
        };
        Ok(logits.reshape((1, ()))?)
    }
}

fn main() -> Result<()> {
    let args = parse()?;
    // Tokens from candle-quant's reading of the file's tokenizer, the same for both engines.
    let opened = io::open_decoder(&ModelSource::Gguf(args.model.clone()))?;
    let (tokenizer, config) = (opened.tokenizer.clone(), opened.config.clone());
    let bos = config.bos_token_id.filter(|_| config.add_bos_token);
    let mut engine = Engine::open(&args)?;
    if let Some(prompt) = &args.generate {
        let ids = tokenizer.encode(prompt.as_str(), false).map_err(|e| anyhow!("tokenizing: {e}"))?;
        let mut tokens: Vec<u32> = bos.into_iter().chain(ids.get_ids().iter().copied()).collect();
        let prompt_len = tokens.len();
        for _ in 0..args.tokens {
            let logits = match &mut engine {
                Engine::Ours(lm) => lm.model.forward(&tokens, &mut KvCache::default(), false)?,
                e => e.step(&tokens, 0)?,
            };
            tokens.push(logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?);
        }
        let text = tokenizer.decode(&tokens[prompt_len..], false).map_err(|e| anyhow!("decoding: {e}"))?;
        println!("{text}");
        return Ok(());
    }
    let Some(text_path) = &args.text else { bail!("--text FILE (or --generate PROMPT) is required") };
    let text = std::fs::read_to_string(text_path).with_context(|| format!("reading {}", text_path.display()))?;
    let ids = tokenizer.encode(text.as_str(), false).map_err(|e| anyhow!("tokenizing: {e}"))?;
    let mut tokens: Vec<u32> = bos.into_iter().chain(ids.get_ids().iter().copied()).collect();
    let chunks = (tokens.len() / args.ctx).min(args.chunks);
    if chunks == 0 {
        bail!("{}: {} tokens, fewer than one chunk of {}", text_path.display(), tokens.len(), args.ctx)
    }
    let first = args.ctx / 2;
    let (mut nll, mut count) = (0f64, 0usize);
    for c in 0..chunks {
        let chunk = &mut tokens[c * args.ctx..(c + 1) * args.ctx];
        if let Some(b) = bos {
            chunk[0] = b;
        }
        let log_probs = engine.log_probs(chunk, first)?.to_vec2::<f32>()?;
        for (row, &next) in log_probs.iter().zip(&chunk[first + 1..]) {
            nll -= row[next as usize] as f64;
            count += 1;
        }
        eprint!("[{}]{:.4},", c + 1, (nll / count as f64).exp());
    }
    eprintln!();
    println!(
        "{} {}: {} tokens, {chunks} chunks of {}: PPL = {:.4}",
        args.engine,
        args.model.display(),
        tokens.len(),
        args.ctx,
        (nll / count as f64).exp()
    );
    Ok(())
}
