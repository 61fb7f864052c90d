//! Other engines' formats: int8 and int4 checkpoints as GGUF and as compressed-tensors, and
//! back — round trips bit-identical for every kind each holds exactly, candle's own GGUF reader
//! agreeing on every block, a checkpoint from the compressed-tensors package read as it
//! decompresses it, the losses of what a format cannot hold measured and reported, and bad input
//! refused by name.

use crate::common;

use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use candle_quant::checkpoint::{write_checkpoint, Int8Kind, LayerScheme, QuantizedCheckpoint, SaveOptions};
use candle_quant::convert::QuantConfig;
use candle_quant::io::gguf::write::{write_gguf, GgmlType, GgufExport};
use candle_quant::io::{self, compressed_tensors, ModelSource, OpenedDecoder};
use candle_quant::models::llama::KvCache;
use candle_quant::nn::ActivationQuant;
use candle_quant::source::{Dtype, TensorSource};
use candle_quant::WeightQuant;
use std::path::Path;

/// A tiny Llama (hidden 64, 4 heads of 16, 2 KV heads, untied) with SmolLM2's vocabulary, so
/// that its byte-level BPE tokenizer goes into the GGUF metadata.
const CONFIG: &str = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
 "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
 "max_position_embeddings": 128, "vocab_size": 49152, "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2}"#;

/// Writes the tiny float Llama into `dir` with SmolLM2's tokenizer.
fn tiny_float_folder(dir: &Path) {
    let mut t = common::tiny_llama(11);
    let mut rng = common::Rng::new(12);
    t.insert("model.embed_tokens.weight".into(), rng.tensor(&[49152, 64], 1.0).unwrap());
    t.insert("lm_head.weight".into(), rng.tensor(&[49152, 64], 0.1).unwrap());
    common::write_model(dir, &t, 1, CONFIG);
    let smol = io::open_decoder(&ModelSource::Gguf(common::model_file(io::DEFAULT_GGUF))).unwrap();
    std::fs::write(dir.join("tokenizer.json"), smol.tokenizer.to_string(false).unwrap()).unwrap();
}

/// Every kind GGUF holds exactly: int8 in groups of 32 (the default) and per channel, symmetric
/// int4 in groups of 32 and of 64 (one per row of 64: two Q4_0 blocks share its scale). Weights
/// not in groups of 32 take per-token activations (affine groups must match the weights').
fn exact_kinds() -> QuantConfig {
    QuantConfig::default()
        .override_weight("*.mlp.down_proj", WeightQuant::PerChannel)
        .override_weight("*.mlp.up_proj", WeightQuant::Int4 { group: 32, zero_point: false })
        .override_weight("*.self_attn.v_proj", WeightQuant::Int4 { group: 64, zero_point: false })
        .override_activation("*.mlp.down_proj", ActivationQuant::AffinePerToken)
        .override_activation("*.self_attn.v_proj", ActivationQuant::AffinePerToken)
}

/// `config`'s int8 folder of the tiny Llama, opened.
fn quantized_folder(scratch: &Path, config: &QuantConfig) -> OpenedDecoder {
    let float = scratch.join("float");
    std::fs::create_dir_all(&float).unwrap();
    tiny_float_folder(&float);
    let opened = io::open_decoder(&ModelSource::Folder(float)).unwrap();
    let out = scratch.join("int8");
    opened.quantize_to(&out, config, Int8Kind::Dynamic, &SaveOptions::default(), |_| {}).unwrap();
    io::open_decoder(&ModelSource::Folder(out)).unwrap()
}

fn export<'a>(opened: &'a OpenedDecoder) -> GgufExport<'a> {
    GgufExport {
        config: &opened.config,
        tensors: &*opened.tensors,
        quantization: opened.quantization.as_ref().unwrap(),
        metadata: opened.gguf_metadata().unwrap(),
    }
}

fn logits(opened: OpenedDecoder) -> Tensor {
    let lm = opened.load(&mut |_| {}).unwrap();
    lm.model.forward(&[1, 504, 3012, 17, 902, 7], &mut KvCache::default(), true).unwrap()
}

