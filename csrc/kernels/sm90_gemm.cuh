// The Hopper W4A16 GEMM for M >= 32: out[M, N] = x[M, K] @ W with W = (q - z) * s in the packed format of
// w4a16_ops/format.py, on wgmma (sm_90a). No torch headers. Included by sm90_gemm.cu.
//
// The transposed product. out^T [N, M] = W^T [N, K] x^T [K, M]: W^T is wgmma's A operand, taken from registers, and
// x (K contiguous) is its B operand, read from a 128-byte-swizzled shared-memory tile. Word 4L + j of a 16 x 64
// format tile is exactly lane L's A fragment (mma.m16n8k16 layout) of the 16 x 16 sub-tile j of W^T, so a lane
// dequantizes the words it loads straight into A registers: no shuffle, no shared-memory round trip for the
// dequantized weights.
//
// Work split. A block is two warpgroups and owns 256 output columns (four format tiles) x BM rows of M; each
// warpgroup owns two tiles and issues two m64 x nBM x k16 wgmmas per 16-row slab: warp w handles the sub-tiles
// j = 2 (w % 2) + i (i = 0, 1) of tile w / 2 (one 8-byte shared load per lane per slab). The K range can be cut into
// slices (split-K) when the output tiles alone cannot fill the GPU; slices then write fp32 partial sums in their
// registers' order to a workspace and reduce_kernel adds them in slice order, so results are deterministic and no
// counters or atomics are involved.
//
// Pipeline. Each 64-row k-block is one stage of a shared-memory ring: the x tile comes by the tensor copy engine
// (TMA, 128-byte swizzle, zeros past M and K, completing on the stage's mbarrier), the weights of 4 slabs x 4 tiles,
// two scale rows and two zero-word rows by cp.async (read back with ordinary loads: no proxy fence, which would
// also wait for the later stages' copies in flight). The ring holds of kStages shared-memory stages, kAhead stages ahead of the math. Dequantization is the
// CUDA kernel's (gemm::Ops<T>: lop3 magic numbers, zero point pre-biased, scale in 16-bit: one rounding), two slabs
// at a time, into A registers per slab: the dequantization of a pair overlaps the wgmmas of the pair before, which
// stay in flight across the stage boundary too (the tensor cores never drain between stages). So a stage's buffer is refilled two
// stages after it was read (kAhead = kStages - 2), when every wgmma that read it has completed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <cuda.h>  // CUtensorMap (a plain struct: no driver library is linked)

#include "gemm_kernel.cuh"
#include "sm90_wgmma.cuh"

