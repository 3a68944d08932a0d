/*
 * test_options.c - the context options (moe_context_set_option and
 * moe_context_get_option) and moe_layer_describe, on every backend: every
 * documented option takes its documented values and reads them back; each
 * value of the backend under test still gives the float64 reference's
 * answer (a forced kernel must be a correct one); the options a forward
 * runs with show in its description; and the description names the
 * backend. Argument errors are rows of test_errors.c.
 */
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

TestSuite(options, .fini = th_suite_fini);

/* Every option of include/moe.h with each of its values, default first. */
typedef struct option_values {
  const char *name;
  moe_backend backend;
  const char *values[14];
} option_values;

static const option_values documented[] = {
    {"cpu.kernels", MOE_BACKEND_CPU, {"auto", "portable", "avx512", "avx512bf16", "amx"}},
    {"opencl.route", MOE_BACKEND_OPENCL, {"auto", "serial", "parallel"}},
    {"opencl.skinny",
     MOE_BACKEND_OPENCL,
     {"auto", "64x4x1u2", "64x4x4", "64x4x4u2", "64x8x4", "128x4x8"}},
    {"opencl.skinny_max_rows", MOE_BACKEND_OPENCL, {"64", "0", "1000"}},
    {"cuda.path", MOE_BACKEND_CUDA, {"auto", "decode", "stream", "wgmma", "mma"}},
    {"cuda.tile",
     MOE_BACKEND_CUDA,
     {"auto", "gemv", "16x32", "16x64", "16x64k64", "16x128", "16x32k256", "32x64", "32x128",
      "64x128", "128x128", "128x128k64", "128x256"}},
    {"cuda.gemv_max_rows", MOE_BACKEND_CUDA, {"1", "0", "64"}},
    {"cuda.routing", MOE_BACKEND_CUDA, {"auto", "warp", "reference", "rank"}},
    {"cuda.decode_pdl", MOE_BACKEND_CUDA, {"on", "off"}},
    {"cuda.stream_block", MOE_BACKEND_CUDA, {"auto", "16", "32", "64", "128"}},
    {"cuda.stream_overlap", MOE_BACKEND_CUDA, {"on", "off"}},
    {"cuda.stream_ctas", MOE_BACKEND_CUDA, {"2", "1"}},
    {"cuda.decode_persistent", MOE_BACKEND_CUDA, {"on", "off"}},
    {"cuda.wgmma_bn", MOE_BACKEND_CUDA, {"auto", "128", "256"}},
    {"cuda.pdl", MOE_BACKEND_CUDA, {"off", "on"}},
    {"cuda.stream_max_rows", MOE_BACKEND_CUDA, {"auto", "0", "7", "31"}},
    {"cuda.wgmma_min_rows", MOE_BACKEND_CUDA, {"auto", "1", "32", "64"}},
    {"cuda.stream_schedule", MOE_BACKEND_CUDA, {"static", "dynamic"}},
    {"cuda.stream_group", MOE_BACKEND_CUDA, {"auto", "1", "8"}},
    {"cuda.wgmma_gather", MOE_BACKEND_CUDA, {"auto", "off", "on"}},
    {"cuda.stream_k", MOE_BACKEND_CUDA, {"auto", "128", "256"}},
    {"cuda.wgmma_bm", MOE_BACKEND_CUDA, {"auto", "128", "64"}},
};
#define DOCUMENTED (sizeof documented / sizeof documented[0])

static void expect_value(moe_context *ctx, const char *name, const char *want) {
  char got[64] = "";
  TH_OK(moe_context_get_option(ctx, name, got, sizeof got));
  TH_ASSERT(strcmp(got, want) == 0, "option %s reads \"%s\", want \"%s\"", name, got, want);
}

/* A fresh context of the backend under test, without MOE_TEST_OPTIONS. */
static moe_context *fresh_ctx(void) {
  moe_context *ctx = NULL;
  TH_OK(moe_context_create(moe_context_backend(th_ctx()), 0, &ctx));
  return ctx;
}

Test(options, defaults_and_every_value_read_back) {
  moe_context *ctx = fresh_ctx();
  for (size_t i = 0; i < DOCUMENTED; ++i)
    expect_value(ctx, documented[i].name, documented[i].values[0]);
  for (size_t i = 0; i < DOCUMENTED; ++i)
    for (size_t v = 0; v < 14 && documented[i].values[v]; ++v) {
      const option_values *o = &documented[i];
      th_case("option %s = %s", o->name, o->values[v]);
      const moe_status st = moe_context_set_option(ctx, o->name, o->values[v]);
      /* A valid value may be beyond this device (cpu.kernels=amx without
       * AMX): refused, the old value kept. */
      if (st == MOE_ERROR_UNSUPPORTED && o->backend == moe_context_backend(ctx)) {
        TH_ASSERT(*moe_last_error(ctx), "UNSUPPORTED without a message");
        expect_value(ctx, o->name, o->values[0]);
        continue;
      }
      TH_OK(st);
      expect_value(ctx, o->name, o->values[v]);
      TH_OK(moe_context_set_option(ctx, o->name, o->values[0]));
    }
  moe_context_destroy(ctx);
}

