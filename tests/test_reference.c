/*
 * test_reference.c - the float64 references against values worked out by
 * hand from the rules of include/moe.h, so that the oracle every other test
 * trusts is itself checked (bf16 rounding ties, routing ties and renormal-
 * ization, the align layout, GEMM epilogues, activations, a one-expert
 * layer). Needs no backend.
 */
#include "harness.h"

#include <math.h>

/* Every test ends by releasing its contexts; leaks fail it (ASan builds). */
TestSuite(reference, .fini = th_suite_fini);

static void expect_near(double got, double want, const char *what) {
  TH_ASSERT(fabs(got - want) <= 1e-12 * fmax(1.0, fabs(want)), "%s = %.17g, want %.17g", what, got,
            want);
}

Test(reference, bf16_round_to_nearest_even) {
  th_case("reference bf16");
  const struct {
    double value;
    uint16_t bits;
  } cases[] = {
      {1.0, 0x3f80},
      {1.0 + 0x1p-8, 0x3f80},            /* tie: to even */
      {1.0 + 3 * 0x1p-8, 0x3f82},        /* tie: to even, upwards */
      {1.0 + 0x1p-8 + 0x1p-30, 0x3f81},  /* just above a tie (lost by a float rounding) */
      {-1.0 - 0x1p-8 - 0x1p-30, 0xbf81}, /* the same, negative */
      {1.0 + 0x1p-8 - 0x1p-30, 0x3f80},  /* just below a tie */
      {INFINITY, 0x7f80},
      {-INFINITY, 0xff80},
      {0.0, 0x0000},
      {-0.0, 0x8000},
      {3.3895313892515355e38, 0x7f7f}, /* the largest bf16 */
      {3.4e38, 0x7f80},                /* rounds past it: inf */
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i)
    TH_ASSERT(ref_double_to_bf16(cases[i].value) == cases[i].bits,
              "bf16(%.17g) = 0x%04x, want 0x%04x", cases[i].value,
              ref_double_to_bf16(cases[i].value), cases[i].bits);
  TH_ASSERT((ref_double_to_bf16(NAN) & 0x7fff) > 0x7f80, "bf16(NaN) is not a NaN");
  TH_ASSERT(ref_bf16_to_double(0x4049) == 3.140625, "0x4049 is %g", ref_bf16_to_double(0x4049));
}

Test(reference, route_ties_and_renormalize) {
  th_case("reference route");
  moe_config cfg = th_config(1, 1, 4, 2);
  const float logits[4] = {1.0f, 3.0f, 2.0f, 3.0f};
  int32_t ids[2];
  double w[2];
  ref_route(&cfg, 1, logits, NULL, ids, w);
  const double sum = exp(1.0 - 3.0) + 1.0 + exp(2.0 - 3.0) + 1.0;
  TH_ASSERT(ids[0] == 1 && ids[1] == 3, "ids = %d, %d; want 1, 3 (tie to the lower index)", ids[0],
            ids[1]);
  expect_near(w[0], 1.0 / sum, "softmax weight");
  cfg.renormalize = 1;
  cfg.routed_scaling_factor = 3.0f;
  ref_route(&cfg, 1, logits, NULL, ids, w);
  expect_near(w[0], 1.5, "renormalized, scaled weight");
  /* Sigmoid with a correction bias that only changes the choice. */
  cfg.scoring = MOE_SCORING_SIGMOID;
  cfg.renormalize = 0;
  cfg.routed_scaling_factor = 1.0f;
  const float bias[4] = {0.0f, 0.0f, 5.0f, 0.0f};
  ref_route(&cfg, 1, logits, bias, ids, w);
  TH_ASSERT(ids[0] == 2 && ids[1] == 1, "ids = %d, %d; want 2, 1", ids[0], ids[1]);
  expect_near(w[0], 1.0 / (1.0 + exp(-2.0)), "sigmoid weight without the bias");
  /* All NaN: the lowest experts, weight 0. */
  const float nans[4] = {NAN, NAN, NAN, NAN};
  ref_route(&cfg, 1, nans, NULL, ids, w);
  TH_ASSERT(ids[0] == 0 && ids[1] == 1 && w[0] == 0.0 && w[1] == 0.0,
            "all NaN: ids %d, %d weights %g, %g", ids[0], ids[1], w[0], w[1]);
}

Test(reference, route_groups) {
  th_case("reference grouped route");
  /* 4 groups of 2. MAX: group keys 0.9, 0.8, 0.7, 0.95 -> groups 3 and 0.
   * TOP2_SUM: 0.9+0.1, 0.8+0.75, 0.7+0.6, 0.95+0 -> groups 1 and 2. */
  moe_config cfg = th_config(1, 1, 8, 2);
  cfg.scoring = MOE_SCORING_SIGMOID;
  cfg.num_groups = 4;
  cfg.topk_groups = 2;
  const double keys[8] = {0.9, 0.1, 0.8, 0.75, 0.7, 0.6, 0.95, 0.0};
  float logits[8], zero_bias[8] = {0};
  for (int e = 0; e < 8; ++e)
    logits[e] = (float)log(keys[e] / (1.0 - keys[e] + 1e-300));
  logits[7] = -INFINITY;
  int32_t ids[2];
  double w[2];
  cfg.group_scoring = MOE_GROUP_SCORING_MAX;
  ref_route(&cfg, 1, logits, NULL, ids, w);
  TH_ASSERT(ids[0] == 6 && ids[1] == 0, "MAX groups: ids %d, %d; want 6, 0", ids[0], ids[1]);
  cfg.group_scoring = MOE_GROUP_SCORING_TOP2_SUM;
  ref_route(&cfg, 1, logits, zero_bias, ids, w);
  TH_ASSERT(ids[0] == 2 && ids[1] == 3, "TOP2_SUM groups: ids %d, %d; want 2, 3", ids[0], ids[1]);
}

