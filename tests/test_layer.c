/*
 * test_layer.c - the whole layer (moe_layer_create / reserve / forward)
 * against the float64 reference: token counts from 1 to over a thousand,
 * sizes that are multiples of no tile, E from 1 to 512, top_k up to 16,
 * every routing variant, activation, weight layout, biases, expert maps,
 * router weight on input; special logits; bitwise reruns; batch
 * invariance; the CPU's thread counts and kernel paths agreeing bit for bit;
 * T = 0; the reservation rules; and the stage pipeline
 * composed by hand giving the same answer.
 */
#include "harness.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Every test ends by releasing its contexts; leaks fail it (ASan builds). */
TestSuite(layer, .fini = th_suite_fini);

/* The relative Frobenius bound of docs/DESIGN.md, against float64 and between
 * backends. */
#define LAYER_BOUND 1e-2

/* Creates the layer of d on ctx (skipping the test when the backend
 * declines the configuration). */
static moe_layer *layer_create_on(moe_context *ctx, const th_layer_data *d) {
  moe_layer *layer = NULL;
  TH_OK(moe_layer_create(ctx, &d->cfg, &d->weights, &layer));
  return layer;
}

/* Create, reserve exactly T, forward all tokens, destroy. */
static void layer_run_on(moe_context *ctx, const th_layer_data *d, uint16_t *out) {
  moe_layer *layer = layer_create_on(ctx, d);
  TH_OK(moe_layer_reserve(layer, d->num_tokens));
  th_layer_forward_tokens(layer, ctx, d, 0, d->num_tokens, out);
  moe_layer_destroy(layer);
}

/* The checks every layer case gets: finite output within LAYER_BOUND of
 * the float64 reference, and of the CPU backend when another backend is
 * under test. Returns the relative error. */
static double check_layer_output(const th_layer_data *d, const uint16_t *out) {
  const int64_t T = d->num_tokens, H = d->cfg.hidden_size;
  double *ref = th_malloc((size_t)(T * H) * sizeof(double));
  ref_layer_forward(&d->cfg, &d->weights, T, d->x, d->logits, true, ref);
  for (int64_t i = 0; i < T * H; ++i)
    TH_ASSERT(isfinite(th_bf16_to_float(out[i])), "out[%lld][%lld] = %g is not finite",
              (long long)(i / H), (long long)(i % H), (double)th_bf16_to_float(out[i]));
  const double err = th_rel_error(out, ref, (size_t)(T * H));
  TH_ASSERT(err <= LAYER_BOUND, "relative Frobenius error %.3g vs the float64 reference > %g", err,
            LAYER_BOUND);
  free(ref);
  if (th_cpu_ctx()) {
    uint16_t *cpu = th_malloc((size_t)(T * H) * 2);
    layer_run_on(th_cpu_ctx(), d, cpu);
    th_check_agree(out, cpu, (size_t)(T * H), LAYER_BOUND, "out");
    free(cpu);
  }
  return err;
}

static void layer_case(const th_layer_spec *spec) {
  th_layer_data d;
  th_layer_data_make(&d, spec);
  uint16_t *out = th_malloc((size_t)(d.num_tokens * d.cfg.hidden_size) * 2);
  layer_run_on(th_ctx(), &d, out);
  const double err = check_layer_output(&d, out);
  cr_log_info("relative error %.3g", err);
  free(out);
  th_layer_data_free(&d);
}

static void layer_case_of(th_layer_spec s) {
  layer_case(&s);
}

/* A Mixtral-like spec: softmax over all experts, renormalized top-k,
 * SwiGLU, [out][in] weights. */
static th_layer_spec spec(int64_t T, int64_t H, int64_t I, int32_t E, int32_t k, uint64_t seed) {
  th_layer_spec s = {.num_tokens = T, .seed = seed};
  s.cfg = th_config(H, I, E, k);
  s.cfg.renormalize = 1;
  return s;
}

/* ---- Shapes ----------------------------------------------------------- */

Test(layer, one_token) {
  layer_case_of(spec(1, 67, 129, 8, 2, 0x601));
}

Test(layer, two_tokens) {
  layer_case_of(spec(2, 129, 67, 8, 2, 0x602));
}

Test(layer, seven_tokens) {
  layer_case_of(spec(7, 300, 129, 16, 4, 0x603));
}

