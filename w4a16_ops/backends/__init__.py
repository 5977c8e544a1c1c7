"""Backends of w4a16.gemm. Each module exposes the same small interface:

    NAME: str
    availability() -> Optional[str]        None when usable in this process, else why not (cached)
    unsupported_reason(p: Problem) -> Optional[str]
                                           None when it can serve p, else why not (pure, no imports)
    gemm(x2d, qweight, scales, zeros, p, out) -> None
                                           writes every element of out ([M, N], x.dtype, contiguous);
                                           x2d: [M, K], any strides. Tests poison out before the call.

The order below is the order of preference; dispatch.py decides among them.
"""

from . import cuda, reference, triton

BACKENDS = {m.NAME: m for m in (cuda, triton, reference)}
