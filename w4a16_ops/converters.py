"""Checkpoint converters: GPTQ (v1 and v2), AWQ (GEMM) and compressed-tensors pack-quantized -> the
package's packed format (w4a16_ops.format, version 1).

Every converter is pure PyTorch (it runs on the device of its inputs, CPU or GPU), validates its
inputs with errors that name the argument, what was expected and what was given, and returns a
``ConvertedW4A16``:

    packed       PackedW4A16(qweight, scales, zeros): the op's three tensors (zeros None = symmetric)
    perm         None, or int64 [K]: the act-order permutation. The layer computes
                 ``gemm(x.index_select(-1, perm), *packed)``; without it the rows of K would not
                 fall into contiguous groups.
    in_features  K (GPTQ and compressed-tensors may pad K in storage; K is the logical width)

``w4a16_ops.unpack(*packed, K)`` gives back the logical 4-bit values, which is how the tests prove
each conversion exact. Layout facts per format are in the docstring of each converter.

Symmetric checkpoints (zero point 8 everywhere, GPTQ's and vLLM's "uint4b8") convert to
zeros=None; a checkpoint whose stored zero points all equal 8 is converted to symmetric unless
``symmetric=False`` is asked for (the two are the same numbers).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import torch
from torch import Tensor

from .format import SUPPORTED_GROUP_SIZES, PackedW4A16, pack

__all__ = [
    "ConvertedW4A16",
    "convert_awq",
    "convert_compressed_tensors",
    "convert_gptq",
]


class ConvertedW4A16(NamedTuple):
    packed: PackedW4A16
    perm: Optional[Tensor]
    in_features: int


_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column 8c + _AWQ_ORDER[i]
_GPTQ_FORMATS = {"gptq": 1, "gptq_v1": 1, "v1": 1, "gptq_v2": 2, "v2": 2}


# ---------------------------------------------------------------------------------------------
# small shared pieces


def _fail(where: str, msg: str) -> None:
    raise ValueError(f"{where}: {msg}")


def _check_tensor(where: str, name: str, t: Any, *, dims: int, kind: str) -> None:
    if not isinstance(t, Tensor):
        _fail(where, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        _fail(where, f"{name} must be {dims}-D, got shape {list(t.shape)}")
    if kind == "int32" and t.dtype != torch.int32:
        _fail(where, f"{name} must be torch.int32 (8 packed 4-bit values per word), got {t.dtype}")
    if kind == "float" and not t.dtype.is_floating_point:
        _fail(where, f"{name} must be a floating-point tensor, got {t.dtype}")
    if kind == "int" and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        _fail(where, f"{name} must be an integer tensor, got {t.dtype}")


def _check_shape(where: str, name: str, t: Tensor, expected: tuple, why: str) -> None:
    if tuple(t.shape) != tuple(expected):
        _fail(where, f"{name} must have shape {list(expected)} ({why}), got {list(t.shape)}")


def _same_device(where: str, **tensors: Optional[Tensor]) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.device != first.device:
            _fail(where, f"{name} must be on the device of {first_name} ({first.device}), got {t.device}")
    return first.device


def _nibbles(words: Tensor) -> Tensor:
    """int32 [...] -> int16 [..., 8], nibble i (bits 4i..4i+3) at index i."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    return ((words.unsqueeze(-1) >> shifts) & 0xF).to(torch.int16)


def _unpack_rows(words: Tensor) -> Tensor:
    """Packed along dim 0, sequential nibbles: int32 [R, C] -> int16 [8R, C], row 8r + j = nibble j."""
    R, C = words.shape
    return _nibbles(words).permute(0, 2, 1).reshape(8 * R, C)


def _unpack_cols(words: Tensor, order=None) -> Tensor:
    """Packed along dim 1: int32 [R, C] -> int16 [R, 8C]. Column 8c + order[i] = nibble i
    (order None: sequential)."""
    R, C = words.shape
    nib = _nibbles(words)
    if order is not None:
        # nibble i holds column order[i]: the column j comes from nibble inverse[j]
        inverse = [0] * 8
        for i, col in enumerate(order):
            inverse[col] = i
        nib = nib[..., inverse]
    return nib.reshape(R, 8 * C)


