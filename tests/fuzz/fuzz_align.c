/*
 * fuzz_align.c - libFuzzer target moe_fuzz_align: routing and align on
 * arbitrary data, checked against the contract of include/moe.h.
 *
 * Every input is a valid call (invalid arguments are moe_fuzz_api's job),
 * so each must succeed and its result must obey the documented rules:
 *   align: every slot whose local expert is in [0, EL) appears exactly once,
 *          in its expert's run, runs in expert order, slots ascending;
 *          runs padded to block_m with the sentinel T*k; expert_ids names
 *          the owner of each block and is -1 past num_tokens_post_padded;
 *          the capacity tail holds the sentinel; nothing past the capacity
 *          is written; and the bytes equal ref_align (tests/reference.c).
 *   route: ids in [0, E), distinct per token, from at most topk_groups
 *          groups; without correction bias (and with MAX group scoring)
 *          the documented ranking of logits exactly; weights finite, of the
 *          sign of routed_scaling_factor and at most its size, summing to
 *          it when renormalized; 0 for rows with no logit above -inf.
 * Input layout: one byte picks route, align or both in a row; then the
 * sizes, then the data (see decode_* below).
 */
#include "fuzz_common.h"

#ifdef MOE_FUZZ_HAVE_REFERENCE
#include "reference.h"
#endif

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TOKENS 512
#define MAX_SLOTS (MAX_TOKENS * 8)

static moe_context *ctx;

/* ---- Align ------------------------------------------------------------ */

typedef struct align_case {
  int64_t num_tokens;
  int32_t top_k, num_experts, num_local_experts, block_m;
  const int32_t *topk_ids;   /* [T*k] */
  const int32_t *expert_map; /* [E] or NULL */
} align_case;

/* The local expert of a slot by the documented rule, -1 when skipped. */
static int32_t local_expert(const align_case *c, int64_t slot) {
  int32_t id = c->topk_ids[slot];
  if (c->expert_map) {
    if (id < 0 || id >= c->num_experts) return -1;
    id = c->expert_map[id];
  }
  return id >= 0 && id < c->num_local_experts ? id : -1;
}

