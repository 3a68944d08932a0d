/*
 * route_align.cu - routing and align on the device, producing the bytes of
 * the core's host code (core/routing.c, core/align.c).
 *
 * Routing follows core/routing_logic.h in three kernels:
 *   - the reference: moe_rl_route_token itself, one thread per token (the
 *     host's code compiled for the device), chosen by option cuda.routing=
 *     reference;
 *   - for few tokens (route_tokens_by_rank): the whole block, each expert's
 *     pick number counted as its rank among the token's experts;
 *     the same on many blocks of a few tokens each up to the tuning row's
 *     rank_routing_max_tokens (or any T with cuda.routing=rank): on an
 *     H100 2-3% faster forwards than the warp per token for Qwen3 at
 *     16-256 tokens, level elsewhere, slower past 1024 tokens (up to 7%,
 *     DeepSeek at 16384; bench/cuda_notes.md item 22);
 *   - otherwise one warp per token (cuda.routing=warp forces it). It
 *     calls the header's key, ranking and score functions (moe_rl_key,
 *     moe_rl_better, moe_rl_score) for the header's picks (group scores,
 *     then k picks, each the best expert ranked strictly below the
 *     previous one; the header finds them in one insertion pass, the warp
 *     in k argmax passes): lanes scan E/32 experts each and a butterfly of
 *     moe_rl_better agrees on the winner.
 * Only the softmax denominator is summed in another order, so weights may
 * differ from the host in the last bit. One thread needs O(E) dependent
 * steps plus an insertion per list change, the warp O(k*(E/32 + 5)) (measurements:
 * bench/cuda_notes.md, 'Measurements behind the code's rules').
 *
 * Align has two shapes:
 *   - one block (slots <= CUDA_ALIGN_ONE_BLOCK_SLOTS): count, scan, place,
 *     in one launch, fused with the routing of up to
 *     CUDA_FUSED_ROUTE_TOKENS tokens: the whole metadata of a decode step.
 *     Each routing is its own instance of that kernel, and its loops stay
 *     rolled: the launch is bound by fetching its code (fused_route);
 *   - three launches for more slots: per-chunk counts, one block that scans
 *     them into each chunk's start inside each expert's run, and per-chunk
 *     placement.
 * Placement is stable: a block cuts its range into one run per warp, each
 * warp's cursors start after the slots of the runs before it (per-warp
 * counts, summed in warp order), and each warp walks its run in ascending
 * order, 32 at a time: lanes with the same expert (__match_any_sync) take
 * consecutive positions by lane order, and the group's leader advances the
 * expert's cursor. Counts use atomics, whose order does not matter.
 */
#include "cuda_internal.cuh"

#include "routing.h"

#include <stdlib.h>
#include <string.h>

#define CUDA_ALIGN_THREADS 1024
#define CUDA_ALIGN_ONE_BLOCK_SLOTS 4096
/* Tokens routed inside the one-block kernel. Past a decode step the
 * routing of every token in one block costs more than a separate launch
 * of the many-block routing kernel (measurements: bench/cuda_notes.md,
 * 'Measurements behind the code's rules'). */
#define CUDA_FUSED_ROUTE_TOKENS 8
/* Tokens the rank routing (route_tokens_by_rank) holds rows for. */
#define CUDA_RANK_ROUTE_MAX_TOKENS 64
#define CUDA_ALIGN_CHUNK_MIN 1024
#define CUDA_ALIGN_MAX_CHUNKS 2048
/* Logits staged in shared memory by the one-block kernel (floats). */
#define CUDA_ROUTE_STAGE_FLOATS 8192
/* Router keys a lane of the warp routing keeps in registers: up to 256
 * experts (bench/cuda_notes.md item 21); the kernel has an instance for 4
 * (up to 128 experts) and one for 8. */
#define CUDA_ROUTE_LANE_KEYS 8
/* Slot ids a placing lane loads ahead (registers). */
#define CUDA_PLACE_AHEAD 8

