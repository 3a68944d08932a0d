/*
 * decode.cu - the layer forward for a few tokens without align: two
 * weight-streaming kernels on the CUDA cores that read the routing
 * (topk_ids, topk_weights) directly.
 *
 *   decode_up_kernel:   h[slot][i] = act(gate_i . x[t], up_i . x[t]) with
 *                       bias and the routed weight when it goes on the
 *                       input; one CTA per (token, pick j, 8 columns i).
 *   decode_down_kernel: out[t][n] = sum over t's local picks j of
 *                       w_j * (w2[e_j][n] . h[t*k + j] + bias), in fp32 in
 *                       a fixed order (deterministic), with no bf16
 *                       rounding of the per-slot product; one CTA per
 *                       (token, 8 columns n): the weighted top-k reduce is
 *                       fused in.
 *
 * Why: at one token a forward on the tile path is route+align, GEMM1, GEMM2
 * and the reduce, four dependent launches of which two (align, reduce) move
 * under 100 KB; with L2 cold each pays its code and metadata from DRAM (on
 * an H100 route+align took ~16 us and the reduce ~4 us under ncu for
 * Qwen3's one token, bench/cuda_notes.md). Here the GEMMs index the weights
 * by the slot's expert, so the forward is route, up, down.
 *
 * Streaming: each warp owns whole weight rows (a gate/up pair, or one
 * output row over all picks) and issues DECODE_CHUNKS 16-byte
 * evict-first loads per row and lane before it does any math, so that a
 * round of a 2048-wide row is one latency. The first round is in flight
 * while the CTA stages its activation rows in shared memory, so the
 * activations cost no registers. Partial sums meet in a butterfly.
 *
 * Needs hidden and inter multiples of 8, x 16-byte aligned and the
 * activation rows within DECODE_MAX_SMEM; cuda_decode_wanted says when.
 */
#include "activation_math.cuh"
#include "cuda_internal.cuh"

#include <stdlib.h>
#include <string.h>

typedef __nv_bfloat16 bf16;

constexpr int DECODE_WARPS = 8;
constexpr int DECODE_CHUNKS = 8;      /* 16-byte loads per weight row and lane per round */
constexpr int DECODE_DOWN_BATCH = 24; /* 16-byte loads per lane decode_down_kernel has in flight */
constexpr int DECODE_LANE_SPAN = 32 * 8; /* elements one 16-byte load per lane covers */
constexpr size_t DECODE_MAX_SMEM = 96 * 1024;
/* Default rule: at most this many tokens (MOE_CUDA_DECODE=on|off forces). */
constexpr int64_t DECODE_MAX_TOKENS = 4;

__device__ __forceinline__ uint4 load_weights(const bf16 *p, bool valid) {
  return valid ? __ldcs((const uint4 *)p) : make_uint4(0, 0, 0, 0);
}

/* Copies `rows` rows of `cols` bf16 (cols % 8 == 0, 16-byte aligned,
 * contiguous) into shared memory with the whole CTA, skipping the rows
 * wanted(r) declines; the caller synchronizes. Each thread has
 * DECODE_STAGE_AHEAD loads in flight before it stores: one at a time, a
 * CTA staging 8 rows of h paid 8 round trips (bench/cuda_notes.md). Every
 * lane of a warp calls wanted() the same number of times (it may shuffle). */
