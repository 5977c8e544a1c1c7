"""Every report in one command (GPU): the op-level sweep, the model-level benchmark, the eager overhead.

    python -m benchmarks --out results/ [--preset full|quick|default|subsets] [--quick-model]

Writes results/op/ (bench_op.csv, .md, .png), results/model/ (bench_model.csv, .md) and results/overhead.txt.
Each part is the module of the same name run with these arguments; run them one by one for more options.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os

from . import bench_model, bench_op, bench_overhead


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="full", choices=["quick", "default", "full", "subsets"])
    ap.add_argument("--quick-model", action="store_true", help="bench_model --quick")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    bench_op.main(["--out", os.path.join(args.out, "op"), "--preset", args.preset])
    bench_model.main(["--out", os.path.join(args.out, "model")] + (["--quick"] if args.quick_model else []))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        bench_overhead.main([])
    with open(os.path.join(args.out, "overhead.txt"), "w") as f:
        f.write(buf.getvalue())
    print(buf.getvalue())


if __name__ == "__main__":
    main()
