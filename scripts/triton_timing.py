"""Time (or profile) the Triton backend against torch fp16 matmul and torch's int4 op.

    python scripts/triton_timing.py [--shapes ...] [--ms 1,16] [--configs JSON-list] [--dtype float16]
    python scripts/triton_timing.py --eager N --shapes llama3-8b.down --ms 1 --configs '[{...}]'   # for ncu

Timing method: benchmarks/timing.py (weights rotated through copies larger than the L2, one CUDA graph per
point, median of repetitions); ratios are fp16 matmul time / kernel time from the same run. Without
--configs the shipped table (w4a16_ops/backends/triton_configs.json) picks the configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from benchmarks.timing import copies_needed, time_rotating  # noqa: E402
from tune_triton import SHAPES, cfg_name, dense_calls, group_for, triton_calls  # noqa: E402
from w4a16_ops import dispatch  # noqa: E402
from w4a16_ops.backends import triton as tb  # noqa: E402


def int4_calls(M, K, N, G):
    inner = next((t for t in (8, 4, 2) if K % (16 * t) == 0), None)
    if G not in (32, 64, 128, 256) or inner is None:
        return None
    q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device="cuda")
    packed = torch.ops.aten._convert_weight_to_int4pack(q, inner)
    sz = torch.randn(K // G, N, 2, dtype=torch.bfloat16, device="cuda") * 0.01
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    n = copies_needed(packed.numel() * packed.element_size())
    ps = [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(n - 1)]
    return [lambda p=p: torch.ops.aten._weight_int4pack_mm(x, p[0], G, p[1]) for p in ps]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama3-8b.o,llama3-8b.down,K7392.down,N7400,K14784.down,N2120")
    ap.add_argument("--ms", default="1,16,64,1024")
    ap.add_argument("--configs", default=None, help="JSON list of configurations (default: the shipped table)")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--int4", action="store_true", help="also time torch's _weight_int4pack_mm (bf16)")
    ap.add_argument("--eager", type=int, default=0, help="just run each point N times eagerly (for ncu)")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    configs = json.loads(args.configs) if args.configs else [None]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    for name in args.shapes.split(","):
        K, N = SHAPES[name]
        G = group_for(K, args.group)
        for M in (int(m) for m in args.ms.split(",")):
            p = dispatch.problem_for(torch.device("cuda"), dtype, M, K, N, G, False)
            if args.eager:
                for cfg in configs:
                    calls = triton_calls(M, K, N, G, dtype, cfg or tb.select_config(p))
                    for i in range(args.eager):
                        calls[i % len(calls)]()
                torch.cuda.synchronize()
                continue
            t_dense = time_rotating(dense_calls(M, K, N, dtype), reps=args.reps)
            line = [f"{name:15s} M={M:5d} G={G:3d} fp16 {t_dense:8.1f}us"]
            if args.int4:
                c = int4_calls(M, K, N, G)
                if c is not None:
                    t4 = time_rotating(c, reps=args.reps)
                    line.append(f"int4 {t4:7.1f}us {t_dense / t4:5.2f}x")
            for cfg in configs:
                cfg_used = cfg or tb.select_config(p)
                t = time_rotating(triton_calls(M, K, N, G, dtype, cfg_used), reps=args.reps)
                line.append(f"{'table:' if cfg is None else ''}{cfg_name(cfg_used)} {t:7.1f}us {t_dense / t:5.2f}x")
            print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
