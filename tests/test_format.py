"""The packed format: bit positions, pack/unpack round trips, quantize, dequantize."""

import random

import pytest
import torch

import w4a16_ops
from w4a16_ops import format as F

from helpers import groups_for


def _expected_position(k, n, n_tiles):
    """The format spec of the module docstring, written out literally."""
    kk, nn = k % 16, n % 64
    h, t4, b = kk // 8, (kk % 8) // 2, kk % 2
    j, blk, c = nn // 16, (nn // 8) % 2, nn % 8
    word = (n // 64) * 128 + 4 * (4 * c + t4) + j
    return k // 16, word, 4 * b + 2 * blk + h


@pytest.mark.parametrize("K,N", [(16, 64), (48, 136), (100, 8), (2112, 2120)])
def test_bit_positions_follow_the_spec(K, N):
    q = torch.randint(0, 16, (N, K))
    qw = F.pack_qweight(q)
    assert qw.dtype == torch.int32 and tuple(qw.shape) == F.qweight_shape(K, N)
    rng = random.Random(K * N)
    for _ in range(3000):
        k, n = rng.randrange(K), rng.randrange(N)
        row, word, nib = _expected_position(k, n, qw.shape[1] // 128)
        assert (int(qw[row, word]) >> (4 * nib)) & 0xF == int(q[n, k]), (k, n)


@pytest.mark.parametrize("K,N", [(16, 64), (32, 8), (100, 8), (256, 136), (2112, 2120), (4096, 64)])
def test_pack_unpack_round_trip_is_bit_exact(K, N):
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    assert torch.equal(F.unpack_qweight(F.pack_qweight(q), K, N), q)
    # Extremes: all 15 (the top nibble sets the int32 sign bit) and all 0.
    for v in (0, 15):
        full = torch.full((N, K), v, dtype=torch.uint8)
        assert torch.equal(F.unpack_qweight(F.pack_qweight(full), K, N), full)


def test_padding_is_zero():
    qw = F.pack_qweight(torch.full((8, 20), 15))
    # Rows 20..31 of K and columns 8..63 of N exist only as padding.
    full = F.unpack_qweight(qw, 32, 64)
    assert (full[:8, :20] == 15).all()
    assert full[8:].eq(0).all() and full[:, 20:].eq(0).all()


@pytest.mark.parametrize("G,N", [(32, 16), (128, 4224)])
def test_zeros_round_trip_and_layout(G, N):
    z = torch.randint(0, 16, (5, N), dtype=torch.uint8)
    packed = F.pack_zeros(z)
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (5, N // 8)
    assert torch.equal(F.unpack_zeros(packed), z)
    # Column 8w + i lives in nibble i of word w.
    assert (int(packed[2, 1]) >> 12) & 0xF == int(z[2, 8 + 3])


def test_pack_unpack_full_round_trip():
    N, K, G = 136, 256, 64
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    s = torch.rand(K // G, N, dtype=torch.float16)
    z = torch.randint(0, 16, (K // G, N), dtype=torch.uint8)
    q2, s2, z2 = F.unpack(*F.pack(q, s, z), K)
    assert torch.equal(q2, q) and torch.equal(s2, s) and torch.equal(z2, z)
    q3, _, z3 = F.unpack(*F.pack(q, s), K)
    assert torch.equal(q3, q) and z3 is None


def test_pack_rejects_bad_values():
    with pytest.raises(ValueError, match="0..15"):
        F.pack_qweight(torch.full((8, 16), 16))
    with pytest.raises(ValueError, match="integers"):
        F.pack_qweight(torch.zeros(8, 16))
    with pytest.raises(ValueError, match="zero points must be in 0..15"):
        F.pack_zeros(torch.full((1, 8), -1))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K", [256, 2112])
def test_quantize_rtn_error_and_consistency(symmetric, dtype, K):
    N = 136
    w = torch.randn(N, K)
    for G in groups_for(K):
        packed = w4a16_ops.quantize(w, G if G != K else -1, symmetric=symmetric, dtype=dtype)
        assert packed.scales.dtype == dtype and tuple(packed.scales.shape) == (K // G, N)
        assert (packed.zeros is None) == symmetric
        deq = F.dequantize(*packed, K).t()
        # RTN puts every weight within half a step of the original, plus the clamp at the ends of
        # the range: the scale's own rounding (eps) over up to 8 steps, and, with zero points, the
        # rounding of the zero point itself (another half step).
        step = packed.scales.float().repeat_interleave(G, dim=0).t()
        eps = torch.finfo(dtype).eps
        bound = (0.5 + 8 * eps) if symmetric else (1.0 + 16 * eps)
        assert ((deq - w).abs() <= bound * step + 1e-6).all()
        # ... and the rounding error is about uniform in [-step/2, step/2]: rms = step / sqrt(12).
        rms_err = (deq - w).pow(2).mean().sqrt().item()
        assert rms_err <= 1.1 * (step.pow(2).mean() / 12).sqrt().item(), (G, rms_err)


def test_quantize_rejects_bad_group():
    with pytest.raises(ValueError, match="group_size must be one of"):
        w4a16_ops.quantize(torch.randn(8, 96), 48)
    with pytest.raises(ValueError, match="divisible by group_size"):
        w4a16_ops.quantize(torch.randn(8, 96), 64)


def test_dequantize_is_exact_in_float32():
    K, N, G = 256, 64, 32
    packed = w4a16_ops.quantize(torch.randn(N, K), G, symmetric=False)
    d32 = F.dequantize(*packed, K, torch.float32).double()
    d64 = F.dequantize(*packed, K, torch.float64)
    assert torch.equal(d32, d64)


def test_format_version_is_an_int():
    assert isinstance(w4a16_ops.FORMAT_VERSION, int) and w4a16_ops.FORMAT_VERSION >= 1


@pytest.mark.gpu
@pytest.mark.parametrize("bf16", [False, True])
def test_tensor_core_probe_sees_the_format(bf16):
    """The CUDA prototype loads each lane's fragments with one 16-byte load, dequantizes them with
    lop3 and feeds mma.m16n8k16 (times identity): it must see exactly unpack_qweight."""
    from w4a16_ops._build import extension_status

    if extension_status() is not None:
        pytest.skip(extension_status())
    K, N = 2112, 2120
    q = torch.randint(0, 16, (N, K))
    qw = F.pack_qweight(q).cuda()
    seen = torch.ops.w4a16._format_probe(qw, bf16)
    expected = F.unpack_qweight(qw.cpu(), K, N).t().float() - 8
    assert torch.equal(seen[:K, :N].cpu(), expected)
