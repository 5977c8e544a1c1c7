"""shard_model: a loaded model's W4A16Linear layers replaced by their parallel shards, by a
tensor-parallel plan (transformers' tp_plan names)."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from ..nn import W4A16Linear
from .layers import ColumnParallelW4A16Linear, RowParallelW4A16Linear, _rank_and_world
from .split import COLUMN_STYLES, ROW_STYLES, _even_or_units, _row_act_order, plan_split, shard_linear

ENGINES = ("torch", "transformers")

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

    def reason(self, name: str) -> Optional[str]:
        """The detail of a sharded module or why a planned one stayed replicated; None if not planned."""
        for n, d in self.sharded + self.replicated:
            if n == name:
                return d
        return None

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
    engine: str = "torch",
) -> ShardReport:
    """Replace, in place, every W4A16Linear named by plan with this rank's Column/RowParallelW4A16Linear.

    plan: {module name or fnmatch pattern: style}, styles as transformers' tp_plan ("colwise",
        "rowwise", "colwise_rep", "colwise_gather_output", "rowwise_rep", "rowwise_split_input");
        "auto" takes model.tp_plan (a transformers PreTrainedModel's, e.g. Llama's q/k/v/gate/up
        colwise, o/down rowwise). Every rank must load the same full model first.
    group: the torch.distributed process group (None: the default one); rank / world_size may be
        given instead to build a rank's shards without a process group (e.g. to save them).
    uneven: allow the nearest split in whole units where an even split breaks a rule.
    engine: who runs the collectives of the "colwise" / "rowwise" layers.
        "torch": this package's Column/RowParallelW4A16Linear (dist.all_reduce / all_gather).
        "transformers": the layers become plain W4A16Linear shards flagged for transformers' local
        quantized path (_hf_quantized_needs_local_tp, the flag its own quantizers set; a row layer's
        bias stays on rank 0 only, so the sum adds it once) and transformers' ColwiseParallel /
        RowwiseParallel (DTensor, transformers.distributed.tensor_parallel) are installed on them.
        Its loader cannot shard our buffers itself: it shards parameters by DTensor placement, and
        a slice of packed words is not a slice of the weight. The gather / split-input styles use
        this package's layers with either engine.

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
    if engine not in ENGINES:
        raise ValueError(f"shard_model: engine must be one of {ENGINES}, got {engine!r}")
    if engine == "transformers":
        apply_tp = _transformers_apply()
        if rank is not None or world_size is not None:
            raise ValueError("shard_model: engine='transformers' needs a process group, not rank / world_size")
    rank, world_size = _rank_and_world(group, rank, world_size)
    report = ShardReport(rank, world_size)

    chosen = []  # (name, module, style)
    for name, mod in model.named_modules():
        style = _style_for(name, plan) if name else None
        if style is None:
            continue
        if style not in COLUMN_STYLES and style not in ROW_STYLES:
            report.replicated.append((name, f"style {style!r} is not column/row-parallel"))
        elif isinstance(mod, (ColumnParallelW4A16Linear, RowParallelW4A16Linear)) or getattr(
            mod, "_hf_quantized_needs_local_tp", False
        ):  # a second call must not split a shard again
            report.replicated.append((name, "already sharded"))
        elif not isinstance(mod, W4A16Linear):
            report.replicated.append((name, f"{type(mod).__name__} is not a W4A16Linear"))
        else:
            chosen.append((name, mod, style))

    _check_heads(model, chosen, world_size)

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

    # Every rule is checked for every layer before any is replaced, so a bad plan leaves the model as
    # it was; the checks do not depend on the rank, so every rank raises the same error (none is left
    # waiting in a collective). Then one layer at a time: the peak is the model plus one layer's shard.
    sizes_of = {}
    for name, mod, style in chosen:
        total = mod.out_features if style in COLUMN_STYLES else mod.in_features
        sizes = splits.get(total)
        sizes_of[name] = plan_split(style, mod.in_features, mod.out_features, mod.group_size, world_size,
                                    name=name, uneven=uneven and sizes is None, sizes=sizes)
        if mod.perm is not None and style in ROW_STYLES:
            _row_act_order(name, mod.perm.to(torch.int64), mod.group_size, sizes_of[name], rank)

    hf_plan = {}
    for name, mod, style in chosen:
        sizes = sizes_of[name]
        kw = dict(name=name, sizes=sizes, rank=rank, world_size=world_size)
        if engine == "transformers" and style in ("colwise", "rowwise"):
            shard = shard_linear(mod, style, rank, world_size, name=name, sizes=sizes)
            bias = shard.bias if style == "colwise" or rank == 0 else None
            new = W4A16Linear.from_packed(shard.packed, shard.in_features, bias=bias, perm=shard.perm)
            new._hf_quantized_needs_local_tp = True
            hf_plan[name] = style
            shape = f"N {new.out_features}" if style == "colwise" else f"K {new.in_features}"
            shape += f" of {mod.out_features if style == 'colwise' else mod.in_features}, transformers' {style}"
        elif style in COLUMN_STYLES:
            new = ColumnParallelW4A16Linear.from_layer(mod, group, gather_output=COLUMN_STYLES[style], **kw)
            shape = f"N {new.out_features} of {mod.out_features}"
        else:
            new = RowParallelW4A16Linear.from_layer(mod, group, split_input=ROW_STYLES[style], **kw)
            shape = f"K {new.in_features} of {mod.in_features}"
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        report.sharded.append((name, f"{style}: {shape}, G = {new.group_size}"))
    if hf_plan:
        from torch.distributed.device_mesh import DeviceMesh

        device_type = next(iter(model.get_submodule(n) for n in hf_plan)).qweight.device.type
        mesh = DeviceMesh.from_group(group if group is not None else dist.group.WORLD, device_type)
        apply_tp(model, mesh, hf_plan)
    return report


def _check_heads(model: nn.Module, chosen: list, world_size: int) -> None:
    """A transformers model's attention splits by heads: each rank needs whole q and kv heads (else
    its view(..., -1, head_dim) or the GQA repeat would break, or silently mix heads)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not any("attn" in name or "attention" in name for name, _, _ in chosen):
        return
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for attr in ("num_attention_heads", "num_key_value_heads"):
        n = getattr(cfg, attr, None)
        if isinstance(n, int) and n % world_size:
            raise ValueError(
                f"shard_model: model.config.{attr} = {n} must be divisible by world_size = {world_size} "
                f"(each rank holds whole attention heads of the column-parallel q/k/v projections)"
            )


def _transformers_apply():
    try:
        from transformers.distributed.tensor_parallel import apply_tensor_parallelism
    except ImportError as e:
        raise ImportError(
            "shard_model: engine='transformers' needs transformers with transformers.distributed.tensor_parallel "
            f"(apply_tensor_parallelism, transformers 5.x): {e}"
        ) from e
    return apply_tensor_parallelism
