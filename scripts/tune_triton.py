"""Offline tuning of the Triton backend: time candidate configurations per M and write the table
w4a16_ops/backends/triton_configs.json ships (the backend never autotunes at call time).

    python scripts/tune_triton.py --out DIR [--write] [--shapes ...] [--ms 1,16,...] [--dtype float16]

Method (benchmarks/timing.py): weights rotated through copies that exceed the L2, all calls of a
repetition replayed from one CUDA graph, median of the repetitions; dense torch.matmul with 16-bit
weights timed the same way in the same run. For each M the candidate with the best geometric-mean
time over the shapes wins (per shape class with --per-class). --write replaces this GPU family's
entries in the json (other families are kept). DIR gets tune.csv and tune.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import w4a16_ops  # noqa: E402
from benchmarks import contenders  # noqa: E402
from benchmarks.timing import packed_copies, time_rotating  # noqa: E402
from w4a16_ops import dispatch  # noqa: E402
from w4a16_ops.backends import triton as tb  # noqa: E402

from benchmarks.bench_op import SHAPES, group_for  # noqa: E402  (the benchmark's shapes and G rule)

DEFAULT_SHAPES = ["llama3-8b.o", "llama3-8b.down", "K7392.down", "N7400", "K14784.down", "N2120"]
DEFAULT_MS = [1, 16, 32, 64, 128, 256, 1024, 4096]


def _nib(bm, bn, bk, w=4, st=4, pps=2, **kw):
    return dict(kernel="nibble", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st,
                split_k="auto", programs_per_sm=pps, **kw)


def _den(bm, bn, bk, w=8, st=3, gm=8, split=1, pps=1):
    return dict(kernel="dense", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st, GROUP_M=gm,
                split_k=split, programs_per_sm=pps)


def candidates(M: int):
    """Configurations worth timing at this M (num_warps 4 or 8: wgmma with the weights as register
    operand; 2: mma.sync)."""
    if M <= 16:
        return [_nib(16, 128, 128, st=4, pps=4), _nib(16, 128, 64, st=6, pps=4), _nib(16, 256, 128, w=8, st=3),
                _nib(16, 128, 128, st=4, pps=6), _nib(16, 256, 64, w=8, st=6, pps=2), _nib(16, 128, 64, st=8, pps=6)]
    if M <= 32:
        return [_nib(32, 128, 64, st=6, pps=4), _nib(32, 128, 128, st=4, pps=4), _nib(32, 256, 128, w=8, st=3)]
    if M <= 64:
        return [_nib(64, 128, 64, st=4, pps=2), _nib(64, 256, 64, w=8, st=4), _nib(32, 128, 64, st=6, pps=4),
                _nib(64, 256, 128, w=8, st=3), _dq()]
    if M <= 256:
        return [_dq(), _dq(bn=64, bk=64), _nib(64, 128, 64, st=4, pps=2)]
    return [_dq(), _dq(chunk=0), _dq(bn=64, bk=64)]


def _dq(bn=128, bk=32, w=4, chunk=24):
    return dict(kernel="dqmm", BLOCK_M=128, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, chunk_mb=chunk)


def dense_calls(M, K, N, dtype):
    return contenders.dense(M, K, N, None, dtype)  # the benchmark's fp16 baseline (G does not apply)


def triton_calls(M, K, N, G, dtype, cfg):
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, device="cuda")
    scales = (torch.rand(K // G, N, device="cuda") * 0.01 + 0.001).to(dtype)
    packed = w4a16_ops.pack(q, scales)
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    out = torch.empty(M, N, dtype=dtype, device="cuda")
    p = dispatch.problem_for(x.device, dtype, M, K, N, G, False)
    cfg = tb._legalize(cfg, p)
    return [lambda pk=pk: tb.launch(x, pk.qweight, pk.scales, None, p, out, cfg) for pk in packed_copies(packed)]


def cfg_name(cfg) -> str:
    if cfg["kernel"] == "nibble":
        split = cfg.get("split_k", 1)
        tail = f"p{cfg.get('programs_per_sm', 2)}" if split == "auto" else f"k{split}"
        tail += "R" if cfg.get("reduce") == "inkernel" else ""
        return f"nib{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}w{cfg['num_warps']}s{cfg['num_stages']}{tail}"
    if cfg["kernel"] == "dqmm":
        return f"dqmm{cfg['BLOCK_N']}x{cfg['BLOCK_K']}w{cfg.get('num_warps', 4)}c{cfg.get('chunk_mb', 24)}"
    return (f"den{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}w{cfg['num_warps']}s{cfg['num_stages']}"
            f"g{cfg.get('GROUP_M', 8)}{'k' if cfg.get('split_k', 1) == 'auto' else ''}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, DEFAULT_MS)))
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--write", action="store_true", help="write the winners into triton_configs.json")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new points after this many seconds")
    ap.add_argument("--merge", action="store_true",
                    help="with --write: replace only the entries of the timed M (same m_max), keep the others")
    ap.add_argument("--reduce-ab", action="store_true",
                    help="candidates = the table's entry for M, with the two-kernel and the in-kernel split-K reduction")
    args = ap.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    shapes = args.shapes.split(",")
    ms = [int(m) for m in args.ms.split(",")]
    os.makedirs(args.out, exist_ok=True)
    cap = torch.cuda.get_device_capability()
    family = tb.gpu_family(cap)
    print(f"{torch.cuda.get_device_name()} ({family}), torch {torch.__version__}, dtype {args.dtype}", flush=True)
    t0 = time.time()
    rows = []
    best = {}
    for M in ms:
        if args.reduce_ab:
            p = dispatch.problem_for(torch.device("cuda"), dtype, M, 4096, 4096, 128, False)
            base = {k: v for k, v in tb.select_config(p).items() if k not in ("m_max", "reduce")}
            cands = [base, dict(base, reduce="inkernel")]
        else:
            cands = candidates(M)
        logt = {cfg_name(c): [] for c in cands}
        for name in shapes:
            if time.time() - t0 > args.budget_s:
                print("budget reached", flush=True)
                break
            K, N = SHAPES[name]
            G = group_for(K, args.group)
            t_dense = time_rotating(dense_calls(M, K, N, dtype), reps=args.reps)
            line = [f"M={M:5d} {name:16s} G={G:3d} dense {t_dense:8.1f}us"]
            for c in cands:
                try:
                    t = time_rotating(triton_calls(M, K, N, G, dtype, c), reps=args.reps)
                except Exception as e:  # a config that does not compile or fit: skip it
                    print(f"  {cfg_name(c)} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    t = float("inf")
                logt[cfg_name(c)].append(math.log(t))
                rows.append(dict(M=M, shape=name, K=K, N=N, G=G, config=cfg_name(c), us=t, dense_us=t_dense,
                                 ratio=t_dense / t))
                line.append(f"{cfg_name(c)} {t_dense / t:5.2f}x")
            print("  ".join(line), flush=True)
        scored = [(sum(logt[cfg_name(c)]) / len(logt[cfg_name(c)]), c) for c in cands if logt[cfg_name(c)]]
        if scored:
            best[M] = min(scored, key=lambda t: t[0])[1]
            print(f"M={M}: best {cfg_name(best[M])}", flush=True)

    with open(os.path.join(args.out, "tune.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["M"])
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "tune.md"), "w") as f:
        f.write(f"# tune_triton on {torch.cuda.get_device_name()} ({family}), {args.dtype}\n\n")
        f.write("| M | shape | G | config | us | dense us | ratio |\n|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['M']} | {r['shape']} | {r['G']} | {r['config']} | {r['us']:.1f} | {r['dense_us']:.1f} | "
                    f"{r['ratio']:.2f}x |\n")
    if args.write and best:
        table = json.load(open(tb._CONFIG_FILE))
        if args.merge:
            entries = [dict(e) for e in table["families"].get(family, [])]
            for M, cfg in best.items():
                hit = [i for i, e in enumerate(entries) if e.get("m_max") == M]
                if hit:
                    entries[hit[0]] = {"m_max": M, **cfg}
                else:
                    entries.append({"m_max": M, **cfg})
            entries.sort(key=lambda e: e.get("m_max", 1 << 62))
        else:
            entries = []
            ordered = sorted(best)
            for i, M in enumerate(ordered):
                e = dict(best[M])
                if i + 1 < len(ordered):
                    e = {"m_max": M, **e}
                entries.append(e)
        table["families"][family] = entries
        with open(tb._CONFIG_FILE, "w") as f:
            json.dump(table, f, indent=1)
            f.write("\n")
        print(f"wrote {len(entries)} entries for {family} to {tb._CONFIG_FILE}")
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
