/*
 * test_huge.c - indices past 2^31 elements, where 32-bit index arithmetic
 * would wrap: (a) slot x row stride (the reduce's y, grouped GEMM's c and
 * per-slot a with T*k*n or T*k*K > 2^31) and (b) expert x expert stride
 * (grouped GEMM's b with EL*n*K > 2^31, only the last expert has tokens).
 *
 * Each case allocates about 4.4 GB on the device and runs only with
 * MOE_TEST_HUGE=1 (CTest: the <backend>-huge tests, label "huge"). Data are
 * small integers, so every fp32 sum is exact and the expected bf16 output
 * is known exactly: the checks are bitwise, on the rows past 2^31 elements
 * and a sample of the others. Host memory stays small: buffers are written
 * and read in chunks.
 */
#include "harness.h"

#include <stdlib.h>
#include <string.h>

/* Every test ends by releasing its contexts; leaks fail it (ASan builds). */
TestSuite(huge, .fini = th_suite_fini);

#define CHUNK_ELEMENTS ((int64_t)1 << 25) /* 64 MB of bf16 per transfer */
#define BEYOND_INT32 ((int64_t)1 << 31)

static void require_huge(void) {
  const char *env = getenv("MOE_TEST_HUGE");
  if (!env || strcmp(env, "1") != 0)
    cr_skip_test("huge-index test (about 4.4 GB): run with MOE_TEST_HUGE=1, e.g. "
                 "ctest -L huge, or MOE_TEST_HUGE=1 ./moe_tests --filter 'huge/*'");
}

/* A small integer in [-r, r] that depends on all of (a, b, c), so that a
 * read from a wrong row or expert shows; exactly representable. */
static inline double pattern_value(int64_t a, int64_t b, int64_t c, int r) {
  uint64_t h = (uint64_t)a * 0x9e3779b97f4a7c15ull + (uint64_t)b * 0xc2b2ae3d27d4eb4full +
               (uint64_t)c * 0x165667b19e3779f9ull;
  h ^= h >> 29;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 32;
  return (double)(int64_t)(h % (uint64_t)(2 * r + 1)) - r;
}
static inline uint16_t pattern(int64_t a, int64_t b, int64_t c, int r) {
  return ref_double_to_bf16(pattern_value(a, b, c, r));
}

/* Creates a buffer of count bf16 values value(i) written in chunks; value
 * is row-major over [rows][cols]. */
typedef uint16_t (*element_fn)(int64_t row, int64_t col, int64_t tag);

/* A buffer of bytes; a device that cannot hold that much in one buffer
 * (PoCL: at most 4 GiB per allocation) cannot meet these indices at all,
 * which is reported as a skip. */
static moe_buffer *huge_buffer(moe_context *ctx, size_t bytes) {
  moe_buffer *buffer = NULL;
  moe_status st = moe_buffer_create(ctx, bytes, &buffer);
  if (st == MOE_ERROR_OUT_OF_MEMORY)
    cr_skip_test("not supported on %s: no buffer of %zu bytes (%s)", th_backend_name(), bytes,
                 moe_last_error(ctx));
  TH_OK(st);
  return buffer;
}

/* As th_output: filled with TH_FILL_BYTE, TH_GUARD_BYTES of guard. */
static moe_buffer *huge_output(moe_context *ctx, size_t bytes) {
  moe_buffer *buffer = huge_buffer(ctx, bytes + TH_GUARD_BYTES);
  th_refill(buffer);
  return buffer;
}

static moe_buffer *upload_generated(moe_context *ctx, int64_t rows, int64_t cols, int64_t tag,
                                    element_fn element) {
  const int64_t count = rows * cols;
  moe_buffer *buffer = huge_buffer(ctx, (size_t)count * 2);
  uint16_t *chunk = th_malloc((size_t)CHUNK_ELEMENTS * 2);
  for (int64_t first = 0; first < count; first += CHUNK_ELEMENTS) {
    const int64_t n = count - first < CHUNK_ELEMENTS ? count - first : CHUNK_ELEMENTS;
    for (int64_t i = 0; i < n; ++i)
      chunk[i] = element((first + i) / cols, (first + i) % cols, tag);
    TH_OK(moe_buffer_write(buffer, (size_t)first * 2, chunk, (size_t)n * 2));
  }
  free(chunk);
  return buffer;
}

