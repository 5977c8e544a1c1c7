// The W4A16 GEMM kernel (Marlin-class): out[M, N] = x[M, K] @ W, W = (q - z) * s in the packed format of
// w4a16_ops/format.py. No torch headers: compiles with plain nvcc. Included by gemm_f16.cu / gemm_bf16.cu, which
// instantiate it for one dtype each (so the two build in parallel), seven instances each (MB = 1..4, MB <= 2 with
// fp32 group scaling, and the bulk-copy weight ring experiment at MB = 1).
//
// Work split. A block is 4 warps side by side along N: it owns 256 columns, each warp one 64-column tile of the
// format, and every warp streams ALL the 16-row slabs of each pipeline stage for its tile (SLABS = 8 or 4 per stage),
// so per-stage overhead (barrier, copy setup, scale loads) is spread over 4-8 KB of weights per warp and no
// reduction inside the block is needed. M is cut into chunks of 16 * MB rows. The iteration space
// m_chunk x n_col x k_iter is walked column by column and cut into equal stripes of ipb iterations, one per block
// (Marlin's "striped" partition; the grid is sized to the blocks that fit on all SMs at once): every SM streams the
// same amount of weight whatever the shape, and a column whose K range spans several blocks is reduced across them.
//
// Pipeline. cp.async copies each stage's weights (L2 evict-first when each weight is read once; each thread copies
// exactly the 16 bytes per slab that its own lane will use as mma B fragments), x tile, scales and zeros into a
// ring of STAGES shared-memory buffers, STAGES - 1 ahead of the compute. x goes through ldmatrix from an
// XOR-swizzled tile; weights are dequantized with lop3 magic numbers (zero point pre-biased, scale in 16-bit: one
// rounding); mma.sync m16n8k16 accumulates in fp32.
//
// Launch. On sm_90 the host may launch with programmatic dependent launch: everything a previous kernel may write
// (x, scales, zeros, weights, workspace, counters, out) is read or written only after griddepcontrol.wait; before it
// only L2 prefetch hints run.
//
// Cross-block reduction, deterministic. Each contributor to a split column writes its fp32 partial into its own
// workspace slot (block, first-or-last column of its stripe), then bumps the column's counter; the block that brings
// it to the number of contributors adds the slots in contributor order, writes out, and puts the counter back to
// zero. So the workspace needs no initial state and the counters are zero before and after every launch
// (CUDA-graph and torch.compile safe; no host synchronization, no allocation here).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#include "dequant.cuh"
#include "launchers.h"

namespace w4a16 {
namespace gemm {

// Everything the kernel reads, by value.
struct KParams {
  const void* x;
  long long lda;
  const int4* qweight;   // [Kt][Nt * 32] int4 (a 16 x 64 tile = 32 int4, lane L's share at int4 L)
  const void* scales;    // [ng][N]
  const uint32_t* zeros; // [ng][N / 8] or nullptr
  void* out;
  long long ldo;
  float* ws;
  int* locks;
  int M, K, N, Kt, Nt;
  int ng, g_shift;       // number of groups; log2(G) when ng > 1
  int G;
  int k_iters, n_cols, total, ipb, rows_alloc;
  int evict_first;       // 1: weights are read once (one M chunk): ask L2 to evict them first
  int pf;                // L2 prefetch distance in iterations (0: none; sm_90 only)
};

// ---------------------------------------------------------------- PTX helpers

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}

// Copies 16 bytes if valid, else writes 16 zero bytes (src is not read).
__device__ __forceinline__ void cp_async16_zfill(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async16_hint(void* dst, const void* src, uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "l"(policy));
}

__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(dst)), "l"(src));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Asks L2 to fetch [src, src + bytes) (bytes % 16 == 0, src 16-byte aligned) without waiting. A hint only: it
// changes no value any load returns, so it may run before griddepcontrol.wait whatever the previous kernel writes.
__device__ __forceinline__ void prefetch_l2(const void* src, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(src), "r"(bytes) : "memory");
#endif
}

// Bulk-copy weight ring (BULK instances, sm_90): one thread copies a stage's weights with cp.async.bulk, completing
// on the slot's mbarrier; every thread waits on that barrier's phase before reading the slot.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr bool kBulkArch = true;
#else
constexpr bool kBulkArch = false;
#endif

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
#endif
}

// This thread's arrival, announcing `bytes` of bulk copies that complete on the barrier.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
#endif
}

// Waits until the barrier's phase with this parity has completed. Bounded (about 2 s of SM clock): a barrier that
// never completes would be a bug; trapping turns a hang of the whole GPU stream into an error.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  long long t0 = 0;
  for (;;) {
    uint32_t done;
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
    if (done) return;
    const long long now = clock64();
    if (t0 == 0) t0 = now;
    else if (now - t0 > (4LL << 30)) __trap();
  }
