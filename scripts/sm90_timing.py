"""Timing sweep of the Hopper wgmma kernel against fp16 matmul and the CUDA backend's other strategies (GPU only):

    PYTHONPATH=. python3 scripts/sm90_timing.py [--out DIR] [--shapes 4096x4096,...] [--ms 64,256,...] [--variants sm90,bm64,...]

Weights rotated cold through L2, calls captured in one CUDA graph (benchmarks/timing.py); every variant of a point is
timed twice, interleaved (A B ... A B), and both times are printed, so the spread is visible beside each ratio.
Variants: sm90 (default partition), bm64 / bm128 (rows per block forced), sN (N K slices forced), dequant
(dequantize + cuBLAS), fused (the mma.sync kernel), zeros / bf16 (sm90 with zero points / bf16 x).
"""

from __future__ import annotations

import argparse
import csv
import os

import torch
import torch.nn.functional as F

import w4a16_ops  # noqa: E402
from benchmarks.timing import packed_copies, time_rotating  # noqa: E402
from w4a16_ops.backends import cuda as cb  # noqa: E402

SHAPES = "4096x4096,4096x6144,4096x14336,14336x4096,8192x8192,8192x28672,2112x4096"
MS = "32,64,128,256,512,1024,4096"


def group_for(K):
    return 128 if K % 128 == 0 else 64 if K % 64 == 0 else K


def make_calls(variant, M, K, N, dtype):
    zeros = variant == "zeros"
    if variant == "bf16":
        dtype = torch.bfloat16
    G = group_for(K)
    q = torch.randint(0, 16, (N, K), device="cuda")
    s = ((torch.rand(K // G, N, device="cuda") + 0.5) / K**0.5).to(dtype)
    z = torch.randint(0, 16, (K // G, N), device="cuda") if zeros else None
    packs = packed_copies(w4a16_ops.pack(q, s, z))
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    out = torch.empty(M, N, device="cuda", dtype=dtype)
    if variant == "fp16":
        ws = [torch.randn(N, K, device="cuda", dtype=dtype) for _ in range(len(packs))]
        return [lambda w=w: F.linear(x, w) for w in ws], None
    if variant in ("dequant", "fused"):
        p = w4a16_ops.dispatch.problem_for(x.device, dtype, M, K, N, G, zeros)
        p = p._replace(capability=(8, 0))  # uses_sm90 is False: the backend runs its other strategies
        saved = cb.DEQUANT_MIN_M

        def call(pk):
            cb.DEQUANT_MIN_M = 0 if variant == "dequant" else 1 << 30
            try:
                cb.gemm(x, pk.qweight, pk.scales, pk.zeros, p, out)
            finally:
                cb.DEQUANT_MIN_M = saved

        return [lambda pk=pk: call(pk) for pk in packs], None
    splits, bm = 0, 0
    if variant.startswith("bm"):
        bm = int(variant[2:])
    elif variant.startswith("s") and variant[1:].isdigit():
        splits = int(variant[1:])
    plan = torch.ops.w4a16._cuda_gemm_sm90_plan(M, K, N, splits, bm)
    op = torch.ops.w4a16._cuda_gemm_sm90
    return [lambda pk=pk: op(x, pk.qweight, pk.scales, pk.zeros, out, splits, bm) for pk in packs], plan


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--ms", default=MS)
    ap.add_argument("--variants", default="sm90,dequant,fused")
    args = ap.parse_args()
    why = cb.availability()  # also loads the extension, which registers the private ops
    assert why is None, why
    variants = ["fp16"] + [v for v in args.variants.split(",") if v]
    rows = []
    print(f"{'shape':>12} {'M':>5} " + " ".join(f"{v:>17}" for v in variants) + "  plan(sm90)", flush=True)
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        for M in (int(m) for m in args.ms.split(",")):
            calls, plans = {}, {}
            for v in variants:
                if v == "fused" and M > 256:
                    continue
                calls[v], plans[v] = make_calls(v, M, K, N, torch.float16)
            times = {v: [] for v in calls}
            for _ in range(2):  # interleaved repetitions: a drifting GPU favours no variant
                for v, c in calls.items():
                    times[v].append(time_rotating(c, reps=15, budget_s=1.5))
            base = min(times["fp16"])
            cells = []
            for v in variants:
                if v not in times:
                    cells.append(f"{'-':>17}")
                    continue
                t = times[v]
                cells.append(f"{min(t):7.1f}/{max(t):6.1f} {base / min(t):4.2f}x"[:17].rjust(17))
                flops = 2 * M * K * N
                rows.append(dict(shape=shape, M=M, variant=v, us_a=t[0], us_b=t[1], ratio=base / min(t),
                                 tflops=flops / min(t) / 1e6, plan=plans.get(v)))
            print(f"{shape:>12} {M:>5} " + " ".join(cells) + f"  {plans.get('sm90')}", flush=True)
            del calls
            torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "sm90_timing.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
