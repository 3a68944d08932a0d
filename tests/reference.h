/*
 * reference.h - float64 references of routing, align, every stage and the
 * whole layer, independent of every backend (they share no code with core/
 * or backends/). Used by the test suite and the fuzz targets.
 */
#ifndef MOE_TESTS_REFERENCE_H
#define MOE_TESTS_REFERENCE_H

#include "moe.h"

#include <stdint.h>

/* bf16 <-> double helpers (round to nearest even). */
double ref_bf16_to_double(uint16_t v);
uint16_t ref_double_to_bf16(double v);

/* Routing per include/moe.h's documented rule, in float64 (ranking uses the
 * same keys; ids must match the library exactly on inputs without near
 * ties). weights are float64 [T][k]. */
void ref_route(const moe_config *cfg, int64_t num_tokens, const float *logits,
               const float *correction_bias, int32_t *topk_ids, double *topk_weights);

/* Align per DESIGN.md; writes sorted_capacity / block_capacity entries
 * (capacities as moe_align_capacity computes them). */
void ref_align(int64_t num_tokens, int32_t top_k, int32_t num_experts, int32_t num_local_experts,
               int32_t block_m, const int32_t *topk_ids, const int32_t *expert_map,
               int32_t *sorted_token_ids, int32_t *expert_ids, int32_t *num_tokens_post_padded);

#endif /* MOE_TESTS_REFERENCE_H */
