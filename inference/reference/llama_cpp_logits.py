#!/usr/bin/env python3
"""llama.cpp's logits at every position of the fidelity segments.

make_fidelity.py runs this in the llama venv (setup-llama.sh). Input on stdin
(JSON): {"gguf": PATH, "out": DIR, "segments": [{"name", "token_ids"}]}. For
each segment it evaluates the tokens in one llama_decode with logits for every
position (teacher forcing, as llama-perplexity does) and writes DIR/NAME.npy,
float32 [tokens, vocab]. Prints {"llama_cpp_python": VERSION} on stdout.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import llama_cpp  # noqa: E402

from bench_reference import open_llama  # noqa: E402


def main() -> None:
    req = json.load(sys.stdin)
    longest = max(len(s["token_ids"]) for s in req["segments"])
    n_ctx = longest + 8
    llm = open_llama(model_path=req["gguf"], n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                     n_threads=os.cpu_count() or 1, logits_all=True, verbose=False, seed=0)
    n_vocab = llm.n_vocab()
    for seg in req["segments"]:
        ids = seg["token_ids"]
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
        assert logits.shape == (len(ids), n_vocab), logits.shape
        np.save(os.path.join(req["out"], f"{seg['name']}.npy"), logits)
    print(json.dumps({"llama_cpp_python": llama_cpp.__version__}))


if __name__ == "__main__":
    main()
