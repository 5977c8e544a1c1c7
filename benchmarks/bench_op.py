"""Op-level benchmark: w4a16.gemm (automatic choice and each backend forced) vs torch's dense
matmul, torch's int4 op and, when installed, third-party W4A16 kernels; same GPU, same run.

    python -m benchmarks.bench_op --out results/ --preset quick|default|full|subsets [--budget-s 300]
    python -m benchmarks.bench_op --out results/ --shapes llama3-8b.o --ms 1,16 --dtype bfloat16 --group 32
    python -m benchmarks.bench_op --preset full --estimate     # points and estimated H100 seconds, no GPU

Presets (--shapes/--ms/--dtype/--group override every sweep of the preset; --group -1 = channelwise):
  quick    4 shapes x M 1, 16, 256, 4096, fp16, G 128                      (< 1 min on an H100)
  default  all shapes x M 1, 16, 64, 256, 1024, 4096, fp16, G 128
  full     all shapes x 14 M (1 .. 8192), fp16, G 128                       (~5 min, stops at --budget-s)
  subsets  bf16, G = 32 and channelwise (G = K), each on a few shapes and M  (~2 min)

Writes bench_op.csv, bench_op.md and bench_op.png to --out, the CSV and markdown after every shape (a
cut-off run keeps its rows). Ratio = dense time / kernel time (above 1: faster than not quantizing).
Floor = max(bytes / copy bandwidth, FLOPs / dense rate).

Time per point is bounded so that the full sweep fits a few minutes: repetitions stop once they took
--point-budget-s (at least 5; slow large-M points get fewer than --reps), and torch_int4 is not run
from --int4-max-m on (20-25x slower than dense there: seconds per point); both are said in the
markdown and the rows' notes.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import time
from typing import List, NamedTuple, Optional

import torch

from w4a16_ops.dispatch import forced

from . import contenders as contenders_mod
from . import report
from .contenders import contenders
from .timing import measure_copy_bandwidth, measure_matmul_rate, prepare, time_interleaved

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
    "K704.moe_down": (704, 2048),  # a MoE expert's down projection; 704 % 128 != 0: G = 64
    "llama3-70b.qkv": (8192, 10240),
    "llama3-70b.o": (8192, 8192),
    "llama3-70b.gate_up": (8192, 57344),
    "llama3-70b.down": (28672, 8192),
}
QUICK_SHAPES = ["llama3-8b.o", "llama3-8b.down", "K2112.down", "N2120"]
MS = [1, 16, 64, 256, 1024, 4096]
QUICK_MS = [1, 16, 256, 4096]
FULL_MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
CHANNELWISE = -1  # --group value meaning G = K


class Sweep(NamedTuple):
    name: str
    shapes: List[str]
    ms: List[int]
    dtypes: List[str]
    group: int  # requested G (group_for adjusts it per K); CHANNELWISE: G = K


_FEW = ["llama3-8b.o", "llama3-8b.down", "K2112.down", "llama3-70b.down"]
PRESETS = {
    "quick": [Sweep("quick", QUICK_SHAPES, QUICK_MS, ["float16"], 128)],
    "default": [Sweep("default", list(SHAPES), MS, ["float16"], 128)],
    # Cheaper shapes first, the 70B layers (most of the time at large M) last: a run cut by --budget-s
    # loses the fewest shape classes.
    "full": [Sweep("full", [s for s in SHAPES if "70b" not in s] + [s for s in SHAPES if "70b" in s], FULL_MS,
                   ["float16"], 128)],
    "subsets": [
        Sweep("bf16", ["llama3-8b.o", "llama3-8b.down", "K2112.down", "N7400", "llama3-70b.gate_up"],
              [1, 4, 16, 64, 256, 1024, 4096], ["bfloat16"], 128),
        Sweep("G32", _FEW, [1, 16, 64, 256, 4096], ["float16"], 32),
        Sweep("channelwise", _FEW, [1, 16, 64, 256, 4096], ["float16"], CHANNELWISE),
    ],
}
PRESET_BUDGET_S = {"full": 330.0, "subsets": 170.0}  # stop cleanly past these unless --budget-s says otherwise


def group_for(K: int, G: int) -> int:
    """The requested group size, or the largest supported one that divides K (K = 2112: 64); G <= 0 or
    G >= K: channelwise (G = K)."""
    if G <= 0 or G >= K:
        return K
    for g in (G, 128, 64, 32):
        if K % g == 0:
            return g
    return K


def expand(preset: str, shapes=None, ms=None, dtypes=None, group=None) -> List[Sweep]:
    """The preset's sweeps with any of shapes / ms / dtypes / group replacing the preset's own."""
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    for s in shapes or ():
        if s not in SHAPES:
            raise SystemExit(f"unknown shape {s!r}; expected one of {', '.join(SHAPES)}")
    return [
        Sweep(
            sw.name,
            list(shapes) if shapes else sw.shapes,
            list(ms) if ms else sw.ms,
            list(dtypes) if dtypes else sw.dtypes,
            sw.group if group is None else group,
        )
        for sw in PRESETS[preset]
    ]


class Point(NamedTuple):
    sweep: str
    dtype: str
    shape: str
    K: int
    N: int
    G: int
    M: int


def points(sweeps: List[Sweep]) -> List[Point]:
    """Every point in run order: sweep, dtype, shape, then M (rows are written after each shape)."""
    out = []
    for sw in sweeps:
        for dtype in sw.dtypes:
            for label in sw.shapes:
                K, N = SHAPES[label]
                for M in sw.ms:
                    out.append(Point(sw.name, dtype, label, K, N, group_for(K, sw.group), M))
    return out


def skip_reason(kernel: str, M: int, int4_max_m: int) -> Optional[str]:
    """Kernels not run at a point by policy (said in the row's note and the markdown)."""
    if kernel == "torch_int4" and M >= int4_max_m:
        return f"not run at M >= {int4_max_m} (20-25x slower than dense there, seconds per point; --int4-max-m)"
    return None


def weight_bytes(K: int, N: int, G: int, zeros: bool) -> int:
    return K * N // 2 + 2 * N * (K // G) + (N * (K // G) // 2 if zeros else 0)


def kernel_bytes(kernel: str, M: int, K: int, N: int, G: int, zeros: bool) -> int:
    """Bytes a kernel must move at least: its weights once, x read, out written."""
    if kernel == "dense":
        w = 2 * K * N
    elif kernel == "torch_int4":
        w = K * N // 2 + 4 * N * (K // G)  # bf16 scale and zero per group and column
    else:
        w = weight_bytes(K, N, G, zeros)
    return w + 2 * M * K + 2 * M * N


# ----------------------------------------------------------------------------------------------
# Cost model (for --estimate and the printed plan; H100 SXM figures, no GPU needed)
# ----------------------------------------------------------------------------------------------

H100 = {"l2": 50e6, "bw": 2.9e12, "rate": 700e12}
SETUP_S = 0.05  # python, allocation, graph capture per timed kernel (weights are cached across M)
WARM_PASSES = 7  # time_rotating: 3 eager passes, 1 on the capture stream, 3 replays
START_S = 15.0  # interpreter, torch and CUDA start, copy-bandwidth and matmul-rate measurements
COMPILE_S = 1.5  # one Triton compile not in the on-disk cache (an upper bound: the GPU tests fill the cache)


def _triton_compiles(pts: List[Point]) -> int:
    """Distinct Triton specializations a run compiles at most: table entry (by M), dtype, G, and the
    integer specializations Triton makes (M == 1, M % 16, N % 16)."""
    from w4a16_ops.backends.triton import load_table

    entries = load_table()["families"]["sm90"]
    seen = set()
    for p in pts:
        entry = next(i for i, e in enumerate(entries) if e.get("m_max") is None or p.M <= e["m_max"])
        seen.add((entry, p.dtype, p.G if p.G != p.K else 0, p.M == 1, p.M % 16 == 0, p.N % 16 == 0))
    return len(seen)


def _est_call_s(kernel: str, M: int, K: int, N: int, G: int, hw=H100) -> float:
    dense = max(kernel_bytes("dense", M, K, N, G, False) / hw["bw"], 2 * M * N * K / hw["rate"]) + 5e-6
    if kernel == "dense":
        return dense
    if kernel == "torch_int4":
        return dense * (25 if M >= 64 else 1)
    w4 = max(kernel_bytes(kernel, M, K, N, G, False) / hw["bw"], 2 * M * N * K / hw["rate"]) + 8e-6
    return max(w4, dense * (2.0 if 64 <= M <= 512 else 1.15))  # dequantize + matmul paths at mid M


def estimate_seconds(pts: List[Point], kernels: List[str], reps: int, point_budget_s: float, int4_max_m: int,
                     hw=H100) -> float:
    """Modelled wall time of a run: per timed kernel, setup + warm-up passes + repetitions (each pass
    runs every weight copy once; copies: 3x L2, 2..64)."""
    total = START_S + (COMPILE_S * _triton_compiles(pts) if "w4a16_triton" in kernels or "w4a16_auto" in kernels else 0)
    for p in pts:
        for k in kernels + (["dense"] if "dense" in kernels else []):  # dense is timed twice (the noise twin)
            if skip_reason(k, p.M, int4_max_m) or k in ("gemlite", "conch", "humming"):  # peers: absent on the device
                continue
            wb = kernel_bytes(k, 0, p.K, p.N, p.G, False)
            n = max(2, min(64, int(3 * hw["l2"] / wb) + 1))
            pass_s = n * _est_call_s(k, p.M, p.K, p.N, p.G, hw)
            timed = min(reps * pass_s, max(5 * pass_s, point_budget_s))
            total += SETUP_S + WARM_PASSES * pass_s + timed
    return total


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output folder (required unless --estimate)")
    ap.add_argument("--preset", default=None, choices=list(PRESETS), help="default: 'default' ('quick' with --quick)")
    ap.add_argument("--quick", action="store_true", help="same as --preset quick")
    ap.add_argument("--shapes", default=None, help=f"comma list of {', '.join(SHAPES)}")
    ap.add_argument("--ms", default=None, help="comma list of M")
    ap.add_argument("--dtype", default=None, help="float16,bfloat16 (default: the preset's)")
    ap.add_argument("--group", type=int, default=None, help="G (default: the preset's; -1 = channelwise)")
    ap.add_argument("--kernels", default=None, help="comma list of contenders (default: all)")
    ap.add_argument("--reps", type=int, default=20, help="most timed repetitions per point")
    ap.add_argument("--point-budget-s", type=float, default=0.05,
                    help="stop repeating a point once its repetitions took this long (at least 5 repetitions)")
    ap.add_argument("--int4-max-m", type=int, default=1024, help="torch_int4 runs only below this M")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop before the next point once the run took this long, writing outputs "
                         f"(default: {PRESET_BUDGET_S} by preset, else none; 0: none)")
    ap.add_argument("--with-reference", action="store_true")
    ap.add_argument("--zeros", action="store_true", help="asymmetric weights (zero points) for this package's op")
    ap.add_argument("--estimate", action="store_true", help="print the points and the modelled H100 time; no GPU")
    args = ap.parse_args(argv)

    preset = args.preset or ("quick" if args.quick else "default")
    sweeps = expand(
        preset,
        shapes=args.shapes.split(",") if args.shapes else None,
        ms=[int(m) for m in args.ms.split(",")] if args.ms else None,
        dtypes=args.dtype.split(",") if args.dtype else None,
        group=args.group,
    )
    pts = points(sweeps)
    budget = PRESET_BUDGET_S.get(preset) if args.budget_s is None else (args.budget_s or None)
    all_kernels = contenders(args.with_reference, args.zeros)
    names = args.kernels.split(",") if args.kernels else list(all_kernels)
    if any(n not in all_kernels for n in names):
        ap.error(f"--kernels: expected names from {', '.join(all_kernels)}")
    est = estimate_seconds(pts, names, args.reps, args.point_budget_s, args.int4_max_m)
    plan = (f"preset {preset}: {len(pts)} points x {len(names)} kernels, modelled {est:.0f} s on an H100"
            + (f", stops past {budget:.0f} s" if budget else ""))
    print(plan, flush=True)
    if args.estimate:
        for sw in sweeps:
            sp = [p for p in pts if p.sweep == sw.name]
            e = estimate_seconds(sp, names, args.reps, args.point_budget_s, args.int4_max_m)
            print(f"  {sw.name}: {len(sp)} points, {sw.dtypes}, G {sw.group if sw.group > 0 else 'K'}: ~{e:.0f} s")
        return
    if args.out is None:
        ap.error("--out is required")
    os.makedirs(args.out, exist_ok=True)

    t0 = time.monotonic()
    gpu = torch.cuda.get_device_name()
    bw, rate = measure_copy_bandwidth(), measure_matmul_rate()
    meta = {
        "gpu": gpu,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "copy_bw_TBps": bw / 1e12,
        "dense_TFLOPs": rate / 1e12,
        "zeros": args.zeros,
        "policy": [
            f"Preset {preset}; repetitions per point: up to {args.reps}, stopping once they took "
            f"{args.point_budget_s} s (at least 5), so large-M points have fewer.",
            skip_reason("torch_int4", args.int4_max_m, args.int4_max_m).replace("not run", "torch_int4 is not run"),
        ],
    }
    print(f"{gpu}: copy {bw / 1e12:.2f} TB/s (read + write), dense fp16 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)

    rows: list = []
    done = 0
    for i, p in enumerate(pts):
        if budget and time.monotonic() - t0 > budget:
            meta["stopped"] = (f"Stopped at the time budget ({budget:.0f} s) after {done} of {len(pts)} points; "
                               f"not measured from {p.dtype} {p.shape} G={p.G} M={p.M} on.")
            print(meta["stopped"], flush=True)
            break
        measure_point(rows, meta, p, names, all_kernels, args)
        done += 1
        if i + 1 == len(pts) or pts[i + 1][:4] != p[:4]:  # a shape is done: free its weights, keep its rows
            contenders_mod.clear_cache()
            torch.cuda.empty_cache()
            write_outputs(rows, meta, args.out, plot=False)
    meta["elapsed_s"] = round(time.monotonic() - t0, 1)
    write_outputs(rows, meta, args.out, plot=True)
    print(f"wrote {args.out}/bench_op.csv, bench_op.md, bench_op.png ({meta['elapsed_s']} s)")


NOISE_TWIN = "dense#2"  # the dense matmul timed a second time (its own graph): the point's noise


def measure_point(rows, meta, p: Point, names, all_kernels, args) -> None:
    """Every kernel of the point set up and captured first, then timed interleaved (one replay of each per
    repetition), the dense matmul twice; the two dense medians go to meta['noise']."""
    dtype = getattr(torch, p.dtype)
    K, N, G, M = p.K, p.N, p.G, p.M
    flops = 2 * M * N * K
    floor_us = max(kernel_bytes("w4a16", M, K, N, G, args.zeros) / (meta["copy_bw_TBps"] * 1e12),
                   flops / (meta["dense_TFLOPs"] * 1e12)) * 1e6
    results = {}  # name -> (time or None, note)
    runs = {}
    keep = []  # every prepared kernel's calls (and so its tensors), alive while its graph may replay
    for name in names:
        why = skip_reason(name, M, args.int4_max_m)
        if why is not None:
            results[name] = (None, why)
            continue
        try:
            calls = all_kernels[name](M, K, N, G, dtype)
            if isinstance(calls, str):
                results[name] = (None, calls)
                continue
            # A graph reads the tensors the calls hold (x, weight copies) without owning them: keep them alive
            # until it is timed (torch.cuda.graph empties the cache before each capture, freeing dropped ones).
            keep.append(calls)
            with forced(name[len("w4a16_"):] if name.startswith("w4a16_") else "auto"):
                runs[name] = (prepare(calls), len(calls))
                if name == "dense":
                    runs[NOISE_TWIN] = (prepare(calls), len(calls))
        except Exception as e:  # one kernel failing (out of memory, a peer's bug) is a row, not the end of the run
            results[name] = (None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        finally:
            calls = None
    try:
        times = time_interleaved(runs, reps=args.reps, budget_s=args.point_budget_s)
        for name, ts in times.items():
            results[name] = (statistics.median(ts), "")
    except Exception as e:
        for name in runs:
            results[name] = (None, f"failed while timing: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    finally:
        runs = keep = None  # graphs first, then the tensors they read
        torch.cuda.empty_cache()
    base = results.get("dense", (None, ""))[0]
    twin = results.pop(NOISE_TWIN, (None, ""))[0]
    if base is not None and twin is not None:
        meta.setdefault("noise", []).append((p.dtype, p.shape, M, base, twin))
    for name in names:
        t, note = results[name]
        kb = kernel_bytes(name, M, K, N, G, args.zeros)
        rows.append(report.row(meta, p.shape, K, N, G, M, dtype, name, t, base, floor_us, note, flops=flops, nbytes=kb))
    report.print_point(rows, p.shape, M, dtype, G)
    if base is not None and twin is not None:
        print(f"{'':18s} noise: dense timed twice {base:.2f} / {twin:.2f} us "
              f"({abs(base - twin) / min(base, twin):.1%})", flush=True)


def write_outputs(rows, meta, out, plot):
    if not rows:
        return
    with open(os.path.join(out, "bench_op.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    report.write_markdown(rows, meta, os.path.join(out, "bench_op.md"))
    if plot:
        report.plot(rows, os.path.join(out, "bench_op.png"))


if __name__ == "__main__":
    main()
