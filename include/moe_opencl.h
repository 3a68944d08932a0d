/*
 * moe_opencl.h - interop of the OpenCL backend with an engine's own OpenCL
 * objects: run on the caller's command queue, and use the caller's cl_mem
 * as a moe_buffer. Handles are passed as void * so that neither this header
 * nor moe.h includes an OpenCL header.
 */
#ifndef MOE_OPENCL_H
#define MOE_OPENCL_H

#include "moe.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Creates an OpenCL context that enqueues all of its work on `queue` (a
 * cl_command_queue, in-order) and on its device and cl_context. The queue
 * and its context are retained; moe_context_destroy releases those
 * references only. The program is built for the queue's device (through
 * the binary cache, as moe_context_create).
 * Errors: NULL_POINTER, BACKEND_UNAVAILABLE (OpenCL not compiled in),
 *         INVALID_ARGUMENT (not a valid queue), OUT_OF_MEMORY, DEVICE.
 */
MOE_API moe_status moe_opencl_context_create_on_queue(void *queue, moe_context **ctx);

/*
 * Wraps `mem` (a cl_mem of ctx's cl_context holding at least `bytes`) as a
 * buffer of ctx. The library never releases `mem`: moe_buffer_destroy frees
 * only the handle, and the caller keeps `mem` alive while the buffer is used.
 * Errors: NULL_POINTER, INVALID_ARGUMENT (bytes == 0, not a cl_mem, or not
 *         an OpenCL context), BUFFER_TOO_SMALL (mem holds fewer than bytes),
 *         CONTEXT_MISMATCH (mem of another cl_context).
 */
MOE_API moe_status moe_opencl_buffer_wrap(moe_context *ctx, void *mem, size_t bytes,
                                          moe_buffer **buffer);

/* The cl_command_queue a context enqueues on (NULL if ctx is NULL or not an
 * OpenCL context); the caller does not own it. */
MOE_API void *moe_opencl_context_queue(moe_context *ctx);

#ifdef __cplusplus
}
#endif

#endif /* MOE_OPENCL_H */
