/*
 * stages.c - the public stage functions: validate every argument, then
 * dispatch to the backend's table. Route and align fall back to the core's
 * host code through staging copies when a backend leaves them empty.
 */
#include "internal.h"

#include <math.h>
#include <stdlib.h>

/* Bytes of rows x cols elements; an overflow means no buffer can hold it. */
static moe_status tensor_bytes(size_t *bytes, int64_t rows, int64_t cols, size_t elem_size,
                               const char *what) {
  if (!moe_mul_size3(bytes, (size_t)rows, (size_t)cols, elem_size))
    return moe_set_error(MOE_ERROR_UNSUPPORTED, "the size of %s overflows size_t", what);
  return MOE_SUCCESS;
}

/* The backend's entry for a validated call, under the context's lock
 * (include/moe.h, "Thread safety"). */
#define LOCKED(ctx, expr)                                                                          \
  do {                                                                                             \
    pthread_mutex_lock(&(ctx)->lock);                                                              \
    moe_status locked_status_ = (expr);                                                            \
    pthread_mutex_unlock(&(ctx)->lock);                                                            \
    return locked_status_;                                                                         \
  } while (0)

/* A buffer of route or align, which run on the backend or, where the
 * backend leaves them empty, on the host through staging copies. */
typedef struct staging {
  const moe_buffer *buffer; /* NULL: an optional buffer not given */
  size_t bytes;
  bool read;  /* copy device -> host before the host code runs */
  bool write; /* copy host -> device after it */
  void *host;
} staging;

/* Points p[i] at what the stage gets for s[i]: the buffer's native handle
 * on the backend, or on the host (on_host) a host copy, read from the
 * buffer first where s[i].read; NULL for a buffer not given. stage_out
 * must follow, also after a failure. */
static moe_status stage_in(moe_context *ctx, staging *s, int n, bool on_host, void **p) {
  for (int i = 0; i < n; ++i) {
    s[i].host = NULL;
    p[i] = s[i].buffer && !on_host ? s[i].buffer->handle : NULL;
  }
  for (int i = 0; i < n && on_host; ++i) {
    if (!s[i].buffer) continue;
    p[i] = s[i].host = malloc(s[i].bytes ? s[i].bytes : 1);
    if (!s[i].host) return moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot allocate host staging");
    if (s[i].read)
      MOE_TRY(ctx->ops->buffer_read(ctx->state, s[i].buffer->handle, 0, s[i].host, s[i].bytes));
  }
  return MOE_SUCCESS;
}

/* After the stage ran with status st: writes the host copies back where
 * s[i].write (while all went well) and frees them. */
static moe_status stage_out(moe_context *ctx, staging *s, int n, moe_status st) {
  for (int i = 0; i < n; ++i) {
    if (st == MOE_SUCCESS && s[i].write && s[i].host)
      st = ctx->ops->buffer_write(ctx->state, s[i].buffer->handle, 0, s[i].host, s[i].bytes);
  }
  for (int i = 0; i < n; ++i)
    free(s[i].host);
  return st;
}

/* Runs a validated route on the staging of s (logits, correction_bias,
 * then the two outputs). */
static moe_status route_dispatch(moe_context *ctx, moe_route_args *args, staging *s) {
  const bool on_host = !ctx->ops->route;
  void *p[4];
  moe_status st = stage_in(ctx, s, 4, on_host, p);
  if (st == MOE_SUCCESS) {
    args->logits = p[0];
    args->correction_bias = p[1];
    args->topk_ids = p[2];
    args->topk_weights = p[3];
    if (on_host)
      moe_route_host(args);
    else
      st = ctx->ops->route(ctx->state, args);
  }
  return stage_out(ctx, s, 4, st);
}