#endif
}

// bytes (% 16 == 0) from global src to shared dst (both 16-byte aligned), counted on bar when they land.
__device__ __forceinline__ void bulk_copy_g2s(void* dst, const void* src, uint32_t bytes, uint64_t* bar,
                                              uint64_t policy) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;\n" ::"r"(
          smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar)), "l"(policy)
      : "memory");
#endif
}

// Orders this thread's (and, after a barrier, the block's) earlier generic-proxy shared-memory accesses before its
// later async-proxy ones (the bulk copy refilling a slot the warps just read).
__device__ __forceinline__ void fence_proxy_async_smem() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Programmatic dependent launch (sm_90; no-ops when the launch did not ask for it). wait: returns once the
// kernels this one depends on have finished and their writes are visible; launch_dependents: the next kernel
// launched with programmatic stream serialization may start (it still waits for all of this one before reading).
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void grid_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

// (a & b) | c in one instruction. Not volatile (unlike dequant.cuh's): a pure register op the compiler may schedule.
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

__device__ __forceinline__ uint64_t evict_normal_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&a)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(smem_addr(p)));
}

// ---------------------------------------------------------------- per-dtype pieces

template <typename T>
struct Ops;

template <>
struct Ops<__half> {
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // The zero point z of one column as the two biased constants the dequantization subtracts, each in both halves:
  // lo = 1024 + z (0x6400 | z), hi = -(64 + z) (0xD400 | z << 4). Exact in fp16.
  __device__ __forceinline__ static void zero_bias(uint32_t z, uint32_t& lo, uint32_t& hi) {
    lo = 0x6400u | z;
    lo |= lo << 16;
    hi = 0xD400u | (z << 4);
    hi |= hi << 16;
  }
  // One word -> the B fragments of two n8 blocks (a: first, b: second), (q - z) * s, s and z per column.
  __device__ __forceinline__ static void dequant(uint32_t q, uint32_t (&f)[4], uint32_t zlo_a, uint32_t zhi_a,
                                                 uint32_t zlo_b, uint32_t zhi_b, uint32_t s_a, uint32_t s_b) {
    const uint32_t LO = 0x000f000f, HI = 0x00f000f0, EXP = 0x64006400;
    const uint32_t lo0 = lop3_and_or(q, LO, EXP), hi0 = lop3_and_or(q, HI, EXP);
    q >>= 8;
    const uint32_t lo1 = lop3_and_or(q, LO, EXP), hi1 = lop3_and_or(q, HI, EXP);
    const __half2 sixteenth = u2h(0x2C002C00u);
    // lo: (1024 + n) - (1024 + z); hi: (1024 + 16 n) / 16 - (64 + z); both exact, then one rounding by * s.
    f[0] = h2u(__hmul2(__hsub2(u2h(lo0), u2h(zlo_a)), u2h(s_a)));
    f[1] = h2u(__hmul2(__hfma2(u2h(hi0), sixteenth, u2h(zhi_a)), u2h(s_a)));
    f[2] = h2u(__hmul2(__hsub2(u2h(lo1), u2h(zlo_b)), u2h(s_b)));
    f[3] = h2u(__hmul2(__hfma2(u2h(hi1), sixteenth, u2h(zhi_b)), u2h(s_b)));
  }
  // The same fragments unscaled: q - z exactly (F32S instances scale the fp32 partial sums instead).
  __device__ __forceinline__ static void dequant_exact(uint32_t q, uint32_t (&f)[4], uint32_t zlo_a, uint32_t zhi_a,
                                                       uint32_t zlo_b, uint32_t zhi_b) {
    const uint32_t LO = 0x000f000f, HI = 0x00f000f0, EXP = 0x64006400;
    const uint32_t lo0 = lop3_and_or(q, LO, EXP), hi0 = lop3_and_or(q, HI, EXP);
    q >>= 8;
    const uint32_t lo1 = lop3_and_or(q, LO, EXP), hi1 = lop3_and_or(q, HI, EXP);
    const __half2 sixteenth = u2h(0x2C002C00u);
    f[0] = h2u(__hsub2(u2h(lo0), u2h(zlo_a)));
    f[1] = h2u(__hfma2(u2h(hi0), sixteenth, u2h(zhi_a)));
    f[2] = h2u(__hsub2(u2h(lo1), u2h(zlo_b)));
    f[3] = h2u(__hfma2(u2h(hi1), sixteenth, u2h(zhi_b)));
  }
  __device__ __forceinline__ static float2 to_float2(uint32_t v) { return __half22float2(u2h(v)); }
  __device__ __forceinline__ static uint32_t pack(float a, float b) { return h2u(__floats2half2_rn(a, b)); }
  __device__ __forceinline__ static __half2 u2h(uint32_t u) {
    __half2 h;
    memcpy(&h, &u, 4);
    return h;
  }
  __device__ __forceinline__ static uint32_t h2u(__half2 h) {
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
  }
};