Test(layer, thirty_three_tokens) {
  layer_case_of(spec(33, 67, 300, 8, 2, 0x604));
}

Test(layer, thousand_tokens) {
  layer_case_of(spec(1031, 129, 67, 16, 4, 0x605));
}

Test(layer, one_expert) {
  layer_case_of(spec(33, 67, 129, 1, 1, 0x606));
}

Test(layer, e512_top16) {
  layer_case_of(spec(33, 67, 33, 512, 16, 0x607));
}

Test(layer, qwen3_like_e128_top8) {
  layer_case_of(spec(100, 128, 48, 128, 8, 0x608));
}

Test(layer, tiny_sizes) {
  layer_case_of(spec(5, 1, 1, 2, 1, 0x609));
}

/* ---- Routing variants ------------------------------------------------- */

Test(layer, softmax_without_renormalize) {
  th_layer_spec s = spec(33, 67, 129, 8, 2, 0x611);
  s.cfg.renormalize = 0;
  layer_case(&s);
}

Test(layer, deepseek_v3_routing) {
  th_layer_spec s = spec(65, 96, 40, 64, 6, 0x612);
  s.cfg.scoring = MOE_SCORING_SIGMOID;
  s.cfg.num_groups = 8;
  s.cfg.topk_groups = 4;
  s.cfg.group_scoring = MOE_GROUP_SCORING_TOP2_SUM;
  s.cfg.routed_scaling_factor = 2.5f;
  s.correction_bias = true;
  layer_case(&s);
}

Test(layer, deepseek_v2_routing) {
  th_layer_spec s = spec(65, 96, 40, 64, 6, 0x613);
  s.cfg.renormalize = 0;
  s.cfg.num_groups = 8;
  s.cfg.topk_groups = 3;
  s.cfg.group_scoring = MOE_GROUP_SCORING_MAX;
  s.cfg.routed_scaling_factor = 16.0f;
  layer_case(&s);
}

Test(layer, sigmoid_without_groups) {
  th_layer_spec s = spec(33, 67, 129, 16, 4, 0x614);
  s.cfg.scoring = MOE_SCORING_SIGMOID;
  s.cfg.renormalize = 0;
  layer_case(&s);
}

/* ---- Activations, layouts, biases, router weight ---------------------- */

Test(layer, geglu) {
  th_layer_spec s = spec(33, 67, 129, 8, 2, 0x621);
  s.cfg.activation = MOE_ACTIVATION_GEGLU;
  layer_case(&s);
}

Test(layer, gpt_oss_clamped_swiglu_with_biases) {
  th_layer_spec s = spec(33, 96, 96, 32, 4, 0x622);
  s.cfg.activation = MOE_ACTIVATION_SWIGLU_CLAMP;
  s.w13_bias = s.w2_bias = true;
  layer_case(&s);
  /* A small limit, so that many gate and up values are clamped. */
  s.cfg.swiglu_limit = 0.25f;
  s.cfg.swiglu_alpha = 1.0f;
  s.seed = 0x623;
  layer_case(&s);
}

Test(layer, in_out_weight_layout) {
  th_layer_spec s = spec(33, 67, 129, 8, 2, 0x624);
  s.cfg.weight_layout = MOE_WEIGHT_LAYOUT_IN_OUT;
  layer_case(&s);
}

Test(layer, in_out_layout_with_biases_and_geglu) {
  th_layer_spec s = spec(17, 129, 67, 8, 3, 0x625);
  s.cfg.weight_layout = MOE_WEIGHT_LAYOUT_IN_OUT;
  s.cfg.activation = MOE_ACTIVATION_GEGLU;
  s.w13_bias = s.w2_bias = true;
  layer_case(&s);
}

Test(layer, swiglu_biases) {
  th_layer_spec s = spec(33, 67, 129, 8, 2, 0x626);
  s.w13_bias = true;
  layer_case(&s);
  s.w13_bias = false;
  s.w2_bias = true;
  s.seed = 0x627;
  layer_case(&s);
}

Test(layer, router_weight_on_input) {
  th_layer_spec s = spec(33, 67, 129, 8, 2, 0x628);
  s.cfg.router_weight = MOE_ROUTER_WEIGHT_ON_INPUT;
  layer_case(&s);
}

