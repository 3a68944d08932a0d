/*
 * cpu_backend.c - the CPU backend's table: contexts (kernel path chosen at
 * creation), host buffers, the stages, and the layer (weights repacked at
 * creation, workspace at reserve, fused forward without allocation).
 *
 * Kernel paths (option cpu.kernels = auto|portable|avx512|avx512bf16|amx,
 * default auto = the fastest the CPU supports, see cpu_auto_level): "amx"
 * (TDPBF16PS tiles, cpu_kernels_amx.c), "avx512bf16"
 * (vdpbf16ps), "avx512" (AVX-512F, bf16 widened by shifts, fp32 FMA),
 * "portable" (plain C). All share the packed layouts and the driver of
 * cpu_gemm.c.
 *
 * Determinism: every output element of every stage and of the layer is
 * computed by one fixed sequence of fp32 operations that depends only on
 * the shapes of the layer (the K-reduction order of cpu_kernels.h, the
 * element-wise epilogues, and the reduce over j = 0..k-1 in order). It does
 * not depend on T, on the thread count, on how work is split, or on the
 * other tokens of the batch: reruns are bitwise identical and a token's
 * output is the same whatever batch it is in. The portable and avx512
 * paths also agree bit for bit with each other.
 *
 * Layer forward: host route (core) -> host align (core) with block_m 1, so
 * no padding rows exist -> GEMM1 with the gated activation fused in its
 * epilogue (w13 interleaved: each 32-column panel holds 16 gate and the
 * matching 16 up columns) -> h (bf16) -> GEMM2 with bias and the routed
 * weight fused (y, bf16) -> reduce. The router weight multiplies the
 * accumulator before the bias in GEMM1 (ON_INPUT) or after the bias in
 * GEMM2 (ON_OUTPUT); the reduce then sums with weight 1.
 */
#include "backend.h"
#include "cpu_gemm.h"
#include "cpu_kernels.h"
#include "cpu_phase_times.h"
#include "cpu_vector_clones.h"

#include "../common/activation_logic.h"
#include "../common/bf16_logic.h"

#include <omp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

_Static_assert(MOE_ACT_SWIGLU == (int)MOE_ACTIVATION_SWIGLU &&
                   MOE_ACT_GEGLU == (int)MOE_ACTIVATION_GEGLU &&
                   MOE_ACT_SWIGLU_CLAMP == (int)MOE_ACTIVATION_SWIGLU_CLAMP,
               "activation_logic.h must mirror moe_activation");

#define ALIGNMENT 64

typedef struct cpu_state {
  const cpu_kernel_path *path; /* option cpu.kernels */
  int best_level;              /* the fastest path this CPU and build can run */
  int threads;
} cpu_state;

static size_t align_up(size_t n) {
  return (n + ALIGNMENT - 1) / ALIGNMENT * ALIGNMENT;
}
static int64_t div_up(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

/* 64-byte aligned. Large blocks (the packed weights, the workspace) are
 * 2 MiB aligned and, on Linux, offered transparent huge pages (the usual
 * "madvise" mode gives none unasked): the GEMMs stream the weights, and a
 * 4 KiB page per 4 KiB read costs a page walk each. A hint only. */
#define HUGE_PAGE ((size_t)2 << 20)
static void *aligned_malloc(size_t bytes) {
  void *p = NULL;
  const size_t alignment = bytes >= 2 * HUGE_PAGE ? HUGE_PAGE : ALIGNMENT;
  if (posix_memalign(&p, alignment, bytes ? bytes : 1) != 0) return NULL;
#ifdef MADV_HUGEPAGE
  if (alignment == HUGE_PAGE) madvise(p, bytes, MADV_HUGEPAGE);
#endif
  return p;
}

/* ------------------------------------------------------------------------ */
/* Context                                                                  */
/* ------------------------------------------------------------------------ */

/* What the CPU can run: 0 portable, 1 avx512, 2 avx512bf16, 3 amx. */
static int cpu_best_level(void) {
  int level = 0;
#if defined(MOE_CPU_HAVE_AVX512) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  /* avx512f here also means the OS saves the zmm state. */
  if (__builtin_cpu_supports("avx512f")) level = 1;
#if defined(MOE_CPU_HAVE_AVX512BF16)
  unsigned eax, ebx, ecx, edx;
  if (level == 1 && __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax & (1u << 5))) level = 2;
#endif
#if defined(MOE_CPU_HAVE_AMX)
  if (level == 2 && cpu_amx_usable()) level = 3; /* CPUID and the OS's tile permission */
#endif
#endif
  return level;
}

