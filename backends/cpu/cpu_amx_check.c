/*
 * cpu_amx_check.c - a standalone check of the AMX kernel path (CTest entry
 * cpu-amx-layout), runnable on any x86-64 machine.
 *
 * 1. The kernel body of cpu_amx_tile.h, compiled here against a scalar
 *    model of the tile instructions (the documented pseudo-code of
 *    ldtilecfg, tileloadd, tilestored, tilezero and tdpbf16ps, with the
 *    shape rules whose violation faults on hardware), runs over a grid of
 *    rows, panels, K (full and tail steps) and accumulate, on fresh random
 *    data packed by the library's own cpu_pack_b_panel. Its output must
 *    equal, bit for bit, an independent scalar loop over the raw matrices
 *    in the instruction's order (even k, then odd k, per k-pair), and be
 *    within a tight bound of float64. The model reads exactly the bytes the
 *    hardware would, so AddressSanitizer (scripts/sanitize.sh) also checks
 *    the addressing.
 * 2. The same model as a kernel path through the real driver
 *    (cpu_gemm_execute: the AMX path's tile_rows and item_rows, K blocks,
 *    2 and 24 threads), against bf16 of the same scalar loop, exactly.
 * 3. Where the CPU has AVX-512F: the fma-order decode kernel
 *    (cpu_kernels_amx_order.c) against the model, bit for bit over the whole
 *    C, on the three kinds of data of cpu_amx_probe.h (wide normal range;
 *    around the smallest normal with denormals and zeros; mixed
 *    magnitudes), over rows 1..3, panels, K and accumulate, plus edge cases
 *    of DAZ and FTZ; a second call must repeat the bits. Then the run-time
 *    probe's own comparison on the model: fma-order must match it (the
 *    report says whether vdpbf16ps does). The model's DAZ and FTZ counts
 *    show that the flushing was exercised.
 * 4. Where the CPU has AMX and the OS grants it: the real path over the
 *    same grid against float64, and the driver on every thread; it reports
 *    whether the hardware matched the model's bits and which kernel takes
 *    the tiles of a few rows. Elsewhere it prints "SKIPPED (no AMX here)"
 *    for part 4.
 *
 * Exit 0 when every check ran passes, 1 on any failure.
 */
#include "cpu_gemm.h"
#include "cpu_kernels.h"

#include "../common/bf16_logic.h"

#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- Scalar model of the tile instructions ------------------------------ */

typedef struct model_tiles {
  int rows[8], colsb[8];
  unsigned char data[8][16][64];
} model_tiles;

static _Thread_local model_tiles tiles;
static _Thread_local int tiles_configured;
static int model_faults; /* shape or state violations: each would fault on hardware */

static void model_fault(const char *what, int t) {
#pragma omp atomic
  model_faults++;
  fprintf(stderr, "amx model: %s (tile %d)\n", what, t);
}

struct cpu_amx_config;
static void model_config(const struct cpu_amx_config *cfg);

static int usable(int t) {
  if (!tiles_configured || t < 0 || t > 7 || tiles.rows[t] == 0) {
    model_fault("use of an unconfigured tile", t);
    return 0;
  }
  return 1;
}

static void model_zero(int t) {
  if (usable(t)) memset(tiles.data[t], 0, sizeof tiles.data[t]);
}

static void model_load(int t, const void *base, int64_t stride) {
  if (!usable(t)) return;
  memset(tiles.data[t], 0, sizeof tiles.data[t]);
  for (int r = 0; r < tiles.rows[t]; ++r)
    memcpy(tiles.data[t][r], (const unsigned char *)base + r * stride, (size_t)tiles.colsb[t]);
}

static void model_store(int t, void *base, int64_t stride) {
  if (!usable(t)) return;
  for (int r = 0; r < tiles.rows[t]; ++r)
    memcpy((unsigned char *)base + r * stride, tiles.data[t][r], (size_t)tiles.colsb[t]);
}

static float bf16_at(int t, int r, int i) {
  uint16_t v;
  memcpy(&v, &tiles.data[t][r][2 * i], sizeof v);
  return moe_bf16_to_float(v);
}

static long model_daz, model_ftz; /* flushed operands and results (coverage) */

/* DAZ: a denormal operand is a zero of its sign. */
static float model_daz_in(float x) {
  if (x != 0.0f && fabsf(x) < FLT_MIN) {
#pragma omp atomic
    model_daz++;
    return copysignf(0.0f, x);
  }
  return x;
}

