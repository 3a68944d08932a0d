/*
 * layer.c - the public layer object: validation of the configuration,
 * weights and forward arguments, then dispatch to the backend's layer
 * entries, which own repacking and workspace, and to the backend's fused
 * forward or else the core's default one (core/forward.c).
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

moe_status moe_layer_create(moe_context *ctx, const moe_config *cfg, const moe_weights *weights,
                            moe_layer **layer) {
  moe_error_scope(ctx);
  if (!ctx) return moe_set_error(MOE_ERROR_NULL_POINTER, "ctx is NULL");
  if (!layer) return moe_set_error(MOE_ERROR_NULL_POINTER, "layer is NULL");
  if (!weights) return moe_set_error(MOE_ERROR_NULL_POINTER, "weights is NULL");
  moe_config resolved;
  moe_status st = moe_config_resolve(cfg, &resolved);
  if (st != MOE_SUCCESS) return st;
  if (!weights->w13 || !weights->w2)
    return moe_set_error(MOE_ERROR_NULL_POINTER, "weights->%s is NULL",
                         !weights->w13 ? "w13" : "w2");
  if (!weights->expert_map && resolved.num_local_experts != resolved.num_experts)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                         "num_local_experts = %d differs from num_experts = %d, which needs an "
                         "expert map",
                         (int)resolved.num_local_experts, (int)resolved.num_experts);
  if (weights->expert_map)
    for (int32_t e = 0; e < resolved.num_experts; ++e) {
      int32_t id = weights->expert_map[e];
      if (id < -1 || id >= resolved.num_local_experts)
        return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "expert_map[%d] = %d is not in [-1, %d)",
                             (int)e, (int)id, (int)resolved.num_local_experts);
    }
  size_t bytes;
  if (!moe_mul_size3(&bytes, (size_t)resolved.num_local_experts, (size_t)(3 * resolved.hidden_size),
                     (size_t)resolved.intermediate_size) ||
      !moe_mul_size(&bytes, bytes, 2))
    return moe_set_error(MOE_ERROR_UNSUPPORTED, "the weights' size overflows size_t");

  moe_layer *l = calloc(1, sizeof *l);
  if (!l) return moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot allocate a layer");
  moe_layer_desc desc = {.cfg = resolved, .weights = weights};
  st = ctx->ops->layer_create(ctx->state, &desc, &l->impl);
  if (st != MOE_SUCCESS) {
    free(l);
    return st;
  }
  l->ctx = ctx;
  l->cfg = resolved;
  *layer = l;
  return MOE_SUCCESS;
}

void moe_layer_destroy(moe_layer *layer) {
  if (!layer) return;
  layer->ctx->ops->layer_destroy(layer->ctx->state, layer->impl);
  free(layer->tuning);
  free(layer);
}

moe_status moe_layer_reserve(moe_layer *layer, int64_t max_tokens) {
  moe_error_scope(layer ? layer->ctx : NULL);
  if (!layer) return moe_set_error(MOE_ERROR_NULL_POINTER, "layer is NULL");
  if (max_tokens <= 0)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "max_tokens = %lld must be positive",
                         (long long)max_tokens);
  moe_status st = moe_align_check(max_tokens, layer->cfg.top_k, layer->cfg.num_local_experts,
                                  MOE_MAX_BLOCK_M, NULL, NULL);
  if (st != MOE_SUCCESS) return st;
  /* Under the context's lock: a forward on another thread keeps using the
   * old workspace until this one is in place. */
  pthread_mutex_lock(&layer->ctx->lock);
  if (max_tokens > layer->reserved_tokens) {
    st = layer->ctx->ops->layer_reserve(layer->ctx->state, layer->impl, max_tokens);
    if (st == MOE_SUCCESS) layer->reserved_tokens = max_tokens;
  }
  pthread_mutex_unlock(&layer->ctx->lock);
  /* A deployment's tuning cache ($MOE_TUNING_DIR), looked for once. */
  if (st == MOE_SUCCESS) moe_tuning_cache_load(layer);
  return st;
}

