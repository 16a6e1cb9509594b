#!/usr/bin/env bash
# One prepared run of every GPU check, for a machine lent for minutes: it
# has a GPU, PyTorch with transformers, no Rust and no network. Everything
# lands under $OUT; a step that fails is recorded and the next one runs.
#
#   scripts/gpu-check.sh          on CUDA device 0
#   scripts/gpu-check.sh --cpu    the same steps on the CPU (a rehearsal:
#                                 small shapes, so it ends in minutes)
#
# Inputs (environment):
#   SILK    the silk binary; for CUDA a release build with the cuda feature,
#           made where Rust is and carried over (default: gpu/silk; /gpu/
#           is git-ignored, so it travels only when named):
#             cargo build --release -p silk-node --bin silk --features cuda
#             mkdir -p gpu && cp target/release/silk gpu/
#           then, on the lent machine, from the repository root:
#             OUT=$OUT scripts/gpu-check.sh        (carry: gpu)
#   PYTHON  a Python with torch and transformers (default: python3)
#   OUT     where results go (default: gpu-check-out)
#   MODEL   the default GGUF (SmolLM2-135M-Instruct.Q4_1.gguf) for the
#           teacher-forced fidelity run; `none` (the default when
#           $SILK_DATA_DIR/models has no copy) skips that step
#   SHAPE   random model shape: qwen3-0.6b (CUDA default) or small (--cpu)
#   BATCHES decode batch sizes (CUDA: 1,8,32,64; --cpu: 1,8)
#   PROMPT  prompt tokens (512: the time to first token the issue asks for)
#   GEN     generated tokens per request (CUDA: 64; --cpu: 8)
#
# Steps:
#   1. the machine: GPU, driver, PyTorch, CPU
#   2. `silk bench fidelity` in f32 and bf16: the tiny Llama and Qwen3
#      fixtures against transformers, and the default GGUF dequantized on
#      the device against the teacher-forced reference (fidelity.json)
#   3. a Qwen3 model with random bf16 weights in the chosen shape
#   4. `silk bench inference` on it in bf16 at every batch size, with
#      transformers on the same device, dtype and shapes in the same run
#   5. the device's copy bandwidth, and batch-1 decode's share of the
#      memory roofline (weights read per token / bandwidth)
#   6. where nsys is installed (CUDA only), a profile of batch-1 decode with
#      its kernel and memory-copy summary, for the cause of a missed goal
#
# Each step runs under `timeout $STEP_TIMEOUT` (default 240 s), so one that
# hangs costs its share of the lent minutes, not all of them.
set -uo pipefail

device=cuda
if [ "${1:-}" = "--cpu" ]; then
    device=cpu
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"

SILK="${SILK:-gpu/silk}"
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-gpu-check-out}"
if [ "$device" = cpu ]; then
    SHAPE="${SHAPE:-small}" BATCHES="${BATCHES:-1,8}" GEN="${GEN:-8}"
else
    SHAPE="${SHAPE:-qwen3-0.6b}" BATCHES="${BATCHES:-1,8,32,64}" GEN="${GEN:-64}"
fi
PROMPT="${PROMPT:-512}"
STEP_TIMEOUT="${STEP_TIMEOUT:-240}"
default_model="${SILK_DATA_DIR:-$HOME/.silk}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -z "${MODEL:-}" ]; then
    if [ -f "$default_model" ]; then MODEL="$default_model"; else MODEL=none; fi
fi

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
exec > >(tee "$OUT/gpu-check.log") 2>&1

declare -a summary
failed=0
record() { # name rc seconds
    [ "$2" = 0 ] || failed=$((failed + 1))
    summary+=("$1: $([ "$2" = 0 ] && echo ok || echo "FAILED (exit $2)") in ${3}s")
}
run_step() { # name function (run in a child shell under the step timeout)
    local name="$1" fn="$2"
    echo "== $name"
    local start=$SECONDS
    timeout "$STEP_TIMEOUT" bash -c "$fn"
    local rc=$?
    record "$name" "$rc" "$((SECONDS - start))"
    return 0
}