namespace w4a16 {
namespace sm90 {

constexpr int kWarpgroups = 2;
constexpr int kThreads = 128 * kWarpgroups;
constexpr int kInst = 2;                            // wgmmas (64 output columns each) per warpgroup per slab
constexpr int kBN = 64 * kInst * kWarpgroups;       // output columns per block: 4 format tiles
constexpr int kTiles = kBN / 64;
constexpr int kBK = 64;                             // K rows per stage: 4 slabs, one 128-byte x row
constexpr int kSlabs = kBK / 16;
constexpr int kStages = 5;
constexpr int kAhead = kStages - 2;                 // stages loaded ahead of the one being computed
constexpr int kOutPitch = kBN + 8;                  // epilogue tile row, padded against bank conflicts

// Everything the kernels read, by value.
struct KParams {
  const void* x;
  long long lda;
  const int4* qweight;    // [Kt][Nt * 32] int4
  const void* scales;     // [ng][N]
  const uint32_t* zeros;  // [ng][N / 8] or nullptr
  void* out;
  long long ldo;
  float* ws;              // splits > 1: [splits][m_blocks][n_blocks][ACC / 4][kThreads] float4
  int M, K, N, Kt, Nt, ng, g_shift;
  int kb_total, kb_per_split, splits, m_blocks, n_blocks;
};

template <int BM>
struct Cfg {
  static_assert(BM == 64 || BM == 128, "wgmma N of this kernel");
  static constexpr int ACC = BM / 2;                     // fp32 accumulators per thread per wgmma
  static constexpr int X_BYTES = BM * 128;               // the x tile: BM rows of 64 elements
  static constexpr int W_BYTES = kSlabs * kTiles * 512;  // [slab][tile] 512-byte slab chunks of the format
  static constexpr int S_BYTES = 2 * kBN * 2;            // two scale rows (slabs 0-1 and 2-3: G = 32 needs both)
  static constexpr int Z_BYTES = 2 * kBN / 8 * 4;        // two rows of zero words
  static constexpr int STAGE_BYTES = (X_BYTES + W_BYTES + S_BYTES + Z_BYTES + 1023) / 1024 * 1024;
  static constexpr int OUT_BYTES = BM * kOutPitch * 2;
  static constexpr int RING_BYTES = kStages * STAGE_BYTES;
  static constexpr int SMEM_BYTES = (RING_BYTES > OUT_BYTES ? RING_BYTES : OUT_BYTES) + 1024 + 64;  // + alignment
                                                                                                // slack, mbarriers
  static constexpr int MIN_BLOCKS = BM == 64 ? 2 : 1;
};

__device__ __forceinline__ uint8_t* align1024(uint8_t* p) {
  const uint32_t a = gemm::smem_addr(p);
  return p + ((1024 - (a & 1023)) & 1023);
}

__device__ __forceinline__ void cp_async4_zfill(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(gemm::smem_addr(dst)), "l"(src),
               "r"(valid ? 4 : 0));
}

__device__ __forceinline__ int group_of(const KParams& p, int k) {
  if (p.ng == 1) return 0;
  const int g = k >> p.g_shift;
  return g < p.ng ? g : p.ng - 1;  // rows past K (the last stage's tail) read the last group; their x is zero
}

// The block-local output column (row of W^T) that thread tid's wgmma i accumulates in its first n8 block (the
// second is 8 further): warp w of warpgroup wg takes sub-tile 2 (w % 2) + i of the block's tile 2 wg + w / 2.
__device__ __forceinline__ int wt_row(int tid, int i) {
  const int lane = tid & 31, warp = (tid >> 5) & 3, wg = tid >> 7;
  return (wg * kInst + (warp >> 1)) * 64 + 16 * (2 * (warp & 1) + i) + (lane >> 2);
}

// The output tile from the accumulators: through shared memory (padded rows) so global stores are 16-byte and
// coalesced; rows past M and columns past N are not written.
template <typename T, int BM>
__device__ __forceinline__ void store_tile(const KParams& p, float (&acc)[kInst][Cfg<BM>::ACC], uint8_t* smem,
                                           int mb, int nb) {
  const int tid = threadIdx.x, t4 = tid & 3;
  T* tile = reinterpret_cast<T*>(smem);
#pragma unroll
  for (int i = 0; i < kInst; ++i) {
    const int n = wt_row(tid, i);
#pragma unroll
    for (int c = 0; c < BM / 8; ++c) {
      const int m = 8 * c + 2 * t4;
      const float2 lo = make_float2(acc[i][4 * c + 0], acc[i][4 * c + 1]);  // (n, m), (n, m + 1)
      const float2 hi = make_float2(acc[i][4 * c + 2], acc[i][4 * c + 3]);  // (n + 8, m), (n + 8, m + 1)
      tile[m * kOutPitch + n] = w4a16::from_float<T>(lo.x);
      tile[(m + 1) * kOutPitch + n] = w4a16::from_float<T>(lo.y);
      tile[m * kOutPitch + n + 8] = w4a16::from_float<T>(hi.x);
      tile[(m + 1) * kOutPitch + n + 8] = w4a16::from_float<T>(hi.y);
    }
  }
  __syncthreads();
  constexpr int CHUNKS = kBN / 8;  // 16-byte chunks per row
  T* out = static_cast<T*>(p.out);
  const int m0 = mb * BM, n0 = nb * kBN;
#pragma unroll 4
  for (int c = tid; c < BM * CHUNKS; c += kThreads) {
    const int r = c / CHUNKS, ch = c % CHUNKS;
    const int m = m0 + r, n = n0 + ch * 8;
    if (m < p.M && n < p.N)
      *reinterpret_cast<int4*>(out + (long long)m * p.ldo + n) =
          *reinterpret_cast<const int4*>(tile + r * kOutPitch + ch * 8);
  }
}

template <int BM>
__device__ __forceinline__ float4* ws_slot(const KParams& p, int split, int mb, int nb) {
  const long long block = ((long long)split * p.m_blocks + mb) * p.n_blocks + nb;
  return reinterpret_cast<float4*>(p.ws) + block * (kInst * Cfg<BM>::ACC / 4) * kThreads + threadIdx.x;
}

template <typename T, int BM>
__global__ void __launch_bounds__(kThreads, Cfg<BM>::MIN_BLOCKS)
    gemm_kernel(const KParams p, const __grid_constant__ CUtensorMap xmap) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Cfg<BM>;
  using O = gemm::Ops<T>;
  constexpr bool BF16 = std::is_same<T, __nv_bfloat16>::value;
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = align1024(smem_raw);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + (C::RING_BYTES > C::OUT_BYTES ? C::RING_BYTES : C::OUT_BYTES));

  const int tid = threadIdx.x, lane = tid & 31, warp = (tid >> 5) & 3, wg = tid >> 7;
  const int g = lane >> 2;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) mbar_init(&bars[s], 1);
    mbar_fence_init();
  }
  __syncthreads();
  const int mb = blockIdx.x, nb = blockIdx.y, split = blockIdx.z;
  const int m0 = mb * BM;
  const int kb0 = split * p.kb_per_split;
  const int nkb = min(p.kb_total, kb0 + p.kb_per_split) - kb0;  // >= 1: plan() leaves no empty slice
  const bool has_zeros = p.zeros != nullptr;
  const long long q_row = (long long)p.Nt * 32;  // int4 per slab row of qweight
  const T* scales = static_cast<const T*>(p.scales);
  const int zrow = p.N / 8;

  auto load_stage = [&](int buf, int kb) {
    uint8_t* st = smem + buf * C::STAGE_BYTES;
    // Weights: 4 slabs x 4 tiles x 32 chunks of 16 bytes, [slab][tile][chunk], zero past K and N storage.
#pragma unroll
    for (int r = 0; r < C::W_BYTES / 16 / kThreads; ++r) {
      const int c = tid + r * kThreads;
      const int slab = c >> 7, tile = (c >> 5) & 3, ch = c & 31;
      const int kt = kb * kSlabs + slab, nt = nb * kTiles + tile;
      const bool ok = kt < p.Kt && nt < p.Nt;
      const int4* src = ok ? p.qweight + kt * q_row + nt * 32 + ch : p.qweight;
      gemm::cp_async16_zfill(st + C::X_BYTES + c * 16, src, ok);
    }
    // x: the BM x 64 box at (k, m) = (64 kb, m0); the copy engine applies the 128-byte swizzle.
    if (tid == 0) {
      mbar_expect_tx(&bars[buf], C::X_BYTES);
      tma_load_2d(st, &xmap, &bars[buf], kb * kBK, m0);
    }
    // Scales: rows of slabs 0-1 and 2-3 (one group unless G = 32), 32 chunks each; zero words likewise, 4 bytes.
    if (tid < 64) {
      const int r = tid >> 5, ch = tid & 31;
      const int n = nb * kBN + ch * 8;
      const bool ok = n < p.N;
      const T* src = ok ? scales + (long long)group_of(p, kb * kBK + 32 * r) * p.N + n : scales;
      gemm::cp_async16_zfill(st + C::X_BYTES + C::W_BYTES + r * (kBN * 2) + ch * 16, src, ok);
    } else if (tid < 128 && has_zeros) {
      const int r = (tid - 64) >> 5, w = tid & 31;
      const int word = nb * (kBN / 8) + w;
      const bool ok = word < zrow;
      const uint32_t* src = ok ? p.zeros + (long long)group_of(p, kb * kBK + 32 * r) * zrow + word : p.zeros;
      cp_async4_zfill(st + C::X_BYTES + C::W_BYTES + C::S_BYTES + r * (kBN / 2) + w * 4, src, ok);
    }
  };

  float acc[kInst][C::ACC];
