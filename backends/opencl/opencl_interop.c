/*
 * opencl_interop.c - moe_opencl.h: a context on the caller's command queue,
 * and the caller's cl_mem wrapped as a buffer (never released by us).
 */
#include "moe_opencl.h"
#include "internal.h" /* moe_error_scope: messages go to the right context */
#include "opencl_internal.h"

#include <stdlib.h>

moe_status moe_opencl_context_create_on_queue(void *queue, moe_context **ctx) {
  moe_error_scope(NULL);
  if (!queue || !ctx)
    return moe_set_error(MOE_ERROR_NULL_POINTER, "%s is NULL", !queue ? "queue" : "ctx");
  cl_command_queue q = (cl_command_queue)queue;
  moe_ocl_state *state = calloc(1, sizeof *state);
  if (!state) return moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot allocate the OpenCL state");
  cl_int err =
      clGetCommandQueueInfo(q, CL_QUEUE_CONTEXT, sizeof state->context, &state->context, NULL);
  if (err == CL_SUCCESS)
    err = clGetCommandQueueInfo(q, CL_QUEUE_DEVICE, sizeof state->device, &state->device, NULL);
  if (err == CL_SUCCESS)
    err = clGetDeviceInfo(state->device, CL_DEVICE_PLATFORM, sizeof state->platform,
                          &state->platform, NULL);
  if (err != CL_SUCCESS) {
    free(state);
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "queue is not a cl_command_queue: %s",
                         moe_ocl_error_name(err));
  }
  cl_device_type type = 0;
  clGetDeviceInfo(state->device, CL_DEVICE_TYPE, sizeof type, &type, NULL);
  state->is_gpu = (type & CL_DEVICE_TYPE_GPU) != 0;
  clRetainContext(state->context);
  clRetainCommandQueue(q);
  state->queue = q;
  moe_status st = moe_ocl_build_program(state);
  char name[256];
  if (st == MOE_SUCCESS) {
    moe_ocl_device_name(state->device, state->platform, name, sizeof name);
    st = moe_context_adopt(&moe_opencl_backend_ops, state, name, ctx);
  }
  if (st != MOE_SUCCESS) moe_ocl_state_free(state);
  return st;
}

static int is_opencl(const moe_context *ctx) {
  return moe_context_backend(ctx) == MOE_BACKEND_OPENCL;
}

moe_status moe_opencl_buffer_wrap(moe_context *ctx, void *mem, size_t bytes, moe_buffer **buffer) {
  moe_error_scope(ctx);
  if (!ctx || !mem || !buffer)
    return moe_set_error(MOE_ERROR_NULL_POINTER, "%s is NULL",
                         !ctx   ? "ctx"
                         : !mem ? "mem"
                                : "buffer");
  if (!is_opencl(ctx))
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "ctx is a %s context, not an OpenCL one",
                         moe_backend_name(moe_context_backend(ctx)));
  if (bytes == 0) return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "cannot wrap 0 bytes");
  const moe_ocl_state *state = moe_context_backend_state(ctx);
  size_t size = 0;
  cl_context owner = NULL;
  cl_int err = clGetMemObjectInfo((cl_mem)mem, CL_MEM_SIZE, sizeof size, &size, NULL);
  if (err == CL_SUCCESS)
    err = clGetMemObjectInfo((cl_mem)mem, CL_MEM_CONTEXT, sizeof owner, &owner, NULL);
  if (err != CL_SUCCESS)
    return moe_set_error(MOE_ERROR_INVALID_ARGUMENT, "mem is not a cl_mem: %s",
                         moe_ocl_error_name(err));
  if (owner != state->context)
    return moe_set_error(MOE_ERROR_CONTEXT_MISMATCH,
                         "mem belongs to another cl_context than ctx's");
  if (size < bytes)
    return moe_set_error(MOE_ERROR_BUFFER_TOO_SMALL, "mem holds %zu bytes, %zu asked for", size,
                         bytes);
  return moe_buffer_wrap_native(ctx, mem, bytes, buffer);
}

void *moe_opencl_context_queue(moe_context *ctx) {
  if (!ctx || !is_opencl(ctx)) return NULL;
  return ((moe_ocl_state *)moe_context_backend_state(ctx))->queue;
}
