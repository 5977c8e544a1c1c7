"""Quantized checkpoint directories for the from_pretrained / transformers tests.

compressed-tensors directories are written by the compressed-tensors library itself (its
apply_quantization_config + calculate_qparams + ModelCompressor.compress_model + update_config,
the path llm-compressor takes when it saves). GPTQ and AWQ directories are built from their
documented layouts (shared/reference/formats.md) with the independent packers of
test_converters.py, since neither AutoGPTQ nor AutoAWQ installs on a CPU machine.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict

import torch

from test_converters import AWQ_ORDER, act_order_g_idx, pack_along_cols, pack_along_rows

LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(*, dtype=torch.float16, tie=False, bias=False, hidden=192, intermediate=320, layers=2, vocab=512):
    """A 2-layer Llama with widths that are not multiples of 128 (K = 192 and 320)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=4, num_key_value_heads=2,
        head_dim=hidden // 4, num_hidden_layers=layers, vocab_size=vocab, tie_word_embeddings=tie,
        attention_bias=bias, mlp_bias=bias, max_position_embeddings=128,
    )
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # random init is std 0.02 with zero biases: give the biases values too
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.02)
    return model


def save_dir(path: str, config, state: Dict[str, torch.Tensor], *, shards: int = 1) -> None:
    """config.json plus the tensors in `shards` safetensors files (with an index when > 1). Keys are
    dealt round-robin in sorted order, so one layer's tensors land in different shards."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    keys = sorted(state)
    if shards == 1:
        save_file({k: state[k].contiguous() for k in keys}, os.path.join(path, "model.safetensors"))
        return
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {k: names[i % shards] for i, k in enumerate(keys)}
    for name in names:
        save_file({k: state[k].contiguous() for k in keys if weight_map[k] == name}, os.path.join(path, name))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _dense_state(model) -> Dict[str, torch.Tensor]:
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # transformers does not save the tied copy either
    return state


def write_compressed_tensors(model, path, *, symmetric, strategy="group", group_size=64, ignore=("lm_head",),
                             shards=1, decompress=True):
    """Quantize model's linears with compressed-tensors and save a pack-quantized directory.
    Returns {layer name: the library's own decompressed weight [N, K]} for the checks (empty
    without decompress)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    kwargs = {"group_size": group_size} if strategy == "group" else {}
    args = QuantizationArgs(num_bits=4, symmetric=symmetric, strategy=strategy, **kwargs)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    qc = QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(ignore), format="pack-quantized")
    apply_quantization_config(model, qc)
    for name, m in model.named_modules():
        if getattr(m, "quantization_scheme", None) is None:
            continue
        w = m.weight.data
        N, K = w.shape
        G = group_size if strategy == "group" else K
        wg = w.float().reshape(N, K // G, G)
        scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), args)
        m.weight_scale.data.copy_(scale)
        if hasattr(m, "weight_zero_point"):
            m.weight_zero_point.data.copy_(zp)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    state = _dense_state(model)
    save_dir(path, model.config, state, shards=shards)
    compressor.update_config(path)
    decompressed = {}
    for name, m in model.named_modules():
        if decompress and hasattr(m, "weight_packed"):
            layer = {k.rpartition(".")[2]: v for k, v in state.items() if k.rpartition(".")[0] == name}
            decompressed[name] = PackedQuantizationCompressor.decompress(layer, m.quantization_scheme)["weight"]
    return decompressed


