/*
 * reference.c - the float64 references declared in reference.h, written
 * from the rules documented in include/moe.h and docs/DESIGN.md only: they
 * include no core/ or backends/ header, so a shared mistake cannot hide.
 */
#include "reference.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- bf16 ----------------------------------------------------------------- */

double ref_bf16_to_double(uint16_t v) {
  uint32_t bits = (uint32_t)v << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

uint16_t ref_double_to_bf16(double v) {
  if (isnan(v)) return signbit(v) ? 0xffc0 : 0x7fc0;
  float f = (float)v; /* round to nearest even into float */
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  /* A float that sits exactly on a bf16 midpoint only because of the first
   * rounding would round again the wrong way: decide by the exact value. */
  if ((bits & 0xffffu) == 0x8000u && (double)f != v) {
    if (fabs(v) > fabs((double)f)) bits += 0x10000u;
    return (uint16_t)(bits >> 16);
  }
  return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* ---- Routing ---------------------------------------------------------- */

bool ref_ranks_above(double ka, int64_t a, double kb, int64_t b) {
  if (isnan(kb)) return !isnan(ka) || a < b;
  if (isnan(ka)) return false;
  return ka > kb || (ka == kb && a < b);
}

void ref_route_token_keys(const moe_config *cfg, const float *logits, const float *correction_bias,
                          double *keys, double *scores) {
  const int32_t E = cfg->num_experts;
  if (cfg->scoring == MOE_SCORING_SIGMOID) {
    for (int32_t e = 0; e < E; ++e)
      scores[e] = isnan(logits[e]) ? 0.0 : 1.0 / (1.0 + exp(-(double)logits[e]));
  } else {
    /* Softmax with NaN as -inf; +inf logits share the whole mass. */
    double max = -INFINITY;
    int64_t infinite = 0;
    for (int32_t e = 0; e < E; ++e) {
      if (!isnan(logits[e]) && logits[e] > max) max = logits[e];
      if (logits[e] == INFINITY) ++infinite;
    }
    double sum = 0.0;
    for (int32_t e = 0; e < E; ++e) {
      double l = logits[e];
      if (max == -INFINITY || isnan(l))
        scores[e] = 0.0;
      else if (infinite > 0)
        scores[e] = l == INFINITY ? 1.0 : 0.0;
      else
        scores[e] = exp(l - max);
      sum += scores[e];
    }
    if (sum > 0.0)
      for (int32_t e = 0; e < E; ++e)
        scores[e] /= sum;
  }
  const bool grouped = cfg->num_groups > 1;
  const bool key_is_logit =
      !correction_bias && !(grouped && cfg->group_scoring == MOE_GROUP_SCORING_TOP2_SUM);
  for (int32_t e = 0; e < E; ++e) {
    if (isnan(logits[e]))
      keys[e] = NAN;
    else if (key_is_logit)
      keys[e] = logits[e];
    else
      keys[e] = scores[e] + (correction_bias ? (double)correction_bias[e] : 0.0);
  }
}

/* Marks the experts of the topk_groups best groups in allowed[E]. */
static void ref_allowed_experts(const moe_config *cfg, const double *keys, bool *allowed) {
  const int32_t E = cfg->num_experts;
  const int32_t groups = cfg->num_groups > 1 ? cfg->num_groups : 1;
  const int32_t size = E / groups;
  if (groups == 1) {
    for (int32_t e = 0; e < E; ++e)
      allowed[e] = true;
    return;
  }
  double group_key[MOE_MAX_GROUPS];
  bool group_taken[MOE_MAX_GROUPS] = {false};
  for (int32_t g = 0; g < groups; ++g) {
    int32_t best = -1, second = -1;
    for (int32_t e = g * size; e < (g + 1) * size; ++e) {
      if (best < 0 || ref_ranks_above(keys[e], e, keys[best], best)) {
        second = best;
        best = e;
      } else if (second < 0 || ref_ranks_above(keys[e], e, keys[second], second)) {
        second = e;
      }
    }
    group_key[g] = keys[best];
    if (cfg->group_scoring == MOE_GROUP_SCORING_TOP2_SUM && second >= 0)
      group_key[g] += keys[second];
  }
  for (int32_t pick = 0; pick < cfg->topk_groups; ++pick) {
    int32_t best = -1;
    for (int32_t g = 0; g < groups; ++g)
      if (!group_taken[g] && (best < 0 || ref_ranks_above(group_key[g], g, group_key[best], best)))
        best = g;
    group_taken[best] = true;
  }
  for (int32_t e = 0; e < E; ++e)
    allowed[e] = group_taken[e / size];
}

void ref_route(const moe_config *cfg, int64_t num_tokens, const float *logits,
               const float *correction_bias, int32_t *topk_ids, double *topk_weights) {
  const int32_t E = cfg->num_experts, k = cfg->top_k;
  double *keys = malloc(sizeof(double) * (size_t)E);
  double *scores = malloc(sizeof(double) * (size_t)E);
  bool *allowed = malloc((size_t)E);
  for (int64_t t = 0; t < num_tokens; ++t) {
    ref_route_token_keys(cfg, logits + t * E, correction_bias, keys, scores);
    ref_allowed_experts(cfg, keys, allowed);
    int32_t *ids = topk_ids + t * k;
    double *w = topk_weights + t * k;
    double sum = 0.0;
    for (int32_t j = 0; j < k; ++j) {
      int32_t best = -1;
      for (int32_t e = 0; e < E; ++e)
        if (allowed[e] && (best < 0 || ref_ranks_above(keys[e], e, keys[best], best))) best = e;
      allowed[best] = false; /* taken */
      ids[j] = best;
      w[j] = scores[best];
      sum += w[j];
    }
    double factor = cfg->routed_scaling_factor;
    if (cfg->renormalize && sum > 0.0) factor /= sum;
    for (int32_t j = 0; j < k; ++j)
      w[j] *= factor;
  }
  free(keys);
  free(scores);
  free(allowed);
}

/* ---- Align ------------------------------------------------------------ */

int32_t ref_local_expert(int32_t id, const int32_t *expert_map, int32_t num_experts,
                         int32_t num_local_experts) {
  if (expert_map) {
    if (id < 0 || id >= num_experts) return -1;
    id = expert_map[id];
  }
  return id >= 0 && id < num_local_experts ? id : -1;
}

void ref_align_capacity(int64_t num_tokens, int32_t top_k, int32_t num_local_experts,
                        int32_t block_m, int64_t *sorted_capacity, int64_t *block_capacity) {
  *sorted_capacity = num_tokens * top_k + (int64_t)num_local_experts * (block_m - 1);
  *block_capacity = (*sorted_capacity + block_m - 1) / block_m;
}

void ref_align(int64_t num_tokens, int32_t top_k, int32_t num_experts, int32_t num_local_experts,
               int32_t block_m, const int32_t *topk_ids, const int32_t *expert_map,
               int32_t *sorted_token_ids, int32_t *expert_ids, int32_t *num_tokens_post_padded) {
  const int64_t slots = num_tokens * top_k;
  int64_t sorted_capacity, block_capacity;
  ref_align_capacity(num_tokens, top_k, num_local_experts, block_m, &sorted_capacity,
                     &block_capacity);
  for (int64_t i = 0; i < sorted_capacity; ++i)
    sorted_token_ids[i] = (int32_t)slots;
  for (int64_t b = 0; b < block_capacity; ++b)
    expert_ids[b] = -1;
  /* Expert by expert, its slots in ascending order, then padding. */
  int64_t position = 0;
  for (int32_t e = 0; e < num_local_experts; ++e) {
    const int64_t start = position;
    for (int64_t s = 0; s < slots; ++s)
      if (ref_local_expert(topk_ids[s], expert_map, num_experts, num_local_experts) == e)
        sorted_token_ids[position++] = (int32_t)s;
    position = start + (position - start + block_m - 1) / block_m * block_m;
    for (int64_t b = start / block_m; b < position / block_m; ++b)
      expert_ids[b] = e;
  }
  *num_tokens_post_padded = (int32_t)position;
}

/* ---- Grouped GEMM ----------------------------------------------------- */

void ref_grouped_gemm(const moe_gemm_desc *desc, const uint16_t *a, const uint16_t *b,
                      const float *bias, const int32_t *slot_expert, const float *topk_weights,
                      double *c, double *c_magnitude) {
  const int64_t slots = desc->num_tokens * desc->top_k, n = desc->n, K = desc->k;
  for (int64_t s = 0; s < slots; ++s) {
    const int32_t e = slot_expert[s];
    double *c_row = c + s * n;
    double *m_row = c_magnitude ? c_magnitude + s * n : NULL;
    if (e < 0) {
      for (int64_t j = 0; j < n; ++j) {
        c_row[j] = NAN;
        if (m_row) m_row[j] = 0.0;
      }
      continue;
    }
    const int64_t row = desc->input == MOE_GEMM_INPUT_PER_TOKEN ? s / desc->top_k : s;
    const uint16_t *a_row = a + row * K;
    const uint16_t *b_expert = b + (int64_t)e * n * K;
    const double w = desc->routed_weight != MOE_GEMM_ROUTED_WEIGHT_NONE ? topk_weights[s] : 1.0;
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0.0, magnitude = 0.0;
      for (int64_t i = 0; i < K; ++i) {
        const uint16_t bv =
            desc->b_layout == MOE_WEIGHT_LAYOUT_OUT_IN ? b_expert[j * K + i] : b_expert[i * n + j];
        const double p = ref_bf16_to_double(a_row[i]) * ref_bf16_to_double(bv);
        acc += p;
        magnitude += fabs(p);
      }
      const double bias_value = bias ? bias[(int64_t)e * n + j] : 0.0;
      double value;
      switch (desc->routed_weight) {
      case MOE_GEMM_ROUTED_WEIGHT_BEFORE_BIAS:
        value = w * acc + bias_value;
        magnitude = fabs(w) * magnitude + fabs(bias_value);
        break;
      case MOE_GEMM_ROUTED_WEIGHT_AFTER_BIAS:
        value = w * (acc + bias_value);
        magnitude = fabs(w) * (magnitude + fabs(bias_value));
        break;
      default:
        value = acc + bias_value;
        magnitude += fabs(bias_value);
        break;
      }
      c_row[j] = value;
      if (m_row) m_row[j] = magnitude;
    }
  }
}

/* ---- Activation ------------------------------------------------------- */

double ref_activation_value(moe_activation activation, double alpha, double limit, double gate,
                            double up) {
  switch (activation) {
  case MOE_ACTIVATION_GEGLU: {
    const double inner =
        0.7978845608028654 /* sqrt(2 / pi) */ * (gate + 0.044715 * gate * gate * gate);
    return 0.5 * gate * (1.0 + tanh(inner)) * up;
  }
  case MOE_ACTIVATION_SWIGLU_CLAMP: {
    /* NaN stays NaN (moe.h, "Numerics"): only a number above limit clamps. */
    const double g = isnan(gate) ? gate : gate < limit ? gate : limit;
    const double u = up < -limit ? -limit : up > limit ? limit : up;
    return g / (1.0 + exp(-alpha * g)) * (u + 1.0);
  }
  default:
    return gate / (1.0 + exp(-gate)) * up;
  }
}

void ref_activation(moe_activation activation, double alpha, double limit, int64_t rows,
                    int64_t intermediate_size, const uint16_t *in, double *out) {
  const int64_t I = intermediate_size;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < I; ++i)
      out[r * I + i] =
          ref_activation_value(activation, alpha, limit, ref_bf16_to_double(in[r * 2 * I + i]),
                               ref_bf16_to_double(in[r * 2 * I + I + i]));
}

