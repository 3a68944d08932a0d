/*
 * test_gemm.c - moe_grouped_gemm over align's metadata against the float64
 * reference: both inputs (per token / per slot), both weight layouts, bias,
 * routed weight before and after the bias, every block_m, expert maps that
 * skip slots (their rows must stay untouched), empty experts, one expert,
 * sizes that are multiples of no tile, E up to 512, thousands of slots.
 */
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Every test ends by releasing its contexts; leaks fail it (ASan builds). */
TestSuite(gemm, .fini = th_suite_fini);

typedef enum ids_kind {
  IDS_RANDOM = 0, /* distinct per token, uniform */
  IDS_ONE_SET,    /* every token on the same experts: the others are empty */
  IDS_EVEN,       /* only even experts: half of them are empty */
} ids_kind;

typedef struct gemm_case {
  int64_t T;
  int32_t k, E, EL; /* router width, local experts (EL < E needs a map) */
  int64_t n, K;
  int32_t block_m;
  moe_weight_layout layout;
  moe_gemm_input input;
  moe_gemm_routed_weight routed;
  bool bias;
  th_map_kind map;
  ids_kind ids;
  uint64_t seed;
} gemm_case;

/* Host data of a case. */
typedef struct gemm_data {
  moe_gemm_desc desc;
  int32_t *ids, *map, *slot_expert;
  uint16_t *a, *b;
  float *bias, *weights;
  size_t a_bytes, b_bytes, c_bytes;
} gemm_data;

static void make_ids(th_rng *rng, int32_t *ids, int64_t T, int32_t k, int32_t E, ids_kind kind) {
  for (int64_t t = 0; t < T; ++t)
    for (int32_t j = 0; j < k; ++j) {
      int32_t id = 0;
      bool repeated = true;
      while (repeated) {
        if (kind == IDS_ONE_SET)
          id = (3 + j) % E;
        else if (kind == IDS_EVEN)
          id = 2 * (int32_t)th_rng_below(rng, (E + 1) / 2);
        else
          id = (int32_t)th_rng_below(rng, E);
        repeated = false;
        for (int32_t i = 0; i < j && kind != IDS_ONE_SET; ++i)
          repeated = repeated || ids[t * k + i] == id;
        /* Too few even experts for distinct ids: allow repeats. */
        if (kind == IDS_EVEN && (E + 1) / 2 < k) repeated = false;
      }
      ids[t * k + j] = id;
    }
}

static void gemm_data_make(gemm_data *d, const gemm_case *c) {
  static const char *routed_names[] = {"none", "before_bias", "after_bias"};
  memset(d, 0, sizeof *d);
  const int32_t EL = c->map == TH_MAP_NONE ? c->E : c->EL;
  d->desc = (moe_gemm_desc){
      .num_tokens = c->T,
      .top_k = c->k,
      .num_local_experts = EL,
      .n = c->n,
      .k = c->K,
      .block_m = c->block_m,
      .b_layout = c->layout,
      .input = c->input,
      .routed_weight = c->routed,
  };
  const int64_t slots = c->T * c->k;
  const int64_t a_rows = c->input == MOE_GEMM_INPUT_PER_TOKEN ? c->T : slots;
  th_rng rng = th_rng_make(c->seed);
  d->ids = th_malloc((size_t)slots * 4);
  make_ids(&rng, d->ids, c->T, c->k, c->E, c->ids);
  if (c->map != TH_MAP_NONE) {
    d->map = th_malloc((size_t)c->E * 4);
    th_fill_expert_map(&rng, d->map, c->E, EL, c->map);
  }
  d->slot_expert = th_malloc((size_t)slots * 4);
  for (int64_t s = 0; s < slots; ++s)
    d->slot_expert[s] = ref_local_expert(d->ids[s], d->map, c->E, EL);
  d->a_bytes = (size_t)(a_rows * c->K) * 2;
  d->b_bytes = (size_t)(EL * c->n * c->K) * 2;
  d->c_bytes = (size_t)(slots * c->n) * 2;
  d->a = th_malloc(d->a_bytes);
  d->b = th_malloc(d->b_bytes);
  th_fill_bf16(&rng, d->a, (size_t)(a_rows * c->K), 1.0);
  th_fill_bf16(&rng, d->b, (size_t)(EL * c->n * c->K), 1.0 / sqrt((double)c->K));
  if (c->bias) {
    d->bias = th_malloc((size_t)(EL * c->n) * 4);
    th_fill_f32(&rng, d->bias, (size_t)(EL * c->n), 0.5);
  }
  d->weights = th_malloc((size_t)slots * 4);
  for (int64_t s = 0; s < slots; ++s)
    d->weights[s] = (float)th_rng_uniform(&rng);
  th_case("gemm T=%lld k=%d E=%d EL=%d n=%lld K=%lld block_m=%d layout=%s input=%s routed=%s "
          "bias=%d map=%d ids=%d seed=%#llx",
          (long long)c->T, (int)c->k, (int)c->E, (int)EL, (long long)c->n, (long long)c->K,
          (int)c->block_m, c->layout == MOE_WEIGHT_LAYOUT_OUT_IN ? "out_in" : "in_out",
          c->input == MOE_GEMM_INPUT_PER_TOKEN ? "per_token" : "per_slot", routed_names[c->routed],
          c->bias, (int)c->map, (int)c->ids, (unsigned long long)c->seed);
}

