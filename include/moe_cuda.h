/*
 * moe_cuda.h - CUDA interop for the MoE library: run on the caller's
 * stream, wrap device memory the caller owns, and get a context's stream
 * (to capture moe_layer_forward into a CUDA graph, or to order other work
 * with it). No CUDA header is needed: streams travel as void *
 * (cudaStream_t) and memory as device pointers.
 */
#ifndef MOE_CUDA_H
#define MOE_CUDA_H

#include "moe.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Creates a CUDA context on device `device` that queues all its work on
 * `stream` (a cudaStream_t of that device; NULL means the legacy default
 * stream, which cannot be captured into a graph). The stream stays the
 * caller's: moe_context_destroy never destroys it, and the caller keeps it
 * alive until then.
 * Errors: NULL_POINTER (ctx), INVALID_ARGUMENT (device < 0),
 *         BACKEND_UNAVAILABLE (CUDA not compiled in, or no such device),
 *         OUT_OF_MEMORY, DEVICE.
 */
MOE_API moe_status moe_cuda_context_create_on_stream(int device, void *stream, moe_context **ctx);

/*
 * Wraps `bytes` of device memory at device_ptr (from cudaMalloc or any
 * allocator of ctx's device) as a buffer of ctx. moe_buffer_destroy frees
 * only the handle, never the memory. Pointers aligned to 16 bytes take the
 * fast kernels; others run the plain ones.
 * Errors: NULL_POINTER, INVALID_ARGUMENT (bytes == 0, ctx not CUDA).
 */
MOE_API moe_status moe_cuda_buffer_wrap(moe_context *ctx, void *device_ptr, size_t bytes,
                                        moe_buffer **buffer);

/* Writes the context's cudaStream_t to *stream.
 * Errors: NULL_POINTER, INVALID_ARGUMENT (ctx not CUDA). */
MOE_API moe_status moe_cuda_context_stream(moe_context *ctx, void **stream);

#ifdef __cplusplus
}
#endif

#endif /* MOE_CUDA_H */
