// Host side of the Hopper wgmma W4A16 GEMM (sm90_gemm.cuh): the partition and the launches, fp16 and bf16, BM = 64
// and 128 rows of M per block.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "sm90_gemm.cuh"
#include "sm90_gemm.h"

namespace w4a16 {
namespace sm90 {

namespace {

int cdiv(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

int log2_exact(int v) {
  int s = 0;
  while ((1 << s) < v) ++s;
  return s;
}

template <typename T, int BM>
cudaError_t launch_t(const KParams& kp, cudaStream_t stream) {
  // Raise the dynamic shared-memory limit once per device for each kernel.
  static bool raised[64] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= 64 || !raised[dev]) {
    err = cudaFuncSetAttribute(gemm_kernel<T, BM>, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg<BM>::SMEM_BYTES);
    if (err != cudaSuccess) return err;
    if (dev < 64) raised[dev] = true;
  }
  const dim3 grid(kp.m_blocks, kp.n_blocks, kp.splits);
  gemm_kernel<T, BM><<<grid, kThreads, Cfg<BM>::SMEM_BYTES, stream>>>(kp);
  if (kp.splits > 1) {
    const long long threads = (long long)kp.m_blocks * kp.n_blocks * kThreads * (kInst * Cfg<BM>::ACC / 4);
    reduce_kernel<T, BM><<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(kp);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t plan(int M, int K, int N, int num_sms, int splits, int bm, Plan* out) {
  if (M <= 0 || K <= 0 || N <= 0 || (bm != 0 && bm != 64 && bm != 128) || splits < 0) return cudaErrorInvalidValue;
  Plan pl{};
  pl.bm = bm ? bm : (M <= 64 ? 64 : 128);
  pl.m_blocks = cdiv(M, pl.bm);
  pl.n_blocks = cdiv(N, kBN);
  pl.kb_total = cdiv(K, kBK);
  if (pl.n_blocks > 65535) return cudaErrorInvalidValue;
  // Split K only when the output tiles leave SMs idle, and never below 4 k-blocks (256 rows of K) per slice: each
  // slice costs a bm x 256 fp32 partial tile written and read back.
  const long long tiles = (long long)pl.m_blocks * pl.n_blocks;
  const long long slots = (long long)(num_sms > 0 ? num_sms : 1) * (pl.bm == 64 ? Cfg<64>::MIN_BLOCKS : Cfg<128>::MIN_BLOCKS);
  int s = 1;
  if (tiles < slots) {
    const long long fill = slots / tiles, most = pl.kb_total / 4 > 1 ? pl.kb_total / 4 : 1;
    s = static_cast<int>(fill < most ? fill : most);
  }
  if (splits > 0) s = splits < pl.kb_total ? splits : pl.kb_total;
  pl.kb_per_split = cdiv(pl.kb_total, s);
  pl.splits = cdiv(pl.kb_total, pl.kb_per_split);  // no empty slice
  if (pl.splits > 65535) return cudaErrorInvalidValue;
  pl.ws_floats = pl.splits > 1 ? (int64_t)pl.splits * tiles * pl.bm * kBN : 0;
  pl.smem_bytes = pl.bm == 64 ? Cfg<64>::SMEM_BYTES : Cfg<128>::SMEM_BYTES;
  *out = pl;
  return cudaSuccess;
}

cudaError_t launch(const Args& a, const Plan& pl, float* ws, cudaStream_t stream) {
  KParams kp{};
  kp.x = a.x;
  kp.lda = a.lda;
  kp.qweight = reinterpret_cast<const int4*>(a.qweight);
  kp.scales = a.scales;
  kp.zeros = reinterpret_cast<const uint32_t*>(a.zeros);
  kp.out = a.out;
  kp.ldo = a.ldo;
  kp.ws = ws;
  kp.M = a.M;
  kp.K = a.K;
  kp.N = a.N;
  kp.Kt = cdiv(a.K, 16);
  kp.Nt = cdiv(a.N, 64);
  kp.ng = a.K / a.G;
  kp.g_shift = kp.ng > 1 ? log2_exact(a.G) : 0;
  kp.kb_total = pl.kb_total;
  kp.kb_per_split = pl.kb_per_split;
  kp.splits = pl.splits;
  kp.m_blocks = pl.m_blocks;
  kp.n_blocks = pl.n_blocks;
  if (pl.splits > 1 && ws == nullptr) return cudaErrorInvalidValue;
  if (a.bf16) return pl.bm == 64 ? launch_t<__nv_bfloat16, 64>(kp, stream) : launch_t<__nv_bfloat16, 128>(kp, stream);
  return pl.bm == 64 ? launch_t<__half, 64>(kp, stream) : launch_t<__half, 128>(kp, stream);
}

}  // namespace sm90
}  // namespace w4a16
