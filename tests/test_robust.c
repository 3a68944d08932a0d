/*
 * test_robust.c - the robustness promises of include/moe.h on every backend:
 *   - metadata: moe_grouped_gemm and moe_topk_reduce on caller-made garbage
 *     (expert ids outside [0, EL), slot ids outside [0, T*k), a huge or
 *     negative num_tokens_post_padded, expert-map entries out of range)
 *     stay inside their buffers (guard bytes; ASan in scripts/sanitize.sh),
 *     write exactly the rows the documented clamping rule names, and
 *     compute those rows right (float64 reference);
 *   - numerics: the activations keep NaN as NaN and agree with float64 on
 *     special values and in cancelling and saturating ranges;
 *   - threads: N threads forwarding one shared layer, each with its own
 *     buffers, give the single-threaded output bit for bit.
 */
#include "harness.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

TestSuite(robust, .fini = th_suite_fini);

/* ---- Garbage metadata: grouped GEMM ------------------------------------ */

/* An int32 that is often valid (in [0, valid)), often just outside, and
 * sometimes anything. */
static int32_t garbage_index(th_rng *rng, int64_t valid) {
  const double u = th_rng_uniform(rng);
  if (u < 0.55) return (int32_t)th_rng_below(rng, valid);
  if (u < 0.85) {
    const int32_t edges[] = {-1, -2, INT32_MIN, INT32_MAX, 0x7fff0000};
    const int64_t pick = th_rng_below(rng, 7);
    return pick < 5 ? edges[pick] : (int32_t)(valid + pick - 5); /* valid, valid + 1 */
  }
  return (int32_t)th_rng_next(rng);
}