/* 1 when CPUID's vendor string is `vendor` ("GenuineIntel", "AuthenticAMD"). */
static int cpu_vendor_is(const char *vendor) {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax, ebx, ecx, edx;
  char id[13];
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return 0;
  memcpy(id, &ebx, 4);
  memcpy(id + 4, &edx, 4);
  memcpy(id + 8, &ecx, 4);
  id[12] = '\0';
  return strcmp(id, vendor) == 0;
#else
  (void)vendor;
  return 0;
#endif
}

/* cpu_decode_request_pairs (cpu_kernels.h): set once per process. */
static int decode_request_pairs = CPU_PREFETCH_PAIRS;
static void decode_request_pairs_init(void) {
  if (cpu_vendor_is("AuthenticAMD")) decode_request_pairs = CPU_PREFETCH_PAIRS_AMD;
}

/* The path "auto" runs: the fastest the CPU supports, by measurement. On
 * Intel (Sapphire Rapids, measured: vdpbf16ps at half the fp32 FMA rate,
 * 88 vs 177 GFLOP/s a core) widening bf16 and using FMA is faster, and
 * decode is bandwidth-bound either way, so Intel CPUs get the avx512 path
 * even when they have avx512_bf16. Other vendors' avx512_bf16 CPUs (AMD
 * Zen 4 and later; not measured here) get avx512bf16. Both paths give the
 * same bits except for denormals, which vdpbf16ps flushes; the choice
 * depends only on the CPU, so reruns stay bitwise identical. Where AMX is
 * usable (best == 3) auto takes it: its own bits (cpu_kernels.h). */
static int cpu_auto_level(int best) {
  if (best == 2 && cpu_vendor_is("GenuineIntel")) return 1;
  return best;
}

int cpu_decode_request_pairs(void) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, decode_request_pairs_init);
  return decode_request_pairs;
}

static const cpu_kernel_path *path_of_level(int level) {
#ifdef MOE_CPU_HAVE_AMX
  if (level == 3) return &cpu_path_amx;
#endif
#ifdef MOE_CPU_HAVE_AVX512BF16
  if (level == 2) return &cpu_path_avx512bf16;
#endif
#ifdef MOE_CPU_HAVE_AVX512
  if (level >= 1) return &cpu_path_avx512;
#endif
  (void)level;
  return &cpu_path_portable;
}

static void cpu_model_name(char *name, size_t size) {
  snprintf(name, size, "cpu");
  FILE *f = fopen("/proc/cpuinfo", "r");
  if (!f) return;
  char line[512];
  while (fgets(line, sizeof line, f)) {
    if (strncmp(line, "model name", 10) != 0) continue;
    const char *value = strchr(line, ':');
    if (!value) break;
    value++;
    while (*value == ' ' || *value == '\t')
      value++;
    size_t len = strcspn(value, "\n");
    if (len > 0) snprintf(name, size, "%.*s", (int)len, value);
    break;
  }
  fclose(f);
}

/* "model [path] N threads": the device name shows the kernel path. */
static void cpu_device_name(const cpu_state *st, char *name, size_t name_size) {
  char model[192];
  cpu_model_name(model, sizeof model);
  snprintf(name, name_size, "%s [%s] %d thread%s", model, st->path->name, st->threads,
           st->threads == 1 ? "" : "s");
}

static moe_status cpu_context_create(int device, void **state, char *name, size_t name_size) {
  (void)device;
  cpu_state *st = malloc(sizeof *st);
  if (!st) return moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot allocate the CPU state");
  st->best_level = cpu_best_level();
  st->path = path_of_level(cpu_auto_level(st->best_level));
  st->threads = omp_get_max_threads();
  cpu_device_name(st, name, name_size);
  *state = st;
  return MOE_SUCCESS;
}

/* cpu.kernels: auto, or a path by name (choice 1 + its level). The packed
 * weights are the same for every path, so existing layers follow. */
static moe_status cpu_set_option(void *state, moe_option_id id, const char *value, int64_t parsed,
                                 char *name, size_t name_size) {
  cpu_state *st = state;
  if (id != MOE_OPTION_CPU_KERNELS)
    return moe_set_error(MOE_ERROR_INTERNAL, "the CPU backend has no option %d", (int)id);
  static const char *const names[] = {"portable", "avx512", "avx512bf16", "amx"};
  const int level = parsed == MOE_CPU_KERNELS_AUTO ? cpu_auto_level(st->best_level)
                                                   : (int)parsed - MOE_CPU_KERNELS_PORTABLE;
  if (level > st->best_level)
    return moe_set_error(MOE_ERROR_UNSUPPORTED,
                         "cpu.kernels = %s, but this CPU (or build) supports only %s", value,
                         names[st->best_level]);
  st->path = path_of_level(level);
  cpu_device_name(st, name, name_size);
  return MOE_SUCCESS;
}

