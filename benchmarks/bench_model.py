"""Model-level benchmarks.

    python -m benchmarks.bench_model --out results/ [--quick]

1. Decode step of a transformer block's linear layers (qkv, o, gate_up, down), packed with this
   package vs fp16 nn.Linear weights, replayed from a CUDA graph, blocks rotated so the weights are
   cold in L2 (as consecutive layers are), at M = 1, 16, 64, 256: Llama-3-8B and a model with
   intermediate size 2112.
2. A small decoder (random weights, torch modules) whose nn.Linear layers are swapped for
   W4A16Linear, under torch.compile(mode="reduce-overhead"): tokens/s vs fp16, with fullgraph=True
   (no graph breaks) and error_on_recompile while M changes.
Writes bench_model.csv and bench_model.md to --out.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import w4a16_ops
from w4a16_ops.nn import swap_linears

from .timing import copies_needed, time_rotating

# name: (hidden, intermediate, q heads, kv heads, head dim)
MODELS = {
    "llama3-8b": (4096, 14336, 32, 8, 128),
    "inter2112": (2048, 2112, 16, 4, 128),
}


def block_linears(hidden, inter, heads, kv_heads, hd):
    """[K, N] of qkv, o, gate_up, down."""
    return [(hidden, (heads + 2 * kv_heads) * hd), (heads * hd, hidden), (hidden, 2 * inter), (inter, hidden)]


def block_step_calls(shapes, M, packed: bool, G=128):
    """One call per block copy; each call runs the four linears of one block at M tokens."""
    dtype = torch.float16
    xs = {K: torch.randn(M, K, dtype=dtype, device="cuda") for K, _ in shapes}
    if packed:
        per_block = sum(K * N // 2 + 2 * N * K // G for K, N in shapes)
    else:
        per_block = sum(2 * K * N for K, N in shapes)
    blocks = []
    for _ in range(copies_needed(per_block)):
        layers = []
        for K, N in shapes:
            g = G if K % G == 0 else 64
            if packed:
                q = torch.randint(0, 16, (N, K), dtype=torch.uint8, device="cuda")
                s = (torch.rand(K // g, N, device="cuda") * 0.01).to(dtype)
                layers.append((K, w4a16_ops.pack(q, s)))
            else:
                layers.append((K, torch.randn(N, K, dtype=dtype, device="cuda") * 0.01))
        blocks.append(layers)

    def step(layers):
        for K, w in layers:
            if packed:
                torch.ops.w4a16.gemm(xs[K], w.qweight, w.scales, None)
            else:
                F.linear(xs[K], w)

    return [lambda layers=layers: step(layers) for layers in blocks]


class RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-5)


class DecoderLayer(nn.Module):
    """Llama-style layer for one new token per sequence, attending to a static KV cache."""

    def __init__(self, hidden, inter, heads, kv_heads, hd):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, hd
        self.qkv = nn.Linear(hidden, (heads + 2 * kv_heads) * hd, bias=False)
        self.o = nn.Linear(heads * hd, hidden, bias=False)
        self.gate_up = nn.Linear(hidden, 2 * inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)
        self.n1, self.n2 = RMSNorm(hidden), RMSNorm(hidden)

    def forward(self, x, k_cache, v_cache):
        B = x.shape[0]
        q, k, v = self.qkv(self.n1(x)).split([self.heads * self.hd, self.kv_heads * self.hd, self.kv_heads * self.hd], -1)
        q = q.view(B, self.heads, 1, self.hd)
        # One cached context shared by the batch (expand, not slice: no data-dependent size for M).
        k = torch.cat([k_cache.expand(B, -1, -1, -1), k.view(B, self.kv_heads, 1, self.hd)], dim=2)
        v = torch.cat([v_cache.expand(B, -1, -1, -1), v.view(B, self.kv_heads, 1, self.hd)], dim=2)
        a = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        x = x + self.o(a.reshape(B, self.heads * self.hd))
        g, u = self.gate_up(self.n2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(g) * u)


class Decoder(nn.Module):
    def __init__(self, layers, hidden, inter, heads, kv_heads, hd, context, max_batch):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(hidden, inter, heads, kv_heads, hd) for _ in range(layers))
        self.register_buffer("k_cache", torch.randn(1, kv_heads, context, hd) * 0.1)
        self.register_buffer("v_cache", torch.randn(1, kv_heads, context, hd) * 0.1)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x, self.k_cache, self.v_cache)
        return x


def decoder_tokens_per_s(model_name, packed: bool, Ms, layers=4, context=512):
    hidden, inter, heads, kv_heads, hd = MODELS[model_name]
    torch.manual_seed(0)
    model = Decoder(layers, hidden, inter, heads, kv_heads, hd, context, max(Ms)).half().cuda().eval()
    for p in model.parameters():
        nn.init.normal_(p, std=0.02) if p.dim() > 1 else None
    if packed:
        report = swap_linears(model, group_size=128 if inter % 128 == 0 else 64)
        assert not report.skipped_names, str(report)
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    out = {}
    with torch.no_grad():
        x0 = torch.randn(Ms[0], hidden, dtype=torch.float16, device="cuda")
        torch._dynamo.decorators.mark_unbacked(x0, 0)
        compiled(x0)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for M in Ms:
                x = torch.randn(M, hidden, dtype=torch.float16, device="cuda")
                for _ in range(3):
                    compiled(x)  # cudagraph trees record per size after warm-up runs
                t = time_rotating([lambda: compiled(x)], reps=20, graph=False)
                out[M] = M / (t * 1e-6)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    Ms = [1, 16, 64, 256]
    gpu, date = torch.cuda.get_device_name(), datetime.date.today().isoformat()
    rows = []
    for name, dims in MODELS.items():
        shapes = block_linears(*dims)
        for M in Ms:
            t16 = time_rotating(block_step_calls(shapes, M, packed=False))
            t4 = time_rotating(block_step_calls(shapes, M, packed=True))
            rows.append(dict(gpu=gpu, date=date, bench="block_linears", model=name, M=M, fp16=round(t16, 2),
                             w4a16=round(t4, 2), unit="us/step", speedup=round(t16 / t4, 3)))
            print(f"block linears {name:10s} M={M:<4d} fp16 {t16:8.1f} us  w4a16 {t4:8.1f} us  {t16 / t4:.2f}x", flush=True)
            torch.cuda.empty_cache()
    for name in (["inter2112"] if args.quick else list(MODELS)):
        tps16 = decoder_tokens_per_s(name, False, Ms)
        tps4 = decoder_tokens_per_s(name, True, Ms)
        for M in Ms:
            rows.append(dict(gpu=gpu, date=date, bench="decoder_compiled", model=name, M=M, fp16=round(tps16[M]),
                             w4a16=round(tps4[M]), unit="tokens/s", speedup=round(tps4[M] / tps16[M], 3)))
            print(f"decoder (4 layers, compiled) {name:10s} M={M:<4d} fp16 {tps16[M]:10.0f} tok/s  "
                  f"w4a16 {tps4[M]:10.0f} tok/s  {tps4[M] / tps16[M]:.2f}x", flush=True)
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "bench_model.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(args.out, "bench_model.md"), "w") as f:
        f.write(f"# Model-level benchmark: {gpu}, {date}\n\n| bench | model | M | fp16 | w4a16 | unit | speedup |\n")
        f.write("|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['bench']} | {r['model']} | {r['M']} | {r['fp16']} | {r['w4a16']} | {r['unit']} | {r['speedup']:.2f}x |\n")
    print("wrote bench_model.csv, bench_model.md")


if __name__ == "__main__":
    main()
