"""The public op against the float64 reference: shapes, M, group sizes, zeros, dtypes, strides.

On CPU the automatic choice is the reference backend; on a GPU the same grid runs through the
automatic choice and through every available backend forced by W4A16_BACKEND.
"""

import pytest
import torch

import w4a16_ops
from w4a16_ops import dispatch

from helpers import assert_close_to_reference, groups_for, make_case

DTYPES = [torch.float16, torch.bfloat16]
CPU_SHAPES = [(128, 64), (256, 136), (2112, 2120)]
CPU_MS = [1, 7, 17, 65]


def _grid(shapes, Ms):
    for K, N in shapes:
        for G in groups_for(K):
            for M in Ms:
                yield pytest.param(M, K, N, G, id=f"M{M}-K{K}-N{N}-G{G}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("zeros", [False, True], ids=["sym", "zeros"])
@pytest.mark.parametrize("M,K,N,G", list(_grid(CPU_SHAPES, CPU_MS)))
def test_cpu_grid(M, K, N, G, zeros, dtype):
    case = make_case(M, K, N, G, zeros=zeros, dtype=dtype)
    assert_close_to_reference(w4a16_ops.gemm(*case.args), case, "cpu auto")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_leading_dims_strided_and_offset_x(dtype):
    case = make_case(None, 256, 136, 64, zeros=True, dtype=dtype, strided=True, lead=(2, 3, 5))
    assert case.x.storage_offset() > 0 and not case.x.is_contiguous()
    out = torch.ops.w4a16.gemm(*case.args)
    assert out.shape == (2, 3, 5, 136)
    assert_close_to_reference(out, case, "strided leading dims")


def test_1d_x_is_one_row():
    case = make_case(None, 128, 64, 128, zeros=False, lead=())
    out = torch.ops.w4a16.gemm(*case.args)
    assert out.shape == (64,)
    assert_close_to_reference(out, case, "1-d x")


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_m_zero(lead):
    case = make_case(None, 128, 64, 32, zeros=True, lead=lead)
    out = torch.ops.w4a16.gemm(*case.args)
    assert out.shape == (*lead, 64) and out.dtype == torch.float16


def test_transposed_x():
    K, M = 256, 9
    case = make_case(M, K, 72, 128, zeros=False)
    xt = case.x.t().contiguous().t()  # column-major [M, K]
    assert not xt.is_contiguous()
    case = case._replace(x=xt)
    assert_close_to_reference(torch.ops.w4a16.gemm(*case.args), case, "column-major x")


def test_gradient_with_respect_to_x():
    case = make_case(4, 128, 64, 64, zeros=True, dtype=torch.float16)
    x = case.x.clone().requires_grad_(True)
    y = torch.ops.w4a16.gemm(x, *case.args[1:])
    g = torch.randn_like(y)
    y.backward(g)
    w = w4a16_ops.dequantize(*case.args[1:], 128, torch.float64)
    expected = g.double() @ w.t()
    err = (x.grad.double() - expected).norm() / expected.norm()
    assert err < 2.0**-10


# ---------------------------------------------------------------------------------------- GPU
GPU_SHAPES = [(4096, 4096), (2112, 4096), (4096, 2120), (14336, 4096), (256, 8)]
GPU_MS = [1, 7, 16, 17, 64, 65, 256, 1000]


def _gpu_backends():
    names = ["auto"]
    if torch.cuda.is_available():
        names += [n for n, why in dispatch.unavailable_backends().items() if why is None]
    return names


@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("zeros", [False, True], ids=["sym", "zeros"])
@pytest.mark.parametrize("K,N", GPU_SHAPES, ids=lambda v: str(v))
def test_gpu_grid(K, N, zeros, dtype, backend, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, backend)
    for G in groups_for(K):
        for M in GPU_MS:
            case = make_case(M, K, N, G, zeros=zeros, dtype=dtype, device="cuda", strided=(M % 2 == 1))
            p = dispatch.problem_for(case.x.device, dtype, M, K, N, G, zeros)
            if backend != "auto" and dispatch.BACKENDS[backend].unsupported_reason(p) is not None:
                continue
            out = torch.ops.w4a16.gemm(*case.args)
            assert_close_to_reference(out, case, f"{backend} M={M} K={K} N={N} G={G}")