/* The arguments of one of the three forwards; the routing source is logits
 * or ids_in with weights_in, and ids_out / weights_out are the capture. */
typedef struct forward_call {
  int64_t num_tokens;
  bool routed;  /* the routing comes from ids_in / weights_in, not logits */
  bool capture; /* ids_out / weights_out receive the picks */
  const moe_buffer *x, *logits, *ids_in, *weights_in;
  moe_buffer *ids_out, *weights_out, *out;
} forward_call;

/* One window of a forward: the backend's own forward where it has one
 * (it fuses stages), else the core's composition of its stages. */
static moe_status forward_window(moe_layer *layer, const moe_forward_io *io) {
  const moe_context *ctx = layer->ctx;
  if (ctx->ops->layer_forward_routed)
    return ctx->ops->layer_forward_routed(ctx->state, layer->impl, io);
  return moe_forward_default(ctx->ops, ctx->state, layer->impl, &layer->cfg, io);
}

/* Everything but the lock: checks (none touches an output), then the
 * backend, in chunks of the reservation when the layer allows them. */
static moe_status forward_locked(moe_layer *layer, const forward_call *c) {
  const moe_config *cfg = &layer->cfg;
  const int64_t T = c->num_tokens, reserved = layer->reserved_tokens;
  if (T > reserved && (!layer->chunked || reserved == 0))
    return moe_set_error(MOE_ERROR_NOT_RESERVED,
                         "num_tokens = %lld exceeds the %lld reserved by moe_layer_reserve%s",
                         (long long)T, (long long)reserved,
                         reserved ? " (moe_layer_set_chunking runs it in chunks)" : "");
  /* Sizes: T may pass the reservation (chunked), so multiply with checks. */
  size_t hidden_bytes, logit_bytes, slot_bytes;
  if (!moe_mul_size3(&hidden_bytes, (size_t)T, (size_t)cfg->hidden_size, 2) ||
      !moe_mul_size3(&logit_bytes, (size_t)T, (size_t)cfg->num_experts, sizeof(float)) ||
      !moe_mul_size3(&slot_bytes, (size_t)T, (size_t)cfg->top_k, 4))
    return moe_set_error(MOE_ERROR_UNSUPPORTED, "num_tokens = %lld: sizes overflow size_t",
                         (long long)T);
  moe_context *ctx = layer->ctx;
  moe_status st = moe_check_buffer(ctx, c->x, hidden_bytes, "x");
  if (st == MOE_SUCCESS && !c->routed) st = moe_check_buffer(ctx, c->logits, logit_bytes, "logits");
  if (st == MOE_SUCCESS && c->routed) {
    st = moe_check_buffer(ctx, c->ids_in, slot_bytes, "topk_ids");
    if (st == MOE_SUCCESS) st = moe_check_buffer(ctx, c->weights_in, slot_bytes, "topk_weights");
  }
  if (st == MOE_SUCCESS && c->capture) {
    st = moe_check_buffer(ctx, c->ids_out, slot_bytes, "topk_ids");
    if (st == MOE_SUCCESS) st = moe_check_buffer(ctx, c->weights_out, slot_bytes, "topk_weights");
  }
  if (st == MOE_SUCCESS) st = moe_check_buffer(ctx, c->out, hidden_bytes, "out");
  if (st != MOE_SUCCESS) return st;
  /* Caller ids are checked where they are host memory (the CPU backend);
   * GPU backends skip ids outside the experts on the device instead, since
   * reading them here would be a host wait (include/moe.h). */
  if (c->routed && ctx->ops->kind == MOE_BACKEND_CPU) {
    const int32_t *ids = c->ids_in->handle;
    for (int64_t s = 0; s < T * cfg->top_k; ++s)
      if (ids[s] < -1 || ids[s] >= cfg->num_experts)
        return moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                             "topk_ids[%lld][%lld] = %d is not in [-1, %d)",
                             (long long)(s / cfg->top_k), (long long)(s % cfg->top_k), (int)ids[s],
                             (int)cfg->num_experts);
  }
  if (T == 0) return MOE_SUCCESS;
  /* A plain forward within the reservation: the backend's own entry for
   * it where it has one. */
  if (!c->routed && !c->capture && T <= reserved && ctx->ops->layer_forward)
    return ctx->ops->layer_forward(ctx->state, layer->impl, T, c->x->handle, c->logits->handle,
                                   c->out->handle);
  if (!ctx->ops->layer_forward_routed && !ctx->ops->forward_parts)
    return moe_set_error(MOE_ERROR_UNSUPPORTED, "the %s backend has no routed forward",
                         ctx->ops->name);
  for (int64_t first = 0; first < T && st == MOE_SUCCESS; first += reserved) {
    const moe_forward_io io = {
        .num_tokens = T - first < reserved ? T - first : reserved,
        .first_token = first,
        .x = c->x->handle,
        .logits = c->routed ? NULL : c->logits->handle,
        .topk_ids_in = c->routed ? c->ids_in->handle : NULL,
        .topk_weights_in = c->routed ? c->weights_in->handle : NULL,
        .topk_ids_out = c->capture ? c->ids_out->handle : NULL,
        .topk_weights_out = c->capture ? c->weights_out->handle : NULL,
        .out = c->out->handle,
    };
    st = forward_window(layer, &io);
  }
  return st;
}

