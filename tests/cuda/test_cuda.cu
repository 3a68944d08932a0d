/*
 * test_cuda.cu - CUDA-only tests of the moe_tests suite: a forward captured
 * into a CUDA graph and replayed on new inputs, interop with the caller's
 * stream and memory (moe_cuda.h), and layer and GEMM shapes aligned so that
 * every tensor-core tile of the backend's tile table runs (the shared
 * suite's odd sizes mostly take the reference kernel). Each test skips
 * unless MOE_TEST_BACKEND=cuda.
 */
#include <criterion/criterion.h>

extern "C" {
#include "harness.h"
}
#include "moe_cuda.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define CUDA_LAYER_BOUND 1e-2

static void require_cuda(void) {
  if (strcmp(th_backend_name(), "cuda") != 0)
    cr_skip_test("CUDA-only test; MOE_TEST_BACKEND=%s", th_backend_name());
}

/* Sets an option on the context under test (moe_context_set_option). */
static void set_option(const char *name, const char *value) {
  TH_OK(moe_context_set_option(th_ctx(), name, value));
}

/* Sets an option of the context under test until the end of the scope,
 * then restores the value it had. */
struct option_override {
  const char *name;
  char saved[64];
  option_override(const char *n, const char *value) : name(n) {
    TH_OK(moe_context_get_option(th_ctx(), n, saved, sizeof saved));
    set_option(n, value);
  }
  ~option_override() { set_option(name, saved); }
};

#define CUDA_OK(call)                                                                              \
  do {                                                                                             \
    cudaError_t err_ = (call);                                                                     \
    TH_ASSERT(err_ == cudaSuccess, "%s failed: %s", #call, cudaGetErrorString(err_));              \
  } while (0)

static th_layer_spec mixtral_like(int64_t T, int64_t H, int64_t I, int32_t E, int32_t k,
                                  uint64_t seed) {
  th_layer_spec s;
  memset(&s, 0, sizeof s);
  s.num_tokens = T;
  s.seed = seed;
  s.cfg = th_config(H, I, E, k);
  s.cfg.renormalize = 1;
  return s;
}

/* Relative error of out [T][H] against the float64 reference of d. */
static double layer_error(const th_layer_data *d, const uint16_t *out) {
  const int64_t n = d->num_tokens * d->cfg.hidden_size;
  double *ref = (double *)th_malloc((size_t)n * sizeof(double));
  ref_layer_forward(&d->cfg, &d->weights, d->num_tokens, d->x, d->logits, true, ref);
  for (int64_t i = 0; i < n; ++i)
    TH_ASSERT(isfinite(th_bf16_to_float(out[i])), "out[%lld] is not finite", (long long)i);
  const double err = th_rel_error(out, ref, (size_t)n);
  free(ref);
  return err;
}

/* Forward of all of d's tokens on ctx through the public API. */
static void forward_plain(moe_context *ctx, const th_layer_data *d, uint16_t *out) {
  const int64_t T = d->num_tokens, H = d->cfg.hidden_size, E = d->cfg.num_experts;
  moe_layer *layer = NULL;
  TH_OK(moe_layer_create(ctx, &d->cfg, &d->weights, &layer));
  TH_OK(moe_layer_reserve(layer, T));
  moe_buffer *x = th_upload(ctx, d->x, (size_t)(T * H) * 2);
  moe_buffer *logits = th_upload(ctx, d->logits, (size_t)(T * E) * sizeof(float));
  moe_buffer *b_out = th_output(ctx, (size_t)(T * H) * 2);
  TH_OK(moe_layer_forward(layer, T, x, logits, b_out));
  th_download(b_out, out, (size_t)(T * H) * 2);
  th_check_guard(b_out, (size_t)(T * H) * 2, "out");
  moe_buffer_destroy(x);
  moe_buffer_destroy(logits);
  moe_buffer_destroy(b_out);
  moe_layer_destroy(layer);
}

static void layer_case(const th_layer_spec *spec) {
  th_layer_data d;
  th_layer_data_make(&d, spec);
  const size_t n = (size_t)(d.num_tokens * d.cfg.hidden_size);
  uint16_t *out = (uint16_t *)th_malloc(n * 2);
  forward_plain(th_ctx(), &d, out);
  const double err = layer_error(&d, out);
  TH_ASSERT(err <= CUDA_LAYER_BOUND, "relative error %.3g vs float64 > %g", err, CUDA_LAYER_BOUND);
  cr_log_info("T=%lld relative error %.3g", (long long)d.num_tokens, err);
  free(out);
  th_layer_data_free(&d);
}

/* ---- CUDA graphs ------------------------------------------------------- */

/* Captures one forward of T tokens, replays it on new inputs in the same
 * buffers. */
static void graph_case(int64_t T, uint64_t seed) {
  moe_context *ctx = th_ctx();
  const int64_t H = 256, I = 384;
  const int32_t E = 16, k = 4;
  th_case("graph T=%lld", (long long)T);
  th_layer_spec spec = mixtral_like(T, H, I, E, k, seed);
  th_layer_data d;
  th_layer_data_make(&d, &spec);
  moe_layer *layer = NULL;
  TH_OK(moe_layer_create(ctx, &d.cfg, &d.weights, &layer));
  TH_OK(moe_layer_reserve(layer, T));
  const size_t x_bytes = (size_t)(T * H) * 2, logit_bytes = (size_t)(T * E) * sizeof(float);
  moe_buffer *x = th_upload(ctx, d.x, x_bytes);
  moe_buffer *logits = th_upload(ctx, d.logits, logit_bytes);
  moe_buffer *out = th_output(ctx, x_bytes);

  void *stream_handle = NULL;
  TH_OK(moe_cuda_context_stream(ctx, &stream_handle));
  cudaStream_t stream = (cudaStream_t)stream_handle;
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  const moe_status captured = moe_layer_forward(layer, T, x, logits, out);
  CUDA_OK(cudaStreamEndCapture(stream, &graph));
  TH_OK(captured);
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));

  uint16_t *got = (uint16_t *)th_malloc(x_bytes), *again = (uint16_t *)th_malloc(x_bytes);
  for (int round = 0; round < 3; ++round) {
    if (round > 0) { /* new inputs in the same buffers */
      th_rng rng = th_rng_make(0xc0de + (uint64_t)round);
      th_fill_bf16(&rng, d.x, (size_t)(T * H), 1.0);
      th_fill_logits(&rng, d.logits, T, E, k, TH_LOGITS_NORMAL);
      TH_OK(moe_buffer_write(x, 0, d.x, x_bytes));
      TH_OK(moe_buffer_write(logits, 0, d.logits, logit_bytes));
    }
    CUDA_OK(cudaGraphLaunch(exec, stream));
    CUDA_OK(cudaStreamSynchronize(stream));
    th_download(out, got, x_bytes);
    const double err = layer_error(&d, got);
    TH_ASSERT(err <= CUDA_LAYER_BOUND, "replay %d: relative error %.3g > %g", round, err,
              CUDA_LAYER_BOUND);
    CUDA_OK(cudaGraphLaunch(exec, stream));
    CUDA_OK(cudaStreamSynchronize(stream));
    th_download(out, again, x_bytes);
    TH_ASSERT(memcmp(got, again, x_bytes) == 0, "replay %d is not bitwise identical", round);
    if (round == 2 && th_cpu_ctx()) { /* the CPU backend on the same inputs */
      uint16_t *cpu = (uint16_t *)th_malloc(x_bytes);
      forward_plain(th_cpu_ctx(), &d, cpu);
      th_check_agree(got, cpu, (size_t)(T * H), CUDA_LAYER_BOUND, "graph replay vs cpu");
      free(cpu);
    }
  }
  th_check_guard(out, x_bytes, "out");
  CUDA_OK(cudaGraphExecDestroy(exec));
  CUDA_OK(cudaGraphDestroy(graph));
  free(got);
  free(again);
  moe_buffer_destroy(x);
  moe_buffer_destroy(logits);
  moe_buffer_destroy(out);
  moe_layer_destroy(layer);
  th_layer_data_free(&d);
}

