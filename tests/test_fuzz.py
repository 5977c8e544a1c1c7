"""Fuzzed calls of w4a16.gemm (issue 7): random VALID calls must equal the float64 reference on every
available backend (forced, and through the automatic choice); random INVALID calls must raise a
ValueError "w4a16.gemm: ..." naming what is wrong, never another exception, never a crash.

Cases come from a seeded generator: case i of a run is a pure function of (seed, kind, profile, i), so a
failure is replayed with

    python tests/test_fuzz.py replay --kind valid --profile gpu --device cuda --seed S --index I

Valid calls cover M in {0, 1, odd, round +- 1, large}, every group size, channelwise with K % 16 != 0,
N % 64 != 0, zeros or not, fp16/bf16, random scale signs, leading dims (and 1-d x), and these layouts of x:
contiguous, every other column with a storage offset, a storage offset of one element (x not 16-byte
aligned), rows padded (row stride > K), column-major, broadcast rows (row stride 0). Bytes around x that
are not x hold NaN, so a kernel reading outside x (within the allocation) fails the comparison. Some cases
put qweight / scales / zeros at an odd storage offset inside a larger buffer (contiguous, not 16-byte
aligned), and some fill qweight's padding (k >= K or n >= N, which the format says backends never read
as weight) with random bits.

Each backend is called directly on an output buffer full of NaN with NaN guard zones around it (an
element not written fails; a write outside out changes a guard and fails), and through the op with
W4A16_BACKEND forcing it; the automatic choice runs through the op. The inputs (with the bytes around
them) must be unchanged afterwards.

The CPU tests run in-process. The GPU tests run the generator in a child process (this file's main()),
so a kernel that kills the CUDA context (illegal or misaligned address) is reported with its case and
the run goes on from the next case in a fresh process. scripts/sanitize_cases.py reuses this file for
compute-sanitizer runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

if __name__ == "__main__":  # run as a child process / replay: make the checkout importable
    sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import pytest
import torch

from w4a16_ops import dispatch  # (importing w4a16_ops registers the op)
from w4a16_ops.backends import BACKENDS
from w4a16_ops.backends.reference import gemm_float64
from w4a16_ops.format import SUPPORTED_GROUP_SIZES, pack_qweight, pack_zeros, qweight_shape

from helpers import TOLERANCE

SEED = int(os.environ.get("W4A16_FUZZ_SEED", "20261124"))
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
GUARD = 256  # elements of NaN before and after each direct call's output
SENTINEL = -1446  # int16 bits 0xFA5A: a NaN in float16 and in bfloat16


# ------------------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class Profile:
    max_groups: int  # K = G * groups, groups <= this
    max_k: int
    odd_k: tuple  # channelwise K (G = K), many not multiples of 16
    max_n: int
    edge_n: tuple  # N near the 64-column tile boundaries
    m_large: tuple  # (lo, hi) of the "large-ish" M
    max_mkn: int  # M * K * N bound (M is halved until under it)
    fp16_only: bool = False
    w_offset_p: float = 0.12  # weights at an odd offset inside a larger buffer
    dirty_p: float = 0.25  # random bits in qweight's padding
    forced_p: float = 1.0  # share of cases that also run each backend forced through the op (CPU: time)


PROFILES = {
    "cpu": Profile(8, 1024, (1, 3, 8, 17, 24, 40, 72, 100, 136, 200, 264, 520), 384,
                   (8, 56, 64, 72, 120, 128, 136, 192, 264), (100, 400), 2**24, forced_p=0.5),
    # Triton's interpreter (numpy, no bf16 tl.dot): tiny and fp16 only.
    "interp": Profile(2, 128, (8, 24, 40, 72), 128, (8, 56, 64, 72, 120), (17, 40), 2**15, fp16_only=True),
    # GPU: weights at odd offsets get their own run ("gpu_w_offset"): a kernel that assumes 16-byte aligned
    # weights may kill the CUDA context on every such case, which must not cut the main run short.
    "gpu": Profile(32, 8192, (1, 3, 8, 24, 40, 72, 136, 200, 520, 1000, 2056, 4104), 8192,
                   (8, 56, 64, 72, 120, 136, 1032, 2120, 4096, 4104, 8192), (200, 5000), 2**33, w_offset_p=0.0),
    "gpu_w_offset": Profile(8, 2048, (8, 24, 40, 136, 200, 1000), 1024, (8, 56, 64, 72, 136, 264), (200, 2000),
                            2**30, w_offset_p=1.0),
    # compute-sanitizer runs are ~100x slower: small shapes (weights at offsets only with --weights-at-offsets).
    "sanitize": Profile(4, 512, (8, 24, 40, 136, 200), 264, (8, 56, 64, 72, 136, 264), (65, 300), 2**22,
                        w_offset_p=0.0),
    "sanitize_w_offset": Profile(4, 512, (8, 24, 40, 136, 200), 264, (8, 56, 64, 72, 136, 264), (65, 300), 2**22,
                                 w_offset_p=1.0),
}


# ------------------------------------------------------------------------------------- valid specs
@dataclass(frozen=True)
class Spec:
    M: int
    lead: tuple  # x.shape[:-1] (product M); () means 1-d x
    K: int
    N: int
    G: int
    zeros: bool
    dtype: str
    layout: str  # contig | strided | offset | rowpad | colmajor | bcast
    w_offset: bool
    dirty_pad: bool
    neg_scales: bool
    seed: int

    def describe(self) -> str:
        g = f"K({self.G})" if self.G == self.K else str(self.G)
        extra = (" w@offset" if self.w_offset else "") + (" dirty-padding" if self.dirty_pad else "")
        return (f"M={self.M} x.shape={list(self.lead) + [self.K]} K={self.K} N={self.N} G={g} "
                f"{'zeros' if self.zeros else 'sym'} {self.dtype} x={self.layout}{extra} data_seed={self.seed}")


LAYOUTS = ("contig", "strided", "offset", "rowpad", "colmajor", "bcast")


def _choose_m(rng: random.Random, P: Profile) -> int:
    r = rng.random()
    if r < 0.04:
        return 0
    if r < 0.30:
        return 1
    if r < 0.55:
        return rng.randrange(3, 64, 2)
    if r < 0.78:
        return max(1, rng.choice([2, 4, 8, 16, 32, 64, 128]) + rng.choice([-1, 0, 1]))
    return rng.randint(*P.m_large)


def _choose_lead(rng: random.Random, M: int) -> tuple:
    if M == 0:
        return rng.choice([(0,), (0,), (2, 0), (0, 3)])
    r = rng.random()
    if r < 0.08 and M == 1:
        return ()
    if r < 0.25:
        divisors = [d for d in range(1, min(M, 64) + 1) if M % d == 0]
        d = rng.choice(divisors)
        return (d, M // d)
    if r < 0.32:
        return (1, M, 1) if rng.random() < 0.5 else (M, 1)
    return (M,)


def valid_spec(rng: random.Random, profile: str) -> Spec:
    P = PROFILES[profile]
    dtype = "float16" if P.fp16_only else rng.choice(["float16", "bfloat16"])
    if rng.random() < 0.2:
        K = rng.choice(P.odd_k)
        G = K
    else:
        G = rng.choice([g for g in SUPPORTED_GROUP_SIZES if g <= P.max_k])
        K = G * rng.randint(1, max(1, min(P.max_groups, P.max_k // G)))
        if rng.random() < 0.1:
            G = K  # channelwise on a multiple of 32
    N = rng.choice(P.edge_n) if rng.random() < 0.35 else 8 * rng.randint(1, P.max_n // 8)
    M = _choose_m(rng, P)
    while M > 1 and M * K * N > P.max_mkn:
        M = M // 2 + (M % 2)  # keeps odd M odd-ish, stops at 1
        if M * K * N <= P.max_mkn:
            break
    lead = _choose_lead(rng, M)
    layout = "contig" if M == 0 else rng.choice(LAYOUTS)
    return Spec(M, lead, K, N, G, rng.random() < 0.5, dtype, layout, rng.random() < P.w_offset_p,
                rng.random() < P.dirty_p, rng.random() < 0.5, rng.randrange(2**31))


def case_rng(seed: int, kind: str, profile: str, i: int) -> random.Random:
    return random.Random(f"{seed}/{kind}/{profile}/{i}")


# ------------------------------------------------------------------------------------- building tensors
@dataclass
class Built:
    x: torch.Tensor
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    bases: list  # the tensors owning every byte the call may read: must be unchanged after the call

    @property
    def args(self):
        return (self.x, self.qweight, self.scales, self.zeros)


def _nan_full(shape, dtype, device):
    t = torch.empty(shape, dtype=dtype, device=device)
    t.view(torch.int16).fill_(SENTINEL)
    return t


def _place_x(data: torch.Tensor, layout: str, rng: random.Random):
    """data [M, K] -> (x2d with the layout, base tensor owning its storage). Non-x bytes hold NaN."""
    M, K = data.shape
    dt, dev = data.dtype, data.device
    if layout == "contig":
        x = data.clone()
        return x, x
    if layout == "strided":
        base = _nan_full((M, 2 * K + 3), dt, dev)
        x = base[:, 3::2]
    elif layout == "offset":
        base = _nan_full((M * K + 2,), dt, dev)
        x = base[1 : 1 + M * K].view(M, K)
    elif layout == "rowpad":
        base = _nan_full((M, K + rng.choice([1, 3, 8, 13])), dt, dev)
        x = base[:, :K]
    elif layout == "colmajor":
        base = torch.empty((K, M), dtype=dt, device=dev)
        x = base.t()
    elif layout == "bcast":
        base = data[:1].clone()
        return base.expand(M, K), base
    else:
        raise ValueError(layout)
    x.copy_(data)
    return x, base


def _in_buffer(t: torch.Tensor, offset: int, tail: int = 8):
    """t as a contiguous view at `offset` elements inside a larger buffer whose other bytes are junk (NaN)."""
    n = t.numel()
    if t.dtype.is_floating_point:
        buf = _nan_full((n + offset + tail,), t.dtype, t.device)
    else:
        buf = torch.full((n + offset + tail,), 0x5A5A5A5A, dtype=t.dtype, device=t.device)
    v = buf[offset : offset + n].view(t.shape)
    v.copy_(t)
    return v, buf


def build(spec: Spec, device, tight: bool = False) -> Built:
    """tight: the weights end where their allocation ends (no junk tail), so compute-sanitizer sees a read
    past their end (scripts/sanitize_cases.py runs with PyTorch's caching allocator off)."""
    dev = torch.device(device)
    dtype = DTYPES[spec.dtype]
    gen = torch.Generator(device=dev).manual_seed(spec.seed)
    K, N, G, M = spec.K, spec.N, spec.G, spec.M
    ng = K // G
    local = random.Random(spec.seed)

    q = torch.randint(0, 16, (N, K), generator=gen, device=dev, dtype=torch.uint8)
    qweight = pack_qweight(q)
    if spec.dirty_pad:
        valid = pack_qweight(torch.full((N, K), 15, dtype=torch.uint8, device=dev))
        junk = (torch.randint(0, 2**32, qweight.shape, generator=gen, device=dev, dtype=torch.int64) - 2**31)
        qweight = qweight | (junk.to(torch.int32) & ~valid)
    s = (torch.rand((ng, N), generator=gen, device=dev) + 0.5) / math.sqrt(K) / 4
    if spec.neg_scales:
        s = torch.where(torch.rand((ng, N), generator=gen, device=dev) < 0.5, -s, s)
    scales = s.to(dtype)
    zeros = None
    if spec.zeros:
        zeros = pack_zeros(torch.randint(0, 16, (ng, N), generator=gen, device=dev, dtype=torch.uint8))

    off = (lambda: local.choice([1, 2, 3, 5])) if spec.w_offset else (lambda: 0)
    tail = 0 if tight else 8
    qweight, qbuf = _in_buffer(qweight, off(), tail)
    scales, sbuf = _in_buffer(scales, off(), tail)
    bases = [qbuf, sbuf]
    if zeros is not None:
        zeros, zbuf = _in_buffer(zeros, off(), tail)
        bases.append(zbuf)

    data = torch.randn((M, K), generator=gen, device=dev).to(dtype)
    x2d, xbase = _place_x(data, spec.layout, local)
    bases.append(xbase)
    x = x2d[0] if spec.lead == () else x2d.view(*spec.lead, K)
    return Built(x, qweight, scales, zeros, bases)


# ------------------------------------------------------------------------------------- checking
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """helpers.rel_err on the tensors' device (a GPU run compares thousands of outputs)."""
    denom = ref.norm().item()
    diff = (out.to(torch.float64) - ref).norm().item()
    return diff / denom if denom > 0 else diff


def compare(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> Optional[str]:
    """None if out matches the float64 reference within tests/helpers.TOLERANCE, else what is wrong."""
    if out.dtype != dtype:
        return f"output dtype {out.dtype}, expected {dtype}"
    if tuple(out.shape) != tuple(ref.shape):
        return f"output shape {list(out.shape)}, expected {list(ref.shape)}"
    if out.numel() == 0:
        return None
    bad = ~torch.isfinite(out)
    if bad.any():
        n_bad = int(bad.sum())
        first = [int(i) for i in bad.nonzero()[0]]
        return f"{n_bad} of {out.numel()} output elements not finite (unwritten or garbage), first at {first}"
    err = rel_err(out, ref)
    if not err <= TOLERANCE[dtype]:
        return f"relative error {err:.3e} > {TOLERANCE[dtype]:.3e}"
    return None


forced = dispatch.forced  # re-exported for the other robustness tests


def problem_of(x, scales, zeros):
    K = x.shape[-1]
    M = x.numel() // K
    return dispatch.problem_for(x.device, x.dtype, M, K, scales.shape[1], K // scales.shape[0], zeros is not None)


def serving_backends(p, *, interp_ok: bool = False) -> list:
    """Backends available in this process that serve p. Triton on CPU tensors runs in its interpreter:
    only where the caller allows it (tiny fp16 cases) and TRITON_INTERPRET=1."""
    names = []
    for name, why in dispatch.unavailable_backends().items():
        if why is not None or BACKENDS[name].unsupported_reason(p) is not None:
            continue
        if name == "triton" and p.device_type == "cpu":
            if not interp_ok or os.environ.get("TRITON_INTERPRET") != "1" or p.dtype != torch.float16:
                continue
        names.append(name)
    return names


def run_direct(name: str, x, qweight, scales, zeros):
    """One backend's gemm() on a NaN output with NaN guard zones. Returns (out with x's leading dims, guard error)."""
    K, N = x.shape[-1], scales.shape[1]
    x2d = x.reshape(-1, K)
    M = x2d.shape[0]
    p = problem_of(x, scales, zeros)
    buf = _nan_full((M * N + 2 * GUARD,), x.dtype, x.device)
    out = buf[GUARD : GUARD + M * N].view(M, N)
    BACKENDS[name].gemm(x2d, qweight, scales, zeros, p, out)
    bits = buf.view(torch.int16)
    guard_err = None
    if not ((bits[:GUARD] == SENTINEL).all() and (bits[GUARD + M * N :] == SENTINEL).all()):
        guard_err = "wrote outside out (a NaN guard zone around the output changed)"
    return out.view(*x.shape[:-1], N), guard_err


def _snapshot(bases):
    return [b.clone() for b in bases]


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.element_size() == 2:
        return torch.equal(a.view(torch.int16), b.view(torch.int16))
    return torch.equal(a, b)


def is_fatal(e: BaseException) -> bool:
    """A CUDA error that leaves the context unusable (the process must end)."""
    s = str(e)
    keys = ("illegal memory access", "misaligned address", "unspecified launch failure", "illegal instruction",
            "device-side assert", "CUDA error", "an illegal")
    return any(k in s for k in keys) and torch.cuda.is_available()


def check_valid(spec: Spec, device, *, interp_ok: bool = False, with_auto: bool = True, forced_p: float = 1.0,
                only=None, tight: bool = False) -> dict:
    """Run one valid case on every path (only: a subset of backend names). Returns
    {"paths": [...], "failures": [...], "skipped": [...]}."""
    b = build(spec, device, tight)
    dtype = DTYPES[spec.dtype]
    ref = gemm_float64(*b.args)
    snap = _snapshot(b.bases)
    p = problem_of(b.x, b.scales, b.zeros)
    names = [n for n in serving_backends(p, interp_ok=interp_ok) if only is None or n in only]
    res = {"paths": [], "failures": [], "skipped": []}
    for name in dispatch.unavailable_backends():
        if name not in names:
            res["skipped"].append(name)

    def attempt(path: str, fn: Callable):
        res["paths"].append(path)
        try:
            msg = fn()
        except Exception as e:  # any exception on a valid call is a failure; CUDA errors end the run
            if is_fatal(e):
                raise
            msg = f"raised {type(e).__name__}: {str(e)[:400]}"
        if msg:
            res["failures"].append(f"{path}: {msg}")

    for name in names:
        if spec.M > 0:  # the op never calls a backend with M = 0

            def direct(name=name):
                out, guard_err = run_direct(name, *b.args)
                return guard_err or compare(out, ref, dtype)

            attempt(f"{name} direct", direct)
            if random.Random(spec.seed + 1).random() >= forced_p:
                continue

        def via_op(name=name):
            with forced(name):
                return compare(torch.ops.w4a16.gemm(*b.args), ref, dtype)

        attempt(f"{name} forced", via_op)
    if with_auto:

        def auto():
            with forced("auto"):
                return compare(torch.ops.w4a16.gemm(*b.args), ref, dtype)

        attempt("auto", auto)
    if not all(_same_bits(a, s) for a, s in zip(b.bases, snap)):
        res["failures"].append("inputs changed: a backend wrote into x, qweight, scales or zeros (or next to them)")
    return res


# ------------------------------------------------------------------------------------- invalid calls
def contract_violations(x, qweight, scales, zeros) -> list:
    """The op contract (README), written independently of checks.py. Returns, for each rule the call
    breaks, a phrase the error message must contain if it reports that rule. Empty: the call is valid."""
    v = []
    if x.dtype not in (torch.float16, torch.bfloat16):
        v.append("x must be")
    if x.dim() < 1:
        v.append("x must have")
    if scales.dtype != x.dtype:
        v.append("scales must have the dtype")
    if qweight.dtype != torch.int32:
        v.append("qweight must be torch.int32")
    if zeros is not None and zeros.dtype != torch.int32:
        v.append("zeros must be None or torch.int32")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t is not None and t.device != x.device:
            v.append(f"{name} must be on the device")
    if scales.dim() != 2:
        v.append("scales must be 2-D")
    if x.dim() >= 1 and scales.dim() == 2:
        K = x.shape[-1]
        ng, N = scales.shape
        if K == 0:
            v.append("K = x.shape[-1] must be positive")
        elif ng == 0 or K % ng:
            v.append("must be a multiple of scales.shape[0]")
        elif ng != 1 and K // ng not in SUPPORTED_GROUP_SIZES:
            v.append("group size G")
        if N == 0 or N % 8:
            v.append("N = scales.shape[1]")
        if K > 0 and tuple(qweight.shape) != qweight_shape(K, N):
            v.append("qweight must have shape")
        if zeros is not None and tuple(zeros.shape) != (ng, N // 8):
            v.append("zeros must have shape")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t is not None and not t.is_contiguous():
            v.append(f"{name} must be contiguous")
    return v


def _small_valid(rng: random.Random, device):
    K, G = rng.choice([(64, 32), (128, 64), (256, 128), (256, 256), (512, 128), (40, 40), (24, 24), (100, 100)])
    N = rng.choice([8, 64, 72, 136])
    M = rng.choice([0, 1, 3, 17])
    spec = Spec(M, (M,), K, N, G, rng.random() < 0.5, rng.choice(list(DTYPES)), "contig", False, False, False,
                rng.randrange(2**31))
    return build(spec, device)


def _rand_int32(shape, device):
    return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, device=device)


def _other_device(device):
    return "meta" if torch.device(device).type == "cpu" else "cpu"


def _fresh(K, N, ng, dtype, device, zeros: bool, M=3, qshape=None):
    """A call whose tensors have the shapes for (K, N, ng), contents random (used for bad K, G, N)."""
    x = torch.randn(M, K, device=device).to(dtype)
    q = _rand_int32(qshape or qweight_shape(K, max(N, 1)), device)
    s = torch.rand(ng, N, device=device).to(dtype)
    z = _rand_int32((ng, N // 8), device) if zeros else None
    return x, q, s, z


def invalid_call(rng: random.Random, device):
    """(label, (x, qweight, scales, zeros)): a valid small call with one thing broken."""
    b = _small_valid(rng, device)
    x, q, s, z = b.args
    dtype = x.dtype
    K, N = x.shape[-1], s.shape[1]
    ng = s.shape[0]
    other16 = torch.bfloat16 if dtype == torch.float16 else torch.float16
    kind = rng.choice([
        "x_dtype", "x_0d", "scales_dtype", "qweight_dtype", "zeros_dtype", "device", "qweight_rows",
        "qweight_cols", "qweight_rank", "scales_rows", "scales_cols", "scales_rank", "zeros_shape", "x_k",
        "g_unsupported", "k_not_multiple", "n_not_multiple_8", "non_contiguous", "k_zero",
    ])
    if kind == "x_dtype":
        x = x.to(rng.choice([torch.float32, torch.float64, torch.int32, torch.int16, torch.uint8, torch.bool,
                             torch.float8_e4m3fn]))
    elif kind == "x_0d":
        x = torch.tensor(0.5, dtype=dtype, device=device)
    elif kind == "scales_dtype":
        s = s.to(rng.choice([other16, torch.float32, torch.float64, torch.int32]))
    elif kind == "qweight_dtype":
        r = rng.random()
        q = q.view(torch.float32) if r < 0.25 else q.view(torch.uint32) if r < 0.5 else \
            q.to(rng.choice([torch.int64, torch.int16, torch.uint8]))
    elif kind == "zeros_dtype":
        zz = z if z is not None else _rand_int32((ng, N // 8), device)
        z = zz.to(rng.choice([torch.uint8, torch.int64, torch.int16, torch.float16]))
    elif kind == "device":
        other = _other_device(device)
        which = rng.choice(["x", "qweight", "scales", "zeros"])
        if which == "x":
            x = x.to(other)
        elif which == "qweight":
            q = q.to(other)
        elif which == "scales":
            s = s.to(other)
        else:
            z = (z if z is not None else _rand_int32((ng, N // 8), device)).to(other)
    elif kind == "qweight_rows":
        r0 = max(0, q.shape[0] + rng.choice([-2, -1, 1, 2, q.shape[0]]))
        q = _rand_int32((r0, q.shape[1]), device)
    elif kind == "qweight_cols":
        c = max(0, q.shape[1] + rng.choice([-128, -1, 1, 4, 128, q.shape[1]]))
        q = _rand_int32((q.shape[0], c), device)
    elif kind == "qweight_rank":
        q = rng.choice([q.flatten(), q.unsqueeze(0), q[0], q.reshape(q.shape[0], -1, 4)])
    elif kind == "scales_rows":
        r0 = max(0, rng.choice([ng - 1, ng + 1, 2 * ng, ng // 2, 0]))
        s = torch.rand(r0, N, device=device).to(dtype)
    elif kind == "scales_cols":
        c = max(0, N + rng.choice([-8, 8, 64, -1, 3, 4, -N]))
        s = torch.rand(ng, c, device=device).to(dtype)
    elif kind == "scales_rank":
        s = rng.choice([s.flatten(), s.unsqueeze(0), s[0], s[0, 0]])
    elif kind == "zeros_shape":
        r = rng.random()
        if r < 0.6:
            d1, d2 = rng.choice([(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1)])
            z = _rand_int32((max(0, ng + d1), max(0, N // 8 + d2)), device)
        elif r < 0.8:
            z = _rand_int32((ng * (N // 8),), device)
        else:
            z = _rand_int32((N // 8, ng) if N // 8 != ng else (ng, N // 8, 1), device)
    elif kind == "x_k":
        k2 = max(0, K + rng.choice([-16, -8, -1, 1, 8, 16, K]))
        x = torch.randn(*x.shape[:-1], k2, device=device).to(dtype)
    elif kind == "g_unsupported":
        Gb = rng.choice([8, 16, 24, 48, 96, 160, 512, 1024])
        ngb = rng.choice([2, 3])
        x, q, s, z = _fresh(Gb * ngb, N, ngb, dtype, device, z is not None)
    elif kind == "k_not_multiple":
        Kb, ngb = rng.choice([(100, 3), (250, 4), (66, 4), (129, 2), (256, 3), (96, 64)])
        x, q, s, z = _fresh(Kb, N, ngb, dtype, device, z is not None)
    elif kind == "n_not_multiple_8":
        Nb = rng.choice([1, 4, 7, 12, 66, 100, 130])
        x, q, s, z = _fresh(K, Nb, ng, dtype, device, z is not None)
    elif kind == "non_contiguous":
        which = rng.choice(["qweight", "scales", "zeros"])
        t = {"qweight": q, "scales": s, "zeros": z if z is not None else _rand_int32((ng, N // 8), device)}[which]
        if t.shape[0] > 1 and t.shape[1] > 1 and rng.random() < 0.5:
            nc = torch.empty(t.shape[1], t.shape[0], dtype=t.dtype, device=device).t()
        else:
            nc = torch.empty(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=device)[:, ::2]
        nc.copy_(t)
        if which == "qweight":
            q = nc
        elif which == "scales":
            s = nc
        else:
            z = nc
    elif kind == "k_zero":
        x = torch.empty(*x.shape[:-1], 0, dtype=dtype, device=device)
    return kind, (x, q, s, z)


def check_invalid(kind: str, args, rng: random.Random, *, fake: bool) -> dict:
    """The call must raise ValueError('w4a16.gemm: ...') naming a broken rule, eagerly, with any backend
    forced (checks come before the backend choice), and under FakeTensorMode with the same words."""
    res = {"failures": [], "stayed_valid": False}
    v = contract_violations(*args)
    x = args[0]
    if not v:  # the mutation happened to give a valid call (e.g. G 64 -> 32): it must then compute correctly
        res["stayed_valid"] = True
        if x.device.type == "meta":
            return res
        try:
            msg = compare(torch.ops.w4a16.gemm(*args), gemm_float64(*args), x.dtype)
        except Exception as e:
            if is_fatal(e):
                raise
            msg = f"raised {type(e).__name__}: {str(e)[:300]}"
        if msg:
            res["failures"].append(f"{kind} (a valid call after all): {msg}")
        return res
    shapes = ", ".join(f"{n}={t.dtype} {list(t.shape)} {t.device}" if t is not None else f"{n}=None"
                       for n, t in zip(("x", "qweight", "scales", "zeros"), args))
    backend = rng.choice(["auto", *BACKENDS])

    def one(where: str, call):
        try:
            call()
        except ValueError as e:
            msg = str(e)
            if not msg.startswith("w4a16.gemm: "):
                res["failures"].append(f"{kind} [{where}] unclear message {msg!r} ({shapes})")
            elif not any(key in msg for key in v):
                res["failures"].append(f"{kind} [{where}] message {msg!r} names none of the broken rules {v} ({shapes})")
            return msg
        except Exception as e:
            if is_fatal(e):
                raise
            res["failures"].append(f"{kind} [{where}] raised {type(e).__name__} (not ValueError): {str(e)[:300]} ({shapes})")
        else:
            res["failures"].append(f"{kind} [{where}] did not raise; broken rules {v} ({shapes})")
        return None

    eager = one("eager", lambda: torch.ops.w4a16.gemm(*args))
    with forced(backend):
        one(f"W4A16_BACKEND={backend}", lambda: torch.ops.w4a16.gemm(*args))
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        def in_fake():
            with FakeTensorMode() as mode:
                torch.ops.w4a16.gemm(*[mode.from_tensor(t) if t is not None else None for t in args])

        msg = one("fake", in_fake)
        if eager is not None and msg is not None and msg != eager:
            res["failures"].append(f"{kind}: fake message {msg!r} differs from eager {eager!r}")
    return res


# ------------------------------------------------------------------------------------- runs
def new_summary(kind: str) -> dict:
    return {"kind": kind, "cases": 0, "paths": {}, "skipped": {}, "failures": [], "stayed_valid": 0,
            "mutations": {}, "crashes": 0, "stopped_early": False, "seconds": 0.0}


def _add(summary: dict, key: str, name: str, n: int = 1):
    summary[key][name] = summary[key].get(name, 0) + n


def run_one(kind: str, profile: str, device, seed: int, i: int, *, interp_ok=False, with_auto=True) -> dict:
    """Case i of a run: {"desc", "paths", "skipped", "failures", "mutation", "stayed_valid"}."""
    rng = case_rng(seed, kind, profile, i)
    if kind == "valid":
        spec = valid_spec(rng, profile)
        r = check_valid(spec, device, interp_ok=interp_ok, with_auto=with_auto, forced_p=PROFILES[profile].forced_p)
        r["desc"] = spec.describe()
        return r
    mutation, args = invalid_call(rng, device)
    r = check_invalid(mutation, args, rng, fake=rng.random() < 0.25)
    r.update(desc=mutation, mutation=mutation, paths=[], skipped=[])
    return r


def merge(summary: dict, i: int, r: dict):
    summary["cases"] += 1
    for path in r.get("paths", []):
        _add(summary, "paths", path)
    for name in r.get("skipped", []):
        _add(summary, "skipped", name)
    if r.get("mutation"):
        _add(summary, "mutations", r["mutation"])
    summary["stayed_valid"] += bool(r.get("stayed_valid"))
    for f in r.get("failures", []):
        summary["failures"].append(f"case {i} [{r['desc']}]: {f}")


def run_range(kind, profile, device, seed, start, count, deadline, *, interp_ok=False, with_auto=True,
              on_begin=None, on_end=None) -> dict:
    summary = new_summary(kind)
    t0 = time.monotonic()
    for i in range(start, start + count):
        if time.monotonic() > deadline:
            summary["stopped_early"] = True
            break
        if on_begin:
            on_begin(i)
        r = run_one(kind, profile, device, seed, i, interp_ok=interp_ok, with_auto=with_auto)
        merge(summary, i, r)
        if on_end:
            on_end(i, r)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    summary["seconds"] = round(time.monotonic() - t0, 1)
    return summary


def format_summary(s: dict) -> str:
    paths = ", ".join(f"{k} {v}" for k, v in sorted(s["paths"].items()))
    line = f"{s['kind']}: {s['cases']} cases in {s['seconds']} s"
    if s["kind"] == "valid":
        line += f"; checked calls: {sum(s['paths'].values())} ({paths})"
        if s["skipped"]:
            line += f"; backend not serving/unavailable: {dict(sorted(s['skipped'].items()))}"
    else:
        line += f" ({s['stayed_valid']} mutations turned out valid and were checked as valid calls)"
    if s.get("crashes"):
        line += f"; {s['crashes']} crashed processes"
    if s["stopped_early"]:
        line += "; stopped at the time budget"
    line += f"; {len(s['failures'])} failures"
    return line


def _fail_message(s: dict) -> str:
    head = "\n  ".join(s["failures"][:25])
    more = f"\n  ... and {len(s['failures']) - 25} more" if len(s["failures"]) > 25 else ""
    return f"{format_summary(s)}\n  {head}{more}\nreplay one: python tests/test_fuzz.py replay --kind {s['kind']} ..."


# ------------------------------------------------------------------------------------- child process (GPU)
def child_main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["run", "replay"])
    ap.add_argument("--kind", choices=["valid", "invalid"], required=True)
    ap.add_argument("--profile", default="gpu", choices=list(PROFILES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--end", type=int, default=1, help="run cases start, start + stride, ... < end")
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--budget", type=float, default=1e9, help="seconds")
    ap.add_argument("--log", help="JSON-lines progress file (run mode)")
    a = ap.parse_args(argv)
    interp_ok = torch.device(a.device).type == "cpu"  # CPU: Triton runs in its interpreter (tiny fp16 cases)
    if a.mode == "replay":
        rng = case_rng(a.seed, a.kind, a.profile, a.index)
        if a.kind == "valid":
            print(valid_spec(rng, a.profile).describe())
        r = run_one(a.kind, a.profile, a.device, a.seed, a.index, interp_ok=interp_ok)
        print(json.dumps(r, indent=1, default=str))
        return 1 if r["failures"] else 0
    log = open(a.log, "a") if a.log else sys.stdout

    def emit(obj):
        log.write(json.dumps(obj) + "\n")
        log.flush()

    deadline = time.monotonic() + a.budget
    for i in range(a.start, a.end, a.stride):
        if time.monotonic() > deadline:
            emit({"stopped_early": True})
            break
        emit({"begin": i})
        if os.environ.get("W4A16_FUZZ_CRASH_AT") == str(i):  # test hook: a child dying mid-case (see the CPU test)
            os.abort()
        try:
            r = run_one(a.kind, a.profile, a.device, a.seed, i, interp_ok=interp_ok)
            if torch.device(a.device).type == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # only fatal CUDA errors get here (check_* catch the rest)
            emit({"end": i, "fatal": f"{type(e).__name__}: {str(e)[:500]}", "desc": _desc(a, i)})
            return 3
        emit({"end": i, "r": r})
    emit({"done": True})
    return 0


def _desc(a, i) -> str:
    if a.kind != "valid":
        return "invalid call"
    return valid_spec(case_rng(a.seed, a.kind, a.profile, i), a.profile).describe()


def _merge_summaries(kind: str, parts: list) -> dict:
    total = new_summary(kind)
    for s in parts:
        for key in ("cases", "stayed_valid", "crashes"):
            total[key] += s[key]
        for key in ("paths", "skipped", "mutations"):
            for name, n in s[key].items():
                _add(total, key, name, n)
        total["failures"] += s["failures"]
        total["stopped_early"] |= s["stopped_early"]
    return total


def _drive_worker(kind, profile, device, first, stride, count, deadline, seed, max_restarts) -> dict:
    """Cases first, first + stride, ... < count in child processes, restarting after a crash."""
    summary = new_summary(kind)
    start = first
    here = os.path.abspath(__file__)
    while start < count:
        left = deadline - time.monotonic()
        if left <= 0:
            summary["stopped_early"] = True
            break
        with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as f:
            log_path = f.name
        cmd = [sys.executable, here, "run", "--kind", kind, "--profile", profile, "--device", device,
               "--seed", str(seed), "--start", str(start), "--end", str(count), "--stride", str(stride),
               "--budget", str(left), "--log", log_path]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=left + 120)
            rc, tail = proc.returncode, proc.stdout[-2000:]
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc, tail = "timeout", out[-2000:]
        with open(log_path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        os.unlink(log_path)
        begun, finished = None, False
        for obj in lines:
            if "begin" in obj:
                begun = obj["begin"]
            elif "end" in obj:
                if "fatal" in obj:
                    summary["failures"].append(f"case {obj['end']} [{obj['desc']}]: CUDA context died: {obj['fatal']}")
                    summary["cases"] += 1
                else:
                    merge(summary, obj["end"], obj["r"])
                begun = None
                start = obj["end"] + stride
            elif obj.get("stopped_early"):
                summary["stopped_early"] = True
                finished = True
            elif obj.get("done"):
                finished = True
        if finished:
            break
        # The child died without a clean end.
        summary["crashes"] += 1
        if begun is not None:
            summary["cases"] += 1
            summary["failures"].append(f"case {begun}: the process died (exit {rc}) during it; output tail: {tail[-600:]}")
            start = begun + stride
        elif rc != 3:
            summary["failures"].append(f"the child process failed (exit {rc}) outside any case: {tail[-1500:]}")
            break
        if summary["crashes"] > max_restarts:
            summary["failures"].append(f"gave up after {summary['crashes']} crashed processes")
            break
    return summary


def drive(kind: str, profile: str, device: str, count: int, budget: float, seed: int = SEED,
          workers: int = 1, max_restarts: int = 20) -> dict:
    """Run cases [0, count) in `workers` child processes at once (case i in worker i % workers: Triton's
    first-call compilations run in parallel); a process that dies (or kills its CUDA context) is reported
    with its case and a fresh one goes on from the worker's next case."""
    import threading

    t0 = time.monotonic()
    deadline = t0 + budget
    parts = [None] * workers

    def work(w):
        parts[w] = _drive_worker(kind, profile, device, w, workers, count, deadline, seed, max_restarts)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary = _merge_summaries(kind, parts)
    summary["seconds"] = round(time.monotonic() - t0, 1)
    return summary


# ------------------------------------------------------------------------------------- tests
def _report(name: str, s: dict, record_property=None):
    line = f"{name}: {format_summary(s)}"
    print("\n" + line)
    if record_property is not None:
        record_property("fuzz_summary", line)
    out_dir = os.environ.get("W4A16_REPORT_DIR")
    if out_dir:
        with open(os.path.join(out_dir, "robustness.txt"), "a") as f:
            f.write(line + "\n")


CPU_VALID, CPU_INVALID, CPU_INTERP = 300, 400, 30


def test_cpu_valid_calls(record_property):
    s = run_range("valid", "cpu", "cpu", SEED, 0, CPU_VALID, time.monotonic() + 120)
    _report("cpu valid", s, record_property)
    assert not s["stopped_early"], format_summary(s)
    assert not s["failures"], _fail_message(s)
    assert s["cases"] == CPU_VALID, format_summary(s)


def test_cpu_interpreted_triton_calls(record_property):
    """Tiny fp16 cases on the backends that run in Triton's interpreter on CPU tensors (when TRITON_INTERPRET=1
    and the Triton backend serves CPU problems); time-bounded: the interpreter is slow."""
    probe = dispatch.problem_for(torch.device("cpu"), torch.float16, 1, 64, 64, 32, False)
    if "triton" not in serving_backends(probe, interp_ok=True):
        pytest.skip("the triton backend does not serve CPU tensors here (not available or not interpreted)")
    s = run_range("valid", "interp", "cpu", SEED, 0, CPU_INTERP, time.monotonic() + 45, interp_ok=True,
                  with_auto=False)
    _report("cpu interpreted triton", s, record_property)
    assert not s["failures"], _fail_message(s)
    assert s["paths"].get("triton direct", 0) >= 3, format_summary(s)


def test_cpu_invalid_calls(record_property):
    s = run_range("invalid", "cpu", "cpu", SEED, 0, CPU_INVALID, time.monotonic() + 120)
    _report("cpu invalid", s, record_property)
    assert not s["stopped_early"], format_summary(s)
    assert not s["failures"], _fail_message(s)
    assert s["cases"] == CPU_INVALID
    assert len(s["mutations"]) >= 15, s["mutations"]  # every kind of mutation was tried


def test_oracle_agrees_with_known_cases():
    """The independent contract oracle itself: valid calls have no violations, pinned bad calls do."""
    rng = random.Random(1)
    for _ in range(20):
        b = _small_valid(rng, "cpu")
        assert contract_violations(*b.args) == [], b.args[0].shape
    b = _small_valid(random.Random(2), "cpu")
    x, q, s, z = b.args
    assert contract_violations(x.float(), q, s, z) == ["x must be", "scales must have the dtype"]
    assert "qweight must have shape" in contract_violations(x, q[:-1], s, z)


def test_child_process_driver_survives_a_crash(monkeypatch):
    """The GPU runs go through drive(): a child that dies mid-case is reported with that case and a fresh child
    goes on from the next one. Exercised here on CPU with a child that aborts at case 2."""
    monkeypatch.setenv("W4A16_FUZZ_CRASH_AT", "2")
    s = drive("valid", "interp", "cpu", 5, 120)
    assert s["cases"] == 5 and s["crashes"] == 1, format_summary(s)
    died = [f for f in s["failures"] if "process died" in f or "child process failed" in f]
    assert len(died) == 1 and died[0].startswith("case 2: the process died"), s["failures"]  # (other failures: other tests)
    assert sum(v for k, v in s["paths"].items() if k.startswith("reference direct")) >= 3, s["paths"]
    monkeypatch.delenv("W4A16_FUZZ_CRASH_AT")
    s = drive("invalid", "cpu", "cpu", 20, 120, workers=2)
    assert s["cases"] == 20 and not s["crashes"], _fail_message(s)
    assert sum(s["mutations"].values()) == 20


# GPU: budgets for an H100, each part in child processes (see drive()).
GPU_VALID, GPU_VALID_S = 2000, 75
GPU_INVALID, GPU_INVALID_S = 500, 15
GPU_W_OFFSET, GPU_W_OFFSET_S = 60, 20
GPU_WORKERS = 4  # child processes at once (the H100 machine has 16 cores for Triton's compiler)


@pytest.mark.gpu
def test_gpu_valid_calls(record_property):
    s = drive("valid", "gpu", "cuda", GPU_VALID, GPU_VALID_S, workers=GPU_WORKERS)
    _report("gpu valid", s, record_property)
    assert not s["failures"], _fail_message(s)
    assert s["cases"] >= 100, f"too few cases in the time budget: {format_summary(s)}"


@pytest.mark.gpu
def test_gpu_valid_calls_weights_at_odd_offsets(record_property):
    """qweight / scales / zeros as contiguous views at 4..20-byte offsets inside larger buffers (valid by the
    contract: contiguous, right dtype and shape), e.g. tensors sliced out of one flat buffer."""
    s = drive("valid", "gpu_w_offset", "cuda", GPU_W_OFFSET, GPU_W_OFFSET_S, workers=GPU_WORKERS)
    _report("gpu valid, weights at odd offsets", s, record_property)
    assert not s["failures"], _fail_message(s)
    assert s["cases"] >= 20, f"too few cases in the time budget: {format_summary(s)}"


@pytest.mark.gpu
def test_gpu_invalid_calls(record_property):
    s = drive("invalid", "gpu", "cuda", GPU_INVALID, GPU_INVALID_S, workers=2)
    _report("gpu invalid", s, record_property)
    assert not s["failures"], _fail_message(s)
    assert s["cases"] >= 200, f"too few cases in the time budget: {format_summary(s)}"


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") is None and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    sys.exit(child_main())
