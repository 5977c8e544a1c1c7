// Hopper (sm_90a) PTX the wgmma kernel needs: warpgroup MMA with the A operand from registers, its shared-memory
// descriptor for a 128-byte-swizzled K-major B tile, mbarriers and the 2-D tensor copy. No torch headers.
//
// Compiled only where __CUDA_ARCH_FEAT_SM90_ALL is defined (a -gencode=arch=compute_90a,code=sm_90a pass); the
// callers guard their bodies the same way, so the other architectures of one build still compile this file.
#pragma once

#include <stdint.h>

namespace w4a16 {
namespace sm90 {

// The wgmma descriptor of a K-major tile whose rows are 128 bytes (64 16-bit elements), stored with the 128-byte
// swizzle (16-byte chunk c of row r at chunk c ^ (r % 8)), 8-row groups 1024 bytes apart. start: shared address of
// the first element the instruction reads (a 1024-byte-aligned tile plus 32 bytes per k16 step inside the row).
__device__ __forceinline__ uint64_t smem_desc_sw128(uint32_t start) {
  uint64_t d = 0;
  d |= (uint64_t)((start & 0x3FFFF) >> 4);  // bits 0-13: start address / 16
  d |= (uint64_t)1 << 16;                   // bits 16-29: leading byte offset / 16 (unused with this swizzle)
  d |= (uint64_t)(1024 >> 4) << 32;         // bits 32-45: stride byte offset / 16 (between 8-row groups)
  d |= (uint64_t)1 << 62;                   // bits 62-63: 1 = 128-byte swizzle
  return d;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// mbarriers and the tensor copy engine (TMA): a stage's x tile arrives through the async proxy, so wgmma (async proxy
// too) reads it without a cross-proxy fence; the waiting threads see it once the barrier's phase completes.
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"((uint32_t)__cvta_generic_to_shared(bar)), "r"(count)
               : "memory");
}
__device__ __forceinline__ void mbar_fence_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(
                   (uint32_t)__cvta_generic_to_shared(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = (uint32_t)__cvta_generic_to_shared(bar);
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(addr),
      "r"(parity)
      : "memory");
}
// A 2-D box of the tensor map (x: inner coordinate k, outer m) into shared memory, completing on bar. Rows and columns
// outside the tensor arrive as zeros.
__device__ __forceinline__ void tma_load_2d(void* dst, const void* tmap, uint64_t* bar, int k, int m) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          (uint32_t)__cvta_generic_to_shared(dst)),
      "l"(tmap), "r"(k), "r"(m), "r"((uint32_t)__cvta_generic_to_shared(bar))
      : "memory");
}

// Pins a register for the compiler: a value an in-flight wgmma still reads (A fragments) or will write
// (accumulators) must stay in the same register until wgmma_wait says the instruction is done.
__device__ __forceinline__ void pin(uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }
__device__ __forceinline__ void pin(float& r) { asm volatile("" : "+f"(r)::"memory"); }

#define W4A16_ACC8(d, o)                                                                                            \
  "+f"(d[o + 0]), "+f"(d[o + 1]), "+f"(d[o + 2]), "+f"(d[o + 3]), "+f"(d[o + 4]), "+f"(d[o + 5]), "+f"(d[o + 6]), \
      "+f"(d[o + 7])

// D[64 x BN] += A[64 x 16] (registers, mma.m16n8k16's A layout per warp) * B[16 x BN] (shared, K-major, desc).
// BN = 64 or 128; T is the 16-bit type ("f16" or "bf16").
template <int BN, bool BF16>
struct Wgmma;

#define W4A16_WGMMA_N64(TYPE)                                                                                     \
  asm volatile(                                                                                                   \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                                \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                                             \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
      "%23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"                   \
      : W4A16_ACC8(d, 0), W4A16_ACC8(d, 8), W4A16_ACC8(d, 16), W4A16_ACC8(d, 24)                                   \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1))

#define W4A16_WGMMA_N128(TYPE)                                                                                      \
  asm volatile(                                                                                                     \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                                  \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "                                              \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, "   \
      "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "    \
      "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "        \
      "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"                                                                 \
      : W4A16_ACC8(d, 0), W4A16_ACC8(d, 8), W4A16_ACC8(d, 16), W4A16_ACC8(d, 24), W4A16_ACC8(d, 32),               \
        W4A16_ACC8(d, 40), W4A16_ACC8(d, 48), W4A16_ACC8(d, 56)                                                     \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1))

template <>
struct Wgmma<64, false> {
  __device__ __forceinline__ static void run(float (&d)[32], const uint32_t (&a)[4], uint64_t desc) {
    W4A16_WGMMA_N64("f16");
  }
};
template <>
struct Wgmma<64, true> {
  __device__ __forceinline__ static void run(float (&d)[32], const uint32_t (&a)[4], uint64_t desc) {
    W4A16_WGMMA_N64("bf16");
  }
};
template <>
struct Wgmma<128, false> {
  __device__ __forceinline__ static void run(float (&d)[64], const uint32_t (&a)[4], uint64_t desc) {
    W4A16_WGMMA_N128("f16");
  }
};
template <>
struct Wgmma<128, true> {
  __device__ __forceinline__ static void run(float (&d)[64], const uint32_t (&a)[4], uint64_t desc) {
    W4A16_WGMMA_N128("bf16");
  }
};

#undef W4A16_WGMMA_N64
#undef W4A16_WGMMA_N128
#undef W4A16_ACC8

}  // namespace sm90
}  // namespace w4a16
