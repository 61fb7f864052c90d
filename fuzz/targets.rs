//! The loaders under fuzzing, shared by the fuzzer (`examples/fuzz_loaders.rs`) and the
//! regression tests that replay what it found (`tests/hostile_input.rs`).
//!
//! Each target takes the bytes of one file, puts them where a model loader reads them beside
//! valid companions (a tiny Llama written by [`Seeds::build`]), and loads the whole model. The
//! loader may fail — it must, for most inputs — but with an error, never a panic, and without
//! allocating what a header claims before checking it against the file.

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use candle_quant::checkpoint::{Int8Kind, SaveOptions};
use candle_quant::io::compressed_tensors::write_compressed_tensors;
use candle_quant::io::{open_decoder, ModelSource};
use candle_quant::{QuantConfig, WeightQuant};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, refusing any single allocation above its limit (the process then
/// aborts with "memory allocation of N bytes failed"), so that a size a header claims without
/// being checked shows up as a crash instead of exhausting the machine. Install it with
/// `#[global_allocator] static A: Guarded = Guarded(AtomicUsize::new(limit));`.
pub struct Guarded(pub AtomicUsize);

// SAFETY: forwards to `System`, returning null (a valid allocation failure) above the limit.
unsafe impl GlobalAlloc for Guarded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > self.0.load(Ordering::Relaxed) {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract for `alloc` is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > self.0.load(Ordering::Relaxed) {
            return std::ptr::null_mut();
        }
        // SAFETY: as for `realloc` on `System`, which allocated `ptr`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// What a fuzzing input replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A whole GGUF file: header, metadata (the tokenizer is built from it) and tensors.
    Gguf,
    /// `model.safetensors` of a float Hugging Face folder.
    Safetensors,
    /// `config.json` of a float Hugging Face folder.
    Config,
    /// `tokenizer.json` of a float Hugging Face folder.
    Tokenizer,
    /// `model.safetensors` of an int8 folder (`I8` weights, `F16` scales).
    Int8,
    /// `config.json` of an int8 folder, with its `quantization_config`.
    Int8Config,
    /// A whole GGUF file whose linear weights are read as blocks (`Q8_0` beside float).
    GgufBlocks,
    /// `model.safetensors` of a compressed-tensors folder (int8, and packed int4 with zero points).
    CompressedTensors,
    /// `config.json` of a compressed-tensors folder, with its `quantization_config`.
    CompressedTensorsConfig,
}

impl Target {
    pub const ALL: [Target; 9] = [
        Target::Gguf,
        Target::Safetensors,
        Target::Config,
        Target::Tokenizer,
        Target::Int8,
        Target::Int8Config,
        Target::GgufBlocks,
        Target::CompressedTensors,
        Target::CompressedTensorsConfig,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Gguf => "gguf",
            Target::Safetensors => "safetensors",
            Target::Config => "config",
            Target::Tokenizer => "tokenizer",
            Target::Int8 => "int8",
            Target::Int8Config => "int8-config",
            Target::GgufBlocks => "gguf-blocks",
            Target::CompressedTensors => "ct",
            Target::CompressedTensorsConfig => "ct-config",
        }
    }

    pub fn parse(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Whether inputs are JSON text (the fuzzer mutates those structurally too).
    pub fn is_json(self) -> bool {
        matches!(self, Target::Config | Target::Tokenizer | Target::Int8Config | Target::CompressedTensorsConfig)
    }
}

/// A work folder holding one valid model of each kind: the seeds, and the companions of every
/// input.
pub struct Seeds {
    dir: PathBuf,
}

const HIDDEN: usize = 16;
const VOCAB: usize = 40;

/// The tiny Llama's tokenizer: the 26 letters, space as `Ġ`, a few merges, two control tokens.
fn tokens() -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut tokens: Vec<String> = (b'a'..=b'z').map(|c| (c as char).to_string()).collect();
    tokens.extend(["Ġ", "th", "he", "the", "Ġt", "in", "an", "er", "on", "re", "at", "en"].map(String::from));
    tokens.extend(["<|endoftext|>", "<|im_end|>"].map(String::from));
    let mut types = vec![1; tokens.len()];
    let n = types.len();
    types[n - 2..].fill(3);
    let merges = ["t h", "h e", "th e", "Ġ t", "i n", "a n", "e r", "o n", "r e", "a t", "e n"].map(String::from).to_vec();
    (tokens, types, merges)
}

