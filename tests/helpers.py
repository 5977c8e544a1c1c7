"""Shared test inputs and the comparison against the float64 reference."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

import w4a16_ops
from w4a16_ops.backends.reference import gemm_float64

from w4a16_ops.testing import TOLERANCE, rel_err  # noqa: F401  (re-exported for the tests)


class Case(NamedTuple):
    x: torch.Tensor
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]

    @property
    def args(self):
        return (self.x, self.qweight, self.scales, self.zeros)


def make_case(
    M, K, N, G, *, zeros: bool, dtype=torch.float16, device="cpu", strided=False, lead=None, seed=None
) -> Case:
    """Fresh random data: q uniform in 0..15, scales ~ 1/sqrt(K) with jitter, zeros uniform, x ~ N(0, 1).

    strided: x is a non-contiguous view (every other column of a wider tensor, plus a storage offset).
    lead: leading dims of x replacing M (their product is M).
    """
    # Drawn and packed on the target device: packing a 14336 x 4096 weight on the CPU took about a second per
    # case, most of a GPU test run's time.
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    num_groups = K // G
    q = torch.randint(0, 16, (N, K), generator=gen, device=device)
    scales = (torch.rand(num_groups, N, generator=gen, device=device) + 0.5) / math.sqrt(K) / 4
    z = torch.randint(0, 16, (num_groups, N), generator=gen, device=device) if zeros else None
    packed = w4a16_ops.pack(q, scales.to(dtype), z)
    shape = tuple(lead) if lead is not None else (M,)
    if strided:
        base = torch.randn(*shape, 2 * K + 3, generator=gen, device=device).to(dtype)
        x = base[..., 3::2]
        assert not x.is_contiguous() and x.shape[-1] == K
    else:
        x = torch.randn(*shape, K, generator=gen, device=device).to(dtype)
    return Case(x, *packed)


def assert_close_to_reference(out: torch.Tensor, case: Case, what: str = "") -> float:
    ref = gemm_float64(*case.args)  # on the case's device (float64 matmul is fast on a GPU too)
    assert out.dtype == case.x.dtype, f"{what}: output dtype {out.dtype}, expected {case.x.dtype}"
    assert out.shape == ref.shape, f"{what}: output shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output (unwritten or garbage)"
    err = rel_err(out, ref)
    tol = TOLERANCE[case.x.dtype]
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.3e}"
    return err


def poisoned_out(M: int, N: int, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN, so an element a kernel forgets to write fails the check."""
    return torch.full((M, N), float("nan"), dtype=dtype, device=device)


def groups_for(K: int):
    """Every supported group size that divides K, channelwise (-1 -> K) last."""
    return [g for g in w4a16_ops.format.SUPPORTED_GROUP_SIZES if K % g == 0] + [K]


def run_backend(name: str, case: Case) -> torch.Tensor:
    """Call one backend directly (no dispatch) on a NaN-poisoned output buffer."""
    from w4a16_ops import dispatch
    from w4a16_ops.backends import BACKENDS

    x = case.x
    K, N = x.shape[-1], case.scales.shape[1]
    x2d = x.reshape(-1, K)
    M = x2d.shape[0]
    p = dispatch.problem_for(x.device, x.dtype, M, K, N, K // case.scales.shape[0], case.zeros is not None)
    out = poisoned_out(M, N, x.dtype, x.device)
    BACKENDS[name].gemm(x2d, case.qweight, case.scales, case.zeros, p, out)
    return out.view(*x.shape[:-1], N)