/* 48 tokens run on the tile path, 2 on the decode path (decode.cu). */
Test(cuda, graph_capture_replays_on_new_inputs) {
  require_cuda();
  graph_case(48, 0xc001);
  graph_case(2, 0xc002);
}

/* ---- interop ------------------------------------------------------------ */

Test(cuda, interop_user_stream_and_wrapped_memory) {
  require_cuda();
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  moe_context *ctx = NULL;
  TH_OK(moe_cuda_context_create_on_stream(0, stream, &ctx));
  void *got_stream = NULL;
  TH_OK(moe_cuda_context_stream(ctx, &got_stream));
  TH_ASSERT(got_stream == (void *)stream, "the context does not run on the caller's stream");

  const int64_t T = 5, H = 128, I = 256;
  const int32_t E = 8, k = 2;
  th_layer_spec spec = mixtral_like(T, H, I, E, k, 0xc002);
  th_layer_data d;
  th_layer_data_make(&d, &spec);
  const size_t x_bytes = (size_t)(T * H) * 2, logit_bytes = (size_t)(T * E) * sizeof(float);
  void *dx, *dlogits, *dout;
  CUDA_OK(cudaMalloc(&dx, x_bytes));
  CUDA_OK(cudaMalloc(&dlogits, logit_bytes));
  CUDA_OK(cudaMalloc(&dout, x_bytes));
  CUDA_OK(cudaMemcpy(dx, d.x, x_bytes, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dlogits, d.logits, logit_bytes, cudaMemcpyHostToDevice));
  moe_buffer *x = NULL, *logits = NULL, *out = NULL;
  TH_OK(moe_cuda_buffer_wrap(ctx, dx, x_bytes, &x));
  TH_OK(moe_cuda_buffer_wrap(ctx, dlogits, logit_bytes, &logits));
  TH_OK(moe_cuda_buffer_wrap(ctx, dout, x_bytes, &out));
  TH_ASSERT(moe_buffer_size(x) == x_bytes, "wrapped size %zu", moe_buffer_size(x));

  moe_layer *layer = NULL;
  TH_OK(moe_layer_create(ctx, &d.cfg, &d.weights, &layer));
  TH_OK(moe_layer_reserve(layer, T));
  TH_OK(moe_layer_forward(layer, T, x, logits, out));
  CUDA_OK(cudaStreamSynchronize(stream));
  uint16_t *got = (uint16_t *)th_malloc(x_bytes);
  CUDA_OK(cudaMemcpy(got, dout, x_bytes, cudaMemcpyDeviceToHost));
  const double err = layer_error(&d, got);
  TH_ASSERT(err <= CUDA_LAYER_BOUND, "relative error %.3g > %g", err, CUDA_LAYER_BOUND);

  /* Wrapping a CPU context's buffer or a NULL pointer is refused. */
  moe_buffer *bad = NULL;
  TH_ASSERT(moe_cuda_buffer_wrap(ctx, NULL, 16, &bad) == MOE_ERROR_NULL_POINTER, "NULL wrapped");
  if (th_cpu_ctx())
    TH_ASSERT(moe_cuda_buffer_wrap(th_cpu_ctx(), dx, 16, &bad) == MOE_ERROR_INVALID_ARGUMENT,
              "a CPU context wrapped device memory");

  moe_layer_destroy(layer);
  moe_buffer_destroy(x);
  moe_buffer_destroy(logits);
  moe_buffer_destroy(out);
  moe_context_destroy(ctx);
  /* Neither the memory nor the stream was freed by the library. */
  CUDA_OK(cudaFree(dx));
  CUDA_OK(cudaFree(dlogits));
  CUDA_OK(cudaFree(dout));
  CUDA_OK(cudaStreamQuery(stream));
  CUDA_OK(cudaStreamDestroy(stream));
  free(got);
  th_layer_data_free(&d);
}

/* ---- every tensor-core tile through the layer -------------------------- */

/* Sizes are multiples of 8, so the tensor-core kernels run; T sweeps the
 * tile table (rows per expert 1, 6, 25, 75, 262) and T*k > 4096 takes the
 * multi-block align. */
Test(cuda, layer_tile_sweep) {
  require_cuda();
  option_override tiles("cuda.path", "mma"); /* 1 and 3 tokens on the tiles too */
  const int64_t tokens[] = {1, 3, 16, 100, 300, 2100};
  for (size_t i = 0; i < sizeof tokens / sizeof tokens[0]; ++i) {
    th_layer_spec s = mixtral_like(tokens[i], 256, 384, 8, 2, 0xc100 + i);
    layer_case(&s);
  }
}

Test(cuda, layer_many_experts_decode) {
  require_cuda();
  const int64_t tokens[] = {1, 4, 64, 600};
  for (size_t i = 0; i < sizeof tokens / sizeof tokens[0]; ++i) {
    th_layer_spec s = mixtral_like(tokens[i], 512, 128, 128, 8, 0xc200 + i);
    layer_case(&s);
  }
}

/* Layer variant `variant` (0..6) of the 16-expert, top-4 test layer. */
static th_layer_spec variant_spec(int variant, int64_t T, uint64_t seed) {
  th_layer_spec s = mixtral_like(T, 256, 256, 16, 4, seed);
  switch (variant) {
  case 0: /* DeepSeek-V3 routing */
    s.cfg.scoring = MOE_SCORING_SIGMOID;
    s.cfg.num_groups = 4;
    s.cfg.topk_groups = 2;
    s.cfg.group_scoring = MOE_GROUP_SCORING_TOP2_SUM;
    s.cfg.routed_scaling_factor = 2.5f;
    s.correction_bias = true;
    break;
  case 1: /* expert parallelism */
    s.cfg.num_local_experts = 8;
    s.map = TH_MAP_PARTIAL;
    break;
  case 2: /* gpt-oss */
    s.cfg.activation = MOE_ACTIVATION_SWIGLU_CLAMP;
    s.w13_bias = s.w2_bias = true;
    break;
  case 3:
    s.cfg.router_weight = MOE_ROUTER_WEIGHT_ON_INPUT;
    s.w13_bias = true;
    break;
  case 4:
    s.cfg.weight_layout = MOE_WEIGHT_LAYOUT_IN_OUT;
    break;
  case 5:
    s.cfg.activation = MOE_ACTIVATION_GEGLU;
    break;
  default:
    s.logits = TH_LOGITS_SPECIAL;
    break;
  }
  return s;
}

Test(cuda, layer_variants_on_tensor_cores) {
  require_cuda();
  for (int variant = 0; variant < 7; ++variant)
    for (int64_t T : {2, 200}) {
      th_layer_spec s = variant_spec(variant, T, 0xc300 + 16 * variant + T);
      layer_case(&s);
    }
}

/* The decode kernel (weights streamed on the CUDA cores): forced over every
 * variant, at 2 tokens (one pass per block) and 200 (about 50 rows per
 * expert, so up to 4 passes of GEMV_ROWS per 16-row block); and taken by
 * the default rule where it applies (one row per expert, K >= 2560). */