static void cpu_context_destroy(void *state) {
  free(state);
}

static moe_status cpu_synchronize(void *state) {
  (void)state;
  return MOE_SUCCESS;
}

/* Threads for a call: the current OpenMP setting, capped by a reservation. */
static int call_threads(int cap) {
  int n = omp_get_max_threads();
  return cap > 0 && n > cap ? cap : n;
}

/* ------------------------------------------------------------------------ */
/* Buffers: 64-byte aligned host memory                                     */
/* ------------------------------------------------------------------------ */

static moe_status cpu_buffer_alloc(void *state, size_t bytes, void **handle) {
  (void)state;
  *handle = aligned_malloc(bytes);
  if (!*handle) return moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot allocate %zu bytes", bytes);
  return MOE_SUCCESS;
}

static void cpu_buffer_free(void *state, void *handle) {
  (void)state;
  free(handle);
}

static moe_status cpu_buffer_write(void *state, void *handle, size_t offset, const void *src,
                                   size_t bytes) {
  (void)state;
  memcpy((char *)handle + offset, src, bytes);
  return MOE_SUCCESS;
}

static moe_status cpu_buffer_read(void *state, const void *handle, size_t offset, void *dst,
                                  size_t bytes) {
  (void)state;
  memcpy(dst, (const char *)handle + offset, bytes);
  return MOE_SUCCESS;
}

/* ------------------------------------------------------------------------ */
/* Stages                                                                   */
/* ------------------------------------------------------------------------ */

static moe_status cpu_route(void *state, const moe_route_args *args) {
  (void)state;
  moe_route_host(args);
  return MOE_SUCCESS;
}

static moe_status cpu_align(void *state, const moe_align_args *args) {
  (void)state;
  moe_align_host(args);
  return MOE_SUCCESS;
}

/* Turns align metadata into runs of valid slots, one per maximal sequence
 * of consecutive blocks of one expert. Anything the metadata holds is
 * tolerated, by the rule every backend applies (include/moe.h,
 * moe_grouped_gemm): positions at or past min(num_tokens_post_padded,
 * capacity), experts outside [0, EL) and slots outside [0, T*k) are
 * skipped. */
static int64_t collect_runs(const moe_gemm_args *args, int32_t *slots, cpu_gemm_run *runs) {
  const moe_gemm_desc *d = &args->desc;
  const int32_t *sorted = args->sorted_token_ids;
  const int32_t *expert_ids = args->expert_ids;
  const int64_t num_slots = d->num_tokens * d->top_k, BM = d->block_m;
  int64_t padded = *(const int32_t *)args->num_tokens_post_padded;
  if (padded < 0) padded = 0;
  if (padded > args->sorted_capacity) padded = args->sorted_capacity;
  int64_t blocks = div_up(padded, BM);
  if (blocks > args->block_capacity) blocks = args->block_capacity;

  int64_t num_runs = 0, used = 0, last_block = -2;
  for (int64_t b = 0; b < blocks; ++b) {
    const int32_t e = expert_ids[b];
    if (e < 0 || e >= d->num_local_experts) continue;
    if (!(num_runs > 0 && last_block == b - 1 && runs[num_runs - 1].expert == e)) {
      runs[num_runs] = (cpu_gemm_run){.expert = e, .rows = 0, .slots = slots + used};
      num_runs++;
    }
    last_block = b;
    for (int64_t i = b * BM; i < (b + 1) * BM && i < padded; ++i) {
      const int32_t s = sorted[i];
      if (s < 0 || s >= num_slots) continue;
      slots[used++] = s;
      runs[num_runs - 1].rows++;
    }
    if (runs[num_runs - 1].rows == 0) num_runs--, last_block = -2;
  }
  return num_runs;
}

static moe_status cpu_grouped_gemm(void *state, const moe_gemm_args *args) {
  const cpu_state *st = state;
  const moe_gemm_desc *d = &args->desc;
  const int threads = call_threads(0);
  const size_t stride = align_up(cpu_gemm_scratch_bytes(0));
  int32_t *slots = malloc((size_t)args->sorted_capacity * sizeof *slots + 1);
  cpu_gemm_run *runs = malloc((size_t)args->block_capacity * sizeof *runs + 1);
  unsigned char *scratch = aligned_malloc(stride * (size_t)threads);
  if (!slots || !runs || !scratch) {
    free(slots), free(runs), free(scratch);
    return moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot allocate the grouped GEMM workspace");
  }
  const int64_t num_runs = collect_runs(args, slots, runs);
  cpu_gemm_problem pb = {
      .path = st->path,
      .a = args->a,
      .lda = d->k,
      .a_row_div = d->input == MOE_GEMM_INPUT_PER_TOKEN ? d->top_k : 1,
      .b_source = {.layout = d->b_layout, .n = d->n, .k = d->k, .gated_half = 0},
      .b_raw = args->b,
      .b_raw_expert_stride = d->n * d->k,
      .epi =
          {
              .gated = 0,
              .n_out = d->n,
              .out = args->c,
              .ld_out = d->n,
              .bias = args->bias,
              .bias_stride = d->n,
              .weight_mode = d->routed_weight,
              .slot_weights = args->topk_weights,
          },
  };
  cpu_gemm_execute(&pb, runs, num_runs, threads, scratch, stride);
  free(slots), free(runs), free(scratch);
  return MOE_SUCCESS;
}

