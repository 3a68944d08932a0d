/*
 * harness.h - what every test file of the moe_tests suite shares: the
 * backend under test (chosen by MOE_TEST_BACKEND), the reproduction line
 * that every failing assertion prints, seeded data, guarded buffers, and
 * the numerical comparisons against the float64 references.
 *
 * Criterion runs each Test in a fresh process (it re-executes the binary),
 * so nothing set up in main() is visible to a test: each test reaches its
 * context through th_ctx(), created on first use in that process.
 */
#ifndef MOE_TESTS_HARNESS_H
#define MOE_TESTS_HARNESS_H

#include "moe.h"
#include "reference.h"

#include <criterion/criterion.h>

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- Backend under test --------------------------------------------------- */

/* The backend named by MOE_TEST_BACKEND (default cpu); false for an unknown
 * name. */
bool th_backend_from_env(moe_backend *backend, const char **name);

/* Applies MOE_TEST_OPTIONS ("name=value,name=value", read only by the
 * harness: CTest entries that force a kernel path set it) to ctx with
 * moe_context_set_option; on failure writes which one into failed. */
moe_status th_apply_test_options(moe_context *ctx, char *failed, size_t failed_size);

/* The context of the backend under test (created once per test process),
 * with MOE_TEST_OPTIONS applied. */
moe_context *th_ctx(void);
/* A second context of the same backend, for CONTEXT_MISMATCH cases. */
moe_context *th_other_ctx(void);
/* A CPU context to compare results with, or NULL when the CPU backend is
 * the one under test. */
moe_context *th_cpu_ctx(void);
/* Runs after every test (each suite's .fini): destroys the contexts and,
 * in an AddressSanitizer build, fails the test if it leaked anything. */
void th_suite_fini(void);
/* "cpu", "cuda" or "opencl". */
const char *th_backend_name(void);

/* ---- Reproduction line ------------------------------------------------ */

/* Describes the case being run (shapes, options, seed), printf style; every
 * TH_ASSERT message ends with it and the command that reruns the test. */
