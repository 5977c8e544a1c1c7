"""What the op is compared with, each set up to rotate through weight copies (see timing.py).

A contender's setup returns the list of calls (one per weight copy) or a string saying why it
cannot run this point. Weights are made once per (K, N, G, dtype) and reused across M (the M sweep
would otherwise repack them for every kernel and every M); clear_cache() frees them.

Third-party W4A16 kernels (gemlite, conch-triton-kernels, humming-kernels) run only when importable (pip install
.[bench]), each set up as its own documentation shows, and each output is checked against the
same weights dequantized before it is timed: a kernel used wrongly is reported, never timed.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, List, Union

import torch

import w4a16_ops
from w4a16_ops import dispatch
from w4a16_ops.backends import BACKENDS

from .timing import copies_needed, packed_copies

Calls = List[Callable[[], object]]

PEER_TOLERANCE = 1e-2  # relative Frobenius error vs the dequantized weights; a wrong layout gives ~1


def clear_cache() -> None:
    for f in (_dense_weights, _logical, _packed, _dequantized):
        f.cache_clear()


@functools.lru_cache(maxsize=1)
def _dense_weights(K, N, dtype) -> list:
    w = torch.randn(K, N, dtype=dtype, device="cuda")
    return [w] + [w.clone() for _ in range(copies_needed(w.numel() * 2) - 1)]


@functools.lru_cache(maxsize=1)
def _logical(K, N, G, dtype, zeros):
    """q [N, K] in 0..15, scales [K // G, N], z [K // G, N] or None: the weights every 4-bit contender packs."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8, device="cuda", generator=gen)
    scales = (torch.rand(K // G, N, device="cuda", generator=gen) * 0.01 + 0.001).to(dtype)
    z = torch.randint(0, 16, (K // G, N), device="cuda", generator=gen) if zeros else None
    return q, scales, z


@functools.lru_cache(maxsize=1)
def _packed(K, N, G, dtype, zeros) -> list:
    return packed_copies(w4a16_ops.pack(*_logical(K, N, G, dtype, zeros)))


@functools.lru_cache(maxsize=1)
def _dequantized(K, N, G, dtype, zeros) -> torch.Tensor:
    """[K, N] in dtype: the reference the peers' outputs are checked against."""
    q, scales, z = _logical(K, N, G, dtype, zeros)
    zf = 8.0 if z is None else z.float().repeat_interleave(G, 0)
    return ((q.t().float() - zf) * scales.float().repeat_interleave(G, 0)).to(dtype)


def dense(M, K, N, G, dtype) -> Union[Calls, str]:
    """The baseline: torch.matmul with 16-bit weights (what not quantizing costs)."""
    x = torch.randn(M, K, dtype=dtype, device="cuda")
    return [lambda w=w: x @ w for w in _dense_weights(K, N, dtype)]


def torch_int4(M, K, N, G, dtype) -> Union[Calls, str]:
    """torch's own int4 op (tinygemm): bf16 activations only."""
    if G not in (32, 64, 128, 256):
        return f"G = {G} not supported by _weight_int4pack_mm"
    inner = next((t for t in (8, 4, 2) if K % (16 * t) == 0), None)
    if inner is None or N % 8:
        return "shape not supported by _convert_weight_to_int4pack"
    q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device="cuda")
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack(q, inner)
    except RuntimeError as e:
        return f"_convert_weight_to_int4pack failed: {str(e).splitlines()[0]}"
    sz = torch.randn(K // G, N, 2, dtype=torch.bfloat16, device="cuda") * 0.01
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    n = copies_needed(packed.numel() * packed.element_size())
    ps = [(packed, sz)] + [(packed.clone(), sz.clone()) for _ in range(n - 1)]
    return [lambda p=p: torch.ops.aten._weight_int4pack_mm(x, p[0], G, p[1]) for p in ps]


def w4a16(name: str, zeros: bool = False):
    """This package's op, with backend `name` forced, or 'auto'; zeros: asymmetric weights (zero points)."""

    def setup(M, K, N, G, dtype) -> Union[Calls, str]:
        if name != "auto":
            why = BACKENDS[name].availability()
            if why is None:
                p = dispatch.problem_for(torch.device("cuda"), dtype, M, K, N, G, zeros)
                why = BACKENDS[name].unsupported_reason(p)
            if why is not None:
                return why
        x = torch.randn(M, K, dtype=dtype, device="cuda")
        return [lambda p=p: torch.ops.w4a16.gemm(x, p.qweight, p.scales, p.zeros) for p in _packed(K, N, G, dtype, zeros)]

    return setup


# --------------------------------------------------------------------------------------------------
# Third-party W4A16 kernels (optional)
# --------------------------------------------------------------------------------------------------


def _check_peer(name, out, x, K, N, G, dtype, zeros) -> Union[None, str]:
    ref = x @ _dequantized(K, N, G, dtype, zeros)
    err = float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
    if not err <= PEER_TOLERANCE:  # also catches NaN
        return f"{name} output differs from the dequantized weights (relative error {err:.3g}): not timed"
    return None


def gemlite(zeros: bool = False):
    """gemlite's GemLiteLinear (Triton), per its README: GemLiteLinear(W_nbits, group_size, in_features,
    out_features, input_dtype, output_dtype), then .pack(W_q, scales, zeros, bias) with HQQ-format
    weights, W ~ (W_q - zeros) * scales: W_q uint8 [N, K], scales and zeros [N, K // G]. Symmetric
    weights pass the integer zero 8 (its 'symmetric with shift' mode)."""

    def setup(M, K, N, G, dtype) -> Union[Calls, str]:
        try:
            import gemlite as gl
        except ImportError as e:
            return f"not installed (pip install gemlite): {e}"
        try:
            from gemlite import DType, GemLiteLinear
        except ImportError:  # releases before the top-level exports
            from gemlite.core import DType, GemLiteLinear
        if G < 32 or K % 32 or K % G:
            return f"gemlite needs group_size >= 32 dividing K and K % 32 == 0 (K = {K}, G = {G})"
        gdt = {torch.float16: DType.FP16, torch.bfloat16: DType.BF16}.get(dtype)
        if gdt is None:
            return f"dtype {dtype} not set up for gemlite"
        q, scales, z = _logical(K, N, G, dtype, zeros)
        s_nk = scales.t().contiguous()  # [N, K // G]
        z_nk = 8 if z is None else z.t().to(dtype).contiguous()
        try:
            mods = []
            for _ in range(copies_needed(K * N // 2)):
                m = GemLiteLinear(4, group_size=G, in_features=K, out_features=N, input_dtype=gdt, output_dtype=gdt)
                m.pack(q, s_nk, z_nk, None)
                mods.append(m)
            x = torch.randn(M, K, dtype=dtype, device="cuda")
            why = _check_peer("gemlite", mods[0](x), x, K, N, G, dtype, zeros)
        except Exception as e:  # a peer's failure is a row, not the end of the run
            return f"gemlite {getattr(gl, '__version__', '')} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return why or [lambda m=m: m(x) for m in mods]

    return setup


def _pack_rows_k(q_kn: torch.Tensor) -> torch.Tensor:
    """int32 [K // 8, N]: eight consecutive k of one column per word, k % 8 in bits 4 (k % 8) (the layout of
    conch.third_party.vllm.quant_utils.pack_rows, which packs on the CPU in numpy; this is the same on the GPU)."""
    K, N = q_kn.shape
    words = torch.zeros(K // 8, N, dtype=torch.int64, device=q_kn.device)  # int64: bit 31 set is no overflow
    for i in range(8):
        words |= q_kn[i::8].to(torch.int64) << (4 * i)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def conch(zeros: bool = False):
    """conch-triton-kernels' mixed_precision_gemm (conch.ops.quantization.gemm), called as its vLLM
    integration calls it: x [M, K], w_q_packed int32 [K // 8, N] (pack_rows layout), w_s [K // G, N],
    w_zp None, weight_size_bits 4, weight_bias 8 (uint4b8, symmetric), group_size G."""

    def setup(M, K, N, G, dtype) -> Union[Calls, str]:
        try:
            from conch.ops.quantization.gemm import mixed_precision_gemm
            from conch.third_party.vllm.quant_utils import pack_rows
        except ImportError as e:
            return f"not installed (pip install conch-triton-kernels): {e}"
        if zeros:
            return "zero-point weights not set up for conch (its documented W4A16 use is uint4b8, symmetric)"
        if K % 8 or K % G:
            return f"conch needs K % 8 == 0 and G dividing K (K = {K}, G = {G})"
        params = inspect.signature(mixed_precision_gemm).parameters
        if "weight_size_bits" not in params:
            return "this conch version's mixed_precision_gemm has no weight_size_bits/weight_bias (not set up)"
        q, scales, _ = _logical(K, N, G, dtype, zeros)
        probe = torch.randint(0, 16, (64, 16), dtype=torch.int32, device="cuda")
        if not torch.equal(pack_rows(probe, 4, 64, 16).to(probe.device), _pack_rows_k(probe)):
            return "conch's pack_rows layout differs from the one packed here: not timed"
        try:
            w = _pack_rows_k(q.t())
            ws = [(w, scales)] + [(w.clone(), scales.clone()) for _ in range(copies_needed(w.numel() * 4) - 1)]
            x = torch.randn(M, K, dtype=dtype, device="cuda")

            def call(p):
                return mixed_precision_gemm(
                    x=x, w_q_packed=p[0], w_s=p[1], w_zp=None, weight_size_bits=4, weight_bias=8, group_size=G
                )

            why = _check_peer("conch", call(ws[0]), x, K, N, G, dtype, zeros)
        except Exception as e:  # a peer's failure is a row, not the end of the run
            return f"conch failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return why or [lambda p=p: call(p) for p in ws]

    return setup


def humming(zeros: bool = False):
    """humming-kernels' HummingLayer (JIT-compiled CUDA, NVRTC), loaded the way its layer code and vLLM's
    HummingLinearKernel load a GPTQ checkpoint: HummingLayer(shape_n, shape_k, weight_config={"quant_method":
    "gptq", "bits": 4, "group_size": G, "sym": True}, torch_dtype), load_from_tensors({"qweight": int32 [K // 8, N]
    (eight k per word, the pack_rows layout), "scales": [K // G, N]}), transform(), then layer(x) with its own
    kernel choice. sym = True is uint4 with the bias 8, w = (q - 8) * s (this package's symmetric weights)."""

    def setup(M, K, N, G, dtype) -> Union[Calls, str]:
        try:
            from humming.layer import HummingLayer
        except ImportError as e:
            return f"not installed (pip install humming-kernels): {e}"
        if zeros:
            return "zero-point weights not set up for humming (GPTQ qzeros conventions differ; symmetric only here)"
        if K % 8 or K % G or N % 8:
            return f"humming's GPTQ layout needs K % 8 == 0, N % 8 == 0 and G dividing K (K = {K}, N = {N}, G = {G})"
        q, scales, _ = _logical(K, N, G, dtype, zeros)
        try:
            w = _pack_rows_k(q.t())
            layers = []
            for _ in range(copies_needed(w.numel() * 4)):
                layer = HummingLayer(shape_n=N, shape_k=K, torch_dtype=dtype,
                                     weight_config={"quant_method": "gptq", "bits": 4, "group_size": G, "sym": True,
                                                    "desc_act": False}).cuda()
                layer.load_from_tensors({"qweight": w, "scales": scales})
                layer.transform()
                layers.append(layer)
            x = torch.randn(M, K, dtype=dtype, device="cuda")
            with torch.no_grad():
                why = _check_peer("humming", layers[0](x), x, K, N, G, dtype, zeros)
        except Exception as e:  # a peer's failure is a row, not the end of the run
            return f"humming failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return why or [lambda m=m: m(x) for m in layers]

    return setup


def contenders(with_reference: bool = False, zeros: bool = False):
    out = {"dense": dense, "torch_int4": torch_int4, "w4a16_auto": w4a16("auto", zeros)}
    for name in BACKENDS:
        if name != "reference" or with_reference:
            out[f"w4a16_{name}"] = w4a16(name, zeros)
    out["gemlite"] = gemlite(zeros)
    out["conch"] = conch(zeros)
    out["humming"] = humming(zeros)
    return out
