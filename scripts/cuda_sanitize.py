"""A few small calls of the CUDA backend for compute-sanitizer (memcheck, racecheck, initcheck):

    compute-sanitizer --tool memcheck python scripts/cuda_sanitize.py

Covers: split columns (cross-block reduction), zeros, both dtypes, N % 64 != 0, a K tail, two M chunks, x padding
(K % 8 != 0) and the dequantize + dense GEMM path. Each result is also checked against the float64 reference.
Every case runs twice: with the default launch, and (on sm_90) with programmatic dependent launch and the L2
weight prefetch on, followed there by a chain of calls where each reads the previous call's output; with --bulk a
third time with the bulk-copy weight ring. On sm_90 with
the sm_90a build, the wgmma kernel's cases follow (SM90_CASES: both block heights, split-K, zeros, tails).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from helpers import assert_close_to_reference, make_case, run_backend  # noqa: E402

from w4a16_ops.backends import cuda as cuda_backend  # noqa: E402

CASES = [  # M, K, N, G, zeros, dtype
    (3, 1024, 320, 64, True, torch.float16),  # every column split across blocks, half-empty last tile
    (70, 2112, 192, 64, False, torch.bfloat16),  # two M chunks, K tail
    (1, 100, 72, 100, True, torch.float16),  # K % 8 != 0 (padded x), channelwise
    (96, 256, 136, 128, True, torch.bfloat16),  # dequantize path (DEQUANT_MIN_M lowered below)
    (20, 1280, 576, 128, True, torch.float16),  # MB = 2 with fp32 group scaling (F32S), split columns
    (16, 4096, 512, 128, False, torch.bfloat16),  # M = 16: 8 blocks per column, the parallel finalize
]


SM90_CASES = [  # M, K, N, G, zeros, dtype, splits, bm
    (64, 1024, 320, 64, True, torch.float16, 0, 0),  # split-K (default plan), N tail inside a 256-column block
    (130, 2112, 192, 64, False, torch.bfloat16, 1, 128),  # M past one 128-row block, K tail, N < 256
    (37, 200, 136, 200, True, torch.float16, 3, 64),  # channelwise, K % 64 != 0, split-K with a short last slice
    (256, 1536, 512, 32, True, torch.bfloat16, 0, 0),  # G = 32: two scale rows per stage
]

TUNINGS = [(0, 0, 0, 0, 0), (0, 0, 0, 2, 4)]  # default; PDL + L2 prefetch 4 iterations ahead (sm_90)
if "--bulk" in sys.argv:  # also the bulk-copy weight ring (an experiment; M <= 16 cases use it)
    TUNINGS.append((0, 0, 0, 2, -1, 1))


def main():
    assert cuda_backend.availability() is None, cuda_backend.availability()
    if hasattr(cuda_backend, "SM90_MIN_M"):  # these cases are the fused decode kernel's (and the dequantize path's)
        cuda_backend.SM90_MIN_M = 1 << 30
    for tuning in TUNINGS:
        cuda_backend.TUNING = tuning
        for M, K, N, G, zeros, dtype in CASES:
            cuda_backend.DEQUANT_MIN_M = 64 if M == 96 else 1 << 30
            case = make_case(M, K, N, G, zeros=zeros, dtype=dtype, device="cuda", seed=M * K + N)
            out = run_backend("cuda", case)
            torch.cuda.synchronize()
            err = assert_close_to_reference(out, case, f"M={M} K={K} N={N} tuning={tuning}")
            print(f"ok M={M} K={K} N={N} G={G} zeros={zeros} {dtype} tuning={tuning}: rel err {err:.2e}")
        cuda_backend.DEQUANT_MIN_M = 1 << 30
        case = make_case(16, 1024, 1024, 128, zeros=True, dtype=torch.float16, device="cuda", seed=7)
        x = case.x
        for i in range(3):  # back to back: each call's x is the previous call's output
            y = run_backend("cuda", case._replace(x=x))
            assert_close_to_reference(y, case._replace(x=x), f"chain link {i} tuning={tuning}")
            x = y
        torch.cuda.synchronize()
        print(f"ok chain of 3 calls, tuning={tuning}")
    if torch.cuda.get_device_capability()[0] == 9 and cuda_backend.sm90_built():
        for M, K, N, G, zeros, dtype, splits, bm in SM90_CASES:
            case = make_case(M, K, N, G, zeros=zeros, dtype=dtype, device="cuda", seed=M * K + N)
            x2d = cuda_backend._x_ready(case.x)
            out = torch.full((M, N), float("nan"), dtype=dtype, device="cuda")
            torch.ops.w4a16._cuda_gemm_sm90(x2d, case.qweight, case.scales, case.zeros, out, splits, bm)
            torch.cuda.synchronize()
            err = assert_close_to_reference(out, case, f"sm90 M={M} K={K} N={N} splits={splits} bm={bm}")
            print(f"ok sm90 M={M} K={K} N={N} G={G} zeros={zeros} {dtype} splits={splits} bm={bm}: rel err {err:.2e}")
    print("sanitize cases: all ok")


if __name__ == "__main__":
    main()