/* Reads row r (cols bf16 values) of a [rows][cols] buffer. */
static void read_row(const moe_buffer *buffer, int64_t r, int64_t cols, uint16_t *row) {
  TH_OK(moe_buffer_read(buffer, (size_t)r * (size_t)cols * 2, row, (size_t)cols * 2));
}

/* The rows to check: every row whose start is at or past 2^31 elements,
 * the one that straddles it, and every 97th row before. */
static bool row_checked(int64_t r, int64_t cols) {
  return (r + 1) * cols > BEYOND_INT32 || r % 97 == 0;
}

/* Runs align for ids on ctx with block_m (trying smaller ones when the
 * backend declines a block_m in the GEMM is the caller's business). */
typedef struct metadata {
  moe_buffer *sorted, *blocks, *padded;
} metadata;

static metadata align_ids(moe_context *ctx, int64_t T, int32_t k, int32_t EL, int32_t block_m,
                          const int32_t *ids) {
  int64_t cap, blocks_cap;
  TH_OK(moe_align_capacity(T, k, EL, block_m, &cap, &blocks_cap));
  metadata m = {th_output(ctx, (size_t)cap * 4), th_output(ctx, (size_t)blocks_cap * 4),
                th_output(ctx, 4)};
  moe_buffer *b_ids = th_upload(ctx, ids, (size_t)(T * k) * 4);
  TH_OK(moe_align(ctx, T, k, EL, EL, block_m, b_ids, NULL, m.sorted, m.blocks, m.padded));
  moe_buffer_destroy(b_ids);
  return m;
}

static void metadata_free(metadata *m) {
  moe_buffer_destroy(m->sorted);
  moe_buffer_destroy(m->blocks);
  moe_buffer_destroy(m->padded);
}

/* Grouped GEMM with the first block_m in {64, 16, 1} that the backend
 * runs; skips the test when it runs none. */
static void gemm_any_block_m(moe_context *ctx, moe_gemm_desc desc, const int32_t *ids,
                             const moe_buffer *a, const moe_buffer *b, moe_buffer *c) {
  const int32_t block_ms[] = {64, 16, 1};
  for (size_t i = 0; i < sizeof block_ms / sizeof block_ms[0]; ++i) {
    desc.block_m = block_ms[i];
    metadata m =
        align_ids(ctx, desc.num_tokens, desc.top_k, desc.num_local_experts, desc.block_m, ids);
    moe_status st = moe_grouped_gemm(ctx, &desc, a, b, NULL, m.sorted, m.blocks, m.padded, NULL, c);
    metadata_free(&m);
    if (st != MOE_ERROR_UNSUPPORTED) {
      TH_OK(st);
      return;
    }
  }
  cr_skip_test("not supported on %s: grouped GEMM declined block_m 64, 16 and 1 for this shape",
               th_backend_name());
}

/* ---- (a) slot x row stride -------------------------------------------- */

static uint16_t y_element(int64_t slot, int64_t h, int64_t tag) {
  (void)tag;
  return pattern(slot, h, 0, 4);
}

Test(huge, reduce_slot_rows_past_2_31, .timeout = 900) {
  require_huge();
  const int64_t T = 65536, H = 4097;
  const int32_t k = 8;
  th_case("huge reduce T=%lld k=%d H=%lld: y holds %lld elements", (long long)T, (int)k,
          (long long)H, (long long)(T * k * H));
  cr_assert(T * k * H > BEYOND_INT32, "the shape does not pass 2^31");
  moe_context *ctx = th_ctx();
  moe_buffer *y = upload_generated(ctx, T * k, H, 0, y_element);
  float *w = th_malloc((size_t)(T * k) * 4);
  for (int64_t s = 0; s < T * k; ++s)
    w[s] = 0.25f * (float)(s % 4 + 1);
  moe_buffer *b_w = th_upload(ctx, w, (size_t)(T * k) * 4);
  moe_buffer *out = th_output(ctx, (size_t)(T * H) * 2);
  TH_OK(moe_topk_reduce(ctx, T, k, H, y, b_w, NULL, NULL, 0, 0, out));
  th_check_guard(out, (size_t)(T * H) * 2, "out");
  uint16_t *row = th_malloc((size_t)H * 2);
  for (int64_t t = 0; t < T; ++t) {
    if (!row_checked(t * k + k - 1, H)) continue;
    read_row(out, t, H, row);
    for (int64_t h = 0; h < H; ++h) {
      double sum = 0.0;
      for (int32_t j = 0; j < k; ++j)
        sum += w[t * k + j] * pattern_value(t * k + j, h, 0, 4);
      TH_ASSERT(row[h] == ref_double_to_bf16(sum), "out[%lld][%lld] = %g, want %g (exact)",
                (long long)t, (long long)h, (double)th_bf16_to_float(row[h]), sum);
    }
  }
  free(row);
  free(w);
  moe_buffer_destroy(y);
  moe_buffer_destroy(b_w);
  moe_buffer_destroy(out);
}

