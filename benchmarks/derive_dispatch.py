"""The dispatch table from measurements: which forced backend is fastest over which M range.

    python -m benchmarks.derive_dispatch results/bench_op.csv [--major 9] [--md table.md]

Reads a bench_op.csv and prints, for each weight kind (symmetric / zero points), each dtype and each
shape class, and for all of them merged, the M buckets in the form of _MEASURED_ORDER in
w4a16_ops/dispatch.py ((first M past the range, order) ..., None = every larger M), then a markdown
decision table for the README. It never edits dispatch.py.

An order is judged by what the op would run under it: at each point the first backend of the order
that was measured there (one that cannot serve a shape is skipped by dispatch.decide too), divided by
the fastest forced backend there. At each measured M the order with the smallest worst-case ratio over
the shapes wins; an order within --tie of it that the M below used is kept (fewer buckets), unless that
would take a point past the 5% tolerance. Unmeasured
M take the bucket below them, as dispatch.preference does.
"""

from __future__ import annotations

import argparse
import csv
import itertools
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

DEFAULT_ORDER = ("cuda", "triton", "reference")
TOLERANCE = 1.05

Times = Dict[Tuple, Dict[str, float]]  # point (shape, K, N, G) -> backend -> us, for one M


def shape_class(K: int, N: int) -> str:
    """'aligned' where a Marlin-style 128 x 64 tile fits (K % 128 == 0 and N % 64 == 0), else 'unaligned'."""
    return "aligned" if K % 128 == 0 and N % 64 == 0 else "unaligned"


def major_for(gpu: str) -> Optional[int]:
    """Compute-capability major of a GPU name as torch reports it, for the common data-centre parts."""
    g = gpu.upper()
    for names, major in ((("B200", "B100", "GB200"), 10), (("H100", "H200", "H800", "H20", "GH200"), 9),
                         (("A100", "A800", "A10", "A30", "A40", "L40", "L4", "RTX"), 8)):
        if any(n in g for n in names):
            return major
    return None


def load(path: str) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def collect(rows: List[dict]) -> Dict[Tuple, Dict[int, Times]]:
    """(zeros, dtype, class) -> M -> point -> {backend: us}, forced w4a16 backends with a time only."""
    out: Dict[Tuple, Dict[int, Times]] = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for r in rows:
        k = r["kernel"]
        if not k.startswith("w4a16_") or k == "w4a16_auto" or r["time_us"] in ("", None):
            continue
        K, N, M = int(r["K"]), int(r["N"]), int(r["M"])
        zeros = str(r.get("zeros", "False")) == "True"
        out[(zeros, r["dtype"], shape_class(K, N))][M][(r["shape"], K, N, int(r["G"]))][k[len("w4a16_"):]] = float(
            r["time_us"])
    return out


def merge(groups: List[Dict[int, Times]]) -> Dict[int, Times]:
    out: Dict[int, Times] = defaultdict(dict)
    for i, g in enumerate(groups):
        for M, pts in g.items():
            for pt, ts in pts.items():
                out[M][(i,) + pt] = ts
    return out


def ratios(order: Tuple[str, ...], pts: Times) -> List[float]:
    """Per point: the time of the first backend of `order` measured there / the fastest measured there."""
    out = []
    for ts in pts.values():
        first = next((b for b in order if b in ts), None)
        if first is not None:
            out.append(ts[first] / min(ts.values()))
    return out


def candidate_orders(backends) -> List[Tuple[str, ...]]:
    """Every order of the measured non-reference backends, then those not measured, reference last."""
    measured = sorted(b for b in backends if b != "reference")
    rest = tuple(b for b in DEFAULT_ORDER if b not in measured and b != "reference") + ("reference",)
    return [tuple(p) + rest for p in itertools.permutations(measured)]


