"""Triton backend: fused W4A16 GEMM for every N % 8 == 0 shape (and every platform without the
CUDA build). Filled in by the Triton backend work."""

from __future__ import annotations

import functools
import os
from typing import Optional

NAME = "triton"


@functools.lru_cache(maxsize=None)
def availability() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable: {e}"
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no GPU and TRITON_INTERPRET is not 1"
    return None


def unsupported_reason(p) -> Optional[str]:
    return "the Triton kernel is not implemented yet"


def gemm(x2d, qweight, scales, zeros, p, out):
    raise NotImplementedError("the Triton kernel is not implemented yet")
