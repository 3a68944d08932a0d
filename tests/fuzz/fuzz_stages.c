/*
 * fuzz_stages.c - libFuzzer target moe_fuzz_stages: the stage functions that
 * read caller-made metadata, moe_grouped_gemm and moe_topk_reduce, on
 * valid shapes with metadata taken straight from the fuzz input (expert
 * ids, slot ids, num_tokens_post_padded, topk_ids and expert-map entries
 * of any int32 value).
 *
 * Every call is valid (invalid arguments are moe_fuzz_api's job), so each
 * must succeed, and by include/moe.h's rule for metadata:
 *   - nothing is read or written outside the buffers (ASan; outputs are
 *     sometimes larger than needed, and the bytes past the need must stay);
 *   - rows of c that no valid position names keep their old bytes;
 *   - moe_topk_reduce's values are ref_topk_reduce's (float64) with the
 *     masked slots skipped, within the rounding of an fp32 sum and bf16.
 * Input layout: one byte picks the stage, then sizes, then the metadata;
 * tensor data comes from a generator seeded by 8 input bytes.
 */
#include "fuzz_common.h"

#ifdef MOE_FUZZ_HAVE_REFERENCE
#include "reference.h"
#endif

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SLOTS 512
#define MAX_COLS 48

static moe_context *ctx;

/* Tensor data: splitmix64, bf16 of small values (no NaN or inf, so that
 * the reduce's sums compare exactly enough). */