template <>
struct Ops<__nv_bfloat16> {
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // bf16 has 7 mantissa bits: every nibble is or-ed under 128.0 after a shift; lo = 128 + z (0x4300 | z).
  __device__ __forceinline__ static void zero_bias(uint32_t z, uint32_t& lo, uint32_t& hi) {
    lo = 0x4300u | z;
    lo |= lo << 16;
    hi = lo;
  }
  __device__ __forceinline__ static void dequant(uint32_t q, uint32_t (&f)[4], uint32_t zlo_a, uint32_t /*zhi_a*/,
                                                 uint32_t zlo_b, uint32_t /*zhi_b*/, uint32_t s_a, uint32_t s_b) {
    const uint32_t LO = 0x000f000f, EXP = 0x43004300;
    const uint32_t r0 = lop3_and_or(q, LO, EXP), r1 = lop3_and_or(q >> 4, LO, EXP), r2 = lop3_and_or(q >> 8, LO, EXP),
                   r3 = lop3_and_or(q >> 12, LO, EXP);
    f[0] = h2u(__hmul2(__hsub2(u2h(r0), u2h(zlo_a)), u2h(s_a)));
    f[1] = h2u(__hmul2(__hsub2(u2h(r1), u2h(zlo_a)), u2h(s_a)));
    f[2] = h2u(__hmul2(__hsub2(u2h(r2), u2h(zlo_b)), u2h(s_b)));
    f[3] = h2u(__hmul2(__hsub2(u2h(r3), u2h(zlo_b)), u2h(s_b)));
  }
  __device__ __forceinline__ static void dequant_exact(uint32_t q, uint32_t (&f)[4], uint32_t zlo_a, uint32_t /*zhi_a*/,
                                                       uint32_t zlo_b, uint32_t /*zhi_b*/) {
    const uint32_t LO = 0x000f000f, EXP = 0x43004300;
    const uint32_t r0 = lop3_and_or(q, LO, EXP), r1 = lop3_and_or(q >> 4, LO, EXP), r2 = lop3_and_or(q >> 8, LO, EXP),
                   r3 = lop3_and_or(q >> 12, LO, EXP);
    f[0] = h2u(__hsub2(u2h(r0), u2h(zlo_a)));
    f[1] = h2u(__hsub2(u2h(r1), u2h(zlo_a)));
    f[2] = h2u(__hsub2(u2h(r2), u2h(zlo_b)));
    f[3] = h2u(__hsub2(u2h(r3), u2h(zlo_b)));
  }
  __device__ __forceinline__ static float2 to_float2(uint32_t v) { return __bfloat1622float2(u2h(v)); }
  __device__ __forceinline__ static uint32_t pack(float a, float b) { return h2u(__floats2bfloat162_rn(a, b)); }
  __device__ __forceinline__ static __nv_bfloat162 u2h(uint32_t u) {
    __nv_bfloat162 h;
    memcpy(&h, &u, 4);
    return h;
  }
  __device__ __forceinline__ static uint32_t h2u(__nv_bfloat162 h) {
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
  }
};

// ---------------------------------------------------------------- compile-time configuration

constexpr int kWarps = 4;                 // warps per block, side by side along N
constexpr int kThreads = 32 * kWarps;
constexpr int kTileN = 64 * kWarps;       // columns per block tile (one 64-column format tile per warp)

// MB: 16-row mma blocks per M chunk (1..4). Everything else follows from it.
template <int MB>
struct Cfg {
  static constexpr int SLABS = MB <= 2 ? 8 : 4;        // 16-row slabs per stage (every warp does all of them)
  static constexpr int STAGES = MB == 1 ? 2 : MB == 2 ? 3 : 4;  // cp.async ring depth (depths 3 and 4 at MB = 1
                                                                // measured no faster: notes/cuda.md run 7)
  static constexpr int MIN_BLOCKS = MB == 1 ? 4 : 2;            // blocks per SM the registers are budgeted for
  static constexpr int TK = 16 * SLABS;                // K rows per stage
  static constexpr int MT = 16 * MB;                   // rows per M chunk
  static constexpr int CH = TK / 8;                    // 16-byte chunks per x row per stage (8 or 16)
  static constexpr int SR = TK / 32;                   // scale / zero rows per stage (groups of G >= 32)
  static constexpr int B_INT4 = SLABS * kWarps * 32;   // weights per stage, [slab][warp][lane] int4
  static constexpr int A_INT4 = MT * CH;               // x tile per stage (XOR-swizzled rows)
  static constexpr int S_INT4 = SR * kTileN / 8;       // SR rows of kTileN scales
  static constexpr int Z_INT4 = SR * kTileN / 8 / 4;   // SR rows of kTileN / 8 zero words
  static constexpr int STAGE_INT4 = B_INT4 + A_INT4 + S_INT4 + Z_INT4;
  static constexpr int SMEM_BYTES = STAGES * STAGE_INT4 * 16;
  static_assert(CH >= 8, "the x swizzle needs at least 8 chunks per row");
  static_assert(SR * kTileN / 8 <= kThreads, "one scale chunk and one zero word per thread");
};

