#!/usr/bin/env python3
"""A Q4_K_M file of the default model, made by llama.cpp's own quantizer, and
llama.cpp's fidelity on it.

Most GGUF files people download are K-quants (Q4_K_M above all). This script
makes one from the default model so silk's K-quant path can be measured on
a file llama.cpp itself wrote: `silk bench inference --model OUT` for speed,
and `inference/tests/reference.rs` (`smollm2_q4_k_m_is_as_faithful_as_llama_cpp`,
run when the file is in the model store) for fidelity. Run it in the llama
venv (setup-llama.sh):

    .venv-llama/bin/python inference/reference/make_kquant.py \
        --gguf ~/.silk/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --out ~/.silk/models/SmolLM2-135M-Instruct.Q4_K_M.gguf

The default model is stored as Q4_1, so this re-quantizes it
(`allow_requantize`): the Q4_K_M file holds the Q4_1 file's weights
quantized again, a file of the default model's shapes in llama.cpp's K-quant
mix, not a better model. llama.cpp chooses each tensor's type as for any
Q4_K_M file; where a row is not a multiple of 256 weights (SmolLM2's hidden
size is 576) it falls back to a 32-weight type (Q5_0, Q8_0), so the file
mixes Q4_K, Q6_K, Q5_0 and Q8_0.

It then measures llama.cpp's own path on the new file the way
make_fidelity.py does (teacher-forced over the fidelity text, against the
same transformers float32 reference, which `smollm2-q4_1/fidelity.json`
holds: the reference is the Q4_1 weights, so these figures include what
re-quantizing lost) and writes inference/tests/fixtures/smollm2-q4_k_m/llama_cpp.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import llama_cpp  # noqa: E402

from fidelity_metrics import machine, metrics, sha256_file  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
# GGUF's ggml_type ids of the types a Q4_K_M file holds, for the summary.
TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
              12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type the file holds (read with gguf-py when
    the venv has it, else skipped)."""
    try:
        import gguf
    except ImportError:
        return {}
    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        name = TYPE_NAMES.get(int(t.tensor_type), t.tensor_type.name)
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def quantize(src: Path, out: Path) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        sys.exit(f"llama_model_quantize failed with {rc}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="the default model's Q4_1 GGUF")
    ap.add_argument("--out", required=True, help="where to write the Q4_K_M GGUF")
    args = ap.parse_args()
    src, out = Path(args.gguf).expanduser(), Path(args.out).expanduser()

    fidelity = json.loads((FIXTURES / "smollm2-q4_1" / "fidelity.json").read_text())
    if sha256_file(src) != fidelity["sha256"]:
        sys.exit(f"{src} is not the file smollm2-q4_1/fidelity.json was measured on")
    quantize(src, out)
    types = tensor_types(out)
    print(f"wrote {out}: {types or 'tensor types not read (no gguf-py in this venv)'}")

    segments = fidelity["segments"]
    with tempfile.TemporaryDirectory() as tmp:
        req = {"gguf": str(out), "out": tmp,
               "segments": [{"name": s["name"], "token_ids": s["token_ids"]} for s in segments]}
        p = subprocess.run([sys.executable, str(Path(__file__).parent / "llama_cpp_logits.py")],
                           input=json.dumps(req), capture_output=True, text=True, check=True)
        version = json.loads(p.stdout.strip().splitlines()[-1])["llama_cpp_python"]
        kl, same, nll = [], 0, []
        for s in segments:
            theirs = np.load(Path(tmp) / f"{s['name']}.npy")[:-1]
            m = metrics(s["positions"], theirs, s["token_ids"][1:])
            kl += m["kl"]
            same += m["same"]
            nll += m["nll"]
            print(f"{s['name']}: llama.cpp mean KL {np.mean(m['kl']):.6f}, "
                  f"same top-1 {m['same']}/{len(m['kl'])}")
    total = len(kl)
    assert total == fidelity["positions"], (total, fidelity["positions"])
    fixture = {
        "schema_version": 1,
        "model": "SmolLM2-135M-Instruct Q4_K_M, re-quantized from the Q4_1 file by llama.cpp",
        "sha256": sha256_file(out),
        "source_sha256": fidelity["sha256"],
        "tensor_types": types,
        "generator": "inference/reference/make_kquant.py",
        "llama_cpp": {
            "llama_cpp_python": version,
            "how": "llama.cpp's own CPU path on the Q4_K_M file (logits_all, one llama_decode "
                   "per segment), scored against smollm2-q4_1/fidelity.json's reference",
            "machine": machine(),
            "mean_kld": float(np.mean(kl)),
            "same_top1": same / total,
            "ppl": float(np.exp(np.mean(nll))),
        },
    }
    dest = FIXTURES / "smollm2-q4_k_m" / "llama_cpp.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"{total} positions; llama.cpp mean KLD {np.mean(kl):.6f}, same top-1 {same / total:.4f}, "
          f"PPL {fixture['llama_cpp']['ppl']:.4f} (reference {fidelity['reference_ppl']:.4f})")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