static uint64_t mix(uint64_t *state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static void fill_bf16(uint64_t *state, uint16_t *dst, size_t count) {
  for (size_t i = 0; i < count; ++i) {
    /* sign, exponent in [2^-4, 2^3], 7 mantissa bits */
    const uint64_t r = mix(state);
    dst[i] = (uint16_t)(((r & 1) << 15) | ((123 + (r >> 1) % 8) << 7) | ((r >> 8) & 0x7f));
  }
}

static void fill_f32(uint64_t *state, float *dst, size_t count) {
  for (size_t i = 0; i < count; ++i)
    dst[i] = (float)((int64_t)(mix(state) % 2001) - 1000) / 500.0f;
}

/* A metadata entry: mostly in [lo, hi], sometimes any int32. */
static int32_t decode_index(fuzz_input *in, int64_t lo, int64_t hi) {
  return fuzz_u8(in) < 200 ? (int32_t)fuzz_range(in, lo, hi) : (int32_t)fuzz_u32(in);
}

static void fuzz_gemm(fuzz_input *in) {
  const int32_t k = (int32_t)fuzz_range(in, 1, 8);
  const int64_t T = fuzz_range(in, 0, MAX_SLOTS / k);
  const int32_t EL = (int32_t)fuzz_range(in, 1, 12);
  const int64_t n = fuzz_range(in, 1, MAX_COLS), K = fuzz_range(in, 1, MAX_COLS);
  const int32_t BM = 1 << fuzz_range(in, 0, 8);
  const moe_gemm_input input = fuzz_bool(in) ? MOE_GEMM_INPUT_PER_SLOT : MOE_GEMM_INPUT_PER_TOKEN;
  const moe_weight_layout layout =
      fuzz_bool(in) ? MOE_WEIGHT_LAYOUT_IN_OUT : MOE_WEIGHT_LAYOUT_OUT_IN;
  const moe_gemm_routed_weight routed = (moe_gemm_routed_weight)fuzz_range(in, 0, 2);
  const bool has_bias = fuzz_bool(in), larger = fuzz_bool(in);
  uint64_t seed = fuzz_u64(in);
  const int64_t slots = T * k, a_rows = input == MOE_GEMM_INPUT_PER_TOKEN ? T : slots;
  int64_t cap, bcap;
  fuzz_check_status("moe_align_capacity", moe_align_capacity(T, k, EL, BM, &cap, &bcap), NULL,
                    false, true);

  /* Metadata from the input: num_tokens_post_padded first (often near the
   * capacity, sometimes anything), then the blocks' experts, then slots. */
  int32_t padded;
  switch (fuzz_u8(in) % 4) {
  case 0:
    padded = (int32_t)cap;
    break;
  case 1:
    padded = (int32_t)fuzz_range(in, 0, cap);
    break;
  default:
    padded = (int32_t)fuzz_u32(in);
    break;
  }
  int32_t *sorted = malloc((size_t)cap * 4 + 4), *experts = malloc((size_t)bcap * 4 + 4);
  uint16_t *a = malloc((size_t)(a_rows * K) * 2 + 2), *b = malloc((size_t)(EL * n * K) * 2);
  float *bias = malloc((size_t)(EL * n) * 4), *w = malloc((size_t)slots * 4 + 4);
  FUZZ_CHECK(sorted && experts && a && b && bias && w, "out of host memory");
  for (int64_t i = 0; i < bcap; ++i)
    experts[i] = decode_index(in, -1, EL);
  for (int64_t i = 0; i < cap; ++i)
    sorted[i] = decode_index(in, -1, slots);
  fill_bf16(&seed, a, (size_t)(a_rows * K));
  fill_bf16(&seed, b, (size_t)(EL * n * K));
  fill_f32(&seed, bias, (size_t)(EL * n));
  fill_f32(&seed, w, (size_t)slots);

  fuzz_buffer ba, bb, bbias, bsorted, bexperts, bpadded, bw, bc;
  fuzz_buffer_make_mode(&ba, FUZZ_BUFFER_EXACT, ctx, ctx, (size_t)(a_rows * K) * 2, false, a,
                        (size_t)(a_rows * K) * 2);
  fuzz_buffer_make_mode(&bb, FUZZ_BUFFER_EXACT, ctx, ctx, (size_t)(EL * n * K) * 2, false, b,
                        (size_t)(EL * n * K) * 2);
  fuzz_buffer_make_mode(&bbias, has_bias ? FUZZ_BUFFER_EXACT : FUZZ_BUFFER_NULL, ctx, ctx,
                        (size_t)(EL * n) * 4, true, bias, (size_t)(EL * n) * 4);
  fuzz_buffer_make_mode(&bsorted, FUZZ_BUFFER_EXACT, ctx, ctx, (size_t)cap * 4, false, sorted,
                        (size_t)cap * 4);
  fuzz_buffer_make_mode(&bexperts, FUZZ_BUFFER_EXACT, ctx, ctx, (size_t)bcap * 4, false, experts,
                        (size_t)bcap * 4);
  fuzz_buffer_make_mode(&bpadded, FUZZ_BUFFER_EXACT, ctx, ctx, 4, false, &padded, 4);
  fuzz_buffer_make_mode(&bw, routed ? FUZZ_BUFFER_EXACT : FUZZ_BUFFER_NULL, ctx, ctx,
                        (size_t)slots * 4, true, w, (size_t)slots * 4);
  fuzz_buffer_make_mode(&bc, larger ? FUZZ_BUFFER_LARGER : FUZZ_BUFFER_EXACT, ctx, ctx,
                        (size_t)(slots * n) * 2, false, NULL, 0);
  const moe_gemm_desc desc = {.num_tokens = T,
                              .top_k = k,
                              .num_local_experts = EL,
                              .n = n,
                              .k = K,
                              .block_m = BM,
                              .b_layout = layout,
                              .input = input,
                              .routed_weight = routed};
  fuzz_clear_errors(&ctx, 1);
  const moe_status st =
      moe_grouped_gemm(ctx, &desc, ba.buffer, bb.buffer, bbias.buffer, bsorted.buffer,
                       bexperts.buffer, bpadded.buffer, bw.buffer, bc.buffer);
  fuzz_check_status("moe_grouped_gemm", st, ctx, false, true);
  fuzz_buffer_expect_unchanged(&bsorted, 0, "moe_grouped_gemm", "sorted_token_ids");
  fuzz_buffer_expect_unchanged(&bexperts, 0, "moe_grouped_gemm", "expert_ids");
  fuzz_buffer_expect_unchanged(&bc, bc.need, "moe_grouped_gemm", "c (past the need)");

  /* Rows that no valid position names keep their bytes. */
  bool *named = calloc((size_t)slots + 1, 1);
  FUZZ_CHECK(named, "out of host memory");
  const int64_t limit = padded < 0 ? 0 : (padded < cap ? padded : cap);
  for (int64_t p = 0; p < limit; ++p) {
    const int32_t e = experts[p / BM], s = sorted[p];
    if (e >= 0 && e < EL && s >= 0 && s < slots) named[s] = true;
  }
  uint8_t *c = fuzz_buffer_contents(&bc);
  for (int64_t s = 0; s < slots; ++s)
    if (!named[s])
      FUZZ_CHECK(memcmp(c + s * n * 2, bc.shadow + s * n * 2, (size_t)n * 2) == 0,
                 "moe_grouped_gemm wrote row %lld of c, which no valid position names "
                 "(T=%lld k=%d EL=%d BM=%d padded=%d)",
                 (long long)s, (long long)T, k, EL, BM, padded);
  free(c);
  free(named);
  free(sorted), free(experts), free(a), free(b), free(bias), free(w);
  fuzz_buffer *all[] = {&ba, &bb, &bbias, &bsorted, &bexperts, &bpadded, &bw, &bc};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; ++i)
    fuzz_buffer_free(all[i]);
}

