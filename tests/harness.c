/*
 * harness.c - the shared machinery of the moe_tests suite (see harness.h)
 * and its main(): pick the backend from MOE_TEST_BACKEND and the context
 * options from MOE_TEST_OPTIONS, report a backend without a device (or an
 * option the device cannot run) as skipped (exit 77, which CTest shows as
 * skipped), and hand over to Criterion.
 */
#include "harness.h"

#if defined(__SANITIZE_ADDRESS__)
#define TH_LEAK_CHECK 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TH_LEAK_CHECK 1
#endif
#endif
#ifdef TH_LEAK_CHECK
#include <sanitizer/lsan_interface.h>
#endif

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- Backend under test --------------------------------------------------- */

static moe_context *test_ctx, *other_ctx, *cpu_ctx;
static const char *test_backend_name = "cpu";

bool th_backend_from_env(moe_backend *backend, const char **name) {
  const char *env = getenv("MOE_TEST_BACKEND");
  if (!env || !*env) env = "cpu";
  static const moe_backend known[] = {MOE_BACKEND_CPU, MOE_BACKEND_CUDA, MOE_BACKEND_OPENCL};
  for (size_t i = 0; i < sizeof known / sizeof known[0]; ++i)
    if (strcmp(env, moe_backend_name(known[i])) == 0) {
      *backend = known[i];
      *name = moe_backend_name(known[i]);
      return true;
    }
  *name = env;
  return false;
}

static void destroy_contexts(void) {
  moe_context_destroy(test_ctx);
  moe_context_destroy(other_ctx);
  moe_context_destroy(cpu_ctx);
  test_ctx = other_ctx = cpu_ctx = NULL;
}

moe_status th_apply_test_options(moe_context *ctx, char *failed, size_t failed_size) {
  const char *list = getenv("MOE_TEST_OPTIONS");
  if (!list) return MOE_SUCCESS;
  char copy[1024];
  snprintf(copy, sizeof copy, "%s", list);
  char *save = NULL;
  for (char *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
    char *eq = strchr(item, '=');
    if (!eq) {
      snprintf(failed, failed_size, "%s (not name=value)", item);
      return MOE_ERROR_INVALID_ARGUMENT;
    }
    *eq = '\0';
    const moe_status st = moe_context_set_option(ctx, item, eq + 1);
    if (st != MOE_SUCCESS) {
      snprintf(failed, failed_size, "%s=%s: %s", item, eq + 1, moe_last_error(ctx));
      return st;
    }
  }
  return MOE_SUCCESS;
}

/* A context of the backend with MOE_TEST_OPTIONS applied when `options`. */
static moe_context *create_context(moe_backend backend, bool options) {
  moe_context *ctx = NULL;
  moe_status status = moe_context_create(backend, 0, &ctx);
  cr_assert(status == MOE_SUCCESS, "moe_context_create(%s) failed: %s (%s)",
            moe_backend_name(backend), moe_status_string(status), moe_last_error(NULL));
  char failed[1200] = "";
  status = options ? th_apply_test_options(ctx, failed, sizeof failed) : MOE_SUCCESS;
  if (status != MOE_SUCCESS) moe_context_destroy(ctx);
  cr_assert(status == MOE_SUCCESS, "MOE_TEST_OPTIONS: %s", failed);
  return ctx;
}

moe_context *th_ctx(void) {
  if (!test_ctx) {
    moe_backend backend = MOE_BACKEND_CPU;
    cr_assert(th_backend_from_env(&backend, &test_backend_name),
              "MOE_TEST_BACKEND=%s is not cpu, cuda or opencl", test_backend_name);
    test_ctx = create_context(backend, true);
    atexit(destroy_contexts);
  }
  return test_ctx;
}

moe_context *th_other_ctx(void) {
  if (!other_ctx) other_ctx = create_context(moe_context_backend(th_ctx()), true);
  return other_ctx;
}

