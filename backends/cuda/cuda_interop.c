/*
 * cuda_interop.c - the public functions of include/moe_cuda.h: contexts on
 * the caller's stream, wrapped device memory, and a context's stream.
 */
#include "moe_cuda.h"

#include "cuda_context.h"
#include "internal.h"

static moe_status require_cuda(const moe_context *ctx) {
  if (!ctx) return moe_set_error(MOE_ERROR_NULL_POINTER, "ctx is NULL");
  if (ctx->ops != &moe_cuda_backend_ops)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "ctx runs on the %s backend, not cuda",
                         ctx->ops->name);
  return MOE_SUCCESS;
}

moe_status moe_cuda_context_create_on_stream(int device, void *stream, moe_context **ctx) {
  moe_error_scope(NULL);
  if (!ctx) return moe_set_error(MOE_ERROR_NULL_POINTER, "ctx is NULL");
  if (device < 0)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "device index %d is negative", device);
  char name[MOE_DEVICE_NAME_SIZE] = "";
  void *state = NULL;
  moe_status st = moe_cuda_state_create_on_stream(device, stream, &state, name, sizeof name);
  if (st != MOE_SUCCESS) return st;
  st = moe_context_adopt(&moe_cuda_backend_ops, state, name, ctx);
  if (st != MOE_SUCCESS) moe_cuda_backend_ops.context_destroy(state);
  return st;
}

moe_status moe_cuda_buffer_wrap(moe_context *ctx, void *device_ptr, size_t bytes,
                                moe_buffer **buffer) {
  moe_error_scope(ctx);
  moe_status st = require_cuda(ctx);
  if (st != MOE_SUCCESS) return st;
  return moe_buffer_wrap_native(ctx, device_ptr, bytes, buffer);
}

moe_status moe_cuda_context_stream(moe_context *ctx, void **stream) {
  moe_error_scope(ctx);
  moe_status st = require_cuda(ctx);
  if (st != MOE_SUCCESS) return st;
  if (!stream) return moe_set_error(MOE_ERROR_NULL_POINTER, "stream is NULL");
  *stream = moe_cuda_state_stream(ctx->state);
  return MOE_SUCCESS;
}
