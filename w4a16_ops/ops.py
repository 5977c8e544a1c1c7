"""The op contract: torch.ops.w4a16.gemm(x, qweight, scales, zeros) -> Tensor.

Registered with torch.library so torch.compile sees one opaque node whose fake implementation runs
the same checks as the eager one. The backend is chosen inside (dispatch.select) per call.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .checks import check_gemm_args
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode

_lib = torch.library.Library("w4a16", "FRAGMENT")
_lib.define("gemm(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros) -> Tensor")


def _gemm(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor]) -> Tensor:
    K, N, G = check_gemm_args(x, qweight, scales, zeros)
    two_d = x.dim() == 2  # the common case skips the reshapes (host overhead matters in decode)
    M = x.shape[0] if two_d else x.numel() // K
    if M == 0:
        return x.new_empty((*x.shape[:-1], N))
    backend, p = dispatch.route(x.device, x.dtype, M, K, N, G, zeros is not None)
    out = x.new_empty((M, N))
    backend.gemm(x if two_d else x.reshape(M, K), qweight, scales, zeros, p, out)
    return out if two_d else out.view(*x.shape[:-1], N)


# One implementation for every device key: the choice of kernel is made inside, per call.
_lib.impl("gemm", _gemm, "CompositeExplicitAutograd")


@torch.library.register_fake("w4a16::gemm")
def _gemm_fake(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor]) -> Tensor:
    _, N, _ = check_gemm_args(x, qweight, scales, zeros)
    return x.new_empty((*x.shape[:-1], N))


# Gradient with respect to x only (the packed weight is frozen): dx = dy @ W^T. A hand-written
# Autograd kernel rather than torch.library.register_autograd: when no gradient is needed it goes
# straight below autograd, which halves the op's eager host overhead in inference.
class _GemmFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qweight, scales, zeros):
        ctx.save_for_backward(qweight, scales, zeros)
        ctx.K = x.shape[-1]
        with torch._C._AutoDispatchBelowAutograd():
            return torch.ops.w4a16.gemm(x, qweight, scales, zeros)

    @staticmethod
    def backward(ctx, grad):
        from .format import dequantize

        qweight, scales, zeros = ctx.saved_tensors
        w = dequantize(qweight, scales, zeros, ctx.K, torch.float32)
        return (grad.to(torch.float32) @ w.t()).to(grad.dtype), None, None, None


def _gemm_autograd(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor]) -> Tensor:
    if x.requires_grad and torch.is_grad_enabled():
        return _GemmFunction.apply(x, qweight, scales, zeros)
    if type(x) is Tensor and not x.is_meta and _current_dispatch_mode() is None:
        # Plain tensors and no mode (fake, functionalization, tracing) active: every key below
        # autograd would fall through to _gemm, so call it and skip a second trip through the
        # dispatcher.
        return _gemm(x, qweight, scales, zeros)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.w4a16.gemm(x, qweight, scales, zeros)


_lib.impl("gemm", _gemm_autograd, "Autograd")


def gemm(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor] = None) -> Tensor:
    """y = x @ dequantize(qweight, scales, zeros): x [..., K] fp16/bf16 -> [..., N] in x.dtype."""
    return torch.ops.w4a16.gemm(x, qweight, scales, zeros)
