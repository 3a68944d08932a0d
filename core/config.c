/*
 * config.c - moe_config defaults and validation, shared by moe_layer_create
 * and the stage functions, so that every backend sees the same checks.
 */
#include "internal.h"

#include <math.h>

void moe_config_init(moe_config *cfg) {
  if (!cfg) return;
  *cfg = (moe_config){
      .scoring = MOE_SCORING_SOFTMAX,
      .num_groups = 0,
      .topk_groups = 0,
      .group_scoring = MOE_GROUP_SCORING_MAX,
      .routed_scaling_factor = 1.0f,
      .activation = MOE_ACTIVATION_SWIGLU,
      .swiglu_alpha = 1.702f,
      .swiglu_limit = 7.0f,
      .weight_layout = MOE_WEIGHT_LAYOUT_OUT_IN,
      .router_weight = MOE_ROUTER_WEIGHT_ON_OUTPUT,
  };
}

moe_status moe_check_row_length(int64_t value, const char *what) {
  if (value <= 0)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "%s = %lld must be positive", what,
                         (long long)value);
  /* Row lengths are int32-indexed inside kernels; 2^30 keeps 2I in range. */
  if (value > (1 << 30))
    return moe_set_error(MOE_ERROR_UNSUPPORTED, "%s = %lld exceeds the supported 2^30", what,
                         (long long)value);
  return MOE_SUCCESS;
}

moe_status moe_check_expert_count(int64_t value, const char *what) {
  if (value <= 0)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "%s = %lld must be positive", what,
                         (long long)value);
  if (value > MOE_MAX_EXPERTS)
    return moe_set_error(MOE_ERROR_UNSUPPORTED, "%s = %lld exceeds MOE_MAX_EXPERTS = %d", what,
                         (long long)value, MOE_MAX_EXPERTS);
  return MOE_SUCCESS;
}

moe_status moe_check_top_k(int64_t top_k) {
  if (top_k <= 0)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "top_k = %lld must be positive",
                         (long long)top_k);
  if (top_k > MOE_MAX_TOP_K)
    return moe_set_error(MOE_ERROR_UNSUPPORTED, "top_k = %lld exceeds MOE_MAX_TOP_K = %d",
                         (long long)top_k, MOE_MAX_TOP_K);
  return MOE_SUCCESS;
}

moe_status moe_check_slots(int64_t num_tokens, int64_t top_k, const char *what) {
  if (num_tokens < 0)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "%s = %lld is negative", what,
                         (long long)num_tokens);
  /* Slot ids (t * top_k + j) are int32 on every backend. */
  if (num_tokens > INT32_MAX / top_k)
    return moe_set_error(MOE_ERROR_UNSUPPORTED,
                         "%s = %lld times top_k = %lld exceeds the int32 slot index range", what,
                         (long long)num_tokens, (long long)top_k);
  return MOE_SUCCESS;
}

moe_status moe_config_check_routing(const moe_config *cfg) {
  moe_status st = moe_check_expert_count(cfg->num_experts, "num_experts");
  if (st == MOE_SUCCESS) st = moe_check_top_k(cfg->top_k);
  if (st != MOE_SUCCESS) return st;
  if (cfg->top_k > cfg->num_experts)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "top_k = %d exceeds num_experts = %d",
                         (int)cfg->top_k, (int)cfg->num_experts);
  if (cfg->scoring != MOE_SCORING_SOFTMAX && cfg->scoring != MOE_SCORING_SIGMOID)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "scoring = %d is not a moe_scoring value",
                         (int)cfg->scoring);
  if (cfg->group_scoring != MOE_GROUP_SCORING_MAX &&
      cfg->group_scoring != MOE_GROUP_SCORING_TOP2_SUM)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                         "group_scoring = %d is not a moe_group_scoring value",
                         (int)cfg->group_scoring);
  if (!isfinite(cfg->routed_scaling_factor))
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "routed_scaling_factor is not finite");
  if (cfg->num_groups < 0)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "num_groups = %d is negative",
                         (int)cfg->num_groups);
  if (cfg->num_groups > 1) {
    if (cfg->num_groups > MOE_MAX_GROUPS)
      return moe_set_error(MOE_ERROR_UNSUPPORTED, "num_groups = %d exceeds MOE_MAX_GROUPS = %d",
                           (int)cfg->num_groups, MOE_MAX_GROUPS);
    if (cfg->num_experts % cfg->num_groups != 0)
      return moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                           "num_groups = %d does not divide num_experts = %d", (int)cfg->num_groups,
                           (int)cfg->num_experts);
    if (cfg->topk_groups < 1 || cfg->topk_groups > cfg->num_groups)
      return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "topk_groups = %d is not in [1, %d]",
                           (int)cfg->topk_groups, (int)cfg->num_groups);
    int64_t reachable = (int64_t)cfg->topk_groups * (cfg->num_experts / cfg->num_groups);
    if (cfg->top_k > reachable)
      return moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                           "top_k = %d exceeds the %lld experts of the topk_groups best groups",
                           (int)cfg->top_k, (long long)reachable);
  }
  return MOE_SUCCESS;
}

