/*
 * fuzz_common.c - input decoding, failure reports, status checks and
 * guarded buffers shared by the libFuzzer targets (see fuzz_common.h).
 */
#include "fuzz_common.h"

/* Internal: to empty the error messages before each call (see
 * fuzz_clear_errors); the targets use nothing else from the core. */
#include "internal.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

uint8_t fuzz_u8(fuzz_input *in) {
  return in->pos < in->size ? in->data[in->pos++] : 0;
}

uint16_t fuzz_u16(fuzz_input *in) {
  uint16_t lo = fuzz_u8(in);
  return (uint16_t)(lo | (uint16_t)fuzz_u8(in) << 8);
}

uint32_t fuzz_u32(fuzz_input *in) {
  uint32_t lo = fuzz_u16(in);
  return lo | (uint32_t)fuzz_u16(in) << 16;
}

uint64_t fuzz_u64(fuzz_input *in) {
  uint64_t lo = fuzz_u32(in);
  return lo | (uint64_t)fuzz_u32(in) << 32;
}

bool fuzz_bool(fuzz_input *in) {
  return fuzz_u8(in) & 1;
}

int64_t fuzz_range(fuzz_input *in, int64_t lo, int64_t hi) {
  uint64_t span = (uint64_t)(hi - lo) + 1;
  uint64_t raw = span <= 256 ? fuzz_u8(in) : span <= 65536 ? fuzz_u16(in) : fuzz_u32(in);
  return lo + (int64_t)(raw % span);
}

int64_t fuzz_pick(fuzz_input *in, const int64_t *values, size_t n) {
  return values[fuzz_u8(in) % n];
}