Test(cuda, decode_kernel_variants) {
  require_cuda();
  set_option("cuda.tile", "gemv");
  for (int variant = 0; variant < 7; ++variant)
    for (int64_t T : {2, 200}) {
      th_layer_spec s = variant_spec(variant, T, 0xc900 + 16 * variant + T);
      layer_case(&s);
    }
  set_option("cuda.tile", "auto");
  set_option("cuda.path", "mma"); /* else decode.cu takes 1 and 3 tokens */
  for (int64_t T : {1, 3}) {
    th_layer_spec s = mixtral_like(T, 2560, 264, 8, 2, 0xca00 + T);
    layer_case(&s);
  }
  set_option("cuda.path", "auto");
}

/* The plan follows the device class's tuning row (cuda_tuning.cu), which
 * moe_layer_describe names: at 16 rows per touched expert an H100 streams
 * layers of 128 and of 32 experts with 32-token blocks, an H200 with
 * 16-token blocks. Both run 64-row wgmma tiles at 64 rows per expert with 32
 * experts, and 128-row ones at 128 rows, or with 256 experts. Grouped
 * routing (4 of 8 groups) at 8 rows per expert picks the block from 16
 * rows: 32 on an H100, 16 on an H200. On other devices only the row's
 * name is checked. A fresh context: options set by MOE_TEST_OPTIONS would
 * move the plan. */
Test(cuda, plan_follows_the_device_class_row) {
  require_cuda();
  struct row_case {
    int32_t experts, top_k;
    int64_t tokens;
    const char *on_h100, *on_h200;
    bool grouped; /* 4 of 8 groups: the streaming block from 8 x 8 / 4 = 16 rows */
  } cases[] = {{128, 8, 256, "token block 32", "token block 16", false},
               {32, 4, 128, "token block 32", "token block 16", false},
               {32, 4, 512, "64-row wgmma", "64-row wgmma", false},
               {32, 4, 1024, "128-row wgmma", "128-row wgmma", false},
               {256, 8, 1024, "128-row wgmma", "128-row wgmma", false},
               {256, 8, 256, "token block 32", "token block 16", true}};
  moe_context *ctx = NULL;
  TH_OK(moe_context_create(MOE_BACKEND_CUDA, 0, &ctx));
  for (const row_case &c : cases) {
    th_layer_spec s = mixtral_like(1, 256, 128, c.experts, c.top_k, 0xd100 + c.experts);
    if (c.grouped) {
      s.cfg.num_groups = 8;
      s.cfg.topk_groups = 4;
    }
    th_layer_data d;
    th_layer_data_make(&d, &s);
    moe_layer *layer = NULL;
    TH_OK(moe_layer_create(ctx, &d.cfg, &d.weights, &layer));
    TH_OK(moe_layer_reserve(layer, c.tokens));
    char text[1024];
    TH_OK(moe_layer_describe(layer, c.tokens, text, sizeof text));
    cr_log_info("E=%d T=%lld: %s", c.experts, (long long)c.tokens, text);
    TH_ASSERT(strstr(text, " class (") || strstr(text, "generic ("), "no tuning row in \"%s\"",
              text);
    const char *want = strstr(text, "H100 class")   ? c.on_h100
                       : strstr(text, "H200 class") ? c.on_h200
                                                    : NULL;
    TH_ASSERT(!want || strstr(text, want), "E=%d T=%lld: \"%s\" does not say \"%s\"", c.experts,
              (long long)c.tokens, text, want);
    moe_layer_destroy(layer);
    th_layer_data_free(&d);
  }
  moe_context_destroy(ctx);
}

/* The decode path (decode.cu: route, then GEMM1 and GEMM2 indexed by the
 * slots' experts, the reduce in GEMM2): forced over every variant at 1, 3
 * and 9 tokens; rows with tails past a round (hidden 2056: 8 chunks of 256
 * plus one; inter 1032: two load batches of GEMM2), top_k 6 (a group of 4 and one
 * of 2) with expert parallelism, plain launches and work-sized grids, and
 * the default rule (here 1 and 2 tokens take the path, 4 do not). The
 * default grids are one wave, so these shapes walk several items a warp
 * and several tiles a CTA. */
Test(cuda, decode_path_variants) {
  require_cuda();
  set_option("cuda.path", "decode");
  for (int variant = 0; variant < 7; ++variant)
    for (int64_t T : {1, 3, 9}) {
      th_layer_spec s = variant_spec(variant, T, 0xcb00 + 16 * variant + T);
      layer_case(&s);
    }
  for (int64_t T : {1, 5}) {
    th_layer_spec s = mixtral_like(T, 2056, 1032, 64, 6, 0xcc00 + T);
    s.cfg.num_local_experts = 40;
    s.map = TH_MAP_PARTIAL;
    layer_case(&s);
    th_layer_spec odd = mixtral_like(T, 264, 776, 8, 2, 0xcc10 + T);
    odd.w13_bias = odd.w2_bias = true;
    layer_case(&odd);
  }
  set_option("cuda.decode_pdl", "off"); /* plain launches too */
  for (int variant = 0; variant < 7; variant += 3) {
    th_layer_spec s = variant_spec(variant, 2, 0xce00 + variant);
    layer_case(&s);
  }
  set_option("cuda.decode_pdl", "on");
  set_option("cuda.decode_persistent", "off"); /* grids as large as the work too */
  for (int variant = 1; variant < 7; variant += 3) {
    th_layer_spec s = variant_spec(variant, 3, 0xcf00 + variant);
    layer_case(&s);
  }
  set_option("cuda.decode_persistent", "on");
  set_option("cuda.path", "auto");
  for (int64_t T : {1, 2, 4}) {
    th_layer_spec s = mixtral_like(T, 512, 768, 32, 8, 0xcd00 + T);
    layer_case(&s);
  }
}

/* ---- the grouped GEMM stage on tensor cores ---------------------------- */