/* ---- routing ------------------------------------------------------------ */

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
__device__ moe_rl_row warp_row_stats(const float *logits, const moe_rl_params &p) {
  const int lane = threadIdx.x & 31, E = p.num_experts;
  moe_rl_row row;
  row.max = -INFINITY;
  row.inv_sum = 0.0f;
  if (!p.scoring_sigmoid) {
    /* Unrolled: four logits in flight per lane, not one round trip each. */
    float m = -INFINITY;
#pragma unroll 4
    for (int e = lane; e < E; e += 32)
      if (logits[e] > m) m = logits[e];
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float other = __shfl_xor_sync(0xffffffffu, m, offset);
      if (other > m) m = other;
    }
    if (m != -INFINITY) {
      float sum = 0.0f;
#pragma unroll 4
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

/* Routes one token with the 32 lanes of a warp (see the file comment);
 * lane 0 writes ids[k] and weights[k]. KEYS > 0 (E <= 32 KEYS): each lane
 * computes the keys of its experts once, into registers, and the k picks
 * compare registers; KEYS = 0 reads every key again at every pick (any E).
 * Both make the same comparisons in the same order: the same picks.
 * GROUPED = false compiles the group steps out (num_groups must be 1). */
template <int KEYS, bool GROUPED = true>
__device__ void route_token_warp(const float *logits, const float *bias, const moe_rl_params &p,
                                 int32_t *ids, float *weights) {
  const int lane = threadIdx.x & 31, E = p.num_experts;
  const moe_rl_row row = warp_row_stats(logits, p);

  /* Groups: lane g scores groups g and g + 32 as the header does, then the
   * warp picks topk_groups of them. */
  const int group_size = E / p.num_groups;
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

  float keys[KEYS > 0 ? KEYS : 1];
  uint32_t has_key = 0; /* bit i: keys[i] is expert lane + 32 i, allowed */
#pragma unroll
  for (int i = 0; i < KEYS; ++i) {
    const int e = lane + 32 * i;
    keys[i] = 0.0f;
    if (e < E && (!GROUPED || ((allowed >> (e / group_size)) & 1ull))) {
      keys[i] = moe_rl_key(logits, bias, e, row, &p);
      has_key |= 1u << i;
    }
  }

  /* Lane 0 stores each pick's weight as it goes: an array of k weights in
   * registers, indexed by the pick number, made the compiler unroll the
   * pick loop for every k up to MOE_MAX_TOP_K. */
  float prev_key = 0.0f, sum = 0.0f;
  int prev_e = -1;
  for (int j = 0; j < p.top_k; ++j) {
    float best_key = 0.0f;
    int best_e = -1;
    if (KEYS > 0) {
#pragma unroll
      for (int i = 0; i < KEYS; ++i) {
        const int e = lane + 32 * i;
        if (!((has_key >> i) & 1u)) continue;
        if (prev_e >= 0 && !moe_rl_better(prev_key, prev_e, keys[i], e)) continue;
        if (best_e < 0 || moe_rl_better(keys[i], e, best_key, best_e)) {
          best_key = keys[i];
          best_e = e;
        }
      }
    } else {
      for (int e = lane; e < E; e += 32) {
        if (GROUPED && !((allowed >> (e / group_size)) & 1ull)) continue;
        const float key = moe_rl_key(logits, bias, e, row, &p);
        if (prev_e >= 0 && !moe_rl_better(prev_key, prev_e, key, e)) continue;
        if (best_e < 0 || moe_rl_better(key, e, best_key, best_e)) {
          best_key = key;
          best_e = e;
        }
      }
    }
    warp_best(best_key, best_e);
    prev_key = best_key;
    prev_e = best_e;
    const float w = best_e >= 0 ? moe_rl_score(logits[best_e], row, &p) : 0.0f;
    sum += w;
    if (lane == 0) {
      ids[j] = best_e;
      weights[j] = w;
    }
  }
  if (lane == 0) moe_rl_finish_weights(weights, sum, &p); /* the host's order: no overflow */
}

/* Routes tokens first, first + stride, ... below num_tokens: a warp per
 * token (first and stride count warps), or for the reference a thread per
 * token through moe_rl_route_token. Every lane of a warp must call it.
 * LANE_KEYS: the warp routing's register keys (the caller guarantees
 * E <= 32 LANE_KEYS; 0 for any E, as in the one-block kernel, whose 1024
 * threads get 64 registers each). */
template <bool REFERENCE, int LANE_KEYS, bool GROUPED = true>
__device__ void route_tokens(const moe_rl_params &rl, const float *logits, const float *bias,
                             int64_t first, int64_t stride, int64_t num_tokens, int32_t *ids,
                             float *weights) {
  const int64_t E = rl.num_experts, k = rl.top_k;
  if (REFERENCE) {
    for (int64_t t = first * 32 + (threadIdx.x & 31); t < num_tokens; t += stride * 32)
      moe_rl_route_token(logits + t * E, bias, &rl, (int *)ids + t * k, weights + t * k);
  } else {
    for (int64_t t = first; t < num_tokens; t += stride)
      route_token_warp<LANE_KEYS, GROUPED>(logits + t * E, bias, rl, ids + t * k, weights + t * k);
  }
}

/* What a routing kernel instance compiles for: PLAIN is softmax scoring
 * without a correction bias or groups (Mixtral, Qwen3, gpt-oss, ernie),
 * so that moe_rl_key and moe_rl_score lose their other branches;
 * UNGROUPED any scoring on one group; GROUPED everything. */
enum route_shape { ROUTE_PLAIN, ROUTE_UNGROUPED, ROUTE_GROUPED };

static route_shape route_shape_of(const moe_rl_params &rl) {
  if (rl.num_groups > 1) return ROUTE_GROUPED;
  return !rl.scoring_sigmoid && !rl.has_bias ? ROUTE_PLAIN : ROUTE_UNGROUPED;
}

/* rl with the fields the instance's shape fixes written as constants (the
 * host chose the shape from the same fields: route_shape_of). */
template <int SHAPE> __device__ __forceinline__ moe_rl_params shaped_params(moe_rl_params rl) {
  if (SHAPE != ROUTE_GROUPED) rl.num_groups = 1;
  if (SHAPE == ROUTE_PLAIN) {
    rl.scoring_sigmoid = 0;
    rl.has_bias = 0;
  }
  return rl;
}

/* Routing alone, on many blocks. One instance per (keys, shape): a
 * kernel holding every variant was 8224 instructions (131 KB), which a
 * launch with the L2 cold fetches from DRAM miss by miss (the one-block
 * kernel's lesson, below). */
template <bool REFERENCE, int LANE_KEYS, int SHAPE>
__global__ void route_kernel(moe_rl_params rl, const float *logits, const float *bias,
                             int64_t num_tokens, int32_t *ids, float *weights) {
  cuda_allow_dependents(); /* the decode path's GEMM1 may stage x meanwhile */
  const int64_t warps = blockDim.x >> 5;
  route_tokens<REFERENCE, LANE_KEYS, SHAPE == ROUTE_GROUPED>(
      shaped_params<SHAPE>(rl), logits, bias, blockIdx.x * warps + (threadIdx.x >> 5),
      (int64_t)gridDim.x * warps, num_tokens, ids, weights);
}

/* ---- align ---------------------------------------------------------------- */

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
  int32_t block_shift; /* log2(block_m): block_m is a power of two, and shifts keep
                          64-bit division (a long subroutine) out of the kernels */
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
  p.block_shift = 0;
  while ((1 << p.block_shift) < a->block_m)
    ++p.block_shift;
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
  const int BM = p.block_m, shift = p.block_shift;
  const int32_t sentinel = (int32_t)p.num_slots;
  /* Each thread owns experts tid, tid + blockDim, ...: scan in rounds. */
  int64_t carry = 0;
#pragma unroll 1
  for (int base = 0; base < p.num_local; base += blockDim.x) {
    const int e = base + threadIdx.x;
    const int64_t padded = e < p.num_local ? (int64_t)((count[e] + BM - 1) >> shift) << shift : 0;
    int64_t total;
    const int64_t before = block_exclusive_scan(padded, &total);
    if (e < p.num_local) start[e] = carry + before;
    carry += total;
  }
  if (threadIdx.x == 0) start[p.num_local] = carry;
  __syncthreads();
  const int64_t padded_total = carry;
  /* A warp per expert, its lanes on consecutive entries. With a thread per
   * expert, each warp store scattered 32 words and an expert's padding took
   * up to block_m - 1 of them one after another: the likely reason the scan
   * kernel took 16 us at 32768 slots and block 128 on an H100, where its
   * chunk loads were not the limit (bench/cuda_notes.md item 21). Same
   * bytes. blockDim.x is a multiple of 32. */
  const int lane = threadIdx.x & 31, warps = blockDim.x >> 5;
#pragma unroll 1
  for (int e = threadIdx.x >> 5; e < p.num_local; e += warps) {
    const int64_t first = start[e], end = start[e + 1];
#pragma unroll 1
    for (int64_t b = (first >> shift) + lane; b < end >> shift; b += 32)
      p.expert_ids[b] = e;
#pragma unroll 1
    for (int64_t i = first + count[e] + lane; i < end; i += 32)
      p.sorted[i] = sentinel;
  }
#pragma unroll 1
  for (int64_t b = (padded_total >> shift) + threadIdx.x; b < p.block_capacity; b += blockDim.x)
    p.expert_ids[b] = -1;
#pragma unroll 1
  for (int64_t i = padded_total + threadIdx.x; i < p.sorted_capacity; i += blockDim.x)
    p.sorted[i] = sentinel;
  if (threadIdx.x == 0) *p.ntpp = (int32_t)padded_total;
}

/* One warp places slots [begin, end) in ascending order at cursor[e];
 * each lane loads CUDA_PLACE_AHEAD rounds of ids before placing them, so
 * the loads overlap instead of each round waiting for its own. Positions
 * fit int32 (sorted_token_ids is indexed by int32 starts). */
__device__ void align_place_warp(const align_params &p, int64_t begin, int64_t end,
                                 int32_t *cursor) {
  const int lane = threadIdx.x & 31;
  const unsigned lower = (1u << lane) - 1u;
  for (int64_t base = begin; base < end; base += 32 * CUDA_PLACE_AHEAD) {
    int experts[CUDA_PLACE_AHEAD];
#pragma unroll
    for (int r = 0; r < CUDA_PLACE_AHEAD; ++r) {
      const int64_t s = base + 32 * r + lane;
      experts[r] =
          s < end ? cuda_local_expert(p.topk_ids[s], p.expert_map, p.num_experts, p.num_local) : -1;
    }
#pragma unroll
    for (int r = 0; r < CUDA_PLACE_AHEAD; ++r) {
      if (base + 32 * r >= end) break; /* warp-uniform: a decode step places one round */
      const int e = experts[r];
      const unsigned same = __match_any_sync(0xffffffffu, e);
      if (e >= 0) p.sorted[cursor[e] + __popc(same & lower)] = (int32_t)(base + 32 * r + lane);
      __syncwarp();
      if (e >= 0 && (same & lower) == 0) cursor[e] += __popc(same);
      __syncwarp();
    }
  }
}

/* Warps of align_place_block for num_slots slots: a warp per 32 slots, at
 * most the block's warps and as many as CUDA_PLACE_HIST_INTS counters
 * hold (one per warp and expert). */
#define CUDA_PLACE_HIST_INTS 6144
__host__ __device__ inline int align_place_warps(int64_t num_slots, int num_local,
                                                 int block_warps) {
  int64_t warps = (num_slots + 31) / 32;
  if (warps > block_warps) warps = block_warps;
  if (warps > CUDA_PLACE_HIST_INTS / num_local) warps = CUDA_PLACE_HIST_INTS / num_local;
  return warps < 1 ? 1 : (int)warps;
}

/*
 * Places slots [begin, end) stably with the block's warps: expert e's
 * first slot of the range goes to first[e], the others after it in slot
 * order. The range is cut into one run of whole 32-slot rounds per warp;
 * each warp counts its run's slots per expert (hist, warps * num_local
 * ints of shared memory), a thread per expert turns the counts into each
 * warp's cursors, then every warp places its run (align_place_warp). One
 * warp alone walked all the rounds one after another: 28 us for 2048
 * slots on an H200 under ncu (bench/cuda_notes.md item 22). Every thread
 * of the block calls it.
 */
template <typename FIRST>
__device__ void align_place_block(const align_params &p, int64_t begin, int64_t end,
                                  const FIRST *first, int32_t *hist) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warps = align_place_warps(end - begin, p.num_local, blockDim.x >> 5);
  const int64_t rounds = (end - begin + 31) / 32;
  const int64_t run = (rounds + warps - 1) / warps * 32; /* slots per warp */
  const int64_t my_begin = min(begin + warp * run, end), my_end = min(my_begin + run, end);
  if (warps == 1) {
    /* One warp places everything (a decode step's few slots): the starts
     * are its cursors, without the counting pass. */
#pragma unroll 1
    for (int e = threadIdx.x; e < p.num_local; e += blockDim.x)
      hist[e] = (int32_t)first[e];
    __syncthreads();
    if (warp == 0) align_place_warp(p, begin, end, hist);
    return;
  }
#pragma unroll 1
  for (int i = threadIdx.x; i < warps * p.num_local; i += blockDim.x)
    hist[i] = 0;
  __syncthreads();
  if (warp < warps) {
#pragma unroll 4
    for (int64_t s = my_begin + lane; s < my_end; s += 32) {
      const int e = cuda_local_expert(p.topk_ids[s], p.expert_map, p.num_experts, p.num_local);
      if (e >= 0) atomicAdd(&hist[warp * p.num_local + e], 1);
    }
  }
  __syncthreads();
#pragma unroll 1
  for (int e = threadIdx.x; e < p.num_local; e += blockDim.x) {
    int32_t cursor = (int32_t)first[e];
#pragma unroll 1
    for (int w = 0; w < warps; ++w) {
      const int32_t n = hist[w * p.num_local + e];
      hist[w * p.num_local + e] = cursor;
      cursor += n;
    }
  }
  __syncthreads();
  if (warp < warps) align_place_warp(p, my_begin, my_end, hist + warp * p.num_local);
}

