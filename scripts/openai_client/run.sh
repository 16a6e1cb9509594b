#!/usr/bin/env bash
# Exercises a local silk testnet with real clients, one testnet for all:
# the official `openai` Python package (check.py), the official `openai`
# npm package with Zod (check.mjs, Node 20), and LangChain's ChatOpenAI
# (langchain_check.py, in its own virtual environment).
# Usage: scripts/openai_client/run.sh   (needs the default model: `silk model fetch`)
# Env: SILK_BIN (default: target/debug/silk, built if missing), SILK_DATA_DIR.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
silk="${SILK_BIN:-$target/debug/silk}"
if [[ ! -x "$silk" ]]; then
    (cd "$root" && cargo build -p silk-node --bin silk)
fi
venv="${SILK_OPENAI_VENV:-$target/openai-venv}"
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check "openai==${OPENAI_VERSION:-3.54.0}"
lc_venv="${SILK_LANGCHAIN_VENV:-$target/langchain-venv}"
if [[ ! -x "$lc_venv/bin/python" ]]; then
    python3 -m venv "$lc_venv"
fi
"$lc_venv/bin/pip" install --quiet --disable-pip-version-check \
    "langchain-openai==${LANGCHAIN_OPENAI_VERSION:-1.8.1}" "openai==${OPENAI_VERSION:-3.54.0}"
node_dir="${SILK_OPENAI_NODE_DIR:-$target/openai-node}"
mkdir -p "$node_dir"
cp "$here/package.json" "$node_dir/package.json"
(cd "$node_dir" && npm install --silent --no-audit --no-fund)
cp "$here/check.mjs" "$node_dir/check.mjs"
source "$root/scripts/lib/testnet.sh"
log="$(mktemp)"
cleanup() { stop_testnet; rm -f "$log"; }
trap cleanup EXIT
start_testnet "$silk" "$log" --nodes 3 --workers 1
url="$gateway"
"$venv/bin/python" "$here/check.py" "$url" "$worker"
node "$node_dir/check.mjs" "$url"
"$lc_venv/bin/python" "$here/langchain_check.py" "$url"
