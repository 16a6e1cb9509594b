#!/usr/bin/env python3
"""Random GGUF quantization blocks and their dequantization by gguf-py.

gguf-py (the `gguf` package, maintained with llama.cpp) carries a numpy
reference implementation of every block format. This script makes random
blocks of each type silk reads (with finite f16 scales), dequantizes them with
gguf-py, and writes both to inference/tests/fixtures/quant/<TYPE>.json, which
`inference/tests/quant.rs` compares against silk's own dequantization.

    .venv-ref/bin/python inference/reference/make_quant_fixtures.py
"""
import json
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf import quants

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "quant")
# Offsets of f16 scale fields inside each block, kept finite and small.
F16_FIELDS = {
    T.Q4_0: [0],
    T.Q4_1: [0, 2],
    T.Q8_0: [0],
    T.Q4_K: [0, 2],
    T.Q6_K: [208],
    # Added after the five above, so their fixtures stay as they were.
    T.Q5_0: [0],
    T.Q5_1: [0, 2],
    T.Q5_K: [0, 2],
}


def main() -> None:
    rng = np.random.default_rng(7)
    os.makedirs(OUT, exist_ok=True)
    for kind, fields in F16_FIELDS.items():
        block_weights, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        n_blocks = 8
        raw = bytearray(rng.integers(0, 256, size=n_blocks * block_bytes, dtype=np.uint8).tobytes())
        for b in range(n_blocks):
            for off in fields:
                scale = np.float16(rng.uniform(-0.05, 0.05))
                raw[b * block_bytes + off: b * block_bytes + off + 2] = scale.tobytes()
        data = np.frombuffer(bytes(raw), dtype=np.uint8).reshape(1, -1)
        values = quants.dequantize(data, kind).reshape(-1).astype(np.float32)
        assert values.size == n_blocks * block_weights
        path = os.path.join(OUT, f"{kind.name}.json")
        with open(path, "w") as f:
            json.dump({
                "type": kind.name,
                "generator": "inference/reference/make_quant_fixtures.py with gguf " + getattr(gguf, "__version__", "?"),
                "blocks_hex": bytes(raw).hex(),
                "values": [float(v) for v in values],
            }, f)
        print(path, values.size)


if __name__ == "__main__":
    main()
