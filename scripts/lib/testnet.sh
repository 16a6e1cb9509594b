# Sourced by the check scripts: starts `silk testnet` in the background and
# waits for it.
# start_testnet SILK LOG [testnet args...]: sets testnet_pid, gateway (a
# node that is not a worker) and worker (the first worker's URL).
start_testnet() {
    local silk="$1" log="$2"
    shift 2
    local data_args=()
    if [[ -n "${SILK_DATA_DIR:-}" ]]; then data_args=(--data-dir "$SILK_DATA_DIR"); fi
    "$silk" "${data_args[@]}" testnet "$@" >"$log" 2>&1 &
    testnet_pid=$!
    for _ in $(seq 1 240); do
        if grep -q "Ctrl-C stops" "$log"; then break; fi
        if ! kill -0 "$testnet_pid" 2>/dev/null; then cat "$log"; echo "testnet exited" >&2; return 1; fi
        sleep 0.5
    done
    grep -q "Ctrl-C stops" "$log" || { cat "$log"; echo "testnet did not start" >&2; return 1; }
    cat "$log"
    gateway="$(grep '^node ' "$log" | grep -v '(worker)' | head -1 | awk '{print $3}')"
    worker="$(grep '^node ' "$log" | grep '(worker)' | head -1 | awk '{print $3}')"
    [[ -n "$gateway" && -n "$worker" ]] || { echo "no gateway or worker URL in the testnet output" >&2; return 1; }
}

# stop_testnet: Ctrl-C to the testnet, and wait for it.
stop_testnet() {
    if [[ -n "${testnet_pid:-}" ]]; then
        kill -INT "$testnet_pid" 2>/dev/null || true
        wait "$testnet_pid" 2>/dev/null || true
    fi
}
