// The bf16 instances of the W4A16 GEMM kernel (one file per dtype so the two compile in parallel).
#include "gemm_kernel.cuh"

namespace w4a16 {
namespace gemm {
template cudaError_t launch_gemm_t<__nv_bfloat16>(const KParams&, int, bool, bool, int, bool, cudaStream_t, int*);
}  // namespace gemm
}  // namespace w4a16
