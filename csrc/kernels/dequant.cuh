// 4-bit -> 16-bit dequantization of one packed word into mma.m16n8k16 B fragments.
// No torch headers here: this compiles with plain nvcc (CI checks it without a GPU).
//
// A word of the packed format (w4a16_ops/format.py) holds, for one lane, rows (k, k+1) and
// (k+8, k+9) of two n8 columns: nibbles (0,4) | (1,5) are the two f16x2 registers of the first
// n8 block, (2,6) | (3,7) those of the second. Or-ing a nibble into the mantissa of a magic
// number (1024.0 for fp16, 128.0 for bf16) turns it into a float with one lop3; subtracting the
// magic number (+ the zero point) finishes the conversion.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace w4a16 {

// res = (a & b) | c in one instruction (immLut 0xEA: a=0xF0, b=0xCC, c=0xAA).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t res;
  asm volatile("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(res) : "r"(a), "r"(b), "r"(c));
  return res;
}

// Conversions that work under torch's -D__CUDA_NO_HALF_CONVERSIONS__ / NO_BFLOAT16_CONVERSIONS.
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T> struct Vec2;
template <> struct Vec2<__half> { using type = __half2; };
template <> struct Vec2<__nv_bfloat16> { using type = __nv_bfloat162; };

// frag[0..1]: the B fragment of the first n8 block, frag[2..3]: of the second, each (q - zero).
// zero2 holds the zero point of each of the two columns (lo: first block, hi: second), as T.
__device__ __forceinline__ void dequant_word(uint32_t q, __half2 (&frag)[4], __half2 zero_a, __half2 zero_b) {
  const uint32_t LO = 0x000f000f, HI = 0x00f000f0, EXP = 0x64006400;
  // 1024 + n for low nibbles; 1024 + 16 n for the next nibble up, scaled by 1/16 -> 64 + n.
  const __half2 magic_lo = __half2half2(__ushort_as_half(0x6400));  // 1024
  const __half2 sixteenth = __half2half2(__ushort_as_half(0x2C00));  // 1/16
  const __half2 magic_hi = __half2half2(__ushort_as_half(0x5400));   // 64
  uint32_t lo0 = and_or(q, LO, EXP), hi0 = and_or(q, HI, EXP);
  q >>= 8;
  uint32_t lo1 = and_or(q, LO, EXP), hi1 = and_or(q, HI, EXP);
  frag[0] = __hsub2(__hsub2(*reinterpret_cast<__half2*>(&lo0), magic_lo), zero_a);
  frag[1] = __hsub2(__hfma2(*reinterpret_cast<__half2*>(&hi0), sixteenth, __hneg2(magic_hi)), zero_a);
  frag[2] = __hsub2(__hsub2(*reinterpret_cast<__half2*>(&lo1), magic_lo), zero_b);
  frag[3] = __hsub2(__hfma2(*reinterpret_cast<__half2*>(&hi1), sixteenth, __hneg2(magic_hi)), zero_b);
}

__device__ __forceinline__ void dequant_word(uint32_t q, __nv_bfloat162 (&frag)[4], __nv_bfloat162 zero_a,
                                             __nv_bfloat162 zero_b) {
  // bf16 has 7 mantissa bits: only the low nibble of each half fits under 128.0, so shift.
  const uint32_t LO = 0x000f000f, EXP = 0x43004300;
  const __nv_bfloat162 magic = __bfloat162bfloat162(__ushort_as_bfloat16(0x4300));  // 128
  uint32_t r[4] = {and_or(q, LO, EXP), and_or(q >> 4, LO, EXP), and_or(q >> 8, LO, EXP), and_or(q >> 12, LO, EXP)};
  frag[0] = __hsub2(__hsub2(*reinterpret_cast<__nv_bfloat162*>(&r[0]), magic), zero_a);
  frag[1] = __hsub2(__hsub2(*reinterpret_cast<__nv_bfloat162*>(&r[1]), magic), zero_a);
  frag[2] = __hsub2(__hsub2(*reinterpret_cast<__nv_bfloat162*>(&r[2]), magic), zero_b);
  frag[3] = __hsub2(__hsub2(*reinterpret_cast<__nv_bfloat162*>(&r[3]), magic), zero_b);
}

}  // namespace w4a16