// Zeroes a warp's accumulator tile (fully unrolled: the registers stay registers).
template <int MB>
__device__ __forceinline__ void clear_acc(float (&acc)[MB][8][4]) {
#pragma unroll
  for (int a = 0; a < MB; ++a)
#pragma unroll
    for (int b = 0; b < 8; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;
}

// F32S (MB <= 2): when one scale row covers a whole stage (G >= 128 or channelwise), the mma runs on the exact
// q - z and the stage's fp32 partial sums are scaled once per column (one FFMA per accumulator instead of one HMUL2
// per two weights, and one rounding fewer); with smaller groups the instance scales the 16-bit weights as before.
// ---------------------------------------------------------------- the kernel

// BULK (MB = 1, sm_90; an experiment behind GemmTuning.bulk): the stage's weights come by cp.async.bulk issued by one
// thread (8 copies of up to 2 KB) instead of 8 cp.async per thread, cutting the per-stage copy setup.
template <typename T, int MB, bool F32S, bool BULK_REQ = false>
__global__ void __launch_bounds__(kThreads, Cfg<MB>::MIN_BLOCKS) gemm_kernel(const KParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using C = Cfg<MB>;
  using O = Ops<T>;
  constexpr int STAGES = C::STAGES, SLABS = C::SLABS;
  constexpr bool BULK = BULK_REQ && kBulkArch;  // below sm_90 the instance is the plain kernel
  extern __shared__ int4 smem[];
  __shared__ int last_flag;
  __shared__ __align__(8) uint64_t wbar[STAGES];  // BULK: one barrier per ring slot

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int gq = lane >> 2, tq = lane & 3;  // mma fragment row group / column pair
  const int start = blockIdx.x * p.ipb;
  const int end = min(start + p.ipb, p.total);
  if (start >= end) return;  // cannot happen with plan_gemm's grid; kept for safety (uniform per block)
  const uint64_t policy = p.evict_first ? evict_first_policy() : evict_normal_policy();
  const bool has_zeros = p.zeros != nullptr;
  // Scale row of slab s inside a stage: (16 s) >> srow_shift (0 when one scale row covers the stage).
  const bool multi_row = p.ng > 1 && p.G < C::TK;
  const int srow_shift = multi_row ? p.g_shift : 30;
  const int nrows = multi_row ? C::TK / p.G : 1;  // scale rows each stage needs
  const size_t q_row = (size_t)p.Nt * 32;         // int4 per 16-row slab of qweight

  // --- copies of one iteration into one ring slot. (kit, nc, mc) of the next iteration to load advance
  // incrementally along the stripe (no divisions in the loop).
  int ld_kit, ld_nc, ld_mc;
  {
    const int c0 = start / p.k_iters;
    ld_kit = start - c0 * p.k_iters;
    ld_mc = c0 / p.n_cols;
    ld_nc = c0 - ld_mc * p.n_cols;
  }
  // L2 prefetch of iteration (pf_kit, pf_nc)'s weights, p.pf iterations ahead of the compute (beyond the cp.async
  // ring, so more bytes are in flight per SM without shared memory): one bulk prefetch per 16-row slab, each the
  // block's (up to) 4 adjacent 512-byte tiles, issued by SLABS threads.
  int pf_kit = ld_kit, pf_nc = ld_nc;
  auto prefetch_next = [&]() {
    const int kt = pf_kit * SLABS + tid, tiles = min(kWarps, p.Nt - pf_nc * kWarps);
    if (tid < SLABS && kt < p.Kt && tiles > 0)
      prefetch_l2(p.qweight + kt * q_row + (size_t)pf_nc * kWarps * 32, tiles * 512);
    if (++pf_kit == p.k_iters) {
      pf_kit = 0;
      if (++pf_nc == p.n_cols) pf_nc = 0;
    }
  };
  auto load_stage = [&](int slot) {
    const int kit = ld_kit, nc = ld_nc, mc = ld_mc;
    if (++ld_kit == p.k_iters) {
      ld_kit = 0;
      if (++ld_nc == p.n_cols) {
        ld_nc = 0;
        ++ld_mc;
      }
    }
    int4* st = smem + slot * C::STAGE_INT4;
    const int kt0 = kit * SLABS, k0 = kt0 * 16;
    // Weights: each thread copies its own lane's 16 bytes of its own warp's tile, for every slab of the stage (BULK:
    // thread 0 copies each slab's row of the block's up to 4 adjacent tiles, the same bytes in the same places).
    const int tile = nc * kWarps + warp;
    if constexpr (BULK) {
      if (tid == 0) {
        const int nslab = min(SLABS, p.Kt - kt0);
        const uint32_t bytes = 512u * min(kWarps, p.Nt - nc * kWarps);
        fence_proxy_async_smem();
        mbar_arrive_expect_tx(&wbar[slot], bytes * nslab);
        const int4* src = p.qweight + kt0 * q_row + (size_t)nc * kWarps * 32;
        for (int s = 0; s < nslab; ++s) bulk_copy_g2s(st + s * kWarps * 32, src + s * q_row, bytes, &wbar[slot], policy);
      }
    } else if (tile < p.Nt) {
      const int4* src = p.qweight + kt0 * q_row + (size_t)tile * 32 + lane;
      int4* dst = st + warp * 32 + lane;
      const int nslab = min(SLABS, p.Kt - kt0);
      if (nslab == SLABS) {
#pragma unroll
        for (int s = 0; s < SLABS; ++s) cp_async16_hint(dst + s * kWarps * 32, src + s * q_row, policy);
      } else {  // the K tail
#pragma unroll
        for (int s = 0; s < SLABS; ++s)
          if (s < nslab) cp_async16_hint(dst + s * kWarps * 32, src + s * q_row, policy);
      }
    }
    int4* as = st + C::B_INT4;
    const T* x = static_cast<const T*>(p.x);
#pragma unroll
    for (int i = 0; i < (C::A_INT4 + kThreads - 1) / kThreads; ++i) {
      const int idx = tid + kThreads * i;
      if (idx < C::A_INT4) {
        const int r = idx / C::CH, ch = idx % C::CH;
        const int row = mc * C::MT + r, k = k0 + 8 * ch;
        // Rows past M are left as they are: an mma output row depends only on its own x row, never stored.
        if (row < p.M) {
          const bool valid = k < p.K;
          cp_async16_zfill(as + r * C::CH + (ch ^ (r & 7)), x + (size_t)row * p.lda + (valid ? k : 0), valid);
        }
      }
    }
    if (tid < nrows * (kTileN / 8)) {  // one 16-byte scale chunk and one zero word per thread
      const int r = tid / (kTileN / 8), c = tid % (kTileN / 8);
      const int g = min((p.ng > 1 ? (k0 >> p.g_shift) : 0) + r, p.ng - 1);
      const int n = nc * kTileN + 8 * c;
      if (n < p.N) {
        cp_async16(st + C::B_INT4 + C::A_INT4 + tid, static_cast<const T*>(p.scales) + (size_t)g * p.N + n);
        if (has_zeros)
          cp_async4(reinterpret_cast<uint32_t*>(st + C::B_INT4 + C::A_INT4 + C::S_INT4) + tid,
                    p.zeros + (size_t)g * (p.N / 8) + n / 8);
      }
    }
  };

  float acc[MB][8][4];
  clear_acc(acc);
  // Biased zero points of this lane's 8 columns (index 2 j + blk: column 16 j + 8 blk + gq of the warp's 64);
  // constant z = 8 when symmetric, reloaded with the scales otherwise.
  uint32_t zlo[8], zhi[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) O::zero_bias(8u, zlo[i], zhi[i]);

  // --- one stage of mma work for this warp: all SLABS slabs of its 64 columns. MULTI (G < TK): the scales change
  // every 2 slabs (32 rows, the smallest group); else one scale row covers the stage. Either way the slab loop has
  // no data-dependent branch, so the compiler can overlap one slab's dequantization with the next one's mma.
  auto compute_stage = [&](int slot, auto multi_tag) {
    constexpr bool MULTI = decltype(multi_tag)::value;
    constexpr bool SCALE_ACC = F32S && !MULTI;  // one scale row for the stage: scale the fp32 partial sums
    float part[MB][8][4];
    clear_acc(part);
    const int4* st = smem + slot * C::STAGE_INT4;
    const uint16_t* ss = reinterpret_cast<const uint16_t*>(st + C::B_INT4 + C::A_INT4) + warp * 64 + gq;
    const uint32_t* zs = reinterpret_cast<const uint32_t*>(st + C::B_INT4 + C::A_INT4 + C::S_INT4) + warp * 8;
    const char* as = reinterpret_cast<const char*>(st + C::B_INT4);
    uint32_t sc[8];
#pragma unroll
    for (int s = 0; s < SLABS; ++s) {
      if (s == 0 || (MULTI && s % 2 == 0)) {  // this lane's 8 scales (and zero points) of the slab's group
        const int row = MULTI ? (16 * s) >> srow_shift : 0;
        if (!SCALE_ACC) {
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const uint32_t v = ss[row * kTileN + 8 * i];
            sc[i] = v | (v << 16);
          }
        }
        if (has_zeros) {
          const uint4 z0 = *reinterpret_cast<const uint4*>(zs + row * (kTileN / 8));
          const uint4 z1 = *reinterpret_cast<const uint4*>(zs + row * (kTileN / 8) + 4);
          const uint32_t zw[8] = {z0.x, z0.y, z0.z, z0.w, z1.x, z1.y, z1.z, z1.w};
#pragma unroll
          for (int i = 0; i < 8; ++i) O::zero_bias((zw[i] >> (4 * gq)) & 0xF, zlo[i], zhi[i]);
        }
      }
      const int4 bq = st[s * kWarps * 32 + warp * 32 + lane];
      uint32_t a[MB][4];
#pragma unroll
      for (int mb = 0; mb < MB; ++mb) {
        const int r = mb * 16 + (lane & 15), ch = 2 * s + (lane >> 4);
        ldmatrix_x4(a[mb], as + 16 * (r * C::CH + (ch ^ (r & 7))));
      }
      const uint32_t words[4] = {uint32_t(bq.x), uint32_t(bq.y), uint32_t(bq.z), uint32_t(bq.w)};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t f[4];
        if (SCALE_ACC) {
          O::dequant_exact(words[j], f, zlo[2 * j], zhi[2 * j], zlo[2 * j + 1], zhi[2 * j + 1]);
#pragma unroll
          for (int mb = 0; mb < MB; ++mb) {
            O::mma(part[mb][2 * j], a[mb], f[0], f[1]);
            O::mma(part[mb][2 * j + 1], a[mb], f[2], f[3]);
          }
        } else {
          O::dequant(words[j], f, zlo[2 * j], zhi[2 * j], zlo[2 * j + 1], zhi[2 * j + 1], sc[2 * j], sc[2 * j + 1]);
#pragma unroll
          for (int mb = 0; mb < MB; ++mb) {
            O::mma(acc[mb][2 * j], a[mb], f[0], f[1]);
            O::mma(acc[mb][2 * j + 1], a[mb], f[2], f[3]);
          }
        }
      }
    }
    if (SCALE_ACC) {  // accumulator (b, c) is column 8 b + 2 tq + (c & 1) of the warp's 64
      const uint16_t* s2 = reinterpret_cast<const uint16_t*>(st + C::B_INT4 + C::A_INT4) + warp * 64 + 2 * tq;
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        const float2 sv = O::to_float2(*reinterpret_cast<const uint32_t*>(s2 + 8 * b));
#pragma unroll
        for (int mb = 0; mb < MB; ++mb) {
          acc[mb][b][0] = fmaf(part[mb][b][0], sv.x, acc[mb][b][0]);
          acc[mb][b][1] = fmaf(part[mb][b][1], sv.y, acc[mb][b][1]);
          acc[mb][b][2] = fmaf(part[mb][b][2], sv.x, acc[mb][b][2]);
          acc[mb][b][3] = fmaf(part[mb][b][3], sv.y, acc[mb][b][3]);
        }
      }
    }
  };

  // --- end of this block's part of column col: write out, or reduce across the blocks that share the column
  auto finish_column = [&](int col) {
    const int mc = col / p.n_cols, nc = col - mc * p.n_cols;
    const int m0 = mc * C::MT, n0 = nc * kTileN + warp * 64;
    const int rows = min(C::MT, p.M - m0);
    const bool live = nc * kWarps + warp < p.Nt;
    // Contributors first..last (int math: every product here is at most total + ipb < 2^31, checked on the host).
    const int first = (col * p.k_iters) / p.ipb;
    const int last = ((col + 1) * p.k_iters - 1) / p.ipb;
    T* out = static_cast<T*>(p.out);
    if (first != last) {
      // Split column: our partial into our slot, then count ourselves in.
      const int my_end = (col == start / p.k_iters) ? 0 : 1;
      const size_t slot_floats = (size_t)p.rows_alloc * kTileN;
      if (live) {
        float* dst = p.ws + ((size_t)blockIdx.x * 2 + my_end) * slot_floats + warp * 64;
#pragma unroll
        for (int a = 0; a < MB; ++a)
#pragma unroll
          for (int b = 0; b < 8; ++b) {
            const int r0 = a * 16 + gq, c = 8 * b + 2 * tq;
            if (r0 < rows)
              *reinterpret_cast<float2*>(dst + (size_t)r0 * kTileN + c) = make_float2(acc[a][b][0], acc[a][b][1]);
            if (r0 + 8 < rows)
              *reinterpret_cast<float2*>(dst + (size_t)(r0 + 8) * kTileN + c) =
                  make_float2(acc[a][b][2], acc[a][b][3]);
          }
      }
      __syncthreads();
      if (tid == 0) {  // release our slot (the barrier above orders the block's writes before this fence)
        __threadfence();
        const int prev = atomicAdd(p.locks + col, 1);
        const int is_last = prev == last - first;
        if (is_last) {
          p.locks[col] = 0;  // every contributor has counted: back to the initial state
          __threadfence();   // acquire the other contributors' slots
        }
        last_flag = is_last;
      }
      __syncthreads();
      if (!last_flag) return;
      // The whole block adds the slots, 4 consecutive columns per item, in contributor order (the sum does not
      // depend on timing). Two items per thread and 8 contributors per round: 16 independent 16-byte loads in
      // flight per thread, so the finalize costs a few L2 round trips even at 16 rows x 16 contributors.
      const size_t slot_of_first = (first * p.ipb < col * p.k_iters) ? 1 : 0;  // see below
      const int n_items = rows * (kTileN / 4);
      for (int e0 = tid; e0 < n_items; e0 += 2 * kThreads) {
        float4 sum[2];
        size_t off[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          sum[u] = make_float4(0.f, 0.f, 0.f, 0.f);
          const int e4 = min(e0 + u * kThreads, n_items - 1);  // a clamped duplicate is loaded, never stored
          off[u] = (size_t)(e4 / (kTileN / 4)) * kTileN + 4 * (e4 % (kTileN / 4));
        }
        for (int b0 = first; b0 <= last; b0 += 8) {
          float4 v[8][2];
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            // A contributor after the first starts inside this column (its first column: slot 0); the first one
            // uses slot 1 when it started in an earlier column (this is its last column).
            const int blk = min(b0 + j, last);
            const size_t e = blk == first ? slot_of_first : 0;
            const float* base = p.ws + ((size_t)blk * 2 + e) * slot_floats;
#pragma unroll
            for (int u = 0; u < 2; ++u) v[j][u] = __ldcg(reinterpret_cast<const float4*>(base + off[u]));
          }
#pragma unroll
          for (int j = 0; j < 8; ++j)
            if (b0 + j <= last)
#pragma unroll
              for (int u = 0; u < 2; ++u) {
                sum[u].x += v[j][u].x;
                sum[u].y += v[j][u].y;
                sum[u].z += v[j][u].z;
                sum[u].w += v[j][u].w;
              }
        }
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const int e4 = e0 + u * kThreads;
          const int r = e4 / (kTileN / 4), n = nc * kTileN + 4 * (e4 % (kTileN / 4));
          if (e4 >= n_items || n >= p.N) continue;  // N % 8 == 0: the 4 columns are all in or all out
          uint2 packed;
          packed.x = O::pack(sum[u].x, sum[u].y);
          packed.y = O::pack(sum[u].z, sum[u].w);
          *reinterpret_cast<uint2*>(out + (size_t)(m0 + r) * p.ldo + n) = packed;
        }
      }
      return;
    }
    if (!live) return;