moe_context *th_cpu_ctx(void) {
  if (moe_context_backend(th_ctx()) == MOE_BACKEND_CPU) return NULL;
  if (!cpu_ctx) cpu_ctx = create_context(MOE_BACKEND_CPU, false); /* the reference: defaults */
  return cpu_ctx;
}

void th_suite_fini(void) {
  destroy_contexts();
#ifdef TH_LEAK_CHECK
  /* LeakSanitizer's own check runs after Criterion has recorded the
   * result, and an assertion in .fini does not fail the test either: end
   * the worker, so that Criterion reports the test as crashed. */
  if (__lsan_do_recoverable_leak_check() != 0) {
    fprintf(stderr,
            "moe_tests: the test leaked memory (LeakSanitizer's report above)\n"
            "    reproduce: %s\n",
            th_repro());
    fflush(stderr);
    _exit(70);
  }
#endif
}

const char *th_backend_name(void) {
  th_ctx();
  return test_backend_name;
}

/* ---- Reproduction line ------------------------------------------------ */

static char case_text[1024] = "";

void th_case(const char *fmt, ...) {
  va_list args;
  va_start(args, fmt);
  vsnprintf(case_text, sizeof case_text, fmt, args);
  va_end(args);
}

const char *th_repro(void) {
  static char line[2048];
  const char *options = getenv("MOE_TEST_OPTIONS");
  const char *huge = getenv("MOE_TEST_HUGE");
  const char *backend = getenv("MOE_TEST_BACKEND");
  snprintf(line, sizeof line, "MOE_TEST_BACKEND=%s%s%s%s ./moe_tests --filter '%s/%s'  [%s]",
           backend && *backend ? backend : "cpu", options ? " MOE_TEST_OPTIONS=" : "",
           options ? options : "", huge ? " MOE_TEST_HUGE=1" : "",
           criterion_current_suite ? criterion_current_suite->name : "?",
           criterion_current_test ? criterion_current_test->name : "?", case_text);
  return line;
}

const char *th_config_text(const moe_config *cfg) {
  static char text[512];
  static const char *activations[] = {"swiglu", "geglu", "swiglu_clamp"};
  char groups[64] = "";
  if (cfg->num_groups > 1)
    snprintf(groups, sizeof groups, " groups=%d/%d(%s)", (int)cfg->num_groups,
             (int)cfg->topk_groups,
             cfg->group_scoring == MOE_GROUP_SCORING_TOP2_SUM ? "top2sum" : "max");
  snprintf(text, sizeof text,
           "H=%lld I=%lld E=%d EL=%d k=%d %s%s%s scale=%g act=%s%s layout=%s weight_on=%s%s",
           (long long)cfg->hidden_size, (long long)cfg->intermediate_size, (int)cfg->num_experts,
           (int)(cfg->num_local_experts ? cfg->num_local_experts : cfg->num_experts),
           (int)cfg->top_k, cfg->scoring == MOE_SCORING_SIGMOID ? "sigmoid" : "softmax",
           cfg->renormalize ? "+renorm" : "", groups, (double)cfg->routed_scaling_factor,
           (unsigned)cfg->activation < 3 ? activations[cfg->activation] : "?",
           cfg->activation == MOE_ACTIVATION_SWIGLU_CLAMP ? "(alpha,limit)" : "",
           cfg->weight_layout == MOE_WEIGHT_LAYOUT_IN_OUT ? "in_out" : "out_in",
           cfg->router_weight == MOE_ROUTER_WEIGHT_ON_INPUT ? "input" : "output",
           cfg->batch_invariant ? " batch_invariant" : "");
  return text;
}

