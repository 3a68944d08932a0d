/*
 * routing.c - host routing: every token through the shared per-token rule
 * of routing_logic.h. Used by the CPU backend and as the reference path
 * for the optional route entry of GPU backends.
 */
#include "internal.h"
#include "routing.h"

moe_rl_params moe_rl_params_from_args(const moe_route_args *a) {
  return moe_rl_params_make(a->num_experts, a->top_k, a->scoring == MOE_SCORING_SIGMOID,
                            a->renormalize != 0, a->num_groups, a->topk_groups,
                            a->group_scoring == MOE_GROUP_SCORING_TOP2_SUM,
                            a->correction_bias != NULL, a->routed_scaling_factor);
}

void moe_route_host(const moe_route_args *args) {
  const moe_rl_params params = moe_rl_params_from_args(args);
  const float *logits = args->logits;
  const float *bias = args->correction_bias;
  int32_t *ids = args->topk_ids;
  float *weights = args->topk_weights;
  const int64_t E = args->num_experts, k = args->top_k;
  /* Small batches stay serial. An explicit branch, not an if() clause: a
   * serialized parallel region still allocates inside the OpenMP runtime,
   * and a reserved forward must allocate nothing. */
  if (args->num_tokens <= 64) {
    for (int64_t t = 0; t < args->num_tokens; ++t)
      moe_rl_route_token(logits + t * E, bias, &params, ids + t * k, weights + t * k);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < args->num_tokens; ++t)
    moe_rl_route_token(logits + t * E, bias, &params, ids + t * k, weights + t * k);
}
