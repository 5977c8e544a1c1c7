"""Reference backend: dequantize to float32 and matmul. Serves every device and shape; the oracle
for the other backends (tests compare all of them against gemm_float64)."""

from __future__ import annotations

from typing import Optional

import torch

from ..format import dequantize

NAME = "reference"


def availability() -> Optional[str]:
    return None


def unsupported_reason(p) -> Optional[str]:
    return None


def gemm(x2d, qweight, scales, zeros, p, out):
    w = dequantize(qweight, scales, zeros, p.K, torch.float32)
    out.copy_(x2d.to(torch.float32) @ w)


def gemm_float64(x, qweight, scales, zeros):
    """The test oracle: float64 dequantize and matmul, any leading dims; returns float64."""
    K = x.shape[-1]
    w = dequantize(qweight, scales, zeros, K, torch.float64)
    return x.to(torch.float64) @ w
