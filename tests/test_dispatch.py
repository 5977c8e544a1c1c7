"""The backend choice: a pure function with reasons, forcing by environment variable, explain()."""

import re

import pytest
import torch

import w4a16_ops
from w4a16_ops import dispatch
from w4a16_ops.backends import BACKENDS
from w4a16_ops.problem import Problem

from helpers import make_case


def _p(M=1, K=4096, N=4096, G=128, device="cuda", cap=(9, 0), dtype=torch.float16, zeros=False):
    return Problem(device, cap if device == "cuda" else None, dtype, M, K, N, G, zeros)


def test_decide_is_pure_and_gives_a_reason():
    p = _p()
    a = dispatch.decide(p, {})
    b = dispatch.decide(p, {})
    assert a == b and a.backend in BACKENDS and a.reason


def test_cpu_goes_to_reference():
    d = dispatch.decide(_p(device="cpu"), {})
    assert d.backend == "reference" and "CPU" in d.reason


def test_missing_backends_fall_through_with_their_reasons():
    missing = {"cuda": "not built here", "triton": "no triton here"}
    d = dispatch.decide(_p(), missing)
    assert d.backend == "reference"
    assert "not cuda: not built here" in d.reason and "not triton: no triton here" in d.reason


def test_every_gpu_problem_gets_a_backend():
    for K, N in [(4096, 4096), (2112, 4096), (4096, 2120), (100, 8)]:
        for M in (1, 16, 4096):
            d = dispatch.decide(_p(M=M, K=K, N=N, G=K if K % 32 else 32), {})
            assert d.backend in BACKENDS


def test_backend_rules_never_accept_what_they_cannot_serve():
    # Rules are pure: they answer for any problem, built or not.
    for name, b in BACKENDS.items():
        for p in (_p(), _p(device="cpu"), _p(K=2112, G=64), _p(N=2120)):
            r = b.unsupported_reason(p)
            assert r is None or (isinstance(r, str) and r), name


def test_explain_for_another_machine():
    d = w4a16_ops.explain(1, 2112, 4096, group_size=64, device="cuda", capability=(9, 0), unavailable={})
    assert isinstance(d, dispatch.Decision) and str(d).startswith(d.backend + ": ")


def test_explain_here_matches_what_the_op_does(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    d = w4a16_ops.explain(5, 256, 64, group_size=64, device="cpu")
    assert d.backend == "reference"


def test_forcing_reference_works_everywhere(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    case = make_case(3, 128, 64, 32, zeros=True)
    out = torch.ops.w4a16.gemm(*case.args)
    assert out.shape == (3, 64)
    assert w4a16_ops.explain(3, 128, 64, group_size=32, device="cpu").reason == f"forced by {dispatch.ENV_VAR}=reference"


def test_forcing_an_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "fastest")
    case = make_case(3, 128, 64, 32, zeros=False)
    with pytest.raises(dispatch.BackendUnavailableError, match="'fastest' is not a backend"):
        torch.ops.w4a16.gemm(*case.args)


def test_forcing_a_backend_that_cannot_serve_is_an_error_not_a_fallback(monkeypatch):
    p = _p(device="cpu")
    unavailable = {"cuda": "the CUDA extension was not built"}
    with pytest.raises(dispatch.BackendUnavailableError) as e:
        dispatch.check_forced(p, "cuda", unavailable)
    assert "backend 'cuda' was forced but cannot serve cpu float16 M=1 K=4096 N=4096" in str(e.value)
    assert "the CUDA extension was not built" in str(e.value)
    if dispatch.unavailable_backends()["cuda"] is not None:
        monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
        case = make_case(3, 128, 64, 32, zeros=False)
        with pytest.raises(dispatch.BackendUnavailableError, match="'cuda' was forced"):
            torch.ops.w4a16.gemm(*case.args)


def test_auto_means_no_override(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert dispatch.forced_backend() is None
    monkeypatch.setenv(dispatch.ENV_VAR, " Triton ")
    assert dispatch.forced_backend() == "triton"


def test_problem_describe():
    assert _p(K=2112, N=4096, G=2112, zeros=True).describe() == (
        "cuda sm_90 float16 M=1 K=2112 N=4096 G=K (channelwise) zeros"
    )


def test_measured_table_on_hopper():
    # By shape class (w4a16_ops.dispatch.shape_class): below M = 64 benchmarks/results/h100_bench_op_full.md, from
    # M = 64 to 511 the wgmma kernel as measured on the H200 (notes/sm90.md), from 512 Triton's dequantize + cuBLAS.
    Ms = (1, 16, 64, 128, 256, 511, 512, 4096)
    large, small = dict(K=4096, N=14336), dict(K=4096, N=4096)
    large_tail, small_tail = dict(K=14784, N=4096, G=64), dict(K=2112, N=4096, G=64)
    wgmma_range = ["cuda"] * 4 + ["triton"] * 2
    for shape in (large, small):
        assert [dispatch.decide(_p(M=M, **shape), {}).backend for M in Ms] == ["cuda", "cuda"] + wgmma_range
    for shape in (large_tail, small_tail):
        assert [dispatch.decide(_p(M=M, **shape), {}).backend for M in Ms] == ["cuda", "triton"] + wgmma_range
    assert "small, K % 128 != 0" in dispatch.decide(_p(M=16, **small_tail), {}).reason
    # A family that was not measured keeps the default order.
    assert dispatch.decide(_p(M=64, cap=(8, 0)), {}).backend == "cuda"
    # A preferred backend that is missing falls through with its reason.
    d = dispatch.decide(_p(M=1024), {"triton": "not built"})
    assert d.backend == "cuda" and "not triton: not built" in d.reason


def test_measured_table_with_zero_points_on_hopper():
    # benchmarks/results/h100_zeros.md: with zero points the CUDA kernel beats Triton at M = 16 on every measured shape.
    assert [dispatch.decide(_p(M=M, zeros=True), {}).backend for M in (1, 16, 64, 256)] == ["cuda"] * 4
    assert "zero-point weights" in dispatch.decide(_p(M=16, zeros=True), {}).reason
    assert dispatch.decide(_p(M=16, zeros=True), {"cuda": "not built"}).backend == "triton"


@pytest.mark.parametrize(
    "kwargs,words",
    [
        (dict(M=1, K=4096, N=100), "N must be a positive multiple of 8, got 100"),
        (dict(M=1, K=4096, N=4096, group_size=96), "group_size must be 32, 64, 128, 256, -1 or K = 4096, got 96"),
        (dict(M=1, K=200, N=64, group_size=128), "K = 200 must be a multiple of group_size = 128"),
        (dict(M=1, K=256, N=64, dtype=torch.float32), "dtype must be torch.float16 or torch.bfloat16"),
        (dict(M=-1, K=256, N=64), "M must be >= 0, got -1"),
    ],
)
def test_explain_rejects_what_the_op_rejects(kwargs, words):
    M, K, N = kwargs.pop("M"), kwargs.pop("K"), kwargs.pop("N")
    with pytest.raises(ValueError, match=re.escape(words)):
        w4a16_ops.explain(M, K, N, device="cpu", **kwargs)


def test_explain_says_which_gpu_it_assumed():
    if torch.cuda.is_available():
        pytest.skip("only a machine without a CUDA device answers for an assumed GPU")
    d = w4a16_ops.explain(1, 4096, 4096, device="cuda")
    assert "answered for sm_90" in d.reason
    assert "answered for" not in w4a16_ops.explain(1, 4096, 4096, device="cuda", capability=(9, 0)).reason
