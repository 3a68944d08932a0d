/*
 * fuzz_api.c - libFuzzer target moe_fuzz_api: every public call of
 * include/moe.h on arguments decoded from the input, valid or not.
 *
 * An input is a sequence of up to MAX_ACTIONS actions; each decodes the
 * arguments of one call (or of a layer's create/reserve/forward/destroy)
 * from the following bytes. Arguments come from a generator of valid
 * values that may then break one of them on purpose (a garbage enum, a
 * size <= 0 or beyond the maxima, NULL, a buffer too small or of the other
 * context, a forward beyond the reservation), or, for configurations, from
 * raw bytes. Checks, on top of ASan/UBSan:
 *   - a known status; on error a non-empty moe_last_error of the right
 *     context (messages are emptied before each call);
 *   - an argument broken on purpose is rejected; all-valid arguments are
 *     accepted (shapes are small, so nothing runs out of memory);
 *   - on error every output is untouched (guard bytes, pointer outputs);
 *     on success nothing is written past what the shapes need, inputs are
 *     never written, and rows that align skipped are neither written
 *     (grouped GEMM) nor read (top-k reduce: they hold NaN);
 *   - moe_layer_forward allocates nothing within its reservation and
 *     reruns bit for bit.
 * Shapes stay small (H, I <= 64, T <= 64, E <= 64 for layers) so that a run
 * takes microseconds. Stages and layers run only where the backend table
 * has the entry (the CPU backend fills it as it lands).
 */
#define _GNU_SOURCE /* dladdr */
#include "fuzz_common.h"

/* Internal: only to see which entries the backend table has filled. */
#include "internal.h"

#include <dlfcn.h>
#include <math.h>
#include <sanitizer/allocator_interface.h>
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ACTIONS 8
#define MAX_DIM 64
#define MAX_LAYER_EXPERTS 64
#define TWO_POW_30 ((int64_t)1 << 30)

static moe_context *ctx_main, *ctx_other;
static moe_context *all_contexts[2];

/* ---- Helpers ---------------------------------------------------------- */

/* a * b * elem, or SIZE_MAX when negative or beyond size_t: no buffer of
 * that size can exist, so fuzz_buffer_make makes a too small one. */
static size_t bytes_of(int64_t a, int64_t b, size_t elem) {
  size_t ab, size;
  if (a < 0 || b < 0) return SIZE_MAX;
  if (__builtin_mul_overflow((size_t)a, (size_t)b, &ab) || __builtin_mul_overflow(ab, elem, &size))
    return SIZE_MAX;
  return size;
}

/* a * b * c * elem, likewise. */
static size_t bytes_of3(int64_t a, int64_t b, int64_t c, size_t elem) {
  size_t ab = bytes_of(a, b, 1);
  if (ab == SIZE_MAX || c < 0) return SIZE_MAX;
  size_t abc, size;
  if (__builtin_mul_overflow(ab, (size_t)c, &abc) || __builtin_mul_overflow(abc, elem, &size))
    return SIZE_MAX;
  return size;
}

static bool is_power_of_two(int64_t v) {
  return v > 0 && (v & (v - 1)) == 0;
}

/* The bf16 of a small float (exact for the values used here). */
static uint16_t bf16_of(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  return (uint16_t)(bits >> 16);
}

/* n bf16 values, finite and small, from a seed. */
static uint16_t *small_bf16(size_t n, uint32_t seed) {
  uint16_t *v = malloc(n * 2 + 2);
  FUZZ_CHECK(v, "out of host memory");
  for (size_t i = 0; i < n; ++i) {
    seed = seed * 1664525u + 1013904223u;
    v[i] = bf16_of((float)((int)(seed >> 28) - 8) * 0.125f);
  }
  return v;
}

/* The rest of the input as fill for input tensors (raw bits: NaN, inf and
 * denormals included); NULL when it is used up (then a guard pattern). */
static const void *rest(const fuzz_input *in, size_t *bytes) {
  *bytes = in->size - in->pos;
  return *bytes ? in->data + in->pos : NULL;
}

/* An int64 from interesting values: negative, zero, small, and huge. */
static int64_t decode_count(fuzz_input *in, int64_t small_max) {
  static const int64_t odd[] = {
      -1, INT64_MIN, (int64_t)INT32_MAX, (int64_t)1 << 31, (int64_t)1 << 40, INT64_MAX};
  uint8_t mode = fuzz_u8(in);
  if (mode < 232) return fuzz_range(in, 0, small_max);
  return odd[mode % (sizeof odd / sizeof odd[0])];
}

/* A power of two in [1, 256], or (rarely) something else. */
static int32_t decode_block_m(fuzz_input *in) {
  static const int64_t odd[] = {0, -1, 3, 24, 512, INT32_MIN, INT32_MAX, 255};
  uint8_t mode = fuzz_u8(in);
  if (mode < 240) return 1 << (mode % 9);
  return (int32_t)odd[mode % 8];
}

/* ---- Configurations --------------------------------------------------- */

typedef enum config_kind {
  CONFIG_VALID,
  CONFIG_BROKEN_ROUTING, /* invalid in a field routing reads */
  CONFIG_BROKEN_LAYER,   /* invalid only in a field routing ignores */
  CONFIG_RAW,            /* arbitrary; no expectation */
} config_kind;

/* A valid routing subset: E in [1, max_experts], top_k, groups, etc. */
static void decode_valid_routing(fuzz_input *in, moe_config *cfg, int32_t max_experts) {
  cfg->num_experts = (int32_t)fuzz_range(in, 1, max_experts);
  cfg->scoring = fuzz_bool(in) ? MOE_SCORING_SIGMOID : MOE_SCORING_SOFTMAX;
  cfg->renormalize = fuzz_bool(in);
  cfg->group_scoring = fuzz_bool(in) ? MOE_GROUP_SCORING_TOP2_SUM : MOE_GROUP_SCORING_MAX;
  float scale = fuzz_bool(in) ? 1.0f : fuzz_float(in);
  cfg->routed_scaling_factor = isfinite(scale) ? scale : 2.5f;
  int32_t groups = (int32_t)fuzz_range(in, 0, 8);
  if (groups > cfg->num_experts || cfg->num_experts % (groups ? groups : 1) != 0) groups = 0;
  cfg->num_groups = groups;
  int32_t max_k = cfg->num_experts < MOE_MAX_TOP_K ? cfg->num_experts : MOE_MAX_TOP_K;
  cfg->top_k = (int32_t)fuzz_range(in, 1, max_k < 8 ? max_k : 8);
  cfg->topk_groups = 0;
  if (groups > 1) {
    int32_t group_size = cfg->num_experts / groups;
    cfg->topk_groups = (int32_t)fuzz_range(in, 1, groups);
    int32_t needed = (cfg->top_k + group_size - 1) / group_size;
    if (cfg->topk_groups < needed) cfg->topk_groups = needed;
  }
}

/* Breaks one field of a valid config so that validation must fail;
 * returns whether routing reads that field. */
