#!/usr/bin/env bash
# Our compressed-tensors folders checked against Hugging Face transformers: the default SmolLM2
# quantized W8A16 (int8 weight-only), W4A16 (int4 weight-only, lm_head int8), W8A8 (dynamic) and
# asymmetric W4A16, each loaded by transformers with the compressed-tensors package on CPU and by
# candle-quant; their logits for the same tokens compared (weight-only: within 1e-3 relative, or
# the script fails). See scripts/check-compressed-tensors.py.
#
# Usage: scripts/check-compressed-tensors.sh
# PYTHON: a python with torch, transformers and compressed-tensors; when unset, a virtual
# environment is made under target/compressed-tensors-venv from PyPI (torch is large).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${PYTHON:-} ]]; then
    venv=target/compressed-tensors-venv
    if [[ ! -x $venv/bin/python ]]; then
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet torch "transformers>=5" "compressed-tensors>=0.20" safetensors numpy
    fi
    PYTHON=$venv/bin/python
fi
cargo build --release --quiet --bin candle-quant --example logits
scripts/fetch-models.sh >/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
tokens=504,3012,314,4649,30,216,1883,28,253,1345,17,2014
q() { target/release/candle-quant quantize --model "$model" "$@" >/dev/null 2>&1; }
q --mode weight-only --format compressed-tensors --out "$work/w8a16"
q --mode weight-only --bits 4 --format compressed-tensors --out "$work/w4a16"
q --format compressed-tensors --out "$work/w8a8"
q --mode weight-only --bits 4 --weight-zero-point --format compressed-tensors --out "$work/w4a16-asym"
q --mode weight-only --bits 4 --weight-zero-point --out "$work/w4a16-asym.ours"
for name in f32 w8a16 w4a16 w8a8; do
    src=$work/$name
    [[ $name == f32 ]] && src=$model
    target/release/examples/logits "$src" "$tokens" "$work/$name.ours.f32" 2>/dev/null
done
"$PYTHON" scripts/check-compressed-tensors.py "$work" "$tokens" w8a16 w4a16 w8a8 w4a16-asym