static void gemm_stage_case(int64_t T, int32_t k, int32_t E, int64_t n, int64_t K, int32_t block_m,
                            moe_weight_layout layout, moe_gemm_input input,
                            moe_gemm_routed_weight rw, bool bias, uint64_t seed) {
  moe_context *ctx = th_ctx();
  th_case("gemm T=%lld k=%d E=%d n=%lld K=%lld block_m=%d layout=%d input=%d rw=%d bias=%d "
          "seed=%#llx",
          (long long)T, k, E, (long long)n, (long long)K, block_m, (int)layout, (int)input, (int)rw,
          (int)bias, (unsigned long long)seed);
  th_rng rng = th_rng_make(seed);
  const int64_t slots = T * k, a_rows = input == MOE_GEMM_INPUT_PER_SLOT ? slots : T;
  uint16_t *a = (uint16_t *)th_malloc((size_t)(a_rows * K) * 2);
  uint16_t *b = (uint16_t *)th_malloc((size_t)(E * n * K) * 2);
  float *bias_h = (float *)th_malloc((size_t)(E * n) * sizeof(float));
  float *w = (float *)th_malloc((size_t)slots * sizeof(float));
  int32_t *ids = (int32_t *)th_malloc((size_t)slots * sizeof(int32_t));
  th_fill_bf16(&rng, a, (size_t)(a_rows * K), 1.0);
  th_fill_bf16(&rng, b, (size_t)(E * n * K), 1.0 / sqrt((double)K));
  th_fill_f32(&rng, bias_h, (size_t)(E * n), 0.5);
  for (int64_t s = 0; s < slots; ++s) {
    w[s] = (float)th_rng_uniform(&rng);
    ids[s] = (int32_t)((s / k * 7 + (s % k) * 3 + th_rng_below(&rng, 2)) % E);
  }
  int64_t sorted_cap, block_cap;
  TH_OK(moe_align_capacity(T, k, E, block_m, &sorted_cap, &block_cap));
  moe_buffer *b_ids = th_upload(ctx, ids, (size_t)slots * 4);
  moe_buffer *b_sorted = th_output(ctx, (size_t)sorted_cap * 4);
  moe_buffer *b_eids = th_output(ctx, (size_t)block_cap * 4);
  moe_buffer *b_ntpp = th_output(ctx, 4);
  TH_OK(moe_align(ctx, T, k, E, E, block_m, b_ids, NULL, b_sorted, b_eids, b_ntpp));
  moe_buffer *b_a = th_upload(ctx, a, (size_t)(a_rows * K) * 2);
  moe_buffer *b_b = th_upload(ctx, b, (size_t)(E * n * K) * 2);
  moe_buffer *b_bias = bias ? th_upload(ctx, bias_h, (size_t)(E * n) * sizeof(float)) : NULL;
  moe_buffer *b_w = th_upload(ctx, w, (size_t)slots * sizeof(float));
  moe_buffer *b_c = th_output(ctx, (size_t)(slots * n) * 2);
  moe_gemm_desc desc;
  memset(&desc, 0, sizeof desc);
  desc.num_tokens = T;
  desc.top_k = k;
  desc.num_local_experts = E;
  desc.n = n;
  desc.k = K;
  desc.block_m = block_m;
  desc.b_layout = layout;
  desc.input = input;
  desc.routed_weight = rw;
  TH_OK(moe_grouped_gemm(ctx, &desc, b_a, b_b, b_bias, b_sorted, b_eids, b_ntpp, b_w, b_c));
  uint16_t *c = (uint16_t *)th_malloc((size_t)(slots * n) * 2);
  th_download(b_c, c, (size_t)(slots * n) * 2);
  th_check_guard(b_c, (size_t)(slots * n) * 2, "c");
  double *ref = (double *)th_malloc((size_t)(slots * n) * sizeof(double));
  double *mag = (double *)th_malloc((size_t)(slots * n) * sizeof(double));
  ref_grouped_gemm(&desc, a, b, bias ? bias_h : NULL, ids, w, ref, mag);
  th_check_bf16_close(c, ref, mag, slots, n, K, "c");
  free(a);
  free(b);
  free(bias_h);
  free(w);
  free(ids);
  free(c);
  free(ref);
  free(mag);
  moe_buffer *bufs[] = {b_ids, b_sorted, b_eids, b_ntpp, b_a, b_b, b_bias, b_w, b_c};
  for (moe_buffer *buf : bufs)
    moe_buffer_destroy(buf);
}

Test(cuda, gemm_stage_tiles_and_layouts) {
  require_cuda();
  const moe_weight_layout layouts[] = {MOE_WEIGHT_LAYOUT_OUT_IN, MOE_WEIGHT_LAYOUT_IN_OUT};
  uint64_t seed = 0xc400;
  for (moe_weight_layout layout : layouts) {
    /* decode tiles, block_m 16 */
    gemm_stage_case(3, 2, 8, 136, 264, 16, layout, MOE_GEMM_INPUT_PER_TOKEN,
                    MOE_GEMM_ROUTED_WEIGHT_NONE, false, seed++);
    /* 32x64 under block_m 64 */
    gemm_stage_case(100, 2, 8, 200, 96, 64, layout, MOE_GEMM_INPUT_PER_SLOT,
                    MOE_GEMM_ROUTED_WEIGHT_AFTER_BIAS, true, seed++);
    /* 64x128 */
    gemm_stage_case(300, 2, 8, 264, 136, 128, layout, MOE_GEMM_INPUT_PER_TOKEN,
                    MOE_GEMM_ROUTED_WEIGHT_BEFORE_BIAS, true, seed++);
    /* 128x128, block_m 256 */
    gemm_stage_case(1200, 2, 4, 392, 200, 256, layout, MOE_GEMM_INPUT_PER_SLOT,
                    MOE_GEMM_ROUTED_WEIGHT_NONE, true, seed++);
  }
}

/* ---- align, one block and several, against the reference -------------- */

Test(cuda, align_one_and_multi_block_match_reference) {
  require_cuda();
  moe_context *ctx = th_ctx();
  const struct {
    int64_t T;
    int32_t k, E, EL, block_m;
  } cases[] = {{1, 8, 128, 128, 16},
               {500, 8, 256, 256, 16},
               {3000, 8, 256, 256, 128},
               {4000, 6, 64, 40, 64},
               {70000, 2, 8, 8, 256}};
  for (const auto &c : cases) {
    th_case("align T=%lld k=%d E=%d EL=%d block_m=%d", (long long)c.T, c.k, c.E, c.EL, c.block_m);
    th_rng rng = th_rng_make(0xc500 + (uint64_t)c.T);
    const int64_t slots = c.T * c.k;
    int32_t *ids = (int32_t *)th_malloc((size_t)slots * 4);
    for (int64_t s = 0; s < slots; ++s)
      ids[s] = (int32_t)th_rng_below(&rng, c.E);
    int32_t *map = NULL;
    if (c.EL != c.E) {
      map = (int32_t *)th_malloc((size_t)c.E * 4);
      th_fill_expert_map(&rng, map, c.E, c.EL, TH_MAP_PARTIAL);
    }
    int64_t sorted_cap, block_cap;
    TH_OK(moe_align_capacity(c.T, c.k, c.EL, c.block_m, &sorted_cap, &block_cap));
    moe_buffer *b_ids = th_upload(ctx, ids, (size_t)slots * 4);
    moe_buffer *b_map = map ? th_upload(ctx, map, (size_t)c.E * 4) : NULL;
    moe_buffer *b_sorted = th_output(ctx, (size_t)sorted_cap * 4);
    moe_buffer *b_eids = th_output(ctx, (size_t)block_cap * 4);
    moe_buffer *b_ntpp = th_output(ctx, 4);
    TH_OK(moe_align(ctx, c.T, c.k, c.E, c.EL, c.block_m, b_ids, b_map, b_sorted, b_eids, b_ntpp));
    int32_t *sorted = (int32_t *)th_malloc((size_t)sorted_cap * 4);
    int32_t *eids = (int32_t *)th_malloc((size_t)block_cap * 4);
    int32_t *ref_sorted = (int32_t *)th_malloc((size_t)sorted_cap * 4);
    int32_t *ref_eids = (int32_t *)th_malloc((size_t)block_cap * 4);
    int32_t ntpp, ref_ntpp;
    th_download(b_sorted, sorted, (size_t)sorted_cap * 4);
    th_download(b_eids, eids, (size_t)block_cap * 4);
    th_download(b_ntpp, &ntpp, 4);
    ref_align(c.T, c.k, c.E, c.EL, c.block_m, ids, map, ref_sorted, ref_eids, &ref_ntpp);
    TH_ASSERT(ntpp == ref_ntpp, "num_tokens_post_padded %d, reference %d", ntpp, ref_ntpp);
    TH_ASSERT(memcmp(sorted, ref_sorted, (size_t)sorted_cap * 4) == 0,
              "sorted_token_ids differ from the reference");
    TH_ASSERT(memcmp(eids, ref_eids, (size_t)block_cap * 4) == 0,
              "expert_ids differ from the reference");
    th_check_guard(b_sorted, (size_t)sorted_cap * 4, "sorted_token_ids");
    th_check_guard(b_eids, (size_t)block_cap * 4, "expert_ids");
    free(ids);
    free(map);
    free(sorted);
    free(eids);
    free(ref_sorted);
    free(ref_eids);
    moe_buffer *bufs[] = {b_ids, b_map, b_sorted, b_eids, b_ntpp};
    for (moe_buffer *buf : bufs)
      moe_buffer_destroy(buf);
  }
}