static void check_align(const align_case *c) {
  const int64_t slots = c->num_tokens * c->top_k;
  const int32_t BM = c->block_m, EL = c->num_local_experts;
  const int32_t sentinel = (int32_t)slots;

  int64_t sorted_capacity, block_capacity;
  moe_status st =
      moe_align_capacity(c->num_tokens, c->top_k, EL, BM, &sorted_capacity, &block_capacity);
  fuzz_check_status("moe_align_capacity", st, NULL, false, true);
  FUZZ_CHECK(sorted_capacity == slots + (int64_t)EL * (BM - 1) &&
                 block_capacity == (sorted_capacity + BM - 1) / BM,
             "moe_align_capacity(T=%lld, k=%d, EL=%d, BM=%d) = %lld, %lld",
             (long long)c->num_tokens, c->top_k, EL, BM, (long long)sorted_capacity,
             (long long)block_capacity);

  /* Outputs sometimes larger than needed, to catch writes past the end. */
  const bool larger = (c->num_tokens + c->top_k + BM) % 3 == 0;
  const fuzz_buffer_mode out_mode = larger ? FUZZ_BUFFER_LARGER : FUZZ_BUFFER_EXACT;
  fuzz_buffer ids, map, sorted, blocks, post;
  fuzz_buffer_make_mode(&ids, FUZZ_BUFFER_EXACT, ctx, ctx, (size_t)slots * 4, false, c->topk_ids,
                        (size_t)slots * 4);
  fuzz_buffer_make_mode(&map, c->expert_map ? FUZZ_BUFFER_EXACT : FUZZ_BUFFER_NULL, ctx, ctx,
                        (size_t)c->num_experts * 4, true, c->expert_map,
                        (size_t)c->num_experts * 4);
  fuzz_buffer_make_mode(&sorted, out_mode, ctx, ctx, (size_t)sorted_capacity * 4, false, NULL, 0);
  fuzz_buffer_make_mode(&blocks, out_mode, ctx, ctx, (size_t)block_capacity * 4, false, NULL, 0);
  fuzz_buffer_make_mode(&post, out_mode, ctx, ctx, 4, false, NULL, 0);

  fuzz_clear_errors(&ctx, 1);
  st = moe_align(ctx, c->num_tokens, c->top_k, c->num_experts, EL, BM, ids.buffer, map.buffer,
                 sorted.buffer, blocks.buffer, post.buffer);
  fuzz_check_status("moe_align", st, ctx, false, true);
  fuzz_buffer_expect_unchanged(&ids, 0, "moe_align", "topk_ids");
  fuzz_buffer_expect_unchanged(&map, 0, "moe_align", "expert_map");
  fuzz_buffer_expect_unchanged(&sorted, sorted.need, "moe_align", "sorted_token_ids");
  fuzz_buffer_expect_unchanged(&blocks, blocks.need, "moe_align", "expert_ids");
  fuzz_buffer_expect_unchanged(&post, post.need, "moe_align", "num_tokens_post_padded");

  int32_t *s = fuzz_buffer_contents(&sorted);
  int32_t *b = fuzz_buffer_contents(&blocks);
  int32_t *p = fuzz_buffer_contents(&post);
  const int32_t padded = *p;

  /* Expected counts and total padded length. */
  int64_t count[MOE_MAX_EXPERTS] = {0};
  for (int64_t i = 0; i < slots; ++i) {
    int32_t e = local_expert(c, i);
    if (e >= 0) count[e]++;
  }
  int64_t total = 0;
  for (int32_t e = 0; e < EL; ++e)
    total += (count[e] + BM - 1) / BM * BM;
  FUZZ_CHECK(padded == total, "num_tokens_post_padded = %d, expected %lld", padded,
             (long long)total);
  FUZZ_CHECK(padded % BM == 0 && padded <= sorted_capacity,
             "num_tokens_post_padded = %d is not a multiple of block_m = %d within capacity %lld",
             padded, BM, (long long)sorted_capacity);

  /* Walk the blocks: owners ascend, each expert owns ceil(c_e / BM)
   * blocks, its slots ascend and are its own, and padding (the sentinel)
   * only ends a run. */
  uint8_t *seen = calloc((size_t)slots + 1, 1);
  FUZZ_CHECK(seen, "out of host memory");
  int32_t run_expert = -1;
  int64_t run_blocks = 0, run_last_slot = -1;
  bool run_padding = false;
  for (int64_t block = 0; block < padded / BM; ++block) {
    int32_t e = b[block];
    FUZZ_CHECK(e >= 0 && e < EL, "expert_ids[%lld] = %d is not a local expert", (long long)block,
               e);
    if (e != run_expert) {
      FUZZ_CHECK(e > run_expert, "expert_ids[%lld] = %d after expert %d: runs not in order",
                 (long long)block, e, run_expert);
      FUZZ_CHECK(run_expert < 0 || run_blocks == (count[run_expert] + BM - 1) / BM,
                 "expert %d owns %lld blocks for %lld slots", run_expert, (long long)run_blocks,
                 (long long)count[run_expert]);
      run_expert = e;
      run_blocks = 0;
      run_last_slot = -1;
      run_padding = false;
    }
    run_blocks++;
    for (int64_t r = block * BM; r < (block + 1) * BM; ++r) {
      int32_t slot = s[r];
      if (slot == sentinel) {
        run_padding = true;
        continue;
      }
      FUZZ_CHECK(!run_padding, "sorted_token_ids[%lld] = %d follows padding in expert %d's run",
                 (long long)r, slot, e);
      FUZZ_CHECK(slot >= 0 && slot < slots, "sorted_token_ids[%lld] = %d is not a slot",
                 (long long)r, slot);
      FUZZ_CHECK(local_expert(c, slot) == e,
                 "sorted_token_ids[%lld] = slot %d (local expert %d) in a block of expert %d",
                 (long long)r, slot, local_expert(c, slot), e);
      FUZZ_CHECK(slot > run_last_slot, "slot %d after slot %lld in expert %d's run: not ascending",
                 slot, (long long)run_last_slot, e);
      FUZZ_CHECK(!seen[slot], "slot %d appears twice", slot);
      seen[slot] = 1;
      run_last_slot = slot;
    }
  }
  FUZZ_CHECK(run_expert < 0 || run_blocks == (count[run_expert] + BM - 1) / BM,
             "expert %d owns %lld blocks for %lld slots", run_expert, (long long)run_blocks,
             (long long)count[run_expert]);
  for (int64_t i = 0; i < slots; ++i)
    FUZZ_CHECK(seen[i] == (local_expert(c, i) >= 0), "slot %lld (local expert %d) appears %d times",
               (long long)i, local_expert(c, i), seen[i]);
  for (int64_t r = padded; r < sorted_capacity; ++r)
    FUZZ_CHECK(s[r] == sentinel, "sorted_token_ids[%lld] = %d past the end, not the sentinel %d",
               (long long)r, s[r], sentinel);
  for (int64_t block = padded / BM; block < block_capacity; ++block)
    FUZZ_CHECK(b[block] == -1, "expert_ids[%lld] = %d past the end, not -1", (long long)block,
               b[block]);

#ifdef MOE_FUZZ_HAVE_REFERENCE
  /* Bytes equal to the independent reference. */
  int32_t *ref_sorted = malloc((size_t)sorted_capacity * 4 + 4);
  int32_t *ref_blocks = malloc((size_t)block_capacity * 4 + 4);
  FUZZ_CHECK(ref_sorted && ref_blocks, "out of host memory");
  int32_t ref_padded = -1;
  ref_align(c->num_tokens, c->top_k, c->num_experts, EL, BM, c->topk_ids, c->expert_map, ref_sorted,
            ref_blocks, &ref_padded);
  FUZZ_CHECK(ref_padded == padded, "num_tokens_post_padded %d, ref_align %d", padded, ref_padded);
  FUZZ_CHECK(memcmp(ref_sorted, s, (size_t)sorted_capacity * 4) == 0,
             "sorted_token_ids differs from ref_align");
  FUZZ_CHECK(memcmp(ref_blocks, b, (size_t)block_capacity * 4) == 0,
             "expert_ids differs from ref_align");
  free(ref_sorted);
  free(ref_blocks);
#endif

  free(seen);
  free(s);
  free(b);
  free(p);
  fuzz_buffer_free(&ids);
  fuzz_buffer_free(&map);
  fuzz_buffer_free(&sorted);
  fuzz_buffer_free(&blocks);
  fuzz_buffer_free(&post);
}