/* One step of tdpbf16ps: "FP32 FMA with DAZ, FTZ, RNE". fmaf rounds the
 * exact acc + a*b once; FTZ (as x86 defines it) returns a zero of the
 * result's sign when the result rounded with an unbounded exponent is
 * below FLT_MIN. fmaf's result near FLT_MIN is rounded to the denormal
 * grid instead, so there the tininess is decided on the sum scaled by
 * 2^64, exact (a tiny sum has |a| < 2^16: no overflow). */
static float model_fma(float acc, float a, float b) {
  a = model_daz_in(a), b = model_daz_in(b), acc = model_daz_in(acc);
  const float r = fmaf(a, b, acc);
  if (r != 0.0f && fabsf(r) <= FLT_MIN) {
    const float scaled = fmaf(a * 0x1.0p64f, b, acc * 0x1.0p64f);
    if (fabsf(scaled) < 0x1.0p-62f) {
#pragma omp atomic
      model_ftz++;
      return copysignf(0.0f, scaled);
    }
  }
  return r;
}

/* tdpbf16ps as the SDM writes it: per row m, k-pair k, column n,
 * acc += a[2k]*b[k][2n], then acc += a[2k+1]*b[k][2n+1], each an fp32 FMA
 * with DAZ, FTZ and RNE (for normal values, as a rounded multiply-add:
 * the product is exact). */
static void model_dp(int c, int a, int b) {
  if (!usable(c) || !usable(a) || !usable(b)) return;
  if (c == a || c == b || a == b) model_fault("tdpbf16ps with repeated tiles", c);
  if (tiles.rows[c] != tiles.rows[a]) model_fault("C rows != A rows", c);
  if (tiles.colsb[c] != tiles.colsb[b]) model_fault("C colsb != B colsb", c);
  if (tiles.colsb[a] != 4 * tiles.rows[b]) model_fault("A colsb != 4 * B rows", a);
  const int pairs = tiles.colsb[a] / 4, columns = tiles.colsb[c] / 4;
  for (int m = 0; m < tiles.rows[c]; ++m)
    for (int n = 0; n < columns; ++n) {
      float acc;
      memcpy(&acc, &tiles.data[c][m][4 * n], sizeof acc);
      for (int k = 0; k < pairs; ++k) {
        acc = model_fma(acc, bf16_at(a, m, 2 * k), bf16_at(b, k, 2 * n));
        acc = model_fma(acc, bf16_at(a, m, 2 * k + 1), bf16_at(b, k, 2 * n + 1));
      }
      memcpy(&tiles.data[c][m][4 * n], &acc, sizeof acc);
    }
}

static void model_release(void) {
  tiles_configured = 0;
}

#define AMX_CONFIG(cfg) model_config(cfg)
#define AMX_ZERO(t) model_zero(t)
#define AMX_LOAD(t, p, s) model_load(t, p, s)
#define AMX_STORE(t, p, s) model_store(t, p, s)
#define AMX_DP(c, a, b) model_dp(c, a, b)
#define AMX_RELEASE() model_release()
/* The weight requests are hints, with no effect to model, but their
 * addresses come from the kernel's and the driver's arithmetic (the steps
 * ahead, the next-K-block stream and the follow-on into the next block,
 * cpu_weight_prefetch): while check_driver runs on packed weights, each
 * must fall inside them. */
static const char *weights_lo, *weights_hi;
static long stream_lines, stream_outside, near_lines, near_outside;
static void model_request(const char *p, long *lines, long *outside) {
  __atomic_fetch_add(lines, 1, __ATOMIC_RELAXED);
  if (weights_lo && (p < weights_lo || p >= weights_hi))
    __atomic_fetch_add(outside, 1, __ATOMIC_RELAXED);
}
/* Requests into L2 are the next-K-block stream: they count as stream
 * lines below, and must fall inside the packed weights. */
#define AMX_PREFETCH(p) model_request((const char *)(p), &near_lines, &near_outside)
#define AMX_PREFETCH_L2(p) model_request((const char *)(p), &stream_lines, &stream_outside)
#include "cpu_amx_tile.h"
#include "cpu_amx_probe.h"

/* ldtilecfg: palette 1, rows <= 16, colsb <= 64 and a multiple of 4 (the
 * kernel's dword tiles), zero and nonzero together; zeroes every tile. */