moe_status moe_route(moe_context *ctx, const moe_config *cfg, int64_t num_tokens,
                     const moe_buffer *logits, const moe_buffer *correction_bias,
                     moe_buffer *topk_ids, moe_buffer *topk_weights) {
  moe_error_scope(ctx);
  if (!ctx) return moe_set_error(MOE_ERROR_NULL_POINTER, "ctx is NULL");
  if (!cfg) return moe_set_error(MOE_ERROR_NULL_POINTER, "cfg is NULL");
  MOE_TRY(moe_config_check_routing(cfg));
  MOE_TRY(moe_check_slots(num_tokens, cfg->top_k, "num_tokens"));
  size_t logit_bytes, slot_bytes, bias_bytes = cfg->num_experts * sizeof(float);
  MOE_TRY(tensor_bytes(&logit_bytes, num_tokens, cfg->num_experts, sizeof(float), "logits"));
  MOE_TRY(tensor_bytes(&slot_bytes, num_tokens, cfg->top_k, sizeof(int32_t), "topk_ids"));
  MOE_TRY(moe_check_buffer(ctx, logits, logit_bytes, "logits"));
  MOE_TRY(moe_check_optional_buffer(ctx, correction_bias, bias_bytes, "correction_bias"));
  MOE_TRY(moe_check_buffer(ctx, topk_ids, slot_bytes, "topk_ids"));
  MOE_TRY(moe_check_buffer(ctx, topk_weights, slot_bytes, "topk_weights"));
  if (num_tokens == 0) return MOE_SUCCESS;

  moe_route_args args = moe_plan_route_args(cfg, num_tokens, NULL, NULL, NULL, NULL);
  staging s[4] = {{logits, logit_bytes, true, false, NULL},
                  {correction_bias, bias_bytes, true, false, NULL},
                  {topk_ids, slot_bytes, false, true, NULL},
                  {topk_weights, slot_bytes, false, true, NULL}};
  LOCKED(ctx, route_dispatch(ctx, &args, s));
}

/* Runs a validated align on the staging of s (topk_ids, expert_map, then
 * the three outputs). */
static moe_status align_dispatch(moe_context *ctx, moe_align_args *args, staging *s) {
  const bool on_host = !ctx->ops->align;
  void *p[5];
  moe_status st = stage_in(ctx, s, 5, on_host, p);
  if (st == MOE_SUCCESS) {
    args->topk_ids = p[0];
    args->expert_map = p[1];
    args->sorted_token_ids = p[2];
    args->expert_ids = p[3];
    args->num_tokens_post_padded = p[4];
    if (on_host)
      moe_align_host(args);
    else
      st = ctx->ops->align(ctx->state, args);
  }
  return stage_out(ctx, s, 5, st);
}

moe_status moe_align(moe_context *ctx, int64_t num_tokens, int32_t top_k, int32_t num_experts,
                     int32_t num_local_experts, int32_t block_m, const moe_buffer *topk_ids,
                     const moe_buffer *expert_map, moe_buffer *sorted_token_ids,
                     moe_buffer *expert_ids, moe_buffer *num_tokens_post_padded) {
  moe_error_scope(ctx);
  if (!ctx) return moe_set_error(MOE_ERROR_NULL_POINTER, "ctx is NULL");
  int64_t sorted_capacity, block_capacity;
  MOE_TRY(moe_align_check(num_tokens, top_k, num_local_experts, block_m, &sorted_capacity,
                          &block_capacity));
  MOE_TRY(moe_check_expert_count(num_experts, "num_experts"));
  if (!expert_map && num_local_experts != num_experts)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                         "without an expert map, num_local_experts (%d) must equal num_experts "
                         "(%d)",
                         (int)num_local_experts, (int)num_experts);
  const size_t slot_bytes = (size_t)(num_tokens * top_k) * sizeof(int32_t);
  const size_t sorted_bytes = (size_t)sorted_capacity * sizeof(int32_t);
  const size_t block_bytes = (size_t)block_capacity * sizeof(int32_t);
  const size_t map_bytes = (size_t)num_experts * sizeof(int32_t);
  MOE_TRY(moe_check_buffer(ctx, topk_ids, slot_bytes, "topk_ids"));
  MOE_TRY(moe_check_optional_buffer(ctx, expert_map, map_bytes, "expert_map"));
  MOE_TRY(moe_check_buffer(ctx, sorted_token_ids, sorted_bytes, "sorted_token_ids"));
  MOE_TRY(moe_check_buffer(ctx, expert_ids, block_bytes, "expert_ids"));
  MOE_TRY(moe_check_buffer(ctx, num_tokens_post_padded, sizeof(int32_t), "num_tokens_post_padded"));

  moe_align_args args = {
      .num_tokens = num_tokens,
      .top_k = top_k,
      .num_experts = num_experts,
      .num_local_experts = num_local_experts,
      .block_m = block_m,
      .sorted_capacity = sorted_capacity,
      .block_capacity = block_capacity,
  };
  staging s[5] = {{topk_ids, slot_bytes, true, false, NULL},
                  {expert_map, map_bytes, true, false, NULL},
                  {sorted_token_ids, sorted_bytes, false, true, NULL},
                  {expert_ids, block_bytes, false, true, NULL},
                  {num_tokens_post_padded, sizeof(int32_t), false, true, NULL}};
  LOCKED(ctx, align_dispatch(ctx, &args, s));
}

