/*
 * cuda_context.h - the two CUDA-backend entry points that the C interop
 * file (cuda_interop.c) calls: make a backend state on a given stream, and
 * read a state's stream.
 */
#ifndef MOE_CUDA_CONTEXT_H
#define MOE_CUDA_CONTEXT_H

#include "backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* As the table's context_create, but on the caller's stream (never
 * destroyed by the backend). */
moe_status moe_cuda_state_create_on_stream(int device, void *stream, void **state, char *name,
                                           size_t name_size);

/* The cudaStream_t of a CUDA backend state. */
void *moe_cuda_state_stream(void *state);

#ifdef __cplusplus
}
#endif

#endif /* MOE_CUDA_CONTEXT_H */