void th_expect_ok(moe_status status, const char *call, const char *file, int line) {
  if (status == MOE_SUCCESS) return;
  const char *message = moe_last_error(th_ctx());
  if (!*message && cpu_ctx) message = moe_last_error(cpu_ctx);
  if (!*message) message = moe_last_error(NULL);
  if (status == MOE_ERROR_UNSUPPORTED)
    cr_skip_test("not supported on %s: %s returned MOE_ERROR_UNSUPPORTED (%s)  [%s]",
                 th_backend_name(), call, message, case_text);
  cr_assert_fail("%s:%d: %s returned %s: %s\n    reproduce: %s", file, line, call,
                 moe_status_string(status), message, th_repro());
}

/* ---- Data ------------------------------------------------------------- */

th_rng th_rng_make(uint64_t seed) {
  return (th_rng){seed ^ 0x6a09e667f3bcc909ull};
}

uint64_t th_rng_next(th_rng *rng) {
  uint64_t z = (rng->state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

double th_rng_uniform(th_rng *rng) {
  return (double)(th_rng_next(rng) >> 11) * 0x1.0p-53;
}

int64_t th_rng_below(th_rng *rng, int64_t n) {
  return (int64_t)(th_rng_uniform(rng) * (double)n);
}

double th_rng_normal(th_rng *rng) {
  double u1 = th_rng_uniform(rng), u2 = th_rng_uniform(rng);
  return sqrt(-2.0 * log(1.0 - u1)) * cos(6.283185307179586 * u2);
}

void th_fill_bf16(th_rng *rng, uint16_t *dst, size_t count, double scale) {
  for (size_t i = 0; i < count; ++i)
    dst[i] = ref_double_to_bf16(scale * th_rng_normal(rng));
}

void th_fill_f32(th_rng *rng, float *dst, size_t count, double scale) {
  for (size_t i = 0; i < count; ++i)
    dst[i] = (float)(scale * th_rng_normal(rng));
}

void *th_malloc(size_t bytes) {
  void *p = malloc(bytes ? bytes : 1);
  cr_assert(p, "the test cannot allocate %zu bytes of host memory", bytes);
  return p;
}

void *th_calloc(size_t count, size_t size) {
  void *p = calloc(count ? count : 1, size ? size : 1);
  cr_assert(p, "the test cannot allocate %zu x %zu bytes of host memory", count, size);
  return p;
}

/* ---- Buffers ---------------------------------------------------------- */

moe_buffer *th_upload(moe_context *ctx, const void *data, size_t bytes) {
  moe_buffer *buffer = NULL;
  TH_OK(moe_buffer_create(ctx, bytes ? bytes : 1, &buffer));
  if (bytes) TH_OK(moe_buffer_write(buffer, 0, data, bytes));
  return buffer;
}

void th_refill(moe_buffer *buffer) {
  /* In chunks, so that multi-GB outputs need no host copy of their size. */
  const size_t bytes = moe_buffer_size(buffer), chunk = (size_t)1 << 24;
  void *fill = th_malloc(bytes < chunk ? bytes : chunk);
  memset(fill, TH_FILL_BYTE, bytes < chunk ? bytes : chunk);
  for (size_t offset = 0; offset < bytes; offset += chunk)
    TH_OK(moe_buffer_write(buffer, offset, fill, bytes - offset < chunk ? bytes - offset : chunk));
  free(fill);
}

moe_buffer *th_output(moe_context *ctx, size_t bytes) {
  moe_buffer *buffer = NULL;
  TH_OK(moe_buffer_create(ctx, bytes + TH_GUARD_BYTES, &buffer));
  th_refill(buffer);
  return buffer;
}

moe_buffer *th_output_exact(moe_context *ctx, size_t bytes) {
  moe_buffer *buffer = NULL;
  TH_OK(moe_buffer_create(ctx, bytes, &buffer));
  th_refill(buffer);
  return buffer;
}

void th_download(const moe_buffer *buffer, void *dst, size_t bytes) {
  if (bytes) TH_OK(moe_buffer_read(buffer, 0, dst, bytes));
}

/* Asserts that every byte of [from, size) holds the fill byte. */
static void check_fill(const moe_buffer *buffer, size_t from, const char *what, const char *part) {
  const size_t size = moe_buffer_size(buffer);
  if (from >= size) return;
  uint8_t *bytes = th_malloc(size - from);
  TH_OK(moe_buffer_read(buffer, from, bytes, size - from));
  size_t bad = size;
  for (size_t i = 0; i < size - from && bad == size; ++i)
    if (bytes[i] != TH_FILL_BYTE) bad = from + i;
  const unsigned value = bad < size ? bytes[bad - from] : 0;
  free(bytes);
  TH_ASSERT(bad == size, "%s: %s byte %zu (of %zu) was overwritten with 0x%02x", what, part, bad,
            size, value);
}

void th_check_guard(const moe_buffer *buffer, size_t payload, const char *what) {
  check_fill(buffer, payload, what, "guard");
}

void th_check_untouched(const moe_buffer *buffer, const char *what) {
  check_fill(buffer, 0, what, "output");
}

/* ---- Comparisons ------------------------------------------------------ */

double th_rel_error(const uint16_t *lib, const double *ref, size_t count) {
  double diff = 0.0, norm = 0.0;
  for (size_t i = 0; i < count; ++i) {
    const double d = ref_bf16_to_double(lib[i]) - ref[i];
    diff += d * d;
    norm += ref[i] * ref[i];
  }
  if (isnan(diff)) return INFINITY;
  return norm > 0.0 ? sqrt(diff / norm) : sqrt(diff);
}

double th_rel_error_bf16(const uint16_t *a, const uint16_t *b, size_t count) {
  double diff = 0.0, norm = 0.0;
  for (size_t i = 0; i < count; ++i) {
    const double va = ref_bf16_to_double(a[i]), vb = ref_bf16_to_double(b[i]);
    diff += (va - vb) * (va - vb);
    norm += vb * vb;
  }
  if (isnan(diff)) return INFINITY;
  return norm > 0.0 ? sqrt(diff / norm) : sqrt(diff);
}

void th_check_bf16_close(const uint16_t *lib, const double *ref, const double *magnitude,
                         int64_t rows, int64_t cols, int64_t terms, const char *what) {
  /* The library rounds an fp32 value v (|v - ref| <= d) to bf16, so
   * |lib - ref| <= 2^-8 (|ref| + d) + d with d = (terms + 2) 2^-24 magnitude
   * for any fp32 summation order. */
  double worst = 0.0, worst_ref = 0.0, worst_tol = 0.0, worst_lib = 0.0;
  int64_t worst_row = -1, worst_col = -1;
  for (int64_t r = 0; r < rows; ++r) {
    if (cols > 0 && isnan(ref[r * cols])) continue; /* skipped row */
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c;
      const double got = ref_bf16_to_double(lib[i]);
      const double d = (double)(terms + 2) * 0x1.0p-24 * (magnitude ? magnitude[i] : 0.0);
      const double tol = 0x1.0p-8 * 1.001 * (fabs(ref[i]) + d) + d + 1e-37;
      const double ratio = isnan(got) ? INFINITY : fabs(got - ref[i]) / tol;
      if (ratio > worst || (worst_row < 0 && isnan(got))) {
        worst = ratio;
        worst_row = r;
        worst_col = c;
        worst_ref = ref[i];
        worst_tol = tol;
        worst_lib = got;
      }
    }
  }
  TH_ASSERT(worst <= 1.0, "%s[%lld][%lld] = %.9g, float64 reference %.9g (tolerance %.3g, %.3g x)",
            what, (long long)worst_row, (long long)worst_col, worst_lib, worst_ref, worst_tol,
            worst);
}

void th_check_agree(const uint16_t *lib, const uint16_t *cpu, size_t count, double bound,
                    const char *what) {
  const double err = th_rel_error_bf16(lib, cpu, count);
  TH_ASSERT(err <= bound, "%s: %s and cpu disagree, relative Frobenius difference %.3g > %.3g",
            what, th_backend_name(), err, bound);
}

static bool near_tie(double a, double b) {
  if (isnan(a) || isnan(b)) return isnan(a) && isnan(b);
  if (a == b) return true;
  return fabs(a - b) <= 1e-6 * fmax(1.0, fabs(b));
}

void th_check_route(const moe_config *cfg, int64_t num_tokens, const float *logits,
                    const float *correction_bias, const int32_t *ids, const float *weights) {
  const int32_t E = cfg->num_experts, k = cfg->top_k;
  double *keys = th_malloc(sizeof(double) * (size_t)E);
  double *scores = th_malloc(sizeof(double) * (size_t)E);
  int32_t ref_ids[MOE_MAX_TOP_K];
  double ref_weights[MOE_MAX_TOP_K];
  bool *seen = th_calloc((size_t)E, 1);
  int64_t near_ties = 0;
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int32_t *row_ids = ids + t * k;
    const float *row_w = weights + t * k;
    ref_route(cfg, 1, logits + t * E, correction_bias, ref_ids, ref_weights);
    ref_route_token_keys(cfg, logits + t * E, correction_bias, keys, scores);
    bool same = true;
    for (int32_t j = 0; j < k; ++j) {
      TH_ASSERT(row_ids[j] >= 0 && row_ids[j] < E && !seen[row_ids[j]],
                "token %lld: topk_ids[%d] = %d is out of range or repeated", (long long)t, (int)j,
                (int)row_ids[j]);
      seen[row_ids[j]] = true;
      same = same && row_ids[j] == ref_ids[j];
    }
    for (int32_t j = 0; j < k; ++j)
      seen[row_ids[j]] = false;
    if (!same) {
      /* Keys that are the logits themselves involve no rounding at all. */
      const bool exact_keys =
          !correction_bias &&
          !(cfg->num_groups > 1 && cfg->group_scoring == MOE_GROUP_SCORING_TOP2_SUM);
      for (int32_t j = 0; j < k; ++j)
        TH_ASSERT(!exact_keys || row_ids[j] == ref_ids[j],
                  "token %lld: topk_ids[%d] = %d, reference %d (the keys are the logits: no "
                  "rounding can excuse it)",
                  (long long)t, (int)j, (int)row_ids[j], (int)ref_ids[j]);
      for (int32_t j = 0; j < k; ++j)
        TH_ASSERT(near_tie(keys[row_ids[j]], keys[ref_ids[j]]),
                  "token %lld: topk_ids[%d] = %d (key %.9g), reference %d (key %.9g)", (long long)t,
                  (int)j, (int)row_ids[j], keys[row_ids[j]], (int)ref_ids[j], keys[ref_ids[j]]);
      ++near_ties;
    }
    /* Weights: the reference scores of the experts actually picked. */
    double sum = 0.0;
    for (int32_t j = 0; j < k; ++j)
      sum += scores[row_ids[j]];
    double factor = cfg->routed_scaling_factor;
    if (cfg->renormalize && sum > 0.0) factor /= sum;
    for (int32_t j = 0; j < k; ++j) {
      const double want = scores[row_ids[j]] * factor;
      TH_ASSERT(fabs((double)row_w[j] - want) <= 1e-5 * fabs(want) + 1e-30,
                "token %lld: topk_weights[%d] = %.9g (expert %d), reference %.9g", (long long)t,
                (int)j, (double)row_w[j], (int)row_ids[j], want);
    }
  }
  if (near_ties)
    cr_log_info("%lld token(s) picked differently at a float/double near tie",
                (long long)near_ties);
  free(keys);
  free(scores);
  free(seen);
}

