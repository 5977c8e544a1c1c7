"""transformers' own AutoModelForCausalLM.from_pretrained with this package's quantizer: one line
(w4a16_ops.hf_quantizer.enable()) routes compressed-tensors checkpoints to W4A16Linear; directories
saved in this package's format load with no line at all beyond the import."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from w4a16_ops import W4A16Linear, from_pretrained

from checkpoints import tiny_llama, write_awq, write_compressed_tensors, write_gptq

_NEEDED = ("transformers", "safetensors", "compressed_tensors")
_HAVE = all(importlib.util.find_spec(m) for m in _NEEDED)
pytestmark = pytest.mark.skipif(not (_HAVE or os.environ.get("CI")), reason=f"needs {', '.join(_NEEDED)}")


@pytest.fixture
def hf():
    import w4a16_ops.hf_quantizer as hf

    yield hf
    hf.disable()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("sym", [True, False])
def test_auto_model_with_enable(tmp_path, hf, sym):
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer

    write_compressed_tensors(tiny_llama(dtype=torch.bfloat16, bias=True), str(tmp_path), symmetric=sym)
    hf.enable()
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    layers = [n for n, m in model.named_modules() if isinstance(m, W4A16Linear)]
    assert len(layers) == 14 and type(model.lm_head) is torch.nn.Linear
    assert all(m.symmetric == sym for m in model.modules() if isinstance(m, W4A16Linear))
    ours = from_pretrained(tmp_path)
    ids = torch.randint(0, 512, (2, 6))
    assert torch.equal(logits(model, ids), logits(ours, ids)), "same layers as w4a16_ops.from_pretrained"
    hf.disable()
    assert AUTO_QUANTIZER_MAPPING["compressed-tensors"] is CompressedTensorsHfQuantizer
    if sym:  # transformers' own path: dense 16-bit layers (it has no int4 kernel)
        stock = AutoModelForCausalLM.from_pretrained(tmp_path)
        assert not any(isinstance(m, W4A16Linear) for m in stock.modules())


def test_saved_w4a16_directory_loads_with_plain_transformers(tmp_path, hf):
    from transformers import AutoModelForCausalLM

    write_compressed_tensors(tiny_llama(dtype=torch.float16), str(tmp_path / "ct"), symmetric=False)
    model = from_pretrained(tmp_path / "ct")
    model.save_pretrained(tmp_path / "ours")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")  # quant_method "w4a16_ops", registered
    assert sum(isinstance(m, W4A16Linear) for m in again.modules()) == 14
    ids = torch.randint(0, 512, (1, 5))
    assert torch.equal(logits(model, ids), logits(again, ids))


@pytest.mark.parametrize("fmt", ["gptq-v1", "gptq-v2", "awq"])
def test_gptq_and_awq_through_transformers_configs(tmp_path, hf, fmt):
    # transformers parses these configs with its own GPTQConfig / AwqConfig; the plan must read them the same.
    from transformers import AutoModelForCausalLM

    if fmt == "awq":
        write_awq(tiny_llama(), str(tmp_path), modules_to_not_convert=["o_proj"])
    else:
        write_gptq(tiny_llama(), str(tmp_path), version=int(fmt[-1]), sym=False, desc_act=fmt == "gptq-v2")
    hf.enable(["gptq", "awq"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    names = sorted(n for n, m in model.named_modules() if isinstance(m, W4A16Linear))
    assert names == sorted(n for n, m in ours.named_modules() if isinstance(m, W4A16Linear))
    assert len(names) == (12 if fmt == "awq" else 14)
    ids = torch.randint(0, 512, (2, 6))
    assert torch.equal(logits(model, ids), logits(ours, ids))


def test_enable_rejects_unknown_methods(hf):
    with pytest.raises(ValueError, match=r"methods must be among .*got 'bitsandbytes'"):
        hf.enable(["bitsandbytes"])
