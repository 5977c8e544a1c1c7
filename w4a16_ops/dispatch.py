"""The backend choice of w4a16.gemm, in one place.

``decide`` is a pure function of the call's facts (a Problem) and of which backends this process
has; it returns the backend and a human-readable reason. ``select`` is what the op calls: it adds
the environment override (W4A16_BACKEND), caching, and the one-time warnings.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Mapping, NamedTuple, Optional

import torch

from .backends import BACKENDS
from .problem import Problem

ENV_VAR = "W4A16_BACKEND"  # "auto" (default), "cuda", "triton" or "reference"

# Preference on a CUDA device: the first backend that is built and serves the call wins. The
# reference backend serves everything, so a call never goes without a kernel.
_DEFAULT_ORDER = ("cuda", "triton", "reference")

# Measured preference by GPU family (compute capability major), shape class and M: per class, buckets of (first M
# past the range, order). sm_9x below M = 64: the H100 sweep (benchmarks/results/h100_bench_op_full.md and
# h100_bench_op_subsets.md: 14 shapes x 14 M at fp16 G = 128, plus bf16, G = 32 and channelwise subsets), where the
# CUDA kernel leads at small M on every shape but Triton's tl.dot kernel leads at 16 <= M < 64 when K % 128 != 0
# (the CUDA kernel runs a K tail). From M = 64 to 511: the CUDA backend's wgmma kernel (sm_90a build), measured on
# the H200 (notes/sm90.md: 1.3-2.8x faster than the mma.sync kernel and dequantize + cuBLAS, which both backends ran
# there before). From M = 512: Triton's L2-chunked dequantize + cuBLAS (H100: ties within a few % from M = 256).
# Families not measured use _DEFAULT_ORDER. The points where this table is more than 5% off the fastest forced
# backend are listed in notes/dispatch.md.
_C, _T = ("cuda", "triton", "reference"), ("triton", "cuda", "reference")
_MEASURED_ORDER = {
    9: {
        "large": ((512, _C), (None, _T)),
        "large, K % 128 != 0": ((16, _C), (64, _T), (512, _C), (None, _T)),
        "small": ((512, _C), (None, _T)),
        "small, K % 128 != 0": ((16, _C), (64, _T), (512, _C), (None, _T)),
    },
}
SMALL_WEIGHTS = 1 << 24  # K * N at or below this is "small" (Llama-3-8B o_proj, 4096 x 4096, is the largest)


def shape_class(p: Problem) -> str:
    """The measured table's shape classes: 'small' (K * N <= 2^24) or 'large', and whether K % 128 != 0."""
    size = "small" if p.K * p.N <= SMALL_WEIGHTS else "large"
    return size if p.K % 128 == 0 else f"{size}, K % 128 != 0"


# With zero points the measured order differs: Triton's nibble kernel handles zero points with a rank-1 correction plus an
# exact path for tiles with Inf/NaN sums, still 1.3-2.0x slower than its symmetric path. H100, fp16, M = 1 / 16
# (notes/triton.md): CUDA 21.6 / 25.2 us against Triton 36.1 / 49.2 us on Llama-3-8B down_proj, 9.3 / 13.3 vs
# 14.5 / 14.8 on K = 2112, 8.4 / 12.4 vs 14.8 / 18.2 on N = 2120. From M = 256 both dequantize + cuBLAS.
_MEASURED_ORDER_ZEROS = {
    9: {"all shapes": ((None, _C),)},
}


def preference(p: Problem) -> tuple:
    """(order in which backends are tried for p, why that order). Pure."""
    table = _MEASURED_ORDER_ZEROS if p.has_zeros else _MEASURED_ORDER
    classes = table.get(p.capability[0]) if p.capability else None
    if classes:
        cls = "all shapes" if "all shapes" in classes else shape_class(p)
        kind = "zero-point" if p.has_zeros else "symmetric"
        lo = 1
        for limit, order in classes[cls]:
            if limit is None or p.M < limit:
                rng = f"M >= {lo}" if limit is None else f"{lo} <= M < {limit}"
                return order, (f"{order[0]} is first for {kind} weights, {cls}, on sm_{p.capability[0]}x at {rng} "
                               "(measured table in dispatch.py)")
            lo = limit
    return _DEFAULT_ORDER, f"{_DEFAULT_ORDER[0]} is first by default on {p.device_type}"


class Decision(NamedTuple):
    backend: str
    reason: str

    def __str__(self) -> str:
        return f"{self.backend}: {self.reason}"


class BackendUnavailableError(RuntimeError):
    pass


def decide(p: Problem, unavailable: Mapping[str, Optional[str]]) -> Decision:
    """The automatic choice. unavailable maps a backend name to why it is missing (None: present)."""
    if p.device_type == "cpu":
        return Decision("reference", "CPU tensors are served by the reference backend (dequantize + float32 matmul)")
    skipped = []
    order, why_order = preference(p)
    for name in order:
        why_not = unavailable.get(name) or BACKENDS[name].unsupported_reason(p)
        if why_not is None:
            return Decision(name, "; ".join([why_order] + skipped))
        skipped.append(f"not {name}: {why_not}")
    raise AssertionError("the reference backend serves every call")


def check_forced(p: Problem, name: str, unavailable: Mapping[str, Optional[str]]) -> Decision:
    """A backend asked for by name: it serves the call or this raises, never a silent fallback."""
    if name not in BACKENDS:
        raise BackendUnavailableError(
            f"w4a16.gemm: {ENV_VAR}={name!r} is not a backend; expected one of auto, {', '.join(BACKENDS)}"
        )
    why_not = unavailable.get(name) or BACKENDS[name].unsupported_reason(p)
    if why_not is not None:
        raise BackendUnavailableError(f"w4a16.gemm: backend {name!r} was forced but cannot serve {p.describe()}: {why_not}")
    return Decision(name, f"forced by {ENV_VAR}={name}")