static moe_status cpu_activation(void *state, const moe_activation_args *args) {
  (void)state;
  const int64_t I = args->intermediate_size;
  const uint16_t *in = args->in;
  uint16_t *out = args->out;
  const int kind = (int)args->activation;
#pragma omp parallel for schedule(static) if (args->rows * I > (1 << 14))
  for (int64_t r = 0; r < args->rows; ++r) {
    const uint16_t *gate = in + r * 2 * I, *up = gate + I;
    for (int64_t c = 0; c < I; ++c)
      out[r * I + c] = moe_bf16_from_float(moe_act_apply(
          kind, moe_bf16_to_float(gate[c]), moe_bf16_to_float(up[c]), args->alpha, args->limit));
  }
  return MOE_SUCCESS;
}

enum { REDUCE_CHUNK = 512 }; /* columns per reduce work item */

/* Columns [h0, h0 + len) of token t's output (reduce_tokens). Plain loops,
 * compiled for AVX-512F too (cpu_vector_clones.h). */
CPU_VECTOR_CLONES static void reduce_token_chunk(const moe_reduce_args *args, int64_t t, int64_t h0,
                                                 int64_t len) {
  const int64_t k = args->top_k, H = args->hidden_size;
  const uint16_t *y = args->y;
  const float *weights = args->topk_weights;
  const int32_t *ids = args->topk_ids, *map = args->expert_map;
  float acc[REDUCE_CHUNK];
  for (int64_t h = 0; h < len; ++h)
    acc[h] = 0.0f;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t s = t * k + j;
    if (ids) {
      const int32_t id = ids[s];
      const int32_t local = !map ? id : (id >= 0 && id < args->num_experts) ? map[id] : -1;
      if (local < 0 || local >= args->num_local_experts) continue;
    }
    const uint16_t *row = y + s * H + h0;
    if (weights) {
      const float w = weights[s];
      for (int64_t h = 0; h < len; ++h)
        acc[h] += w * moe_bf16_to_float(row[h]);
    } else {
      for (int64_t h = 0; h < len; ++h)
        acc[h] += moe_bf16_to_float(row[h]);
    }
  }
  uint16_t *out = (uint16_t *)args->out + t * H + h0;
  for (int64_t h = 0; h < len; ++h)
    out[h] = moe_bf16_from_float(acc[h]);
}

/* out[t] = bf16(sum_j w[t][j] * y[t*k + j]), j ascending, skipping slots
 * whose expert is not local when topk_ids is given: through expert_map when
 * there is one, else ids outside [0, EL) (the routed forward's -1; the
 * reduce stage passes topk_ids only with a map). */
static void reduce_tokens(const moe_reduce_args *args, int threads) {
  const int64_t k = args->top_k, H = args->hidden_size;
  const int64_t chunks = div_up(H, REDUCE_CHUNK);
  const int64_t work = args->num_tokens * chunks;
#pragma omp parallel for schedule(static)                                                          \
    num_threads(threads) if (work > 1 && args->num_tokens * H * k > (1 << 15))
  for (int64_t i = 0; i < work; ++i) {
    const int64_t h0 = (i % chunks) * REDUCE_CHUNK;
    reduce_token_chunk(args, i / chunks, h0, H - h0 < REDUCE_CHUNK ? H - h0 : REDUCE_CHUNK);
  }
}

static moe_status cpu_topk_reduce(void *state, const moe_reduce_args *args) {
  (void)state;
  reduce_tokens(args, call_threads(0));
  return MOE_SUCCESS;
}

/* ------------------------------------------------------------------------ */
/* Layer                                                                    */
/* ------------------------------------------------------------------------ */

/* Everything a forward of up to max_tokens tokens touches, carved out of
 * one allocation. */
