"""Concurrency of w4a16.gemm (issue 7): calls running at the same time must not share scratch state (split-K
partials, lock counters, cached workspaces) or race in Python-side caches. Every result is compared with the
float64 reference (tests/helpers.TOLERANCE), for every available backend (forced) and the automatic choice.

- CPU: two Python threads calling the op at once (cold dispatch cache), each on its own data and shapes.
- GPU (one child process, so a kernel that deadlocks on raced lock counters is killed by a timeout instead of
  hanging the suite):
    two_streams          one thread, two CUDA streams, the same shape on both (same workspace size) plus
                         another shape, launches interleaved and released together after a GPU sleep;
    threads_own_streams  two Python threads, each on its own stream, cold dispatch cache, shapes new to the
                         process (first-call compilation in both threads at once);
    threads_one_stream   two Python threads on the default stream;
    graphs_two_streams   two CUDA graphs captured on one stream that had eager calls before (so a backend
                         caching scratch per stream hands both graphs the same buffer), replayed at the same
                         time on two other streams while eager calls run on the capture stream.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.dirname(here)]

import pytest
import torch

from w4a16_ops import dispatch
from w4a16_ops.backends.reference import gemm_float64

from helpers import make_case
from test_fuzz import compare, forced, problem_of, serving_backends

PATHS = [n for n, why in dispatch.unavailable_backends().items() if why is None] + ["auto"]


def _serves(path, case) -> bool:
    return path == "auto" or path in serving_backends(problem_of(case.x, case.scales, case.zeros))


def _run_threads(worker_fns):
    barrier = threading.Barrier(len(worker_fns))
    errors = [None] * len(worker_fns)

    def wrap(i, fn):
        try:
            barrier.wait()
            fn()
        except BaseException as e:  # reported by the caller
            errors[i] = f"thread {i}: {type(e).__name__}: {str(e)[:400]}"

    threads = [threading.Thread(target=wrap, args=(i, fn)) for i, fn in enumerate(worker_fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [e for e in errors if e]


def _thread_worker(case, ref, calls, results, stream=None):
    def fn():
        ctx = torch.cuda.stream(stream) if stream is not None else _null()
        with ctx:
            outs = [torch.ops.w4a16.gemm(*case.args) for _ in range(calls)]
        if stream is not None:
            stream.synchronize()
        results.extend(compare(o, ref, case.x.dtype) for o in outs)

    return fn


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ------------------------------------------------------------------------------------------ CPU
def test_two_python_threads_cpu(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    dispatch._select.cache_clear()  # both threads take the cold path of the backend choice at once
    cases = [make_case(7, 512, 264, 128, zeros=True, seed=1), make_case(13, 384, 136, 384, zeros=False,
                                                                          dtype=torch.bfloat16, seed=2),
             make_case(7, 512, 264, 128, zeros=True, seed=3)]
    refs = [gemm_float64(*c.args) for c in cases]
    results = [[] for _ in cases]
    errors = _run_threads([_thread_worker(c, r, 15, res) for c, r, res in zip(cases, refs, results)])
    assert not errors, errors
    for i, res in enumerate(results):
        assert len(res) == 15 and not any(res), f"thread {i}: {[m for m in res if m][:3]}"


# ------------------------------------------------------------------------------------------ GPU scenarios (child)
def _cases(shapes, dtype, seed):
    return [make_case(M, K, N, G, zeros=z, dtype=dtype, device="cuda", seed=seed + i)
            for i, (M, K, N, G, z) in enumerate(shapes)]


def scenario_two_streams(path, dtype):
    cases = _cases([(1, 4096, 4096, 128, True), (1, 4096, 4096, 128, True), (16, 2112, 2120, 64, False)], dtype, 10)
    if not all(_serves(path, c) for c in cases):
        return "skip"
    refs = [gemm_float64(*c.args) for c in cases]
    for c in cases:
        torch.ops.w4a16.gemm(*c.args)  # compile / warm up outside the timed overlap
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    for s in (s1, s2):
        s.wait_stream(torch.cuda.current_stream())
    outs = [[], [], []]
    for _ in range(20):
        for s in (s1, s2):
            with torch.cuda.stream(s):
                torch.cuda._sleep(5_000_000)  # hold both streams, then release their queued calls together
        for _ in range(3):
            with torch.cuda.stream(s1):
                outs[0].append(torch.ops.w4a16.gemm(*cases[0].args))
                outs[2].append(torch.ops.w4a16.gemm(*cases[2].args))
            with torch.cuda.stream(s2):
                outs[1].append(torch.ops.w4a16.gemm(*cases[1].args))
                outs[2].append(torch.ops.w4a16.gemm(*cases[2].args))
    torch.cuda.synchronize()
    for i, (c, ref) in enumerate(zip(cases, refs)):
        for j, o in enumerate(outs[i]):
            msg = compare(o, ref, dtype)
            if msg:
                return f"case {i} call {j}: {msg}"
    return None


def scenario_threads(path, dtype, own_streams: bool):
    dispatch._select.cache_clear()
    # Shapes no other test uses: the first calls (dispatch, Triton compilation) happen in both threads at once.
    shapes = [(5, 3072, 1544, 128, True), (9, 1536, 3080, 64, False)] if own_streams else \
        [(3, 2112, 1032, 64, True), (3, 2112, 1032, 64, True)]
    cases = _cases(shapes, dtype, 20 + own_streams)
    if not all(_serves(path, c) for c in cases):
        return "skip"
    refs = [gemm_float64(*c.args) for c in cases]
    torch.cuda.synchronize()
    results = [[] for _ in cases]
    streams = [torch.cuda.Stream() if own_streams else None for _ in cases]
    errors = _run_threads([_thread_worker(c, r, 20, res, s) for c, r, res, s in zip(cases, refs, results, streams)])
    torch.cuda.synchronize()
    if errors:
        return "; ".join(errors)
    for i, res in enumerate(results):
        bad = [m for m in res if m]
        if bad or len(res) != 20:
            return f"thread {i}: {len(bad)} of {len(res)} results wrong: {bad[:2]}"
    return None


def scenario_graphs_two_streams(path, dtype):
    shapes = [(1, 4096, 4096, 128, True)] * 3
    cases = _cases(shapes, dtype, 30)
    if not all(_serves(path, c) for c in cases):
        return "skip"
    refs = [gemm_float64(*c.args) for c in cases]
    cap = torch.cuda.Stream()
    cap.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(cap):
        for c in cases:
            torch.ops.w4a16.gemm(*c.args)  # eager calls on the capture stream first
    cap.synchronize()
    graphs, outs = [], []
    for c in cases[:2]:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=cap):
            ys = [torch.ops.w4a16.gemm(*c.args) for _ in range(8)]
        graphs.append(g)
        outs.append(ys)
    torch.cuda.synchronize()
    t1, t2 = torch.cuda.Stream(), torch.cuda.Stream()
    eager = []
    for rnd in range(5):
        for s in (t1, t2, cap):
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                torch.cuda._sleep(5_000_000)
        with torch.cuda.stream(t1):
            graphs[0].replay()
        with torch.cuda.stream(t2):
            graphs[1].replay()
        with torch.cuda.stream(cap):
            eager += [torch.ops.w4a16.gemm(*cases[2].args) for _ in range(8)]
        torch.cuda.synchronize()
        for gi in range(2):
            for j, y in enumerate(outs[gi]):
                msg = compare(y, refs[gi], dtype)
                if msg:
                    return f"round {rnd}: graph {gi} output {j}: {msg}"
    for j, y in enumerate(eager):
        msg = compare(y, refs[2], dtype)
        if msg:
            return f"eager call {j} on the capture stream: {msg}"
    return None


SCENARIOS = {
    "two_streams": scenario_two_streams,
    "threads_own_streams": lambda p, d: scenario_threads(p, d, True),
    "threads_one_stream": lambda p, d: scenario_threads(p, d, False),
    "graphs_two_streams": scenario_graphs_two_streams,
}
GPU_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def child_main():
    for name, fn in SCENARIOS.items():
        for path in PATHS:
            for dt, dtype in GPU_DTYPES.items():
                key = f"{name}/{path}/{dt}"
                print(json.dumps({"begin": key}), flush=True)
                try:
                    with forced(path):
                        res = fn(path, dtype)
                    torch.cuda.synchronize()
                except Exception as e:
                    res = f"raised {type(e).__name__}: {str(e)[:500]}"
                    print(json.dumps({"end": key, "result": res}), flush=True)
                    if "CUDA" in str(e):
                        return 3
                    continue
                print(json.dumps({"end": key, "result": res}), flush=True)
    return 0


@pytest.fixture(scope="module")
def gpu_results():
    """Runs every GPU scenario once in a child process; {key: None (passed) | "skip" | failure}."""
    cmd = [sys.executable, os.path.abspath(__file__), "child"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        stdout, note = proc.stdout, f"exit {proc.returncode}"
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        note = "killed after 240 s (hung?)"
        proc = None
    results, begun = {}, None
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        obj = json.loads(line)
        if "begin" in obj:
            begun = obj["begin"]
        else:
            results[obj["end"]] = obj["result"]
            begun = None
    if begun is not None:
        results[begun] = f"the child process died or hung during it ({note})"
    tail = (proc.stderr[-1500:] if proc is not None else "")
    return results, note, tail


@pytest.mark.gpu
@pytest.mark.xdist_group("concurrency_child")  # one child run for all cases under pytest -n (--dist loadgroup)
@pytest.mark.parametrize("dt", list(GPU_DTYPES))
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_concurrent_calls_gpu(gpu_results, scenario, path, dt):
    results, note, tail = gpu_results
    key = f"{scenario}/{path}/{dt}"
    if key not in results:
        pytest.fail(f"{key} did not run: the child process ended before it ({note}); stderr tail: {tail}")
    res = results[key]
    if res == "skip":
        pytest.skip(f"{path} does not serve this scenario's shapes")
    assert res is None, f"{key}: {res}"


if __name__ == "__main__" and sys.argv[1:] == ["child"]:
    sys.exit(child_main())