Test(layer, router_weight_on_input_with_biases_in_out) {
  th_layer_spec s = spec(33, 67, 129, 8, 2, 0x629);
  s.cfg.router_weight = MOE_ROUTER_WEIGHT_ON_INPUT;
  s.cfg.weight_layout = MOE_WEIGHT_LAYOUT_IN_OUT;
  s.cfg.activation = MOE_ACTIVATION_SWIGLU_CLAMP;
  s.w13_bias = s.w2_bias = true;
  layer_case(&s);
}

/* ---- Expert placement ------------------------------------------------- */

Test(layer, expert_map_with_non_local_experts) {
  th_layer_spec s = spec(33, 67, 129, 16, 4, 0x631);
  s.cfg.num_local_experts = 6;
  s.map = TH_MAP_PARTIAL;
  layer_case(&s);
  s.w13_bias = s.w2_bias = true;
  s.seed = 0x632;
  layer_case(&s);
}

Test(layer, expert_map_without_local_experts_gives_zero) {
  th_layer_spec s = spec(9, 67, 129, 16, 4, 0x633);
  s.cfg.num_local_experts = 4;
  s.map = TH_MAP_NO_LOCAL;
  th_layer_data d;
  th_layer_data_make(&d, &s);
  uint16_t *out = th_malloc((size_t)(9 * 67) * 2);
  layer_run_on(th_ctx(), &d, out);
  for (int i = 0; i < 9 * 67; ++i)
    TH_ASSERT(th_bf16_to_float(out[i]) == 0.0f, "out[%d] = %g: no expert is local, want 0", i,
              (double)th_bf16_to_float(out[i]));
  free(out);
  th_layer_data_free(&d);
}

Test(layer, every_token_on_the_same_experts) {
  th_layer_spec s = spec(65, 67, 129, 8, 1, 0x634);
  s.logits = TH_LOGITS_ONE_EXPERT;
  layer_case(&s);
  s = spec(65, 67, 129, 8, 3, 0x635);
  s.logits = TH_LOGITS_ONE_EXPERT;
  layer_case(&s);
}

Test(layer, experts_without_tokens) {
  layer_case_of(spec(2, 67, 129, 64, 2, 0x636));
  th_layer_spec s = spec(33, 67, 129, 16, 4, 0x637);
  s.logits = TH_LOGITS_HALF_EMPTY;
  layer_case(&s);
}

/* ---- Special logits --------------------------------------------------- */

Test(layer, nan_inf_logits_and_all_nan_rows) {
  th_layer_spec s = spec(40, 67, 129, 16, 4, 0x641);
  s.logits = TH_LOGITS_SPECIAL;
  th_layer_data d;
  th_layer_data_make(&d, &s);
  uint16_t *out = th_malloc((size_t)(40 * 67) * 2);
  layer_run_on(th_ctx(), &d, out);
  check_layer_output(&d, out);
  /* moe.h: rows with no logit above -inf route with weight 0: output 0. */
  for (int t = 4; t < 40; t += 8)
    for (int h = 0; h < 67; ++h)
      TH_ASSERT(out[t * 67 + h] == 0 || out[t * 67 + h] == 0x8000,
                "token %d has only NaN logits, but out[%d][%d] = %g", t, t, h,
                (double)th_bf16_to_float(out[t * 67 + h]));
  free(out);
  th_layer_data_free(&d);
  s.cfg.scoring = MOE_SCORING_SIGMOID;
  s.correction_bias = true;
  s.seed = 0x642;
  layer_case(&s);
}

/* moe.h's promise for rows with no logit above -inf, exactly: every pick
 * has weight 0. Router weight on the output: the row is sum_j 0 * y_j = 0.
 * On the input: the experts see a zero input, so the row is
 * sum_j expert_j(0) = sum_j (w2_j act(b13_j) + b2_j): 0 without biases,
 * the biases' response with them, the same for every such row. */