float fuzz_float(fuzz_input *in) {
  static const float special[] = {
      0.0f,  -0.0f,    1.0f,      -1.0f,   0.5f,     2.0f,    -2.0f,      NAN,
      -NAN,  INFINITY, -INFINITY, FLT_MAX, -FLT_MAX, FLT_MIN, 1e-45f,     -1e-45f,
      88.7f, -88.7f,   89.0f,     -89.0f,  100.0f,   -100.0f, 1e30f,      -1e30f,
      3.0f,  -3.0f,    0.25f,     10.0f,   -10.0f,   -87.0f,  1.0000001f, 0.99999994f,
  };
  uint8_t mode = fuzz_u8(in);
  if (mode < 96) return special[mode % (sizeof special / sizeof special[0])];
  if (mode < 192) return (float)((int32_t)fuzz_u8(in) - 128) / 16.0f; /* small, many ties */
  uint32_t bits = fuzz_u32(in);
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

bool fuzz_done(const fuzz_input *in) {
  return in->pos >= in->size;
}

void fuzz_fail(const char *fmt, ...) {
  va_list args;
  va_start(args, fmt);
  fputs("moe fuzz: ", stderr);
  vfprintf(stderr, fmt, args);
  fputc('\n', stderr);
  va_end(args);
  abort();
}

void fuzz_clear_errors(moe_context *const *contexts, int count) {
  moe_error_scope(NULL);
  moe_set_error(MOE_SUCCESS, "%s", "");
  for (int i = 0; i < count; ++i) {
    if (!contexts[i]) continue;
    moe_error_scope(contexts[i]);
    moe_set_error(MOE_SUCCESS, "%s", "");
  }
  moe_error_scope(NULL);
}

void fuzz_check_status(const char *call, moe_status st, const moe_context *ctx, bool must_fail,
                       bool must_succeed) {
  FUZZ_CHECK(st <= MOE_SUCCESS && st >= MOE_ERROR_INTERNAL, "%s returned unknown status %d", call,
             (int)st);
  FUZZ_CHECK(strcmp(moe_status_string(st), "MOE_ERROR_UNKNOWN") != 0,
             "%s: moe_status_string(%d) has no name", call, (int)st);
  if (st != MOE_SUCCESS) {
    const char *message = moe_last_error(ctx);
    FUZZ_CHECK(message && message[0], "%s failed with %s but left moe_last_error(%s) empty", call,
               moe_status_string(st), ctx ? "ctx" : "NULL");
    FUZZ_CHECK(st != MOE_ERROR_INTERNAL, "%s: MOE_ERROR_INTERNAL: %s", call, message);
  }
  FUZZ_CHECK(!(must_fail && st == MOE_SUCCESS), "%s accepted an invalid argument", call);
  FUZZ_CHECK(!(must_succeed && st != MOE_SUCCESS), "%s rejected valid arguments: %s: %s", call,
             moe_status_string(st), moe_last_error(ctx));
}

void fuzz_buffer_make_mode(fuzz_buffer *b, fuzz_buffer_mode mode, moe_context *home,
                           moe_context *other, size_t need, bool optional, const void *fill,
                           size_t fill_bytes) {
  memset(b, 0, sizeof *b);
  b->need = need;
  if (need > FUZZ_MAX_BUFFER_BYTES && mode != FUZZ_BUFFER_NULL) mode = FUZZ_BUFFER_SMALL;
  if (mode == FUZZ_BUFFER_SMALL && need == 0) mode = FUZZ_BUFFER_EXACT; /* nothing is smaller */
  b->mode = mode;
  switch (mode) {
  case FUZZ_BUFFER_EXACT:
  case FUZZ_BUFFER_OTHER_CONTEXT:
    b->bytes = need ? need : 1;
    break;
  case FUZZ_BUFFER_LARGER:
    b->bytes = need + 1 + (need & 63);
    break;
  case FUZZ_BUFFER_SMALL:
    b->bytes = need > FUZZ_MAX_BUFFER_BYTES ? 4096 : need - 1;
    if (b->bytes == 0) b->bytes = 1; /* need was 1: no buffer is smaller */
    break;
  case FUZZ_BUFFER_NULL:
    break;
  }
  b->faulty = (mode == FUZZ_BUFFER_NULL && !optional) || (mode == FUZZ_BUFFER_SMALL) ||
              mode == FUZZ_BUFFER_OTHER_CONTEXT;
  if (mode == FUZZ_BUFFER_SMALL && b->bytes >= need) b->faulty = false;
  if (mode == FUZZ_BUFFER_NULL) return;

  moe_context *ctx = mode == FUZZ_BUFFER_OTHER_CONTEXT ? other : home;
  moe_status st = moe_buffer_create(ctx, b->bytes, &b->buffer);
  FUZZ_CHECK(st == MOE_SUCCESS, "moe_buffer_create(%zu) failed: %s", b->bytes, moe_last_error(ctx));
  b->shadow = malloc(b->bytes);
  FUZZ_CHECK(b->shadow, "out of host memory");
  if (fill && fill_bytes) {
    for (size_t i = 0; i < b->bytes; i += fill_bytes)
      memcpy(b->shadow + i, fill, b->bytes - i < fill_bytes ? b->bytes - i : fill_bytes);
  } else {
    /* A guard pattern that no kernel writes by accident. */
    uint32_t state = 0x9e3779b9u ^ (uint32_t)b->bytes;
    for (size_t i = 0; i < b->bytes; ++i) {
      state = state * 1664525u + 1013904223u;
      b->shadow[i] = (uint8_t)(state >> 24);
    }
  }
  st = moe_buffer_write(b->buffer, 0, b->shadow, b->bytes);
  FUZZ_CHECK(st == MOE_SUCCESS, "moe_buffer_write failed: %s", moe_last_error(ctx));
}

void fuzz_buffer_make(fuzz_input *in, fuzz_buffer *b, moe_context *home, moe_context *other,
                      size_t need, bool optional, const void *fill, size_t fill_bytes) {
  /* Mostly valid, so that calls get past validation into the kernels. */
  static const fuzz_buffer_mode modes[16] = {
      FUZZ_BUFFER_EXACT, FUZZ_BUFFER_EXACT, FUZZ_BUFFER_EXACT,         FUZZ_BUFFER_EXACT,
      FUZZ_BUFFER_EXACT, FUZZ_BUFFER_EXACT, FUZZ_BUFFER_EXACT,         FUZZ_BUFFER_EXACT,
      FUZZ_BUFFER_EXACT, FUZZ_BUFFER_EXACT, FUZZ_BUFFER_LARGER,        FUZZ_BUFFER_LARGER,
      FUZZ_BUFFER_NULL,  FUZZ_BUFFER_SMALL, FUZZ_BUFFER_OTHER_CONTEXT, FUZZ_BUFFER_EXACT,
  };
  fuzz_buffer_make_mode(b, modes[fuzz_u8(in) % 16], home, other, need, optional, fill, fill_bytes);
}

void *fuzz_buffer_contents(const fuzz_buffer *b) {
  if (!b->buffer) return NULL;
  void *host = malloc(b->bytes);
  FUZZ_CHECK(host, "out of host memory");
  moe_status st = moe_buffer_read(b->buffer, 0, host, b->bytes);
  FUZZ_CHECK(st == MOE_SUCCESS, "moe_buffer_read failed: %s", moe_status_string(st));
  return host;
}

void fuzz_buffer_expect_unchanged(const fuzz_buffer *b, size_t from, const char *call,
                                  const char *what) {
  if (!b->buffer || from >= b->bytes) return;
  uint8_t *now = fuzz_buffer_contents(b);
  for (size_t i = from; i < b->bytes; ++i)
    if (now[i] != b->shadow[i])
      fuzz_fail("%s wrote byte %zu of %s (%zu bytes, %zu needed) where it must not "
                "(0x%02x -> 0x%02x)",
                call, i, what, b->bytes, b->need, b->shadow[i], now[i]);
  free(now);
}

void fuzz_buffer_free(fuzz_buffer *b) {
  moe_buffer_destroy(b->buffer);
  free(b->shadow);
  memset(b, 0, sizeof *b);
}
