// torch binding of the Hopper wgmma W4A16 GEMM (csrc/kernels/sm90_gemm.cu). Private ops, called by
// w4a16_ops/backends/cuda.py from inside the public op's opaque body, which establishes every precondition checked
// here first (these checks guard memory safety; a public call never reaches them):
//
//   _cuda_gemm_sm90(x, qweight, scales, zeros, out, splits=0, bm=0) -> ()
//       out[M, N] = x[M, K] @ dequantize(...) on a compute capability 9.0 device, built for sm_90a. The split-K
//       workspace (fp32, any contents) comes from PyTorch's caching allocator on the current stream. splits, bm:
//       overrides of the partition (0 = default) for tests and timing sweeps.
//   _cuda_gemm_sm90_plan(M, K, N, splits=0, bm=0) -> int[]
//       the partition on the current device: bm, m_blocks, n_blocks, kb_total, kb_per_split, splits, ws_floats,
//       smem_bytes.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common.h"
#include "sm90_gemm.h"

namespace {

constexpr const char* kOp = "w4a16._cuda_gemm_sm90";

// Multiprocessors of the current device after checking it is compute capability 9.x.
int sm90_device_sms(const char* op) {
  const w4a16_binding::DeviceProps c = w4a16_binding::device_props(op);
  TORCH_CHECK(c.major == 9, op, ": needs a compute capability 9.x GPU (wgmma), this one is sm_", c.major, c.minor);
  return c.sms;
}

void gemm_sm90(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
               const std::optional<at::Tensor>& zeros, at::Tensor& out, int64_t splits, int64_t bm) {
  TORCH_CHECK(x.dim() == 2 && scales.dim() == 2 && qweight.dim() == 2, kOp, ": x, scales, qweight must be 2-D");
  const int64_t M = x.size(0), K = x.size(1), N = scales.size(1), ng = scales.size(0);
  const auto dev = x.device();
  TORCH_CHECK(dev.is_cuda() && qweight.device() == dev && scales.device() == dev && out.device() == dev &&
                  (!zeros.has_value() || zeros->device() == dev),
              kOp, ": every tensor must be on one CUDA device");
  TORCH_CHECK((x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) &&
                  scales.scalar_type() == x.scalar_type() && out.scalar_type() == x.scalar_type(),
              kOp, ": x, scales and out must share one 16-bit dtype");
  TORCH_CHECK(ng > 0 && K % ng == 0 && K % 8 == 0 && N > 0 && N % 8 == 0, kOp, ": bad K = ", K, " / N = ", N,
              " / groups = ", ng);
  const int64_t G = K / ng;
  TORCH_CHECK(ng == 1 || G == 32 || G == 64 || G == 128 || G == 256, kOp, ": group size ", G, " not supported");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.is_contiguous() && qweight.size(0) == (K + 15) / 16 &&
                  qweight.size(1) == (N + 63) / 64 * 128,
              kOp, ": qweight must be contiguous int32 [", (K + 15) / 16, ", ", (N + 63) / 64 * 128, "]");
  TORCH_CHECK(scales.is_contiguous(), kOp, ": scales must be contiguous");
  TORCH_CHECK(!zeros.has_value() || (zeros->scalar_type() == at::kInt && zeros->is_contiguous() &&
                                     zeros->dim() == 2 && zeros->size(0) == ng && zeros->size(1) == N / 8),
              kOp, ": zeros must be contiguous int32 [", ng, ", ", N / 8, "]");
  TORCH_CHECK(x.stride(1) == 1 && (M <= 1 || x.stride(0) % 8 == 0), kOp, ": x rows must be contiguous, 8 apart");
  TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == M && out.size(1) == N, kOp,
              ": out must be contiguous [", M, ", ", N, "]");
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  TORCH_CHECK(aligned(x.data_ptr()) && aligned(qweight.data_ptr()) && aligned(scales.data_ptr()) &&
                  aligned(out.data_ptr()),
              kOp, ": x, qweight, scales and out must be 16-byte aligned");
  TORCH_CHECK(M < (1LL << 31) && K < (1LL << 31) && N < (1LL << 31), kOp, ": dimensions must fit in int32");
  if (M == 0) return;
  const c10::cuda::CUDAGuard guard(dev);
  const int sms = sm90_device_sms(kOp);
  w4a16::sm90::Plan plan{};
  const cudaError_t perr = w4a16::sm90::plan(int(M), int(K), int(N), sms, int(splits), int(bm), &plan);
  TORCH_CHECK(perr == cudaSuccess, kOp, ": no partition for this shape: ", cudaGetErrorString(perr));
  at::Tensor ws;
  if (plan.ws_floats > 0) ws = at::empty({plan.ws_floats}, x.options().dtype(at::kFloat));
  const w4a16::sm90::Args a = w4a16_binding::gemm_args(x, qweight, scales, zeros, out);
  const cudaError_t err = w4a16::sm90::launch(a, plan, plan.ws_floats > 0 ? ws.data_ptr<float>() : nullptr,
                                              c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, kOp, ": launch failed: ", cudaGetErrorString(err));
}

std::vector<int64_t> gemm_sm90_plan(int64_t M, int64_t K, int64_t N, int64_t splits, int64_t bm) {
  const int sms = sm90_device_sms("w4a16._cuda_gemm_sm90_plan");
  w4a16::sm90::Plan p{};
  const cudaError_t err = w4a16::sm90::plan(int(M), int(K), int(N), sms, int(splits), int(bm), &p);
  TORCH_CHECK(err == cudaSuccess, "w4a16._cuda_gemm_sm90_plan: ", cudaGetErrorString(err));
  return {p.bm, p.m_blocks, p.n_blocks, p.kb_total, p.kb_per_split, p.splits, p.ws_floats, p.smem_bytes};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(w4a16, m) {
  m.def("_cuda_gemm_sm90(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor(a!) out, int splits=0, "
        "int bm=0) -> ()");
  m.def("_cuda_gemm_sm90_plan(int M, int K, int N, int splits=0, int bm=0) -> int[]", &gemm_sm90_plan);
}

TORCH_LIBRARY_IMPL(w4a16, CUDA, m) { m.impl("_cuda_gemm_sm90", &gemm_sm90); }