/* ---- Layer data ------------------------------------------------------- */

moe_config th_config(int64_t H, int64_t I, int32_t E, int32_t k) {
  moe_config cfg;
  moe_config_init(&cfg);
  cfg.hidden_size = H;
  cfg.intermediate_size = I;
  cfg.num_experts = E;
  cfg.top_k = k;
  return cfg;
}

void th_fill_logits(th_rng *rng, float *logits, int64_t T, int32_t E, int32_t k,
                    th_logits_kind kind) {
  for (int64_t t = 0; t < T; ++t) {
    float *row = logits + t * E;
    for (int32_t e = 0; e < E; ++e)
      row[e] = (float)th_rng_normal(rng);
    switch (kind) {
    case TH_LOGITS_TIES:
      for (int32_t e = 0; e < E; ++e)
        row[e] = t % 4 == 0 ? 0.25f : roundf(row[e] * 2.0f) / 2.0f;
      break;
    case TH_LOGITS_SPECIAL: {
      const int32_t at = (int32_t)th_rng_below(rng, E), other = (at + 1 + E / 2) % E;
      switch (t % 8) {
      case 1:
        row[at] = NAN;
        break;
      case 2:
        row[at] = INFINITY;
        break;
      case 3:
        row[at] = row[other] = INFINITY;
        break;
      case 4:
        for (int32_t e = 0; e < E; ++e)
          row[e] = NAN;
        break;
      case 5:
        for (int32_t e = 0; e < E; ++e)
          row[e] = -INFINITY;
        break;
      case 6:
        for (int32_t e = 0; e < E; e += 2)
          row[e] = -INFINITY;
        row[at] = NAN;
        break;
      case 7:
        row[at] = INFINITY;
        row[other] = NAN;
        row[(at + 1) % E] = -INFINITY;
        break;
      default:
        break;
      }
      break;
    }
    case TH_LOGITS_ONE_EXPERT:
      for (int32_t j = 0; j < k; ++j)
        row[E - 1 - j] = 8.0f + 0.25f * row[E - 1 - j];
      break;
    case TH_LOGITS_HALF_EMPTY:
      for (int32_t e = 1; e < E; e += 2)
        row[e] = -1000.0f;
      break;
    default:
      break;
    }
  }
}