static void fuzz_reduce(fuzz_input *in) {
  const int32_t k = (int32_t)fuzz_range(in, 1, 8);
  const int64_t T = fuzz_range(in, 0, MAX_SLOTS / k);
  const int64_t H = fuzz_range(in, 1, MAX_COLS);
  const int32_t E = (int32_t)fuzz_range(in, 1, 64), EL = (int32_t)fuzz_range(in, 1, 64);
  const bool masked = fuzz_bool(in), weighted = fuzz_bool(in), larger = fuzz_bool(in);
  uint64_t seed = fuzz_u64(in);
  const int64_t slots = T * k;
  int32_t *ids = malloc((size_t)slots * 4 + 4), *map = malloc((size_t)E * 4);
  uint16_t *y = malloc((size_t)(slots * H) * 2 + 2);
  float *w = malloc((size_t)slots * 4 + 4);
  FUZZ_CHECK(ids && map && y && w, "out of host memory");
  for (int32_t e = 0; e < E; ++e)
    map[e] = decode_index(in, -1, EL);
  for (int64_t s = 0; s < slots; ++s)
    ids[s] = decode_index(in, -1, E);
  fill_bf16(&seed, y, (size_t)(slots * H));
  fill_f32(&seed, w, (size_t)slots);

  fuzz_buffer by, bw, bids, bmap, bout;
  fuzz_buffer_make_mode(&by, FUZZ_BUFFER_EXACT, ctx, ctx, (size_t)(slots * H) * 2, false, y,
                        (size_t)(slots * H) * 2);
  fuzz_buffer_make_mode(&bw, weighted ? FUZZ_BUFFER_EXACT : FUZZ_BUFFER_NULL, ctx, ctx,
                        (size_t)slots * 4, true, w, (size_t)slots * 4);
  fuzz_buffer_make_mode(&bids, masked ? FUZZ_BUFFER_EXACT : FUZZ_BUFFER_NULL, ctx, ctx,
                        (size_t)slots * 4, true, ids, (size_t)slots * 4);
  fuzz_buffer_make_mode(&bmap, masked ? FUZZ_BUFFER_EXACT : FUZZ_BUFFER_NULL, ctx, ctx,
                        (size_t)E * 4, true, map, (size_t)E * 4);
  fuzz_buffer_make_mode(&bout, larger ? FUZZ_BUFFER_LARGER : FUZZ_BUFFER_EXACT, ctx, ctx,
                        (size_t)(T * H) * 2, false, NULL, 0);
  fuzz_clear_errors(&ctx, 1);
  const moe_status st = moe_topk_reduce(ctx, T, k, H, by.buffer, bw.buffer, bids.buffer,
                                        bmap.buffer, E, EL, bout.buffer);
  fuzz_check_status("moe_topk_reduce", st, ctx, false, true);
  fuzz_buffer_expect_unchanged(&bout, bout.need, "moe_topk_reduce", "out (past the need)");

#ifdef MOE_FUZZ_HAVE_REFERENCE
  /* Values: the float64 sum of the unmasked slots, within the rounding of
   * an fp32 sum of k terms and of bf16. */
  int32_t *slot_expert = malloc((size_t)slots * 4 + 4);
  double *ref = malloc((size_t)(T * H) * sizeof(double) + 8);
  double *mag = malloc((size_t)(T * H) * sizeof(double) + 8);
  FUZZ_CHECK(slot_expert && ref && mag, "out of host memory");
  for (int64_t s = 0; s < slots; ++s)
    slot_expert[s] = masked ? ref_local_expert(ids[s], map, E, EL) : 0;
  ref_topk_reduce(T, k, H, y, weighted ? w : NULL, slot_expert, ref, mag);
  uint16_t *out = fuzz_buffer_contents(&bout);
  for (int64_t i = 0; i < T * H; ++i) {
    const double lib = ref_bf16_to_double(out[i]);
    const double bound = ldexp(fabs(ref[i]), -8) + (k + 2) * ldexp(mag[i], -23) + 1e-30;
    FUZZ_CHECK(fabs(lib - ref[i]) <= bound,
               "moe_topk_reduce out[%lld][%lld] = %.9g, reference %.9g (T=%lld k=%d E=%d EL=%d)",
               (long long)(i / H), (long long)(i % H), lib, ref[i], (long long)T, k, E, EL);
  }
  free(out), free(slot_expert), free(ref), free(mag);
#endif

  free(ids), free(map), free(y), free(w);
  fuzz_buffer *all[] = {&by, &bw, &bids, &bmap, &bout};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; ++i)
    fuzz_buffer_free(all[i]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!ctx) {
    moe_status st = moe_context_create(MOE_BACKEND_CPU, 0, &ctx);
    FUZZ_CHECK(st == MOE_SUCCESS, "moe_context_create(CPU) failed: %s", moe_last_error(NULL));
  }
  fuzz_input in = {data, size, 0};
  if (fuzz_u8(&in) % 2 == 0)
    fuzz_gemm(&in);
  else
    fuzz_reduce(&in);
  return 0;
}
