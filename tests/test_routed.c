/*
 * test_routed.c - routing in and out of the layer, and chunked batches:
 * moe_layer_forward_capture writes the picks it routed by and gives the
 * bits of moe_layer_forward; moe_layer_forward_routed on those picks gives
 * the same bits again (replay), on every backend and path (token counts
 * that reach CUDA's decode, stream and tile paths); the routed forward
 * against float64 on arbitrary picks, with -1 ids and expert maps; ids
 * outside [-1, E) (rejected on the CPU, contributing nothing on GPUs); and
 * moe_layer_set_chunking running a batch larger than the reservation with
 * the bits of forwards of its chunks.
 */
#include "harness.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

TestSuite(routed, .fini = th_suite_fini);

#define LAYER_BOUND 1e-2

typedef struct run_buffers {
  moe_buffer *x, *logits, *ids, *weights, *out;
} run_buffers;

static moe_layer *make_layer(const th_layer_data *d, int64_t reserve) {
  moe_layer *layer = NULL;
  TH_OK(moe_layer_create(th_ctx(), &d->cfg, &d->weights, &layer));
  TH_OK(moe_layer_reserve(layer, reserve));
  return layer;
}

static run_buffers buffers_make(const th_layer_data *d) {
  const int64_t T = d->num_tokens, H = d->cfg.hidden_size, E = d->cfg.num_experts;
  const size_t slots = (size_t)(T * d->cfg.top_k);
  run_buffers b = {
      .x = th_upload(th_ctx(), d->x, (size_t)(T * H) * 2),
      .logits = th_upload(th_ctx(), d->logits, (size_t)(T * E) * 4),
      .ids = th_output(th_ctx(), slots * 4),
      .weights = th_output(th_ctx(), slots * 4),
      .out = th_output(th_ctx(), (size_t)(T * H) * 2),
  };
  return b;
}

static void buffers_free(run_buffers *b) {
  moe_buffer_destroy(b->x);
  moe_buffer_destroy(b->logits);
  moe_buffer_destroy(b->ids);
  moe_buffer_destroy(b->weights);
  moe_buffer_destroy(b->out);
}

/* Capture, then replay: the capture's output equals moe_layer_forward's,
 * its picks are the float64 routing's, and the routed forward on them
 * gives the same bits again. */
static void capture_replay_case(th_layer_spec spec) {
  th_layer_data d;
  th_layer_data_make(&d, &spec);
  const int64_t T = d.num_tokens, H = d.cfg.hidden_size, k = d.cfg.top_k;
  const size_t out_bytes = (size_t)(T * H) * 2, slot_bytes = (size_t)(T * k) * 4;
  moe_layer *layer = make_layer(&d, T);
  run_buffers b = buffers_make(&d);
  uint16_t *plain = th_malloc(out_bytes), *captured = th_malloc(out_bytes);
  uint16_t *replayed = th_malloc(out_bytes);
  int32_t *ids = th_malloc(slot_bytes);
  float *weights = th_malloc(slot_bytes);

  TH_OK(moe_layer_forward(layer, T, b.x, b.logits, b.out));
  th_download(b.out, plain, out_bytes);
  th_refill(b.out);
  TH_OK(moe_layer_forward_capture(layer, T, b.x, b.logits, b.out, b.ids, b.weights));
  th_download(b.out, captured, out_bytes);
  th_download(b.ids, ids, slot_bytes);
  th_download(b.weights, weights, slot_bytes);
  th_check_guard(b.ids, slot_bytes, "topk_ids");
  th_check_guard(b.weights, slot_bytes, "topk_weights");
  TH_ASSERT(memcmp(plain, captured, out_bytes) == 0,
            "moe_layer_forward_capture's output differs from moe_layer_forward's");
  th_check_route(&d.cfg, T, d.logits, d.correction_bias, ids, weights);

  th_refill(b.out);
  TH_OK(moe_layer_forward_routed(layer, T, b.x, b.ids, b.weights, b.out));
  th_download(b.out, replayed, out_bytes);
  th_check_guard(b.out, out_bytes, "out");
  TH_ASSERT(memcmp(plain, replayed, out_bytes) == 0,
            "the routed forward on the captured picks differs from the logits forward");

  double *ref = th_malloc((size_t)(T * H) * sizeof(double));
  ref_layer_forward(&d.cfg, &d.weights, T, d.x, d.logits, true, ref);
  const double err = th_rel_error(replayed, ref, (size_t)(T * H));
  TH_ASSERT(err <= LAYER_BOUND, "relative Frobenius error %.3g vs float64 > %g", err, LAYER_BOUND);
  free(ref);
  free(plain);
  free(captured);
  free(replayed);
  free(ids);
  free(weights);
  buffers_free(&b);
  moe_layer_destroy(layer);
  th_layer_data_free(&d);
}