/*
 * Routing of a few tokens by the whole block, by ranks: expert e of token t
 * is pick number rank(e) = |{allowed e' : moe_rl_better(key e', key e)}|,
 * which is the header's pick order (picks are the best expert ranked
 * strictly below the previous pick; moe_rl_better is a strict total order,
 * so ranks are distinct). Every comparison is independent, so the T*E*E of
 * them spread over the block's threads, where one warp per token would walk
 * k dependent picks while the block's other warps wait; here they are a
 * few short passes separated by barriers (measurements:
 * bench/cuda_notes.md, 'Measurements behind the code's rules'). Groups
 * first get their keys (moe_rl_group_key) and ranks the same way. Weights
 * are moe_rl_score of the picks, summed in pick order into
 * moe_rl_finish_weights, as the host does.
 *   smem: logits [T][E] (staged), keys [T][E], group keys [T][G].
 */
/* Ranks beat the warp per token while the comparisons are few; they lose
 * once a thread has many of them, and 64 comparisons per thread is about
 * where the two cross (measurements: bench/cuda_notes.md, 'Measurements
 * behind the code's rules'). */
#define CUDA_RANK_ROUTE_COMPARISONS (64 * CUDA_ALIGN_THREADS)
#define CUDA_RANK_ROUTE_MAX_GROUP_KEYS 1024

