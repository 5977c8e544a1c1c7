"""Tensor parallelism (w4a16_ops.parallel): split rules and shards in one process, then real gloo
process groups of 2 and 4 spawned ranks (tests/parallel_workers.py, several cases per spawn) running
column- and row-parallel MLP and attention blocks, act-order layers, a transformers Llama (both
engines), a checkpoint loaded by w4a16_ops.from_pretrained and torch.compile against the
single-process forward; plus the CPU-runnable parts of benchmarks/bench_tp.py and its gloo dry run."""

from __future__ import annotations

import csv
import datetime
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import w4a16_ops
from w4a16_ops import parallel as tp
from w4a16_ops.backends.reference import gemm_float64

from helpers import TOLERANCE, rel_err
from parallel_workers import random_layer, run_rank

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

SPAWN_LIMIT_S = 120  # one spawn's wall-clock bound; a hung collective fails the test instead of CI


def spawn(world_size: int, cases: list, tmp_path) -> float:
    """Run cases in world_size spawned ranks (FileStore rendezvous: no ports); their errors re-raise here."""
    seed = int(torch.randint(0, 2**30, ()))
    store = tmp_path / f"store{world_size}"
    t0 = time.monotonic()
    ctx = mp.start_processes(run_rank, (world_size, str(store), cases, seed), nprocs=world_size, join=False,
                             start_method="spawn")
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() - t0 > SPAWN_LIMIT_S:
                raise AssertionError(f"{world_size} ranks did not finish {cases} within {SPAWN_LIMIT_S} s")
    finally:
        for p in ctx.processes:  # only our own children, by handle
            if p.is_alive():
                p.terminate()
                p.join(5)
    return time.monotonic() - t0


# -- one process: rules and shards --------------------------------------------------------------


def test_plan_split_rules_and_messages():
    assert tp.plan_split("colwise", 4096, 28672, 128, 8) == (3584,) * 8
    assert tp.plan_split("rowwise", 28672, 8192, 128, 8) == (3584,) * 8  # 28 groups per rank
    assert tp.plan_split("rowwise", 8192, 64, 8192, 3, uneven=True) == (2731, 2731, 2730)  # channelwise: rows
    # Qwen2-72B's down_proj: 231 groups of 128 cannot split evenly at TP = 4
    with pytest.raises(ValueError) as e:
        tp.plan_split("rowwise", 29568, 8192, 128, 4, name="model.layers.0.mlp.down_proj")
    for part in ("model.layers.0.mlp.down_proj", "world_size = 4", "whole number of quantization groups",
                 "K = 29568", "7392", "uneven=True"):
        assert part in str(e.value), str(e.value)
    assert tp.plan_split("rowwise", 29568, 8192, 128, 4, uneven=True) == (7424, 7424, 7424, 7296)
    with pytest.raises(ValueError, match=r"q_proj: column-parallel .* world_size = 4 .* multiple of 8"):
        tp.plan_split("colwise", 512, 8 * 6, 128, 4, name="q_proj")
    with pytest.raises(ValueError, match=r"sizes must be 2 numbers summing to 512"):
        tp.plan_split("rowwise", 512, 64, 128, 2, sizes=[128, 128])
    with pytest.raises(ValueError, match=r"whole number of quantization groups.*sizes \[192, 320\]"):
        tp.plan_split("rowwise", 512, 64, 64 * 2, 2, sizes=[192, 320])
    with pytest.raises(ValueError, match=r"not 8 or more whole units of 128"):
        tp.plan_split("rowwise", 512, 64, 128, 8, uneven=True)
    with pytest.raises(ValueError, match=r"style must be one of"):
        tp.plan_split("embedding_rowwise", 512, 64, 128, 2)


