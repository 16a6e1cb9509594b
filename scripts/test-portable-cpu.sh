#!/usr/bin/env bash
# Runs silk-inference's unit tests and its tiny-model reference tests on an
# emulated x86-64 CPU without AVX, AVX2 or AVX-512 (QEMU's `qemu64` model,
# user-mode emulation), so the suite is seen to hold on a CPU with neither:
# kernel detection finds only the portable set, and Burn's and gemm's own
# SIMD dispatch take their scalar paths too. The SmolLM2 tests are left out
# (minutes natively, hours emulated); they run natively on every kernel set
# this CPU has, `portable` included.
# Installs qemu-user with apt-get when it is missing (CI runs as root).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
jobs="${CARGO_BUILD_JOBS:-2}"
if ! command -v qemu-x86_64 >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null
    else
        echo "qemu-x86_64 is missing: install qemu-user to run this check" >&2
        exit 1
    fi
fi
# The test executables cargo builds for silk-inference's lib and reference tests.
mapfile -t binaries < <(
    cargo test -j"$jobs" -p silk-inference --lib --test reference --no-run --message-format=json 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])
'
)
if [ "${#binaries[@]}" -ne 2 ]; then
    echo "expected two test executables, found: ${binaries[*]:-none}" >&2
    exit 1
fi
for bin in "${binaries[@]}"; do
    echo "-- $(basename "$bin") on qemu64 (no AVX)"
    (cd inference && qemu-x86_64 -cpu qemu64 "$bin" --skip smollm2)
done
