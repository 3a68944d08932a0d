/*
 * moe_bench.c - times moe_layer_forward on named model shapes and token
 * counts on any backend, against the machine's own rooflines measured in
 * the same run. Run `moe_bench --help` for the options.
 *
 * Per model: one layer with random weights, reserved for the largest token
 * count; per token count: random x and logits, the routing of those logits
 * read back (to count the distinct experts whose weights the batch reads),
 * then the median of timed forwards after warm-up.
 */
#define _GNU_SOURCE /* strcasestr */
#include "bench_cpu.h"
#include "bench_device.h"
#include "bench_models.h"
#include "bench_random.h"
#include "bench_report.h"
#include "bench_time.h"
#include "moe.h"

#include <math.h>
#include <omp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define MAX_TOKEN_COUNTS 64
#define MAX_OPTIONS 32
#define MAX_ROWS 1024
#define MAX_MODELS 16

static const int64_t cpu_tokens[] = {1, 16, 512};
static const int64_t gpu_tokens[] = {1, 4, 16, 64, 256, 1024, 4096, 16384};

typedef struct bench_options {
  moe_backend backend;
  int device;
  int model_index[MAX_MODELS]; /* indices into the model table */
  int model_count;             /* 0: qwen3-30b-a3b, or custom with sizes given */
  int64_t hidden, intermediate;
  int32_t experts, top_k; /* 0: the model's own */
  int64_t tokens[MAX_TOKEN_COUNTS];
  int token_count;      /* 0: the backend's default list */
  int reps;             /* 0: enough for about a second per point (host timing) */
  int warmup;           /* -1: the backend's default */
  bool flush;           /* flush the CPU caches before each timed forward */
  bool batch_invariant; /* layers built with moe_config.batch_invariant */
  uint64_t seed;
  const char *json;
  const char *options[MAX_OPTIONS]; /* "name=value" for moe_context_set_option */
  int option_count;
} bench_options;

static void usage(FILE *out) {
  fprintf(out, "usage: moe_bench [options]\n"
               "  --backend auto|cpu|cuda|opencl  backend (default auto: $MOE_BACKEND, else CUDA,\n"
               "                                  else an OpenCL GPU, else the CPU)\n"
               "  --device N                      device index within the backend (default 0)\n"
               "  --model NAME[,NAME...]|all      named shapes (default qwen3-30b-a3b):\n");
  for (int i = 0; i < bench_model_count(); ++i) {
    const moe_config *c = &bench_model_at(i)->cfg;
    fprintf(out, "                                    %-18s H=%lld I=%lld E=%d k=%d\n",
            bench_model_at(i)->name, (long long)c->hidden_size, (long long)c->intermediate_size,
            c->num_experts, c->top_k);
  }
  fprintf(out,
          "  --hidden H --intermediate I --experts E --topk K\n"
          "                                  override the model's sizes (without --model: a\n"
          "                                  softmax top-k SwiGLU layer named custom)\n"
          "  --tokens 1,4,16,...             token counts (default CPU: 1,16,512;\n"
          "                                  GPU: 1,4,16,64,256,1024,4096,16384)\n"
          "  --reps N                        timed forwards per point (default: about 1 s of\n"
          "                                  them, 3..30, on host timing; 50 with CUDA graphs)\n"
          "  --warmup N                      untimed forwards first (default 1; GPUs 10)\n"
          "  --no-flush                      keep the CPU caches warm between forwards\n"
          "                                  (default: flush, as a real layer's weights are cold)\n"
          "  --batch-invariant               build the layers batch-invariant (moe_config's\n"
          "                                  batch_invariant: one kernel plan at every T)\n"
          "  --seed N                        random seed (default 1)\n"
          "  --json FILE                     also write every row and the rooflines as JSON\n"
          "  --option NAME=VALUE             a context option (moe_context_set_option; names\n"
          "                                  and values in include/moe.h), e.g.\n"
          "                                  cuda.path=mma or cpu.kernels=portable; repeatable\n"
          "  --help                          this text\n"
          "Environment: OMP_NUM_THREADS, MOE_BACKEND.\n");
}

static bool parse_int64(const char *s, int64_t min, int64_t *value) {
  char *end = NULL;
  const long long v = strtoll(s, &end, 10);
  if (!s[0] || *end || v < min) return false;
  *value = v;
  return true;
}