/* An expert count: mostly small, sometimes up to MOE_MAX_EXPERTS. */
static int32_t decode_experts(fuzz_input *in) {
  return fuzz_bool(in) ? (int32_t)fuzz_range(in, 1, 16)
                       : (int32_t)fuzz_range(in, 1, MOE_MAX_EXPERTS);
}

/* Sizes, then the expert map (entries -1, local, or out of range), then
 * the ids (mostly in [-1, E], sometimes any int32). */
static void decode_align(fuzz_input *in, const int32_t *routed_ids, int64_t routed_tokens,
                         int32_t routed_k, int32_t routed_experts) {
  align_case c;
  static int32_t ids[MAX_SLOTS], map[MOE_MAX_EXPERTS];
  if (routed_ids) {
    c.num_tokens = routed_tokens;
    c.top_k = routed_k;
    c.num_experts = routed_experts;
  } else {
    c.num_tokens = fuzz_bool(in) ? fuzz_range(in, 0, 16) : fuzz_range(in, 0, MAX_TOKENS);
    c.top_k = (int32_t)fuzz_range(in, 1, MOE_MAX_TOP_K);
    if (c.num_tokens * c.top_k > MAX_SLOTS) c.num_tokens = MAX_SLOTS / c.top_k;
    c.num_experts = decode_experts(in);
  }
  c.block_m = 1 << fuzz_range(in, 0, 8);
  const bool mapped = fuzz_bool(in);
  c.num_local_experts = mapped ? decode_experts(in) : c.num_experts;
  c.expert_map = NULL;
  if (mapped) {
    for (int32_t e = 0; e < c.num_experts; ++e) {
      uint8_t mode = fuzz_u8(in);
      map[e] =
          mode < 200 ? (int32_t)fuzz_range(in, -2, c.num_local_experts) : (int32_t)fuzz_u32(in);
    }
    c.expert_map = map;
  }
  if (routed_ids) {
    c.topk_ids = routed_ids;
  } else {
    for (int64_t i = 0; i < c.num_tokens * c.top_k; ++i) {
      uint8_t mode = fuzz_u8(in);
      ids[i] = mode < 224 ? (int32_t)fuzz_range(in, -1, c.num_experts) : (int32_t)fuzz_u32(in);
    }
    c.topk_ids = ids;
  }
  check_align(&c);
}