#pragma unroll
  for (int i = 0; i < kInst; ++i)
#pragma unroll
    for (int j = 0; j < C::ACC; ++j) acc[i][j] = 0.f;

  // This thread's two W^T rows per wgmma: columns n_i (first n8 block) and n_i + 8 of the block.
  const int tile = wg * kInst + (warp >> 1);
  int ncol[kInst];
#pragma unroll
  for (int i = 0; i < kInst; ++i) ncol[i] = wt_row(tid, i);

#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < nkb) load_stage(s, kb0 + s);
    gemm::cp_async_commit();
  }

  uint32_t a[kSlabs][kInst][4];  // A fragments of a stage; a pair is rewritten once its previous wgmmas completed
  for (int it = 0; it < nkb; ++it) {
    gemm::cp_async_wait<kAhead - 1>();
    // Stage `it`'s cp.async data landed for every thread, and every warpgroup is past its second wait of stage
    // it - 1, so the wgmmas of stage it - 2 are complete: its buffer, (it + kAhead) % kStages, can be refilled.
    __syncthreads();
    if (it + kAhead < nkb) load_stage((it + kAhead) % kStages, kb0 + it + kAhead);
    gemm::cp_async_commit();

    const uint8_t* st = smem + (it % kStages) * C::STAGE_BYTES;
    const uint32_t xaddr = gemm::smem_addr(st);
    mbar_wait(&bars[it % kStages], (it / kStages) & 1);  // the x tile (TMA) landed
    // Scale and zero-point constants of this thread's columns for the two scale rows of the stage.
    uint32_t sa[2][kInst], sb[2][kInst], zla[2][kInst], zha[2][kInst], zlb[2][kInst], zhb[2][kInst];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const uint16_t* srow = reinterpret_cast<const uint16_t*>(st + C::X_BYTES + C::W_BYTES + r * (kBN * 2));
      const uint32_t* zr = reinterpret_cast<const uint32_t*>(st + C::X_BYTES + C::W_BYTES + C::S_BYTES + r * (kBN / 2));
#pragma unroll
      for (int i = 0; i < kInst; ++i) {
        const uint32_t s0 = srow[ncol[i]], s1 = srow[ncol[i] + 8];
        sa[r][i] = s0 | (s0 << 16);
        sb[r][i] = s1 | (s1 << 16);
        uint32_t z0 = 8, z1 = 8;
        if (has_zeros) {
          z0 = (zr[ncol[i] >> 3] >> (4 * g)) & 15;
          z1 = (zr[(ncol[i] >> 3) + 1] >> (4 * g)) & 15;
        }
        O::zero_bias(z0, zla[r][i], zha[r][i]);
        O::zero_bias(z1, zlb[r][i], zhb[r][i]);
      }
    }
    const uint8_t* wq = st + C::X_BYTES + tile * 512 + 16 * lane + 8 * (warp & 1);
    // Slabs in groups of SG (BM = 128: pairs, one scale row each): 2 SG independent dequantization chains between
    // two waits, so the latency of one chain no longer sits between consecutive wgmma issues (ncu, v3: 33% of
    // stalls were fixed-latency dependencies, tensor pipe 58% busy). BM = 64 keeps single slabs: its registers are
    // budgeted for two blocks per SM.
    constexpr int SG = BM == 128 ? 2 : 1;
