"""Tensor-parallel benchmark: one transformer block's MLP and attention projections sharded over N GPUs.

    torchrun --nproc-per-node 8 -m benchmarks.bench_tp --out results/tp/ [--model llama3-70b] [--M 1,16,256]
    torchrun --nproc-per-node 2 -m benchmarks.bench_tp --out /tmp/tp --dry-run     # CPU, gloo, tiny shapes

Per rank, with the shards made by w4a16_ops.parallel (unpack -> slice -> pack, the same split rules):
- layer time: each local projection alone (fused gate_up and qkv column-parallel, down and o
  row-parallel), W4A16 vs the same shard as an fp16 matmul;
- TP step: the block's whole tensor-parallel step, gate_up -> silu * up -> down -> all_reduce for the
  MLP, qkv -> o -> all_reduce for the attention (the attention core itself, identical for both, is
  left out: o reads the q columns), W4A16 vs fp16 TP with the same all_reduce.
The step's output is checked against the unsharded block (every rank computes it) before timing.
CUDA: CUDA events, warm-up, medians, weight copies rotated past the L2, calls replayed from a CUDA
graph (--eager to skip; a failed capture falls back to eager and says so). NCCL runs with NVLink
multicast off (NCCL_NVLS_ENABLE=0, set here unless already set). Rank 0 writes bench_tp.csv and
bench_tp.md (GPU name, date, world size, max and min over ranks).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import time
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

import w4a16_ops
from w4a16_ops.parallel import plan_split, shard_weights
from w4a16_ops.testing import TOLERANCE, rel_err

# name: (hidden, intermediate, q heads, kv heads, head dim)
MODELS = {
    "llama3-70b": (8192, 28672, 64, 8, 128),
    "qwen2-72b": (8192, 29568, 64, 8, 128),  # 231 groups of 128 in down_proj: needs --uneven at TP >= 2
    "llama3-8b": (4096, 14336, 32, 8, 128),
    "tiny": (256, 512, 4, 4, 64),  # the dry run
}
BLOCKS = ("mlp", "attn")
DTYPE = torch.float16


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for bench_tp.csv and bench_tp.md (rank 0 writes)")
    ap.add_argument("--model", default="llama3-70b", choices=sorted(MODELS))
    ap.add_argument("--M", default="1,16,256", help="comma-separated token counts")
    ap.add_argument("--group-size", type=int, default=128, help="32, 64, 128, 256 or -1 (channelwise)")
    ap.add_argument("--zeros", action="store_true", help="asymmetric weights (zero points)")
    ap.add_argument("--uneven", action="store_true", help="allow uneven splits in whole groups / 8 columns")
    ap.add_argument("--blocks", default="mlp,attn")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--eager", action="store_true", help="no CUDA graph replay")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU + gloo, the tiny model, M = 1,4, 3 reps: checks the harness, times nothing useful")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.model, args.M, args.reps, args.warmup = "tiny", "1,4", 3, 1
    try:
        args.Ms = [int(m) for m in args.M.split(",") if m.strip()]
    except ValueError:
        ap.error(f"--M must be comma-separated integers, got {args.M!r}")
    if not args.Ms or min(args.Ms) < 1:
        ap.error(f"--M needs positive token counts, got {args.M!r}")
    args.blocks = [b.strip() for b in args.blocks.split(",") if b.strip()]
    bad = [b for b in args.blocks if b not in BLOCKS]
    if bad:
        ap.error(f"--blocks must name {' and/or '.join(BLOCKS)}, got {bad}")
    if args.group_size != -1 and args.group_size not in w4a16_ops.format.SUPPORTED_GROUP_SIZES:
        ap.error(f"--group-size must be 32, 64, 128, 256 or -1, got {args.group_size}")
    return args


# -- shard planning (CPU) -----------------------------------------------------------------------


class Part(NamedTuple):
    name: str
    K: int
    N: int
    sizes: tuple  # every rank's share of the split dimension


class Layer(NamedTuple):
    name: str  # gate_up, down, qkv, o
    style: str  # colwise | rowwise
    parts: tuple  # column-parallel layers fuse parts along N (gate | up, q | k | v), each split on its own


def plan_block(model: str, block: str, world_size: int, group_size: int = 128, uneven: bool = False) -> list:
    """The block's layers and every rank's share, by w4a16_ops.parallel.plan_split (ValueError naming
    the layer, the world size and the rule when a split is impossible). A column layer's shards use
    the split of the row layer that reads them, so they line up."""
    hidden, inter, heads, kv, hd = MODELS[model]
    W = world_size

    def G(K):
        return K if group_size == -1 else group_size

    def split(name, style, K, N, sizes=None):
        return plan_split(style, K, N, G(K), W, name=f"{model}.{name}", uneven=uneven, sizes=sizes)

    if block == "mlp":
        down = split("down_proj", "rowwise", inter, hidden)
        gate = split("gate_proj", "colwise", hidden, inter, sizes=down)
        return [
            Layer("gate_up", "colwise", (Part("gate_proj", hidden, inter, gate), Part("up_proj", hidden, inter, gate))),
            Layer("down", "rowwise", (Part("down_proj", inter, hidden, down),)),
        ]
    if block != "attn":
        raise ValueError(f"plan_block: block must be one of {BLOCKS}, got {block!r}")
    for what, n in (("num_attention_heads", heads), ("num_key_value_heads", kv)):
        if n % W:
            raise ValueError(
                f"{model}.attn: {what} = {n} must be divisible by world_size = {W} (each rank holds whole heads)"
            )
    o = split("o_proj", "rowwise", heads * hd, hidden)
    q = split("q_proj", "colwise", hidden, heads * hd, sizes=o)
    k = split("k_proj", "colwise", hidden, kv * hd)
    return [
        Layer("qkv", "colwise", (Part("q_proj", hidden, heads * hd, q), Part("k_proj", hidden, kv * hd, k),
                                 Part("v_proj", hidden, kv * hd, k))),
        Layer("o", "rowwise", (Part("o_proj", heads * hd, hidden, o),)),
    ]


# -- building the shards ------------------------------------------------------------------------


class Built(NamedTuple):
    packed: w4a16_ops.PackedW4A16  # this rank's shard (fused parts)
    dense: torch.Tensor  # the same shard as fp16 [K_r, N_r] (the fp16 TP baseline)
    full: w4a16_ops.PackedW4A16  # the whole (fused) layer, for the check
    K: int  # local K
    K_full: int
    first_cols: int  # local / full width of the first part (gate of gate_up, q of qkv)
    first_cols_full: int


def build_layer(layer: Layer, rank: int, world: int, group_size: int, zeros: bool, device, seed: int) -> Built:
    """Fresh random logical values (the same on every rank: one seed), sharded by shard_weights."""
    gen = torch.Generator(device=device).manual_seed(seed)
    local, full = [], []
    for p in layer.parts:
        G = p.K if group_size == -1 else group_size
        q = torch.randint(0, 16, (p.N, p.K), generator=gen, device=device, dtype=torch.uint8)
        s = ((torch.rand(p.K // G, p.N, generator=gen, device=device) + 0.5) / p.K**0.5 / 4).to(DTYPE)
        z = torch.randint(0, 16, (p.K // G, p.N), generator=gen, device=device, dtype=torch.uint8) if zeros else None
        sh = shard_weights(q, s, z, layer.style, rank, world, name=p.name, sizes=p.sizes)
        local.append(w4a16_ops.unpack(*sh.packed, sh.in_features))
        full.append((q, s, z))
        K_local = sh.in_features

    def fuse(parts):  # concatenate logical parts along N and pack
        qs, ss, zs = zip(*parts)
        return w4a16_ops.pack(torch.cat(qs, 0), torch.cat(ss, 1), None if zs[0] is None else torch.cat(zs, 1))

    packed, full_packed = fuse(local), fuse(full)
    dense = w4a16_ops.dequantize(*packed, K_local).to(DTYPE)
    return Built(packed, dense, full_packed, K_local, layer.parts[0].K, local[0][0].shape[0], layer.parts[0].N)


# -- the block step -----------------------------------------------------------------------------


def _matmul(x, built: Built, kind: str):
    return w4a16_ops.gemm(x, *built.packed) if kind == "w4a16" else x @ built.dense


def step(block: str, x, layers: List[Built], kind: str, world: int):
    """One tensor-parallel step of the block on this rank; returns the replicated output."""
    col, row = layers
    h = _matmul(x, col, kind)
    if block == "mlp":
        n = col.first_cols
        h = F.silu(h[:, :n]) * h[:, n:]
    else:
        h = h[:, : col.first_cols]  # stand-in for the attention output: same width as this rank's heads
    y = _matmul(h, row, kind)
    if world > 1:
        dist.all_reduce(y)
    return y


def reference(block: str, x, layers: List[Built]):
    """The unsharded block on one device (the whole layers, no collective)."""
    col, row = layers
    h = w4a16_ops.gemm(x, *col.full)
    n = col.first_cols_full
    h = F.silu(h[:, :n]) * h[:, n:] if block == "mlp" else h[:, :n]
    return w4a16_ops.gemm(h.contiguous(), *row.full)


# -- timing -------------------------------------------------------------------------------------


def _time_calls(calls, device, reps: int, warmup: int, graph: bool, sync_ranks: bool):
    """Median microseconds per call (calls[i] uses weight copy i), and 'graph' / 'eager'."""
    if device.type != "cuda":
        for _ in range(warmup):
            for c in calls:
                c()
        times = []
        for _ in range(reps):
            if sync_ranks:
                dist.barrier()
            t0 = time.perf_counter()
            for c in calls:
                c()
            times.append((time.perf_counter() - t0) * 1e6 / len(calls))
        return statistics.median(times), "eager"
    from .timing import _time_once, prepare

    mode = "graph" if graph else "eager"
    try:
        run = prepare(calls, warmup, graph)
    except RuntimeError:  # e.g. a collective the capture refuses: time eagerly, and say so
        torch.cuda.synchronize()
        run, mode = prepare(calls, warmup, False), "eager (graph capture failed)"
    times = []
    for _ in range(reps):
        if sync_ranks:
            dist.barrier()
        times.append(_time_once(run) / len(calls))
    return statistics.median(times), mode


def _copies(layers: List[Built], device) -> list:
    """The local weights and clones of them, enough to rotate past the L2 (one set on the CPU)."""
    if device.type != "cuda":
        return [layers]
    from .timing import copies_needed

    # Sized by the packed weights (the smaller): enough copies for them are more than enough for fp16.
    n = copies_needed(sum(t.numel() * t.element_size() for b in layers for t in b.packed if t is not None))
    clone = lambda b: b._replace(  # noqa: E731
        packed=type(b.packed)(*(t if t is None else t.clone() for t in b.packed)), dense=b.dense.clone())
    return [layers] + [[clone(b) for b in layers] for _ in range(n - 1)]


def run_block(args, block: str, rank: int, world: int, device) -> list:
    """Every M's times on this rank: [(M, what, kind, us, mode)]."""
    plan = plan_block(args.model, block, world, args.group_size, args.uneven)
    seed = 1234 + BLOCKS.index(block)
    layers = [build_layer(lay, rank, world, args.group_size, args.zeros, device, seed + i) for i, lay in enumerate(plan)]
    # Drop the full layers after the check: at 70B they are most of the memory.
    hidden = plan[0].parts[0].K
    gen = torch.Generator(device=device).manual_seed(99)
    x = torch.randn(max(args.Ms), hidden, generator=gen, device=device).to(DTYPE)
    for kind in ("w4a16", "fp16"):
        got, want = step(block, x, layers, kind, world), reference(block, x, layers)
        err = rel_err(got, want)
        if err > TOLERANCE[DTYPE]:
            raise AssertionError(f"rank {rank}: {block} TP step ({kind}) differs from the unsharded block: "
                                 f"relative error {err:.3e} > {TOLERANCE[DTYPE]:.3e}")
    layers = [b._replace(full=None) for b in layers]
    copies = _copies(layers, device)
    results = []
    for M in args.Ms:
        xm = x[:M].contiguous()
        hs = [torch.randn(M, b.K, generator=gen, device=device).to(DTYPE) for b in layers]
        for kind in ("w4a16", "fp16"):
            for i, (lay, _) in enumerate(zip(plan, layers)):
                calls = [lambda c=c, i=i: _matmul(hs[i], c[i], kind) for c in copies]
                us, mode = _time_calls(calls, device, args.reps, args.warmup, not args.eager, sync_ranks=False)
                results.append((M, f"layer:{lay.name}", kind, us, mode))
            calls = [lambda c=c: step(block, xm, c, kind, world) for c in copies]
            us, mode = _time_calls(calls, device, args.reps, args.warmup, not args.eager, sync_ranks=True)
            results.append((M, "step", kind, us, mode))
    return results


