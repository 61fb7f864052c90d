//! Test helpers: the offline models (fetched when missing), a seeded generator (candle's CPU
//! `randn` cannot be seeded), error metrics, tiny model files and scratch folders.
#![allow(dead_code)]

use candle_core::{Device, Result, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The files of the offline models folder the tests read (`scripts/fetch-models.sh` writes them).
const OFFLINE_FILES: [&str; 4] =
    ["SmolLM2-135M-Instruct.Q4_1.gguf", "all-MiniLM-L6-v2/model.safetensors", "gemma-3-270m-q4_k_m.gguf", "texts/alice29.txt"];

/// The offline models folder, found as the binary finds it ([`candle_quant::io::models_dir`]) and
/// filled by `scripts/fetch-models.sh` the first time a test asks while a file is missing: once per
/// process, and under an exclusive lock on `<folder>.lock` so that test processes running side by
/// side do not fetch into the same folder at once.
pub fn models() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = candle_quant::io::models_dir();
        let complete = |d: &Path| OFFLINE_FILES.iter().all(|f| d.join(f).is_file());
        if complete(&dir) {
            return dir;
        }
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
        let lock_path = dir.with_extension("lock");
        let lock = std::fs::File::create(&lock_path).unwrap_or_else(|e| panic!("cannot create {}: {e}", lock_path.display()));
        // flock, not File::lock: the aarch64 test chroot builds with Debian's older rustc.
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor this File owns for the whole call.
        let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(locked, 0, "cannot lock {}: {}", lock_path.display(), std::io::Error::last_os_error());
        // Another process may have fetched while this one waited for the lock.
        if !complete(&dir) {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-models.sh");
            eprintln!("fetching the offline models into {} (once)", dir.display());
            let status = std::process::Command::new("bash")
                .arg(&script)
                .env("CANDLE_QUANT_MODELS", &dir)
                .status()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            assert!(status.success(), "{} failed ({status}): the tests need the offline models", script.display());
        }
        drop(lock);
        dir
    })
}

/// A file of the offline models folder ([`models`]), e.g. `texts/alice29.txt`.
pub fn model_file(name: &str) -> PathBuf {
    let p = models().join(name);
    assert!(p.exists(), "{} is missing from the offline models folder", p.display());
    p
}

/// An empty folder `candle-quant-<name>-<pid>` under the system temp folder for one test,
/// removed with everything in it when dropped — also when the test fails — so that test runs
/// leave nothing behind (model folders written by the tests weigh hundreds of megabytes).
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("candle-quant-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        Scratch(dir)
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// SplitMix64 + Box–Muller: deterministic normal samples for reproducible tests.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }

    pub fn normals(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * std).collect()
    }

    pub fn tensor(&mut self, shape: &[usize], std: f32) -> Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_vec(self.normals(n, std), shape, &Device::Cpu)
    }

    pub fn i8s(&mut self, n: usize, lo: i32, hi: i32) -> Vec<i8> {
        (0..n).map(|_| (lo + (self.next_u64() % (hi - lo + 1) as u64) as i32) as i8).collect()
    }
}

/// `‖a − b‖ / ‖b‖` over all elements.
pub fn rel_error(a: &Tensor, b: &Tensor) -> Result<f32> {
    let num = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
    let den = b.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
    Ok(num / den)
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// Whether `got` equals `want` up to the rounding of a float sum: computing a sum of products
/// with `adds` f32 roundings errs by at most `adds·u·Σ|terms|` (u = 2⁻²⁴); the bound used is
/// `adds·ε·Σ|terms|` with ε = f32::EPSILON = 2u, which covers rounding on both sides when
/// `want` is an f32 sum too. A bound relative to `|want|` alone fails where the terms cancel:
/// proptest found an output of 0.6156 summed from 61 terms of magnitude ~100.
pub fn within_sum_rounding(got: f32, want: f64, abs_terms: f64, adds: usize) -> bool {
    (got as f64 - want).abs() <= adds as f64 * f32::EPSILON as f64 * abs_terms
}

/// A random tiny Llama, named like an HF checkpoint.
pub fn tiny_llama(seed: u64) -> HashMap<String, Tensor> {
    let mut rng = Rng::new(seed);
    let mut t = HashMap::new();
    let mut add = |name: String, shape: &[usize], std: f32| {
        t.insert(name, rng.tensor(shape, std).unwrap());
    };
    add("model.embed_tokens.weight".into(), &[30522, 64], 1.0);
    add("lm_head.weight".into(), &[30522, 64], 0.1);
    add("model.norm.weight".into(), &[64], 1.0);
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        for (n, shape) in [
            ("self_attn.q_proj", [64, 64]),
            ("self_attn.k_proj", [32, 64]),
            ("self_attn.v_proj", [32, 64]),
            ("self_attn.o_proj", [64, 64]),
            ("mlp.gate_proj", [96, 64]),
            ("mlp.up_proj", [96, 64]),
            ("mlp.down_proj", [64, 96]),
        ] {
            add(format!("{p}.{n}.weight"), &shape, 0.125);
        }
        add(format!("{p}.input_layernorm.weight"), &[64], 1.0);
        add(format!("{p}.post_attention_layernorm.weight"), &[64], 1.0);
    }
    t
}

/// Writes config, tokenizer (MiniLM's, for its vocabulary size) and weights in `shards` files.
pub fn write_model(dir: &Path, tensors: &HashMap<String, Tensor>, shards: usize, config: &str) {
    std::fs::write(dir.join("config.json"), config).unwrap();
    std::fs::copy(model_file("all-MiniLM-L6-v2/tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    if shards == 1 {
        candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
        return;
    }
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut map = serde_json::Map::new();
    for s in 0..shards {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", s + 1);
        let part: HashMap<String, Tensor> = names.iter().skip(s).step_by(shards).map(|n| ((*n).clone(), tensors[*n].clone())).collect();
        for n in part.keys() {
            map.insert(n.clone(), file.clone().into());
        }
        candle_core::safetensors::save(&part, dir.join(file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}