/* GROUPED = false compiles the group steps out (num_groups must be 1): the
 * decode route launch then holds less code to fetch. */
template <bool GROUPED>
__device__ void route_tokens_by_rank(const moe_rl_params &rl, const float *logits,
                                     const float *bias, int T, float *keys, float *group_keys,
                                     int32_t *ids, float *weights) {
  __shared__ moe_rl_row rows[CUDA_RANK_ROUTE_MAX_TOKENS];
  __shared__ unsigned long long allowed[CUDA_RANK_ROUTE_MAX_TOKENS];
  const int E = rl.num_experts, k = rl.top_k, G = GROUPED ? rl.num_groups : 1;
  const int group_size = E / G;
  const int tid = threadIdx.x, threads = blockDim.x, warp = tid >> 5, lane = tid & 31;
#pragma unroll 1
  for (int t = warp; t < T; t += threads >> 5) {
    const moe_rl_row row = warp_row_stats(logits + t * E, rl);
    if (lane == 0) {
      rows[t] = row;
      allowed[t] = G > 1 ? 0ull : ~0ull;
    }
  }
#pragma unroll 1
  for (int i = tid; i < T * k; i += threads) {
    ids[i] = -1;
    weights[i] = 0.0f;
  }
  __syncthreads();
#pragma unroll 1
  for (int i = tid; i < T * E; i += threads)
    keys[i] = moe_rl_key(logits + i / E * E, bias, i % E, rows[i / E], &rl);
#pragma unroll 1
  for (int i = tid; GROUPED && G > 1 && i < T * G; i += threads)
    group_keys[i] = moe_rl_group_key(logits + i / G * E, bias, i % G, group_size, rows[i / G], &rl);
  __syncthreads();
#pragma unroll 1
  for (int i = tid; GROUPED && G > 1 && i < T * G; i += threads) {
    const float *gk = group_keys + i / G * G;
    int rank = 0;
#pragma unroll 1
    for (int g = 0; g < G; ++g)
      rank += moe_rl_better(gk[g], g, group_keys[i], i % G);
    if (rank < rl.topk_groups) atomicOr(&allowed[i / G], 1ull << (i % G));
  }
  __syncthreads();
  /* S lanes share one (token, expert): each counts E / S rivals, then the
   * S partial counts meet in a butterfly inside the S-lane group. */
  int S = 32;
  while (S > 1 && (threads / S) < T * E)
    S >>= 1;
  const int items = T * E, per_round = threads / S, rounds = (items + per_round - 1) / per_round;
#pragma unroll 1
  for (int round = 0; round < rounds; ++round) { /* uniform trip count: full-warp shuffles */
    const int item = round * per_round + tid / S;
    const bool valid = item < items;
    const int t = valid ? item / E : 0, e = item % E;
    const unsigned long long mask = allowed[t];
    const float *tk = keys + t * E;
    int count = 0;
#pragma unroll 1
    for (int rival = tid % S; valid && rival < E; rival += S)
      count += (!GROUPED || ((mask >> (rival / group_size)) & 1ull)) &&
               moe_rl_better(tk[rival], rival, tk[e], e);
    for (int offset = S / 2; offset > 0; offset >>= 1)
      count += __shfl_xor_sync(0xffffffffu, count, offset);
    if (valid && tid % S == 0 && (!GROUPED || ((mask >> (e / group_size)) & 1ull)) && count < k) {
      ids[t * k + count] = e;
      weights[t * k + count] = moe_rl_score(logits[t * E + e], rows[t], &rl);
    }
  }
  __syncthreads();
#pragma unroll 1
  for (int t = tid; t < T; t += threads) {
    float sum = 0.0f;
#pragma unroll 1
    for (int j = 0; j < k; ++j)
      sum += weights[t * k + j];
    moe_rl_finish_weights(weights + t * k, sum, &rl);
  }
}