static bool break_config(fuzz_input *in, moe_config *cfg) {
  static const int64_t bad_size[] = {0, -1, INT64_MIN, TWO_POW_30 + 1, INT64_MAX};
  static const int64_t bad_count[] = {0, -1, INT32_MIN, MOE_MAX_EXPERTS + 1, INT32_MAX};
  static const int64_t bad_enum[] = {-1, 2, 3, 100, INT32_MAX, INT32_MIN};
  const float not_finite[] = {NAN, INFINITY, -INFINITY};
  const uint8_t which = fuzz_u8(in) % 19;
  const int64_t pick = fuzz_u8(in);
  switch (which) {
  case 0:
    cfg->hidden_size = bad_size[pick % 5];
    return false;
  case 1:
    cfg->intermediate_size = bad_size[pick % 5];
    return false;
  case 2:
    cfg->num_experts = (int32_t)bad_count[pick % 5];
    return true;
  case 3:
    cfg->top_k = pick % 2 ? 0 : (pick % 4 ? MOE_MAX_TOP_K + 1 : -5);
    return true;
  case 4: /* top_k above E */
    cfg->num_experts = (int32_t)(1 + pick % (MOE_MAX_TOP_K - 1));
    cfg->top_k = cfg->num_experts + 1;
    cfg->num_groups = 0;
    return true;
  case 5:
    cfg->scoring = (moe_scoring)bad_enum[pick % 6];
    return true;
  case 6:
    cfg->group_scoring = (moe_group_scoring)bad_enum[pick % 6];
    return true;
  case 7:
    cfg->routed_scaling_factor = not_finite[pick % 3];
    return true;
  case 8:
    cfg->num_groups = pick % 2 ? -1 : (pick % 4 ? MOE_MAX_GROUPS + 1 : INT32_MIN);
    return true;
  case 9: { /* groups that do not divide E */
    if (cfg->num_experts < 2) cfg->num_experts = 2;
    int32_t g = 2;
    while (cfg->num_experts % g == 0)
      g++;
    cfg->num_groups = g;
    cfg->topk_groups = 1;
    cfg->top_k = 1;
    return true;
  }
  case 10:   /* topk_groups outside [1, G] */
  case 11: { /* top_k beyond the kept groups: 8 experts, 4 groups, 1 kept */
    cfg->num_experts = 8;
    cfg->num_groups = 4;
    cfg->top_k = which == 10 ? 1 : 3;
    cfg->topk_groups = which == 10 ? (pick % 2 ? 0 : 5) : 1;
    return true;
  }
  case 12:
    cfg->num_local_experts = (int32_t)(pick % 2 ? -1 : MOE_MAX_EXPERTS + 1);
    return false;
  case 13: /* bad_enum without 2, a valid activation */
    cfg->activation = (moe_activation)(bad_enum[pick % 6] == 2 ? 3 : bad_enum[pick % 6]);
    return false;
  case 14:
    cfg->activation = MOE_ACTIVATION_SWIGLU_CLAMP;
    cfg->swiglu_alpha = not_finite[pick % 3];
    return false;
  case 15:
    cfg->activation = MOE_ACTIVATION_SWIGLU_CLAMP;
    cfg->swiglu_limit = pick % 2 ? NAN : (pick % 4 ? 0.0f : -1.0f);
    return false;
  case 16:
    cfg->weight_layout = (moe_weight_layout)bad_enum[pick % 6];
    return false;
  case 17:
    cfg->router_weight = (moe_router_weight)bad_enum[pick % 6];
    return false;
  default:
    cfg->hidden_size = bad_size[pick % 2];
    return false;
  }
}

/* A configuration: valid (small), broken in one field, or raw. */
static config_kind decode_config(fuzz_input *in, moe_config *cfg, int32_t max_experts) {
  moe_config_init(cfg);
  const uint8_t mode = fuzz_u8(in);
  if (mode >= 240) {
    cfg->hidden_size = (int64_t)fuzz_u64(in);
    cfg->intermediate_size = (int64_t)fuzz_u64(in);
    cfg->num_experts = (int32_t)fuzz_u32(in);
    cfg->num_local_experts = (int32_t)fuzz_u32(in);
    cfg->top_k = (int32_t)fuzz_u32(in);
    cfg->scoring = (moe_scoring)fuzz_u32(in);
    cfg->renormalize = (int32_t)fuzz_u32(in);
    cfg->num_groups = (int32_t)fuzz_u32(in);
    cfg->topk_groups = (int32_t)fuzz_u32(in);
    cfg->group_scoring = (moe_group_scoring)fuzz_u32(in);
    cfg->routed_scaling_factor = fuzz_float(in);
    cfg->activation = (moe_activation)fuzz_u32(in);
    cfg->swiglu_alpha = fuzz_float(in);
    cfg->swiglu_limit = fuzz_float(in);
    cfg->weight_layout = (moe_weight_layout)fuzz_u32(in);
    cfg->router_weight = (moe_router_weight)fuzz_u32(in);
    return CONFIG_RAW;
  }
  cfg->hidden_size = fuzz_range(in, 1, MAX_DIM);
  cfg->intermediate_size = fuzz_range(in, 1, MAX_DIM);
  decode_valid_routing(in, cfg, max_experts);
  cfg->activation = (moe_activation)fuzz_range(in, 0, 2);
  if (fuzz_bool(in)) {
    float alpha = fuzz_float(in), limit = fabsf(fuzz_float(in));
    cfg->swiglu_alpha = isfinite(alpha) ? alpha : 1.0f;
    cfg->swiglu_limit = limit > 0.0f ? limit : 3.0f;
  }
  cfg->weight_layout = (moe_weight_layout)fuzz_range(in, 0, 1);
  cfg->router_weight = (moe_router_weight)fuzz_range(in, 0, 1);
  /* 0 (= E) or E; other values need an expert map, chosen by the caller. */
  cfg->num_local_experts = fuzz_bool(in) ? 0 : cfg->num_experts;
  if (mode < 120) return CONFIG_VALID;
  return break_config(in, cfg) ? CONFIG_BROKEN_ROUTING : CONFIG_BROKEN_LAYER;
}

/* ---- Actions ---------------------------------------------------------- */

static void fuzz_config_validate(fuzz_input *in) {
  moe_config cfg;
  config_kind kind = decode_config(in, &cfg, MOE_MAX_EXPERTS);
  const bool null_cfg = fuzz_u8(in) < 8;
  fuzz_clear_errors(all_contexts, 2);
  moe_status st = moe_config_validate(null_cfg ? NULL : &cfg);
  fuzz_check_status("moe_config_validate", st, NULL,
                    null_cfg || kind == CONFIG_BROKEN_ROUTING || kind == CONFIG_BROKEN_LAYER,
                    !null_cfg && kind == CONFIG_VALID);
}