static uint16_t a_element(int64_t row, int64_t col, int64_t tag) {
  return pattern(row, col, tag, 2);
}

static uint16_t b_element(int64_t row, int64_t col, int64_t tag) {
  /* row = e * n + j of b[EL][n][K]; tag = n. */
  return pattern(row / tag, row % tag, col, 2);
}

/* Distinct ids in [0, EL) per token. */
static int32_t *spread_ids(int64_t T, int32_t k, int32_t EL) {
  int32_t *ids = th_malloc((size_t)(T * k) * 4);
  for (int64_t t = 0; t < T; ++t)
    for (int32_t j = 0; j < k; ++j)
      ids[t * k + j] = (int32_t)((t + j) % EL);
  return ids;
}

/* Checks the sampled rows of the grouped GEMM output c[T*k][n] exactly
 * against the generated patterns: a row is checked when it lies past 2^31
 * elements of the huge tensor (c for per-token input, a for per-slot input,
 * whose rows hold K elements) or is every 97th. Slot s reads a's row s / k
 * (pattern 0) per token, or row s (pattern 1) per slot. */
static void check_gemm_rows(const moe_buffer *c, const int32_t *ids, int64_t T, int32_t k,
                            int64_t n, int64_t K, moe_gemm_input input) {
  const int per_slot = input == MOE_GEMM_INPUT_PER_SLOT;
  uint16_t *row = th_malloc((size_t)n * 2);
  for (int64_t s = 0; s < T * k; ++s) {
    if (!row_checked(s, per_slot ? K : n)) continue;
    read_row(c, s, n, row);
    const int64_t a_row = per_slot ? s : s / k, e = ids[s];
    for (int64_t j = 0; j < n; ++j) {
      double sum = 0.0;
      for (int64_t i = 0; i < K; ++i)
        sum += pattern_value(a_row, i, per_slot, 2) * pattern_value(e, j, i, 2);
      TH_ASSERT(row[j] == ref_double_to_bf16(sum), "c[%lld][%lld] = %g, want %g (exact)",
                (long long)s, (long long)j, (double)th_bf16_to_float(row[j]), sum);
    }
  }
  free(row);
}

Test(huge, gemm_output_rows_past_2_31, .timeout = 900) {
  require_huge();
  const int64_t T = 65536, n = 16400, K = 16;
  const int32_t k = 2, EL = 4;
  th_case("huge gemm (c) T=%lld k=%d EL=%d n=%lld K=%lld: c holds %lld elements", (long long)T,
          (int)k, (int)EL, (long long)n, (long long)K, (long long)(T * k * n));
  cr_assert(T * k * n > BEYOND_INT32, "the shape does not pass 2^31");
  moe_context *ctx = th_ctx();
  /* The huge buffer first: a skip for its size leaves nothing behind. */
  moe_buffer *c = huge_output(ctx, (size_t)(T * k * n) * 2);
  int32_t *ids = spread_ids(T, k, EL);
  moe_buffer *a = upload_generated(ctx, T, K, 0, a_element);
  moe_buffer *b = upload_generated(ctx, EL * n, K, n, b_element);
  const moe_gemm_desc desc = {.num_tokens = T,
                              .top_k = k,
                              .num_local_experts = EL,
                              .n = n,
                              .k = K,
                              .input = MOE_GEMM_INPUT_PER_TOKEN};
  gemm_any_block_m(ctx, desc, ids, a, b, c);
  th_check_guard(c, (size_t)(T * k * n) * 2, "c");
  check_gemm_rows(c, ids, T, k, n, K, MOE_GEMM_INPUT_PER_TOKEN);
  free(ids);
  moe_buffer_destroy(a);
  moe_buffer_destroy(b);
  moe_buffer_destroy(c);
}