# -- report -------------------------------------------------------------------------------------

FIELDS = ["gpu", "date", "world_size", "model", "block", "G", "zeros", "M", "what", "w4a16_us_max", "w4a16_us_min",
          "fp16_us_max", "fp16_us_min", "speedup", "mode"]


def make_rows(meta: dict, per_rank: List[Dict[str, list]]) -> list:
    """per_rank[r][block] = [(M, what, kind, us, mode)] -> one row per (block, M, what) with the max and min
    over ranks (a TP step waits for the slowest rank) and speedup = fp16 max / w4a16 max."""
    rows = []
    for block in per_rank[0]:
        keys = []
        for M, what, _, _, _ in per_rank[0][block]:
            if (M, what) not in keys:
                keys.append((M, what))
        for M, what in keys:
            t = {kind: [us for r in per_rank for (m, w, k, us, _) in r[block] if (m, w, k) == (M, what, kind)]
                 for kind in ("w4a16", "fp16")}
            modes = sorted({md for r in per_rank for (m, w, _, _, md) in r[block] if (m, w) == (M, what)})
            rows.append({
                "gpu": meta["gpu"], "date": meta["date"], "world_size": meta["world_size"], "model": meta["model"],
                "block": block, "G": meta["G"], "zeros": meta["zeros"], "M": M, "what": what,
                "w4a16_us_max": round(max(t["w4a16"]), 2), "w4a16_us_min": round(min(t["w4a16"]), 2),
                "fp16_us_max": round(max(t["fp16"]), 2), "fp16_us_min": round(min(t["fp16"]), 2),
                "speedup": round(max(t["fp16"]) / max(t["w4a16"]), 3), "mode": "/".join(modes),
            })
    return rows


