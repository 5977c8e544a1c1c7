"""CUDA C++ backend: the Marlin-class kernel in csrc/, compiled by setup.py into w4a16_ops._C.

Filled in by the CUDA backend work; until the extension is built this backend reports why not.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

NAME = "cuda"


@functools.lru_cache(maxsize=None)
def availability() -> Optional[str]:
    from .._build import extension_status

    return extension_status()


def unsupported_reason(p) -> Optional[str]:
    return "the CUDA kernel is not implemented yet"


def gemm(x2d, qweight, scales, zeros, p, out):
    raise NotImplementedError("the CUDA kernel is not implemented yet")
