// Host entry points of the kernels, callable without torch (the binding in csrc/binding calls them).
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

namespace w4a16 {

// out: float [k_tiles * 16, n_tiles * 64], the symmetric (q - 8) weight as the tensor cores see it.
cudaError_t launch_format_probe(const int32_t* qweight, float* out, int k_tiles, int n_tiles, bool bf16,
                                cudaStream_t stream);


// ---- The W4A16 GEMM (gemm_*.cu). out[M, N] = x[M, K] @ dequantize(qweight, scales, zeros). ----

// One call's tensors and shape. x: [M, K] rows lda elements apart (lda % 8 == 0, x 16-byte aligned, K % 8 == 0);
// qweight: the packed format (int32 [ceil(K/16), ceil(N/64)*128]); scales: T [K/G, N]; zeros: int32 [K/G, N/8] or
// nullptr (symmetric, z = 8); out: T [M, N], rows ldo elements apart. T is bf16 when bf16, else fp16.
struct GemmArgs {
  const void* x;
  int64_t lda;
  const int32_t* qweight;
  const void* scales;
  const int32_t* zeros;
  void* out;
  int64_t ldo;
  int M, K, N, G;
  bool bf16;
};

// How a call is cut up (plan_gemm). The grid walks m_chunks x n_cols x k_iters iterations in stripes of ipb.
struct GemmPlan {
  int mb;             // 16-row mma blocks per M chunk (1..4)
  int slabs;          // 16-row slabs per pipeline stage (a block owns 256 columns, 4 warps of 64)
  int f32s;           // 1: the instance scales fp32 partial sums per stage (MB <= 2), 0: the 16-bit weights
  int blocks_per_sm;  // resident blocks per SM the grid is sized for
  int m_chunks, n_cols, k_iters, total, ipb, grid;
  int max_splits;     // most blocks one column is split between (the stripe length keeps to it)
  int rows_alloc;     // rows of one reduction slot: min(M, 16 * mb)
  int64_t ws_floats;  // float workspace the launch needs (0: no column is split between blocks)
  int64_t locks;      // int32 counters the launch needs, all zero before and after it
  int smem_bytes;
  int pdl;            // 1: launched with programmatic stream serialization (sm_90)
  int bulk;           // 1: the bulk-copy weight ring instance (sm_90, MB = 1)
  int pf;             // L2 prefetch distance in iterations (0: none)
};

// Overrides of the partition's measured defaults (0 = default), for timing sweeps and tests. bps: at most this many
// blocks per SM; max_splits: at most this many blocks per column; scaling: 1 = scale the 16-bit weights, 2 = scale
// fp32 partial sums per stage (MB <= 2); pdl: 1 = plain launch, 2 = programmatic dependent launch on sm_90 (0: the
// default, gemm.cu kPdlDefault);
// prefetch: -1 = no L2 prefetch, n > 0 = prefetch the weights n iterations ahead (sm_90); bulk: 1 = the bulk-copy
// weight ring at MB = 1 with 16-bit scaling (sm_90; an experiment, else ignored).
struct GemmTuning {
  int bps = 0;
  int max_splits = 0;
  int scaling = 0;
  int pdl = 0;
  int prefetch = 0;
  int bulk = 0;
};

// The partition of one call on the current device. num_sms: its multiprocessors; cc_major: its compute capability's
// major number. Sets the kernel's shared-memory attribute (once per device), launches nothing.
cudaError_t plan_gemm(int M, int K, int N, int G, bool bf16, int num_sms, int cc_major, const GemmTuning& tuning,
                      GemmPlan* plan);

// ws: ws_floats floats (any contents); locks: plan.locks zeros (left zero). Asynchronous on stream.
cudaError_t launch_gemm(const GemmArgs& args, const GemmPlan& plan, float* ws, int* locks, cudaStream_t stream);

// w: T [K, N] row-major = dequantize(qweight, scales, zeros), each element rounded to T once.
cudaError_t launch_dequantize(const int32_t* qweight, const void* scales, const int32_t* zeros, void* w, int K, int N,
                              int G, bool bf16, cudaStream_t stream);

}  // namespace w4a16
