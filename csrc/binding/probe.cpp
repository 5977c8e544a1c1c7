// torch binding of the format probe: torch.ops.w4a16._format_probe(qweight, bf16) -> float [Kt*16, Nt*64].
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "launchers.h"

namespace {

at::Tensor format_probe(const at::Tensor& qweight, bool bf16) {
  TORCH_CHECK(qweight.is_cuda() && qweight.scalar_type() == at::kInt && qweight.dim() == 2 && qweight.is_contiguous(),
              "_format_probe: qweight must be a contiguous int32 CUDA tensor [Kt, Nt * 128], got ", qweight.sizes());
  TORCH_CHECK(qweight.size(1) % 128 == 0, "_format_probe: qweight.shape[1] must be a multiple of 128, got ",
              qweight.size(1));
  const c10::cuda::CUDAGuard guard(qweight.device());
  const int k_tiles = qweight.size(0), n_tiles = qweight.size(1) / 128;
  auto out = at::empty({k_tiles * 16, n_tiles * 64}, qweight.options().dtype(at::kFloat));
  auto err = w4a16::launch_format_probe(qweight.data_ptr<int32_t>(), out.data_ptr<float>(), k_tiles, n_tiles, bf16,
                                        c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "_format_probe: launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(w4a16, m) { m.def("_format_probe(Tensor qweight, bool bf16) -> Tensor"); }

TORCH_LIBRARY_IMPL(w4a16, CUDA, m) { m.impl("_format_probe", &format_probe); }
