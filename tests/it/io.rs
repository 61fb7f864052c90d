//! io/: local HF folders (single file, sharded, f16), the hub cache layout, and bad inputs.

use crate::common;

use candle_core::{DType, Device, Tensor};
use candle_quant::io::{self, ModelSource};
use std::collections::HashMap;
use std::path::Path;

const CONFIG: &str = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
 "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
 "max_position_embeddings": 128, "vocab_size": 30522, "tie_word_embeddings": false, "eos_token_id": 102}"#;

fn folder(name: &str) -> common::Scratch {
    common::Scratch::new(&format!("io-{name}"))
}

fn logits(source: &ModelSource) -> Tensor {
    let lm = io::load_decoder(source, &mut |_| {}).unwrap();
    lm.model.forward(&[101, 7592, 2088, 102], &mut Default::default(), true).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    common::max_abs_diff(a, b).unwrap()
}

#[test]
fn sharded_and_single_file_folders_load_the_same_model() {
    let tensors = common::tiny_llama(1);
    let (single, sharded) = (folder("single"), folder("sharded"));
    common::write_model(&single, &tensors, 1, CONFIG);
    common::write_model(&sharded, &tensors, 3, CONFIG);
    let (a, b) = (logits(&ModelSource::parse(single.to_str().unwrap()).unwrap()), logits(&ModelSource::Folder(sharded.to_path_buf())));
    assert_eq!(a.dims(), &[4, 30522]);
    assert_eq!(max_diff(&a, &b), 0.0);
    // An f16 checkpoint is widened to f32 on load: same as the f32 weights rounded through f16.
    let half: HashMap<String, Tensor> = tensors.iter().map(|(k, v)| (k.clone(), v.to_dtype(DType::F16).unwrap())).collect();
    let rounded: HashMap<String, Tensor> = half.iter().map(|(k, v)| (k.clone(), v.to_dtype(DType::F32).unwrap())).collect();
    let (f16_dir, rounded_dir) = (folder("f16"), folder("rounded"));
    common::write_model(&f16_dir, &half, 1, CONFIG);
    common::write_model(&rounded_dir, &rounded, 2, CONFIG);
    assert_eq!(
        max_diff(&logits(&ModelSource::Folder(f16_dir.to_path_buf())), &logits(&ModelSource::Folder(rounded_dir.to_path_buf()))),
        0.0
    );
}

#[test]
fn hub_ids_resolve_through_the_local_hub_cache() {
    // The hf-hub cache layout: $HF_HOME/hub/models--org--name/{refs/main, snapshots/<rev>/…}.
    let home = folder("hf-home");
    let repo = home.join("hub/models--test-org--tiny-llama");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    let tensors = common::tiny_llama(2);
    common::write_model(&snap, &tensors, 2, CONFIG);
    let local = folder("hub-reference");
    common::write_model(&local, &tensors, 1, CONFIG);
    std::env::set_var("HF_HOME", &*home);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let source = ModelSource::parse("test-org/tiny-llama").unwrap();
    assert_eq!(source, ModelSource::Hub { id: "test-org/tiny-llama".into(), revision: "main".into() });
    assert_eq!(max_diff(&logits(&source), &logits(&ModelSource::Folder(local.to_path_buf()))), 0.0);
    // Offline and not cached: a clear error naming the model.
    let e = io::load_decoder(&ModelSource::parse("test-org/absent").unwrap(), &mut |_| {}).err().unwrap().to_string();
    assert!(e.contains("test-org/absent") && e.contains("HF_HUB_OFFLINE"), "{e}");
}

fn load_err(dir: &Path) -> String {
    format!("{:#}", io::load_decoder(&ModelSource::Folder(dir.to_path_buf()), &mut |_| {}).err().expect("loading should fail"))
}

