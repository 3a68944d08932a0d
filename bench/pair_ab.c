/*
 * pair_ab.c - a paired A/B of two builds of the library in one process:
 * the same layer (same weights, inputs and routing) in each, forwards
 * alternating A, B / B, A, each after a cache flush, and the median of the
 * per-pair time ratios B / A.
 *
 * Why: the AMX hosts that compile-time variants are measured on are
 * shared, and their speed moves by up to 2x between runs a few seconds
 * apart (bench/results.md, 2026-12-07), so whole-run A/Bs (bench/cpu_ab.sh,
 * one moe_bench per variant and round) cannot see a 5% change. Forwards
 * a fraction of a second apart see the same host, so their ratio can.
 *
 * The two libraries are loaded with dlopen (RTLD_LOCAL), each with its own
 * state; this tool does not link the library, so each library's calls to
 * its own API resolve to itself. Usage:
 *   pair_ab LIB_A LIB_B [--model NAME[,NAME...] | --shape H,I,E,K]
 *           [--tokens T[,T...]] [--pairs N] [--option NAME=VALUE]...
 * (defaults: mixtral-8x7b,qwen3-30b-a3b; 128,512; 15 pairs; CPU backend;
 * threads from OMP_NUM_THREADS). --shape: one softmax top-k SwiGLU layer
 * of hidden H, intermediate I, E experts, top K (the smoke test's).
 */
#include "bench_cpu.h"
#include "bench_models.h"
#include "bench_random.h"
#include "bench_time.h"
#include "moe.h"

#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TOKEN_COUNTS 16
#define MAX_MODELS 8
#define MAX_OPTIONS 8
#define MAX_PAIRS 200

/* The API calls the tool makes, from one library. */
typedef struct library {
  const char *path;
  void *handle;
  void (*config_init)(moe_config *);
  moe_status (*context_create)(moe_backend, int, moe_context **);
  void (*context_destroy)(moe_context *);
  moe_status (*context_set_option)(moe_context *, const char *, const char *);
  moe_status (*context_synchronize)(moe_context *);
  const char *(*last_error)(const moe_context *);
  const char *(*device_name)(const moe_context *);
  moe_status (*buffer_create)(moe_context *, size_t, moe_buffer **);
  moe_status (*buffer_write)(moe_buffer *, size_t, const void *, size_t);
  void (*buffer_destroy)(moe_buffer *);
  moe_status (*layer_create)(moe_context *, const moe_config *, const moe_weights *, moe_layer **);
  void (*layer_destroy)(moe_layer *);
  moe_status (*layer_reserve)(moe_layer *, int64_t);
  moe_status (*layer_forward)(moe_layer *, int64_t, const moe_buffer *, const moe_buffer *,
                              moe_buffer *);
} library;

static int load_library(library *lib, const char *path) {
  *lib = (library){.path = path, .handle = dlopen(path, RTLD_NOW | RTLD_LOCAL)};
  if (!lib->handle) {
    fprintf(stderr, "pair_ab: %s\n", dlerror());
    return 1;
  }
  int missing = 0;
#define LOOKUP(field, name)                                                                        \
  do {                                                                                             \
    *(void **)&lib->field = dlsym(lib->handle, name);                                              \
    if (!lib->field) fprintf(stderr, "pair_ab: %s has no %s\n", path, name), missing = 1;          \
  } while (0)
  LOOKUP(config_init, "moe_config_init");
  LOOKUP(context_create, "moe_context_create");
  LOOKUP(context_destroy, "moe_context_destroy");
  LOOKUP(context_set_option, "moe_context_set_option");
  LOOKUP(context_synchronize, "moe_context_synchronize");
  LOOKUP(last_error, "moe_last_error");
  LOOKUP(device_name, "moe_context_device_name");
  LOOKUP(buffer_create, "moe_buffer_create");
  LOOKUP(buffer_write, "moe_buffer_write");
  LOOKUP(buffer_destroy, "moe_buffer_destroy");
  LOOKUP(layer_create, "moe_layer_create");
  LOOKUP(layer_destroy, "moe_layer_destroy");
  LOOKUP(layer_reserve, "moe_layer_reserve");
  LOOKUP(layer_forward, "moe_layer_forward");
#undef LOOKUP
  return missing;
}