static void model_config(const struct cpu_amx_config *cfg) {
  if (cfg->palette != 1 || cfg->start_row != 0) model_fault("palette or start_row", -1);
  for (int i = 0; i < 14; ++i)
    if (cfg->reserved[i]) model_fault("reserved byte set", -1);
  for (int t = 0; t < 16; ++t) {
    const int rows = cfg->rows[t], colsb = cfg->colsb[t];
    if (t >= 8 && (rows || colsb)) model_fault("tile beyond 8 configured", t);
    if (rows > 16 || colsb > 64 || colsb % 4 || (rows == 0) != (colsb == 0))
      model_fault("bad tile shape", t);
    if (t < 8) tiles.rows[t] = rows, tiles.colsb[t] = colsb;
  }
  memset(tiles.data, 0, sizeof tiles.data);
  tiles_configured = 1;
}

static void model_tile(int rows, int panels, int64_t kpairs, const void *a, const uint16_t *b,
                       int64_t panel_stride, float *c, int64_t ldc, int accumulate,
                       const cpu_weight_prefetch *prefetch) {
  if (rows < 1 || rows > CPU_TILE_ROWS_MAX) model_fault("rows out of range", rows);
  cpu_amx_tile_body(rows, panels, kpairs, a, CPU_A_STRIDE_U32, b, panel_stride, c, ldc, accumulate,
                    prefetch);
}

static void model_tile_strided(int rows, int panels, int64_t kpairs, const uint32_t *a,
                               int64_t a_stride_u32, const uint16_t *b, int64_t panel_stride,
                               float *c, int64_t ldc, int accumulate,
                               const cpu_weight_prefetch *prefetch) {
  if (rows < 1 || rows > CPU_TILE_ROWS_MAX) model_fault("rows out of range", rows);
  cpu_amx_tile_body(rows, panels, kpairs, a, a_stride_u32, b, panel_stride, c, ldc, accumulate,
                    prefetch);
}

static const cpu_kernel_path model_path = {
    .name = "amx-model",
    .a_format = CPU_A_BF16_PAIRS,
    .tile = model_tile,
    .tile_strided = model_tile_strided,
    .tile_rows = CPU_AMX_TILE_ROWS,
    .one_tile_rows = CPU_AMX_ONE_TILE_ROWS,
    .row_block = CPU_AMX_ROW_BLOCK,
    .item_rows = CPU_AMX_ITEM_ROWS,
};

/* ---- Data and references -------------------------------------------------- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static double uniform(void) {
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  return (double)(rng_state >> 11) * 0x1.0p-53;
}

static void fill_bf16(uint16_t *dst, size_t n) {
  for (size_t i = 0; i < n; ++i)
    dst[i] = moe_bf16_from_float((float)(4.0 * uniform() - 2.0));
}

/* The instruction's order over raw rows a[K] and b[K], zero beyond K. */
static float dot_even_first(float init, const uint16_t *a, const uint16_t *b, int64_t K) {
  float acc = init;
  for (int64_t k = 0; k < K; k += 2) {
    acc += moe_bf16_to_float(a[k]) * moe_bf16_to_float(b[k]);
    const float a1 = k + 1 < K ? moe_bf16_to_float(a[k + 1]) : 0.0f;
    const float b1 = k + 1 < K ? moe_bf16_to_float(b[k + 1]) : 0.0f;
    acc += a1 * b1;
  }
  return acc;
}

static int failures;

static void fail(const char *fmt, const char *what, int rows, int panels, int64_t K, int acc,
                 double detail) {
  if (failures++ < 20) {
    fprintf(stderr, "FAIL %s rows=%d panels=%d K=%lld accumulate=%d: ", what, rows, panels,
            (long long)K, acc);
    fprintf(stderr, fmt, detail);
    fputc('\n', stderr);
  }
}

/* One tile call of `tile` against the scalar loop (bitwise when exact) and
 * float64 (always). Returns 1 when the bits equal the scalar loop's. */
