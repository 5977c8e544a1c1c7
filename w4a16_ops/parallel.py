"""Tensor parallelism for W4A16 layers, built on torch.distributed (no communication layer of its own).

    import torch.distributed as dist, w4a16_ops.parallel as tp
    dist.init_process_group("nccl")                       # torchrun; every rank loads the same model
    model = ...                                           # swap_linears / converters / from_pretrained
    report = tp.shard_model(model, plan="auto")           # transformers' model.tp_plan, or your own dict
    print(report)                                         # what was sharded, what stayed replicated

A column-parallel layer (style "colwise") splits N, the output features: rank r holds columns
[n_r, n_r + N_r) and returns its slice of y (x is replicated). A row-parallel layer ("rowwise") splits
K, the input features: rank r holds rows [k_r, k_r + K_r), reads its slice of x (the sharded output of
a column-parallel layer before it) and the partial results are summed by dist.all_reduce; the bias is
added once, after the sum. "colwise_rep" / "colwise_gather_output" all-gather the output,
"rowwise_rep" / "rowwise_split_input" take a replicated x and slice it themselves. The names are
those of transformers' tp_plan, so a model's own plan (config.base_model_tp_plan) applies unchanged.

Every per-rank tensor is made from the logical values (unpack -> slice -> pack), never by slicing
packed words: a qweight word holds 8 rows x columns of a 16 x 64 tile, so a slice of words is not a
slice of the weight. The rules a split must keep (checked, ValueError naming the layer, the world
size and the rule):

- column-parallel: every rank's N_r % 8 == 0 (the op's rule, and zero points pack 8 columns a word).
  Groups run along K, so they are never cut. Channelwise layers split like any other.
- row-parallel, G < K: every rank's K_r is a whole number of groups (K_r % G == 0); scales and zeros
  rows [k_r / G, (k_r + K_r) / G) go with it.
- row-parallel, channelwise (G = K): scales are one row per column, s[n], so
  sum_r sum_{k in rank r} x[k] (q[k, n] - z[n]) s[n] is the full sum: every rank keeps the whole
  scales / zeros row and becomes a channelwise layer of its own K_r (its G is K_r). Any K_r >= 1.
- even splits by default (N / world, K / world); uneven=True (or explicit sizes) allows the nearest
  split in whole units (8 columns, one group), e.g. Qwen2-72B's 231 groups of 128 over 4 ranks as
  58, 58, 58, 57 groups; shard_model gives every layer whose split dimension has the same size the
  same split, so a column-parallel layer's shards line up with the row-parallel layer that reads them.
- act-order layers (perm): column-parallel keeps the whole perm (the rows of K are not split).
  Row-parallel is supported when every quantization group's input rows lie within one rank's K range
  (the rank then reorders its own rows with a local perm); otherwise the group would be cut and
  this raises. Such checkpoints can be served column-parallel, or re-quantized without act-order.

Forward only: the collectives are torch.distributed's in-place ones and carry no gradient.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .format import PackedW4A16, pack, unpack
from .nn import W4A16Linear

__all__ = [
    "COLUMN_STYLES",
    "ROW_STYLES",
    "ColumnParallelW4A16Linear",
    "LocalShard",
    "RowParallelW4A16Linear",
    "ShardReport",
    "plan_split",
    "shard_linear",
    "shard_model",
    "shard_weights",
]

# transformers' tp_plan style names -> (split, whether the layer itself moves data: gather / slice x)
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


def _rank_and_world(group, rank: Optional[int], world_size: Optional[int]) -> tuple:
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "rank and world_size must be given when torch.distributed has no process group "
            "(call dist.init_process_group first, or pass both)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


class _ParallelMixin:
    """What both parallel layers record: the group, this rank, every rank's split size, the full shape."""

    def _set_parallel(self, shard: LocalShard, group, full_in: int, full_out: int, moves_data: bool) -> None:
        self.group = group  # None: the default process group
        self.rank, self.world_size = shard.rank, len(shard.sizes)
        self.sizes = tuple(shard.sizes)
        self.offset = shard.offset
        self.full_in_features, self.full_out_features = full_in, full_out
        self._moves_data = moves_data

    def _parallel_repr(self) -> str:
        return f"rank={self.rank}/{self.world_size}, full={self.full_in_features}->{self.full_out_features}"


class ColumnParallelW4A16Linear(_ParallelMixin, W4A16Linear):
    """Rank r's columns [offset, offset + out_features) of a W4A16Linear; x replicated. With
    gather_output the outputs are all-gathered (dist.all_gather) into the full [..., N]."""

    @classmethod
    def from_layer(
        cls,
        layer: W4A16Linear,
        group=None,
        *,
        gather_output: bool = False,
        name: str = "layer",
        uneven: bool = False,
        sizes: Optional[Sequence[int]] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> "ColumnParallelW4A16Linear":
        rank, world_size = _rank_and_world(group, rank, world_size)
        style = "colwise_rep" if gather_output else "colwise"
        shard = shard_linear(layer, style, rank, world_size, name=name, uneven=uneven, sizes=sizes)
        mod = cls.from_packed(shard.packed, shard.in_features, bias=shard.bias, perm=shard.perm)
        mod._set_parallel(shard, group, layer.in_features, layer.out_features, gather_output)
        return mod

    @property
    def gather_output(self) -> bool:
        return self._moves_data

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if not self.gather_output or self.world_size == 1:
            return y
        # all_gather needs equal sizes everywhere: pad an uneven split to the largest part, then trim
        width = max(self.sizes)
        part = y if y.shape[-1] == width else nn.functional.pad(y, (0, width - y.shape[-1]))
        part = part.contiguous()
        parts = [torch.empty_like(part) for _ in self.sizes]
        dist.all_gather(parts, part, group=self.group)
        return torch.cat([p[..., :n] for p, n in zip(parts, self.sizes)], dim=-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, column-parallel {self._parallel_repr()}, gather_output={self.gather_output}"


class RowParallelW4A16Linear(_ParallelMixin, W4A16Linear):
    """Rank r's rows [offset, offset + in_features) of a W4A16Linear. x is this rank's slice of the
    input (the output of a column-parallel layer), or with split_input the full x, sliced here.
    The partial products are summed with dist.all_reduce; the bias is added once, after it."""

    @classmethod
    def from_layer(
        cls,
        layer: W4A16Linear,
        group=None,
        *,
        split_input: bool = False,
        name: str = "layer",
        uneven: bool = False,
        sizes: Optional[Sequence[int]] = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> "RowParallelW4A16Linear":
        rank, world_size = _rank_and_world(group, rank, world_size)
        style = "rowwise_rep" if split_input else "rowwise"
        shard = shard_linear(layer, style, rank, world_size, name=name, uneven=uneven, sizes=sizes)
        mod = cls.from_packed(shard.packed, shard.in_features, bias=shard.bias, perm=shard.perm)
        mod._set_parallel(shard, group, layer.in_features, layer.out_features, split_input)
        return mod

    @property
    def split_input(self) -> bool:
        return self._moves_data

    def forward(self, x: Tensor) -> Tensor:
        if self.split_input:
            x = x[..., self.offset : self.offset + self.in_features]
        elif x.shape[-1] != self.in_features:
            raise ValueError(
                f"RowParallelW4A16Linear (rank {self.rank}): x must be this rank's slice of the input, "
                f"last dim {self.in_features} (of {self.full_in_features}), got {x.shape[-1]}"
            )
        in_dtype = x.dtype
        y = self._matmul(x)  # contiguous, the scales' dtype
        if self.world_size > 1:
            dist.all_reduce(y, group=self.group)
        if self.bias is not None:
            y = y + self.bias
        return y if y.dtype == in_dtype else y.to(in_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, row-parallel {self._parallel_repr()}, split_input={self.split_input}"


# -------------------------------------------------------------------------------------------------
# shard_model


@dataclass
class ShardReport:
    """What shard_model split (detail: style and this rank's shape) and what stayed replicated (why)."""

    rank: int
    world_size: int
    sharded: list = field(default_factory=list)  # (name, detail)
    replicated: list = field(default_factory=list)  # (name, reason)

    @property
    def sharded_names(self) -> list:
        return [n for n, _ in self.sharded]

    @property
    def replicated_names(self) -> list:
        return [n for n, _ in self.replicated]

    def __str__(self) -> str:
        lines = [
            f"shard_model (rank {self.rank} of {self.world_size}): sharded {len(self.sharded)} W4A16Linear, "
            f"{len(self.replicated)} planned modules left replicated"
        ]
        lines += [f"  sharded    {n}: {d}" for n, d in self.sharded]
        lines += [f"  replicated {n}: {d}" for n, d in self.replicated]
        return "\n".join(lines)


def _style_for(name: str, plan: Mapping[str, str]) -> Optional[str]:
    if name in plan:
        return plan[name]
    for pattern, style in plan.items():
        if fnmatch.fnmatchcase(name, pattern):
            return style
    return None


def shard_model(
    model: nn.Module,
    plan: Union[str, Mapping[str, str]] = "auto",
    group=None,
    *,
    uneven: bool = False,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> ShardReport:
    """Replace, in place, every W4A16Linear named by plan with this rank's Column/RowParallelW4A16Linear.

    plan: {module name or fnmatch pattern: style}, styles as transformers' tp_plan ("colwise",
        "rowwise", "colwise_rep", "colwise_gather_output", "rowwise_rep", "rowwise_split_input");
        "auto" takes model.tp_plan (a transformers PreTrainedModel's, e.g. Llama's q/k/v/gate/up
        colwise, o/down rowwise). Every rank must load the same full model first.
    group: the torch.distributed process group (None: the default one); rank / world_size may be
        given instead to build a rank's shards without a process group (e.g. to save them).
    uneven: allow the nearest split in whole units where an even split breaks a rule.

    Modules the plan names that are not W4A16Linear (embeddings, an fp16 lm_head) and styles other
    than column/row-parallel stay replicated, listed in the report: the result is the same, only
    their memory is not split. The model's attention must derive its local head count from the
    projection width (transformers' models do: view(..., -1, head_dim)).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"shard_model: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(plan, str):
        if plan != "auto":
            raise ValueError(f"shard_model: plan must be a dict of module name -> style or 'auto', got {plan!r}")
        plan = getattr(model, "tp_plan", None)
        if not plan:
            raise ValueError(
                f"shard_model: plan='auto' needs model.tp_plan (a transformers model with a tensor-parallel "
                f"plan), {type(model).__name__} has none; pass a dict of module name -> style"
            )
    rank, world_size = _rank_and_world(group, rank, world_size)
    report = ShardReport(rank, world_size)

    chosen = []  # (name, module, style)
    for name, mod in model.named_modules():
        style = _style_for(name, plan) if name else None
        if style is None:
            continue
        if style not in COLUMN_STYLES and style not in ROW_STYLES:
            report.replicated.append((name, f"style {style!r} is not column/row-parallel"))
        elif isinstance(mod, (ColumnParallelW4A16Linear, RowParallelW4A16Linear)):
            report.replicated.append((name, "already sharded"))
        elif not isinstance(mod, W4A16Linear):
            report.replicated.append((name, f"{type(mod).__name__} is not a W4A16Linear"))
        else:
            chosen.append((name, mod, style))

    # One split per size of the split dimension, so column shards line up with the row layer reading them.
    splits = {}
    if uneven:
        units: dict = {}
        for name, mod, style in chosen:
            if style in COLUMN_STYLES:
                units.setdefault(mod.out_features, []).append(8)
            elif mod.group_size < mod.in_features:
                units.setdefault(mod.in_features, []).append(mod.group_size)
            else:
                units.setdefault(mod.in_features, []).append(1)
        for total, us in units.items():
            unit = math.lcm(*us)
            if total % world_size == 0 and (total // world_size) % unit == 0:
                continue  # even works for every layer of this size
            splits[total] = _even_or_units(total, world_size, unit)  # None: plan_split raises for the layer

    # Check every layer before replacing any, so a bad plan leaves the model as it was.
    built = []
    for name, mod, style in chosen:
        total = mod.out_features if style in COLUMN_STYLES else mod.in_features
        sizes = splits.get(total)
        kw = dict(name=name, uneven=uneven and sizes is None, sizes=sizes, rank=rank, world_size=world_size)
        if style in COLUMN_STYLES:
            new = ColumnParallelW4A16Linear.from_layer(mod, group, gather_output=COLUMN_STYLES[style], **kw)
            shape = f"N {new.out_features} of {mod.out_features}"
        else:
            new = RowParallelW4A16Linear.from_layer(mod, group, split_input=ROW_STYLES[style], **kw)
            shape = f"K {new.in_features} of {mod.in_features}"
        built.append((name, new))
        report.sharded.append((name, f"{style}: {shape}, G = {new.group_size}"))

    for name, new in built:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    return report