static bool parse_tokens(const char *s, bench_options *o) {
  o->token_count = 0;
  char *copy = strdup(s), *save = NULL;
  bool ok = copy != NULL;
  for (char *tok = copy ? strtok_r(copy, ",", &save) : NULL; ok && tok;
       tok = strtok_r(NULL, ",", &save)) {
    ok = o->token_count < MAX_TOKEN_COUNTS && parse_int64(tok, 1, &o->tokens[o->token_count]);
    o->token_count += ok;
  }
  free(copy);
  return ok && o->token_count > 0;
}

/* "all", or a comma-separated list of model names. */
static bool parse_models(const char *s, bench_options *o) {
  o->model_count = 0;
  if (strcmp(s, "all") == 0) {
    for (int i = 0; i < bench_model_count(); ++i)
      o->model_index[o->model_count++] = i;
    return true;
  }
  char *copy = strdup(s), *save = NULL;
  bool ok = copy != NULL;
  for (char *name = copy ? strtok_r(copy, ",", &save) : NULL; ok && name;
       name = strtok_r(NULL, ",", &save)) {
    int found = -1;
    for (int i = 0; i < bench_model_count(); ++i)
      if (strcmp(bench_model_at(i)->name, name) == 0) found = i;
    ok = found >= 0 && o->model_count < MAX_MODELS;
    if (ok) o->model_index[o->model_count++] = found;
  }
  free(copy);
  return ok && o->model_count > 0;
}

/* Returns 0 to run, 1 after --help, 2 on a bad option (message printed). */
static int parse_options(int argc, char **argv, bench_options *o) {
  *o = (bench_options){.backend = MOE_BACKEND_AUTO, .warmup = -1, .flush = true, .seed = 1};
  for (int i = 1; i < argc; ++i) {
    const char *arg = argv[i];
    if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
      usage(stdout);
      return 1;
    }
    if (strcmp(arg, "--no-flush") == 0) {
      o->flush = false;
      continue;
    }
    if (strcmp(arg, "--batch-invariant") == 0) {
      o->batch_invariant = true;
      continue;
    }
    if (i + 1 >= argc) {
      fprintf(stderr, "moe_bench: unknown option or missing value: %s\n", arg);
      usage(stderr);
      return 2;
    }
    const char *value = argv[++i];
    int64_t v = 0;
    bool ok = true;
    if (strcmp(arg, "--backend") == 0) {
      const moe_backend all[] = {MOE_BACKEND_AUTO, MOE_BACKEND_CPU, MOE_BACKEND_CUDA,
                                 MOE_BACKEND_OPENCL};
      ok = false;
      for (size_t b = 0; b < sizeof all / sizeof all[0]; ++b)
        if (strcmp(value, moe_backend_name(all[b])) == 0) o->backend = all[b], ok = true;
    } else if (strcmp(arg, "--device") == 0) {
      ok = parse_int64(value, 0, &v) && v <= 1024;
      o->device = (int)v;
    } else if (strcmp(arg, "--model") == 0) {
      ok = parse_models(value, o);
    } else if (strcmp(arg, "--hidden") == 0) {
      ok = parse_int64(value, 1, &o->hidden);
    } else if (strcmp(arg, "--intermediate") == 0) {
      ok = parse_int64(value, 1, &o->intermediate);
    } else if (strcmp(arg, "--experts") == 0) {
      ok = parse_int64(value, 1, &v) && v <= MOE_MAX_EXPERTS;
      o->experts = (int32_t)v;
    } else if (strcmp(arg, "--topk") == 0) {
      ok = parse_int64(value, 1, &v) && v <= MOE_MAX_TOP_K;
      o->top_k = (int32_t)v;
    } else if (strcmp(arg, "--tokens") == 0) {
      ok = parse_tokens(value, o);
    } else if (strcmp(arg, "--reps") == 0) {
      ok = parse_int64(value, 1, &v) && v <= 100000;
      o->reps = (int)v;
    } else if (strcmp(arg, "--warmup") == 0) {
      ok = parse_int64(value, 0, &v) && v <= 100000;
      o->warmup = (int)v;
    } else if (strcmp(arg, "--seed") == 0) {
      ok = parse_int64(value, 0, &v);
      o->seed = (uint64_t)v;
    } else if (strcmp(arg, "--option") == 0) {
      ok = strchr(value, '=') != NULL && o->option_count < MAX_OPTIONS;
      if (ok) o->options[o->option_count++] = value;
    } else if (strcmp(arg, "--json") == 0) {
      o->json = value;
    } else {
      fprintf(stderr, "moe_bench: unknown option %s\n", arg);
      usage(stderr);
      return 2;
    }
    if (!ok) {
      fprintf(stderr, "moe_bench: bad value for %s: %s\n", arg, value);
      return 2;
    }
  }
  return 0;
}

