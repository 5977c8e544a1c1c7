// Host side of the Hopper wgmma W4A16 GEMM (sm90_gemm.cuh): the partition and the launches, fp16 and bf16, BM = 64
// and 128 rows of M per block.
#include <cuda.h>
#include <cudaTypedefs.h>
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

// cuTensorMapEncodeTiled from the driver the runtime already loaded (no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// x [M, K] (rows lda elements apart) as a 2-D tensor map of 64 x bm boxes with the 128-byte swizzle the wgmma
// descriptor expects; out-of-range elements read as zero.
cudaError_t x_tensor_map(const KParams& kp, int bm, bool bf16, CUtensorMap* map) {
  const auto encode = encode_fn();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[2] = {(cuuint64_t)kp.K, (cuuint64_t)kp.M};
  const cuuint64_t strides[1] = {(cuuint64_t)kp.lda * 2};
  const cuuint32_t box[2] = {(cuuint32_t)kBK, (cuuint32_t)bm};
  const cuuint32_t elem[2] = {1, 1};
  const CUresult r = encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
                            const_cast<void*>(kp.x), dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
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
  CUtensorMap xmap;
  err = x_tensor_map(kp, BM, std::is_same<T, __nv_bfloat16>::value, &xmap);
  if (err != cudaSuccess) return err;
  const dim3 grid(kp.m_blocks, kp.n_blocks, kp.splits);
  gemm_kernel<T, BM><<<grid, kThreads, Cfg<BM>::SMEM_BYTES, stream>>>(kp, xmap);
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