Test(options, unknown_names_and_values_are_refused_with_a_message) {
  moe_context *ctx = fresh_ctx();
  /* "auto" only where the integer option's default is auto. */
  const char *bad[][2] = {{"cuda.paths", "mma"},
                          {"CUDA.path", "mma"},
                          {"cpu.kernels", "sse2"},
                          {"cuda.tile", "8x8"},
                          {"cuda.pdl", "1"},
                          {"opencl.route", "auto "},
                          {"cuda.gemv_max_rows", "auto"},
                          {"cuda.wgmma_min_rows", "0"},
                          {"cuda.stream_max_rows", "-1"}};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; ++i) {
    th_case("option %s = %s", bad[i][0], bad[i][1]);
    const moe_status st = moe_context_set_option(ctx, bad[i][0], bad[i][1]);
    TH_ASSERT(st == MOE_ERROR_INVALID_ARGUMENT, "returned %s", moe_status_string(st));
    TH_ASSERT(strstr(moe_last_error(ctx), bad[i][0]) || strstr(moe_last_error(ctx), bad[i][1]),
              "the message \"%s\" names neither the option nor the value", moe_last_error(ctx));
  }
  expect_value(ctx, "cuda.path", "auto");
  expect_value(ctx, "cpu.kernels", "auto");
  moe_context_destroy(ctx);
}

/* ---- Each value of the backend's own options runs correctly ------------ */

static void layer_forward_checked(moe_context *ctx, const th_layer_data *d, const char *what) {
  const int64_t T = d->num_tokens, H = d->cfg.hidden_size, E = d->cfg.num_experts;
  moe_layer *layer = NULL;
  TH_OK(moe_layer_create(ctx, &d->cfg, &d->weights, &layer));
  TH_OK(moe_layer_reserve(layer, T));
  moe_buffer *x = th_upload(ctx, d->x, (size_t)(T * H) * 2);
  moe_buffer *logits = th_upload(ctx, d->logits, (size_t)(T * E) * sizeof(float));
  moe_buffer *out = th_output(ctx, (size_t)(T * H) * 2);
  TH_OK(moe_layer_forward(layer, T, x, logits, out));
  uint16_t *got = th_malloc((size_t)(T * H) * 2);
  th_download(out, got, (size_t)(T * H) * 2);
  th_check_guard(out, (size_t)(T * H) * 2, "out");
  double *ref = th_malloc((size_t)(T * H) * sizeof(double));
  ref_layer_forward(&d->cfg, &d->weights, T, d->x, d->logits, true, ref);
  const double err = th_rel_error(got, ref, (size_t)(T * H));
  TH_ASSERT(err <= 1e-2, "%s: relative error %.3g vs the float64 reference", what, err);
  free(ref);
  free(got);
  moe_buffer_destroy(x);
  moe_buffer_destroy(logits);
  moe_buffer_destroy(out);
  moe_layer_destroy(layer);
}

Test(options, every_value_of_the_backend_gives_the_reference_answer) {
  moe_context *ctx = fresh_ctx();
  /* Sizes multiples of 8 (the vector kernels can run), 1 and 40 tokens. */
  th_layer_data d[2];
  const int64_t tokens[2] = {1, 40};
  for (int i = 0; i < 2; ++i) {
    th_layer_spec s = {.num_tokens = tokens[i], .seed = 0x0a10 + (uint64_t)i};
    s.cfg = th_config(128, 192, 8, 2);
    s.cfg.renormalize = 1;
    th_layer_data_make(&d[i], &s);
  }
  size_t ran = 0;
  for (size_t o = 0; o < DOCUMENTED; ++o) {
    if (documented[o].backend != moe_context_backend(ctx)) continue;
    for (size_t v = 1; v < 14 && documented[o].values[v]; ++v) {
      const char *name = documented[o].name, *value = documented[o].values[v];
      const moe_status st = moe_context_set_option(ctx, name, value);
      if (st == MOE_ERROR_UNSUPPORTED) continue; /* not on this device */
      TH_OK(st);
      char what[96];
      snprintf(what, sizeof what, "%s = %s", name, value);
      for (int i = 0; i < 2; ++i) {
        th_case("%s T=%lld", what, (long long)tokens[i]);
        layer_forward_checked(ctx, &d[i], what);
      }
      ++ran;
      TH_OK(moe_context_set_option(ctx, name, documented[o].values[0]));
    }
  }
  TH_ASSERT(ran > 0, "no option of %s ran", th_backend_name());
  th_layer_data_free(&d[0]);
  th_layer_data_free(&d[1]);
  moe_context_destroy(ctx);
}

