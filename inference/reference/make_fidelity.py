#!/usr/bin/env python3
"""Teacher-forced fidelity fixture for the default model (SmolLM2 Q4_1 GGUF).

Measures a quantized path the way llama.cpp measures its own quantizations
(`llama-perplexity --kl-divergence`): every position of a fixed text is fed
the true previous tokens, and the path's next-token distribution is compared
with the float32 reference's. The reference is transformers reading the same
GGUF (weights dequantised to float32, eager attention). llama.cpp's own path
on the same file is measured once into the same fixture, so the Rust test
(`inference/tests/fidelity.rs`) holds every silk path to llama.cpp's figures
without torch or llama.cpp.

The fixture is compact: per position, the reference's top-K logits, the log
of the probability mass outside them, its log-sum-exp and the log-probability
of the true next token, not whole vocabularies. KL divergence is computed
over K + 1 outcomes (the top K tokens and "any other token"), which is the
full-vocabulary KL of the distributions with the tail merged: never more
than the full KL, and equal to it up to the tail's share. The script prints
both for llama.cpp so the difference can be seen.

Run it in the venv of setup.sh (and setup-llama.sh for the llama.cpp part):

    .venv-ref/bin/python inference/reference/make_fidelity.py \
        --gguf ~/.silk/models/SmolLM2-135M-Instruct.Q4_1.gguf

Writes inference/tests/fixtures/smollm2-q4_1/fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from fidelity_metrics import full_kl, machine, metrics, sha256_file  # noqa: E402
from make_fixtures import FIXTURES, find_gguf, generator_info, write_json  # noqa: E402

TOP_K = 32
SCHEMA_VERSION = 1

PROSE = (
    "The lighthouse on the northern island was kept by a woman named Ada, who wrote down every ship "
    "that passed. Most days the log was short: a fishing boat at dawn, a ferry at noon, and sometimes "
    "a cargo ship far out on the horizon, too far away to read its name. In winter the storms came "
    "from the west, and the waves climbed the rocks until the spray reached the lamp room. On those "
    "nights Ada did not sleep. She trimmed the wick, wiped the salt from the glass, and listened to "
    "the radio for voices in trouble. Once, in the second year, a small sailing boat lost its mast a "
    "mile from the shore. Ada called the harbour, and the rescue crew found two students clinging to "
    "the hull, cold and frightened but alive. They came back in the summer with a cake and a "
    "painting of the lighthouse, which Ada hung beside the stairs. Years later, when the light was "
    "made automatic and the keepers were sent home, she took only three things with her: the log "
    "books, the painting, and a brass key that no longer opened any door."
)

CODE = '''def merge_intervals(intervals):
    """Merge overlapping [start, end] intervals and return them sorted."""
    if not intervals:
        return []
    ordered = sorted(intervals, key=lambda pair: pair[0])
    merged = [list(ordered[0])]
    for start, end in ordered[1:]:
        last = merged[-1]
        if start <= last[1]:
            # Overlap: extend the previous interval.
            last[1] = max(last[1], end)
        else:
            merged.append([start, end])
    return merged


class RateLimiter:
    """Allows at most `limit` calls in any window of `period` seconds."""

    def __init__(self, limit, period, clock):
        self.limit = limit
        self.period = period
        self.clock = clock
        self.calls = []

    def allow(self):
        now = self.clock()
        self.calls = [t for t in self.calls if now - t < self.period]
        if len(self.calls) >= self.limit:
            return False
        self.calls.append(now)
        return True


print(merge_intervals([[1, 3], [2, 6], [8, 10], [15, 18]]))
'''

CHAT = [
    {"role": "system", "content": "You are a patient assistant who explains things simply."},
    {"role": "user", "content": "Why does the sky look blue during the day but red at sunset?"},
    {"role": "assistant", "content": (
        "Sunlight contains every colour. When it passes through the air, the short blue waves are "
        "scattered in all directions much more than the long red waves, so blue light reaches your "
        "eyes from every part of the sky. At sunset the light travels through far more air to reach "
        "you, so most of the blue is scattered away before it arrives, and the reds and oranges are "
        "what is left.")},
    {"role": "user", "content": "So would the sky be a different colour on Mars?"},
    {"role": "assistant", "content": (
        "Yes. Mars has a thin atmosphere full of fine red dust. The dust scatters light differently, "
        "so the daytime sky there looks butterscotch or pinkish, and the sunsets look blue, which is "
        "the opposite of what we see on Earth.")},
]


@torch.no_grad()
def reference_positions(model, ids: list[int]) -> dict:
    """Per position t < len(ids) - 1: what the reference predicts for ids[t + 1]."""
    logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].to(torch.float64)
    logits = logits[:-1]
    targets = torch.tensor(ids[1:])
    lse = torch.logsumexp(logits, dim=-1)
    top = torch.topk(logits, TOP_K, dim=-1, sorted=True)
    logp = logits - lse[:, None]
    # Mass outside the top K, summed directly (not 1 - sum) so it keeps its digits.
    outside = logp.clone()
    outside.scatter_(1, top.indices, float("-inf"))
    tail = torch.logsumexp(outside, dim=-1)
    return {
        "top_ids": top.indices.tolist(),
        "top_logits": [[float(np.float32(v)) for v in row] for row in top.values.tolist()],
        "lse": [float(np.float32(v)) for v in lse.tolist()],
        "tail_logprob": [float(v) for v in tail.tolist()],
        "target_logprob": [float(v) for v in logp.gather(1, targets[:, None])[:, 0].tolist()],
        "_logits": logits,
    }


def llama_cpp_logits(llama_python: str, gguf: Path, segments: list[dict], workdir: Path) -> str:
    """Runs llama_cpp_logits.py in the llama venv; writes one .npy per segment."""
    req = {"gguf": str(gguf), "out": str(workdir),
           "segments": [{"name": s["name"], "token_ids": s["token_ids"]} for s in segments]}
    p = subprocess.run([llama_python, str(Path(__file__).parent / "llama_cpp_logits.py")],
                       input=json.dumps(req), capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])["llama_cpp_python"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=None)
    default_llama = os.environ.get("SILK_LLAMA_VENV", str(FIXTURES.parents[2] / ".venv-llama"))
    ap.add_argument("--llama-python", default=str(Path(default_llama) / "bin" / "python"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)
    if not Path(args.llama_python).exists():
        sys.exit(f"{args.llama_python} not found: run inference/reference/setup-llama.sh")

    with tempfile.TemporaryDirectory() as tmp:
        path = find_gguf(args.gguf, Path(tmp))
        d, name = str(path.parent), path.name
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        chat_text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False)
        segments = [
            {"name": "prose", "kind": "text", "text": PROSE, "add_special_tokens": True},
            {"name": "code", "kind": "text", "text": CODE, "add_special_tokens": True},
            {"name": "chat", "kind": "chat", "messages": CHAT, "text": chat_text,
             "add_special_tokens": False},
        ]
        for s in segments:
            s["token_ids"] = tok(s["text"], add_special_tokens=s["add_special_tokens"])["input_ids"]
            s["positions"] = reference_positions(model, s["token_ids"])
        total = sum(len(s["token_ids"]) - 1 for s in segments)
        assert total >= 512, f"only {total} scored positions"

        version = llama_cpp_logits(args.llama_python, path, segments, Path(tmp))
        kl, same, nll, nll_ref, kl_full = [], 0, [], [], []
        for s in segments:
            pos = s["positions"]
            ref_logits = pos.pop("_logits").numpy()
            theirs = np.load(Path(tmp) / f"{s['name']}.npy")[:-1]
            m = metrics(pos, theirs, s["token_ids"][1:])
            kl += m["kl"]
            same += m["same"]
            nll += m["nll"]
            nll_ref += [-v for v in pos["target_logprob"]]
            kl_full += full_kl(ref_logits, theirs)
            print(f"{s['name']}: {len(s['token_ids'])} tokens, llama.cpp mean KL {np.mean(m['kl']):.6f}, "
                  f"same top-1 {m['same']}/{len(m['kl'])}")
        digest = sha256_file(path)

    ppl_ref, ppl = float(np.exp(np.mean(nll_ref))), float(np.exp(np.mean(nll)))
    fixture = {
        "schema_version": SCHEMA_VERSION,
        "model": "SmolLM2-135M-Instruct",
        "sha256": digest,
        "reference": "transformers gguf_file= (weights dequantised to float32, eager attention), "
                     "teacher-forced, one forward per segment",
        "generator": {**generator_info(), "script": "inference/reference/make_fidelity.py"},
        "top_k": TOP_K,
        "positions": total,
        "reference_ppl": ppl_ref,
        "llama_cpp": {
            "llama_cpp_python": version,
            "how": "llama.cpp's own CPU path on the same GGUF (logits_all, one llama_decode per "
                   "segment, built with GGML_NATIVE on the machine below)",
            "machine": machine(),
            "mean_kld": float(np.mean(kl)),
            "mean_kld_full_vocab": float(np.mean(kl_full)),
            "same_top1": same / total,
            "ppl": ppl,
        },
        "segments": segments,
    }
    out = FIXTURES / "smollm2-q4_1" / "fidelity.json"
    write_json(out, fixture)
    print(f"{total} positions; reference PPL {ppl_ref:.4f}; llama.cpp PPL {ppl:.4f}, mean KLD "
          f"{np.mean(kl):.6f} (full vocabulary {np.mean(kl_full):.6f}), same top-1 {same / total:.4f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
