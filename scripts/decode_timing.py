"""A/B timing of the CUDA decode kernel's launch and prefetch levers (GPU only), every variant of a point in one run:

    python scripts/decode_timing.py [--out DIR] [--points 4096x4096:1,16 ...] [--reps 15]

Per point (K x N, M; G = 128, or 64 where 128 does not divide K): every variant is one CUDA graph of back-to-back
calls, each on its own weight copy (together > 3x the L2, so every call reads its weights cold), like consecutive
layers. The graphs of a point are replayed interleaved, one replay of each per repetition, so a drifting GPU
favours none; 'plain' is in the list twice (two graphs of one configuration): their difference is the run's noise.
Variants (pdl: programmatic dependent launch; pfN: L2 prefetch N iterations ahead; s32: at most 32 blocks per
column; bulk: the bulk-copy weight ring (M <= 16 only; at larger M it is the plain kernel); +ew: an elementwise
kernel writing x before every call, the way a model's norm or activation precedes a linear; z: zero points):
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics

import torch
import torch.nn.functional as F

from w4a16_ops.backends import cuda as cb

_why = cb.availability()  # loads the extension (registers torch.ops.w4a16._cuda_*)
if _why is not None:
    raise SystemExit(f"the CUDA backend is unavailable: {_why}")

L2_BYTES = 50e6
# name -> (pdl, prefetch, max splits, elementwise before each call, zeros, bulk-copy weight ring)
VARIANTS = {
    "plain": (1, -1, 0, False, False, 0),
    "plain#2": (1, -1, 0, False, False, 0),
    "pdl": (2, -1, 0, False, False, 0),
    "pf4": (1, 4, 0, False, False, 0),
    "pdl+pf4": (2, 4, 0, False, False, 0),
    "bulk": (1, -1, 0, False, False, 1),
    "pdl+bulk": (2, -1, 0, False, False, 1),
    "pdl+pf4+s32": (2, 4, 32, False, False, 0),
    "plain+z": (1, -1, 0, False, True, 0),
    "bulk+z": (1, -1, 0, False, True, 1),
    "plain+ew": (1, -1, 0, True, False, 0),
    "pdl+ew": (2, -1, 0, True, False, 0),
    "bulk+ew": (1, -1, 0, True, False, 1),
}
__doc__ += "".join(f"  {k}: pdl={v[0] == 2} prefetch={v[1]} splits={v[2] or 'default'} ew={v[3]} zeros={v[4]} "
                   f"bulk={v[5]}\n" for k, v in VARIANTS.items())
POINTS = ("4096x4096:1,16,32 2112x4096:1,16 4096x6144:1 4096x28672:1,16,32 14336x4096:1,16 8192x28672:1,16 "
          "28672x8192:1")


def group_for(K):
    return 128 if K % 128 == 0 else 64 if K % 64 == 0 else K


def copy_bandwidth():
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    g = torch.cuda.CUDAGraph()
    dst.copy_(src)
    with torch.cuda.graph(g):
        for _ in range(4):
            dst.copy_(src)
    ts = []
    for _ in range(8):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 4)
    return 2 * n / (statistics.median(ts) * 1e-3)  # bytes/s, read + write


def capture(fns):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return g


def run_point(K, N, M, reps, bw, dev):
    G = group_for(K)
    Kt, Nt = -(-K // 16), -(-N // 64)
    nq = max(2, math.ceil(3 * L2_BYTES / (K * N / 2)))
    n16 = max(2, math.ceil(3 * L2_BYTES / (2 * K * N)))
    ncalls = max(16, nq)
    qs = [torch.randint(-(2**31), 2**31 - 1, (Kt, Nt * 128), dtype=torch.int32, device="cuda") for _ in range(nq)]
    ss = [((torch.rand(K // G, N, device="cuda") + 0.5) / math.sqrt(K) / 4).half() for _ in range(nq)]
    zs = [torch.randint(-(2**31), 2**31 - 1, (K // G, N // 8), dtype=torch.int32, device="cuda") for _ in range(nq)]
    w16 = [torch.randn(N, K, device="cuda", dtype=torch.float16) / math.sqrt(K) for _ in range(n16)]
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    outs = [torch.empty(M, N, device="cuda", dtype=torch.float16) for _ in range(ncalls)]
    graphs = {}
    # The fp16 baseline (F.linear on fp16 weights, rotated the same way).
    graphs["fp16"] = capture([lambda i=i: F.linear(x, w16[i % n16]) for i in range(ncalls)])
    nlocks = -(-M // 64) * -(-N // 256)
    for name, (pdl, pf, splits, ew, zeros, bulk) in VARIANTS.items():
        def call(i, pdl=pdl, pf=pf, splits=splits, ew=ew, zeros=zeros, bulk=bulk):
            if ew:
                x.mul_(1.0)  # writes x (exactly): the next kernel must wait for it
            j = i % nq
            torch.ops.w4a16._cuda_gemm(x, qs[j], ss[j], zs[j] if zeros else None, outs[i], cb._locks(x.device, nlocks),
                                       0, splits, 0, pdl, pf, bulk)
        graphs[name] = capture([lambda i=i: call(i) for i in range(ncalls)])
    for g in graphs.values():
        g.replay()
    torch.cuda.synchronize()
    times = {k: [] for k in graphs}
    for _ in range(reps):  # interleaved: one replay of every graph per repetition
        for k, g in graphs.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times[k].append(a.elapsed_time(b) * 1e3 / ncalls)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for k, t in med.items():
        zeros = k in VARIANTS and VARIANTS[k][4]
        nbytes = (2 * K * N if k == "fp16" else K * N / 2 + 2 * N * K / G + (N * K / (2 * G) if zeros else 0)) \
            + 2 * M * K + 2 * M * N
        rows.append(dict(device=dev, K=K, N=N, M=M, variant=k, us=round(t, 2), ratio=round(med["fp16"] / t, 3),
                         bw_frac=round(nbytes / (t * 1e-6) / bw, 3), p10=round(sorted(times[k])[len(times[k]) // 10], 2)))
    noise = abs(med["plain"] - med["plain#2"]) / min(med["plain"], med["plain#2"])
    best = min((k for k in VARIANTS if not VARIANTS[k][3] and not VARIANTS[k][4]), key=med.get)
    print(f"{K:>6}x{N:<6} M={M:<3} fp16 {med['fp16']:7.2f}  plain {med['plain']:7.2f} (#2 {med['plain#2']:7.2f}, "
          f"noise {noise:.1%})  " + "  ".join(f"{k} {med[k]:.2f}" for k in VARIANTS if k not in ("plain", "plain#2"))
          + f"  | best {best} {med[best]:.2f} us = {med['fp16'] / med[best]:.2f}x", flush=True)
    return rows


def summarize(rows):
    """Per variant, its time over its baseline's (plain, or plain+ew / plain+z for the +ew / +z variants),
    geometric mean over the points with M <= 16 and the range: the numbers a default is decided by."""
    by = {(r["K"], r["N"], r["M"], r["variant"]): r["us"] for r in rows}
    pts = sorted({(K, N, M) for K, N, M, _ in by if M <= 16})
    print("\nvariant vs its baseline at M <= 16 (geometric mean of time ratios; < 1 = faster):")
    for v in VARIANTS:
        base = ("plain+ew" if v.endswith("+ew") and v != "plain+ew"
                else "plain+z" if v.endswith("+z") and v != "plain+z" else "plain")
        if v == base:
            continue
        rs = [by[pt + (v,)] / by[pt + (base,)] for pt in pts if pt + (v,) in by and pt + (base,) in by]
        if rs:
            gm = math.exp(sum(math.log(r) for r in rs) / len(rs))
            print(f"  {v:<14} vs {base:<9} {gm:.3f}  (min {min(rs):.3f}, max {max(rs):.3f}, {len(rs)} points)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--points", default=POINTS, help="space-separated KxN:M1,M2,...")
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    bw = copy_bandwidth()
    print(f"device: {dev}; copy bandwidth {bw / 1e12:.2f} TB/s (read + write); plan of 4096x4096 M=1: "
          f"{torch.ops.w4a16._cuda_gemm_plan(1, 4096, 4096, 128, False)}", flush=True)
    rows = []
    for spec in args.points.split():
        shape, ms = spec.split(":")
        K, N = (int(v) for v in shape.split("x"))
        for M in (int(m) for m in ms.split(",")):
            try:
                rows += run_point(K, N, M, args.reps, bw, dev)
            except Exception as e:  # one failing point must not lose the others' numbers
                print(f"{K}x{N} M={M}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            torch.cuda.empty_cache()
    summarize(rows)
    if args.out and rows:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "decode_timing.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
