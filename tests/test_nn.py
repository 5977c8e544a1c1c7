"""W4A16Linear and swap_linears: forward == the op, one op call per forward, state_dict round trips,
.to(), extra_repr, the swap report, torch.compile(fullgraph=True)."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import w4a16_ops
from w4a16_ops import W4A16Linear, swap_linears
from w4a16_ops.backends.reference import gemm_float64

from helpers import TOLERANCE, rel_err


class OpLog(TorchDispatchMode):
    """Records every aten / custom op a forward dispatches (not the ops inside them)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket).replace("aten.", "")] += 1
        return func(*args, **(kwargs or {}))


def linear(K, N, bias=True, dtype=torch.float16):
    lin = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, K**-0.5)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin.to(dtype)


def reference(layer: W4A16Linear, x: torch.Tensor) -> torch.Tensor:
    """float64 on the CPU: x[perm] @ dequantize + bias."""
    cpu = {n: (t.cpu() if t is not None else None) for n, t in layer.named_buffers()}
    cpu.update({n: None for n in ("zeros", "perm", "bias") if getattr(layer, n) is None})
    x = x.cpu()
    xp = x.index_select(-1, cpu["perm"]) if cpu["perm"] is not None else x
    y = gemm_float64(xp, cpu["qweight"], cpu["scales"], cpu["zeros"])
    return y + cpu["bias"].double() if cpu["bias"] is not None else y


# ---------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("K,N,G", [(256, 128, 128), (96, 40, -1), (512, 64, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_is_the_op(symmetric, K, N, G, dtype):
    lin = linear(K, N, dtype=dtype)
    layer = W4A16Linear.from_linear(lin, G, symmetric)
    assert layer.scales.dtype == dtype and layer.symmetric == symmetric
    assert layer.group_size == (K if G == -1 else G)
    x = torch.randn(2, 3, K, dtype=dtype)
    y = layer(x)
    op = torch.ops.w4a16.gemm(x, layer.qweight, layer.scales, layer.zeros) + layer.bias
    assert torch.equal(y, op)
    assert y.shape == (2, 3, N) and y.dtype == dtype
    assert rel_err(y, reference(layer, x)) <= TOLERANCE[dtype]
    # The quantized layer approximates the float one (4-bit RTN: a few percent).
    assert rel_err(y, lin(x).double()) < 0.2


