"""The Triton backend against the float64 reference.

CPU (TRITON_INTERPRET=1, set by conftest.py without a GPU): small shapes, fp16 only (the interpreter has
no bf16 tl.dot), every kernel path forced through triton.force_config. GPU (@pytest.mark.gpu): the full
grid through the shipped configuration table, fp16 and bf16, large shapes.
"""

from __future__ import annotations

import pytest
import torch

import w4a16_ops
from w4a16_ops import dispatch
from w4a16_ops.backends import triton as tb
from w4a16_ops.backends.reference import gemm_float64
from w4a16_ops.problem import Problem

from helpers import TOLERANCE, assert_close_to_reference, make_case, rel_err, run_backend

pytestmark = pytest.mark.skipif(tb.availability() is not None, reason=f"triton backend: {tb.availability()}")

ON_GPU = torch.cuda.is_available()

# Forced configurations, one per kernel path (small tiles so the interpreter stays fast).
PATHS = {
    "nibble": dict(kernel="nibble", BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, split_k=1),
    "nibble_splitk": dict(kernel="nibble", BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, split_k=2),
    "nibble_inkernel": dict(kernel="nibble", BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, split_k=3, reduce="inkernel"),
    "nibble_groups": dict(kernel="nibble", BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, split_k=1, keep_block_k=True),
    "nibble_g": dict(kernel="nibble", BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, split_k=2),
    "dense": dict(kernel="dense", BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, split_k=1, GROUP_M=2),
    "dense_multigroup": dict(kernel="dense", BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, split_k=1, GROUP_M=2),
    "dqmm": dict(kernel="dqmm", BLOCK_M=16, BLOCK_N=64, BLOCK_K=32),
    "dqmm_chunked": dict(kernel="dqmm", BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, chunk_mb=0.004),
    "dense_splitk": dict(kernel="dense", BLOCK_M=32, BLOCK_N=128, BLOCK_K=32, split_k=3, GROUP_M=1),
}


def _groups(K):
    return sorted({g for g in w4a16_ops.format.SUPPORTED_GROUP_SIZES if K % g == 0} | {K})


def _run_forced(case, path):
    with tb.force_config(PATHS[path]):
        return run_backend("triton", case)


# ------------------------------------------------------------------------------------------------
# Kernel paths, small shapes (CPU interpreter, also run on the GPU)
# ------------------------------------------------------------------------------------------------

SMALL = [(K, N, G) for K, N in ((64, 64), (128, 72), (96, 136)) for G in _groups(K)]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("zeros", [False, True], ids=["sym", "zeros"])
@pytest.mark.parametrize("K,N,G", SMALL)
def test_paths_small(K, N, G, zeros, path):
    for M in (1, 3, 17, 33):
        case = make_case(M, K, N, G, zeros=zeros, strided=M % 2 == 1, device="cuda" if ON_GPU else "cpu")
        out = _run_forced(case, path)
        assert_close_to_reference(out, case, f"{path} M={M} K={K} N={N} G={G} zeros={zeros}")


@pytest.mark.parametrize("path", list(PATHS))
def test_odd_k_channelwise(path):
    """K not a multiple of 16 (only channelwise allows it): the K tail of the tile, both x halves."""
    dev = "cuda" if ON_GPU else "cpu"
    for K in (1, 3, 24, 40):
        for M in (1, 5):
            case = make_case(M, K, 72, K, zeros=M == 5, device=dev)
            out = _run_forced(case, path)
            assert_close_to_reference(out, case, f"{path} M={M} K={K} channelwise")


def test_leading_dims_and_public_op(monkeypatch):
    """Through the op, forced to this backend (x with two leading dims)."""
    monkeypatch.setenv("W4A16_BACKEND", "triton")
    dev = "cuda" if ON_GPU else "cpu"
    case = make_case(None, 64, 72, 32, zeros=True, lead=(2, 3), device=dev)
    with tb.force_config(PATHS["nibble_splitk"]):
        out = w4a16_ops.gemm(*case.args)
    assert out.shape == (2, 3, 72)
    assert_close_to_reference(out, case, "public op, lead (2, 3)")


def test_split_k_is_deterministic():
    dev = "cuda" if ON_GPU else "cpu"
    case = make_case(5, 128, 64, 32, zeros=True, device=dev)
    a = _run_forced(case, "nibble_splitk")
    b = _run_forced(case, "nibble_splitk")
    assert torch.equal(a, b)
    # The single-kernel reduction sums in the same order: bit-identical to the two-kernel one, every time.
    cfg = dict(PATHS["nibble_splitk"], reduce="inkernel")
    for _ in range(3):
        with tb.force_config(cfg):
            c = run_backend("triton", case)
        assert torch.equal(a, c)


# ------------------------------------------------------------------------------------------------
# Rules and configuration table (pure, no kernels)
# ------------------------------------------------------------------------------------------------


def _p(**kw):
    base = dict(device_type="cuda", capability=(9, 0), dtype=torch.float16, M=1, K=4096, N=4096, G=128,
                has_zeros=False)
    base.update(kw)
    return Problem(**base)


