"""Determinism of w4a16.gemm (issue 7), for every available backend (forced) and the automatic choice:

- the same inputs give bit-identical outputs over 100 calls (GPU; a few calls on CPU), with other calls of
  other shapes in between (so state a backend keeps between calls, e.g. split-K lock counters or a cached
  workspace, is exercised);
- (GPU) a call captured in a CUDA graph and replayed gives bit-for-bit the eager result, also after new data
  is copied into the captured input, and after replaying many times.

Shapes cover decode (M = 1, where split-K / striped partitions reduce across blocks), N % 64 != 0, K % 128
!= 0, channelwise with K % 16 != 0, a medium and a large M (the large-M strategies).
"""

from __future__ import annotations

import pytest
import torch

from w4a16_ops import dispatch

from helpers import make_case
from test_fuzz import problem_of, serving_backends

PATHS = [n for n, why in dispatch.unavailable_backends().items() if why is None] + ["auto"]
DTYPES = [torch.float16, torch.bfloat16]
DT = {torch.float16: "fp16", torch.bfloat16: "bf16"}

# (M, K, N, G, zeros)
GPU_SHAPES = [
    (1, 4096, 4096, 128, False),
    (1, 14336, 4096, 128, True),
    (16, 4096, 2120, 64, True),
    (33, 2112, 4096, 64, False),
    (300, 4096, 4096, 128, True),
    (2048, 1024, 1024, 128, False),
    (1, 200, 264, 200, True),
]
CPU_SHAPES = [(1, 512, 264, 128, True), (33, 200, 136, 200, False)]
SHAPE_ID = lambda s: "M{}-K{}-N{}-G{}-{}".format(*s[:4], "z" if s[4] else "sym")  # noqa: E731


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def _serve_or_skip(path, case, interp_ok=False):
    p = problem_of(case.x, case.scales, case.zeros)
    if path != "auto" and path not in serving_backends(p, interp_ok=interp_ok):
        pytest.skip(f"{path} does not serve {p.describe()} here")


def _repeat_identical(path, case, other, runs, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, path)
    first = torch.ops.w4a16.gemm(*case.args)
    differing = []
    for i in range(1, runs):
        torch.ops.w4a16.gemm(*other.args)  # something else in between
        out = torch.ops.w4a16.gemm(*case.args)
        if not torch.equal(_bits(out), _bits(first)):
            n = int((_bits(out) != _bits(first)).sum())
            differing.append(f"run {i}: {n} elements differ")
    assert torch.isfinite(first).all()
    assert not differing, f"{path}: {len(differing)} of {runs - 1} repeated calls differ from the first: {differing[:5]}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=SHAPE_ID)
def test_repeated_calls_identical_cpu(shape, dtype, path, monkeypatch):
    M, K, N, G, zeros = shape
    interp = dtype == torch.float16
    case = make_case(M, K, N, G, zeros=zeros, dtype=dtype, seed=1)
    other = make_case(3, 128, 64, 32, zeros=not zeros, dtype=dtype, seed=2)
    _serve_or_skip(path, case, interp_ok=interp)
    if path == "triton" and not interp:
        pytest.skip("bf16 does not run in Triton's interpreter")
    _repeat_identical(path, case, other, 4, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=SHAPE_ID)
def test_repeated_calls_identical_gpu(shape, dtype, path, monkeypatch):
    M, K, N, G, zeros = shape
    case = make_case(M, K, N, G, zeros=zeros, dtype=dtype, device="cuda", seed=1)
    other = make_case(M + 5, K, N, G, zeros=zeros, dtype=dtype, device="cuda", seed=2)  # same weights shape
    _serve_or_skip(path, case)
    _repeat_identical(path, case, other, 100, monkeypatch)


GRAPH_SHAPES = [GPU_SHAPES[0], GPU_SHAPES[1], GPU_SHAPES[2], GPU_SHAPES[4], GPU_SHAPES[6]]


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT.get)
@pytest.mark.parametrize("shape", GRAPH_SHAPES, ids=SHAPE_ID)
def test_cuda_graph_replay_equals_eager(shape, dtype, path, monkeypatch):
    M, K, N, G, zeros = shape
    case = make_case(M, K, N, G, zeros=zeros, dtype=dtype, device="cuda", seed=1)
    _serve_or_skip(path, case)
    monkeypatch.setenv(dispatch.ENV_VAR, path)
    x_static = case.x.clone()
    args = (case.qweight, case.scales, case.zeros)

    # Warm up on a side stream (compilation, caches), as torch.cuda.graphs recommends.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            torch.ops.w4a16.gemm(x_static, *args)
    torch.cuda.current_stream().wait_stream(side)
    eager = torch.ops.w4a16.gemm(x_static, *args)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = torch.ops.w4a16.gemm(x_static, *args)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(_bits(y), _bits(eager)), f"{path}: graph replay differs from eager"

    x2 = torch.randn_like(x_static, dtype=torch.float32).to(dtype)
    x_static.copy_(x2)
    eager2 = torch.ops.w4a16.gemm(x2, *args)
    for i in range(20):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(_bits(y), _bits(eager2)), f"{path}: replay {i} on new data differs from eager"
    assert not torch.equal(_bits(eager), _bits(eager2))  # the replay really recomputed
    del graph