#[test]
fn bad_model_inputs_give_errors_that_name_the_thing() {
    // Missing files.
    let e = ModelSource::parse("/no/such/model.gguf").unwrap_err().to_string();
    assert!(e.contains("/no/such/model.gguf"), "{e}");
    let e = ModelSource::parse("not a model").unwrap_err().to_string();
    assert!(e.contains("not a model"), "{e}");
    let empty = folder("empty");
    assert!(load_err(&empty).contains("config.json"));
    // A file that is not GGUF.
    let txt = empty.join("weights.bin");
    std::fs::write(&txt, b"hello").unwrap();
    assert!(ModelSource::parse(txt.to_str().unwrap()).unwrap_err().to_string().contains(".gguf"));
    let fake = empty.join("fake.gguf");
    std::fs::write(&fake, b"definitely not gguf").unwrap();
    let e = format!("{:#}", io::load_decoder(&ModelSource::Gguf(fake.clone()), &mut |_| {}).err().unwrap());
    assert!(e.contains("fake.gguf"), "{e}");

    let tensors = common::tiny_llama(3);
    // Truncated safetensors: the error names the file.
    let trunc = folder("truncated");
    common::write_model(&trunc, &tensors, 1, CONFIG);
    let file = trunc.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&trunc);
    assert!(e.contains("model.safetensors"), "{e}");
    // A shard listed in the index but missing.
    let shard = folder("missing-shard");
    common::write_model(&shard, &tensors, 2, CONFIG);
    std::fs::remove_file(shard.join("model-00002-of-00002.safetensors")).unwrap();
    assert!(load_err(&shard).contains("model-00002-of-00002.safetensors"));
    // Unknown architecture.
    let arch = folder("arch");
    common::write_model(&arch, &tensors, 1, &CONFIG.replace("\"llama\"", "\"gpt_neox\""));
    assert!(load_err(&arch).contains("unknown architecture 'gpt_neox'"));
    // Head counts that do not split (no key/value heads; heads not a multiple of them): an
    // error that names them, not a division by zero.
    for (kv, what) in [("0", "0 key/value heads"), ("3", "3 key/value heads")] {
        let heads = folder(&format!("heads-{kv}"));
        common::write_model(&heads, &tensors, 1, &CONFIG.replace("\"num_key_value_heads\": 2", &format!("\"num_key_value_heads\": {kv}")));
        let e = load_err(&heads);
        assert!(e.contains(what), "{e}");
    }
    // Config and weights disagree: the error names the tensor.
    let shape = folder("shape");
    common::write_model(&shape, &tensors, 1, &CONFIG.replace("\"intermediate_size\": 96", "\"intermediate_size\": 128"));
    let e = load_err(&shape);
    assert!(e.contains("gate_proj"), "{e}");
    // Missing tensor.
    let mut partial = tensors.clone();
    partial.remove("model.layers.1.mlp.down_proj.weight");
    let missing = folder("missing-tensor");
    common::write_model(&missing, &partial, 1, CONFIG);
    let e = load_err(&missing);
    assert!(e.contains("model.layers.1.mlp.down_proj"), "{e}");
    let _ = Device::Cpu;
}

#[test]
fn qwen2_biases_and_llama3_rope_scaling_are_honoured() {
    let tensors = common::tiny_llama(4);
    let plain = folder("plain");
    common::write_model(&plain, &tensors, 1, CONFIG);
    let base = logits(&ModelSource::Folder(plain.to_path_buf()));
    // Qwen2: q/k/v carry biases (loaded, and they change the output).
    let mut with_bias = tensors.clone();
    let mut rng = common::Rng::new(5);
    for l in 0..2 {
        for (p, n) in [("q_proj", 64), ("k_proj", 32), ("v_proj", 32)] {
            with_bias.insert(format!("model.layers.{l}.self_attn.{p}.bias"), rng.tensor(&[n], 0.5).unwrap());
        }
    }
    let qwen = folder("qwen2");
    common::write_model(&qwen, &with_bias, 1, &CONFIG.replace("\"llama\"", "\"qwen2\""));
    let q = logits(&ModelSource::Folder(qwen.to_path_buf()));
    assert!(max_diff(&q, &base) > 1e-3);
    // Without the bias tensors a qwen2 config is an error naming the missing tensor.
    let no_bias = folder("qwen2-missing");
    common::write_model(&no_bias, &tensors, 1, &CONFIG.replace("\"llama\"", "\"qwen2\""));
    assert!(load_err(&no_bias).contains("q_proj"));
    // Llama 3 rope scaling slows the long wavelengths: same weights, different logits.
    let scaled = folder("llama3");
    let cfg = CONFIG.replace(
        "\"eos_token_id\": 102",
        "\"eos_token_id\": [102, 0], \"rope_scaling\": {\"rope_type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 64}",
    );
    common::write_model(&scaled, &tensors, 1, &cfg);
    let s = logits(&ModelSource::Folder(scaled.to_path_buf()));
    assert!(max_diff(&s, &base) > 1e-4 && s.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()));
    // An unsupported scaling type is refused.
    let yarn = folder("yarn");
    common::write_model(
        &yarn,
        &tensors,
        1,
        &CONFIG.replace("\"eos_token_id\": 102", "\"eos_token_id\": 102, \"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 4.0}"),
    );
    assert!(load_err(&yarn).contains("yarn"));
}
