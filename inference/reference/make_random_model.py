#!/usr/bin/env python3
"""A Qwen3 model with random weights in a given shape, for throughput runs.

Speed depends on a model's shapes, not on its weights' values, so a model
with random weights in Qwen3-0.6B's shapes measures what Qwen3-0.6B would,
without its 1.2 GB download (the GPU machine has no network). The tokenizer
is the tiny Qwen3 fixture's (a smaller vocabulary than the model's; every id
it produces is a valid row of the model's embedding).

Shapes:
  qwen3-0.6b  Qwen/Qwen3-0.6B's config: 28 layers, hidden 1024, 16 heads
              (8 kv) of 128, MLP 3072, vocabulary 151,936, tied embeddings
              (596 M parameters, 1.19 GB in bf16)
  small       the same layout at 4 layers, hidden 256, 4 heads (2 kv) of 64,
              MLP 768, vocabulary 151,936: for rehearsing on a CPU

    .venv-ref/bin/python inference/reference/make_random_model.py \\
        --shape qwen3-0.6b --dtype bfloat16 --out /tmp/qwen3-0.6b-random
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

FIXTURE = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny-qwen3"

SHAPES = {
    "qwen3-0.6b": dict(num_hidden_layers=28, hidden_size=1024, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072),
    "small": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, intermediate_size=768),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    config = Qwen3Config(
        vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True, attention_bias=False,
        use_sliding_window=False, hidden_act="silu", bos_token_id=None,
        eos_token_id=None, **SHAPES[a.shape],
    )
    torch.manual_seed(a.seed)
    # Built in the target dtype directly: a 0.6B model in f32 first would
    # need twice the memory for nothing.
    torch.set_default_dtype(getattr(torch, a.dtype))
    model = Qwen3ForCausalLM(config).eval()
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(FIXTURE / name, out / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"{a.shape}: {params / 1e6:.0f} M parameters in {a.dtype} at {out}")


if __name__ == "__main__":
    main()