/* The models to run: those named, or custom sizes over a base model. */
static int select_models(const bench_options *o, bench_model *models) {
  const bool resized = o->hidden || o->intermediate || o->experts || o->top_k;
  int count = 0;
  for (int i = 0; i < o->model_count; ++i)
    models[count++] = *bench_model_at(o->model_index[i]);
  const bench_model *qwen3 = bench_model_find("qwen3-30b-a3b");
  if (count == 0 && resized)
    models[count++] = bench_model_custom(qwen3->cfg.hidden_size, qwen3->cfg.intermediate_size,
                                         qwen3->cfg.num_experts, qwen3->cfg.top_k);
  else if (count == 0)
    models[count++] = *qwen3;
  for (int i = 0; i < count; ++i)
    models[i].cfg.batch_invariant = o->batch_invariant;
  for (int i = 0; i < count && resized; ++i) {
    moe_config *c = &models[i].cfg;
    if (o->hidden) c->hidden_size = o->hidden;
    if (o->intermediate) c->intermediate_size = o->intermediate;
    if (o->experts) c->num_experts = o->experts;
    if (o->top_k) c->top_k = o->top_k;
    /* Grouped routing only survives a resize that keeps the groups valid. */
    if (c->num_groups > 1 && (c->num_experts % c->num_groups != 0 ||
                              c->top_k > c->topk_groups * (c->num_experts / c->num_groups)))
      c->num_groups = 0, c->topk_groups = 0;
  }
  return count;
}

/* MemAvailable from /proc/meminfo in bytes, or 0 when unknown. */
static double host_memory_available(void) {
  FILE *f = fopen("/proc/meminfo", "r");
  if (!f) return 0;
  char line[256];
  double kib = 0;
  while (fgets(line, sizeof line, f))
    if (sscanf(line, "MemAvailable: %lf kB", &kib) == 1) break;
  fclose(f);
  return kib * 1024;
}

/* Everything the timing loop needs. */
typedef struct bench_target {
  moe_context *ctx;
  bool use_cuda_timer;   /* CUDA events around graph replays */
  bool use_opencl_timer; /* profiling markers around each forward */
  bool on_cpu;           /* the device is the host CPU: its memory is ours */
  bool flush;            /* flush the host caches before each timed forward */
  int warmup, reps;      /* reps 0: automatic */
} bench_target;

typedef struct layer_buffers {
  moe_buffer *x, *logits, *out, *topk_ids, *topk_weights;
} layer_buffers;

/* One timed forward on the host clock: forward + synchronize. Returns 0,
 * or nonzero after printing the library's message. */
static int host_forward_seconds(const bench_target *t, moe_layer *layer, int64_t tokens,
                                const layer_buffers *b, double *seconds) {
  if (t->flush) bench_cpu_flush_caches();
  const double t0 = bench_seconds();
  moe_status st = moe_layer_forward(layer, tokens, b->x, b->logits, b->out);
  if (st == MOE_SUCCESS) st = moe_context_synchronize(t->ctx);
  *seconds = bench_seconds() - t0;
  if (st != MOE_SUCCESS)
    fprintf(stderr, "moe_bench: forward: %s (%s)\n", moe_status_string(st), moe_last_error(t->ctx));
  return st != MOE_SUCCESS;
}

/* The median and fastest forward times in microseconds (min 0: not known),
 * and the reps it took. */