static void gemm_data_free(gemm_data *d) {
  free(d->ids);
  free(d->map);
  free(d->slot_expert);
  free(d->a);
  free(d->b);
  free(d->bias);
  free(d->weights);
}

/* Align + grouped GEMM on ctx. The align metadata must equal ref_align.
 * Returns the GEMM's status (UNSUPPORTED is the caller's to report); on
 * success c receives the output and skipped rows are checked untouched. */
static moe_status gemm_on(moe_context *ctx, const gemm_case *c, const gemm_data *d, uint16_t *out) {
  const moe_gemm_desc *desc = &d->desc;
  const int64_t slots = c->T * c->k;
  int64_t sorted_capacity, block_capacity;
  TH_OK(moe_align_capacity(c->T, c->k, desc->num_local_experts, c->block_m, &sorted_capacity,
                           &block_capacity));
  moe_buffer *b_ids = th_upload(ctx, d->ids, (size_t)slots * 4);
  moe_buffer *b_map = d->map ? th_upload(ctx, d->map, (size_t)c->E * 4) : NULL;
  moe_buffer *b_sorted = th_output(ctx, (size_t)sorted_capacity * 4);
  moe_buffer *b_blocks = th_output(ctx, (size_t)block_capacity * 4);
  moe_buffer *b_padded = th_output(ctx, 4);
  TH_OK(moe_align(ctx, c->T, c->k, c->E, desc->num_local_experts, c->block_m, b_ids, b_map,
                  b_sorted, b_blocks, b_padded));
  {
    int32_t *sorted = th_malloc((size_t)sorted_capacity * 4);
    int32_t *want = th_malloc((size_t)sorted_capacity * 4);
    int32_t *blocks = th_malloc((size_t)block_capacity * 4);
    int32_t *want_blocks = th_malloc((size_t)block_capacity * 4);
    int32_t padded, want_padded;
    th_download(b_sorted, sorted, (size_t)sorted_capacity * 4);
    th_download(b_blocks, blocks, (size_t)block_capacity * 4);
    th_download(b_padded, &padded, 4);
    ref_align(c->T, c->k, c->E, desc->num_local_experts, c->block_m, d->ids, d->map, want,
              want_blocks, &want_padded);
    TH_ASSERT(padded == want_padded && memcmp(sorted, want, (size_t)sorted_capacity * 4) == 0 &&
                  memcmp(blocks, want_blocks, (size_t)block_capacity * 4) == 0,
              "align metadata differs from ref_align on %s",
              moe_backend_name(moe_context_backend(ctx)));
    free(sorted);
    free(want);
    free(blocks);
    free(want_blocks);
  }
  moe_buffer *b_a = th_upload(ctx, d->a, d->a_bytes);
  moe_buffer *b_b = th_upload(ctx, d->b, d->b_bytes);
  moe_buffer *b_bias =
      d->bias ? th_upload(ctx, d->bias, (size_t)(desc->num_local_experts * c->n) * 4) : NULL;
  moe_buffer *b_weights = th_upload(ctx, d->weights, (size_t)slots * 4);
  moe_buffer *b_c = th_output(ctx, d->c_bytes);
  moe_status status =
      moe_grouped_gemm(ctx, desc, b_a, b_b, b_bias, b_sorted, b_blocks, b_padded, b_weights, b_c);
  if (status == MOE_SUCCESS) {
    th_download(b_c, out, d->c_bytes);
    th_check_guard(b_c, d->c_bytes, "c");
    for (int64_t s = 0; s < slots; ++s) {
      if (d->slot_expert[s] >= 0) continue;
      const uint8_t *row = (const uint8_t *)(out + s * c->n);
      for (int64_t i = 0; i < c->n * 2; ++i)
        TH_ASSERT(row[i] == TH_FILL_BYTE,
                  "c row %lld belongs to a skipped slot but byte %lld was written", (long long)s,
                  (long long)i);
    }
  }
  moe_buffer *buffers[] = {b_ids, b_map, b_sorted, b_blocks,  b_padded,
                           b_a,   b_b,   b_bias,   b_weights, b_c};
  for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; ++i)
    moe_buffer_destroy(buffers[i]);
  return status;
}