/// Weights `[n, k]` of layer `layer` as the values (int8, or int4 `u − z`) and per-column scales
/// they store, whatever their group: what must survive any round trip.
fn weights_of(source: &dyn TensorSource, layer: &str) -> (Vec<i32>, Vec<u16>) {
    let w = source.entry(&format!("{layer}.weight")).unwrap().clone();
    let values = source.read_bytes(&format!("{layer}.weight")).unwrap();
    let scales = source.read_bytes(&format!("{layer}.weight_scale")).unwrap();
    let groups = source.entry(&format!("{layer}.weight_scale")).unwrap().shape[1];
    let n = w.shape[0];
    let k = if w.dtype == Dtype::U8 { 2 * w.shape[1] } else { w.shape[1] };
    let group = k.div_ceil(groups);
    let mut q = Vec::with_capacity(n * k);
    let mut s = Vec::with_capacity(n * k);
    for j in 0..n {
        for c in 0..k {
            q.push(match w.dtype {
                Dtype::U8 => ((values[j * k / 2 + c / 2] >> (4 * (c % 2))) & 15) as i32 - 8,
                _ => values[j * k + c] as i8 as i32,
            });
            let g = j * groups + c / group;
            s.push(u16::from_le_bytes([scales[2 * g], scales[2 * g + 1]]));
        }
    }
    (q, s)
}

/// Ours → GGUF → ours: every layer written block for block (none lossy), read back with the
/// same values and scales, the model's logits bit-identical, and written again as a folder
/// whose int8 tensors are the first folder's bytes.
#[test]
fn gguf_round_trips_are_bit_identical_for_every_kind_it_holds_exactly() {
    let scratch = common::Scratch::new("gguf-round-trip");
    let ours = quantized_folder(&scratch, &exact_kinds());
    let file = scratch.join("model.gguf");
    let report = write_gguf(&file, &export(&ours), false, |_| {}).unwrap();
    // 2 layers × 7 linears + lm_head + the int8 embedding table (token_embd, Q8_0).
    assert_eq!((report.exact_layers, report.lossy.len(), report.dropped.len()), (16, 0, 0), "{report:?}");
    let back = io::open_decoder(&ModelSource::Gguf(file.clone())).unwrap();
    let q = back.quantization.as_ref().expect("a Q8_0/Q4_0 file reads as int8/int4 layers");
    assert!(q.excluded.is_empty());
    assert_eq!(q.tables, ["model.embed_tokens"], "the Q8_0 table comes back as int8 rows");
    let layers: Vec<String> =
        ours.tensors.entries().iter().filter_map(|e| e.name.strip_suffix(".weight_scale")).map(String::from).collect();
    assert_eq!(layers.len(), 16);
    for layer in &layers {
        assert_eq!(weights_of(&*ours.tensors, layer), weights_of(&*back.tensors, layer), "{layer}");
    }
    // Int8 groups of 32 and int4 groups of 32 come back in their own shape, byte for byte.
    for t in ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight_scale", "model.layers.0.mlp.up_proj.weight"]
    {
        assert_eq!(ours.tensors.read_bytes(t).unwrap(), back.tensors.read_bytes(t).unwrap(), "{t}");
    }
    // GGUF → ours again: a folder from the file's blocks.
    let again = scratch.join("again");
    let options = back.save_options_for(&again, &SaveOptions::default()).unwrap();
    write_checkpoint(&again, &*back.tensors, q, &options, |_| {}).unwrap();
    let again = QuantizedCheckpoint::open(&again).unwrap();
    for t in [
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.q_proj.weight_scale",
        "lm_head.weight",
        "model.layers.0.mlp.up_proj.weight",
    ] {
        assert_eq!(ours.tensors.read_bytes(t).unwrap(), again.source().read_bytes(t).unwrap(), "{t}");
    }
    // The same weights: the same model, up to the activations, which the GGUF file leaves to
    // the reader (its layers come back with the default groups of 32).
    let ours_again = io::open_decoder(&ModelSource::Folder(scratch.join("int8"))).unwrap();
    let (want, got) = (logits(ours_again), logits(back));
    let rel = common::rel_error(&got, &want).unwrap();
    assert!(rel < 0.02, "{rel}");
}

