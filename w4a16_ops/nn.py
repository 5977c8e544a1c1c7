"""W4A16Linear, a drop-in for nn.Linear with a 4-bit packed weight, and swap_linears, which puts it
into a model in place of every eligible nn.Linear.

    layer = W4A16Linear.from_linear(linear, group_size=128, symmetric=True)
    layer = W4A16Linear.from_gptq(qweight, qzeros, scales, g_idx, bias=bias, quantize_config=cfg)
    report = swap_linears(model, group_size=128); print(report)

The forward is one call of torch.ops.w4a16.gemm (plus x.index_select for act-order checkpoints and
the bias add): the weight stays packed and is never touched per call. Activations of another dtype
than the scales' (e.g. float32 models) are cast to the scales' dtype for the op and the result cast
back; with matching dtypes there is no cast at all.
"""

from __future__ import annotations

import fnmatch
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from . import dispatch
from .converters import ConvertedW4A16, convert_awq, convert_compressed_tensors, convert_gptq
from .format import FORMAT_VERSION, SUPPORTED_GROUP_SIZES, PackedW4A16, qweight_shape, quantize, zeros_shape

__all__ = ["SwapReport", "W4A16Linear", "swap_linears"]


def _group(in_features: int, group_size: int) -> int:
    return in_features if group_size in (-1, in_features) else group_size


