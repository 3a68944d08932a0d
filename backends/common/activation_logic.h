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
#define MOE_ACT_EXP(x) expf(x)
#include <math.h>
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
