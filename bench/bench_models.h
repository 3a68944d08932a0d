/*
 * bench_models.h - the named MoE layer shapes that moe_bench runs (the five
 * models of docs/DESIGN.md), each with its routing and activation settings.
 */
#ifndef MOE_BENCH_MODELS_H
#define MOE_BENCH_MODELS_H

#include "moe.h"

#include <stdbool.h>

typedef struct bench_model {
  const char *name;
  moe_config cfg;           /* complete: sizes, routing, activation */
  bool has_biases;          /* per-expert w13/w2 biases (gpt-oss) */
  bool has_correction_bias; /* selection-only bias (DeepSeek-V3) */
} bench_model;

/* The number of named models, and the i-th one. */
int bench_model_count(void);
const bench_model *bench_model_at(int index);

/* The named model, or NULL. */
const bench_model *bench_model_find(const char *name);

/* A plain softmax/top-k/SwiGLU model of the given sizes, named "custom". */
bench_model bench_model_custom(int64_t hidden, int64_t intermediate, int32_t experts,
                               int32_t top_k);

/* Bytes of one expert's weights (w13 and w2, bf16): 3*H*I*2. */
double bench_model_expert_bytes(const moe_config *cfg);

/* Flops of T tokens: 2*T*k*3*H*I. */
double bench_model_flops(const moe_config *cfg, int64_t num_tokens);

#endif /* MOE_BENCH_MODELS_H */
