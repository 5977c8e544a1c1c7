"""GPU memory behaviour of w4a16.gemm (issue 7), for every available backend (forced) and the automatic choice:

- 10,000 calls (over several shapes: decode, medium M, the large-M strategy, channelwise K % 16 != 0) leave
  torch.cuda.memory_allocated() exactly where it was;
- one call retains nothing but its output, and what it allocates on the way (a split-K workspace, a
  dequantized weight, a contiguous copy of x) is measured with torch.cuda.memory_stats() and REPORTED: printed
  (pytest -s) and appended to $W4A16_REPORT_DIR/robustness.txt when that is set. notes/robustness.md records
  the numbers of the H100 run. The reference backend (dequantize + matmul) allocates by design.
"""

from __future__ import annotations

import os

import pytest
import torch

from w4a16_ops import dispatch

from helpers import make_case
from test_fuzz import forced, problem_of, serving_backends

PATHS = [n for n, why in dispatch.unavailable_backends().items() if why is None] + ["auto"]
DEV = "cuda"

# (M, K, N, G, zeros, dtype)
SHAPES = [
    (1, 4096, 4096, 128, True, torch.float16),
    (16, 2112, 2120, 64, False, torch.bfloat16),
    (300, 1024, 1024, 128, True, torch.float16),
    (2048, 1024, 1024, 128, False, torch.bfloat16),
    (1, 200, 264, 200, True, torch.float16),
]
SHAPE_ID = lambda s: "M{}-K{}-N{}-G{}-{}-{}".format(*s[:4], "z" if s[4] else "sym", str(s[5])[6:])  # noqa: E731


def _report(line: str):
    print("\n" + line)
    out_dir = os.environ.get("W4A16_REPORT_DIR")
    if out_dir:
        with open(os.path.join(out_dir, "robustness.txt"), "a") as f:
            f.write(line + "\n")


def _cases(path):
    cases = [make_case(M, K, N, G, zeros=z, dtype=dt, device=DEV, seed=i) for i, (M, K, N, G, z, dt) in enumerate(SHAPES)]
    return [c for c in cases if path == "auto" or path in serving_backends(problem_of(c.x, c.scales, c.zeros))]


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
def test_ten_thousand_calls_leave_memory_allocated_unchanged(path):
    cases = _cases(path)
    if not cases:
        pytest.skip(f"{path} serves none of the shapes")
    with forced(path):
        torch.cuda.synchronize()
        before_warmup = torch.cuda.memory_allocated()
        for c in cases:
            for _ in range(3):
                torch.ops.w4a16.gemm(*c.args)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = None
        for i in range(10_000):
            out = torch.ops.w4a16.gemm(*cases[i % len(cases)].args)
        del out
        torch.cuda.synchronize()
        after = torch.cuda.memory_allocated()
        peak = torch.cuda.max_memory_allocated()
    _report(f"memory {path}: 10000 calls over {len(cases)} shapes: memory_allocated {base} -> {after} "
            f"(kept after the first calls: {base - before_warmup} bytes; peak above base {peak - base} bytes)")
    assert after == base, f"{path}: 10,000 calls changed memory_allocated() by {after - base} bytes"


def _stats():
    s = torch.cuda.memory_stats()
    return s["allocation.all.allocated"], s["allocated_bytes.all.allocated"]


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_ID)
def test_one_call_keeps_only_its_output(shape, path):
    M, K, N, G, z, dt = shape
    case = make_case(M, K, N, G, zeros=z, dtype=dt, device=DEV, seed=5)
    p = problem_of(case.x, case.scales, case.zeros)
    if path != "auto" and path not in serving_backends(p):
        pytest.skip(f"{path} does not serve {p.describe()}")
    with forced(path):
        backend = dispatch.select(p).backend
        for _ in range(3):
            torch.ops.w4a16.gemm(*case.args)  # compilation, cached per-stream buffers
        torch.cuda.synchronize()
        measured = []
        for _ in range(3):
            mem0 = torch.cuda.memory_allocated()
            n0, b0 = _stats()
            out = torch.ops.w4a16.gemm(*case.args)
            torch.cuda.synchronize()
            n1, b1 = _stats()
            del out
            torch.cuda.synchronize()
            measured.append((n1 - n0, b1 - b0, torch.cuda.memory_allocated() - mem0))
    rounded = -(-(M * N * 2) // 512) * 512  # the output, rounded to the caching allocator's 512-byte blocks
    n_alloc, n_bytes, retained = measured[0]
    label = path if path == backend else f"{path} -> {backend}"
    _report(f"allocations {label} {p.describe()}: {n_alloc} allocations, {n_bytes} bytes per call; beyond the "
            f"output ({rounded} bytes): {n_alloc - 1} allocations, about {n_bytes - rounded} bytes; "
            f"kept after the output is freed: {retained} bytes")
    assert retained == 0, f"{label}: after a call and freeing its output, {retained} more bytes stay allocated"
    assert len({m[0] for m in measured}) == 1, f"{label}: allocation counts differ between identical calls: {measured}"
    assert n_alloc >= 1, f"{label}: no allocation at all (where does the output live?)"