/* Whether route_tokens_by_rank takes T tokens (its comparisons stay a few
 * hundred per thread, its shared memory under 48 KB). */
static bool rank_routing_fits(int64_t T, int32_t E, int32_t G) {
  return T <= CUDA_RANK_ROUTE_MAX_TOKENS && T * E <= CUDA_ROUTE_STAGE_FLOATS / 2 &&
         T * E * E <= CUDA_RANK_ROUTE_COMPARISONS && T * G <= CUDA_RANK_ROUTE_MAX_GROUP_KEYS;
}

/* Rank routing alone: block b routes tokens [b tpb, (b + 1) tpb) of
 * num_tokens (one block for few tokens; many with cuda.routing=rank). */
template <int SHAPE>
__global__ void __launch_bounds__(CUDA_ALIGN_THREADS)
    route_rank_kernel(moe_rl_params params, const float *logits, const float *bias,
                      int64_t num_tokens, int32_t tokens_per_block, int32_t *ids, float *weights) {
  constexpr bool GROUPED = SHAPE == ROUTE_GROUPED;
  const moe_rl_params rl = shaped_params<SHAPE>(params);
  extern __shared__ float staged[];
  cuda_allow_dependents(); /* the decode path's GEMM1 may stage x meanwhile */
  const int64_t first = (int64_t)blockIdx.x * tokens_per_block;
  const int T = (int)min((int64_t)tokens_per_block, num_tokens - first);
  const int64_t E = rl.num_experts;
  const float *src = logits + first * E;
  const int floats = T * rl.num_experts;
#pragma unroll 1
  for (int i = threadIdx.x; i < floats; i += blockDim.x)
    staged[i] = src[i];
  __syncthreads();
  route_tokens_by_rank<GROUPED>(rl, staged, bias, T, staged + floats, staged + 2 * floats,
                                ids + first * rl.top_k, weights + first * rl.top_k);
}

/* The routing a one-block launch does before align. Each is its own
 * instance of the kernel, so that a decode step's launch holds only the code
 * it runs: this kernel is latency-bound, and with the L2 cold (as in a
 * model, where other layers ran in between) its instructions come from DRAM
 * miss by miss. While one instance held all three routings, its code read
 * from DRAM was many times its data (measurements: bench/cuda_notes.md,
 * 'Measurements behind the code's rules'). */
