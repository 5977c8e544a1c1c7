"""A few small calls of the CUDA backend for compute-sanitizer (memcheck, racecheck, initcheck):

    compute-sanitizer --tool memcheck python scripts/cuda_sanitize.py

Covers: split columns (cross-block reduction), zeros, both dtypes, N % 64 != 0, a K tail, two M chunks, x padding
(K % 8 != 0) and the dequantize + dense GEMM path. Each result is also checked against the float64 reference.
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


def main():
    assert cuda_backend.availability() is None, cuda_backend.availability()
    for M, K, N, G, zeros, dtype in CASES:
        cuda_backend.DEQUANT_MIN_M = 64 if M == 96 else 1 << 30
        case = make_case(M, K, N, G, zeros=zeros, dtype=dtype, device="cuda", seed=M * K + N)
        out = run_backend("cuda", case)
        torch.cuda.synchronize()
        err = assert_close_to_reference(out, case, f"M={M} K={K} N={N}")
        print(f"ok M={M} K={K} N={N} G={G} zeros={zeros} {dtype}: rel err {err:.2e}")
    print("sanitize cases: all ok")


if __name__ == "__main__":
    main()