static int check_tile(cpu_tile_fn tile, const char *what, int exact, int rows, int panels,
                      int64_t K, int accumulate) {
  const int64_t N = (int64_t)panels * CPU_PANEL_COLS, kpairs = (K + 1) / 2;
  const int64_t ldc = CPU_GROUP_PANELS * CPU_PANEL_COLS, panel_stride = kpairs * CPU_PANEL_PAIR;
  uint16_t *a_raw = malloc((size_t)(rows * K) * 2), *b_raw = malloc((size_t)(N * K) * 2);
  uint32_t *a = calloc((size_t)rows * CPU_A_STRIDE_U32, sizeof *a);
  uint16_t *b = malloc((size_t)(panels * panel_stride) * 2);
  float *c = malloc((size_t)(rows * ldc) * sizeof *c), *init = malloc((size_t)(rows * ldc) * 4);
  if (!a_raw || !b_raw || !a || !b || !c || !init) {
    fprintf(stderr, "out of memory\n");
    exit(1);
  }
  fill_bf16(a_raw, (size_t)(rows * K));
  fill_bf16(b_raw, (size_t)(N * K));
  for (int64_t i = 0; i < rows * ldc; ++i)
    init[i] = c[i] = (float)(uniform() - 0.5);
  /* A as the driver packs it (cpu_kernels.h): the bf16 row, zero past K. */
  for (int r = 0; r < rows; ++r)
    memcpy(a + (int64_t)r * CPU_A_STRIDE_U32, a_raw + r * K, (size_t)K * 2);
  const cpu_b_source src = {.layout = MOE_WEIGHT_LAYOUT_OUT_IN, .n = N, .k = K, .gated_half = 0};
  for (int p = 0; p < panels; ++p)
    cpu_pack_b_panel(&src, b_raw, p, 0, kpairs, b + p * panel_stride);
  tile(rows, panels, kpairs, a, b, panel_stride, c, ldc, accumulate, NULL);
  int same = 1;
  double worst = 0, worst_bits = 0;
  for (int r = 0; r < rows; ++r)
    for (int64_t n = 0; n < N; ++n) {
      const float start = accumulate ? init[r * ldc + n] : 0.0f;
      const float want = dot_even_first(start, a_raw + r * K, b_raw + n * K, K);
      double ref = start, scale = fabs(start);
      for (int64_t k = 0; k < K; ++k) {
        const double x = (double)moe_bf16_to_float(a_raw[r * K + k]) *
                         (double)moe_bf16_to_float(b_raw[n * K + k]);
        ref += x;
        scale += fabs(x);
      }
      const float got = c[r * ldc + n];
      const double err = fabs((double)got - ref) / (scale > 0 ? scale : 1);
      if (err > worst) worst = err;
      if (memcmp(&got, &want, sizeof got) != 0) {
        same = 0;
        worst_bits = fabs((double)got - (double)want);
      }
    }
  /* fp32 accumulation of <= 1024 terms: |err| <= ~K * 2^-24 * sum|terms|. */
  if (worst > (double)(K + 2) * 0x1.0p-23)
    fail("float64 error %.3g", what, rows, panels, K, accumulate, worst);
  if (exact && !same)
    fail("differs from the scalar even-then-odd loop by %.3g", what, rows, panels, K, accumulate,
         worst_bits);
  /* The part of c beyond the tile's rows and panels stays as it was. */
  for (int r = 0; r < rows; ++r)
    for (int64_t n = N; n < ldc; ++n)
      if (memcmp(&c[r * ldc + n], &init[r * ldc + n], 4) != 0) {
        fail("wrote past its panels (column %g)", what, rows, panels, K, accumulate, (double)n);
        r = rows;
        break;
      }
  free(a_raw), free(b_raw), free(a), free(b), free(c), free(init);
  return same;
}

static int tile_grid(cpu_tile_fn tile, const char *what, int exact, int *cases) {
  static const int rows_list[] = {1,  2,  3,  4,  5,  12, 15, 16, 17,
                                  20, 31, 32, 33, 40, 47, 48, 49, 64};
  static const int panels_list[] = {1, 3, 8};
  static const int64_t k_list[] = {1, 2, 30, 31, 32, 33, 63, 64, 65, 97, 511, 512};
  int all_same = 1;
  for (size_t i = 0; i < sizeof rows_list / sizeof *rows_list; ++i) {
    if (rows_list[i] > CPU_TILE_ROWS_MAX) continue; /* up to CPU_AMX_ONE_TILE_ROWS */
    for (size_t j = 0; j < sizeof panels_list / sizeof *panels_list; ++j)
      for (size_t k = 0; k < sizeof k_list / sizeof *k_list; ++k)
        for (int acc = 0; acc < 2 && k_list[k] <= 2 * CPU_KC_PAIRS; ++acc) {
          /* One K block at most, as the driver calls a tile (A/B builds
           * with smaller blocks skip the longer K). */
          all_same &= check_tile(tile, what, exact, rows_list[i], panels_list[j], k_list[k], acc);
          ++*cases;
        }
  }
  return all_same;
}

