/*
 * moe_tune - runs moe_layer_tune on a model shape, prints each candidate's
 * time per token count and the choice, writes the table file, then loads
 * it into a fresh layer and checks that at each swept count the tuned
 * forward's time is within 3% of the best candidate's.
 *
 *   moe_tune [--backend cpu|cuda|opencl] [--model NAME] [--hidden H
 *            --intermediate I --experts E --topk K] [--tokens 1,8,64]
 *            [--candidates "a=b;c=d,e=f"] [--out FILE] [--reps N]
 *
 * Candidates are separated by ';' (one candidate may set several options,
 * comma-separated); the default is every value of the backend's kernel-path
 * option (cpu.kernels, opencl.skinny, cuda.path). Exit status: 0 on success
 * (a verification beyond 3% is reported, not failed: timings are noisy),
 * 1 on a library error, 2 on bad usage.
 */
#include "bench_models.h"
#include "bench_random.h"
#include "bench_time.h"
#include "moe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_CANDIDATES 32

static int usage(void) {
  fprintf(stderr, "usage: moe_tune [--backend cpu|cuda|opencl] [--model NAME] [--hidden H "
                  "--intermediate I --experts E --topk K]\n"
                  "                [--tokens 1,8,64] [--candidates \"a=b;c=d,e=f\"] [--out FILE] "
                  "[--reps N]\n");
  return 2;
}