static void zero_logit_rows_case(moe_router_weight on, bool biases, bool expect_zero) {
  th_layer_spec s = spec(24, 40, 48, 8, 2, 0x6a0 + (uint64_t)on * 2 + biases);
  s.cfg.router_weight = on;
  s.w13_bias = s.w2_bias = biases;
  th_layer_data d;
  th_layer_data_make(&d, &s);
  const int64_t T = d.num_tokens, H = d.cfg.hidden_size, E = d.cfg.num_experts;
  /* Rows 3, 11, 19: all NaN; rows 5, 13: all -inf. */
  for (int64_t t = 3; t < T; t += 8)
    for (int64_t e = 0; e < E; ++e)
      d.logits[t * E + e] = NAN;
  for (int64_t t = 5; t < T; t += 8)
    for (int64_t e = 0; e < E; ++e)
      d.logits[t * E + e] = -INFINITY;
  uint16_t *out = th_malloc((size_t)(T * H) * 2);
  layer_run_on(th_ctx(), &d, out);
  check_layer_output(&d, out);
  const int64_t dead[] = {3, 5, 11, 13, 19};
  bool any_nonzero = false;
  for (size_t r = 0; r < sizeof dead / sizeof dead[0]; ++r) {
    const int64_t t = dead[r];
    for (int64_t h = 0; h < H; ++h) {
      const uint16_t v = out[t * H + h];
      if (expect_zero)
        TH_ASSERT(v == 0 || v == 0x8000, "token %lld has no logit above -inf, out[%lld] = %g",
                  (long long)t, (long long)h, (double)th_bf16_to_float(v));
      else
        TH_ASSERT(v == out[dead[0] * H + h],
                  "tokens %lld and %lld both route with weight 0 (same picks, zero input), "
                  "yet out[][%lld] = %g and %g",
                  (long long)dead[0], (long long)t, (long long)h,
                  (double)th_bf16_to_float(out[dead[0] * H + h]), (double)th_bf16_to_float(v));
      any_nonzero |= (v & 0x7fff) != 0;
    }
  }
  if (!expect_zero)
    TH_ASSERT(any_nonzero, "with biases and the weight on the input, the rows with no logit "
                           "above -inf are the biases' response, not 0");
  free(out);
  th_layer_data_free(&d);
}

Test(layer, rows_without_logits_on_output_give_zero) {
  zero_logit_rows_case(MOE_ROUTER_WEIGHT_ON_OUTPUT, true, true);
}

Test(layer, rows_without_logits_on_input_without_biases_give_zero) {
  zero_logit_rows_case(MOE_ROUTER_WEIGHT_ON_INPUT, false, true);
}

Test(layer, rows_without_logits_on_input_with_biases_give_bias_response) {
  zero_logit_rows_case(MOE_ROUTER_WEIGHT_ON_INPUT, true, false);
}

/* GeGLU with gates around -4, where gelu cancels (1 + tanh(x) for x near
 * -4): rounding gate and up to bf16 before the activation cost the OpenCL
 * layer a relative error of 0.048; every backend keeps them fp32 (moe.h,
 * "Numerics"), which stays within LAYER_BOUND. */
Test(layer, geglu_with_gates_in_the_cancelling_range) {
  th_layer_spec s = spec(33, 64, 96, 8, 2, 0x6b0);
  s.cfg.activation = MOE_ACTIVATION_GEGLU;
  s.w13_bias = true;
  th_layer_data d;
  th_layer_data_make(&d, &s);
  /* Without a map the data's num_local_experts is 0, meaning E. */
  const int64_t EL = d.cfg.num_local_experts ? d.cfg.num_local_experts : d.cfg.num_experts;
  const int64_t I = d.cfg.intermediate_size, H = d.cfg.hidden_size;
  /* Gates = -4 + a small dot product: the gate half of w13 (rows [0, I) of
   * each [2I][H] expert) scaled down, its bias -4. */
  for (int64_t e = 0; e < EL; ++e)
    for (int64_t i = 0; i < I; ++i) {
      d.w13_bias[e * 2 * I + i] = -4.0f;
      for (int64_t h = 0; h < H; ++h) {
        uint16_t *w = &d.w13[(e * 2 * I + i) * H + h];
        *w = th_float_to_bf16(0.02f * th_bf16_to_float(*w));
      }
    }
  uint16_t *out = th_malloc((size_t)(d.num_tokens * d.cfg.hidden_size) * 2);
  layer_run_on(th_ctx(), &d, out);
  const double err = check_layer_output(&d, out);
  cr_log_info("relative error %.3g", err);
  free(out);
  th_layer_data_free(&d);
}

Test(layer, tied_logits) {
  th_layer_spec s = spec(33, 67, 129, 16, 4, 0x643);
  s.logits = TH_LOGITS_TIES;
  layer_case(&s);
}

