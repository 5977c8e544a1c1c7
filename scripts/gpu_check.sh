#!/usr/bin/env bash
# The one GPU script: build the CUDA extension, run the test suite, run the benchmark, all logs to OUTDIR.
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Knobs (environment):
#   W4A16_TESTS   pytest selection (default: the whole tests/ folder)
#   W4A16_BENCH   arguments for benchmarks/bench_op.py (default: --quick); "skip" skips it
#   W4A16_EXTRA   a shell command run last (e.g. compute-sanitizer runs), output in OUTDIR/extra.log
#   W4A16_{TEST,BENCH,EXTRA}_TIMEOUT   seconds each stage may take (default 3600)
#   W4A16_PYTEST_ARGS  more pytest arguments (e.g. "-n 8 --dist loadgroup" with pytest-xdist)
#   W4A16_TIMINGS is set to OUTDIR/timings.txt: every test's outcome and seconds as it ends (tests/conftest.py)
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export W4A16_BUILD_CUDA=${W4A16_BUILD_CUDA:-1}
cd "$(dirname "$0")/.."

{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$OUT/env.txt" 2>&1
start=$(date +%s)
if ! python3 -m pip install --no-build-isolation --no-deps -v -e . > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
echo "build: $(( $(date +%s) - start )) s"
grep -E "registers|spill|bytes stack" "$OUT/build.log" | sort -u | head -40 > "$OUT/ptxas.txt" || true

python3 -m w4a16_ops > "$OUT/main.log" 2>&1; echo "python -m w4a16_ops: exit $?"; tail -25 "$OUT/main.log"
W4A16_TIMINGS="$OUT/timings.txt" timeout -s INT -k 60 ${W4A16_TEST_TIMEOUT:-3600} python3 -m pytest ${W4A16_TESTS:-tests} -q -rfEx -p no:cacheprovider ${W4A16_PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest.log" | tail -25
test_rc=${PIPESTATUS[0]}

if [ "${W4A16_BENCH:---quick}" != "skip" ]; then
  timeout ${W4A16_BENCH_TIMEOUT:-3600} python3 -m benchmarks.bench_op --out "$OUT" ${W4A16_BENCH:---quick} 2>&1 | tee "$OUT/bench.log" | tail -60
fi
if [ -n "${W4A16_EXTRA:-}" ]; then
  timeout ${W4A16_EXTRA_TIMEOUT:-3600} bash -c "$W4A16_EXTRA" > "$OUT/extra.log" 2>&1; echo "extra: exit $?"; tail -40 "$OUT/extra.log"
fi
exit $test_rc
