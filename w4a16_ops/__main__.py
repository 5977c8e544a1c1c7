"""python -m w4a16_ops: what is built here, how calls are dispatched, and a check of every backend."""

from __future__ import annotations

import sys

import torch

import w4a16_ops
from w4a16_ops import dispatch
from w4a16_ops._build import build_summary
from w4a16_ops.backends import BACKENDS
from w4a16_ops.backends.reference import gemm_float64
from w4a16_ops.testing import TOLERANCE, rel_err

# (label, M, K, N, G)
EXAMPLES = [
    ("Llama-3-8B o_proj, decode", 1, 4096, 4096, 128),
    ("Llama-3-8B down_proj, M=16", 16, 14336, 4096, 128),
    ("Llama-3-8B gate_up, prefill", 4096, 4096, 28672, 128),
    ("intermediate 2112 down_proj", 1, 2112, 4096, 64),
    ("N = 2120 (N % 64 != 0)", 16, 4096, 2120, 128),
    ("channelwise", 1, 4096, 4096, -1),
]


def main() -> int:
    print(f"w4a16_ops {w4a16_ops.__version__}, packed format v{w4a16_ops.FORMAT_VERSION}, torch {torch.__version__}")
    print(f"build: {build_summary()}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        print("device: CPU only (no CUDA device visible)")

    unavailable = dispatch.unavailable_backends()
    print("\nbackends:")
    for name in BACKENDS:
        print(f"  {name:10s} {'available' if unavailable[name] is None else 'unavailable: ' + unavailable[name]}")

    print(f"\ndispatch on this machine ({device}):")
    for label, M, K, N, G in EXAMPLES:
        print(f"  {label:32s} M={M:<5d} K={K:<6d} N={N:<6d} -> {dispatch.explain(M, K, N, group_size=G, device=device)}")
    print("\ndispatch on an H100 / H200 (sm_90) with every backend built:")
    for label, M, K, N, G in EXAMPLES:
        d = dispatch.explain(M, K, N, group_size=G, device="cuda", capability=(9, 0), unavailable={})
        print(f"  {label:32s} M={M:<5d} K={K:<6d} N={N:<6d} -> {d}")

    # On a GPU also M = 100, which the CUDA backend runs on its wgmma kernel on sm_90 (64 <= M < 512).
    ms = (33, 100) if device == "cuda" else (33,)
    print(f"\ncheck against the float64 reference (M={' and '.join(map(str, ms))}, K=512, N=264, G=128, zeros and "
          "symmetric):")
    failures = 0
    torch.manual_seed(0)
    for name in BACKENDS:
        if unavailable[name] is not None:
            continue
        for M in ms:
            for dtype in (torch.float16, torch.bfloat16):
                for zeros in (False, True):
                    failures += not _check(name, device, dtype, zeros, M)
    print("all backends agree with the reference" if not failures else f"{failures} check(s) FAILED")
    return 1 if failures else 0


def _check(name: str, device: str, dtype: torch.dtype, zeros: bool, M: int) -> bool:
    K, N, G = 512, 264, 128
    packed = w4a16_ops.quantize(torch.randn(N, K), G, symmetric=not zeros, dtype=dtype)
    packed = [t.to(device) if t is not None else None for t in packed]
    x = torch.randn(M, K, dtype=dtype, device=device)
    p = dispatch.problem_for(x.device, dtype, M, K, N, G, zeros)
    why_not = BACKENDS[name].unsupported_reason(p)
    label = f"  {name:10s} M={M:<4d} {str(dtype).replace('torch.', ''):9s} {'zeros' if zeros else 'symmetric':9s}"
    if why_not is not None:
        print(f"{label} skipped: {why_not}")
        return True
    out = torch.full((M, N), float("nan"), dtype=dtype, device=device)
    try:
        BACKENDS[name].gemm(x, *packed, p, out)
    except Exception as e:  # report and go on: this is a diagnostic
        print(f"{label} ERROR {type(e).__name__}: {e}")
        return False
    ref = gemm_float64(x.cpu(), *(t.cpu() if t is not None else None for t in packed))
    err = rel_err(out, ref)
    ok = err <= TOLERANCE[dtype]  # NaN (an unwritten element) fails this too
    print(f"{label} rel. error {err:.2e} (tolerance {TOLERANCE[dtype]:.1e}) {'ok' if ok else 'FAILED'}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
