"""CUDA C++ backend: the Marlin-class kernel in csrc/kernels/gemm*.cu, compiled by setup.py into w4a16_ops._C.

Two strategies, chosen by M inside gemm():
- M < DEQUANT_MIN_M: the fused kernel (torch.ops.w4a16._cuda_gemm): cp.async pipeline, lop3 dequantization,
  mma.sync, striped partition over all SMs with a deterministic cross-block reduction. Serves every shape the
  format allows (N % 64 != 0 by masking, K tails by zero-filled x; K % 8 != 0 by padding x).
- M >= DEQUANT_MIN_M: dequantize the weight once (torch.ops.w4a16._cuda_dequantize) and run a dense torch.mm.

The lock counters the fused kernel needs are zero before and after every launch (the kernel resets them), so they
are allocated once and reused: each (device, stream) gets its own buffer, so concurrent streams never share one.
Buffers are zeroed outside any CUDA-graph capture, a pool of them at the first call on a device, so a capture on a
new stream (torch.cuda.graph's own, torch.compile's) takes a pre-zeroed one and records no memset. Only when the
pool is exhausted (or the very first call is captured) does a capture get a per-call zeroed buffer.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

NAME = "cuda"

# From this M on, dequantize + dense GEMM beats the fused mma.sync kernel (measured on an H100: at M = 256 on every
# measured layer, at M = 128 not on the large ones; notes/cuda.md).
DEQUANT_MIN_M = 256
# Tuning knob (scripts/cuda_timing.py): 0 = as many blocks per SM as fit, else at most that many.
FORCE_BPS = 0

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


_LOCKS_PER_BUFFER = 1 << 16  # counters per buffer: ceil(M / 64) * ceil(N / 64) <= 65536 covers M < 1024, N <= 4M
_POOL_SIZE = 8
_locks_cache: dict = {}  # (device index, stream) -> int32 buffer, all zero between launches
_locks_pool: dict = {}  # device index -> pre-zeroed buffers not yet given to a stream


def _locks(device: torch.device, n: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device)
    key = (device.index, stream.cuda_stream)
    buf = _locks_cache.get(key)
    if buf is not None and buf.numel() >= n:
        return buf
    capturing = torch.cuda.is_current_stream_capturing()
    if not capturing:
        if device.index not in _locks_pool:
            _locks_pool[device.index] = [
                torch.zeros(_LOCKS_PER_BUFFER, dtype=torch.int32, device=device) for _ in range(_POOL_SIZE)
            ]
        buf = torch.zeros(max(n, _LOCKS_PER_BUFFER), dtype=torch.int32, device=device)
        _locks_cache[key] = buf
        return buf
    pool = _locks_pool.get(device.index)
    if pool and n <= _LOCKS_PER_BUFFER:
        buf = pool.pop()
        _locks_cache[key] = buf
        return buf
    # Memory allocated during a capture belongs to the graph: use it for this call only (its memset is recorded).
    return torch.zeros(n, dtype=torch.int32, device=device)


def _x_ready(x2d: torch.Tensor) -> torch.Tensor:
    """x as the kernel reads it: rows contiguous, 16-byte aligned, 8 elements apart, K a multiple of 8."""
    M, K = x2d.shape
    if K % 8:
        return F.pad(x2d, (0, 8 - K % 8))  # channelwise only (any G >= 32 divides K): the zero columns add nothing
    if x2d.stride(1) != 1 or (M > 1 and x2d.stride(0) % 8) or x2d.data_ptr() % 16:
        return x2d.contiguous()
    return x2d


def gemm(x2d, qweight, scales, zeros, p, out):
    if p.M >= DEQUANT_MIN_M:
        w = torch.empty((p.K, p.N), dtype=x2d.dtype, device=x2d.device)
        torch.ops.w4a16._cuda_dequantize(qweight, scales, zeros, w)
        torch.mm(x2d, w, out=out)
        return
    xk = _x_ready(x2d)
    # m_chunks * n_cols counters at most: ceil(M / 64) chunks of M, ceil(N / 256) column tiles (bound: N / 64).
    locks = _locks(x2d.device, -(-p.M // 64) * -(-p.N // 64))
    torch.ops.w4a16._cuda_gemm(xk, qweight, scales, zeros, out, locks, FORCE_BPS)
