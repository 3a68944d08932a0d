/*
 * test_pipeline.c - the stage functions composed by hand into a whole MoE
 * layer (route -> align -> GEMM1 -> activation -> GEMM2 -> reduce, as an
 * engine that builds its own pipeline would), checked against the float64
 * layer reference and against moe_layer_forward on the same backend.
 */
#include "harness.h"

#include <stdlib.h>

/* Every test ends by releasing its contexts; leaks fail it (ASan builds). */
TestSuite(pipeline, .fini = th_suite_fini);

static void pipeline_case(const th_layer_spec *spec, int32_t block_m) {
  th_layer_data d;
  th_layer_data_make(&d, spec);
  const moe_config *cfg = &d.cfg;
  const int64_t T = d.num_tokens, H = cfg->hidden_size, I = cfg->intermediate_size;
  const int32_t E = cfg->num_experts, k = cfg->top_k;
  const int32_t EL = cfg->num_local_experts ? cfg->num_local_experts : E;
  const bool on_input = cfg->router_weight == MOE_ROUTER_WEIGHT_ON_INPUT;
  const int64_t slots = T * k;
  moe_context *ctx = th_ctx();

  moe_buffer *x = th_upload(ctx, d.x, (size_t)(T * H) * 2);
  moe_buffer *logits = th_upload(ctx, d.logits, (size_t)(T * E) * 4);
  moe_buffer *bias = d.correction_bias ? th_upload(ctx, d.correction_bias, (size_t)E * 4) : NULL;
  moe_buffer *map = d.expert_map ? th_upload(ctx, d.expert_map, (size_t)E * 4) : NULL;
  moe_buffer *w13 = th_upload(ctx, d.w13, (size_t)(EL * 2 * I * H) * 2);
  moe_buffer *w2 = th_upload(ctx, d.w2, (size_t)(EL * H * I) * 2);
  moe_buffer *b13 = d.w13_bias ? th_upload(ctx, d.w13_bias, (size_t)(EL * 2 * I) * 4) : NULL;
  moe_buffer *b2 = d.w2_bias ? th_upload(ctx, d.w2_bias, (size_t)(EL * H) * 4) : NULL;
  moe_buffer *ids = th_output(ctx, (size_t)slots * 4), *weights = th_output(ctx, (size_t)slots * 4);
  int64_t cap, blocks_cap;
  TH_OK(moe_align_capacity(T, k, EL, block_m, &cap, &blocks_cap));
  moe_buffer *sorted = th_output(ctx, (size_t)cap * 4);
  moe_buffer *blocks = th_output(ctx, (size_t)blocks_cap * 4);
  moe_buffer *padded = th_output(ctx, 4);
  moe_buffer *gu = th_output(ctx, (size_t)(slots * 2 * I) * 2);
  moe_buffer *h = th_output(ctx, (size_t)(slots * I) * 2);
  moe_buffer *y = th_output(ctx, (size_t)(slots * H) * 2);
  moe_buffer *out = th_output(ctx, (size_t)(T * H) * 2);

  TH_OK(moe_route(ctx, cfg, T, logits, bias, ids, weights));
  TH_OK(moe_align(ctx, T, k, E, EL, block_m, ids, map, sorted, blocks, padded));
  moe_gemm_desc gemm1 = {.num_tokens = T,
                         .top_k = k,
                         .num_local_experts = EL,
                         .n = 2 * I,
                         .k = H,
                         .block_m = block_m,
                         .b_layout = cfg->weight_layout,
                         .input = MOE_GEMM_INPUT_PER_TOKEN,
                         .routed_weight = on_input ? MOE_GEMM_ROUTED_WEIGHT_BEFORE_BIAS
                                                   : MOE_GEMM_ROUTED_WEIGHT_NONE};
  TH_OK(moe_grouped_gemm(ctx, &gemm1, x, w13, b13, sorted, blocks, padded, weights, gu));
  TH_OK(moe_activation_apply(ctx, cfg->activation, cfg->swiglu_alpha, cfg->swiglu_limit, slots, I,
                             gu, h));
  moe_gemm_desc gemm2 = gemm1;
  gemm2.n = H;
  gemm2.k = I;
  gemm2.input = MOE_GEMM_INPUT_PER_SLOT;
  gemm2.routed_weight = on_input ? MOE_GEMM_ROUTED_WEIGHT_NONE : MOE_GEMM_ROUTED_WEIGHT_AFTER_BIAS;
  TH_OK(moe_grouped_gemm(ctx, &gemm2, h, w2, b2, sorted, blocks, padded, weights, y));
  TH_OK(moe_topk_reduce(ctx, T, k, H, y, NULL, ids, map, E, EL, out));
  th_check_guard(out, (size_t)(T * H) * 2, "out");

  uint16_t *result = th_malloc((size_t)(T * H) * 2);
  th_download(out, result, (size_t)(T * H) * 2);
  double *ref = th_malloc((size_t)(T * H) * sizeof(double));
  ref_layer_forward(cfg, &d.weights, T, d.x, d.logits, true, ref);
  const double err = th_rel_error(result, ref, (size_t)(T * H));
  TH_ASSERT(err <= 1e-2, "stage pipeline: relative Frobenius error %.3g vs float64 > 1e-2", err);

  /* The fused layer of the same backend gives the same answer. */
  uint16_t *fused = th_malloc((size_t)(T * H) * 2);
  moe_layer *layer = NULL;
  TH_OK(moe_layer_create(ctx, cfg, &d.weights, &layer));
  TH_OK(moe_layer_reserve(layer, T));
  th_refill(out);
  TH_OK(moe_layer_forward(layer, T, x, logits, out));
  th_download(out, fused, (size_t)(T * H) * 2);
  th_check_agree(result, fused, (size_t)(T * H), 1e-2, "stage pipeline vs moe_layer_forward");
  moe_layer_destroy(layer);

  moe_buffer *buffers[] = {x,       logits, bias,   map,    w13, w2, b13, b2, ids,
                           weights, sorted, blocks, padded, gu,  h,  y,   out};
  for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; ++i)
    moe_buffer_destroy(buffers[i]);
  free(result);
  free(ref);
  free(fused);
  th_layer_data_free(&d);
}