enum fused_route { FUSED_NONE, FUSED_RANK, FUSED_WARP, FUSED_REFERENCE };

/*
 * The whole metadata pipeline in one block: optional routing (by ranks, or
 * a warp per token; logits staged in shared memory when they fit), then
 * count, layout and the block's stable placement.
 */
template <fused_route ROUTE>
__global__ void __launch_bounds__(CUDA_ALIGN_THREADS)
    route_align_one_block_kernel(align_params p, moe_rl_params rl, const float *logits,
                                 const float *bias, int32_t num_tokens, float *topk_weights,
                                 bool stage_logits) {
  extern __shared__ float staged_logits[];
  __shared__ int count[MOE_MAX_EXPERTS];
  __shared__ int64_t start[MOE_MAX_EXPERTS + 1];
  cuda_allow_dependents(); /* GEMM1 may get resident; it waits for us */

  if (ROUTE != FUSED_NONE) {
    const float *src = logits;
    if (stage_logits) {
#pragma unroll 1
      for (int i = threadIdx.x; i < num_tokens * rl.num_experts; i += blockDim.x)
        staged_logits[i] = logits[i];
      __syncthreads();
      src = staged_logits;
    }
    if (ROUTE == FUSED_RANK) {
      float *keys = staged_logits + num_tokens * rl.num_experts;
      route_tokens_by_rank<true>(rl, src, bias, num_tokens, keys,
                                 keys + num_tokens * rl.num_experts, (int32_t *)p.topk_ids,
                                 topk_weights);
    } else {
      route_tokens<ROUTE == FUSED_REFERENCE, 0>(rl, src, bias, threadIdx.x >> 5, blockDim.x >> 5,
                                                num_tokens, (int32_t *)p.topk_ids, topk_weights);
    }
    __syncthreads(); /* the ids written above are read below by other threads */
  }

#pragma unroll 1
  for (int e = threadIdx.x; e < p.num_local; e += blockDim.x)
    count[e] = 0;
  __syncthreads();
#pragma unroll 1
  for (int64_t s = threadIdx.x; s < p.num_slots; s += blockDim.x) {
    const int e = cuda_local_expert(p.topk_ids[s], p.expert_map, p.num_experts, p.num_local);
    if (e >= 0) atomicAdd(&count[e], 1);
  }
  __syncthreads();
  align_layout(p, count, start);
  /* The routing's staged logits are dead: the counters take their place. */
  align_place_block(p, 0, p.num_slots, start, (int32_t *)staged_logits);
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
    const int e = cuda_local_expert(p.topk_ids[s], p.expert_map, p.num_experts, p.num_local);
    if (e >= 0) atomicAdd(&count[e], 1);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < p.num_local; e += blockDim.x)
    counts[(int64_t)blockIdx.x * p.num_local + e] = count[e];
}

/* Step 2 (one block): the layout (expert_ids, padding, num_tokens_post_
 * padded) and starts[chunk][e], where chunk's slots of expert e begin.
 * counts and starts are distinct arrays, so the loads of one pass do not
 * wait for the stores of the other. */
__global__ void __launch_bounds__(CUDA_ALIGN_THREADS)
    align_scan_kernel(align_params p, int64_t num_chunks, const int32_t *__restrict__ counts,
                      int32_t *__restrict__ starts) {
  __shared__ int count[MOE_MAX_EXPERTS];
  __shared__ int64_t start[MOE_MAX_EXPERTS + 1];
  /* One thread per expert walks the chunks; unrolled, so that 8 loads are
   * in flight at a time instead of one round trip per chunk (16.6 us for 32
   * chunks on an H200 under ncu, bench/cuda_notes.md item 21). */
  for (int e = threadIdx.x; e < p.num_local; e += blockDim.x) {
    int total = 0; /* slots per expert fit int32: reserve bounds T*k */
#pragma unroll 8
    for (int64_t c = 0; c < num_chunks; ++c)
      total += counts[c * p.num_local + e];
    count[e] = total;
  }
  __syncthreads();
  align_layout(p, count, start);
  for (int e = threadIdx.x; e < p.num_local; e += blockDim.x) {
    int64_t running = start[e];
#pragma unroll 8
    for (int64_t c = 0; c < num_chunks; ++c) {
      starts[c * p.num_local + e] = (int32_t)running;
      running += counts[c * p.num_local + e];
    }
  }
}

/* Step 3: a block per chunk places its slots from the chunk's starts. */
__global__ void __launch_bounds__(CUDA_ALIGN_THREADS)
    align_place_kernel(align_params p, int64_t chunk, const int32_t *starts) {
  extern __shared__ int32_t place_hist[];
  cuda_allow_dependents(); /* GEMM1 may get resident; it waits for us */
  const int64_t begin = blockIdx.x * chunk;
  align_place_block(p, begin, min(begin + chunk, p.num_slots),
                    starts + (int64_t)blockIdx.x * p.num_local, place_hist);
}

/* ---- launchers ---------------------------------------------------------- */

