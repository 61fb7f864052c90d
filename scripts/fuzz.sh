#!/usr/bin/env bash
# Fuzzes every model loader for a fixed number of executions each (examples/fuzz_loaders.rs):
#   scripts/fuzz.sh [EXECS=20000] [SEED=1]
# Crashing inputs are written to fuzz/crashes/; an input that aborted the process (an allocation
# above the fuzzer's limit) is kept there too. Copy them to fuzz/regressions/<target>/ once fixed:
# tests/hostile_input.rs replays that folder in CI. Exit status 1 when anything crashed.
set -euo pipefail
cd "$(dirname "$0")/.."
execs=${1:-20000}
seed=${2:-1}
out=fuzz/crashes
cargo build --release --example fuzz_loaders
status=0
for target in gguf safetensors config tokenizer int8 int8-config gguf-blocks ct ct-config; do
    if target/release/examples/fuzz_loaders --target "$target" --execs "$execs" --seed "$seed" --out "$out" 2> "$out.$target.log"; then
        rm -f "$out.$target.log"
    else
        status=1
        current="$out/current-$target.bin"
        if [ -f "$current" ]; then
            kept="$out/$target-aborted-$(sha256sum "$current" | cut -c1-16).bin"
            mv "$current" "$kept"
            echo "$target: the process aborted; its input is $kept"
        fi
        echo "$target: details in $out.$target.log"
    fi
done
exit $status