static void garbage_gemm_case(uint64_t seed, int64_t T, int32_t k, int32_t EL, int64_t n, int64_t K,
                              int32_t BM, moe_gemm_input input, moe_weight_layout layout,
                              int32_t padded_kind) {
  th_rng rng = th_rng_make(seed);
  moe_context *ctx = th_ctx();
  const int64_t slots = T * k, a_rows = input == MOE_GEMM_INPUT_PER_TOKEN ? T : slots;
  int64_t cap, bcap;
  TH_OK(moe_align_capacity(T, k, EL, BM, &cap, &bcap));
  const int32_t padded_choices[] = {(int32_t)cap, (int32_t)cap + 1, INT32_MAX, -7,
                                    (int32_t)th_rng_below(&rng, cap + 1)};
  const int32_t padded = padded_choices[padded_kind];
  th_case("garbage metadata: T=%lld k=%d EL=%d n=%lld K=%lld BM=%d input=%d layout=%d "
          "num_tokens_post_padded=%d (capacity %lld) seed=0x%llx",
          (long long)T, k, EL, (long long)n, (long long)K, BM, (int)input, (int)layout, padded,
          (long long)cap, (unsigned long long)seed);

  uint16_t *a = th_malloc((size_t)(a_rows * K) * 2), *b = th_malloc((size_t)(EL * n * K) * 2);
  float *bias = th_malloc((size_t)(EL * n) * 4), *w = th_malloc((size_t)slots * 4);
  int32_t *sorted = th_malloc((size_t)cap * 4), *experts = th_malloc((size_t)bcap * 4);
  th_fill_bf16(&rng, a, (size_t)(a_rows * K), 1.0);
  th_fill_bf16(&rng, b, (size_t)(EL * n * K), 0.25);
  th_fill_f32(&rng, bias, (size_t)(EL * n), 1.0);
  th_fill_f32(&rng, w, (size_t)slots, 1.0);
  for (int64_t i = 0; i < cap; ++i)
    sorted[i] = garbage_index(&rng, slots);
  for (int64_t i = 0; i < bcap; ++i)
    experts[i] = garbage_index(&rng, EL);

  /* The documented rule: positions below min(max(padded, 0), capacity)
   * whose block's expert is in [0, EL) and whose id is a slot. A slot named
   * by two experts may hold either result; only slots named by one expert
   * (any number of times) are checked against the reference. */
  int32_t *slot_expert = th_malloc((size_t)slots * 4);
  bool *written = th_calloc((size_t)slots, 1);
  for (int64_t s = 0; s < slots; ++s)
    slot_expert[s] = -1;
  const int64_t limit = padded < 0 ? 0 : (padded < cap ? padded : cap);
  for (int64_t p = 0; p < limit; ++p) {
    const int32_t e = experts[p / BM], s = sorted[p];
    if (e < 0 || e >= EL || s < 0 || s >= slots) continue;
    if (written[s] && slot_expert[s] != e) slot_expert[s] = -2; /* two experts */
    if (!written[s]) slot_expert[s] = e;
    written[s] = true;
  }

  moe_buffer *ba = th_upload(ctx, a, (size_t)(a_rows * K) * 2);
  moe_buffer *bb = th_upload(ctx, b, (size_t)(EL * n * K) * 2);
  moe_buffer *bbias = th_upload(ctx, bias, (size_t)(EL * n) * 4);
  moe_buffer *bw = th_upload(ctx, w, (size_t)slots * 4);
  /* Metadata buffers of exactly the capacity: a read past it is ASan's. */
  moe_buffer *bsorted = th_upload(ctx, sorted, (size_t)cap * 4);
  moe_buffer *bexperts = th_upload(ctx, experts, (size_t)bcap * 4);
  moe_buffer *bpadded = th_upload(ctx, &padded, 4);
  const size_t c_bytes = (size_t)(slots * n) * 2;
  moe_buffer *bc = th_output(ctx, c_bytes);
  const moe_gemm_desc desc = {.num_tokens = T,
                              .top_k = k,
                              .num_local_experts = EL,
                              .n = n,
                              .k = K,
                              .block_m = BM,
                              .b_layout = layout,
                              .input = input,
                              .routed_weight = MOE_GEMM_ROUTED_WEIGHT_AFTER_BIAS};
  TH_OK(moe_grouped_gemm(ctx, &desc, ba, bb, bbias, bsorted, bexperts, bpadded, bw, bc));
  th_check_guard(bc, c_bytes, "c");
  uint16_t *c = th_malloc(c_bytes);
  th_download(bc, c, c_bytes);
  const uint16_t fill = (uint16_t)(TH_FILL_BYTE << 8 | TH_FILL_BYTE);
  int64_t checked = 0;
  for (int64_t s = 0; s < slots; ++s) {
    if (written[s]) {
      checked += slot_expert[s] >= 0;
      continue;
    }
    for (int64_t j = 0; j < n; ++j)
      TH_ASSERT(c[s * n + j] == fill,
                "c[%lld][%lld] was written, but no valid metadata entry names slot %lld",
                (long long)s, (long long)j, (long long)s);
  }
  double *ref = th_malloc((size_t)(slots * n) * sizeof(double));
  double *mag = th_malloc((size_t)(slots * n) * sizeof(double));
  ref_grouped_gemm(&desc, a, b, bias, slot_expert, w, ref, mag);
  th_check_bf16_close(c, ref, mag, slots, n, K, "c (rows named by valid entries)");
  cr_log_info("%lld of %lld slots checked against float64", (long long)checked, (long long)slots);

  moe_buffer *buffers[] = {ba, bb, bbias, bw, bsorted, bexperts, bpadded, bc};
  for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; ++i)
    moe_buffer_destroy(buffers[i]);
  free(a), free(b), free(bias), free(w), free(sorted), free(experts);
  free(slot_expert), free(written), free(c), free(ref), free(mag);
}

Test(robust, grouped_gemm_garbage_metadata) {
  /* Every num_tokens_post_padded kind, both inputs and layouts, block_m
   * from 1 to 128 (the tiled OpenCL kernels need 64 | block_m; decode
   * shapes take the skinny or row kernels). */
  const int32_t block_ms[] = {1, 4, 16, 64, 128};
  int case_index = 0;
  for (int kind = 0; kind < 5; ++kind)
    for (int bmi = 0; bmi < 5; ++bmi) {
      const moe_gemm_input input =
          case_index % 2 ? MOE_GEMM_INPUT_PER_SLOT : MOE_GEMM_INPUT_PER_TOKEN;
      const moe_weight_layout layout =
          case_index % 3 == 2 ? MOE_WEIGHT_LAYOUT_IN_OUT : MOE_WEIGHT_LAYOUT_OUT_IN;
      const int64_t T = case_index % 4 == 3 ? 300 : 5 + case_index;
      garbage_gemm_case(0xbad0000 + (uint64_t)case_index, T, 2 + case_index % 3, 3 + case_index % 5,
                        8 + 8 * (case_index % 3), 16 + 24 * (case_index % 2), block_ms[bmi], input,
                        layout, kind);
      case_index++;
    }
}

/* ---- Garbage metadata: top-k reduce ------------------------------------ */