static void fuzz_align_capacity(fuzz_input *in) {
  const int64_t T = decode_count(in, 4096);
  const int32_t k = (int32_t)(fuzz_u8(in) < 240 ? fuzz_range(in, 1, MOE_MAX_TOP_K)
                                                : fuzz_range(in, -2, MOE_MAX_TOP_K + 2));
  const int32_t EL =
      (int32_t)(fuzz_u8(in) < 240 ? fuzz_range(in, 1, MOE_MAX_EXPERTS) : (int32_t)fuzz_u32(in));
  const int32_t BM = decode_block_m(in);
  const uint8_t nulls = fuzz_u8(in);
  const bool null_sorted = nulls < 8, null_blocks = nulls >= 248;
  int64_t sorted = -12345, blocks = -12345;

  bool valid = T >= 0 && k >= 1 && k <= MOE_MAX_TOP_K && EL >= 1 && EL <= MOE_MAX_EXPERTS &&
               BM <= MOE_MAX_BLOCK_M && is_power_of_two(BM) && T <= INT32_MAX &&
               T * k + (int64_t)EL * (BM - 1) <= INT32_MAX;
  fuzz_clear_errors(all_contexts, 2);
  moe_status st =
      moe_align_capacity(T, k, EL, BM, null_sorted ? NULL : &sorted, null_blocks ? NULL : &blocks);
  fuzz_check_status("moe_align_capacity", st, NULL, !valid || null_sorted || null_blocks,
                    valid && !null_sorted && !null_blocks);
  if (st == MOE_SUCCESS) {
    const int64_t capacity = T * k + (int64_t)EL * (BM - 1);
    FUZZ_CHECK(sorted == capacity && blocks == (capacity + BM - 1) / BM,
               "moe_align_capacity(%lld, %d, %d, %d) = %lld, %lld", (long long)T, k, EL, BM,
               (long long)sorted, (long long)blocks);
  } else {
    FUZZ_CHECK(sorted == -12345 && blocks == -12345,
               "moe_align_capacity wrote its outputs on error");
  }
}

static void fuzz_route(fuzz_input *in) {
  moe_config cfg;
  config_kind kind = decode_config(in, &cfg, MOE_MAX_EXPERTS);
  const int64_t T = decode_count(in, MAX_DIM);
  const bool null_cfg = fuzz_u8(in) < 4, null_ctx = fuzz_u8(in) < 4;
  const int64_t E = cfg.num_experts, k = cfg.top_k;
  size_t fill_bytes;
  const void *fill = rest(in, &fill_bytes);
  fuzz_buffer logits, bias, ids, weights;
  fuzz_buffer_make(in, &logits, ctx_main, ctx_other, bytes_of(T, E, 4), false, fill, fill_bytes);
  fuzz_buffer_make(in, &bias, ctx_main, ctx_other, bytes_of(E, 1, 4), true, fill, fill_bytes);
  fuzz_buffer_make(in, &ids, ctx_main, ctx_other, bytes_of(T, k, 4), false, NULL, 0);
  fuzz_buffer_make(in, &weights, ctx_main, ctx_other, bytes_of(T, k, 4), false, NULL, 0);

  const bool must_fail = null_cfg || null_ctx || kind == CONFIG_BROKEN_ROUTING || T < 0 ||
                         logits.faulty || bias.faulty || ids.faulty || weights.faulty;
  fuzz_clear_errors(all_contexts, 2);
  moe_status st = moe_route(null_ctx ? NULL : ctx_main, null_cfg ? NULL : &cfg, T, logits.buffer,
                            bias.buffer, ids.buffer, weights.buffer);
  fuzz_check_status("moe_route", st, null_ctx ? NULL : ctx_main, must_fail,
                    !must_fail && kind != CONFIG_RAW);
  const size_t written = st == MOE_SUCCESS ? ids.need : 0;
  fuzz_buffer_expect_unchanged(&logits, 0, "moe_route", "logits");
  fuzz_buffer_expect_unchanged(&bias, 0, "moe_route", "correction_bias");
  fuzz_buffer_expect_unchanged(&ids, written, "moe_route", "topk_ids");
  fuzz_buffer_expect_unchanged(&weights, written, "moe_route", "topk_weights");
  fuzz_buffer_free(&logits);
  fuzz_buffer_free(&bias);
  fuzz_buffer_free(&ids);
  fuzz_buffer_free(&weights);
}

/* Scalar arguments of align, valid unless broken on purpose. */
typedef struct align_shape {
  int64_t num_tokens;
  int32_t top_k, num_experts, num_local_experts, block_m;
  bool mapped;
} align_shape;

static void decode_align_shape(fuzz_input *in, align_shape *a, int64_t max_tokens, int32_t max_k,
                               int32_t max_experts) {
  a->num_tokens = fuzz_range(in, 0, max_tokens);
  a->top_k = (int32_t)fuzz_range(in, 1, max_k);
  a->num_experts = (int32_t)fuzz_range(in, 1, max_experts);
  a->mapped = fuzz_bool(in);
  a->num_local_experts = a->mapped ? (int32_t)fuzz_range(in, 1, max_experts) : a->num_experts;
  a->block_m = 1 << fuzz_range(in, 0, 8);
}

/* The local expert of slot s as align defines it, -1 when skipped. */
static int32_t local_expert(const align_shape *a, const int32_t *ids, const int32_t *map,
                            int64_t s) {
  int32_t id = ids[s];
  if (map) {
    if (id < 0 || id >= a->num_experts) return -1;
    id = map[id];
  }
  return id >= 0 && id < a->num_local_experts ? id : -1;
}

static void fuzz_align(fuzz_input *in) {
  align_shape a;
  decode_align_shape(in, &a, MAX_DIM, MOE_MAX_TOP_K, 300);
  const uint8_t broken = fuzz_u8(in);
  if (broken >= 224) { /* one scalar out of its domain */
    static const int64_t bad_tokens[] = {-1, INT64_MIN, (int64_t)INT32_MAX + 1, INT64_MAX};
    switch (broken % 6) {
    case 0:
      a.num_tokens = bad_tokens[fuzz_u8(in) % 4];
      break;
    case 1:
      a.top_k = fuzz_bool(in) ? 0 : MOE_MAX_TOP_K + 1;
      break;
    case 2:
      a.num_local_experts = fuzz_bool(in) ? 0 : MOE_MAX_EXPERTS + 1;
      break;
    case 3:
      a.block_m = fuzz_bool(in) ? 3 : 512;
      break;
    case 4:
      a.num_experts = fuzz_bool(in) ? -1 : MOE_MAX_EXPERTS + 1;
      break;
    default: /* no map, yet EL != E */
      a.mapped = false;
      a.num_local_experts = a.num_experts + 1;
      break;
    }
  }
  const bool null_ctx = fuzz_u8(in) < 4;
  int64_t sorted_capacity = 0, block_capacity = 0;
  bool valid_scalars =
      a.num_tokens >= 0 && a.num_tokens <= INT32_MAX && a.top_k >= 1 && a.top_k <= MOE_MAX_TOP_K &&
      a.num_local_experts >= 1 && a.num_local_experts <= MOE_MAX_EXPERTS && a.num_experts >= 1 &&
      a.num_experts <= MOE_MAX_EXPERTS && is_power_of_two(a.block_m) &&
      a.block_m <= MOE_MAX_BLOCK_M && (a.mapped || a.num_local_experts == a.num_experts) &&
      a.num_tokens * a.top_k + (int64_t)a.num_local_experts * (a.block_m - 1) <= INT32_MAX;
  if (valid_scalars) {
    sorted_capacity = a.num_tokens * a.top_k + (int64_t)a.num_local_experts * (a.block_m - 1);
    block_capacity = (sorted_capacity + a.block_m - 1) / a.block_m;
  }
  size_t fill_bytes;
  const void *fill = rest(in, &fill_bytes); /* ids and map: any int32 */
  fuzz_buffer ids, map, sorted, blocks, post;
  fuzz_buffer_make(in, &ids, ctx_main, ctx_other, bytes_of(a.num_tokens, a.top_k, 4), false, fill,
                   fill_bytes);
  fuzz_buffer_make_mode(&map, a.mapped ? FUZZ_BUFFER_EXACT : FUZZ_BUFFER_NULL, ctx_main, ctx_other,
                        bytes_of(a.num_experts, 1, 4), true, fill, fill_bytes);
  if (a.mapped && fuzz_u8(in) < 16) { /* a broken map: too small or foreign */
    fuzz_buffer_free(&map);
    fuzz_buffer_make_mode(&map, fuzz_bool(in) ? FUZZ_BUFFER_SMALL : FUZZ_BUFFER_OTHER_CONTEXT,
                          ctx_main, ctx_other, bytes_of(a.num_experts, 1, 4), true, fill,
                          fill_bytes);
  }
  fuzz_buffer_make(in, &sorted, ctx_main, ctx_other, bytes_of(sorted_capacity, 1, 4), false, NULL,
                   0);
  fuzz_buffer_make(in, &blocks, ctx_main, ctx_other, bytes_of(block_capacity, 1, 4), false, NULL,
                   0);
  fuzz_buffer_make(in, &post, ctx_main, ctx_other, 4, false, NULL, 0);

  const bool must_fail = null_ctx || !valid_scalars || ids.faulty || map.faulty || sorted.faulty ||
                         blocks.faulty || post.faulty;
  fuzz_clear_errors(all_contexts, 2);
  moe_status st = moe_align(null_ctx ? NULL : ctx_main, a.num_tokens, a.top_k, a.num_experts,
                            a.num_local_experts, a.block_m, ids.buffer, map.buffer, sorted.buffer,
                            blocks.buffer, post.buffer);
  fuzz_check_status("moe_align", st, null_ctx ? NULL : ctx_main, must_fail, !must_fail);
  const bool ok = st == MOE_SUCCESS;
  fuzz_buffer_expect_unchanged(&ids, 0, "moe_align", "topk_ids");
  fuzz_buffer_expect_unchanged(&map, 0, "moe_align", "expert_map");
  fuzz_buffer_expect_unchanged(&sorted, ok ? sorted.need : 0, "moe_align", "sorted_token_ids");
  fuzz_buffer_expect_unchanged(&blocks, ok ? blocks.need : 0, "moe_align", "expert_ids");
  fuzz_buffer_expect_unchanged(&post, ok ? 4 : 0, "moe_align", "num_tokens_post_padded");
  fuzz_buffer_free(&ids);
  fuzz_buffer_free(&map);
  fuzz_buffer_free(&sorted);
  fuzz_buffer_free(&blocks);
  fuzz_buffer_free(&post);
}

