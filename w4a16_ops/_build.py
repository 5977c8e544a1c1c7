"""What setup.py built, and loading the compiled extension once (a missing build is not an error)."""

from __future__ import annotations

import functools
from typing import Optional


@functools.lru_cache(maxsize=None)
def extension_status() -> Optional[str]:
    """None if w4a16_ops._C is loaded and usable on this machine, else the reason it is not."""
    try:
        from . import _build_info  # written by setup.py
    except ImportError:
        return "the package was not installed through setup.py (no _build_info)"
    if not _build_info.CUDA_BUILT:
        return f"the CUDA extension was not built: {_build_info.REASON}"
    try:
        import torch

        from . import _C  # noqa: F401  (registers torch.ops.w4a16._cuda_* on import)
    except ImportError as e:
        return f"the CUDA extension failed to load: {e}"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def build_summary() -> str:
    try:
        from . import _build_info
    except ImportError:
        return "not installed through setup.py"
    if _build_info.CUDA_BUILT:
        return f"CUDA extension built for {_build_info.ARCHS} with nvcc {_build_info.NVCC_VERSION}"
    return f"CUDA extension not built: {_build_info.REASON}"