def _resolve_group_size(where: str, K: int, num_groups: int, group_size: Optional[int], source: str) -> int:
    """The group size from the argument (-1 or K = channelwise) or, if None, from scales' rows."""
    if group_size is None:
        if num_groups <= 0 or K % num_groups:
            _fail(
                where,
                f"scales has {num_groups} rows (groups), which do not divide K = {K} evenly; "
                f"this package needs K % group_size == 0 (pass group_size to say which it is)",
            )
        G = K // num_groups
    else:
        if not isinstance(group_size, int) or isinstance(group_size, bool):
            _fail(where, f"group_size must be an int, got {group_size!r}")
        G = K if group_size in (-1, K) else group_size
        if G <= 0:
            _fail(where, f"group_size must be positive or -1 (channelwise), got {group_size}")
        expected_groups = -(-K // G)
        if num_groups != expected_groups:
            _fail(
                where,
                f"scales must have ceil(K / group_size) = ceil({K} / {G}) = {expected_groups} rows "
                f"({source}), got {num_groups}",
            )
    if K % G:
        _fail(
            where,
            f"K = {K} is not a multiple of group_size = {G}; the packed format needs whole groups "
            f"(K % G == 0)",
        )
    if G not in SUPPORTED_GROUP_SIZES and G != K:
        _fail(where, f"group_size must be 32, 64, 128, 256 or K = {K} (channelwise), got {G}")
    return G


def _scales_dtype(where: str, scales: Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    if dtype is None:
        return scales.dtype if scales.dtype in (torch.float16, torch.bfloat16) else torch.float16
    if dtype not in (torch.float16, torch.bfloat16):
        _fail(where, f"dtype must be torch.float16 or torch.bfloat16 (the activation dtype), got {dtype}")
    return dtype


def _act_order_perm(where: str, g_idx: Optional[Tensor], K: int, G: int) -> Optional[Tensor]:
    """None when g_idx is absent or is the plain k // G; else the permutation that makes groups
    contiguous (stable sort of g_idx), checked to give every group exactly G rows."""
    if g_idx is None:
        return None
    _check_tensor(where, "g_idx", g_idx, dims=1, kind="int")
    if g_idx.shape[0] != K:
        _fail(where, f"g_idx must have K = {K} entries (one group index per input row), got {g_idx.shape[0]}")
    g_idx = g_idx.to(torch.int64)
    expected = torch.arange(K, device=g_idx.device, dtype=torch.int64) // G
    if torch.equal(g_idx, expected):
        return None
    lo, hi = int(g_idx.min()), int(g_idx.max())
    if lo < 0 or hi >= K // G:
        _fail(where, f"g_idx values must be group indices in 0..{K // G - 1}, got min {lo} max {hi}")
    perm = torch.sort(g_idx, stable=True).indices
    if not torch.equal(g_idx[perm], expected):
        counts = torch.bincount(g_idx, minlength=K // G)
        bad = int((counts != G).nonzero()[0, 0])
        _fail(
            where,
            f"g_idx must assign exactly group_size = {G} rows to every group, got {int(counts[bad])} "
            f"rows in group {bad}",
        )
    return perm


def _finish(
    where: str,
    q_kn: Tensor,
    z: Optional[Tensor],
    scales: Tensor,
    perm: Optional[Tensor],
    symmetric: Optional[bool],
    dtype: torch.dtype,
    sym_hint: str = "",
) -> ConvertedW4A16:
    """q_kn int16 [K, N] (0..15), z int16 [K // G, N] true zero points or None, scales [K // G, N]."""
    K = q_kn.shape[0]
    if z is not None:
        lo, hi = int(z.min()), int(z.max())
        if lo < 0 or hi > 15:
            _fail(where, f"zero points must be in 0..15 after conversion, got min {lo} max {hi}{sym_hint}")
        all_eight = bool((z == 8).all())
        if symmetric is True and not all_eight:
            _fail(
                where,
                f"symmetric=True needs every zero point to be 8 (q - 8), got values from {lo} to {hi}"
                f"{sym_hint}",
            )
        if symmetric is None and all_eight:
            symmetric = True
        if symmetric:
            z = None
    elif symmetric is False:
        # No zero points in the checkpoint, asked for explicit ones: they are all 8.
        z = torch.full(scales.shape, 8, dtype=torch.int16, device=scales.device)
    if perm is not None:
        q_kn = q_kn.index_select(0, perm)
    packed = pack(q_kn.t(), scales.to(dtype), z)
    return ConvertedW4A16(packed, perm, K)


# ---------------------------------------------------------------------------------------------
# GPTQ


def convert_gptq(
    qweight: Tensor,
    qzeros: Optional[Tensor],
    scales: Tensor,
    g_idx: Optional[Tensor] = None,
    *,
    checkpoint_format: Optional[str] = None,
    symmetric: Optional[bool] = None,
    group_size: Optional[int] = None,
    quantize_config: Optional[Mapping[str, Any]] = None,
    dtype: Optional[torch.dtype] = None,
) -> ConvertedW4A16:
    """One GPTQ linear layer (AutoGPTQ / GPTQModel / transformers, 4-bit) -> the packed format.

    qweight  int32 [K / 8, N]: packed along K, nibble j of word (r, n) = row 8r + j of column n.
    qzeros   int32 [K / G, N / 8]: packed along N, nibble j = column 8c + j. May be None for a
             symmetric checkpoint.
    scales   float [K / G, N].
    g_idx    int [K] or None: the group of each input row. Unsorted (act-order / desc_act) g_idx
             makes the result carry ``perm``; the rows of the packed weight are reordered so that
             groups are contiguous.

    checkpoint_format  "gptq" (v1, stored zero = true zero - 1) or "gptq_v2" (true zeros). Default:
             quantize_config["checkpoint_format"] if given, else "gptq" (configs without the key are
             v1, as AutoGPTQ wrote them).
    symmetric  None: quantize_config["sym"] if given, else symmetric iff every zero point is 8.
             True: zeros are dropped (w = (q - 8) * s), and must all be 8.
    group_size None: quantize_config["group_size"] if given, else K / scales.shape[0]. -1 = K.
    quantize_config  the checkpoint's quantize_config.json / quantization_config dict (optional):
             bits (must be 4), group_size, sym, checkpoint_format are read from it.
    dtype    scales' dtype in the result (= activation dtype); default: scales' own if 16-bit,
             else float16.
    """
    where = "convert_gptq"
    cfg = dict(quantize_config or {})
    if quantize_config is not None and not isinstance(quantize_config, Mapping):
        _fail(where, f"quantize_config must be a dict (the checkpoint's quantize config), got {type(quantize_config).__name__}")
    bits = cfg.get("bits", 4)
    if bits != 4:
        _fail(where, f"only 4-bit GPTQ converts to W4A16, quantize_config says bits = {bits}")
    if checkpoint_format is None:
        checkpoint_format = cfg.get("checkpoint_format", "gptq")
    fmt = str(checkpoint_format).lower()
    if fmt not in _GPTQ_FORMATS:
        _fail(where, f"checkpoint_format must be 'gptq' (v1) or 'gptq_v2', got {checkpoint_format!r}")
    version = _GPTQ_FORMATS[fmt]
    if symmetric is None and "sym" in cfg:
        symmetric = bool(cfg["sym"])
    if group_size is None and "group_size" in cfg:
        group_size = int(cfg["group_size"])

    _check_tensor(where, "qweight", qweight, dims=2, kind="int32")
    _check_tensor(where, "scales", scales, dims=2, kind="float")
    if qzeros is not None:
        _check_tensor(where, "qzeros", qzeros, dims=2, kind="int32")
    _same_device(where, qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx)
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    if N % 8:
        _fail(where, f"N = qweight.shape[1] (out_features) must be a multiple of 8, got {N}")
    if scales.shape[1] != N:
        _fail(where, f"scales must be [K / G, N] with N = qweight.shape[1] = {N}, got {list(scales.shape)}")
    G = _resolve_group_size(where, K, scales.shape[0], group_size, "one row per group")
    if qzeros is not None:
        _check_shape(where, "qzeros", qzeros, (K // G, N // 8), "[K / G, N / 8], packed along N")
    out_dtype = _scales_dtype(where, scales, dtype)

    q = _unpack_rows(qweight)  # [K, N]
    z = None
    hint = ""
    if qzeros is not None:
        z = _unpack_cols(qzeros)  # [K / G, N], as stored
        if version == 1:
            z = z + 1
            hint = (
                " (checkpoint_format 'gptq' (v1) stores zero - 1; if this checkpoint is gptq_v2, "
                "pass checkpoint_format='gptq_v2')"
            )
        else:
            hint = " (checkpoint_format 'gptq_v2' stores true zeros; if this is a v1 checkpoint, pass checkpoint_format='gptq')"
    perm = _act_order_perm(where, g_idx, K, G)
    return _finish(where, q, z, scales, perm, symmetric, out_dtype, hint)


# ---------------------------------------------------------------------------------------------
# AWQ


def convert_awq(
    qweight: Tensor,
    qzeros: Optional[Tensor],
    scales: Tensor,
    *,
    symmetric: Optional[bool] = None,
    group_size: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
) -> ConvertedW4A16:
    """One AutoAWQ "GEMM" linear layer -> the packed format.

    qweight  int32 [K, N / 8]: packed along N with the interleaved order: nibble i of word (k, c)
             holds column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i].
    qzeros   int32 [K / G, N / 8]: same interleave, true zero points. None: symmetric (z = 8).
    scales   float [K / G, N].
    symmetric / group_size / dtype: as in convert_gptq (no quantize config for AWQ).
    """
    where = "convert_awq"
    _check_tensor(where, "qweight", qweight, dims=2, kind="int32")
    _check_tensor(where, "scales", scales, dims=2, kind="float")
    if qzeros is not None:
        _check_tensor(where, "qzeros", qzeros, dims=2, kind="int32")
    _same_device(where, qweight=qweight, qzeros=qzeros, scales=scales)
    K, N = qweight.shape[0], qweight.shape[1] * 8
    if scales.shape[1] != N:
        _fail(
            where,
            f"scales must be [K / G, N] with N = 8 * qweight.shape[1] = {N} (qweight is packed along N), "
            f"got {list(scales.shape)}",
        )
    G = _resolve_group_size(where, K, scales.shape[0], group_size, "one row per group")
    if qzeros is not None:
        _check_shape(where, "qzeros", qzeros, (K // G, N // 8), "[K / G, N / 8], packed along N")
    out_dtype = _scales_dtype(where, scales, dtype)
    q = _unpack_cols(qweight, _AWQ_ORDER)  # [K, N]
    z = _unpack_cols(qzeros, _AWQ_ORDER) if qzeros is not None else None
    return _finish(where, q, z, scales, None, symmetric, out_dtype)


# ---------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized


def convert_compressed_tensors(
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Optional[Tensor] = None,
    weight_shape: Optional[Any] = None,
    *,
    weight_g_idx: Optional[Tensor] = None,
    symmetric: Optional[bool] = None,
    group_size: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
) -> ConvertedW4A16:
    """One compressed-tensors "pack-quantized" 4-bit linear layer (llm-compressor output) -> the
    packed format. Argument names are the checkpoint's tensor names.

    weight_packed      int32 [N, ceil(K / 8)]: packed along K, sequential nibbles, each value
                       stored as signed + 8.
    weight_scale       float [N, K / G] (group strategy) or [N, 1] (channel strategy).
    weight_zero_point  int32 [ceil(N / 8), K / G], packed along N (dim 0), signed + 8; only in
                       asymmetric checkpoints. w = (q_signed - zp_signed) * s = (stored_q - stored_zp) * s.
    weight_shape       [N, K] (tensor or sequence): the true K when K % 8 != 0. Default: K = 8 * cols.
    weight_g_idx       int [K] or None: activation-order group map (older llm-compressor output).
    symmetric / group_size / dtype: as in convert_gptq.
    """
    where = "convert_compressed_tensors"
    _check_tensor(where, "weight_packed", weight_packed, dims=2, kind="int32")
    _check_tensor(where, "weight_scale", weight_scale, dims=2, kind="float")
    if weight_zero_point is not None:
        _check_tensor(where, "weight_zero_point", weight_zero_point, dims=2, kind="int32")
    _same_device(where, weight_packed=weight_packed, weight_scale=weight_scale,
                 weight_zero_point=weight_zero_point, weight_g_idx=weight_g_idx)
    N, cols = weight_packed.shape
    K = cols * 8
    if weight_shape is not None:
        shape = [int(v) for v in (weight_shape.tolist() if isinstance(weight_shape, Tensor) else weight_shape)]
        if len(shape) != 2 or shape[0] != N or -(-shape[1] // 8) != cols:
            _fail(
                where,
                f"weight_shape must be [N, K] = [{N}, K] with ceil(K / 8) = {cols} (weight_packed is "
                f"{list(weight_packed.shape)}), got {shape}",
            )
        K = shape[1]
    if N % 8:
        _fail(where, f"N = weight_packed.shape[0] (out_features) must be a multiple of 8, got {N}")
    if weight_scale.shape[0] != N:
        _fail(where, f"weight_scale must be [N, K / G] with N = {N}, got {list(weight_scale.shape)}")
    G = _resolve_group_size(where, K, weight_scale.shape[1], group_size, "one column per group")
    if weight_zero_point is not None:
        _check_shape(
            where, "weight_zero_point", weight_zero_point, (N // 8, K // G), "[ceil(N / 8), K / G], packed along N"
        )
    out_dtype = _scales_dtype(where, weight_scale, dtype)
    q = _unpack_cols(weight_packed)[:, :K].t()  # [K, N], stored (signed + 8) = our q
    z = _unpack_rows(weight_zero_point) if weight_zero_point is not None else None  # [N, K / G]
    scales = weight_scale.t()
    perm = _act_order_perm(where, weight_g_idx, K, G)
    return _finish(where, q, None if z is None else z.t(), scales, perm, symmetric, out_dtype)