#pragma unroll
    for (int a = 0; a < MB; ++a)
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        const int n = n0 + 8 * b + 2 * tq, r0 = a * 16 + gq;
        if (n < p.N) {
          if (r0 < rows)
            *reinterpret_cast<uint32_t*>(out + (size_t)(m0 + r0) * p.ldo + n) = O::pack(acc[a][b][0], acc[a][b][1]);
          if (r0 + 8 < rows)
            *reinterpret_cast<uint32_t*>(out + (size_t)(m0 + r0 + 8) * p.ldo + n) = O::pack(acc[a][b][2], acc[a][b][3]);
        }
      }
  };

  // --- the pipeline. Before the dependency wait only L2 prefetches of the weights (read-only hints); x, scales,
  // zeros, the workspace, the counters and out are touched after it (a previous kernel may write any of them).
  for (int i = 0; i < p.pf && start + i < end; ++i) prefetch_next();
  uint32_t phases = 0;  // BULK: bit i = parity of slot i's next barrier phase
  if constexpr (BULK) {
    if (tid == 0)
      for (int i = 0; i < STAGES; ++i) mbar_init(&wbar[i], 1);
    __syncthreads();
  }
  grid_dependency_wait();
  grid_launch_dependents();  // the next layer's blocks may take SMs as ours retire and start their prefetches
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (start + s < end) load_stage(s);
    cp_async_commit();
  }
  int slot = 0;
  int col = start / p.k_iters, kit = start - col * p.k_iters, nc = col % p.n_cols;
  for (int it = start; it < end; ++it) {
    cp_async_wait<STAGES - 2>();
    if constexpr (BULK) {
      mbar_wait(&wbar[slot], (phases >> slot) & 1u);
      phases ^= 1u << slot;
    }
    __syncthreads();  // stage `slot` is visible to all; everyone is done with the slot refilled next
    if (it + STAGES - 1 < end) load_stage(slot == 0 ? STAGES - 1 : slot - 1);
    cp_async_commit();
    if (it + p.pf < end && p.pf > 0) prefetch_next();
    if (nc * kWarps + warp < p.Nt) {  // a warp past the last 64-column tile idles
      if (multi_row)
        compute_stage(slot, std::true_type{});
      else
        compute_stage(slot, std::false_type{});
    }
    slot = slot + 1 == STAGES ? 0 : slot + 1;
    if (++kit == p.k_iters || it + 1 == end) {
      finish_column(col);
      clear_acc(acc);
      if (kit == p.k_iters) {
        kit = 0;
        ++col;
        if (++nc == p.n_cols) nc = 0;
      }
    }
  }
  cp_async_wait<0>();