/* Runs a case and checks it; returns false when the backend declined it
 * (MOE_ERROR_UNSUPPORTED), so that sweeps can report every declined case. */
static bool try_gemm_case(const gemm_case *c) {
  gemm_data d;
  gemm_data_make(&d, c);
  const int64_t slots = c->T * c->k;
  uint16_t *out = th_malloc(d.c_bytes);
  moe_status status = gemm_on(th_ctx(), c, &d, out);
  if (status == MOE_ERROR_UNSUPPORTED) {
    free(out);
    gemm_data_free(&d);
    return false;
  }
  TH_OK(status);
  double *ref = th_malloc((size_t)(slots * c->n) * sizeof(double));
  double *magnitude = th_malloc((size_t)(slots * c->n) * sizeof(double));
  ref_grouped_gemm(&d.desc, d.a, d.b, d.bias, d.slot_expert, d.weights, ref, magnitude);
  th_check_bf16_close(out, ref, magnitude, slots, c->n, c->K, "c");
  if (th_cpu_ctx()) {
    uint16_t *cpu = th_malloc(d.c_bytes);
    TH_OK(gemm_on(th_cpu_ctx(), c, &d, cpu));
    th_check_agree(out, cpu, (size_t)(slots * c->n), 1e-2, "c");
    free(cpu);
  }
  free(ref);
  free(magnitude);
  free(out);
  gemm_data_free(&d);
  return true;
}

static void gemm_case_run(const gemm_case *c) {
  if (!try_gemm_case(c))
    cr_skip_test("not supported on %s: grouped GEMM declined block_m=%d n=%lld K=%lld",
                 th_backend_name(), (int)c->block_m, (long long)c->n, (long long)c->K);
}

Test(gemm, gemm1_per_token_out_in) {
  gemm_case_run(&(gemm_case){.T = 33,
                             .k = 2,
                             .E = 8,
                             .n = 258,
                             .K = 67,
                             .block_m = 16,
                             .input = MOE_GEMM_INPUT_PER_TOKEN,
                             .seed = 0x301});
}

Test(gemm, gemm2_per_slot_in_out_weight_after_bias) {
  gemm_case_run(&(gemm_case){.T = 33,
                             .k = 4,
                             .E = 16,
                             .n = 67,
                             .K = 129,
                             .block_m = 32,
                             .layout = MOE_WEIGHT_LAYOUT_IN_OUT,
                             .input = MOE_GEMM_INPUT_PER_SLOT,
                             .routed = MOE_GEMM_ROUTED_WEIGHT_AFTER_BIAS,
                             .bias = true,
                             .seed = 0x302});
}

Test(gemm, weight_before_bias) {
  gemm_case_run(&(gemm_case){.T = 7,
                             .k = 2,
                             .E = 4,
                             .n = 130,
                             .K = 300,
                             .block_m = 16,
                             .input = MOE_GEMM_INPUT_PER_TOKEN,
                             .routed = MOE_GEMM_ROUTED_WEIGHT_BEFORE_BIAS,
                             .bias = true,
                             .seed = 0x303});
  gemm_case_run(&(gemm_case){.T = 7,
                             .k = 2,
                             .E = 4,
                             .n = 130,
                             .K = 300,
                             .block_m = 16,
                             .layout = MOE_WEIGHT_LAYOUT_IN_OUT,
                             .input = MOE_GEMM_INPUT_PER_SLOT,
                             .routed = MOE_GEMM_ROUTED_WEIGHT_BEFORE_BIAS,
                             .bias = true,
                             .seed = 0x304});
}

Test(gemm, bias_without_routed_weight) {
  gemm_case_run(&(gemm_case){.T = 9,
                             .k = 3,
                             .E = 6,
                             .n = 77,
                             .K = 45,
                             .block_m = 8,
                             .layout = MOE_WEIGHT_LAYOUT_IN_OUT,
                             .input = MOE_GEMM_INPUT_PER_TOKEN,
                             .bias = true,
                             .seed = 0x305});
}

Test(gemm, every_block_m) {
  char declined[256] = "";
  for (int32_t block_m = 1; block_m <= MOE_MAX_BLOCK_M; block_m *= 2) {
    const gemm_case c = {.T = 33,
                         .k = 2,
                         .E = 8,
                         .n = 40,
                         .K = 33,
                         .block_m = block_m,
                         .input = MOE_GEMM_INPUT_PER_TOKEN,
                         .routed = MOE_GEMM_ROUTED_WEIGHT_AFTER_BIAS,
                         .bias = true,
                         .seed = 0x306};
    if (!try_gemm_case(&c))
      snprintf(declined + strlen(declined), sizeof declined - strlen(declined), " %d",
               (int)block_m);
  }
  if (*declined)
    cr_skip_test("not supported on %s: block_m%s (every other block_m passed)", th_backend_name(),
                 declined);
}