/* ---- the warp routing against the host rule and the reference kernel --- */

static void route_on(moe_context *ctx, const moe_config *cfg, int64_t T, const float *logits,
                     const float *bias, int32_t *ids, float *weights) {
  const size_t slot_bytes = (size_t)(T * cfg->top_k) * 4;
  moe_buffer *b_logits = th_upload(ctx, logits, (size_t)(T * cfg->num_experts) * 4);
  moe_buffer *b_bias = bias ? th_upload(ctx, bias, (size_t)cfg->num_experts * 4) : NULL;
  moe_buffer *b_ids = th_output(ctx, slot_bytes), *b_w = th_output(ctx, slot_bytes);
  TH_OK(moe_route(ctx, cfg, T, b_logits, b_bias, b_ids, b_w));
  th_download(b_ids, ids, slot_bytes);
  th_download(b_w, weights, slot_bytes);
  moe_buffer *bufs[] = {b_logits, b_bias, b_ids, b_w};
  for (moe_buffer *buf : bufs)
    moe_buffer_destroy(buf);
}

Test(cuda, warp_routing_matches_host_and_reference_kernel) {
  require_cuda();
  for (int variant = 0; variant < 5; ++variant) {
    moe_config cfg = th_config(8, 8, 128, 8);
    cfg.renormalize = 1;
    bool with_bias = false;
    th_logits_kind kind = TH_LOGITS_NORMAL;
    switch (variant) {
    case 1: /* DeepSeek-V3 */
      cfg.num_experts = 256;
      cfg.scoring = MOE_SCORING_SIGMOID;
      cfg.num_groups = 8;
      cfg.topk_groups = 4;
      cfg.group_scoring = MOE_GROUP_SCORING_TOP2_SUM;
      cfg.routed_scaling_factor = 2.5f;
      with_bias = true;
      break;
    case 2: /* E = 1024, top 32, DeepSeek-V2 groups */
      cfg.num_experts = 1024;
      cfg.top_k = 32;
      cfg.num_groups = 64;
      cfg.topk_groups = 8;
      break;
    case 3:
      cfg.num_experts = 8, cfg.top_k = 2, kind = TH_LOGITS_TIES;
      break;
    case 4:
      cfg.num_experts = 60, cfg.top_k = 4, kind = TH_LOGITS_SPECIAL;
      break;
    default:
      break;
    }
    /* 3 tokens take the block-wide rank routing where it fits (E <= 256),
     * 77 the warp per token; both against the one-thread reference and the
     * many-block rank routing (cuda.routing=rank: the warp's where one
     * token does not fit a block). */
    for (int64_t T : {77, 3}) {
      th_case("routing variant %d T=%lld %s", variant, (long long)T, th_config_text(&cfg));
      th_rng rng = th_rng_make(0xc600 + (uint64_t)variant);
      float *logits = (float *)th_malloc((size_t)(T * cfg.num_experts) * 4);
      float *bias = (float *)th_malloc((size_t)cfg.num_experts * 4);
      th_fill_logits(&rng, logits, T, cfg.num_experts, cfg.top_k, kind);
      th_fill_f32(&rng, bias, (size_t)cfg.num_experts, 0.1);
      const size_t slots = (size_t)(T * cfg.top_k);
      int32_t *ids = (int32_t *)th_malloc(slots * 4), *ids_ref = (int32_t *)th_malloc(slots * 4);
      float *w = (float *)th_malloc(slots * 4), *w_ref = (float *)th_malloc(slots * 4);
      route_on(th_ctx(), &cfg, T, logits, with_bias ? bias : NULL, ids, w);
      th_check_route(&cfg, T, logits, with_bias ? bias : NULL, ids, w);
      for (const char *mode : {"reference", "warp", "rank"}) {
        set_option("cuda.routing", mode);
        route_on(th_ctx(), &cfg, T, logits, with_bias ? bias : NULL, ids_ref, w_ref);
        set_option("cuda.routing", "auto");
        for (size_t i = 0; i < slots; ++i) {
          TH_ASSERT(ids[i] == ids_ref[i], "slot %zu: default routing picked %d, %s routing %d", i,
                    ids[i], mode, ids_ref[i]);
          TH_ASSERT(fabsf(w[i] - w_ref[i]) <= 1e-6f * fabsf(w_ref[i]) + 1e-30f,
                    "slot %zu: weight %.9g vs %s %.9g", i, (double)w[i], mode, (double)w_ref[i]);
        }
      }
      free(logits);
      free(bias);
      free(ids);
      free(ids_ref);
      free(w);
      free(w_ref);
    }
  }
}

/* ---- the Hopper prefill path: wgmma fed by TMA ------------------------- */

/* 1 where this binary's sm_90a code runs on the current device. The library
 * is compiled for the same CUDA architectures as this file, so its wgmma
 * kernels can run exactly where this probe reports 1. */
__global__ void sm90a_probe_kernel(int *out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *out = 1;
#else
  *out = 0;
#endif
}

