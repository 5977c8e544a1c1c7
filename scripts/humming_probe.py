"""Step-by-step check of the humming peer as benchmarks/contenders.py sets it up (GPU): eager call against the
dequantized weights, then a CUDA-graph capture and replay, each step synchronized and printed, so a crash names
its step.   python scripts/humming_probe.py [K N M ...]"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import contenders as c  # noqa: E402


def probe(K, N, M, G=128, dtype=torch.float16):
    print(f"humming K={K} N={N} M={M}: setup", flush=True)
    calls = c.humming()(M, K, N, G, dtype)
    torch.cuda.synchronize()
    if isinstance(calls, str):
        print("  setup says:", calls, flush=True)
        return
    print(f"  setup + reference check ok ({len(calls)} layers); eager calls", flush=True)
    for f in calls:
        f()
    torch.cuda.synchronize()
    print("  eager ok; capture", flush=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        calls[0]()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in calls:
            f()
    torch.cuda.synchronize()
    print("  captured; replay", flush=True)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    print("  replay ok", flush=True)


if __name__ == "__main__":
    a = [int(v) for v in sys.argv[1:]] or [4096, 4096, 1]
    for i in range(0, len(a), 3):
        probe(*a[i : i + 3])
        c.clear_cache()
