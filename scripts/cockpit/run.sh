#!/usr/bin/env bash
# Checks the operator's cockpit on a local testnet: a real Prometheus
# (Debian's `prometheus`) scrapes two nodes, and Playwright's core drives
# Debian's Chromium through the dashboard (check.mjs says what is checked).
# Usage: scripts/cockpit/run.sh   (needs the default model: `silk model fetch`)
# Env: SILK_BIN (default: target/debug/silk, built if missing), SILK_DATA_DIR,
#      SILK_COCKPIT_OUT (screenshots; default: <target>/cockpit).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
silk="${SILK_BIN:-$target/debug/silk}"
out="${SILK_COCKPIT_OUT:-$target/cockpit}"
if [[ ! -x "$silk" ]]; then
    (cd "$root" && cargo build -p silk-node --bin silk)
fi
if ! command -v prometheus >/dev/null || [[ ! -x /usr/bin/chromium ]]; then
    sudo=""
    if [[ "$(id -u)" != 0 ]]; then sudo="sudo"; fi
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends chromium prometheus
fi
node_dir="${SILK_COCKPIT_NODE_DIR:-$target/cockpit-node}"
mkdir -p "$node_dir"
cp "$here/package.json" "$node_dir/package.json"
(cd "$node_dir" && npm install --silent --no-audit --no-fund)
cp "$here/check.mjs" "$node_dir/check.mjs"
source "$root/scripts/lib/testnet.sh"
work="$(mktemp -d)"
prom_pid=""
cleanup() {
    if [[ -n "$prom_pid" ]]; then kill "$prom_pid" 2>/dev/null || true; wait "$prom_pid" 2>/dev/null || true; fi
    stop_testnet
    rm -rf "$work"
}
trap cleanup EXIT
start_testnet "$silk" "$work/testnet.log" --nodes 3 --workers 1

# Prometheus on a free port, scraping both nodes every second.
prom_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
cat >"$work/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: silk
    static_configs:
      - targets: ["${gateway#http://}", "${worker#http://}"]
YML
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
    --web.listen-address="127.0.0.1:$prom_port" >"$work/prometheus.log" 2>&1 &
prom_pid=$!
for _ in $(seq 1 60); do
    if curl -sf "http://127.0.0.1:$prom_port/-/ready" >/dev/null; then break; fi
    sleep 0.5
done
curl -sf "http://127.0.0.1:$prom_port/-/ready" >/dev/null || { cat "$work/prometheus.log"; echo "Prometheus did not start" >&2; exit 1; }

if ! node "$node_dir/check.mjs" "$gateway" "$worker" "http://127.0.0.1:$prom_port" "$silk" "$out"; then
    echo "--- prometheus log" >&2; tail -20 "$work/prometheus.log" >&2
    exit 1
fi