constexpr int DECODE_STAGE_AHEAD = 4;
template <typename Wanted>
__device__ __forceinline__ void stage_rows(bf16 *dst, const bf16 *src, int rows, int cols,
                                           Wanted wanted) {
  const int row_vecs = cols / 8, total = rows * row_vecs;
#pragma unroll 1
  for (int base = 0; base < total; base += DECODE_STAGE_AHEAD * blockDim.x) {
    uint4 v[DECODE_STAGE_AHEAD];
    bool take[DECODE_STAGE_AHEAD];
#pragma unroll
    for (int u = 0; u < DECODE_STAGE_AHEAD; ++u) {
      const int i = base + u * blockDim.x + threadIdx.x;
      const int r = i < total ? i / row_vecs : 0;
      take[u] = wanted(r) && i < total;
      v[u] = take[u] ? __ldg((const uint4 *)src + i) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < DECODE_STAGE_AHEAD; ++u)
      if (take[u]) ((uint4 *)dst)[base + u * blockDim.x + threadIdx.x] = v[u];
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

/* Grid: (inter / 8 rounded up, num_tokens, top_k). Shared: x[t] (hidden). */
__global__ void __launch_bounds__(DECODE_WARPS * 32) decode_up_kernel(const cuda_decode p) {
  extern __shared__ uint4 smem_up[];
  bf16 *xs = (bf16 *)smem_up;
  const int lane = threadIdx.x & 31;
  const int pair = blockIdx.x * DECODE_WARPS + (threadIdx.x >> 5);
  const int64_t t = blockIdx.y, slot = t * p.top_k + blockIdx.z;
  const int e = cuda_local_expert(p.topk_ids[slot], p.expert_map, p.num_experts, p.num_local);
  const bool active = e >= 0 && pair < p.inter; /* no return: the CTA stages x together */
  const int K = p.hidden;
  const bf16 *gate = p.w13 + ((int64_t)(active ? e : 0) * 2 * p.inter + 2 * (int64_t)pair) * K;
  const bf16 *up = gate + K;

  uint4 wg[DECODE_CHUNKS], wu[DECODE_CHUNKS];
  int k0 = lane * 8;
#pragma unroll
  for (int c = 0; c < DECODE_CHUNKS; ++c) {
    const int k = k0 + c * DECODE_LANE_SPAN;
    wg[c] = load_weights(gate + k, active && k < K);
    wu[c] = load_weights(up + k, active && k < K);
  }
  /* e is the same for the whole CTA */
  stage_rows(xs, p.x + t * K, 1, K, [&](int) { return e >= 0; });
  __syncthreads();
  if (!active) return;

  float acc_gate = 0.0f, acc_up = 0.0f;
#pragma unroll 1
  while (true) {
#pragma unroll
    for (int c = 0; c < DECODE_CHUNKS; ++c) {
      const int k = k0 + c * DECODE_LANE_SPAN;
      if (k < K) {
        const uint4 xv = *(const uint4 *)(xs + k);
        acc_gate += dot8_bf16(wg[c], xv);
        acc_up += dot8_bf16(wu[c], xv);
      }
    }
    k0 += DECODE_CHUNKS * DECODE_LANE_SPAN;
    if (k0 >= K) break;
#pragma unroll
    for (int c = 0; c < DECODE_CHUNKS; ++c) {
      const int k = k0 + c * DECODE_LANE_SPAN;
      wg[c] = load_weights(gate + k, k < K);
      wu[c] = load_weights(up + k, k < K);
    }
  }
  acc_gate = warp_sum(acc_gate);
  acc_up = warp_sum(acc_up);
  if (lane != 0) return;
  const moe_gemm_routed_weight mode =
      p.weight_on_input ? MOE_GEMM_ROUTED_WEIGHT_BEFORE_BIAS : MOE_GEMM_ROUTED_WEIGHT_NONE;
  const float weight = p.weight_on_input ? p.topk_weights[slot] : 1.0f;
  const float *bias = p.w13_bias ? p.w13_bias + (int64_t)e * 2 * p.inter + 2 * pair : NULL;
  const float g = cuda_apply_routed(acc_gate, bias ? bias[0] : 0.0f, weight, mode);
  const float u = cuda_apply_routed(acc_up, bias ? bias[1] : 0.0f, weight, mode);
  p.h[slot * p.inter + pair] =
      __float2bfloat16_rn(cuda_gated_activation(p.activation, p.alpha, p.limit, g, u));
}

/* Grid: (hidden / 8 rounded up, num_tokens). Shared: h of t's k slots.
 * A warp owns one output row and walks its k picks' weight rows as one list
 * of (pick j, chunk c) loads, DECODE_DOWN_BATCH at a time: at Qwen3's shape
 * (k = 8, inter 768: 3 chunks a lane) the whole row's 12 KB go out at once.
 * Lane j holds pick j's expert and weight (k <= 32), read by shuffles; the
 * weight scales each chunk's dot product, so one accumulator serves every
 * pick, and the bias term sum_j w_j * b_j is added at the end. */
__global__ void __launch_bounds__(DECODE_WARPS * 32, 2) decode_down_kernel(const cuda_decode p) {
  extern __shared__ uint4 smem_down[];
  bf16 *hs = (bf16 *)smem_down;
  constexpr int B = DECODE_DOWN_BATCH;
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * DECODE_WARPS + (threadIdx.x >> 5);
  const int64_t t = blockIdx.y, first_slot = t * p.top_k;
  const int K = p.inter, top_k = p.top_k;
  const int chunks = (K + DECODE_LANE_SPAN - 1) / DECODE_LANE_SPAN; /* per row and lane */
  const bool active = row < p.hidden;

  int pick_expert = -1;
  float pick_weight = 0.0f;
  if (lane < top_k) {
    pick_expert =
        cuda_local_expert(p.topk_ids[first_slot + lane], p.expert_map, p.num_experts, p.num_local);
    pick_weight = p.weight_on_input ? 1.0f : p.topk_weights[first_slot + lane];
  }
  const bf16 *w_row = p.w2 + (int64_t)row * K + lane * 8; /* + expert * hidden * K */
  const int64_t expert_stride = (int64_t)p.hidden * K;

  /* Loads B chunks from cursor (j, c) on, advancing it. */
  auto load_batch = [&](int &j, int &c, uint4(&v)[DECODE_DOWN_BATCH]) {
#pragma unroll
    for (int b = 0; b < DECODE_DOWN_BATCH; ++b) {
      const int e = __shfl_sync(0xffffffffu, pick_expert, j & 31);
      const int k = c * DECODE_LANE_SPAN;
      const bool valid = active && j < top_k && e >= 0 && lane * 8 + k < K;
      v[b] = load_weights(w_row + (e > 0 ? e : 0) * expert_stride + k, valid);
      if (++c == chunks) {
        c = 0;
        ++j;
      }
    }
  };

  uint4 wv[B];
  int load_j = 0, load_c = 0;
  load_batch(load_j, load_c, wv);
  /* Only local picks: the rows of the others were never written. */
  stage_rows(hs, p.h + first_slot * K, top_k, K,
             [&](int j) { return __shfl_sync(0xffffffffu, pick_expert, j & 31) >= 0; });
  __syncthreads();
  if (!active) return;

  float acc = 0.0f;
  int j = 0, c = 0;
#pragma unroll 1
  while (true) {
#pragma unroll
    for (int b = 0; b < B; ++b) {
      const int e = __shfl_sync(0xffffffffu, pick_expert, j & 31);
      const float w = __shfl_sync(0xffffffffu, pick_weight, j & 31);
      const int k = lane * 8 + c * DECODE_LANE_SPAN;
      if (j < top_k && e >= 0 && k < K)
        acc = fmaf(w, dot8_bf16(wv[b], *(const uint4 *)(hs + (int64_t)j * K + k)), acc);
      if (++c == chunks) {
        c = 0;
        ++j;
      }
    }
    if (load_j >= top_k) break;
    load_batch(load_j, load_c, wv);
  }
  acc = warp_sum(acc);
  if (lane != 0) return;
  if (p.w2_bias) {
#pragma unroll 1
    for (int jj = 0; jj < top_k; ++jj) {
      const int64_t slot = first_slot + jj;
      const int e = cuda_local_expert(p.topk_ids[slot], p.expert_map, p.num_experts, p.num_local);
      if (e >= 0)
        acc += (p.weight_on_input ? 1.0f : p.topk_weights[slot]) *
               p.w2_bias[(int64_t)e * p.hidden + row];
    }
  }
  p.out[t * p.hidden + row] = __float2bfloat16_rn(acc);
}

static size_t up_smem(const cuda_decode *d) {
  return (size_t)d->hidden * sizeof(bf16);
}
static size_t down_smem(const cuda_decode *d) {
  return (size_t)d->top_k * (size_t)d->inter * sizeof(bf16);
}

moe_status cuda_decode_init(void) {
  CUDA_TRY(cuda_status(cudaFuncSetAttribute(decode_up_kernel,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            (int)DECODE_MAX_SMEM),
                       "cudaFuncSetAttribute of decode_up_kernel"));
  return cuda_status(cudaFuncSetAttribute(decode_down_kernel,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          (int)DECODE_MAX_SMEM),
                     "cudaFuncSetAttribute of decode_down_kernel");
}

bool cuda_decode_wanted(const cuda_decode *d) {
  const bool fits = d->hidden % 8 == 0 && d->inter % 8 == 0 && ((uintptr_t)d->x & 15u) == 0 &&
                    up_smem(d) <= DECODE_MAX_SMEM && down_smem(d) <= DECODE_MAX_SMEM &&
                    d->num_tokens <= 65535 &&
                    (d->hidden + DECODE_WARPS - 1) / DECODE_WARPS <= INT32_MAX;
  if (!fits) return false;
  const char *env = getenv("MOE_CUDA_DECODE");
  if (env && strcmp(env, "off") == 0) return false;
  if (env && strcmp(env, "on") == 0) return true;
  const char *tile = getenv("MOE_CUDA_TILE"); /* a forced tile means the tile path */
  if (tile && *tile) return false;
  return d->num_tokens <= DECODE_MAX_TOKENS;
}

moe_status cuda_decode_run(const cuda_state *st, const cuda_decode *d) {
  const dim3 block(DECODE_WARPS * 32);
  const dim3 up_grid((unsigned)((d->inter + DECODE_WARPS - 1) / DECODE_WARPS),
                     (unsigned)d->num_tokens, (unsigned)d->top_k);
  cudaError_t err = cuda_launch(st, false, decode_up_kernel, up_grid, block, up_smem(d), *d);
  if (err != cudaSuccess) return cuda_status(err, "decode_up_kernel launch");
  CUDA_TRY(cuda_launch_status("decode_up_kernel"));
  const dim3 down_grid((unsigned)((d->hidden + DECODE_WARPS - 1) / DECODE_WARPS),
                       (unsigned)d->num_tokens);
  err = cuda_launch(st, false, decode_down_kernel, down_grid, block, down_smem(d), *d);
  if (err != cudaSuccess) return cuda_status(err, "decode_down_kernel launch");
  return cuda_launch_status("decode_down_kernel");
}