/* The driver over runs of several sizes, K of two blocks plus a tail, N of
 * two panel groups; out must be bf16 of the scalar loop, exactly when
 * exact, else within bf16 rounding of float64. in_place: as the layer lays
 * things out: A and out by sorted position with padded pitches (the path's
 * tile_strided reads A where it has one), the weights packed once (so the
 * row tiles stream the next K block, cpu_weight_prefetch), K and N odd so
 * that the zero pair half and the zero column are exercised. Otherwise A
 * is gathered by slot and the raw weights packed per item. */
static void check_driver(const cpu_kernel_path *path, int threads, int exact, int in_place) {
  const int64_t K = in_place ? 601 : 600, N = in_place ? 301 : 300;
  const int64_t lda = in_place ? K + 33 : K, ld_out = in_place ? N + 7 : N;
  static const int32_t run_rows[] = {1,  3,   17,  33,  40,  48,  49, 64,
                                     65, 120, 130, 191, 200, 400, 700};
  enum { RUNS = sizeof run_rows / sizeof run_rows[0] };
  int64_t slots = 0;
  for (int i = 0; i < RUNS; ++i)
    slots += run_rows[i];
  uint16_t *x = malloc((size_t)(slots * K) * 2), *w = malloc((size_t)(RUNS * N * K) * 2);
  uint16_t *a_sorted = calloc((size_t)(slots * lda), 2);
  uint16_t *out = malloc((size_t)(slots * ld_out) * 2);
  int32_t *order = malloc((size_t)slots * sizeof *order);
  const size_t stride = (cpu_gemm_scratch_bytes(0) + 63) / 64 * 64;
  unsigned char *scratch = aligned_alloc(64, stride * (size_t)threads);
  if (!x || !w || !a_sorted || !out || !order || !scratch) {
    fprintf(stderr, "out of memory\n");
    exit(1);
  }
  fill_bf16(x, (size_t)(slots * K));
  fill_bf16(w, (size_t)(RUNS * N * K));
  /* Slots in a scrambled order, so rows are gathered, not contiguous. */
  for (int64_t s = 0; s < slots; ++s)
    order[s] = (int32_t)((s * 7919) % slots);
  cpu_gemm_run runs[RUNS];
  int64_t used = 0;
  for (int i = 0; i < RUNS; ++i) {
    runs[i] =
        (cpu_gemm_run){.expert = i, .rows = run_rows[i], .slots = order + used, .position = used};
    used += run_rows[i];
  }
  /* Sorted A: row i is x's row of slot order[i]; the column past K stays 0
   * (the pair rule), the rest of the pitch is garbage that must not be read. */
  for (int64_t i = 0; i < slots; ++i) {
    memcpy(a_sorted + i * lda, x + (int64_t)order[i] * K, (size_t)K * 2);
    for (int64_t k = K + 1; k < lda; ++k)
      a_sorted[i * lda + k] = 0x7fc1; /* NaN */
  }
  for (int64_t i = 0; i < slots * ld_out; ++i)
    out[i] = 0xffff;
  const cpu_b_source b_source = {.layout = MOE_WEIGHT_LAYOUT_OUT_IN, .n = N, .k = K};
  const int64_t panels = cpu_b_panels(&b_source), kpairs = (K + 1) / 2;
  const int64_t panel_stride = kpairs * CPU_PANEL_PAIR, expert_stride = panels * panel_stride;
  uint16_t *packed = NULL;
  if (in_place) {
    packed = malloc((size_t)(RUNS * expert_stride) * sizeof *packed);
    if (!packed) {
      fprintf(stderr, "out of memory\n");
      exit(1);
    }
    for (int i = 0; i < RUNS; ++i)
      for (int64_t p = 0; p < panels; ++p)
        cpu_pack_b_panel(&b_source, w + (int64_t)i * N * K, p, 0, kpairs,
                         packed + i * expert_stride + p * panel_stride);
    weights_lo = (const char *)packed;
    weights_hi = (const char *)(packed + RUNS * expert_stride);
  }
  stream_lines = stream_outside = near_lines = near_outside = 0;
  const cpu_gemm_problem pb = {
      .path = path,
      .a = in_place ? a_sorted : x,
      .lda = lda,
      .a_row_div = 1,
      .a_by_position = in_place,
      .b_source = b_source,
      .b_packed = packed,
      .b_expert_stride = expert_stride,
      .b_panel_stride = panel_stride,
      .b_raw = in_place ? NULL : w,
      .b_raw_expert_stride = N * K,
      .epi = {.gated = 0,
              .n_out = N,
              .out = out,
              .ld_out = ld_out,
              .out_by_position = in_place,
              .weight_mode = MOE_GEMM_ROUTED_WEIGHT_NONE},
  };
  cpu_gemm_execute(&pb, runs, RUNS, threads, scratch, stride);
  weights_lo = weights_hi = NULL;
  /* The model path streams in blocks of 3+ row tiles (the 400- and
   * 700-row runs), on hardware the hint is not observed. */
  if (path == &model_path && in_place && (stream_lines == 0 || stream_outside))
    fail("driver: %g of the next-K-block stream's lines fall outside the packed weights (or "
         "none streamed)",
         path->name, 0, 0, K, 0, (double)stream_outside);
  if (path == &model_path && in_place && near_outside)
    fail("driver: %g of the steps-ahead requests fall outside the packed weights", path->name, 0, 0,
         K, 0, (double)near_outside);
  int64_t bad = 0;
  double worst = 0;
  for (int i = 0; i < RUNS; ++i)
    for (int r = 0; r < runs[i].rows; ++r) {
      const int64_t s = runs[i].slots[r];
      const int64_t out_row = in_place ? runs[i].position + r : s;
      if (in_place && out[out_row * ld_out + N] != 0) bad++; /* the zero column */
      for (int64_t n = 0; n < N; ++n) {
        const uint16_t *xa = x + s * K, *wb = w + ((int64_t)i * N + n) * K;
        const uint16_t got = out[out_row * ld_out + n];
        if (exact) {
          bad += got != moe_bf16_from_float(dot_even_first(0.0f, xa, wb, K));
        } else {
          double ref = 0, scale = 0;
          for (int64_t k = 0; k < K; ++k) {
            const double t = (double)moe_bf16_to_float(xa[k]) * moe_bf16_to_float(wb[k]);
            ref += t, scale += fabs(t);
          }
          const double err = fabs(moe_bf16_to_float(got) - ref) / (fabs(ref) + 1e-3 * scale);
          if (err > worst) worst = err;
          bad += err > 1.0 / 128;
        }
      }
    }
  if (bad)
    fail(exact ? "driver: %g outputs differ from bf16 of the scalar loop"
               : "driver: %g outputs beyond bf16 rounding of float64",
         path->name, 0, 0, K, 0, (double)bad);
  printf("  driver with %s, %d threads, %s: %lld rows x %lld columns, K = %lld: %s\n", path->name,
         threads,
         in_place ? "A in place by sorted position, packed weights"
                  : "A gathered by slot, raw weights",
         (long long)slots, (long long)N, (long long)K, bad ? "FAILED" : "ok");
  if (path == &model_path && in_place)
    printf("    next-K-block stream: %ld lines requested, steps ahead (with the follow-on into "
           "the next block) %ld, all inside the packed weights\n",
           stream_lines, near_lines);
  free(x), free(w), free(a_sorted), free(out), free(order), free(scratch), free(packed);
}

