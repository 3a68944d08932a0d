/*
 * test_opencl_kernels.c - every grouped-GEMM kernel variant of the OpenCL
 * backend against the float64 reference, each forced in turn with the
 * option opencl.skinny, so that variants the device would not pick by default
 * (the GPU ones on PoCL) are still checked in CI. Skipped unless
 * MOE_TEST_BACKEND=opencl.
 */
#include "harness.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char *const variants[] = {"auto",     "64x4x1u2", "64x4x4",
                                       "64x4x4u2", "64x8x4",   "128x4x8"};

Test(opencl_kernels, skinny_variants_match_reference) {
  const char *backend = getenv("MOE_TEST_BACKEND");
  if (!backend || strcmp(backend, "opencl") != 0)
    cr_skip_test("OpenCL kernel variants run only with MOE_TEST_BACKEND=opencl");
  moe_context *ctx = th_ctx();
  /* K = 4104 runs the unrolled main loop of every variant and the 8-wide tail. */
  const int64_t T = 13, N = 72, K = 4104;
  const int32_t E = 4, k = 2, BM = 16;
  th_case("T=%lld N=%lld K=%lld E=%d k=%d block_m=%d", (long long)T, (long long)N, (long long)K,
          (int)E, (int)k, (int)BM);
  th_rng rng = th_rng_make(0x5eed);
  uint16_t *x = th_malloc((size_t)(T * K) * 2), *w = th_malloc((size_t)(E * N * K) * 2);
  th_fill_bf16(&rng, x, (size_t)(T * K), 1.0);
  th_fill_bf16(&rng, w, (size_t)(E * N * K), 1.0 / sqrt((double)K));
  int32_t ids[13 * 2];
  for (int s = 0; s < T * k; ++s)
    ids[s] = (int32_t)((s * 7 + s / k) % E);
  int64_t sorted_capacity, block_capacity;
  TH_OK(moe_align_capacity(T, k, E, BM, &sorted_capacity, &block_capacity));
  int32_t *sorted = th_malloc((size_t)sorted_capacity * 4);
  int32_t *expert_ids = th_malloc((size_t)block_capacity * 4), padded;
  ref_align(T, k, E, E, BM, ids, NULL, sorted, expert_ids, &padded);

  moe_buffer *b_x = th_upload(ctx, x, (size_t)(T * K) * 2);
  moe_buffer *b_w = th_upload(ctx, w, (size_t)(E * N * K) * 2);
  moe_buffer *b_sorted = th_upload(ctx, sorted, (size_t)sorted_capacity * 4);
  moe_buffer *b_experts = th_upload(ctx, expert_ids, (size_t)block_capacity * 4);
  moe_buffer *b_padded = th_upload(ctx, &padded, 4);
  const size_t c_bytes = (size_t)(T * k * N) * 2;
  moe_buffer *b_c = th_output(ctx, c_bytes);
  uint16_t *c = th_malloc(c_bytes);

  double *want = th_malloc((size_t)(T * k * N) * sizeof(double));
  for (int64_t s = 0; s < T * k; ++s)
    for (int64_t col = 0; col < N; ++col) {
      double acc = 0;
      for (int64_t i = 0; i < K; ++i)
        acc += ref_bf16_to_double(x[(s / k) * K + i]) *
               ref_bf16_to_double(w[((int64_t)ids[s] * N + col) * K + i]);
      want[s * N + col] = acc;
    }

  const moe_gemm_desc desc = {.num_tokens = T,
                              .top_k = k,
                              .num_local_experts = E,
                              .n = N,
                              .k = K,
                              .block_m = BM,
                              .b_layout = MOE_WEIGHT_LAYOUT_OUT_IN,
                              .input = MOE_GEMM_INPUT_PER_TOKEN,
                              .routed_weight = MOE_GEMM_ROUTED_WEIGHT_NONE};
  for (size_t v = 0; v < sizeof variants / sizeof variants[0]; ++v) {
    TH_OK(moe_context_set_option(ctx, "opencl.skinny", variants[v]));
    th_refill(b_c);
    TH_OK(moe_grouped_gemm(ctx, &desc, b_x, b_w, NULL, b_sorted, b_experts, b_padded, NULL, b_c));
    th_download(b_c, c, c_bytes);
    th_check_guard(b_c, c_bytes, "c");
    double num = 0, den = 0;
    for (int64_t i = 0; i < T * k * N; ++i) {
      const double d = ref_bf16_to_double(c[i]) - want[i];
      num += d * d;
      den += want[i] * want[i];
    }
    const double err = sqrt(num / den);
    TH_ASSERT(err < 1e-2, "variant %s: relative error %g", variants[v], err);
  }
  TH_OK(moe_context_set_option(ctx, "opencl.skinny", "auto"));
  moe_buffer *buffers[] = {b_x, b_w, b_sorted, b_experts, b_padded, b_c};
  for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; ++i)
    moe_buffer_destroy(buffers[i]);
  free(x);
  free(w);
  free(sorted);
  free(expert_ids);
  free(c);
  free(want);
}

