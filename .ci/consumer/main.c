/* main.c - the smallest real use of the installed library: one forward of a
 * tiny layer on the AUTO backend, checked for finite, nonzero output. */
#include <moe.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
static float from_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

#define CHECK(call)                                                                                \
  do {                                                                                             \
    moe_status st_ = (call);                                                                       \
    if (st_ != MOE_SUCCESS) {                                                                      \
      fprintf(stderr, "%s: %s (%s)\n", #call, moe_status_string(st_), moe_last_error(ctx));        \
      return 1;                                                                                    \
    }                                                                                              \
  } while (0)

int main(void) {
  enum { T = 3, H = 32, I = 16, E = 4, K = 2 };
  moe_context *ctx = NULL;
  CHECK(moe_context_create(MOE_BACKEND_AUTO, 0, &ctx));
  printf("backend %s on %s\n", moe_backend_name(moe_context_backend(ctx)),
         moe_context_device_name(ctx));
  static uint16_t w13[E * 2 * I * H], w2[E * H * I], x[T * H], out[T * H];
  static float logits[T * E];
  srand(1);
  for (size_t i = 0; i < sizeof w13 / 2; ++i)
    w13[i] = to_bf16((rand() / (float)RAND_MAX - 0.5f) / 4);
  for (size_t i = 0; i < sizeof w2 / 2; ++i)
    w2[i] = to_bf16((rand() / (float)RAND_MAX - 0.5f) / 3);
  for (size_t i = 0; i < sizeof x / 2; ++i)
    x[i] = to_bf16(rand() / (float)RAND_MAX - 0.5f);
  for (size_t i = 0; i < T * E; ++i)
    logits[i] = rand() / (float)RAND_MAX;
  moe_config cfg;
  moe_config_init(&cfg);
  cfg.hidden_size = H;
  cfg.intermediate_size = I;
  cfg.num_experts = E;
  cfg.top_k = K;
  moe_weights weights = {.w13 = w13, .w2 = w2};
  moe_layer *layer = NULL;
  moe_buffer *bx = NULL, *bl = NULL, *bo = NULL;
  CHECK(moe_layer_create(ctx, &cfg, &weights, &layer));
  CHECK(moe_layer_reserve(layer, T));
  CHECK(moe_buffer_create(ctx, sizeof x, &bx));
  CHECK(moe_buffer_create(ctx, sizeof logits, &bl));
  CHECK(moe_buffer_create(ctx, sizeof out, &bo));
  CHECK(moe_buffer_write(bx, 0, x, sizeof x));
  CHECK(moe_buffer_write(bl, 0, logits, sizeof logits));
  CHECK(moe_layer_forward(layer, T, bx, bl, bo));
  CHECK(moe_buffer_read(bo, 0, out, sizeof out));
  double norm = 0;
  for (int i = 0; i < T * H; ++i)
    norm += from_bf16(out[i]) * (double)from_bf16(out[i]);
  moe_buffer_destroy(bx);
  moe_buffer_destroy(bl);
  moe_buffer_destroy(bo);
  moe_layer_destroy(layer);
  moe_context_destroy(ctx);
  if (!(norm > 0) || !isfinite(norm)) {
    fprintf(stderr, "consumer: output norm %g is not a positive finite number\n", norm);
    return 1;
  }
  printf("consumer: ok (|out|^2 = %.4g)\n", norm);
  return 0;
}
