/*
 * decode.cu - the layer forward for a few tokens without align: two
 * weight-streaming kernels on the CUDA cores that read the routing
 * (topk_ids, topk_weights) directly.
 *
 *   decode_up_kernel:   h[slot][i] = act(gate_i . x[t], up_i . x[t]) with
 *                       bias and the routed weight when it goes on the
 *                       input; one CTA per (token, pick j, 8 columns i).
 *   decode_down_kernel: out[t][n] = sum over t's local picks j, in order,
 *                       of routed(w2[e_j][n] . h[t*k + j]); one CTA per
 *                       (token, 8 columns n). The weighted top-k reduce is
 *                       its epilogue, in fp32, with no bf16 rounding of the
 *                       per-slot product in between.
 *
 * Why: at one token a forward on the tile path is route+align, GEMM1, GEMM2
 * and the reduce, four dependent launches of which two (align, reduce) move
 * under 100 KB; with L2 cold each pays its code and metadata from DRAM (on
 * an H100 route+align took ~16 us and the reduce ~4 us under ncu for
 * Qwen3's one token, bench/cuda_notes.md). Here the GEMMs index the weights
 * by the slot's expert, so the forward is route, up, down.
 *
 * Streaming: each warp owns whole weight rows (a gate/up pair, or one
 * output row for DECODE_GROUP picks) and issues DECODE_CHUNKS 16-byte
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
constexpr int DECODE_CHUNKS = 8;         /* 16-byte loads per weight row and lane per round */
constexpr int DECODE_DOWN_CHUNKS = 4;    /* the same for decode_down_kernel */
constexpr int DECODE_GROUP = 4;          /* picks decode_down_kernel streams at once */
constexpr int DECODE_LANE_SPAN = 32 * 8; /* elements one 16-byte load per lane covers */
constexpr size_t DECODE_MAX_SMEM = 96 * 1024;
/* Default rule: at most this many tokens (MOE_CUDA_DECODE=on|off forces). */
constexpr int64_t DECODE_MAX_TOKENS = 4;

__device__ __forceinline__ uint4 load_weights(const bf16 *p, bool valid) {
  return valid ? __ldcs((const uint4 *)p) : make_uint4(0, 0, 0, 0);
}

/* Copies n bf16 (n % 8 == 0, 16-byte aligned) into shared memory with the
 * whole CTA; the caller synchronizes. */
__device__ __forceinline__ void stage_rows(bf16 *dst, const bf16 *src, int64_t n) {
#pragma unroll 1
  for (int64_t i = threadIdx.x * 8; i < n; i += (int64_t)blockDim.x * 8)
    *(uint4 *)(dst + i) = __ldg((const uint4 *)(src + i));
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
  if (e >= 0) stage_rows(xs, p.x + t * K, K); /* e is the same for the whole CTA */
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

/* Grid: (hidden / 8 rounded up, num_tokens). Shared: h of t's k slots. */
__global__ void __launch_bounds__(DECODE_WARPS * 32) decode_down_kernel(const cuda_decode p) {
  extern __shared__ uint4 smem_down[];
  bf16 *hs = (bf16 *)smem_down;
  constexpr int G = DECODE_GROUP, C = DECODE_DOWN_CHUNKS;
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * DECODE_WARPS + (threadIdx.x >> 5);
  const int64_t t = blockIdx.y, first_slot = t * p.top_k;
  const int K = p.inter;
  const bool active = row < p.hidden;

  /* The weight rows of picks j0 .. j0 + G - 1 (NULL: not local). */
  auto rows_of = [&](int j0, const bf16 *(&w)[G]) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int j = j0 + g;
      const int e = active && j < p.top_k
                        ? cuda_local_expert(p.topk_ids[first_slot + j], p.expert_map, p.num_experts,
                                            p.num_local)
                        : -1;
      w[g] = e >= 0 ? p.w2 + ((int64_t)e * p.hidden + row) * K : NULL;
    }
  };
  auto load_round = [&](const bf16 *(&w)[G], int k0, uint4(&v)[G][C]) {
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int k = k0 + c * DECODE_LANE_SPAN;
        v[g][c] = load_weights(w[g] + k, w[g] && k < K);
      }
  };

  const bf16 *w[G];
  uint4 wv[G][C];
  rows_of(0, w);
  load_round(w, lane * 8, wv);
  /* Only local picks: the rows of the others were never written. */
#pragma unroll 1
  for (int j = 0; j < p.top_k; ++j)
    if (cuda_local_expert(p.topk_ids[first_slot + j], p.expert_map, p.num_experts, p.num_local) >=
        0)
      stage_rows(hs + (int64_t)j * K, p.h + (first_slot + j) * K, K);
  __syncthreads();
  if (!active) return;

  float sum = 0.0f;
#pragma unroll 1
  for (int j0 = 0; j0 < p.top_k; j0 += G) {
    float acc[G];
#pragma unroll
    for (int g = 0; g < G; ++g)
      acc[g] = 0.0f;
    int k0 = lane * 8;
#pragma unroll 1
    while (true) {
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const int k = k0 + c * DECODE_LANE_SPAN;
          if (w[g] && k < K)
            acc[g] += dot8_bf16(wv[g][c], *(const uint4 *)(hs + (int64_t)(j0 + g) * K + k));
        }
      k0 += C * DECODE_LANE_SPAN;
      if (k0 >= K) break;
      load_round(w, k0, wv);
    }
    /* The next group's first round goes out before this group's epilogue. */
    const bool present[G] = {w[0] != NULL, w[1] != NULL, w[2] != NULL, w[3] != NULL};
    static_assert(G == 4, "present[] lists the group");
    if (j0 + G < p.top_k) {
      rows_of(j0 + G, w);
      load_round(w, lane * 8, wv);
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (!present[g]) continue; /* the same on every lane */
      const int64_t slot = first_slot + j0 + g;
      const int e = cuda_local_expert(p.topk_ids[slot], p.expert_map, p.num_experts, p.num_local);
      const float total = warp_sum(acc[g]);
      const float bias = p.w2_bias ? p.w2_bias[(int64_t)e * p.hidden + row] : 0.0f;
      sum += p.weight_on_input ? cuda_apply_routed(total, bias, 1.0f, MOE_GEMM_ROUTED_WEIGHT_NONE)
                               : cuda_apply_routed(total, bias, p.topk_weights[slot],
                                                   MOE_GEMM_ROUTED_WEIGHT_AFTER_BIAS);
    }
  }
  if (lane == 0) p.out[t * p.hidden + row] = __float2bfloat16_rn(sum);
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