moe_status moe_grouped_gemm(moe_context *ctx, const moe_gemm_desc *desc, const moe_buffer *a,
                            const moe_buffer *b, const moe_buffer *bias,
                            const moe_buffer *sorted_token_ids, const moe_buffer *expert_ids,
                            const moe_buffer *num_tokens_post_padded,
                            const moe_buffer *topk_weights, moe_buffer *c) {
  moe_error_scope(ctx);
  if (!ctx) return moe_set_error(MOE_ERROR_NULL_POINTER, "ctx is NULL");
  if (!desc) return moe_set_error(MOE_ERROR_NULL_POINTER, "desc is NULL");
  int64_t sorted_capacity, block_capacity;
  MOE_TRY(moe_align_check(desc->num_tokens, desc->top_k, desc->num_local_experts, desc->block_m,
                          &sorted_capacity, &block_capacity));
  MOE_TRY(moe_check_row_length(desc->n, "n"));
  MOE_TRY(moe_check_row_length(desc->k, "k"));
  if ((unsigned)desc->b_layout > MOE_WEIGHT_LAYOUT_IN_OUT)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "b_layout = %d is not a moe_weight_layout",
                         (int)desc->b_layout);
  if ((unsigned)desc->input > MOE_GEMM_INPUT_PER_SLOT)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "input = %d is not a moe_gemm_input",
                         (int)desc->input);
  if ((unsigned)desc->routed_weight > MOE_GEMM_ROUTED_WEIGHT_AFTER_BIAS)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                         "routed_weight = %d is not a moe_gemm_routed_weight",
                         (int)desc->routed_weight);
  const int64_t num_slots = desc->num_tokens * desc->top_k;
  const int64_t a_rows = desc->input == MOE_GEMM_INPUT_PER_TOKEN ? desc->num_tokens : num_slots;
  size_t a_bytes, b_bytes, bias_bytes, c_bytes;
  MOE_TRY(tensor_bytes(&a_bytes, a_rows, desc->k, 2, "a"));
  MOE_TRY(tensor_bytes(&b_bytes, desc->num_local_experts, desc->n * desc->k, 2, "b"));
  MOE_TRY(tensor_bytes(&bias_bytes, desc->num_local_experts, desc->n, sizeof(float), "bias"));
  MOE_TRY(tensor_bytes(&c_bytes, num_slots, desc->n, 2, "c"));
  MOE_TRY(moe_check_buffer(ctx, a, a_bytes, "a"));
  MOE_TRY(moe_check_buffer(ctx, b, b_bytes, "b"));
  MOE_TRY(moe_check_optional_buffer(ctx, bias, bias_bytes, "bias"));
  MOE_TRY(moe_check_buffer(ctx, sorted_token_ids, (size_t)sorted_capacity * 4, "sorted_token_ids"));
  MOE_TRY(moe_check_buffer(ctx, expert_ids, (size_t)block_capacity * 4, "expert_ids"));
  MOE_TRY(moe_check_buffer(ctx, num_tokens_post_padded, 4, "num_tokens_post_padded"));
  if (desc->routed_weight != MOE_GEMM_ROUTED_WEIGHT_NONE)
    MOE_TRY(moe_check_buffer(ctx, topk_weights, (size_t)num_slots * sizeof(float), "topk_weights"));
  MOE_TRY(moe_check_buffer(ctx, c, c_bytes, "c"));
  if (num_slots == 0) return MOE_SUCCESS;

  moe_gemm_args args = {
      .desc = *desc,
      .sorted_capacity = sorted_capacity,
      .block_capacity = block_capacity,
      .a = a->handle,
      .b = b->handle,
      .bias = bias ? bias->handle : NULL,
      .sorted_token_ids = sorted_token_ids->handle,
      .expert_ids = expert_ids->handle,
      .num_tokens_post_padded = num_tokens_post_padded->handle,
      .topk_weights =
          desc->routed_weight != MOE_GEMM_ROUTED_WEIGHT_NONE ? topk_weights->handle : NULL,
      .c = c->handle,
  };
  LOCKED(ctx, ctx->ops->grouped_gemm(ctx->state, &args));
}