/* ---- Route ------------------------------------------------------------ */

/* The documented ranking: higher key first, ties to the lower index, NaN
 * below every number. 1 when (ka, ia) ranks strictly above (kb, ib). */
static bool ranks_above(float ka, int ia, float kb, int ib) {
  if (isnan(ka)) return isnan(kb) && ia < ib;
  if (isnan(kb)) return true;
  return ka > kb || (ka == kb && ia < ib);
}

/* Checks one token's route. `exact_keys`: the keys are the logits (no
 * correction bias, MAX group scoring), so the whole choice is known. */
static void check_route_token(const moe_config *cfg, int64_t t, const float *logits,
                              const int32_t *ids, const float *weights, bool exact_keys) {
  const int E = cfg->num_experts, k = cfg->top_k;
  const int groups = cfg->num_groups > 1 ? cfg->num_groups : 1;
  const int group_size = E / groups;
  const float scale = cfg->routed_scaling_factor;
  bool chosen[MOE_MAX_EXPERTS] = {false};
  bool group_used[MOE_MAX_GROUPS] = {false};
  int groups_used = 0;
  bool any_alive = false; /* a logit above -inf */
  for (int e = 0; e < E; ++e)
    any_alive |= logits[e] > -INFINITY;

  double sum = 0.0;
  bool any_nonzero = false;
  for (int j = 0; j < k; ++j) {
    int id = ids[j];
    FUZZ_CHECK(id >= 0 && id < E, "token %lld: topk_ids[%d] = %d is not in [0, %d)", (long long)t,
               j, id, E);
    FUZZ_CHECK(!chosen[id], "token %lld: expert %d chosen twice", (long long)t, id);
    chosen[id] = true;
    if (!group_used[id / group_size]) groups_used++;
    group_used[id / group_size] = true;
    float w = weights[j];
    FUZZ_CHECK(isfinite(w), "token %lld: weight %d = %g is not finite (scaling %g, renormalize %d)",
               (long long)t, j, (double)w, (double)scale, cfg->renormalize);
    /* A weight is a score in [0, 1], maybe renormalized, times scale. */
    FUZZ_CHECK(fabs((double)w) <= fabs((double)scale) * (1.0 + 1e-6),
               "token %lld: |weight %d| = %g exceeds |routed_scaling_factor| = %g", (long long)t, j,
               (double)w, (double)scale);
    FUZZ_CHECK(w == 0.0f || (w > 0.0f) == (scale > 0.0f),
               "token %lld: weight %d = %g has not the sign of routed_scaling_factor = %g",
               (long long)t, j, (double)w, (double)scale);
    if (!any_alive)
      FUZZ_CHECK(w == 0.0f, "token %lld: no logit above -inf, yet weight %d = %g", (long long)t, j,
                 (double)w);
    sum += w;
    any_nonzero |= w != 0.0f;
  }
  FUZZ_CHECK(groups_used <= (groups > 1 ? cfg->topk_groups : 1),
             "token %lld: experts from %d groups, topk_groups = %d", (long long)t, groups_used,
             cfg->topk_groups);
  if (cfg->renormalize && any_nonzero)
    /* Relative, plus one denormal step per weight for a tiny scale. */
    FUZZ_CHECK(fabs(sum - scale) <= 1e-5 * k * fabs((double)scale) + k * 1.5e-45,
               "token %lld: renormalized weights sum to %.9g, not routed_scaling_factor %.9g",
               (long long)t, sum, (double)scale);
  if (!exact_keys) return;

  /* Weights follow the scores, which follow the keys. */
  for (int j = 0; j + 1 < k; ++j)
    FUZZ_CHECK(fabsf(weights[j]) >= fabsf(weights[j + 1]),
               "token %lld: weight %d (%g) below weight %d (%g) of a lower-ranked expert",
               (long long)t, j, (double)weights[j], j + 1, (double)weights[j + 1]);

  /* Allowed groups: the topk_groups best by their best logit. */
  bool allowed[MOE_MAX_GROUPS];
  for (int g = 0; g < groups; ++g)
    allowed[g] = groups == 1;
  if (groups > 1) {
    float group_key[MOE_MAX_GROUPS];
    for (int g = 0; g < groups; ++g) {
      int best = g * group_size;
      for (int e = best + 1; e < (g + 1) * group_size; ++e)
        if (ranks_above(logits[e], e, logits[best], best)) best = e;
      group_key[g] = logits[best];
    }
    for (int pick = 0; pick < cfg->topk_groups; ++pick) {
      int best = -1;
      for (int g = 0; g < groups; ++g)
        if (!allowed[g] && (best < 0 || ranks_above(group_key[g], g, group_key[best], best)))
          best = g;
      allowed[best] = true;
    }
  }
  /* The choice is the k best allowed experts, in rank order. */
  for (int j = 0; j < k; ++j) {
    FUZZ_CHECK(allowed[ids[j] / group_size], "token %lld: expert %d is not in an allowed group",
               (long long)t, ids[j]);
    if (j + 1 < k)
      FUZZ_CHECK(ranks_above(logits[ids[j]], ids[j], logits[ids[j + 1]], ids[j + 1]),
                 "token %lld: expert %d (logit %g) ranked before expert %d (logit %g)",
                 (long long)t, ids[j], (double)logits[ids[j]], ids[j + 1],
                 (double)logits[ids[j + 1]]);
  }
  const int last = ids[k - 1];
  for (int e = 0; e < E; ++e)
    if (allowed[e / group_size] && !chosen[e])
      FUZZ_CHECK(ranks_above(logits[last], last, logits[e], e),
                 "token %lld: expert %d (logit %g) left out for expert %d (logit %g)", (long long)t,
                 e, (double)logits[e], last, (double)logits[last]);
}