/* ---- The FMA-order decode kernel against the model --------------------- */

#ifdef MOE_CPU_HAVE_AMX_ORDER
static long order_cases, order_values, order_nonzero_flush;

/* cpu_amx_order_tile and the model's tile body on the same operands of the
 * given kind: bitwise equal over the whole C (columns beyond the panels
 * included), and the kernel's second call gives the first one's bits. */
static void order_case(int rows, int panels, int64_t kpairs, int accumulate, int kind,
                       uint64_t *state) {
  const int64_t ldc = CPU_GROUP_PANELS * CPU_PANEL_COLS, panel_stride = kpairs * CPU_PANEL_PAIR;
  uint32_t *a = calloc((size_t)rows * CPU_A_STRIDE_U32, sizeof *a);
  uint16_t *b = malloc((size_t)(panels * panel_stride) * sizeof *b);
  float *c_init = malloc((size_t)(rows * ldc) * sizeof(float));
  float *c_model = malloc((size_t)(rows * ldc) * sizeof(float));
  float *c_vec = malloc((size_t)(rows * ldc) * sizeof(float));
  float *c_again = malloc((size_t)(rows * ldc) * sizeof(float));
  if (!a || !b || !c_init || !c_model || !c_vec || !c_again) {
    fprintf(stderr, "out of memory\n");
    exit(1);
  }
  for (int r = 0; r < rows; ++r)
    for (int64_t kp = 0; kp < kpairs; ++kp)
      a[r * CPU_A_STRIDE_U32 + kp] = cpu_probe_pair(state, kind);
  for (int64_t i = 0; i < panels * panel_stride; ++i)
    b[i] = cpu_probe_bf16(state, kind);
  for (int64_t i = 0; i < rows * ldc; ++i)
    c_init[i] = cpu_probe_c(state, kind);
  const size_t bytes = (size_t)(rows * ldc) * sizeof(float);
  memcpy(c_model, c_init, bytes);
  memcpy(c_vec, c_init, bytes);
  memcpy(c_again, c_init, bytes);
  const long ftz_before = model_ftz;
  model_tile(rows, panels, kpairs, a, b, panel_stride, c_model, ldc, accumulate, NULL);
  cpu_amx_order_tile(rows, panels, kpairs, a, b, panel_stride, c_vec, ldc, accumulate, NULL);
  cpu_amx_order_tile(rows, panels, kpairs, a, b, panel_stride, c_again, ldc, accumulate, NULL);
  int64_t differ = 0;
  for (int64_t i = 0; i < rows * ldc; ++i)
    differ += memcmp(&c_model[i], &c_vec[i], sizeof(float)) != 0;
  if (differ)
    fail("fma-order: %g values differ from the model's bits", "order", rows, panels, 2 * kpairs,
         accumulate, (double)differ);
  if (memcmp(c_vec, c_again, bytes) != 0)
    fail("fma-order: a second call gave other bits%.0g", "order", rows, panels, 2 * kpairs,
         accumulate, 0.0);
  order_cases++;
  order_values += (int64_t)rows * panels * CPU_PANEL_COLS;
  order_nonzero_flush += model_ftz > ftz_before;
  free(a), free(b), free(c_init), free(c_model), free(c_vec), free(c_again);
}

