/*
 * route_align.cu - routing and align on the device, producing exactly the
 * bytes of the core's host code (core/routing.c, core/align.c).
 *
 * Routing runs core/routing_logic.h's moe_rl_route_token, one thread per
 * token: the same rule as the host, compiled for the device, not a copy.
 *
 * Align has two shapes:
 *   - one block (slots <= CUDA_ALIGN_ONE_BLOCK_SLOTS, tokens <= 1024):
 *     route (optional), count, scan, place, all in one launch, which is
 *     the whole metadata pipeline of a decode step;
 *   - three launches for more slots: per-chunk counts, one block that scans
 *     them into each chunk's start inside each expert's run, and per-chunk
 *     placement.
 * Placement is stable because one warp walks a chunk's slots in ascending
 * order, 32 at a time: lanes with the same expert (__match_any_sync) take
 * consecutive positions by lane order, and the group's leader advances the
 * expert's cursor. Counts use atomics, whose order does not matter.
 */
#include "cuda_internal.cuh"

#include "routing.h"

#define CUDA_ALIGN_THREADS 1024
#define CUDA_ALIGN_ONE_BLOCK_SLOTS 4096
#define CUDA_ALIGN_CHUNK_MIN 1024
#define CUDA_ALIGN_MAX_CHUNKS 2048
/* Logits staged in shared memory by the one-block kernel (floats). */
#define CUDA_ROUTE_STAGE_FLOATS 8192

/* The local expert of a slot's id, or -1 when align skips it (as
 * core/align.c's local_expert). */
__device__ __forceinline__ int local_expert(int32_t id, const int32_t *map, int32_t num_experts,
                                            int32_t num_local) {
  if (map) {
    if (id < 0 || id >= num_experts) return -1;
    id = map[id];
  }
  return (id >= 0 && id < num_local) ? id : -1;
}

/* Exclusive scan over the block (blockDim.x a multiple of 32, <= 1024);
 * returns this thread's prefix, and the total in *total. */