/* ---- moe_layer_describe ------------------------------------------------ */

static void describe(moe_layer *layer, int64_t T, char *text, size_t size) {
  TH_OK(moe_layer_describe(layer, T, text, size));
  TH_ASSERT(strlen(text) > 20, "the description of T=%lld is \"%s\"", (long long)T, text);
  const char *backend = th_backend_name();
  TH_ASSERT(strncmp(text, backend, strlen(backend)) == 0,
            "the description \"%s\" does not start with the backend %s", text, backend);
}

Test(options, describe_names_the_backend_and_the_options) {
  moe_context *ctx = fresh_ctx();
  th_layer_spec s = {.num_tokens = 1, .seed = 0x0a20};
  s.cfg = th_config(128, 192, 8, 2);
  th_layer_data d;
  th_layer_data_make(&d, &s);
  moe_layer *layer = NULL;
  TH_OK(moe_layer_create(ctx, &d.cfg, &d.weights, &layer));
  TH_OK(moe_layer_reserve(layer, 512));
  char text[1024];
  const int64_t tokens[] = {1, 7, 512, 100000};
  for (size_t i = 0; i < sizeof tokens / sizeof tokens[0]; ++i) {
    describe(layer, tokens[i], text, sizeof text);
    cr_log_info("T=%lld: %s", (long long)tokens[i], text);
  }
  /* An option the plan follows shows in the description. */
  const char *name = NULL, *value = NULL, *shows = NULL;
  switch (moe_context_backend(ctx)) {
  case MOE_BACKEND_CPU:
    name = "cpu.kernels", value = "portable", shows = "portable";
    break;
  case MOE_BACKEND_OPENCL:
    name = "opencl.skinny", value = "64x8x4", shows = "64x8x4";
    break;
  default:
    name = "cuda.path", value = "mma", shows = "mma.sync";
    break;
  }
  describe(layer, 1, text, sizeof text);
  /* (A CPU whose fastest path is the portable one shows it already.) */
  if (!strstr(moe_context_device_name(ctx), "[portable]"))
    TH_ASSERT(!strstr(text, shows), "before %s = %s the description already shows %s: \"%s\"", name,
              value, shows, text);
  TH_OK(moe_context_set_option(ctx, name, value));
  describe(layer, 1, text, sizeof text);
  TH_ASSERT(strstr(text, shows), "after %s = %s the description does not show %s: \"%s\"", name,
            value, shows, text);
  /* Exactly the length it needs, plus the NUL. */
  const size_t need = strlen(text) + 1;
  char exact[1024];
  TH_OK(moe_layer_describe(layer, 1, exact, need));
  TH_ASSERT(strcmp(exact, text) == 0, "with %zu bytes: \"%s\"", need, exact);
  const moe_status st = moe_layer_describe(layer, 1, exact, need - 1);
  TH_ASSERT(st == MOE_ERROR_BUFFER_TOO_SMALL, "with %zu bytes: %s", need - 1,
            moe_status_string(st));
  moe_layer_destroy(layer);
  th_layer_data_free(&d);
  moe_context_destroy(ctx);
}

/* A batch-invariant layer describes one plan for every T: the text after
 * the capacities (the kernels) is the same for 1 and 500 tokens. */
Test(options, batch_invariant_layer_describes_one_plan) {
  moe_context *ctx = fresh_ctx();
  th_layer_spec s = {.num_tokens = 1, .seed = 0x0a30};
  s.cfg = th_config(128, 192, 8, 2);
  s.cfg.batch_invariant = 1;
  th_layer_data d;
  th_layer_data_make(&d, &s);
  moe_layer *layer = NULL;
  TH_OK(moe_layer_create(ctx, &d.cfg, &d.weights, &layer));
  TH_OK(moe_layer_reserve(layer, 500));
  char one[1024], many[1024];
  describe(layer, 1, one, sizeof one);
  describe(layer, 500, many, sizeof many);
  TH_ASSERT(strstr(one, "batch invariant"), "\"%s\" does not say batch invariant", one);
  const char *kernels_one = strstr(one, "GEMM1"), *kernels_many = strstr(many, "GEMM1");
  TH_ASSERT(kernels_one && kernels_many && strcmp(kernels_one, kernels_many) == 0,
            "the kernels differ between T=1 (\"%s\") and T=500 (\"%s\")", one, many);
  moe_layer_destroy(layer);
  th_layer_data_free(&d);
  moe_context_destroy(ctx);
}
