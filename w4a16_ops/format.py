"""The packed W4A16 weight format (version 1): one layout for every backend and platform.

Logical weight: W[k, n], k < K (in_features, the reduction dim), n < N (out_features), each a 4-bit
integer q in 0..15, dequantized as ``w = (q - z[g, n]) * s[g, n]`` with g = k // G, and z = 8 when
there are no zero points (symmetric).

qweight  int32 [ceil(K / 16), ceil(N / 64) * 128]
    K is cut into 16-row slabs (one slab = one row of qweight) and N into 64-column tiles; one 16 x 64
    tile is 128 consecutive words (512 bytes). Inside a tile, with kk = k % 16 and nn = n % 64:

        h     = kk // 8          t4 = (kk % 8) // 2       b = kk % 2
        j     = nn // 16         blk = (nn // 8) % 2      c = nn % 8
        word  = 4 * (4 * c + t4) + j                      (of the 128)
        nibble = 4 * b + 2 * blk + h                      (bits 4*nibble .. 4*nibble+3)

    Why: ``lane = 4 * c + t4`` is the warp lane that holds W[k, n] in the B fragment of
    ``mma.m16n8k16`` (lane // 4 is the fragment's column, lane % 4 its row pair), so lane L of a
    warp reads its whole share of a tile (four 16 x 16 sub-tiles j = 0..3) with one 16-byte load at
    word 4 * L. Inside a word, nibbles i and i + 4 hold rows k and k + 1 of one column, so
    ``(word >> 4m) & 0x000f000f`` with the exponent bits of 1024.0 or-ed in (one lop3) gives the two
    halves of an f16x2 register: nibbles (0, 4) and (1, 5) are the two registers of the n8 block
    blk = 0, nibbles (2, 6) and (3, 7) those of blk = 1. This is the same arrangement as the
    reshuffled layout of IST-DASLab's Marlin within a tile.
    Padding (k >= K or n >= N) holds q = 0; backends never read it as weight: x is masked past K
    and no output is written past N.

scales   x.dtype [K // G, N], plain row-major: scales[g, n]. N and G are read from its shape.

zeros    int32 [K // G, N // 8] or None. Word (g, w) holds the zero points of columns 8w .. 8w + 7,
    column 8w + i in nibble i (sequential, true zeros: no GPTQ-v1 "-1"). None means z = 8.

The format is the same on CPU and GPU and does not depend on the backend: a state_dict packed on
one machine loads and runs anywhere. Incompatible changes bump FORMAT_VERSION.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

FORMAT_VERSION = 1

TILE_K = 16  # rows of K per qweight row (the k of mma.m16n8k16)
TILE_N = 64  # columns per tile: 4 sub-tiles of 16 (one 16-byte load per lane)
WORDS_PER_TILE = TILE_K * TILE_N // 8  # 128
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)  # and G = K (channelwise)


class PackedW4A16(NamedTuple):
    """The three tensors the op takes (plus nothing else: K comes from x, N and G from scales)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def qweight_shape(K: int, N: int) -> tuple[int, int]:
    """Storage shape of qweight for a logical K x N weight (padded to whole 16 x 64 tiles)."""
    return (_cdiv(K, TILE_K), _cdiv(N, TILE_N) * WORDS_PER_TILE)


def zeros_shape(num_groups: int, N: int) -> tuple[int, int]:
    return (num_groups, N // 8)


# The tile's 8 coordinate bits, in the order they appear in storage (outermost first) and in the
# logical [k, n] order. Both views are [Kt, Nt, c, t4, j, b, blk, h] vs [Kt, h, t4, b, Nt, j, blk, c].
_STORAGE_FROM_LOGICAL = (0, 4, 7, 2, 5, 3, 6, 1)  # permute logical view -> storage view
_LOGICAL_FROM_STORAGE = (0, 7, 3, 5, 1, 4, 6, 2)  # permute storage view -> logical view


def _to_int32_words(nibbles: torch.Tensor) -> torch.Tensor:
    """[..., 8] values 0..15 (nibble 0 first) -> [...] int32, two's complement wrap of the top bit."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=nibbles.device)
    words = (nibbles.to(torch.int64) << shifts).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def _from_int32_words(words: torch.Tensor) -> torch.Tensor:
    """[...] int32 -> [..., 8] uint8 nibbles (nibble 0 first)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8)


def pack_qweight(q: torch.Tensor) -> torch.Tensor:
    """q: integer [N, K] with values 0..15 (out_features x in_features, like nn.Linear.weight)."""
    if q.dim() != 2:
        raise ValueError(f"pack_qweight: q must be 2-D [N, K], got shape {tuple(q.shape)}")
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise ValueError(f"pack_qweight: q must hold integers 0..15, got dtype {q.dtype}")
    N, K = q.shape
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError(
            f"pack_qweight: q values must be in 0..15, got min {int(q.min())} max {int(q.max())}"
        )
    Kt, Nt = _cdiv(K, TILE_K), _cdiv(N, TILE_N)
    w = torch.zeros(Kt * TILE_K, Nt * TILE_N, dtype=torch.uint8, device=q.device)
    w[:K, :N] = q.t().to(torch.uint8)
    w = w.view(Kt, 2, 4, 2, Nt, 4, 2, 8).permute(_STORAGE_FROM_LOGICAL)
    return _to_int32_words(w.reshape(Kt, Nt * WORDS_PER_TILE, 8))


