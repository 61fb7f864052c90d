//! A mutational fuzzer for the model loaders, on stable Rust: each execution mutates a valid
//! file (GGUF, safetensors, `config.json`, `tokenizer.json`, an int8 checkpoint's safetensors),
//! loads the model with it, and records a panic as a crash. An allocation larger than
//! `--max-alloc` (default 256 MiB, against inputs of a few KB) aborts the process: the input that
//! caused it is the one left in `<out>/current-<target>.bin`.
//!
//! `cargo run --release --example fuzz_loaders -- --target gguf --execs 20000 [--seed 1] [--out fuzz/crashes]`
//! (`scripts/fuzz.sh` runs every target; `--replay FILE` runs one input without catching its panic). Crashes go to `<out>/<target>-<hash>.bin`; copy them to
//! `fuzz/regressions/<target>/` for `tests/hostile_input.rs` to replay.

#[path = "../fuzz/targets.rs"]
mod targets;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use targets::{Guarded, Seeds, Target};

#[global_allocator]
static ALLOCATOR: Guarded = Guarded(AtomicUsize::new(usize::MAX));

/// xorshift64*: small and seedable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Integers that break length and shape arithmetic.
const INTERESTING: [u64; 14] = [0, 1, 2, 7, 8, 255, 256, 65_535, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 1 << 32, i64::MAX as u64, u64::MAX];

/// One to eight byte-level mutations: bit flips, interesting bytes and little-endian integers,
/// truncation, deleted, duplicated and inserted runs, and splices of the seed.
fn mutate_bytes(input: &mut Vec<u8>, seed: &[u8], rng: &mut Rng) {
    for _ in 0..1 + rng.below(8) {
        let len = input.len().max(1);
        match rng.below(8) {
            0 if !input.is_empty() => {
                let i = rng.below(len);
                input[i] ^= 1 << rng.below(8);
            }
            1 if !input.is_empty() => {
                let i = rng.below(len);
                input[i] = [0u8, 1, 0x7f, 0x80, 0xff][rng.below(5)];
            }
            2 | 3 if input.len() >= 8 => {
                let width = [2, 4, 8][rng.below(3)];
                let i = rng.below(input.len() - width + 1);
                let v = INTERESTING[rng.below(INTERESTING.len())].wrapping_add(rng.below(3) as u64).wrapping_sub(1);
                input[i..i + width].copy_from_slice(&v.to_le_bytes()[..width]);
            }
            4 => input.truncate(rng.below(len)),
            5 if !input.is_empty() => {
                let (a, n) = (rng.below(len), 1 + rng.below(64));
                input.drain(a..(a + n).min(input.len()));
            }
            6 if !input.is_empty() => {
                let (a, n) = (rng.below(len), 1 + rng.below(64));
                let run: Vec<u8> = input[a..(a + n).min(input.len())].to_vec();
                let at = rng.below(len);
                input.splice(at..at, run);
            }
            _ => {
                let (a, n) = (rng.below(seed.len().max(1)), 1 + rng.below(256));
                let run = seed.get(a..(a + n).min(seed.len())).unwrap_or(&[]);
                let at = rng.below(len);
                let end = (at + run.len()).min(input.len());
                input.splice(at..end, run.iter().copied());
            }
        }
    }
}

/// Structure-aware mutation of a JSON document: a random value somewhere in it becomes a value of
/// another kind, an extreme number, or disappears.
fn mutate_json(value: &mut serde_json::Value, rng: &mut Rng) {
    use serde_json::Value;
    let descend = rng.below(3) != 0;
    match value {
        Value::Object(map) if !map.is_empty() && descend => {
            let key = map.keys().nth(rng.below(map.len())).cloned().unwrap_or_default();
            if rng.below(8) == 0 {
                map.remove(&key);
            } else if let Some(child) = map.get_mut(&key) {
                mutate_json(child, rng);
            }
            return;
        }
        Value::Array(items) if !items.is_empty() && descend => {
            let i = rng.below(items.len());
            if rng.below(8) == 0 {
                items.remove(i);
            } else {
                mutate_json(&mut items[i], rng);
            }
            return;
        }
        _ => {}
    }
    *value = match rng.below(10) {
        0 => Value::Null,
        1 => (-1).into(),
        2 => 0.into(),
        3 => u64::MAX.into(),
        4 => (1u64 << 40).into(),
        5 => 1e300.into(),
        6 => "".into(),
        7 => Value::Array(vec![]),
        8 => Value::Object(Default::default()),
        _ => true.into(),
    };
}

