// Host entry points of the Hopper wgmma W4A16 GEMM (sm90_gemm.cu), callable without torch.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "launchers.h"

namespace w4a16 {
namespace sm90 {

// One call's tensors and shape: the mma.sync kernel's GemmArgs (launchers.h), the same contract.
using Args = GemmArgs;

// The grid: m_blocks x n_blocks output tiles of bm x 256, each K range cut into `splits` slices of kb_per_split
// 64-row k-blocks. With splits > 1 every slice writes fp32 partial sums to the workspace and a second kernel adds
// them in slice order (deterministic).
struct Plan {
  int bm;
  int m_blocks, n_blocks, kb_total, kb_per_split, splits;
  int64_t ws_floats;  // fp32 workspace the launch needs (0 when splits == 1)
  int smem_bytes;
};

// splits / bm: overrides for tests and timing sweeps (0 = the default partition).
cudaError_t plan(int M, int K, int N, int num_sms, int splits, int bm, Plan* out);

// ws: plan.ws_floats floats, any contents. Asynchronous on stream. cudaErrorNotSupported when the binary holds no
// sm_90a code for this kernel (the build did not target 9.0a) or the device is not compute capability 9.0.
cudaError_t launch(const Args& args, const Plan& plan, float* ws, cudaStream_t stream);

}  // namespace sm90
}  // namespace w4a16