/// candle's own GGUF reader (ggml's block layouts, written independently) dequantizes every
/// tensor of our file to our weights: Q8_0 and Q4_0 exactly, Q4_1 within its f16 minimum, and
/// Llama's q/k rows in llama.cpp's RoPE order.
#[test]
fn candles_gguf_reader_sees_our_weights() {
    let scratch = common::Scratch::new("gguf-candle-reads");
    let config = exact_kinds()
        .override_weight("*.self_attn.o_proj", WeightQuant::Int4 { group: 32, zero_point: true })
        .override_weight("*.mlp.gate_proj", WeightQuant::PerGroup(16))
        .override_activation("*.mlp.gate_proj", ActivationQuant::AffinePerGroup(16));
    let ours = quantized_folder(&scratch, &config);
    let file = scratch.join("model.gguf");
    let report = write_gguf(&file, &export(&ours), false, |_| {}).unwrap();
    assert_eq!(report.exact_layers, 12, "{report:?}");
    let lossy: Vec<(&str, GgmlType)> = report.lossy.iter().map(|l| (l.layer.as_str(), l.written_as)).collect();
    assert_eq!(
        lossy,
        [
            ("model.layers.0.mlp.gate_proj", GgmlType::Q8_0),
            ("model.layers.0.self_attn.o_proj", GgmlType::Q4_1),
            ("model.layers.1.mlp.gate_proj", GgmlType::Q8_0),
            ("model.layers.1.self_attn.o_proj", GgmlType::Q4_1)
        ]
    );
    // f16 rounding of −s·z is at most 2⁻¹¹ of it: far below the weights' own size.
    assert!(report.lossy.iter().all(|l| l.relative_error > 0.0 && l.relative_error < 5e-3), "{report:?}");
    let mut f = std::fs::File::open(&file).unwrap();
    let content = Content::read(&mut f).unwrap();
    let (heads, kv_heads, d) = (4, 2, 16);
    let reference = QuantizedCheckpoint::open(&scratch.join("int8")).unwrap();
    let float = |layer: &str| -> Tensor {
        let (q, s) = weights_of(&*reference.source(), layer);
        let zero = zero_points_of(&*reference.source(), layer);
        let n = reference.source().entry(&format!("{layer}.weight_scale")).unwrap().shape[0];
        let w: Vec<f32> =
            (0..q.len()).map(|i| half::f16::from_bits(s[i]).to_f32() * (q[i] + 8 - zero.as_ref().map_or(8, |z| z[i])) as f32).collect();
        Tensor::from_vec(w, (n, q.len() / n), &Device::Cpu).unwrap()
    };
    for (gguf, layer, rope) in [
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj", Some(heads)),
        ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj", Some(kv_heads)),
        ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj", None),
        ("blk.1.attn_output.weight", "model.layers.1.self_attn.o_proj", None),
        ("blk.0.ffn_gate.weight", "model.layers.0.mlp.gate_proj", None),
        ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj", None),
        ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj", None),
        ("output.weight", "lm_head", None),
        ("token_embd.weight", "model.embed_tokens", None),
    ] {
        let theirs = content.tensor(&mut f, gguf, &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
        let mut ours = float(layer);
        if let Some(h) = rope {
            // HF row t·(d/2) + j of each head is llama.cpp's row 2j + t.
            let n = h * d;
            ours = ours.reshape((h, 2, d / 2, ())).unwrap().transpose(1, 2).unwrap().contiguous().unwrap().reshape((n, ())).unwrap();
        }
        let diff = common::max_abs_diff(&theirs, &ours).unwrap();
        let exact = !layer.ends_with("o_proj") && !layer.ends_with("gate_proj");
        let scale = ours.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        if exact {
            assert_eq!(diff, 0.0, "{gguf}");
        } else {
            assert!(diff > 0.0 && diff < scale * 0.01, "{gguf}: {diff} against weights up to {scale}");
        }
    }
    // The float tensors go out as they are.
    let norm = content.tensor(&mut f, "blk.1.ffn_norm.weight", &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
    let bytes = reference.source().read_bytes("model.layers.1.post_attention_layernorm.weight").unwrap();
    let want: Vec<f32> = bytes.chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    assert_eq!(norm.to_vec1::<f32>().unwrap(), want);
}

/// Asymmetric int4 zero points of `layer` per column, `None` when it has none.
fn zero_points_of(source: &dyn TensorSource, layer: &str) -> Option<Vec<i32>> {
    let z = source.read_bytes(&format!("{layer}.weight_zero_point")).ok()?;
    let groups = source.entry(&format!("{layer}.weight_zero_point"))?.shape[1];
    let w = source.entry(&format!("{layer}.weight"))?;
    let (n, k) = (w.shape[0], 2 * w.shape[1]);
    let group = k.div_ceil(groups);
    Some((0..n * k).map(|i| z[(i / k) * groups + (i % k) / group] as i32).collect())
}

/// The default SmolLM2 quantized straight to GGUF (`quantize --format gguf`'s path): loaded back
/// from the file's Q8_0 blocks, the same logits as quantizing it in memory.
#[test]
fn smollm2_as_gguf_loads_back_as_the_same_int8_model() {
    let scratch = common::Scratch::new("gguf-smollm2");
    let source = ModelSource::Gguf(common::model_file(io::DEFAULT_GGUF));
    let opened = io::open_decoder(&source).unwrap();
    assert!(opened.quantization.is_none(), "a Q4_1 file is dequantized, not read as blocks");
    let (view, quantization) = opened.quantized_view(&QuantConfig::default(), Int8Kind::Dynamic).unwrap();
    let file = scratch.join("smollm2-q8_0.gguf");
    let export =
        GgufExport { config: &opened.config, tensors: &view, quantization: &quantization, metadata: opened.gguf_metadata().unwrap() };
    let report = write_gguf(&file, &export, false, |_| {}).unwrap();
    assert_eq!((report.exact_layers, report.lossy.len()), (211, 0));
    let (int8, _) = io::open_decoder(&source).unwrap().load_int8(&QuantConfig::default(), Int8Kind::Dynamic, &mut |_| {}).unwrap();
    let prompt = [504, 3012, 314, 4649, 30, 216];
    let want = int8.model.forward(&prompt, &mut KvCache::default(), true).unwrap();
    let back = io::load_decoder(&ModelSource::Gguf(file), &mut |_| {}).unwrap();
    let got = back.model.forward(&prompt, &mut KvCache::default(), true).unwrap();
    assert_eq!(common::max_abs_diff(&want, &got).unwrap(), 0.0);
}

/// Bad input: a model GGUF cannot describe, rows GGUF blocks cannot cut, an existing output,
/// and a Q8_0 block outside int8's range — each a clear error naming the thing, nothing
/// half-written.
#[test]
fn gguf_bad_input_gives_errors_that_name_the_thing() {
    let scratch = common::Scratch::new("gguf-bad-input");
    let ours = quantized_folder(&scratch, &QuantConfig::default());
    let file = scratch.join("model.gguf");
    write_gguf(&file, &export(&ours), false, |_| {}).unwrap();
    // An existing file is kept unless overwriting is asked for.
    let before = std::fs::metadata(&file).unwrap().len();
    let err = write_gguf(&file, &export(&ours), false, |_| {}).unwrap_err().to_string();
    assert!(err.contains("model.gguf") && err.contains("already exists"), "{err}");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), before);
    // A Qwen2-type model has no GGUF metadata builder (and no GGUF source to copy it from).
    let mut qwen = io::open_decoder(&ModelSource::Folder(scratch.join("int8"))).unwrap();
    qwen.config.model_type = "qwen2".into();
    let err = qwen.gguf_metadata().unwrap_err().to_string();
    assert!(err.contains("qwen2") && err.contains("GGUF source"), "{err}");
    // A value of −128 in a Q8_0 block (llama.cpp never writes one; int8 weights here lie in
    // [−127, 127]): the error names the tensor, the row and the column.
    let mut bytes = std::fs::read(&file).unwrap();
    let content = Content::read(&mut std::fs::File::open(&file).unwrap()).unwrap();
    let info = &content.tensor_infos["blk.0.ffn_up.weight"];
    let at = (content.tensor_data_offset + info.offset) as usize + 34 * 2 + 2 + 5; // block 2 = row 1 (64 columns: 2 blocks a row), value 5
    bytes[at] = 0x80;
    let bad = scratch.join("bad.gguf");
    std::fs::write(&bad, &bytes).unwrap();
    let err = io::load_decoder(&ModelSource::Gguf(bad), &mut |_| {}).err().unwrap().to_string();
    assert!(err.contains("blk.0.ffn_up.weight") && err.contains("row 1, column 5") && err.contains("−128"), "{err}");
    // A folder that does not exist: an error naming the path, nothing left behind.
    let missing = scratch.join("no-such-folder").join("model.gguf");
    let err = write_gguf(&missing, &export(&ours), false, |_| {}).unwrap_err().to_string();
    assert!(err.contains("no-such-folder"), "{err}");
    let leftovers: Vec<_> = std::fs::read_dir(&*scratch)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Ours → compressed-tensors → ours: int8 (groups, per channel), int4 symmetric and with zero
/// points, one config group per scheme, the weights read back bit for bit and written again
/// as the first folder's bytes.
#[test]
fn compressed_tensors_round_trips_are_bit_identical() {
    let scratch = common::Scratch::new("ct-round-trip");
    let config = exact_kinds().override_weight("*.self_attn.o_proj", WeightQuant::Int4 { group: 32, zero_point: true });
    let ours = quantized_folder(&scratch, &config);
    let dir = scratch.join("ct");
    let options = ours.save_options_for(&dir, &SaveOptions::default()).unwrap();
    let report =
        compressed_tensors::write_compressed_tensors(&dir, &*ours.tensors, ours.quantization.as_ref().unwrap(), &options, |_| {}).unwrap();
    assert_eq!(report.dropped.len(), 1, "the outlier threshold has no place there: {:?}", report.dropped);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let q = &json["quantization_config"];
    assert_eq!((q["quant_method"].as_str(), q["format"].as_str()), (Some("compressed-tensors"), Some("mixed-precision")));
    let formats: Vec<&str> = q["config_groups"].as_object().unwrap().values().filter_map(|g| g["format"].as_str()).collect();
    assert!(formats.contains(&"int-quantized") && formats.contains(&"pack-quantized"), "{formats:?}");
    // The packed layout: I32 words of 8 nibbles, the shape beside them, zero points packed down
    // the output channels (64 rows → 8 words a group).
    let st = candle_quant::source::SafetensorsSource::open(&[dir.join("model.safetensors")], None).unwrap();
    let packed = st.entry("model.layers.0.self_attn.o_proj.weight_packed").unwrap();
    assert_eq!((packed.dtype, packed.shape.clone()), (Dtype::I32, vec![64, 8]));
    assert_eq!(st.entry("model.layers.0.self_attn.o_proj.weight_zero_point").unwrap().shape, vec![8, 2]);
    assert_eq!(
        st.read_bytes("model.layers.1.mlp.up_proj.weight_shape").unwrap(),
        [96i64, 64].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()
    );
    let back = io::open_decoder(&ModelSource::Folder(dir.clone())).unwrap();
    let tables = &ours.quantization.as_ref().unwrap().tables;
    assert_eq!(tables, &["model.embed_tokens"]);
    let layers: Vec<String> = ours
        .tensors
        .entries()
        .iter()
        .filter_map(|e| e.name.strip_suffix(".weight_scale"))
        .filter(|l| !tables.iter().any(|t| t == l))
        .map(String::from)
        .collect();
    // The int8 embedding table goes out as f32 (engines look embeddings up in a float table):
    // each row q · s, exactly.
    let (q, s) = weights_of(&*ours.tensors, "model.embed_tokens");
    let want: Vec<u8> = q.iter().zip(&s).flat_map(|(&q, &s)| (q as f32 * half::f16::from_bits(s).to_f32()).to_le_bytes()).collect();
    assert_eq!(back.tensors.entry("model.embed_tokens.weight").map(|e| e.dtype), Some(Dtype::F32));
    assert!(back.tensors.read_bytes("model.embed_tokens.weight").unwrap() == want, "the float table is the int8 rows dequantized");
    for layer in &layers {
        assert_eq!(weights_of(&*ours.tensors, layer), weights_of(&*back.tensors, layer), "{layer}");
        assert_eq!(zero_points_of(&*ours.tensors, layer), zero_points_of(&*back.tensors, layer), "{layer}");
        let (a, b) = (ours.quantization.as_ref().unwrap().scheme_for(layer), back.quantization.as_ref().unwrap().scheme_for(layer));
        assert_eq!(a.weight_quant(), b.weight_quant(), "{layer}");
    }
    // compressed-tensors → ours: the first folder's tensors, byte for byte.
    let again = scratch.join("again");
    let options = back.save_options_for(&again, &SaveOptions::default()).unwrap();
    write_checkpoint(&again, &*back.tensors, back.quantization.as_ref().unwrap(), &options, |_| {}).unwrap();
    let again = QuantizedCheckpoint::open(&again).unwrap();
    for e in ours.tensors.entries().iter().filter(|e| !e.name.starts_with("model.embed_tokens.")) {
        assert_eq!(ours.tensors.read_bytes(&e.name).unwrap(), again.source().read_bytes(&e.name).unwrap(), "{}", e.name);
    }
    // Every scheme comes back as it was (the outlier threshold as this toolkit's default, which
    // it was): the same model, bit for bit.
    let (want, got) = (logits(ours), logits(back));
    assert_eq!(common::max_abs_diff(&got, &want).unwrap(), 0.0);
}

/// A W8A8 checkpoint written by the compressed-tensors package itself
/// (`scripts/make-compressed-tensors-fixture.py`): int8 weights per channel with dynamic
/// per-token activations. Every weight reads as the package decompresses it, except values of
/// −128 (its symmetric range reaches them, the int8 tiles here do not), each one step off; the
/// model's logits are transformers' within the two engines' activation rounding.
#[test]
fn a_compressed_tensors_w8a8_checkpoint_from_the_python_package_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/compressed-tensors-w8a8");
    let opened = io::open_decoder(&ModelSource::Folder(dir.clone())).unwrap();
    let q = opened.quantization.clone().unwrap();
    assert_eq!(q.excluded, ["lm_head"]);
    let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    let mut clamped = 0;
    for l in 0..2 {
        for part in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            let layer = format!("model.layers.{l}.{part}");
            assert!(matches!(
                q.scheme_for(&layer),
                LayerScheme::Dynamic { weight_group_size: None, activation_group_size: None, weight_bits: 8, .. }
            ));
            let (values, scales) = weights_of(&*opened.tensors, &layer);
            let want = expected[&format!("{layer}.weight")].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for ((&v, &s), &w) in values.iter().zip(&scales).zip(&want) {
                let s = half::f16::from_bits(s).to_f32();
                let got = v as f32 * s;
                if got != w {
                    // Only −128, read as −127: one step above.
                    assert!(v == -127 && w == -128.0 * s, "{layer}: {got} against {w}");
                    clamped += 1;
                }
            }
        }
    }
    assert!(clamped > 0, "per-channel symmetric int8 there reaches −128 at each row's most negative weight");
    let tokens: Vec<u32> = expected["tokens"].to_vec1::<i64>().unwrap().iter().map(|&t| t as u32).collect();
    let lm = opened.load(&mut |_| {}).unwrap();
    let got = lm.model.forward(&tokens, &mut KvCache::default(), true).unwrap();
    let rel = common::rel_error(&got, &expected["logits"]).unwrap();
    assert!(rel < 0.02, "logits {rel} from transformers'");
}

