// Pieces both GEMM bindings (gemm.cpp, sm90.cpp) need: the current device's properties, cached, and a call's
// arguments as the kernels' GemmArgs.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <optional>

#include "launchers.h"

namespace w4a16_binding {

struct DeviceProps {
  int major, minor, sms;
};

// The current device's compute capability and multiprocessor count, queried once per device (this is on every
// call's host path; a benign race queries twice).
inline DeviceProps device_props(const char* op) {
  static DeviceProps cached[64] = {};  // sms == 0: not queried yet
  int dev = 0;
  TORCH_CHECK(cudaGetDevice(&dev) == cudaSuccess, op, ": cudaGetDevice failed");
  DeviceProps local{};
  DeviceProps& c = dev < 64 ? cached[dev] : local;
  if (c.sms == 0) {
    TORCH_CHECK(cudaDeviceGetAttribute(&c.major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                    cudaDeviceGetAttribute(&c.minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess &&
                    cudaDeviceGetAttribute(&c.sms, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess,
                op, ": cudaDeviceGetAttribute failed");
  }
  return c;
}

// x [M, K] (rows contiguous), the packed weights and out [M, N] (contiguous), already checked by the caller.
inline w4a16::GemmArgs gemm_args(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                                 const std::optional<at::Tensor>& zeros, at::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = scales.size(1);
  w4a16::GemmArgs a{};
  a.x = x.data_ptr();
  a.lda = M <= 1 ? K : x.stride(0);
  a.qweight = qweight.data_ptr<int32_t>();
  a.scales = scales.data_ptr();
  a.zeros = zeros.has_value() ? zeros->data_ptr<int32_t>() : nullptr;
  a.out = out.data_ptr();
  a.ldo = N;
  a.M = int(M);
  a.K = int(K);
  a.N = int(N);
  a.G = int(K / scales.size(0));
  a.bf16 = x.scalar_type() == at::kBFloat16;
  return a;
}

}  // namespace w4a16_binding
