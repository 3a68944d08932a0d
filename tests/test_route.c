/*
 * test_route.c - moe_route against the float64 reference: every scoring and
 * grouping variant, correction bias, renormalization and scaling, ties,
 * NaN/Inf logits and all-NaN rows, E from 1 to 512, top_k up to the
 * maximum, and T = 0.
 */
#include "harness.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Every test ends by releasing its contexts; leaks fail it (ASan builds). */
TestSuite(route, .fini = th_suite_fini);

static const char *logit_kind_names[] = {"normal", "ties", "special", "one_expert", "half_empty"};

/* True when the selection key is the logit itself (moe.h), so that every
 * backend must pick exactly the same ids: no rounding is involved. */
static bool key_is_logit(const moe_config *cfg, bool with_bias) {
  return !with_bias && !(cfg->num_groups > 1 && cfg->group_scoring == MOE_GROUP_SCORING_TOP2_SUM);
}

/* Runs moe_route on ctx; returns ids and weights (caller frees). */
static void route_on(moe_context *ctx, const moe_config *cfg, int64_t T, const float *logits,
                     const float *bias, int32_t **ids_out, float **weights_out) {
  const int32_t E = cfg->num_experts, k = cfg->top_k;
  const size_t slot_bytes = (size_t)(T * k) * 4;
  moe_buffer *b_logits = th_upload(ctx, logits, (size_t)(T * E) * sizeof(float));
  moe_buffer *b_bias = bias ? th_upload(ctx, bias, (size_t)E * sizeof(float)) : NULL;
  moe_buffer *b_ids = th_output(ctx, slot_bytes);
  moe_buffer *b_weights = th_output(ctx, slot_bytes);
  TH_OK(moe_route(ctx, cfg, T, b_logits, b_bias, b_ids, b_weights));
  int32_t *ids = th_malloc(slot_bytes);
  float *weights = th_malloc(slot_bytes);
  th_download(b_ids, ids, slot_bytes);
  th_download(b_weights, weights, slot_bytes);
  th_check_guard(b_ids, slot_bytes, "topk_ids");
  th_check_guard(b_weights, slot_bytes, "topk_weights");
  moe_buffer_destroy(b_logits);
  moe_buffer_destroy(b_bias);
  moe_buffer_destroy(b_ids);
  moe_buffer_destroy(b_weights);
  *ids_out = ids;
  *weights_out = weights;
}

/* Routes T tokens of the given logits kind, checks against the reference
 * (and against the CPU backend when another backend is under test). The
 * caller may inspect ids/weights when it passes non-NULL pointers. */
static void check_route_case(const moe_config *cfg, int64_t T, th_logits_kind kind, bool with_bias,
                             uint64_t seed, int32_t **ids_out, float **weights_out,
                             float **logits_out, float **bias_out) {
  const int32_t E = cfg->num_experts, k = cfg->top_k;
  th_rng rng = th_rng_make(seed);
  float *logits = th_malloc((size_t)(T * E) * sizeof(float));
  th_fill_logits(&rng, logits, T, E, k, kind);
  float *bias = NULL;
  if (with_bias) {
    bias = th_malloc((size_t)E * sizeof(float));
    th_fill_f32(&rng, bias, (size_t)E, 0.1);
  }
  th_case("route T=%lld %s correction_bias=%d logits=%s seed=%#llx", (long long)T,
          th_config_text(cfg), with_bias, logit_kind_names[kind], (unsigned long long)seed);

  int32_t *ids;
  float *weights;
  route_on(th_ctx(), cfg, T, logits, bias, &ids, &weights);
  th_check_route(cfg, T, logits, bias, ids, weights);

  if (th_cpu_ctx()) {
    int32_t *cpu_ids;
    float *cpu_weights;
    route_on(th_cpu_ctx(), cfg, T, logits, bias, &cpu_ids, &cpu_weights);
    for (int64_t s = 0; s < T * k; ++s) {
      if (ids[s] != cpu_ids[s])
        TH_ASSERT(!key_is_logit(cfg, with_bias),
                  "slot %lld: %s picked expert %d, cpu picked %d (keys are the logits: no "
                  "rounding can excuse it)",
                  (long long)s, th_backend_name(), (int)ids[s], (int)cpu_ids[s]);
      else
        TH_ASSERT(fabsf(weights[s] - cpu_weights[s]) <= 1e-5f * fabsf(cpu_weights[s]) + 1e-30f,
                  "slot %lld: weight %.9g on %s, %.9g on cpu", (long long)s, (double)weights[s],
                  th_backend_name(), (double)cpu_weights[s]);
    }
    free(cpu_ids);
    free(cpu_weights);
  }

  if (ids_out)
    *ids_out = ids;
  else
    free(ids);
  if (weights_out)
    *weights_out = weights;
  else
    free(weights);
  if (logits_out)
    *logits_out = logits;
  else
    free(logits);
  if (bias_out)
    *bias_out = bias;
  else
    free(bias);
}

