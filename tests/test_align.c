/*
 * test_align.c - moe_align and moe_align_capacity against ref_align, byte
 * for byte over the whole capacity: every block_m, expert maps with -1
 * entries, ids outside the expert range, empty experts, every slot on one
 * expert, E from 1 to 512, thousands of tokens, and T = 0.
 */
#include "harness.h"

#include <stdlib.h>
#include <string.h>

/* Every test ends by releasing its contexts; leaks fail it (ASan builds). */
TestSuite(align, .fini = th_suite_fini);

typedef struct align_case {
  int64_t T;
  int32_t k, E, EL, block_m;
  const int32_t *ids; /* [T*k] */
  const int32_t *map; /* [E] or NULL */
} align_case;

/* Runs align on ctx; returns sorted ids, expert ids and the padded count. */
static void align_on(moe_context *ctx, const align_case *c, int32_t *sorted, int32_t *blocks,
                     int32_t *padded) {
  int64_t sorted_capacity, block_capacity;
  TH_OK(moe_align_capacity(c->T, c->k, c->EL, c->block_m, &sorted_capacity, &block_capacity));
  int64_t want_sorted, want_blocks;
  ref_align_capacity(c->T, c->k, c->EL, c->block_m, &want_sorted, &want_blocks);
  TH_ASSERT(sorted_capacity == want_sorted && block_capacity == want_blocks,
            "moe_align_capacity = %lld, %lld; want %lld, %lld", (long long)sorted_capacity,
            (long long)block_capacity, (long long)want_sorted, (long long)want_blocks);
  const size_t sorted_bytes = (size_t)sorted_capacity * 4, block_bytes = (size_t)block_capacity * 4;
  moe_buffer *b_ids = th_upload(ctx, c->ids, (size_t)(c->T * c->k) * 4);
  moe_buffer *b_map = c->map ? th_upload(ctx, c->map, (size_t)c->E * 4) : NULL;
  moe_buffer *b_sorted = th_output(ctx, sorted_bytes);
  moe_buffer *b_blocks = th_output(ctx, block_bytes);
  moe_buffer *b_padded = th_output(ctx, 4);
  TH_OK(moe_align(ctx, c->T, c->k, c->E, c->EL, c->block_m, b_ids, b_map, b_sorted, b_blocks,
                  b_padded));
  th_download(b_sorted, sorted, sorted_bytes);
  th_download(b_blocks, blocks, block_bytes);
  th_download(b_padded, padded, 4);
  th_check_guard(b_sorted, sorted_bytes, "sorted_token_ids");
  th_check_guard(b_blocks, block_bytes, "expert_ids");
  th_check_guard(b_padded, 4, "num_tokens_post_padded");
  moe_buffer_destroy(b_ids);
  moe_buffer_destroy(b_map);
  moe_buffer_destroy(b_sorted);
  moe_buffer_destroy(b_blocks);
  moe_buffer_destroy(b_padded);
}

static void compare_exact(const int32_t *got, const int32_t *want, int64_t count,
                          const char *what) {
  for (int64_t i = 0; i < count; ++i)
    TH_ASSERT(got[i] == want[i], "%s[%lld] = %d, reference %d (of %lld entries)", what,
              (long long)i, (int)got[i], (int)want[i], (long long)count);
}

/* Align on the backend under test equals ref_align bit for bit. */
static void check_align(const align_case *c, uint64_t seed) {
  th_case("align T=%lld k=%d E=%d EL=%d block_m=%d map=%s seed=%#llx", (long long)c->T, (int)c->k,
          (int)c->E, (int)c->EL, (int)c->block_m, c->map ? "yes" : "no", (unsigned long long)seed);
  int64_t sorted_capacity, block_capacity;
  ref_align_capacity(c->T, c->k, c->EL, c->block_m, &sorted_capacity, &block_capacity);
  int32_t *sorted = th_malloc((size_t)sorted_capacity * 4 + 4);
  int32_t *blocks = th_malloc((size_t)block_capacity * 4 + 4);
  int32_t *want_sorted = th_malloc((size_t)sorted_capacity * 4 + 4);
  int32_t *want_blocks = th_malloc((size_t)block_capacity * 4 + 4);
  int32_t padded, want_padded;
  align_on(th_ctx(), c, sorted, blocks, &padded);
  ref_align(c->T, c->k, c->E, c->EL, c->block_m, c->ids, c->map, want_sorted, want_blocks,
            &want_padded);
  TH_ASSERT(padded == want_padded, "num_tokens_post_padded = %d, reference %d", (int)padded,
            (int)want_padded);
  compare_exact(sorted, want_sorted, sorted_capacity, "sorted_token_ids");
  compare_exact(blocks, want_blocks, block_capacity, "expert_ids");
  free(sorted);
  free(blocks);
  free(want_sorted);
  free(want_blocks);
}

/* Random router ids in [0, E), distinct per token (as routing makes them). */
static int32_t *random_ids(th_rng *rng, int64_t T, int32_t k, int32_t E) {
  int32_t *ids = th_malloc((size_t)(T * k) * 4 + 4);
  for (int64_t t = 0; t < T; ++t)
    for (int32_t j = 0; j < k; ++j) {
      int32_t id;
      bool repeated;
      do {
        id = (int32_t)th_rng_below(rng, E);
        repeated = false;
        for (int32_t i = 0; i < j; ++i)
          repeated = repeated || ids[t * k + i] == id;
      } while (repeated);
      ids[t * k + j] = id;
    }
  return ids;
}

