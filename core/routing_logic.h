/*
 * routing_logic.h - the per-token routing rule, written once.
 *
 * Plain C with no host-only calls, so that the core (C), the CUDA backend
 * (included from .cu, functions become __host__ __device__) and the OpenCL
 * backend (embedded into the kernel source, pointers become __global) all
 * compile this same text. Nothing here allocates: the only state is a
 * small array of group flags, so a GPU thread can route one token alone.
 *
 * The rule (documented for users at moe_route in include/moe.h):
 *   score_e = softmax(logits)_e or sigmoid(logit_e); a NaN logit counts as
 *             -inf for softmax and has score 0; a row with no logit above
 *             -inf has all scores 0.
 *   key_e   = the logit when there is no correction bias and groups (if
 *             any) score by MAX, else score_e + bias_e; NaN for NaN logits.
 *   Ranking: higher key first, ties to the lower index, NaN below all.
 *   Groups:  with G > 1 groups of E/G experts, each group scores its best
 *            key (MAX) or the sum of its best two (TOP2_SUM); only experts
 *            of the topk_groups best groups can be chosen.
 *   Weights: the chosen experts' scores, renormalized to sum 1 when asked
 *            (a zero sum is left alone), times routed_scaling_factor.
 *
 * Compilation must keep IEEE semantics (no -ffast-math): NaN tests use
 * x != x.
 */
#ifndef MOE_ROUTING_LOGIC_H
#define MOE_ROUTING_LOGIC_H

#if defined(__OPENCL_VERSION__)
#define MOE_RL_FN static inline
#define MOE_RL_GLOBAL __global
#define MOE_RL_EXP(x) exp(x)
#elif defined(__CUDACC__)
#define MOE_RL_FN static inline __host__ __device__
#define MOE_RL_GLOBAL
#define MOE_RL_EXP(x) expf(x)
#include <math.h>
#else
#define MOE_RL_FN static inline
#define MOE_RL_GLOBAL
#define MOE_RL_EXP(x) expf(x)
#include <math.h>
#endif

/* Mirror MOE_MAX_GROUPS and MOE_MAX_TOP_K of moe.h (this header must not
 * include moe.h, as OpenCL C cannot). */
#define MOE_RL_MAX_GROUPS 64
#define MOE_RL_MAX_TOP_K 32

/* Per-layer routing parameters; plain ints so every compiler agrees. */
typedef struct moe_rl_params {
  int num_experts;
  int top_k;
  int scoring_sigmoid; /* 0: softmax, 1: sigmoid */
  int renormalize;
  int num_groups; /* >= 1; 1 means not grouped */
  int topk_groups;
  int group_top2_sum; /* 0: MAX, 1: TOP2_SUM */
  int has_bias;
  float scaling;
} moe_rl_params;

/* The parameters from their values, in field order: the one constructor of
 * the core (moe_rl_params_from_args) and of the OpenCL kernels (from their
 * scalar arguments). */
MOE_RL_FN moe_rl_params moe_rl_params_make(int num_experts, int top_k, int scoring_sigmoid,
                                           int renormalize, int num_groups, int topk_groups,
                                           int group_top2_sum, int has_bias, float scaling) {
  const moe_rl_params p = {num_experts, top_k,          scoring_sigmoid, renormalize, num_groups,
                           topk_groups, group_top2_sum, has_bias,        scaling};
  return p;
}

/* 1 when (ka, ia) ranks strictly above (kb, ib). */
MOE_RL_FN int moe_rl_better(float ka, int ia, float kb, int ib) {
  if (kb != kb) return (ka == ka) || ia < ib;
  if (ka != ka) return 0;
  return ka > kb || (ka == kb && ia < ib);
}

/* Softmax statistics of one row: the max over non-NaN logits and the sum
 * of exp(l - max). The max is -inf when no logit is above -inf. */
typedef struct moe_rl_row {
  float max;
  float inv_sum;
} moe_rl_row;

MOE_RL_FN moe_rl_row moe_rl_row_stats(const MOE_RL_GLOBAL float *logits, const moe_rl_params *p) {
  moe_rl_row row;
  row.max = -INFINITY;
  row.inv_sum = 0.0f;
  if (p->scoring_sigmoid) return row;
  for (int e = 0; e < p->num_experts; ++e)
    if (logits[e] > row.max) row.max = logits[e];
  if (row.max == -INFINITY) return row;
  float sum = 0.0f;
  for (int e = 0; e < p->num_experts; ++e) {
    float l = logits[e];
    if (l != l) continue;
    /* (l == max) keeps +inf - +inf from becoming NaN. */
    sum += MOE_RL_EXP(l == row.max ? 0.0f : l - row.max);
  }
  row.inv_sum = 1.0f / sum;
  return row;
}

MOE_RL_FN float moe_rl_score(float logit, moe_rl_row row, const moe_rl_params *p) {
  if (logit != logit) return 0.0f;
  if (p->scoring_sigmoid) return 1.0f / (1.0f + MOE_RL_EXP(-logit));
  if (row.max == -INFINITY) return 0.0f;
  return MOE_RL_EXP(logit == row.max ? 0.0f : logit - row.max) * row.inv_sum;
}

