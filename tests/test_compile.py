"""torch.library registration: opcheck, one opaque node under torch.compile, dynamic M."""

import pytest
import torch

import w4a16_ops  # noqa: F401

from helpers import assert_close_to_reference, make_case


def sample_inputs(device="cpu"):
    """The shared sample set for opcheck (and anything else that wants typical calls)."""
    yield make_case(5, 128, 64, 32, zeros=True, device=device).args
    yield make_case(1, 256, 136, 256, zeros=False, dtype=torch.bfloat16, device=device).args
    yield make_case(None, 96, 16, 96, zeros=False, device=device, lead=(2, 3)).args
    yield make_case(7, 128, 64, 64, zeros=True, device=device, strided=True).args
    x, qw, s, z = make_case(3, 128, 64, 128, zeros=True, device=device).args
    yield (x.requires_grad_(True), qw, s, z)


@pytest.mark.parametrize("i", range(5))
def test_opcheck(i):
    args = list(sample_inputs())[i]
    torch.library.opcheck(torch.ops.w4a16.gemm.default, args)


def _count_nodes(fn, *args, **compile_kwargs):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    out = torch.compile(fn, backend=backend, fullgraph=True, **compile_kwargs)(*args)
    return out, graphs


def test_compile_sees_one_node():
    case = make_case(4, 256, 136, 128, zeros=True)

    def f(x, qw, s, z):
        return torch.ops.w4a16.gemm(x, qw, s, z)

    out, graphs = _count_nodes(f, *case.args)
    assert len(graphs) == 1
    calls = [n for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls] in ([torch.ops.w4a16.gemm], [torch.ops.w4a16.gemm.default]), calls
    assert_close_to_reference(out, case, "compiled")


def test_compile_inductor_matches_eager():
    case = make_case(6, 128, 64, 64, zeros=False, dtype=torch.bfloat16)

    def f(x, qw, s, z):
        return torch.nn.functional.silu(torch.ops.w4a16.gemm(x, qw, s, z)) * 2

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(*case.args)
    expected = f(*case.args)
    assert torch.allclose(got.float(), expected.float(), rtol=2e-2, atol=1e-2)


def test_dynamic_m_does_not_recompile():
    torch._dynamo.reset()
    base = make_case(2, 256, 72, 64, zeros=True)

    def f(x, qw, s, z):
        return torch.ops.w4a16.gemm(x, qw, s, z)

    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(f, backend=backend, fullgraph=True)
    x0 = torch.randn(2, 256, dtype=torch.float16)
    # Unbacked: no 0/1 specialization, so M = 1 (decode) shares the graph with every other M.
    torch._dynamo.decorators.mark_unbacked(x0, 0)
    compiled(x0, *base.args[1:])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for M in (1, 7, 64, 300):
            case = base._replace(x=torch.randn(M, 256, dtype=torch.float16))
            assert_close_to_reference(compiled(*case.args), case, f"dynamic M={M}")
    assert len(frames) == 1


def test_compile_reports_bad_input_at_trace_time():
    case = make_case(4, 256, 136, 128, zeros=True)
    torch._dynamo.reset()
    f = torch.compile(lambda x, qw, s, z: torch.ops.w4a16.gemm(x, qw, s, z), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="x must be float16 or bfloat16, got torch.float32"):
        f(case.x.float(), *case.args[1:])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "auto"])
def test_reduce_overhead_mode_on_the_gpu(monkeypatch, backend):
    # cudagraph trees run warm-up calls with allocations routed to the graph's pool and reject live tensors there
    # that are not outputs: the backends' persistent buffers (CUDA lock counters) must live outside it.
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    monkeypatch.setenv("W4A16_BACKEND", backend)
    torch._dynamo.reset()
    base = make_case(16, 512, 320, 128, zeros=False, device="cuda")

    def f(x, qw, s, z):
        return torch.ops.w4a16.gemm(x, qw, s, z) * 2

    compiled = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for M in (16, 16, 16, 3, 3, 3, 16):  # warm-up, capture, replays; a second size; back to the first
        case = base._replace(x=torch.randn(M, 512, dtype=torch.float16, device="cuda"))
        out = compiled(*case.args).clone()
        assert_close_to_reference(out / 2, case, f"reduce-overhead {backend} M={M}")