def test_forward_dispatches_one_op_call():
    K, N = 256, 64
    x = torch.randn(8, K, dtype=torch.float16)
    cases = {
        "bias": (W4A16Linear.from_linear(linear(K, N), 128), {"w4a16.gemm": 1, "add": 1}),
        "no bias": (W4A16Linear.from_linear(linear(K, N, bias=False), 128, False), {"w4a16.gemm": 1}),
    }
    g_idx = torch.randperm(K) // 128
    q = torch.randint(0, 16, (K, N))
    qweight = torch.zeros(K // 8, N, dtype=torch.int64)
    for j in range(8):
        qweight |= q[j::8] << (4 * j)
    qweight = torch.where(qweight >= 2**31, qweight - 2**32, qweight).to(torch.int32)
    act = W4A16Linear.from_gptq(qweight, None, torch.rand(2, N, dtype=torch.float16), g_idx)
    assert act.act_order
    cases["act-order"] = (act, {"index_select": 1, "w4a16.gemm": 1})
    for what, (layer, expected) in cases.items():
        with OpLog() as log:
            layer(x)
        assert dict(log.ops) == expected, f"{what}: {dict(log.ops)}"


def test_float32_activations_are_cast_for_the_op():
    lin = linear(128, 64, dtype=torch.float32)
    layer = W4A16Linear.from_linear(lin, 64)
    assert layer.scales.dtype == torch.float16 and layer.bias.dtype == torch.float32
    x = torch.randn(5, 128)
    y = layer(x)
    assert y.dtype == torch.float32
    expected = torch.ops.w4a16.gemm(x.half(), layer.qweight, layer.scales, None) + lin.bias
    assert torch.equal(y, expected)


def test_backward_reaches_x():
    layer = W4A16Linear.from_linear(linear(128, 64), 128)
    x = torch.randn(4, 128, dtype=torch.float16, requires_grad=True)
    layer(x).float().sum().backward()
    w = w4a16_ops.dequantize(layer.qweight, layer.scales, None, 128)
    assert torch.allclose(x.grad.float(), w.sum(1).expand(4, -1), rtol=1e-2, atol=1e-2)


def test_constructor_errors():
    with pytest.raises(ValueError, match="out_features must be a positive multiple of 8"):
        W4A16Linear(128, 30)
    with pytest.raises(ValueError, match="in_features = 96 must be divisible by group_size = 64"):
        W4A16Linear(96, 64, 64)
    with pytest.raises(ValueError, match="group_size must be 32, 64, 128, 256"):
        W4A16Linear(96, 64, 48)
    with pytest.raises(ValueError, match="must be float16 or bfloat16"):
        W4A16Linear(128, 64, dtype=torch.float32)
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        W4A16Linear.from_linear(nn.Conv1d(4, 8, 1))


def test_extra_repr():
    layer = W4A16Linear.from_linear(linear(384, 128), 128, symmetric=False)
    r = repr(layer)
    for part in ("in_features=384", "out_features=128", "group_size=128", "symmetric=False", "bias=True",
                 "dtype=float16", "backend(M=1, cpu)=reference"):
        assert part in r, r
    r = repr(W4A16Linear.from_linear(linear(100, 64, bias=False), -1))
    assert "group_size=100 (channelwise)" in r and "symmetric=True" in r and "bias=False" in r


# ---------------------------------------------------------------------------------------------
# state_dict and .to()


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip(symmetric, bias):
    K, N, G = 256, 96, 64
    src = W4A16Linear.from_linear(linear(K, N, bias=bias, dtype=torch.float32), G, symmetric)
    sd = _roundtrip(src.state_dict())
    assert set(sd) == {"qweight", "scales"} | ({"bias"} if bias else set()) | (set() if symmetric else {"zeros"})
    dst = W4A16Linear(K, N, G, symmetric=symmetric, bias=bias, bias_dtype=torch.float32)
    dst.load_state_dict(sd)
    x = torch.randn(3, K, dtype=torch.float16)
    assert torch.equal(dst(x), src(x))
    for name, t in src.state_dict().items():
        assert torch.equal(getattr(dst, name), t)


def test_state_dict_adopts_optional_buffers_and_dtypes():
    K, N = 256, 64
    g_idx = torch.randperm(K) // 128
    src = W4A16Linear.from_gptq(
        torch.randint(-(2**31), 2**31 - 1, (K // 8, N), dtype=torch.int32),
        torch.randint(-(2**31), 2**31 - 1, (2, N // 8), dtype=torch.int32),
        torch.rand(2, N, dtype=torch.bfloat16),
        g_idx,
        bias=torch.randn(N),
        checkpoint_format="gptq_v2",
    )
    assert src.act_order and not src.symmetric
    # A plain module (symmetric, no perm, no bias, float16) takes what the checkpoint has.
    dst = W4A16Linear(K, N, 128)
    dst.load_state_dict(_roundtrip(src.state_dict()))
    assert dst.act_order and not dst.symmetric and dst.scales.dtype == torch.bfloat16 and dst.bias is not None
    x = torch.randn(2, K, dtype=torch.bfloat16)
    assert torch.equal(dst(x), src(x))
    # Missing keys stay errors under strict loading.
    sd = src.state_dict()
    del sd["zeros"]
    with pytest.raises(RuntimeError, match="Missing key.*zeros"):
        W4A16Linear(K, N, 128, symmetric=False).load_state_dict(sd)
    with pytest.raises(RuntimeError, match="size mismatch for qweight"):
        W4A16Linear(K, 128, 128).load_state_dict({"qweight": src.qweight, "scales": torch.zeros(2, 128, dtype=torch.float16)})


def test_state_dict_of_a_swapped_model_and_format_version():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32), nn.Linear(32, 5))

    a, b = model(), model()
    swap_linears(a, group_size=64, symmetric=False)
    swap_linears(b, group_size=64, symmetric=False)
    with torch.no_grad():
        for m in b.modules():
            if isinstance(m, W4A16Linear):
                m.qweight.zero_()
    sd = _roundtrip(a.state_dict())
    b.load_state_dict(sd)
    x = torch.randn(4, 128)
    assert torch.equal(a(x), b(x))
    # The packed-format version rides in the state_dict's metadata and is checked.
    sd = a.state_dict()
    sd._metadata["0"]["version"] = 99
    with pytest.raises(RuntimeError, match="packed-format version 99"):
        b.load_state_dict(sd)


def test_to_dtype_and_device():
    layer = W4A16Linear.from_linear(linear(128, 64, dtype=torch.float32), 64, symmetric=False)
    x = torch.randn(2, 128)
    y = layer(x)
    # .float() / .double() cannot make the scales float32: the op would refuse them.
    layer.float()
    assert layer.scales.dtype == torch.float16 and layer.qweight.dtype == torch.int32
    assert torch.equal(layer(x), y)
    layer.double()
    assert layer.scales.dtype == torch.float16 and layer.bias.dtype == torch.float64
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.bfloat16 and layer.zeros.dtype == torch.int32
    assert rel_err(layer(x.bfloat16()), reference(layer, x.bfloat16())) <= TOLERANCE[torch.bfloat16]
    layer.to("cpu")
    m = layer.to("meta")
    assert m.qweight.is_meta and "backend(M=1, meta)" in repr(m)


# ---------------------------------------------------------------------------------------------
# swap_linears


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(128, 64)
        self.head = nn.Linear(64, 128, bias=False)
        self.head.weight = self.emb.weight


class Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(256, 128)
        self.b = nn.Linear(100, 64)  # channelwise fallback
        self.c = nn.Linear(256, 30)  # out_features % 8
        self.d = nn.Linear(256, 64)  # skipped by name
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)  # out_proj is a Linear subclass
        self.tied = Tied()
        self.shared = nn.Linear(64, 64)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(64, 64)) for _ in range(2)])
        self.blocks[1].append(self.shared)  # the same module under two names