class W4A16Linear(nn.Module):
    """y = x @ W^T + b with W stored 4-bit in the package's packed format (w4a16_ops.format).

    Buffers (all in state_dict): qweight int32, scales (the compute dtype, float16 or bfloat16),
    zeros int32 (absent when symmetric), perm int64 [in_features] (only for act-order
    checkpoints), bias (optional). The constructor allocates empty buffers of the right shapes, to
    be filled by load_state_dict; the from_* classmethods build filled modules.

    load_state_dict follows the checkpoint: optional buffers it holds (zeros, perm, bias) are adopted
    and scales / bias take its dtype (lossless); shapes must match. The packed-format version is
    saved in the state_dict's metadata and checked on load. .float() / .double() leave the scales
    in their 16-bit dtype (the op accepts nothing else); .half() / .bfloat16() / .to(dtype) with a
    16-bit dtype convert them. Inputs of another dtype than the scales' are cast for the op and the
    output cast back (values beyond the 16-bit range become inf).
    """

    _version = FORMAT_VERSION  # saved in state_dict metadata, checked on load

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int = 128,
        symmetric: bool = True,
        bias: bool = False,
        act_order: bool = False,
        dtype: torch.dtype = torch.float16,
        device: Optional[Union[str, torch.device]] = None,
        bias_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        K, N = int(in_features), int(out_features)
        G = _group(K, group_size)
        if K <= 0:
            raise ValueError(f"W4A16Linear: in_features must be positive, got {in_features}")
        if N <= 0 or N % 8:
            raise ValueError(f"W4A16Linear: out_features must be a positive multiple of 8, got {out_features}")
        if G not in SUPPORTED_GROUP_SIZES and G != K:
            raise ValueError(
                f"W4A16Linear: group_size must be 32, 64, 128, 256 or -1 / in_features (channelwise), got {group_size}"
            )
        if K % G:
            raise ValueError(f"W4A16Linear: in_features = {K} must be divisible by group_size = {G}")
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"W4A16Linear: dtype (of scales, the compute dtype) must be float16 or bfloat16, got {dtype}")
        self.in_features, self.out_features, self.group_size = K, N, G
        self.register_buffer("qweight", torch.zeros(qweight_shape(K, N), dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(K // G, N, dtype=dtype, device=device))
        zeros = None if symmetric else torch.full(zeros_shape(K // G, N), 0x88888888 - 2**32, dtype=torch.int32, device=device)
        self.register_buffer("zeros", zeros)
        perm = torch.arange(K, dtype=torch.int64, device=device) if act_order else None
        self.register_buffer("perm", perm)
        bias_t = torch.zeros(N, dtype=bias_dtype or dtype, device=device) if bias else None
        self.register_buffer("bias", bias_t)

    # -- properties ----------------------------------------------------------------------------

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    @property
    def act_order(self) -> bool:
        return self.perm is not None

    @property
    def packed(self) -> PackedW4A16:
        return PackedW4A16(self.qweight, self.scales, self.zeros)

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        in_dtype = x.dtype
        y = self._matmul(x)
        if self.bias is not None:
            y = y + self.bias
        if y.dtype != in_dtype:
            y = y.to(in_dtype)
        return y

    def _matmul(self, x: Tensor) -> Tensor:
        """x @ W^T in the scales' dtype, without the bias (row-parallel subclasses add it after their
        all-reduce, w4a16_ops.parallel)."""
        if not x.is_floating_point():  # a cast to the scales' dtype would compute on integers' values silently
            raise ValueError(f"W4A16Linear: x must be a floating-point tensor, got {x.dtype}")
        if x.dtype != self.scales.dtype:
            x = x.to(self.scales.dtype)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        return torch.ops.w4a16.gemm(x, self.qweight, self.scales, self.zeros)

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_packed(
        cls,
        packed: PackedW4A16,
        in_features: int,
        bias: Optional[Tensor] = None,
        perm: Optional[Tensor] = None,
    ) -> "W4A16Linear":
        """Wrap already-packed tensors (w4a16_ops.pack / quantize / a converter's output)."""
        qweight, scales, zeros = packed
        K, N = int(in_features), scales.shape[1]
        G = K // scales.shape[0] if scales.shape[0] and K % scales.shape[0] == 0 else -2
        if G == -2:
            raise ValueError(
                f"W4A16Linear.from_packed: in_features = {K} must be a multiple of scales.shape[0] = "
                f"{scales.shape[0]} (the number of groups)"
            )
        mod = cls(K, N, G, symmetric=zeros is None, bias=bias is not None, act_order=perm is not None,
                  dtype=scales.dtype, device="meta")
        for name, t, want in (("qweight", qweight, mod.qweight), ("zeros", zeros, mod.zeros)):
            if t is not None and (t.dtype != want.dtype or t.shape != want.shape):
                raise ValueError(
                    f"W4A16Linear.from_packed: {name} must be {want.dtype} {list(want.shape)} for "
                    f"in_features = {K}, out_features = {N}, G = {G}, got {t.dtype} {list(t.shape)}"
                )
        if perm is not None and tuple(perm.shape) != (K,):
            raise ValueError(f"W4A16Linear.from_packed: perm must have shape [{K}], got {list(perm.shape)}")
        if bias is not None and tuple(bias.shape) != (N,):
            raise ValueError(f"W4A16Linear.from_packed: bias must have shape [{N}], got {list(bias.shape)}")
        mod.qweight = qweight.contiguous()
        mod.scales = scales.contiguous()
        mod.zeros = None if zeros is None else zeros.contiguous()
        mod.perm = None if perm is None else perm.to(device=qweight.device, dtype=torch.int64).contiguous()
        mod.bias = None if bias is None else bias.detach().to(qweight.device).clone()
        return mod

    @classmethod
    def from_converted(cls, converted: ConvertedW4A16, bias: Optional[Tensor] = None) -> "W4A16Linear":
        return cls.from_packed(converted.packed, converted.in_features, bias=bias, perm=converted.perm)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        group_size: int = 128,
        symmetric: bool = True,
        dtype: Optional[torch.dtype] = None,
    ) -> "W4A16Linear":
        """Round-to-nearest quantization of linear.weight (w4a16_ops.quantize). dtype: the scales'
        (= compute) dtype, default the weight's if 16-bit, else float16. The bias keeps its dtype."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"W4A16Linear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        packed = quantize(linear.weight.detach(), group_size, symmetric, dtype)
        return cls.from_packed(packed, linear.in_features, bias=linear.bias)

    @classmethod
    def from_gptq(
        cls,
        qweight: Tensor,
        qzeros: Optional[Tensor],
        scales: Tensor,
        g_idx: Optional[Tensor] = None,
        bias: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> "W4A16Linear":
        """A GPTQ layer's tensors; kwargs as w4a16_ops.convert_gptq (checkpoint_format, symmetric,
        group_size, quantize_config, dtype)."""
        return cls.from_converted(convert_gptq(qweight, qzeros, scales, g_idx, **kwargs), bias)

    @classmethod
    def from_awq(
        cls,
        qweight: Tensor,
        qzeros: Optional[Tensor],
        scales: Tensor,
        bias: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> "W4A16Linear":
        """An AutoAWQ GEMM layer's tensors; kwargs as w4a16_ops.convert_awq."""
        return cls.from_converted(convert_awq(qweight, qzeros, scales, **kwargs), bias)

    @classmethod
    def from_compressed_tensors(
        cls,
        weight_packed: Tensor,
        weight_scale: Tensor,
        weight_zero_point: Optional[Tensor] = None,
        weight_shape: Optional[Any] = None,
        bias: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> "W4A16Linear":
        """A compressed-tensors pack-quantized layer's tensors; kwargs as
        w4a16_ops.convert_compressed_tensors (weight_g_idx, symmetric, group_size, dtype)."""
        converted = convert_compressed_tensors(weight_packed, weight_scale, weight_zero_point, weight_shape, **kwargs)
        return cls.from_converted(converted, bias)

    # -- repr and state_dict -------------------------------------------------------------------

    def backend_for(self, M: int = 1) -> str:
        """The backend w4a16.gemm would choose for M rows on this module's device (dispatch.explain)."""
        dev = self.qweight.device
        if dev.type == "meta":
            return "n/a (meta)"
        try:
            d = dispatch.explain(
                M, self.in_features, self.out_features, group_size=self.group_size, dtype=self.scales.dtype,
                zeros=self.zeros is not None, device=str(dev),
            )
        except Exception as e:  # e.g. a backend forced by W4A16_BACKEND that cannot serve this shape
            return f"error ({e})"
        return d.backend

    def extra_repr(self) -> str:
        g = f"{self.group_size}" if self.group_size != self.in_features else f"{self.group_size} (channelwise)"
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"group_size={g}",
            f"symmetric={self.symmetric}",
            f"bias={self.bias is not None}",
        ]
        if self.act_order:
            parts.append("act_order=True")
        parts.append(f"dtype={str(self.scales.dtype).replace('torch.', '')}")
        parts.append(f"backend(M=1, {self.qweight.device.type})={self.backend_for(1)}")
        return ", ".join(parts)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # The state_dict decides what the module holds: optional buffers it has (zeros, perm, bias) are
        # adopted, and scales / bias take its dtype (both lossless). Shapes must match the module's.
        version = local_metadata.get("version")
        if version is not None and version != FORMAT_VERSION:
            error_msgs.append(
                f"{prefix}: W4A16Linear state_dict has packed-format version {version}, this package reads "
                f"version {FORMAT_VERSION}"
            )
            return
        K, N, G = self.in_features, self.out_features, self.group_size
        dev = self.qweight.device
        expected = {"scales": (K // G, N), "zeros": zeros_shape(K // G, N), "perm": (K,), "bias": (N,)}
        for name, shape in expected.items():
            t = state_dict.get(prefix + name)
            if not isinstance(t, Tensor):
                continue
            if tuple(t.shape) != shape:
                continue  # the default loader reports the size mismatch
            mine = getattr(self, name)
            if mine is None or (name in ("scales", "bias") and mine.dtype != t.dtype):
                if name == "scales" and t.dtype not in (torch.float16, torch.bfloat16):
                    error_msgs.append(f"{prefix}scales: must be float16 or bfloat16, the state_dict has {t.dtype}")
                    return
                setattr(self, name, torch.empty(shape, dtype=t.dtype, device=dev))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        # model.float() / .double() must not turn the scales into a dtype the op refuses: they keep
        # their 16-bit dtype (a cast to another 16-bit dtype, e.g. .bfloat16(), is applied).
        keep = self.scales.dtype
        result = super()._apply(fn, recurse)
        if self.scales.dtype not in (torch.float16, torch.bfloat16):
            self.scales = self.scales.to(keep)
        return result


# -------------------------------------------------------------------------------------------------
# swap_linears


@dataclass
class SwapEntry:
    name: str
    in_features: int
    out_features: int
    detail: str

    def __str__(self) -> str:
        return f"{self.name} [{self.in_features} -> {self.out_features}]: {self.detail}"


@dataclass
class SwapReport:
    """What swap_linears replaced (detail: the group size used) and what it skipped (detail: why)."""

    replaced: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    @property
    def replaced_names(self) -> list:
        return [e.name for e in self.replaced]

    @property
    def skipped_names(self) -> list:
        return [e.name for e in self.skipped]

    def reason(self, name: str) -> Optional[str]:
        for e in self.replaced + self.skipped:
            if e.name == name:
                return e.detail
        return None

    def __str__(self) -> str:
        channelwise = sum("channelwise" in e.detail for e in self.replaced)
        lines = [
            f"swap_linears: replaced {len(self.replaced)} nn.Linear ({channelwise} channelwise), "
            f"skipped {len(self.skipped)}"
        ]
        lines += [f"  replaced {e}" for e in self.replaced]
        lines += [f"  skipped  {e}" for e in self.skipped]
        return "\n".join(lines)


SkipSpec = Union[None, str, Iterable[str], Callable[..., bool]]


def _skip_fn(skip: SkipSpec) -> Callable[[str, nn.Module], bool]:
    if skip is None:
        return lambda name, mod: False
    if callable(skip):
        try:
            params = inspect.signature(skip).parameters.values()
            positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            takes_module = any(p.kind == p.VAR_POSITIONAL for p in params) or len(positional) >= 2 and (
                positional[1].default is inspect.Parameter.empty
            )
        except (TypeError, ValueError):
            takes_module = True
        if takes_module:
            return lambda name, mod: bool(skip(name, mod))
        return lambda name, mod: bool(skip(name))
    patterns = [skip] if isinstance(skip, str) else list(skip)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"swap_linears: skip must be a callable, a name or a list of names, got an element {p!r}")
    return lambda name, mod: any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def swap_linears(
    model: nn.Module,
    group_size: int = 128,
    symmetric: bool = True,
    skip: SkipSpec = None,
    channelwise_fallback: bool = True,
    dtype: Optional[torch.dtype] = None,
) -> SwapReport:
    """Replace every eligible nn.Linear in model (in place) by W4A16Linear.from_linear; return a report.

    skip: a callable (name) or (name, module) -> True to skip, or names / fnmatch patterns
        ("lm_head", "*.pooler.*"). Names are those of model.named_modules().
    channelwise_fallback: a layer whose in_features is not a multiple of group_size gets one group
        per column (G = in_features) instead of being skipped.
    dtype: scales' (compute) dtype; default each weight's if 16-bit, else float16.

    Skipped, with the reason in the report: subclasses of nn.Linear (they may read .weight),
    out_features % 8 != 0, in_features % group_size != 0 without channelwise_fallback, weights on
    the meta device or not floating point, weights shared with another module (tied embeddings),
    and names matched by skip.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_linears: model must be an nn.Module, got {type(model).__name__}")
    if group_size != -1 and group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"swap_linears: group_size must be 32, 64, 128, 256 or -1 (channelwise), got {group_size}")
    should_skip = _skip_fn(skip)
    report = SwapReport()

    # Every parameter's names, to find weights shared between modules (tied embeddings).
    param_names: dict = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        param_names.setdefault(id(p), []).append(pname)

    # Every place a module sits (a module may sit under several names).
    places: dict = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():
            if child is not None:
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                places.setdefault(id(child), []).append((parent, child_name, full))

    new_modules: dict = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        K, N = mod.in_features, mod.out_features
        entry = lambda detail: SwapEntry(name, K, N, detail)  # noqa: E731
        if type(mod) is not nn.Linear:
            report.skipped.append(entry(f"{type(mod).__name__} is a subclass of nn.Linear (it may use .weight directly)"))
            continue
        if should_skip(name, mod):
            report.skipped.append(entry("matched skip"))
            continue
        w = mod.weight
        if w.device.type == "meta":
            report.skipped.append(entry("weight is on the meta device (no values to quantize)"))
            continue
        if not w.dtype.is_floating_point:
            report.skipped.append(entry(f"weight dtype {w.dtype} is not floating point"))
            continue
        if N % 8:
            report.skipped.append(entry(f"out_features = {N} is not a multiple of 8"))
            continue
        own = {f"{full}.weight" for _, _, full in places.get(id(mod), [])}
        shared = [n for n in param_names.get(id(w), []) if n not in own]
        if shared:
            report.skipped.append(entry(f"weight is shared with {', '.join(shared)} (tied)"))
            continue
        G = _group(K, group_size)
        if K % G:
            if not channelwise_fallback:
                report.skipped.append(entry(f"in_features = {K} is not divisible by group_size = {G}"))
                continue
            detail = f"G = {K} (channelwise: in_features = {K} is not divisible by group_size = {G})"
            G = K
        else:
            detail = f"G = {G}" + (" (channelwise)" if G == K else "")
        new_modules[id(mod)] = W4A16Linear.from_linear(mod, G, symmetric, dtype)
        report.replaced.append(entry(detail + (", symmetric" if symmetric else ", asymmetric")))

    for mod_id, new in new_modules.items():
        for parent, child_name, _ in places[mod_id]:
            setattr(parent, child_name, new)
    return report
