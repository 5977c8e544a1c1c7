"""Persistent zeroed int32 buffers the GPU backends keep across calls (lock / arrival counters).

torch.compile(mode="reduce-overhead") runs its warm-up calls with this thread's allocations routed to the
graph's private pool, and then rejects live tensors in that pool that are not graph outputs. So a buffer that
outlives the call is allocated and zeroed by a helper thread, which waits for the zeroing (once per buffer;
callers never do this while capturing). Replaced buffers are kept alive: queued kernels may still use them.
"""

from __future__ import annotations

import threading

import torch

_retired: list = []


def persistent_zeros(device: torch.device, n: int) -> torch.Tensor:
    """n int32 zeros on device, outside any CUDA-graph memory pool (CPU: plain zeros)."""
    if device.type != "cuda":
        return torch.zeros(n, dtype=torch.int32, device=device)
    made = []

    def make():
        with torch.cuda.device(device):
            t = torch.zeros(n, dtype=torch.int32, device=device)
            torch.cuda.current_stream(device).synchronize()
        made.append(t)

    worker = threading.Thread(target=make, name="w4a16-buffers")
    worker.start()
    worker.join()
    if not made:
        raise RuntimeError(f"w4a16: could not allocate {n} int32 counters on {device}")
    return made[0]


def retire(buf) -> None:
    """Keep a replaced buffer alive for the rest of the process (work already queued may still use it)."""
    if buf is not None:
        _retired.append(buf)
