//! The `candle-quant` binary end to end on the offline default model.

use crate::common;

use std::process::Command;

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_candle-quant"))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .env("CANDLE_QUANT_MODELS", common::models())
        .output()
        .unwrap()
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

/// `bench --json`: one record per (shape, M, threads) with the kernel path and ratios that are
/// the quotients of the medians reported beside them (what the records say, not how fast).
#[test]
fn bench_json_records() {
    let out = cli(&["bench", "--m", "1", "--threads", "1", "--in", "576", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let records = v.as_array().unwrap();
    let shapes: Vec<(u64, u64)> = records.iter().map(|r| (r["in"].as_u64().unwrap(), r["out"].as_u64().unwrap())).collect();
    assert_eq!(shapes, [(576, 1536), (576, 576)]);
    let isa = format!("{:?}", candle_quant::runtime::Isa::best());
    for r in records {
        assert_eq!((r["m"].as_u64(), r["threads"].as_u64(), r["isa"].as_str()), (Some(1), Some(1), Some(isa.as_str())));
        let t = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("missing {k} in {r}"));
        for k in
            ["int8_us", "f32_us", "q8_0_us", "int8_gb_s", "int8_gmac_s", "bandwidth_pct", "peak_pct", "read_bound_gb_s", "int8_peak_gmac_s"]
        {
            assert!(t(k).is_finite() && t(k) > 0.0, "{k} = {} in {r}", t(k));
        }
        assert!((t("ratio_f32") - t("int8_us") / t("f32_us")).abs() < 1e-9);
        assert!((t("ratio_q8_0") - t("int8_us") / t("q8_0_us")).abs() < 1e-9);
        // The percentages follow from the bounds recorded with them (1 thread here).
        assert!((t("bandwidth_pct") - 100.0 * t("int8_gb_s") / t("read_bound_gb_s")).abs() < 1e-6 * t("bandwidth_pct"));
        assert!((t("peak_pct") - 100.0 * t("int8_gmac_s") / t("int8_peak_gmac_s")).abs() < 1e-6 * t("peak_pct"));
    }
}

/// `CANDLE_QUANT_ISA` picks the kernel path every int8 layer runs on (the bench records name
/// it); a name this CPU has no path for is reported and ignored.
#[test]
fn kernel_path_override() {
    let run = |isa: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_candle-quant"))
            .args(["bench", "--m", "1", "--threads", "1", "--in", "576", "--json"])
            .env("CANDLE_QUANT_ISA", isa)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let paths: Vec<String> = v.as_array().unwrap().iter().map(|r| r["isa"].as_str().unwrap().to_string()).collect();
        (paths, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (paths, _) = run("reference");
    assert_eq!(paths, ["Reference", "Reference"]);
    let (paths, stderr) = run("pentium");
    let best = format!("{:?}", candle_quant::runtime::Isa::best());
    assert_eq!(paths, [best.as_str(), best.as_str()]);
    assert!(stderr.contains("ignoring CANDLE_QUANT_ISA=pentium"), "{stderr}");
}

#[test]
fn eval_json_and_inspect() {
    let scratch = common::Scratch::new("cli-eval");
    let text = scratch.join("text.txt");
    std::fs::write(&text, "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do.")
        .unwrap();
    let out = cli(&["eval", "--text", text.to_str().unwrap(), "--window", "16", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["reference_ppl", "candidate_ppl", "ppl_delta_pct", "kld", "top1_agreement", "tokens"] {
        assert!(v[key].is_number(), "missing {key} in {v}");
    }
    let out = cli(&["inspect", "--float-lm-head"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("model.layers.29.mlp.down_proj") && listing.contains("1536x576") && listing.contains("int8-dynamic"));
    assert!(listing.lines().any(|l| l.starts_with("lm_head") && l.contains("float")), "{listing}");
}

/// `calibrate` writes a calibration file that `eval --mode static` uses; static without a file,
/// or with a broken one, is an error naming what is missing.
#[test]
fn calibrate_then_static_eval() {
    let dir = common::Scratch::new("cli-calib");
    let (text, calib) = (dir.join("text.txt"), dir.join("calib.json"));
    std::fs::write(&text, "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to do: once or twice she had peeped into the book her sister was reading.").unwrap();
    let (t, c) = (text.to_str().unwrap(), calib.to_str().unwrap());
    let out = cli(&["calibrate", "--text", t, "--samples", "2", "--seq-len", "16", "--out", c]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&calib).unwrap()).unwrap();
    assert_eq!((file["format"].as_str(), file["windows"].as_u64()), (Some("candle-quant-calibration"), Some(2)));
    assert_eq!(file["layers"].as_object().unwrap().len(), 211);
    // The default: one range per 32 input channels (576 inputs → 18 scales in q_proj).
    assert_eq!(file["granularity"]["kind"], "per-group");
    assert_eq!(file["layers"]["model.layers.0.self_attn.q_proj"]["group_scales"].as_array().map(Vec::len), Some(18));
    let out = cli(&["eval", "--text", t, "--window", "16", "--mode", "static", "--calibration", c, "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["clamped_activations"] == 0 && v["float_activations"].is_u64() && v["kld"].is_number(), "{v}");
    assert_eq!(v["quantized_layers"], 211);
    // Saved as a static int8 folder, it loads back to the same model: the same figures.
    let folder = dir.join("static-int8");
    let out = cli(&["quantize", "--mode", "static", "--calibration", c, "--out", folder.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let gguf = common::model_file(candle_quant::io::DEFAULT_GGUF);
    let out =
        cli(&["eval", "--model", folder.to_str().unwrap(), "--reference", gguf.to_str().unwrap(), "--text", t, "--window", "16", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let saved: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((saved["kld"].as_f64(), saved["candidate_ppl"].as_f64()), (v["kld"].as_f64(), v["candidate_ppl"].as_f64()));
    let out = cli(&["eval", "--text", t, "--mode", "static"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--calibration"));
    std::fs::write(&calib, "{\"format\": \"candle-quant-calibration\"").unwrap();
    let out = cli(&["eval", "--text", t, "--mode", "static", "--calibration", c]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("calib.json"));
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
    let out = cli(&["bench", "--threads", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--threads"), "{}", String::from_utf8_lossy(&out.stderr));
    // Calibrated rounding: int4 only, and it needs a text to calibrate on.
    let text = common::model_file("texts/alice29.txt");
    let text = text.to_str().unwrap();
    let out = cli(&["eval", "--method", "awq", "--text", text]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--method awq rounds int4 weights"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["eval", "--bits", "4", "--weight-group", "32", "--method", "awq-gptq", "--text", text]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--method awq-gptq needs --calibration-text"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `quantize` writes a folder that `generate` runs as int8 and that `compare` measures against
/// a `--reference`; without one, `compare` says what it needs.
#[test]
fn quantize_then_generate_and_compare_from_the_folder() {
    let scratch = common::Scratch::new("cli-int8");
    let dir = scratch.join("int8");
    let out = cli(&["quantize", "--out", dir.to_str().unwrap(), "--max-shard-size", "60MB"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(dir.join("model.safetensors.index.json").is_file() && dir.join("tokenizer.json").is_file());
    // Again without --force: refused, the folder left as it was.
    let again = cli(&["quantize", "--out", dir.to_str().unwrap()]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("--force"));
    let args = ["--prompt", "The capital of France is", "--no-chat-template", "--max-new-tokens", "6"];
    let gen = cli(&[&["generate", "--model", dir.to_str().unwrap()][..], &args].concat());
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
    assert!(String::from_utf8_lossy(&gen.stdout).contains("Paris"), "{}", String::from_utf8_lossy(&gen.stdout));
    let no_ref = cli(&[&["compare", "--model", dir.to_str().unwrap()][..], &args].concat());
    assert!(!no_ref.status.success() && String::from_utf8_lossy(&no_ref.stderr).contains("--reference"));
    let models = common::models();
    let gguf = models.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let cmp = cli(&[&["compare", "--json", "--model", dir.to_str().unwrap(), "--reference", gguf.to_str().unwrap()][..], &args].concat());
    assert!(cmp.status.success(), "{}", String::from_utf8_lossy(&cmp.stderr));
    let v: serde_json::Value = serde_json::from_slice(&cmp.stdout).unwrap();
    assert_eq!(v["quantized_layers"], 211);
    // The f32 side is the reference, the int8 side the folder: the same int8 text as quantizing
    // in memory gives (the default compare).
    let mem = cli(&[&["compare", "--json"][..], &args].concat());
    let m: serde_json::Value = serde_json::from_slice(&mem.stdout).unwrap();
    assert_eq!(v["int8"]["text"], m["int8"]["text"]);
    assert_eq!(v["f32"]["text"], m["f32"]["text"]);
}

/// A long prompt from a file (prefill measurements), cut to its first N tokens; a missing file
/// is an error that names it.
#[test]
fn prompt_file_cut_to_n_tokens() {
    let models = common::models();
    let text = models.join("texts/alice29.txt");
    let out = cli(&["compare", "--json", "--prompt-file", text.to_str().unwrap(), "--max-prompt-tokens", "300", "--max-new-tokens", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["prompt_tokens"], 300);
    let missing = cli(&["generate", "--prompt-file", "/no/such/prompt.txt", "--max-new-tokens", "1"]);
    assert!(!missing.status.success() && String::from_utf8_lossy(&missing.stderr).contains("/no/such/prompt.txt"));
}

/// `embed` writes one unit-length embedding per non-empty line, in file order (batches are
/// formed by length), and says how fast it went.
#[test]
fn embed_writes_one_embedding_per_line_in_order() {
    let dir = common::Scratch::new("cli-embed");
    let file = dir.join("s.txt");
    let text = "A short one.\nA much longer sentence that takes many more tokens than the first one does.\n\nHi\nA short one.\n";
    std::fs::write(&file, text).unwrap();
    let out = dir.join("e.jsonl");
    let run = cli(&["embed", "--file", file.to_str().unwrap(), "--batch-size", "2", "--out", out.to_str().unwrap(), "--json"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let v: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(v["sentences"], 4);
    assert!(v["sentences_per_s"].as_f64().unwrap() > 0.0);
    let rows: Vec<Vec<f32>> = std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 4);
    for r in &rows {
        assert_eq!(r.len(), 384);
        let norm: f32 = r.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
    // Lines 1 and 4 are the same sentence, embedded in different batches.
    let diff = rows[0].iter().zip(&rows[3]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff < 1e-5, "{diff}");
    let bad = cli(&["embed", "--file", file.to_str().unwrap(), "--out", dir.join("e.txt").to_str().unwrap()]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains(".jsonl"));
}

/// `quantize --format gguf` writes a Q8_0 file that `generate` runs from its blocks; that file
/// re-packs as a compressed-tensors folder (as stored, not re-rounded) which `inspect` reads as
/// 211 int8 layers; writing a model in the format it already has is refused.
#[test]
fn quantize_to_gguf_and_compressed_tensors_and_back() {
    let scratch = common::Scratch::new("cli-formats");
    let gguf = scratch.join("smollm2-q8_0.gguf");
    let out = cli(&["quantize", "--format", "gguf", "--out", gguf.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("211 layers block for block"), "{}", String::from_utf8_lossy(&out.stdout));
    let args = ["--prompt", "The capital of France is", "--no-chat-template", "--max-new-tokens", "6"];
    let gen = cli(&[&["generate", "--model", gguf.to_str().unwrap()][..], &args].concat());
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
    assert!(String::from_utf8_lossy(&gen.stdout).contains("Paris"), "{}", String::from_utf8_lossy(&gen.stdout));
    let ct = scratch.join("smollm2-ct");
    let out = cli(&["quantize", "--model", gguf.to_str().unwrap(), "--format", "compressed-tensors", "--out", ct.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("written as stored"));
    let inspect = cli(&["inspect", "--model", ct.to_str().unwrap()]);
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    assert!(
        String::from_utf8_lossy(&inspect.stdout).contains("211 linear layers, 211 int8"),
        "{}",
        String::from_utf8_lossy(&inspect.stdout)
    );
    let again =
        cli(&["quantize", "--model", gguf.to_str().unwrap(), "--format", "gguf", "--out", scratch.join("again.gguf").to_str().unwrap()]);
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already quantized in this format"));
    assert!(!scratch.join("again.gguf").exists());
}
