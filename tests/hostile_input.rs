//! Hostile input: every file in `fuzz/regressions/<target>/` — inputs that once crashed a
//! loader under `scripts/fuzz.sh`, or aborted it with an allocation a header claimed — loads the
//! model through the same path as the fuzzer and must either load (an extreme but harmless value)
//! or end in an error that names the file; never a panic. An allocation above 1 GiB (the inputs are a few KB) aborts this test binary instead of
//! exhausting the machine.

#[path = "it/common.rs"]
mod common;

#[path = "../fuzz/targets.rs"]
#[allow(dead_code)] // the fuzzer's command-line helpers
mod targets;

use std::sync::atomic::AtomicUsize;
use targets::{Guarded, Seeds, Target};

#[global_allocator]
static ALLOCATOR: Guarded = Guarded(AtomicUsize::new(1 << 30));

#[test]
fn every_regression_input_loads_or_is_an_error_naming_the_file() {
    let work = common::Scratch::new("hostile");
    let seeds = Seeds::build(&work).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut replayed = 0;
    for target in Target::ALL {
        // The valid file loads: the harness itself works.
        seeds.run(target, &seeds.seed(target).unwrap()).unwrap_or_else(|e| panic!("{}: the seed fails: {e}", target.name()));
        let Ok(dir) = std::fs::read_dir(root.join(target.name())) else { continue };
        for file in dir {
            let path = file.unwrap().path();
            let input = std::fs::read(&path).unwrap();
            replayed += 1;
            let Err(err) = seeds.run(target, &input) else { continue };
            let err = err.to_string();
            let names = ["input.gguf", "model.safetensors", "config.json", "tokenizer.json", "model config"];
            assert!(names.iter().any(|n| err.contains(n)), "{}: the error does not name the file: {err}", path.display());
        }
    }
    assert!(replayed >= 9, "only {replayed} regression inputs found under {}", root.display());
}

/// A `tokenizer.json` that is valid JSON but whose decoder has the wrong shape makes the
/// tokenizers crate panic while deserializing; the loader turns that into an error.
#[test]
fn a_tokenizer_the_tokenizers_crate_panics_on_is_an_error() {
    let work = common::Scratch::new("hostile-tok");
    let seeds = Seeds::build(&work).unwrap();
    let mut json: serde_json::Value = serde_json::from_slice(&seeds.seed(Target::Tokenizer).unwrap()).unwrap();
    json["decoder"] = serde_json::json!({"type": 5});
    let err = seeds.run(Target::Tokenizer, &serde_json::to_vec(&json).unwrap()).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json") && err.contains("not a tokenizer"), "{err}");
}