fn hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let target = arg(&args, "--target").unwrap_or_else(|| "gguf".into());
    let target =
        Target::parse(&target).ok_or_else(|| anyhow::anyhow!("unknown target '{target}': one of {:?}", Target::ALL.map(|t| t.name())))?;
    let execs: u64 = arg(&args, "--execs").map_or(Ok(10_000), |v| v.parse())?;
    let mut rng = Rng(arg(&args, "--seed").map_or(Ok(1), |v| v.parse::<u64>())?.max(1));
    let out = PathBuf::from(arg(&args, "--out").unwrap_or_else(|| "fuzz/crashes".into()));
    let max_alloc: usize = arg(&args, "--max-alloc").map_or(Ok(256 << 20), |v| v.parse())?;
    std::fs::create_dir_all(&out)?;
    let work = std::env::temp_dir().join(format!("candle-quant-fuzz-{}-{}", target.name(), std::process::id()));
    let seeds = Seeds::build(&work)?;
    let seed = seeds.seed(target)?;
    let seed_json: Option<serde_json::Value> = if target.is_json() { serde_json::from_slice(&seed).ok() } else { None };
    seeds.run(target, &seed).map_err(|e| anyhow::anyhow!("the valid seed does not load: {e}"))?;
    if let Some(file) = arg(&args, "--replay") {
        // One input, without catching a panic (RUST_BACKTRACE=1 shows where it is).
        match seeds.run(target, &std::fs::read(&file)?) {
            Ok(()) => println!("{file}: loads"),
            Err(e) => println!("{file}: error: {e}"),
        }
        return Ok(());
    }

    // Panics are the findings: keep their message, print nothing per panic.
    let message = Arc::new(Mutex::new(String::new()));
    let hook_message = message.clone();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(mut m) = hook_message.lock() {
            *m = format!("{info}");
        }
    }));
    ALLOCATOR.0.store(max_alloc, Ordering::Relaxed);

    let current = out.join(format!("current-{}.bin", target.name()));
    let (mut ok, mut errors, mut crashes) = (0u64, 0u64, Vec::new());
    let start = std::time::Instant::now();
    for exec in 0..execs {
        let input = match (&seed_json, rng.below(2)) {
            (Some(json), 0) => {
                let mut v = json.clone();
                for _ in 0..1 + rng.below(3) {
                    mutate_json(&mut v, &mut rng);
                }
                serde_json::to_vec(&v)?
            }
            _ => {
                let mut v = seed.clone();
                mutate_bytes(&mut v, &seed, &mut rng);
                v
            }
        };
        std::fs::write(&current, &input)?;
        match std::panic::catch_unwind(|| seeds.run(target, &input)) {
            Ok(Ok(())) => ok += 1,
            Ok(Err(_)) => errors += 1,
            Err(_) => {
                let file = out.join(format!("{}-{:016x}.bin", target.name(), hash(&input)));
                std::fs::write(&file, &input)?;
                let m = message.lock().map(|m| m.clone()).unwrap_or_default();
                eprintln!("crash at execution {exec}: {} ({m})", file.display());
                crashes.push(file);
            }
        }
        if (exec + 1) % 2000 == 0 {
            eprintln!(
                "{}: {} executions, {} crashes, {:.0} exec/s",
                target.name(),
                exec + 1,
                crashes.len(),
                (exec + 1) as f64 / start.elapsed().as_secs_f64()
            );
        }
    }
    std::fs::remove_file(&current).ok();
    std::fs::remove_dir_all(&work).ok();
    println!(
        "{}: {execs} executions in {:.1} s: {ok} loaded, {errors} rejected with an error, {} crashes",
        target.name(),
        start.elapsed().as_secs_f64(),
        crashes.len()
    );
    if !crashes.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
