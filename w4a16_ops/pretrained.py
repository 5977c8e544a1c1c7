"""Quantized checkpoint directories -> transformers models whose quantized linears are W4A16Linear.

    model = w4a16_ops.from_pretrained("path/to/checkpoint", dtype=torch.float16, device="cuda")

A checkpoint directory holds config.json (with a ``quantization_config``), one or more *.safetensors
shards and, when sharded, model.safetensors.index.json. ``from_pretrained`` builds the model class
config.json names through transformers' own loader (meta-device skeleton, shard-by-shard loading,
tied weights) with this package's quantizer (w4a16_ops.hf_quantizer) plugged in for the call:
before loading, each quantized linear becomes a placeholder whose buffers have the checkpoint's
tensor names, shapes and dtypes, so the packed tensors load as stored; after loading, each goes
through its converter (w4a16_ops.converters) into a W4A16Linear. No 16-bit copy of a quantized
weight is ever made; the other tensors load in the model's dtype.

Formats (quantization_config.quant_method):
    compressed-tensors  format "pack-quantized", 4-bit int weights, strategy group or channel,
                        symmetric or not, no activation quantization; config_groups' targets and
                        the ignore list decide which linears are quantized (as compressed-tensors does).
    gptq                bits 4, checkpoint_format gptq (v1) / gptq_v2, sym, desc_act (g_idx reorder).
    awq                 bits 4, version gemm, zero_point.
    w4a16_ops           this package's own packed format (what ``model.save_pretrained`` writes after
                        from_pretrained: the loaded model's config says so, and it reloads without
                        any conversion).

The plan (which linear is quantized, with what) comes from the config and is checked against the
checkpoint's tensor names before anything is loaded. A layer that cannot be served (8-bit, another
format, activation quantization, a shape the packed format refuses, a tensor missing, such as the
zero points of an asymmetric layer) raises a ValueError naming the layer, what was expected and
what was found. Layers the config leaves out (ignore list, modules_to_not_convert, not targeted) stay
16-bit nn.Linear, loaded from their ``weight``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .format import FORMAT_VERSION, SUPPORTED_GROUP_SIZES, PackedW4A16, qweight_shape, zeros_shape
from .nn import W4A16Linear

__all__ = ["LayerPlan", "from_pretrained", "plan_layers", "w4a16_quantization_config"]

QUANT_METHOD = "w4a16_ops"  # the quant_method of this package's own format in config.json

# Tensor-name suffixes that only exist in quantized layers: one of these on a layer the plan keeps
# 16-bit means the config and the checkpoint disagree.
_QUANTIZED_SUFFIXES = {
    "weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx",
    "qweight", "qzeros", "scales", "g_idx", "zeros", "perm",
}
# The unambiguous ones: on a module that is not a planned linear (an embedding, fused MoE experts, ...)
# they mean weights this package would leave unloaded.
_PACKED_SUFFIXES = {"weight_packed", "weight_zero_point", "weight_shape", "weight_g_idx", "qweight", "qzeros"}


def _fail(msg: str) -> None:
    raise ValueError(f"from_pretrained: {msg}")


# ---------------------------------------------------------------------------------------------
# The plan: which linear is quantized, in which format, with which options


@dataclass
class LayerPlan:
    """One quantized linear: its checkpoint format, shape and what its tensors must look like.

    ``tensors`` maps each checkpoint tensor name (suffix after the layer name) to (shape, kind,
    required); kind is "int32", "int" or "float". ``build`` turns the loaded tensors into a W4A16Linear.
    """

    name: str
    method: str  # compressed-tensors | gptq | awq | w4a16_ops
    in_features: int
    out_features: int
    group_size: int
    symmetric: bool
    bias: bool
    options: Dict[str, Any] = field(default_factory=dict)
    tensors: Dict[str, Tuple[Tuple[int, ...], str, bool]] = field(default_factory=dict)

    def check(self, name: str, t: Tensor) -> None:
        shape, kind, _ = self.tensors[name]
        if kind == "int32" and t.dtype != torch.int32:
            _fail(f"layer {self.name}: {name} must be torch.int32, got {t.dtype}")
        if kind == "int" and (t.dtype.is_floating_point or t.dtype == torch.bool):
            _fail(f"layer {self.name}: {name} must be an integer tensor, got {t.dtype}")
        if kind == "float" and not t.dtype.is_floating_point:
            _fail(f"layer {self.name}: {name} must be floating point, got {t.dtype}")
        if tuple(t.shape) != tuple(shape):
            _fail(
                f"layer {self.name} ({self.method}, K = {self.in_features}, N = {self.out_features}, "
                f"G = {self.group_size}, symmetric = {self.symmetric}): {name} must have shape {list(shape)}, "
                f"got {list(t.shape)}"
            )

    def missing(self, have: Iterable[str]) -> List[str]:
        have = set(have)
        return [n for n, (_, _, req) in self.tensors.items() if req and n not in have]

    def build(self, tensors: Mapping[str, Tensor], dtype: Optional[torch.dtype] = None) -> W4A16Linear:
        """The W4A16Linear for this layer from its checkpoint tensors. dtype: the wanted scales'
        (= compute) dtype, taken only where every scale converts exactly; else, and with None, the
        checkpoint's own if 16-bit (float32 scales become float16, the op's most precise dtype)."""
        for n, t in tensors.items():
            if n in self.tensors:
                self.check(n, t)
        lost = self.missing(tensors)
        if lost:
            _fail(
                f"layer {self.name} ({self.method}, symmetric = {self.symmetric}) needs "
                f"{', '.join(self.name + '.' + n for n in lost)}, the checkpoint has none"
            )
        shape = tensors.get("weight_shape")
        if shape is not None and [int(v) for v in shape.tolist()] != [self.out_features, self.in_features]:
            _fail(f"layer {self.name}: weight_shape must be [N, K] = {[self.out_features, self.in_features]} "
                  f"(the model's linear), the checkpoint says {shape.tolist()}")
        bias = tensors.get("bias")
        s = tensors.get("weight_scale", tensors.get("scales"))
        if dtype is not None and s is not None and s.dtype != dtype:
            # bfloat16 <-> float16 loses bits or range for some values: then keep the checkpoint's (the layer
            # casts activations around the op instead).
            if s.dtype in (torch.float16, torch.bfloat16) and not torch.equal(s.to(dtype).to(s.dtype), s):
                dtype = None
        try:
            if self.method == "w4a16_ops":
                scales = tensors["scales"] if dtype is None else tensors["scales"].to(dtype)
                packed = PackedW4A16(tensors["qweight"], scales, tensors.get("zeros"))
                return W4A16Linear.from_packed(packed, self.in_features, bias=bias, perm=tensors.get("perm"))
            if self.method == "compressed-tensors":
                return W4A16Linear.from_compressed_tensors(
                    tensors["weight_packed"], tensors["weight_scale"], tensors.get("weight_zero_point"),
                    [self.out_features, self.in_features], bias=bias,
                    weight_g_idx=tensors.get("weight_g_idx"), symmetric=self.symmetric,
                    group_size=self.group_size, dtype=dtype,
                )
            if self.method == "gptq":
                return W4A16Linear.from_gptq(
                    tensors["qweight"], tensors.get("qzeros"), tensors["scales"], tensors.get("g_idx"), bias=bias,
                    checkpoint_format=self.options["checkpoint_format"], symmetric=self.symmetric,
                    group_size=self.group_size, dtype=dtype,
                )
            if self.method == "awq":
                return W4A16Linear.from_awq(
                    tensors["qweight"], tensors.get("qzeros"), tensors["scales"],
                    bias=bias, symmetric=self.symmetric, group_size=self.group_size, dtype=dtype,
                )
        except ValueError as e:
            raise ValueError(f"from_pretrained: layer {self.name}: {e}") from e
        raise AssertionError(self.method)


def _linears(model: nn.Module) -> Dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _matches(name: str, module: nn.Module, targets: Iterable[str]) -> bool:
    """compressed-tensors' rule: "re:<regex>" matched from the start of the name, else an exact
    module name or a class name anywhere in the module's class hierarchy."""
    classes = {c.__name__ for c in type(module).__mro__}
    for t in targets:
        if t.startswith("re:"):
            if re.match(t[3:], name):
                return True
        elif t == name or t in classes:
            return True
    return False


