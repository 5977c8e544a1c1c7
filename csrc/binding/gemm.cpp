// torch binding of the CUDA W4A16 GEMM (csrc/kernels/gemm*.cu). Private ops, called by w4a16_ops/backends/cuda.py
// from inside the public op's opaque body:
//
//   _cuda_gemm(x, qweight, scales, zeros, out, locks, bps=0, splits=0, scaling=0, pdl=0, prefetch=0, bulk=0) -> ()
//       out[M, N] = x[M, K] @ dequantize(...). locks: int32 counters, all zero; the kernel leaves them zero (so the
//       schema does not declare them mutated). The float workspace comes from PyTorch's caching allocator, on the
//       current stream, and needs no initial contents. bps, splits, scaling: overrides of the partition (0 = the
//       measured default; see GemmTuning in launchers.h), for timing sweeps and tests; pdl (1: off, 2: on),
//       prefetch (-1: off, n: distance) and bulk (1: the bulk-copy weight ring) likewise.
//   _cuda_dequantize(qweight, scales, zeros, w) -> ()
//       w[K, N] (x.dtype, contiguous) = dequantize(...), for the large-M path (dequantize once + dense GEMM).
//   _cuda_gemm_plan(M, K, N, G, bf16=False, bps=0, splits=0, scaling=0, pdl=0, prefetch=0, bulk=0) -> int[]
//       the partition the kernel would use on the current device (tests and tuning): mb, slabs, m_chunks, n_cols,
//       k_iters, total, ipb, grid, ws_floats, locks, smem_bytes, blocks_per_sm, f32s, max_splits, pdl, pf, bulk.
//   _cuda_capture_id() -> int
//       the id of the CUDA-graph capture the current stream is in (unique in the process), 0 when not capturing.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common.h"
#include "launchers.h"

namespace {

void check_weights(const char* op, const at::Tensor& qweight, const at::Tensor& scales,
                   const std::optional<at::Tensor>& zeros, int64_t K, const at::Device& device, bool need_k8) {
  TORCH_CHECK(scales.device() == device && qweight.device() == device, op,
              ": qweight and scales must be on the device of the other arguments (", device, "), got ",
              qweight.device(), " and ", scales.device());
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kBFloat16, op,
              ": scales must be float16 or bfloat16, got ", scales.scalar_type());
  TORCH_CHECK(scales.dim() == 2 && scales.is_contiguous(), op, ": scales must be contiguous [K / G, N], got ",
              scales.sizes(), " strides ", scales.strides());
  const int64_t ng = scales.size(0), N = scales.size(1);
  TORCH_CHECK(ng > 0 && K > 0 && K % ng == 0, op, ": K = ", K, " must be a positive multiple of scales.shape[0] = ", ng);
  const int64_t G = K / ng;
  TORCH_CHECK(ng == 1 || G == 32 || G == 64 || G == 128 || G == 256, op, ": group size ", G,
              " is not supported (32, 64, 128, 256 or K)");
  TORCH_CHECK(N > 0 && N % 8 == 0, op, ": N = ", N, " must be a positive multiple of 8");
  TORCH_CHECK(!need_k8 || K % 8 == 0, op, ": K = ", K, " must be a multiple of 8 (pad x and K first)");
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.is_contiguous() && qweight.dim() == 2 &&
                  qweight.size(0) == (K + 15) / 16 && qweight.size(1) == (N + 63) / 64 * 128,
              op, ": qweight must be contiguous int32 [", (K + 15) / 16, ", ", (N + 63) / 64 * 128, "], got ",
              qweight.scalar_type(), " ", qweight.sizes());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(scales.data_ptr()) % 16 == 0,
              op, ": qweight and scales must be 16-byte aligned (the kernels read them with 16-byte loads); "
              "copy them (w4a16_ops/backends/cuda.py does)");
  if (zeros.has_value()) {
    const at::Tensor& z = *zeros;
    TORCH_CHECK(z.device() == device && z.scalar_type() == at::kInt && z.is_contiguous() && z.dim() == 2 &&
                    z.size(0) == ng && z.size(1) == N / 8,
                op, ": zeros must be contiguous int32 [", ng, ", ", N / 8, "] on ", device, ", got ", z.scalar_type(),
                " ", z.sizes(), " on ", z.device());
  }
  TORCH_CHECK(device.is_cuda(), op, ": tensors must be on a CUDA device, got ", device);
}

w4a16::GemmTuning tuning(int64_t bps, int64_t splits, int64_t scaling, int64_t pdl, int64_t prefetch, int64_t bulk) {
  w4a16::GemmTuning t;
  t.bps = int(bps);
  t.max_splits = int(splits);
  t.scaling = int(scaling);
  t.pdl = int(pdl);
  t.prefetch = int(prefetch);
  t.bulk = int(bulk);
  return t;
}

// The current device's multiprocessor count, after checking its compute capability (both cached per device: this is
// on every call's host path). major: set to the compute capability's major number when given.
int device_sms(const char* op, int* major = nullptr) {
  const w4a16_binding::DeviceProps c = w4a16_binding::device_props(op);
  TORCH_CHECK(c.major >= 8, op, ": needs compute capability >= 8.0 (mma.sync bf16, cp.async), this GPU is sm_", c.major,
              c.minor);
  if (major != nullptr) *major = c.major;
  return c.sms;
}

