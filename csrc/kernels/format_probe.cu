// A probe of the packed format on real tensor cores: every warp reads one 16 x 64 tile with one
// 16-byte load per lane, dequantizes it with dequant_word, and multiplies it by the identity with
// mma.m16n8k16, so the output is the weight as the tensor core saw it. The tests compare it with
// format.unpack_qweight; if the fragment mapping of the format were wrong, this would show it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "dequant.cuh"
#include "launchers.h"

namespace w4a16 {
namespace {

__device__ __forceinline__ void mma_16816(const uint32_t (&a)[4], uint32_t b0, uint32_t b1, float (&d)[4], __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma_16816(const uint32_t (&a)[4], uint32_t b0, uint32_t b1, float (&d)[4],
                                          __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T>
__global__ void format_probe_kernel(const int4* __restrict__ qweight, float* __restrict__ out, int n_tiles) {
#if __CUDA_ARCH__ >= 800
  using T2 = typename Vec2<T>::type;
  const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
  const int kt = blockIdx.y, nt = blockIdx.x;
  const int4 words = qweight[(size_t(kt) * n_tiles + nt) * 32 + lane];
  // Identity A (16 x 16): ones where row == col, in the A fragment layout of m16n8k16.
  const T one = from_float<T>(1.0f), zero = from_float<T>(0.0f);
  T2 diag;
  diag.x = (g == 2 * t) ? one : zero;
  diag.y = (g == 2 * t + 1) ? one : zero;
  T2 nil;
  nil.x = zero;
  nil.y = zero;
  uint32_t a[4] = {*reinterpret_cast<uint32_t*>(&diag), *reinterpret_cast<uint32_t*>(&nil),
                   *reinterpret_cast<uint32_t*>(&nil), *reinterpret_cast<uint32_t*>(&diag)};
  const int w[4] = {words.x, words.y, words.z, words.w};
  T2 z8;
  z8.x = from_float<T>(8.0f);
  z8.y = z8.x;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    T2 frag[4];
    dequant_word(uint32_t(w[j]), frag, z8, z8);
#pragma unroll
    for (int blk = 0; blk < 2; ++blk) {
      float d[4] = {0.f, 0.f, 0.f, 0.f};
      mma_16816(a, *reinterpret_cast<uint32_t*>(&frag[2 * blk]), *reinterpret_cast<uint32_t*>(&frag[2 * blk + 1]), d,
                T());
      const int n = nt * 64 + j * 16 + blk * 8 + 2 * t;
      const size_t ld = size_t(n_tiles) * 64;
      out[(kt * 16 + g) * ld + n] = d[0];
      out[(kt * 16 + g) * ld + n + 1] = d[1];
      out[(kt * 16 + g + 8) * ld + n] = d[2];
      out[(kt * 16 + g + 8) * ld + n + 1] = d[3];
    }
  }
#endif
}

}  // namespace

cudaError_t launch_format_probe(const int32_t* qweight, float* out, int k_tiles, int n_tiles, bool bf16,
                                cudaStream_t stream) {
  dim3 grid(n_tiles, k_tiles);
  const int4* q = reinterpret_cast<const int4*>(qweight);
  if (bf16)
    format_probe_kernel<__nv_bfloat16><<<grid, 32, 0, stream>>>(q, out, n_tiles);
  else
    format_probe_kernel<__half><<<grid, 32, 0, stream>>>(q, out, n_tiles);
  return cudaGetLastError();
}

}  // namespace w4a16
