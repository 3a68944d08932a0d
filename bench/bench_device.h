/*
 * bench_device.h - what a GPU backend provides to moe_bench: its rooflines,
 * measured in the same run, and timing of a forward the way that device
 * should be timed (CUDA: events around CUDA-graph replays; OpenCL:
 * profiling markers around each forward).
 *
 * bench/bench_cuda.cu and bench/bench_opencl.c implement these; they are
 * compiled only when their backend is. Each returns 0 on success, nonzero
 * (with a message on stderr) on failure.
 */
#ifndef MOE_BENCH_DEVICE_H
#define MOE_BENCH_DEVICE_H

#include "moe.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct bench_rooflines {
  double read_gbps;   /* device read bandwidth, own kernel, GB/s (1e9) */
  double peak_tflops; /* dense GEMM rate, TFLOP/s (1e12) */
  char peak_what[64]; /* what peak_tflops measured, e.g. "cuBLAS BF16 GEMM" */
  char device[128];   /* the device's name */
} bench_rooflines;

/* CUDA: read bandwidth with the bench's own kernel, dense BF16 GEMM rate
 * through cuBLAS (used only as this yardstick), on ctx's device. */
int bench_cuda_rooflines(moe_context *ctx, bench_rooflines *r);

/* CUDA: captures one moe_layer_forward into a CUDA graph on ctx's stream,
 * replays it `warmup` times, then times `reps` replays one by one with CUDA
 * events; writes the median in milliseconds. */
int bench_cuda_time_forward(moe_context *ctx, moe_layer *layer, int64_t num_tokens,
                            const moe_buffer *x, const moe_buffer *logits, moe_buffer *out,
                            int warmup, int reps, double *median_ms);

/* OpenCL: read bandwidth with the bench's own kernel and CLBlast's SGEMM
 * rate, on ctx's device. */
int bench_opencl_rooflines(moe_context *ctx, bench_rooflines *r);

/* OpenCL: a new context on a profiling-enabled queue of ctx's device, so
 * that bench_opencl_time_forward can read device timestamps. */
int bench_opencl_profiling_context(moe_context *ctx, moe_context **out);

/* OpenCL: runs `warmup` forwards, then times `reps` one by one between two
 * profiling markers on ctx's queue (device time, no host round trip);
 * writes the median in milliseconds. ctx comes from
 * bench_opencl_profiling_context. */
int bench_opencl_time_forward(moe_context *ctx, moe_layer *layer, int64_t num_tokens,
                              const moe_buffer *x, const moe_buffer *logits, moe_buffer *out,
                              int warmup, int reps, double *median_ms);

#ifdef __cplusplus
}
#endif

#endif /* MOE_BENCH_DEVICE_H */