def test_swap_report():
    model = Zoo()
    report = swap_linears(model, group_size=128, skip=["d"])
    text = str(report)
    assert sorted(report.replaced_names) == ["a", "b", "blocks.0.0", "blocks.1.0", "shared"], text
    assert report.reason("a") == "G = 128, symmetric"
    assert "channelwise: in_features = 100 is not divisible by group_size = 128" in report.reason("b")
    assert report.reason("c") == "out_features = 30 is not a multiple of 8"
    assert report.reason("d") == "matched skip"
    assert "subclass of nn.Linear" in report.reason("attn.out_proj")
    assert "shared with tied.emb.weight" in report.reason("tied.head")
    assert "blocks.0.0 [64 -> 64]: G = 64 (channelwise: in_features = 64 is not divisible" in text, text
    assert isinstance(model.a, W4A16Linear) and model.a.group_size == 128
    assert isinstance(model.b, W4A16Linear) and model.b.group_size == 100
    assert type(model.c) is nn.Linear and type(model.d) is nn.Linear
    assert model.blocks[1][1] is model.shared and isinstance(model.shared, W4A16Linear)
    # A second pass finds nothing new to replace (W4A16Linear is not an nn.Linear).
    assert swap_linears(model, skip=["d"]).replaced == []


def test_swap_options():
    model = Zoo()
    report = swap_linears(model, group_size=64, channelwise_fallback=False, symmetric=False,
                          skip=lambda name: name.startswith("blocks"))
    assert "in_features = 100 is not divisible by group_size = 64" in report.reason("b")
    assert report.reason("blocks.0.0") == "matched skip"
    assert not model.a.symmetric and model.a.group_size == 64
    model = Zoo()
    report = swap_linears(model, skip=lambda name, mod: mod.in_features == 256, dtype=torch.bfloat16)
    assert set(report.skipped_names) >= {"a", "c", "d"}
    assert model.b.scales.dtype == torch.bfloat16
    model = Zoo()
    report = swap_linears(model, skip="blocks.*")
    assert report.reason("blocks.1.0") == "matched skip" and "shared" in report.replaced_names
    with pytest.raises(ValueError, match="group_size must be 32, 64, 128, 256 or -1"):
        swap_linears(model, group_size=100)


