"""Argument checks of the op, shared by every backend and the fake (meta) implementation.

One function, so eager calls, torch.compile tracing and every backend raise the same words.
"""

from __future__ import annotations

from typing import Optional

import torch

from .format import SUPPORTED_GROUP_SIZES, qweight_shape, zeros_shape

_FLOAT_DTYPES = (torch.float16, torch.bfloat16)


def _fail(msg: str) -> None:
    raise ValueError(f"w4a16.gemm: {msg}")


def check_gemm_args(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor]
) -> tuple[int, int, int]:
    """Validate a call; return (K, N, G). Raises ValueError naming the argument, expected and given."""
    if x.dtype not in _FLOAT_DTYPES:
        _fail(f"x must be float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        _fail("x must have at least 1 dimension (..., K), got a 0-d tensor")
    if scales.dtype != x.dtype:
        _fail(f"scales must have the dtype of x ({x.dtype}), got {scales.dtype}")
    if qweight.dtype != torch.int32:
        _fail(f"qweight must be torch.int32 (the packed format), got {qweight.dtype}")
    if zeros is not None and zeros.dtype != torch.int32:
        _fail(f"zeros must be None or torch.int32 (8 packed zero points per word), got {zeros.dtype}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t is not None and t.device != x.device:
            _fail(f"{name} must be on the device of x ({x.device}), got {t.device}")
    if scales.dim() != 2:
        _fail(f"scales must be 2-D [K // G, N], got shape {list(scales.shape)}")
    K = x.shape[-1]
    num_groups, N = scales.shape
    if K == 0:
        _fail("K = x.shape[-1] must be positive, got 0")
    divides = num_groups > 0 and K % num_groups == 0
    group_ok = divides and (num_groups == 1 or K // num_groups in SUPPORTED_GROUP_SIZES)
    if not group_ok and (qweight.dim() != 2 or qweight.shape[0] != -(-K // 16)):
        # The weights were packed for another K: say so, rather than calling K / scales.shape[0] a bad group size.
        _fail(
            f"K = x.shape[-1] = {K} does not match the weights: qweight must have shape {list(qweight_shape(K, N))} "
            f"for K = {K}, N = {N}, got {list(qweight.shape)}"
        )
    if not divides:
        _fail(f"K = x.shape[-1] = {K} must be a multiple of scales.shape[0] = {num_groups} (the number of groups)")
    G = K // num_groups
    if not group_ok:
        _fail(f"group size G = K / scales.shape[0] = {G} is not supported; expected 32, 64, 128, 256 or K = {K}")
    if N == 0 or N % 8:
        _fail(f"N = scales.shape[1] must be a positive multiple of 8, got {N}")
    if tuple(qweight.shape) != qweight_shape(K, N):
        _fail(
            f"qweight must have shape {list(qweight_shape(K, N))} = [ceil(K / 16), ceil(N / 64) * 128] "
            f"for K = {K}, N = {N}, got {list(qweight.shape)}"
        )
    if zeros is not None and tuple(zeros.shape) != zeros_shape(num_groups, N):
        _fail(f"zeros must have shape {list(zeros_shape(num_groups, N))} = [K // G, N // 8], got {list(zeros.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t is not None and not t.is_contiguous():
            _fail(f"{name} must be contiguous (row-major), got strides {list(t.stride())}")
    return K, N, G
