"""Rows, the markdown tables and the plot of the benchmarks."""

from __future__ import annotations

from collections import defaultdict

AUTO = "w4a16_auto"
AUTO_TOLERANCE = 1.05  # the op's automatic choice must be within 5% of the fastest forced backend


def row(meta, label, K, N, G, M, dtype, kernel, t_us, base_us, floor_us, note, flops=0, nbytes=0):
    ok = t_us is not None
    return {
        "gpu": meta["gpu"],
        "date": meta["date"],
        "shape": label,
        "K": K,
        "N": N,
        "G": G,
        "zeros": bool(meta.get("zeros", False)),
        "M": M,
        "dtype": str(dtype).replace("torch.", ""),
        "kernel": kernel,
        "time_us": round(t_us, 2) if ok else "",
        "speedup_vs_dense": round(base_us / t_us, 3) if ok and base_us else "",
        "TFLOPs": round(flops / (t_us * 1e-6) / 1e12, 1) if ok else "",
        "GBps": round(nbytes / (t_us * 1e-6) / 1e9, 0) if ok else "",
        "frac_copy_bw": round(nbytes / (t_us * 1e-6) / (meta["copy_bw_TBps"] * 1e12), 3) if ok else "",
        "frac_dense_rate": round(flops / (t_us * 1e-6) / (meta["dense_TFLOPs"] * 1e12), 3) if ok else "",
        "floor_us": round(floor_us, 2),
        "note": note,
    }


def _num(v):
    """A cell of a row as read back from the CSV ('' or a number as text) or as written (a number)."""
    return None if v in ("", None) else float(v)


def _point(r):
    return (r["dtype"], r["shape"], int(r["K"]), int(r["N"]), int(r["G"]), str(r.get("zeros", False)), int(r["M"]))


def print_point(rows, label, M, dtype, G=None):
    d = str(dtype).replace("torch.", "")
    pts = [r for r in rows if r["shape"] == label and r["M"] == M and r["dtype"] == d and G in (None, r["G"])]
    cells = []
    for r in pts:
        if r["time_us"] == "":
            cells.append(f"{r['kernel']}=n/a")
        else:
            sp = f"({r['speedup_vs_dense']}x)" if r["speedup_vs_dense"] != "" else ""
            cells.append(f"{r['kernel']}={r['time_us']:.1f}us{sp}")
    g = f" G={pts[0]['G']}" if pts else ""
    print(f"{label:18s} {d:8s}{g} M={M:<5d} floor={pts[0]['floor_us']:.1f}us  " + "  ".join(cells), flush=True)


def auto_vs_best(rows, tolerance: float = AUTO_TOLERANCE):
    """(points checked, [(point, auto us, best forced kernel, its us, ratio)] where auto is more than
    `tolerance` x slower than the fastest forced w4a16 backend)."""
    by = defaultdict(dict)
    for r in rows:
        t = _num(r["time_us"])
        if t is not None and r["kernel"].startswith("w4a16_"):
            by[_point(r)][r["kernel"]] = t
    checked, slow = 0, []
    for pt, ts in by.items():
        forced_ts = {k: t for k, t in ts.items() if k != AUTO}
        if AUTO not in ts or not forced_ts:
            continue
        checked += 1
        best = min(forced_ts, key=forced_ts.get)
        ratio = ts[AUTO] / forced_ts[best]
        if ratio > tolerance:
            slow.append((pt, ts[AUTO], best, forced_ts[best], ratio))
    return checked, slow