Test(align, every_block_m) {
  th_rng rng = th_rng_make(0x201);
  int32_t *ids = random_ids(&rng, 33, 4, 16);
  for (int32_t block_m = 1; block_m <= MOE_MAX_BLOCK_M; block_m *= 2)
    check_align(&(align_case){33, 4, 16, 16, block_m, ids, NULL}, 0x201);
  free(ids);
}

Test(align, expert_map_with_non_local_experts) {
  th_rng rng = th_rng_make(0x202);
  int32_t *ids = random_ids(&rng, 100, 6, 64);
  int32_t map[64];
  th_fill_expert_map(&rng, map, 64, 20, TH_MAP_PARTIAL);
  check_align(&(align_case){100, 6, 64, 20, 16, ids, map}, 0x202);
  check_align(&(align_case){100, 6, 64, 20, 1, ids, map}, 0x202);
  /* A map onto fewer local experts, two router ids per local expert. */
  for (int e = 0; e < 64; ++e)
    map[e] = e % 3 == 0 ? -1 : e % 5;
  check_align(&(align_case){100, 6, 64, 5, 8, ids, map}, 0x202);
  /* No expert is local: nothing is sorted. */
  th_fill_expert_map(&rng, map, 64, 20, TH_MAP_NO_LOCAL);
  check_align(&(align_case){100, 6, 64, 20, 32, ids, map}, 0x202);
  free(ids);
}

Test(align, ids_outside_the_expert_range_are_skipped) {
  th_rng rng = th_rng_make(0x203);
  int32_t *ids = random_ids(&rng, 40, 2, 8);
  const int32_t odd[] = {-1, 8, 1000, INT32_MIN, INT32_MAX, -7};
  for (int i = 0; i < 40 * 2; i += 5)
    ids[i] = odd[(i / 5) % 6];
  check_align(&(align_case){40, 2, 8, 8, 4, ids, NULL}, 0x203);
  int32_t map[8] = {3, -1, 0, 1, 2, -1, 4, 5};
  check_align(&(align_case){40, 2, 8, 6, 4, ids, map}, 0x203);
  free(ids);
}

Test(align, empty_experts_and_every_slot_on_one_expert) {
  int32_t ids[64];
  for (int i = 0; i < 64; ++i)
    ids[i] = 5;
  check_align(&(align_case){64, 1, 8, 8, 16, ids, NULL}, 0);
  check_align(&(align_case){64, 1, 8, 8, 1, ids, NULL}, 0);
  check_align(&(align_case){64, 1, 8, 8, 256, ids, NULL}, 0);
  for (int i = 0; i < 64; ++i)
    ids[i] = i % 2 ? 7 : 0; /* only the first and last */
  check_align(&(align_case){32, 2, 8, 8, 16, ids, NULL}, 0);
}

Test(align, one_expert_one_token) {
  const int32_t ids[1] = {0};
  for (int32_t block_m = 1; block_m <= MOE_MAX_BLOCK_M; block_m *= 16)
    check_align(&(align_case){1, 1, 1, 1, block_m, ids, NULL}, 0);
}

Test(align, e512_top16) {
  th_rng rng = th_rng_make(0x205);
  int32_t *ids = random_ids(&rng, 33, 16, 512);
  check_align(&(align_case){33, 16, 512, 512, 64, ids, NULL}, 0x205);
  check_align(&(align_case){33, 16, 512, 512, 1, ids, NULL}, 0x205);
  free(ids);
}

Test(align, thousands_of_tokens) {
  th_rng rng = th_rng_make(0x206);
  int32_t *ids = random_ids(&rng, 4099, 8, 256);
  check_align(&(align_case){4099, 8, 256, 256, 64, ids, NULL}, 0x206);
  check_align(&(align_case){4099, 8, 256, 256, 16, ids, NULL}, 0x206);
  free(ids);
}

Test(align, zero_tokens) {
  /* T = 0 still writes the padding layout of an empty sort. */
  check_align(&(align_case){0, 4, 16, 16, 16, NULL, NULL}, 0);
}

Test(align, routed_ids) {
  /* The pipeline's own ids: route, then align what routing produced. */
  moe_config cfg = th_config(64, 64, 64, 6);
  cfg.renormalize = 1;
  th_rng rng = th_rng_make(0x208);
  const int64_t T = 257;
  float *logits = th_malloc(sizeof(float) * T * 64);
  th_fill_logits(&rng, logits, T, 64, 6, TH_LOGITS_NORMAL);
  moe_context *ctx = th_ctx();
  moe_buffer *b_logits = th_upload(ctx, logits, sizeof(float) * T * 64);
  moe_buffer *b_ids = th_output(ctx, (size_t)T * 6 * 4);
  moe_buffer *b_weights = th_output(ctx, (size_t)T * 6 * 4);
  th_case("route+align T=%lld %s seed=0x208", (long long)T, th_config_text(&cfg));
  TH_OK(moe_route(ctx, &cfg, T, b_logits, NULL, b_ids, b_weights));
  int32_t *ids = th_malloc((size_t)T * 6 * 4);
  th_download(b_ids, ids, (size_t)T * 6 * 4);
  check_align(&(align_case){T, 6, 64, 64, 16, ids, NULL}, 0x208);
  free(ids);
  free(logits);
  moe_buffer_destroy(b_logits);
  moe_buffer_destroy(b_ids);
  moe_buffer_destroy(b_weights);
}
