"""Checkpoint converters: GPTQ v1/v2 (plain and act-order), AWQ GEMM, compressed-tensors.

GPTQ and AWQ fixtures come from small packers written here from the format facts
(shared/reference/formats.md), independent of the converters' unpacking code. compressed-tensors
fixtures come from the real `compressed-tensors` library. Every case checks
  * the round trip: w4a16_ops.unpack of the converted tensors gives the checkpoint's logical values,
  * the weight: dequantize (with the permutation undone) equals the checkpoint's own dequantization,
  * the op: W4A16Linear's output against the float64 reference of tests/helpers.py.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

import w4a16_ops
from w4a16_ops import W4A16Linear, convert_awq, convert_compressed_tensors, convert_gptq

from helpers import TOLERANCE, Case, assert_close_to_reference, rel_err

# ---------------------------------------------------------------------------------------------
# Independent packers (plain integer loops over nibble positions, int64 then wrapped to int32)


def _wrap32(words: torch.Tensor) -> torch.Tensor:
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_along_rows(v: torch.Tensor) -> torch.Tensor:
    """[R, C] values 0..15, R % 8 == 0 -> int32 [R / 8, C]; word (r, c) nibble j = row 8r + j."""
    v = v.to(torch.int64)
    out = torch.zeros(v.shape[0] // 8, v.shape[1], dtype=torch.int64)
    for j in range(8):
        out |= v[j::8] << (4 * j)
    return _wrap32(out)


def pack_along_cols(v: torch.Tensor, order=(0, 1, 2, 3, 4, 5, 6, 7)) -> torch.Tensor:
    """[R, C] values 0..15, C % 8 == 0 -> int32 [R, C / 8]; nibble i of word (r, c) = column
    8c + order[i]."""
    v = v.to(torch.int64)
    out = torch.zeros(v.shape[0], v.shape[1] // 8, dtype=torch.int64)
    for i in range(8):
        out |= v[:, order[i]::8] << (4 * i)
    return _wrap32(out)


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def random_logical(K, N, G, *, sym, zero_lo=0, seed=0):
    """q [K, N] 0..15, z [K/G, N] (8 when sym), s [K/G, N] float32 of 16-bit values."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (K, N), generator=gen)
    z = torch.full((K // G, N), 8) if sym else torch.randint(zero_lo, 16, (K // G, N), generator=gen)
    s = (torch.rand(K // G, N, generator=gen) + 0.5) / math.sqrt(K) / 4
    return q, z, s


def weight_from_facts(q, z, s, g_idx):
    """float64 [K, N]: w[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n]."""
    g = g_idx.long()
    return (q.double() - z[g].double()) * s[g].double()


def check_converted(conv, q, z, s_dtype_values, g_idx, *, sym_expected, x_dtype, what):
    """Round trip + weight + op checks for one converted layer."""
    packed, perm, K = conv
    N = q.shape[1]
    assert K == q.shape[0], what
    assert (packed.zeros is None) == sym_expected, f"{what}: symmetric mismatch"
    # Round trip: logical values back, rows in the converted (grouped) order.
    uq, uscales, uz = w4a16_ops.unpack(*packed, K)
    order = perm if perm is not None else torch.arange(K)
    assert torch.equal(uq.t().long(), q[order].long()), f"{what}: q round trip"
    assert torch.equal(uscales, s_dtype_values), f"{what}: scales"
    if uz is not None:
        assert torch.equal(uz.long(), z.long()), f"{what}: zeros round trip"
    # Weight: dequantize, undo the permutation, compare with the checkpoint's own formula (exact).
    w = w4a16_ops.dequantize(*packed, K, torch.float64)
    w_orig = torch.empty_like(w)
    w_orig[order] = w
    ref_w = weight_from_facts(q, z, s_dtype_values.double(), g_idx)
    assert torch.equal(w_orig, ref_w), f"{what}: dequantized weight differs from the checkpoint's"
    # The op through the module, vs the float64 references (ours and the checkpoint's).
    layer = W4A16Linear.from_converted(conv)
    x = torch.randn(5, K).to(x_dtype)
    out = layer(x)
    xin = x.index_select(-1, perm) if perm is not None else x
    assert_close_to_reference(out, Case(xin, *packed), what)
    err = rel_err(out, x.double() @ ref_w)
    assert err <= TOLERANCE[x_dtype], f"{what}: {err:.3e} vs checkpoint float64 reference"
    return layer


def act_order_g_idx(K, G, seed):
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(K, generator=gen)
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[order] = (torch.arange(K) // G).to(torch.int32)
    return g_idx


# ---------------------------------------------------------------------------------------------
# GPTQ


def make_gptq(q, z, s, *, version, dtype):
    qweight = pack_along_rows(q)
    stored = z - 1 if version == 1 else z
    qzeros = pack_along_cols(stored & 0xF)
    return qweight, qzeros, s.to(dtype)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("K,N,G", [(256, 192, 64), (384, 64, 128), (160, 72, -1)])
def test_gptq(version, sym, act_order, K, N, G):
    dtype = torch.float16 if version == 1 else torch.bfloat16
    GG = K if G == -1 else G
    # v1 cannot store a true zero of 0 (it would be -1): real v1 checkpoints have zeros >= 1.
    q, z, s = random_logical(K, N, GG, sym=sym, zero_lo=1 if version == 1 else 0, seed=K + N + version)
    g_idx = act_order_g_idx(K, GG, seed=N) if act_order else (torch.arange(K) // GG).to(torch.int32)
    qweight, qzeros, scales = make_gptq(q, z, s, version=version, dtype=dtype)
    fmt = "gptq" if version == 1 else "gptq_v2"
    conv = convert_gptq(qweight, qzeros, scales, g_idx, checkpoint_format=fmt)
    # Channelwise act-order has one group: g_idx is all 0 and no permutation is needed.
    assert (conv.perm is not None) == (act_order and GG != K)
    check_converted(conv, q, z, scales, g_idx, sym_expected=sym, x_dtype=dtype, what=f"gptq v{version}")


def test_gptq_config_defaults():
    K, N, G = 256, 128, 128
    q, z, s = random_logical(K, N, G, sym=False, seed=3)
    z = z.clamp(max=14)  # so that reading these v2 zeros as v1 (+1) stays representable
    qweight, qzeros, scales = make_gptq(q, z, s, version=2, dtype=torch.float16)
    g_idx = act_order_g_idx(K, G, seed=4)
    cfg = {"bits": 4, "group_size": 128, "desc_act": True, "sym": False, "checkpoint_format": "gptq_v2"}
    conv = convert_gptq(qweight, qzeros, scales, g_idx, quantize_config=cfg)
    check_converted(conv, q, z, scales, g_idx, sym_expected=False, x_dtype=torch.float16, what="config v2")
    # The argument wins over the config.
    conv1 = convert_gptq(qweight, qzeros, scales, g_idx, quantize_config=cfg, checkpoint_format="gptq")
    assert torch.equal(w4a16_ops.unpack(*conv1.packed, K)[2].long(), z + 1)
    # A config without the key (as AutoGPTQ wrote them) means v1: stored zero + 1.
    cfg_v1 = {k: v for k, v in cfg.items() if k != "checkpoint_format"}
    conv1 = convert_gptq(qweight, qzeros, scales, g_idx, quantize_config=cfg_v1)
    assert torch.equal(w4a16_ops.unpack(*conv1.packed, K)[2].long(), z + 1)
    # sym from the config: a symmetric config on asymmetric zeros is an error, not a silent drop.
    with pytest.raises(ValueError, match="symmetric=True needs every zero point to be 8"):
        convert_gptq(qweight, qzeros, scales, g_idx, quantize_config={**cfg, "sym": True})


def test_gptq_symmetric_without_qzeros_and_forced_asymmetric():
    K, N, G = 128, 64, 32
    q, z, s = random_logical(K, N, G, sym=True, seed=5)
    qweight = pack_along_rows(q)
    g_idx = torch.arange(K) // G
    conv = convert_gptq(qweight, None, s.half())
    check_converted(conv, q, z, s.half(), g_idx, sym_expected=True, x_dtype=torch.float16, what="no qzeros")
    conv = convert_gptq(qweight, None, s.half(), symmetric=False)
    check_converted(conv, q, z, s.half(), g_idx, sym_expected=False, x_dtype=torch.float16, what="forced zeros")


def test_gptq_errors():
    K, N, G = 256, 64, 128
    q, z, s = random_logical(K, N, G, sym=True, seed=6)
    qweight, qzeros, scales = make_gptq(q, z, s, version=1, dtype=torch.float16)
    # A v1 symmetric checkpoint read as v2: its zeros are 7, not 8; the error says what to try.
    with pytest.raises(ValueError, match="symmetric=True needs every zero point to be 8.*gptq"):
        convert_gptq(qweight, qzeros, scales, checkpoint_format="gptq_v2", symmetric=True)
    with pytest.raises(ValueError, match="checkpoint_format must be"):
        convert_gptq(qweight, qzeros, scales, checkpoint_format="v3")
    with pytest.raises(ValueError, match="bits = 8"):
        convert_gptq(qweight, qzeros, scales, quantize_config={"bits": 8})
    with pytest.raises(ValueError, match="qweight must be torch.int32"):
        convert_gptq(qweight.float(), qzeros, scales)
    with pytest.raises(ValueError, match=r"qzeros must have shape \[2, 8\]"):
        convert_gptq(qweight, qzeros[:, :4], scales)
    with pytest.raises(ValueError, match=r"scales must have ceil\(K / group_size\)"):
        convert_gptq(qweight, qzeros, scales, group_size=64)
    with pytest.raises(ValueError, match="g_idx must have K = 256 entries"):
        convert_gptq(qweight, qzeros, scales, torch.zeros(10, dtype=torch.int32))
    uneven = (torch.arange(K) // G).to(torch.int32)
    uneven[0] = 1  # group 0 gets 127 rows, group 1 gets 129
    uneven = uneven[torch.randperm(K)]
    with pytest.raises(ValueError, match="exactly group_size = 128 rows"):
        convert_gptq(qweight, qzeros, scales, uneven)
    # K not a multiple of G (GPTQ's ceil(K / G) groups): not representable in the packed format.
    q2 = torch.randint(0, 16, (200, N))
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        convert_gptq(pack_along_rows(q2), None, torch.ones(2, N, dtype=torch.float16), group_size=128)
    # v1 with a stored zero of 15 (true zero 16): cannot be represented, said so.
    bad = pack_along_cols(torch.full((K // G, N), 15))
    with pytest.raises(ValueError, match="zero points must be in 0..15.*v1"):
        convert_gptq(qweight, bad, scales, checkpoint_format="gptq")


# ---------------------------------------------------------------------------------------------
# AWQ


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("K,N,G", [(256, 128, 128), (128, 40, 32), (96, 64, -1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_awq(sym, K, N, G, dtype):
    GG = K if G == -1 else G
    q, z, s = random_logical(K, N, GG, sym=sym, seed=K * N)
    qweight = pack_along_cols(q, AWQ_ORDER)
    qzeros = pack_along_cols(z, AWQ_ORDER)
    conv = convert_awq(qweight, qzeros, s.to(dtype), group_size=G if G == -1 else None)
    g_idx = torch.arange(K) // GG
    check_converted(conv, q, z, s.to(dtype), g_idx, sym_expected=sym, x_dtype=dtype, what="awq")
    layer = W4A16Linear.from_awq(qweight, qzeros, s.to(dtype))
    assert torch.equal(layer.qweight, conv.packed.qweight)


def test_awq_interleave_is_not_sequential():
    # A weight with distinct values per column: reading AWQ words sequentially would scramble columns.
    K, N = 32, 8
    q = torch.arange(N).repeat(K, 1)  # column n holds n
    conv = convert_awq(pack_along_cols(q, AWQ_ORDER), None, torch.ones(1, N, dtype=torch.float16), symmetric=False)
    uq, _, _ = w4a16_ops.unpack(*conv.packed, K)
    assert torch.equal(uq.t().long(), q)


def test_awq_errors():
    with pytest.raises(ValueError, match=r"scales must be \[K / G, N\] with N = 8 \* qweight.shape\[1\] = 64"):
        convert_awq(torch.zeros(128, 8, dtype=torch.int32), None, torch.ones(1, 128, dtype=torch.float16))
    with pytest.raises(ValueError, match="scales must be a floating-point tensor"):
        convert_awq(torch.zeros(128, 8, dtype=torch.int32), None, torch.ones(1, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="dtype must be torch.float16 or torch.bfloat16"):
        convert_awq(torch.zeros(128, 8, dtype=torch.int32), None, torch.ones(1, 64), dtype=torch.float32)
    with pytest.raises(ValueError, match="group_size must be 32, 64, 128, 256"):
        convert_awq(torch.zeros(96, 8, dtype=torch.int32), None, torch.ones(2, 64, dtype=torch.float16))


# ---------------------------------------------------------------------------------------------
# compressed-tensors, against the library itself

# CI installs compressed-tensors (requirements-ci.txt) and must not skip these; elsewhere they skip.
_HAVE_CT = importlib.util.find_spec("compressed_tensors") is not None or bool(os.environ.get("CI"))
needs_ct = pytest.mark.skipif(not _HAVE_CT, reason="compressed-tensors is not installed (pip install compressed-tensors)")


def ct_compress(w, *, sym, strategy, group_size):
    """Quantize and pack w [N, K] with compressed-tensors' own code; returns (state dict, scheme)."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    kwargs = {"group_size": group_size} if strategy == "group" else {}
    args = QuantizationArgs(num_bits=4, symmetric=sym, strategy=strategy, **kwargs)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    N, K = w.shape
    G = group_size if strategy == "group" else K
    wg = w.reshape(N, K // G, G)
    scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)  # [N, K / G]
    sd = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)
    return sd, scheme, scale, zp


@needs_ct
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize(
    "strategy,K,N,G", [("group", 256, 96, 128), ("group", 192, 64, 64), ("channel", 200, 48, None), ("channel", 100, 32, None)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compressed_tensors(sym, strategy, K, N, G, dtype):
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor, unpack_from_int32

    w = (torch.randn(N, K) * 0.05).to(dtype)
    sd, scheme, scale, zp = ct_compress(w, sym=sym, strategy=strategy, group_size=G)
    assert ("weight_zero_point" in sd) == (not sym)
    conv = convert_compressed_tensors(
        sd["weight_packed"], sd["weight_scale"], sd.get("weight_zero_point"), sd["weight_shape"]
    )
    K_ = conv.in_features
    assert K_ == K and conv.perm is None
    # Logical values: the library's own unpacking (signed) + 8 == ours.
    q_signed = unpack_from_int32(sd["weight_packed"], 4, torch.Size([N, K]))
    uq, uscales, uz = w4a16_ops.unpack(*conv.packed, K)
    assert torch.equal(uq.long(), q_signed.long() + 8)
    assert torch.equal(uscales, sd["weight_scale"].t())
    if not sym:
        zp_signed = unpack_from_int32(sd["weight_zero_point"], 4, torch.Size([N, K // (G or K)]), packed_dim=0)
        assert torch.equal(zp_signed, zp.to(torch.int8)), "library round trip of zero points"
        assert torch.equal(uz.long(), zp_signed.t().long() + 8)
    else:
        assert uz is None
    # The weight: the library's decompression (computed in the scale dtype) == ours rounded to it.
    theirs = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
    ours = w4a16_ops.dequantize(*conv.packed, K, torch.float64)
    assert torch.equal(ours.t().to(theirs.dtype), theirs)
    # The op vs float64 references: ours (helpers) and one built from the library's integers.
    layer = W4A16Linear.from_compressed_tensors(
        sd["weight_packed"], sd["weight_scale"], sd.get("weight_zero_point"), sd["weight_shape"]
    )
    x = torch.randn(4, K).to(dtype)
    out = layer(x)
    assert_close_to_reference(out, Case(x, *conv.packed), f"compressed-tensors {strategy} sym={sym}")
    GG = G or K
    zfull = torch.zeros(N, K // GG) if sym else zp.double()
    w64 = (q_signed.double() - zfull.repeat_interleave(GG, 1)) * sd["weight_scale"].double().repeat_interleave(GG, 1)
    assert rel_err(out, x.double() @ w64.t()) <= TOLERANCE[dtype]


@needs_ct
def test_compressed_tensors_g_idx_and_errors():
    N, K, G = 64, 256, 128
    w = (torch.randn(N, K) * 0.05).to(torch.float16)
    sd, _, _, _ = ct_compress(w, sym=True, strategy="group", group_size=G)
    ref = convert_compressed_tensors(sd["weight_packed"], sd["weight_scale"])
    # An act-order g_idx (older llm-compressor checkpoints): same values, rows regrouped.
    g_idx = act_order_g_idx(K, G, seed=9)
    conv = convert_compressed_tensors(sd["weight_packed"], sd["weight_scale"], weight_g_idx=g_idx)
    assert conv.perm is not None and torch.equal(g_idx[conv.perm].long(), torch.arange(K) // G)
    uq_ref = w4a16_ops.unpack(*ref.packed, K)[0]
    uq = w4a16_ops.unpack(*conv.packed, K)[0]
    assert torch.equal(uq, uq_ref[:, conv.perm])
    with pytest.raises(ValueError, match=r"weight_shape must be \[N, K\]"):
        convert_compressed_tensors(sd["weight_packed"], sd["weight_scale"], None, [N, K + 8])
    with pytest.raises(ValueError, match=r"weight_scale must be \[N, K / G\] with N = 64"):
        convert_compressed_tensors(sd["weight_packed"], sd["weight_scale"].t())
    with pytest.raises(ValueError, match="weight_zero_point must have shape"):
        convert_compressed_tensors(sd["weight_packed"], sd["weight_scale"], torch.zeros(4, 2, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# On the GPU: the converters are pure PyTorch and run where their inputs are.


def converters_on(device: str) -> None:
    K, N, G = 512, 256, 128
    q, z, s = random_logical(K, N, G, sym=False, zero_lo=1, seed=11)
    g_idx = act_order_g_idx(K, G, seed=12)
    qweight, qzeros, scales = make_gptq(q, z, s, version=1, dtype=torch.float16)
    cpu = convert_gptq(qweight, qzeros, scales, g_idx)
    dev = convert_gptq(qweight.to(device), qzeros.to(device), scales.to(device), g_idx.to(device))
    for a, b in zip(cpu.packed, dev.packed):
        assert b.device.type == device and torch.equal(a, b.cpu())
    assert dev.perm.device.type == device and torch.equal(cpu.perm, dev.perm.cpu())
    layer = W4A16Linear.from_converted(dev)
    x = torch.randn(16, K, dtype=torch.float16, device=device)
    out = layer(x)
    assert_close_to_reference(out, Case(x.index_select(-1, dev.perm), *dev.packed), f"gptq act-order on {device}")
    awq = convert_awq(pack_along_cols(q, AWQ_ORDER).to(device), pack_along_cols(z, AWQ_ORDER).to(device),
                      scales.to(device))
    assert awq.packed.qweight.device.type == device
    assert_close_to_reference(W4A16Linear.from_converted(awq)(x), Case(x, *awq.packed), f"awq on {device}")


def test_converters_device_path_cpu():
    converters_on("cpu")


@pytest.mark.gpu
def test_converters_on_cuda():
    converters_on("cuda")