#pragma unroll
    for (int sg = 0; sg < kSlabs / SG; ++sg) {
      uint2 q[SG];
#pragma unroll
      for (int u = 0; u < SG; ++u) q[u] = *reinterpret_cast<const uint2*>(wq + (SG * sg + u) * kTiles * 512);
      wgmma_wait<1>();  // the group before the one in flight is complete, the previous stage's group sg with it
#pragma unroll
      for (int u = 0; u < SG; ++u)
#pragma unroll
        for (int i = 0; i < kInst; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) pin(a[SG * sg + u][i][j]);
#pragma unroll
      for (int u = 0; u < SG; ++u) {
        const int sl = SG * sg + u, r = sl >> 1;  // scale row: slabs 0-1 and 2-3
        const uint32_t qw[2] = {q[u].x, q[u].y};
#pragma unroll
        for (int i = 0; i < kInst; ++i) {
          uint32_t f[4];
          O::dequant(qw[i], f, zla[r][i], zha[r][i], zlb[r][i], zhb[r][i], sa[r][i], sb[r][i]);
          // B fragments of two n8 blocks (f0, f1 | f2, f3) -> A fragment rows g, g + 8 and k halves.
          a[sl][i][0] = f[0];
          a[sl][i][1] = f[2];
          a[sl][i][2] = f[1];
          a[sl][i][3] = f[3];
        }
      }
      wgmma_fence();
#pragma unroll
      for (int u = 0; u < SG; ++u) {
        const uint64_t desc = smem_desc_sw128(xaddr + 32 * (SG * sg + u));
#pragma unroll
        for (int i = 0; i < kInst; ++i) Wgmma<BM, BF16>::run(acc[i], a[SG * sg + u][i], desc);
      }
      wgmma_commit();
    }
  }
  wgmma_wait<0>();