static th_layer_spec spec(int64_t T, int64_t H, int64_t I, int32_t E, int32_t k, uint64_t seed) {
  th_layer_spec s = {.num_tokens = T, .seed = seed};
  s.cfg = th_config(H, I, E, k);
  s.cfg.renormalize = 1;
  return s;
}

Test(routed, capture_replay_token_counts) {
  /* 1 and 4 tokens reach CUDA's decode path, 40 its stream or tile path,
   * 300 the larger tiles. */
  const int64_t counts[] = {1, 4, 40, 300};
  for (size_t i = 0; i < sizeof counts / sizeof counts[0]; ++i)
    capture_replay_case(spec(counts[i], 64, 96, 16, 4, 0x1500 + i));
}

Test(routed, capture_replay_options) {
  th_layer_spec s = spec(24, 64, 32, 16, 4, 0x1510);
  s.cfg.scoring = MOE_SCORING_SIGMOID;
  s.cfg.num_groups = 4;
  s.cfg.topk_groups = 2;
  s.cfg.group_scoring = MOE_GROUP_SCORING_TOP2_SUM;
  s.cfg.routed_scaling_factor = 2.5f;
  s.correction_bias = true;
  capture_replay_case(s);

  s = spec(24, 64, 32, 16, 4, 0x1511);
  s.cfg.num_local_experts = 6;
  s.map = TH_MAP_PARTIAL;
  s.w13_bias = s.w2_bias = true;
  capture_replay_case(s);

  s = spec(9, 64, 32, 8, 1, 0x1512);
  s.cfg.router_weight = MOE_ROUTER_WEIGHT_ON_INPUT;
  s.cfg.activation = MOE_ACTIVATION_SWIGLU_CLAMP;
  s.cfg.weight_layout = MOE_WEIGHT_LAYOUT_IN_OUT;
  capture_replay_case(s);
}

/* Arbitrary picks (duplicates in a row allowed, a quarter of them -1, any
 * weights): the routed forward against float64. */
static void routed_case(th_layer_spec s, int32_t bad_id) {
  th_layer_data d;
  th_layer_data_make(&d, &s);
  const int64_t T = d.num_tokens, H = d.cfg.hidden_size, k = d.cfg.top_k;
  const int32_t E = d.cfg.num_experts;
  const size_t slots = (size_t)(T * k), out_bytes = (size_t)(T * H) * 2;
  int32_t *ids = th_malloc(slots * 4);
  float *weights = th_malloc(slots * 4);
  th_rng rng = th_rng_make(s.seed ^ 0x77);
  for (size_t i = 0; i < slots; ++i) {
    ids[i] = th_rng_below(&rng, 4) == 0 ? -1 : (int32_t)th_rng_below(&rng, E);
    weights[i] = (float)th_rng_uniform(&rng);
  }
  ids[0] = -1; /* at least one -1 for the out-of-range variant to replace */
  moe_layer *layer = make_layer(&d, T);
  moe_buffer *x = th_upload(th_ctx(), d.x, (size_t)(T * H) * 2);
  moe_buffer *b_ids = th_upload(th_ctx(), ids, slots * 4);
  moe_buffer *b_weights = th_upload(th_ctx(), weights, slots * 4);
  moe_buffer *out = th_output(th_ctx(), out_bytes);
  uint16_t *lib = th_malloc(out_bytes);
  TH_OK(moe_layer_forward_routed(layer, T, x, b_ids, b_weights, out));
  th_download(out, lib, out_bytes);
  th_check_guard(out, out_bytes, "out");
  double *ref = th_malloc((size_t)(T * H) * sizeof(double));
  ref_layer_forward_routed(&d.cfg, &d.weights, T, d.x, ids, weights, true, ref);
  for (size_t i = 0; i < (size_t)(T * H); ++i)
    TH_ASSERT(isfinite(th_bf16_to_float(lib[i])), "out[%zu] is not finite", i);
  const double err = th_rel_error(lib, ref, (size_t)(T * H));
  TH_ASSERT(err <= LAYER_BOUND, "relative Frobenius error %.3g vs float64 > %g", err, LAYER_BOUND);

  if (bad_id != -1) {
    /* The same picks with some -1 replaced by an id outside [-1, E): the
     * CPU rejects them (before touching out); a GPU skips them, so the
     * output is bitwise the output with -1 there. */
    for (size_t i = 0; i < slots; ++i)
      if (ids[i] == -1 && i % 2 == 0) ids[i] = bad_id;
    TH_OK(moe_buffer_write(b_ids, 0, ids, slots * 4));
    th_refill(out);
    const moe_status st = moe_layer_forward_routed(layer, T, x, b_ids, b_weights, out);
    if (moe_context_backend(th_ctx()) == MOE_BACKEND_CPU) {
      TH_ASSERT(st == MOE_ERROR_INVALID_ARGUMENT, "an id of %d gave %s, want INVALID_ARGUMENT",
                bad_id, moe_status_string(st));
      th_check_untouched(out, "out");
    } else {
      TH_OK(st);
      uint16_t *skipped = th_malloc(out_bytes);
      th_download(out, skipped, out_bytes);
      TH_ASSERT(memcmp(lib, skipped, out_bytes) == 0,
                "an id of %d on %s changed the output; it must contribute nothing", bad_id,
                th_backend_name());
      free(skipped);
    }
  }
  free(ref);
  free(lib);
  free(ids);
  free(weights);
  moe_buffer_destroy(x);
  moe_buffer_destroy(b_ids);
  moe_buffer_destroy(b_weights);
  moe_buffer_destroy(out);
  moe_layer_destroy(layer);
  th_layer_data_free(&d);
}

