"""w4a16_ops: 4-bit-weight x 16-bit-activation matrix multiply for PyTorch, one op, several backends.

    y = torch.ops.w4a16.gemm(x, qweight, scales, zeros)      # or w4a16_ops.gemm(...)

See w4a16_ops.format for the packed weight layout and w4a16_ops.dispatch for the backend choice.
"""

from . import ops  # noqa: F401  (registers torch.ops.w4a16.gemm)
from .dispatch import Decision, explain
from .format import (
    FORMAT_VERSION,
    PackedW4A16,
    dequantize,
    pack,
    pack_qweight,
    pack_zeros,
    quantize,
    unpack,
    unpack_qweight,
    unpack_zeros,
)
from .ops import gemm
from .converters import ConvertedW4A16, convert_awq, convert_compressed_tensors, convert_gptq
from .nn import SwapReport, W4A16Linear, swap_linears
from .pretrained import from_pretrained  # needs transformers + safetensors (the "hf" extra), imported on call
from . import parallel  # noqa: F401  (w4a16_ops.parallel: tensor parallelism, shard_model)

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "ConvertedW4A16",
    "SwapReport",
    "W4A16Linear",
    "convert_awq",
    "convert_compressed_tensors",
    "convert_gptq",
    "from_pretrained",
    "swap_linears",
    "Decision",
    "PackedW4A16",
    "dequantize",
    "explain",
    "gemm",
    "pack",
    "pack_qweight",
    "pack_zeros",
    "quantize",
    "unpack",
    "unpack_qweight",
    "unpack_zeros",
]