/* Shared memory of align_place_block's counters for a range of slots. */
static size_t place_hist_bytes(int64_t slots, int32_t num_local) {
  return (size_t)align_place_warps(slots, num_local, CUDA_ALIGN_THREADS / 32) * num_local *
         sizeof(int32_t);
}

static void align_chunking(int64_t num_slots, int64_t *chunk, int64_t *num_chunks) {
  int64_t c = CUDA_ALIGN_CHUNK_MIN;
  while ((num_slots + c - 1) / c > CUDA_ALIGN_MAX_CHUNKS)
    c *= 2;
  *chunk = c;
  *num_chunks = (num_slots + c - 1) / c;
}

int64_t cuda_align_scratch_elems(int64_t num_slots, int32_t num_local_experts) {
  /* counts and starts; monotone in num_slots, so a reservation covers less. */
  int64_t chunks = (num_slots + CUDA_ALIGN_CHUNK_MIN - 1) / CUDA_ALIGN_CHUNK_MIN;
  if (chunks > CUDA_ALIGN_MAX_CHUNKS) chunks = CUDA_ALIGN_MAX_CHUNKS;
  return 2 * chunks * num_local_experts;
}

/* Option cuda.routing: reference runs moe_rl_route_token itself, warp the
 * warp per token where the rank routing would run (so that a test can
 * compare them in one process), rank the rank routing on many blocks of a
 * few tokens each wherever one token fits it (E <= 256), for any T. */
enum routing_kind { ROUTING_DEFAULT, ROUTING_WARP, ROUTING_REFERENCE, ROUTING_RANK };
static routing_kind routing_of(const cuda_state *st) {
  if (st->routing_option == MOE_CUDA_ROUTING_REFERENCE) return ROUTING_REFERENCE;
  if (st->routing_option == MOE_CUDA_ROUTING_WARP) return ROUTING_WARP;
  if (st->routing_option == MOE_CUDA_ROUTING_RANK) return ROUTING_RANK;
  return ROUTING_DEFAULT;
}

/* Shared memory of the rank routing of T tokens: logits, keys, group keys. */
static size_t rank_routing_smem(int64_t T, int32_t E, int32_t G) {
  return (size_t)(2 * T * E + T * G) * sizeof(float);
}

moe_status cuda_route(const cuda_state *st, const moe_route_args *args) {
  const moe_rl_params rl = moe_rl_params_from_args(args);
  const routing_kind kind = routing_of(st);
  const int64_t T = args->num_tokens;
  /* Tokens per block of the rank routing: all of them in one block where
   * they fit (the default for few tokens), else (cuda.routing=rank, or by
   * default up to the tuning row's rank_routing_max_tokens) as many as fit
   * one block, on as many blocks as it takes. */
  int64_t per_block = 0;
  if (kind == ROUTING_DEFAULT && rank_routing_fits(T, args->num_experts, rl.num_groups))
    per_block = T;
  else if (kind == ROUTING_RANK ||
           (kind == ROUTING_DEFAULT && T <= st->tuning->rank_routing_max_tokens))
    while (per_block < T && rank_routing_fits(per_block + 1, args->num_experts, rl.num_groups))
      ++per_block;
  if (per_block > 0) {
    const int64_t blocks = (T + per_block - 1) / per_block;
    if (blocks > INT32_MAX) return moe_set_error(MOE_ERROR_UNSUPPORTED, "too many tokens to route");
    typedef void (*rank_fn)(moe_rl_params, const float *, const float *, int64_t, int32_t,
                            int32_t *, float *);
    static const rank_fn rank_kernels[3] = {route_rank_kernel<ROUTE_PLAIN>,
                                            route_rank_kernel<ROUTE_UNGROUPED>,
                                            route_rank_kernel<ROUTE_GROUPED>};
    rank_kernels[route_shape_of(
        rl)]<<<(unsigned)blocks, CUDA_ALIGN_THREADS,
               rank_routing_smem(per_block, args->num_experts, rl.num_groups), st->stream>>>(
        rl, (const float *)args->logits, (const float *)args->correction_bias, T,
        (int32_t)per_block, (int32_t *)args->topk_ids, (float *)args->topk_weights);
    return cuda_launch_status("route_rank_kernel");
  }
  const bool reference = kind == ROUTING_REFERENCE;
  const int threads = 128, tokens_per_block = reference ? threads : threads / 32;
  int64_t blocks = (args->num_tokens + tokens_per_block - 1) / tokens_per_block;
  if (blocks > 65536) blocks = 65536;
  typedef void (*route_fn)(moe_rl_params, const float *, const float *, int64_t, int32_t *,
                           float *);
  /* [lane keys 4, 8, 0][shape] */
  static const route_fn warp_kernels[3][3] = {
      {route_kernel<false, 4, ROUTE_PLAIN>, route_kernel<false, 4, ROUTE_UNGROUPED>,
       route_kernel<false, 4, ROUTE_GROUPED>},
      {route_kernel<false, 8, ROUTE_PLAIN>, route_kernel<false, 8, ROUTE_UNGROUPED>,
       route_kernel<false, 8, ROUTE_GROUPED>},
      {route_kernel<false, 0, ROUTE_PLAIN>, route_kernel<false, 0, ROUTE_UNGROUPED>,
       route_kernel<false, 0, ROUTE_GROUPED>}};
  const int32_t E = args->num_experts;
  const int keys = E <= 32 * 4 ? 0 : E <= 32 * CUDA_ROUTE_LANE_KEYS ? 1 : 2;
  static_assert(CUDA_ROUTE_LANE_KEYS == 8, "the instances above");
  (reference
       ? route_kernel<true, 0, ROUTE_GROUPED>
       : warp_kernels[keys][route_shape_of(rl)])<<<(unsigned)blocks, threads, 0, st->stream>>>(
      rl, (const float *)args->logits, (const float *)args->correction_bias, args->num_tokens,
      (int32_t *)args->topk_ids, (float *)args->topk_weights);
  return cuda_launch_status("route_kernel");
}

