"""Triage of the GPU fuzz (issue 7): run tests/test_fuzz.py's generator outside pytest, write EVERY failure
to OUTDIR/fuzz_failures.txt, then replay the first failing cases one by one (a fresh process each, so a
case that kills the CUDA context is seen alone) and, for cases that crash, once more under
compute-sanitizer memcheck with PyTorch's caching allocator off.

    python3 scripts/fuzz_triage.py OUTDIR [--cases 400] [--budget 150] [--profile gpu] [--replays 6]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]

import test_fuzz as fz  # noqa: E402


def replay(out_dir: str, profile: str, index: int, sanitize: bool) -> str:
    cmd = [sys.executable, os.path.join(ROOT, "tests", "test_fuzz.py"), "replay", "--kind", "valid",
           "--profile", profile, "--device", "cuda", "--index", str(index)]
    env = dict(os.environ)
    if sanitize:
        cmd = ["compute-sanitizer", "--tool", "memcheck", "--show-backtrace", "device", "--print-limit", "20"] + cmd
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240, env=env)
        text, rc = p.stdout, p.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    name = f"replay_{index}{'_memcheck' if sanitize else ''}.txt"
    with open(os.path.join(out_dir, name), "w") as f:
        f.write(f"$ {' '.join(cmd)}\nexit {rc}\n{text}")
    return f"case {index}{' (memcheck)' if sanitize else ''}: exit {rc}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--cases", type=int, default=400)
    ap.add_argument("--budget", type=float, default=150.0)
    ap.add_argument("--profile", default="gpu")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--replays", type=int, default=6)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    s = fz.drive("valid", a.profile, "cuda", a.cases, a.budget, workers=a.workers)
    lines = [fz.format_summary(s)] + s["failures"]
    with open(os.path.join(a.out, "fuzz_failures.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(lines[0])
    crashed = {}  # case index -> whether its process died (failure lines start with "case I")
    for f in s["failures"]:
        if m := re.match(r"case (\d+)", f):
            i = int(m.group(1))
            crashed[i] = crashed.get(i, False) or "died" in f or "CUDA context" in f
    have_sanitizer = shutil.which("compute-sanitizer") is not None
    for i in sorted(crashed)[: a.replays]:
        print(replay(a.out, a.profile, i, sanitize=False))
        if crashed[i] and have_sanitizer:
            print(replay(a.out, a.profile, i, sanitize=True))
    return 1 if s["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