def write_report(rows: list, meta: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench_tp.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    lines = [
        f"# Tensor-parallel benchmark: {meta['model']} over {meta['world_size']} x {meta['gpu']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, backend {meta['backend']}, NCCL_NVLS_ENABLE={meta['nvls']}, "
        f"G = {meta['G']}, {'zero points' if meta['zeros'] else 'symmetric'}, fp16. Per-rank microseconds "
        "(max / min over ranks); speedup = fp16 TP / W4A16 TP at the slowest rank. step = the block's whole "
        "TP step with its all_reduce (MLP: gate_up, silu * up, down; attention: qkv, o, no attention core).",
        "",
        "| block | M | what | W4A16 us (max / min) | fp16 us (max / min) | speedup | mode |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['block']} | {r['M']} | {r['what']} | {r['w4a16_us_max']:.1f} / {r['w4a16_us_min']:.1f} | "
                     f"{r['fp16_us_max']:.1f} / {r['fp16_us_min']:.1f} | {r['speedup']:.2f}x | {r['mode']} |")
    with open(os.path.join(out, "bench_tp.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


# -- main ---------------------------------------------------------------------------------------


def run(args) -> Optional[list]:
    """The benchmark in an initialized process group; rank 0 writes the report and returns its rows."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
        gpu = torch.cuda.get_device_name(device)
    else:
        device, gpu = torch.device("cpu"), "CPU (dry run)" if args.dry_run else "CPU"
    with torch.no_grad():
        per_block = {b: run_block(args, b, rank, world, device) for b in args.blocks}
    gathered = [None] * world
    dist.all_gather_object(gathered, per_block)
    if rank != 0:
        return None
    meta = {"gpu": gpu, "date": datetime.date.today().isoformat(), "world_size": world, "model": args.model,
            "G": args.group_size, "zeros": args.zeros, "torch": torch.__version__, "backend": dist.get_backend(),
            "nvls": os.environ.get("NCCL_NVLS_ENABLE", "unset")}
    rows = make_rows(meta, gathered)
    write_report(rows, meta, args.out)
    for r in rows:
        print(f"{r['block']:5s} M={r['M']:<4d} {r['what']:14s} w4a16 {r['w4a16_us_max']:9.1f} us  "
              f"fp16 {r['fp16_us_max']:9.1f} us  {r['speedup']:.2f}x  ({r['mode']})", flush=True)
    print(f"wrote {os.path.join(args.out, 'bench_tp.csv')} and bench_tp.md")
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast (NVLS) off, before NCCL starts
    own_group = not dist.is_initialized()
    if own_group:  # torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)
        use_nccl = torch.cuda.is_available() and not args.dry_run
        if use_nccl:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_nccl else "gloo", timeout=datetime.timedelta(seconds=300))
    try:
        run(args)
    finally:
        if own_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