static void fuzz_grouped_gemm(fuzz_input *in) {
  if (!ctx_main->ops->grouped_gemm) return;
  align_shape a;
  decode_align_shape(in, &a, 16, 4, 8);
  int32_t ids[16 * 4], map[8];
  for (int64_t s = 0; s < a.num_tokens * a.top_k; ++s)
    ids[s] = (int32_t)fuzz_range(in, -1, a.num_experts);
  for (int32_t e = 0; e < a.num_experts; ++e)
    map[e] = (int32_t)fuzz_range(in, -2, a.num_local_experts);

  /* Metadata from align itself: the grouped GEMM trusts its contents. */
  int64_t sorted_capacity, block_capacity;
  FUZZ_CHECK(moe_align_capacity(a.num_tokens, a.top_k, a.num_local_experts, a.block_m,
                                &sorted_capacity, &block_capacity) == MOE_SUCCESS,
             "moe_align_capacity failed: %s", moe_last_error(NULL));
  const size_t slot_bytes = (size_t)(a.num_tokens * a.top_k) * 4;
  fuzz_buffer ids_buf, map_buf, meta[3];
  const size_t meta_bytes[3] = {(size_t)sorted_capacity * 4, (size_t)block_capacity * 4, 4};
  fuzz_buffer_make_mode(&ids_buf, FUZZ_BUFFER_EXACT, ctx_main, ctx_other, slot_bytes, false, ids,
                        slot_bytes);
  fuzz_buffer_make_mode(&map_buf, a.mapped ? FUZZ_BUFFER_EXACT : FUZZ_BUFFER_NULL, ctx_main,
                        ctx_other, (size_t)a.num_experts * 4, true, map, (size_t)a.num_experts * 4);
  for (int i = 0; i < 3; ++i)
    fuzz_buffer_make_mode(&meta[i], FUZZ_BUFFER_EXACT, ctx_main, ctx_other, meta_bytes[i], false,
                          NULL, 0);
  moe_status st =
      moe_align(ctx_main, a.num_tokens, a.top_k, a.num_experts, a.num_local_experts, a.block_m,
                ids_buf.buffer, map_buf.buffer, meta[0].buffer, meta[1].buffer, meta[2].buffer);
  fuzz_check_status("moe_align (for moe_grouped_gemm)", st, ctx_main, false, true);

  /* Decoded in statements: the order of initializers is unspecified. */
  moe_gemm_desc desc = {
      .num_tokens = a.num_tokens,
      .top_k = a.top_k,
      .num_local_experts = a.num_local_experts,
      .block_m = a.block_m,
  };
  desc.n = fuzz_range(in, 1, MAX_DIM);
  desc.k = fuzz_range(in, 1, MAX_DIM);
  desc.b_layout = (moe_weight_layout)fuzz_range(in, 0, 1);
  desc.input = (moe_gemm_input)fuzz_range(in, 0, 1);
  desc.routed_weight = (moe_gemm_routed_weight)fuzz_range(in, 0, 2);
  const uint8_t broken = fuzz_u8(in);
  if (broken >= 200) { /* one field out of its domain */
    static const int64_t bad_dim[] = {0, -1, TWO_POW_30 + 1, INT64_MAX};
    const int64_t pick = fuzz_u8(in);
    switch (broken % 10) {
    case 0:
      desc.num_tokens = pick % 2 ? -1 : (int64_t)INT32_MAX + 1;
      break;
    case 1:
      desc.top_k = pick % 2 ? 0 : MOE_MAX_TOP_K + 1;
      break;
    case 2:
      desc.num_local_experts = pick % 2 ? 0 : MOE_MAX_EXPERTS + 1;
      break;
    case 3:
      desc.block_m = pick % 2 ? 6 : 1024;
      break;
    case 4:
      desc.n = bad_dim[pick % 4];
      break;
    case 5:
      desc.k = bad_dim[pick % 4];
      break;
    case 6:
      desc.b_layout = (moe_weight_layout)(pick % 2 ? 2 : -1);
      break;
    case 7:
      desc.input = (moe_gemm_input)(pick % 2 ? 2 : -1);
      break;
    case 8:
      desc.routed_weight = (moe_gemm_routed_weight)(pick % 2 ? 3 : -1);
      break;
    default:
      break; /* NULL desc below */
    }
  }
  const bool null_desc = broken >= 200 && broken % 10 == 9;
  const bool broken_desc = broken >= 200;
  const int64_t slots = a.num_tokens * a.top_k;
  const int64_t a_rows = desc.input == MOE_GEMM_INPUT_PER_TOKEN ? a.num_tokens : slots;
  size_t fill_bytes;
  const void *fill = rest(in, &fill_bytes); /* a, b, bias: raw bits */
  fuzz_buffer abuf, bbuf, bias, meta_arg[3], weights, c;
  fuzz_buffer_make(in, &abuf, ctx_main, ctx_other, bytes_of(a_rows, desc.k, 2), false, fill,
                   fill_bytes);
  fuzz_buffer_make(in, &bbuf, ctx_main, ctx_other,
                   bytes_of3(a.num_local_experts, desc.n, desc.k, 2), false, fill, fill_bytes);
  fuzz_buffer_make(in, &bias, ctx_main, ctx_other, bytes_of(a.num_local_experts, desc.n, 4), true,
                   fill, fill_bytes);
  for (int i = 0; i < 3; ++i) {
    void *contents = fuzz_buffer_contents(&meta[i]);
    fuzz_buffer_make(in, &meta_arg[i], ctx_main, ctx_other, meta_bytes[i], false, contents,
                     meta_bytes[i]);
    free(contents);
  }
  fuzz_buffer_make(in, &weights, ctx_main, ctx_other, bytes_of(slots, 1, 4), true, fill,
                   fill_bytes);
  fuzz_buffer_make(in, &c, ctx_main, ctx_other, bytes_of(slots, desc.n, 2), false, NULL, 0);
  const bool weights_used = desc.routed_weight != MOE_GEMM_ROUTED_WEIGHT_NONE;
  const bool weights_faulty =
      weights_used ? weights.faulty || weights.mode == FUZZ_BUFFER_NULL : false;
  const bool null_ctx = fuzz_u8(in) < 4;

  const bool must_fail = null_ctx || broken_desc || abuf.faulty || bbuf.faulty || bias.faulty ||
                         meta_arg[0].faulty || meta_arg[1].faulty || meta_arg[2].faulty ||
                         weights_faulty || c.faulty;
  fuzz_clear_errors(all_contexts, 2);
  st = moe_grouped_gemm(null_ctx ? NULL : ctx_main, null_desc ? NULL : &desc, abuf.buffer,
                        bbuf.buffer, bias.buffer, meta_arg[0].buffer, meta_arg[1].buffer,
                        meta_arg[2].buffer, weights.buffer, c.buffer);
  fuzz_check_status("moe_grouped_gemm", st, null_ctx ? NULL : ctx_main, must_fail, !must_fail);
  const char *call = "moe_grouped_gemm";
  fuzz_buffer_expect_unchanged(&abuf, 0, call, "a");
  fuzz_buffer_expect_unchanged(&bbuf, 0, call, "b");
  fuzz_buffer_expect_unchanged(&bias, 0, call, "bias");
  for (int i = 0; i < 3; ++i)
    fuzz_buffer_expect_unchanged(&meta_arg[i], 0, call, "metadata");
  fuzz_buffer_expect_unchanged(&weights, 0, call, "topk_weights");
  fuzz_buffer_expect_unchanged(&c, st == MOE_SUCCESS ? c.need : 0, call, "c");
  if (st == MOE_SUCCESS) {
    /* Rows of slots that align skipped are not written. */
    uint8_t *now = fuzz_buffer_contents(&c);
    const size_t row = (size_t)desc.n * 2;
    for (int64_t s = 0; s < slots; ++s)
      if (local_expert(&a, ids, a.mapped ? map : NULL, s) < 0)
        FUZZ_CHECK(memcmp(now + s * row, c.shadow + s * row, row) == 0,
                   "moe_grouped_gemm wrote row %lld of c, a slot that align skipped", (long long)s);
    free(now);
  }
  fuzz_buffer_free(&ids_buf);
  fuzz_buffer_free(&map_buf);
  for (int i = 0; i < 3; ++i) {
    fuzz_buffer_free(&meta[i]);
    fuzz_buffer_free(&meta_arg[i]);
  }
  fuzz_buffer_free(&abuf);
  fuzz_buffer_free(&bbuf);
  fuzz_buffer_free(&bias);
  fuzz_buffer_free(&weights);
  fuzz_buffer_free(&c);
}