Test(routed, arbitrary_picks_vs_float64) {
  routed_case(spec(1, 64, 96, 16, 4, 0x1520), -1);
  routed_case(spec(37, 72, 40, 8, 2, 0x1521), -1);
  routed_case(spec(200, 64, 32, 32, 8, 0x1522), -1);
  th_layer_spec s = spec(30, 64, 32, 16, 4, 0x1523);
  s.cfg.num_local_experts = 5;
  s.map = TH_MAP_PARTIAL;
  s.w2_bias = true;
  routed_case(s, -1);
  s = spec(30, 64, 32, 16, 4, 0x1524);
  s.cfg.router_weight = MOE_ROUTER_WEIGHT_ON_INPUT;
  routed_case(s, -1);
}

Test(routed, ids_out_of_range) {
  routed_case(spec(12, 64, 32, 16, 4, 0x1530), 16);
  routed_case(spec(12, 64, 32, 16, 4, 0x1531), -5);
  routed_case(spec(2, 64, 32, 16, 4, 0x1532), 1 << 30);
}

Test(routed, all_ids_minus_one_give_zero) {
  th_layer_spec s = spec(5, 64, 32, 8, 2, 0x1540);
  th_layer_data d;
  th_layer_data_make(&d, &s);
  const int64_t T = 5, H = 64;
  int32_t ids[10];
  float weights[10];
  for (int i = 0; i < 10; ++i) {
    ids[i] = -1;
    weights[i] = 1.0f;
  }
  moe_layer *layer = make_layer(&d, T);
  moe_buffer *x = th_upload(th_ctx(), d.x, (size_t)(T * H) * 2);
  moe_buffer *b_ids = th_upload(th_ctx(), ids, sizeof ids);
  moe_buffer *b_weights = th_upload(th_ctx(), weights, sizeof weights);
  moe_buffer *out = th_output(th_ctx(), (size_t)(T * H) * 2);
  uint16_t lib[5 * 64];
  TH_OK(moe_layer_forward_routed(layer, T, x, b_ids, b_weights, out));
  th_download(out, lib, sizeof lib);
  for (int i = 0; i < 5 * 64; ++i)
    TH_ASSERT((lib[i] & 0x7fff) == 0, "out[%d] = 0x%04x, want 0 (no expert picked)", i, lib[i]);
  moe_buffer_destroy(x);
  moe_buffer_destroy(b_ids);
  moe_buffer_destroy(b_weights);
  moe_buffer_destroy(out);
  moe_layer_destroy(layer);
  th_layer_data_free(&d);
}

/* Chunking: a layer reserved for R tokens runs T > R only when asked to,
 * and then gives, for each of the three forwards, the bits of separate
 * forwards of its chunks of R (CUDA and OpenCL pick tiles by the batch, so
 * chunk-wise bits are the promise on every backend). */