void th_fill_expert_map(th_rng *rng, int32_t *map, int32_t E, int32_t EL, th_map_kind kind) {
  int32_t *order = th_malloc(sizeof(int32_t) * (size_t)E);
  for (int32_t e = 0; e < E; ++e)
    order[e] = e;
  for (int32_t e = E - 1; e > 0; --e) { /* Fisher-Yates */
    const int32_t j = (int32_t)th_rng_below(rng, e + 1), tmp = order[e];
    order[e] = order[j];
    order[j] = tmp;
  }
  for (int32_t e = 0; e < E; ++e)
    map[e] = -1;
  if (kind == TH_MAP_PARTIAL)
    for (int32_t i = 0; i < EL && i < E; ++i)
      map[order[i]] = i;
  free(order);
}

void th_layer_data_make(th_layer_data *d, const th_layer_spec *spec) {
  static const char *map_names[] = {"none", "partial", "no_local"};
  static const char *logit_names[] = {"normal", "ties", "special", "one_expert", "half_empty"};
  memset(d, 0, sizeof *d);
  d->cfg = spec->cfg;
  if (spec->map == TH_MAP_NONE || d->cfg.num_local_experts == 0)
    d->cfg.num_local_experts = spec->map == TH_MAP_NONE ? 0 : d->cfg.num_experts;
  const int64_t H = d->cfg.hidden_size, I = d->cfg.intermediate_size, T = spec->num_tokens;
  const int32_t E = d->cfg.num_experts;
  const int32_t EL = d->cfg.num_local_experts ? d->cfg.num_local_experts : E;
  d->num_tokens = T;
  th_rng rng = th_rng_make(spec->seed);
  d->w13 = th_malloc(sizeof(uint16_t) * (size_t)(EL * 2 * I * H));
  d->w2 = th_malloc(sizeof(uint16_t) * (size_t)(EL * H * I));
  d->x = th_malloc(sizeof(uint16_t) * (size_t)(T * H));
  d->logits = th_malloc(sizeof(float) * (size_t)(T * E));
  th_fill_bf16(&rng, d->w13, (size_t)(EL * 2 * I * H), 1.0 / sqrt((double)H));
  th_fill_bf16(&rng, d->w2, (size_t)(EL * H * I), 1.0 / sqrt((double)I));
  th_fill_bf16(&rng, d->x, (size_t)(T * H), 1.0);
  th_fill_logits(&rng, d->logits, T, E, d->cfg.top_k, spec->logits);
  if (spec->w13_bias) {
    d->w13_bias = th_malloc(sizeof(float) * (size_t)(EL * 2 * I));
    th_fill_f32(&rng, d->w13_bias, (size_t)(EL * 2 * I), 0.25);
  }
  if (spec->w2_bias) {
    d->w2_bias = th_malloc(sizeof(float) * (size_t)(EL * H));
    th_fill_f32(&rng, d->w2_bias, (size_t)(EL * H), 0.25);
  }
  if (spec->correction_bias) {
    d->correction_bias = th_malloc(sizeof(float) * (size_t)E);
    th_fill_f32(&rng, d->correction_bias, (size_t)E, 0.1);
  }
  if (spec->map != TH_MAP_NONE) {
    d->expert_map = th_malloc(sizeof(int32_t) * (size_t)E);
    th_fill_expert_map(&rng, d->expert_map, E, EL, spec->map);
  }
  d->weights = (moe_weights){
      .w13 = d->w13,
      .w2 = d->w2,
      .w13_bias = d->w13_bias,
      .w2_bias = d->w2_bias,
      .correction_bias = d->correction_bias,
      .expert_map = d->expert_map,
  };
  th_case("T=%lld %s biases(w13,w2,correction)=%d,%d,%d map=%s logits=%s seed=%#llx", (long long)T,
          th_config_text(&d->cfg), spec->w13_bias, spec->w2_bias, spec->correction_bias,
          map_names[spec->map], logit_names[spec->logits], (unsigned long long)spec->seed);
}

