"""Split rules and per-rank shards of a W4A16 layer, made from its logical values (unpack -> slice ->
pack). The rules are in the docstring of w4a16_ops.parallel."""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..format import PackedW4A16, pack, unpack
from ..nn import W4A16Linear

# transformers' tp_plan style names -> whether the layer itself moves data (all-gathers y / slices x)
COLUMN_STYLES = {"colwise": False, "colwise_rep": True, "colwise_gather_output": True}
ROW_STYLES = {"rowwise": False, "rowwise_rep": True, "rowwise_split_input": True}


def _split_of(style: str, name: str) -> str:
    if style in COLUMN_STYLES:
        return "column"
    if style in ROW_STYLES:
        return "row"
    raise ValueError(
        f"{name}: style must be one of {sorted(COLUMN_STYLES) + sorted(ROW_STYLES)} (column- or row-parallel), "
        f"got {style!r}"
    )


def _even_or_units(total: int, world: int, unit: int) -> Optional[list]:
    """The nearest split of total into world parts of whole units (first ranks one unit more), or None."""
    if total % unit or total // unit < world:
        return None
    n, extra = divmod(total // unit, world)
    return [(n + (r < extra)) * unit for r in range(world)]


def plan_split(
    style: str,
    in_features: int,
    out_features: int,
    group_size: int,
    world_size: int,
    *,
    name: str = "layer",
    uneven: bool = False,
    sizes: Optional[Sequence[int]] = None,
) -> tuple:
    """Per-rank sizes of the split dimension (N for column-, K for row-parallel); ValueError when the
    split breaks a rule (see the module docstring), naming the layer, the world size and the rule."""
    K, N, G, W = int(in_features), int(out_features), int(group_size), int(world_size)
    if W < 1:
        raise ValueError(f"{name}: world_size must be >= 1, got {world_size}")
    split = _split_of(style, name)
    if split == "column":
        total, unit, dim = N, 8, "out_features N"
        rule = "every rank's N_r must be a multiple of 8 (the op's N % 8 == 0; zero points pack 8 columns a word)"
    elif G < K:
        total, unit, dim = K, G, "in_features K"
        rule = f"every rank's K_r must be a whole number of quantization groups (K_r % G == 0, G = {G})"
    else:  # channelwise: each rank keeps the whole scales row and is channelwise over its own K_r
        total, unit, dim = K, 1, "in_features K"
        rule = "every rank needs at least one row (channelwise: the scales row is kept whole on every rank)"
    where = f"{name}: {split}-parallel split of {dim} = {total} over world_size = {W}"
    if sizes is not None:
        sizes = [int(s) for s in sizes]
        if len(sizes) != W or sum(sizes) != total:
            raise ValueError(f"{where}: sizes must be {W} numbers summing to {total}, got {sizes}")
        bad = [s for s in sizes if s <= 0 or s % unit]
        if bad:
            raise ValueError(f"{where}: {rule}; sizes {sizes} break it")
        return tuple(sizes)
    if total % W == 0 and (total // W) % unit == 0 and total // W > 0:
        return (total // W,) * W
    per_rank = f"{total} / {W} = {total / W:g}"
    if not uneven:
        hint = ""
        if _even_or_units(total, W, unit) is not None:
            hint = " (uneven=True splits it into whole units, the first ranks one more)"
        raise ValueError(
            f"{where} would give {per_rank} per rank: {rule}; {dim} must be a multiple of "
            f"{unit} * world_size = {unit * W}{hint}"
        )
    uneven_sizes = _even_or_units(total, W, unit)
    if uneven_sizes is None:
        raise ValueError(
            f"{where}: {rule}, and {total} is not {W} or more whole units of {unit}, even unevenly "
            f"({per_rank} per rank)"
        )
    return tuple(uneven_sizes)


class LocalShard(NamedTuple):
    """One rank's part of a layer: what W4A16Linear.from_packed takes, plus where it sits."""

    packed: PackedW4A16
    in_features: int  # this rank's K
    out_features: int  # this rank's N
    perm: Optional[Tensor]  # local act-order permutation (indices into this rank's x slice), or None
    bias: Optional[Tensor]  # column: this rank's slice; row: the whole bias (added after the all-reduce)
    split: str  # "column" or "row"
    sizes: tuple  # every rank's size of the split dimension
    rank: int

    @property
    def offset(self) -> int:
        """First index of this rank's part of the split dimension."""
        return sum(self.sizes[: self.rank])


def _row_act_order(name: str, perm: Tensor, G: int, sizes: tuple, rank: int):
    """Packed rows (of the act-order-sorted K) that read this rank's inputs, and the local perm."""
    K = perm.numel()
    # owner[j]: the rank whose x slice holds input perm[j] of packed row j
    bounds = torch.tensor(list(sizes), device=perm.device).cumsum(0)
    owner = torch.bucketize(perm, bounds, right=True)
    per_group = owner.view(K // G, G)
    mixed = (per_group != per_group[:, :1]).any(dim=1).nonzero()
    if mixed.numel() and G < K:  # channelwise: one scales row per column, any subset of rows is fine
        g = int(mixed[0])
        ranks = sorted(set(per_group[g].tolist()))
        raise ValueError(
            f"{name}: row-parallel split of an act-order layer (perm) over world_size = {len(sizes)} would cut "
            f"quantization group {g} (G = {G}): its input rows lie on ranks {ranks}; row-parallel act-order "
            f"needs every group's rows inside one rank's K range ({mixed.shape[0]} of {K // G} groups "
            f"are cut). Use column-parallel for this layer or a checkpoint without act-order"
        )
    rows = (owner == rank).nonzero().flatten()  # ascending: whole groups, in the packed order
    local_perm = perm.index_select(0, rows) - sum(sizes[:rank])
    return rows, local_perm


def shard_weights(
    q: Tensor,
    scales: Tensor,
    zeros: Optional[Tensor],
    style: str,
    rank: int,
    world_size: int,
    *,
    perm: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    name: str = "layer",
    uneven: bool = False,
    sizes: Optional[Sequence[int]] = None,
) -> LocalShard:
    """Rank `rank`'s shard from logical values: q [N, K] in 0..15, scales [K // G, N], zeros None or
    [K // G, N] in 0..15 (w4a16_ops.unpack's output); perm: the act-order permutation of the packed
    rows (packed row j reads input perm[j]), bias [N]. The shard is packed with w4a16_ops.pack."""
    if q.dim() != 2 or scales.dim() != 2 or scales.shape[1] != q.shape[0] or q.shape[1] % max(scales.shape[0], 1):
        raise ValueError(
            f"{name}: q must be [N, K] and scales [K // G, N], got q {list(q.shape)} and scales {list(scales.shape)}"
        )
    N, K = q.shape
    G = K // scales.shape[0]
    if not 0 <= rank < world_size:
        raise ValueError(f"{name}: rank must be in 0..{world_size - 1} for world_size = {world_size}, got {rank}")
    split = _split_of(style, name)
    sizes = plan_split(style, K, N, G, world_size, name=name, uneven=uneven, sizes=sizes)
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    if split == "column":
        z = None if zeros is None else zeros[:, lo:hi]
        packed = pack(q[lo:hi], scales[:, lo:hi], z)
        b = None if bias is None else bias[lo:hi]
        return LocalShard(packed, K, hi - lo, perm, b, split, sizes, rank)
    local_perm = None
    if perm is not None:
        rows, local_perm = _row_act_order(name, perm.to(torch.int64), G, sizes, rank)
        q_local = q.index_select(1, rows.to(q.device))
        g_rows = rows.view(-1, G)[:, 0] // G if G < K else None
        if torch.equal(local_perm, torch.arange(hi - lo, device=local_perm.device)):
            local_perm = None  # this rank's rows are already in order
    else:
        q_local = q[:, lo:hi]
        g_rows = torch.arange(lo // G, hi // G, device=scales.device) if G < K else None
    if g_rows is None:  # channelwise: the one scales / zeros row stays whole (scales are per column)
        s_local, z_local = scales, zeros
    else:
        g_rows = g_rows.to(scales.device)
        s_local = scales.index_select(0, g_rows)
        z_local = None if zeros is None else zeros.index_select(0, g_rows.to(zeros.device))
    packed = pack(q_local, s_local, z_local)
    return LocalShard(packed, hi - lo, N, local_perm, bias, split, sizes, rank)


def shard_linear(
    layer: W4A16Linear,
    style: str,
    rank: int,
    world_size: int,
    *,
    name: str = "layer",
    uneven: bool = False,
    sizes: Optional[Sequence[int]] = None,
) -> LocalShard:
    """Rank `rank`'s shard of a packed layer (unpack -> shard_weights -> pack)."""
    if not isinstance(layer, W4A16Linear):
        raise TypeError(f"{name}: layer must be a W4A16Linear, got {type(layer).__name__}")
    if layer.qweight.device.type == "meta":
        raise ValueError(f"{name}: layer is on the meta device (no values to shard); load its weights first")
    q, scales, zeros = unpack(layer.qweight, layer.scales, layer.zeros, layer.in_features)
    return shard_weights(
        q, scales, zeros, style, rank, world_size, perm=layer.perm, bias=layer.bias, name=name,
        uneven=uneven, sizes=sizes,
    )
