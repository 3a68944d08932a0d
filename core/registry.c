/*
 * registry.c - the compiled backends, AUTO selection, and the public
 * context and buffer objects that wrap a backend's state and handles.
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const moe_backend_ops *moe_backend_lookup(moe_backend backend) {
  switch (backend) {
  case MOE_BACKEND_CPU:
    return &moe_cpu_backend_ops;
#ifdef MOE_HAVE_CUDA
  case MOE_BACKEND_CUDA:
    return &moe_cuda_backend_ops;
#endif
#ifdef MOE_HAVE_OPENCL
  case MOE_BACKEND_OPENCL:
    return &moe_opencl_backend_ops;
#endif
  default:
    return NULL;
  }
}

const char *moe_backend_name(moe_backend backend) {
  switch (backend) {
  case MOE_BACKEND_AUTO:
    return "auto";
  case MOE_BACKEND_CPU:
    return "cpu";
  case MOE_BACKEND_CUDA:
    return "cuda";
  case MOE_BACKEND_OPENCL:
    return "opencl";
  }
  return "unknown";
}

/* AUTO: $MOE_BACKEND, else the first GPU backend with a device, else CPU. */
static moe_status resolve_auto(moe_backend *backend) {
  const char *env = getenv("MOE_BACKEND");
  if (env && *env && strcmp(env, "auto") != 0) {
    const moe_backend named[] = {MOE_BACKEND_CPU, MOE_BACKEND_CUDA, MOE_BACKEND_OPENCL};
    for (size_t i = 0; i < sizeof named / sizeof named[0]; ++i)
      if (strcmp(env, moe_backend_name(named[i])) == 0) {
        *backend = named[i];
        return MOE_SUCCESS;
      }
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT,
                         "MOE_BACKEND=%s is not one of cpu, cuda, opencl, auto", env);
  }
  const moe_backend gpu_order[] = {MOE_BACKEND_CUDA, MOE_BACKEND_OPENCL};
  for (size_t i = 0; i < sizeof gpu_order / sizeof gpu_order[0]; ++i) {
    const moe_backend_ops *ops = moe_backend_lookup(gpu_order[i]);
    if (ops && ops->has_gpu && ops->has_gpu()) {
      *backend = gpu_order[i];
      return MOE_SUCCESS;
    }
  }
  *backend = MOE_BACKEND_CPU;
  return MOE_SUCCESS;
}

moe_status moe_context_adopt(const moe_backend_ops *ops, void *state, const char *device_name,
                             moe_context **ctx) {
  moe_context *c = calloc(1, sizeof *c);
  if (!c) return moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot allocate a context");
  if (pthread_mutex_init(&c->lock, NULL) != 0) {
    free(c);
    return moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot create the context's lock");
  }
  c->ops = ops;
  c->state = state;
  snprintf(c->device_name, sizeof c->device_name, "%s", device_name ? device_name : "");
  moe_options_init(c);
  /* The one deployment variable of tuning, read once, here. */
  const char *tuning_dir = getenv("MOE_TUNING_DIR");
  if (tuning_dir && strlen(tuning_dir) < sizeof c->tuning_dir)
    memcpy(c->tuning_dir, tuning_dir, strlen(tuning_dir) + 1);
  *ctx = c;
  return MOE_SUCCESS;
}

moe_status moe_context_create(moe_backend backend, int device, moe_context **ctx) {
  moe_error_scope(NULL);
  if (!ctx) return moe_set_error(MOE_ERROR_NULL_POINTER, "ctx is NULL");
  if ((int)backend < MOE_BACKEND_AUTO || (int)backend > MOE_BACKEND_OPENCL)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "backend %d is not a moe_backend value",
                         (int)backend);
  if (device < 0)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "device index %d is negative", device);
  if (backend == MOE_BACKEND_AUTO) {
    moe_status st = resolve_auto(&backend);
    if (st != MOE_SUCCESS) return st;
  }
  const moe_backend_ops *ops = moe_backend_lookup(backend);
  if (!ops)
    return moe_set_error(MOE_ERROR_BACKEND_UNAVAILABLE,
                         "backend %s is not compiled into this build (configure with "
                         "-DMOE_BACKEND=%s)",
                         moe_backend_name(backend), moe_backend_name(backend));
  char name[MOE_DEVICE_NAME_SIZE] = "";
  void *state = NULL;
  moe_status st = ops->context_create(device, &state, name, sizeof name);
  if (st != MOE_SUCCESS) return st;
  st = moe_context_adopt(ops, state, name, ctx);
  if (st != MOE_SUCCESS) ops->context_destroy(state);
  return st;
}

void moe_context_destroy(moe_context *ctx) {
  if (!ctx) return;
  ctx->ops->context_destroy(ctx->state);
  pthread_mutex_destroy(&ctx->lock);
  free(ctx);
}

