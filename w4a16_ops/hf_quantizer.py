"""transformers integration: an HfQuantizer that loads quantized checkpoints into W4A16Linear.

    import w4a16_ops.hf_quantizer as w4a16_hf
    w4a16_hf.enable()                                   # compressed-tensors checkpoints -> W4A16Linear
    model = AutoModelForCausalLM.from_pretrained(path)  # transformers' own loader, our layers

Importing this module registers the quantization method "w4a16_ops" through transformers' own hooks
(``register_quantization_config`` / ``register_quantizer``): a directory whose config.json says
``"quant_method": "w4a16_ops"`` (what ``save_pretrained`` writes after loading through here) loads
with plain ``AutoModelForCausalLM.from_pretrained``. ``enable()`` additionally routes the
compressed-tensors method (by default; gptq / awq on request) to the same quantizer, in place of
transformers' own (which decompresses W4A16 to 16-bit at load); ``disable()`` restores it.

How it loads: before the weights, each linear the plan (w4a16_ops.pretrained.plan_layers) quantizes
is replaced by a placeholder on the meta device whose buffers carry the checkpoint's tensor names,
shapes and dtypes (read from the safetensors headers), so transformers' loader fills them as stored
(4-bit words, scales in their own dtype; nothing 16-bit the size of a weight). After loading, every
placeholder goes through its converter into a W4A16Linear, and the config's quantization_config
becomes this package's format so the model saves and reloads without conversion.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, Iterable, Optional

import torch
from torch import nn

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .pretrained import QUANT_METHOD, LayerPlan, plan_layers, w4a16_quantization_config

__all__ = ["W4A16Config", "W4A16HfQuantizer", "disable", "enable"]


class W4A16Config(QuantizationConfigMixin):
    """quantization_config of quant_method "w4a16_ops".

    Either this package's own format (format_version, layers: {name: {group_size, symmetric,
    act_order}}) or, with ``source``, another format's quantization_config (compressed-tensors,
    gptq, awq) that the quantizer converts at load (what w4a16_ops.from_pretrained passes).
    """

    def __init__(self, format_version: Optional[int] = None, layers: Optional[Dict[str, Any]] = None,
                 source: Optional[Dict[str, Any]] = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.layers = layers
        self.source = source

    def plan_config(self) -> Dict[str, Any]:
        if self.source is not None:
            return dict(self.source)
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version, "layers": self.layers or {}}

    def to_dict(self) -> Dict[str, Any]:
        out = {"quant_method": QUANT_METHOD}
        if self.source is not None:
            out["source"] = self.source
        else:
            out.update(format_version=self.format_version, layers=self.layers or {})
        return out


class _CheckpointLinear(nn.Module):
    """Placeholder for one quantized linear while transformers loads: buffers named and shaped like
    the checkpoint's tensors (on the meta device until loaded)."""

    def __init__(self, plan: LayerPlan, dtypes: Dict[str, torch.dtype]) -> None:
        super().__init__()
        self.plan = plan
        for name, (shape, kind, required) in plan.tensors.items():
            dtype = dtypes.get(name)
            if dtype is None:
                if not required:
                    continue  # optional and not in the checkpoint
                dtype = torch.int32 if kind == "int32" else torch.int64 if kind == "int" else torch.float16
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device="meta"))

    def loaded(self) -> Dict[str, torch.Tensor]:
        # transformers flags what it loaded; a missing key is moved off meta as an empty tensor instead.
        return {n: t for n, t in self._buffers.items()
                if t is not None and t.device.type != "meta" and getattr(t, "_is_hf_initialized", False)}


def _header_dtypes(files: Optional[Iterable[str]]) -> Optional[Dict[str, torch.dtype]]:
    """{tensor name: dtype} from the safetensors headers (no tensor data is read)."""
    if not files:
        return None
    from safetensors import safe_open

    out = {}
    for fn in files:
        if not str(fn).endswith(".safetensors"):
            return None
        with safe_open(fn, framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_slice(k).get_dtype()
    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
             "I32": torch.int32, "I64": torch.int64, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}
    return {k: names.get(v, torch.float32) for k, v in out.items()}


class W4A16HfQuantizer(HfQuantizer):
    """Loads compressed-tensors pack-quantized, GPTQ, AWQ and w4a16_ops checkpoints into W4A16Linear."""

    requires_calibration = True  # pre-quantized checkpoints only
    quantization_config: Any

    def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._dtype = None
        self.plans: Dict[str, LayerPlan] = {}

    def _plan_config(self) -> Dict[str, Any]:
        qc = self.quantization_config
        if isinstance(qc, W4A16Config):
            return qc.plan_config()
        return dict(qc) if isinstance(qc, dict) else qc.to_dict()

    def preprocess_model(self, model, dtype=None, **kwargs):
        self._dtype = dtype if isinstance(dtype, torch.dtype) else None
        return super().preprocess_model(model, dtype=dtype, **kwargs)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        dtypes = _header_dtypes(checkpoint_files)
        prefix = getattr(model, "base_model_prefix", "")
        if dtypes is not None and prefix:
            model_keys = set(model.state_dict().keys())
            # A checkpoint of the base model lacks the task model's prefix (transformers adds it).
            dtypes = {(f"{prefix}.{k}" if k not in model_keys and f"{prefix}.{k}" in model_keys else k): v
                      for k, v in dtypes.items()}
        self.plans = plan_layers(model, self._plan_config(), None if dtypes is None else dtypes.keys())
        for name, plan in self.plans.items():
            mine = {n: dtypes[f"{name}.{n}"] for n in plan.tensors if dtypes and f"{name}.{n}" in dtypes}
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _CheckpointLinear(plan, mine))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        scale_dtype = self._dtype if self._dtype in (torch.float16, torch.bfloat16) else None
        for name, mod in list(model.named_modules()):
            if not isinstance(mod, _CheckpointLinear):
                continue
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            # build() checks every tensor and names the layer and what it misses.
            setattr(parent, child, mod.plan.build(mod.loaded(), scale_dtype))
        model.config.quantization_config = W4A16Config(**{
            k: v for k, v in w4a16_quantization_config(model).items() if k != "quant_method"})
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False  # the checkpoint is already quantized: nothing is quantized at load

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(W4A16Config)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(W4A16HfQuantizer)


_lock = threading.Lock()
_replaced: Dict[str, type] = {}
_ROUTABLE = ("compressed-tensors", "gptq", "awq")


def enable(methods: Iterable[str] = ("compressed-tensors",)) -> None:
    """Make transformers' from_pretrained load checkpoints of these quant methods with this package's
    quantizer (W4A16Linear layers) instead of its own. Idempotent; undo with disable()."""
    methods = [methods] if isinstance(methods, str) else list(methods)
    for m in methods:
        if m not in _ROUTABLE:
            raise ValueError(f"enable: methods must be among {list(_ROUTABLE)}, got {m!r}")
    with _lock:
        for m in methods:
            if m not in _replaced:
                _replaced[m] = AUTO_QUANTIZER_MAPPING[m]
                AUTO_QUANTIZER_MAPPING[m] = W4A16HfQuantizer


def disable() -> None:
    """Give the methods enable() routed back to transformers' own quantizers."""
    with _lock:
        for m, cls in _replaced.items():
            AUTO_QUANTIZER_MAPPING[m] = cls
        _replaced.clear()