def derive(by_m: Dict[int, Times], tie: float = 0.01):
    """[(first M past the range or None, order, worst ratio in the range, points in the range)]."""
    backends = {b for pts in by_m.values() for ts in pts.values() for b in ts}
    orders = candidate_orders(backends)
    chosen = []  # (M, order, worst, n)
    prev = None
    for M in sorted(by_m):
        pts = by_m[M]

        def score(o):
            r = ratios(o, pts)
            default_rank = tuple(DEFAULT_ORDER.index(b) if b in DEFAULT_ORDER else 9 for b in o)
            return (max(r, default=1.0), sum(r) / max(len(r), 1), default_rank)

        best = min(orders, key=score)
        keep = prev is not None and score(prev)[0] <= score(best)[0] + tie
        pick = prev if keep and (score(prev)[0] <= TOLERANCE or score(prev)[0] <= score(best)[0]) else best
        chosen.append((M, pick, max(ratios(pick, pts), default=1.0), len(pts)))
        prev = pick
    buckets = []  # merge runs of one order; a bucket ends at the next measured M with another order
    for i, (M, order, worst, n) in enumerate(chosen):
        if buckets and buckets[-1][1] == order:
            _, _, w, c, lo = buckets[-1]
            buckets[-1] = [None, order, max(w, worst), c + n, lo]
        else:
            if buckets:
                buckets[-1][0] = M
            buckets.append([None, order, worst, n, M])
    return [(limit, order, worst, n, lo) for limit, order, worst, n, lo in buckets]


def literal(buckets, major: int, name: str = "_MEASURED_ORDER") -> str:
    lines = [f"{name} = {{", f"    {major}: ("]
    for limit, order, *_ in buckets:
        lines.append(f"        ({limit!r}, {order!r}),")
    return "\n".join(lines + ["    ),", "}"])


def violations(by_m: Dict[int, Times], buckets, tolerance: float = TOLERANCE):
    """Points where the derived table's choice is more than `tolerance` x the fastest forced backend."""
    out = []
    for M in sorted(by_m):
        order = next(o for limit, o, *_ in buckets if limit is None or M < limit)
        for pt, ts in by_m[M].items():
            first = next((b for b in order if b in ts), None)
            if first is not None and ts[first] > tolerance * min(ts.values()):
                best = min(ts, key=ts.get)
                out.append((M, pt, first, ts[first], best, ts[best]))
    return out


def decision_table(results) -> str:
    lines = ["| weights | dtype | shape class | M | order | worst time / fastest forced | points |", "|---" * 7 + "|"]
    for (zeros, dtype, cls), buckets in results:
        for limit, order, worst, n, lo in buckets:
            rng = f"M >= {lo}" if limit is None else f"{lo} <= M < {limit}"
            lines.append(f"| {'zero points' if zeros else 'symmetric'} | {dtype} | {cls} | {rng} | "
                         f"{', '.join(order)} | {worst:.3f} | {n} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+", help="bench_op.csv files (rows are pooled)")
    ap.add_argument("--major", type=int, default=None, help="compute-capability major (default: from the GPU name)")
    ap.add_argument("--tie", type=float, default=0.01, help="keep the previous M's order when within this of the best")
    ap.add_argument("--md", default=None, help="also write the decision table (markdown) here")
    args = ap.parse_args(argv)

    rows = [r for p in args.csv for r in load(p)]
    if not rows:
        raise SystemExit("no rows")
    major = args.major if args.major is not None else major_for(rows[0]["gpu"])
    if major is None:
        raise SystemExit(f"cannot tell the compute capability of {rows[0]['gpu']!r}: pass --major")
    groups = collect(rows)
    results = []
    for zeros in sorted({k[0] for k in groups}):
        keys = sorted(k for k in groups if k[0] == zeros)
        for key in keys:
            results.append((key, derive(groups[key], args.tie)))
        merged_key = (zeros, "all", "all")
        merged = merge([groups[k] for k in keys])
        results.append((merged_key, derive(merged, args.tie)))
        groups[merged_key] = merged
    name_of = {False: "_MEASURED_ORDER", True: "_MEASURED_ORDER_ZEROS"}
    print(f"# from {', '.join(args.csv)} ({rows[0]['gpu']}, {rows[0]['date']}); sm_{major}x")
    for key, buckets in results:
        zeros, dtype, cls = key
        n_pts = sum(len(p) for p in groups[key].values())
        bad = violations(groups[key], buckets)
        print(f"\n# {'zero points' if zeros else 'symmetric'}, {dtype}, {cls}: {n_pts} points; "
              f"{len(bad)} over {TOLERANCE:.2f}x the fastest forced backend under this table")
        print(literal(buckets, major, name_of[zeros]))
        for M, pt, first, t, best, tb in bad:
            print(f"#   M={M} {pt}: {first} {t:.1f} us vs {best} {tb:.1f} us ({t / tb:.3f}x)")
    table = decision_table(results)
    print("\n" + table)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
