#!/usr/bin/env python3
"""Memory bandwidth of a device as a decode step sees it: the best of a few
copies of a large buffer (bytes read + bytes written per second), printed as
JSON. A batch-1 decode step reads every weight once, so
`decode tokens/s × weight bytes / this` is its share of the memory roofline.

    python3 inference/reference/bandwidth.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mib", type=int, default=1024, help="buffer size")
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    n = a.mib * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32, device=a.device)
    dst = torch.empty_like(src)

    def sync() -> None:
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    dst.copy_(src)
    sync()
    best = float("inf")
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t0)
    moved = 2 * src.numel() * src.element_size()
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    print(json.dumps({"device": a.device, "name": name, "bytes_per_s": moved / best,
                      "buffer_bytes": src.numel() * src.element_size(),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
