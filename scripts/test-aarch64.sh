#!/usr/bin/env bash
# Runs the kernel tests (tests/it/kernels.rs) for aarch64 under qemu-user, so that the NEON paths
# (`Isa::Neon`, `Isa::NeonDot`) are checked against the scalar reference on an x86_64 machine.
#
# Two ways, picked automatically:
#   1. a Rust toolchain with the aarch64-unknown-linux-gnu target, `aarch64-linux-gnu-gcc` and
#      `qemu-aarch64` already installed: used as they are;
#   2. otherwise (Debian host, root, only the Debian mirror reachable): a Debian sid chroot is
#      built under target/aarch64-chroot with debootstrap and Debian's own rustc, cargo,
#      aarch64 std, cross linker and qemu-user, and the tests run inside it.
#
# Each run checks that the tests really exercised the NEON paths: `-cpu max` (with the
# dot-product extension) must report both, `-cpu cortex-a72` (without it) only `Neon`.
#
# Exit status: 0 passed; 1 the code failed (build or tests); 2 the toolchain or chroot could not
# be set up on this machine (no root, mirror or registry unreachable) — nothing was tested.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=aarch64-unknown-linux-gnu

cannot_setup() {
    echo "aarch64 tests: cannot set up the cross toolchain here: $*" >&2
    exit 2
}

run_tests() { # $1: command prefix that runs cargo (empty or "chroot DIR"), $2: source dir
    local prefix=$1 src=$2
    # Downloading crates (for every target: build scripts run on the host) is the
    # environment's part; building and testing is the code's.
    $prefix env -C "$src" cargo fetch >/dev/null || cannot_setup "cargo fetch failed"
    # cpu model : paths expected : random shapes (the second run mainly checks detection)
    for run in "max:Neon,NeonDot:${AARCH64_TEST_SHAPES:-10000}" "cortex-a72:Neon:1000"; do
        local model want shapes
        IFS=: read -r model want shapes <<<"$run"
        echo "== aarch64 kernel tests under qemu -cpu $model (expecting [$want], $shapes random shapes)"
        local log
        log=$($prefix env -C "$src" CANDLE_QUANT_TEST_SHAPES="$shapes" \
            CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
            CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -cpu $model -L /usr/aarch64-linux-gnu" \
            cargo test --offline --release --target $TARGET --test it -- kernels:: --nocapture --test-threads 2 2>&1) || {
            echo "$log" | tail -40
            echo "aarch64 kernel tests failed under -cpu $model" >&2
            exit 1
        }
        echo "$log" | grep -E '^test |test result' || true
        if ! echo "$log" | grep -q "SIMD paths exercised: \[${want//,/, }\]"; then
            echo "expected the NEON paths [$want] to be exercised under -cpu $model; the run says:" >&2
            echo "$log" | grep 'SIMD paths exercised' >&2 || true
            exit 1
        fi
    done
}

if rustup target list --installed 2>/dev/null | grep -qx $TARGET &&
    command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null; then
    run_tests "" "$PWD"
    exit 0
fi

ROOT=${AARCH64_CHROOT:-$PWD/target/aarch64-chroot}
APT="apt-get -o Acquire::Check-Valid-Until=false -y -qq --no-install-recommends"
if [ ! -x "$ROOT/usr/bin/cargo" ]; then
    [ "$(id -u)" = 0 ] || cannot_setup "building the chroot needs root (or install the toolchain, see the header)"
    command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; } ||
        cannot_setup "debootstrap is not installable"
    echo "== building a Debian sid chroot in $ROOT (once; a few minutes)"
    # A half-built chroot from an interrupted run: never follow its /proc mount when removing.
    umount "$ROOT/proc" 2>/dev/null || true
    rm -rf --one-file-system "$ROOT"
    # sid's Release file may be past its Valid-Until on a mirror snapshot; packages are still
    # checked against their hashes.
    debootstrap --no-check-gpg --variant=minbase --include=ca-certificates sid "$ROOT" http://deb.debian.org/debian >/dev/null ||
        cannot_setup "debootstrap of Debian sid failed"
    # Let the chroot trust the same certificate authorities as this machine (proxies).
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/" 2>/dev/null || true
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
    {
        chroot "$ROOT" update-ca-certificates >/dev/null &&
            chroot "$ROOT" dpkg --add-architecture arm64 &&
            chroot "$ROOT" apt-get -o Acquire::Check-Valid-Until=false update -qq &&
            chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive $APT install \
                rustc cargo gcc-aarch64-linux-gnu libc6-dev-arm64-cross libstd-rust-dev:arm64 qemu-user >/dev/null
    } || cannot_setup "installing the aarch64 toolchain in the chroot failed"
    # The downloaded packages and package lists are not needed again (about 570 MB of disk).
    chroot "$ROOT" apt-get clean || true
    rm -rf "$ROOT"/var/lib/apt/lists/*
fi
mountpoint -q "$ROOT/proc" || mount --bind /proc "$ROOT/proc" || cannot_setup "cannot mount /proc in the chroot"
trap 'umount "$ROOT/proc" 2>/dev/null || true' EXIT
# The sources, fresh each run; the chroot's own target/ keeps the build between runs.
mkdir -p "$ROOT/src/candle-quant"
git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C "$ROOT/src/candle-quant"
run_tests "chroot $ROOT" /src/candle-quant
