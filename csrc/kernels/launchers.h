// Host entry points of the kernels, callable without torch (the binding in csrc/binding calls them).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace w4a16 {

// out: float [k_tiles * 16, n_tiles * 64], the symmetric (q - 8) weight as the tensor cores see it.
cudaError_t launch_format_probe(const int32_t* qweight, float* out, int k_tiles, int n_tiles, bool bf16,
                                cudaStream_t stream);

}  // namespace w4a16