Test(reference, align_layout) {
  th_case("reference align");
  const int32_t ids[4] = {2, 0, 2, 1};
  int32_t sorted[7], blocks[4], padded;
  ref_align(4, 1, 3, 3, 2, ids, NULL, sorted, blocks, &padded);
  const int32_t want_sorted[7] = {1, 4, 3, 4, 0, 2, 4}, want_blocks[4] = {0, 1, 2, -1};
  TH_ASSERT(padded == 6, "num_tokens_post_padded = %d, want 6", padded);
  for (int i = 0; i < 7; ++i)
    TH_ASSERT(sorted[i] == want_sorted[i], "sorted[%d] = %d, want %d", i, sorted[i],
              want_sorted[i]);
  for (int i = 0; i < 4; ++i)
    TH_ASSERT(blocks[i] == want_blocks[i], "expert_ids[%d] = %d, want %d", i, blocks[i],
              want_blocks[i]);
  /* A map: router 2 -> local 0, router 0 and 1 not local. */
  const int32_t map[3] = {-1, -1, 0};
  ref_align(4, 1, 3, 1, 2, ids, map, sorted, blocks, &padded);
  TH_ASSERT(padded == 2 && sorted[0] == 0 && sorted[1] == 2 && sorted[2] == 4 && blocks[0] == 0 &&
                blocks[1] == -1,
            "mapped align: padded %d sorted %d %d %d blocks %d %d", padded, sorted[0], sorted[1],
            sorted[2], blocks[0], blocks[1]);
}

Test(reference, gemm_epilogues_and_activations) {
  th_case("reference gemm and activation");
  const uint16_t a[2] = {0x3f80, 0x4000}; /* 1, 2 */
  const uint16_t b[2] = {0x4040, 0x4080}; /* 3, 4: one output column */
  const float bias[1] = {0.5f}, weight[1] = {2.0f};
  const int32_t slot_expert[1] = {0};
  moe_gemm_desc desc = {
      .num_tokens = 1, .top_k = 1, .num_local_experts = 1, .n = 1, .k = 2, .block_m = 1};
  double c, magnitude;
  ref_grouped_gemm(&desc, a, b, bias, slot_expert, weight, &c, &magnitude);
  expect_near(c, 11.5, "a.b + bias");
  expect_near(magnitude, 11.5, "magnitude");
  desc.routed_weight = MOE_GEMM_ROUTED_WEIGHT_AFTER_BIAS;
  ref_grouped_gemm(&desc, a, b, bias, slot_expert, weight, &c, NULL);
  expect_near(c, 23.0, "w (a.b + bias)");
  desc.routed_weight = MOE_GEMM_ROUTED_WEIGHT_BEFORE_BIAS;
  ref_grouped_gemm(&desc, a, b, bias, slot_expert, weight, &c, NULL);
  expect_near(c, 22.5, "w a.b + bias");

  expect_near(ref_activation_value(MOE_ACTIVATION_SWIGLU, 0, 0, 1.0, 2.0), 2.0 / (1.0 + exp(-1.0)),
              "swiglu(1, 2)");
  expect_near(ref_activation_value(MOE_ACTIVATION_GEGLU, 0, 0, 1.0, 1.0),
              0.5 * (1.0 + tanh(sqrt(2.0 / 3.14159265358979323846) * 1.044715)), "geglu(1, 1)");
  expect_near(ref_activation_value(MOE_ACTIVATION_SWIGLU_CLAMP, 1.0, 7.0, 10.0, -10.0),
              7.0 / (1.0 + exp(-7.0)) * -6.0, "clamped swiglu(10, -10)");
  expect_near(ref_activation_value(MOE_ACTIVATION_SWIGLU_CLAMP, 1.702, 7.0, -10.0, 10.0),
              -10.0 / (1.0 + exp(17.02)) * 8.0, "clamped swiglu(-10, 10)");
}

Test(reference, one_expert_layer) {
  th_case("reference layer");
  moe_config cfg = th_config(1, 1, 1, 1);
  const uint16_t w13[2] = {0x4000, 0x4040}; /* gate 2, up 3 */
  const uint16_t w2[1] = {0x3f00};          /* 0.5 */
  const uint16_t x[1] = {0x3f80};           /* 1 */
  const float logits[1] = {0.3f}, b13[2] = {1.0f, -1.0f}, b2[1] = {0.25f};
  moe_weights weights = {.w13 = w13, .w2 = w2};
  double out;
  ref_layer_forward(&cfg, &weights, 1, x, logits, false, &out);
  expect_near(out, 0.5 * 2.0 / (1.0 + exp(-2.0)) * 3.0, "layer");
  /* Biases; router weight (sigmoid(0.3)) on the output, then the input. */
  weights.w13_bias = b13;
  weights.w2_bias = b2;
  cfg.scoring = MOE_SCORING_SIGMOID;
  const double w = 1.0 / (1.0 + exp(-(double)0.3f));
  ref_layer_forward(&cfg, &weights, 1, x, logits, false, &out);
  expect_near(out, w * (0.5 * 3.0 / (1.0 + exp(-3.0)) * 2.0 + 0.25), "weight on output");
  cfg.router_weight = MOE_ROUTER_WEIGHT_ON_INPUT;
  ref_layer_forward(&cfg, &weights, 1, x, logits, false, &out);
  const double g = 2.0 * w + 1.0, u = 3.0 * w - 1.0;
  expect_near(out, 0.5 * g / (1.0 + exp(-g)) * u + 0.25, "weight on input");
}
