#!/usr/bin/env bash
# Creates the Python virtual environment used by make_fixtures.py.
#
# The venv lives at $SILK_REF_VENV (default: <repo>/.venv-ref, git-ignored).
# torch from the ordinary package index pulls CUDA wheels (~5.6 GB on disk);
# the fixtures are committed, so CI never needs this environment.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${SILK_REF_VENV:-$repo/.venv-ref}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    echo "creating venv at $venv"
    "$python" -m venv "$venv"
fi

"$venv/bin/python" -m pip install --upgrade pip
"$venv/bin/python" -m pip install -r "$here/requirements.txt"
"$venv/bin/python" - <<'PY'
import torch, transformers, tokenizers, gguf, accelerate, numpy
print("torch", torch.__version__)
print("transformers", transformers.__version__)
print("tokenizers", tokenizers.__version__)
from importlib.metadata import version; print("gguf", version("gguf"))
print("accelerate", accelerate.__version__)
print("numpy", numpy.__version__)
PY
echo "ok: $venv"