def _group_size(where: str, K: int, group_size: Any) -> int:
    if group_size is None or group_size in (-1, 0):
        return K
    G = int(group_size)
    if G not in SUPPORTED_GROUP_SIZES and G != K:
        _fail(f"layer {where}: group_size must be 32, 64, 128, 256 or -1 (channelwise), the config says {group_size}")
    if K % G:
        _fail(f"layer {where}: in_features K = {K} must be a multiple of group_size = {G} (whole groups)")
    return G


def _check_N(where: str, N: int) -> None:
    if N % 8:
        _fail(f"layer {where}: out_features must be a multiple of 8 for W4A16, got {N}")


def _plan_compressed_tensors(linears, cfg) -> Dict[str, LayerPlan]:
    global_fmt = cfg.get("format")
    groups = cfg.get("config_groups") or {}
    ignore = list(cfg.get("ignore") or [])
    plans = {}
    for name, mod in linears.items():
        if _matches(name, mod, ignore):
            continue
        hit = [(g, s) for g, s in groups.items() if _matches(name, mod, s.get("targets") or [])]
        if not hit:
            continue  # not targeted: compressed-tensors leaves it dense
        if len(hit) > 1:
            _fail(f"layer {name} matches several config_groups ({', '.join(g for g, _ in hit)}); expected one")
        gname, scheme = hit[0]
        w = scheme.get("weights")
        where = f"{name} (config group {gname})"
        fmt = scheme.get("format") or global_fmt
        if fmt != "pack-quantized":
            _fail(f"layer {where}: format must be 'pack-quantized' (int4 W4A16), the config says {fmt!r}")
        if scheme.get("input_activations") or scheme.get("output_activations"):
            _fail(f"layer {where}: activation quantization is not W4A16 (expected input_activations = null)")
        if not w:
            _fail(f"layer {where}: the scheme has no weights quantization")
        if w.get("num_bits") != 4 or w.get("type", "int") != "int":
            _fail(f"layer {where}: weights must be 4-bit int, the config says {w.get('num_bits')}-bit {w.get('type')}")
        if w.get("dynamic"):
            _fail(f"layer {where}: dynamic weight quantization is not a stored checkpoint (expected dynamic = false)")
        strategy = w.get("strategy")
        K, N = mod.in_features, mod.out_features
        if strategy == "group":
            G = _group_size(where, K, w.get("group_size"))
        elif strategy == "channel":
            G = K
        else:
            _fail(f"layer {where}: strategy must be 'group' or 'channel', the config says {strategy!r}")
        _check_N(where, N)
        sym = bool(w.get("symmetric", True))
        tensors = {
            "weight_packed": ((N, -(-K // 8)), "int32", True),
            "weight_scale": ((N, K // G), "float", True),
            "weight_shape": ((2,), "int", True),
            "weight_zero_point": ((-(-N // 8), K // G), "int32", not sym),
            "weight_g_idx": ((K,), "int", w.get("actorder") == "group"),
        }
        if mod.bias is not None:
            tensors["bias"] = ((N,), "float", True)
        plans[name] = LayerPlan(name, "compressed-tensors", K, N, G, sym, mod.bias is not None, {}, tensors)
    return plans


def _gptq_rules(cfg):
    """GPTQModel's per-module overrides: {"-:regex": {}} keeps a module dense, "+:regex" or a bare
    regex overrides bits / group_size / sym / desc_act for the modules it matches."""
    rules = []
    for pattern, override in (cfg.get("dynamic") or {}).items():
        if pattern.startswith("-:"):
            rules.append((False, re.compile(pattern[2:]), {}))
        else:
            rules.append((True, re.compile(pattern[2:] if pattern.startswith("+:") else pattern), dict(override or {})))
    return rules


def _plan_gptq(linears, cfg, keys) -> Dict[str, LayerPlan]:
    # GPTQModel writes "format" where AutoGPTQ / transformers write "checkpoint_format"; neither = v1.
    fmt = str(cfg.get("checkpoint_format") or cfg.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2", "gptq_v1"):
        _fail(f"GPTQ checkpoint_format must be 'gptq' (v1) or 'gptq_v2', the config says {fmt!r}")
    skip = list(cfg.get("modules_to_not_convert") or [])
    rules = _gptq_rules(cfg)
    plans = {}
    for name, mod in linears.items():
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        opts = dict(cfg)
        dense = False
        for keep, rx, override in rules:
            if rx.match(name):
                if not keep:
                    dense = True
                opts.update(override)
        if keys is not None:
            # Which linears GPTQ quantized (block modules, never lm_head by default) is the checkpoint's to say.
            if f"{name}.qweight" not in keys:
                continue
        elif dense or name.split(".")[-1] == "lm_head":
            continue
        if dense:
            _fail(f"layer {name}: the config's dynamic rules keep it dense, the checkpoint has {name}.qweight")
        if opts.get("bits", 4) != 4:
            _fail(f"layer {name}: only 4-bit GPTQ is W4A16, the config says bits = {opts.get('bits')}")
        K, N = mod.in_features, mod.out_features
        G = _group_size(name, K, opts.get("group_size", 128))
        _check_N(name, N)
        if K % 8:
            _fail(f"layer {name}: GPTQ packs 8 rows of K per word, in_features = {K} is not a multiple of 8")
        sym = bool(opts.get("sym", True))
        tensors = {
            "qweight": ((K // 8, N), "int32", True),
            "qzeros": ((K // G, N // 8), "int32", not sym),
            "scales": ((K // G, N), "float", True),
            "g_idx": ((K,), "int", bool(opts.get("desc_act", False))),
        }
        if mod.bias is not None:
            tensors["bias"] = ((N,), "float", True)
        plans[name] = LayerPlan(name, "gptq", K, N, G, sym, mod.bias is not None,
                                {"checkpoint_format": "gptq_v2" if fmt == "gptq_v2" else "gptq"}, tensors)
    return plans


def _plan_awq(linears, cfg, keys) -> Dict[str, LayerPlan]:
    version = str(cfg.get("version", "gemm")).lower()
    if version != "gemm":
        _fail(f"AWQ version must be 'gemm' (the only layout converted), the config says {cfg.get('version')!r}")
    if cfg.get("bits", cfg.get("w_bit", 4)) != 4:
        _fail(f"only 4-bit AWQ is W4A16, the config says bits = {cfg.get('bits', cfg.get('w_bit'))}")
    skip = list(cfg.get("modules_to_not_convert") or [])
    sym = not bool(cfg.get("zero_point", True))
    plans = {}
    for name, mod in linears.items():
        if any(name == s or name.endswith("." + s) or s in name.split(".") for s in skip):
            continue
        if keys is not None and f"{name}.qweight" not in keys:
            continue
        if keys is None and name.split(".")[-1] == "lm_head":
            continue
        K, N = mod.in_features, mod.out_features
        G = _group_size(name, K, cfg.get("group_size", cfg.get("q_group_size", 128)))
        _check_N(name, N)
        tensors = {
            "qweight": ((K, N // 8), "int32", True),
            "qzeros": ((K // G, N // 8), "int32", not sym),
            "scales": ((K // G, N), "float", True),
        }
        if mod.bias is not None:
            tensors["bias"] = ((N,), "float", True)
        plans[name] = LayerPlan(name, "awq", K, N, G, sym, mod.bias is not None, {}, tensors)
    return plans


def _plan_own(linears, cfg) -> Dict[str, LayerPlan]:
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        _fail(f"{QUANT_METHOD} format_version must be {FORMAT_VERSION} (this package), the config says {version!r}")
    plans = {}
    for name, spec in (cfg.get("layers") or {}).items():
        mod = linears.get(name)
        if mod is None:
            _fail(f"the config lists layer {name}, which is not an nn.Linear of this model")
        K, N = mod.in_features, mod.out_features
        G = _group_size(name, K, spec["group_size"])
        sym = bool(spec["symmetric"])
        tensors = {
            "qweight": (qweight_shape(K, N), "int32", True),
            "scales": ((K // G, N), "float", True),
            "zeros": (zeros_shape(K // G, N), "int32", not sym),
            "perm": ((K,), "int", bool(spec.get("act_order"))),
        }
        if mod.bias is not None:
            tensors["bias"] = ((N,), "float", True)
        plans[name] = LayerPlan(name, QUANT_METHOD, K, N, G, sym, mod.bias is not None, {}, tensors)
    return plans


def plan_layers(model: nn.Module, quantization_config: Mapping[str, Any],
                keys: Optional[Iterable[str]] = None) -> Dict[str, LayerPlan]:
    """{linear name: LayerPlan} for every linear the config quantizes (the others stay 16-bit).

    keys: the checkpoint's tensor names, when known: GPTQ / AWQ configs do not list their layers, so
    the checkpoint decides which linears are quantized; every format is cross-checked against them.
    """
    if not isinstance(quantization_config, Mapping):
        _fail(f"quantization_config must be a dict, got {type(quantization_config).__name__}")
    cfg = dict(quantization_config)
    method = cfg.get("quant_method")
    linears = _linears(model)
    keyset = set(keys) if keys is not None else None
    if method == "compressed-tensors":
        plans = _plan_compressed_tensors(linears, cfg)
    elif method == "gptq":
        plans = _plan_gptq(linears, cfg, keyset)
    elif method == "awq":
        plans = _plan_awq(linears, cfg, keyset)
    elif method == QUANT_METHOD:
        plans = _plan_own(linears, cfg)
    else:
        _fail(
            f"quantization_config.quant_method must be 'compressed-tensors', 'gptq', 'awq' or "
            f"'{QUANT_METHOD}', got {method!r}"
        )
    if keyset is not None:
        modules = dict(model.named_modules())
        for key in sorted(keyset):
            owner, _, leaf = key.rpartition(".")
            if leaf in _PACKED_SUFFIXES and owner not in linears:
                kind = type(modules[owner]).__name__ if owner in modules else "no module of this model"
                _fail(
                    f"the checkpoint holds quantized tensor {key}, but {owner} is {kind}, not an nn.Linear "
                    f"(only linear layers convert to W4A16)"
                )
        for name in linears:
            own = {k[len(name) + 1:] for k in keyset if k.startswith(name + ".") and "." not in k[len(name) + 1:]}
            if name in plans:
                lost = plans[name].missing(own)
                if lost:
                    _fail(
                        f"layer {name}: the config says {method} (symmetric = {plans[name].symmetric}), so the "
                        f"checkpoint must hold {', '.join(name + '.' + n for n in lost)}; it has "
                        f"{sorted(name + '.' + n for n in own) or 'nothing'}"
                    )
            elif own & _QUANTIZED_SUFFIXES:
                _fail(
                    f"layer {name}: the config keeps it 16-bit (ignored / not targeted), but the checkpoint "
                    f"holds quantized tensors {sorted(name + '.' + n for n in own & _QUANTIZED_SUFFIXES)}"
                )
    return plans


def w4a16_quantization_config(model: nn.Module) -> Dict[str, Any]:
    """The config.json quantization_config describing the W4A16Linear layers of model (this
    package's own format); save_pretrained writes it, from_pretrained reads it back."""
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, W4A16Linear):
            layers[name] = {
                "group_size": m.group_size if m.group_size != m.in_features else -1,
                "symmetric": m.symmetric,
                "act_order": m.act_order,
            }
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "layers": layers}


# ---------------------------------------------------------------------------------------------
# The checkpoint directory


def read_quantization_config(path: str, config: Any = None) -> Optional[Dict[str, Any]]:
    """config.json's quantization_config (or an old GPTQ directory's quantize_config.json)."""
    qcfg = getattr(config, "quantization_config", None) if config is not None else None
    if qcfg is None:
        with open(os.path.join(path, "config.json")) as f:
            qcfg = json.load(f).get("quantization_config")
    if qcfg is None and os.path.exists(os.path.join(path, "quantize_config.json")):
        with open(os.path.join(path, "quantize_config.json")) as f:
            qcfg = json.load(f)
        qcfg.setdefault("quant_method", "gptq")
    if qcfg is not None and not isinstance(qcfg, Mapping):
        qcfg = qcfg.to_dict()
    return dict(qcfg) if qcfg is not None else None


def _model_class(config: Any):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def from_pretrained(
    path: Union[str, os.PathLike],
    *,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    **kwargs: Any,
) -> nn.Module:
    """A transformers model from a quantized checkpoint directory, its quantized linears W4A16Linear.

    path    a local directory: config.json (with quantization_config, or an old GPTQ directory's
            quantize_config.json) + *.safetensors shards.
    dtype   dtype of the model's other weights (embeddings, norms, 16-bit linears) and, when 16-bit,
            of the W4A16 scales where they convert exactly (else they keep the checkpoint's dtype);
            default: transformers' "auto" (config.json's dtype). With a float32 model the scales stay
            16-bit and W4A16Linear casts activations around the op.
    device  where the weights go (transformers' device_map: "cpu", "cuda:0", a torch.device, ...).
    kwargs  passed to the model class's from_pretrained (e.g. attn_implementation="eager").

    The model class is the one config.json names. Loading is transformers' own (shard by shard,
    tied weights, key renamings) with this package's quantizer (w4a16_ops.hf_quantizer) plugged in
    for this call only. The model is in eval mode; model.config.quantization_config describes the
    W4A16 layers in this package's format, so model.save_pretrained(dir) writes a checkpoint that
    reloads without conversion (here or through transformers after importing w4a16_ops.hf_quantizer).
    Raises ValueError for anything it cannot load exactly (see the module docstring).
    """
    try:
        import transformers

        from .hf_quantizer import W4A16Config
    except ImportError as e:
        raise ImportError(f"from_pretrained needs transformers and safetensors (pip install 'w4a16_ops[hf]'): {e}") from e

    path = os.fspath(path)
    if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
        _fail(f"path must be a local checkpoint directory with a config.json (e.g. from "
              f"huggingface_hub.snapshot_download), got {path!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"from_pretrained: dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    config = transformers.AutoConfig.from_pretrained(path)
    qcfg = read_quantization_config(path, config)
    if qcfg is None:
        _fail(
            f"{path} has no quantization_config in config.json (not a quantized checkpoint); load it with "
            f"transformers and quantize with w4a16_ops.swap_linears"
        )
    method = qcfg.get("quant_method")
    if method not in ("compressed-tensors", "gptq", "awq", QUANT_METHOD):
        _fail(f"quantization_config.quant_method must be 'compressed-tensors', 'gptq', 'awq' or "
              f"'{QUANT_METHOD}', got {method!r}")
    wrapped = W4A16Config(**qcfg) if method == QUANT_METHOD else W4A16Config(source=qcfg)
    config.quantization_config = wrapped.to_dict()  # our quantizer for this call, whatever the method
    cls = _model_class(config)
    if device is not None:
        kwargs["device_map"] = device
    model = cls.from_pretrained(path, config=config, dtype=dtype if dtype is not None else "auto", **kwargs)
    model.eval()
    return model