static int time_forward(const bench_target *t, moe_layer *layer, int64_t tokens,
                        const layer_buffers *b, double *median_us, double *min_us, int *reps_done) {
  if (t->use_cuda_timer) {
#ifdef MOE_BENCH_HAVE_CUDA
    double ms = 0;
    const int reps = t->reps > 0 ? t->reps : 50;
    if (bench_cuda_time_forward(t->ctx, layer, tokens, b->x, b->logits, b->out, t->warmup, reps,
                                &ms) != 0)
      return 1;
    *median_us = ms * 1e3;
    *min_us = 0;
    *reps_done = reps;
    return 0;
#endif
  }
  if (t->use_opencl_timer) {
#ifdef MOE_BENCH_HAVE_OPENCL
    double ms = 0;
    const int reps = t->reps > 0 ? t->reps : 30;
    if (bench_opencl_time_forward(t->ctx, layer, tokens, b->x, b->logits, b->out, t->warmup, reps,
                                  &ms) != 0)
      return 1;
    *median_us = ms * 1e3;
    *min_us = 0;
    *reps_done = reps;
    return 0;
#endif
  }
  double seconds = 0;
  for (int i = 0; i < t->warmup; ++i)
    if (host_forward_seconds(t, layer, tokens, b, &seconds)) return 1;
  int reps = t->reps;
  if (reps <= 0) {
    /* About one second of timed forwards, from the last warm-up's time. */
    const double target = 1.0;
    reps = t->warmup > 0 && seconds > 0 ? (int)ceil(target / seconds) : 5;
    reps = reps < 3 ? 3 : reps > 30 ? 30 : reps;
  }
  double *times = malloc(sizeof *times * (size_t)reps);
  if (!times) return 1;
  for (int i = 0; i < reps; ++i)
    if (host_forward_seconds(t, layer, tokens, b, &times[i])) {
      free(times);
      return 1;
    }
  *median_us = 1e6 * bench_median(times, reps); /* sorts: times[0] is the fastest */
  *min_us = 1e6 * times[0];
  *reps_done = reps;
  free(times);
  return 0;
}

/* Distinct experts chosen by the routing of the first `tokens` logits,
 * computed by the library itself on the same context. */
static int count_touched_experts(moe_context *ctx, const moe_config *cfg,
                                 const moe_buffer *correction_bias, int64_t tokens,
                                 const layer_buffers *b, int32_t *touched) {
  const size_t slots = (size_t)tokens * (size_t)cfg->top_k;
  int32_t *ids = malloc(slots * sizeof *ids);
  bool *seen = calloc((size_t)cfg->num_experts, sizeof *seen);
  moe_status st = ids && seen ? MOE_SUCCESS : MOE_ERROR_OUT_OF_MEMORY;
  if (st == MOE_SUCCESS)
    st = moe_route(ctx, cfg, tokens, b->logits, correction_bias, b->topk_ids, b->topk_weights);
  if (st == MOE_SUCCESS) st = moe_buffer_read(b->topk_ids, 0, ids, slots * sizeof *ids);
  *touched = 0;
  for (size_t s = 0; st == MOE_SUCCESS && s < slots; ++s)
    if (ids[s] >= 0 && ids[s] < cfg->num_experts && !seen[ids[s]]) seen[ids[s]] = true, ++*touched;
  if (st != MOE_SUCCESS)
    fprintf(stderr, "moe_bench: routing for the expert count: %s (%s)\n", moe_status_string(st),
            moe_last_error(ctx));
  free(ids);
  free(seen);
  return st != MOE_SUCCESS;
}

/* A device buffer holding `bytes` of host data. */
static moe_status upload(moe_context *ctx, const void *data, size_t bytes, moe_buffer **buf) {
  moe_status st = moe_buffer_create(ctx, bytes, buf);
  if (st == MOE_SUCCESS) st = moe_buffer_write(*buf, 0, data, bytes);
  return st;
}

/* Creates the layer (random weights), then measures every token count.
 * Appends rows; returns 0 (also when the model is too big for the host's
 * memory and skipped), or nonzero on an error. */
