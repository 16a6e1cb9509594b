#!/usr/bin/env python3
"""What transformers itself does in bfloat16 on the tiny fixtures.

For each tiny fixture directory (`tiny-llama`, `tiny-qwen3`), loads the
committed float32 weights in transformers with `dtype=torch.bfloat16` (eager
attention, as the float32 fixtures were made), runs every case of
`expected.json` (the same prompt ids) and writes `expected_bf16.json` beside
it: the last-position logits, the greedy continuation and, per case, how far
those bf16 logits are from the float32 reference's (at every prompt position
too, for the case whose float32 logits are kept at every position).

That distance is the yardstick of silk's bf16 path: bf16 keeps 8 significant
bits, so no bf16 implementation matches the float32 logits to 1e-3; the test
holds silk's bf16 logits to a small multiple of the error transformers' own
bf16 path makes on the same weights (see `tiny_models_in_bf16` in
inference/tests/reference.rs).

Run with the venv of setup.sh:
    .venv-ref/bin/python inference/reference/make_bf16_reference.py
"""

from __future__ import annotations

import json
import os
import pathlib

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402
import transformers  # noqa: E402
from make_fixtures import forward_logits, greedy  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    for name in ["tiny-llama", "tiny-qwen3"]:
        d = FIXTURES / name
        expected = json.loads((d / "expected.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(
            str(d), dtype=torch.bfloat16, attn_implementation="eager").eval()
        model.generation_config.eos_token_id = None
        cases = []
        for case in expected["cases"]:
            ids = case["prompt_token_ids"]
            full = forward_logits(model, ids).tolist()
            logits = full[-1]
            tokens, margins = greedy(model, ids, len(case["greedy_token_ids"]))
            diff = max(abs(a - b) for a, b in zip(logits, case["last_logits"]))
            all_diff = None
            if case.get("all_logits"):
                all_diff = max(abs(a - b) for row, ref in zip(full, case["all_logits"])
                               for a, b in zip(row, ref))
            agree = 0
            for a, b in zip(tokens, case["greedy_token_ids"]):
                if a != b:
                    break
                agree += 1
            cases.append({
                "name": case["name"],
                "last_logits": [round(v, 6) for v in logits],
                "greedy_token_ids": tokens,
                "greedy_margins": [round(m, 6) for m in margins],
                "max_abs_diff_vs_f32": round(diff, 6),
                "all_positions_max_abs_diff_vs_f32": None if all_diff is None else round(all_diff, 6),
                "greedy_tokens_agreeing_with_f32": agree,
            })
            print(f"{name}/{case['name']}: bf16 logits differ from f32 by {diff:.4f}, "
                  f"{agree}/{len(tokens)} greedy tokens agree")
        out = {
            "generator": "inference/reference/make_bf16_reference.py",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "dtype": "bfloat16",
            "attn_implementation": "eager",
            "cases": cases,
        }
        (d / "expected_bf16.json").write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
