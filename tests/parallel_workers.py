"""Code that runs inside the spawned ranks of tests/test_parallel.py (one process per rank, gloo on CPU).

Every rank builds the same full model from the same seed (as every rank of a serving engine loads the
same checkpoint), computes the single-process forward, shards the model with w4a16_ops.parallel and
compares. A failed check raises in the rank, and the test sees the traceback.
"""

from __future__ import annotations

import datetime
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import w4a16_ops
from w4a16_ops import parallel as tp
from w4a16_ops.backends.reference import gemm_float64
from w4a16_ops.nn import W4A16Linear
from w4a16_ops.testing import TOLERANCE, rel_err

DTYPE = torch.float16


def run_rank(rank: int, world_size: int, store_path: str, cases: list, seed: int) -> None:
    """torch.multiprocessing entry point: one process group, several cases, then a clean shutdown."""
    torch.set_num_threads(1)  # the ranks share the CI machine's two cores
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        for i, case in enumerate(cases):
            fn = CASES[case[0]]
            try:
                fn(seed + 1000 * i, *case[1:])
            except Exception as e:
                raise AssertionError(f"rank {rank}/{world_size}, case {case}: {e}").with_traceback(e.__traceback__)
            dist.barrier()
    finally:
        dist.destroy_process_group()


# -- models -------------------------------------------------------------------------------------