static int run_model(const bench_target *t, const bench_run *run, const bench_model *model,
                     const int64_t *tokens, int token_count, uint64_t seed, bench_row *rows,
                     int *row_count) {
  const moe_config *cfg = &model->cfg;
  const int64_t H = cfg->hidden_size, I = cfg->intermediate_size;
  const int32_t E = cfg->num_experts, k = cfg->top_k;
  int64_t max_tokens = 0;
  for (int i = 0; i < token_count; ++i)
    max_tokens = tokens[i] > max_tokens ? tokens[i] : max_tokens;

  char why[512];
  moe_status st = moe_config_validate(cfg);
  if (st != MOE_SUCCESS) {
    snprintf(why, sizeof why, "invalid configuration: %s", moe_last_error(NULL));
    bench_print_skip(stdout, model->name, why);
    return 1;
  }
  /* The host copy, plus the backend's repacked copy when it lives in host
   * memory too (CPU, and OpenCL on a CPU device). */
  const double weight_bytes = bench_model_expert_bytes(cfg) * E;
  const double host_bytes = weight_bytes * (t->on_cpu ? 2 : 1);
  const double available = host_memory_available();
  if (available > 0 && host_bytes > 0.9 * available) {
    snprintf(why, sizeof why,
             "needs about %.1f GB of host memory for its weights, %.1f GB available",
             host_bytes * 1e-9, available * 1e-9);
    bench_print_skip(stdout, model->name, why);
    return 0; /* too big for this machine: not a failure */
  }

  const size_t w13_count = (size_t)E * 2 * (size_t)I * (size_t)H;
  const size_t w2_count = (size_t)E * (size_t)H * (size_t)I;
  uint16_t *w13 = malloc(w13_count * sizeof *w13), *w2 = malloc(w2_count * sizeof *w2);
  float *w13_bias = NULL, *w2_bias = NULL, *correction = NULL;
  moe_layer *layer = NULL;
  moe_buffer *correction_buf = NULL;
  layer_buffers b = {0};
  uint16_t *x = NULL;
  float *logits = NULL;
  int failed = 1;
  /* On failure: step says where; host_oom tells our own allocations (no
   * library message) from library calls (message in moe_last_error). */
  const char *step = "allocating host weights";
  bool host_oom = true;
  st = MOE_ERROR_OUT_OF_MEMORY;
  if (!w13 || !w2) goto done;
  bench_random_bf16(w13, w13_count, 1.0f / sqrtf((float)H), seed + 1);
  bench_random_bf16(w2, w2_count, 1.0f / sqrtf((float)I), seed + 2);
  moe_weights weights = {.w13 = w13, .w2 = w2};
  if (model->has_biases) {
    w13_bias = malloc((size_t)E * 2 * (size_t)I * sizeof *w13_bias);
    w2_bias = malloc((size_t)E * (size_t)H * sizeof *w2_bias);
    if (!w13_bias || !w2_bias) goto done;
    bench_random_f32(w13_bias, (size_t)E * 2 * (size_t)I, 1.0f / sqrtf((float)H), seed + 3);
    bench_random_f32(w2_bias, (size_t)E * (size_t)H, 1.0f / sqrtf((float)I), seed + 4);
    weights.w13_bias = w13_bias;
    weights.w2_bias = w2_bias;
  }
  if (model->has_correction_bias) {
    correction = malloc((size_t)E * sizeof *correction);
    if (!correction) goto done;
    bench_random_f32(correction, (size_t)E, 0.1f, seed + 5);
    weights.correction_bias = correction;
  }

  step = "moe_layer_create";
  host_oom = false;
  st = moe_layer_create(t->ctx, cfg, &weights, &layer);
  /* The layer keeps its own copy: free ours before the workspace grows. */
  free(w13), w13 = NULL;
  free(w2), w2 = NULL;
  if (st != MOE_SUCCESS) goto done;
  step = "moe_layer_reserve";
  if ((st = moe_layer_reserve(layer, max_tokens)) != MOE_SUCCESS) goto done;

  step = "creating the input buffers";
  x = malloc((size_t)max_tokens * (size_t)H * sizeof *x);
  logits = malloc((size_t)max_tokens * (size_t)E * sizeof *logits);
  if (!x || !logits) {
    st = MOE_ERROR_OUT_OF_MEMORY, host_oom = true;
    goto done;
  }
  bench_random_bf16(x, (size_t)max_tokens * (size_t)H, 1.0f, seed + 6);
  bench_random_f32(logits, (size_t)max_tokens * (size_t)E, 1.0f, seed + 7);
  const size_t slots = (size_t)max_tokens * (size_t)k;
  if ((st = upload(t->ctx, x, (size_t)max_tokens * (size_t)H * sizeof *x, &b.x)) ||
      (st = upload(t->ctx, logits, (size_t)max_tokens * (size_t)E * sizeof *logits, &b.logits)) ||
      (st = moe_buffer_create(t->ctx, (size_t)max_tokens * (size_t)H * 2, &b.out)) ||
      (st = moe_buffer_create(t->ctx, slots * sizeof(int32_t), &b.topk_ids)) ||
      (st = moe_buffer_create(t->ctx, slots * sizeof(float), &b.topk_weights)))
    goto done;
  if (correction && (st = upload(t->ctx, correction, (size_t)E * sizeof *correction,
                                 &correction_buf)) != MOE_SUCCESS)
    goto done;

  st = MOE_SUCCESS;
  failed = 0;
  for (int i = 0; i < token_count && *row_count < MAX_ROWS; ++i) {
    bench_row row = {.model = model->name,
                     .hidden = H,
                     .intermediate = I,
                     .experts = E,
                     .top_k = k,
                     .tokens = tokens[i],
                     .flops = bench_model_flops(cfg, tokens[i])};
    if (count_touched_experts(t->ctx, cfg, correction_buf, tokens[i], &b, &row.experts_touched) ||
        time_forward(t, layer, tokens[i], &b, &row.median_us, &row.min_us, &row.reps)) {
      failed = 1;
      break;
    }
    row.bytes = row.experts_touched * bench_model_expert_bytes(cfg);
    rows[(*row_count)++] = row;
    bench_print_row(stdout, run, &row);
  }

done:
  if (st != MOE_SUCCESS) {
    snprintf(why, sizeof why, "%s: %s (%s)", step, moe_status_string(st),
             host_oom ? "out of host memory" : moe_last_error(t->ctx));
    bench_print_skip(stdout, model->name, why);
  }
  moe_buffer_destroy(b.x);
  moe_buffer_destroy(b.logits);
  moe_buffer_destroy(b.out);
  moe_buffer_destroy(b.topk_ids);
  moe_buffer_destroy(b.topk_weights);
  moe_buffer_destroy(correction_buf);
  moe_layer_destroy(layer);
  free(x);
  free(logits);
  free(w13);
  free(w2);
  free(w13_bias);
  free(w2_bias);
  free(correction);
  return failed;
}