/* One element, one k-pair, on the edge of FTZ: C + a*b (even k), then +0.
 * Cases: tiny only after rounding with an unbounded exponent (the model
 * flushes, a flush of the denormal-grid result would not), an exact
 * denormal product, a sum landing on FLT_MIN, a denormal C (DAZ). */
static void order_edges(void) {
  static const float cases[][3] = {
      {0x1.0p-126f, 0x1.8p-76f, -0x1.0p-75f},
      {0.0f, 0x1.0p-65f, 0x1.0p-65f},
      {0x1.8p-126f, -0x1.0p-64f, 0x1.0p-63f},
      {0x1.0p-130f, 0x1.0p-60f, 0x1.0p-60f},
      {-0x1.0p-127f, 0.0f, 1.0f},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i) {
    uint32_t a[CPU_A_STRIDE_U32] = {0};
    uint16_t b[CPU_PANEL_PAIR] = {0};
    float c_model[CPU_PANEL_COLS] = {0}, c_vec[CPU_PANEL_COLS] = {0};
    c_model[0] = c_vec[0] = cases[i][0];
    a[0] = moe_bf16_from_float(cases[i][1]);
    b[0] = moe_bf16_from_float(cases[i][2]);
    model_tile(1, 1, 1, a, b, CPU_PANEL_PAIR, c_model, CPU_PANEL_COLS, 1, NULL);
    cpu_amx_order_tile(1, 1, 1, a, b, CPU_PANEL_PAIR, c_vec, CPU_PANEL_COLS, 1, NULL);
    if (memcmp(c_model, c_vec, sizeof c_vec) != 0)
      fail("fma-order edge case: model %a", "order", 1, 1, 2, 1, (double)c_model[0]);
    order_cases++;
    order_values += CPU_PANEL_COLS;
  }
}

/* The grid (rows 1..3, panels through the 4-panel pass and single panels,
 * K of tail-only, full and mixed tile steps and a K block, three kinds of
 * data), the edge cases, then the run-time probe's own comparison on the
 * model: fma-order must match it; vdpbf16ps is reported. */