static bool sm90a_code_runs(void) {
  th_ctx(); /* the context under test selects the device */
  int *d_flag = NULL, flag = 0;
  CUDA_OK(cudaMalloc(&d_flag, sizeof(int)));
  sm90a_probe_kernel<<<1, 1>>>(d_flag);
  CUDA_OK(cudaGetLastError());
  CUDA_OK(cudaMemcpy(&flag, d_flag, sizeof flag, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaFree(d_flag));
  return flag == 1;
}

static void require_sm90a(void) {
  require_cuda();
  if (!sm90a_code_runs()) {
    cudaDeviceProp prop;
    CUDA_OK(cudaGetDeviceProperties(&prop, 0));
    cr_skip_test("the wgmma path needs a compute capability 9.0 device and sm_90a code in the "
                 "build; device 0 (%s) is %d.%d",
                 prop.name, prop.major, prop.minor);
  }
}

/* A layer of d's data with its buffers, reserved for d's tokens. */
struct layer_run {
  moe_layer *layer;
  moe_buffer *x, *logits, *out;
  size_t out_bytes;
};

static layer_run layer_run_make(const th_layer_data *d) {
  moe_context *ctx = th_ctx();
  const int64_t T = d->num_tokens, H = d->cfg.hidden_size, E = d->cfg.num_experts;
  layer_run r;
  r.layer = NULL;
  TH_OK(moe_layer_create(ctx, &d->cfg, &d->weights, &r.layer));
  TH_OK(moe_layer_reserve(r.layer, T));
  r.out_bytes = (size_t)(T * H) * 2;
  r.x = th_upload(ctx, d->x, r.out_bytes);
  r.logits = th_upload(ctx, d->logits, (size_t)(T * E) * sizeof(float));
  r.out = th_output(ctx, r.out_bytes);
  return r;
}

static void layer_run_free(layer_run *r) {
  moe_buffer_destroy(r->x);
  moe_buffer_destroy(r->logits);
  moe_buffer_destroy(r->out);
  moe_layer_destroy(r->layer);
}

/* The Hopper GEMM kernels a captured forward launched. */
struct hopper_kernels {
  bool wgmma;  /* gemm_wgmma.cu's tiles */
  bool stream; /* gemm_stream.cu's weight streaming */
};

/* Captures one forward into a CUDA graph (which also shows that it neither
 * waits for the host nor allocates) and returns it; *seen tells which
 * Hopper GEMM kernels are among its launches. */
static cudaGraphExec_t capture_forward(layer_run *r, int64_t T, hopper_kernels *seen) {
  void *handle = NULL;
  TH_OK(moe_cuda_context_stream(th_ctx(), &handle));
  cudaStream_t stream = (cudaStream_t)handle;
  cudaGraph_t graph;
  CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  const moe_status captured = moe_layer_forward(r->layer, T, r->x, r->logits, r->out);
  CUDA_OK(cudaStreamEndCapture(stream, &graph));
  TH_OK(captured);
  size_t count = 0;
  CUDA_OK(cudaGraphGetNodes(graph, NULL, &count));
  cudaGraphNode_t *nodes = (cudaGraphNode_t *)th_malloc((count ? count : 1) * sizeof *nodes);
  CUDA_OK(cudaGraphGetNodes(graph, nodes, &count));
  seen->wgmma = seen->stream = false;
  for (size_t i = 0; i < count; ++i) {
    cudaGraphNodeType type;
    CUDA_OK(cudaGraphNodeGetType(nodes[i], &type));
    TH_ASSERT(type != cudaGraphNodeTypeMemAlloc && type != cudaGraphNodeTypeMemFree,
              "a reserved forward allocates (graph node type %d)", (int)type);
    if (type != cudaGraphNodeTypeKernel) continue;
    cudaKernelNodeParams params;
    CUDA_OK(cudaGraphKernelNodeGetParams(nodes[i], &params));
    const char *name = NULL;
    if (cudaFuncGetName(&name, params.func) == cudaSuccess && name) {
      if (strstr(name, "wgmma_gemm_kernel")) seen->wgmma = true;
      if (strstr(name, "stream_gemm_kernel")) seen->stream = true;
    } else { /* no name: the forward's only 384- and 288-thread kernels */
      cudaGetLastError();
      if (params.blockDim.x == 384) seen->wgmma = true;
      if (params.blockDim.x == 288) seen->stream = true;
    }
  }
  free(nodes);
  cudaGraphExec_t exec;
  CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
  CUDA_OK(cudaGraphDestroy(graph));
  return exec;
}

/* Whether a forward of d's tokens takes the wgmma path under the current
 * environment. */
static hopper_kernels forward_kernels(const th_layer_data *d) {
  layer_run r = layer_run_make(d);
  hopper_kernels seen;
  cudaGraphExec_t exec = capture_forward(&r, d->num_tokens, &seen);
  CUDA_OK(cudaGraphExecDestroy(exec));
  layer_run_free(&r);
  return seen;
}

static bool forward_takes_wgmma(const th_layer_data *d) {
  return forward_kernels(d).wgmma;
}

/* Runs a forward of spec's data with a Hopper path forced (path: "wgmma"
 * or "stream", the cuda.path value): checks that the path ran, the
 * output against float64 (and the guard), and that replays are bitwise
 * identical (a pipeline race would rarely be). */
static void hopper_layer_case(const th_layer_spec *spec, const char *path) {
  option_override force("cuda.path", path);
  th_layer_data d;
  th_layer_data_make(&d, spec);
  layer_run r = layer_run_make(&d);
  hopper_kernels seen;
  cudaGraphExec_t exec = capture_forward(&r, d.num_tokens, &seen);
  const bool streaming = strcmp(path, "stream") == 0;
  TH_ASSERT(streaming ? seen.stream && !seen.wgmma : seen.wgmma && !seen.stream,
            "cuda.path=%s did not take that path (wgmma %d, stream %d)", path, seen.wgmma,
            seen.stream);
  void *handle = NULL;
  TH_OK(moe_cuda_context_stream(th_ctx(), &handle));
  cudaStream_t stream = (cudaStream_t)handle;
  uint16_t *got = (uint16_t *)th_malloc(r.out_bytes), *again = (uint16_t *)th_malloc(r.out_bytes);
  for (int replay = 0; replay < 3; ++replay) {
    CUDA_OK(cudaGraphLaunch(exec, stream));
    CUDA_OK(cudaStreamSynchronize(stream));
    th_download(r.out, replay == 0 ? got : again, r.out_bytes);
    if (replay > 0)
      TH_ASSERT(memcmp(got, again, r.out_bytes) == 0, "replay %d is not bitwise identical", replay);
  }
  th_check_guard(r.out, r.out_bytes, "out");
  const double err = layer_error(&d, got);
  TH_ASSERT(err <= CUDA_LAYER_BOUND, "%s path: relative error %.3g vs float64 > %g", path, err,
            CUDA_LAYER_BOUND);
  cr_log_info("%s T=%lld H=%lld I=%lld E=%d k=%d: relative error %.3g", path,
              (long long)d.num_tokens, (long long)d.cfg.hidden_size,
              (long long)d.cfg.intermediate_size, d.cfg.num_experts, d.cfg.top_k, err);
  CUDA_OK(cudaGraphExecDestroy(exec));
  free(got);
  free(again);
  layer_run_free(&r);
  th_layer_data_free(&d);
}

static void wgmma_layer_case(const th_layer_spec *spec) {
  hopper_layer_case(spec, "wgmma");
}

/* Forced on, the path runs exactly where sm_90a code runs; forced off, or
 * for shapes TMA cannot take, never; by default for many rows per expert
 * only. On a device that is not 9.0 this checks that it is never taken. */
Test(cuda, wgmma_path_taken_only_where_it_can_run) {
  require_cuda();
  const bool can = sm90a_code_runs();
  cr_log_info("sm_90a code %s on device 0", can ? "runs" : "does not run");
  struct {
    int64_t T, H, I;
    const char *prefill; /* option cuda.path, or NULL */
    bool expect;         /* where sm_90a code runs */
  } cases[] = {
      {300, 264, 200, "wgmma", true},  {300, 264, 200, "mma", false},
      {3000, 264, 200, NULL, true},    /* 750 rows per expert */
      {4, 264, 200, NULL, false},      /* decode */
      {300, 36, 200, "wgmma", false},  /* H below one 64-wide K box */
      {300, 260, 200, "wgmma", false}, /* H not a multiple of 8 */
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i) {
    option_override prefill("cuda.path", cases[i].prefill ? cases[i].prefill : "auto");
    th_layer_spec s = mixtral_like(cases[i].T, cases[i].H, cases[i].I, 8, 2, 0xc700 + i);
    th_layer_data d;
    th_layer_data_make(&d, &s);
    const bool taken = forward_takes_wgmma(&d);
    TH_ASSERT(taken == (can && cases[i].expect), "cuda.path=%s T=%lld H=%lld I=%lld: wgmma path %s",
              cases[i].prefill ? cases[i].prefill : "(unset)", (long long)cases[i].T,
              (long long)cases[i].H, (long long)cases[i].I, taken ? "taken" : "not taken");
    th_layer_data_free(&d);
  }
}

/* Token counts from 1 (a block of mostly padding) to 1500, H and I
 * multiples of 8 but not of 64 (TMA's zero fill past K, columns past n in
 * the last tile), few and many experts. */
Test(cuda, wgmma_layer_shapes) {
  require_sm90a();
  const int64_t tokens[] = {1, 37, 300, 1500};
  for (size_t i = 0; i < sizeof tokens / sizeof tokens[0]; ++i) {
    th_layer_spec s = mixtral_like(tokens[i], 264, 200, 8, 2, 0xc800 + i);
    wgmma_layer_case(&s);
    th_layer_spec many = mixtral_like(tokens[i], 264, 200, 64, 6, 0xc810 + i);
    many.cfg.router_weight = MOE_ROUTER_WEIGHT_ON_INPUT;
    many.w13_bias = many.w2_bias = true;
    wgmma_layer_case(&many);
  }
}

/* Long K (17 and 9 k-tiles: the stage ring wraps several times) with both
 * column tiles forced. */
Test(cuda, wgmma_layer_long_k_both_tiles) {
  require_sm90a();
  const char *tiles[] = {"128", "256"};
  for (size_t i = 0; i < 2; ++i) {
    option_override bn("cuda.wgmma_bn", tiles[i]);
    th_layer_spec s = mixtral_like(600, 1032, 520, 8, 2, 0xc900 + i);
    s.w13_bias = s.w2_bias = true;
    wgmma_layer_case(&s);
    th_layer_spec wide = mixtral_like(1500, 264, 200, 8, 2, 0xc910 + i);
    wgmma_layer_case(&wide);
  }
}

/* The layer variants the Hopper paths must keep (0..LAYER_VARIANTS-1). */
#define LAYER_VARIANTS 5
static void apply_layer_variant(th_layer_spec *s, int variant) {
  switch (variant) {
  case 0: /* gpt-oss */
    s->cfg.activation = MOE_ACTIVATION_SWIGLU_CLAMP;
    s->w13_bias = s->w2_bias = true;
    break;
  case 1: /* expert parallelism: ids mapped to -1 are skipped */
    s->cfg.num_local_experts = 8;
    s->map = TH_MAP_PARTIAL;
    s->w13_bias = s->w2_bias = true;
    break;
  case 2: /* Llama-4: router weight on the input */
    s->cfg.router_weight = MOE_ROUTER_WEIGHT_ON_INPUT;
    s->w13_bias = s->w2_bias = true;
    break;
  case 3:
    s->cfg.weight_layout = MOE_WEIGHT_LAYOUT_IN_OUT;
    break;
  default:
    s->cfg.activation = MOE_ACTIVATION_GEGLU;
    break;
  }
}

Test(cuda, wgmma_layer_variants) {
  require_sm90a();
  for (int variant = 0; variant < LAYER_VARIANTS; ++variant) {
    for (int64_t T : {37, 700}) {
      th_layer_spec s = mixtral_like(T, 264, 200, 16, 4, 0xca00 + 16 * variant + T);
      apply_layer_variant(&s, variant);
      wgmma_layer_case(&s);
    }
  }
}

/* One layer variant (300 tokens, 16 experts, top 4: 75 rows per expert;
 * H = 264, K past a 64-wide box) on the wgmma path with the tiles the
 * caller's options set, permuted and gathering: each within the float64
 * bound with graph replays, and the same bits. */
static void gather_matches_permute(int variant, uint64_t seed, const char *tiles) {
  th_layer_spec spec = mixtral_like(300, 264, 200, 16, 4, seed);
  apply_layer_variant(&spec, variant);
  th_layer_data d;
  th_layer_data_make(&d, &spec);
  const size_t n = (size_t)(d.num_tokens * d.cfg.hidden_size);
  uint16_t *permuted = (uint16_t *)th_malloc(n * 2), *gathered = (uint16_t *)th_malloc(n * 2);
  {
    option_override permute("cuda.wgmma_gather", "off");
    forward_plain(th_ctx(), &d, permuted);
    hopper_layer_case(&spec, "wgmma");
  }
  {
    option_override gather("cuda.wgmma_gather", "on");
    forward_plain(th_ctx(), &d, gathered);
    hopper_layer_case(&spec, "wgmma");
  }
  TH_ASSERT(memcmp(permuted, gathered, n * 2) == 0,
            "variant %d, %s: gathered rows give other bits than permuted ones", variant, tiles);
  free(permuted);
  free(gathered);
  th_layer_data_free(&d);
}

/* GEMM1 gathering x's rows itself (cuda.wgmma_gather=on; auto does at
 * this shape's 75 rows per expert) multiplies the same values in the same
 * order as the permuted rows: the same bits, on every layer variant
 * (biases, expert map, router weight on the input, IN_OUT weights, grouped
 * routing) and both column tiles. */
Test(cuda, wgmma_gather_gives_the_permute_bits) {
  require_sm90a();
  option_override force("cuda.path", "wgmma");
  for (int variant = 0; variant < LAYER_VARIANTS; ++variant)
    for (const char *bn : {"128", "256"}) {
      option_override tile("cuda.wgmma_bn", bn);
      gather_matches_permute(variant, 0xd300 + 16 * variant, bn[0] == '1' ? "BN 128" : "BN 256");
    }
}

/* 64-row token tiles (cuda.wgmma_bm=64: BN 128, each consumer warpgroup
 * on half the columns, align padding to 64), permuted and gathering. */
Test(cuda, wgmma_64_row_tiles) {
  require_sm90a();
  option_override narrow("cuda.wgmma_bm", "64");
  option_override force("cuda.path", "wgmma");
  for (int variant = 0; variant < LAYER_VARIANTS; ++variant)
    gather_matches_permute(variant, 0xd400 + 16 * variant, "64-row tiles");
}

/* The same data through both prefill paths: each within the bound of
 * float64, and within it of each other. */
Test(cuda, wgmma_agrees_with_mma) {
  require_sm90a();
  th_layer_spec s = mixtral_like(700, 264, 200, 8, 2, 0xcb00);
  s.w13_bias = s.w2_bias = true;
  th_layer_data d;
  th_layer_data_make(&d, &s);
  const size_t n = (size_t)(d.num_tokens * d.cfg.hidden_size);
  uint16_t *wg = (uint16_t *)th_malloc(n * 2), *mma = (uint16_t *)th_malloc(n * 2);
  {
    option_override force("cuda.path", "wgmma");
    TH_ASSERT(forward_takes_wgmma(&d), "cuda.path=wgmma did not take the wgmma path");
    forward_plain(th_ctx(), &d, wg);
  }
  {
    option_override off("cuda.path", "mma");
    TH_ASSERT(!forward_takes_wgmma(&d), "cuda.path=mma took the wgmma path");
    forward_plain(th_ctx(), &d, mma);
  }
  const double err_wg = layer_error(&d, wg), err_mma = layer_error(&d, mma);
  TH_ASSERT(err_wg <= CUDA_LAYER_BOUND, "wgmma: relative error %.3g > %g", err_wg,
            CUDA_LAYER_BOUND);
  TH_ASSERT(err_mma <= CUDA_LAYER_BOUND, "mma: relative error %.3g > %g", err_mma,
            CUDA_LAYER_BOUND);
  th_check_agree(wg, mma, n, CUDA_LAYER_BOUND, "wgmma vs mma");
  cr_log_info("relative error vs float64: wgmma %.3g, mma %.3g", err_wg, err_mma);
  free(wg);
  free(mma);
  th_layer_data_free(&d);
}

/* On Hopper the default now takes the wgmma path for the tile sweep's
 * prefill sizes: the same sizes with cuda.path=mma keep the mma.sync
 * prefill tiles covered there. */
Test(cuda, layer_tile_sweep_mma_prefill) {
  require_cuda();
  option_override off("cuda.path", "mma");
  const int64_t tokens[] = {300, 2100};
  for (size_t i = 0; i < sizeof tokens / sizeof tokens[0]; ++i) {
    th_layer_spec s = mixtral_like(tokens[i], 256, 384, 8, 2, 0xcc00 + i);
    layer_case(&s);
  }
}

/* ---- the Hopper weight-streaming path (gemm_stream.cu) ------------------ */

/* Token counts that give each token block (16, 32, 64 and 128 rows: 10,
 * 25, 50 and 75 rows per expert with 8 experts and top-2, when forced),
 * one token (a block of one real row), and many experts with few rows each; H and I multiples of 8
 * but not of 64 or 128 (TMA's zero fill past K, a box wholly past K in the
 * last step, features past n in the last item). */
Test(cuda, stream_layer_shapes) {
  require_sm90a();
  const int64_t tokens[] = {1, 37, 100, 200, 300};
  for (size_t i = 0; i < sizeof tokens / sizeof tokens[0]; ++i) {
    th_layer_spec s = mixtral_like(tokens[i], 264, 200, 8, 2, 0xcd00 + i);
    hopper_layer_case(&s, "stream");
    th_layer_spec many = mixtral_like(tokens[i], 264, 200, 64, 6, 0xcd10 + i);
    many.cfg.router_weight = MOE_ROUTER_WEIGHT_ON_INPUT;
    many.w13_bias = many.w2_bias = true;
    hopper_layer_case(&many, "stream");
  }
}

/* Long K (9 and 5 steps of 128: the ring wraps, and a persistent CTA walks
 * several items) and more items than SMs. */
Test(cuda, stream_layer_long_k) {
  require_sm90a();
  th_layer_spec s = mixtral_like(60, 1032, 520, 8, 2, 0xce00);
  s.w13_bias = s.w2_bias = true;
  hopper_layer_case(&s, "stream");
  th_layer_spec wide = mixtral_like(20, 2048, 1536, 32, 4, 0xce01);
  hopper_layer_case(&wide, "stream");
}

/* Few items against the SMs: GEMM1 (288 items of 16 k steps) is split in
 * 3 ranges of K and GEMM2 (144 items) in 4 on a 132-SM device
 * (cuda_stream_splits); replays check that the split counters are left at
 * zero and the fixed-order sum gives the same bits. */
Test(cuda, stream_layer_split_k) {
  require_sm90a();
  th_layer_spec s = mixtral_like(8, 2048, 2048, 8, 2, 0xce10);
  hopper_layer_case(&s, "stream");
  th_layer_spec bias = mixtral_like(8, 2048, 2048, 8, 2, 0xce11);
  bias.w13_bias = bias.w2_bias = true;
  bias.cfg.activation = MOE_ACTIVATION_SWIGLU_CLAMP;
  hopper_layer_case(&bias, "stream");
}

Test(cuda, stream_layer_variants) {
  require_sm90a();
  for (int variant = 0; variant < LAYER_VARIANTS; ++variant) {
    for (int64_t T : {5, 37, 150}) {
      th_layer_spec s = mixtral_like(T, 264, 200, 16, 4, 0xcf00 + 16 * variant + T);
      apply_layer_variant(&s, variant);
      hopper_layer_case(&s, "stream");
    }
  }
}

/* The launch choices of the streaming GEMM besides the defaults (two CTAs
 * per SM at token block 16, overlapped launches, static schedule, token
 * block fastest): one CTA per SM, plain launches, the dynamic schedule,
 * grouped rasters and stages of 256 elements of K (K = 264 leaves three
 * boxes of its last stage wholly past K), on shapes with biases, the
 * router weight on the input and a wrapping ring. */
Test(cuda, stream_launch_options) {
  require_sm90a();
  const char *const settings[][2] = {
      {"cuda.stream_ctas", "1"},           {"cuda.stream_overlap", "off"},
      {"cuda.stream_schedule", "dynamic"}, {"cuda.stream_group", "1"},
      {"cuda.stream_group", "3"},          {"cuda.stream_k", "256"}};
  for (size_t i = 0; i < sizeof settings / sizeof settings[0]; ++i) {
    option_override choice(settings[i][0], settings[i][1]);
    for (int64_t T : {1, 8, 37}) {
      th_layer_spec s = mixtral_like(T, 1032, 520, 16, 2, 0xd100 + 8 * i + T);
      s.w13_bias = s.w2_bias = true;
      hopper_layer_case(&s, "stream");
      th_layer_spec many = mixtral_like(T, 264, 200, 64, 6, 0xd180 + 8 * i + T);
      many.cfg.router_weight = MOE_ROUTER_WEIGHT_ON_INPUT;
      hopper_layer_case(&many, "stream");
    }
    th_layer_spec split = mixtral_like(8, 2048, 2048, 8, 2, 0xd1f0 + i);
    hopper_layer_case(&split, "stream");
  }
}

/* Which CTA computes a work item changes no bit: the dynamic schedule and
 * another raster give the static schedule's output exactly (split K
 * included), replay after replay (the claim counters are left at zero). */
Test(cuda, stream_schedules_give_the_same_bits) {
  require_sm90a();
  option_override force("cuda.path", "stream");
  const th_layer_spec specs[] = {mixtral_like(37, 1032, 520, 16, 2, 0xd200),
                                 mixtral_like(8, 2048, 2048, 8, 2, 0xd201),
                                 mixtral_like(150, 264, 200, 64, 6, 0xd202)};
  for (const th_layer_spec &spec : specs) {
    th_layer_data d;
    th_layer_data_make(&d, &spec);
    const size_t n = (size_t)(d.num_tokens * d.cfg.hidden_size);
    uint16_t *base = (uint16_t *)th_malloc(n * 2), *other = (uint16_t *)th_malloc(n * 2);
    forward_plain(th_ctx(), &d, base);
    const char *const settings[][2] = {{"cuda.stream_schedule", "dynamic"},
                                       {"cuda.stream_group", "1"}};
    for (const auto &setting : settings) {
      option_override choice(setting[0], setting[1]);
      for (int again = 0; again < 3; ++again) {
        forward_plain(th_ctx(), &d, other);
        TH_ASSERT(memcmp(base, other, n * 2) == 0, "T=%lld %s=%s, run %d: bits differ",
                  (long long)d.num_tokens, setting[0], setting[1], again);
      }
    }
    free(base);
    free(other);
    th_layer_data_free(&d);
  }
}

/* By default the streaming path takes the rows per expert below the wgmma
 * tiles' threshold, past the decode rule; the same data through the
 * streaming path and the mma.sync tiles agree within the bound. */
Test(cuda, stream_default_and_agrees_with_mma) {
  require_sm90a();
  th_layer_spec s = mixtral_like(40, 264, 200, 8, 2, 0xd000);
  s.w13_bias = s.w2_bias = true;
  th_layer_data d;
  th_layer_data_make(&d, &s);
  const hopper_kernels seen = forward_kernels(&d);
  TH_ASSERT(seen.stream && !seen.wgmma, "40 tokens, 10 rows per expert: stream %d, wgmma %d",
            seen.stream, seen.wgmma);
  const size_t n = (size_t)(d.num_tokens * d.cfg.hidden_size);
  uint16_t *st = (uint16_t *)th_malloc(n * 2), *mma = (uint16_t *)th_malloc(n * 2);
  forward_plain(th_ctx(), &d, st);
  {
    option_override off("cuda.path", "mma");
    const hopper_kernels none = forward_kernels(&d);
    TH_ASSERT(!none.stream && !none.wgmma, "cuda.path=mma took a Hopper path");
    forward_plain(th_ctx(), &d, mma);
  }
  const double err_st = layer_error(&d, st), err_mma = layer_error(&d, mma);
  TH_ASSERT(err_st <= CUDA_LAYER_BOUND, "stream: relative error %.3g > %g", err_st,
            CUDA_LAYER_BOUND);
  TH_ASSERT(err_mma <= CUDA_LAYER_BOUND, "mma: relative error %.3g > %g", err_mma,
            CUDA_LAYER_BOUND);
  th_check_agree(st, mma, n, CUDA_LAYER_BOUND, "stream vs mma");
  cr_log_info("relative error vs float64: stream %.3g, mma %.3g", err_st, err_mma);
  free(st);
  free(mma);
  th_layer_data_free(&d);
}
