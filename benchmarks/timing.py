"""Timing as the field does it: CUDA events, warm-up, medians, weights cold in L2, graph replay.

Every call reads a different copy of the weights (the copies together exceed the L2 several
times over), as consecutive layers of a model do, so no call finds its weights in L2 and nothing
is written to flush it. The calls are captured in one CUDA graph so launch gaps do not count.
The op benchmark times the kernels of one point interleaved (time_interleaved: one replay of each per
repetition) and the dense matmul twice (two graphs), so its report states the run's own noise.
"""

from __future__ import annotations

import statistics
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


def l2_bytes() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size


def copies_needed(bytes_per_copy: int, factor: float = 3.0, at_least: int = 2, at_most: int = 64) -> int:
    """How many weight copies to rotate through so that together they are `factor` x the L2."""
    need = int(factor * l2_bytes() / max(bytes_per_copy, 1)) + 1
    return max(at_least, min(at_most, need))


def packed_copies(packed) -> list:
    """packed (a PackedW4A16) and clones of it, enough to rotate through more than the L2 (zeros may be None)."""
    n = copies_needed(sum(t.numel() * t.element_size() for t in packed if t is not None))
    return [packed] + [type(packed)(*(t if t is None else t.clone() for t in packed)) for _ in range(n - 1)]


def prepare(calls: Sequence[Callable[[], object]], warmup: int = 3, graph: bool = True) -> Callable[[], None]:
    """A run() that makes every call once (a CUDA-graph replay when graph), after warm-up. calls[i] touches weight
    copy i. The graph does not own the tensors the calls read: the caller keeps `calls` alive as long as run()."""
    for _ in range(warmup):  # compile / autotune-free warm-up and allocator settling
        for c in calls:
            c()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for c in calls:  # one more warm-up on the capture stream
                c()
            with torch.cuda.graph(g, stream=stream):
                for c in calls:
                    c()
        torch.cuda.current_stream().wait_stream(stream)
        run = g.replay
    else:

        def run():
            for c in calls:
                c()

    for _ in range(warmup):
        run()
    return run


def _time_once(run: Callable[[], None]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3


def time_interleaved(runs: Dict[str, Tuple[Callable[[], None], int]], reps: int = 20,
                     budget_s: Optional[float] = None, min_reps: int = 5) -> Dict[str, List[float]]:
    """Microseconds per call of each run, repetition by repetition: each repetition runs every entry once, in
    turn, so a GPU whose clock drifts during the point favours none. runs: name -> (run, calls per run).
    budget_s: per entry, as in time_rotating (the repetitions stop once all together took budget_s x entries)."""
    times: Dict[str, List[float]] = {k: [] for k in runs}
    total = 0.0
    for r in range(reps):
        for k, (run, n) in runs.items():
            t = _time_once(run)
            total += t * 1e-6
            times[k].append(t / n)
        if budget_s is not None and r + 1 >= min_reps and total >= budget_s * len(runs):
            break
    return times


def time_rotating(
    calls: Sequence[Callable[[], object]],
    reps: int = 20,
    warmup: int = 3,
    graph: bool = True,
    budget_s: Optional[float] = None,
    min_reps: int = 5,
) -> float:
    """Median microseconds per call. calls[i] touches weight copy i; all of them run per repetition.
    budget_s: stop repeating once the timed repetitions took this long (but not before min_reps), so
    that slow points (large M) do not cost reps x seconds."""
    run = prepare(calls, warmup, graph)
    times = time_interleaved({"k": (run, len(calls))}, reps, budget_s, min_reps)["k"]
    del run
    return statistics.median(times)


def measure_copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    a.normal_()
    t = time_rotating([lambda: b.copy_(a)], reps=10, graph=False)
    return 2 * nbytes / (t * 1e-6)


def measure_matmul_rate(n: int = 8192) -> float:
    """Dense fp16 FLOP/s of torch.matmul at n^3."""
    a = torch.randn(n, n, dtype=torch.float16, device="cuda")
    b = torch.randn(n, n, dtype=torch.float16, device="cuda")
    t = time_rotating([lambda: a @ b], reps=10, graph=False)
    return 2 * n**3 / (t * 1e-6)