def test_unsupported_reasons():
    assert tb.unsupported_reason(_p()) is None
    assert tb.unsupported_reason(_p(N=2120, K=2112, G=64)) is None
    assert "multiple of 8" in tb.unsupported_reason(_p(N=2116))
    assert "float32" in tb.unsupported_reason(_p(dtype=torch.float32))
    assert "7.5" in tb.unsupported_reason(_p(capability=(7, 5)))
    assert "not supported" in tb.unsupported_reason(_p(device_type="mps", capability=None))


def test_cpu_rule_follows_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tb.unsupported_reason(_p(device_type="cpu", capability=None)) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in tb.unsupported_reason(_p(device_type="cpu", capability=None))


@pytest.mark.parametrize("cap", [(9, 0), (8, 0), (8, 9), (12, 0), None])
def test_table_covers_every_m(cap):
    for K, N, G in ((4096, 4096, 128), (2112, 4096, 32), (14784, 4096, 128), (4096, 7400, 4096), (64, 72, 64)):
        for M in (1, 7, 16, 17, 64, 65, 256, 1000, 4096, 100000):
            cfg = tb.select_config(_p(capability=cap, device_type="cuda" if cap else "cpu", M=M, K=K, N=N, G=G))
            assert cfg["kernel"] in ("nibble", "dense", "dqmm")
            assert cfg["BLOCK_N"] % 64 == 0
            if cfg["kernel"] == "nibble":
                assert cfg["BLOCK_K"] % 32 == 0
            else:
                assert cfg["BLOCK_K"] % 16 == 0 and cfg["BLOCK_N"] % 64 == 0


def test_dispatch_can_choose_triton():
    d = dispatch.decide(_p(K=2112, N=2120, G=64), {"cuda": "not built", "triton": None, "reference": None})
    assert d.backend == "triton"


# ------------------------------------------------------------------------------------------------
# GPU: the full grid through the shipped table
# ------------------------------------------------------------------------------------------------

GPU_M = (1, 7, 16, 17, 64, 65, 256, 1000, 4096)
GPU_SHAPES = [(2112, 4096), (4096, 2120), (7392, 4096), (4096, 7400), (14784, 4096), (4096, 4096)]


def _check_gpu(out, case, what):
    """Like assert_close_to_reference, with the float64 reference computed on the GPU (big shapes)."""
    ref = gemm_float64(*case.args)
    assert out.dtype == case.x.dtype and out.shape == ref.shape, what
    assert torch.isfinite(out).all(), f"{what}: non-finite output (unwritten or garbage)"
    err = rel_err(out, ref)
    assert err <= TOLERANCE[case.x.dtype], f"{what}: relative error {err:.3e} > {TOLERANCE[case.x.dtype]:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("K,N", GPU_SHAPES)
def test_gpu_grid_g128(K, N, dtype):
    for M in GPU_M:
        zeros = M % 2 == 1
        G = next(g for g in (128, 64, 32) if K % g == 0)  # 7392 = 32 * 231, 14784 = 64 * 231
        case = make_case(M, K, N, G, zeros=zeros, dtype=dtype, device="cuda", strided=M == 17)
        _check_gpu(run_backend("triton", case), case, f"M={M} K={K} N={N} {dtype} zeros={zeros}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("G", [32, 64, 2112], ids=["g32", "g64", "gK"])
@pytest.mark.parametrize("zeros", [False, True], ids=["sym", "zeros"])
def test_gpu_groups_2112(G, zeros, dtype):
    for M in GPU_M:
        case = make_case(M, 2112, 4096, G, zeros=zeros, dtype=dtype, device="cuda")
        _check_gpu(run_backend("triton", case), case, f"M={M} G={G} {dtype} zeros={zeros}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_public_op(monkeypatch, dtype):
    monkeypatch.setenv("W4A16_BACKEND", "triton")
    for M in (1, 16, 65, 1000):
        case = make_case(M, 4096, 2120, 128, zeros=True, dtype=dtype, device="cuda")
        out = w4a16_ops.gemm(*case.args)
        _check_gpu(out, case, f"public op M={M} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("path", list(PATHS))
def test_gpu_paths_bf16(path):
    for K, N, G in ((128, 72, 64), (96, 136, 32), (256, 200, 256)):
        for M in (1, 17, 33):
            case = make_case(M, K, N, G, zeros=True, dtype=torch.bfloat16, device="cuda", strided=M == 17)
            out = _run_forced(case, path)
            assert_close_to_reference(out, case, f"{path} bf16 M={M} K={K} N={N} G={G}")


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """The shipped configs launch fixed kernels: capture and replay in a CUDA graph."""
    case = make_case(16, 4096, 2120, 128, zeros=True, device="cuda")
    x, qw, s, z = case.args
    out = torch.empty(16, 2120, dtype=x.dtype, device="cuda")
    p = dispatch.problem_for(x.device, x.dtype, 16, 4096, 2120, 128, True)
    tb.gemm(x, qw, s, z, p, out)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        tb.gemm(x, qw, s, z, p, out)
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    _check_gpu(out, case, "graph replay")


def test_bf16_is_refused_under_the_interpreter(monkeypatch):
    # The interpreter's tl.dot has no bf16 and returns garbage: refused with the reason, never run.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = Problem("cpu", None, torch.bfloat16, 4, 64, 64, 32, False)
    assert "TRITON_INTERPRET" in tb.unsupported_reason(p)
    assert tb.unsupported_reason(p._replace(dtype=torch.float16)) is None
