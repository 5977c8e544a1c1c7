"""Rows, the markdown table and the plot of the benchmarks."""

from __future__ import annotations

from collections import defaultdict


def row(meta, label, K, N, G, M, dtype, kernel, t_us, base_us, floor_us, note, flops=0, nbytes=0):
    ok = t_us is not None
    return {
        "gpu": meta["gpu"],
        "date": meta["date"],
        "shape": label,
        "K": K,
        "N": N,
        "G": G,
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


def print_point(rows, label, M, dtype):
    d = str(dtype).replace("torch.", "")
    pts = [r for r in rows if r["shape"] == label and r["M"] == M and r["dtype"] == d]
    cells = []
    for r in pts:
        if r["time_us"] == "":
            cells.append(f"{r['kernel']}=n/a")
        else:
            cells.append(f"{r['kernel']}={r['time_us']:.1f}us({r['speedup_vs_dense']}x)")
    print(f"{label:18s} {d:8s} M={M:<5d} floor={pts[0]['floor_us']:.1f}us  " + "  ".join(cells), flush=True)


def write_markdown(rows, meta, path):
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    points = list(dict.fromkeys((r["dtype"], r["shape"], r["K"], r["N"], r["G"], r["M"]) for r in rows))
    by = {(r["dtype"], r["shape"], r["M"], r["kernel"]): r for r in rows}
    lines = [
        f"# w4a16 op benchmark: {meta['gpu']}, {meta['date']}, torch {meta['torch']}",
        "",
        f"Copy bandwidth {meta['copy_bw_TBps']:.2f} TB/s (read + write), dense fp16 matmul "
        f"{meta['dense_TFLOPs']:.0f} TFLOP/s. Weights rotated through copies > 3x L2, CUDA-graph replay, "
        "median of repetitions. Cells: time in us (speedup over the dense matmul of the same dtype). "
        + ("This package's op with zero points (asymmetric weights)." if meta.get("zeros") else "Symmetric weights."),
        "",
        "| dtype | shape | K x N | G | M | floor (us) | " + " | ".join(kernels) + " |",
        "|---" * (6 + len(kernels)) + "|",
    ]
    for dtype, shape, K, N, G, M in points:
        cells = []
        for k in kernels:
            r = by.get((dtype, shape, M, k))
            if r is None or r["time_us"] == "":
                cells.append("n/a")
            else:
                sp = f" ({r['speedup_vs_dense']:.2f}x)" if r["speedup_vs_dense"] != "" else ""
                cells.append(f"{r['time_us']:.1f}{sp}")
        floor = by[(dtype, shape, M, kernels[0])]["floor_us"]
        lines.append(f"| {dtype} | {shape} | {K} x {N} | {G} | {M} | {floor:.1f} | " + " | ".join(cells) + " |")
    notes = sorted({(r["kernel"], r["note"]) for r in rows if r["note"]})
    if notes:
        lines += ["", "Not run:"] + [f"- {k}: {n}" for k, n in notes]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install .[bench])")
        return
    panels = list(dict.fromkeys((r["dtype"], r["shape"]) for r in rows))
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, (dtype, shape) in zip(axes.flat, panels):
        series = defaultdict(list)
        for r in rows:
            if (r["dtype"], r["shape"]) == (dtype, shape) and r["speedup_vs_dense"] != "":
                series[r["kernel"]].append((r["M"], r["speedup_vs_dense"]))
        for k, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{shape} ({dtype})", fontsize=9)
        ax.set_xlabel("M")
        ax.set_ylabel("speedup over dense")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