typedef struct cpu_workspace {
  int64_t max_tokens;
  int threads;
  void *block;
  int32_t *topk_ids;
  float *topk_weights;
  int32_t *sorted_token_ids;
  int32_t *expert_ids; /* block_m = 1: one per sorted row */
  int32_t *num_tokens_post_padded;
  cpu_gemm_run *runs; /* <= EL */
  /* GEMM1's output and GEMM2's A, rows in expert-sorted order, so that a
   * run's rows are consecutive and the AMX path reads them in place. */
  uint16_t *h; /* bf16 [T*k][ld_h] */
  uint16_t *y; /* bf16 [T*k][H], rows by slot for the reduce */
  /* GEMM1's A on a path that reads A in place: x's rows gathered into the
   * sorted order, in y's memory (y is written only after GEMM1). */
  uint16_t *xs; /* bf16 [T*k][ld_xs] */
  int64_t ld_h, ld_xs;
  unsigned char *scratch;
  size_t scratch_stride;
} cpu_workspace;

/* A packed weight matrix: expert e, panel p at data + e*expert_stride +
 * p*panel_stride. */
typedef struct cpu_packed {
  uint16_t *data;
  cpu_b_source source;
  int64_t panels, panel_stride, expert_stride;
} cpu_packed;

typedef struct cpu_layer {
  moe_config cfg;
  cpu_packed w13, w2;
  float *w13_bias;        /* [EL][2I] or NULL */
  float *w2_bias;         /* [EL][H] or NULL */
  float *correction_bias; /* [E] or NULL */
  int32_t *expert_map;    /* [E] or NULL */
  cpu_workspace ws;
  CPU_PHASE_FIELD /* -DCPU_PHASE_TIMES only */
} cpu_layer;

static void *copy_of(const void *src, size_t bytes, int *failed) {
  if (!src) return NULL;
  void *dst = malloc(bytes);
  if (!dst) {
    *failed = 1;
    return NULL;
  }
  memcpy(dst, src, bytes);
  return dst;
}

static void cpu_layer_destroy(void *state, void *impl) {
  (void)state;
  cpu_layer *l = impl;
  if (!l) return;
  CPU_PHASE_FINISH(l, l->cfg.hidden_size, l->cfg.intermediate_size, l->cfg.top_k);
  free(l->w13.data);
  free(l->w2.data);
  free(l->w13_bias);
  free(l->w2_bias);
  free(l->correction_bias);
  free(l->expert_map);
  free(l->ws.block);
  free(l);
}

/* Sizes the packed matrix for `experts` experts; 0 on size_t overflow. */
static int plan_packed(cpu_packed *p, cpu_b_source source, int64_t experts, size_t *bytes) {
  p->source = source;
  p->panels = cpu_b_panels(&source);
  p->panel_stride = div_up(source.k, 2) * CPU_PANEL_PAIR;
  p->expert_stride = p->panels * p->panel_stride;
  const double estimate = (double)experts * (double)p->expert_stride * 2.0;
  if (estimate > (double)(SIZE_MAX / 2)) return 0;
  *bytes = (size_t)experts * (size_t)p->expert_stride * sizeof(uint16_t);
  return 1;
}

static void pack_all(cpu_packed *p, const uint16_t *raw, int64_t experts) {
  const int64_t raw_stride = p->source.n * p->source.k;
  const int64_t kpairs = div_up(p->source.k, 2);
  const int64_t jobs = experts * p->panels;
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t job = 0; job < jobs; ++job) {
    const int64_t e = job / p->panels, panel = job % p->panels;
    cpu_pack_b_panel(&p->source, raw + e * raw_stride, panel, 0, kpairs,
                     p->data + e * p->expert_stride + panel * p->panel_stride);
  }
}

static moe_status cpu_layer_create(void *state, const moe_layer_desc *desc, void **impl) {
  (void)state;
  const moe_config *cfg = &desc->cfg;
  const moe_weights *w = desc->weights;
  const int64_t H = cfg->hidden_size, I = cfg->intermediate_size;
  const int64_t E = cfg->num_experts, EL = cfg->num_local_experts;
  cpu_layer *l = calloc(1, sizeof *l);
  if (!l) return moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot allocate the CPU layer");
  l->cfg = *cfg;

  const moe_weight_layout layout = cfg->weight_layout;
  size_t w13_bytes, w2_bytes;
  if (!plan_packed(&l->w13, (cpu_b_source){layout, 2 * I, H, I}, EL, &w13_bytes) ||
      !plan_packed(&l->w2, (cpu_b_source){layout, H, I, 0}, EL, &w2_bytes)) {
    free(l);
    return moe_set_error(MOE_ERROR_UNSUPPORTED, "the packed weights' size overflows size_t");
  }
  l->w13.data = aligned_malloc(w13_bytes);
  l->w2.data = aligned_malloc(w2_bytes);
  int failed = !l->w13.data || !l->w2.data;
  l->w13_bias = copy_of(w->w13_bias, (size_t)(EL * 2 * I) * sizeof(float), &failed);
  l->w2_bias = copy_of(w->w2_bias, (size_t)(EL * H) * sizeof(float), &failed);
  l->correction_bias = copy_of(w->correction_bias, (size_t)E * sizeof(float), &failed);
  l->expert_map = copy_of(w->expert_map, (size_t)E * sizeof(int32_t), &failed);
  if (failed) {
    cpu_layer_destroy(state, l);
    return moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot allocate %zu bytes of packed weights",
                         w13_bytes + w2_bytes);
  }
  pack_all(&l->w13, w->w13, EL);
  pack_all(&l->w2, w->w2, EL);
  *impl = l;
  return MOE_SUCCESS;
}

