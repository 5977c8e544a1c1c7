"""Timing of the CUDA backend against torch fp16 matmul, measured the way a model runs them (GPU only):

    python scripts/cuda_timing.py [--quick] [--out DIR] [--shapes 4096x4096,...] [--ms 1,16,...]
                                  [--variants auto,bps1,fused,dequant,bf16,zeros]

Weights are rotated through enough copies (> 3x the 50 MB L2) that every call finds them cold; all calls of one
measurement are captured in one CUDA graph; time per call = median replay time / calls. The fp16 baseline
(F.linear with an fp16 [N, K] weight, rotated the same way) is timed in the same run. G = 128 (64 or K where
128 does not divide K).

Variants: auto = the op as shipped (fp16 x, symmetric); bps1 = one block per SM; fused / dequant
force one strategy; bf16 = bf16 x; zeros = with zero points; tB.S.D = the fused kernel with the partition
overrides bps B, max splits S, scaling D (1: 16-bit weights, 2: fp32 partial sums; 0 = default each; backends/cuda.py
TUNING), e.g. t0.8.2.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics

import torch
import torch.nn.functional as F

os.environ["W4A16_BACKEND"] = "cuda"

import w4a16_ops  # noqa: E402
from w4a16_ops.backends import cuda as cb  # noqa: E402

L2_BYTES = 50e6


def group_for(K):
    """G = 128 where it divides K (the issue's setting), else 64, else channelwise."""
    return 128 if K % 128 == 0 else 64 if K % 64 == 0 else K
VARIANTS = {
    "auto": dict(),
    "bps1": dict(tuning=(1, 0, 0), dmin=1 << 30),
    "bps2": dict(tuning=(2, 0, 0), dmin=1 << 30),
    "bps3": dict(tuning=(3, 0, 0), dmin=1 << 30),
    "fused": dict(dmin=1 << 30),
    "dequant": dict(dmin=0),
    "bf16": dict(dtype=torch.bfloat16),
    "zeros": dict(zeros=True),
}


def variant(name):
    if name in VARIANTS:
        return VARIANTS[name]
    if name.startswith("t") and name[1:].count(".") == 2:
        return dict(tuning=tuple(int(v) for v in name[1:].split(".")), dmin=1 << 30)
    raise SystemExit(f"unknown variant {name!r}: one of {', '.join(VARIANTS)} or tB.S.D")


def time_calls(calls, reps):
    """Median time per call (us) of the callables, captured back to back in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in calls:
            f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(calls))
    del g
    return statistics.median(times)


def copy_bandwidth():
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    us = time_calls([lambda: dst.copy_(src)] * 4, 10)
    return 2 * n / us / 1e3  # GB/s counting read + write


def quant_copies(K, N, dtype, zeros, copies):
    G = group_for(K)
    Kt, Nt = -(-K // 16), -(-N // 64)
    out = []
    for _ in range(copies):
        qw = torch.randint(-(2**31), 2**31 - 1, (Kt, Nt * 128), dtype=torch.int32, device="cuda")
        s = ((torch.rand(K // G, N, device="cuda") + 0.5) / math.sqrt(K) / 4).to(dtype)
        z = torch.randint(-(2**31), 2**31 - 1, (K // G, N // 8), dtype=torch.int32, device="cuda") if zeros else None
        out.append((qw, s, z))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096,8192x28672")
    ap.add_argument("--ms", default=None)
    ap.add_argument("--variants", default="auto")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    ms = [int(m) for m in (args.ms or ("1,16,64,256,1024" if args.quick else "1,16,32,64,128,256,512,1024,4096")).split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    variants = args.variants.split(",")
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"device: {dev}; copy bandwidth {bw:.0f} GB/s (read + write)", flush=True)
    rows = []
    for K, N in shapes:
        try:
            rows += run_shape(K, N, ms, variants, args.reps, dev, bw)
        except Exception as e:  # one bad shape must not lose the others' numbers
            print(f"{K}x{N}: FAILED {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()
    print_table(rows, args.out)


def run_shape(K, N, ms, variants, reps, dev, bw):
    rows = []
    G = group_for(K)
    w16_bytes = 2 * K * N
    n16 = max(2, math.ceil(3 * L2_BYTES / w16_bytes))
    w16 = [torch.randn(N, K, device="cuda", dtype=torch.float16) / math.sqrt(K) for _ in range(n16)]
    nq = max(2, math.ceil(3 * L2_BYTES / (K * N / 2)))
    packs = {}
    for M in ms:
        x16 = torch.randn(M, K, device="cuda", dtype=torch.float16)
        ncalls = max(24, n16)
        t16 = time_calls([lambda i=i: F.linear(x16, w16[i % n16]) for i in range(ncalls)], reps)
        for v in variants:
            cfg = variant(v)
            dtype, zeros = cfg.get("dtype", torch.float16), cfg.get("zeros", False)
            if (dtype, zeros) not in packs:
                packs[(dtype, zeros)] = quant_copies(K, N, dtype, zeros, nq)
            wq = packs[(dtype, zeros)]
            x = x16.to(dtype)
            cb.TUNING = cfg.get("tuning", (0, 0, 0))
            cb.DEQUANT_MIN_M = cfg.get("dmin", DEFAULT_DMIN)
            nc = max(24, nq)
            try:
                t = time_calls([lambda i=i: w4a16_ops.gemm(x, *wq[i % nq]) for i in range(nc)], reps)
            finally:
                cb.TUNING, cb.DEQUANT_MIN_M = (0, 0, 0), DEFAULT_DMIN
            nbytes = K * N / 2 + 2 * N * K / G + (N * K / (2 * G) if zeros else 0) + 2 * M * K + 2 * M * N
            row = dict(device=dev, K=K, N=N, M=M, variant=v, fp16_us=round(t16, 2), us=round(t, 2),
                       ratio=round(t16 / t, 3), GBps=round(nbytes / t / 1e3), bw_frac=round(nbytes / t / 1e3 / bw, 3))
            rows.append(row)
            print(f"{K:>6}x{N:<6} M={M:<5} {v:<8} fp16 {t16:8.2f} us  w4a16 {t:8.2f} us  "
                  f"ratio {t16 / t:5.2f}x  {row['GBps']:>5} GB/s ({row['bw_frac']:.0%} of copy)", flush=True)
    del w16, packs
    return rows


def print_table(rows, out):
    print("\n| K x N | M | variant | fp16 (us) | w4a16 (us) | ratio | GB/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['K']} x {r['N']} | {r['M']} | {r['variant']} | {r['fp16_us']} | {r['us']} | {r['ratio']}x | {r['GBps']} |")
    if out and rows:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "cuda_timing.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


DEFAULT_DMIN = cb.DEQUANT_MIN_M

if __name__ == "__main__":
    main()