Test(routed, chunked_batches) {
  const int64_t R = 7, T = 30;
  th_layer_spec s = spec(T, 64, 48, 16, 4, 0x1550);
  s.cfg.num_local_experts = 12;
  s.map = TH_MAP_PARTIAL;
  th_layer_data d;
  th_layer_data_make(&d, &s);
  const int64_t H = d.cfg.hidden_size, E = d.cfg.num_experts, k = d.cfg.top_k;
  const size_t out_bytes = (size_t)(T * H) * 2, slot_bytes = (size_t)(T * k) * 4;
  moe_layer *layer = make_layer(&d, R);
  run_buffers b = buffers_make(&d);

  moe_status st = moe_layer_forward(layer, T, b.x, b.logits, b.out);
  TH_ASSERT(st == MOE_ERROR_NOT_RESERVED, "T = %lld above the reservation without chunking: %s",
            (long long)T, moe_status_string(st));
  th_check_untouched(b.out, "out");

  /* The expected bits: each chunk alone, on buffers of the chunk. */
  uint16_t *want = th_malloc(out_bytes);
  int32_t *want_ids = th_malloc(slot_bytes);
  float *want_weights = th_malloc(slot_bytes);
  for (int64_t t0 = 0; t0 < T; t0 += R) {
    const int64_t n = T - t0 < R ? T - t0 : R;
    moe_buffer *x = th_upload(th_ctx(), d.x + t0 * H, (size_t)(n * H) * 2);
    moe_buffer *logits = th_upload(th_ctx(), d.logits + t0 * E, (size_t)(n * E) * 4);
    moe_buffer *ids = th_output(th_ctx(), (size_t)(n * k) * 4);
    moe_buffer *weights = th_output(th_ctx(), (size_t)(n * k) * 4);
    moe_buffer *out = th_output(th_ctx(), (size_t)(n * H) * 2);
    TH_OK(moe_layer_forward_capture(layer, n, x, logits, out, ids, weights));
    th_download(out, want + t0 * H, (size_t)(n * H) * 2);
    th_download(ids, want_ids + t0 * k, (size_t)(n * k) * 4);
    th_download(weights, want_weights + t0 * k, (size_t)(n * k) * 4);
    moe_buffer_destroy(x);
    moe_buffer_destroy(logits);
    moe_buffer_destroy(ids);
    moe_buffer_destroy(weights);
    moe_buffer_destroy(out);
  }

  TH_OK(moe_layer_set_chunking(layer, 1));
  uint16_t *got = th_malloc(out_bytes);
  int32_t *got_ids = th_malloc(slot_bytes);
  float *got_weights = th_malloc(slot_bytes);
  TH_OK(moe_layer_forward(layer, T, b.x, b.logits, b.out));
  th_download(b.out, got, out_bytes);
  th_check_guard(b.out, out_bytes, "out");
  TH_ASSERT(memcmp(got, want, out_bytes) == 0, "chunked moe_layer_forward differs from its chunks");

  th_refill(b.out);
  TH_OK(moe_layer_forward_capture(layer, T, b.x, b.logits, b.out, b.ids, b.weights));
  th_download(b.out, got, out_bytes);
  th_download(b.ids, got_ids, slot_bytes);
  th_download(b.weights, got_weights, slot_bytes);
  th_check_guard(b.ids, slot_bytes, "topk_ids");
  TH_ASSERT(memcmp(got, want, out_bytes) == 0, "chunked capture's output differs from its chunks");
  TH_ASSERT(memcmp(got_ids, want_ids, slot_bytes) == 0 &&
                memcmp(got_weights, want_weights, slot_bytes) == 0,
            "chunked capture's picks differ from its chunks'");

  th_refill(b.out);
  TH_OK(moe_layer_forward_routed(layer, T, b.x, b.ids, b.weights, b.out));
  th_download(b.out, got, out_bytes);
  TH_ASSERT(memcmp(got, want, out_bytes) == 0, "chunked routed forward differs from its chunks");

  double *ref = th_malloc((size_t)(T * H) * sizeof(double));
  ref_layer_forward(&d.cfg, &d.weights, T, d.x, d.logits, true, ref);
  const double err = th_rel_error(got, ref, (size_t)(T * H));
  TH_ASSERT(err <= LAYER_BOUND, "relative Frobenius error %.3g vs float64 > %g", err, LAYER_BOUND);

  /* Off again: NOT_RESERVED again. */
  TH_OK(moe_layer_set_chunking(layer, 0));
  st = moe_layer_forward_routed(layer, T, b.x, b.ids, b.weights, b.out);
  TH_ASSERT(st == MOE_ERROR_NOT_RESERVED, "chunking off: %s", moe_status_string(st));
  free(ref);
  free(want);
  free(want_ids);
  free(want_weights);
  free(got);
  free(got_ids);
  free(got_weights);
  buffers_free(&b);
  moe_layer_destroy(layer);
  th_layer_data_free(&d);
}