/* The model table (bench_models.c) calls moe_config_init; the tool links
 * no library, so it forwards to the first one loaded. Not exported: the
 * libraries never see it. */
static library *config_source;
void moe_config_init(moe_config *cfg) {
  config_source->config_init(cfg);
}

/* One library's layer and buffers for one model. */
typedef struct side {
  const library *lib;
  moe_context *ctx;
  moe_layer *layer;
  moe_buffer *x, *logits, *out;
} side;

static void side_free(side *s) {
  if (!s->lib) return;
  s->lib->buffer_destroy(s->x);
  s->lib->buffer_destroy(s->logits);
  s->lib->buffer_destroy(s->out);
  s->lib->layer_destroy(s->layer);
  s->lib->context_destroy(s->ctx);
}

static moe_status upload(const side *s, const void *data, size_t bytes, moe_buffer **buf) {
  moe_status st = s->lib->buffer_create(s->ctx, bytes, buf);
  if (st == MOE_SUCCESS) st = s->lib->buffer_write(*buf, 0, data, bytes);
  return st;
}

/* Context (with the options), layer of `weights`, input buffers. */
static int side_open(side *s, const library *lib, const moe_config *cfg, const moe_weights *weights,
                     int64_t max_tokens, const uint16_t *x, const float *logits,
                     const char *const *options, int option_count) {
  *s = (side){.lib = lib};
  moe_status st = lib->context_create(MOE_BACKEND_CPU, 0, &s->ctx);
  for (int i = 0; st == MOE_SUCCESS && i < option_count; ++i) {
    char name[128];
    const char *eq = strchr(options[i], '=');
    snprintf(name, sizeof name, "%.*s", (int)(eq - options[i]), options[i]);
    st = lib->context_set_option(s->ctx, name, eq + 1);
  }
  const size_t H = (size_t)cfg->hidden_size, E = (size_t)cfg->num_experts;
  if (st == MOE_SUCCESS) st = lib->layer_create(s->ctx, cfg, weights, &s->layer);
  if (st == MOE_SUCCESS) st = lib->layer_reserve(s->layer, max_tokens);
  if (st == MOE_SUCCESS) st = upload(s, x, (size_t)max_tokens * H * 2, &s->x);
  if (st == MOE_SUCCESS) st = upload(s, logits, (size_t)max_tokens * E * 4, &s->logits);
  if (st == MOE_SUCCESS) st = lib->buffer_create(s->ctx, (size_t)max_tokens * H * 2, &s->out);
  if (st != MOE_SUCCESS) fprintf(stderr, "pair_ab: %s: %s\n", lib->path, lib->last_error(s->ctx));
  return st != MOE_SUCCESS;
}

/* One forward after a cache flush, in seconds (negative on an error). */
static double timed_forward(const side *s, int64_t tokens) {
  bench_cpu_flush_caches();
  const double t0 = bench_seconds();
  moe_status st = s->lib->layer_forward(s->layer, tokens, s->x, s->logits, s->out);
  if (st == MOE_SUCCESS) st = s->lib->context_synchronize(s->ctx);
  const double t = bench_seconds() - t0;
  if (st != MOE_SUCCESS) {
    fprintf(stderr, "pair_ab: %s: forward: %s\n", s->lib->path, s->lib->last_error(s->ctx));
    return -1;
  }
  return t;
}