/* "avx512" from "Intel Xeon ... [avx512]"; the backend's name otherwise. */
static void kernel_path(const char *device, const char *backend, char *dst, size_t size) {
  const char *open = strrchr(device, '[');
  const char *close = open ? strchr(open, ']') : NULL;
  if (open && close && close > open + 1)
    snprintf(dst, size, "%.*s", (int)(close - open - 1), open + 1);
  else
    snprintf(dst, size, "%s", backend);
}

/* OpenCL on a CPU (PoCL): host-style token counts and cache flushing. */
static bool device_is_cpu(moe_backend backend, const char *device) {
  return backend == MOE_BACKEND_CPU || strcasestr(device, "cpu") || strcasestr(device, "pthread") ||
         strcasestr(device, "xeon") || strcasestr(device, "epyc") || strcasestr(device, "ryzen") ||
         strcasestr(device, "core(tm)");
}

static bool measure_cpu_rooflines(bench_run *run) {
  return bench_cpu_rooflines((size_t)1 << 30, &run->roof, run->read_what, sizeof run->read_what) ==
         0;
}

/* Measures the rooflines of the context's device; false when this build
 * has no roofline code for it. OpenCL on the host CPU (PoCL) without
 * bench_opencl.c gets the CPU's own rooflines. */
static bool measure_rooflines(moe_context *ctx, bool on_cpu, bench_run *run) {
  switch (moe_context_backend(ctx)) {
  case MOE_BACKEND_CPU:
    return measure_cpu_rooflines(run);
#ifdef MOE_BENCH_HAVE_CUDA
  case MOE_BACKEND_CUDA:
    snprintf(run->read_what, sizeof run->read_what, "bench_cuda read kernel");
    return bench_cuda_rooflines(ctx, &run->roof) == 0;
#endif
  case MOE_BACKEND_OPENCL:
#ifdef MOE_BENCH_HAVE_OPENCL
    (void)on_cpu;
    snprintf(run->read_what, sizeof run->read_what, "bench_opencl read kernel");
    return bench_opencl_rooflines(ctx, &run->roof) == 0;
#else
    return on_cpu && measure_cpu_rooflines(run);
#endif
  default:
    return false;
  }
}