static void fuzz_activation(fuzz_input *in) {
  if (!ctx_main->ops->activation) return;
  moe_activation act = (moe_activation)fuzz_range(in, 0, 2);
  float alpha = fuzz_float(in), limit = fuzz_float(in);
  const int64_t rows = decode_count(in, MAX_DIM);
  int64_t I = decode_count(in, MAX_DIM);
  const uint8_t broken = fuzz_u8(in);
  if (broken >= 240) act = (moe_activation)(broken % 2 ? 3 : -1);
  if (broken < 8) I = TWO_POW_30 + 1;
  const bool null_ctx = fuzz_u8(in) < 4;
  size_t fill_bytes;
  const void *fill = rest(in, &fill_bytes);
  fuzz_buffer src, dst;
  fuzz_buffer_make(in, &src, ctx_main, ctx_other, bytes_of3(rows, I, 2, 2), false, fill,
                   fill_bytes);
  fuzz_buffer_make(in, &dst, ctx_main, ctx_other, bytes_of(rows, I, 2), false, NULL, 0);
  const bool bad_clamp = act == MOE_ACTIVATION_SWIGLU_CLAMP && (!isfinite(alpha) || !(limit > 0));
  const bool must_fail = null_ctx || (unsigned)act > MOE_ACTIVATION_SWIGLU_CLAMP || bad_clamp ||
                         rows < 0 || I <= 0 || I > TWO_POW_30 || src.faulty || dst.faulty;
  fuzz_clear_errors(all_contexts, 2);
  moe_status st = moe_activation_apply(null_ctx ? NULL : ctx_main, act, alpha, limit, rows, I,
                                       src.buffer, dst.buffer);
  fuzz_check_status("moe_activation_apply", st, null_ctx ? NULL : ctx_main, must_fail, !must_fail);
  fuzz_buffer_expect_unchanged(&src, 0, "moe_activation_apply", "in");
  fuzz_buffer_expect_unchanged(&dst, st == MOE_SUCCESS ? dst.need : 0, "moe_activation_apply",
                               "out");
  fuzz_buffer_free(&src);
  fuzz_buffer_free(&dst);
}