#define CHECK(call)                                                                                \
  do {                                                                                             \
    moe_status st_ = (call);                                                                       \
    if (st_ != MOE_SUCCESS) {                                                                      \
      fprintf(stderr, "moe_tune: %s: %s: %s\n", #call, moe_status_string(st_),                     \
              moe_last_error(ctx));                                                                \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

int main(int argc, char **argv) {
  moe_backend backend = MOE_BACKEND_AUTO;
  const char *model_name = "qwen3-30b-a3b", *out_path = "moe_tuning.txt";
  int64_t hidden = 0, inter = 0;
  int32_t experts = 0, topk = 0;
  int64_t tokens[MOE_TUNING_MAX_POINTS];
  int n_tokens = 0, reps = 7;
  char *cand_text = NULL;
  for (int i = 1; i < argc; ++i) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!v) return usage();
    ++i;
    if (strcmp(a, "--backend") == 0)
      backend = strcmp(v, "cpu") == 0      ? MOE_BACKEND_CPU
                : strcmp(v, "cuda") == 0   ? MOE_BACKEND_CUDA
                : strcmp(v, "opencl") == 0 ? MOE_BACKEND_OPENCL
                                           : MOE_BACKEND_AUTO;
    else if (strcmp(a, "--model") == 0)
      model_name = v;
    else if (strcmp(a, "--hidden") == 0)
      hidden = atoll(v);
    else if (strcmp(a, "--intermediate") == 0)
      inter = atoll(v);
    else if (strcmp(a, "--experts") == 0)
      experts = atoi(v);
    else if (strcmp(a, "--topk") == 0)
      topk = atoi(v);
    else if (strcmp(a, "--out") == 0)
      out_path = v;
    else if (strcmp(a, "--reps") == 0)
      reps = atoi(v);
    else if (strcmp(a, "--candidates") == 0)
      cand_text = strdup(v);
    else if (strcmp(a, "--tokens") == 0) {
      char *copy = strdup(v);
      for (char *p = strtok(copy, ","); p && n_tokens < MOE_TUNING_MAX_POINTS;
           p = strtok(NULL, ","))
        tokens[n_tokens++] = atoll(p);
      free(copy);
    } else
      return usage();
  }
  if (reps < 1) return usage();
  if (!n_tokens) {
    const int64_t def[] = {1, 4, 16, 64, 256};
    for (int i = 0; i < 5; ++i)
      tokens[n_tokens++] = def[i];
  }
  bench_model model;
  if (hidden || inter || experts || topk) {
    if (hidden < 1 || inter < 1 || experts < 1 || topk < 1) return usage();
    model = bench_model_custom(hidden, inter, experts, topk);
  } else {
    const bench_model *m = bench_model_find(model_name);
    if (!m) {
      fprintf(stderr, "moe_tune: unknown model %s\n", model_name);
      return 2;
    }
    model = *m;
  }

  moe_context *ctx = NULL;
  CHECK(moe_context_create(backend, 0, &ctx));
  backend = moe_context_backend(ctx);

  /* Candidates: given, or every value of the backend's kernel option. */
  const char *cands[MAX_CANDIDATES];
  int nc = 0;
  if (!cand_text) {
    const char *list = backend == MOE_BACKEND_CPU ? "cpu.kernels=auto;cpu.kernels=portable;cpu."
                                                    "kernels=avx512;cpu.kernels=avx512bf16;cpu."
                                                    "kernels=amx"
                       : backend == MOE_BACKEND_OPENCL
                           ? "opencl.skinny=auto;opencl.skinny=64x4x1u2;opencl.skinny=64x4x4;"
                             "opencl.skinny=64x4x4u2;opencl.skinny=64x8x4;opencl.skinny=128x4x8"
                           : "cuda.path=auto;cuda.path=decode;cuda.path=stream;cuda.path=wgmma;"
                             "cuda.path=mma";
    cand_text = strdup(list);
  }
  for (char *p = strtok(cand_text, ";"); p && nc < MAX_CANDIDATES; p = strtok(NULL, ";"))
    cands[nc++] = p;

  /* The layer: random weights of the shape. */
  const moe_config *cfg = &model.cfg;
  const int64_t H = cfg->hidden_size, I = cfg->intermediate_size;
  const int32_t E = cfg->num_experts;
  const size_t w13_n = (size_t)E * 2 * (size_t)I * (size_t)H,
               w2_n = (size_t)E * (size_t)H * (size_t)I;
  uint16_t *w13 = malloc(w13_n * 2), *w2 = malloc(w2_n * 2);
  float *b13 = NULL, *b2 = NULL, *corr = NULL;
  if (!w13 || !w2) {
    fprintf(stderr, "moe_tune: out of host memory for the weights\n");
    return 1;
  }
  bench_random_bf16(w13, w13_n, 1.0f / sqrtf((float)H), 11);
  bench_random_bf16(w2, w2_n, 1.0f / sqrtf((float)I), 12);
  moe_weights weights = {.w13 = w13, .w2 = w2};
  if (model.has_biases) {
    b13 = malloc((size_t)E * 2 * (size_t)I * sizeof *b13);
    b2 = malloc((size_t)E * (size_t)H * sizeof *b2);
    bench_random_f32(b13, (size_t)E * 2 * (size_t)I, 0.1f, 13);
    bench_random_f32(b2, (size_t)E * (size_t)H, 0.1f, 14);
    weights.w13_bias = b13;
    weights.w2_bias = b2;
  }
  if (model.has_correction_bias) {
    corr = malloc((size_t)E * sizeof *corr);
    bench_random_f32(corr, (size_t)E, 0.1f, 15);
    weights.correction_bias = corr;
  }
  moe_layer *layer = NULL, *check = NULL;
  CHECK(moe_layer_create(ctx, cfg, &weights, &layer));
  CHECK(moe_layer_create(ctx, cfg, &weights, &check));
  printf("moe_tune: %s on %s (%s), H=%lld I=%lld E=%d k=%d, %d candidates\n", model.name,
         moe_backend_name(backend), moe_context_device_name(ctx), (long long)H, (long long)I,
         (int)E, (int)cfg->top_k, nc);

  double *times = malloc((size_t)n_tokens * (size_t)nc * sizeof *times);
  CHECK(moe_layer_tune(layer, tokens, n_tokens, cands, nc, times));
  CHECK(moe_layer_save_tuning(layer, out_path));

  printf("%8s", "T");
  for (int c = 0; c < nc; ++c)
    printf(" %14.14s", strchr(cands[c], '=') + 1);
  printf("  choice (ms: medians)\n");
  for (int i = 0; i < n_tokens; ++i) {
    printf("%8lld", (long long)tokens[i]);
    for (int c = 0; c < nc; ++c) {
      const double t = times[(size_t)i * (size_t)nc + (size_t)c];
      if (isnan(t))
        printf(" %14s", "-");
      else
        printf(" %14.4f", t);
    }
    int64_t from;
    char choice[128];
    CHECK(moe_layer_tuning_entry(layer, i, &from, choice, sizeof choice));
    printf("  %s\n", choice);
  }
  printf("wrote %s\n", out_path);

  /* Verification: the file loaded into a fresh layer, timed per point. */
  CHECK(moe_layer_load_tuning(check, out_path));
  const int64_t T_max = tokens[n_tokens - 1];
  CHECK(moe_layer_reserve(check, T_max));
  uint16_t *hx = malloc((size_t)T_max * (size_t)H * 2);
  float *hl = malloc((size_t)T_max * (size_t)E * sizeof *hl);
  bench_random_bf16(hx, (size_t)T_max * (size_t)H, 1.0f, 21);
  bench_random_f32(hl, (size_t)T_max * (size_t)E, 1.0f, 22);
  moe_buffer *x = NULL, *logits = NULL, *out = NULL;
  CHECK(moe_buffer_create(ctx, (size_t)T_max * (size_t)H * 2, &x));
  CHECK(moe_buffer_create(ctx, (size_t)T_max * (size_t)E * sizeof *hl, &logits));
  CHECK(moe_buffer_create(ctx, (size_t)T_max * (size_t)H * 2, &out));
  CHECK(moe_buffer_write(x, 0, hx, (size_t)T_max * (size_t)H * 2));
  CHECK(moe_buffer_write(logits, 0, hl, (size_t)T_max * (size_t)E * sizeof *hl));
  double *samples = malloc((size_t)reps * sizeof *samples);
  int within = 0;
  printf("%8s %14s %14s %8s\n", "T", "best (ms)", "loaded (ms)", "ratio");
  for (int i = 0; i < n_tokens; ++i) {
    double best = INFINITY;
    for (int c = 0; c < nc; ++c) {
      const double t = times[(size_t)i * (size_t)nc + (size_t)c];
      if (!isnan(t) && t < best) best = t;
    }
    for (int r = 0; r < 2 + reps; ++r) {
      CHECK(moe_context_synchronize(ctx));
      const double t0 = bench_seconds();
      CHECK(moe_layer_forward(check, tokens[i], x, logits, out));
      CHECK(moe_context_synchronize(ctx));
      if (r >= 2) samples[r - 2] = 1e3 * (bench_seconds() - t0);
    }
    const double loaded = bench_median(samples, reps), ratio = loaded / best;
    within += ratio <= 1.03;
    printf("%8lld %14.4f %14.4f %8.3f%s\n", (long long)tokens[i], best, loaded, ratio,
           ratio <= 1.03 ? "" : "  (beyond 3%)");
  }
  printf("loaded table: %d of %d points within 3%% of the best candidate\n", within, n_tokens);

  moe_buffer_destroy(x);
  moe_buffer_destroy(logits);
  moe_buffer_destroy(out);
  moe_layer_destroy(layer);
  moe_layer_destroy(check);
  moe_context_destroy(ctx);
  free(samples);
  free(hx);
  free(hl);
  free(times);
  free(cand_text);
  free(w13);
  free(w2);
  free(b13);
  free(b2);
  free(corr);
  return 0;
}