/* ---- Reduce ----------------------------------------------------------- */

void ref_topk_reduce(int64_t num_tokens, int32_t top_k, int64_t hidden_size, const uint16_t *y,
                     const float *topk_weights, const int32_t *slot_expert, double *out,
                     double *out_magnitude) {
  const int64_t H = hidden_size;
  for (int64_t t = 0; t < num_tokens; ++t)
    for (int64_t h = 0; h < H; ++h) {
      double sum = 0.0, magnitude = 0.0;
      for (int32_t j = 0; j < top_k; ++j) {
        const int64_t s = t * top_k + j;
        if (slot_expert && slot_expert[s] < 0) continue;
        const double term =
            (topk_weights ? topk_weights[s] : 1.0) * ref_bf16_to_double(y[s * H + h]);
        sum += term;
        magnitude += fabs(term);
      }
      out[t * H + h] = sum;
      if (out_magnitude) out_magnitude[t * H + h] = magnitude;
    }
}

/* ---- Whole layer ------------------------------------------------------ */

/* The layer on given picks (ids, float64 weights): the body of both
 * ref_layer_forward and ref_layer_forward_routed. */
static void layer_on_picks(const moe_config *cfg, const moe_weights *weights, int64_t num_tokens,
                           const uint16_t *x, const int32_t *ids, const double *w, bool round_h,
                           double *out) {
  const int64_t H = cfg->hidden_size, I = cfg->intermediate_size, T = num_tokens;
  const int32_t E = cfg->num_experts, k = cfg->top_k;
  const int32_t EL = cfg->num_local_experts ? cfg->num_local_experts : E;
  const bool out_in = cfg->weight_layout == MOE_WEIGHT_LAYOUT_OUT_IN;
  double *gu = malloc(sizeof(double) * (size_t)(2 * I));
  double *h = malloc(sizeof(double) * (size_t)I);

  for (int64_t t = 0; t < T; ++t) {
    double *out_row = out + t * H;
    for (int64_t o = 0; o < H; ++o)
      out_row[o] = 0.0;
    const uint16_t *x_row = x + t * H;
    for (int32_t j = 0; j < k; ++j) {
      const int32_t e = ref_local_expert(ids[t * k + j], weights->expert_map, E, EL);
      if (e < 0) continue; /* not local: contributes nothing */
      const double weight = w[t * k + j];
      const bool on_input = cfg->router_weight == MOE_ROUTER_WEIGHT_ON_INPUT;
      const uint16_t *w13 = weights->w13 + (int64_t)e * 2 * I * H;
      const uint16_t *w2 = weights->w2 + (int64_t)e * H * I;
      for (int64_t i = 0; i < 2 * I; ++i) {
        double acc = 0.0;
        for (int64_t c = 0; c < H; ++c)
          acc += ref_bf16_to_double(x_row[c]) *
                 ref_bf16_to_double(out_in ? w13[i * H + c] : w13[c * 2 * I + i]);
        if (on_input) acc *= weight;
        gu[i] = acc + (weights->w13_bias ? weights->w13_bias[(int64_t)e * 2 * I + i] : 0.0);
      }
      for (int64_t i = 0; i < I; ++i) {
        h[i] = ref_activation_value(cfg->activation, cfg->swiglu_alpha, cfg->swiglu_limit, gu[i],
                                    gu[I + i]);
        if (round_h) h[i] = ref_bf16_to_double(ref_double_to_bf16(h[i]));
      }
      for (int64_t o = 0; o < H; ++o) {
        double acc = 0.0;
        for (int64_t i = 0; i < I; ++i)
          acc += h[i] * ref_bf16_to_double(out_in ? w2[o * I + i] : w2[i * H + o]);
        acc += weights->w2_bias ? weights->w2_bias[(int64_t)e * H + o] : 0.0;
        out_row[o] += on_input ? acc : weight * acc;
      }
    }
  }
  free(gu);
  free(h);
}

void ref_layer_forward(const moe_config *cfg, const moe_weights *weights, int64_t num_tokens,
                       const uint16_t *x, const float *logits, bool round_h, double *out) {
  const int64_t n = num_tokens * cfg->top_k + 1;
  int32_t *ids = malloc(sizeof(int32_t) * (size_t)n);
  double *w = malloc(sizeof(double) * (size_t)n);
  ref_route(cfg, num_tokens, logits, weights->correction_bias, ids, w);
  layer_on_picks(cfg, weights, num_tokens, x, ids, w, round_h, out);
  free(ids);
  free(w);
}

void ref_layer_forward_routed(const moe_config *cfg, const moe_weights *weights, int64_t num_tokens,
                              const uint16_t *x, const int32_t *topk_ids, const float *topk_weights,
                              bool round_h, double *out) {
  const int64_t n = num_tokens * cfg->top_k;
  double *w = malloc(sizeof(double) * (size_t)(n + 1));
  for (int64_t s = 0; s < n; ++s)
    w[s] = topk_weights[s];
  layer_on_picks(cfg, weights, num_tokens, x, topk_ids, w, round_h, out);
  free(w);
}
