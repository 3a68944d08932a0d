/*
 * activation_logic.h - the gated activations of the MoE layer, written once.
 *
 * Plain C with no host-only calls, so that the CPU backend (C), the CUDA
 * backend (functions become __host__ __device__) and the OpenCL backend
 * (the text is embedded into the kernel source) compile the same formulas,
 * as core/routing_logic.h does for routing. Everything is fp32.
 *
 *   SWIGLU        h = silu(g) * u,              silu(g) = g / (1 + exp(-g))
 *   GEGLU         h = gelu_tanh(g) * u,
 *                 gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
 *                              = g / (1 + exp(-2 sqrt(2/pi) (g + 0.044715 g^3)))
 *                 (evaluated in the second form: see moe_act_gelu_tanh)
 *   SWIGLU_CLAMP  (gpt-oss) g = min(gate, limit), u = clamp(up, -limit, limit),
 *                 h = g * sigmoid(alpha * g) * (u + 1)
 *
 * The clamps are written with comparisons, not fminf/fmaxf, so that a NaN
 * input stays NaN (fminf would replace it by the limit). Compile without
 * -ffast-math.
 *
 * Numerics contract (include/moe.h, "Numerics"): a NaN gate or up gives a
 * NaN h on every backend; gate and up arrive in fp32 inside the layer (bf16
 * only through moe_activation_apply's buffers); h is rounded to bf16 once,
 * by the caller.
 */
#ifndef MOE_ACTIVATION_LOGIC_H
#define MOE_ACTIVATION_LOGIC_H

#if defined(__OPENCL_VERSION__)
#define MOE_ACT_FN static inline
#define MOE_ACT_EXP(x) exp(x)
#elif defined(__CUDACC__)
#define MOE_ACT_FN static inline __host__ __device__
#define MOE_ACT_EXP(x) expf(x)
#include <math.h>
#else
#define MOE_ACT_FN static inline
#define MOE_ACT_EXP(x) moe_act_expf(x)
#include <stdint.h>
#include <string.h>

/* exp for the CPU backend, branch-free so that its loops vectorize (a call
 * of libm's expf stops that; the fused GEMM1 epilogue's scalar loop cost
 * Qwen3's 4096-token forward 14% on the development machine). 2^n * e^r
 * with n = round(x / ln 2), r = x - n ln 2 in two parts (Cody-Waite), e^r
 * by Cephes' degree-7 polynomial: within 0.99 ulp of exp at every float in
 * [-110, 90] (measured against double exp; tests check the layer against
 * float64). x >= 88.8 gives +inf,
 * x <= -104 gives 0, NaN stays NaN (the clamps are comparisons). The scale
 * 2^n is applied as two factors 2^(n/2) and 2^(n - n/2), both normal for
 * every n in [-150, 128]. */
static inline float moe_act_expf(float x) {
  const float clamped_low = x < -104.0f ? -104.0f : x;
  const float v = clamped_low > 88.8f ? 88.8f : clamped_low;
  /* Round to nearest by the 1.5 * 2^23 trick: n's integer sits in the low
   * mantissa bits of shifted, readable without a float-to-int conversion
   * (undefined for NaN). */
  const float shifted = v * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  float r = v - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  uint32_t bits;
  memcpy(&bits, &shifted, sizeof bits);
  const int32_t ni = (int32_t)(bits - 0x4b400000u);
  const int32_t half = ni >> 1; /* floor(n / 2) */
  const uint32_t s1_bits = (uint32_t)(half + 127) << 23, s2_bits = (uint32_t)(ni - half + 127)
                                                                   << 23;
  float s1, s2;
  memcpy(&s1, &s1_bits, sizeof s1);
  memcpy(&s2, &s2_bits, sizeof s2);
  return p * s1 * s2;
}
#endif

/* Mirror the values of moe_activation in moe.h (this header must not
 * include moe.h, as OpenCL C cannot). */
#define MOE_ACT_SWIGLU 0
#define MOE_ACT_GEGLU 1
#define MOE_ACT_SWIGLU_CLAMP 2

MOE_ACT_FN float moe_act_silu(float g) {
  return g / (1.0f + MOE_ACT_EXP(-g));
}

/* 0.5 g (1 + tanh(x)) is evaluated as g / (1 + exp(-2x)), the same value
 * without the cancellation of 1 + tanh(x) for x << 0: there fp32 keeps few
 * bits of 1 + tanh, and OpenCL's tanh may miss -1 by a few ulp (PoCL gives
 * 1 + tanh(-inf) = 6e-8), which turned gelu(-1e30) into -3e22. */
MOE_ACT_FN float moe_act_gelu_tanh(float g) {
  const float sqrt_2_over_pi = 0.7978845608028654f;
  float inner = sqrt_2_over_pi * (g + 0.044715f * g * g * g);
  return g / (1.0f + MOE_ACT_EXP(-2.0f * inner));
}

MOE_ACT_FN float moe_act_swiglu_clamp(float gate, float up, float alpha, float limit) {
  float g = gate > limit ? limit : gate;
  float u = up > limit ? limit : (up < -limit ? -limit : up);
  return g / (1.0f + MOE_ACT_EXP(-alpha * g)) * (u + 1.0f);
}

/* h for one (gate, up) pair; kind is one of MOE_ACT_*; alpha and limit are
 * read by SWIGLU_CLAMP only. */
MOE_ACT_FN float moe_act_apply(int kind, float gate, float up, float alpha, float limit) {
  if (kind == MOE_ACT_GEGLU) return moe_act_gelu_tanh(gate) * up;
  if (kind == MOE_ACT_SWIGLU_CLAMP) return moe_act_swiglu_clamp(gate, up, alpha, limit);
  return moe_act_silu(gate) * up;
}

#endif /* MOE_ACTIVATION_LOGIC_H */