void th_layer_data_free(th_layer_data *d) {
  free(d->w13);
  free(d->w2);
  free(d->x);
  free(d->logits);
  free(d->w13_bias);
  free(d->w2_bias);
  free(d->correction_bias);
  free(d->expert_map);
  memset(d, 0, sizeof *d);
}

/* ---- Reporting -------------------------------------------------------- */

/* Criterion shows skipped tests only when verbose; a case a backend cannot
 * run must never look like a pass, so every skip is printed with its
 * reason (tests left out by --filter are not skips). Runs in the runner. */
static size_t skipped_count;

static bool filtered_out(const struct criterion_test_stats *stats) {
  return stats->test->data->disabled ||
         (stats->message && strcmp(stats->message, "Test is disabled") == 0);
}

/* Tests that finished their body but not their teardown: a worker that
 * ends in th_suite_fini (a leak) has no POST_FINI event, and Criterion
 * counts it as passed; main() fails the run for it. */
#define TH_MAX_TESTS 1024
static const struct criterion_test *teardown_pending[TH_MAX_TESTS];
static size_t teardown_pending_count, teardown_failures;

ReportHook(POST_TEST)(struct criterion_test_stats *stats) {
  if (filtered_out(stats)) return;
  if (teardown_pending_count < TH_MAX_TESTS)
    teardown_pending[teardown_pending_count++] = stats->test;
  if (stats->test_status != CR_STATUS_SKIPPED) return;
  ++skipped_count;
  printf("[SKIP] %s::%s: %s\n", stats->test->category, stats->test->name,
         stats->message ? stats->message : "(no reason given)");
  fflush(stdout);
}

