/*
 * hopper_gemm.cuh - what the two Hopper grouped GEMMs (gemm_wgmma.cu's
 * 128-row tiles, gemm_stream.cu's weight streaming) share on the host and
 * in their kernel parameters: the fields both kernels read of a
 * cuda_wgmma_gemm, and the epilogue index of their template tables.
 */
#ifndef MOE_CUDA_HOPPER_GEMM_CUH
#define MOE_CUDA_HOPPER_GEMM_CUH

#include "cuda_internal.cuh"

/* Epilogues: a plain store (GEMM2) or the GLU of one activation (GEMM1).
 * The activation is a template parameter of the kernels because their
 * epilogues are unrolled over the accumulator registers (compile-time
 * indices only): one formula per kernel keeps the code each tile runs
 * small. */
enum hopper_epilogue {
  HOPPER_STORE = 0,
  HOPPER_GLU_SWIGLU,
  HOPPER_GLU_GEGLU,
  HOPPER_GLU_SWIGLU_CLAMP,
  HOPPER_EPILOGUES
};
static_assert(HOPPER_GLU_SWIGLU - 1 == MOE_ACTIVATION_SWIGLU &&
                  HOPPER_GLU_GEGLU - 1 == MOE_ACTIVATION_GEGLU &&
                  HOPPER_GLU_SWIGLU_CLAMP - 1 == MOE_ACTIVATION_SWIGLU_CLAMP,
              "HOPPER_GLU_* = 1 + the activation");

/* The kernel parameters both GEMMs read; each kernel's own parameters
 * derive from it (passed by value: trivially copyable). */
struct hopper_gemm_params {
  const int32_t *sorted_token_ids;
  const int32_t *expert_ids; /* one per align block */
  const int32_t *num_tokens_post_padded;
  const float *topk_weights;
  const float *bias; /* [EL][n] or NULL */
  __nv_bfloat16 *c;
  int64_t ldc;
  int64_t num_slots;
  int32_t num_local_experts;
  int32_t n; /* weight rows per expert = output columns */
  int32_t k;
  moe_gemm_routed_weight routed_weight;
  float alpha, limit; /* of the activation */
};

static inline hopper_gemm_params hopper_gemm_params_from(const cuda_wgmma_gemm *g) {
  hopper_gemm_params p{};
  p.sorted_token_ids = g->sorted_token_ids;
  p.expert_ids = g->expert_ids;
  p.num_tokens_post_padded = g->num_tokens_post_padded;
  p.topk_weights = g->topk_weights;
  p.bias = g->bias;
  p.c = g->c;
  p.ldc = g->ldc;
  p.num_slots = g->num_slots;
  p.num_local_experts = g->num_local_experts;
  p.n = g->n;
  p.k = g->k;
  p.routed_weight = g->routed_weight;
  p.alpha = g->alpha;
  p.limit = g->limit;
  return p;
}

/* g's epilogue as an index of the kernels' tables, or -1 (with the error
 * set) for a GLU of an activation the kernels were not built for. */
static inline int hopper_epilogue_of(const cuda_wgmma_gemm *g) {
  if (g->epilogue != CUDA_EPILOGUE_GLU) return HOPPER_STORE;
  if (g->activation != MOE_ACTIVATION_SWIGLU && g->activation != MOE_ACTIVATION_GEGLU &&
      g->activation != MOE_ACTIVATION_SWIGLU_CLAMP) {
    moe_set_error(MOE_ERROR_INTERNAL, "Hopper GEMM: activation %d", (int)g->activation);
    return -1;
  }
  return 1 + (int)g->activation;
}

#endif /* MOE_CUDA_HOPPER_GEMM_CUH */