def unavailable_backends() -> dict[str, Optional[str]]:
    return {name: b.availability() for name, b in BACKENDS.items()}


@contextlib.contextmanager
def forced(name: str):
    """Set W4A16_BACKEND=name for the block ('auto': the automatic choice), then restore it."""
    old = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ[ENV_VAR]
        else:
            os.environ[ENV_VAR] = old


def forced_backend() -> Optional[str]:
    name = os.environ.get(ENV_VAR, "auto").strip().lower()
    return None if name in ("", "auto") else name


@functools.lru_cache(maxsize=8192)
def _select(p: Problem, forced: Optional[str]) -> Decision:
    unavailable = unavailable_backends()
    if forced is not None:
        return check_forced(p, forced, unavailable)
    d = decide(p, unavailable)
    if p.device_type == "cuda" and d.backend != "cuda":
        _warn_slower_than_available(p, d, unavailable)
    return d


def select(p: Problem) -> Decision:
    return _select(p, forced_backend())


def route(device: torch.device, dtype: torch.dtype, M: int, K: int, N: int, G: int, has_zeros: bool):
    """The op's hot path: (backend module, Problem) for a call, cached on the call's plain facts."""
    return _route(device, dtype, M, K, N, G, has_zeros, os.environ.get(ENV_VAR))


@functools.lru_cache(maxsize=8192)
def _route(device, dtype, M, K, N, G, has_zeros, env_value):
    p = problem_for(device, dtype, M, K, N, G, has_zeros)
    return BACKENDS[select(p).backend], p


_warned: set = set()


def _warn_once(key, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=4)


def _warn_slower_than_available(p: Problem, d: Decision, unavailable) -> None:
    cuda_missing = unavailable.get("cuda")
    if cuda_missing is not None:
        _warn_once("cuda-missing", f"w4a16_ops: the CUDA backend is unavailable ({cuda_missing}); using slower backends")
    shape = (p.K, p.N, p.G, p.has_zeros, p.dtype)
    order, _ = preference(p)
    cuda_preferred = order.index("cuda") < order.index(d.backend)
    if cuda_missing is not None and cuda_preferred and BACKENDS["cuda"].unsupported_reason(p) is None:
        _warn_once(
            ("shape", shape),
            f"w4a16_ops: {p.describe()} runs on {d.backend}; the CUDA kernel would serve it faster "
            f"but is unavailable ({cuda_missing})",
        )
    elif d.backend == "reference":
        _warn_once(("shape", shape), f"w4a16_ops: {p.describe()} falls back to the slow reference backend: {d.reason}")


def problem_for(device: torch.device, dtype: torch.dtype, M: int, K: int, N: int, G: int, has_zeros: bool) -> Problem:
    cap = _capability(device) if device.type == "cuda" else None
    return Problem(device.type, cap, dtype, M, K, N, G, has_zeros)


@functools.lru_cache(maxsize=None)
def _check_explain_args(M, K, N, group_size, dtype) -> None:
    """The op's shape and dtype rules for explain()'s plain numbers (w4a16_ops.checks holds the tensors' version)."""
    from .format import SUPPORTED_GROUP_SIZES

    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"explain: dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    if M < 0:
        raise ValueError(f"explain: M must be >= 0, got {M}")
    if K <= 0:
        raise ValueError(f"explain: K must be positive, got {K}")
    if N <= 0 or N % 8:
        raise ValueError(f"explain: N must be a positive multiple of 8, got {N}")
    if group_size not in (-1, K) and group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"explain: group_size must be 32, 64, 128, 256, -1 or K = {K}, got {group_size}")
    if group_size not in (-1, K) and K % group_size:
        raise ValueError(f"explain: K = {K} must be a multiple of group_size = {group_size}")


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def explain(
    M: int,
    K: int,
    N: int,
    *,
    group_size: int = 128,
    dtype: torch.dtype = torch.float16,
    zeros: bool = False,
    device: str = "cuda",
    capability: Optional[tuple[int, int]] = None,
    unavailable: Optional[Mapping[str, Optional[str]]] = None,
) -> Decision:
    """Which backend w4a16.gemm would use for this call, and why.

    capability and unavailable default to this machine; pass them to ask about another one, e.g.
    explain(1, 2112, 4096, capability=(9, 0), unavailable={}) for an H100 with every backend built. Arguments the
    op would reject raise ValueError (naming the argument, the expected and the given value). Asked about CUDA on a
    machine without a CUDA device and no capability, it answers for sm_90 and its reason says so.
    """
    _check_explain_args(M, K, N, group_size, dtype)
    dev = torch.device(device)
    G = K if group_size in (-1, K) else group_size
    assumed = ""
    if capability is None and dev.type == "cuda":
        if torch.cuda.is_available():
            capability = _capability(dev)
        else:
            capability, assumed = (9, 0), " [no CUDA device here: answered for sm_90; pass capability= for another GPU]"
    p = Problem(dev.type, capability, dtype, M, K, N, G, zeros)
    forced = None
    if unavailable is None:
        unavailable = unavailable_backends()
        forced = forced_backend()
    if forced is not None:
        d = check_forced(p, forced, unavailable)
    else:
        d = decide(p, {n: unavailable.get(n) for n in BACKENDS})
    return d._replace(reason=d.reason + assumed)
