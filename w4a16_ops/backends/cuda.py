"""CUDA C++ backend: the Marlin-class kernel in csrc/kernels/gemm*.cu, compiled by setup.py into w4a16_ops._C.

Three strategies, chosen by M inside gemm():
- sm_90 with the sm_90a build, SM90_MIN_M <= M < SM90_MAX_M: the wgmma kernel (torch.ops.w4a16._cuda_gemm_sm90,
  csrc/kernels/sm90_gemm.cuh): dequantized weights as wgmma's register operand, x from swizzled shared memory,
  deterministic split-K when the output tiles cannot fill the GPU. Serves every shape the format allows.
- M < DEQUANT_MIN_M: the fused kernel (torch.ops.w4a16._cuda_gemm): cp.async pipeline, lop3 dequantization,
  mma.sync, striped partition over all SMs with a deterministic cross-block reduction. Serves every shape the
  format allows (N % 64 != 0 by masking, K tails by zero-filled x; K % 8 != 0 by padding x).
- M >= DEQUANT_MIN_M: dequantize the weight once (torch.ops.w4a16._cuda_dequantize) and run a dense torch.mm.

The lock counters the fused kernel needs are zero before and after every launch (the kernel resets them), so they
are allocated once and reused. Eager calls use one buffer per (device, stream), so concurrent streams never share
one. Captured calls take their counters from a per-device arena zeroed outside any capture: one block per (capture,
capturing stream), shared by that capture's calls on that stream (they run one after another in every replay, as
they would eagerly), never by two captures. So two graphs (even captured on one stream) replayed at once, or a
replay next to eager calls, never share counters, and the graph records no memset. An eager call replaces the
arena with a fresh one when a quarter of it is left (the old one stays alive for the graphs that use it), so a
server capturing thousands of graphs keeps finding room; only a capture that finds the arena used up (or the very
first call on a device, if captured) gets a zeroed buffer of its own, whose memset is recorded in the graph.

On sm_90 the fused kernel can be launched with programmatic dependent launch (PDL; TUNING's pdl field, or
W4A16_CUDA_PDL=1 at import): its blocks may then start while the previous kernel in the stream finishes, and wait
(griddepcontrol.wait) before reading anything a previous kernel may write. Off by default (notes/cuda.md run 10).

Weights that are contiguous but not 16-byte aligned (a view at an odd offset into a flat buffer) are copied to
aligned storage per call (the kernels read them with 16-byte loads). The dense GEMM of the large-M path runs with
fp16/bf16 reduced-precision reductions disallowed, so it accumulates in fp32 like the fused kernel.
"""

from __future__ import annotations

import collections
import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

from ._buffers import persistent_zeros, retire

NAME = "cuda"

# From this M on, dequantize + dense GEMM beats the fused mma.sync kernel (measured on an H100: at M = 256 on every
# measured layer, at M = 128 not on the large ones; notes/cuda.md).
DEQUANT_MIN_M = 256
# Overrides of the fused kernel's partition for timing sweeps and tests (0 = the measured default; GemmTuning in
# csrc/kernels/launchers.h): blocks per SM, most blocks per column, scaling (1: 16-bit weights, 2: fp32 partial sums),
# pdl (1: plain launches, 2: programmatic dependent launch on sm_90), L2 prefetch distance (-1: none), bulk (1: the
# bulk-copy weight ring at M <= 16 on sm_90, an experiment).
def _default_tuning(env=os.environ) -> tuple:
    """TUNING from the environment (A/B runs of a whole model): W4A16_CUDA_PDL=1 programmatic dependent launch on
    sm_90, =0 plain launches (unset: the kernel's default, plain); W4A16_CUDA_PREFETCH=n the L2 prefetch distance;
    W4A16_CUDA_BULK=1 the bulk-copy weight ring at M <= 16 (sm_90, an experiment)."""
    pf, pdl = env.get("W4A16_CUDA_PREFETCH", ""), env.get("W4A16_CUDA_PDL", "")
    return (0, 0, 0, {"0": 1, "1": 2}.get(pdl, 0), int(pf) if pf.lstrip("-").isdigit() else 0,
            1 if env.get("W4A16_CUDA_BULK", "") == "1" else 0)


TUNING = _default_tuning()