int main(int argc, char **argv) {
  bench_options opt;
  const int parsed = parse_options(argc, argv, &opt);
  if (parsed) return parsed == 1 ? 0 : 2;

  size_t command_size = 1;
  for (int i = 0; i < argc; ++i)
    command_size += strlen(argv[i]) + 1;
  char *command = calloc(command_size, 1);
  for (int i = 0; command && i < argc; ++i) {
    if (i) strcat(command, " ");
    strcat(command, argv[i]);
  }

  moe_context *ctx = NULL;
  moe_status st = moe_context_create(opt.backend, opt.device, &ctx);
  if (st != MOE_SUCCESS) {
    fprintf(stderr, "moe_bench: cannot create a %s context: %s (%s)\n",
            moe_backend_name(opt.backend), moe_status_string(st), moe_last_error(NULL));
    free(command);
    return 1;
  }
  const moe_backend backend = moe_context_backend(ctx);
  bool opencl_timer = false;
#ifdef MOE_BENCH_HAVE_OPENCL
  /* OpenCL GPUs are timed on the device, as CUDA is: the layer runs on a
   * context over a profiling queue of the same device. */
  moe_context *profiled = NULL;
  if (backend == MOE_BACKEND_OPENCL && !device_is_cpu(backend, moe_context_device_name(ctx)) &&
      bench_opencl_profiling_context(ctx, &profiled) == 0) {
    moe_context_destroy(ctx);
    ctx = profiled;
    opencl_timer = true;
  }
#endif
  /* The --option list, before the device name is read (cpu.kernels shows
   * in it). */
  for (int i = 0; i < opt.option_count; ++i) {
    char name[128];
    const char *eq = strchr(opt.options[i], '=');
    snprintf(name, sizeof name, "%.*s", (int)(eq - opt.options[i]), opt.options[i]);
    st = moe_context_set_option(ctx, name, eq + 1);
    if (st != MOE_SUCCESS) {
      fprintf(stderr, "moe_bench: --option %s: %s (%s)\n", opt.options[i], moe_status_string(st),
              moe_last_error(ctx));
      moe_context_destroy(ctx);
      free(command);
      return 2;
    }
  }
  const char *device = moe_context_device_name(ctx);
  const bool on_cpu = device_is_cpu(backend, device);

  char kernels[64], timing[160];
  kernel_path(device, moe_backend_name(backend), kernels, sizeof kernels);
  bench_run run = {.command = command ? command : argv[0],
                   .backend = moe_backend_name(backend),
                   .device = device,
                   .kernels = kernels,
                   .timing = timing,
                   .threads = on_cpu ? omp_get_max_threads() : 0};
  const time_t now = time(NULL);
  strftime(run.date, sizeof run.date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));

  bench_target target = {
      .ctx = ctx, .on_cpu = on_cpu, .flush = on_cpu && opt.flush, .reps = opt.reps};
#ifdef MOE_BENCH_HAVE_CUDA
  target.use_cuda_timer = backend == MOE_BACKEND_CUDA;
#endif
  target.use_opencl_timer = opencl_timer;
  target.warmup = opt.warmup >= 0                                    ? opt.warmup
                  : target.use_cuda_timer || target.use_opencl_timer ? 10
                                                                     : 1;
  if (target.use_cuda_timer)
    snprintf(timing, sizeof timing, "CUDA events around CUDA-graph replays, median, %d warm-up",
             target.warmup);
  else if (target.use_opencl_timer)
    snprintf(timing, sizeof timing,
             "OpenCL profiling markers around each forward (device time), median, %d warm-up",
             target.warmup);
  else
    snprintf(timing, sizeof timing, "host clock around forward + synchronize, median, %d warm-up%s",
             target.warmup, target.flush ? ", caches flushed before each forward" : "");

  run.have_rooflines = measure_rooflines(ctx, on_cpu, &run);
  bench_print_header(stdout, &run);

  const int64_t *tokens = opt.tokens;
  int token_count = opt.token_count;
  if (token_count == 0) {
    tokens = on_cpu ? cpu_tokens : gpu_tokens;
    token_count = on_cpu ? (int)(sizeof cpu_tokens / sizeof cpu_tokens[0])
                         : (int)(sizeof gpu_tokens / sizeof gpu_tokens[0]);
  }

  bench_model models[MAX_MODELS];
  const int model_count = select_models(&opt, models);
  static bench_row rows[MAX_ROWS];
  int row_count = 0, failures = 0;
  for (int m = 0; m < model_count; ++m) {
    failures += run_model(&target, &run, &models[m], tokens, token_count,
                          opt.seed * 1000003u + (uint64_t)m * 16, rows, &row_count);
    if (opt.json && bench_write_json(opt.json, &run, rows, row_count) != 0) {
      fprintf(stderr, "moe_bench: cannot write %s\n", opt.json);
      failures++;
      break;
    }
  }

  bench_cpu_flush_free();
  moe_context_destroy(ctx);
  free(command);
  return failures ? 1 : 0;
}