Test(robust, topk_reduce_garbage_ids_and_map) {
  moe_context *ctx = th_ctx();
  for (int round = 0; round < 6; ++round) {
    const int64_t T = 3 + 11 * round, H = 24 + 40 * (round % 2);
    const int32_t k = 1 + round % 4, E = 5 + 3 * round, EL = 1 + round % 3;
    const uint64_t seed = 0x7ed0 + (uint64_t)round;
    th_case("garbage reduce: T=%lld H=%lld k=%d E=%d EL=%d seed=0x%llx", (long long)T, (long long)H,
            k, E, EL, (unsigned long long)seed);
    th_rng rng = th_rng_make(seed);
    const int64_t slots = T * k;
    uint16_t *y = th_malloc((size_t)(slots * H) * 2);
    float *w = th_malloc((size_t)slots * 4);
    int32_t *ids = th_malloc((size_t)slots * 4), *map = th_malloc((size_t)E * 4);
    th_fill_bf16(&rng, y, (size_t)(slots * H), 1.0);
    th_fill_f32(&rng, w, (size_t)slots, 1.0);
    for (int64_t s = 0; s < slots; ++s)
      ids[s] = garbage_index(&rng, E);
    for (int32_t e = 0; e < E; ++e)
      map[e] = garbage_index(&rng, EL);
    int32_t *slot_expert = th_malloc((size_t)slots * 4);
    for (int64_t s = 0; s < slots; ++s)
      slot_expert[s] = ref_local_expert(ids[s], map, E, EL);

    moe_buffer *by = th_upload(ctx, y, (size_t)(slots * H) * 2);
    moe_buffer *bw = th_upload(ctx, w, (size_t)slots * 4);
    moe_buffer *bids = th_upload(ctx, ids, (size_t)slots * 4);
    moe_buffer *bmap = th_upload(ctx, map, (size_t)E * 4);
    const size_t out_bytes = (size_t)(T * H) * 2;
    moe_buffer *bout = th_output(ctx, out_bytes);
    TH_OK(moe_topk_reduce(ctx, T, k, H, by, bw, bids, bmap, E, EL, bout));
    th_check_guard(bout, out_bytes, "out");
    uint16_t *out = th_malloc(out_bytes);
    th_download(bout, out, out_bytes);
    double *ref = th_malloc((size_t)(T * H) * sizeof(double));
    double *mag = th_malloc((size_t)(T * H) * sizeof(double));
    ref_topk_reduce(T, k, H, y, w, slot_expert, ref, mag);
    th_check_bf16_close(out, ref, mag, T, H, k, "out");
    moe_buffer *buffers[] = {by, bw, bids, bmap, bout};
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; ++i)
      moe_buffer_destroy(buffers[i]);
    free(y), free(w), free(ids), free(map), free(slot_expert), free(out), free(ref), free(mag);
  }
}

/* ---- Activation numerics ----------------------------------------------- */

/* |lib - ref| <= 2^-8 |ref| + 2^-20 max(1, |up|): half a bf16 unit of the
 * result plus the fp32 evaluation, and an absolute term for the cancelling
 * ranges (1 + tanh(x) for x << 0, g * sigmoid(g) for g << 0), where fp32
 * keeps few significant bits of a value far below the inputs. NaN must
 * match NaN; infinities must match exactly. */
static void check_activation_values(moe_activation act, float alpha, float limit,
                                    const uint16_t *in, const uint16_t *out, int64_t rows,
                                    int64_t I) {
  static const char *const names[] = {"swiglu", "geglu", "swiglu_clamp"};
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < I; ++i) {
      const double gate = th_bf16_to_float(in[r * 2 * I + i]);
      const double up = th_bf16_to_float(in[r * 2 * I + I + i]);
      const double ref = ref_activation_value(act, alpha, limit, gate, up);
      const double lib = th_bf16_to_float(out[r * I + i]);
      /* NaN in, NaN out, on every activation. */
      if (isnan(gate) || isnan(up)) {
        TH_ASSERT(isnan(lib), "%s(gate %g, up %g) = %g: a NaN input must give NaN", names[act],
                  gate, up, lib);
        continue;
      }
      /* An infinite input to SiLU or GeGLU meets inf * 0 or inf / inf at
       * points where fp32 and float64 saturate differently (tanh rounds to
       * -1 in fp32 from -9 on): only the clamped SwiGLU, which clamps the
       * infinities first, is compared there. */
      if (act != MOE_ACTIVATION_SWIGLU_CLAMP && (isinf(gate) || isinf(up))) continue;
      if (isnan(ref) || isnan(lib)) {
        TH_ASSERT(isnan(ref) && isnan(lib), "%s(gate %g, up %g) = %g, float64 reference %g",
                  names[act], gate, up, lib, ref);
        continue;
      }
      /* Beyond the bf16 range the result is an infinity (rounding). */
      const double rounded = th_bf16_to_float(th_float_to_bf16((float)ref));
      if (isinf(rounded) || isinf(lib)) {
        TH_ASSERT(lib == rounded, "%s(gate %g, up %g) = %g, float64 reference %g (bf16 %g)",
                  names[act], gate, up, lib, ref, rounded);
        continue;
      }
      const double bound = ldexp(fabs(ref), -8) + ldexp(fmax(1.0, fabs(up)), -20);
      TH_ASSERT(fabs(lib - ref) <= bound,
                "%s(gate %.9g, up %.9g) = %.9g, float64 reference %.9g: error %.3g > %.3g",
                names[act], gate, up, lib, ref, fabs(lib - ref), bound);
    }
}

