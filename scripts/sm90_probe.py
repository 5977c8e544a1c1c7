"""One call each of the wgmma kernel at a compute-bound and a mid-size point, for ncu (GPU only):

    ncu -k regex:sm90.*gemm_kernel --launch-skip 2 --launch-count 2 python3 scripts/sm90_probe.py

Each shape is called twice (the first launch is a warm-up the profiler skips).
"""

import torch

import w4a16_ops
from w4a16_ops.backends import cuda as cb


def main():
    assert cb.availability() is None, cb.availability()
    for M, K, N in ((4096, 8192, 28672), (256, 8192, 28672)):
        q = torch.randint(0, 16, (N, K), device="cuda")
        s = ((torch.rand(K // 128, N, device="cuda") + 0.5) / K**0.5).half()
        pk = w4a16_ops.pack(q, s)
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        out = torch.empty(M, N, device="cuda", dtype=torch.float16)
        for _ in range(2):
            torch.ops.w4a16._cuda_gemm_sm90(x, pk.qweight, pk.scales, None, out, 0, 0)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
