"""Bad input gets a clear error naming the argument, the expected and the given value, with the
same words in eager mode, under FakeTensorMode (torch.compile's tracing) and on the meta device."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import w4a16_ops

# CI installs expecttest (requirements-ci.txt); a GPU machine without it still runs the rest of the suite.
expecttest = pytest.importorskip("expecttest")


def _valid(K=256, N=128, G=64, zeros=True, dtype=torch.float16):
    packed = w4a16_ops.quantize(torch.randn(N, K), G, symmetric=not zeros, dtype=dtype)
    return dict(x=torch.randn(3, K, dtype=dtype), qweight=packed.qweight, scales=packed.scales, zeros=packed.zeros)


def _errors(**kwargs):
    """The message raised in eager mode; asserts fake mode and meta tensors say exactly the same."""
    args = _valid()
    args.update(kwargs)
    call = (args["x"], args["qweight"], args["scales"], args["zeros"])
    messages = []
    try:
        torch.ops.w4a16.gemm(*call)
    except ValueError as e:
        messages.append(str(e))
    else:
        raise AssertionError("eager call did not raise")
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) if t is not None else None for t in call]
        try:
            torch.ops.w4a16.gemm(*fake)
        except ValueError as e:
            messages.append(str(e))
        else:
            raise AssertionError("fake call did not raise")
    if all(t is None or t.device.type == "cpu" for t in call):
        meta = [t.to("meta") if t is not None else None for t in call]
        try:
            torch.ops.w4a16.gemm(*meta)
        except ValueError as e:
            messages.append(str(e).replace("meta", "cpu"))
        else:
            raise AssertionError("meta call did not raise")
    assert len(set(messages)) == 1, messages
    return messages[0]


class TestErrorMessages(expecttest.TestCase):
    def test_x_dtype(self):
        self.assertExpectedInline(
            _errors(x=torch.randn(3, 256)), """w4a16.gemm: x must be float16 or bfloat16, got torch.float32"""
        )

    def test_x_0d(self):
        self.assertExpectedInline(
            _errors(x=torch.tensor(1.0, dtype=torch.float16)),
            """w4a16.gemm: x must have at least 1 dimension (..., K), got a 0-d tensor""",
        )

    def test_scales_dtype(self):
        args = _valid()
        self.assertExpectedInline(
            _errors(scales=args["scales"].to(torch.bfloat16)),
            """w4a16.gemm: scales must have the dtype of x (torch.float16), got torch.bfloat16""",
        )

    def test_qweight_dtype(self):
        args = _valid()
        self.assertExpectedInline(
            _errors(qweight=args["qweight"].to(torch.int64)),
            """w4a16.gemm: qweight must be torch.int32 (the packed format), got torch.int64""",
        )

    def test_zeros_dtype(self):
        args = _valid()
        self.assertExpectedInline(
            _errors(zeros=args["zeros"].to(torch.uint8)),
            """w4a16.gemm: zeros must be None or torch.int32 (8 packed zero points per word), got torch.uint8""",
        )

    def test_wrong_device(self):
        args = _valid()
        self.assertExpectedInline(
            _errors(scales=args["scales"].to("meta")),
            """w4a16.gemm: scales must be on the device of x (cpu), got meta""",
        )

    def test_scales_rank(self):
        args = _valid()
        self.assertExpectedInline(
            _errors(scales=args["scales"].flatten()),
            """w4a16.gemm: scales must be 2-D [K // G, N], got shape [512]""",
        )

    def test_k_disagrees_with_scales(self):
        self.assertExpectedInline(
            _errors(x=torch.randn(3, 250, dtype=torch.float16)),
            """w4a16.gemm: K = x.shape[-1] = 250 must be a multiple of scales.shape[0] = 4 (the number of groups)""",
        )

    def test_unsupported_group_size(self):
        args = _valid(K=96, G=32)  # three groups of 32; two scale rows make G = 48
        self.assertExpectedInline(
            _errors(**dict(args, scales=args["scales"][:2].contiguous(), zeros=args["zeros"][:2].contiguous())),
            """w4a16.gemm: group size G = K / scales.shape[0] = 48 is not supported; expected 32, 64, 128, 256 or K = 96""",
        )

    def test_k_disagreeing_with_the_weights_names_k(self):
        # x with K = 64 against weights packed for K = 256: K / scales.shape[0] = 16 is no group size to report.
        self.assertExpectedInline(
            _errors(x=torch.randn(3, 64, dtype=torch.float16)),
            """w4a16.gemm: K = x.shape[-1] = 64 does not match the weights: qweight must have shape [4, 256] for K = 64, N = 128, got [16, 256]""",
        )

    def test_n_not_multiple_of_8(self):
        args = _valid()
        self.assertExpectedInline(
            _errors(scales=args["scales"][:, :100].contiguous()),
            """w4a16.gemm: N = scales.shape[1] must be a positive multiple of 8, got 100""",
        )

    def test_qweight_shape_disagrees(self):
        args = _valid()
        self.assertExpectedInline(
            _errors(qweight=args["qweight"][:8].contiguous()),
            """w4a16.gemm: qweight must have shape [16, 256] = [ceil(K / 16), ceil(N / 64) * 128] for K = 256, N = 128, got [8, 256]""",
        )

    def test_qweight_for_other_n(self):
        args = _valid()
        self.assertExpectedInline(
            _errors(scales=torch.cat([args["scales"], args["scales"]], dim=1), zeros=None),
            """w4a16.gemm: qweight must have shape [16, 512] = [ceil(K / 16), ceil(N / 64) * 128] for K = 256, N = 256, got [16, 256]""",
        )

    def test_zeros_shape(self):
        args = _valid()
        self.assertExpectedInline(
            _errors(zeros=args["zeros"][:, :8].contiguous()),
            """w4a16.gemm: zeros must have shape [4, 16] = [K // G, N // 8], got [4, 8]""",
        )

    def test_non_contiguous_scales(self):
        args = _valid()
        s = torch.empty(args["scales"].shape[1], args["scales"].shape[0], dtype=torch.float16).t()
        s.copy_(args["scales"])
        self.assertExpectedInline(
            _errors(scales=s),
            """w4a16.gemm: scales must be contiguous (row-major), got strides [1, 4]""",
        )

    def test_k_zero(self):
        self.assertExpectedInline(
            _errors(x=torch.randn(3, 0, dtype=torch.float16)),
            """w4a16.gemm: K = x.shape[-1] must be positive, got 0""",
        )


def test_valid_call_does_not_raise_in_fake_mode():
    args = _valid()
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in args.values()]
        out = torch.ops.w4a16.gemm(*fake)
    assert out.shape == (3, 128) and out.dtype == torch.float16

