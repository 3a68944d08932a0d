/*
 * route_align.cl - routing and align on the device, so that a forward never
 * waits for the host.
 *
 * moe_route: one work-item per token runs moe_rl_route_token, the rule of
 * core/routing_logic.h (embedded above this file), exactly as the core does.
 * moe_route_parallel: the same rule, one work-group per token (ungrouped).
 *
 * moe_align: one work-group of MOE_ALIGN_WG work-items writes the bytes of
 * moe_align_host (core/align.c): a counting sort whose runs keep ascending
 * slot order. Slots are scattered in chunks of MOE_ALIGN_WG; a slot's place
 * in its run is the cursor of its expert plus the number of earlier slots of
 * the same expert in the chunk, so the order never depends on timing.
 */

/* restrict: the rule reads a token's logits several times (softmax
 * statistics, keys, scores); read-only loads let them stay in the
 * first-level cache (measured 15x faster for E = 128 when the picks were
 * k passes over them). */
__kernel void moe_route(int num_tokens, __global const float *restrict logits,
                        __global const float *restrict correction_bias, __global int *topk_ids,
                        __global float *topk_weights, int num_experts, int top_k,
                        int scoring_sigmoid, int renormalize, int num_groups, int topk_groups,
                        int group_top2_sum, float routed_scaling_factor) {
  int t = get_global_id(0);
  if (t >= num_tokens) return;
  const moe_rl_params p =
      moe_rl_params_make(num_experts, top_k, scoring_sigmoid, renormalize, num_groups, topk_groups,
                         group_top2_sum, correction_bias != 0, routed_scaling_factor);
  moe_rl_route_token(logits + (long)t * num_experts, correction_bias, &p,
                     topk_ids + (long)t * top_k, topk_weights + (long)t * top_k);
}

#define MOE_ROUTE_WG 128
#define MOE_ROUTE_MAX_EXPERTS 1024 /* MOE_MAX_EXPERTS of moe.h */

/* (key, index) a ranks above b; index -1 means "none" and ranks last. */
inline int moe_route_above(float ka, int ia, float kb, int ib) {
  if (ia < 0) return 0;
  if (ib < 0) return 1;
  return moe_rl_better(ka, ia, kb, ib);
}

/*
 * moe_route_parallel: ungrouped routing with one work-group per token, for
 * many experts (a single work-item walks k * E keys one after another;
 * measurements: bench/opencl_notes.md, 'Measurements behind the code's
 * rules'). The same rule from the same shared functions: keys by
 * moe_rl_key, ranks by moe_rl_better (a strict order, so the j-th pick is
 * the j-th of the order, as in moe_rl_route_token), weights by
 * moe_rl_score and moe_rl_finish_weights.
 * Each of the k picks is an argmax over the experts not yet taken: a strided
 * scan per work-item, then a tree over the work-group.
 */
__kernel __attribute__((reqd_work_group_size(MOE_ROUTE_WG, 1, 1))) void
moe_route_parallel(int num_tokens, __global const float *restrict logits,
                   __global const float *restrict correction_bias, __global int *topk_ids,
                   __global float *topk_weights, int num_experts, int top_k, int scoring_sigmoid,
                   int renormalize, int num_groups, int topk_groups, int group_top2_sum,
                   float routed_scaling_factor) {
  __local float keys[MOE_ROUTE_MAX_EXPERTS];
  __local uchar taken[MOE_ROUTE_MAX_EXPERTS];
  __local float best_key[MOE_ROUTE_WG];
  __local int best_index[MOE_ROUTE_WG];
  /* No early return: the host launches exactly one work-group per token, and
   * PoCL (5.x) mis-scheduled the regions between barriers after one (the
   * final block ran on every work-item). */
  const int t = get_group_id(0), lid = get_local_id(0);
  const moe_rl_params p =
      moe_rl_params_make(num_experts, top_k, scoring_sigmoid, renormalize, num_groups, topk_groups,
                         group_top2_sum, correction_bias != 0, routed_scaling_factor);
  __global const float *row_logits = logits + (long)t * num_experts;
  const moe_rl_row row = moe_rl_row_stats(row_logits, &p);
  for (int e = lid; e < num_experts; e += MOE_ROUTE_WG) {
    keys[e] = moe_rl_key(row_logits, correction_bias, e, row, &p);
    taken[e] = 0;
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  __global int *ids = topk_ids + (long)t * top_k;
  __global float *weights = topk_weights + (long)t * top_k;
  for (int j = 0; j < top_k; ++j) {
    float k_best = 0.0f;
    int i_best = -1;
    for (int e = lid; e < num_experts; e += MOE_ROUTE_WG)
      if (!taken[e] && moe_route_above(keys[e], e, k_best, i_best)) {
        k_best = keys[e];
        i_best = e;
      }
    best_key[lid] = k_best;
    best_index[lid] = i_best;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int stride = MOE_ROUTE_WG / 2; stride > 0; stride /= 2) {
      if (lid < stride && moe_route_above(best_key[lid + stride], best_index[lid + stride],
                                          best_key[lid], best_index[lid])) {
        best_key[lid] = best_key[lid + stride];
        best_index[lid] = best_index[lid + stride];
      }
      barrier(CLK_LOCAL_MEM_FENCE);
    }
    const int pick = best_index[0];
    if (lid == 0) {
      taken[pick] = 1;
      ids[j] = pick;
      weights[j] = moe_rl_score(row_logits[pick], row, &p);
    }
    barrier(CLK_LOCAL_MEM_FENCE);
  }
  if (lid == 0) {
    /* The sum in pick order, as moe_rl_route_token adds it. */
    float sum = 0.0f;
    for (int j = 0; j < top_k; ++j)
      sum += weights[j];
    moe_rl_finish_weights(weights, sum, &p);
  }
}