def test_swapped_model_matches_float_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    x = torch.randn(16, 256)
    ref = model(x)
    report = swap_linears(model, group_size=32)
    assert len(report.replaced) == 2 and not report.skipped
    assert rel_err(model(x), ref.double()) < 0.1


def test_torch_compile_fullgraph_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 64), nn.LayerNorm(64))
    swap_linears(model, group_size=64)
    # One act-order layer too: the permutation is part of the compiled graph.
    K, N = 64, 64
    q = torch.randint(0, 16, (K, N))
    qweight = torch.zeros(K // 8, N, dtype=torch.int64)
    for j in range(8):
        qweight |= q[j::8] << (4 * j)
    qweight = torch.where(qweight >= 2**31, qweight - 2**32, qweight).to(torch.int32)
    model.append(W4A16Linear.from_gptq(qweight, None, torch.rand(2, N, dtype=torch.float16) / 64,
                                       torch.randperm(K) // 32, bias=torch.randn(N)))
    compiled = torch.compile(model, fullgraph=True)
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(6, 256, dtype=dtype)
        with torch.no_grad():
            eager, comp = model(x), compiled(x)
        assert comp.dtype == eager.dtype
        assert rel_err(comp, eager.double()) < 1e-2, dtype


# ---------------------------------------------------------------------------------------------
# GPU


def module_on(device: str, compile: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256), nn.GELU(), nn.Linear(256, 128), nn.Linear(128, 60)).half()
    report = swap_linears(model, group_size=128, symmetric=False)
    assert report.replaced_names == ["0", "2"] and report.skipped_names == ["3"]
    x = torch.randn(8, 512, dtype=torch.float16)
    cpu_out = model(x)
    model.to(device)
    assert model[0].qweight.device.type == device and f"backend(M=1, {device})=" in repr(model[0])
    xg = x.to(device)
    for layer in (model[0], model[2]):
        inp = xg if layer is model[0] else torch.nn.functional.gelu(model[0](xg))
        out = layer(inp)
        assert out.device.type == device
        assert rel_err(out.cpu(), reference(layer, inp)) <= TOLERANCE[torch.float16]
    assert rel_err(model(xg).cpu(), cpu_out.double()) < 1e-2
    # A state_dict saved on one device loads on the CPU.
    fresh = W4A16Linear(512, 256, 128, symmetric=False, bias=True)
    fresh.load_state_dict(model[0].state_dict())
    assert torch.equal(fresh.qweight, model[0].qweight.cpu())
    assert torch.equal(fresh.to(device)(xg), model[0](xg))
    if compile:  # single-row decode under torch.compile
        compiled = torch.compile(model, fullgraph=True)
        assert rel_err(compiled(xg[:1]).cpu(), model(xg[:1]).cpu().double()) < 1e-2


def test_module_on_cpu_device_path():
    module_on("cpu", compile=False)


@pytest.mark.gpu
def test_module_on_cuda():
    module_on("cuda", compile=True)


def test_integer_x_is_rejected_like_nn_linear():
    layer = W4A16Linear.from_linear(torch.nn.Linear(64, 32), group_size=32)
    with pytest.raises(ValueError, match="x must be a floating-point tensor, got torch.int64"):
        layer(torch.ones(2, 64, dtype=torch.int64))