static void fuzz_topk_reduce(fuzz_input *in) {
  if (!ctx_main->ops->topk_reduce) return;
  const int64_t T = decode_count(in, 32);
  const int32_t k =
      (int32_t)(fuzz_u8(in) < 240 ? fuzz_range(in, 1, 8) : fuzz_range(in, -1, MOE_MAX_TOP_K + 1));
  int64_t H = decode_count(in, MAX_DIM);
  if (fuzz_u8(in) < 4) H = TWO_POW_30 + 1;
  const int32_t valid_E = (int32_t)fuzz_range(in, 1, 16);
  const int32_t valid_EL = (int32_t)fuzz_range(in, 1, 16);
  int32_t E = valid_E, EL = valid_EL;
  const uint8_t broken = fuzz_u8(in);
  if (broken >= 248) E = broken % 2 ? 0 : MOE_MAX_EXPERTS + 1;
  if (broken < 8) EL = broken % 2 ? -3 : MOE_MAX_EXPERTS + 1;
  const bool null_ctx = fuzz_u8(in) < 4;
  const bool small = T >= 0 && T <= 32 && k >= 1 && k <= 8 && H >= 1 && H <= MAX_DIM;

  /* ids mix valid, -1 and out-of-range experts; map entries -1, local or
   * out of range. Rows of y of skipped slots hold NaN: if any were read,
   * out would not be finite. */
  const int64_t slots = small ? T * k : 0;
  int32_t ids[32 * 8] = {0}, map[16] = {0};
  float weights[32 * 8] = {0};
  for (int64_t s = 0; s < slots; ++s) {
    ids[s] = (int32_t)fuzz_range(in, -2, valid_E + 1);
    weights[s] = (float)fuzz_range(in, -8, 8) * 0.25f;
  }
  for (int32_t e = 0; e < 16; ++e)
    map[e] = (int32_t)fuzz_range(in, -2, valid_EL);
  uint16_t *y = small_bf16((size_t)(slots * (small ? H : 0)), (uint32_t)T * 31u + (uint32_t)k);

  fuzz_buffer ybuf, wbuf, ibuf, mbuf, out;
  fuzz_buffer_make(in, &ibuf, ctx_main, ctx_other, bytes_of(T, k, 4), true, ids, sizeof ids);
  fuzz_buffer_make(in, &mbuf, ctx_main, ctx_other, bytes_of(E, 1, 4), true, map, sizeof map);
  const bool masked = ibuf.buffer && mbuf.buffer;
  if (masked && small)
    for (int64_t s = 0; s < slots; ++s) {
      int32_t local = ids[s] >= 0 && ids[s] < E && ids[s] < 16 ? map[ids[s]] : -1;
      if (local < 0 || local >= EL)
        for (int64_t h = 0; h < H; ++h)
          y[s * H + h] = 0x7fc0; /* NaN */
    }
  fuzz_buffer_make(in, &ybuf, ctx_main, ctx_other, bytes_of3(T, k, H, 2), false, y,
                   (size_t)(slots * (small ? H : 0)) * 2);
  fuzz_buffer_make(in, &wbuf, ctx_main, ctx_other, bytes_of(T, k, 4), true, weights,
                   sizeof weights);
  fuzz_buffer_make(in, &out, ctx_main, ctx_other, bytes_of(T, H, 2), false, NULL, 0);
  /* Only a mask that is used is checked. */
  const bool ids_faulty = ibuf.mode == FUZZ_BUFFER_SMALL || ibuf.mode == FUZZ_BUFFER_OTHER_CONTEXT;
  const bool map_faulty =
      masked && (mbuf.mode == FUZZ_BUFFER_SMALL || mbuf.mode == FUZZ_BUFFER_OTHER_CONTEXT);
  const bool weights_faulty =
      wbuf.mode == FUZZ_BUFFER_SMALL || wbuf.mode == FUZZ_BUFFER_OTHER_CONTEXT;
  const bool bad_experts =
      masked && (E < 1 || E > MOE_MAX_EXPERTS || EL < 1 || EL > MOE_MAX_EXPERTS);
  const bool must_fail = null_ctx || T < 0 || T > INT32_MAX || k < 1 || k > MOE_MAX_TOP_K ||
                         H < 1 || H > TWO_POW_30 || bad_experts || ybuf.faulty || ids_faulty ||
                         map_faulty || weights_faulty || out.faulty;
  fuzz_clear_errors(all_contexts, 2);
  moe_status st = moe_topk_reduce(null_ctx ? NULL : ctx_main, T, k, H, ybuf.buffer, wbuf.buffer,
                                  ibuf.buffer, mbuf.buffer, E, EL, out.buffer);
  fuzz_check_status("moe_topk_reduce", st, null_ctx ? NULL : ctx_main, must_fail, !must_fail);
  const char *call = "moe_topk_reduce";
  fuzz_buffer_expect_unchanged(&ybuf, 0, call, "y");
  fuzz_buffer_expect_unchanged(&wbuf, 0, call, "topk_weights");
  fuzz_buffer_expect_unchanged(&ibuf, 0, call, "topk_ids");
  fuzz_buffer_expect_unchanged(&mbuf, 0, call, "expert_map");
  fuzz_buffer_expect_unchanged(&out, st == MOE_SUCCESS ? out.need : 0, call, "out");
  /* On success y and topk_weights hold the finite values (and NaN rows)
   * written above: their fill covers what the shapes need. */
  if (st == MOE_SUCCESS && small) {
    uint16_t *o = fuzz_buffer_contents(&out);
    for (int64_t i = 0; i < T * H; ++i)
      FUZZ_CHECK((o[i] & 0x7f80) != 0x7f80,
                 "moe_topk_reduce: out[%lld] = 0x%04x is not finite: a %s row of y was read",
                 (long long)i, o[i], masked ? "masked (NaN)" : "finite");
    free(o);
  }
  free(y);
  fuzz_buffer_free(&ybuf);
  fuzz_buffer_free(&wbuf);
  fuzz_buffer_free(&ibuf);
  fuzz_buffer_free(&mbuf);
  fuzz_buffer_free(&out);
}

/* Allocations counted while a forward runs (any thread): the library's
 * own, which the contract forbids, and those of the OpenMP runtime (libomp
 * allocates for every serialized `parallel if(...)` region), which are out
 * of the library's hands and only counted for the report. */
static atomic_int forward_allocations, openmp_allocations, forward_reruns;
static atomic_bool counting_allocations;

/* Whether the allocation's stack (recorded by ASan) passes through the
 * OpenMP runtime. */
static bool allocated_by_openmp(const volatile void *ptr) {
  void *trace[48];
  int thread;
  size_t depth = __asan_get_alloc_stack((void *)ptr, trace, 48, &thread);
  for (size_t i = 0; i < depth; ++i) {
    Dl_info info;
    if (dladdr(trace[i], &info) && info.dli_fname &&
        (strstr(info.dli_fname, "libomp") || strstr(info.dli_fname, "libgomp") ||
         strstr(info.dli_fname, "libiomp")))
      return true;
  }
  return false;
}

static void count_malloc(const volatile void *ptr, size_t size) {
  (void)size;
  if (!atomic_load_explicit(&counting_allocations, memory_order_relaxed)) return;
  if (allocated_by_openmp(ptr)) {
    atomic_fetch_add_explicit(&openmp_allocations, 1, memory_order_relaxed);
    return;
  }
  if (atomic_fetch_add_explicit(&forward_allocations, 1, memory_order_relaxed) == 0 &&
      getenv("MOE_FUZZ_TRACE_ALLOCATIONS"))
    __sanitizer_print_stack_trace(); /* who allocates inside a forward */
}

static void ignore_free(const volatile void *ptr) {
  (void)ptr;
}

static void report_openmp_allocations(void) {
  fprintf(stderr,
          "moe fuzz: %d forward reruns; allocations inside them: 0 by the library, %d by "
          "the OpenMP runtime\n",
          atomic_load(&forward_reruns), atomic_load(&openmp_allocations));
}

