/*
 * moe_example.c - the C API end to end on the best backend of the machine:
 * a small Qwen3-MoE-shaped layer from random weights, a forward that also
 * captures its routing, and a replay of that routing through
 * moe_layer_forward_routed, which gives the same bits. Built by CMake
 * (examples/CMakeLists.txt) so that it keeps compiling.
 */
#include <moe.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define H 256
#define I 128
#define E 16
#define K 4
#define T 8

/* bf16 of a float (round to nearest even), enough for example data. */
static uint16_t bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

static float uniform(unsigned *state) {
  *state = *state * 1664525u + 1013904223u;
  return (float)(*state >> 8) / (float)(1u << 24) - 0.5f;
}

#define CHECK(call)                                                                                \
  do {                                                                                             \
    moe_status st_ = (call);                                                                       \
    if (st_ != MOE_SUCCESS) {                                                                      \
      fprintf(stderr, "%s failed: %s: %s\n", #call, moe_status_string(st_), moe_last_error(ctx));  \
      return 1;                                                                                    \
    }                                                                                              \
  } while (0)

int main(void) {
  static uint16_t w13[E * 2 * I * H], w2[E * H * I], x[T * H], out[T * H], replay[T * H];
  static float logits[T * E];
  unsigned seed = 1;
  for (size_t i = 0; i < sizeof w13 / 2; ++i)
    w13[i] = bf16(uniform(&seed) * 0.1f);
  for (size_t i = 0; i < sizeof w2 / 2; ++i)
    w2[i] = bf16(uniform(&seed) * 0.1f);
  for (size_t i = 0; i < sizeof x / 2; ++i)
    x[i] = bf16(uniform(&seed));
  for (size_t i = 0; i < T * E; ++i)
    logits[i] = uniform(&seed) * 4.0f;

  moe_context *ctx = NULL;
  CHECK(moe_context_create(MOE_BACKEND_AUTO, 0, &ctx));
  printf("backend %s on %s\n", moe_backend_name(moe_context_backend(ctx)),
         moe_context_device_name(ctx));

  moe_config cfg;
  moe_config_init(&cfg);
  cfg.hidden_size = H;
  cfg.intermediate_size = I;
  cfg.num_experts = E;
  cfg.top_k = K;
  cfg.renormalize = 1;
  moe_weights weights = {.w13 = w13, .w2 = w2};
  moe_layer *layer = NULL;
  CHECK(moe_layer_create(ctx, &cfg, &weights, &layer));
  CHECK(moe_layer_reserve(layer, T));

  moe_buffer *b_x, *b_logits, *b_out, *b_ids, *b_weights;
  CHECK(moe_buffer_create(ctx, sizeof x, &b_x));
  CHECK(moe_buffer_create(ctx, sizeof logits, &b_logits));
  CHECK(moe_buffer_create(ctx, sizeof out, &b_out));
  CHECK(moe_buffer_create(ctx, T * K * sizeof(int32_t), &b_ids));
  CHECK(moe_buffer_create(ctx, T * K * sizeof(float), &b_weights));
  CHECK(moe_buffer_write(b_x, 0, x, sizeof x));
  CHECK(moe_buffer_write(b_logits, 0, logits, sizeof logits));

  /* Routing out: the forward and the picks it made. */
  CHECK(moe_layer_forward_capture(layer, T, b_x, b_logits, b_out, b_ids, b_weights));
  CHECK(moe_buffer_read(b_out, 0, out, sizeof out));
  int32_t ids[T * K];
  CHECK(moe_buffer_read(b_ids, 0, ids, sizeof ids));
  printf("token 0 went to experts %d %d %d %d\n", ids[0], ids[1], ids[2], ids[3]);

  /* Routing in: replaying the picks gives the same bits. */
  CHECK(moe_layer_forward_routed(layer, T, b_x, b_ids, b_weights, b_out));
  CHECK(moe_buffer_read(b_out, 0, replay, sizeof replay));
  const int same = memcmp(out, replay, sizeof out) == 0;
  printf("replay %s the captured forward\n", same ? "matches" : "DIFFERS FROM");

  moe_buffer_destroy(b_x);
  moe_buffer_destroy(b_logits);
  moe_buffer_destroy(b_out);
  moe_buffer_destroy(b_ids);
  moe_buffer_destroy(b_weights);
  moe_layer_destroy(layer);
  moe_context_destroy(ctx);
  return same ? 0 : 1;
}