static void route_case(const moe_config *cfg, int64_t T, th_logits_kind kind, bool with_bias,
                       uint64_t seed) {
  check_route_case(cfg, T, kind, with_bias, seed, NULL, NULL, NULL, NULL);
}

static moe_config routing(int32_t E, int32_t k, moe_scoring scoring, bool renormalize) {
  moe_config cfg = th_config(64, 64, E, k);
  cfg.scoring = scoring;
  cfg.renormalize = renormalize;
  return cfg;
}

static moe_config grouped(moe_config cfg, int32_t groups, int32_t kept, moe_group_scoring by) {
  cfg.num_groups = groups;
  cfg.topk_groups = kept;
  cfg.group_scoring = by;
  return cfg;
}

Test(route, softmax_mixtral) {
  moe_config cfg = routing(8, 2, MOE_SCORING_SOFTMAX, true);
  route_case(&cfg, 33, TH_LOGITS_NORMAL, false, 0x101);
}

Test(route, softmax_without_renormalize) {
  moe_config cfg = routing(60, 4, MOE_SCORING_SOFTMAX, false);
  route_case(&cfg, 7, TH_LOGITS_NORMAL, false, 0x102);
}

Test(route, softmax_renormalize_many_tokens) {
  moe_config cfg = routing(128, 8, MOE_SCORING_SOFTMAX, true);
  route_case(&cfg, 1031, TH_LOGITS_NORMAL, false, 0x103);
}

Test(route, sigmoid) {
  moe_config cfg = routing(16, 4, MOE_SCORING_SIGMOID, false);
  route_case(&cfg, 77, TH_LOGITS_NORMAL, false, 0x104);
}

Test(route, sigmoid_correction_bias_scaling) {
  moe_config cfg = routing(32, 4, MOE_SCORING_SIGMOID, true);
  cfg.routed_scaling_factor = 2.5f;
  route_case(&cfg, 100, TH_LOGITS_NORMAL, true, 0x105);
}

Test(route, scaling_without_renormalize) {
  moe_config cfg = routing(16, 3, MOE_SCORING_SOFTMAX, false);
  cfg.routed_scaling_factor = 0.5f;
  route_case(&cfg, 33, TH_LOGITS_NORMAL, false, 0x106);
  cfg.routed_scaling_factor = -1.5f;
  route_case(&cfg, 33, TH_LOGITS_NORMAL, false, 0x107);
}

Test(route, softmax_correction_bias) {
  moe_config cfg = routing(24, 6, MOE_SCORING_SOFTMAX, true);
  route_case(&cfg, 50, TH_LOGITS_NORMAL, true, 0x108);
}

Test(route, grouped_deepseek_v3_top2_sum) {
  moe_config cfg =
      grouped(routing(256, 8, MOE_SCORING_SIGMOID, true), 8, 4, MOE_GROUP_SCORING_TOP2_SUM);
  cfg.routed_scaling_factor = 2.5f;
  route_case(&cfg, 1000, TH_LOGITS_NORMAL, true, 0x109);
}

Test(route, grouped_deepseek_v2_max) {
  moe_config cfg = grouped(routing(64, 6, MOE_SCORING_SOFTMAX, false), 8, 3, MOE_GROUP_SCORING_MAX);
  cfg.routed_scaling_factor = 16.0f;
  route_case(&cfg, 200, TH_LOGITS_NORMAL, false, 0x10a);
}

