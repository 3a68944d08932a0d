/*
 * test_reduce.c - moe_topk_reduce against the float64 reference: with and
 * without weights, masking by topk_ids + expert_map (masked rows of y hold
 * NaN, which must never be read), top_k up to 16, thousands of tokens, and
 * T = 0.
 */
#include "harness.h"

#include <math.h>
#include <stdlib.h>

/* Every test ends by releasing its contexts; leaks fail it (ASan builds). */
TestSuite(reduce, .fini = th_suite_fini);

typedef struct reduce_case {
  int64_t T;
  int32_t k;
  int64_t H;
  bool weighted;
  bool masked;          /* pass topk_ids + expert_map; non-local slots hold NaN rows */
  bool ids_without_map; /* pass topk_ids alone: nothing may be skipped */
  uint64_t seed;
} reduce_case;

static void reduce_on(moe_context *ctx, const reduce_case *c, const uint16_t *y,
                      const float *weights, const int32_t *ids, const int32_t *map, int32_t E,
                      int32_t EL, uint16_t *out) {
  const int64_t slots = c->T * c->k;
  const size_t out_bytes = (size_t)(c->T * c->H) * 2;
  moe_buffer *b_y = th_upload(ctx, y, (size_t)(slots * c->H) * 2);
  moe_buffer *b_w = weights ? th_upload(ctx, weights, (size_t)slots * 4) : NULL;
  moe_buffer *b_ids = ids ? th_upload(ctx, ids, (size_t)slots * 4) : NULL;
  moe_buffer *b_map = map ? th_upload(ctx, map, (size_t)E * 4) : NULL;
  moe_buffer *b_out = th_output(ctx, out_bytes);
  TH_OK(moe_topk_reduce(ctx, c->T, c->k, c->H, b_y, b_w, b_ids, b_map, E, EL, b_out));
  th_download(b_out, out, out_bytes);
  th_check_guard(b_out, out_bytes, "out");
  moe_buffer_destroy(b_y);
  moe_buffer_destroy(b_w);
  moe_buffer_destroy(b_ids);
  moe_buffer_destroy(b_map);
  moe_buffer_destroy(b_out);
}

static void reduce_case_run(const reduce_case *c) {
  th_case("reduce T=%lld k=%d H=%lld weighted=%d masked=%d ids_without_map=%d seed=%#llx",
          (long long)c->T, (int)c->k, (long long)c->H, c->weighted, c->masked, c->ids_without_map,
          (unsigned long long)c->seed);
  const int64_t slots = c->T * c->k;
  const int32_t E = 2 * c->k + 3, EL = c->k + 1;
  th_rng rng = th_rng_make(c->seed);
  uint16_t *y = th_malloc((size_t)(slots * c->H) * 2);
  th_fill_bf16(&rng, y, (size_t)(slots * c->H), 1.0);
  float *weights = NULL;
  if (c->weighted) {
    weights = th_malloc((size_t)slots * 4);
    for (int64_t s = 0; s < slots; ++s)
      weights[s] = (float)th_rng_uniform(&rng);
  }
  int32_t *ids = NULL, *map = NULL, *slot_expert = NULL;
  if (c->masked || c->ids_without_map) {
    ids = th_malloc((size_t)slots * 4);
    for (int64_t s = 0; s < slots; ++s)
      ids[s] = (int32_t)th_rng_below(&rng, E + 2) - 1;
  }
  if (c->masked) {
    map = th_malloc((size_t)E * 4);
    th_fill_expert_map(&rng, map, E, EL, TH_MAP_PARTIAL);
    slot_expert = th_malloc((size_t)slots * 4);
    for (int64_t s = 0; s < slots; ++s) {
      slot_expert[s] = ref_local_expert(ids[s], map, E, EL);
      if (slot_expert[s] < 0) /* never read: poison the row */
        for (int64_t h = 0; h < c->H; ++h)
          y[s * c->H + h] = 0x7fc0;
    }
  }
  uint16_t *out = th_malloc((size_t)(c->T * c->H) * 2);
  double *ref = th_malloc((size_t)(c->T * c->H) * sizeof(double));
  double *magnitude = th_malloc((size_t)(c->T * c->H) * sizeof(double));
  reduce_on(th_ctx(), c, y, weights, ids, map, E, EL, out);
  ref_topk_reduce(c->T, c->k, c->H, y, weights, slot_expert, ref, magnitude);
  th_check_bf16_close(out, ref, magnitude, c->T, c->H, c->k, "out");
  if (th_cpu_ctx()) {
    uint16_t *cpu = th_malloc((size_t)(c->T * c->H) * 2);
    reduce_on(th_cpu_ctx(), c, y, weights, ids, map, E, EL, cpu);
    th_check_agree(out, cpu, (size_t)(c->T * c->H), 1e-2, "out");
    free(cpu);
  }
  free(y);
  free(weights);
  free(ids);
  free(map);
  free(slot_expert);
  free(out);
  free(ref);
  free(magnitude);
}

Test(reduce, weighted) {
  reduce_case_run(&(reduce_case){.T = 33, .k = 4, .H = 300, .weighted = true, .seed = 0x501});
}

Test(reduce, weights_already_applied) {
  reduce_case_run(&(reduce_case){.T = 7, .k = 2, .H = 67, .seed = 0x502});
}

Test(reduce, expert_map_masks_slots) {
  reduce_case_run(
      &(reduce_case){.T = 33, .k = 4, .H = 129, .weighted = true, .masked = true, .seed = 0x503});
  reduce_case_run(&(reduce_case){.T = 33, .k = 4, .H = 129, .masked = true, .seed = 0x504});
}

Test(reduce, ids_without_map_skip_nothing) {
  reduce_case_run(&(reduce_case){
      .T = 9, .k = 3, .H = 40, .weighted = true, .ids_without_map = true, .seed = 0x505});
}

Test(reduce, top16_one_token) {
  reduce_case_run(&(reduce_case){.T = 1, .k = 16, .H = 129, .weighted = true, .seed = 0x506});
  reduce_case_run(&(reduce_case){.T = 2, .k = 1, .H = 1, .weighted = true, .seed = 0x507});
}

Test(reduce, thousands_of_tokens) {
  reduce_case_run(&(reduce_case){.T = 2053, .k = 8, .H = 256, .weighted = true, .seed = 0x508});
}

Test(reduce, zero_tokens_is_a_no_op) {
  th_case("reduce T=0 k=2 H=16");
  moe_context *ctx = th_ctx();
  moe_buffer *y = th_output(ctx, 0), *out = th_output(ctx, 0);
  TH_OK(moe_topk_reduce(ctx, 0, 2, 16, y, NULL, NULL, NULL, 0, 0, out));
  th_check_untouched(out, "out");
  moe_buffer_destroy(y);
  moe_buffer_destroy(out);
}