ReportHook(POST_FINI)(struct criterion_test_stats *stats) {
  for (size_t i = 0; i < teardown_pending_count; ++i)
    if (teardown_pending[i] == stats->test) teardown_pending[i] = NULL;
}

ReportHook(POST_ALL)(struct criterion_global_stats *stats) {
  for (size_t i = 0; i < teardown_pending_count; ++i)
    if (teardown_pending[i]) {
      ++teardown_failures;
      printf("[FAIL] %s::%s: the test ended in its teardown (under AddressSanitizer: a leak, "
             "see the report above)\n",
             teardown_pending[i]->category, teardown_pending[i]->name);
    }
  const char *name = "?";
  moe_backend backend;
  th_backend_from_env(&backend, &name);
  printf("moe_tests (%s): %zu passed, %zu failed, %zu crashed, %zu skipped\n", name,
         stats->tests_passed - teardown_failures, stats->tests_failed + teardown_failures,
         stats->tests_crashed, skipped_count);
  fflush(stdout);
}

/* ---- main ------------------------------------------------------------- */

/* Criterion's workers find main by its symbol to run a single test: it must
 * stay visible although the project hides symbols by default. */
__attribute__((visibility("default"))) int main(int argc, char *argv[]) {
  moe_backend backend;
  const char *name;
  if (!th_backend_from_env(&backend, &name)) {
    fprintf(stderr, "moe_tests: MOE_TEST_BACKEND=%s is not one of cpu, cuda, opencl\n", name);
    return 2;
  }
  moe_context *ctx = NULL;
  moe_status status = moe_context_create(backend, 0, &ctx);
  if (status == MOE_ERROR_BACKEND_UNAVAILABLE) {
    printf("SKIPPED: backend %s has no device on this machine (%s)\n", name, moe_last_error(NULL));
    return 77;
  }
  if (status != MOE_SUCCESS) {
    fprintf(stderr, "moe_tests: cannot create a %s context: %s (%s)\n", name,
            moe_status_string(status), moe_last_error(NULL));
    return 1;
  }
  char failed[1200] = "";
  status = th_apply_test_options(ctx, failed, sizeof failed);
  if (status == MOE_ERROR_UNSUPPORTED) {
    printf("SKIPPED: backend %s on %s cannot run MOE_TEST_OPTIONS %s\n", name,
           moe_context_device_name(ctx), failed);
    moe_context_destroy(ctx);
    return 77;
  }
  if (status != MOE_SUCCESS) {
    fprintf(stderr, "moe_tests: MOE_TEST_OPTIONS: %s\n", failed);
    moe_context_destroy(ctx);
    return 2;
  }
  printf("moe_tests: backend %s on %s\n", name, moe_context_device_name(ctx));
  fflush(stdout);
  moe_context_destroy(ctx);

  struct criterion_test_set *tests = criterion_initialize();
  int result = 0;
  if (criterion_handle_args(argc, argv, true)) result = !criterion_run_all_tests(tests);
  if (teardown_failures) result = 1;
  criterion_finalize(tests);
  return result;
}

/* One forward of T tokens starting at token `first` of d, on a layer that
 * holds a reservation of at least T; out receives [T][H]. */
void th_layer_forward_tokens(moe_layer *layer, moe_context *ctx, const th_layer_data *d,
                             int64_t first, int64_t T, uint16_t *out) {
  const int64_t H = d->cfg.hidden_size, E = d->cfg.num_experts;
  const size_t out_bytes = (size_t)(T * H) * 2;
  moe_buffer *x = th_upload(ctx, d->x + first * H, (size_t)(T * H) * 2);
  moe_buffer *logits = th_upload(ctx, d->logits + first * E, (size_t)(T * E) * sizeof(float));
  moe_buffer *b_out = th_output(ctx, out_bytes);
  TH_OK(moe_layer_forward(layer, T, x, logits, b_out));
  th_download(b_out, out, out_bytes);
  th_check_guard(b_out, out_bytes, "out");
  moe_buffer_destroy(x);
  moe_buffer_destroy(logits);
  moe_buffer_destroy(b_out);
}
