/*
 * plan.c - the core's plan helpers: the orchestration facts of a layer
 * forward that every backend needs and that follow from the configuration
 * alone (docs/DESIGN.md, "Core plan helpers"). Backends fill their stage
 * arguments here instead of by hand, so that the route fields, the align
 * capacities, the routed-weight placement and the rows per expert have one
 * definition.
 *
 * Plain C without designated initializers or compound literals, so that
 * the same text stays acceptable to a C++ (CUDA) compiler.
 */
#include "backend.h"

moe_route_args moe_plan_route_args(const moe_config *cfg, int64_t num_tokens, const void *logits,
                                   const void *correction_bias, void *topk_ids,
                                   void *topk_weights) {
  const int grouped = cfg->num_groups > 1;
  moe_route_args args;
  args.num_tokens = num_tokens;
  args.logits = logits;
  args.correction_bias = correction_bias;
  args.topk_ids = topk_ids;
  args.topk_weights = topk_weights;
  args.num_experts = cfg->num_experts;
  args.top_k = cfg->top_k;
  args.scoring = cfg->scoring;
  args.renormalize = cfg->renormalize != 0;
  args.num_groups = grouped ? cfg->num_groups : 1;
  args.topk_groups = grouped ? cfg->topk_groups : 1;
  args.group_scoring = cfg->group_scoring;
  args.routed_scaling_factor = cfg->routed_scaling_factor;
  return args;
}

void moe_plan_align_capacity(int64_t slots, int64_t num_local_experts, int32_t block_m,
                             int64_t *sorted_capacity, int64_t *block_capacity) {
  const int64_t sorted = slots + num_local_experts * (int64_t)(block_m - 1);
  if (sorted_capacity) *sorted_capacity = sorted;
  if (block_capacity) *block_capacity = (sorted + block_m - 1) / block_m;
}

moe_align_args moe_plan_align_args(const moe_config *cfg, int64_t num_tokens, int32_t block_m,
                                   const void *topk_ids, const void *expert_map,
                                   void *sorted_token_ids, void *expert_ids,
                                   void *num_tokens_post_padded) {
  moe_align_args args;
  args.num_tokens = num_tokens;
  args.top_k = cfg->top_k;
  args.num_experts = cfg->num_experts;
  args.num_local_experts = cfg->num_local_experts;
  args.block_m = block_m;
  moe_plan_align_capacity(num_tokens * cfg->top_k, cfg->num_local_experts, block_m,
                          &args.sorted_capacity, &args.block_capacity);
  args.topk_ids = topk_ids;
  args.expert_map = expert_map;
  args.sorted_token_ids = sorted_token_ids;
  args.expert_ids = expert_ids;
  args.num_tokens_post_padded = num_tokens_post_padded;
  return args;
}

void moe_plan_routed_modes(const moe_config *cfg, moe_gemm_routed_weight *gemm1,
                           moe_gemm_routed_weight *gemm2) {
  const int on_input = cfg->router_weight == MOE_ROUTER_WEIGHT_ON_INPUT;
  if (gemm1) *gemm1 = on_input ? MOE_GEMM_ROUTED_WEIGHT_BEFORE_BIAS : MOE_GEMM_ROUTED_WEIGHT_NONE;
  if (gemm2) *gemm2 = on_input ? MOE_GEMM_ROUTED_WEIGHT_NONE : MOE_GEMM_ROUTED_WEIGHT_AFTER_BIAS;
}

int64_t moe_plan_rows_per_expert(int64_t slots, int64_t num_local_experts) {
  const int64_t touched = slots < num_local_experts ? slots : num_local_experts;
  return touched > 0 ? (slots + touched - 1) / touched : 0;
}

void moe_plan_gemm_descs(const moe_config *cfg, int64_t num_tokens, int32_t block_m,
                         moe_weight_layout b_layout, moe_gemm_desc *gemm1, moe_gemm_desc *gemm2) {
  moe_gemm_desc d;
  d.num_tokens = num_tokens;
  d.top_k = cfg->top_k;
  d.num_local_experts = cfg->num_local_experts;
  d.block_m = block_m;
  d.b_layout = b_layout;
  moe_gemm_routed_weight mode1, mode2;
  moe_plan_routed_modes(cfg, &mode1, &mode2);
  if (gemm1) {
    *gemm1 = d;
    gemm1->n = 2 * cfg->intermediate_size;
    gemm1->k = cfg->hidden_size;
    gemm1->input = MOE_GEMM_INPUT_PER_TOKEN;
    gemm1->routed_weight = mode1;
  }
  if (gemm2) {
    *gemm2 = d;
    gemm2->n = cfg->hidden_size;
    gemm2->k = cfg->intermediate_size;
    gemm2->input = MOE_GEMM_INPUT_PER_SLOT;
    gemm2->routed_weight = mode2;
  }
}

moe_reduce_args moe_plan_reduce_args(const moe_config *cfg, int64_t num_tokens, const void *y,
                                     const void *topk_ids, const void *expert_map, void *out) {
  moe_reduce_args args;
  args.num_tokens = num_tokens;
  args.top_k = cfg->top_k;
  args.hidden_size = cfg->hidden_size;
  args.y = y;
  args.topk_weights = NULL; /* applied by GEMM2 (or GEMM1 on the input) */
  args.topk_ids = topk_ids;
  args.expert_map = expert_map;
  args.num_experts = cfg->num_experts;
  args.num_local_experts = cfg->num_local_experts;
  args.out = out;
  return args;
}
