/*
 * route_warp.cuh - one token's routing by the 32 lanes of a warp, following
 * core/routing_logic.h (route_align.cu's file comment gives the order of
 * the steps and what may differ from the host). Compiled by the routing
 * kernels (route_align.cu) and by the decode kernels that route their own
 * token (decode.cu), so both give the same picks and weights bit for bit.
 */
#ifndef MOE_CUDA_ROUTE_WARP_CUH
#define MOE_CUDA_ROUTE_WARP_CUH

#include "routing.h"

#include <math.h>

/* (key, index) of the better of the lanes' candidates, on every lane;
 * index -1 means no candidate. moe_rl_better is a strict total order, so
 * the butterfly agrees on one winner. */
__device__ __forceinline__ void warp_best(float &key, int &index) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other_key = __shfl_xor_sync(0xffffffffu, key, offset);
    const int other = __shfl_xor_sync(0xffffffffu, index, offset);
    if (other >= 0 && (index < 0 || moe_rl_better(other_key, other, key, index))) {
      key = other_key;
      index = other;
    }
  }
}

/* The softmax statistics of one token's logits (moe_rl_row_stats) with the
 * 32 lanes of a warp: the same max, the sum in another order. */
__device__ inline moe_rl_row warp_row_stats(const float *logits, const moe_rl_params &p) {
  const int lane = threadIdx.x & 31, E = p.num_experts;
  moe_rl_row row;
  row.max = -INFINITY;
  row.inv_sum = 0.0f;
  if (!p.scoring_sigmoid) {
    float m = -INFINITY;
#pragma unroll 1
    for (int e = lane; e < E; e += 32)
      if (logits[e] > m) m = logits[e];
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float other = __shfl_xor_sync(0xffffffffu, m, offset);
      if (other > m) m = other;
    }
    if (m != -INFINITY) {
      float sum = 0.0f;
#pragma unroll 1
      for (int e = lane; e < E; e += 32) {
        const float l = logits[e];
        if (l == l) sum += MOE_RL_EXP(l == m ? 0.0f : l - m);
      }
      for (int offset = 16; offset > 0; offset >>= 1)
        sum += __shfl_xor_sync(0xffffffffu, sum, offset);
      row.max = m;
      row.inv_sum = 1.0f / sum;
    }
  }
  return row;
}

/* Routes one token with the 32 lanes of a warp (route_align.cu's file
 * comment); lane 0 writes ids[k] and weights[k]. GROUPED = false compiles
 * the group steps out (num_groups must then be 1): a kernel that routes
 * inline keeps less code to fetch. */
template <bool GROUPED>
__device__ void route_token_warp(const float *logits, const float *bias, const moe_rl_params &p,
                                 int32_t *ids, float *weights) {
  const int lane = threadIdx.x & 31, E = p.num_experts;
  const moe_rl_row row = warp_row_stats(logits, p);

  /* Groups: lane g scores groups g and g + 32 as the header does, then the
   * warp picks topk_groups of them. */
  const int group_size = GROUPED ? E / p.num_groups : E;
  unsigned long long allowed = ~0ull;
  if (GROUPED && p.num_groups > 1) {
    float group_key[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int g = lane + 32 * h;
      group_key[h] = NAN;
      if (g >= p.num_groups) continue;
      group_key[h] = moe_rl_group_key(logits, bias, g, group_size, row, &p);
    }
    allowed = 0;
    for (int pick = 0; pick < p.topk_groups; ++pick) {
      float key = 0.0f;
      int index = -1;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int g = lane + 32 * h;
        if (g < p.num_groups && !((allowed >> g) & 1ull) &&
            (index < 0 || moe_rl_better(group_key[h], g, key, index))) {
          key = group_key[h];
          index = g;
        }
      }
      warp_best(key, index);
      allowed |= 1ull << index;
    }
  }

  float prev_key = 0.0f, sum = 0.0f, picked[MOE_MAX_TOP_K];
  int prev_e = -1;
  for (int j = 0; j < p.top_k; ++j) {
    float best_key = 0.0f;
    int best_e = -1;
    for (int e = lane; e < E; e += 32) {
      if (GROUPED && !((allowed >> (e / group_size)) & 1ull)) continue;
      const float key = moe_rl_key(logits, bias, e, row, &p);
      if (prev_e >= 0 && !moe_rl_better(prev_key, prev_e, key, e)) continue;
      if (best_e < 0 || moe_rl_better(key, e, best_key, best_e)) {
        best_key = key;
        best_e = e;
      }
    }
    warp_best(best_key, best_e);
    prev_key = best_key;
    prev_e = best_e;
    const float w = best_e >= 0 ? moe_rl_score(logits[best_e], row, &p) : 0.0f;
    picked[j] = w;
    sum += w;
    if (lane == 0) ids[j] = best_e;
  }
  if (lane == 0) {
    for (int j = 0; j < p.top_k; ++j)
      weights[j] = picked[j];
    moe_rl_finish_weights(weights, sum, &p); /* the host's order: no overflow */
  }
}

#endif