@pytest.mark.parametrize("G", [64, 128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_shards_are_slices_of_the_logical_weight(G, symmetric):
    """Every rank's packed shard unpacks to exactly its slice of q / scales / zeros, and the shards'
    partial products sum to the full layer within the op tolerance (simulated ranks, no group)."""
    K, N, W = 512, 384, 4
    layer = random_layer(K, N, G, symmetric, bias=True)
    q, s, z = w4a16_ops.unpack(layer.qweight, layer.scales, layer.zeros, K)
    x = torch.randn(5, K, dtype=torch.float16)
    ref = gemm_float64(x, layer.qweight, layer.scales, layer.zeros) + layer.bias.double()
    cols, partial = [], torch.zeros(5, N, dtype=torch.float64)
    for r in range(W):
        c = tp.shard_linear(layer, "colwise", r, W)
        qc, sc, zc = w4a16_ops.unpack(*c.packed, K)
        n0, n1 = c.offset, c.offset + c.out_features
        assert torch.equal(qc, q[n0:n1]) and torch.equal(sc, s[:, n0:n1])
        assert (zc is None) == symmetric and (symmetric or torch.equal(zc, z[:, n0:n1]))
        cols.append(w4a16_ops.gemm(x, *c.packed) + c.bias)

        rw = tp.shard_linear(layer, "rowwise", r, W)
        k0, k1 = rw.offset, rw.offset + rw.in_features
        qr, sr, zr = w4a16_ops.unpack(*rw.packed, rw.in_features)
        g0, g1 = (0, 1) if G == -1 else (k0 // G, k1 // G)  # channelwise: the whole scales row on every rank
        assert torch.equal(qr, q[:, k0:k1]) and torch.equal(sr, s[g0:g1])
        assert symmetric or torch.equal(zr, z[g0:g1])
        partial += w4a16_ops.gemm(x[:, k0:k1], *rw.packed).double()
    assert rel_err(torch.cat(cols, -1), ref) <= TOLERANCE[torch.float16]
    assert rel_err(partial + layer.bias.double(), ref) <= TOLERANCE[torch.float16]


def test_shard_model_without_a_group_needs_rank_and_world():
    model = torch.nn.Sequential(random_layer(256, 128, 64, True))
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="rank and world_size must be given"):
            tp.shard_model(model, {"0": "colwise"})
    with pytest.raises(ValueError, match="plan='auto' needs model.tp_plan"):
        tp.shard_model(model, "auto", rank=0, world_size=2)
    report = tp.shard_model(model, {"0": "colwise"}, rank=1, world_size=2)
    assert report.sharded_names == ["0"] and model[0].out_features == 64 and model[0].offset == 64
    assert "column-parallel rank=1/2" in repr(model[0])


def test_shard_model_needs_whole_heads_per_rank():
    from checkpoints import tiny_llama

    model = tiny_llama(dtype=torch.float16, hidden=256, intermediate=512, layers=1, vocab=64)  # 4 heads, 2 kv heads
    w4a16_ops.swap_linears(model, group_size=64, skip="lm_head")
    with pytest.raises(ValueError, match=r"num_key_value_heads = 2 must be divisible by world_size = 4"):
        tp.shard_model(model, "auto", rank=0, world_size=4)
    assert type(model.model.layers[0].self_attn.k_proj) is w4a16_ops.W4A16Linear, "a refused plan changes nothing"
    report = tp.shard_model(model, "auto", rank=1, world_size=2)
    assert model.model.layers[0].self_attn.k_proj.out_features == 64 and len(report.sharded) == 7, str(report)


# -- real process groups ------------------------------------------------------------------------


def test_two_ranks(tmp_path):
    # A compressed-tensors directory (written by that library), loaded by w4a16_ops.from_pretrained in each rank.
    from checkpoints import tiny_llama, write_compressed_tensors

    ckpt = tmp_path / "ct"
    base = tiny_llama(dtype=torch.float16, bias=True, hidden=256, intermediate=512, layers=1, vocab=128)
    write_compressed_tensors(base, str(ckpt), symmetric=False, group_size=64)
    cases = [("block", kind, G, sym) for kind in ("mlp", "attn") for G in (64, 128, -1) for sym in (True, False)]
    cases += [
        ("block", "mlp", 128, False, 1, True),  # uneven: 9 groups over 2 ranks, M = 1
        ("gather_and_split", 64, False),
        ("act_order", 128, True),
        ("group_cut_error",),
        ("transformers_llama", 128, False),
        ("transformers_llama", 64, True, "transformers"),
        ("from_pretrained", str(ckpt)),
        ("from_pretrained", str(ckpt), "transformers"),
        ("bench_dry_run", str(tmp_path / "bench")),
        ("compiled",),
    ]
    spawn(2, cases, tmp_path)
    with open(tmp_path / "bench" / "bench_tp.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 3, "2 blocks x 2 M x (2 layers + the step)"
    assert {r["what"] for r in rows} == {"layer:gate_up", "layer:down", "layer:qkv", "layer:o", "step"}
    assert all(r["world_size"] == "2" and r["zeros"] == "True" and float(r["speedup"]) > 0 for r in rows)
    md = (tmp_path / "bench" / "bench_tp.md").read_text()
    assert "2 x CPU (dry run)" in md and "NCCL_NVLS_ENABLE=0" in md


def test_four_ranks(tmp_path):
    cases = [("block", "mlp", 64, False), ("block", "attn", 128, True), ("block", "mlp", -1, True),
             ("block", "attn", -1, False), ("block", "mlp", 128, True, 16, True),  # 9 groups over 4: 3, 2, 2, 2
             ("act_order", 64, False), ("group_cut_error",), ("gather_and_split", -1, True),
             ("transformers_llama", 64, True),
             ("transformers_llama", 64, False, "transformers")]
    spawn(4, cases, tmp_path)


# -- benchmarks/bench_tp.py: what runs without GPUs ---------------------------------------------


def test_bench_tp_arguments():
    from benchmarks import bench_tp

    a = bench_tp.parse_args(["--out", "o"])
    assert (a.model, a.Ms, a.blocks, a.group_size, a.zeros) == ("llama3-70b", [1, 16, 256], ["mlp", "attn"], 128, False)
    d = bench_tp.parse_args(["--out", "o", "--dry-run", "--blocks", "mlp"])
    assert (d.model, d.Ms, d.reps, d.blocks) == ("tiny", [1, 4], 3, ["mlp"])
    for bad in (["--M", "1,x"], ["--M", "0"], ["--blocks", "moe"], ["--group-size", "48"]):
        with pytest.raises(SystemExit):
            bench_tp.parse_args(["--out", "o"] + bad)


def test_bench_tp_shard_plans():
    from benchmarks import bench_tp

    mlp = bench_tp.plan_block("llama3-70b", "mlp", 8)
    assert [(lay.name, lay.style) for lay in mlp] == [("gate_up", "colwise"), ("down", "rowwise")]
    assert all(p.sizes == (3584,) * 8 for lay in mlp for p in lay.parts)  # 28672 / 8, 28 groups of 128
    attn = bench_tp.plan_block("llama3-70b", "attn", 8)
    assert [p.sizes for p in attn[0].parts] == [(1024,) * 8, (128,) * 8, (128,) * 8] and attn[1].parts[0].sizes == (1024,) * 8
    with pytest.raises(ValueError, match=r"qwen2-72b.down_proj: row-parallel .* world_size = 4 .* quantization groups"):
        bench_tp.plan_block("qwen2-72b", "mlp", 4)
    uneven = bench_tp.plan_block("qwen2-72b", "mlp", 4, uneven=True)
    assert uneven[1].parts[0].sizes == (7424, 7424, 7424, 7296) == uneven[0].parts[0].sizes  # gate/up line up
    with pytest.raises(ValueError, match=r"num_key_value_heads = 8 must be divisible by world_size = 16"):
        bench_tp.plan_block("llama3-70b", "attn", 16)


def test_bench_tp_report(tmp_path):
    from benchmarks import bench_tp

    meta = {"gpu": "NVIDIA H200", "date": datetime.date.today().isoformat(), "world_size": 2, "model": "llama3-70b",
            "G": 128, "zeros": False, "torch": torch.__version__, "backend": "nccl", "nvls": "0"}
    per_rank = [{"mlp": [(1, "step", "w4a16", 50.0, "graph"), (1, "step", "fp16", 100.0, "graph")]},
                {"mlp": [(1, "step", "w4a16", 40.0, "graph"), (1, "step", "fp16", 120.0, "graph")]}]
    rows = bench_tp.make_rows(meta, per_rank)
    assert len(rows) == 1
    r = rows[0]
    assert (r["w4a16_us_max"], r["w4a16_us_min"], r["fp16_us_max"], r["speedup"]) == (50.0, 40.0, 120.0, 2.4)
    bench_tp.write_report(rows, meta, str(tmp_path))
    with open(tmp_path / "bench_tp.csv") as f:
        back = list(csv.DictReader(f))
    assert list(back[0]) == bench_tp.FIELDS and back[0]["speedup"] == "2.4"
    md = (tmp_path / "bench_tp.md").read_text()
    assert "llama3-70b over 2 x NVIDIA H200" in md and meta["date"] in md and "| mlp | 1 | step | 50.0 / 40.0 |" in md
