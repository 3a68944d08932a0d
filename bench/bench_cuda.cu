/*
 * bench_cuda.cu - the CUDA half of bench_device.h: the device's rooflines
 * measured in the same run (read bandwidth with our own streaming kernel,
 * dense BF16 GEMM rate through cuBLAS as the yardstick), and the time of a
 * forward as it should be timed on a GPU: captured into a CUDA graph,
 * replayed, each replay between CUDA events, median taken. Between timed
 * replays a 256 MiB memset evicts L2, so that small layers are not timed
 * from cache (other layers run between two calls of one layer in a model).
 */
#include "bench_device.h"
#include "moe_cuda.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

#define BENCH_L2_FLUSH_BYTES ((size_t)256 << 20)

static bool cuda_ok(cudaError_t err, const char *what) {
  if (err == cudaSuccess) return true;
  fprintf(stderr, "bench_cuda: %s failed: %s\n", what, cudaGetErrorString(err));
  return false;
}

static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static cudaStream_t context_stream(moe_context *ctx) {
  void *stream = NULL;
  if (moe_cuda_context_stream(ctx, &stream) != MOE_SUCCESS) return NULL;
  return (cudaStream_t)stream;
}

/* Reads 16 bytes per access, four independent loads in flight per thread;
 * the XOR is stored only on an impossible value, so nothing is dropped. */
__global__ void read_bandwidth_kernel(const uint4 *src, size_t count, uint4 *sink) {
  uint4 acc = make_uint4(0, 0, 0, 0);
  const size_t stride = (size_t)gridDim.x * blockDim.x;
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  for (; i + 3 * stride < count; i += 4 * stride) {
    const uint4 a = __ldcs(src + i), b = __ldcs(src + i + stride);
    const uint4 c = __ldcs(src + i + 2 * stride), d = __ldcs(src + i + 3 * stride);
    acc.x ^= a.x ^ b.x ^ c.x ^ d.x;
    acc.y ^= a.y ^ b.y ^ c.y ^ d.y;
    acc.z ^= a.z ^ b.z ^ c.z ^ d.z;
    acc.w ^= a.w ^ b.w ^ c.w ^ d.w;
  }
  for (; i < count; i += stride) {
    const uint4 a = __ldcs(src + i);
    acc.x ^= a.x;
    acc.y ^= a.y;
    acc.z ^= a.z;
    acc.w ^= a.w;
  }
  if (acc.x == 0x12345678u && acc.y == 0x9abcdef0u) *sink = acc;
}

/* Random bf16 in [-1, 1) from a hash of the index (never zeros: zeros run
 * faster through tensor cores than real data). */
__global__ void fill_random_bf16_kernel(__nv_bfloat16 *dst, size_t count, uint32_t seed) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
       i += (size_t)gridDim.x * blockDim.x) {
    uint32_t h = (uint32_t)i * 0x9e3779b1u ^ seed;
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    dst[i] = __float2bfloat16((float)(h & 0xffffff) / 8388608.0f - 1.0f);
  }
}

static bool time_events(cudaStream_t stream, cudaEvent_t start, cudaEvent_t stop, double *ms) {
  float elapsed = 0.0f;
  if (!cuda_ok(cudaEventSynchronize(stop), "cudaEventSynchronize") ||
      !cuda_ok(cudaEventElapsedTime(&elapsed, start, stop), "cudaEventElapsedTime"))
    return false;
  (void)stream;
  *ms = elapsed;
  return true;
}

static bool measure_read_bandwidth(cudaStream_t stream, int sm_count, double *gbps) {
  const size_t bytes = (size_t)4 << 30;
  uint4 *buf = NULL, *sink = NULL;
  if (!cuda_ok(cudaMalloc(&buf, bytes), "cudaMalloc of the bandwidth buffer")) return false;
  bool ok = cuda_ok(cudaMalloc(&sink, sizeof(uint4)), "cudaMalloc") &&
            cuda_ok(cudaMemsetAsync(buf, 0x5a, bytes, stream), "cudaMemsetAsync");
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::vector<double> runs;
  for (int rep = 0; ok && rep < 12; ++rep) {
    cudaEventRecord(start, stream);
    read_bandwidth_kernel<<<sm_count * 4, 512, 0, stream>>>(buf, bytes / sizeof(uint4), sink);
    cudaEventRecord(stop, stream);
    double ms;
    ok = cuda_ok(cudaGetLastError(), "read_bandwidth_kernel") &&
         time_events(stream, start, stop, &ms);
    if (ok && rep >= 2) runs.push_back(ms);
  }
  if (ok) *gbps = (double)bytes / (median(runs) * 1e-3) / 1e9;
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFree(buf);
  cudaFree(sink);
  return ok;
}