def unpack_qweight(qweight: torch.Tensor, K: int, N: int) -> torch.Tensor:
    """Inverse of pack_qweight: uint8 [N, K] values 0..15."""
    expected = qweight_shape(K, N)
    if qweight.dtype != torch.int32 or tuple(qweight.shape) != expected:
        raise ValueError(
            f"unpack_qweight: qweight must be int32 {list(expected)} for K = {K}, N = {N}, "
            f"got {qweight.dtype} {list(qweight.shape)}"
        )
    Kt, Nt = expected[0], expected[1] // WORDS_PER_TILE
    nib = _from_int32_words(qweight).view(Kt, Nt, 8, 4, 4, 2, 2, 2)
    w = nib.permute(_LOGICAL_FROM_STORAGE).reshape(Kt * TILE_K, Nt * TILE_N)
    return w[:K, :N].t().contiguous()


def pack_zeros(z: torch.Tensor) -> torch.Tensor:
    """z: integer [K // G, N] zero points 0..15 -> int32 [K // G, N // 8]."""
    if z.dim() != 2 or z.shape[1] % 8:
        raise ValueError(f"pack_zeros: z must be [K // G, N] with N % 8 == 0, got {list(z.shape)}")
    if z.numel() and (int(z.min()) < 0 or int(z.max()) > 15):
        raise ValueError(f"pack_zeros: zero points must be in 0..15, got min {int(z.min())} max {int(z.max())}")
    return _to_int32_words(z.reshape(z.shape[0], z.shape[1] // 8, 8))


def unpack_zeros(zeros: torch.Tensor) -> torch.Tensor:
    """int32 [K // G, N // 8] -> uint8 [K // G, N]."""
    return _from_int32_words(zeros).reshape(zeros.shape[0], zeros.shape[1] * 8)


def pack(q: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor] = None) -> PackedW4A16:
    """Pack logical values: q [N, K] in 0..15, scales [K // G, N], zeros None or [K // G, N] in 0..15."""
    N, K = q.shape
    if scales.dim() != 2 or scales.shape[1] != N or scales.shape[0] == 0 or K % scales.shape[0]:
        raise ValueError(
            f"pack: scales must be [K // G, N] with N = {N} and K = {K} divisible by K // G, "
            f"got {list(scales.shape)}"
        )
    if zeros is not None and tuple(zeros.shape) != tuple(scales.shape):
        raise ValueError(f"pack: zeros must have the shape of scales {list(scales.shape)}, got {list(zeros.shape)}")
    return PackedW4A16(pack_qweight(q), scales.contiguous(), None if zeros is None else pack_zeros(zeros))


def unpack(qweight: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor], K: int):
    """Inverse of pack: (q uint8 [N, K], scales, zeros uint8 [K // G, N] or None). Bit-exact."""
    N = scales.shape[1]
    return unpack_qweight(qweight, K, N), scales, None if zeros is None else unpack_zeros(zeros)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: Optional[torch.Tensor],
    K: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Float weight [K, N] (already transposed for x @ W). Exact in float32 and float64:
    (q - z) is a small integer and s a 16-bit float, so their product needs no rounding."""
    N = scales.shape[1]
    G = K // scales.shape[0]
    q = unpack_qweight(qweight, K, N).t().to(dtype)  # [K, N]
    z = unpack_zeros(zeros).to(dtype) if zeros is not None else 8.0
    if zeros is not None:
        z = z.repeat_interleave(G, dim=0)
    s = scales.to(dtype).repeat_interleave(G, dim=0)
    return (q - z) * s


def quantize(
    weight: torch.Tensor,
    group_size: int,
    symmetric: bool = True,
    dtype: Optional[torch.dtype] = None,
) -> PackedW4A16:
    """Round-to-nearest 4-bit quantization of a float weight [N, K] (nn.Linear layout).

    group_size: 32, 64, 128, 256, or -1 / K for one group per column.
    symmetric: w = (q - 8) * s with s = max|w| / 7.5 per group; otherwise w = (q - z) * s with
    s = (max - min) / 15 and z = round(-min / s). Scales are rounded to ``dtype`` (default: the
    weight's dtype if 16-bit, else float16) before q is computed, so dequantize matches them.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize: weight must be 2-D [N, K], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    G = K if group_size in (-1, K) else group_size
    if G not in SUPPORTED_GROUP_SIZES and G != K:
        raise ValueError(f"quantize: group_size must be one of 32, 64, 128, 256 or -1 (= K), got {group_size}")
    if K % G:
        raise ValueError(f"quantize: K = {K} must be divisible by group_size = {G}")
    if N % 8:
        raise ValueError(f"quantize: N = {N} (out_features) must be a multiple of 8")
    if dtype is None:
        dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float16
    w = weight.detach().to(torch.float32).reshape(N, K // G, G)
    if symmetric:
        s = (w.abs().amax(dim=-1) / 7.5).clamp_min(1e-8).to(dtype)
        z = torch.full_like(s, 8, dtype=torch.float32)
    else:
        lo, hi = w.amin(dim=-1).clamp_max(0), w.amax(dim=-1).clamp_min(0)
        s = ((hi - lo) / 15).clamp_min(1e-8).to(dtype)
        z = (-lo / s.float()).round().clamp(0, 15)
    q = (w / s.float().unsqueeze(-1)).round() + z.unsqueeze(-1)
    q = q.clamp(0, 15).to(torch.uint8).reshape(N, K)
    scales = s.t().contiguous()  # [K // G, N]
    zeros = None if symmetric else z.to(torch.uint8).t().contiguous()
    return pack(q, scales, zeros)
