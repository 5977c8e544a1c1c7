"""What the op is compared with, each set up to rotate through weight copies (see timing.py).

A contender's setup returns the list of calls (one per weight copy) or a string saying why it
cannot run this point.
"""

from __future__ import annotations

from typing import Callable, List, Union

import torch

import w4a16_ops
from w4a16_ops import dispatch
from w4a16_ops.backends import BACKENDS

from .timing import copies_needed, packed_copies

Calls = List[Callable[[], object]]


def dense(M, K, N, G, dtype) -> Union[Calls, str]:
    """The baseline: torch.matmul with 16-bit weights (what not quantizing costs)."""
    w = torch.randn(K, N, dtype=dtype, device="cuda")
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    ws = [w] + [w.clone() for _ in range(copies_needed(w.numel() * 2) - 1)]
    return [lambda w=w: x @ w for w in ws]


def torch_int4(M, K, N, G, dtype) -> Union[Calls, str]:
    """torch's own int4 op (tinygemm): bf16 activations only."""
    if G not in (32, 64, 128, 256):
        return f"G = {G} not supported by _weight_int4pack_mm"
    inner = next((t for t in (8, 4, 2) if K % (16 * t) == 0), None)
    if inner is None or N % 8:
        return "shape not supported by _convert_weight_to_int4pack"
    q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device="cuda")
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack(q, inner)
    except RuntimeError as e:
        return f"_convert_weight_to_int4pack failed: {str(e).splitlines()[0]}"
    sz = torch.randn(K // G, N, 2, dtype=torch.bfloat16, device="cuda") * 0.01
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    n = copies_needed(packed.numel() * packed.element_size())
    ps = [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(n - 1)]
    return [lambda p=p: torch.ops.aten._weight_int4pack_mm(x, p[0], G, p[1]) for p in ps]


def w4a16(name: str, zeros: bool = False):
    """This package's op, with backend `name` forced, or 'auto'; zeros: asymmetric weights (zero points)."""

    def setup(M, K, N, G, dtype) -> Union[Calls, str]:
        if name != "auto":
            why = BACKENDS[name].availability()
            if why is None:
                p = dispatch.problem_for(torch.device("cuda"), dtype, M, K, N, G, zeros)
                why = BACKENDS[name].unsupported_reason(p)
            if why is not None:
                return why
        q = torch.randint(0, 16, (N, K), dtype=torch.uint8, device="cuda")
        scales = (torch.rand(K // G, N, device="cuda") * 0.01 + 0.001).to(dtype)
        z = torch.randint(0, 16, (K // G, N), device="cuda") if zeros else None
        packed = w4a16_ops.pack(q, scales, z)
        x = torch.randn(M, K, dtype=dtype, device="cuda")
        return [lambda p=p: torch.ops.w4a16.gemm(x, p.qweight, p.scales, p.zeros) for p in packed_copies(packed)]

    return setup


def contenders(with_reference: bool = False, zeros: bool = False):
    out = {"dense": dense, "torch_int4": torch_int4, "w4a16_auto": w4a16("auto", zeros)}
    for name in BACKENDS:
        if name != "reference" or with_reference:
            out[f"w4a16_{name}"] = w4a16(name, zeros)
    return out
