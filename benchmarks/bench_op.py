"""Op-level benchmark: w4a16.gemm (automatic choice and each backend forced) vs torch's dense
matmul and torch's int4 op, same GPU, same run.

    python -m benchmarks.bench_op --out results/ [--quick] [--dtype float16,bfloat16] [--group 128]

Writes bench_op.csv, bench_op.md and bench_op.png to --out. Ratio = dense time / kernel time
(above 1: faster than not quantizing). Floor = max(bytes / copy bandwidth, FLOPs / dense rate).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os

import torch

from w4a16_ops.dispatch import forced

from . import report
from .contenders import contenders
from .timing import measure_copy_bandwidth, measure_matmul_rate, time_rotating

# (label, K, N)
SHAPES = {
    "llama3-8b.qkv": (4096, 6144),
    "llama3-8b.o": (4096, 4096),
    "llama3-8b.gate_up": (4096, 28672),
    "llama3-8b.down": (14336, 4096),
    "K2112.down": (2112, 4096),
    "N2120": (4096, 2120),
    "K7392.down": (7392, 4096),
    "N7400": (4096, 7400),
    "K14784.down": (14784, 4096),
}
QUICK_SHAPES = ["llama3-8b.o", "llama3-8b.down", "K2112.down", "N2120"]
MS = [1, 16, 64, 256, 1024, 4096]
QUICK_MS = [1, 16, 256, 4096]


def group_for(K: int, G: int) -> int:
    """The requested group size, or the largest supported one that divides K (K = 2112: 64)."""
    for g in (G, 128, 64, 32):
        if K % g == 0:
            return g
    return K


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="4 shapes x 4 M, float16 only")
    ap.add_argument("--shapes", default=None, help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--ms", default=None, help="comma list of M")
    ap.add_argument("--dtype", default="float16", help="float16,bfloat16")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--kernels", default=None, help="comma list of contenders (default: all)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--with-reference", action="store_true")
    ap.add_argument("--zeros", action="store_true", help="asymmetric weights (zero points) for this package's op")
    args = ap.parse_args(argv)

    shapes = args.shapes.split(",") if args.shapes else (QUICK_SHAPES if args.quick else list(SHAPES))
    ms = [int(m) for m in args.ms.split(",")] if args.ms else (QUICK_MS if args.quick else MS)
    dtypes = [getattr(torch, d) for d in args.dtype.split(",")]
    all_kernels = contenders(args.with_reference, args.zeros)
    names = args.kernels.split(",") if args.kernels else list(all_kernels)
    os.makedirs(args.out, exist_ok=True)

    gpu = torch.cuda.get_device_name()
    bw, rate = measure_copy_bandwidth(), measure_matmul_rate()
    meta = {
        "gpu": gpu,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "copy_bw_TBps": bw / 1e12,
        "dense_TFLOPs": rate / 1e12,
        "zeros": args.zeros,
    }
    print(f"{gpu}: copy {bw / 1e12:.2f} TB/s (read + write), dense fp16 matmul {rate / 1e12:.0f} TFLOP/s")

    rows = []
    for dtype in dtypes:
        for label in shapes:
            K, N = SHAPES[label]
            G = group_for(K, args.group)
            for M in ms:
                flops = 2 * M * N * K
                wbytes = K * N // 2 + 2 * N * K // G + (N * K // G // 2 if args.zeros else 0)
                nbytes = wbytes + 2 * M * K + 2 * M * N
                floor_us = max(nbytes / bw, flops / rate) * 1e6
                base = None
                for name in names:
                    calls = all_kernels[name](M, K, N, G, dtype)
                    if isinstance(calls, str):
                        rows.append(report.row(meta, label, K, N, G, M, dtype, name, None, None, floor_us, calls))
                        continue
                    with forced(name[len("w4a16_"):] if name.startswith("w4a16_") else "auto"):
                        t = time_rotating(calls, reps=args.reps)
                    del calls
                    if name == "dense":
                        base = t
                    kbytes = (2 * K * N if name == "dense" else wbytes) + 2 * M * K + 2 * M * N
                    rows.append(
                        report.row(meta, label, K, N, G, M, dtype, name, t, base, floor_us, "", flops=flops, nbytes=kbytes)
                    )
                    torch.cuda.empty_cache()
                report.print_point(rows, label, M, dtype)
            write_outputs(rows, meta, args.out, plot=False)  # after every shape: a cut-off run keeps its rows
    write_outputs(rows, meta, args.out, plot=True)
    print(f"wrote {args.out}/bench_op.csv, bench_op.md, bench_op.png")


def write_outputs(rows, meta, out, plot):
    with open(os.path.join(out, "bench_op.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    report.write_markdown(rows, meta, os.path.join(out, "bench_op.md"))
    if plot:
        report.plot(rows, os.path.join(out, "bench_op.png"))


if __name__ == "__main__":
    main()
