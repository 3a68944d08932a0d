/*
 * fuzz_common.h - what both libFuzzer targets share: a reader that turns
 * the fuzz input into arguments (running dry yields zeros, so every input
 * decodes), a failure report that aborts (libFuzzer then saves the input),
 * error-message and status checks, and guarded buffers that prove a call
 * left its outputs untouched.
 */
#ifndef MOE_FUZZ_COMMON_H
#define MOE_FUZZ_COMMON_H

#include "moe.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- Input decoding --------------------------------------------------- */

typedef struct fuzz_input {
  const uint8_t *data;
  size_t size;
  size_t pos;
} fuzz_input;

uint8_t fuzz_u8(fuzz_input *in);
uint16_t fuzz_u16(fuzz_input *in);
uint32_t fuzz_u32(fuzz_input *in);
uint64_t fuzz_u64(fuzz_input *in);
bool fuzz_bool(fuzz_input *in);
/* An integer in [lo, hi] (hi - lo < 2^32). */
int64_t fuzz_range(fuzz_input *in, int64_t lo, int64_t hi);
/* One of n values. */
int64_t fuzz_pick(fuzz_input *in, const int64_t *values, size_t n);
/* A float: usually one of the values that break numerics (NaN, +-inf,
 * +-0, denormals, FLT_MAX, ties), else raw bits. */
float fuzz_float(fuzz_input *in);
/* Nonzero when the input is used up. */
bool fuzz_done(const fuzz_input *in);

/* ---- Reporting -------------------------------------------------------- */

/* Prints "moe fuzz: <message>" and aborts, so that libFuzzer keeps the
 * input as a crash reproducer. */
void fuzz_fail(const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2), noreturn))
#endif
    ;

#define FUZZ_CHECK(cond, ...)                                                                      \
  do {                                                                                             \
    if (!(cond)) fuzz_fail(__VA_ARGS__);                                                           \
  } while (0)

/* Empties the per-thread message and those of the given contexts, so that
 * a message seen after a call was written by that call. */
void fuzz_clear_errors(moe_context *const *contexts, int count);

/* Checks a returned status: a known code; on error a non-empty message in
 * moe_last_error(ctx) (ctx NULL: the thread's); `must_fail` (an argument was
 * made invalid on purpose) forbids success and `must_succeed` (every
 * argument valid) forbids failure. `call` names the call for the report. */
void fuzz_check_status(const char *call, moe_status st, const moe_context *ctx, bool must_fail,
                       bool must_succeed);

/* ---- Guarded buffers -------------------------------------------------- */

/* How an argument buffer is made; all but EXACT and LARGER are faults when
 * the argument is checked (NULL is no fault for an optional one). */
typedef enum fuzz_buffer_mode {
  FUZZ_BUFFER_EXACT,
  FUZZ_BUFFER_LARGER,
  FUZZ_BUFFER_NULL,
  FUZZ_BUFFER_SMALL,
  FUZZ_BUFFER_OTHER_CONTEXT,
} fuzz_buffer_mode;

/* Buffers are capped so that a huge shape cannot exhaust memory; a shape
 * that needs more gets a capped, hence too small, buffer. */
#define FUZZ_MAX_BUFFER_BYTES ((size_t)4 << 20) /* > align capacity at the maxima */

typedef struct fuzz_buffer {
  moe_buffer *buffer; /* NULL in mode NULL */
  size_t need;        /* bytes the shapes need */
  size_t bytes;       /* bytes allocated */
  fuzz_buffer_mode mode;
  bool faulty;     /* NULL, too small or of the other context */
  uint8_t *shadow; /* the contents before the call */
} fuzz_buffer;

/* Decodes a mode (mostly EXACT) and creates the buffer on `home` (or on
 * `other` in mode OTHER_CONTEXT), filled with bytes from fill (repeated;
 * a pseudo-random guard pattern when fill is NULL). `optional`: NULL is
 * valid. */
void fuzz_buffer_make(fuzz_input *in, fuzz_buffer *b, moe_context *home, moe_context *other,
                      size_t need, bool optional, const void *fill, size_t fill_bytes);
/* As fuzz_buffer_make with a fixed mode. */
void fuzz_buffer_make_mode(fuzz_buffer *b, fuzz_buffer_mode mode, moe_context *home,
                           moe_context *other, size_t need, bool optional, const void *fill,
                           size_t fill_bytes);
/* Checks that bytes [from, bytes) still hold the contents from before the
 * call; `what` names the argument. */
void fuzz_buffer_expect_unchanged(const fuzz_buffer *b, size_t from, const char *call,
                                  const char *what);
/* Reads the whole buffer into host memory (the caller frees). */
void *fuzz_buffer_contents(const fuzz_buffer *b);
void fuzz_buffer_free(fuzz_buffer *b);

#endif /* MOE_FUZZ_COMMON_H */