export device SILK PYTHON OUT MODEL SHAPE BATCHES PROMPT GEN
if [ ! -x "$SILK" ]; then
    echo "no silk binary at $SILK (set SILK)"; exit 2
fi

machine() {
    echo "date: $(date -u +%FT%TZ)"
    echo "device: $device"
    if [ "$device" = cuda ]; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory,pcie.link.gen.max --format=csv
        nvidia-smi
    fi
    "$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'
    grep -m1 "model name" /proc/cpuinfo
    nproc
    "$SILK" --version
}
machine_report() {
    machine 2>&1 | tee "$OUT/machine.txt"
    return "${PIPESTATUS[0]}"
}
export -f machine machine_report
run_step "machine" machine_report

fidelity() {
    "$SILK" bench fidelity --device "$device" --dtype f32,bf16 \
        --fixtures inference/tests/fixtures --model "$MODEL" --json "$OUT/fidelity.json" \
        | tee "$OUT/fidelity.md"
    return "${PIPESTATUS[0]}"
}
export -f fidelity
run_step "fidelity (f32, bf16; tiny fixtures and ${MODEL##*/})" fidelity

model_dir="$work/qwen3-$SHAPE-random"
random_model() {
    "$PYTHON" inference/reference/make_random_model.py --shape "$SHAPE" --dtype bfloat16 \
        --out "$model_dir"
}
export model_dir
export -f random_model
run_step "random Qwen3 model ($SHAPE, bf16)" random_model

bench() {
    "$SILK" bench inference --model "$model_dir" --device "$device" --dtype bf16 \
        --batch "$BATCHES" --prompt-tokens "$PROMPT" --gen-tokens "$GEN" \
        --shared-prefix-tokens 0 --reference-python "$PYTHON" | tee "$OUT/bench-bf16.md"
    return "${PIPESTATUS[0]}"
}
export -f bench
run_step "silk bench inference (bf16, batches $BATCHES) against transformers" bench

roofline() {
    "$PYTHON" inference/reference/bandwidth.py --device "$device" | tee "$OUT/bandwidth.json" || return 1
    local weights decode
    weights=$(du -cb "$model_dir"/*.safetensors | tail -1 | cut -f1)
    # `| silk (burn) | 1 | prefill | decode | ...`
    decode=$(awk -F'|' '$2 ~ /silk/ && $3+0 == 1 {gsub(/ /, "", $5); print $5}' "$OUT/bench-bf16.md")
    [ -n "$decode" ] || { echo "no batch-1 row in bench-bf16.md"; return 1; }
    "$PYTHON" - "$OUT/bandwidth.json" "$weights" "$decode" <<'PY' | tee "$OUT/roofline.txt"
import json, sys
bw = json.load(open(sys.argv[1]))["bytes_per_s"]
weights, decode = int(sys.argv[2]), float(sys.argv[3])
roof = bw / weights
print(f"weights {weights / 1e9:.3f} GB, copy bandwidth {bw / 1e9:.1f} GB/s: roofline {roof:.0f} tokens/s; "
      f"silk batch-1 decode {decode:.1f} tokens/s = {100 * decode / roof:.1f}% of it")
PY
}
export -f roofline
run_step "memory roofline" roofline

profile() {
    if [ "$device" != cuda ] || ! command -v nsys > /dev/null; then
        echo "skipped: $([ "$device" = cuda ] && echo "no nsys on this machine" || echo "CUDA only")"
        return 0
    fi
    nsys profile --force-overwrite true --stats=true -o "$OUT/decode-batch1" \
        "$SILK" bench inference --model "$model_dir" --device "$device" --dtype bf16 \
        --batch 1 --prompt-tokens 128 --gen-tokens 32 --shared-prefix-tokens 0 \
        --reference-python none > "$OUT/nsys-stats.txt" 2>&1
    local rc=$?
    grep -A25 "cuda_gpu_kern_sum" "$OUT/nsys-stats.txt" | head -30
    return "$rc"
}
export -f profile
run_step "profile of batch-1 decode (nsys)" profile

echo "== summary"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
[ "$failed" = 0 ]
