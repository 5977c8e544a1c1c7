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
packed words: a qweight word holds the nibbles of rows k, k + 1, k + 8, k + 9 and columns n, n + 8
of a 16 x 64 tile, and the tiles pad K to 16 and N to 64, so a slice of words is not a slice of the
weight (and a rank's N_r or K_r need not be a multiple of a tile: it is repacked). The rules a split must keep (checked, ValueError naming the layer, the world
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
- attention (a transformers model's config): num_attention_heads and num_key_value_heads must divide
  by the world size, so each rank holds whole heads.
The checks do not depend on the rank, so every rank raises the same error before any layer changes.

Who runs the collectives (shard_model's engine): "torch", this package's ColumnParallelW4A16Linear /
RowParallelW4A16Linear (dist.all_gather / dist.all_reduce; torch.compile(fullgraph=True) traces
them); or "transformers", its own ColwiseParallel / RowwiseParallel (DTensor) installed on local
W4A16Linear shards. transformers' loader itself (from_pretrained(tp_plan="auto")) cannot shard our
layers: it shards parameters by DTensor placement (our tensors are buffers, and a slice of packed
words is not a slice of the weight), and it installs its styles before the quantizer has built the
layers. So: load (w4a16_ops.from_pretrained, swap_linears, converters), then shard_model.

Layer level: plan_split (the per-rank sizes, or the error), shard_weights (a rank's shard from
logical values), shard_linear (from a W4A16Linear), Column/RowParallelW4A16Linear.from_layer.
Forward only: the collectives are torch.distributed's in-place ones and carry no gradient. Every rank
loads the whole model before sharding (peak: the model plus one layer's shard).
"""

from .layers import ColumnParallelW4A16Linear, RowParallelW4A16Linear
from .model import ShardReport, shard_model
from .split import COLUMN_STYLES, ROW_STYLES, LocalShard, plan_split, shard_linear, shard_weights

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