#define MOE_ALIGN_WG 256
#define MOE_ALIGN_MAX_EXPERTS 1024 /* MOE_MAX_EXPERTS of moe.h */

/* The local expert of a slot's id, or -1 when align skips it (as core/align.c). */
inline int moe_local_expert(int id, __global const int *expert_map, int num_experts,
                            int num_local_experts) {
  if (expert_map) {
    if (id < 0 || id >= num_experts) return -1;
    id = expert_map[id];
  }
  return (id >= 0 && id < num_local_experts) ? id : -1;
}

__kernel __attribute__((reqd_work_group_size(MOE_ALIGN_WG, 1, 1))) void
moe_align(int num_slots, __global const int *topk_ids, __global const int *expert_map,
          int num_experts, int num_local_experts, int block_m, int sorted_capacity,
          int block_capacity, __global int *sorted_token_ids, __global int *expert_ids,
          __global int *num_tokens_post_padded) {
  __local int run_start[MOE_ALIGN_MAX_EXPERTS + 1];
  __local int cursor[MOE_ALIGN_MAX_EXPERTS];
  __local int chunk_expert[MOE_ALIGN_WG];
  const int lid = get_local_id(0);
  const int EL = num_local_experts;

  for (int e = lid; e < EL; e += MOE_ALIGN_WG)
    cursor[e] = 0;
  barrier(CLK_LOCAL_MEM_FENCE);
  for (int s = lid; s < num_slots; s += MOE_ALIGN_WG) {
    int e = moe_local_expert(topk_ids[s], expert_map, num_experts, EL);
    if (e >= 0) atomic_inc(&cursor[e]);
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  if (lid == 0) {
    int start = 0;
    for (int e = 0; e < EL; ++e) {
      run_start[e] = start;
      start += (cursor[e] + block_m - 1) / block_m * block_m;
    }
    run_start[EL] = start;
    *num_tokens_post_padded = start;
  }
  barrier(CLK_LOCAL_MEM_FENCE);
  const int padded = run_start[EL];
  for (int e = lid; e < EL; e += MOE_ALIGN_WG)
    cursor[e] = run_start[e];

  /* A block's owner is the last expert whose run starts at or before it
   * (empty runs share their start with the next expert). */
  for (int b = lid; b < block_capacity; b += MOE_ALIGN_WG) {
    int pos = b * block_m, owner = -1;
    if (pos < padded) {
      int lo = 0, hi = EL - 1;
      while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (run_start[mid] <= pos)
          lo = mid;
        else
          hi = mid - 1;
      }
      owner = lo;
    }
    expert_ids[b] = owner;
  }
  for (int i = lid; i < sorted_capacity; i += MOE_ALIGN_WG)
    sorted_token_ids[i] = num_slots;
  barrier(CLK_LOCAL_MEM_FENCE | CLK_GLOBAL_MEM_FENCE);

  for (int base = 0; base < num_slots; base += MOE_ALIGN_WG) {
    int s = base + lid;
    int e = s < num_slots ? moe_local_expert(topk_ids[s], expert_map, num_experts, EL) : -1;
    chunk_expert[lid] = e;
    barrier(CLK_LOCAL_MEM_FENCE);
    if (e >= 0) {
      int rank = 0;
      for (int j = 0; j < lid; ++j)
        rank += chunk_expert[j] == e;
      sorted_token_ids[cursor[e] + rank] = s;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    if (e >= 0) atomic_inc(&cursor[e]);
    barrier(CLK_LOCAL_MEM_FENCE);
  }
}
