"""Triton backend: fused W4A16 GEMM for every N % 8 == 0 shape, reading the packed format directly.

The kernels are in triton_kernels.py (imported on first use, so importing w4a16_ops never needs
triton). gemm() picks a kernel and its configuration by M from the tuned table shipped in
triton_configs.json (per GPU family, bucketed by M and by shape class); nothing is autotuned at call
time, so CUDA-graph capture and torch.compile see fixed launches. scripts/tune_triton.py is the offline
step that rewrites the table.

Paths (the "kernel" of a configuration):
    "nibble"  decode and medium M: weights as the register A operand (four dots per K tile, one per
              nibble pair), split-K over a third grid axis when the output tiles cannot fill the GPU
    "dense"   dequantized weight tile as the shared-memory B operand, grouped launch order
    "dqmm"    large M: a Triton kernel dequantizes into a dense [K, N] weight, torch.mm does the GEMM
Split-K partials are fp32 [split, M, N] summed in a fixed order by a second small kernel, so results
are bit-identical from run to run (no floating-point atomics). A table entry with "reduce": "inkernel"
lets the last program of each output tile do the same ordered sum instead (one kernel; arrival counters
per device and stream, allocated outside graph capture; bit-identical to the two-kernel sum).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Optional

import torch

from ._buffers import persistent_zeros, retire

NAME = "triton"

_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_configs.json")
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)

# A configuration forced by tests or the tuner (see force_config); None = use the shipped table.
_forced_config: Optional[dict] = None


# --------------------------------------------------------------------------------------------------
# The backend interface
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def availability() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not importable: {e}"
    if not torch.cuda.is_available() and not _interpreting():
        return "no GPU and TRITON_INTERPRET is not 1"
    return None


def unsupported_reason(p) -> Optional[str]:
    """Pure: the reason this backend cannot serve p, or None."""
    if p.device_type == "cpu":
        if not _interpreting():
            return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter; tests only)"
    elif p.device_type != "cuda":
        return f"device {p.device_type} is not supported (cuda, or cpu under TRITON_INTERPRET=1)"
    if p.dtype not in _SUPPORTED_DTYPES:
        return f"dtype {p.dtype} is not supported (float16 or bfloat16)"
    if p.dtype == torch.bfloat16 and _interpreting():
        # The interpreter's tl.dot has no bf16: it returns values of ~1e9 rather than failing.
        return "bfloat16 is not supported under TRITON_INTERPRET=1 (the interpreter's tl.dot has no bf16)"
    if p.N % 8:
        return f"N = {p.N} is not a multiple of 8"
    if p.K % p.G:
        return f"K = {p.K} is not a multiple of G = {p.G}"
    if p.capability is not None and p.capability < (8, 0):
        return f"compute capability {p.capability[0]}.{p.capability[1]} < 8.0 (the kernels need mma.sync or wgmma)"
    return None


def gemm(x2d, qweight, scales, zeros, p, out):
    """out[M, N] = x2d @ dequantize(qweight, scales, zeros); out contiguous, x2d any strides."""
    cfg = _legalize(_forced_config, p) if _forced_config is not None else select_config(p)
    launch(x2d, qweight, scales, zeros, p, out, cfg)


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def load_table(path: str = _CONFIG_FILE) -> dict:
    with open(path) as f:
        return json.load(f)


def gpu_family(capability) -> str:
    if capability is None:
        return "interpreter"
    return f"sm{capability[0]}{capability[1]}"


def shape_class(K: int, N: int) -> str:
    """Coarse shape classes the table may distinguish: 'small' (K * N < 16M weights), 'tall' (K >= 2 N),
    'wide' (N >= 2 K), else 'square'."""
    if K * N < (1 << 24):
        return "small"
    if K >= 2 * N:
        return "tall"
    if N >= 2 * K:
        return "wide"
    return "square"


def _family_table(capability) -> list:
    table = load_table()["families"]
    fam = gpu_family(capability)
    if fam in table:
        return table[fam]
    if capability is not None and capability >= (9, 0) and "sm90" in table:
        return table["sm90"]
    return table["default"]


def select_config(p) -> dict:
    """The shipped configuration for this problem: the first table entry whose m_max >= M and whose
    shape class matches (an entry without 'shape' matches every shape)."""
    cls = shape_class(p.K, p.N)
    for entry in _family_table(p.capability):
        if p.M <= entry.get("m_max", 1 << 62) and entry.get("shape", cls) == cls:
            return _legalize(entry, p)
    raise LookupError(f"triton_configs.json has no entry for {p.describe()}")


def _legalize(cfg: dict, p) -> dict:
    """A copy of a table entry adjusted to the group size. Every entry is legal for every G (the kernels
    handle several groups per K tile), but the nibble kernel pays for each extra group in a K tile (its dots
    run once per group), so its K tile shrinks to G, with proportionally more pipeline stages
    ('keep_block_k': true in an entry turns this off)."""
    cfg = dict(cfg)
    if cfg["kernel"] == "nibble" and p.G != p.K and p.G < cfg["BLOCK_K"] and not cfg.get("keep_block_k"):
        bk = p.G
        cfg["num_stages"] = min(8, cfg.get("num_stages", 3) * cfg["BLOCK_K"] // bk)
        cfg["BLOCK_K"] = bk
    return cfg


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_k(cfg: dict, tiles_mn: int, k_tiles: int, device) -> int:
    split = cfg.get("split_k", 1)
    if split == "auto":
        sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else 132
        target = int(cfg.get("programs_per_sm", 2) * sms)
        split = max(1, -(-target // tiles_mn))
        split = min(split, int(cfg.get("max_split", 16)), max(1, k_tiles // int(cfg.get("min_k_tiles", 2))))
    split = max(1, min(int(split), k_tiles))
    per = -(-k_tiles // split)
    return -(-k_tiles // per)  # no empty splits


# Arrival counters of the single-kernel split-K reduction (config "reduce": "inkernel"), per (device,
# stream): zeroed when allocated, and every launch leaves them zero again. They are allocated outside graph
# capture only (a capture cannot run the zeroing); a call that finds none while capturing uses the
# two-kernel reduction. Launches on one stream are ordered, so a stream never races with itself.
_COUNTERS: dict = {}


def _counters(device, n: int):
    if device.type != "cuda":
        key = ("cpu", 0)
    else:
        key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        retire(buf)
        buf = persistent_zeros(device, max(n, 4096))  # outside any graph pool (reduce-overhead warm-up)
        _COUNTERS[key] = buf
    return buf


def _dq_chunk_rows(M: int, K: int, N: int, G: int, BK: int, elem: int, chunk_mb: float) -> int:
    """Rows of K per dequantize+mm chunk: a multiple of 16, BK and G (channelwise: any), whose 16-bit
    weights take at most chunk_mb MB. A chunk saves writing and re-reading its weights in DRAM (4 Kc N
    bytes) but each extra chunk re-reads and re-writes out (4 M N bytes): chunks shorter than 2 M rows
    do not pay, and then K is done in one piece."""
    if chunk_mb <= 0 or K * N * elem <= chunk_mb * 1e6:
        return K
    unit = max(16, BK, G if G != K else 1)
    rows = max(unit, int(chunk_mb * 1e6 // (N * elem)) // unit * unit)
    return rows if rows >= 2 * M else K


class force_config:
    """Context manager: run every Triton-backend call with this configuration (tests, tuning)."""

    def __init__(self, cfg: Optional[dict]):
        self.cfg = cfg

    def __enter__(self):
        global _forced_config
        self._saved = _forced_config
        _forced_config = self.cfg
        return self

    def __exit__(self, *exc):
        global _forced_config
        _forced_config = self._saved


# --------------------------------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------------------------------


def _use_asm(p) -> bool:
    if _interpreting() or p.device_type != "cuda" or torch.version.hip is not None:
        return False
    if p.dtype == torch.bfloat16 and (p.capability is None or p.capability < (9, 0)):
        return False  # sub.bf16x2 needs sm_90
    return os.environ.get("W4A16_TRITON_ASM", "1") != "0"


def launch(x2d, qweight, scales, zeros, p, out, cfg: dict) -> None:
    """Run one configuration as given (gemm() legalizes table entries first)."""
    import triton

    from . import triton_kernels as tk

    M, K, N = p.M, p.K, p.N
    G = 0 if p.G == K else p.G
    has_zeros = zeros is not None
    z_arg = zeros if has_zeros else qweight  # never read when HAS_ZEROS is False
    BM, BN, BK = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    k_tiles = triton.cdiv(K, BK)
    tiles_mn = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    split = _split_k(cfg, tiles_mn, k_tiles, x2d.device) if cfg["kernel"] != "dqmm" else 1
    per = triton.cdiv(k_tiles, split)
    dst = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=out.device)
    common = dict(num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))
    if cfg["kernel"] == "nibble":
        grid = (triton.cdiv(N, BN), triton.cdiv(M, BM), split)
        counters = None
        if split > 1 and cfg.get("reduce") == "inkernel":
            counters = _counters(out.device, grid[0] * grid[1])
        extra = {}
        if counters is not None:
            extra = dict(fin_ptr=out, cnt_ptr=counters, split=split, IN_REDUCE=True, NUM_WARPS=common["num_warps"])
        tk.nibble_gemm_kernel[grid](
            x2d, qweight, scales, z_arg, dst, M, N, K,
            x2d.stride(0), x2d.stride(1), qweight.shape[1], N, M * N, per,
            G=G, HAS_ZEROS=has_zeros, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
            PARTIAL=split > 1, USE_ASM=_use_asm(p), EVEN_K=K % BK == 0, **extra, **common,
        )
        if counters is not None:
            return
    elif cfg["kernel"] == "dense":
        grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN), split)
        tk.dense_gemm_kernel[grid](
            x2d, qweight, scales, z_arg, dst, M, N, K,
            x2d.stride(0), x2d.stride(1), qweight.shape[1], N, M * N, per,
            G=G, HAS_ZEROS=has_zeros, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, PARTIAL=split > 1,
            GROUP_M=cfg.get("GROUP_M", 8), **common,
        )
    elif cfg["kernel"] == "dqmm":
        # Dequantize into a dense weight, then the dense GEMM (large M: the dense GEMM feeds the tensor
        # cores at full rate). K is cut into chunks whose 16-bit weights fit in a part of the L2
        # (chunk_mb), so the GEMM reads them back from L2 instead of DRAM; chunks after the first
        # accumulate into out (addmm, beta = 1).
        step = _dq_chunk_rows(M, K, N, p.G, BK, x2d.element_size(), cfg.get("chunk_mb", 24))
        w = torch.empty((min(step, K), N), dtype=x2d.dtype, device=x2d.device)
        for k0 in range(0, K, step):
            kc = min(step, K - k0)
            wc = w[:kc]
            g0 = 0 if G == 0 else k0 // G
            grid = (triton.cdiv(N, BN), triton.cdiv(kc, BK))
            tk.dequant_kernel[grid](
                qweight[k0 // 16:], scales[g0:], z_arg[g0:] if has_zeros else z_arg, wc, kc, N, qweight.shape[1],
                G=G, HAS_ZEROS=has_zeros, BLOCK_N=BN, BLOCK_K=BK, num_warps=cfg.get("num_warps", 4), num_stages=1,
            )
            xc = x2d[:, k0:k0 + kc]
            if k0 == 0:
                torch.mm(xc, wc, out=out)
            else:
                out.addmm_(xc, wc)
        return
    else:
        raise ValueError(f"unknown Triton kernel {cfg['kernel']!r}")
    if split > 1:
        numel = M * N
        RB = 1024
        tk.splitk_reduce_kernel[(triton.cdiv(numel, RB),)](dst, out, numel, split, BLOCK=RB, num_warps=4)