static th_layer_spec pipeline_spec(int64_t T, int64_t H, int64_t I, int32_t E, int32_t k,
                                   uint64_t seed) {
  th_layer_spec s = {.num_tokens = T, .seed = seed};
  s.cfg = th_config(H, I, E, k);
  s.cfg.renormalize = 1;
  return s;
}

Test(pipeline, mixtral_like) {
  th_layer_spec s = pipeline_spec(33, 67, 129, 8, 2, 0x801);
  pipeline_case(&s, 16);
}

Test(pipeline, deepseek_v3_like_with_expert_map) {
  th_layer_spec s = pipeline_spec(47, 96, 40, 64, 6, 0x802);
  s.cfg.scoring = MOE_SCORING_SIGMOID;
  s.cfg.num_groups = 8;
  s.cfg.topk_groups = 4;
  s.cfg.group_scoring = MOE_GROUP_SCORING_TOP2_SUM;
  s.cfg.routed_scaling_factor = 2.5f;
  s.cfg.num_local_experts = 24;
  s.correction_bias = true;
  s.map = TH_MAP_PARTIAL;
  pipeline_case(&s, 32);
}

Test(pipeline, gpt_oss_like_in_out_biases) {
  th_layer_spec s = pipeline_spec(20, 96, 96, 32, 4, 0x803);
  s.cfg.activation = MOE_ACTIVATION_SWIGLU_CLAMP;
  s.cfg.weight_layout = MOE_WEIGHT_LAYOUT_IN_OUT;
  s.w13_bias = s.w2_bias = true;
  pipeline_case(&s, 8);
}

Test(pipeline, router_weight_on_input_geglu) {
  th_layer_spec s = pipeline_spec(9, 64, 72, 16, 3, 0x804);
  s.cfg.router_weight = MOE_ROUTER_WEIGHT_ON_INPUT;
  s.cfg.activation = MOE_ACTIVATION_GEGLU;
  s.w13_bias = s.w2_bias = true;
  pipeline_case(&s, 1);
}