static void check_order(void) {
  if (!__builtin_cpu_supports("avx512f")) {
    printf("  fma-order decode kernel: SKIPPED (no AVX-512F here)\n");
    return;
  }
  static const int panels_list[] = {1, 3, 4, 5, 8};
  static const int64_t kp_list[] = {1, 8, 15, 16, 17, 40, 256};
  uint64_t state = 0x13198a2e03707344ull;
  const int failures_before = failures;
  const long daz_before = model_daz, ftz_before = model_ftz;
  for (int kind = 0; kind < CPU_PROBE_KINDS; ++kind)
    for (int rows = 1; rows < CPU_AMX_MIN_ROWS; ++rows)
      for (size_t j = 0; j < sizeof panels_list / sizeof *panels_list; ++j)
        for (size_t k = 0; k < sizeof kp_list / sizeof *kp_list; ++k)
          for (int acc = 0; acc < 2 && kp_list[k] <= CPU_KC_PAIRS; ++acc) /* one K block */
            order_case(rows, panels_list[j], kp_list[k], acc, kind, &state);
  order_edges();
  printf("  fma-order decode kernel: %ld cases, %ld values bitwise against the model "
         "(%ld operands flushed by DAZ, %ld results by FTZ, in %ld cases): %s\n",
         order_cases, order_values, model_daz - daz_before, model_ftz - ftz_before,
         order_nonzero_flush, failures > failures_before ? "FAILED" : "ok");
  static cpu_amx_probe probe;
  enum { TRIALS = 64 };
  int same_order = 1, same_bf16 = 1, probes = 0;
  for (int kind = 0; kind < CPU_PROBE_KINDS; ++kind)
    for (int trial = 0; trial < TRIALS; ++trial, ++probes) {
      cpu_amx_probe_fill(&probe, &state, kind);
      const int rows = 1 + trial % CPU_PROBE_ROWS;
      same_order &= cpu_amx_probe_same(&probe, rows, cpu_amx_order_tile);
#ifdef MOE_CPU_HAVE_AVX512BF16
      if (__builtin_cpu_supports("avx512bf16"))
        same_bf16 &= cpu_amx_probe_same(&probe, rows, cpu_path_avx512bf16.tile);
#endif
    }
  if (!same_order)
    fail("the split-rows probe's data: fma-order differs from the model%.0g", "probe", 0, 0,
         2 * CPU_PROBE_PAIRS, 1, 0.0);
  printf("  split-rows probe on the model, %d probes: fma-order %s", probes,
         same_order ? "matches" : "DIFFERS");
#ifdef MOE_CPU_HAVE_AVX512BF16
  if (__builtin_cpu_supports("avx512bf16"))
    printf(", vdpbf16ps %s", same_bf16 ? "matches" : "differs (the reverse pair order)");
#endif
  printf("\n");
}
#endif

int main(void) {
  int cases = 0;
  printf("cpu_amx_check: the AMX kernel body on a scalar model of the tile instructions\n");
  tile_grid(model_tile, "model", 1, &cases);
  printf("  tile grid: %d cases, bitwise against the scalar loop and within fp32 of float64: "
         "%s\n",
         cases, failures || model_faults ? "FAILED" : "ok");
  check_driver(&model_path, 2, 1, 0);
  check_driver(&model_path, 2, 1, 1);
  check_driver(&model_path, 24, 1, 1); /* few items per thread: fewer panels per item */
#ifdef MOE_CPU_HAVE_AMX_ORDER
  check_order();
#else
  printf("  fma-order decode kernel: SKIPPED (this build has no AVX-512F kernels)\n");
#endif
  if (model_faults) {
    fprintf(stderr, "FAIL: %d tile operations would fault on hardware\n", model_faults);
    failures++;
  }
#ifdef MOE_CPU_HAVE_AMX
  if (cpu_amx_usable()) {
    int real_cases = 0;
    const int same = tile_grid(cpu_path_amx.tile, "amx", 0, &real_cases);
    printf("AMX hardware: tile grid %d cases within fp32 of float64: %s; bits %s the SDM "
           "pseudo-code's order\n",
           real_cases, failures ? "FAILED" : "ok", same ? "equal" : "differ from");
    const int split = cpu_amx_split_rows();
    const char *kernel = cpu_amx_split_kernel();
    if (split && strcmp(kernel, "avx512bf16") == 0)
      printf("AMX hardware: tdpbf16ps and vdpbf16ps agree bitwise: tiles under %d rows run on "
             "AVX-512 BF16\n",
             split);
    else if (split)
      printf("AMX hardware: tdpbf16ps and vdpbf16ps differ in some bits; tdpbf16ps and the "
             "%s kernel agree bitwise: tiles under %d rows run on it (AVX-512F)\n",
             kernel, split);
    else
      printf("AMX hardware: tdpbf16ps differs in some bits from vdpbf16ps and from the "
             "fma-order kernel: AMX takes every tile\n");
    check_driver(&cpu_path_amx, omp_get_max_threads(), 0, 0);
    check_driver(&cpu_path_amx, omp_get_max_threads(), 0, 1);
  } else {
    printf("AMX hardware: SKIPPED (no AMX here, or the OS refused the tile state)\n");
  }
#else
  printf("AMX hardware: SKIPPED (this build has no AMX path: the compiler lacks -mamx-bf16)\n");
#endif
  printf("%d passed, %d failed\n", failures ? 0 : 1, failures ? 1 : 0);
  return failures ? 1 : 0;
}
