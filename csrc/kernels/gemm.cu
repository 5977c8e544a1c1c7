// Host side of the W4A16 GEMM: the partition (plan_gemm), the launch, and the dequantize kernel that the large-M
// path (dequantize once, then a dense GEMM) uses.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "gemm_kernel.cuh"
#include "launchers.h"

namespace w4a16 {
namespace gemm {
extern template cudaError_t launch_gemm_t<__half>(const KParams&, int, bool, bool, int, bool, cudaStream_t, int*);
extern template cudaError_t launch_gemm_t<__nv_bfloat16>(const KParams&, int, bool, bool, int, bool, cudaStream_t, int*);
}  // namespace gemm

namespace {

int cdiv(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

// Scale the fp32 partial sums per stage instead of the 16-bit weights (gemm_kernel.cuh, F32S) by default at MB = 2
// only. Measured (H100, notes/cuda.md run 9): 3-7% faster at M = 32 on 6 shapes, 1-10% slower or equal at M = 1/16.
constexpr bool f32_scale_default(int mb) { return mb == 2; }

// L2 prefetch distance (iterations ahead of the compute) on sm_90 by default; GemmTuning.prefetch overrides it.
// Measured (H200, notes/cuda.md run 10): 2-8 iterations ahead is 0-17% slower on every layer: off.
constexpr int kPrefetchDefault = 0;
// Programmatic dependent launch by default on sm_90? Measured (H200, run 10): 2-12% faster when the previous kernel
// is this one (back-to-back calls), but with an elementwise kernel before each call (a model's norm or activation)
// the PDL variant measured was slower; off until a model-level A/B says otherwise (GemmTuning.pdl = 2 turns it on).
constexpr bool kPdlDefault = false;

int log2_exact(int v) {
  int s = 0;
  while ((1 << s) < v) ++s;
  return s;
}

}  // namespace

cudaError_t plan_gemm(int M, int K, int N, int G, bool bf16, int num_sms, int cc_major, const GemmTuning& tuning,
                      GemmPlan* plan) {
  GemmPlan pl{};
  const int m16 = cdiv(M, 16);
  pl.m_chunks = cdiv(m16, 4);
  pl.mb = cdiv(m16, pl.m_chunks);  // balanced chunks: M = 65 runs as 48 + 17 rows, not 64 + 1
  // fp32 group scaling (MB <= 2 instances): the measured default unless a tuning run asks for one or the other.
  pl.f32s = pl.mb <= 2 && (tuning.scaling == 2 || (tuning.scaling == 0 && f32_scale_default(pl.mb))) ? 1 : 0;
  // The bulk-copy weight ring (an experiment, off unless asked for): MB = 1, 16-bit scaling, sm_90.
  pl.bulk = tuning.bulk == 1 && cc_major >= 9 && pl.mb == 1 && !pl.f32s ? 1 : 0;
  int occupancy = 0;
  gemm::KParams none{};
  const cudaError_t err =
      bf16 ? gemm::launch_gemm_t<__nv_bfloat16>(none, pl.mb, pl.f32s != 0, pl.bulk != 0, 0, false, nullptr, &occupancy)
           : gemm::launch_gemm_t<__half>(none, pl.mb, pl.f32s != 0, pl.bulk != 0, 0, false, nullptr, &occupancy);
  if (err != cudaSuccess) return err;
  pl.blocks_per_sm = tuning.bps > 0 && tuning.bps < occupancy ? tuning.bps : occupancy;
  pl.slabs = gemm::slabs_of(pl.mb);
  pl.k_iters = cdiv(cdiv(K, 16), pl.slabs);
  pl.n_cols = cdiv(cdiv(N, 64), gemm::kWarps);
  const long long total = (long long)pl.m_chunks * pl.n_cols * pl.k_iters;
  pl.total = static_cast<int>(total);
  // Fill every resident block slot, but split a column among at most max_splits blocks: each split costs a
  // workspace slot of rows x 256 fp32 written and read back, which grows with M while the weights do not.
  // Measured (H100, notes/cuda.md run 7): 16 is best for M < 16; from M = 16, 8 is best or within noise on every
  // shape (4096 x 4096 at M = 16: 11.9 us vs 14.8 us at 16 splits; 2112 x 4096 at M = 64: 21.9 vs 26.8 at 4).
  const int rows = M < 16 * pl.mb ? M : 16 * pl.mb;
  int max_splits = rows < 16 ? 16 : 8;
  if (tuning.max_splits > 0) max_splits = tuning.max_splits;
  pl.max_splits = max_splits;
  const int ipb_fill = cdiv(total, (long long)(num_sms > 0 ? num_sms : 1) * pl.blocks_per_sm);
  const int ipb_min = cdiv(pl.k_iters, max_splits);
  pl.ipb = ipb_fill > ipb_min ? ipb_fill : ipb_min;
  pl.grid = cdiv(total, pl.ipb);
  if (total + pl.ipb >= (1LL << 31)) return cudaErrorInvalidValue;  // the kernel indexes iterations in int
  pl.rows_alloc = rows;
  // Stripes that start and end on column boundaries split no column: no cross-block reduction at all.
  pl.ws_floats = (pl.ipb % pl.k_iters) ? (int64_t)pl.grid * 2 * pl.rows_alloc * gemm::kTileN : 0;
  pl.locks = (int64_t)pl.m_chunks * pl.n_cols;
  pl.smem_bytes = gemm::smem_bytes_of(pl.mb);
  // griddepcontrol and bulk L2 prefetches exist from sm_90 on (the kernel compiles them out below it).
  const bool sm90 = cc_major >= 9;
  pl.pdl = sm90 && (tuning.pdl == 2 || (tuning.pdl == 0 && kPdlDefault)) ? 1 : 0;
  pl.pf = !sm90 || tuning.prefetch < 0 ? 0 : tuning.prefetch > 0 ? tuning.prefetch : kPrefetchDefault;
  (void)G;
  *plan = pl;
  return cudaSuccess;
}

cudaError_t launch_gemm(const GemmArgs& a, const GemmPlan& pl, float* ws, int* locks, cudaStream_t stream) {
  gemm::KParams kp{};
  kp.x = a.x;
  kp.lda = a.lda;
  kp.qweight = reinterpret_cast<const int4*>(a.qweight);
  kp.scales = a.scales;
  kp.zeros = reinterpret_cast<const uint32_t*>(a.zeros);
  kp.out = a.out;
  kp.ldo = a.ldo;
  kp.ws = ws;
  kp.locks = locks;
  kp.M = a.M;
  kp.K = a.K;
  kp.N = a.N;
  kp.Kt = cdiv(a.K, 16);
  kp.Nt = cdiv(a.N, 64);
  kp.ng = a.K / a.G;
  kp.G = a.G;
  kp.g_shift = kp.ng > 1 ? log2_exact(a.G) : 0;
  kp.k_iters = pl.k_iters;
  kp.n_cols = pl.n_cols;
  kp.total = pl.total;
  kp.ipb = pl.ipb;
  kp.rows_alloc = pl.rows_alloc;
  kp.evict_first = pl.m_chunks == 1;
  kp.pf = pl.pf;
  if (a.M <= 0 || pl.total <= 0) return cudaSuccess;
  const bool pdl = pl.pdl != 0;
  const bool bulk = pl.bulk != 0;
  if (a.bf16) return gemm::launch_gemm_t<__nv_bfloat16>(kp, pl.mb, pl.f32s != 0, bulk, pl.grid, pdl, stream, nullptr);
  return gemm::launch_gemm_t<__half>(kp, pl.mb, pl.f32s != 0, bulk, pl.grid, pdl, stream, nullptr);
}

// ---------------------------------------------------------------- dequantize

namespace {

// One warp per 16 x 64 tile: its lanes dequantize their fragments (as the GEMM does) into shared memory, then write
// the tile out as 16-byte row pieces of W [K, N].
template <typename T>
__global__ void __launch_bounds__(256) dequant_kernel(const int4* __restrict__ qweight, const uint16_t* __restrict__ scales,
                                                      const uint32_t* __restrict__ zeros, T* __restrict__ w, int K,
                                                      int N, int Nt, int ng, int G) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using O = gemm::Ops<T>;
  __shared__ __align__(16) uint16_t tile[8][16][72];  // rows padded to 144 bytes (16-byte aligned)
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
  const int nt = blockIdx.x * 8 + warp, kt = blockIdx.y;
  if (nt >= Nt) return;  // whole warp; no block-wide barrier below
  const int4 q = qweight[((size_t)kt * Nt + nt) * 32 + lane];
  const int g = ng > 1 ? min(kt * 16 / G, ng - 1) : 0;  // a slab never spans two groups (G >= 32 or G = K)
  const uint32_t words[4] = {uint32_t(q.x), uint32_t(q.y), uint32_t(q.z), uint32_t(q.w)};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t zl[2], zh[2], sc[2];
#pragma unroll
    for (int blk = 0; blk < 2; ++blk) {
      const int n = nt * 64 + 16 * j + 8 * blk + gq;
      const uint32_t s = n < N ? scales[(size_t)g * N + n] : 0u;
      const uint32_t z = (zeros != nullptr && n < N) ? (zeros[(size_t)g * (N / 8) + n / 8] >> (4 * (n % 8))) & 0xF : 8u;
      sc[blk] = s | (s << 16);
      O::zero_bias(z, zl[blk], zh[blk]);
    }
    uint32_t f[4];
    O::dequant(words[j], f, zl[0], zh[0], zl[1], zh[1], sc[0], sc[1]);
    // f[2 blk + h] holds rows (2 tq, 2 tq + 1) + 8 h of column 16 j + 8 blk + gq.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int col = 16 * j + 8 * (i >> 1) + gq, row = 2 * tq + 8 * (i & 1);
      tile[warp][row][col] = uint16_t(f[i] & 0xFFFF);
      tile[warp][row + 1][col] = uint16_t(f[i] >> 16);
    }
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int idx = lane + 32 * i, r = idx >> 3, ch = idx & 7;
    const int k = kt * 16 + r, n = nt * 64 + 8 * ch;
    if (k < K && n < N) *reinterpret_cast<int4*>(w + (size_t)k * N + n) = *reinterpret_cast<const int4*>(&tile[warp][r][8 * ch]);
  }
#endif
}

}  // namespace

cudaError_t launch_dequantize(const int32_t* qweight, const void* scales, const int32_t* zeros, void* w, int K, int N,
                              int G, bool bf16, cudaStream_t stream) {
  const int Kt = cdiv(K, 16), Nt = cdiv(N, 64), ng = K / G;
  if (K <= 0 || N <= 0) return cudaSuccess;
  dim3 grid(cdiv(Nt, 8), Kt);
  const int4* q = reinterpret_cast<const int4*>(qweight);
  const uint16_t* s = static_cast<const uint16_t*>(scales);
  const uint32_t* z = reinterpret_cast<const uint32_t*>(zeros);
  if (bf16)
    dequant_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(q, s, z, static_cast<__nv_bfloat16*>(w), K, N, Nt, ng, G);
  else
    dequant_kernel<__half><<<grid, 256, 0, stream>>>(q, s, z, static_cast<__half*>(w), K, N, Nt, ng, G);
  return cudaGetLastError();
}

}  // namespace w4a16
