#!/usr/bin/env python3
"""Second reference for the SmolLM2 GGUF: llama.cpp through llama-cpp-python.

make_fixtures.py runs this in the llama venv (setup-llama.sh) and records the
answer beside the transformers reference. Unlike transformers, llama.cpp runs
the Q4_1 weights as they are (quantised matmuls, activations quantised to
Q8_1), so its logits differ from the float32-dequantised reference by
quantisation noise; greedy tokens agree while the top-2 margin is large.

Input on stdin (JSON): {"gguf": PATH, "n": N, "cases": [{"name", "prompt",
"prompt_token_ids"}]}. Output on stdout (JSON): {"llama_cpp_python": VERSION,
"cases": [{"name", "prompt_token_ids", "greedy_token_ids", "greedy_text",
"last_logits_top_ids", "last_logits_top_values"}]}, where prompt_token_ids is
llama.cpp's own tokenisation of the prompt text (with the GGUF's add_bos
setting, special tokens parsed) and greedy decoding starts from the
reference's prompt_token_ids.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import llama_cpp  # noqa: E402

from bench_reference import last_logits, open_llama  # noqa: E402

TOPK = 20


def main() -> None:
    req = json.load(sys.stdin)
    n = int(req["n"])
    longest = max(len(c["prompt_token_ids"]) for c in req["cases"])
    llm = open_llama(model_path=req["gguf"], n_ctx=longest + n + 8, n_threads=os.cpu_count() or 1,
                     verbose=False, seed=0)
    n_vocab = llm.n_vocab()
    out = []
    for case in req["cases"]:
        own_ids = llm.tokenize(case["prompt"].encode("utf-8"), add_bos=True, special=True)
        llm.reset()
        llm.eval(case["prompt_token_ids"])
        logits = last_logits(llama_cpp, llm.ctx, -1, n_vocab).copy()
        top = np.argsort(-logits, kind="stable")[:TOPK]
        toks = []
        for _ in range(n):
            nxt = int(np.argmax(last_logits(llama_cpp, llm.ctx, -1, n_vocab)))
            toks.append(nxt)
            llm.eval([nxt])
        out.append({
            "name": case["name"],
            "prompt_token_ids": list(own_ids),
            "greedy_token_ids": toks,
            "greedy_text": llm.detokenize(toks, special=True).decode("utf-8", errors="replace"),
            "last_logits_top_ids": [int(i) for i in top],
            "last_logits_top_values": [float(np.format_float_positional(logits[i], unique=True, trim="-"))
                                       for i in top],
        })
    print(json.dumps({"llama_cpp_python": llama_cpp.__version__, "cases": out}))


if __name__ == "__main__":
    main()