static void activation_grid(moe_activation act, const float *gates, int64_t ng, const float *ups,
                            int64_t nu) {
  const float alpha = 1.702f, limit = 7.0f;
  moe_context *ctx = th_ctx();
  const int64_t rows = ng, I = nu;
  uint16_t *in = th_malloc((size_t)(rows * 2 * I) * 2), *out = th_malloc((size_t)(rows * I) * 2);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < I; ++i) {
      in[r * 2 * I + i] = th_float_to_bf16(gates[r]);
      in[r * 2 * I + I + i] = th_float_to_bf16(ups[i]);
    }
  moe_buffer *bin = th_upload(ctx, in, (size_t)(rows * 2 * I) * 2);
  moe_buffer *bout = th_output(ctx, (size_t)(rows * I) * 2);
  TH_OK(moe_activation_apply(ctx, act, alpha, limit, rows, I, bin, bout));
  th_check_guard(bout, (size_t)(rows * I) * 2, "out");
  th_download(bout, out, (size_t)(rows * I) * 2);
  check_activation_values(act, alpha, limit, in, out, rows, I);
  moe_buffer_destroy(bin);
  moe_buffer_destroy(bout);
  free(in), free(out);
}

Test(robust, activation_special_values_nan_in_nan_out) {
  th_case("gate x up over NaN, +-inf, +-0, +-limit, +-1e30, denormals");
  const float special[] = {NAN,    -NAN,    INFINITY, -INFINITY, 0.0f,    -0.0f,   7.0f,
                           -7.0f,  7.5f,    -7.5f,    1e30f,     -1e30f,  1.0f,    -1.0f,
                           1e-40f, -1e-40f, 88.0f,    -88.0f,    3.0e38f, -3.0e38f};
  const int64_t n = sizeof special / sizeof special[0];
  for (int act = 0; act <= MOE_ACTIVATION_SWIGLU_CLAMP; ++act)
    activation_grid((moe_activation)act, special, n, special, n);
}

Test(robust, activation_cancelling_and_saturating_ranges) {
  /* Gates where the activation cancels (GeGLU and SiLU far below 0: the
   * results are tiny against the inputs; GeGLU near -4 is the case of the
   * issue) or saturates (large positive gates, near and past the clamp). */
  enum { NG = 96, NU = 24 };
  float gates[NG], ups[NU];
  th_rng rng = th_rng_make(0xcafe);
  for (int i = 0; i < NG; ++i) {
    const double center[] = {-4.0, -6.0, -12.0, -20.0, 6.9, 7.1, 20.0, 60.0};
    gates[i] = (float)(center[i % 8] + 0.5 * th_rng_normal(&rng));
  }
  for (int i = 0; i < NU; ++i)
    ups[i] = (float)(i % 3 == 0 ? 1000.0 * th_rng_normal(&rng) : 4.0 * th_rng_normal(&rng));
  th_case("gates around -4, -6, -12, -20, 6.9, 7.1, 20, 60; ups N(0, 4) and N(0, 1000)");
  for (int act = 0; act <= MOE_ACTIVATION_SWIGLU_CLAMP; ++act)
    activation_grid((moe_activation)act, gates, NG, ups, NU);
}

/* ---- Threads ----------------------------------------------------------- */

#define THREADS 4
#define ROUNDS 6

typedef struct thread_job {
  moe_layer *layer;
  moe_context *ctx;
  const th_layer_data *data;
  int64_t tokens;
  const uint16_t *expected; /* [tokens][H], the single-threaded output */
  int mismatches;
  moe_status status;
} thread_job;

/* Each thread: its own x, logits and out; ROUNDS forwards, each compared
 * with the single-threaded output bit for bit (the determinism promise). */
