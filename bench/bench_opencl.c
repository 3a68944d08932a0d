/*
 * bench_opencl.c - OpenCL rooflines for moe_bench (bench_device.h): device
 * read bandwidth with this file's own streaming kernel, and CLBlast's SGEMM
 * rate on a large square GEMM (fp32: OpenCL has no portable BF16 matrix
 * instruction, so fp32 FMA is what the backend's GEMMs run on), on a
 * private queue of the context's device, median of several runs: the read
 * kernel by profiling events, CLBlast by the host clock.
 */
#include "bench_device.h"
#include "bench_time.h"
#include "moe_opencl.h"

#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>
#include <clblast_c.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Each work-item streams 16-byte words with a grid stride and folds them,
 * so that every byte is read once and nothing can be optimized away. */
static const char read_kernel_source[] =
    "__kernel void bench_read(__global const uint4 *src, ulong count, __global uint *sink) {\n"
    "  uint4 acc = (uint4)(0);\n"
    "  const ulong stride = get_global_size(0);\n"
    "  ulong i = get_global_id(0);\n"
    "  for (; i + 3 * stride < count; i += 4 * stride)\n"
    "    acc ^= src[i] ^ src[i + stride] ^ src[i + 2 * stride] ^ src[i + 3 * stride];\n"
    "  for (; i < count; i += stride) acc ^= src[i];\n"
    "  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x9e3779b9u) sink[0] = 1u;\n"
    "}\n";

/* Seconds between an event's start and end (it has completed). */
static double event_seconds(cl_event event) {
  cl_ulong start = 0, end = 0;
  clGetEventProfilingInfo(event, CL_PROFILING_COMMAND_START, sizeof start, &start, NULL);
  clGetEventProfilingInfo(event, CL_PROFILING_COMMAND_END, sizeof end, &end, NULL);
  return (double)(end - start) * 1e-9;
}

#define CL_CHECK(expr, what)                                                                       \
  do {                                                                                             \
    cl_int err_ = (expr);                                                                          \
    if (err_ != CL_SUCCESS) {                                                                      \
      fprintf(stderr, "bench_opencl: %s failed (%d)\n", what, (int)err_);                          \
      goto done;                                                                                   \
    }                                                                                              \
  } while (0)

static double read_bandwidth(cl_context context, cl_device_id device, cl_command_queue queue,
                             int is_gpu) {
  double gbps = -1;
  cl_int err;
  cl_program program = NULL;
  cl_kernel kernel = NULL;
  cl_mem src = NULL, sink = NULL;
  cl_ulong max_alloc = 0;
  cl_uint units = 1;
  clGetDeviceInfo(device, CL_DEVICE_MAX_MEM_ALLOC_SIZE, sizeof max_alloc, &max_alloc, NULL);
  clGetDeviceInfo(device, CL_DEVICE_MAX_COMPUTE_UNITS, sizeof units, &units, NULL);
  /* Far above any last-level cache, within one allocation. */
  size_t bytes = (size_t)(is_gpu ? 2048 : 512) << 20;
  while (bytes > max_alloc / 2)
    bytes /= 2;
  const char *text = read_kernel_source;
  program = clCreateProgramWithSource(context, 1, &text, NULL, &err);
  CL_CHECK(err, "clCreateProgramWithSource");
  CL_CHECK(clBuildProgram(program, 1, &device, "", NULL, NULL), "clBuildProgram");
  kernel = clCreateKernel(program, "bench_read", &err);
  CL_CHECK(err, "clCreateKernel");
  src = clCreateBuffer(context, CL_MEM_READ_WRITE, bytes, NULL, &err);
  CL_CHECK(err, "clCreateBuffer");
  sink = clCreateBuffer(context, CL_MEM_READ_WRITE, sizeof(cl_uint), NULL, &err);
  CL_CHECK(err, "clCreateBuffer");
  const cl_uint pattern = 0x01020304u;
  CL_CHECK(clEnqueueFillBuffer(queue, src, &pattern, sizeof pattern, 0, bytes, 0, NULL, NULL),
           "clEnqueueFillBuffer");
  const cl_ulong count = bytes / 16;
  CL_CHECK(clSetKernelArg(kernel, 0, sizeof src, &src), "clSetKernelArg");
  CL_CHECK(clSetKernelArg(kernel, 1, sizeof count, &count), "clSetKernelArg");
  CL_CHECK(clSetKernelArg(kernel, 2, sizeof sink, &sink), "clSetKernelArg");
  const size_t local = is_gpu ? 256 : 64;
  const size_t global = (size_t)units * (is_gpu ? 2048 : 64);
  enum { reps = 15 };
  double seconds[reps];
  for (int i = -2; i < reps; ++i) { /* two warm-up runs */
    cl_event event;
    CL_CHECK(clEnqueueNDRangeKernel(queue, kernel, 1, NULL, &global, &local, 0, NULL, &event),
             "clEnqueueNDRangeKernel");
    CL_CHECK(clWaitForEvents(1, &event), "clWaitForEvents");
    if (i >= 0) seconds[i] = event_seconds(event);
    clReleaseEvent(event);
  }
  gbps = (double)bytes / bench_median(seconds, reps) * 1e-9;
done:
  if (src) clReleaseMemObject(src);
  if (sink) clReleaseMemObject(sink);
  if (kernel) clReleaseKernel(kernel);
  if (program) clReleaseProgram(program);
  return gbps;
}

