//! The `candle-quant` binary end to end on the offline default model.

use std::process::Command;

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_candle-quant")).args(args).env("RAYON_NUM_THREADS", "2").output().unwrap()
}

#[test]
fn compare_json_has_every_field() {
    let out = cli(&[
        "compare",
        "--prompt",
        "The capital of France is",
        "--no-chat-template",
        "--max-new-tokens",
        "6",
        "--repeats",
        "2",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "model",
        "prompt_tokens",
        "new_tokens",
        "decode_speedup",
        "decode_speedups",
        "repeats",
        "first_divergence",
        "top1_agreement",
        "quantized_layers",
        "skipped_layers",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    for side in ["f32", "int8"] {
        for key in ["text", "prefill_ms", "decode_tok_s", "weight_bytes"] {
            assert!(v[side].get(key).is_some(), "missing {side}.{key}");
        }
    }
    assert!(v["f32"]["text"].as_str().unwrap().contains("Paris"), "{v}");
    assert!(v["int8"]["weight_bytes"].as_u64().unwrap() < v["f32"]["weight_bytes"].as_u64().unwrap() / 2);
    assert_eq!(v["quantized_layers"], 211);
    // Two alternating runs; the reported speedup is the median (upper middle) of the pair.
    let runs: Vec<f64> = v["decode_speedups"].as_array().unwrap().iter().map(|s| s.as_f64().unwrap()).collect();
    assert_eq!(runs.len(), 2);
    assert_eq!(v["decode_speedup"].as_f64().unwrap(), runs[0].max(runs[1]));
}

#[test]
fn eval_json_and_inspect() {
    let text = std::env::temp_dir().join(format!("candle-quant-cli-{}.txt", std::process::id()));
    std::fs::write(&text, "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do.")
        .unwrap();
    let out = cli(&["eval", "--text", text.to_str().unwrap(), "--window", "16", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["f32_ppl", "int8_ppl", "ppl_delta_pct", "kld", "top1_agreement", "tokens"] {
        assert!(v[key].is_number(), "missing {key} in {v}");
    }
    let out = cli(&["inspect", "--float-lm-head"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("model.layers.29.mlp.down_proj") && listing.contains("1536x576") && listing.contains("int8-dynamic"));
    assert!(listing.lines().any(|l| l.starts_with("lm_head") && l.contains("float")), "{listing}");
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let out = cli(&["eval", "--text", "/no/such/file.txt"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/file.txt"));
    let out = cli(&["generate", "--model", "/no/such/model.gguf"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/model.gguf"));
    let out = cli(&["compare", "--repeats", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--repeats"), "{}", String::from_utf8_lossy(&out.stderr));
}
