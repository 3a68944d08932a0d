/*
 * bf16_logic.h - bf16 <-> fp32 conversion, written once for every backend.
 *
 * bf16 is the upper half of an IEEE binary32. fp32 -> bf16 rounds to
 * nearest, ties to even; a NaN stays a (quiet) NaN instead of rounding into
 * infinity. Plain C that the CPU backend, CUDA (__host__ __device__) and
 * OpenCL C (embedded kernel source) all compile.
 */
#ifndef MOE_BF16_LOGIC_H
#define MOE_BF16_LOGIC_H

#if defined(__OPENCL_VERSION__)
#define MOE_BF16_FN static inline
#define MOE_BF16_BITS(f) as_uint(f)
#define MOE_BF16_FLOAT(u) as_float(u)
typedef ushort moe_bf16_t;
typedef uint moe_bf16_u32;
#elif defined(__CUDACC__)
#define MOE_BF16_FN static inline __host__ __device__
#define MOE_BF16_BITS(f) __float_as_uint(f)
#define MOE_BF16_FLOAT(u) __uint_as_float(u)
#include <stdint.h>
typedef uint16_t moe_bf16_t;
typedef uint32_t moe_bf16_u32;
#else
#include <stdint.h>
#include <string.h>
#define MOE_BF16_FN static inline
typedef uint16_t moe_bf16_t;
typedef uint32_t moe_bf16_u32;
MOE_BF16_FN moe_bf16_u32 moe_bf16_bits_of_(float f) {
  moe_bf16_u32 u;
  memcpy(&u, &f, sizeof u);
  return u;
}
MOE_BF16_FN float moe_bf16_float_of_(moe_bf16_u32 u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
#define MOE_BF16_BITS(f) moe_bf16_bits_of_(f)
#define MOE_BF16_FLOAT(u) moe_bf16_float_of_(u)
#endif

MOE_BF16_FN float moe_bf16_to_float(moe_bf16_t v) {
  return MOE_BF16_FLOAT((moe_bf16_u32)v << 16);
}

/* Branch-free, so that loops of it vectorize. */
MOE_BF16_FN moe_bf16_t moe_bf16_from_float(float f) {
  moe_bf16_u32 u = MOE_BF16_BITS(f);
  moe_bf16_u32 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  moe_bf16_u32 quiet_nan = (u >> 16) | 0x0040u;
  return (moe_bf16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

#endif /* MOE_BF16_LOGIC_H */
