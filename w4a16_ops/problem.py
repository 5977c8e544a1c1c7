"""The facts of one call that the backend choice depends on (and nothing else)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Problem(NamedTuple):
    device_type: str  # "cpu", "cuda", ...
    capability: Optional[tuple[int, int]]  # CUDA compute capability, None off CUDA
    dtype: torch.dtype  # of x and scales
    M: int  # rows of x after flattening the leading dims
    K: int
    N: int
    G: int  # group size (== K for channelwise)
    has_zeros: bool

    def describe(self) -> str:
        cap = f" sm_{self.capability[0]}{self.capability[1]}" if self.capability else ""
        g = "K (channelwise)" if self.G == self.K else str(self.G)
        z = "zeros" if self.has_zeros else "symmetric"
        dt = str(self.dtype).replace("torch.", "")
        return f"{self.device_type}{cap} {dt} M={self.M} K={self.K} N={self.N} G={g} {z}"
