"""w4a16_ops.from_pretrained on checkpoint directories: compressed-tensors written by the library
itself, GPTQ (v1 / v2, sym / asym, act-order) and AWQ GEMM from their documented layouts, and this
package's own format through save_pretrained. Per layer, the loaded W4A16Linear must dequantize to
exactly the checkpoint's weight and its op output must match the float64 reference; per model, the
logits must match a dense model holding those weights."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import w4a16_ops
from w4a16_ops import W4A16Linear, from_pretrained

from checkpoints import (
    LINEAR_SUFFIXES,
    dense_reference,
    drop_tensors,
    edit_config,
    tiny_llama,
    write_awq,
    write_compressed_tensors,
    write_gptq,
)
from helpers import TOLERANCE, Case, assert_close_to_reference, rel_err

_NEEDED = ("transformers", "safetensors", "compressed_tensors")
_HAVE = all(importlib.util.find_spec(m) for m in _NEEDED)
# CI installs them (requirements-ci.txt) and must not skip; elsewhere the module skips.
pytestmark = pytest.mark.skipif(not (_HAVE or os.environ.get("CI")), reason=f"needs {', '.join(_NEEDED)}")

# Model-level bound: logits of the W4A16 model (fp16 activations into the op) vs the dense float32
# model holding the same dequantized weights. Measured 1.1e-3 .. 2.5e-3 on these 2-layer models;
# per-layer exactness is checked separately against helpers.TOLERANCE.
MODEL_TOL = 1e-2


def quantized_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, W4A16Linear)}


def layer_weight_kn(layer: W4A16Linear) -> torch.Tensor:
    """float64 [K, N] in the checkpoint's row order (act-order permutation undone)."""
    w = w4a16_ops.dequantize(*layer.packed, layer.in_features, torch.float64)
    if layer.perm is None:
        return w
    out = torch.empty_like(w)
    out[layer.perm] = w
    return out


def check_layer_op(layer: W4A16Linear, w_kn: torch.Tensor, what: str) -> None:
    x = torch.randn(3, layer.in_features).to(layer.scales.dtype)
    out = layer(x)
    xin = x.index_select(-1, layer.perm) if layer.perm is not None else x
    ref_case = Case(xin, *layer.packed)
    if layer.bias is None:
        assert_close_to_reference(out, ref_case, what)
    ref = x.double() @ w_kn
    if layer.bias is not None:
        ref = ref + layer.bias.double()
    assert rel_err(out, ref) <= TOLERANCE[x.dtype], f"{what}: op vs checkpoint float64 reference"


def check_logits(model, ref, what: str) -> float:
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        got = model(ids).logits.double()
        want = ref(ids).logits.double()
    err = rel_err(got, want)
    print(f"{what}: logits rel. error vs dense reference {err:.2e}")
    assert err <= MODEL_TOL, f"{what}: logits rel. error {err:.3e}"
    return err


