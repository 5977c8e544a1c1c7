"""CUDA C++ backend: the Marlin-class kernel in csrc/kernels/gemm*.cu, compiled by setup.py into w4a16_ops._C.

Two strategies, chosen by M inside gemm():
- M < DEQUANT_MIN_M: the fused kernel (torch.ops.w4a16._cuda_gemm): cp.async pipeline, lop3 dequantization,
  mma.sync, striped partition over all SMs with a deterministic cross-block reduction. Serves every shape the
  format allows (N % 64 != 0 by masking, K tails by zero-filled x; K % 8 != 0 by padding x).
- M >= DEQUANT_MIN_M: dequantize the weight once (torch.ops.w4a16._cuda_dequantize) and run a dense torch.mm.

The lock counters the fused kernel needs are zero before and after every launch (the kernel resets them), so they
are allocated once and reused. Eager calls use one buffer per (device, stream), so concurrent streams never share
one. A call captured into a CUDA graph gets its own slice of a per-device arena zeroed at the first eager call, so
two graphs (even captured on one stream) replayed at once, or a replay next to eager calls, never share counters
and the graph records no memset; only when the arena is used up (or the very first call on a device is captured)
does a captured call get a zeroed buffer of its own, whose memset is recorded in the graph.

Weights that are contiguous but not 16-byte aligned (a view at an odd offset into a flat buffer) are copied to
aligned storage per call (the kernels read them with 16-byte loads). The dense GEMM of the large-M path runs with
fp16/bf16 reduced-precision reductions disallowed, so it accumulates in fp32 like the fused kernel.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from ._buffers import persistent_zeros, retire

NAME = "cuda"

# From this M on, dequantize + dense GEMM beats the fused mma.sync kernel (measured on an H100: at M = 256 on every
# measured layer, at M = 128 not on the large ones; notes/cuda.md).
DEQUANT_MIN_M = 256
# Overrides of the fused kernel's partition for timing sweeps and tests (0 = the measured default; GemmTuning in
# csrc/kernels/launchers.h): blocks per SM, most blocks per column, scaling (1: 16-bit weights, 2: fp32 partial sums).
TUNING = (0, 0, 0)

_GROUPS = (32, 64, 128, 256)


@functools.lru_cache(maxsize=None)
def availability() -> Optional[str]:
    from .._build import extension_status

    return extension_status()


def unsupported_reason(p) -> Optional[str]:
    """None if the CUDA kernel serves p. Pure: no device queries, no imports of the extension."""
    if p.device_type != "cuda":
        return f"the CUDA kernel runs on CUDA devices only (the tensors are on {p.device_type})"
    if p.capability is None or tuple(p.capability) < (8, 0):
        cap = "unknown" if p.capability is None else f"sm_{p.capability[0]}{p.capability[1]}"
        return f"the CUDA kernel needs compute capability >= 8.0 (mma.sync bf16, cp.async); this GPU is {cap}"
    if p.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA kernel takes float16 or bfloat16 x, got {p.dtype}"
    if p.G != p.K and p.G not in _GROUPS:
        return f"group size G = {p.G} is not one of 32, 64, 128, 256 or K = {p.K}"
    if p.N % 8:
        return f"N = {p.N} is not a multiple of 8"
    if max(p.M, p.K, p.N) >= 2**31:
        return f"a dimension does not fit in int32 (M = {p.M}, K = {p.K}, N = {p.N})"
    return None


_LOCKS_PER_BUFFER = 1 << 16  # counters per eager buffer (grown when a call needs more)
_ARENA_INTS = 1 << 22  # 16 MB per device: about 9000 captured calls of 8192 x 28672 at M < 256
_locks_cache: dict = {}  # (device index, stream) -> int32 buffer, all zero between launches
_locks_arena: dict = {}  # device index -> [zeroed int32 tensor, next free offset]


def _locks(device: torch.device, n: int) -> torch.Tensor:
    if torch._C._cuda_isCurrentStreamCapturing():  # the torch.cuda wrappers cost microseconds per call
        arena = _locks_arena.get(device.index)
        if arena is not None and arena[1] + n <= arena[0].numel():
            start = arena[1]
            arena[1] += -(-n // 32) * 32  # slices 128-byte aligned; never handed out twice
            return arena[0][start : start + n]
        # Memory allocated during a capture belongs to the graph: this call only (its memset is recorded).
        return torch.zeros(n, dtype=torch.int32, device=device)
    if device.index not in _locks_arena:
        _locks_arena[device.index] = [persistent_zeros(device, _ARENA_INTS), 0]
    key = (device.index, torch._C._cuda_getCurrentRawStream(device.index))
    buf = _locks_cache.get(key)
    if buf is None or buf.numel() < n:
        retire(buf)
        buf = persistent_zeros(device, max(n, _LOCKS_PER_BUFFER))
        _locks_cache[key] = buf
    return buf


def _aligned(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """t itself when its data is 16-byte aligned, else an aligned copy (fresh allocations are aligned)."""
    return t if t is None or t.data_ptr() % 16 == 0 else t.clone()


def _x_ready(x2d: torch.Tensor) -> torch.Tensor:
    """x as the kernel reads it: rows contiguous, 16-byte aligned, 8 elements apart, K a multiple of 8."""
    M, K = x2d.shape
    if K % 8:
        return F.pad(x2d, (0, 8 - K % 8))  # channelwise only (any G >= 32 divides K): the zero columns add nothing
    if x2d.stride(1) != 1 or (M > 1 and x2d.stride(0) % 8) or x2d.data_ptr() % 16:
        # clone, not contiguous(): a contiguous view at an odd offset would come back as itself, unaligned.
        return x2d.clone(memory_format=torch.contiguous_format)
    return x2d


def gemm(x2d, qweight, scales, zeros, p, out):
    qweight, scales, zeros = _aligned(qweight), _aligned(scales), _aligned(zeros)
    if p.M >= DEQUANT_MIN_M:
        w = torch.empty((p.K, p.N), dtype=x2d.dtype, device=x2d.device)
        torch.ops.w4a16._cuda_dequantize(qweight, scales, zeros, w)
        _mm_fp32_accumulate(x2d, w, out)
        return
    xk = _x_ready(x2d)
    # m_chunks * n_cols counters: ceil(M / 64) chunks of M, ceil(N / 256) block columns.
    locks = _locks(x2d.device, -(-p.M // 64) * -(-p.N // 256))
    torch.ops.w4a16._cuda_gemm(xk, qweight, scales, zeros, out, locks, *TUNING)


def _mm_fp32_accumulate(x2d, w, out):
    """out = x2d @ w with cuBLAS reductions kept in fp32 (torch allows fp16/bf16 reduced-precision reductions by
    default, which split-K kernels use; the op promises fp32 accumulation)."""
    flags = torch.backends.cuda.matmul
    saved = (flags.allow_fp16_reduced_precision_reduction, flags.allow_bf16_reduced_precision_reduction)
    flags.allow_fp16_reduced_precision_reduction = False
    flags.allow_bf16_reduced_precision_reduction = False
    try:
        torch.mm(x2d, w, out=out)
    finally:
        flags.allow_fp16_reduced_precision_reduction, flags.allow_bf16_reduced_precision_reduction = saved