static void *hammer(void *arg) {
  thread_job *job = arg;
  const int64_t H = job->data->cfg.hidden_size, E = job->data->cfg.num_experts;
  const size_t out_bytes = (size_t)(job->tokens * H) * 2;
  moe_buffer *x = NULL, *logits = NULL, *out = NULL;
  job->status = moe_buffer_create(job->ctx, out_bytes, &x);
  if (job->status == MOE_SUCCESS)
    job->status = moe_buffer_create(job->ctx, (size_t)(job->tokens * E) * 4, &logits);
  if (job->status == MOE_SUCCESS) job->status = moe_buffer_create(job->ctx, out_bytes, &out);
  if (job->status == MOE_SUCCESS) job->status = moe_buffer_write(x, 0, job->data->x, out_bytes);
  if (job->status == MOE_SUCCESS)
    job->status = moe_buffer_write(logits, 0, job->data->logits, (size_t)(job->tokens * E) * 4);
  uint16_t *host = malloc(out_bytes);
  for (int round = 0; round < ROUNDS && job->status == MOE_SUCCESS && host; ++round) {
    memset(host, 0xA5, out_bytes);
    job->status = moe_buffer_write(out, 0, host, out_bytes);
    if (job->status == MOE_SUCCESS)
      job->status = moe_layer_forward(job->layer, job->tokens, x, logits, out);
    if (job->status == MOE_SUCCESS) job->status = moe_buffer_read(out, 0, host, out_bytes);
    if (job->status == MOE_SUCCESS && memcmp(host, job->expected, out_bytes) != 0)
      job->mismatches++;
  }
  if (!host) job->status = MOE_ERROR_OUT_OF_MEMORY;
  free(host);
  moe_buffer_destroy(x);
  moe_buffer_destroy(logits);
  moe_buffer_destroy(out);
  return NULL;
}

Test(robust, threads_share_one_layer) {
  th_layer_spec spec = {.num_tokens = 24, .seed = 0x7ead, .w13_bias = true, .w2_bias = true};
  spec.cfg = th_config(96, 64, 16, 4);
  spec.cfg.renormalize = 1;
  th_layer_data d;
  th_layer_data_make(&d, &spec);
  moe_context *ctx = th_ctx();
  moe_layer *layer = NULL;
  TH_OK(moe_layer_create(ctx, &d.cfg, &d.weights, &layer));
  TH_OK(moe_layer_reserve(layer, d.num_tokens));
  const int64_t H = d.cfg.hidden_size;
  /* Threads forward different token counts, so that their workspace use
   * differs; the expected outputs come from one thread, before. */
  const int64_t tokens[THREADS] = {24, 1, 7, 16};
  uint16_t *expected[THREADS];
  for (int i = 0; i < THREADS; ++i) {
    expected[i] = th_malloc((size_t)(tokens[i] * H) * 2);
    const size_t bytes = (size_t)(tokens[i] * H) * 2;
    moe_buffer *x = th_upload(ctx, d.x, bytes);
    moe_buffer *logits =
        th_upload(ctx, d.logits, (size_t)(tokens[i] * d.cfg.num_experts) * sizeof(float));
    moe_buffer *out = th_output(ctx, bytes);
    TH_OK(moe_layer_forward(layer, tokens[i], x, logits, out));
    th_download(out, expected[i], bytes);
    moe_buffer_destroy(x), moe_buffer_destroy(logits), moe_buffer_destroy(out);
  }
  pthread_t threads[THREADS];
  thread_job jobs[THREADS];
  for (int i = 0; i < THREADS; ++i) {
    jobs[i] = (thread_job){layer, ctx, &d, tokens[i], expected[i], 0, MOE_SUCCESS};
    cr_assert(pthread_create(&threads[i], NULL, hammer, &jobs[i]) == 0, "pthread_create");
  }
  for (int i = 0; i < THREADS; ++i)
    pthread_join(threads[i], NULL);
  for (int i = 0; i < THREADS; ++i) {
    th_case("thread %d of %d, %lld tokens, %d forwards each", i, THREADS, (long long)tokens[i],
            ROUNDS);
    TH_ASSERT(jobs[i].status == MOE_SUCCESS, "a call failed: %s (%s)",
              moe_status_string(jobs[i].status), moe_last_error(ctx));
    TH_ASSERT(jobs[i].mismatches == 0, "%d of %d forwards differ from the single-threaded output",
              jobs[i].mismatches, ROUNDS);
    free(expected[i]);
  }
  moe_layer_destroy(layer);
  th_layer_data_free(&d);
}