/* The row pitch (elements) of a sorted activation matrix of k columns:
 * whole 64-byte lines plus one, so that rows are 64-byte aligned and a tile
 * of 16 rows does not map them all to the same L1 sets (a pitch of a
 * multiple of 4 KiB, such as Mixtral's 14336 or 4096 bf16, would). */
static int64_t sorted_row_pitch(int64_t k) {
  return (k + 31) / 32 * 32 + 32;
}

static moe_status cpu_layer_reserve(void *state, void *impl, int64_t max_tokens) {
  (void)state;
  cpu_layer *l = impl;
  const moe_config *cfg = &l->cfg;
  const size_t slots = (size_t)max_tokens * (size_t)cfg->top_k; /* int32-bounded by the core */
  const int threads = omp_get_max_threads();
  const size_t scratch_stride = align_up(cpu_gemm_scratch_bytes(1));

  size_t parts[9] = {
      align_up(slots * sizeof(int32_t)),                               /* topk_ids */
      align_up(slots * sizeof(float)),                                 /* weights */
      align_up(slots * sizeof(int32_t)),                               /* sorted */
      align_up(slots * sizeof(int32_t)),                               /* expert_ids */
      align_up(sizeof(int32_t)),                                       /* post padded */
      align_up((size_t)cfg->num_local_experts * sizeof(cpu_gemm_run)), /* runs */
      0,                                                               /* h */
      0,                                                               /* y */
      scratch_stride * (size_t)threads,                                /* scratch */
  };
  const int64_t ld_h = sorted_row_pitch(cfg->intermediate_size);
  const int64_t ld_xs = sorted_row_pitch(cfg->hidden_size); /* > H: y fits too */
  const double big = (double)slots * (double)(ld_h + ld_xs) * 2.0;
  if (big > (double)(SIZE_MAX / 4))
    return moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "the workspace for %lld tokens is too large",
                         (long long)max_tokens);
  parts[6] = align_up(slots * (size_t)ld_h * sizeof(uint16_t));
  parts[7] = align_up(slots * (size_t)ld_xs * sizeof(uint16_t));
  size_t total = 0;
  for (int i = 0; i < 9; ++i)
    total += parts[i];
  unsigned char *block = aligned_malloc(total);
  if (!block)
    return moe_set_error(MOE_ERROR_OUT_OF_MEMORY,
                         "cannot allocate %zu bytes of workspace for %lld tokens", total,
                         (long long)max_tokens);
  unsigned char *p[9];
  p[0] = block;
  for (int i = 1; i < 9; ++i)
    p[i] = p[i - 1] + parts[i - 1];
  free(l->ws.block);
  l->ws = (cpu_workspace){
      .max_tokens = max_tokens,
      .threads = threads,
      .block = block,
      .topk_ids = (int32_t *)p[0],
      .topk_weights = (float *)p[1],
      .sorted_token_ids = (int32_t *)p[2],
      .expert_ids = (int32_t *)p[3],
      .num_tokens_post_padded = (int32_t *)p[4],
      .runs = (cpu_gemm_run *)p[5],
      .h = (uint16_t *)p[6],
      .y = (uint16_t *)p[7],
      .xs = (uint16_t *)p[7],
      .ld_h = ld_h,
      .ld_xs = ld_xs,
      .scratch = p[8],
      .scratch_stride = scratch_stride,
  };
  return MOE_SUCCESS;
}

/* The expert runs of align's output with block_m = 1 (no padding rows). */
static int64_t layer_runs(const cpu_workspace *ws) {
  const int64_t rows = *ws->num_tokens_post_padded;
  int64_t num_runs = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const int32_t e = ws->expert_ids[i];
    if (num_runs == 0 || ws->runs[num_runs - 1].expert != e) {
      ws->runs[num_runs] =
          (cpu_gemm_run){.expert = e, .rows = 0, .slots = ws->sorted_token_ids + i, .position = i};
      num_runs++;
    }
    ws->runs[num_runs - 1].rows++;
  }
  return num_runs;
}