Test(huge, gemm_input_rows_past_2_31, .timeout = 900) {
  require_huge();
  const int64_t T = 65536, n = 16, K = 16400;
  const int32_t k = 2, EL = 4;
  th_case("huge gemm (per-slot a) T=%lld k=%d EL=%d n=%lld K=%lld: a holds %lld elements",
          (long long)T, (int)k, (int)EL, (long long)n, (long long)K, (long long)(T * k * K));
  cr_assert(T * k * K > BEYOND_INT32, "the shape does not pass 2^31");
  moe_context *ctx = th_ctx();
  /* The huge buffer first: a skip for its size leaves nothing behind. */
  moe_buffer *a = upload_generated(ctx, T * k, K, 1, a_element);
  int32_t *ids = spread_ids(T, k, EL);
  moe_buffer *b = upload_generated(ctx, EL * n, K, n, b_element);
  moe_buffer *c = huge_output(ctx, (size_t)(T * k * n) * 2);
  const moe_gemm_desc desc = {.num_tokens = T,
                              .top_k = k,
                              .num_local_experts = EL,
                              .n = n,
                              .k = K,
                              .input = MOE_GEMM_INPUT_PER_SLOT};
  gemm_any_block_m(ctx, desc, ids, a, b, c);
  th_check_guard(c, (size_t)(T * k * n) * 2, "c");
  check_gemm_rows(c, ids, T, k, n, K, MOE_GEMM_INPUT_PER_SLOT);
  free(ids);
  moe_buffer_destroy(a);
  moe_buffer_destroy(b);
  moe_buffer_destroy(c);
}

/* ---- (b) expert x expert stride --------------------------------------- */

static uint16_t last_expert_b_element(int64_t row, int64_t col, int64_t tag) {
  /* tag = n * 1000 + last expert: other experts hold 1.0, so reading the
   * wrong expert changes the result. */
  const int64_t n = tag / 1000, last = tag % 1000;
  return row / n == last ? pattern(last, row % n, col, 1) : 0x3f80;
}

Test(huge, gemm_last_expert_past_2_31, .timeout = 900) {
  require_huge();
  const int64_t T = 64, n = 2048, K = 16700;
  const int32_t k = 1, EL = 64;
  th_case("huge gemm (b) T=%lld EL=%d n=%lld K=%lld: the last expert starts at element %lld",
          (long long)T, (int)EL, (long long)n, (long long)K, (long long)((EL - 1) * n * K));
  cr_assert((EL - 1) * n * K > BEYOND_INT32, "the last expert does not start past 2^31");
  moe_context *ctx = th_ctx();
  /* The huge buffer first: a skip for its size leaves nothing behind. */
  moe_buffer *b = upload_generated(ctx, EL * n, K, n * 1000 + (EL - 1), last_expert_b_element);
  int32_t *ids = th_malloc((size_t)T * 4);
  for (int64_t t = 0; t < T; ++t)
    ids[t] = EL - 1;
  moe_buffer *a = upload_generated(ctx, T, K, 2, a_element);
  moe_buffer *c = th_output(ctx, (size_t)(T * n) * 2);
  const moe_gemm_desc desc = {.num_tokens = T,
                              .top_k = k,
                              .num_local_experts = EL,
                              .n = n,
                              .k = K,
                              .input = MOE_GEMM_INPUT_PER_TOKEN};
  gemm_any_block_m(ctx, desc, ids, a, b, c);
  th_check_guard(c, (size_t)(T * n) * 2, "c");
  uint16_t *row = th_malloc((size_t)n * 2);
  for (int64_t t = 0; t < T; ++t) {
    read_row(c, t, n, row);
    for (int64_t j = 0; j < n; j += (t % 8 == 0 ? 1 : 61)) {
      double sum = 0.0;
      for (int64_t i = 0; i < K; ++i)
        sum += pattern_value(t, i, 2, 2) * pattern_value(EL - 1, j, i, 1);
      TH_ASSERT(row[j] == ref_double_to_bf16(sum), "c[%lld][%lld] = %g, want %g (exact)",
                (long long)t, (long long)j, (double)th_bf16_to_float(row[j]), sum);
    }
  }
  free(row);
  free(ids);
  moe_buffer_destroy(a);
  moe_buffer_destroy(b);
  moe_buffer_destroy(c);
}