__device__ int64_t block_exclusive_scan(int64_t value, int64_t *total) {
  __shared__ int64_t warp_sums[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  int64_t inclusive = value;
  for (int d = 1; d < 32; d <<= 1) {
    int64_t up = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += up;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int64_t s = lane < warps ? warp_sums[lane] : 0;
    for (int d = 1; d < 32; d <<= 1) {
      int64_t up = __shfl_up_sync(0xffffffffu, s, d);
      if (lane >= d) s += up;
    }
    warp_sums[lane] = s; /* inclusive over warps */
  }
  __syncthreads();
  const int64_t before = (warp > 0 ? warp_sums[warp - 1] : 0) + inclusive - value;
  *total = warp_sums[warps - 1];
  __syncthreads(); /* warp_sums may be reused by the next call */
  return before;
}

struct align_params {
  int64_t num_slots;
  int32_t num_experts, num_local, block_m;
  int64_t sorted_capacity, block_capacity;
  const int32_t *topk_ids;
  const int32_t *expert_map;
  int32_t *sorted;
  int32_t *expert_ids;
  int32_t *ntpp;
};

static align_params align_params_from(const moe_align_args *a) {
  align_params p;
  p.num_slots = a->num_tokens * a->top_k;
  p.num_experts = a->num_experts;
  p.num_local = a->num_local_experts;
  p.block_m = a->block_m;
  p.sorted_capacity = a->sorted_capacity;
  p.block_capacity = a->block_capacity;
  p.topk_ids = (const int32_t *)a->topk_ids;
  p.expert_map = (const int32_t *)a->expert_map;
  p.sorted = (int32_t *)a->sorted_token_ids;
  p.expert_ids = (int32_t *)a->expert_ids;
  p.ntpp = (int32_t *)a->num_tokens_post_padded;
  return p;
}

/*
 * Given each expert's slot count (count[e], e < EL, in shared memory),
 * computes run starts into start[0..EL] (shared), writes expert_ids, the
 * sentinel padding after each run and past the end, and
 * num_tokens_post_padded. Every thread of the block calls it.
 */
__device__ void align_layout(const align_params &p, const int *count, int64_t *start) {
  const int BM = p.block_m;
  const int32_t sentinel = (int32_t)p.num_slots;
  /* Each thread owns experts tid, tid + blockDim, ...: scan in rounds. */
  int64_t carry = 0;
  for (int base = 0; base < p.num_local; base += blockDim.x) {
    const int e = base + threadIdx.x;
    const int64_t padded = e < p.num_local ? (int64_t)(count[e] + BM - 1) / BM * BM : 0;
    int64_t total;
    const int64_t before = block_exclusive_scan(padded, &total);
    if (e < p.num_local) start[e] = carry + before;
    carry += total;
  }
  if (threadIdx.x == 0) start[p.num_local] = carry;
  __syncthreads();
  const int64_t padded_total = carry;
  for (int e = threadIdx.x; e < p.num_local; e += blockDim.x) {
    for (int64_t b = start[e] / BM; b < start[e + 1] / BM; ++b)
      p.expert_ids[b] = e;
    for (int64_t i = start[e] + count[e]; i < start[e + 1]; ++i)
      p.sorted[i] = sentinel;
  }
  for (int64_t b = padded_total / BM + threadIdx.x; b < p.block_capacity; b += blockDim.x)
    p.expert_ids[b] = -1;
  for (int64_t i = padded_total + threadIdx.x; i < p.sorted_capacity; i += blockDim.x)
    p.sorted[i] = sentinel;
  if (threadIdx.x == 0) *p.ntpp = (int32_t)padded_total;
}

/* One warp places slots [begin, end) in ascending order at cursor[e]. */
__device__ void align_place_warp(const align_params &p, int64_t begin, int64_t end,
                                 int64_t *cursor) {
  const int lane = threadIdx.x & 31;
  const unsigned lower = (1u << lane) - 1u;
  for (int64_t s0 = begin; s0 < end; s0 += 32) {
    const int64_t s = s0 + lane;
    const int e =
        s < end ? local_expert(p.topk_ids[s], p.expert_map, p.num_experts, p.num_local) : -1;
    const unsigned same = __match_any_sync(0xffffffffu, e);
    int64_t pos = 0;
    if (e >= 0) {
      pos = cursor[e] + __popc(same & lower);
      p.sorted[pos] = (int32_t)s;
    }
    __syncwarp();
    if (e >= 0 && (same & lower) == 0) cursor[e] += __popc(same);
    __syncwarp();
  }
}

/*
 * The whole metadata pipeline in one block: optional routing of every token
 * (thread t routes token t, logits staged in shared memory when they fit),
 * then count, layout and a one-warp stable placement.
 */
__global__ void __launch_bounds__(CUDA_ALIGN_THREADS)
    route_align_one_block_kernel(align_params p, bool do_route, moe_rl_params rl,
                                 const float *logits, const float *bias, int32_t num_tokens,
                                 float *topk_weights, bool stage_logits) {
  extern __shared__ float staged_logits[];
  __shared__ int count[MOE_MAX_EXPERTS];
  __shared__ int64_t start[MOE_MAX_EXPERTS + 1];

  if (do_route) {
    const int E = rl.num_experts, k = rl.top_k;
    const float *src = logits;
    if (stage_logits) {
      for (int i = threadIdx.x; i < num_tokens * E; i += blockDim.x)
        staged_logits[i] = logits[i];
      __syncthreads();
      src = staged_logits;
    }
    for (int t = threadIdx.x; t < num_tokens; t += blockDim.x)
      moe_rl_route_token(src + (int64_t)t * E, bias, &rl, (int *)p.topk_ids + (int64_t)t * k,
                         topk_weights + (int64_t)t * k);
    __syncthreads(); /* the ids written above are read below by other threads */
  }

  for (int e = threadIdx.x; e < p.num_local; e += blockDim.x)
    count[e] = 0;
  __syncthreads();
  for (int64_t s = threadIdx.x; s < p.num_slots; s += blockDim.x) {
    const int e = local_expert(p.topk_ids[s], p.expert_map, p.num_experts, p.num_local);
    if (e >= 0) atomicAdd(&count[e], 1);
  }
  __syncthreads();
  align_layout(p, count, start);
  /* start[] becomes the placement cursor; layout finished reading it. */
  __syncthreads();
  if (threadIdx.x < 32) align_place_warp(p, 0, p.num_slots, start);
}

/* Multi-block align, step 1: counts[chunk][e] of each chunk's slots. */
__global__ void align_count_kernel(align_params p, int64_t chunk, int32_t *counts) {
  __shared__ int count[MOE_MAX_EXPERTS];
  for (int e = threadIdx.x; e < p.num_local; e += blockDim.x)
    count[e] = 0;
  __syncthreads();
  const int64_t begin = blockIdx.x * chunk;
  const int64_t end = min(begin + chunk, p.num_slots);
  for (int64_t s = begin + threadIdx.x; s < end; s += blockDim.x) {
    const int e = local_expert(p.topk_ids[s], p.expert_map, p.num_experts, p.num_local);
    if (e >= 0) atomicAdd(&count[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < p.num_local; e += blockDim.x)
    counts[(int64_t)blockIdx.x * p.num_local + e] = count[e];
}

/* Step 2 (one block): each chunk's cursor start per expert, written over
 * counts, plus the layout (expert_ids, padding, num_tokens_post_padded). */
__global__ void __launch_bounds__(CUDA_ALIGN_THREADS)
    align_scan_kernel(align_params p, int64_t num_chunks, int32_t *counts) {
  __shared__ int count[MOE_MAX_EXPERTS];
  __shared__ int64_t start[MOE_MAX_EXPERTS + 1];
  for (int e = threadIdx.x; e < p.num_local; e += blockDim.x) {
    int running = 0; /* slots per expert fit int32: reserve bounds T*k */
    for (int64_t c = 0; c < num_chunks; ++c) {
      const int32_t here = counts[c * p.num_local + e];
      counts[c * p.num_local + e] = running;
      running += here;
    }
    count[e] = running;
  }
  __syncthreads();
  align_layout(p, count, start);
  for (int e = threadIdx.x; e < p.num_local; e += blockDim.x)
    for (int64_t c = 0; c < num_chunks; ++c)
      counts[c * p.num_local + e] += (int32_t)start[e];
}

/* Step 3: one warp per chunk places its slots from the chunk's cursors. */
__global__ void align_place_kernel(align_params p, int64_t chunk, const int32_t *starts) {
  __shared__ int64_t cursor[MOE_MAX_EXPERTS];
  for (int e = threadIdx.x; e < p.num_local; e += blockDim.x)
    cursor[e] = starts[(int64_t)blockIdx.x * p.num_local + e];
  __syncthreads();
  const int64_t begin = blockIdx.x * chunk;
  align_place_warp(p, begin, min(begin + chunk, p.num_slots), cursor);
}

/* Routing alone: one thread per token. */
__global__ void route_kernel(moe_rl_params rl, const float *logits, const float *bias,
                             int64_t num_tokens, int32_t *ids, float *weights) {
  const int64_t t = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (t >= num_tokens) return;
  moe_rl_route_token(logits + t * rl.num_experts, bias, &rl, (int *)ids + t * rl.top_k,
                     weights + t * rl.top_k);
}

static void align_chunking(int64_t num_slots, int64_t *chunk, int64_t *num_chunks) {
  int64_t c = CUDA_ALIGN_CHUNK_MIN;
  while ((num_slots + c - 1) / c > CUDA_ALIGN_MAX_CHUNKS)
    c *= 2;
  *chunk = c;
  *num_chunks = (num_slots + c - 1) / c;
}

static bool align_fits_one_block(int64_t num_slots, int64_t num_tokens) {
  return num_slots <= CUDA_ALIGN_ONE_BLOCK_SLOTS && num_tokens <= CUDA_ALIGN_THREADS;
}

int64_t cuda_align_scratch_elems(int64_t num_slots, int32_t num_local_experts) {
  int64_t chunk, num_chunks;
  align_chunking(num_slots, &chunk, &num_chunks);
  return num_chunks * num_local_experts;
}

moe_status cuda_route(const cuda_state *st, const moe_route_args *args) {
  const moe_rl_params rl = moe_rl_params_from_args(args);
  const int threads = 128;
  const int64_t blocks = (args->num_tokens + threads - 1) / threads;
  route_kernel<<<(unsigned)blocks, threads, 0, st->stream>>>(
      rl, (const float *)args->logits, (const float *)args->correction_bias, args->num_tokens,
      (int32_t *)args->topk_ids, (float *)args->topk_weights);
  return cuda_launch_status("route_kernel");
}

moe_status cuda_route_align(const cuda_state *st, const moe_route_args *route,
                            const moe_align_args *align, int32_t *scratch) {
  const align_params p = align_params_from(align);
  if (align_fits_one_block(p.num_slots, align->num_tokens)) {
    moe_rl_params rl = {};
    size_t stage_bytes = 0;
    if (route) {
      rl = moe_rl_params_from_args(route);
      const int64_t floats = route->num_tokens * route->num_experts;
      if (floats <= CUDA_ROUTE_STAGE_FLOATS) stage_bytes = (size_t)floats * sizeof(float);
    }
    route_align_one_block_kernel<<<1, CUDA_ALIGN_THREADS, stage_bytes, st->stream>>>(
        p, route != NULL, rl, route ? (const float *)route->logits : NULL,
        route ? (const float *)route->correction_bias : NULL, (int32_t)align->num_tokens,
        route ? (float *)route->topk_weights : NULL, stage_bytes > 0);
    return cuda_launch_status("route_align_one_block_kernel");
  }
  if (route) CUDA_TRY(cuda_route(st, route));
  int64_t chunk, num_chunks;
  align_chunking(p.num_slots, &chunk, &num_chunks);
  int32_t *counts = scratch;
  if (!counts) {
    const size_t bytes = (size_t)(num_chunks * p.num_local) * sizeof(int32_t);
    CUDA_TRY(cuda_status(cudaMallocAsync((void **)&counts, bytes, st->stream),
                         "cudaMallocAsync of align scratch"));
  }
  align_count_kernel<<<(unsigned)num_chunks, 256, 0, st->stream>>>(p, chunk, counts);
  moe_status status = cuda_launch_status("align_count_kernel");
  if (status == MOE_SUCCESS) {
    align_scan_kernel<<<1, CUDA_ALIGN_THREADS, 0, st->stream>>>(p, num_chunks, counts);
    status = cuda_launch_status("align_scan_kernel");
  }
  if (status == MOE_SUCCESS) {
    align_place_kernel<<<(unsigned)num_chunks, 32, 0, st->stream>>>(p, chunk, counts);
    status = cuda_launch_status("align_place_kernel");
  }
  if (!scratch) {
    moe_status freed = cuda_status(cudaFreeAsync(counts, st->stream), "cudaFreeAsync");
    if (status == MOE_SUCCESS) status = freed;
  }
  return status;
}