/* ---- Determinism ------------------------------------------------------ */

Test(layer, reruns_are_bitwise_identical) {
  th_layer_spec s = spec(100, 129, 67, 16, 4, 0x651);
  th_layer_data d;
  th_layer_data_make(&d, &s);
  const size_t bytes = (size_t)(100 * 129) * 2;
  uint16_t *first = th_malloc(bytes), *again = th_malloc(bytes);
  moe_context *ctx = th_ctx();
  moe_layer *layer = layer_create_on(ctx, &d);
  TH_OK(moe_layer_reserve(layer, 100));
  th_layer_forward_tokens(layer, ctx, &d, 0, 100, first);
  check_layer_output(&d, first);
  for (int run = 0; run < 3; ++run) {
    if (run == 1) th_layer_forward_tokens(layer, ctx, &d, 50, 7, again); /* other work in between */
    th_layer_forward_tokens(layer, ctx, &d, 0, 100, again);
    TH_ASSERT(memcmp(first, again, bytes) == 0, "rerun %d differs from the first run", run);
  }
  moe_layer_destroy(layer);
  /* A second layer of the same weights gives the same bits. */
  layer_run_on(ctx, &d, again);
  TH_ASSERT(memcmp(first, again, bytes) == 0, "a second layer of the same weights differs");
  free(first);
  free(again);
  th_layer_data_free(&d);
}

/* Backends that promise that a token's output does not depend on the other
 * tokens of its batch without the layer option (cpu: see
 * backends/cpu/cpu_backend.c); with moe_config.batch_invariant every
 * backend promises it. */
static bool promises_batch_invariance(moe_backend backend) {
  return backend == MOE_BACKEND_CPU;
}

/* A token's output computed alone, and in batches of other sizes and
 * offsets, against the batch of 200; `invariant` sets the layer option. */
static void batch_invariance_case(bool invariant, int64_t H, int64_t I, uint64_t seed) {
  const int64_t T = 200;
  th_layer_spec s = spec(T, H, I, 16, 4, seed);
  s.cfg.batch_invariant = invariant;
  th_layer_data d;
  th_layer_data_make(&d, &s);
  uint16_t *batch = th_malloc((size_t)(T * H) * 2), *part = th_malloc((size_t)(T * H) * 2);
  moe_context *ctx = th_ctx();
  moe_layer *layer = layer_create_on(ctx, &d);
  TH_OK(moe_layer_reserve(layer, T));
  th_layer_forward_tokens(layer, ctx, &d, 0, T, batch);
  check_layer_output(&d, batch);
  /* Alone, and in batches of other sizes and offsets. */
  const int64_t pieces[][2] = {{0, 1}, {57, 1}, {199, 1}, {3, 2}, {10, 33}, {100, 100}, {1, 199}};
  char differs[256] = "";
  for (size_t p = 0; p < sizeof pieces / sizeof pieces[0]; ++p) {
    const int64_t first = pieces[p][0], count = pieces[p][1];
    th_layer_forward_tokens(layer, ctx, &d, first, count, part);
    if (memcmp(part, batch + first * H, (size_t)(count * H) * 2) != 0)
      snprintf(differs + strlen(differs), sizeof differs - strlen(differs), " tokens [%lld, %lld)",
               (long long)first, (long long)(first + count));
  }
  moe_layer_destroy(layer);
  free(batch);
  free(part);
  th_layer_data_free(&d);
  if (*differs && !invariant && !promises_batch_invariance(moe_context_backend(ctx)))
    cr_skip_test("not supported on %s: batch invariance is not promised without the layer "
                 "option; computed apart, these differ in some bits from the batch of %lld:%s",
                 th_backend_name(), (long long)T, differs);
  TH_ASSERT(!*differs, "computed apart, these differ in some bits from the batch of %lld:%s",
            (long long)T, differs);
}

Test(layer, batch_invariance) {
  batch_invariance_case(false, 67, 129, 0x652);
}

/* moe_config.batch_invariant: every backend, odd sizes (the reference
 * kernels on GPUs) and sizes that are multiples of 8 (the tensor-core and
 * tiled kernels, which by default change with T). */
Test(layer, batch_invariance_option) {
  batch_invariance_case(true, 67, 129, 0x653);
  batch_invariance_case(true, 256, 384, 0x654);
}

