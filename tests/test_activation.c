/*
 * test_activation.c - moe_activation_apply against the float64 reference
 * for SwiGLU, GeGLU (tanh form) and the clamped gpt-oss SwiGLU, with
 * values well past the clamp limit, odd sizes and rows = 0.
 */
#include "harness.h"

#include <math.h>
#include <stdlib.h>

/* Every test ends by releasing its contexts; leaks fail it (ASan builds). */
TestSuite(activation, .fini = th_suite_fini);

static void activation_on(moe_context *ctx, moe_activation act, float alpha, float limit,
                          int64_t rows, int64_t I, const uint16_t *in, uint16_t *out) {
  const size_t out_bytes = (size_t)(rows * I) * 2;
  moe_buffer *b_in = th_upload(ctx, in, (size_t)(rows * 2 * I) * 2);
  moe_buffer *b_out = th_output(ctx, out_bytes);
  TH_OK(moe_activation_apply(ctx, act, alpha, limit, rows, I, b_in, b_out));
  th_download(b_out, out, out_bytes);
  th_check_guard(b_out, out_bytes, "out");
  moe_buffer_destroy(b_in);
  moe_buffer_destroy(b_out);
}

/* in ~ N(0, scale^2): scale 1 is the usual range, larger scales reach the
 * saturated tails and the clamp. */
static void activation_case(moe_activation act, float alpha, float limit, int64_t rows, int64_t I,
                            double scale, uint64_t seed) {
  static const char *names[] = {"swiglu", "geglu", "swiglu_clamp"};
  th_case("activation=%s alpha=%g limit=%g rows=%lld I=%lld scale=%g seed=%#llx", names[act],
          (double)alpha, (double)limit, (long long)rows, (long long)I, scale,
          (unsigned long long)seed);
  th_rng rng = th_rng_make(seed);
  uint16_t *in = th_malloc((size_t)(rows * 2 * I) * 2);
  th_fill_bf16(&rng, in, (size_t)(rows * 2 * I), scale);
  uint16_t *out = th_malloc((size_t)(rows * I) * 2);
  double *ref = th_malloc((size_t)(rows * I) * sizeof(double));
  double *magnitude = th_malloc((size_t)(rows * I) * sizeof(double));
  activation_on(th_ctx(), act, alpha, limit, rows, I, in, out);
  ref_activation(act, alpha, limit, rows, I, in, ref);
  /* fp32 transcendental functions: a few ulps of |gate| * (|up| + 1),
   * expressed as a magnitude with the per-term allowance of the check. */
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < I; ++i) {
      const double gate = ref_bf16_to_double(in[r * 2 * I + i]);
      const double up = ref_bf16_to_double(in[r * 2 * I + I + i]);
      magnitude[r * I + i] = 4.0 * (fabs(gate) + 1.0) * (fabs(up) + 1.0);
    }
  th_check_bf16_close(out, ref, magnitude, rows, I, 4, "out");
  if (th_cpu_ctx()) {
    uint16_t *cpu = th_malloc((size_t)(rows * I) * 2);
    activation_on(th_cpu_ctx(), act, alpha, limit, rows, I, in, cpu);
    th_check_agree(out, cpu, (size_t)(rows * I), 1e-2, "out");
    free(cpu);
  }
  free(in);
  free(out);
  free(ref);
  free(magnitude);
}

Test(activation, swiglu) {
  activation_case(MOE_ACTIVATION_SWIGLU, 0, 0, 100, 129, 1.0, 0x401);
  activation_case(MOE_ACTIVATION_SWIGLU, 0, 0, 33, 67, 8.0, 0x402);
}

Test(activation, geglu_tanh) {
  activation_case(MOE_ACTIVATION_GEGLU, 0, 0, 100, 129, 1.0, 0x403);
  activation_case(MOE_ACTIVATION_GEGLU, 0, 0, 33, 67, 8.0, 0x404);
}

Test(activation, swiglu_clamp_gpt_oss) {
  activation_case(MOE_ACTIVATION_SWIGLU_CLAMP, 1.702f, 7.0f, 100, 129, 1.0, 0x405);
  activation_case(MOE_ACTIVATION_SWIGLU_CLAMP, 1.702f, 7.0f, 100, 129, 10.0, 0x406);
  activation_case(MOE_ACTIVATION_SWIGLU_CLAMP, 1.0f, 0.5f, 7, 300, 3.0, 0x407);
}

Test(activation, odd_shapes) {
  activation_case(MOE_ACTIVATION_SWIGLU, 0, 0, 1, 1, 1.0, 0x408);
  activation_case(MOE_ACTIVATION_GEGLU, 0, 0, 3, 3001, 1.0, 0x409);
  activation_case(MOE_ACTIVATION_SWIGLU_CLAMP, 1.702f, 7.0f, 2049, 17, 4.0, 0x40a);
}

Test(activation, zero_rows_is_a_no_op) {
  th_case("activation rows=0 I=16");
  moe_context *ctx = th_ctx();
  moe_buffer *in = th_output(ctx, 0), *out = th_output(ctx, 0);
  TH_OK(moe_activation_apply(ctx, MOE_ACTIVATION_SWIGLU, 1.702f, 7.0f, 0, 16, in, out));
  th_check_untouched(out, "out");
  moe_buffer_destroy(in);
  moe_buffer_destroy(out);
}