# The wgmma kernel's M range on sm_90 (csrc/kernels/sm90_gemm.cuh). Measured on the H200 (notes/sm90.md, fp16,
# G = 128, 4 Llama layers): from M = 64 it beats the fused mma.sync kernel by 1.3-2.0x and up to M = 256
# dequantize + cuBLAS by 1.0-2.8x; at M = 1024 and 4096 dequantize + cuBLAS is 13-27% faster. M = 512 is unmeasured
# (the bound sits between 256 and 1024). Partition overrides for tests and sweeps (0 = default): K slices, rows of M
# per block (64 or 128).
SM90_MIN_M = 64
SM90_MAX_M = 512
SM90_TUNING = (0, 0)

_GROUPS = (32, 64, 128, 256)


@functools.lru_cache(maxsize=None)
def availability() -> Optional[str]:
    from .._build import extension_status

    return extension_status()


@functools.lru_cache(maxsize=None)
def sm90_built() -> bool:
    """Whether the extension holds sm_90a code (the wgmma kernel): TORCH_CUDA_ARCH_LIST named 9.0a at build time."""
    try:
        from .._build_info import ARCHS
    except ImportError:
        return False
    return "9.0a" in (ARCHS or "").replace(" ", ";").split(";")


def uses_sm90(p) -> bool:
    """Whether gemm() runs p on the wgmma kernel (pure, given the build)."""
    return (
        p.capability is not None and p.capability[0] == 9 and SM90_MIN_M <= p.M < SM90_MAX_M and sm90_built()
    )


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
_ARENA_INTS = 1 << 22  # 16 MB per device arena for captured calls (replaced by a fresh one when 1/4 is left)
_locks_cache: dict = {}  # (device index, stream) -> int32 buffer, all zero between launches
_locks_arena: dict = {}  # device index -> _Arena
_captured_memsets = 0  # captured calls that found no arena room and recorded a memset of their own counters


class _Arena:
    """Zeroed int32 counters handed out in blocks, one per key (capture id, stream), never one block to two keys.

    A key's block is reused by later calls under the same key that need no more counters; a call that needs more
    gets a new block (the old one is not handed out again). Pure bookkeeping on a tensor: CPU-testable."""

    KEYS = 512  # keys remembered (a capture's key is dead once it ends; forgetting one only costs a new block)

    def __init__(self, buf: torch.Tensor):
        self.buf = buf
        self.next = 0
        self.blocks: collections.OrderedDict = collections.OrderedDict()

    def free(self) -> int:
        return self.buf.numel() - self.next

    def block(self, key, n: int) -> Optional[torch.Tensor]:
        """n zeroed counters for key (None: used up)."""
        blk = self.blocks.get(key)
        if blk is not None and blk.numel() >= n:
            return blk
        size = -(-max(n, 1) // 32) * 32  # blocks 128-byte aligned
        if self.next + size > self.buf.numel():
            return None
        blk = self.buf[self.next : self.next + size]
        self.next += size
        self.blocks[key] = blk
        while len(self.blocks) > self.KEYS:
            self.blocks.popitem(last=False)
        return blk


# The raw queries _locks makes (the torch.cuda wrappers cost microseconds per call); module functions so that the
# counter logic is testable without a GPU.
def _capturing() -> bool:
    return torch._C._cuda_isCurrentStreamCapturing()


def _raw_stream(index) -> int:
    return torch._C._cuda_getCurrentRawStream(index)


def _capture_id() -> int:
    return torch.ops.w4a16._cuda_capture_id()


def _locks(device: torch.device, n: int) -> torch.Tensor:
    if _capturing():
        arena = _locks_arena.get(device.index)
        if arena is not None:
            key = (_capture_id(), _raw_stream(device.index))
            blk = arena.block(key, n)
            if blk is not None:
                return blk
        # Memory allocated during a capture belongs to the graph: this call only (its memset is recorded).
        global _captured_memsets
        _captured_memsets += 1
        return torch.zeros(n, dtype=torch.int32, device=device)
    arena = _locks_arena.get(device.index)
    if arena is None or arena.free() < max(arena.buf.numel() // 4, n):
        if arena is not None:
            retire(arena.buf)  # graphs captured earlier keep using their blocks in it
        _locks_arena[device.index] = _Arena(persistent_zeros(device, max(_ARENA_INTS, 4 * n)))
    key = (device.index, _raw_stream(device.index))
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
    if uses_sm90(p):
        torch.ops.w4a16._cuda_gemm_sm90(_x_ready(x2d), qweight, scales, zeros, out, *SM90_TUNING)
        return
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