/* force: a tuning entry to run with (the tuner), else the table's for T. */
static moe_status forward_with(moe_layer *layer, const forward_call *c,
                               const moe_tuning_entry *force) {
  if (c->num_tokens < 0)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "num_tokens = %lld is negative",
                         (long long)c->num_tokens);
  /* The whole call under the context's lock: the layer's workspace (and,
   * on OpenCL, the context's kernels) serve one forward at a time, and a
   * concurrent moe_layer_reserve may replace the workspace. The tuned
   * options for T are set through the path of moe_context_set_option and
   * put back before the lock is released (no allocation, no host wait). */
  pthread_mutex_lock(&layer->ctx->lock);
  const moe_tuning_entry *entry =
      force ? force : (c->num_tokens > 0 ? moe_tuning_lookup(layer, c->num_tokens) : NULL);
  char saved[MOE_TUNING_MAX_SETTINGS][MOE_OPTION_VALUE_SIZE];
  moe_status st = entry ? moe_tuning_apply_locked(layer->ctx, entry, saved) : MOE_SUCCESS;
  if (st == MOE_SUCCESS) {
    st = forward_locked(layer, c);
    if (entry) moe_tuning_restore_locked(layer->ctx, entry, saved);
  }
  pthread_mutex_unlock(&layer->ctx->lock);
  return st;
}

static moe_status forward(moe_layer *layer, const forward_call *c) {
  return forward_with(layer, c, NULL);
}

moe_status moe_layer_forward_entry(moe_layer *layer, int64_t num_tokens, const moe_buffer *x,
                                   const moe_buffer *logits, moe_buffer *out,
                                   const moe_tuning_entry *force) {
  const forward_call c = {.num_tokens = num_tokens, .x = x, .logits = logits, .out = out};
  return forward_with(layer, &c, force);
}