def random_layer(K: int, N: int, G: int, symmetric: bool, bias: bool = False, perm=None) -> W4A16Linear:
    """Fresh random logical values (q uniform 0..15, scales ~ 1/sqrt(K), zeros uniform), packed."""
    G = K if G == -1 else G
    q = torch.randint(0, 16, (N, K))
    scales = ((torch.rand(K // G, N) + 0.5) / math.sqrt(K) / 4).to(DTYPE)
    z = None if symmetric else torch.randint(0, 16, (K // G, N))
    b = (torch.randn(N) * 0.1).to(DTYPE) if bias else None
    return W4A16Linear.from_packed(w4a16_ops.pack(q, scales, z), K, bias=b, perm=perm)


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int, G: int, symmetric: bool):
        super().__init__()
        self.gate_proj = random_layer(hidden, inter, G, symmetric)
        self.up_proj = random_layer(hidden, inter, G, symmetric)
        self.down_proj = random_layer(inter, hidden, G, symmetric, bias=True)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """q/k/v column-parallel, o row-parallel; the local head count comes from the projection width."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, G: int, symmetric: bool):
        super().__init__()
        self.head_dim = head_dim
        self.q_proj = random_layer(hidden, heads * head_dim, G, symmetric, bias=True)
        self.k_proj = random_layer(hidden, kv_heads * head_dim, G, symmetric, bias=True)
        self.v_proj = random_layer(hidden, kv_heads * head_dim, G, symmetric)
        self.o_proj = random_layer(heads * head_dim, hidden, G, symmetric)

    def forward(self, x):  # x [T, hidden], one causal sequence
        T, hd = x.shape[0], self.head_dim
        q = self.q_proj(x).view(T, -1, hd).transpose(0, 1)
        k = self.k_proj(x).view(T, -1, hd).transpose(0, 1)
        v = self.v_proj(x).view(T, -1, hd).transpose(0, 1)
        rep = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        a = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(x.dtype)
        return self.o_proj(a.transpose(0, 1).reshape(T, -1))


MLP_PLAN = {"gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"}
ATTN_PLAN = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise"}


def check(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err = rel_err(out, ref)
    assert err <= TOLERANCE[DTYPE], f"{what}: relative error {err:.3e} > {TOLERANCE[DTYPE]:.3e}"


def same_everywhere(t: torch.Tensor, what: str) -> None:
    """Every rank must end with the same replicated output (a rank that skipped a reduce would not)."""
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    assert all(torch.equal(g, gathered[0]) for g in gathered), f"{what}: ranks disagree"


# -- cases --------------------------------------------------------------------------------------


def case_block(seed: int, kind: str, G: int, symmetric: bool, M: int = 5, uneven: bool = False) -> None:
    """An MLP or attention block: the sharded forward equals the single-process forward, and each row-
    parallel projection's replicated output is as close to the float64 reference as the op tests ask."""
    torch.manual_seed(seed)  # same model and input on every rank
    if kind == "mlp":
        hidden, inter = (512, 1152) if uneven else (512, 1024)
        model, plan = MLP(hidden, inter, G, symmetric), MLP_PLAN
    else:
        model, plan = Attention(512, 8, 4, 64, G, symmetric), ATTN_PLAN
        hidden = 512
    x = torch.randn(M, hidden).to(DTYPE)
    with torch.no_grad():
        ref = model(x)
        row_name = "down_proj" if kind == "mlp" else "o_proj"
        row = getattr(model, row_name)
        row_in = {}
        hook = row.register_forward_pre_hook(lambda m, a: row_in.setdefault("x", a[0]))
        model(x)
        hook.remove()
        row_ref_x = row_in["x"]
        row_ref = gemm_float64(row_ref_x, row.qweight, row.scales, row.zeros)
        if row.bias is not None:
            row_ref = row_ref + row.bias.double()

        report = tp.shard_model(model, plan, uneven=uneven)
        assert set(report.sharded_names) == set(plan), str(report)
        out = model(x)
        what = f"{kind} G={G} {'sym' if symmetric else 'zeros'} M={M} uneven={uneven}"
        check(out, ref, f"{what}: sharded vs single-process")
        same_everywhere(out, what)

        # The row-parallel projection alone, fed its shard of the same input, against float64.
        sharded_row = getattr(model, row_name)
        lo = sharded_row.offset
        y = sharded_row(row_ref_x[..., lo : lo + sharded_row.in_features])
        check(y, row_ref, f"{what}: {row_name} vs float64")
        if uneven:
            assert len(set(sharded_row.sizes)) > 1, f"{what}: expected an uneven split, got {sharded_row.sizes}"


def case_gather_and_split(seed: int, G: int, symmetric: bool) -> None:
    """colwise_rep all-gathers the full output; rowwise_rep slices a replicated input itself."""
    torch.manual_seed(seed)
    col = random_layer(256, 384, G, symmetric, bias=True)
    row = random_layer(384, 256, G, symmetric, bias=True)
    x = torch.randn(3, 256).to(DTYPE)
    with torch.no_grad():
        ref_col, ref_row = col(x), row(col(x))
        pcol = tp.ColumnParallelW4A16Linear.from_layer(col, gather_output=True, name="col")
        prow = tp.RowParallelW4A16Linear.from_layer(row, split_input=True, name="row")
        y = pcol(x)
        assert torch.equal(y, ref_col), "colwise_rep: the gathered output must be bit-identical"
        check(prow(y), ref_row, "rowwise_rep")
        check(prow(y), gemm_float64(y, row.qweight, row.scales, row.zeros) + row.bias.double(), "rowwise_rep vs f64")
        # An uneven column split (N / 8 = 49 units over the ranks): all_gather pads and trims.
        odd = random_layer(256, 392, G, symmetric, bias=True)
        podd = tp.ColumnParallelW4A16Linear.from_layer(odd, gather_output=True, uneven=True, name="odd")
        assert len(set(podd.sizes)) > 1 or 392 % (8 * dist.get_world_size()) == 0, podd.sizes
        assert torch.equal(podd(x), odd(x)), "uneven colwise_rep: the gathered output must be bit-identical"


def _act_order_perm(K: int, G: int, W: int, contained: bool) -> torch.Tensor:
    """A perm whose groups each read inputs of one rank (contained) or a random one (groups cut)."""
    if not contained:
        return torch.randperm(K)
    per = K // W
    chunks = [(torch.randperm(per) + r * per).view(-1, G) for r in range(W)]
    groups = torch.cat(chunks)  # [K // G, G], each group within one rank's inputs
    return groups[torch.randperm(groups.shape[0])].flatten()


def case_act_order(seed: int, G: int, symmetric: bool) -> None:
    """Act-order layers: column-parallel always, row-parallel when each group stays on one rank;
    a perm that spreads a group over ranks fails with the clear error."""
    W = dist.get_world_size()
    torch.manual_seed(seed)
    K, N = 512, 256
    x = torch.randn(4, K).to(DTYPE)
    with torch.no_grad():
        for style in ("colwise", "rowwise"):
            layer = random_layer(K, N, G, symmetric, bias=True, perm=_act_order_perm(K, G, W, True))
            ref64 = gemm_float64(x.index_select(-1, layer.perm), layer.qweight, layer.scales, layer.zeros)
            ref64 = ref64 + layer.bias.double()
            ref = layer(x)
            if style == "colwise":
                m = tp.ColumnParallelW4A16Linear.from_layer(layer, gather_output=True, name="act.col")
                y = m(x)
                assert torch.equal(y, ref), "act-order colwise: gathered output must be bit-identical"
            else:
                m = tp.RowParallelW4A16Linear.from_layer(layer, split_input=True, name="act.row")
                y = m(x)
                check(y, ref, "act-order rowwise vs single-process")
            check(y, ref64, f"act-order {style} vs float64")
        bad = random_layer(K, N, G, symmetric, perm=_act_order_perm(K, G, W, False))
        try:
            tp.RowParallelW4A16Linear.from_layer(bad, name="model.layers.3.mlp.down_proj")
        except ValueError as e:
            msg = str(e)
            for part in ("model.layers.3.mlp.down_proj", f"world_size = {W}", "quantization group", "act-order"):
                assert part in msg, f"act-order error lacks {part!r}: {msg}"
        else:
            raise AssertionError("a row-parallel act-order split that cuts groups must raise ValueError")


def case_group_cut_error(seed: int) -> None:
    """A split that cuts a quantization group (or leaves N % 8 != 0) raises before touching the model."""
    W = dist.get_world_size()
    torch.manual_seed(seed)
    inter = 192 * W  # K / W = 192: 1.5 groups of 128 per rank
    model = MLP(256, inter, 128, symmetric=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        tp.shard_model(model, MLP_PLAN)
    except ValueError as e:
        msg = str(e)
        for part in ("down_proj", f"world_size = {W}", "whole number of quantization groups", f"K = {inter}"):
            assert part in msg, f"group-cut error lacks {part!r}: {msg}"
    else:
        raise AssertionError("a row-parallel split cutting groups of 128 must raise ValueError")
    assert all(isinstance(m, W4A16Linear) and not isinstance(m, tp.RowParallelW4A16Linear)
               for m in (model.gate_proj, model.up_proj, model.down_proj)), "a failed shard_model changed the model"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    col = random_layer(256, 8 * W + 8, 64, True)  # N / W not a multiple of 8
    try:
        tp.ColumnParallelW4A16Linear.from_layer(col, name="lm.q_proj")
    except ValueError as e:
        assert "lm.q_proj" in str(e) and f"world_size = {W}" in str(e) and "multiple of 8" in str(e), str(e)
    else:
        raise AssertionError("a column split leaving N % 8 != 0 must raise ValueError")


def case_transformers_llama(seed: int, G: int, symmetric: bool, engine: str = "torch") -> None:
    """A transformers Llama with its linears swapped, sharded by its own tp_plan (plan='auto'); the
    collectives run in this package's layers (engine 'torch') or in transformers' DTensor styles."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    W = dist.get_world_size()
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=W, head_dim=64, max_position_embeddings=64, attention_bias=True, mlp_bias=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    for m in model.modules():  # transformers initializes biases to zero: make them count
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.data.normal_(0, 0.5)
    w4a16_ops.swap_linears(model, group_size=G, symmetric=symmetric, skip="lm_head")
    ids = torch.randint(0, cfg.vocab_size, (1, 7))
    with torch.no_grad():
        ref = model(ids).logits
        report = tp.shard_model(model, "auto", engine=engine)
        assert len(report.sharded) == 7, str(report)  # q, k, v, o, gate, up, down
        assert "lm_head" in report.replicated_names and "model.embed_tokens" in report.replicated_names, str(report)
        down = model.model.layers[0].mlp.down_proj
        assert down.in_features == cfg.intermediate_size // W, f"down_proj holds K = {down.in_features}"
        if engine == "transformers":
            assert type(down) is W4A16Linear and down._hf_quantized_needs_local_tp and down._is_hooked
            assert (down.bias is None) == (dist.get_rank() != 0), "a row shard's bias belongs to rank 0 only"
        again = tp.shard_model(model, "auto", engine=engine)
        assert not again.sharded and again.reason("model.layers.0.mlp.down_proj") == "already sharded", str(again)
        out = model(ids).logits
    check(out, ref, f"transformers Llama G={G} {'sym' if symmetric else 'zeros'} engine={engine}")
    same_everywhere(out, "transformers Llama")


def case_from_pretrained(seed: int, path: str, engine: str = "torch") -> None:
    """A checkpoint directory loaded by w4a16_ops.from_pretrained on every rank, then sharded."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    W = dist.get_world_size()
    torch.manual_seed(seed)
    model = w4a16_ops.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        ref = model(ids).logits
        report = tp.shard_model(model, "auto", engine=engine)
        assert len(report.sharded) == 7 * model.config.num_hidden_layers, str(report)
        up = model.model.layers[0].mlp.up_proj
        assert up.out_features == model.config.intermediate_size // W, f"up_proj holds N = {up.out_features}"
        out = model(ids).logits
    check(out, ref, f"from_pretrained {path} engine={engine}")
    same_everywhere(out, "from_pretrained")


def case_compiled(seed: int) -> None:
    """Sharded layers under torch.compile(fullgraph=True): the collectives trace without graph breaks
    (aot_eager: the graph, without inductor's C++ compile time) and give the eager result."""
    torch.manual_seed(seed)
    seq = nn.Sequential(random_layer(256, 392, 64, False, bias=True), random_layer(392, 256, -1, True, bias=True))
    for model, plan in ((MLP(256, 512, 64, False), MLP_PLAN), (seq, {"0": "colwise_rep", "1": "rowwise_rep"})):
        x = torch.randn(3, 256).to(DTYPE)
        with torch.no_grad():
            ref = model(x)
            tp.shard_model(model, plan, uneven=True)  # seq: 392 columns = 49 units of 8, split unevenly
            eager = model(x)
            torch._dynamo.reset()
            compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
        assert torch.equal(compiled, eager), f"{type(model).__name__}: compiled differs from eager"
        check(eager, ref, f"{type(model).__name__} sharded vs single-process")


def case_bench_dry_run(seed: int, out: str) -> None:
    """benchmarks/bench_tp.py's dry run in this process group (tiny shapes, gloo, its own output check)."""
    from benchmarks import bench_tp

    os.environ.pop("NCCL_NVLS_ENABLE", None)
    bench_tp.main(["--out", out, "--dry-run", "--zeros"])
    assert os.environ["NCCL_NVLS_ENABLE"] == "0", "bench_tp must turn NVLink multicast off when unset"


CASES = {
    "compiled": case_compiled,
    "bench_dry_run": case_bench_dry_run,
    "from_pretrained": case_from_pretrained,
    "block": case_block,
    "gather_and_split": case_gather_and_split,
    "act_order": case_act_order,
    "group_cut_error": case_group_cut_error,
    "transformers_llama": case_transformers_llama,
}


if __name__ == "__main__":  # a quick manual run: python tests/parallel_workers.py WORLD
    import tempfile

    import torch.multiprocessing as mp

    world = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(run_rank, (world, os.path.join(d, "store"), [("block", "mlp", 128, False)], 0), nprocs=world)
