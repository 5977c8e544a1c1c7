"""Eager host overhead of one op call, in microseconds, next to a plain torch.matmul call.

    python -m benchmarks.bench_overhead [--device cuda]

Measures the wall time of issuing many calls back to back on a tiny problem (so the GPU keeps
up and the host is the bottleneck), per call, median over repetitions. The backend's own work is
included (that is what a user pays); "checks + dispatch" isolates the op's Python layer.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import w4a16_ops
from w4a16_ops import dispatch
from w4a16_ops.checks import check_gemm_args


def per_call_us(fn, calls=2000, reps=7, sync=None) -> float:
    for _ in range(200):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync:
            sync()
        times.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--K", type=int, default=4096)
    ap.add_argument("--N", type=int, default=4096)
    args = ap.parse_args(argv)
    dev, K, N = args.device, args.K, args.N
    sync = torch.cuda.synchronize if dev == "cuda" else None
    packed = [t.to(dev) if t is not None else None for t in w4a16_ops.quantize(torch.randn(N, K), 128)]
    x = torch.randn(1, K, dtype=torch.float16, device=dev)
    w = torch.randn(K, N, dtype=torch.float16, device=dev)
    d = dispatch.explain(1, K, N, device=dev)
    rows = [
        ("torch.matmul (dense fp16)", per_call_us(lambda: torch.matmul(x, w), sync=sync)),
        (f"w4a16.gemm -> {d.backend}", per_call_us(lambda: torch.ops.w4a16.gemm(x, *packed), sync=sync)),
    ]
    with torch.inference_mode():
        rows.append((f"w4a16.gemm -> {d.backend}, inference_mode", per_call_us(lambda: torch.ops.w4a16.gemm(x, *packed), sync=sync)))
    rows.append(("checks + dispatch only", per_call_us(lambda: (check_gemm_args(x, *packed), dispatch.route(x.device, x.dtype, 1, K, N, 128, False)))))
    # Where the rest goes (host-only pieces run without the GPU; the binding call launches the kernel).
    rows.append(("  check_gemm_args", per_call_us(lambda: check_gemm_args(x, *packed))))
    rows.append(("  dispatch.route", per_call_us(lambda: dispatch.route(x.device, x.dtype, 1, K, N, 128, False))))
    rows.append(("  out = x.new_empty((M, N))", per_call_us(lambda: x.new_empty((1, N)))))
    if d.backend == "cuda":
        from w4a16_ops.backends import cuda as cb

        out = x.new_empty((1, N))
        locks = cb._locks(x.device, 16)
        rows.append(("  cuda: _locks", per_call_us(lambda: cb._locks(x.device, 16))))
        rows.append(("  cuda: _aligned x3 + _x_ready", per_call_us(lambda: (cb._aligned(packed[0]), cb._aligned(packed[1]), cb._aligned(packed[2]), cb._x_ready(x)))))
        rows.append(("  cuda: torch.ops.w4a16._cuda_gemm", per_call_us(lambda: torch.ops.w4a16._cuda_gemm(x, packed[0], packed[1], packed[2], out, locks), sync=sync)))
        p = dispatch.problem_for(x.device, x.dtype, 1, K, N, 128, False)
        rows.append(("  cuda: backend gemm()", per_call_us(lambda: cb.gemm(x, packed[0], packed[1], packed[2], p, out), sync=sync)))
    print(f"eager per-call time, M=1, K={K}, N={N}, {dev}{' (' + torch.cuda.get_device_name() + ')' if dev == 'cuda' else ''}:")
    for name, us in rows:
        print(f"  {name:45s} {us:8.2f} us")


if __name__ == "__main__":
    main()