moe_status moe_config_resolve(const moe_config *cfg, moe_config *resolved) {
  if (!cfg) return moe_set_error(MOE_ERROR_NULL_POINTER, "cfg is NULL");
  moe_status st = moe_check_row_length(cfg->hidden_size, "hidden_size");
  if (st == MOE_SUCCESS) st = moe_check_row_length(cfg->intermediate_size, "intermediate_size");
  if (st == MOE_SUCCESS) st = moe_config_check_routing(cfg);
  if (st != MOE_SUCCESS) return st;
  if (cfg->num_local_experts < 0 || cfg->num_local_experts > MOE_MAX_EXPERTS)
    return moe_set_error(
        cfg->num_local_experts < 0 ? MOE_ERROR_INVALID_ARGUMENT : MOE_ERROR_UNSUPPORTED,
        "num_local_experts = %d is not in [0, %d]", (int)cfg->num_local_experts, MOE_MAX_EXPERTS);
  if ((unsigned)cfg->activation > MOE_ACTIVATION_SWIGLU_CLAMP)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                         "activation = %d is not a moe_activation value", (int)cfg->activation);
  if (cfg->activation == MOE_ACTIVATION_SWIGLU_CLAMP &&
      (!isfinite(cfg->swiglu_alpha) || !(cfg->swiglu_limit > 0.0f)))
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                         "SWIGLU_CLAMP needs a finite alpha and a positive limit");
  if ((unsigned)cfg->weight_layout > MOE_WEIGHT_LAYOUT_IN_OUT)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                         "weight_layout = %d is not a moe_weight_layout value",
                         (int)cfg->weight_layout);
  if ((unsigned)cfg->router_weight > MOE_ROUTER_WEIGHT_ON_INPUT)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                         "router_weight = %d is not a moe_router_weight value",
                         (int)cfg->router_weight);
  if (resolved) {
    *resolved = *cfg;
    if (resolved->num_local_experts == 0) resolved->num_local_experts = cfg->num_experts;
    if (resolved->num_groups <= 1) {
      resolved->num_groups = 1;
      resolved->topk_groups = 1;
    }
  }
  return MOE_SUCCESS;
}

moe_status moe_config_validate(const moe_config *cfg) {
  moe_error_scope(NULL);
  return moe_config_resolve(cfg, NULL);
}

moe_status moe_align_check(int64_t num_tokens, int32_t top_k, int32_t num_local_experts,
                           int32_t block_m, int64_t *sorted_capacity, int64_t *block_capacity) {
  moe_status st = moe_check_top_k(top_k);
  if (st == MOE_SUCCESS) st = moe_check_slots(num_tokens, top_k, "num_tokens");
  if (st == MOE_SUCCESS) st = moe_check_expert_count(num_local_experts, "num_local_experts");
  if (st != MOE_SUCCESS) return st;
  if (block_m <= 0 || block_m > MOE_MAX_BLOCK_M || (block_m & (block_m - 1)) != 0)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                         "block_m = %d is not a power of two in [1, %d]", (int)block_m,
                         MOE_MAX_BLOCK_M);
  /* Slot ids and the sentinel are int32. */
  int64_t capacity, blocks;
  moe_plan_align_capacity(num_tokens * top_k, num_local_experts, block_m, &capacity, &blocks);
  if (capacity > INT32_MAX)
    return moe_set_error(MOE_ERROR_UNSUPPORTED,
                         "num_tokens * top_k + num_local_experts * (block_m - 1) = %lld exceeds "
                         "the int32 slot index range",
                         (long long)capacity);
  if (sorted_capacity) *sorted_capacity = capacity;
  if (block_capacity) *block_capacity = blocks;
  return MOE_SUCCESS;
}

moe_status moe_align_capacity(int64_t num_tokens, int32_t top_k, int32_t num_local_experts,
                              int32_t block_m, int64_t *sorted_capacity, int64_t *block_capacity) {
  moe_error_scope(NULL);
  if (!sorted_capacity || !block_capacity)
    return moe_set_error(MOE_ERROR_NULL_POINTER, "%s is NULL",
                         !sorted_capacity ? "sorted_capacity" : "block_capacity");
  return moe_align_check(num_tokens, top_k, num_local_experts, block_m, sorted_capacity,
                         block_capacity);
}
