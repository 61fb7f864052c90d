"""Our compressed-tensors folders run by Hugging Face transformers (with the compressed-tensors
package), beside candle-quant on the same folders: called by scripts/check-compressed-tensors.sh
with WORK holding each folder NAME/ and our logits NAME.ours.f32 (plus f32.ours.f32, the float
model's; for asymmetric 4-bit, our own folder of the same model NAME.ours/). Weight-only folders (W8A16, W4A16) must agree within 1e-3 relative: both engines then
multiply the same weights in float. W8A8 folders quantize activations in each engine's own way;
their distance to the float logits is reported for both.

Asymmetric 4-bit folders are checked by the package's own decompressor on every layer (the
transformers release this was written against cannot load them: llm-compressor issue #1618).
"""
import json
import os
import sys

import numpy as np
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationScheme
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

work, tokens = sys.argv[1], [int(t) for t in sys.argv[2].split(",")]
names = sys.argv[3:]
reference = np.fromfile(os.path.join(work, "f32.ours.f32"), dtype=np.float32).reshape(len(tokens), -1)


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def ours_int4(folder, layer):
    """Our int4 layer dequantized: nibble c of a row in byte c/2 (low when even), s * (u - z)."""
    b = folder[layer + ".weight"].numpy()
    u = np.stack([b & 15, b >> 4], axis=-1).reshape(b.shape[0], -1).astype(np.float32)
    s = folder[layer + ".weight_scale"].float().numpy()
    z = folder[layer + ".weight_zero_point"].numpy().astype(np.float32)
    group = u.shape[1] // s.shape[1]
    return (u - np.repeat(z, group, axis=1)) * np.repeat(s, group, axis=1)


status = 0
print(f"{'folder':<22} {'transformers vs ours':>22} {'ours vs f32':>12} {'transformers vs f32':>20}")
for name in names:
    path = os.path.join(work, name)
    config = json.load(open(os.path.join(path, "config.json")))["quantization_config"]
    groups = config["config_groups"].values()
    if any(not g["weights"]["symmetric"] and g["weights"]["num_bits"] == 4 for g in groups):
        # Every asymmetric layer decompressed by the package, against ours (q - z) * s.
        tensors = load_file(os.path.join(path, "model.safetensors"))
        mine = load_file(os.path.join(path + ".ours", "model.safetensors"))
        worst = 0.0
        for group in groups:
            scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
            if group["weights"]["num_bits"] != 4:
                continue
            for layer in {k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed")}:
                local = {k[len(layer) + 1 :]: v for k, v in tensors.items() if k.startswith(layer + ".")}
                # In f32, as ours is computed (in f16 the products round).
                local["weight_scale"] = local["weight_scale"].float()
                w = PackedQuantizationCompressor.decompress(local, scheme)["weight"].float().numpy()
                worst = max(worst, float(np.abs(w - ours_int4(mine, layer)).max()))
        print(f"{name:<22} {'decompressed per layer':>22}  max |w - ours| = {worst:.3g}")
        status |= worst > 0
        continue
    ours = np.fromfile(path + ".ours.f32", dtype=np.float32).reshape(len(tokens), -1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([tokens])).logits[0].float().numpy()
    weight_only = all(g["input_activations"] is None for g in groups)
    d = rel(theirs, ours)
    print(f"{name:<22} {d:>22.2e} {rel(ours, reference):>12.2e} {rel(theirs, reference):>20.2e}")
    if weight_only and d > 1e-3:
        print(f"  {name}: weight-only logits differ by more than 1e-3", file=sys.stderr)
        status = 1
sys.exit(status)
