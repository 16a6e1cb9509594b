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
data_args=()
if [[ -n "${SILK_DATA_DIR:-}" ]]; then data_args=(--data-dir "$SILK_DATA_DIR"); fi

log="$(mktemp)"
"$silk" "${data_args[@]}" testnet --nodes 3 --workers 1 >"$log" 2>&1 &
pid=$!
cleanup() { kill -INT "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -f "$log"; }
trap cleanup EXIT
# Wait for the testnet to print its node URLs.
for _ in $(seq 1 240); do
    if grep -q "Ctrl-C stops" "$log"; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then cat "$log"; echo "testnet exited" >&2; exit 1; fi
    sleep 0.5
done
grep -q "Ctrl-C stops" "$log" || { cat "$log"; echo "testnet did not start" >&2; exit 1; }
cat "$log"
# A node that is not a worker.
url="$(grep '^node ' "$log" | grep -v '(worker)' | head -1 | awk '{print $3}')"
[[ -n "$url" ]] || { echo "no gateway URL in the testnet output" >&2; exit 1; }
"$venv/bin/python" "$here/check.py" "$url"
node "$node_dir/check.mjs" "$url"
"$lc_venv/bin/python" "$here/langchain_check.py" "$url"