fn tensor(dims: &[usize], seed: usize) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 1000.0 - 0.5) * 0.2).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
}

/// A valid GGUF Llama: 1 layer, hidden 16, 2 heads, 1 key/value head, vocabulary 40; with
/// `blocks`, its one linear weight 32 wide (`ffn_down`) as `Q8_0`.
fn write_gguf(path: &Path, blocks: bool) -> Result<()> {
    let (toks, types, merges) = tokens();
    let (ffn, kv) = (32usize, HIDDEN / 2);
    let shapes: Vec<(&str, Vec<usize>)> = vec![
        ("token_embd.weight", vec![VOCAB, HIDDEN]),
        ("blk.0.attn_norm.weight", vec![HIDDEN]),
        ("blk.0.attn_q.weight", vec![HIDDEN, HIDDEN]),
        ("blk.0.attn_k.weight", vec![kv, HIDDEN]),
        ("blk.0.attn_v.weight", vec![kv, HIDDEN]),
        ("blk.0.attn_output.weight", vec![HIDDEN, HIDDEN]),
        ("blk.0.ffn_norm.weight", vec![HIDDEN]),
        ("blk.0.ffn_gate.weight", vec![ffn, HIDDEN]),
        ("blk.0.ffn_up.weight", vec![ffn, HIDDEN]),
        ("blk.0.ffn_down.weight", vec![HIDDEN, ffn]),
        ("output_norm.weight", vec![HIDDEN]),
    ];
    let tensors: Vec<(&str, QTensor)> = shapes
        .iter()
        .enumerate()
        .map(|(i, (name, dims))| {
            let ty = if blocks && *name == "blk.0.ffn_down.weight" { GgmlDType::Q8_0 } else { GgmlDType::F32 };
            Ok((*name, QTensor::quantize(&tensor(dims, i)?, ty)?))
        })
        .collect::<Result<_>>()?;
    let strings = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(HIDDEN as u32)),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.attention.head_count_kv", Value::U32(1)),
        ("llama.feed_forward_length", Value::U32(ffn as u32)),
        ("llama.block_count", Value::U32(1)),
        ("llama.context_length", Value::U32(64)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        ("tokenizer.ggml.tokens", strings(&toks)),
        ("tokenizer.ggml.token_type", Value::Array(types.iter().map(|&t| Value::I32(t)).collect())),
        ("tokenizer.ggml.merges", strings(&merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(VOCAB as u32 - 2)),
        ("tokenizer.ggml.eos_token_id", Value::U32(VOCAB as u32 - 1)),
    ];
    let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    let mut file = std::fs::File::create(path)?;
    gguf_file::write(&mut file, &meta_refs, &tensor_refs)
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
}