static void fuzz_layer(fuzz_input *in) {
  if (!ctx_main->ops->layer_create) return;
  moe_config cfg;
  config_kind kind = decode_config(in, &cfg, MAX_LAYER_EXPERTS);
  /* Local experts: E, or a map onto [1, 64] experts (maybe a broken one). */
  const uint8_t map_mode = fuzz_u8(in);
  int32_t map[MAX_LAYER_EXPERTS];
  bool map_broken = false, map_given = false;
  if (kind == CONFIG_VALID && map_mode >= 128) {
    map_given = true;
    cfg.num_local_experts = (int32_t)fuzz_range(in, 1, MAX_LAYER_EXPERTS);
    for (int32_t e = 0; e < cfg.num_experts && e < MAX_LAYER_EXPERTS; ++e)
      map[e] = (int32_t)fuzz_range(in, -1, cfg.num_local_experts - 1);
    if (map_mode >= 240 && cfg.num_experts >= 1 && cfg.num_experts <= MAX_LAYER_EXPERTS) {
      map[fuzz_range(in, 0, cfg.num_experts - 1)] =
          fuzz_bool(in) ? -2 : cfg.num_local_experts + (int32_t)fuzz_range(in, 0, 3);
      map_broken = true;
    }
  } else if (kind == CONFIG_VALID && map_mode < 8) {
    /* EL != E without a map */
    cfg.num_local_experts = cfg.num_experts > 1 ? cfg.num_experts - 1 : 2;
    map_broken = true;
  }
  /* Weight arrays exist only for small, valid shapes; otherwise the call
   * must fail on the configuration before it reads them (raw configs get
   * NULL weights unless they happen to be small and valid). */
  moe_config resolved = cfg;
  if (resolved.num_local_experts == 0) resolved.num_local_experts = resolved.num_experts;
  const bool shapes_small = cfg.hidden_size >= 1 && cfg.hidden_size <= MAX_DIM &&
                            cfg.intermediate_size >= 1 && cfg.intermediate_size <= MAX_DIM &&
                            cfg.num_experts >= 1 && cfg.num_experts <= MAX_LAYER_EXPERTS &&
                            resolved.num_local_experts >= 1 &&
                            resolved.num_local_experts <= MAX_LAYER_EXPERTS;
  const int64_t H = shapes_small ? cfg.hidden_size : 1,
                I = shapes_small ? cfg.intermediate_size : 1;
  const int64_t E = shapes_small ? cfg.num_experts : 1;
  const int64_t EL = shapes_small ? resolved.num_local_experts : 1;
  const uint32_t seed = fuzz_u32(in);
  uint16_t *w13 = small_bf16((size_t)(EL * 2 * I * H), seed);
  uint16_t *w2 = small_bf16((size_t)(EL * H * I), seed ^ 0x5bd1e995u);
  float *w13_bias = calloc((size_t)(EL * 2 * I), sizeof(float));
  float *w2_bias = calloc((size_t)(EL * H), sizeof(float));
  float correction[MAX_LAYER_EXPERTS];
  FUZZ_CHECK(w13_bias && w2_bias, "out of host memory");
  for (int64_t e = 0; e < E; ++e)
    correction[e] = (float)fuzz_range(in, -4, 4) * 0.125f;
  const uint8_t optional = fuzz_u8(in);
  const uint8_t nulls = fuzz_u8(in);
  moe_weights weights = {
      .w13 = nulls == 1 ? NULL : w13,
      .w2 = nulls == 2 ? NULL : w2,
      .w13_bias = optional & 1 ? w13_bias : NULL,
      .w2_bias = optional & 2 ? w2_bias : NULL,
      .correction_bias = optional & 4 ? correction : NULL,
      .expert_map = map_given ? map : NULL,
  };
  if (kind == CONFIG_RAW && !shapes_small) weights.w13 = weights.w2 = NULL;
  const bool null_ctx = nulls == 3, null_cfg = nulls == 4, null_weights = nulls == 5,
             null_layer = nulls == 6;
  moe_layer *const untouched = (moe_layer *)(uintptr_t)0x5a5a5a5a;
  moe_layer *layer = untouched;
  const bool must_fail = kind == CONFIG_BROKEN_ROUTING || kind == CONFIG_BROKEN_LAYER ||
                         map_broken || (nulls >= 1 && nulls <= 6);
  fuzz_clear_errors(all_contexts, 2);
  moe_status st = moe_layer_create(null_ctx ? NULL : ctx_main, null_cfg ? NULL : &cfg,
                                   null_weights ? NULL : &weights, null_layer ? NULL : &layer);
  fuzz_check_status("moe_layer_create", st, null_ctx ? NULL : ctx_main, must_fail,
                    !must_fail && kind != CONFIG_RAW);
  free(w13);
  free(w2);
  free(w13_bias);
  free(w2_bias);
  if (st != MOE_SUCCESS) {
    FUZZ_CHECK(layer == untouched, "moe_layer_create wrote *layer on error");
    return;
  }
  FUZZ_CHECK(layer && layer != untouched, "moe_layer_create succeeded without a layer");
  cfg = resolved; /* the shapes the layer runs */

  int64_t reserved = 0;
  for (int round = 0; round < 2 && !fuzz_done(in); ++round) {
    /* Reserve (maybe invalid), then forward (maybe beyond the reservation). */
    static const int64_t odd_reserve[] = {0, -5, INT64_MIN, (int64_t)1 << 40, INT64_MAX};
    const uint8_t rmode = fuzz_u8(in);
    const int64_t request = rmode < 224 ? fuzz_range(in, 1, MAX_DIM) : odd_reserve[rmode % 5];
    const bool null_reserve = fuzz_u8(in) < 4;
    const bool reserve_valid =
        request > 0 &&
        (request <= reserved ||
         (request <= INT32_MAX &&
          request * cfg.top_k + (int64_t)cfg.num_local_experts * (MOE_MAX_BLOCK_M - 1) <=
              INT32_MAX));
    fuzz_clear_errors(all_contexts, 2);
    st = moe_layer_reserve(null_reserve ? NULL : layer, request);
    fuzz_check_status("moe_layer_reserve", st, null_reserve ? NULL : ctx_main,
                      null_reserve || !reserve_valid, !null_reserve && reserve_valid);
    if (st == MOE_SUCCESS && request > reserved) reserved = request;

    static const int64_t odd_tokens[] = {-1, INT64_MIN, INT64_MAX, (int64_t)1 << 33};
    const uint8_t tmode = fuzz_u8(in);
    int64_t T = tmode < 160   ? fuzz_range(in, 0, reserved)
                : tmode < 224 ? reserved + fuzz_range(in, 1, 4)
                              : odd_tokens[tmode % 4];
    size_t fill_bytes;
    const void *fill = rest(in, &fill_bytes);
    uint16_t *x = small_bf16((size_t)H * MAX_DIM, seed + (uint32_t)round);
    fuzz_buffer xbuf, lbuf, out;
    fuzz_buffer_make(in, &xbuf, ctx_main, ctx_other, bytes_of(T, cfg.hidden_size, 2), false, x,
                     (size_t)H * MAX_DIM * 2);
    fuzz_buffer_make(in, &lbuf, ctx_main, ctx_other, bytes_of(T, cfg.num_experts, 4), false, fill,
                     fill_bytes);
    fuzz_buffer_make(in, &out, ctx_main, ctx_other, bytes_of(T, cfg.hidden_size, 2), false, NULL,
                     0);
    free(x);
    const bool null_forward = fuzz_u8(in) < 4;
    const bool beyond = T > reserved;
    const bool forward_fails =
        null_forward || T < 0 || beyond || xbuf.faulty || lbuf.faulty || out.faulty;
    fuzz_clear_errors(all_contexts, 2);
    st = moe_layer_forward(null_forward ? NULL : layer, T, xbuf.buffer, lbuf.buffer, out.buffer);
    fuzz_check_status("moe_layer_forward", st, null_forward ? NULL : ctx_main, forward_fails,
                      !forward_fails);
    if (!null_forward && T >= 0 && beyond)
      FUZZ_CHECK(st == MOE_ERROR_NOT_RESERVED,
                 "moe_layer_forward(T = %lld) beyond the %lld reserved returned %s", (long long)T,
                 (long long)reserved, moe_status_string(st));
    const bool ok = st == MOE_SUCCESS;
    fuzz_buffer_expect_unchanged(&xbuf, 0, "moe_layer_forward", "x");
    fuzz_buffer_expect_unchanged(&lbuf, 0, "moe_layer_forward", "logits");
    fuzz_buffer_expect_unchanged(&out, ok ? out.need : 0, "moe_layer_forward", "out");
    if (ok && T > 0) {
      /* A rerun allocates nothing (the first may warm up OpenMP) and gives
       * the same bits. */
      uint8_t *first = fuzz_buffer_contents(&out);
      atomic_store(&forward_allocations, 0);
      atomic_fetch_add(&forward_reruns, 1);
      atomic_store(&counting_allocations, true);
      st = moe_layer_forward(layer, T, xbuf.buffer, lbuf.buffer, out.buffer);
      moe_context_synchronize(ctx_main);
      atomic_store(&counting_allocations, false);
      fuzz_check_status("moe_layer_forward (rerun)", st, ctx_main, false, true);
      FUZZ_CHECK(atomic_load(&forward_allocations) == 0,
                 "moe_layer_forward(T = %lld, reserved %lld) allocated %d times", (long long)T,
                 (long long)reserved, atomic_load(&forward_allocations));
      uint8_t *second = fuzz_buffer_contents(&out);
      FUZZ_CHECK(memcmp(first, second, out.need) == 0,
                 "moe_layer_forward(T = %lld) is not bitwise reproducible", (long long)T);
      free(first);
      free(second);
    }
    fuzz_buffer_free(&xbuf);
    fuzz_buffer_free(&lbuf);
    fuzz_buffer_free(&out);
  }
  moe_layer_destroy(layer);
}