def write_markdown(rows, meta, path):
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    points = list(dict.fromkeys(_point(r) for r in rows))
    by = {(_point(r), r["kernel"]): r for r in rows}
    floors = {}
    for r in rows:
        floors.setdefault(_point(r), _num(r["floor_us"]))
    lines = [
        f"# w4a16 op benchmark: {meta['gpu']}, {meta['date']}, torch {meta['torch']}",
        "",
        f"Copy bandwidth {meta['copy_bw_TBps']:.2f} TB/s (read + write), dense fp16 matmul "
        f"{meta['dense_TFLOPs']:.0f} TFLOP/s. Weights rotated through copies > 3x L2, CUDA-graph replay, "
        "median of repetitions. Cells: time in us (speedup over the dense matmul of the same dtype). "
        + ("This package's op with zero points (asymmetric weights)." if meta.get("zeros") else "Symmetric weights."),
    ]
    if meta.get("policy"):
        lines += [""] + [f"- {p}" for p in meta["policy"]]
    if meta.get("noise"):
        lines += ["", noise_line(meta["noise"])]
    if meta.get("stopped"):
        lines += ["", f"**{meta['stopped']}**"]
    if meta.get("elapsed_s") is not None:
        lines += ["", f"Run time {meta['elapsed_s']} s."]
    lines += [
        "",
        "| dtype | shape | K x N | G | M | floor (us) | " + " | ".join(kernels) + " |",
        "|---" * (6 + len(kernels)) + "|",
    ]
    for pt in points:
        dtype, shape, K, N, G, _, M = pt
        cells = []
        for k in kernels:
            r = by.get((pt, k))
            if r is None or r["time_us"] == "":
                cells.append("n/a")
            else:
                sp = f" ({_num(r['speedup_vs_dense']):.2f}x)" if r["speedup_vs_dense"] != "" else ""
                cells.append(f"{_num(r['time_us']):.1f}{sp}")
        floor = floors[pt]
        lines.append(f"| {dtype} | {shape} | {K} x {N} | {G} | {M} | {floor:.1f} | " + " | ".join(cells) + " |")
    lines += _auto_section(rows) + _roofline_section(rows)
    notes = sorted({(r["kernel"], r["note"]) for r in rows if r["note"]})
    if notes:
        lines += ["", "Not run:"] + [f"- {k}: {n}" for k, n in notes]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def noise_line(noise) -> str:
    """noise: [(dtype, shape, M, t1, t2)], the dense matmul timed twice per point (two graphs, interleaved)."""
    diffs = [(abs(a - b) / min(a, b), f"{d} {s} M={m}") for d, s, m, a, b in noise if min(a, b) > 0]
    if not diffs:
        return ""
    vals = sorted(v for v, _ in diffs)
    worst = max(diffs)
    return (f"Noise of this run: the dense matmul was timed twice at every point (two CUDA graphs, all kernels of a "
            f"point interleaved rep by rep): the two medians differ by {100 * vals[len(vals) // 2]:.1f}% (median over "
            f"{len(vals)} points), at most {100 * worst[0]:.1f}% ({worst[1]}). Differences below that are noise.")


def _auto_section(rows):
    checked, slow = auto_vs_best(rows)
    out = ["", "## Automatic choice vs best forced backend", ""]
    out.append(f"Points where {AUTO} is more than {round((AUTO_TOLERANCE - 1) * 100)}% slower than the fastest "
               f"forced w4a16 backend ({checked} points with both measured):")
    if not slow:
        return out + ["", "none"]
    out += ["", "| dtype | shape | G | M | auto (us) | best forced | its time (us) | auto / best |", "|---" * 8 + "|"]
    for (dtype, shape, K, N, G, _, M), t_auto, best, t_best, ratio in slow:
        out.append(f"| {dtype} | {shape} | {G} | {M} | {t_auto:.1f} | {best} | {t_best:.1f} | {ratio:.3f} |")
    return out


def _roofline_section(rows):
    out = [
        "",
        "## Rates",
        "",
        "Every timed kernel: TFLOP/s (2 M N K / time), effective GB/s (its weights once, x read, out written, "
        "over time), and these as fractions of the measured copy bandwidth and dense fp16 matmul rate.",
        "",
        "| dtype | shape | G | M | kernel | us | TFLOP/s | GB/s | % copy BW | % dense rate |",
        "|---" * 10 + "|",
    ]
    for r in rows:
        if r["time_us"] == "":
            continue
        out.append(
            f"| {r['dtype']} | {r['shape']} | {r['G']} | {r['M']} | {r['kernel']} | {_num(r['time_us']):.1f} | "
            f"{_num(r['TFLOPs']):.1f} | {_num(r['GBps']):.0f} | {100 * _num(r['frac_copy_bw']):.0f} | "
            f"{100 * _num(r['frac_dense_rate']):.0f} |"
        )
    return out


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install .[bench])")
        return
    panels = list(dict.fromkeys((r["dtype"], r["shape"], r["G"]) for r in rows))
    cols = min(4, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows), squeeze=False)
    for ax, (dtype, shape, G) in zip(axes.flat, panels):
        series = defaultdict(list)
        for r in rows:
            if (r["dtype"], r["shape"], r["G"]) == (dtype, shape, G) and r["speedup_vs_dense"] != "":
                series[r["kernel"]].append((int(r["M"]), _num(r["speedup_vs_dense"])))
        for k, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=k)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{shape} ({dtype}, G={G})", fontsize=9)
        ax.set_xlabel("M")
        ax.set_ylabel("speedup over dense")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
