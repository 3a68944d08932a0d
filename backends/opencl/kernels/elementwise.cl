/*
 * elementwise.cl - the gated activation and the weighted top-k reduce.
 * Both are one work-item per output element over a 2-D range (columns,
 * rows), so no index product is formed in 32 bits.
 */

/* out[r][i] = bf16(act(in[r][i], in[r][I + i])), fp32 in between. in is
 * bf16 (the stage), or fp32 when in_fp32 (the layer, whose gate|up stays
 * fp32 as on every backend: include/moe.h, "Numerics"). */
__kernel void moe_activation(int activation, float alpha, float limit, int rows,
                             int intermediate_size, int in_fp32, __global const ushort *in,
                             __global ushort *out) {
  const int i = get_global_id(0), r = get_global_id(1);
  if (i >= intermediate_size || r >= rows) return;
  const long base = (long)r * 2 * intermediate_size;
  __global const float *in32 = (__global const float *)in;
  const float gate = in_fp32 ? in32[base + i] : moe_bf16_to_float(in[base + i]);
  const float up = in_fp32 ? in32[base + intermediate_size + i]
                           : moe_bf16_to_float(in[base + intermediate_size + i]);
  out[(long)r * intermediate_size + i] =
      moe_bf16_from_float(moe_act_apply(activation, gate, up, alpha, limit));
}

/*
 * out[t][h] = bf16(sum_j w[t][j] * y[t*k + j][h]), j ascending. A slot
 * whose expert is not local (expert map -1, or an id outside the experts
 * align keeps) adds nothing and its row of y is never read.
 */
__kernel void moe_topk_reduce(int num_tokens, int top_k, int hidden_size, __global const ushort *y,
                              __global const float *topk_weights, __global const int *topk_ids,
                              __global const int *expert_map, int num_experts,
                              int num_local_experts, __global ushort *out) {
  const int h = get_global_id(0), t = get_global_id(1);
  if (h >= hidden_size || t >= num_tokens) return;
  float sum = 0.0f;
  for (int j = 0; j < top_k; ++j) {
    const int slot = t * top_k + j;
    /* With ids and no map, ids outside [0, EL) (the routed forward's -1)
     * are skipped too; the reduce stage passes ids only with a map. */
    if (topk_ids &&
        moe_local_expert(topk_ids[slot], expert_map, num_experts, num_local_experts) < 0)
      continue;
    const float v = moe_bf16_to_float(y[(long)slot * hidden_size + h]);
    sum += topk_weights ? topk_weights[slot] * v : v;
  }
  out[(long)t * hidden_size + h] = moe_bf16_from_float(sum);
}
