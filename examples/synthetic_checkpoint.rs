//! Writes a random-weight Hugging Face Llama folder of a real model's shape — config.json,
//! tokenizer.json, bf16 safetensors sharded like the original — so that quantizing, loading and
//! generating at 1B–7B scale can be measured offline. Random weights test memory, time and
//! plumbing, never accuracy.
//!
//!   cargo run --release --example synthetic_checkpoint -- llama-7b /data/llama-7b-random
//!   shapes: llama-7b (Llama-2-7B: 32 layers, hidden 4096, MLP 11008, 32 heads, vocab 32000,
//!           untied, two shards), llama-1b (Llama-3.2-1B: 16 layers, hidden 2048, MLP 8192,
//!           32 heads / 8 key-value heads, vocab 128256, tied, llama3 RoPE), tiny (for tests)

use anyhow::{bail, Context, Result};
use candle_quant::source::{write_shards, Dtype, Entry, TensorSource};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::Tokenizer;

/// A Llama shape and how the original is stored.
struct Shape {
    layers: usize,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    tied: bool,
    rope_theta: f32,
    llama3_rope: bool,
    context: usize,
    /// Largest safetensors file (the original's sharding).
    shard_bytes: u64,
}

fn shape(name: &str) -> Result<Shape> {
    Ok(match name {
        "llama-7b" => Shape {
            layers: 32,
            hidden: 4096,
            intermediate: 11008,
            heads: 32,
            kv_heads: 32,
            vocab: 32000,
            tied: false,
            rope_theta: 10_000.0,
            llama3_rope: false,
            context: 4096,
            shard_bytes: 10_000_000_000,
        },
        "llama-1b" => Shape {
            layers: 16,
            hidden: 2048,
            intermediate: 8192,
            heads: 32,
            kv_heads: 8,
            vocab: 128_256,
            tied: true,
            rope_theta: 500_000.0,
            llama3_rope: true,
            context: 131_072,
            shard_bytes: 5_000_000_000,
        },
        "tiny" => Shape {
            layers: 2,
            hidden: 128,
            intermediate: 352,
            heads: 4,
            kv_heads: 2,
            vocab: 1000,
            tied: true,
            rope_theta: 10_000.0,
            llama3_rope: false,
            context: 512,
            shard_bytes: 200_000,
        },
        other => bail!("unknown shape '{other}' (llama-7b, llama-1b, tiny)"),
    })
}

/// Tensors of the shape in checkpoint order, filled with seeded uniform noise when read:
/// linear weights in ±√(3/in) (unit-variance outputs), norms near 1, embeddings in ±1.
struct RandomLlama {
    entries: Vec<Entry>,
    seed: u64,
}

impl RandomLlama {
    fn new(s: &Shape, seed: u64) -> Self {
        let d = s.hidden / s.heads;
        let mut entries = vec![];
        let mut add = |name: String, shape: Vec<usize>| entries.push(Entry { name, dtype: Dtype::BF16, shape });
        add("model.embed_tokens.weight".into(), vec![s.vocab, s.hidden]);
        for l in 0..s.layers {
            let p = format!("model.layers.{l}");
            add(format!("{p}.self_attn.q_proj.weight"), vec![s.heads * d, s.hidden]);
            add(format!("{p}.self_attn.k_proj.weight"), vec![s.kv_heads * d, s.hidden]);
            add(format!("{p}.self_attn.v_proj.weight"), vec![s.kv_heads * d, s.hidden]);
            add(format!("{p}.self_attn.o_proj.weight"), vec![s.hidden, s.heads * d]);
            add(format!("{p}.mlp.gate_proj.weight"), vec![s.intermediate, s.hidden]);
            add(format!("{p}.mlp.up_proj.weight"), vec![s.intermediate, s.hidden]);
            add(format!("{p}.mlp.down_proj.weight"), vec![s.hidden, s.intermediate]);
            add(format!("{p}.input_layernorm.weight"), vec![s.hidden]);
            add(format!("{p}.post_attention_layernorm.weight"), vec![s.hidden]);
        }
        add("model.norm.weight".into(), vec![s.hidden]);
        if !s.tied {
            add("lm_head.weight".into(), vec![s.vocab, s.hidden]);
        }
        Self { entries, seed }
    }
}