Test(gemm, expert_map_skips_slots) {
  gemm_case_run(&(gemm_case){.T = 33,
                             .k = 4,
                             .E = 16,
                             .EL = 6,
                             .n = 67,
                             .K = 64,
                             .block_m = 16,
                             .input = MOE_GEMM_INPUT_PER_TOKEN,
                             .map = TH_MAP_PARTIAL,
                             .seed = 0x307});
  gemm_case_run(&(gemm_case){.T = 33,
                             .k = 4,
                             .E = 16,
                             .EL = 6,
                             .n = 67,
                             .K = 64,
                             .block_m = 16,
                             .input = MOE_GEMM_INPUT_PER_SLOT,
                             .map = TH_MAP_NO_LOCAL,
                             .routed = MOE_GEMM_ROUTED_WEIGHT_AFTER_BIAS,
                             .seed = 0x308});
}

Test(gemm, one_expert_set_and_empty_experts) {
  gemm_case_run(&(gemm_case){.T = 65,
                             .k = 1,
                             .E = 8,
                             .n = 96,
                             .K = 80,
                             .block_m = 16,
                             .input = MOE_GEMM_INPUT_PER_TOKEN,
                             .ids = IDS_ONE_SET,
                             .seed = 0x309});
  gemm_case_run(&(gemm_case){.T = 40,
                             .k = 3,
                             .E = 10,
                             .n = 50,
                             .K = 70,
                             .block_m = 32,
                             .input = MOE_GEMM_INPUT_PER_SLOT,
                             .ids = IDS_EVEN,
                             .routed = MOE_GEMM_ROUTED_WEIGHT_AFTER_BIAS,
                             .seed = 0x30a});
}

Test(gemm, one_token_one_expert) {
  gemm_case_run(&(gemm_case){.T = 1,
                             .k = 1,
                             .E = 1,
                             .n = 300,
                             .K = 300,
                             .block_m = 16,
                             .input = MOE_GEMM_INPUT_PER_TOKEN,
                             .seed = 0x30b});
  gemm_case_run(&(gemm_case){.T = 2,
                             .k = 1,
                             .E = 1,
                             .n = 1,
                             .K = 1,
                             .block_m = 1,
                             .input = MOE_GEMM_INPUT_PER_SLOT,
                             .seed = 0x30c});
}

Test(gemm, e512_top16) {
  gemm_case_run(&(gemm_case){.T = 33,
                             .k = 16,
                             .E = 512,
                             .n = 48,
                             .K = 40,
                             .block_m = 16,
                             .input = MOE_GEMM_INPUT_PER_TOKEN,
                             .seed = 0x30d});
}

Test(gemm, thousands_of_slots) {
  gemm_case_run(&(gemm_case){.T = 1031,
                             .k = 4,
                             .E = 16,
                             .n = 96,
                             .K = 128,
                             .block_m = 64,
                             .input = MOE_GEMM_INPUT_PER_TOKEN,
                             .seed = 0x30e});
  gemm_case_run(&(gemm_case){.T = 1031,
                             .k = 4,
                             .E = 16,
                             .n = 128,
                             .K = 48,
                             .block_m = 64,
                             .layout = MOE_WEIGHT_LAYOUT_IN_OUT,
                             .input = MOE_GEMM_INPUT_PER_SLOT,
                             .routed = MOE_GEMM_ROUTED_WEIGHT_AFTER_BIAS,
                             .bias = true,
                             .seed = 0x30f});
}

Test(gemm, zero_tokens_is_a_no_op) {
  th_case("gemm T=0 k=2 EL=4 n=16 K=16 block_m=16");
  moe_context *ctx = th_ctx();
  const moe_gemm_desc desc = {
      .num_tokens = 0, .top_k = 2, .num_local_experts = 4, .n = 16, .k = 16, .block_m = 16};
  int64_t sorted_capacity, block_capacity;
  TH_OK(moe_align_capacity(0, 2, 4, 16, &sorted_capacity, &block_capacity));
  moe_buffer *a = th_output(ctx, 0), *b = th_output(ctx, 4 * 16 * 16 * 2);
  moe_buffer *sorted = th_output(ctx, (size_t)sorted_capacity * 4);
  moe_buffer *blocks = th_output(ctx, (size_t)block_capacity * 4);
  moe_buffer *padded = th_output(ctx, 4), *c = th_output(ctx, 0);
  TH_OK(moe_grouped_gemm(ctx, &desc, a, b, NULL, sorted, blocks, padded, NULL, c));
  th_check_untouched(c, "c");
  moe_buffer *buffers[] = {a, b, sorted, blocks, padded, c};
  for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; ++i)
    moe_buffer_destroy(buffers[i]);
}