#pragma unroll
  for (int b = 0; b < kSlabs; ++b)
#pragma unroll
    for (int i = 0; i < kInst; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) pin(a[b][i][j]);
#pragma unroll
  for (int i = 0; i < kInst; ++i)
#pragma unroll
    for (int j = 0; j < C::ACC; ++j) pin(acc[i][j]);
  gemm::cp_async_wait<0>();
  __syncthreads();  // the ring is free: the epilogue reuses it

  if (p.splits == 1) {
    store_tile<T, BM>(p, acc, smem, mb, nb);
  } else {
    float4* dst = ws_slot<BM>(p, split, mb, nb);
#pragma unroll
    for (int v = 0; v < kInst * C::ACC / 4; ++v) {
      const int i = v / (C::ACC / 4), j = 4 * (v % (C::ACC / 4));
      dst[v * kThreads] = make_float4(acc[i][j], acc[i][j + 1], acc[i][j + 2], acc[i][j + 3]);
    }
  }
#else
  __trap();  // not built for sm_90a: the host never launches this (w4a16_ops/backends/cuda.py checks the build)
#endif
}

// Split-K: adds the slices' partial sums in slice order and stores them. One thread per float4 of a block's
// registers (all tiles at once, so every SM takes part): it knows which gemm_kernel thread and registers the float4
// came from, hence their (m, n).
template <typename T, int BM>
__global__ void __launch_bounds__(256) reduce_kernel(const KParams p) {
  using C = Cfg<BM>;
  constexpr int V = kInst * C::ACC / 4;  // float4 per gemm_kernel thread
  const long long per_split = (long long)p.m_blocks * p.n_blocks * V * kThreads;
  const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= per_split) return;
  const int tid = static_cast<int>(e % kThreads), v = static_cast<int>((e / kThreads) % V);
  const long long blk = e / ((long long)kThreads * V);
  const int nb = static_cast<int>(blk % p.n_blocks), mb = static_cast<int>(blk / p.n_blocks);
  const float4* src = reinterpret_cast<const float4*>(p.ws) + e;
  float4 sum = src[0];
  for (int s = 1; s < p.splits; ++s) {
    const float4 f = src[s * per_split];
    sum.x += f.x;
    sum.y += f.y;
    sum.z += f.z;
    sum.w += f.w;
  }
  // Registers j..j + 3 of wgmma i: (n, m), (n, m + 1), (n + 8, m), (n + 8, m + 1) with m = 8 (j / 4) + 2 (lane % 4).
  const int i = v / (C::ACC / 4), j = 4 * (v % (C::ACC / 4));
  const int n = nb * kBN + wt_row(tid, i);
  const int m = mb * BM + 8 * (j / 4) + 2 * (tid & 3);
  T* out = static_cast<T*>(p.out);
  const float vals[4] = {sum.x, sum.y, sum.z, sum.w};
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int mm = m + (r & 1), nn = n + 8 * (r >> 1);
    if (mm < p.M && nn < p.N) out[(long long)mm * p.ldo + nn] = w4a16::from_float<T>(vals[r]);
  }
}

}  // namespace sm90
}  // namespace w4a16