/* `pairs` pairs at `tokens`, the order alternating; prints one row. */
static int run_point(const char *model, const side *a, const side *b, int64_t tokens, int pairs) {
  double ta[MAX_PAIRS], tb[MAX_PAIRS], ratio[MAX_PAIRS];
  if (timed_forward(a, tokens) < 0 || timed_forward(b, tokens) < 0) return 1; /* warm-up */
  for (int i = 0; i < pairs; ++i) {
    const side *first = i % 2 ? b : a, *second = i % 2 ? a : b;
    const double t1 = timed_forward(first, tokens), t2 = timed_forward(second, tokens);
    if (t1 < 0 || t2 < 0) return 1;
    ta[i] = i % 2 ? t2 : t1;
    tb[i] = i % 2 ? t1 : t2;
    ratio[i] = tb[i] / ta[i];
  }
  const double med_a = bench_median(ta, pairs), med_b = bench_median(tb, pairs);
  const double med_r = bench_median(ratio, pairs); /* sorts ratio */
  printf("| %s | %lld | %.1f | %.1f | %.3f | %.3f-%.3f | %d |\n", model, (long long)tokens,
         med_a * 1e6, med_b * 1e6, med_r, ratio[pairs / 4], ratio[(3 * pairs) / 4], pairs);
  fflush(stdout);
  return 0;
}

static int run_model(const bench_model *model, const library *lib_a, const library *lib_b,
                     const int64_t *tokens, int token_count, int pairs, const char *const *options,
                     int option_count) {
  const moe_config *cfg = &model->cfg;
  const int64_t H = cfg->hidden_size, I = cfg->intermediate_size, E = cfg->num_experts;
  int64_t max_tokens = 1;
  for (int i = 0; i < token_count; ++i)
    if (tokens[i] > max_tokens) max_tokens = tokens[i];
  const size_t w13_count = (size_t)(E * 2 * I * H), w2_count = (size_t)(E * H * I);
  uint16_t *w13 = malloc(w13_count * 2), *w2 = malloc(w2_count * 2);
  uint16_t *x = malloc((size_t)(max_tokens * H) * 2);
  float *logits = malloc((size_t)(max_tokens * E) * 4);
  float *w13_bias = NULL, *w2_bias = NULL, *correction = NULL;
  side a = {0}, b = {0};
  int failed = 1, out_of_memory = 1; /* until the host copies exist */
  if (!w13 || !w2 || !x || !logits) goto done;
  /* moe_bench's inputs (seed 1): the same weights, inputs and routing. */
  bench_random_bf16(w13, w13_count, 1.0f / sqrtf((float)H), 2);
  bench_random_bf16(w2, w2_count, 1.0f / sqrtf((float)I), 3);
  bench_random_bf16(x, (size_t)(max_tokens * H), 1.0f, 7);
  bench_random_f32(logits, (size_t)(max_tokens * E), 1.0f, 8);
  moe_weights weights = {.w13 = w13, .w2 = w2};
  if (model->has_biases) {
    w13_bias = malloc((size_t)(E * 2 * I) * 4);
    w2_bias = malloc((size_t)(E * H) * 4);
    if (!w13_bias || !w2_bias) goto done;
    bench_random_f32(w13_bias, (size_t)(E * 2 * I), 1.0f / sqrtf((float)H), 4);
    bench_random_f32(w2_bias, (size_t)(E * H), 1.0f / sqrtf((float)I), 5);
    weights.w13_bias = w13_bias, weights.w2_bias = w2_bias;
  }
  if (model->has_correction_bias) {
    if (!(correction = malloc((size_t)E * 4))) goto done;
    bench_random_f32(correction, (size_t)E, 0.1f, 6);
    weights.correction_bias = correction;
  }
  out_of_memory = 0; /* the libraries print their own errors from here on */
  if (side_open(&a, lib_a, cfg, &weights, max_tokens, x, logits, options, option_count) ||
      side_open(&b, lib_b, cfg, &weights, max_tokens, x, logits, options, option_count))
    goto done;
  free(w13), w13 = NULL; /* the layers keep their own copies */
  free(w2), w2 = NULL;
  failed = 0;
  for (int i = 0; i < token_count && !failed; ++i)
    failed = run_point(model->name, &a, &b, tokens[i], pairs);
done:
  if (out_of_memory) fprintf(stderr, "pair_ab: out of host memory\n");
  side_free(&a);
  side_free(&b);
  free(w13), free(w2), free(x), free(logits), free(w13_bias), free(w2_bias), free(correction);
  return failed;
}