moe_backend moe_context_backend(const moe_context *ctx) {
  return ctx ? ctx->ops->kind : MOE_BACKEND_AUTO;
}

const char *moe_context_device_name(const moe_context *ctx) {
  return ctx ? ctx->device_name : "";
}

moe_status moe_context_synchronize(moe_context *ctx) {
  moe_error_scope(ctx);
  if (!ctx) return moe_set_error(MOE_ERROR_NULL_POINTER, "ctx is NULL");
  return ctx->ops->synchronize(ctx->state);
}

void *moe_context_backend_state(const moe_context *ctx) {
  return ctx ? ctx->state : NULL;
}

void *moe_buffer_native_handle(const moe_buffer *buffer) {
  return buffer ? buffer->handle : NULL;
}

moe_status moe_buffer_wrap_native(moe_context *ctx, void *handle, size_t bytes,
                                  moe_buffer **buffer) {
  moe_error_scope(ctx);
  if (!ctx || !handle || !buffer)
    return moe_set_error(MOE_ERROR_NULL_POINTER, "%s is NULL",
                         !ctx      ? "ctx"
                         : !handle ? "the memory to wrap"
                                   : "buffer");
  if (bytes == 0) return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "cannot wrap 0 bytes");
  moe_buffer *b = calloc(1, sizeof *b);
  if (!b) return moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot allocate a buffer handle");
  *b = (moe_buffer){.ctx = ctx, .handle = handle, .bytes = bytes, .owned = false};
  *buffer = b;
  return MOE_SUCCESS;
}

moe_status moe_buffer_wrap_host(moe_context *ctx, void *host_ptr, size_t bytes,
                                moe_buffer **buffer) {
  moe_error_scope(ctx);
  if (!ctx || !host_ptr || !buffer)
    return moe_set_error(MOE_ERROR_NULL_POINTER, "%s is NULL",
                         !ctx        ? "ctx"
                         : !host_ptr ? "host_ptr"
                                     : "buffer");
  /* Only the CPU backend's native handle is a host pointer. */
  if (ctx->ops->kind != MOE_BACKEND_CPU)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "ctx runs on the %s backend, not cpu",
                         ctx->ops->name);
  return moe_buffer_wrap_native(ctx, host_ptr, bytes, buffer);
}

moe_status moe_buffer_create(moe_context *ctx, size_t bytes, moe_buffer **buffer) {
  moe_error_scope(ctx);
  if (!ctx || !buffer)
    return moe_set_error(MOE_ERROR_NULL_POINTER, "%s is NULL", !ctx ? "ctx" : "buffer");
  if (bytes == 0) return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "a buffer needs bytes > 0");
  moe_buffer *b = calloc(1, sizeof *b);
  if (!b) return moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot allocate a buffer handle");
  moe_status st = ctx->ops->buffer_alloc(ctx->state, bytes, &b->handle);
  if (st != MOE_SUCCESS) {
    free(b);
    return st;
  }
  b->ctx = ctx;
  b->bytes = bytes;
  b->owned = true;
  *buffer = b;
  return MOE_SUCCESS;
}

void moe_buffer_destroy(moe_buffer *buffer) {
  if (!buffer) return;
  if (buffer->owned) buffer->ctx->ops->buffer_free(buffer->ctx->state, buffer->handle);
  free(buffer);
}

size_t moe_buffer_size(const moe_buffer *buffer) {
  return buffer ? buffer->bytes : 0;
}

static moe_status check_range(const moe_buffer *buffer, size_t offset, const void *host,
                              size_t bytes) {
  if (!buffer) return moe_set_error(MOE_ERROR_NULL_POINTER, "buffer is NULL");
  if (!host && bytes) return moe_set_error(MOE_ERROR_NULL_POINTER, "host pointer is NULL");
  if (offset > buffer->bytes || bytes > buffer->bytes - offset)
    return moe_set_error(MOE_ERROR_BUFFER_TOO_SMALL,
                         "range [%zu, %zu + %zu) is outside the buffer of %zu bytes", offset,
                         offset, bytes, buffer->bytes);
  return MOE_SUCCESS;
}

moe_status moe_buffer_write(moe_buffer *buffer, size_t offset, const void *src, size_t bytes) {
  moe_error_scope(buffer ? buffer->ctx : NULL);
  moe_status st = check_range(buffer, offset, src, bytes);
  if (st != MOE_SUCCESS || bytes == 0) return st;
  return buffer->ctx->ops->buffer_write(buffer->ctx->state, buffer->handle, offset, src, bytes);
}

moe_status moe_buffer_read(const moe_buffer *buffer, size_t offset, void *dst, size_t bytes) {
  moe_error_scope(buffer ? buffer->ctx : NULL);
  moe_status st = check_range(buffer, offset, dst, bytes);
  if (st != MOE_SUCCESS || bytes == 0) return st;
  return buffer->ctx->ops->buffer_read(buffer->ctx->state, buffer->handle, offset, dst, bytes);
}