/* A valid routing configuration. */
static moe_config decode_route_config(fuzz_input *in) {
  moe_config cfg;
  moe_config_init(&cfg);
  cfg.hidden_size = cfg.intermediate_size = 1; /* unused by routing */
  cfg.num_experts =
      fuzz_bool(in) ? (int32_t)fuzz_range(in, 1, 16) : (int32_t)fuzz_range(in, 1, 256);
  cfg.scoring = fuzz_bool(in) ? MOE_SCORING_SIGMOID : MOE_SCORING_SOFTMAX;
  cfg.renormalize = fuzz_bool(in);
  cfg.group_scoring = fuzz_bool(in) ? MOE_GROUP_SCORING_TOP2_SUM : MOE_GROUP_SCORING_MAX;
  float scale = fuzz_bool(in) ? 1.0f : fuzz_float(in);
  cfg.routed_scaling_factor = isfinite(scale) ? scale : 2.5f;
  int32_t groups = (int32_t)fuzz_range(in, 0, 64);
  if (groups > cfg.num_experts || cfg.num_experts % (groups ? groups : 1) != 0) groups = 0;
  cfg.num_groups = groups;
  const int32_t max_k = cfg.num_experts < MOE_MAX_TOP_K ? cfg.num_experts : MOE_MAX_TOP_K;
  cfg.top_k = (int32_t)fuzz_range(in, 1, max_k);
  if (groups > 1) {
    const int32_t group_size = cfg.num_experts / groups;
    cfg.topk_groups = (int32_t)fuzz_range(in, 1, groups);
    /* The kept groups must hold top_k experts. */
    int32_t needed = (cfg.top_k + group_size - 1) / group_size;
    if (cfg.topk_groups < needed) cfg.topk_groups = needed;
  }
  return cfg;
}

