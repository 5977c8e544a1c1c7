"""A bounded batch of valid and invalid w4a16.gemm calls for compute-sanitizer (issue 7).

    compute-sanitizer --tool memcheck  --error-exitcode 9 python3 scripts/sanitize_cases.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python3 scripts/sanitize_cases.py --racecheck

Valid calls (small shapes, every layout of x, random bits in qweight's padding; with --weights-at-offsets
qweight/scales/zeros sit at odd, not 16-byte aligned offsets instead; the
generator of tests/test_fuzz.py with its "sanitize" profile) run on every available GPU backend that serves
them, directly and forced through the op, plus the automatic choice, and are compared with the float64
reference; invalid calls must raise a clear ValueError before any kernel runs. PyTorch's caching allocator is
switched off (PYTORCH_NO_CUDA_MEMORY_CACHING=1) so every tensor is its own cudaMalloc and memcheck sees an
access past a tensor's end; the weights are allocated without a tail ("tight").

--racecheck: a few cases on the CUDA backend only (racecheck is slow): decode with a long K (cross-block
reduction), a medium M, channelwise K % 16 != 0.

Prints one summary line; exits 1 if any comparison or error check failed (compute-sanitizer's own reports
set its --error-exitcode).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--keep-caching" not in sys.argv:
    os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]

import torch  # noqa: E402

import test_fuzz as fz  # noqa: E402
from w4a16_ops import dispatch  # noqa: E402

RACECHECK_SPECS = [
    # M, lead, K, N, G, zeros, dtype, layout, w_offset, dirty_pad, neg_scales, seed
    fz.Spec(1, (1,), 2048, 256, 128, True, "float16", "contig", False, False, True, 1),
    fz.Spec(33, (33,), 1024, 320, 64, False, "bfloat16", "contig", False, False, False, 2),
    fz.Spec(17, (17,), 200, 136, 200, True, "float16", "strided", False, False, True, 3),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--valid", type=int, default=40, help="valid cases")
    ap.add_argument("--invalid", type=int, default=40, help="invalid cases")
    ap.add_argument("--racecheck", action="store_true", help="a few cases on the cuda backend only")
    ap.add_argument("--backends", default=None, help="comma-separated subset (default: every available one)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of this script")
    ap.add_argument("--seed", type=int, default=fz.SEED)
    ap.add_argument("--budget", type=float, default=1200.0, help="seconds; stops starting new cases after it")
    ap.add_argument("--keep-caching", action="store_true", help="leave PyTorch's caching allocator on")
    ap.add_argument("--weights-at-offsets", action="store_true",
                    help="every valid case puts qweight/scales/zeros at odd (not 16-byte aligned) offsets")
    a = ap.parse_args()

    available = [n for n, why in dispatch.unavailable_backends().items() if why is None]
    if a.device == "cuda":
        if not torch.cuda.is_available():
            print("sanitize_cases: no CUDA device")
            return 2
        available = [n for n in available if n != "reference"] + ["reference"]
    only = a.backends.split(",") if a.backends else available
    if a.racecheck:
        only = ["cuda"]
        if dispatch.unavailable_backends().get("cuda") is not None:
            print(f"sanitize_cases --racecheck: the cuda backend is unavailable: {dispatch.unavailable_backends()['cuda']}")
            return 2

    t0 = time.monotonic()
    deadline = t0 + a.budget
    valid = fz.new_summary("valid")
    profile = "sanitize_w_offset" if a.weights_at_offsets else "sanitize"
    specs = RACECHECK_SPECS if a.racecheck else [
        fz.valid_spec(fz.case_rng(a.seed, "valid", profile, i), profile) for i in range(a.valid)]
    for i, spec in enumerate(specs):
        if time.monotonic() > deadline:
            valid["stopped_early"] = True
            break
        r = fz.check_valid(spec, a.device, only=only, tight=True, with_auto=not a.racecheck,
                           interp_ok=a.device == "cpu")
        r["desc"] = spec.describe()
        fz.merge(valid, i, r)
    invalid = fz.new_summary("invalid")
    if not a.racecheck:
        for i in range(a.invalid):
            if time.monotonic() > deadline:
                invalid["stopped_early"] = True
                break
            r = fz.run_one("invalid", "sanitize", a.device, a.seed, i)
            fz.merge(invalid, i, r)
    if a.device == "cuda":
        torch.cuda.synchronize()
    failures = valid["failures"] + invalid["failures"]
    for f in failures[:30]:
        print(f"FAILED {f}")
    mode = "racecheck" if a.racecheck else "memcheck batch" + (", weights at odd offsets" if a.weights_at_offsets else "")
    calls = ", ".join(f"{k} {v}" for k, v in sorted(valid["paths"].items()))
    print(f"sanitize_cases ({mode}, {a.device}, backends {','.join(only)}, caching allocator "
          f"{'off' if os.environ.get('PYTORCH_NO_CUDA_MEMORY_CACHING') == '1' else 'on'}): "
          f"{valid['cases']} valid cases ({calls}), {invalid['cases']} invalid calls, "
          f"{len(failures)} failures, {time.monotonic() - t0:.0f} s"
          + (" (stopped at the time budget)" if valid["stopped_early"] or invalid["stopped_early"] else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