/// splitmix64: a fast, seedable stream of 64 random bits.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl TensorSource for RandomLlama {
    fn entries(&self) -> &[Entry] {
        &self.entries
    }

    fn read_bytes(&self, name: &str) -> candle_core::Result<Vec<u8>> {
        let (i, e) = self
            .entries
            .iter()
            .enumerate()
            .find(|(_, e)| e.name == name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no tensor {name}")))?;
        let (n, is_norm) = (e.shape.iter().product::<usize>(), e.shape.len() == 1);
        let (center, half) = match (is_norm, name.contains("embed_tokens")) {
            (true, _) => (1.0, 0.1),
            (false, true) => (0.0, 1.0),
            (false, false) => (0.0, (3.0 / *e.shape.last().unwrap_or(&1) as f32).sqrt()),
        };
        let mut out = vec![0u8; n * 2];
        let stream = splitmix(self.seed ^ (i as u64).wrapping_mul(0x2545_F491_4F6C_DD1D));
        out.par_chunks_mut(8192).enumerate().for_each(|(c, chunk)| {
            let mut state = splitmix(stream ^ c as u64);
            for pair in chunk.chunks_exact_mut(2) {
                state = splitmix(state);
                let u = (state >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
                pair.copy_from_slice(&half::bf16::from_f32(center + (2.0 * u - 1.0) * half).to_le_bytes());
            }
        });
        Ok(out)
    }

    fn describe(&self, name: &str) -> String {
        format!("random tensor '{name}'")
    }
}

/// Byte-level BPE over the 256 byte symbols, padded with filler tokens to `vocab`.
fn tokenizer(vocab: usize) -> Result<Tokenizer> {
    let mut tokens: Vec<String> = ByteLevel::alphabet().into_iter().map(|c| c.to_string()).collect();
    tokens.sort();
    tokens.extend((tokens.len()..vocab).map(|i| format!("<|filler_{i}|>")));
    let map: tokenizers::models::bpe::Vocab = tokens.into_iter().enumerate().map(|(i, t)| (t, i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(map, vec![]).build().map_err(anyhow::Error::msg)?;
    let mut t = Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    t.with_decoder(Some(ByteLevel::default()));
    Ok(t)
}

fn config(s: &Shape) -> serde_json::Value {
    let mut c = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": s.rope_theta,
        "max_position_embeddings": s.context,
        "vocab_size": s.vocab,
        "tie_word_embeddings": s.tied,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    });
    if s.llama3_rope {
        c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    }
    c
}

fn write(dir: &Path, s: &Shape, seed: u64) -> Result<()> {
    let name = dir.file_name().and_then(|n| n.to_str()).context("output must be a folder name")?;
    let tmp = dir.with_file_name(format!(".{name}.partial"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    let source = RandomLlama::new(s, seed);
    let total: u64 = source.entries.iter().map(Entry::nbytes).sum();
    let mut last = 0;
    write_shards(&tmp, &source, s.shard_bytes, &mut |p| {
        let pct = 100 * p.done / p.total.max(1);
        if pct >= last + 5 || p.done == p.total {
            eprint!("\r{:.2} / {:.2} GB", p.done as f64 / 1e9, total as f64 / 1e9);
            last = pct;
        }
    })?;
    eprintln!();
    std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(&config(s))?)?;
    tokenizer(s.vocab)?.save(tmp.join("tokenizer.json"), false).map_err(anyhow::Error::msg)?;
    std::fs::rename(&tmp, dir)?;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [shape_name, out, rest @ ..] = args.as_slice() else {
        bail!("usage: synthetic_checkpoint SHAPE OUT_DIR [SEED]   (SHAPE: llama-7b, llama-1b, tiny)")
    };
    let seed = rest.first().map(|s| s.parse()).transpose().context("seed must be an integer")?.unwrap_or(0);
    let out = PathBuf::from(out);
    if out.exists() {
        bail!("{}: already exists", out.display())
    }
    let s = shape(shape_name)?;
    let start = std::time::Instant::now();
    write(&out, &s, seed)?;
    println!("wrote {} ({shape_name}, random bf16 weights) in {:.1} s", out.display(), start.elapsed().as_secs_f64());
    Ok(())
}
