"""The CUDA C++ backend against the float64 reference (GPU), and its dispatch rules (CPU).

Every GPU case runs on fresh random data with a NaN-poisoned output (helpers.run_backend), so an element the kernel
forgets to write fails. Shapes cover M = 1, odd M, M just past the kernel's 16-row blocks and 64-row chunks, both
strategies (fused kernel below cuda.DEQUANT_MIN_M, dequantize + dense GEMM from it), columns split across blocks,
N % 64 != 0, K tails, every group size, zeros or not, both dtypes, strided x and leading dims.
"""

import subprocess
import sys

import pytest
import torch

import w4a16_ops
from w4a16_ops import dispatch
from w4a16_ops.backends import cuda as cuda_backend
from w4a16_ops.problem import Problem

from helpers import assert_close_to_reference, groups_for, make_case, run_backend

DTYPES = [torch.float16, torch.bfloat16]
DT_ID = {torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture
def cuda_ready():
    why = cuda_backend.availability()
    # On a GPU machine the extension must be there: a missing build is a failure, not a skip.
    assert why is None, f"the CUDA backend is unavailable: {why}"


def _check(M, K, N, G, zeros, dtype, **kw):
    case = make_case(M, K, N, G, zeros=zeros, dtype=dtype, device="cuda", **kw)
    out = run_backend("cuda", case)
    return assert_close_to_reference(out, case, f"cuda M={M} K={K} N={N} G={G} zeros={zeros} {DT_ID[dtype]}")


# ---------------------------------------------------------------- GPU: correctness grid

M_SWEEP = [1, 3, 16, 17, 33, 64, 65, 127, 256, 4096]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("K,N", [(128, 64), (4096, 4096)])
@pytest.mark.parametrize("M", M_SWEEP)
def test_m_sweep(cuda_ready, M, K, N, dtype):
    _check(M, K, N, 128, M_SWEEP.index(M) % 2 == 1, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("zeros", [False, True], ids=["sym", "zeros"])
@pytest.mark.parametrize("G", groups_for(1024))
@pytest.mark.parametrize("M", [1, 33])
def test_every_group_size(cuda_ready, M, G, zeros, dtype):
    # N = 320: five 64-column tiles, so the last block tile is half empty under the default 128-column tiling.
    _check(M, 1024, 320, G, zeros, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "M,K,N,dtype,zeros",
    [
        (1, 4096, 14336, torch.float16, False),
        (16, 4096, 14336, torch.bfloat16, True),
        (64, 4096, 14336, torch.float16, True),
        (1, 14336, 4096, torch.bfloat16, False),
        (16, 14336, 4096, torch.float16, False),
    ],
)
def test_model_layers(cuda_ready, M, K, N, dtype, zeros):
    _check(M, K, N, 128, zeros, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "K,N,G",
    [
        (4096, 2120, 128),  # N % 64 != 0 (masked output columns)
        (2112, 4096, 64),  # K % 128 != 0 (K tail inside a pipeline stage)
        (200, 264, 200),  # channelwise, K % 16 == 8 (half a 16-row slab)
        (100, 72, 100),  # K % 8 != 0: x is padded to K = 104
        (32, 8, 32),  # the smallest shape the format has
    ],
)
@pytest.mark.parametrize("M", [1, 17, 300])
def test_unaligned_shapes(cuda_ready, M, K, N, G):
    dtype = torch.float16 if M % 2 else torch.bfloat16
    _check(M, K, N, G, M == 17, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("tuning", [(0, 0, 1), (0, 0, 2), (1, 0, 0), (0, 2, 0), (0, 1, 0), (2, 3, 2)],
                         ids=lambda t: "bps%d-splits%d-scaling%d" % t)
@pytest.mark.parametrize("M", [1, 16, 32, 48, 64])
def test_every_kernel_instance(cuda_ready, monkeypatch, M, tuning, dtype):
    # M = 1 / 32 / 48 / 64 select 1..4 row blocks; scaling 1 / 2 the 16-bit-weight / fp32-partial-sum instances at
    # MB <= 2 (all 12 run); bps = 1 and splits = 1..3 run coarser partitions (fewer blocks, fewer or no split columns).
    monkeypatch.setattr(cuda_backend, "TUNING", tuning)
    _check(M, 1024, 704, 64, M == 48, dtype)
    plan = torch.ops.w4a16._cuda_gemm_plan(M, 1024, 704, 64, dtype == torch.bfloat16, *tuning)
    if M <= 32 and tuning[2]:
        assert plan[12] == (tuning[2] == 2), f"scaling {tuning[2]} did not select its instance: plan {plan}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("scaling", [1, 2], ids=["w16", "f32"])
@pytest.mark.parametrize("zeros", [False, True], ids=["sym", "zeros"])
@pytest.mark.parametrize("K,G", [(1280, 128), (1280, 256), (1304, 1304)], ids=["G128", "G256", "channelwise-Ktail"])
@pytest.mark.parametrize("M", [1, 17, 32])
def test_both_scalings(cuda_ready, monkeypatch, M, K, G, zeros, scaling, dtype):
    # One scale row per stage (G >= 128, or channelwise with K % 16 != 0): the f32 instance scales its fp32 partial
    # sums per stage, the w16 one the 16-bit weights; both at MB = 1 and 2 (M = 1, 17, 32).
    monkeypatch.setattr(cuda_backend, "TUNING", (0, 0, scaling))
    _check(M, K, 576, G, zeros, dtype)


@pytest.mark.gpu
def test_strategy_boundary(cuda_ready):
    m = cuda_backend.DEQUANT_MIN_M
    for M in (m - 1, m):
        _check(M, 256, 192, 64, True, torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("M", [1, 16, 2048])
def test_public_op_strided_and_leading_dims(cuda_ready, monkeypatch, M, dtype):
    monkeypatch.setenv("W4A16_BACKEND", "cuda")
    K, N = 512, 384
    for kw in ({"strided": True}, {"lead": (2, M)}):
        case = make_case(M, K, N, 64, zeros=True, dtype=dtype, device="cuda", **kw)
        out = w4a16_ops.gemm(*case.args)
        assert_close_to_reference(out, case, f"public op {kw}")


@pytest.mark.gpu
def test_dispatch_prefers_cuda(cuda_ready):
    for K, N in ((4096, 4096), (4096, 2120), (2112, 4096)):
        d = w4a16_ops.explain(1, K, N, group_size=64 if K == 2112 else 128)
        assert d.backend == "cuda", d


@pytest.mark.gpu
def test_deterministic_and_locks_left_zero(cuda_ready):
    # 4096 x 4096 at M = 16 splits every column across blocks (cross-block reduction).
    M, K, N = 16, 4096, 4096
    plan = torch.ops.w4a16._cuda_gemm_plan(M, K, N, 128, False)
    assert plan[8] > 0, f"expected split columns (a workspace) for this shape, plan {plan}"
    case = make_case(M, K, N, 128, zeros=True, dtype=torch.float16, device="cuda")
    outs = [run_backend("cuda", case) for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:]), "results differ between identical calls"
    torch.cuda.synchronize()
    for key, buf in cuda_backend._locks_cache.items():
        assert int(buf.abs().sum()) == 0, f"lock counters not back to zero for {key}"
    for dev, arena in cuda_backend._locks_arena.items():
        assert int(arena.buf.abs().sum()) == 0, f"captured-call lock counters not zero on device {dev}"


@pytest.mark.gpu
def test_cuda_graph_replay(cuda_ready, monkeypatch):
    monkeypatch.setenv("W4A16_BACKEND", "cuda")
    M, K, N = 8, 2048, 1024
    case = make_case(M, K, N, 128, zeros=False, dtype=torch.bfloat16, device="cuda")
    x = case.x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        w4a16_ops.gemm(x, *case.args[1:])  # warm-up on a side stream (zeroes the device's lock arena)
    torch.cuda.current_stream().wait_stream(s)
    used = cuda_backend._locks_arena[x.device.index].next
    graphs, ys = [], []
    for _ in range(2):  # two graphs captured on one stream: each captured call must own its counters
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            ys.append(w4a16_ops.gemm(x, *case.args[1:]))
        graphs.append(g)
    assert cuda_backend._locks_arena[x.device.index].next >= used + 2 * 32, "two graphs share lock counters"
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        for g in graphs:
            g.replay()
        torch.cuda.synchronize()
        expected = w4a16_ops.gemm(x, *case.args[1:])
        for y in ys:
            assert torch.equal(y, expected), "graph replay differs from an eager call"


@pytest.mark.gpu
def test_graph_capture_at_serving_scale(cuda_ready, monkeypatch):
    # A server captures graphs for dozens of batch sizes x every layer: 20,000 captured calls here (100 graphs of
    # 200 calls sharing one memory pool, M mixed up to 255, a 4096 x 28672 layer and a 14336 x 4096 one). None may
    # record a memset of its own counters, and a graph captured last must replay as fast as the first one.
    monkeypatch.setenv("W4A16_BACKEND", "cuda")
    layers = [make_case(1, 4096, 28672, 128, zeros=False, dtype=torch.float16, device="cuda"),
              make_case(1, 14336, 4096, 128, zeros=True, dtype=torch.float16, device="cuda")]
    xs = {M: torch.randn(M, 14336, dtype=torch.float16, device="cuda") for M in range(1, 256)}
    fallbacks = cuda_backend._captured_memsets
    w4a16_ops.gemm(xs[1][:, :4096], *layers[0].args[1:])  # eager warm-up (zeroes the arena)

    def capture(calls, pool=None):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            ys = [w4a16_ops.gemm(xs[M][:, : c.x.shape[1]], *c.args[1:]) for M, c in calls]
        return g, ys

    one = [(1, layers[0])]
    first, first_y = capture(one)
    pool = first.pool()
    graphs = []
    for gi in range(100):
        calls = [((gi * 200 + i) * 37 % 255 + 1, layers[i % 2]) for i in range(200)]
        graphs.append(capture(calls, pool)[0])
        if gi % 10 == 9:  # a server runs eager warm-up steps between its captures
            w4a16_ops.gemm(xs[16][:, :4096], *layers[0].args[1:])
    assert cuda_backend._captured_memsets == fallbacks, "a captured call recorded a memset of its own counters"
    last, last_y = capture(one, pool)
    assert cuda_backend._captured_memsets == fallbacks

    def replay_us(g):
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(30):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        return sorted(times)[len(times) // 2]

    t_first, t_last = replay_us(first), replay_us(last)
    assert torch.equal(first_y[0], last_y[0]), "the graph captured last computes something else"
    assert_close_to_reference(last_y[0], layers[0]._replace(x=xs[1][:, :4096]), "graph captured after 20,000 calls")
    assert t_last <= 1.2 * t_first + 2.0, f"a newly captured call is slower: {t_last:.1f} us vs {t_first:.1f} us"
    graphs[-1].replay()
    torch.cuda.synchronize()
    for dev, arena in cuda_backend._locks_arena.items():
        assert int(arena.buf.abs().sum()) == 0, f"captured-call lock counters not zero on device {dev}"


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [1, 2], ids=["plain", "pdl"])
@pytest.mark.parametrize("prefetch", [-1, 4], ids=["nopf", "pf4"])
def test_programmatic_launch_chains(cuda_ready, monkeypatch, pdl, prefetch):
    # Back-to-back calls where each reads what the one before wrote (x of call i+1 = out of call i, and the weights
    # of the last call written by the kernel just before it): with PDL a kernel may start before its predecessor
    # ends, so anything read before griddepcontrol.wait would be stale. Eager, then the same chain in a CUDA graph.
    monkeypatch.setenv("W4A16_BACKEND", "cuda")
    monkeypatch.setattr(cuda_backend, "TUNING", (0, 0, 0, pdl, prefetch))
    K = N = 2048
    case = make_case(16, K, N, 128, zeros=True, dtype=torch.float16, device="cuda")
    w = case.args[1:]
    q_src = w[0].clone()
    q = torch.zeros_like(w[0])

    def chain(x):
        ys = [x]
        for _ in range(4):  # each call reads the previous call's output as x (values grow ~5x per link: fp16 is fine)
            ys.append(w4a16_ops.gemm(ys[-1], *w))
        q.copy_(q_src)  # the last call's weights come from the kernel right before it
        ys.append(w4a16_ops.gemm(ys[-1], q, *w[1:]))
        return ys

    eager = chain(case.x)
    for i in range(1, len(eager)):  # each link against the float64 product of the previous link's own output
        link = case._replace(x=eager[i - 1], qweight=q if i == len(eager) - 1 else w[0])
        assert_close_to_reference(eager[i], link, f"eager link {i} pdl={pdl} prefetch={prefetch}")
    x = case.x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain(x)  # warm-up on the capture stream (its counters)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ys = chain(x)
    for _ in range(2):
        q.zero_()
        g.replay()
        torch.cuda.synchronize()
        for i, (a, b) in enumerate(zip(ys[1:], eager[1:])):
            assert torch.equal(a, b), f"graph replay link {i + 1} differs from eager (pdl={pdl}, prefetch={prefetch})"


_BULK_CHILD = """
import sys, torch
sys.path.insert(0, "tests")
from helpers import assert_close_to_reference, make_case, run_backend
from w4a16_ops.backends import cuda as cb
assert cb.availability() is None, cb.availability()
plan = torch.ops.w4a16._cuda_gemm_plan(1, 2048, 2048, 128, False, 0, 0, 0, 0, 0, 1)
if plan[16] != 1:
    print("SKIP: no bulk instance on this GPU", plan)
    sys.exit(0)
cases = [(1, 2048, 2048, 128, False, torch.float16), (7, 2112, 4096, 64, True, torch.bfloat16),
         (16, 4096, 2120, 128, True, torch.float16), (3, 1024, 320, 32, False, torch.bfloat16),
         (1, 200, 264, 200, True, torch.float16), (13, 14336, 4096, 128, False, torch.float16),
         (1, 4096, 28672, 128, True, torch.bfloat16)]
for i, (M, K, N, G, zeros, dtype) in enumerate(cases):
    case = make_case(M, K, N, G, zeros=zeros, dtype=dtype, device="cuda", seed=i)
    for pdl in (1, 2):
        cb.TUNING = (0, 0, 0, pdl, -1, 0)
        plain = run_backend("cuda", case)
        cb.TUNING = (0, 0, 0, pdl, -1, 1)
        bulk = run_backend("cuda", case)
        torch.cuda.synchronize()
        assert_close_to_reference(bulk, case, f"bulk M={M} K={K} N={N} G={G}")
        assert torch.equal(bulk, plain), f"bulk ring differs from the plain kernel: M={M} K={K} N={N} G={G}"
case = make_case(5, 4096, 4096, 128, zeros=True, dtype=torch.float16, device="cuda", seed=99)
cb.TUNING = (0, 0, 0, 2, -1, 1)
s = torch.cuda.Stream()
s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    eager = run_backend("cuda", case)
torch.cuda.current_stream().wait_stream(s)
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    ys = [run_backend("cuda", case) for _ in range(4)]
for _ in range(3):
    g.replay()
torch.cuda.synchronize()
assert all(torch.equal(y, eager) for y in ys), "bulk ring in a graph differs from eager"
print("BULK OK")
"""


@pytest.mark.gpu
def test_bulk_copy_ring_matches_the_plain_kernel(cuda_ready):
    # The bulk-copy weight ring (an experiment behind TUNING[5]) puts the same bytes in the same shared memory as the
    # per-thread copies, so its results must be bit-identical to the plain kernel's. Run in a child process: its
    # mbarrier waits trap instead of hanging if a phase never completes, which must fail this test only.
    root = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", _BULK_CHILD], capture_output=True, text=True, timeout=120, cwd=root)
    assert p.returncode == 0 and ("BULK OK" in p.stdout or "SKIP" in p.stdout), p.stdout[-1500:] + p.stderr[-3000:]


@pytest.mark.gpu
def test_plan_reports_pdl_and_prefetch(cuda_ready):
    major = torch.cuda.get_device_capability()[0]
    default = torch.ops.w4a16._cuda_gemm_plan(1, 4096, 4096, 128, False)
    off = torch.ops.w4a16._cuda_gemm_plan(1, 4096, 4096, 128, False, 0, 0, 0, 1, -1)
    on = torch.ops.w4a16._cuda_gemm_plan(1, 4096, 4096, 128, False, 0, 0, 0, 2, 3)
    assert default[14] == 0 and off[14] == 0 and on[14] == (major >= 9), (default, off, on)  # default: plain
    assert off[15] == 0 and on[15] == (3 if major >= 9 else 0), (off, on)
    bulk = torch.ops.w4a16._cuda_gemm_plan(1, 4096, 4096, 128, False, 0, 0, 0, 0, 0, 1)
    bulk32 = torch.ops.w4a16._cuda_gemm_plan(32, 4096, 4096, 128, False, 0, 0, 0, 0, 0, 1)
    assert default[16] == 0 and bulk[16] == (major >= 9) and bulk32[16] == 0, (default, bulk, bulk32)


@pytest.mark.gpu
def test_weights_at_unaligned_offsets(cuda_ready):
    # Contiguous views at an odd offset into flat buffers are valid weights: the backend copies them aligned.
    M, K, N, G = 5, 512, 192, 64
    case = make_case(M, K, N, G, zeros=True, dtype=torch.float16, device="cuda")

    def shifted(t, by):
        flat = torch.empty(t.numel() + by, dtype=t.dtype, device=t.device)
        view = flat[by:].view(t.shape)
        view.copy_(t)
        assert view.data_ptr() % 16 != 0
        return view

    odd = case._replace(qweight=shifted(case.qweight, 1), scales=shifted(case.scales, 1), zeros=shifted(case.zeros, 1))
    for m in (M, cuda_backend.DEQUANT_MIN_M):  # both strategies
        c = odd._replace(x=torch.randn(m, K, device="cuda", dtype=torch.float16))
        assert_close_to_reference(run_backend("cuda", c), c, f"unaligned weights M={m}")


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 17, 64])
def test_x_at_an_odd_offset(cuda_ready, M):
    # x contiguous but 2 bytes into its storage: x.contiguous() is x itself, so the backend must copy it aligned
    # (the GPU fuzz found the unaligned view reaching the kernel: the process died).
    K, N, G = 608, 608, 32
    case = make_case(M, K, N, G, zeros=True, dtype=torch.bfloat16, device="cuda")
    flat = torch.full((M * K + 1,), float("nan"), dtype=torch.bfloat16, device="cuda")
    x = flat[1:].view(M, K)
    x.copy_(case.x)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    c = case._replace(x=x)
    assert_close_to_reference(run_backend("cuda", c), c, f"x at offset 1, M={M}")


_REJECT_CHILD = """
import torch, w4a16_ops._C
x = torch.empty(3 * 256 + 1, dtype=torch.float16, device="cuda")[1:].view(3, 256)
qweight = torch.zeros(16, 128, dtype=torch.int32, device="cuda")
scales = torch.ones(1, 128, dtype=torch.float16, device="cuda")
out = torch.empty(3, 128, dtype=torch.float16, device="cuda")
locks = torch.zeros(1 << 16, dtype=torch.int32, device="cuda")
try:
    torch.ops.w4a16._cuda_gemm(x, qweight, scales, None, out, locks, 0)
except RuntimeError as e:
    print("RuntimeError:", e)
"""


@pytest.mark.gpu
def test_binding_rejects_an_unaligned_x(cuda_ready):
    # The private op checks what the kernel assumes and raises; it must never crash the process. Run in a child
    # process: a crash here must fail this test, not take the test worker down.
    p = subprocess.run([sys.executable, "-c", _REJECT_CHILD], capture_output=True, text=True, timeout=120)
    # Seen failing on the project's H100 image: there ANY extension built with its g++ dies on a thrown c10::Error
    # (reproduced with a ten-line op; notes/cuda.md), so the backend validates everything before the binding.
    assert p.returncode == 0, f"the process died (exit {p.returncode}): {p.stderr[-800:]}"
    assert "16-byte aligned" in p.stdout, p.stdout + p.stderr[-800:]


# ---------------------------------------------------------------- CPU: the captured calls' counter arena


def test_arena_gives_each_key_its_own_block_and_reuses_it():
    arena = cuda_backend._Arena(torch.zeros(1000, dtype=torch.int32))
    a = arena.block((1, 7), 40)
    b = arena.block((2, 7), 40)  # another capture on the same stream
    c = arena.block((1, 8), 10)  # the same capture, another stream
    assert a.numel() >= 40 and b.numel() >= 40 and c.numel() >= 10
    spans = sorted((t.storage_offset(), t.storage_offset() + t.numel()) for t in (a, b, c))
    assert all(e <= s for (_, e), (s, _) in zip(spans, spans[1:])), f"blocks overlap: {spans}"
    assert all(t.storage_offset() % 32 == 0 for t in (a, b, c)), "blocks must be 128-byte aligned"
    used = arena.next
    for n in (1, 17, 40):  # later calls of one capture on one stream share its block: no new counters
        assert arena.block((1, 7), n).data_ptr() == a.data_ptr()
    assert arena.next == used
    bigger = arena.block((1, 7), 100)  # a call needing more gets a fresh block, never one another key holds
    assert bigger.numel() >= 100 and bigger.storage_offset() >= used
    assert arena.block((3, 7), 2000) is None  # used up: the caller falls back (and counts it)


def test_arena_forgets_old_keys_without_reusing_their_blocks():
    arena = cuda_backend._Arena(torch.zeros(32 * (cuda_backend._Arena.KEYS + 10), dtype=torch.int32))
    first = arena.block(("old", 0), 32)
    for i in range(cuda_backend._Arena.KEYS):
        arena.block(("k", i), 32)
    assert ("old", 0) not in arena.blocks
    again = arena.block(("old", 0), 32)
    assert again is not None and again.data_ptr() != first.data_ptr()


def test_twenty_thousand_captured_calls_fit_the_arena():
    # The bookkeeping of the GPU serving-scale test: 100 captures x 200 calls on one stream, 4096 x 28672 at
    # M up to 255 (4 x 112 counters): one block per capture, far inside one 16 MB arena.
    arena = cuda_backend._Arena(torch.zeros(cuda_backend._ARENA_INTS, dtype=torch.int32))
    for capture in range(100):
        for i in range(200):
            M = (capture * 200 + i) * 37 % 255 + 1
            assert arena.block((capture, 0), -(-M // 64) * -(-28672 // 256)) is not None
    assert arena.next <= 100 * 2 * 448 and arena.free() > 0.9 * cuda_backend._ARENA_INTS


def test_locks_serve_captures_from_the_arena_and_replace_it_outside_capture(monkeypatch):
    # The whole counter logic of backends/cuda.py._locks on CPU tensors: eager calls use the per-stream buffer and
    # keep the arena at least a quarter free (replacing it, the old one kept alive); captured calls take one block
    # per (capture, stream) and record a memset of their own only when the arena has no room.
    from w4a16_ops.backends import _buffers

    state = {"capturing": False, "id": 0}
    monkeypatch.setattr(cuda_backend, "_capturing", lambda: state["capturing"])
    monkeypatch.setattr(cuda_backend, "_capture_id", lambda: state["id"])
    monkeypatch.setattr(cuda_backend, "_raw_stream", lambda index: 7)
    monkeypatch.setattr(cuda_backend, "persistent_zeros", lambda device, n: torch.zeros(n, dtype=torch.int32))
    monkeypatch.setattr(cuda_backend, "_ARENA_INTS", 1024)
    monkeypatch.setattr(cuda_backend, "_locks_arena", {})
    monkeypatch.setattr(cuda_backend, "_locks_cache", {})
    monkeypatch.setattr(cuda_backend, "_captured_memsets", 0)
    dev = torch.device("cpu")

    eager = cuda_backend._locks(dev, 100)
    assert eager.numel() >= 100 and cuda_backend._locks_arena[None].free() == 1024
    state["capturing"] = True
    blocks = []
    for capture in range(1, 8):  # seven captures of twelve calls each: one 128-counter block each
        state["id"] = capture
        got = {cuda_backend._locks(dev, n).data_ptr() for n in (100, 50, 100, 1) for _ in range(3)}
        assert len(got) == 1, f"capture {capture} got {len(got)} blocks"
        blocks.append(got.pop())
    assert len(set(blocks)) == 7 and eager.data_ptr() not in blocks
    first = cuda_backend._locks_arena[None]
    assert first.free() == 1024 - 7 * 128 and cuda_backend._captured_memsets == 0
    state["capturing"] = False
    cuda_backend._locks(dev, 100)  # eager: less than a quarter is left -> a fresh arena
    assert cuda_backend._locks_arena[None] is not first and any(b is first.buf for b in _buffers._retired)
    state["capturing"], state["id"] = True, 8
    fresh = cuda_backend._locks(dev, 100)
    assert fresh.data_ptr() not in blocks and cuda_backend._captured_memsets == 0
    state["id"] = 9
    own = cuda_backend._locks(dev, 4096)  # more than the arena holds: its own zeroed buffer (a recorded memset)
    assert own.numel() == 4096 and int(own.abs().sum()) == 0 and cuda_backend._captured_memsets == 1


def test_tuning_default_and_the_pdl_switch():
    assert len(cuda_backend.TUNING) == 6
    assert cuda_backend._default_tuning({}) == (0, 0, 0, 0, 0, 0)
    assert cuda_backend._default_tuning({"W4A16_CUDA_BULK": "1"})[5] == 1
    assert cuda_backend._default_tuning({"W4A16_CUDA_PDL": "0"})[3] == 1  # plain launches
    assert cuda_backend._default_tuning({"W4A16_CUDA_PDL": "1"})[3] == 2  # programmatic dependent launch
    assert cuda_backend._default_tuning({"W4A16_CUDA_PREFETCH": "-1"})[4] == -1
    assert cuda_backend._default_tuning({"W4A16_CUDA_PREFETCH": "6"})[4] == 6
    assert cuda_backend._default_tuning({"W4A16_CUDA_PREFETCH": "x"})[4] == 0


# ---------------------------------------------------------------- CPU: dispatch rules


def _p(**kw):
    base = dict(device_type="cuda", capability=(9, 0), dtype=torch.float16, M=1, K=4096, N=4096, G=128, has_zeros=False)
    base.update(kw)
    return Problem(**base)


def test_rules_serve_aligned_and_unaligned_shapes():
    for kw in ({}, {"N": 2120}, {"K": 2112, "G": 64}, {"K": 100, "G": 100}, {"capability": (8, 0)}, {"M": 8192}):
        assert cuda_backend.unsupported_reason(_p(**kw)) is None, kw


@pytest.mark.parametrize(
    "kw,words",
    [
        ({"capability": (7, 5)}, "compute capability >= 8.0"),
        ({"device_type": "cpu", "capability": None}, "CUDA devices only"),
        ({"G": 16}, "group size G = 16"),
        ({"dtype": torch.float32}, "float16 or bfloat16"),
    ],
)
def test_forcing_cuda_where_it_cannot_serve_raises(kw, words):
    p = _p(**kw)
    assert words in cuda_backend.unsupported_reason(p)
    with pytest.raises(dispatch.BackendUnavailableError, match="backend 'cuda' was forced") as e:
        dispatch.check_forced(p, "cuda", {"cuda": None, "triton": None, "reference": None})
    assert words in str(e.value)