static double clblast_sgemm_tflops(cl_context context, cl_command_queue queue, size_t size,
                                   int reps) {
  double tflops = -1;
  cl_int err;
  cl_mem m[3] = {NULL, NULL, NULL};
  const size_t bytes = size * size * sizeof(float);
  for (int i = 0; i < 3; ++i) {
    m[i] = clCreateBuffer(context, CL_MEM_READ_WRITE, bytes, NULL, &err);
    CL_CHECK(err, "clCreateBuffer");
    const float value = 0.001f * (float)(i + 1);
    CL_CHECK(clEnqueueFillBuffer(queue, m[i], &value, sizeof value, 0, bytes, 0, NULL, NULL),
             "clEnqueueFillBuffer");
  }
  double *seconds = malloc(sizeof *seconds * (size_t)reps);
  if (!seconds) goto done;
  /* Host clock around each call and a clFinish: CLBlast may run several
   * kernels per call (padding, transposition), and its event covers only
   * the last one. */
  for (int i = -1; i < reps; ++i) { /* the first call also compiles CLBlast's kernels */
    clFinish(queue);
    const double start = bench_seconds();
    /* C = A * B^T, row-major: the [out][in] weight layout of the layer. */
    CLBlastStatusCode st =
        CLBlastSgemm(CLBlastLayoutRowMajor, CLBlastTransposeNo, CLBlastTransposeYes, size, size,
                     size, 1.0f, m[0], 0, size, m[1], 0, size, 0.0f, m[2], 0, size, &queue, NULL);
    if (st != CLBlastSuccess) {
      fprintf(stderr, "bench_opencl: CLBlastSgemm failed (%d)\n", (int)st);
      free(seconds);
      goto done;
    }
    clFinish(queue);
    if (i >= 0) seconds[i] = bench_seconds() - start;
  }
  tflops = 2.0 * (double)size * (double)size * (double)size / bench_median(seconds, reps) * 1e-12;
  free(seconds);
done:
  for (int i = 0; i < 3; ++i)
    if (m[i]) clReleaseMemObject(m[i]);
  return tflops;
}

int bench_opencl_rooflines(moe_context *ctx, bench_rooflines *r) {
  cl_command_queue user_queue = moe_opencl_context_queue(ctx);
  if (!user_queue) {
    fprintf(stderr, "bench_opencl: not an OpenCL context\n");
    return 1;
  }
  cl_context context;
  cl_device_id device;
  cl_device_type type = 0;
  clGetCommandQueueInfo(user_queue, CL_QUEUE_CONTEXT, sizeof context, &context, NULL);
  clGetCommandQueueInfo(user_queue, CL_QUEUE_DEVICE, sizeof device, &device, NULL);
  clGetDeviceInfo(device, CL_DEVICE_TYPE, sizeof type, &type, NULL);
  const int is_gpu = (type & CL_DEVICE_TYPE_GPU) != 0;
  cl_int err;
  cl_command_queue queue = clCreateCommandQueue(context, device, CL_QUEUE_PROFILING_ENABLE, &err);
  if (err != CL_SUCCESS) {
    fprintf(stderr, "bench_opencl: clCreateCommandQueue failed (%d)\n", (int)err);
    return 1;
  }
  memset(r, 0, sizeof *r);
  snprintf(r->device, sizeof r->device, "%s", moe_context_device_name(ctx));
  r->read_gbps = read_bandwidth(context, device, queue, is_gpu);
  const size_t size = is_gpu ? 8192 : 1024;
  r->peak_tflops = clblast_sgemm_tflops(context, queue, size, is_gpu ? 11 : 3);
  snprintf(r->peak_what, sizeof r->peak_what, "CLBlast SGEMM fp32 %zux%zux%zu", size, size, size);
  clReleaseCommandQueue(queue);
  return r->read_gbps > 0 && r->peak_tflops > 0 ? 0 : 1;
}

