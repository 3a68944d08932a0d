/*
 * activation_math.cuh - the epilogue math of device code in fp32: the gated
 * activations, the routed weight, and the 8-wide bf16 dot product of the
 * CUDA-core decode kernel. One place for the CUDA kernels (the activation
 * stage and the GEMM epilogues of grouped_gemm.cu, gemm_wgmma.cu and
 * decode.cu). The activation formulas are not written here: they are
 * backends/common/activation_logic.h, the header the CPU and OpenCL
 * backends compile too, so every backend keeps NaN as NaN through the
 * clamps of SWIGLU_CLAMP and rounds at the same points (include/moe.h,
 * "Numerics").
 */
#ifndef MOE_CUDA_ACTIVATION_MATH_CUH
#define MOE_CUDA_ACTIVATION_MATH_CUH

#include "../common/activation_logic.h"
#include "moe.h"

#include <cuda_bf16.h>

/* h = act(gate) * up: the shared formulas (MOE_ACT_* mirror moe_activation,
 * checked by a static_assert in elementwise.cu). */
__device__ __forceinline__ float cuda_gated_activation(moe_activation act, float alpha, float limit,
                                                       float gate, float up) {
  return moe_act_apply((int)act, gate, up, alpha, limit);
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