Test(route, grouped_max_with_bias) {
  moe_config cfg = grouped(routing(64, 4, MOE_SCORING_SIGMOID, true), 4, 2, MOE_GROUP_SCORING_MAX);
  route_case(&cfg, 100, TH_LOGITS_NORMAL, true, 0x10b);
}

Test(route, grouped_top2_sum_softmax_no_bias) {
  moe_config cfg =
      grouped(routing(32, 4, MOE_SCORING_SOFTMAX, true), 8, 2, MOE_GROUP_SCORING_TOP2_SUM);
  route_case(&cfg, 100, TH_LOGITS_NORMAL, false, 0x10c);
}

Test(route, grouped_every_group_kept_and_single_expert_groups) {
  moe_config cfg =
      grouped(routing(64, 8, MOE_SCORING_SIGMOID, true), 8, 8, MOE_GROUP_SCORING_TOP2_SUM);
  route_case(&cfg, 64, TH_LOGITS_NORMAL, true, 0x10d);
  /* Groups of one expert: TOP2_SUM has no second expert to add. */
  cfg = grouped(routing(16, 2, MOE_SCORING_SIGMOID, false), 16, 3, MOE_GROUP_SCORING_TOP2_SUM);
  route_case(&cfg, 64, TH_LOGITS_NORMAL, true, 0x10e);
}

Test(route, ties_go_to_the_lower_index) {
  const moe_config variants[] = {
      routing(16, 4, MOE_SCORING_SOFTMAX, false),
      routing(16, 4, MOE_SCORING_SIGMOID, true),
      grouped(routing(16, 4, MOE_SCORING_SOFTMAX, true), 4, 2, MOE_GROUP_SCORING_MAX),
      grouped(routing(16, 4, MOE_SCORING_SIGMOID, true), 4, 2, MOE_GROUP_SCORING_TOP2_SUM),
  };
  for (size_t v = 0; v < sizeof variants / sizeof variants[0]; ++v) {
    int32_t *ids;
    float *weights;
    check_route_case(&variants[v], 64, TH_LOGITS_TIES, false, 0x110 + v, &ids, &weights, NULL,
                     NULL);
    /* Rows t % 4 == 0 are all equal: the lowest indices, in order (in the
     * first groups when grouped). */
    for (int64_t t = 0; t < 64; t += 4)
      for (int32_t j = 0; j < 4; ++j)
        TH_ASSERT(ids[t * 4 + j] == j, "token %lld of equal logits: topk_ids[%d] = %d, want %d",
                  (long long)t, (int)j, (int)ids[t * 4 + j], (int)j);
    free(ids);
    free(weights);
  }
}

Test(route, nan_inf_and_all_nan_rows) {
  const struct {
    moe_config cfg;
    bool bias;
  } variants[] = {
      {routing(16, 4, MOE_SCORING_SOFTMAX, false), false},
      {routing(16, 4, MOE_SCORING_SOFTMAX, true), false},
      {routing(16, 4, MOE_SCORING_SIGMOID, true), false},
      {routing(16, 4, MOE_SCORING_SIGMOID, true), true},
      {grouped(routing(16, 4, MOE_SCORING_SOFTMAX, true), 4, 2, MOE_GROUP_SCORING_MAX), false},
      {grouped(routing(16, 4, MOE_SCORING_SIGMOID, true), 4, 2, MOE_GROUP_SCORING_TOP2_SUM), true},
  };
  for (size_t v = 0; v < sizeof variants / sizeof variants[0]; ++v) {
    const moe_config *cfg = &variants[v].cfg;
    int32_t *ids;
    float *weights, *logits, *bias;
    check_route_case(cfg, 80, TH_LOGITS_SPECIAL, variants[v].bias, 0x120 + v, &ids, &weights,
                     &logits, &bias);
    for (int64_t t = 0; t < 80; ++t) {
      const int32_t *row_ids = ids + t * 4;
      const float *row_w = weights + t * 4;
      /* moe.h: a row with no logit above -inf has all scores 0; all NaN
       * keys rank by index, so it routes to the lowest experts. */
      if (t % 8 == 4 || (t % 8 == 5 && !variants[v].bias && cfg->num_groups <= 1))
        for (int32_t j = 0; j < 4; ++j)
          TH_ASSERT(row_ids[j] == j && row_w[j] == 0.0f,
                    "token %lld (all %s): expert %d weight %g, want expert %d weight 0",
                    (long long)t, t % 8 == 4 ? "NaN" : "-inf", (int)row_ids[j], (double)row_w[j],
                    (int)j);
      for (int32_t j = 0; j < 4; ++j) {
        TH_ASSERT(isfinite(row_w[j]), "token %lld: weight %d is %g", (long long)t, (int)j,
                  (double)row_w[j]);
        if (isnan(logits[t * 16 + row_ids[j]]))
          TH_ASSERT(row_w[j] == 0.0f, "token %lld: NaN expert %d has weight %g", (long long)t,
                    (int)row_ids[j], (double)row_w[j]);
      }
      /* Softmax: +inf experts share the whole mass. */
      if (cfg->scoring == MOE_SCORING_SOFTMAX && t % 8 == 3 && cfg->renormalize &&
          cfg->num_groups <= 1)
        for (int32_t j = 0; j < 2; ++j)
          TH_ASSERT(row_w[j] == 0.5f, "token %lld: two +inf logits, weight %g, want 0.5",
                    (long long)t, (double)row_w[j]);
    }
    free(ids);
    free(weights);
    free(logits);
    free(bias);
  }
}