moe_status moe_layer_describe(moe_layer *layer, int64_t num_tokens, char *text, size_t size) {
  moe_error_scope(layer ? layer->ctx : NULL);
  if (!layer || !text)
    return moe_set_error(MOE_ERROR_NULL_POINTER, "%s is NULL", !layer ? "layer" : "text");
  if (num_tokens < 1)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "num_tokens = %lld must be at least 1",
                         (long long)num_tokens);
  moe_status st = moe_check_slots(num_tokens, layer->cfg.top_k, "num_tokens");
  if (st != MOE_SUCCESS) return st;
  /* Composed here in full, so that a short buffer is refused untouched.
   * Under the context's lock: the options and the workspace it reads may
   * change on another thread. The layer's tuned options for T apply, as
   * in the forward (the device name may name a kernel path). */
  char line[1024];
  pthread_mutex_lock(&layer->ctx->lock);
  const moe_tuning_entry *entry = moe_tuning_lookup(layer, num_tokens);
  char saved[MOE_TUNING_MAX_SETTINGS][MOE_OPTION_VALUE_SIZE];
  st = entry ? moe_tuning_apply_locked(layer->ctx, entry, saved) : MOE_SUCCESS;
  if (st == MOE_SUCCESS) {
    int len = snprintf(line, sizeof line, "%s (%s): T=%lld%s: ", layer->ctx->ops->name,
                       layer->ctx->device_name, (long long)num_tokens,
                       layer->cfg.batch_invariant ? ", batch invariant" : "");
    if (len < 0 || (size_t)len >= sizeof line) len = 0;
    st = layer->ctx->ops->layer_describe(layer->ctx->state, layer->impl, num_tokens, line + len,
                                         sizeof line - (size_t)len);
    if (entry) moe_tuning_restore_locked(layer->ctx, entry, saved);
  }
  pthread_mutex_unlock(&layer->ctx->lock);
  if (st != MOE_SUCCESS) return st;
  const size_t need = strlen(line) + 1;
  if (need > size)
    return moe_set_error(MOE_ERROR_BUFFER_TOO_SMALL,
                         "the description needs %zu bytes, the buffer has %zu", need, size);
  memcpy(text, line, need);
  return MOE_SUCCESS;
}

moe_status moe_layer_forward(moe_layer *layer, int64_t num_tokens, const moe_buffer *x,
                             const moe_buffer *logits, moe_buffer *out) {
  moe_error_scope(layer ? layer->ctx : NULL);
  if (!layer) return moe_set_error(MOE_ERROR_NULL_POINTER, "layer is NULL");
  const forward_call c = {.num_tokens = num_tokens, .x = x, .logits = logits, .out = out};
  return forward(layer, &c);
}

moe_status moe_layer_forward_capture(moe_layer *layer, int64_t num_tokens, const moe_buffer *x,
                                     const moe_buffer *logits, moe_buffer *out,
                                     moe_buffer *topk_ids, moe_buffer *topk_weights) {
  moe_error_scope(layer ? layer->ctx : NULL);
  if (!layer) return moe_set_error(MOE_ERROR_NULL_POINTER, "layer is NULL");
  const forward_call c = {.num_tokens = num_tokens,
                          .capture = true,
                          .x = x,
                          .logits = logits,
                          .ids_out = topk_ids,
                          .weights_out = topk_weights,
                          .out = out};
  return forward(layer, &c);
}

moe_status moe_layer_forward_routed(moe_layer *layer, int64_t num_tokens, const moe_buffer *x,
                                    const moe_buffer *topk_ids, const moe_buffer *topk_weights,
                                    moe_buffer *out) {
  moe_error_scope(layer ? layer->ctx : NULL);
  if (!layer) return moe_set_error(MOE_ERROR_NULL_POINTER, "layer is NULL");
  const forward_call c = {.num_tokens = num_tokens,
                          .routed = true,
                          .x = x,
                          .ids_in = topk_ids,
                          .weights_in = topk_weights,
                          .out = out};
  return forward(layer, &c);
}

moe_status moe_layer_set_chunking(moe_layer *layer, int enabled) {
  moe_error_scope(layer ? layer->ctx : NULL);
  if (!layer) return moe_set_error(MOE_ERROR_NULL_POINTER, "layer is NULL");
  pthread_mutex_lock(&layer->ctx->lock);
  layer->chunked = enabled != 0;
  pthread_mutex_unlock(&layer->ctx->lock);
  return MOE_SUCCESS;
}
