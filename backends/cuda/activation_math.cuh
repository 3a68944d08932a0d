/*
 * activation_math.cuh - the epilogue math of device code in fp32: the gated
 * activations, the routed weight, and the 8-wide bf16 dot product of the
 * CUDA-core decode kernel. One place for the CUDA kernels (the activation
 * stage and the GEMM epilogues of grouped_gemm.cu and gemm_wgmma.cu); the
 * formulas are those documented at moe_activation and
 * moe_gemm_routed_weight in include/moe.h. When backends/common/ gains a shared scalar header that
 * CUDA can compile, this file should include it instead.
 */
#ifndef MOE_CUDA_ACTIVATION_MATH_CUH
#define MOE_CUDA_ACTIVATION_MATH_CUH

#include "moe.h"

#include <cuda_bf16.h>

__device__ __forceinline__ float cuda_sigmoid(float x) {
  return 1.0f / (1.0f + expf(-x));
}

/* h = act(gate) * up, per include/moe.h. */
__device__ __forceinline__ float cuda_gated_activation(moe_activation act, float alpha, float limit,
                                                       float gate, float up) {
  switch (act) {
  case MOE_ACTIVATION_GEGLU: {
    const float inner = 0.7978845608028654f * (gate + 0.044715f * gate * gate * gate);
    return 0.5f * gate * (1.0f + tanhf(inner)) * up;
  }
  case MOE_ACTIVATION_SWIGLU_CLAMP: {
    const float g = fminf(gate, limit);
    const float u = fminf(fmaxf(up, -limit), limit);
    return g * cuda_sigmoid(alpha * g) * (u + 1.0f);
  }
  default:
    return gate * cuda_sigmoid(gate) * up;
  }
}

/* The accumulator with its bias and the routed weight, in the order the
 * mode names. */
__device__ __forceinline__ float cuda_apply_routed(float acc, float bias, float weight,
                                                   moe_gemm_routed_weight mode) {
  switch (mode) {
  case MOE_GEMM_ROUTED_WEIGHT_BEFORE_BIAS:
    return weight * acc + bias;
  case MOE_GEMM_ROUTED_WEIGHT_AFTER_BIAS:
    return weight * (acc + bias);
  default:
    return acc + bias;
  }
}

/* Dot product of 8 bf16 pairs (16-byte vectors) in fp32, in index order:
 * the weight-streaming kernels' inner step. */
__device__ __forceinline__ float dot8_bf16(const uint4 &w, const uint4 &a) {
  const __nv_bfloat162 *w2 = (const __nv_bfloat162 *)&w;
  const __nv_bfloat162 *a2 = (const __nv_bfloat162 *)&a;
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 wf = __bfloat1622float2(w2[i]), af = __bfloat1622float2(a2[i]);
    sum = fmaf(wf.x, af.x, sum);
    sum = fmaf(wf.y, af.y, sum);
  }
  return sum;
}

#endif /* MOE_CUDA_ACTIVATION_MATH_CUH */