/* xs row i = x's row of sorted slot i (its token), and 0 at column H where
 * H is odd (cpu_tile_strided_fn's pair rule). */
static void gather_sorted_row(const cpu_workspace *ws, const uint16_t *x, int64_t H, int top_k,
                              int64_t i) {
  uint16_t *row = ws->xs + i * ws->ld_xs;
  memcpy(row, x + (int64_t)(ws->sorted_token_ids[i] / top_k) * H, (size_t)H * sizeof *x);
  if (H & 1) row[H] = 0;
}

/* Serial when small: a parallel region costs more than a decode step's
 * rows, and an explicit branch, not an if() clause, as in
 * moe_route_host. */
static void gather_sorted_rows(const cpu_workspace *ws, const uint16_t *x, int64_t H, int top_k,
                               int64_t num_rows, int threads) {
  if (num_rows * H <= (int64_t)1 << 16) {
    for (int64_t i = 0; i < num_rows; ++i)
      gather_sorted_row(ws, x, H, top_k, i);
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < num_rows; ++i)
    gather_sorted_row(ws, x, H, top_k, i);
}

/* The forward of both entries: routes logits into the workspace (and copies
 * the picks to the capture buffers when given), or reads the caller's picks
 * in place. Pointers are already offset to this call's first token. */
static moe_status cpu_forward(const cpu_state *st, cpu_layer *l, const moe_forward_io *io) {
  const moe_config *cfg = &l->cfg;
  cpu_workspace *ws = &l->ws;
  const int64_t H = cfg->hidden_size, I = cfg->intermediate_size;
  const int64_t num_tokens = io->num_tokens;
  const int64_t num_slots = num_tokens * cfg->top_k;
  const int threads = call_threads(ws->threads);
  const void *x = io->x, *logits = io->logits;
  void *out = io->out;
  const int32_t *topk_ids = ws->topk_ids;
  const float *topk_weights = ws->topk_weights;
  if (!logits) {
    topk_ids = io->topk_ids_in;
    topk_weights = io->topk_weights_in;
  }
  CPU_PHASE_START(l, num_tokens, H, I, cfg->top_k);

  moe_route_args route = moe_plan_route_args(cfg, num_tokens, logits, l->correction_bias,
                                             ws->topk_ids, ws->topk_weights);
  if (logits) {
    moe_route_host(&route);
    if (io->topk_ids_out) memcpy(io->topk_ids_out, ws->topk_ids, (size_t)num_slots * 4);
    if (io->topk_weights_out) memcpy(io->topk_weights_out, ws->topk_weights, (size_t)num_slots * 4);
  }

  /* block_m 1: no padding rows, so sorted_token_ids holds exactly the slots. */
  moe_align_args align =
      moe_plan_align_args(cfg, num_tokens, 1, topk_ids, l->expert_map, ws->sorted_token_ids,
                          ws->expert_ids, ws->num_tokens_post_padded);
  moe_align_host(&align);
  const int64_t num_runs = layer_runs(ws);
  moe_gemm_routed_weight mode1, mode2;
  moe_plan_routed_modes(cfg, &mode1, &mode2);
  CPU_PHASE_MARK(l, PHASE_ROUTE);

  /* A path that reads A in place gets x's rows in sorted order: one copy
   * per slot, instead of one per slot and panel group. */
  const int gather_x = st->path->tile_strided != NULL;
  if (gather_x) gather_sorted_rows(ws, x, H, (int)cfg->top_k, *ws->num_tokens_post_padded, threads);
  CPU_PHASE_MARK(l, PHASE_GATHER);
  cpu_gemm_problem gemm1 = {
      .path = st->path,
      .a = gather_x ? ws->xs : x,
      .lda = gather_x ? ws->ld_xs : H,
      .a_row_div = cfg->top_k,
      .a_by_position = gather_x,
      .b_source = l->w13.source,
      .b_packed = l->w13.data,
      .b_expert_stride = l->w13.expert_stride,
      .b_panel_stride = l->w13.panel_stride,
      .epi =
          {
              .gated = 1,
              .activation = (int)cfg->activation,
              .alpha = cfg->swiglu_alpha,
              .limit = cfg->swiglu_limit,
              .n_out = I,
              .out = ws->h,
              .ld_out = ws->ld_h,
              .out_by_position = 1,
              .bias = l->w13_bias,
              .bias_stride = 2 * I,
              .weight_mode = mode1,
              .slot_weights = topk_weights,
          },
  };
  cpu_gemm_execute(&gemm1, ws->runs, num_runs, threads, ws->scratch, ws->scratch_stride);
  CPU_PHASE_MARK(l, PHASE_GEMM1);

  cpu_gemm_problem gemm2 = {
      .path = st->path,
      .a = ws->h,
      .lda = ws->ld_h,
      .a_row_div = 1,
      .a_by_position = 1,
      .b_source = l->w2.source,
      .b_packed = l->w2.data,
      .b_expert_stride = l->w2.expert_stride,
      .b_panel_stride = l->w2.panel_stride,
      .epi =
          {
              .gated = 0,
              .n_out = H,
              .out = ws->y,
              .ld_out = H,
              .bias = l->w2_bias,
              .bias_stride = H,
              .weight_mode = mode2,
              .slot_weights = topk_weights,
          },
  };
  cpu_gemm_execute(&gemm2, ws->runs, num_runs, threads, ws->scratch, ws->scratch_stride);
  CPU_PHASE_MARK(l, PHASE_GEMM2);

  /* Caller picks may hold -1 without a map: their rows of y are unwritten. */
  const moe_reduce_args reduce = moe_plan_reduce_args(
      cfg, num_tokens, ws->y, (l->expert_map || !logits) ? topk_ids : NULL, l->expert_map, out);
  reduce_tokens(&reduce, threads);
  CPU_PHASE_MARK(l, PHASE_REDUCE);
  return MOE_SUCCESS;
}

