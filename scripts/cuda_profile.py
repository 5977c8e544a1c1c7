"""One W4A16 shape run a few times through the CUDA backend, for ncu (GPU only):

    ncu --kernel-name regex:gemm_kernel --launch-skip 2 --launch-count 1 python scripts/cuda_profile.py K N M [bps [splits [scaling]]]
    python scripts/cuda_profile.py --ncu OUTFILE "K N M [bps [splits [scaling]]]" ...   # runs ncu on each case, then dumps SASS

Weights are random packed words (timing only); prints the kernel's partition.
"""

import math
import os
import subprocess
import sys

import torch

from w4a16_ops import dispatch
from w4a16_ops.backends import cuda as cb


METRICS = ",".join(
    ["dram__throughput.avg.pct_of_peak_sustained_elapsed", "dram__bytes_read.sum", "gpu__time_duration.sum",
     "sm__throughput.avg.pct_of_peak_sustained_elapsed", "smsp__inst_executed.sum",
     "smsp__issue_active.avg.pct_of_peak_sustained_active", "sm__warps_active.avg.pct_of_peak_sustained_active",
     "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"]
    + [f"smsp__average_warps_issue_stalled_{r}_per_issue_active.ratio" for r in
       ("barrier", "long_scoreboard", "short_scoreboard", "wait", "math_pipe_throttle", "mio_throttle",
        "lg_throttle", "not_selected", "selected", "dispatch_stall", "no_instruction", "tex_throttle",
        "drain", "imc_miss", "branch_resolving", "sleeping", "membar", "misc")]
)


def run_ncu(outfile, cases):
    with open(outfile, "a") as f:
        for case in cases:
            cmd = ["ncu", "--kernel-name", "regex:gemm_kernel", "--launch-skip", "2", "--launch-count", "1",
                   "--clock-control", "none", "--metrics", METRICS, sys.executable, os.path.abspath(__file__)]
            r = subprocess.run(cmd + case.split(), capture_output=True, text=True, timeout=120)
            f.write(f"==== ncu {case}\n{r.stdout}\n{r.stderr[-2000:]}\n")
            print(f"==== {case}")
            for line in r.stdout.splitlines():
                if any(k in line for k in ("K=", "dram__throughput", "gpu__time", "issue_active", "stalled_barrier",
                                           "stalled_long", "stalled_wait", "stalled_short", "stalled_math",
                                           "stalled_mio", "stalled_lg", "stalled_not_sel", "inst_executed", "hmma",
                                           "warps_active", "stalled_no_inst", "stalled_dispatch")):
                    print("  " + line.strip())
        import w4a16_ops._C as ext

        r = subprocess.run(["cuobjdump", "-sass", ext.__file__], capture_output=True, text=True)
        keep, lines = False, []
        for line in r.stdout.splitlines():
            if "Function :" in line:
                keep = "gemm_kernelI6__halfLi1E" in line
            if keep:
                lines.append(line)
        f.write("==== SASS of the fp16 MB=1 instance\n" + "\n".join(lines) + "\n")
        print(f"SASS: {len(lines)} lines")


def main():
    if sys.argv[1] == "--ncu":
        run_ncu(sys.argv[2], sys.argv[3:])
        return
    K, N, M = (int(v) for v in sys.argv[1:4])
    assert cb.availability() is None, cb.availability()  # also loads the extension
    cb.TUNING = tuple(int(v) for v in sys.argv[4:7]) + (0,) * (3 - len(sys.argv[4:7]))  # bps, splits, scaling
    G = 128
    qw = torch.randint(-(2**31), 2**31 - 1, (-(-K // 16), -(-N // 64) * 128), dtype=torch.int32, device="cuda")
    s = ((torch.rand(K // G, N, device="cuda") + 0.5) / math.sqrt(K) / 4).half()
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    out = torch.empty(M, N, device="cuda", dtype=torch.float16)
    p = dispatch.problem_for(x.device, x.dtype, M, K, N, G, False)
    for _ in range(4):
        cb.gemm(x, qw, s, None, p, out)
    torch.cuda.synchronize()
    plan = torch.ops.w4a16._cuda_gemm_plan(M, K, N, G, False, *cb.TUNING)
    names = "mb slabs m_chunks n_cols k_iters total ipb grid ws_floats locks smem_bytes blocks_per_sm f32s max_splits"
    names = names.split()
    print(f"K={K} N={N} M={M}: " + ", ".join(f"{n}={v}" for n, v in zip(names, plan)))


if __name__ == "__main__":
    main()