/* ---- Reservation and T = 0 -------------------------------------------- */

Test(layer, zero_tokens_is_a_no_op) {
  th_layer_spec s = spec(1, 67, 129, 8, 2, 0x661);
  th_layer_data d;
  th_layer_data_make(&d, &s);
  moe_context *ctx = th_ctx();
  moe_layer *layer = layer_create_on(ctx, &d);
  moe_buffer *x = th_output(ctx, 0), *logits = th_output(ctx, 0), *out = th_output(ctx, 0);
  /* T = 0 needs no reservation and touches nothing. */
  TH_OK(moe_layer_forward(layer, 0, x, logits, out));
  TH_OK(moe_layer_reserve(layer, 4));
  TH_OK(moe_layer_forward(layer, 0, x, logits, out));
  th_check_untouched(out, "out");
  moe_buffer_destroy(x);
  moe_buffer_destroy(logits);
  moe_buffer_destroy(out);
  moe_layer_destroy(layer);
  th_layer_data_free(&d);
}

Test(layer, reservation_rules) {
  const int64_t T = 64, H = 67;
  th_layer_spec s = spec(T, H, 129, 8, 2, 0x662);
  th_layer_data d;
  th_layer_data_make(&d, &s);
  moe_context *ctx = th_ctx();
  uint16_t *out = th_malloc((size_t)(T * H) * 2), *full = th_malloc((size_t)(T * H) * 2);
  moe_layer *layer = layer_create_on(ctx, &d);
  moe_buffer *x = th_upload(ctx, d.x, (size_t)(T * H) * 2);
  moe_buffer *logits = th_upload(ctx, d.logits, (size_t)(T * 8) * 4);
  moe_buffer *b_out = th_output(ctx, (size_t)(T * H) * 2);

  /* Nothing reserved yet: any T > 0 is refused, and out is untouched. */
  moe_status st = moe_layer_forward(layer, 1, x, logits, b_out);
  TH_ASSERT(st == MOE_ERROR_NOT_RESERVED, "forward before any reserve returned %s",
            moe_status_string(st));
  TH_OK(moe_layer_reserve(layer, 16));
  st = moe_layer_forward(layer, 17, x, logits, b_out);
  TH_ASSERT(st == MOE_ERROR_NOT_RESERVED, "forward of 17 after reserve(16) returned %s",
            moe_status_string(st));
  TH_ASSERT(*moe_last_error(ctx), "NOT_RESERVED left no message");
  th_check_untouched(b_out, "out");

  /* T <= reserved works; a smaller reserve keeps the larger workspace. */
  th_layer_forward_tokens(layer, ctx, &d, 0, 16, out);
  TH_OK(moe_layer_reserve(layer, 8));
  th_layer_forward_tokens(layer, ctx, &d, 0, 16, full);
  TH_ASSERT(memcmp(out, full, (size_t)(16 * H) * 2) == 0,
            "reserve(8) after reserve(16) changed the result of 16 tokens");
  th_layer_forward_tokens(layer, ctx, &d, 0, 3, out);

  /* Growing: 64 tokens after 16, then all of them checked. */
  TH_OK(moe_layer_reserve(layer, T));
  th_layer_forward_tokens(layer, ctx, &d, 0, T, full);
  check_layer_output(&d, full);
  TH_ASSERT(memcmp(out, full, (size_t)(3 * H) * 2) == 0 ||
                !promises_batch_invariance(moe_context_backend(ctx)),
            "3 tokens before growing differ from the same tokens after");
  moe_buffer_destroy(x);
  moe_buffer_destroy(logits);
  moe_buffer_destroy(b_out);
  moe_layer_destroy(layer);
  free(out);
  free(full);
  th_layer_data_free(&d);
}