moe_status cuda_route_align(const cuda_state *st, const moe_route_args *route,
                            const moe_align_args *align, int32_t *scratch) {
  const align_params p = align_params_from(align);
  if (p.num_slots <= CUDA_ALIGN_ONE_BLOCK_SLOTS) {
    const bool fuse = route && route->num_tokens <= CUDA_FUSED_ROUTE_TOKENS;
    const routing_kind kind = routing_of(st);
    if (route && !fuse) CUDA_TRY(cuda_route(st, route));
    moe_rl_params rl;
    memset(&rl, 0, sizeof rl);
    size_t stage_bytes = 0;
    bool by_rank = false;
    if (fuse) {
      rl = moe_rl_params_from_args(route);
      const int64_t floats = route->num_tokens * route->num_experts;
      if (floats <= CUDA_ROUTE_STAGE_FLOATS) stage_bytes = (size_t)floats * sizeof(float);
      by_rank = (kind == ROUTING_DEFAULT || kind == ROUTING_RANK) &&
                rank_routing_fits(route->num_tokens, route->num_experts, rl.num_groups);
      if (by_rank)
        stage_bytes = rank_routing_smem(route->num_tokens, route->num_experts, rl.num_groups);
    }
    const float *logits = fuse ? (const float *)route->logits : NULL;
    const float *bias = fuse ? (const float *)route->correction_bias : NULL;
    float *weights = fuse ? (float *)route->topk_weights : NULL;
    const int32_t T = (int32_t)align->num_tokens;
    const bool staged = stage_bytes > 0;
    /* The placement's counters reuse the staged logits' shared memory:
     * at most 32 KB of logits + 24 KB of counters' max + 14 KB static. */
    const size_t hist_bytes = place_hist_bytes(p.num_slots, p.num_local);
    const size_t smem = stage_bytes > hist_bytes ? stage_bytes : hist_bytes;
    if (!fuse)
      route_align_one_block_kernel<FUSED_NONE>
          <<<1, CUDA_ALIGN_THREADS, smem, st->stream>>>(p, rl, logits, bias, T, weights, false);
    else if (by_rank)
      route_align_one_block_kernel<FUSED_RANK>
          <<<1, CUDA_ALIGN_THREADS, smem, st->stream>>>(p, rl, logits, bias, T, weights, staged);
    else if (kind == ROUTING_REFERENCE)
      route_align_one_block_kernel<FUSED_REFERENCE>
          <<<1, CUDA_ALIGN_THREADS, smem, st->stream>>>(p, rl, logits, bias, T, weights, staged);
    else
      route_align_one_block_kernel<FUSED_WARP>
          <<<1, CUDA_ALIGN_THREADS, smem, st->stream>>>(p, rl, logits, bias, T, weights, staged);
    return cuda_launch_status("route_align_one_block_kernel");
  }
  if (route) CUDA_TRY(cuda_route(st, route));
  int64_t chunk, num_chunks;
  align_chunking(p.num_slots, &chunk, &num_chunks);
  int32_t *counts = scratch;
  if (!counts) {
    const size_t bytes = (size_t)cuda_align_scratch_elems(p.num_slots, p.num_local) * 4;
    CUDA_TRY(cuda_status(cudaMallocAsync((void **)&counts, bytes, st->stream),
                         "cudaMallocAsync of align scratch"));
  }
  int32_t *starts = counts + num_chunks * p.num_local;
  align_count_kernel<<<(unsigned)num_chunks, 256, 0, st->stream>>>(p, chunk, counts);
  moe_status status = cuda_launch_status("align_count_kernel");
  if (status == MOE_SUCCESS) {
    align_scan_kernel<<<1, CUDA_ALIGN_THREADS, 0, st->stream>>>(p, num_chunks, counts, starts);
    status = cuda_launch_status("align_scan_kernel");
  }
  if (status == MOE_SUCCESS) {
    align_place_kernel<<<(unsigned)num_chunks, CUDA_ALIGN_THREADS,
                         place_hist_bytes(chunk, p.num_local), st->stream>>>(p, chunk, starts);
    status = cuda_launch_status("align_place_kernel");
  }
  if (!scratch) {
    moe_status freed = cuda_status(cudaFreeAsync(counts, st->stream), "cudaFreeAsync");
    if (status == MOE_SUCCESS) status = freed;
  }
  return status;
}