#endif
}

// ---------------------------------------------------------------- host side

inline int smem_bytes_of(int mb) {
  switch (mb) {
    case 1: return Cfg<1>::SMEM_BYTES;
    case 2: return Cfg<2>::SMEM_BYTES;
    case 3: return Cfg<3>::SMEM_BYTES;
    case 4: return Cfg<4>::SMEM_BYTES;
  }
  return -1;
}

inline int slabs_of(int mb) { return mb <= 2 ? Cfg<1>::SLABS : Cfg<4>::SLABS; }

// Sets the instance's shared-memory limit once per device; returns how many blocks of it fit on one SM.
template <typename T, int MB, bool F32S, bool BULK = false>
cudaError_t prepare_cfg(int* blocks_per_sm) {
  constexpr int smem = Cfg<MB>::SMEM_BYTES;
  static int occupancy[64] = {};  // per device, 0 = not prepared yet; a benign race sets it twice
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < 64 && occupancy[dev] > 0) {
    *blocks_per_sm = occupancy[dev];
    return cudaSuccess;
  }
  err = cudaFuncSetAttribute(gemm_kernel<T, MB, F32S, BULK>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  int n = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, gemm_kernel<T, MB, F32S, BULK>, kThreads, smem);
  if (err != cudaSuccess) return err;
  if (n < 1) return cudaErrorInvalidConfiguration;
  if (dev < 64) occupancy[dev] = n;
  *blocks_per_sm = n;
  return cudaSuccess;
}