static bool measure_cublas_bf16(cudaStream_t stream, int sm_count, double *tflops) {
  const int n = 8192;
  const size_t elems = (size_t)n * n;
  __nv_bfloat16 *a = NULL, *b = NULL, *c = NULL;
  bool ok = cuda_ok(cudaMalloc(&a, elems * 2), "cudaMalloc") &&
            cuda_ok(cudaMalloc(&b, elems * 2), "cudaMalloc") &&
            cuda_ok(cudaMalloc(&c, elems * 2), "cudaMalloc");
  if (ok) {
    fill_random_bf16_kernel<<<sm_count * 8, 256, 0, stream>>>(a, elems, 1u);
    fill_random_bf16_kernel<<<sm_count * 8, 256, 0, stream>>>(b, elems, 2u);
    ok = cuda_ok(cudaGetLastError(), "fill_random_bf16_kernel");
  }
  cublasHandle_t handle = NULL;
  if (ok && cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) {
    fprintf(stderr, "bench_cuda: cublasCreate failed\n");
    ok = false;
  }
  if (ok) cublasSetStream(handle, stream);
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::vector<double> runs;
  const float alpha = 1.0f, beta = 0.0f;
  for (int rep = 0; ok && rep < 12; ++rep) {
    cudaEventRecord(start, stream);
    const cublasStatus_t s = cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a,
                                          CUDA_R_16BF, n, b, CUDA_R_16BF, n, &beta, c, CUDA_R_16BF,
                                          n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    cudaEventRecord(stop, stream);
    if (s != CUBLAS_STATUS_SUCCESS) {
      fprintf(stderr, "bench_cuda: cublasGemmEx failed (%d)\n", (int)s);
      ok = false;
      break;
    }
    double ms;
    ok = time_events(stream, start, stop, &ms);
    if (ok && rep >= 2) runs.push_back(ms);
  }
  if (ok) *tflops = 2.0 * n * (double)n * n / (median(runs) * 1e-3) / 1e12;
  if (handle) cublasDestroy(handle);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  return ok;
}

extern "C" int bench_cuda_rooflines(moe_context *ctx, bench_rooflines *r) {
  cudaStream_t stream = context_stream(ctx);
  if (!stream) {
    fprintf(stderr, "bench_cuda: the context is not a CUDA context\n");
    return 1;
  }
  int device = 0, sm_count = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
  memset(r, 0, sizeof *r);
  snprintf(r->device, sizeof r->device, "%s", moe_context_device_name(ctx));
  snprintf(r->peak_what, sizeof r->peak_what, "cuBLAS BF16 GEMM 8192^3 (fp32 accumulate)");
  if (!measure_read_bandwidth(stream, sm_count, &r->read_gbps)) return 1;
  if (!measure_cublas_bf16(stream, sm_count, &r->peak_tflops)) return 1;
  return 0;
}

extern "C" int bench_cuda_time_forward(moe_context *ctx, moe_layer *layer, int64_t num_tokens,
                                       const moe_buffer *x, const moe_buffer *logits,
                                       moe_buffer *out, int warmup, int reps, double *median_ms) {
  cudaStream_t stream = context_stream(ctx);
  if (!stream) {
    fprintf(stderr, "bench_cuda: the context is not a CUDA context\n");
    return 1;
  }
  if (reps < 1) reps = 1;
  cudaGraph_t graph = NULL;
  cudaGraphExec_t exec = NULL;
  if (!cuda_ok(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal),
               "cudaStreamBeginCapture"))
    return 1;
  const moe_status st = moe_layer_forward(layer, num_tokens, x, logits, out);
  const bool captured = cuda_ok(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");
  if (st != MOE_SUCCESS) {
    fprintf(stderr, "bench_cuda: moe_layer_forward: %s (%s)\n", moe_status_string(st),
            moe_last_error(ctx));
    if (graph) cudaGraphDestroy(graph);
    return 1;
  }
  if (!captured || !cuda_ok(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate")) {
    if (graph) cudaGraphDestroy(graph);
    return 1;
  }
  void *flush = NULL;
  bool ok = cuda_ok(cudaMalloc(&flush, BENCH_L2_FLUSH_BYTES), "cudaMalloc of the L2 flush");
  for (int i = 0; ok && i < warmup; ++i)
    ok = cuda_ok(cudaGraphLaunch(exec, stream), "warmup");
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  std::vector<double> runs;
  for (int i = 0; ok && i < reps; ++i) {
    ok = cuda_ok(cudaMemsetAsync(flush, i & 0xff, BENCH_L2_FLUSH_BYTES, stream), "L2 flush");
    cudaEventRecord(start, stream);
    ok = ok && cuda_ok(cudaGraphLaunch(exec, stream), "cudaGraphLaunch");
    cudaEventRecord(stop, stream);
    double ms;
    ok = ok && time_events(stream, start, stop, &ms);
    if (ok) runs.push_back(ms);
  }
  if (ok) *median_ms = median(runs);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFree(flush);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  return ok ? 0 : 1;
}
