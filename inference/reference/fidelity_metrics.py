"""Fidelity figures from logits, with numpy only (no torch), so the llama
venv can compute them too: make_fidelity.py (the fixture) and
make_kquant.py (llama.cpp on the Q4_K_M file) share them, with the files'
digests the fixtures record.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np


def metrics(ref: dict, logits: np.ndarray, targets: list[int]) -> dict:
    """The test's measure (mirrors `inference/tests/fidelity.rs`): mean KL over
    the reference's top K plus the tail, same top-1, perplexities."""
    logits = logits.astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(axis=1, keepdims=True)).sum(axis=1)) + logits.max(axis=1)
    logq = logits - lse[:, None]
    kl, same, nll = [], 0, []
    for t, ids in enumerate(ref["top_ids"]):
        p = np.exp(np.array(ref["top_logits"][t], dtype=np.float64) - ref["lse"][t])
        lq = logq[t, ids]
        rest = np.ones(logq.shape[1], dtype=bool)
        rest[ids] = False
        q_tail = np.exp(logq[t, rest]).sum()
        k = float((p * (np.log(p) - lq)).sum())
        p_tail = np.exp(ref["tail_logprob"][t])
        if p_tail > 0:
            k += p_tail * (ref["tail_logprob"][t] - np.log(max(q_tail, 1e-300)))
        kl.append(k)
        same += int(np.argmax(logits[t]) == ids[0])
        nll.append(-logq[t, targets[t]])
    return {"kl": kl, "same": same, "nll": nll}


def full_kl(ref_logits: np.ndarray, logits: np.ndarray) -> list[float]:
    def logsoftmax(x):
        m = x.max(axis=1, keepdims=True)
        return x - (np.log(np.exp(x - m).sum(axis=1, keepdims=True)) + m)
    lp, lq = logsoftmax(ref_logits.astype(np.float64)), logsoftmax(logits.astype(np.float64))
    return (np.exp(lp) * (lp - lq)).sum(axis=1).tolist()


def machine() -> str:
    """The CPU model and whether it has AVX-512 or only AVX2."""
    model, flags = "unknown CPU", set()
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    isa = "AVX-512F and AVX2" if "avx512f" in flags else "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"
    return f"{model}, {os.cpu_count()} cores ({isa})"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