impl Seeds {
    /// Writes `model.gguf`, the same model as a float folder `float/` and as an int8 folder
    /// `int8/` under `dir`, and a copy of each folder that inputs are placed in.
    pub fn build(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let gguf = dir.join("model.gguf");
        write_gguf(&gguf, false)?;
        write_gguf(&dir.join("blocks.gguf"), true)?;
        let opened = open_decoder(&ModelSource::Gguf(gguf.clone()))?;
        let float = dir.join("float");
        std::fs::create_dir_all(&float)?;
        let mut tensors = std::collections::HashMap::new();
        for e in opened.tensors.entries() {
            let bytes = opened.tensors.read_bytes(&e.name)?;
            tensors.insert(e.name.clone(), Tensor::from_raw_buffer(&bytes, e.dtype.candle(), &e.shape, &Device::Cpu)?);
        }
        candle_core::safetensors::save(&tensors, float.join("model.safetensors"))?;
        let json = |v: &serde_json::Value| serde_json::to_vec_pretty(v).map_err(|e| candle_core::Error::Msg(e.to_string()));
        std::fs::write(float.join("config.json"), json(&opened.config_json)?)?;
        let tokenizer = opened.tokenizer.to_string(true).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        std::fs::write(float.join("tokenizer.json"), tokenizer)?;
        let int8 = dir.join("int8");
        if !int8.is_dir() {
            opened.quantize_to(&int8, &QuantConfig::default(), Int8Kind::Dynamic, &SaveOptions::default(), |_| {})?;
        }
        let ct = dir.join("ct");
        if !ct.is_dir() {
            // Int8 attention, int4 MLP with zero points: every tensor kind of the format.
            let config = QuantConfig::default().override_weight("*.mlp.*", WeightQuant::Int4 { group: 16, zero_point: true });
            let mixed = dir.join("int8-int4");
            let _ = std::fs::remove_dir_all(&mixed);
            opened.quantize_to(&mixed, &config, Int8Kind::Dynamic, &SaveOptions::default(), |_| {})?;
            let stored = open_decoder(&ModelSource::Folder(mixed.clone()))?;
            let options = stored.save_options_for(&ct, &SaveOptions::default())?;
            let q = stored.quantization.clone().ok_or_else(|| candle_core::Error::Msg("the int8 seed has no scheme".into()))?;
            write_compressed_tensors(&ct, &*stored.tensors, &q, &options, |_| {})?;
        }
        for (from, to) in [("float", "float-input"), ("int8", "int8-input"), ("ct", "ct-input")] {
            let to = dir.join(to);
            std::fs::create_dir_all(&to)?;
            for entry in std::fs::read_dir(dir.join(from))? {
                let entry = entry?;
                std::fs::copy(entry.path(), to.join(entry.file_name()))?;
            }
        }
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// The valid file that `target`'s inputs stand in for.
    pub fn seed(&self, target: Target) -> Result<Vec<u8>> {
        read(&self.dir.join(self.relative(target)))
    }

    fn relative(&self, target: Target) -> &'static str {
        match target {
            Target::Gguf => "model.gguf",
            Target::Safetensors => "float/model.safetensors",
            Target::Config => "float/config.json",
            Target::Tokenizer => "float/tokenizer.json",
            Target::Int8 => "int8/model.safetensors",
            Target::Int8Config => "int8/config.json",
            Target::GgufBlocks => "blocks.gguf",
            Target::CompressedTensors => "ct/model.safetensors",
            Target::CompressedTensorsConfig => "ct/config.json",
        }
    }

    /// Loads the model with `input` in place of `target`'s file: `Ok` or an error, never a
    /// panic.
    pub fn run(&self, target: Target, input: &[u8]) -> Result<()> {
        let (source, file) = match target {
            Target::Gguf | Target::GgufBlocks => {
                let file = self.dir.join("input.gguf");
                (ModelSource::Gguf(file.clone()), file)
            }
            Target::CompressedTensors | Target::CompressedTensorsConfig => {
                let name = Path::new(self.relative(target)).file_name().unwrap_or_default();
                (ModelSource::Folder(self.dir.join("ct-input")), self.dir.join("ct-input").join(name))
            }
            Target::Int8 | Target::Int8Config => {
                let name = Path::new(self.relative(target)).file_name().unwrap_or_default();
                (ModelSource::Folder(self.dir.join("int8-input")), self.dir.join("int8-input").join(name))
            }
            _ => {
                let name = Path::new(self.relative(target)).file_name().unwrap_or_default();
                (ModelSource::Folder(self.dir.join("float-input")), self.dir.join("float-input").join(name))
            }
        };
        std::fs::write(&file, input)?;
        let result = open_decoder(&source).and_then(|m| m.load(&mut |_| {}));
        // Put the valid file back for the next input of another target.
        if !matches!(target, Target::Gguf | Target::GgufBlocks) {
            std::fs::write(&file, self.seed(target)?)?;
        }
        let lm = result?;
        // A model that loads must also run.
        lm.model.forward(&[1, 2, 3], &mut Default::default(), true).map(|_| ())
    }
}