class FloatWeightSpy(TorchDispatchMode):
    """Records every floating-point op result (off the meta device) shaped like one of the given
    [N, K] / [K, N] weights."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes = {tuple(s) for s in shapes} | {tuple(reversed(s)) for s in shapes}
        self.hits = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (isinstance(t, torch.Tensor) and t.device.type != "meta" and t.dtype.is_floating_point
                    and tuple(t.shape) in self.shapes):
                self.hits.append((str(func), tuple(t.shape)))
        return out


# ---------------------------------------------------------------------------------------------
# compressed-tensors, written by the library


@pytest.mark.parametrize(
    "sym,strategy,dtype,shards,bias",
    [
        (True, "group", torch.float16, 1, False),
        (False, "group", torch.bfloat16, 3, True),
        (True, "channel", torch.bfloat16, 1, True),
        (False, "channel", torch.float16, 2, False),
    ],
)
def test_compressed_tensors_directory(tmp_path, sym, strategy, dtype, shards, bias):
    base = tiny_llama(dtype=dtype, bias=bias)
    dense = copy.deepcopy(base)
    theirs = write_compressed_tensors(base, str(tmp_path), symmetric=sym, strategy=strategy, shards=shards)
    # Quantized-layer shapes: no floating-point tensor of these shapes may appear while loading.
    shapes = [tuple(w.shape) for w in theirs.values()]
    spy = FloatWeightSpy(shapes)
    with spy:
        model = from_pretrained(tmp_path)
    assert spy.hits == [], f"16-bit copies of quantized weights were made: {spy.hits[:4]}"
    layers = quantized_layers(model)
    assert sorted(layers) == sorted(theirs), "every Linear but the ignored lm_head is W4A16"
    assert type(model.lm_head) is torch.nn.Linear and torch.equal(model.lm_head.weight, dense.lm_head.weight)
    for name, layer in layers.items():
        G = layer.in_features if strategy == "channel" else 64
        assert layer.group_size == G and layer.symmetric == sym and (layer.bias is not None) == bias, name
        assert layer.scales.dtype == dtype, "scales keep the checkpoint's dtype"
        # Bit-exact: our float64 dequantization rounded to the scale dtype == the library's decompression.
        w = layer_weight_kn(layer)
        assert torch.equal(w.t().to(theirs[name].dtype), theirs[name]), f"{name}: weight differs from the library's"
        check_layer_op(layer, w, f"ct {strategy} sym={sym} {name}")
    assert model.config.quantization_config.quant_method == "w4a16_ops"
    ref = dense_reference(dense, {n: layer_weight_kn(m) for n, m in layers.items()}, kn=True)
    check_logits(from_pretrained(tmp_path, dtype=torch.float32), ref, f"ct {strategy} sym={sym}")


def test_tied_embeddings_and_dtype(tmp_path):
    base = tiny_llama(dtype=torch.bfloat16, tie=True)
    write_compressed_tensors(base, str(tmp_path), symmetric=True)
    model = from_pretrained(tmp_path, dtype=torch.float16, device="cpu")  # device -> transformers' device_map
    assert model.lm_head.weight is model.model.embed_tokens.weight, "tied output embedding"
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    assert model.model.embed_tokens.weight.dtype == torch.float16
    assert all(m.scales.dtype == torch.float16 for m in quantized_layers(model).values()), "dtype= sets the scales"
    assert not model.training


def test_scales_never_rounded_to_another_dtype(tmp_path):
    # float16 scales do not fit bfloat16 exactly: dtype=bfloat16 keeps them float16 (the layer casts x).
    write_compressed_tensors(tiny_llama(dtype=torch.float16), str(tmp_path), symmetric=False)
    exact = from_pretrained(tmp_path)
    model = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    for name, layer in quantized_layers(model).items():
        assert layer.scales.dtype == torch.float16, name
        assert torch.equal(layer_weight_kn(layer), layer_weight_kn(exact.get_submodule(name))), name
    x = torch.randn(2, 192, dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj(x).dtype == torch.bfloat16


def test_save_pretrained_round_trip(tmp_path):
    base = tiny_llama(dtype=torch.float16, bias=True)
    write_compressed_tensors(base, str(tmp_path / "ct"), symmetric=False)
    model = from_pretrained(tmp_path / "ct")
    model.save_pretrained(tmp_path / "ours")
    again = from_pretrained(tmp_path / "ours")
    a, b = model.state_dict(), again.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ids = torch.randint(0, 512, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


# ---------------------------------------------------------------------------------------------
# GPTQ and AWQ from the documented layouts


@pytest.mark.parametrize("version,sym,desc_act", [(1, True, False), (1, False, True), (2, False, False), (2, True, True)])
def test_gptq_directory(tmp_path, version, sym, desc_act):
    base = tiny_llama(dtype=torch.float16, bias=desc_act)
    weights = write_gptq(base, str(tmp_path), version=version, sym=sym, desc_act=desc_act, shards=2)
    model = from_pretrained(tmp_path)
    layers = quantized_layers(model)
    assert sorted(layers) == sorted(weights)
    for name, layer in layers.items():
        assert layer.symmetric == sym and layer.act_order == desc_act, name
        w = layer_weight_kn(layer)
        assert torch.equal(w, weights[name]), f"{name}: dequantized weight differs from the checkpoint's"
        check_layer_op(layer, w, f"gptq v{version} sym={sym} desc_act={desc_act} {name}")
    check_logits(from_pretrained(tmp_path, dtype=torch.float32), dense_reference(base, weights, kn=True), "gptq")


def test_gptq_dynamic_rules_and_quantize_config_json(tmp_path):
    # GPTQModel's per-module rules: "-:" keeps a module dense, "+:" overrides its group size. And an old
    # AutoGPTQ directory keeps the quantization config in quantize_config.json, not config.json.
    base = tiny_llama()
    dynamic = {r"-:.*\.down_proj": {}, r"+:.*\.o_proj": {"group_size": 32}}
    weights = write_gptq(base, str(tmp_path), version=2, sym=False, desc_act=False, dense_suffixes=("down_proj",),
                         group_sizes={"o_proj": 32}, extra_config={"dynamic": dynamic},
                         config_file="quantize_config.json")
    model = from_pretrained(tmp_path)
    layers = quantized_layers(model)
    assert sorted(layers) == sorted(weights) and not any("down_proj" in n for n in layers)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    for name, layer in layers.items():
        assert layer.group_size == (32 if name.endswith("o_proj") else 64), name
        assert torch.equal(layer_weight_kn(layer), weights[name]), name


def test_gptq_wrong_checkpoint_format_is_an_error(tmp_path):
    base = tiny_llama()
    write_gptq(base, str(tmp_path), version=1, sym=True, desc_act=False)
    edit_config(tmp_path, lambda c: c["quantization_config"].update(checkpoint_format="gptq_v2"))
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.\w+\.\w+_proj: .*zero point"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("zero_point", [True, False])
def test_awq_directory(tmp_path, zero_point):
    base = tiny_llama(dtype=torch.float16)
    weights = write_awq(base, str(tmp_path), zero_point=zero_point, modules_to_not_convert=["down_proj"])
    model = from_pretrained(tmp_path)
    layers = quantized_layers(model)
    assert sorted(layers) == sorted(weights) and all("down_proj" not in n for n in layers)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    for name, layer in layers.items():
        assert layer.symmetric == (not zero_point)
        w = layer_weight_kn(layer)
        assert torch.equal(w, weights[name]), name
        check_layer_op(layer, w, f"awq {name}")


# ---------------------------------------------------------------------------------------------
# What must not load


@pytest.fixture
def ct_dir(tmp_path):
    write_compressed_tensors(tiny_llama(), str(tmp_path), symmetric=False)
    return tmp_path


def test_missing_zero_points_are_an_error(ct_dir):
    drop_tensors(ct_dir, lambda k: k == "model.layers.1.mlp.up_proj.weight_zero_point")
    with pytest.raises(ValueError, match=r"layer model\.layers\.1\.mlp\.up_proj: .*symmetric = False.*"
                                         r"model\.layers\.1\.mlp\.up_proj\.weight_zero_point"):
        from_pretrained(ct_dir)


def test_asymmetric_values_under_a_symmetric_config_are_an_error(ct_dir):
    edit_config(ct_dir, lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(symmetric=True))
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.\w+\.\w+_proj: .*symmetric=True needs every zero point"):
        from_pretrained(ct_dir)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda w, g, q: w.update(num_bits=8), r"layer model\.layers\.0\.self_attn\.q_proj .*: weights must be 4-bit int, the config says 8-bit"),
        (lambda w, g, q: g.update(format="int-quantized"), r"format must be 'pack-quantized'.*'int-quantized'"),
        (lambda w, g, q: g.update(input_activations={"num_bits": 8}), r"activation quantization is not W4A16"),
        (lambda w, g, q: w.update(group_size=128), r"in_features K = 192 must be a multiple of group_size = 128"),
        (lambda w, g, q: w.update(strategy="tensor"), r"strategy must be 'group' or 'channel'.*'tensor'"),
        (lambda w, g, q: q.update(ignore=["lm_head", "re:.*k_proj$"]),
         r"layer model\.layers\.0\.self_attn\.k_proj: the config keeps it 16-bit .* quantized tensors"),
        (lambda w, g, q: q.update(quant_method="bitsandbytes"), r"quant_method must be .*'bitsandbytes'"),
    ],
)
def test_config_errors_name_the_layer(ct_dir, edit, message):
    def apply(c):
        q = c["quantization_config"]
        g = q["config_groups"]["group_0"]
        edit(g["weights"], g, q)

    edit_config(ct_dir, apply)
    with pytest.raises(ValueError, match=message):
        from_pretrained(ct_dir)


def test_quantized_tensors_on_a_non_linear_module_are_an_error(ct_dir):
    # e.g. a config group that targets embeddings or fused MoE experts: they would stay unloaded here.
    from safetensors.torch import load_file, save_file

    fn = os.path.join(ct_dir, "model.safetensors")
    state = load_file(fn)
    state["model.embed_tokens.weight_packed"] = torch.zeros(512, 24, dtype=torch.int32)
    save_file(state, fn)
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight_packed, but model\.embed_tokens is "
                                         r"Embedding, not an nn\.Linear"):
        from_pretrained(ct_dir)


def test_ignored_layer_stays_16_bit(tmp_path):
    base = tiny_llama()
    dense = copy.deepcopy(base)
    write_compressed_tensors(base, str(tmp_path), symmetric=True, ignore=("lm_head", "re:.*down_proj$"))
    model = from_pretrained(tmp_path)
    for i in range(2):
        down = model.model.layers[i].mlp.down_proj
        assert type(down) is torch.nn.Linear and torch.equal(down.weight, dense.model.layers[i].mlp.down_proj.weight)
        assert isinstance(model.model.layers[i].mlp.up_proj, W4A16Linear)


def test_unquantized_and_bad_paths(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="has no quantization_config"):
        from_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="path must be a local checkpoint directory"):
        from_pretrained(tmp_path / "nowhere")


def test_every_linear_suffix_is_known():
    # The fixtures quantize exactly these; a transformers renaming would silently shrink the tests.
    names = {n.rpartition(".")[2] for n, m in tiny_llama().named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == set(LINEAR_SUFFIXES) | {"lm_head"}
