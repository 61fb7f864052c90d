"""Writes tests/fixtures/compressed-tensors-w8a8/: a tiny random Llama quantized W8A8 (int8
weights per output channel, symmetric; int8 activations per token, dynamic) by the
compressed-tensors package's own compressor, as vLLM and transformers read it, plus what the
Rust test checks against (expected.safetensors): every quantized layer's weights as the package
decompresses them, and transformers' logits for a few tokens.

Run: python scripts/make-compressed-tensors-fixture.py [OUT]   (torch, transformers and
compressed-tensors installed; scripts/check-compressed-tensors.sh makes such an environment).
"""
import json
import os
import sys

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    apply_quantization_config,
)
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "compressed-tensors-w8a8")
torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2,
)
# f16 weights, so that the scales are f16 as this toolkit keeps them.
model = LlamaForCausalLM(config).to(torch.float16).eval()
scheme = QuantizationScheme(
    targets=["Linear"],
    weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel"),
    input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True),
)
apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
# Weight scales from each row's range, as the package's min-max observer computes them.
for name, module in model.named_modules():
    if getattr(module, "quantization_scheme", None) is None or not hasattr(module, "weight_scale"):
        continue
    w = module.weight.data.float()
    scale, zero_point = calculate_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), scheme.weights)
    module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype))
    module.weight_zero_point.data.copy_(zero_point.to(module.weight_zero_point.dtype))
    module.quantization_status = QuantizationStatus.FROZEN
compressor = ModelCompressor.from_pretrained_model(model, quantization_format="int-quantized")
compressor.compress_model(model)
model.save_pretrained(out)
compressor.update_config(out)

# A word-level tokenizer over the 256 ids (the loader needs one; the test feeds ids).
vocab = {f"t{i}": i for i in range(256)}
tokenizer = {
    "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
    "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
    "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
}
with open(os.path.join(out, "tokenizer.json"), "w") as f:
    json.dump(tokenizer, f)

# What the package makes of the folder: decompressed weights and transformers' logits.
loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
tokens = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 64]])
with torch.no_grad():
    logits = loaded(tokens).logits[0].float().contiguous()
expected = {"logits": logits, "tokens": tokens[0].to(torch.int64)}
for name, module in loaded.named_modules():
    if isinstance(module, torch.nn.Linear) and name != "lm_head":
        expected[f"{name}.weight"] = module.weight.data.float().contiguous()
save_file(expected, os.path.join(out, "expected.safetensors"))
print(f"wrote {out}")