/* Decodes a config, T, logits (per row: all NaN, all -inf, all equal,
 * NaN/-inf mixed, or element-wise special/raw floats) and maybe a
 * correction bias; routes and checks. Writes the ids for a following align
 * into routed_ids when it is not NULL. */
static void decode_route(fuzz_input *in, int32_t *routed_ids, int64_t *routed_tokens,
                         moe_config *routed_cfg) {
  moe_config cfg = decode_route_config(in);
  const int64_t T = fuzz_bool(in) ? fuzz_range(in, 0, 8) : fuzz_range(in, 0, 96);
  const int64_t E = cfg.num_experts, k = cfg.top_k;
  float *logits = malloc((size_t)(T * E + 1) * sizeof(float));
  float bias[MOE_MAX_EXPERTS];
  FUZZ_CHECK(logits, "out of host memory");
  for (int64_t t = 0; t < T; ++t) {
    float *row = logits + t * E;
    uint8_t mode = fuzz_u8(in);
    float same = mode == 2 ? fuzz_float(in) : 0.0f;
    for (int64_t e = 0; e < E; ++e) {
      switch (mode) {
      case 0:
        row[e] = NAN;
        break;
      case 1:
        row[e] = -INFINITY;
        break;
      case 2:
        row[e] = same;
        break;
      case 3:
        row[e] = fuzz_bool(in) ? NAN : -INFINITY;
        break;
      default:
        row[e] = fuzz_float(in);
        break;
      }
    }
  }
  const bool has_bias = fuzz_u8(in) < 80;
  if (has_bias)
    for (int64_t e = 0; e < E; ++e)
      bias[e] = fuzz_float(in);

  fuzz_buffer lb, bb, ib, wb;
  fuzz_buffer_make_mode(&lb, FUZZ_BUFFER_EXACT, ctx, ctx, (size_t)(T * E) * 4, false, logits,
                        (size_t)(T * E) * 4);
  fuzz_buffer_make_mode(&bb, has_bias ? FUZZ_BUFFER_EXACT : FUZZ_BUFFER_NULL, ctx, ctx,
                        (size_t)E * 4, true, bias, (size_t)E * 4);
  fuzz_buffer_make_mode(&ib, T % 2 ? FUZZ_BUFFER_LARGER : FUZZ_BUFFER_EXACT, ctx, ctx,
                        (size_t)(T * k) * 4, false, NULL, 0);
  fuzz_buffer_make_mode(&wb, T % 3 ? FUZZ_BUFFER_EXACT : FUZZ_BUFFER_LARGER, ctx, ctx,
                        (size_t)(T * k) * 4, false, NULL, 0);
  fuzz_clear_errors(&ctx, 1);
  moe_status st = moe_route(ctx, &cfg, T, lb.buffer, bb.buffer, ib.buffer, wb.buffer);
  fuzz_check_status("moe_route", st, ctx, false, true);
  fuzz_buffer_expect_unchanged(&lb, 0, "moe_route", "logits");
  fuzz_buffer_expect_unchanged(&bb, 0, "moe_route", "correction_bias");
  fuzz_buffer_expect_unchanged(&ib, ib.need, "moe_route", "topk_ids");
  fuzz_buffer_expect_unchanged(&wb, wb.need, "moe_route", "topk_weights");

  int32_t *ids = fuzz_buffer_contents(&ib);
  float *weights = fuzz_buffer_contents(&wb);
  const bool exact_keys =
      !has_bias && !(cfg.num_groups > 1 && cfg.group_scoring == MOE_GROUP_SCORING_TOP2_SUM);
  for (int64_t t = 0; t < T; ++t)
    check_route_token(&cfg, t, logits + t * E, ids + t * k, weights + t * k, exact_keys);

#ifdef MOE_FUZZ_HAVE_REFERENCE
  /* With logits as keys the reference must choose the same experts; its
   * float64 weights must agree where the float scores are not denormal. */
  if (exact_keys && T > 0) {
    int32_t *ref_ids = malloc((size_t)(T * k) * sizeof(int32_t));
    double *ref_w = malloc((size_t)(T * k) * sizeof(double));
    double *ref_raw = malloc((size_t)(T * k) * sizeof(double));
    FUZZ_CHECK(ref_ids && ref_w && ref_raw, "out of host memory");
    moe_config raw_cfg = cfg;
    raw_cfg.renormalize = 0;
    raw_cfg.routed_scaling_factor = 1.0f;
    ref_route(&cfg, T, logits, NULL, ref_ids, ref_w);
    ref_route(&raw_cfg, T, logits, NULL, ref_ids, ref_raw);
    for (int64_t t = 0; t < T; ++t) {
      double raw_sum = 0.0;
      for (int64_t j = 0; j < k; ++j)
        raw_sum += ref_raw[t * k + j];
      for (int64_t j = 0; j < k; ++j) {
        const int64_t i = t * k + j;
        FUZZ_CHECK(ids[i] == ref_ids[i], "token %lld: topk_ids[%lld] = %d, ref_route %d",
                   (long long)t, (long long)j, ids[i], ref_ids[i]);
        if (raw_sum < 1e-30) continue; /* float scores underflow here */
        /* Relative, plus one float denormal step for tiny scales. */
        const double tol =
            1e-4 * fabs((double)cfg.routed_scaling_factor) + 1e-4 * fabs(ref_w[i]) + 1.5e-45;
        FUZZ_CHECK(fabs((double)weights[i] - ref_w[i]) <= tol,
                   "token %lld: topk_weights[%lld] = %.9g, ref_route %.9g", (long long)t,
                   (long long)j, (double)weights[i], ref_w[i]);
      }
    }
    free(ref_ids);
    free(ref_w);
    free(ref_raw);
  }
#endif

  if (routed_ids) {
    memcpy(routed_ids, ids, (size_t)(T * k) * sizeof(int32_t));
    *routed_tokens = T;
    *routed_cfg = cfg;
  }
  free(ids);
  free(weights);
  free(logits);
  fuzz_buffer_free(&lb);
  fuzz_buffer_free(&bb);
  fuzz_buffer_free(&ib);
  fuzz_buffer_free(&wb);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!ctx) {
    moe_status st = moe_context_create(MOE_BACKEND_CPU, 0, &ctx);
    FUZZ_CHECK(st == MOE_SUCCESS, "moe_context_create(CPU) failed: %s", moe_last_error(NULL));
  }
  fuzz_input in = {data, size, 0};
  switch (fuzz_u8(&in) % 3) {
  case 0:
    decode_route(&in, NULL, NULL, NULL);
    break;
  case 1:
    decode_align(&in, NULL, 0, 0, 0);
    break;
  default: {
    /* Route, then align what it chose: the pipeline's own metadata. */
    static int32_t routed[96 * MOE_MAX_TOP_K];
    int64_t tokens = 0;
    moe_config cfg;
    decode_route(&in, routed, &tokens, &cfg);
    decode_align(&in, routed, tokens, cfg.top_k, cfg.num_experts);
    break;
  }
  }
  return 0;
}