int bench_opencl_profiling_context(moe_context *ctx, moe_context **out) {
  cl_command_queue user_queue = (cl_command_queue)moe_opencl_context_queue(ctx);
  cl_context context = NULL;
  cl_device_id device = NULL;
  *out = NULL;
  if (!user_queue) return 1;
  clGetCommandQueueInfo(user_queue, CL_QUEUE_CONTEXT, sizeof context, &context, NULL);
  clGetCommandQueueInfo(user_queue, CL_QUEUE_DEVICE, sizeof device, &device, NULL);
  cl_int err;
  cl_command_queue queue = clCreateCommandQueue(context, device, CL_QUEUE_PROFILING_ENABLE, &err);
  if (err != CL_SUCCESS) {
    fprintf(stderr, "bench_opencl: clCreateCommandQueue failed (%d)\n", (int)err);
    return 1;
  }
  const moe_status st = moe_opencl_context_create_on_queue(queue, out);
  clReleaseCommandQueue(queue); /* the new context holds its own reference */
  if (st != MOE_SUCCESS) {
    fprintf(stderr, "bench_opencl: context on a profiling queue: %s (%s)\n", moe_status_string(st),
            moe_last_error(NULL));
    return 1;
  }
  return 0;
}

/* Markers complete when everything queued before them has, so the time
 * from the first marker's end to the second's is the forward's time on
 * the device, without the host's round trip. */
int bench_opencl_time_forward(moe_context *ctx, moe_layer *layer, int64_t num_tokens,
                              const moe_buffer *x, const moe_buffer *logits, moe_buffer *out,
                              int warmup, int reps, double *median_ms) {
  cl_command_queue queue = (cl_command_queue)moe_opencl_context_queue(ctx);
  double *times = malloc(sizeof *times * (size_t)reps);
  if (!queue || !times) {
    free(times);
    return 1;
  }
  int failed = 0;
  for (int i = 0; i < warmup + reps && !failed; ++i) {
    cl_event before = NULL, after = NULL;
    failed = clEnqueueMarkerWithWaitList(queue, 0, NULL, &before) != CL_SUCCESS;
    moe_status st = MOE_SUCCESS;
    if (!failed) st = moe_layer_forward(layer, num_tokens, x, logits, out);
    if (!failed && st == MOE_SUCCESS)
      failed = clEnqueueMarkerWithWaitList(queue, 0, NULL, &after) != CL_SUCCESS ||
               clWaitForEvents(1, &after) != CL_SUCCESS;
    if (st != MOE_SUCCESS) {
      fprintf(stderr, "bench_opencl: forward: %s (%s)\n", moe_status_string(st),
              moe_last_error(ctx));
      failed = 1;
    }
    if (!failed && i >= warmup) {
      cl_ulong start = 0, end = 0;
      failed = clGetEventProfilingInfo(before, CL_PROFILING_COMMAND_END, sizeof start, &start,
                                       NULL) != CL_SUCCESS ||
               clGetEventProfilingInfo(after, CL_PROFILING_COMMAND_END, sizeof end, &end, NULL) !=
                   CL_SUCCESS;
      times[i - warmup] = (double)(end - start) * 1e-6;
    }
    if (before) clReleaseEvent(before);
    if (after) clReleaseEvent(after);
  }
  if (failed)
    fprintf(stderr, "bench_opencl: timing with profiling markers failed\n");
  else
    *median_ms = bench_median(times, reps);
  free(times);
  return failed;
}
