"""The Hopper wgmma kernel (csrc/kernels/sm90_gemm.cuh) against the float64 reference (GPU), and when the CUDA
backend uses it (CPU).

GPU cases call the private op directly (so M below the backend's threshold and every partition override are covered)
and through the CUDA backend (so the strategy switch is covered), always on fresh random data with a NaN-poisoned
output: M = 32..8192 with odd M and M just past the 64 / 128-row blocks, every group size with and without zero
points, both dtypes, N % 64 != 0 and N past a 256-column block, K tails (K % 64 != 0, K % 16 != 0, K % 8 != 0), strided
x, split-K slices, determinism and CUDA-graph replay.
"""

import pytest
import torch

from w4a16_ops.backends import cuda as cuda_backend
from w4a16_ops.problem import Problem

from helpers import assert_close_to_reference, groups_for, make_case, poisoned_out, run_backend

DTYPES = [torch.float16, torch.bfloat16]
DT_ID = {torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture
def sm90_ready():
    why = cuda_backend.availability()
    assert why is None, f"the CUDA backend is unavailable: {why}"
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the wgmma kernel needs a compute capability 9.x GPU")
    # On an sm_90 machine the build must hold the kernel: a plain 9.0 build is a failure here, not a skip.
    assert cuda_backend.sm90_built(), "the extension was built without 9.0a in TORCH_CUDA_ARCH_LIST"


def _sm90(case, splits=0, bm=0):
    x2d = case.x.reshape(-1, case.x.shape[-1])
    out = poisoned_out(x2d.shape[0], case.scales.shape[1], x2d.dtype, x2d.device)
    torch.ops.w4a16._cuda_gemm_sm90(cuda_backend._x_ready(x2d), case.qweight, case.scales, case.zeros, out, splits, bm)
    return out.view(*case.x.shape[:-1], -1)


def _check(M, K, N, G, zeros, dtype, splits=0, bm=0, **kw):
    case = make_case(M, K, N, G, zeros=zeros, dtype=dtype, device="cuda", **kw)
    out = _sm90(case, splits, bm)
    what = f"sm90 M={M} K={K} N={N} G={G} zeros={zeros} {DT_ID[dtype]} splits={splits} bm={bm}"
    return assert_close_to_reference(out, case, what)


# ---------------------------------------------------------------- GPU: correctness grid

M_SWEEP = [32, 33, 64, 65, 127, 128, 129, 255, 256, 1000]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("K,N", [(1024, 320), (4096, 4096)])
@pytest.mark.parametrize("M", M_SWEEP)
def test_m_sweep(sm90_ready, M, K, N, dtype):
    _check(M, K, N, 128, M_SWEEP.index(M) % 2 == 1, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("zeros", [False, True], ids=["sym", "zeros"])
@pytest.mark.parametrize("G", groups_for(1024))
@pytest.mark.parametrize("M", [33, 200])
def test_every_group_size(sm90_ready, M, G, zeros, dtype):
    _check(M, 1024, 576, G, zeros, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize(
    "K,N,G",
    [
        (2112, 4096, 64),  # K % 128 != 0: the last stage is half empty
        (704, 2048, 64),
        (4096, 2120, 128),  # N % 64 != 0: a tile of the format padded, the last block mostly empty
        (576, 192, 64),  # SmolLM2's k/v projection: one block, N < 256
        (7392, 4096, 32),  # G = 32: two scale rows per stage
        (14784, 4096, 64),
        (1040, 328, 1040),  # channelwise, K % 64 != 0, N % 64 != 0
        (200, 64, 200),  # channelwise, K % 16 != 0
        (100, 136, 100),  # channelwise, K % 8 != 0 (x padded by the backend)
    ],
)
@pytest.mark.parametrize("zeros", [False, True], ids=["sym", "zeros"])
def test_tails(sm90_ready, K, N, G, zeros, dtype):
    _check(97, K, N, G, zeros, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("bm", [64, 128])
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 64])
def test_partition_overrides(sm90_ready, bm, splits):
    # 4096 = 64 k-blocks: 3 and 7 slices leave a shorter last slice; 64 is one k-block per slice.
    _check(150, 4096, 1344, 128, splits % 2 == 1, torch.float16, splits=splits, bm=bm)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_strided_and_leading_dims(sm90_ready, dtype):
    _check(96, 2048, 1024, 128, True, dtype, strided=True)
    case = make_case(None, 1024, 512, 64, zeros=False, dtype=dtype, device="cuda", lead=(3, 37))
    assert_close_to_reference(_sm90(case), case, "sm90 lead=(3, 37)")


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", [(4096, 4096, 1024), (8192, 1024, 2048), (512, 8192, 8192)])
def test_large(sm90_ready, M, K, N):
    _check(M, K, N, 128, M == 4096, torch.bfloat16 if M == 8192 else torch.float16)


@pytest.mark.gpu
def test_deterministic_with_split_k(sm90_ready):
    case = make_case(64, 8192, 1024, 128, zeros=True, dtype=torch.float16, device="cuda")
    assert cuda_backend_plan(64, 8192, 1024)["splits"] > 1, "the case must exercise the split-K reduction"
    first = _sm90(case)
    for _ in range(3):
        assert torch.equal(_sm90(case), first)


def cuda_backend_plan(M, K, N, splits=0, bm=0):
    keys = ("bm", "m_blocks", "n_blocks", "kb_total", "kb_per_split", "splits", "ws_floats", "smem_bytes")
    return dict(zip(keys, torch.ops.w4a16._cuda_gemm_sm90_plan(M, K, N, splits, bm)))


@pytest.mark.gpu
def test_plan_fills_the_gpu(sm90_ready):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    p = cuda_backend_plan(64, 4096, 4096)
    assert p["bm"] == 64 and p["n_blocks"] == 16 and p["splits"] > 1
    assert p["m_blocks"] * p["n_blocks"] * p["splits"] <= 2 * sms
    assert (p["splits"] - 1) * p["kb_per_split"] < p["kb_total"] <= p["splits"] * p["kb_per_split"]
    big = cuda_backend_plan(4096, 8192, 28672)
    assert big["bm"] == 128 and big["splits"] == 1 and big["ws_floats"] == 0


@pytest.mark.gpu
def test_graph_replay_matches_eager(sm90_ready):
    case = make_case(128, 4096, 2048, 128, zeros=False, dtype=torch.bfloat16, device="cuda")
    x2d = case.x
    eager = _sm90(case)
    out = torch.empty_like(eager)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on the capture stream
        torch.ops.w4a16._cuda_gemm_sm90(x2d, case.qweight, case.scales, case.zeros, out, 0, 0)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.w4a16._cuda_gemm_sm90(x2d, case.qweight, case.scales, case.zeros, out, 0, 0)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_the_backend_runs_it(sm90_ready, dtype):
    # Through the CUDA backend at M >= SM90_MIN_M: the strategy switch picks the wgmma kernel on this GPU.
    M = cuda_backend.SM90_MIN_M + 3
    case = make_case(M, 2048, 1536, 128, zeros=True, dtype=dtype, device="cuda")
    p = Problem("cuda", torch.cuda.get_device_capability(), dtype, M, 2048, 1536, 128, True)
    assert cuda_backend.uses_sm90(p)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = run_backend("cuda", case)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if "sm90" in e.name]
    assert kernels, "the backend did not run the wgmma kernel"
    assert_close_to_reference(out, case, f"cuda backend M={M} {DT_ID[dtype]}")


# ---------------------------------------------------------------- CPU: when the backend uses it


def _problem(M, capability=(9, 0)):
    return Problem("cuda", capability, torch.float16, M, 4096, 4096, 128, False)


def test_uses_sm90_needs_hopper_the_build_and_the_m_range(monkeypatch):
    monkeypatch.setattr(cuda_backend, "sm90_built", lambda: True)
    assert cuda_backend.uses_sm90(_problem(cuda_backend.SM90_MIN_M))
    assert not cuda_backend.uses_sm90(_problem(cuda_backend.SM90_MIN_M - 1))
    assert not cuda_backend.uses_sm90(_problem(4096, capability=(8, 0)))
    assert not cuda_backend.uses_sm90(_problem(4096, capability=(10, 0)))
    monkeypatch.setattr(cuda_backend, "sm90_built", lambda: False)
    assert not cuda_backend.uses_sm90(_problem(4096))


@pytest.mark.parametrize("archs,built", [("8.0;9.0a", True), ("9.0a", True), ("8.0;9.0", False), (None, False)])
def test_sm90_built_reads_the_arch_list(monkeypatch, archs, built):
    import types
    import sys

    monkeypatch.setitem(sys.modules, "w4a16_ops._build_info", types.SimpleNamespace(ARCHS=archs))
    cuda_backend.sm90_built.cache_clear()
    try:
        assert cuda_backend.sm90_built() is built
    finally:
        cuda_backend.sm90_built.cache_clear()