void th_case(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* "MOE_TEST_BACKEND=... ./moe_tests --filter 'suite/test'  [case]". */
const char *th_repro(void);
/* The short description of a configuration, for th_case. */
const char *th_config_text(const moe_config *cfg);

#define TH_ASSERT(cond, fmt, ...)                                                                  \
  cr_assert((cond), fmt "\n    reproduce: %s", ##__VA_ARGS__, th_repro())

/* Asserts that a library call succeeded. A valid case that the backend
 * declines (MOE_ERROR_UNSUPPORTED) skips the test, visibly. */
#define TH_OK(call) th_expect_ok((call), #call, __FILE__, __LINE__)
void th_expect_ok(moe_status status, const char *call, const char *file, int line);

/* ---- Data ------------------------------------------------------------- */

/* splitmix64: small, seedable, identical on every platform. */
typedef struct th_rng {
  uint64_t state;
} th_rng;

th_rng th_rng_make(uint64_t seed);
uint64_t th_rng_next(th_rng *rng);
/* Uniform in [0, 1). */
double th_rng_uniform(th_rng *rng);
/* Uniform integer in [0, n). */
int64_t th_rng_below(th_rng *rng, int64_t n);
/* N(0, 1) by Box-Muller. */
double th_rng_normal(th_rng *rng);

/* dst[i] = bf16(scale * N(0,1)) / fp32(scale * N(0,1)). */
void th_fill_bf16(th_rng *rng, uint16_t *dst, size_t count, double scale);
void th_fill_f32(th_rng *rng, float *dst, size_t count, double scale);

/* bf16 conversions (the reference's round-to-nearest-even). */
static inline float th_bf16_to_float(uint16_t v) {
  return (float)ref_bf16_to_double(v);
}
static inline uint16_t th_float_to_bf16(float v) {
  return ref_double_to_bf16(v);
}

/* Allocation that fails the test instead of returning NULL. */
void *th_malloc(size_t bytes);
void *th_calloc(size_t count, size_t size);

/* ---- Buffers ---------------------------------------------------------- */

/* Bytes of guard that th_output places after every output, and the byte
 * that fills outputs and guards before a call. */
#define TH_GUARD_BYTES 256
#define TH_FILL_BYTE 0xA5

/* A buffer holding a copy of data (bytes may be 0: a 1-byte buffer). */
moe_buffer *th_upload(moe_context *ctx, const void *data, size_t bytes);
/* An output buffer of bytes plus TH_GUARD_BYTES, every byte TH_FILL_BYTE. */
moe_buffer *th_output(moe_context *ctx, size_t bytes);
/* An output buffer of exactly bytes (no guard), every byte TH_FILL_BYTE:
 * for buffers that must be too small. */
moe_buffer *th_output_exact(moe_context *ctx, size_t bytes);
/* Fills a whole buffer with TH_FILL_BYTE again. */
void th_refill(moe_buffer *buffer);
/* Reads bytes from offset 0. */
void th_download(const moe_buffer *buffer, void *dst, size_t bytes);
/* Asserts that bytes [payload, size) of the buffer still hold TH_FILL_BYTE. */
void th_check_guard(const moe_buffer *buffer, size_t payload, const char *what);
/* Asserts that every byte of the buffer still holds TH_FILL_BYTE. */
void th_check_untouched(const moe_buffer *buffer, const char *what);

/* ---- Comparisons ------------------------------------------------------ */

/* ||lib - ref||_F / ||ref||_F; when ref is all zero, ||lib||_F. */
double th_rel_error(const uint16_t *lib, const double *ref, size_t count);
/* ||a - b||_F / ||b||_F for two bf16 tensors (b the CPU's). */
double th_rel_error_bf16(const uint16_t *a, const uint16_t *b, size_t count);

/* Element-wise check of a bf16 result against its float64 reference: each
 * value must be within half a bf16 unit (plus slack) of the reference, plus
 * the worst-case fp32 rounding of a sum of `terms` terms whose absolute
 * values add up to magnitude[i] (magnitude may be NULL: 0). Rows whose
 * reference is NaN are skipped. */
void th_check_bf16_close(const uint16_t *lib, const double *ref, const double *magnitude,
                         int64_t rows, int64_t cols, int64_t terms, const char *what);

/* Cross-backend check: both bf16 tensors within `bound` relative Frobenius
 * error of each other. */
void th_check_agree(const uint16_t *lib, const uint16_t *cpu, size_t count, double bound,
                    const char *what);

/* Checks topk_ids / topk_weights of the library against ref_route: ids
 * exact, except that a pick may differ at a near tie of the float64 keys
 * (float vs double rounding), weights within 1e-5 relative of the reference
 * scores of the ids actually picked. */
void th_check_route(const moe_config *cfg, int64_t num_tokens, const float *logits,
                    const float *correction_bias, const int32_t *ids, const float *weights);

/* ---- Layer data ------------------------------------------------------- */

typedef enum th_logits_kind {
  TH_LOGITS_NORMAL = 0, /* N(0, 1) */
  TH_LOGITS_TIES,       /* coarse values: many exact ties; some rows all equal */
  TH_LOGITS_SPECIAL,    /* rows with NaN, +inf, -inf, all NaN, all -inf */
  TH_LOGITS_ONE_EXPERT, /* every token picks the same top_k experts */
  TH_LOGITS_HALF_EMPTY, /* odd experts never picked (-1000) */
} th_logits_kind;

typedef enum th_map_kind {
  TH_MAP_NONE = 0, /* no expert map */
  TH_MAP_PARTIAL,  /* num_local_experts of the E are local, shuffled; others -1 */
  TH_MAP_NO_LOCAL, /* every entry -1: the output is 0 */
} th_map_kind;

typedef struct th_layer_spec {
  moe_config cfg; /* complete; num_local_experts used with TH_MAP_PARTIAL */
  int64_t num_tokens;
  bool w13_bias, w2_bias, correction_bias;
  th_map_kind map;
  th_logits_kind logits;
  uint64_t seed;
} th_layer_spec;

/* Host data of a layer case: weights in cfg's layout and the inputs. */
typedef struct th_layer_data {
  moe_config cfg; /* num_local_experts resolved */
  moe_weights weights;
  int64_t num_tokens;
  uint16_t *w13, *w2, *x;
  float *w13_bias, *w2_bias, *correction_bias, *logits;
  int32_t *expert_map;
} th_layer_data;

/* A config with sizes set and moe_config_init's defaults otherwise. */
moe_config th_config(int64_t H, int64_t I, int32_t E, int32_t k);
/* Generates the data of a spec and describes the case (th_case). */
void th_layer_data_make(th_layer_data *data, const th_layer_spec *spec);

/* One forward of T tokens starting at token `first` of d, on a layer of
 * ctx that holds a reservation of at least T; out receives [T][H] (the
 * output's guard bytes checked). */
void th_layer_forward_tokens(moe_layer *layer, moe_context *ctx, const th_layer_data *d,
                             int64_t first, int64_t T, uint16_t *out);
void th_layer_data_free(th_layer_data *data);
/* Logits of a kind for T tokens. */
void th_fill_logits(th_rng *rng, float *logits, int64_t T, int32_t E, int32_t k,
                    th_logits_kind kind);
/* An expert map of a kind ([E], local ids in [0, EL)). */
void th_fill_expert_map(th_rng *rng, int32_t *map, int32_t E, int32_t EL, th_map_kind kind);

#endif /* MOE_TESTS_HARNESS_H */