MOE_RL_FN float moe_rl_key(const MOE_RL_GLOBAL float *logits, const MOE_RL_GLOBAL float *bias,
                           int e, moe_rl_row row, const moe_rl_params *p) {
  float l = logits[e];
  if (l != l) return l;
  if (!p->has_bias && !(p->num_groups > 1 && p->group_top2_sum)) return l;
  return moe_rl_score(l, row, p) + (p->has_bias ? bias[e] : 0.0f);
}

/* The score of group g (experts [g*size, (g+1)*size)): its best key (MAX)
 * or the sum of its best two (TOP2_SUM); NaN when the best key is NaN. */
MOE_RL_FN float moe_rl_group_key(const MOE_RL_GLOBAL float *logits, const MOE_RL_GLOBAL float *bias,
                                 int g, int group_size, moe_rl_row row, const moe_rl_params *p) {
  float best = NAN, second = NAN;
  int best_e = -1, second_e = -1;
  for (int e = g * group_size; e < (g + 1) * group_size; ++e) {
    float key = moe_rl_key(logits, bias, e, row, p);
    if (best_e < 0 || moe_rl_better(key, e, best, best_e)) {
      second = best;
      second_e = best_e;
      best = key;
      best_e = e;
    } else if (second_e < 0 || moe_rl_better(key, e, second, second_e)) {
      second = key;
      second_e = e;
    }
  }
  return (p->group_top2_sum && second_e >= 0) ? best + second : best;
}

/* The last step of routing: weights[k] hold the chosen experts' scores,
 * summing to sum; renormalize when asked, then scale. (Also called by
 * device kernels that pick the experts in parallel.) */
MOE_RL_FN void moe_rl_finish_weights(MOE_RL_GLOBAL float *weights, float sum,
                                     const moe_rl_params *p) {
  /* Divide first: score / sum is at most 1, so the product stays finite,
   * whereas scaling / sum overflows for a large scaling or a sum of tiny
   * sigmoid scores (then inf, or NaN for a zero score). */
  int renormalize = p->renormalize && sum > 0.0f;
  for (int j = 0; j < p->top_k; ++j)
    weights[j] = (renormalize ? weights[j] / sum : weights[j]) * p->scaling;
}

/*
 * Routes one token: reads logits[E] (and bias[E] when p->has_bias), writes
 * ids[k] and weights[k] in rank order.
 */
MOE_RL_FN void moe_rl_route_token(const MOE_RL_GLOBAL float *logits,
                                  const MOE_RL_GLOBAL float *bias, const moe_rl_params *p,
                                  MOE_RL_GLOBAL int *ids, MOE_RL_GLOBAL float *weights) {
  moe_rl_row row = moe_rl_row_stats(logits, p);
  int group_size = p->num_experts / p->num_groups;
  unsigned char group_allowed[MOE_RL_MAX_GROUPS];

  if (p->num_groups > 1) {
    float group_key[MOE_RL_MAX_GROUPS];
    for (int g = 0; g < p->num_groups; ++g) {
      group_key[g] = moe_rl_group_key(logits, bias, g, group_size, row, p);
      group_allowed[g] = 0;
    }
    for (int pick = 0; pick < p->topk_groups; ++pick) {
      int best_g = -1;
      for (int g = 0; g < p->num_groups; ++g)
        if (!group_allowed[g] &&
            (best_g < 0 || moe_rl_better(group_key[g], g, group_key[best_g], best_g)))
          best_g = g;
      group_allowed[best_g] = 1;
    }
  } else {
    group_allowed[0] = 1;
  }

  /* One pass over the allowed experts, in ascending order, keeps the best
   * top_k so far in rank order (an insertion list). moe_rl_better is a
   * strict total order, so the list ends as the k picks, each the best
   * expert ranked strictly below the one before: the same picks as k
   * argmax passes; route+align took 1/2 to 1/3.8 of the time at 128
   * experts, top 8, 16-4096 tokens on 2 threads (bench/results.md, "Host
   * routing in one pass"). Config validation guarantees top_k allowed
   * experts. */
  float top_key[MOE_RL_MAX_TOP_K];
  int top_e[MOE_RL_MAX_TOP_K];
  int count = 0;
  for (int g = 0; g < p->num_groups; ++g) {
    if (!group_allowed[g]) continue;
    for (int e = g * group_size; e < (g + 1) * group_size; ++e) {
      float key = moe_rl_key(logits, bias, e, row, p);
      if (count == p->top_k && !moe_rl_better(key, e, top_key[count - 1], top_e[count - 1]))
        continue;
      int pos = count < p->top_k ? count++ : count - 1;
      for (; pos > 0 && moe_rl_better(key, e, top_key[pos - 1], top_e[pos - 1]); --pos) {
        top_key[pos] = top_key[pos - 1];
        top_e[pos] = top_e[pos - 1];
      }
      top_key[pos] = key;
      top_e[pos] = e;
    }
  }
  /* Weights in rank order, so the sum's order is the rule's. */
  float sum = 0.0f;
  for (int j = 0; j < p->top_k; ++j) {
    ids[j] = top_e[j];
    float w = moe_rl_score(logits[top_e[j]], row, p);
    weights[j] = w;
    sum += w;
  }

  moe_rl_finish_weights(weights, sum, p);
}

#endif /* MOE_ROUTING_LOGIC_H */