Test(route, one_expert) {
  moe_config cfg = routing(1, 1, MOE_SCORING_SOFTMAX, false);
  int32_t *ids;
  float *weights;
  check_route_case(&cfg, 7, TH_LOGITS_NORMAL, false, 0x130, &ids, &weights, NULL, NULL);
  for (int t = 0; t < 7; ++t)
    TH_ASSERT(ids[t] == 0 && weights[t] == 1.0f, "token %d: expert %d weight %g", t, (int)ids[t],
              (double)weights[t]);
  free(ids);
  free(weights);
  cfg.scoring = MOE_SCORING_SIGMOID;
  route_case(&cfg, 7, TH_LOGITS_NORMAL, true, 0x131);
}

Test(route, e512_top16) {
  moe_config cfg = routing(512, 16, MOE_SCORING_SOFTMAX, true);
  route_case(&cfg, 33, TH_LOGITS_NORMAL, false, 0x140);
  cfg = grouped(routing(512, 16, MOE_SCORING_SIGMOID, true), 16, 4, MOE_GROUP_SCORING_TOP2_SUM);
  route_case(&cfg, 33, TH_LOGITS_NORMAL, true, 0x141);
}

Test(route, top_k_equals_e_and_maximum_top_k) {
  moe_config cfg = routing(16, 16, MOE_SCORING_SOFTMAX, true);
  route_case(&cfg, 2, TH_LOGITS_NORMAL, false, 0x150);
  cfg = routing(64, MOE_MAX_TOP_K, MOE_SCORING_SIGMOID, false);
  route_case(&cfg, 5, TH_LOGITS_NORMAL, true, 0x151);
}

Test(route, every_top_k_from_1_to_16) {
  for (int32_t k = 1; k <= 16; ++k) {
    moe_config cfg = routing(40, k, k % 2 ? MOE_SCORING_SOFTMAX : MOE_SCORING_SIGMOID, k % 3 == 0);
    route_case(&cfg, 9, TH_LOGITS_NORMAL, k % 4 == 0, 0x160 + (uint64_t)k);
  }
}

Test(route, zero_tokens_is_a_no_op) {
  moe_config cfg = routing(8, 2, MOE_SCORING_SOFTMAX, true);
  th_case("route T=0 %s", th_config_text(&cfg));
  moe_context *ctx = th_ctx();
  moe_buffer *logits = th_output(ctx, 0), *ids = th_output(ctx, 0), *weights = th_output(ctx, 0);
  TH_OK(moe_route(ctx, &cfg, 0, logits, NULL, ids, weights));
  th_check_untouched(ids, "topk_ids");
  th_check_untouched(weights, "topk_weights");
  moe_buffer_destroy(logits);
  moe_buffer_destroy(ids);
  moe_buffer_destroy(weights);
}
