#!/usr/bin/env bash
# Builds llama-cpp-python (llama.cpp, CPU only) from source into its own venv,
# used by bench_reference.py as the reference engine for the CPU benchmark.
#
# The venv lives at $SILK_LLAMA_VENV (default: <repo>/.venv-llama, git-ignored).
# pip compiles llama.cpp with cmake (pulled in as a build dependency); on two
# cores this takes roughly 10 minutes.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${SILK_LLAMA_VENV:-$repo/.venv-llama}"
python="${PYTHON:-python3}"
version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"

if [ ! -x "$venv/bin/python" ]; then
    echo "creating venv at $venv"
    "$python" -m venv "$venv"
fi

"$venv/bin/python" -m pip install --upgrade pip
# Native CPU build (AVX2/AVX-512 etc. as the build machine supports), no GPU.
# On CPUs that advertise AMX the native build also compiles llama.cpp's AMX
# weight repacking, which segfaults on these VMs; the Python scripts here
# load models with use_extra_bufts=false to avoid it (see README.md).
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_CUDA=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
"$venv/bin/python" -m pip install --no-cache-dir --verbose "llama-cpp-python==$version" psutil==7.2.2 gguf==0.19.0
"$venv/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
echo "ok: $venv"