/// Schemes that do not map are clear errors naming the layer and what it is.
#[test]
fn compressed_tensors_schemes_that_do_not_map_are_named() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/compressed-tensors-w8a8");
    let scratch = common::Scratch::new("ct-bad");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap()).unwrap();
    type Change = fn(&mut serde_json::Value);
    let cases: [(&str, Change, &[&str]); 3] = [
        (
            "float weights",
            |c| c["quantization_config"]["config_groups"]["group_0"]["weights"]["type"] = "float".into(),
            &["model.layers.0", "type \"float\""],
        ),
        (
            "static activations",
            |c| c["quantization_config"]["config_groups"]["group_0"]["input_activations"]["dynamic"] = false.into(),
            &["model.layers.0", "dynamic int8 activations"],
        ),
        ("frozen status", |c| c["quantization_config"]["quantization_status"] = "frozen".into(), &["quantization_status", "frozen"]),
    ];
    for (what, change, words) in cases {
        let dir = scratch.join(what.replace(' ', "-"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["model.safetensors", "tokenizer.json"] {
            std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
        }
        let mut c = config.clone();
        change(&mut c);
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        let err = io::open_decoder(&ModelSource::Folder(dir)).err().unwrap().to_string();
        assert!(words.iter().all(|w| err.contains(w)), "{what}: {err}");
    }
}