void cuda_gemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
               const std::optional<at::Tensor>& zeros, at::Tensor& out, const at::Tensor& locks, int64_t bps,
               int64_t splits, int64_t scaling, int64_t pdl, int64_t prefetch, int64_t bulk) {
  constexpr const char* op = "w4a16._cuda_gemm";
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1);
  check_weights(op, qweight, scales, zeros, K, x.device(), true);
  const int64_t N = scales.size(1);
  TORCH_CHECK(x.scalar_type() == scales.scalar_type(), op, ": x and scales must have one dtype, got ",
              x.scalar_type(), " and ", scales.scalar_type());
  TORCH_CHECK(x.stride(1) == 1 && (M <= 1 || x.stride(0) % 8 == 0) &&
                  reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              op, ": x rows must be contiguous, 16-byte aligned and 8 elements apart, got strides ", x.strides());
  TORCH_CHECK(out.device() == x.device() && out.scalar_type() == x.scalar_type() && out.is_contiguous() &&
                  out.dim() == 2 && out.size(0) == M && out.size(1) == N,
              op, ": out must be contiguous ", x.scalar_type(), " [", M, ", ", N, "] on ", x.device(), ", got ",
              out.scalar_type(), " ", out.sizes(), " on ", out.device());
  TORCH_CHECK(M < (1LL << 31) && K < (1LL << 31) && N < (1LL << 31), op, ": dimensions must fit in int32");
  if (M == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  int major = 0;
  const int sms = device_sms(op, &major);
  w4a16::GemmPlan plan{};
  const cudaError_t perr = w4a16::plan_gemm(int(M), int(K), int(N), int(K / scales.size(0)),
                                            x.scalar_type() == at::kBFloat16, sms, major,
                                            tuning(bps, splits, scaling, pdl, prefetch, bulk), &plan);
  TORCH_CHECK(perr == cudaSuccess, op, ": kernel setup failed: ", cudaGetErrorString(perr));
  TORCH_CHECK(locks.device() == x.device() && locks.scalar_type() == at::kInt && locks.is_contiguous() &&
                  locks.numel() >= plan.locks,
              op, ": locks must be contiguous int32 zeros on ", x.device(), " with at least ", plan.locks,
              " elements, got ", locks.scalar_type(), " ", locks.sizes());
  at::Tensor ws;
  if (plan.ws_floats > 0) ws = at::empty({plan.ws_floats}, x.options().dtype(at::kFloat));
  const w4a16::GemmArgs a = w4a16_binding::gemm_args(x, qweight, scales, zeros, out);
  const cudaError_t err = w4a16::launch_gemm(a, plan, plan.ws_floats > 0 ? ws.data_ptr<float>() : nullptr,
                                             locks.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": launch failed: ", cudaGetErrorString(err));
}

void cuda_dequantize(const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                     at::Tensor& w) {
  constexpr const char* op = "w4a16._cuda_dequantize";
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == scales.scalar_type(), op,
              ": w must be contiguous [K, N] of the scales' dtype, got ", w.scalar_type(), " ", w.sizes());
  const int64_t K = w.size(0);
  check_weights(op, qweight, scales, zeros, K, w.device(), false);
  TORCH_CHECK(w.size(1) == scales.size(1), op, ": w must have N = ", scales.size(1), " columns, got ", w.size(1));
  const c10::cuda::CUDAGuard guard(w.device());
  device_sms(op);
  const cudaError_t err = w4a16::launch_dequantize(
      qweight.data_ptr<int32_t>(), scales.data_ptr(), zeros.has_value() ? zeros->data_ptr<int32_t>() : nullptr,
      w.data_ptr(), int(K), int(w.size(1)), int(K / scales.size(0)), w.scalar_type() == at::kBFloat16,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": launch failed: ", cudaGetErrorString(err));
}

std::vector<int64_t> cuda_gemm_plan(int64_t M, int64_t K, int64_t N, int64_t G, bool bf16, int64_t bps, int64_t splits,
                                    int64_t scaling, int64_t pdl, int64_t prefetch, int64_t bulk) {
  int major = 0;
  const int sms = device_sms("w4a16._cuda_gemm_plan", &major);
  w4a16::GemmPlan p{};
  const cudaError_t err = w4a16::plan_gemm(int(M), int(K), int(N), int(G), bf16, sms, major,
                                            tuning(bps, splits, scaling, pdl, prefetch, bulk), &p);
  TORCH_CHECK(err == cudaSuccess, "w4a16._cuda_gemm_plan: ", cudaGetErrorString(err));
  return {p.mb,  p.slabs, p.m_chunks,  p.n_cols,     p.k_iters,       p.total,  p.ipb,          p.grid,
          p.ws_floats, p.locks, p.smem_bytes, p.blocks_per_sm, p.f32s, p.max_splits, p.pdl, p.pf, p.bulk};
}

// Never throws (it runs on the backend's host path while capturing): 0 for "not capturing" and for any error.
int64_t cuda_capture_id() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long id = 0;
  if (cudaStreamGetCaptureInfo(c10::cuda::getCurrentCUDAStream().stream(), &status, &id) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return status == cudaStreamCaptureStatusActive ? int64_t(id) : 0;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(w4a16, m) {
  m.def(
      "_cuda_gemm(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor(a!) out, Tensor locks, int bps=0, "
      "int splits=0, int scaling=0, int pdl=0, int prefetch=0, int bulk=0) -> ()");
  m.def("_cuda_dequantize(Tensor qweight, Tensor scales, Tensor? zeros, Tensor(a!) w) -> ()");
  m.def("_cuda_gemm_plan(int M, int K, int N, int G, bool bf16=False, int bps=0, int splits=0, int scaling=0, "
        "int pdl=0, int prefetch=0, int bulk=0) -> int[]",
        &cuda_gemm_plan);
  m.def("_cuda_capture_id() -> int", &cuda_capture_id);
}

TORCH_LIBRARY_IMPL(w4a16, CUDA, m) {
  m.impl("_cuda_gemm", &cuda_gemm);
  m.impl("_cuda_dequantize", &cuda_dequantize);
}