/* The CPU forward has one plan for every T (hence batch invariant, with
 * or without the layer option): host route and align with block_m 1, the
 * two GEMMs on the context's kernel path, the reduce in slot order. */
static moe_status cpu_layer_describe(void *state, const void *impl, int64_t num_tokens, char *text,
                                     size_t size) {
  const cpu_state *st = state;
  const cpu_layer *l = impl;
  const int64_t slots = num_tokens * l->cfg.top_k;
  snprintf(text, size,
           "route and align on the host (block_m 1: %lld sorted rows, no padding); GEMM1 with "
           "the activation, GEMM2 with the routed weight on the %s kernels, %d threads; reduce "
           "in slot order; batch invariant",
           (long long)slots, st->path->name, call_threads(l->ws.threads));
  return MOE_SUCCESS;
}

static moe_status cpu_layer_forward(void *state, void *impl, int64_t num_tokens, const void *x,
                                    const void *logits, void *out) {
  const moe_forward_io io = {.num_tokens = num_tokens, .x = x, .logits = logits, .out = out};
  return cpu_forward(state, impl, &io);
}

/* Offsets every per-token pointer to io->first_token (host memory). */
static moe_status cpu_layer_forward_routed(void *state, void *impl, const moe_forward_io *io) {
  const moe_config *cfg = &((const cpu_layer *)impl)->cfg;
  const int64_t t0 = io->first_token, k = cfg->top_k, H = cfg->hidden_size;
  const moe_forward_io at = {
      .num_tokens = io->num_tokens,
      .x = (const uint16_t *)io->x + t0 * H,
      .logits = io->logits ? (const float *)io->logits + t0 * cfg->num_experts : NULL,
      .topk_ids_in = io->topk_ids_in ? (const int32_t *)io->topk_ids_in + t0 * k : NULL,
      .topk_weights_in = io->topk_weights_in ? (const float *)io->topk_weights_in + t0 * k : NULL,
      .topk_ids_out = io->topk_ids_out ? (int32_t *)io->topk_ids_out + t0 * k : NULL,
      .topk_weights_out = io->topk_weights_out ? (float *)io->topk_weights_out + t0 * k : NULL,
      .out = (uint16_t *)io->out + t0 * H,
  };
  return cpu_forward(state, impl, &at);
}

const moe_backend_ops moe_cpu_backend_ops = {
    .name = "cpu",
    .kind = MOE_BACKEND_CPU,
    .context_create = cpu_context_create,
    .has_gpu = NULL,
    .context_destroy = cpu_context_destroy,
    .synchronize = cpu_synchronize,
    .buffer_alloc = cpu_buffer_alloc,
    .buffer_free = cpu_buffer_free,
    .buffer_write = cpu_buffer_write,
    .buffer_read = cpu_buffer_read,
    .route = cpu_route,
    .align = cpu_align,
    .grouped_gemm = cpu_grouped_gemm,
    .activation = cpu_activation,
    .topk_reduce = cpu_topk_reduce,
    .layer_create = cpu_layer_create,
    .layer_destroy = cpu_layer_destroy,
    .layer_reserve = cpu_layer_reserve,
    .layer_forward = cpu_layer_forward,
    .set_option = cpu_set_option,
    .layer_describe = cpu_layer_describe,
    .layer_forward_routed = cpu_layer_forward_routed,
};
