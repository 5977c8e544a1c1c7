"""Accuracy bounds used by the tests and by `python -m w4a16_ops` (one definition for both)."""

from __future__ import annotations

import torch

# Relative Frobenius error bounds against the float64 reference: about two units of roundoff of
# the dtype (the output is rounded to it once, and kernels may round (q - z) * s to it once more).
TOLERANCE = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN if out holds NaN, so it never passes a bound)."""
    out, ref = out.detach().cpu().to(torch.float64), ref.detach().cpu().to(torch.float64)
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff
