"""Column- and row-parallel W4A16 layers: one rank's shard plus the torch.distributed collective
its split needs (all_gather of the output, all_reduce of the partial sums)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..nn import W4A16Linear
from .split import LocalShard, shard_linear


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