// pdl: launch with programmatic stream serialization (sm_90 only: the caller checks the device), so this kernel's
// blocks may start while the previous kernel in the stream finishes (the kernel waits before reading its inputs).
template <typename T, int MB, bool F32S, bool BULK = false>
cudaError_t launch_cfg(const KParams& kp, int grid, bool pdl, cudaStream_t stream, int* blocks_per_sm) {
  int n = 0;
  cudaError_t err = prepare_cfg<T, MB, F32S, BULK>(&n);
  if (err != cudaSuccess) return err;
  if (blocks_per_sm != nullptr) {  // query only
    *blocks_per_sm = n;
    return cudaSuccess;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = Cfg<MB>::SMEM_BYTES;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, gemm_kernel<T, MB, F32S, BULK>, kp);
}

// The instances of one dtype (defined in gemm_f16.cu / gemm_bf16.cu): MB = 1..4, fp32 group scaling (f32s) at
// MB <= 2 (ignored above), and the bulk-copy weight ring (bulk) at MB = 1 with 16-bit scaling only. With blocks_per_sm set, only reports how many blocks of the instance fit on one SM.
template <typename T>
cudaError_t launch_gemm_t(const KParams& kp, int mb, bool f32s, bool bulk, int grid, bool pdl, cudaStream_t stream,
                          int* blocks_per_sm) {
  if (bulk) return mb == 1 && !f32s ? launch_cfg<T, 1, false, true>(kp, grid, pdl, stream, blocks_per_sm)
                                    : cudaErrorInvalidValue;
  switch (mb * 2 + (f32s && mb <= 2 ? 1 : 0)) {
    case 2: return launch_cfg<T, 1, false>(kp, grid, pdl, stream, blocks_per_sm);
    case 3: return launch_cfg<T, 1, true>(kp, grid, pdl, stream, blocks_per_sm);
    case 4: return launch_cfg<T, 2, false>(kp, grid, pdl, stream, blocks_per_sm);
    case 5: return launch_cfg<T, 2, true>(kp, grid, pdl, stream, blocks_per_sm);
    case 6: return launch_cfg<T, 3, false>(kp, grid, pdl, stream, blocks_per_sm);
    case 8: return launch_cfg<T, 4, false>(kp, grid, pdl, stream, blocks_per_sm);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gemm
}  // namespace w4a16