def _random_facts(K, N, G, *, sym, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (K, N), generator=gen)
    z = torch.full((K // G, N), 8) if sym else torch.randint(1, 16, (K // G, N), generator=gen)
    s = ((torch.rand(K // G, N, generator=gen) + 0.5) / math.sqrt(K) / 4).to(torch.float16)
    return q, z, s


def write_gptq(model, path, *, version, sym, desc_act, group_size=64, shards=1, seed=0, dense_suffixes=(),
               group_sizes=None, extra_config=None, config_file="config.json"):
    """A GPTQ directory (documented layout): random 4-bit values per linear of the decoder blocks,
    lm_head dense. Returns {layer name: float64 weight [K, N] in the original row order}.

    dense_suffixes: linears left 16-bit; group_sizes: {suffix: G} overrides; extra_config: more
    quantization_config keys (e.g. GPTQModel's "dynamic"); config_file "quantize_config.json" writes
    the quantization config there (old AutoGPTQ directories) instead of into config.json."""
    state = _dense_state(model)
    dense = {}
    for i, (name, m) in enumerate(n for n in model.named_modules() if n[0].endswith(LINEAR_SUFFIXES)):
        if name.endswith(tuple(dense_suffixes)):
            continue
        K, N = m.in_features, m.out_features
        G = (group_sizes or {}).get(name.rpartition(".")[2], group_size)
        q, z, s = _random_facts(K, N, G, sym=sym, seed=seed + i)
        g_idx = act_order_g_idx(K, G, seed=seed + 100 + i) if desc_act else (torch.arange(K) // G).to(torch.int32)
        # Act-order: row k belongs to group g_idx[k]; q[k] is stored in place, the group's z / s apply.
        stored_z = (z - 1) if version == 1 else z
        del state[f"{name}.weight"]
        state[f"{name}.qweight"] = pack_along_rows(q)
        state[f"{name}.qzeros"] = pack_along_cols(stored_z & 0xF)
        state[f"{name}.scales"] = s
        state[f"{name}.g_idx"] = g_idx
        g = g_idx.long()
        dense[name] = (q.double() - z[g].double()) * s[g].double()
    cfg = model.config
    qc = {
        "quant_method": "gptq", "bits": 4, "group_size": group_size, "sym": sym, "desc_act": desc_act,
        "checkpoint_format": "gptq_v2" if version == 2 else "gptq", "true_sequential": True, **(extra_config or {}),
    }
    if config_file == "config.json":
        cfg.quantization_config = qc
        save_dir(path, cfg, state, shards=shards)
        del cfg.quantization_config
    else:
        save_dir(path, cfg, state, shards=shards)
        with open(os.path.join(path, config_file), "w") as f:
            json.dump(qc, f)
    return dense


def write_awq(model, path, *, group_size=64, zero_point=True, seed=0, modules_to_not_convert=None):
    """An AutoAWQ GEMM directory (documented layout, interleaved nibbles). Returns {name: float64 [K, N]}."""
    state = _dense_state(model)
    dense = {}
    skip = modules_to_not_convert or []
    for i, (name, m) in enumerate(n for n in model.named_modules() if n[0].endswith(LINEAR_SUFFIXES)):
        if any(s in name.split(".") for s in skip):
            continue
        K, N = m.in_features, m.out_features
        q, z, s = _random_facts(K, N, group_size, sym=not zero_point, seed=seed + i)
        del state[f"{name}.weight"]
        state[f"{name}.qweight"] = pack_along_cols(q, AWQ_ORDER)
        if zero_point:
            state[f"{name}.qzeros"] = pack_along_cols(z, AWQ_ORDER)
        state[f"{name}.scales"] = s
        g = torch.arange(K) // group_size
        dense[name] = (q.double() - z[g].double()) * s[g].double()
    cfg = model.config
    cfg.quantization_config = {
        "quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": zero_point, "version": "gemm",
        "modules_to_not_convert": modules_to_not_convert,
    }
    save_dir(path, cfg, state)
    del cfg.quantization_config
    return dense


def edit_config(path: str, fn) -> None:
    """Apply fn to config.json's dict in place (for the error tests)."""
    fn_path = os.path.join(path, "config.json")
    with open(fn_path) as f:
        data = json.load(f)
    fn(data)
    with open(fn_path, "w") as f:
        json.dump(data, f)


def drop_tensors(path: str, pred) -> None:
    """Remove the tensors whose names satisfy pred from a single-file directory."""
    from safetensors.torch import load_file, save_file

    fn = os.path.join(path, "model.safetensors")
    state = load_file(fn)
    save_file({k: v for k, v in state.items() if not pred(k)}, fn)


def dense_reference(model, weights: Dict[str, torch.Tensor], *, kn: bool, dtype=torch.float32):
    """A copy of the dense model whose listed linears hold the given weights ([K, N] if kn else [N, K])."""
    import copy

    ref = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        for name, w in weights.items():
            lin = ref.get_submodule(name)
            lin.weight.copy_((w.t() if kn else w).to(dtype))
    return ref