/* The work-group-per-token routing kernel (the GPU default for many
 * experts), forced on any device, against the float64 reference. */
Test(opencl_kernels, parallel_route_matches_reference) {
  const char *backend = getenv("MOE_TEST_BACKEND");
  if (!backend || strcmp(backend, "opencl") != 0)
    cr_skip_test("OpenCL kernel variants run only with MOE_TEST_BACKEND=opencl");
  moe_context *ctx = th_ctx();
  TH_OK(moe_context_set_option(ctx, "opencl.route", "parallel"));
  enum { T = 37, E = 160, K = 8 };
  for (int variant = 0; variant < 2; ++variant) {
    moe_config cfg = th_config(64, 64, E, K);
    cfg.renormalize = 1;
    const int with_bias = variant == 1;
    if (with_bias) {
      cfg.scoring = MOE_SCORING_SIGMOID;
      cfg.routed_scaling_factor = 2.5f;
    }
    th_case("parallel route T=%d E=%d k=%d %s", T, E, K, with_bias ? "sigmoid+bias" : "softmax");
    th_rng rng = th_rng_make(0x77 + (uint64_t)variant);
    float *logits = th_malloc(sizeof(float) * T * E), bias[E];
    th_fill_f32(&rng, logits, (size_t)T * E, 1.0);
    th_fill_f32(&rng, bias, E, 0.1);
    moe_buffer *b_logits = th_upload(ctx, logits, sizeof(float) * T * E);
    moe_buffer *b_bias = th_upload(ctx, bias, sizeof bias);
    moe_buffer *b_ids = th_output(ctx, 4 * T * K), *b_weights = th_output(ctx, 4 * T * K);
    TH_OK(moe_route(ctx, &cfg, T, b_logits, with_bias ? b_bias : NULL, b_ids, b_weights));
    int32_t ids[T * K], want_ids[T * K];
    float weights[T * K];
    double want_weights[T * K];
    th_download(b_ids, ids, sizeof ids);
    th_download(b_weights, weights, sizeof weights);
    th_check_guard(b_ids, sizeof ids, "topk_ids");
    ref_route(&cfg, T, logits, with_bias ? bias : NULL, want_ids, want_weights);
    for (int s = 0; s < T * K; ++s) {
      TH_ASSERT(ids[s] == want_ids[s], "slot %d: id %d, want %d", s, ids[s], want_ids[s]);
      TH_ASSERT(fabs(weights[s] - want_weights[s]) <= 1e-5 * (1 + fabs(want_weights[s])),
                "slot %d: weight %g, want %g", s, weights[s], want_weights[s]);
    }
    moe_buffer *buffers[] = {b_logits, b_bias, b_ids, b_weights};
    for (size_t i = 0; i < 4; ++i)
      moe_buffer_destroy(buffers[i]);
    free(logits);
  }
  TH_OK(moe_context_set_option(ctx, "opencl.route", "auto"));
}
