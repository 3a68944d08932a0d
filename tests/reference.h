/*
 * reference.h - float64 references of routing, align, every stage and the
 * whole layer, independent of every backend (they share no code with core/
 * or backends/). Used by the test suite and the fuzz targets.
 *
 * Each function restates the rule documented in include/moe.h (and the
 * metadata contract of docs/DESIGN.md) in the plainest form: one loop per
 * definition, double arithmetic, no tiling, no threads.
 */
#ifndef MOE_TESTS_REFERENCE_H
#define MOE_TESTS_REFERENCE_H

#include "moe.h"

#include <stdbool.h>
#include <stdint.h>

/* bf16 <-> double helpers (round to nearest even). */
double ref_bf16_to_double(uint16_t v);
uint16_t ref_double_to_bf16(double v);

/* Routing per include/moe.h's documented rule, in float64 (ranking uses the
 * same keys; ids must match the library exactly on inputs without near
 * ties). weights are float64 [T][k]. */
void ref_route(const moe_config *cfg, int64_t num_tokens, const float *logits,
               const float *correction_bias, int32_t *topk_ids, double *topk_weights);

/* One token's selection keys and scores (float64, [E] each) by the same
 * rule: score = softmax/sigmoid (0 for NaN logits and rows with no logit
 * above -inf), key = the logit or score + bias (NaN for NaN logits). Tests
 * use them to tell a near tie (float vs double rounding) from a wrong pick. */
void ref_route_token_keys(const moe_config *cfg, const float *logits, const float *correction_bias,
                          double *keys, double *scores);

/* 1 when (ka, a) ranks strictly above (kb, b): higher key, NaN below every
 * number, ties to the lower index. */
bool ref_ranks_above(double ka, int64_t a, double kb, int64_t b);

/* Align per docs/DESIGN.md; writes sorted_capacity / block_capacity entries
 * (capacities as moe_align_capacity computes them). */
void ref_align(int64_t num_tokens, int32_t top_k, int32_t num_experts, int32_t num_local_experts,
               int32_t block_m, const int32_t *topk_ids, const int32_t *expert_map,
               int32_t *sorted_token_ids, int32_t *expert_ids, int32_t *num_tokens_post_padded);

/* The capacities of align's outputs: T*k + EL*(BM-1) and that / BM rounded
 * up (no range checks). */
void ref_align_capacity(int64_t num_tokens, int32_t top_k, int32_t num_local_experts,
                        int32_t block_m, int64_t *sorted_capacity, int64_t *block_capacity);

/* The local expert of a router id (expert_map may be NULL), or -1 when the
 * slot is skipped: ids outside [0, E) with a map, or results outside
 * [0, EL). */
int32_t ref_local_expert(int32_t id, const int32_t *expert_map, int32_t num_experts,
                         int32_t num_local_experts);

/*
 * Grouped GEMM of moe_grouped_gemm, without the metadata: slot s uses local
 * expert slot_expert[s] (-1: skipped, its row of c is not computed and is
 * set to NaN). c is float64 [T*k][n] before the final bf16 rounding.
 * c_magnitude (may be NULL) receives, per element, the sum of the absolute
 * values of every term (|w| * sum |a*b| + |bias| ...), the scale of the
 * rounding error of any fp32 evaluation order.
 */
void ref_grouped_gemm(const moe_gemm_desc *desc, const uint16_t *a, const uint16_t *b,
                      const float *bias, const int32_t *slot_expert, const float *topk_weights,
                      double *c, double *c_magnitude);

/* One gated activation value, act(gate) * up (or the clamped gpt-oss form),
 * in float64. */
double ref_activation_value(moe_activation activation, double alpha, double limit, double gate,
                            double up);

/* moe_activation_apply in float64: out[r][i] for in bf16 [rows][2I]. */
void ref_activation(moe_activation activation, double alpha, double limit, int64_t rows,
                    int64_t intermediate_size, const uint16_t *in, double *out);

/* moe_topk_reduce in float64: out[t][h] = sum_j w[t][j] * y[t*k+j][h] over
 * the slots that are not skipped; topk_weights NULL means weight 1,
 * slot_expert NULL means no slot is skipped (else -1 marks a skipped one).
 * out_magnitude (may be NULL) receives sum |w*y| per element. */
void ref_topk_reduce(int64_t num_tokens, int32_t top_k, int64_t hidden_size, const uint16_t *y,
                     const float *topk_weights, const int32_t *slot_expert, double *out,
                     double *out_magnitude);

/*
 * The whole layer, in float64 from the bf16 inputs: routing by ref_route,
 * expert map, biases, router weight on input or output, both weight
 * layouts, every activation. When round_h is true the activation output h
 * is rounded to bf16, as the stage pipeline does. out is float64 [T][H]
 * (not rounded). cfg is taken as given to moe_layer_create
 * (num_local_experts 0 means num_experts).
 */
void ref_layer_forward(const moe_config *cfg, const moe_weights *weights, int64_t num_tokens,
                       const uint16_t *x, const float *logits, bool round_h, double *out);

/* As ref_layer_forward, on given picks: topk_ids[T][k] (router ids; -1 or
 * an id that is not local contributes nothing) and topk_weights[T][k]
 * (used as given). */
void ref_layer_forward_routed(const moe_config *cfg, const moe_weights *weights, int64_t num_tokens,
                              const uint16_t *x, const int32_t *topk_ids, const float *topk_weights,
                              bool round_h, double *out);

#endif /* MOE_TESTS_REFERENCE_H */