static int parse_list(const char *s, int64_t *values, int max) {
  int n = 0;
  for (const char *p = s; *p && n < max;) {
    char *end;
    const long long v = strtoll(p, &end, 10);
    if (end == p || v < 1) return 0;
    values[n++] = v;
    p = *end == ',' ? end + 1 : end;
    if (*end && *end != ',') return 0;
  }
  return n;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: pair_ab LIB_A LIB_B [--model NAME[,NAME...] | --shape H,I,E,K]\n"
                    "               [--tokens T[,T...]] [--pairs N] [--option NAME=VALUE]...\n");
    return 2;
  }
  library lib_a, lib_b;
  if (load_library(&lib_a, argv[1]) || load_library(&lib_b, argv[2])) return 1;
  if (lib_a.handle == lib_b.handle) {
    fprintf(stderr, "pair_ab: both paths load the same library; give two different files\n");
    return 2;
  }
  config_source = &lib_a;
  const char *models = "mixtral-8x7b,qwen3-30b-a3b";
  int64_t tokens[MAX_TOKEN_COUNTS] = {128, 512}, shape[4];
  int token_count = 2, pairs = 15, option_count = 0, has_shape = 0;
  const char *options[MAX_OPTIONS];
  for (int i = 3; i < argc; i += 2) {
    if (i + 1 == argc) {
      fprintf(stderr, "pair_ab: %s needs a value\n", argv[i]);
      return 2;
    }
    if (strcmp(argv[i], "--model") == 0)
      models = argv[i + 1];
    else if (strcmp(argv[i], "--shape") == 0 && parse_list(argv[i + 1], shape, 4) == 4)
      has_shape = 1;
    else if (strcmp(argv[i], "--tokens") == 0)
      token_count = parse_list(argv[i + 1], tokens, MAX_TOKEN_COUNTS);
    else if (strcmp(argv[i], "--pairs") == 0)
      pairs = atoi(argv[i + 1]);
    else if (strcmp(argv[i], "--option") == 0 && option_count < MAX_OPTIONS &&
             strchr(argv[i + 1], '='))
      options[option_count++] = argv[i + 1];
    else {
      fprintf(stderr, "pair_ab: bad argument %s\n", argv[i]);
      return 2;
    }
  }
  if (token_count < 1 || pairs < 2 || pairs > MAX_PAIRS) {
    fprintf(stderr, "pair_ab: --tokens needs positive counts, --pairs 2..%d\n", MAX_PAIRS);
    return 2;
  }
  /* The host's state at the start, to tell hosts apart (moe_bench's rooflines). */
  bench_rooflines roof = {0};
  char read_what[160] = "";
  if (bench_cpu_rooflines((size_t)1 << 30, &roof, read_what, sizeof read_what) == 0)
    printf("host: %s; read %.1f GB/s (%s); peak %.2f TFLOP/s (%s)\n", roof.device, roof.read_gbps,
           read_what, roof.peak_tflops, roof.peak_what);
  printf("A: %s\nB: %s\n\n", lib_a.path, lib_b.path);
  printf("| model | tokens | A us | B us | B/A (median of pairs) | quartiles | pairs |\n");
  printf("|---|---:|---:|---:|---:|---|---:|\n");
  const bench_model custom =
      has_shape ? bench_model_custom(shape[0], shape[1], (int32_t)shape[2], (int32_t)shape[3])
                : (bench_model){0};
  char *list = strdup(has_shape ? custom.name : models), *save = NULL;
  int failed = !list;
  for (char *name = list ? strtok_r(list, ",", &save) : NULL; name && !failed;
       name = strtok_r(NULL, ",", &save)) {
    const bench_model *model = has_shape ? &custom : bench_model_find(name);
    if (!model) {
      fprintf(stderr, "pair_ab: no model %s\n", name);
      failed = 1;
      break;
    }
    failed = run_model(model, &lib_a, &lib_b, tokens, token_count, pairs, options, option_count);
  }
  free(list);
  bench_cpu_flush_free();
  return failed;
}