Test(layer, workspace_reuse_across_token_counts) {
  /* A large forward, then small ones on the same workspace: stale data of
   * the large one must not leak into the small ones. */
  th_layer_spec s = spec(300, 67, 129, 16, 4, 0x663);
  th_layer_data d;
  th_layer_data_make(&d, &s);
  moe_context *ctx = th_ctx();
  moe_layer *layer = layer_create_on(ctx, &d);
  TH_OK(moe_layer_reserve(layer, 300));
  uint16_t *out = th_malloc((size_t)(300 * 67) * 2);
  th_layer_forward_tokens(layer, ctx, &d, 0, 300, out);
  check_layer_output(&d, out);
  const int64_t counts[] = {1, 5, 33, 2};
  for (size_t i = 0; i < sizeof counts / sizeof counts[0]; ++i) {
    th_layer_data part = d;
    part.num_tokens = counts[i];
    part.x = d.x + 100 * 67;
    part.logits = d.logits + 100 * 16;
    th_layer_forward_tokens(layer, ctx, &d, 100, counts[i], out);
    const int64_t T = counts[i];
    double *ref = th_malloc((size_t)(T * 67) * sizeof(double));
    ref_layer_forward(&part.cfg, &part.weights, T, part.x, part.logits, true, ref);
    const double err = th_rel_error(out, ref, (size_t)(T * 67));
    TH_ASSERT(err <= LAYER_BOUND, "T=%lld after T=300: relative error %.3g", (long long)T, err);
    free(ref);
  }
  moe_layer_destroy(layer);
  free(out);
  th_layer_data_free(&d);
}

/* The data of a CPU-only bitwise comparison (skips on other backends): a
 * layer with both biases; returns the bytes of its output. */
static size_t cpu_case(th_layer_data *d, int64_t T, int64_t H, int64_t I, int32_t E, int32_t k,
                       uint64_t seed) {
  if (moe_context_backend(th_ctx()) != MOE_BACKEND_CPU)
    cr_skip_test("cpu only: compares runs of the CPU backend");
  th_layer_spec s = spec(T, H, I, E, k, seed);
  s.w13_bias = s.w2_bias = true;
  th_layer_data_make(d, &s);
  return (size_t)(T * H) * 2;
}

/* The CPU backend's bits do not depend on its thread count: on at most 2
 * threads its GEMMs sweep K in blocks of 128 k-pairs, on more in blocks of
 * 256 (backends/cpu/cpu_gemm.c), and every item is run by whichever thread
 * is free. */
Test(layer, cpu_thread_counts_agree_bitwise) {
  th_layer_data d;
  const size_t bytes = cpu_case(&d, 200, 600, 300, 8, 2, 0x672);
  const int thread_counts[3] = {1, 2, 5};
  uint16_t *out[3];
  const int saved = omp_get_max_threads();
  for (int i = 0; i < 3; ++i) {
    out[i] = th_malloc(bytes);
    omp_set_num_threads(thread_counts[i]);
    layer_run_on(th_ctx(), &d, out[i]);
  }
  omp_set_num_threads(saved);
  check_layer_output(&d, out[0]);
  for (int i = 1; i < 3; ++i)
    TH_ASSERT(memcmp(out[0], out[i], bytes) == 0, "%d threads differ from 1", thread_counts[i]);
  for (int i = 0; i < 3; ++i)
    free(out[i]);
  th_layer_data_free(&d);
}

/* The CPU backend promises that its portable and AVX-512F kernel paths
 * agree bit for bit (backends/cpu/cpu_kernels.h). */
Test(layer, cpu_kernel_paths_agree_bitwise) {
  th_layer_data d;
  const size_t bytes = cpu_case(&d, 65, 129, 67, 16, 4, 0x671);
  uint16_t *out[2] = {th_malloc(bytes), th_malloc(bytes)};
  const char *paths[2] = {"portable", "avx512"};
  for (int p = 0; p < 2; ++p) {
    moe_context *ctx = NULL;
    TH_OK(moe_context_create(MOE_BACKEND_CPU, 0, &ctx));
    const moe_status st = moe_context_set_option(ctx, "cpu.kernels", paths[p]);
    if (st == MOE_ERROR_UNSUPPORTED) {
      moe_context_destroy(ctx);
      cr_skip_test("not supported on this machine: no %s kernel path", paths[p]);
    }
    TH_OK(st);
    TH_ASSERT(strstr(moe_context_device_name(ctx), paths[p]),
              "cpu.kernels = %s, but the device name is \"%s\"", paths[p],
              moe_context_device_name(ctx));
    layer_run_on(ctx, &d, out[p]);
    moe_context_destroy(ctx);
  }
  check_layer_output(&d, out[0]);
  TH_ASSERT(memcmp(out[0], out[1], bytes) == 0, "the portable and avx512 paths differ");
  free(out[0]);
  free(out[1]);
  th_layer_data_free(&d);
}
