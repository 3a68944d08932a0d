/*
 * error.c - status strings, per-context and per-thread error messages, and
 * the small checked-arithmetic and buffer-check helpers every entry point
 * uses before it touches an output.
 */
#include "internal.h"

#include <stdio.h>

static _Thread_local moe_context *error_ctx;
static _Thread_local char thread_error[MOE_ERROR_MESSAGE_SIZE];

const char *moe_status_string(moe_status status) {
  switch (status) {
  case MOE_SUCCESS:
    return "MOE_SUCCESS";
  case MOE_ERROR_INVALID_ARGUMENT:
    return "MOE_ERROR_INVALID_ARGUMENT";
  case MOE_ERROR_NULL_POINTER:
    return "MOE_ERROR_NULL_POINTER";
  case MOE_ERROR_UNSUPPORTED:
    return "MOE_ERROR_UNSUPPORTED";
  case MOE_ERROR_BUFFER_TOO_SMALL:
    return "MOE_ERROR_BUFFER_TOO_SMALL";
  case MOE_ERROR_CONTEXT_MISMATCH:
    return "MOE_ERROR_CONTEXT_MISMATCH";
  case MOE_ERROR_NOT_RESERVED:
    return "MOE_ERROR_NOT_RESERVED";
  case MOE_ERROR_OUT_OF_MEMORY:
    return "MOE_ERROR_OUT_OF_MEMORY";
  case MOE_ERROR_BACKEND_UNAVAILABLE:
    return "MOE_ERROR_BACKEND_UNAVAILABLE";
  case MOE_ERROR_DEVICE:
    return "MOE_ERROR_DEVICE";
  case MOE_ERROR_INTERNAL:
    return "MOE_ERROR_INTERNAL";
  case MOE_ERROR_TUNING_MISMATCH:
    return "MOE_ERROR_TUNING_MISMATCH";
  }
  return "MOE_ERROR_UNKNOWN";
}

void moe_error_scope(moe_context *ctx) {
  error_ctx = ctx;
}

moe_status moe_set_error(moe_status status, const char *fmt, ...) {
  char *dst = error_ctx ? error_ctx->last_error : thread_error;
  va_list args;
  va_start(args, fmt);
  vsnprintf(dst, MOE_ERROR_MESSAGE_SIZE, fmt, args);
  va_end(args);
  return status;
}

const char *moe_last_error(const moe_context *ctx) {
  return ctx ? ctx->last_error : thread_error;
}

bool moe_mul_size(size_t *size, size_t a, size_t b) {
  return !__builtin_mul_overflow(a, b, size);
}

bool moe_mul_size3(size_t *size, size_t a, size_t b, size_t c) {
  size_t ab;
  return moe_mul_size(&ab, a, b) && moe_mul_size(size, ab, c);
}

moe_status moe_check_buffer(const moe_context *ctx, const moe_buffer *buf, size_t bytes,
                            const char *what) {
  if (!buf) return moe_set_error(MOE_ERROR_NULL_POINTER, "%s is NULL", what);
  if (buf->ctx != ctx)
    return moe_set_error(MOE_ERROR_CONTEXT_MISMATCH, "%s belongs to another context", what);
  if (buf->bytes < bytes)
    return moe_set_error(MOE_ERROR_BUFFER_TOO_SMALL, "%s holds %zu bytes, the shapes need %zu",
                         what, buf->bytes, bytes);
  return MOE_SUCCESS;
}

moe_status moe_check_optional_buffer(const moe_context *ctx, const moe_buffer *buf, size_t bytes,
                                     const char *what) {
  return buf ? moe_check_buffer(ctx, buf, bytes, what) : MOE_SUCCESS;
}
