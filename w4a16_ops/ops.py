"""The op contract: torch.ops.w4a16.gemm(x, qweight, scales, zeros) -> Tensor.

Registered with torch.library so torch.compile sees one opaque node whose fake implementation runs
the same checks as the eager one. The backend is chosen inside (dispatch.select) per call.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .backends import BACKENDS
from .checks import check_gemm_args

_lib = torch.library.Library("w4a16", "FRAGMENT")
_lib.define("gemm(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros) -> Tensor")


def _gemm(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor]) -> Tensor:
    K, N, G = check_gemm_args(x, qweight, scales, zeros)
    lead = x.shape[:-1]
    M = x.numel() // K
    if M == 0:
        return x.new_empty((*lead, N))
    p = dispatch.problem_for(x.device, x.dtype, M, K, N, G, zeros is not None)
    out = x.new_empty((M, N))
    BACKENDS[dispatch.select(p).backend].gemm(x.reshape(M, K), qweight, scales, zeros, p, out)
    return out.view(*lead, N)


# One implementation for every device key: the choice of kernel is made inside, per call.
_lib.impl("gemm", _gemm, "CompositeExplicitAutograd")


@torch.library.register_fake("w4a16::gemm")
def _gemm_fake(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor]) -> Tensor:
    _, N, _ = check_gemm_args(x, qweight, scales, zeros)
    return x.new_empty((*x.shape[:-1], N))


# Gradient with respect to x only (the packed weight is frozen): dx = dy @ W^T.
def _setup_context(ctx, inputs, output):
    x, qweight, scales, zeros = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.K = x.shape[-1]


def _backward(ctx, grad):
    from .format import dequantize

    qweight, scales, zeros = ctx.saved_tensors
    w = dequantize(qweight, scales, zeros, ctx.K, torch.float32)
    dx = (grad.to(torch.float32) @ w.t()).to(grad.dtype) if ctx.needs_input_grad[0] else None
    return dx, None, None, None


torch.library.register_autograd("w4a16::gemm", _backward, setup_context=_setup_context)


def gemm(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor] = None) -> Tensor:
    """y = x @ dequantize(qweight, scales, zeros): x [..., K] fp16/bf16 -> [..., N] in x.dtype."""
    return torch.ops.w4a16.gemm(x, qweight, scales, zeros)