moe_status moe_activation_apply(moe_context *ctx, moe_activation activation, float alpha,
                                float limit, int64_t rows, int64_t intermediate_size,
                                const moe_buffer *in, moe_buffer *out) {
  moe_error_scope(ctx);
  if (!ctx) return moe_set_error(MOE_ERROR_NULL_POINTER, "ctx is NULL");
  if ((unsigned)activation > MOE_ACTIVATION_SWIGLU_CLAMP)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "activation = %d is not a moe_activation",
                         (int)activation);
  if (activation == MOE_ACTIVATION_SWIGLU_CLAMP && (!isfinite(alpha) || !(limit > 0.0f)))
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                         "SWIGLU_CLAMP needs a finite alpha and a positive limit");
  MOE_TRY(moe_check_slots(rows, 1, "rows")); /* rows are slots of a layer */
  MOE_TRY(moe_check_row_length(intermediate_size, "intermediate_size"));
  size_t in_bytes, out_bytes;
  MOE_TRY(tensor_bytes(&in_bytes, rows, 2 * intermediate_size, 2, "in"));
  MOE_TRY(tensor_bytes(&out_bytes, rows, intermediate_size, 2, "out"));
  MOE_TRY(moe_check_buffer(ctx, in, in_bytes, "in"));
  MOE_TRY(moe_check_buffer(ctx, out, out_bytes, "out"));
  if (rows == 0) return MOE_SUCCESS;
  moe_activation_args args = {.activation = activation,
                              .alpha = alpha,
                              .limit = limit,
                              .rows = rows,
                              .intermediate_size = intermediate_size,
                              .in = in->handle,
                              .out = out->handle};
  LOCKED(ctx, ctx->ops->activation(ctx->state, &args));
}

moe_status moe_topk_reduce(moe_context *ctx, int64_t num_tokens, int32_t top_k, int64_t hidden_size,
                           const moe_buffer *y, const moe_buffer *topk_weights,
                           const moe_buffer *topk_ids, const moe_buffer *expert_map,
                           int32_t num_experts, int32_t num_local_experts, moe_buffer *out) {
  moe_error_scope(ctx);
  if (!ctx) return moe_set_error(MOE_ERROR_NULL_POINTER, "ctx is NULL");
  MOE_TRY(moe_check_top_k(top_k));
  MOE_TRY(moe_check_slots(num_tokens, top_k, "num_tokens"));
  MOE_TRY(moe_check_row_length(hidden_size, "hidden_size"));
  const bool masked = topk_ids && expert_map;
  if (masked) {
    MOE_TRY(moe_check_expert_count(num_experts, "num_experts"));
    MOE_TRY(moe_check_expert_count(num_local_experts, "num_local_experts"));
  }
  size_t y_bytes, out_bytes, slot_bytes = (size_t)(num_tokens * top_k) * 4;
  MOE_TRY(tensor_bytes(&y_bytes, num_tokens * top_k, hidden_size, 2, "y"));
  MOE_TRY(tensor_bytes(&out_bytes, num_tokens, hidden_size, 2, "out"));
  MOE_TRY(moe_check_buffer(ctx, y, y_bytes, "y"));
  MOE_TRY(moe_check_optional_buffer(ctx, topk_weights, slot_bytes, "topk_weights"));
  MOE_TRY(moe_check_optional_buffer(ctx, topk_ids, slot_bytes, "topk_ids"));
  if (masked) MOE_TRY(moe_check_buffer(ctx, expert_map, (size_t)num_experts * 4, "expert_map"));
  MOE_TRY(moe_check_buffer(ctx, out, out_bytes, "out"));
  if (num_tokens == 0) return MOE_SUCCESS;
  moe_reduce_args args = {
      .num_tokens = num_tokens,
      .top_k = top_k,
      .hidden_size = hidden_size,
      .y = y->handle,
      .topk_weights = topk_weights ? topk_weights->handle : NULL,
      .topk_ids = masked ? topk_ids->handle : NULL,
      .expert_map = masked ? expert_map->handle : NULL,
      .num_experts = num_experts,
      .num_local_experts = num_local_experts,
      .out = out->handle,
  };
  LOCKED(ctx, ctx->ops->topk_reduce(ctx->state, &args));
}