static void fuzz_buffers_and_contexts(fuzz_input *in) {
  /* Context creation: bad enums, negative devices, NULL, absent backends. */
  const int backend = (int)fuzz_range(in, -2, 5), device = (int)fuzz_range(in, -2, 3);
  const bool null_out = fuzz_u8(in) < 16;
  moe_context *const untouched = (moe_context *)(uintptr_t)0x5a5a5a5a;
  moe_context *created = untouched;
  const bool invalid =
      null_out || backend < MOE_BACKEND_AUTO || backend > MOE_BACKEND_OPENCL || device < 0;
  fuzz_clear_errors(all_contexts, 2);
  moe_status st = moe_context_create((moe_backend)backend, device, null_out ? NULL : &created);
  /* AUTO and CPU always have a device; CUDA/OpenCL may be absent. */
  const bool always =
      backend == MOE_BACKEND_CPU || (backend == MOE_BACKEND_AUTO && !getenv("MOE_BACKEND"));
  fuzz_check_status("moe_context_create", st, NULL, invalid, !invalid && always);
  if (st == MOE_SUCCESS) {
    FUZZ_CHECK(created != untouched && created, "moe_context_create succeeded without a context");
    moe_context_destroy(created);
  } else {
    FUZZ_CHECK(created == untouched, "moe_context_create wrote *ctx on error");
  }

  /* Buffer create/write/read with ranges in and out of bounds. */
  const size_t bytes = (size_t)fuzz_range(in, 0, 300);
  const bool null_ctx = fuzz_u8(in) < 8;
  moe_buffer *buffer = (moe_buffer *)(uintptr_t)0x5a5a5a5a;
  fuzz_clear_errors(all_contexts, 2);
  st = moe_buffer_create(null_ctx ? NULL : ctx_main, bytes, &buffer);
  fuzz_check_status("moe_buffer_create", st, null_ctx ? NULL : ctx_main, null_ctx || bytes == 0,
                    !null_ctx && bytes > 0);
  if (st != MOE_SUCCESS) {
    FUZZ_CHECK(buffer == (moe_buffer *)(uintptr_t)0x5a5a5a5a,
               "moe_buffer_create wrote *buffer on error");
    return;
  }
  FUZZ_CHECK(moe_buffer_size(buffer) == bytes, "moe_buffer_size = %zu, created with %zu",
             moe_buffer_size(buffer), bytes);
  uint8_t host[400];
  memset(host, 0xab, sizeof host);
  for (int i = 0; i < 4 && !fuzz_done(in); ++i) {
    static const size_t odd[] = {SIZE_MAX, SIZE_MAX - 3, (size_t)1 << 63, 301};
    const uint8_t mode = fuzz_u8(in);
    const size_t offset = mode < 224 ? (size_t)fuzz_range(in, 0, 310) : odd[mode % 4];
    const size_t count = mode < 200 ? (size_t)fuzz_range(in, 0, 310) : odd[fuzz_u8(in) % 4];
    const bool write = fuzz_bool(in), null_host = fuzz_u8(in) < 16;
    const bool in_range = offset <= bytes && count <= bytes - offset;
    const bool must_fail = !in_range || (null_host && count > 0);
    /* Host memory for in-range copies only: a failing call must not touch
     * it, and a passing one stays within count <= bytes <= 300. */
    uint8_t before[sizeof host];
    memcpy(before, host, sizeof host);
    fuzz_clear_errors(all_contexts, 2);
    st = write ? moe_buffer_write(buffer, offset, null_host ? NULL : host, count)
               : moe_buffer_read(buffer, offset, null_host ? NULL : host, count);
    fuzz_check_status(write ? "moe_buffer_write" : "moe_buffer_read", st, ctx_main, must_fail,
                      !must_fail);
    if (st != MOE_SUCCESS)
      FUZZ_CHECK(memcmp(before, host, sizeof host) == 0, "moe_buffer_read wrote on error");
  }
  fuzz_clear_errors(all_contexts, 2);
  st = moe_buffer_write(NULL, 0, host, 1);
  fuzz_check_status("moe_buffer_write(NULL)", st, NULL, true, false);
  moe_buffer_destroy(buffer);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (!ctx_main) {
    FUZZ_CHECK(moe_context_create(MOE_BACKEND_CPU, 0, &ctx_main) == MOE_SUCCESS &&
                   moe_context_create(MOE_BACKEND_CPU, 0, &ctx_other) == MOE_SUCCESS,
               "cannot create CPU contexts: %s", moe_last_error(NULL));
    all_contexts[0] = ctx_main;
    all_contexts[1] = ctx_other;
    __sanitizer_install_malloc_and_free_hooks(count_malloc, ignore_free);
    atexit(report_openmp_allocations);
  }
  fuzz_input in = {data, size, 0};
  for (int action = 0; action < MAX_ACTIONS && !fuzz_done(&in); ++action) {
    switch (fuzz_u8(&in) % 9) {
    case 0:
      fuzz_config_validate(&in);
      break;
    case 1:
      fuzz_align_capacity(&in);
      break;
    case 2:
      fuzz_route(&in);
      break;
    case 3:
      fuzz_align(&in);
      break;
    case 4:
      fuzz_grouped_gemm(&in);
      break;
    case 5:
      fuzz_activation(&in);
      break;
    case 6:
      fuzz_topk_reduce(&in);
      break;
    case 7:
      fuzz_layer(&in);
      break;
    default:
      fuzz_buffers_and_contexts(&in);
      break;
    }
  }
  return 0;
}
