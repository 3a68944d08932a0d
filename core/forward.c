/*
 * forward.c - the default layer forward: the one composition of a
 * backend's stage operations (route, align, GEMM1 into fp32 gate|up,
 * activation, GEMM2 with the routed weight, reduce) for a moe_forward_io,
 * on the buffers the backend names in moe_forward_parts (docs/DESIGN.md,
 * "The forward"). Backends that fuse stages override it with their own
 * layer_forward entries.
 */
#include "backend.h"

/* Where the stages read x and logits and write out: the caller's buffers
 * for a window at token 0, else the parts' stage buffers (a kernel takes
 * whole buffers; see moe_forward_parts). */
typedef struct window {
  const void *x, *logits;
  void *out;
} window;

/* Fills w, copying x and logits of a window past token 0 into the stage
 * buffers. */
static moe_status stage_in(const moe_backend_ops *ops, void *state, const moe_forward_parts *p,
                           const moe_config *cfg, const moe_forward_io *io, window *w) {
  const size_t t0 = (size_t)io->first_token, T = (size_t)io->num_tokens;
  const size_t H = (size_t)cfg->hidden_size, E = (size_t)cfg->num_experts;
  w->x = io->x;
  w->logits = io->logits;
  w->out = io->out;
  if (t0 == 0) return MOE_SUCCESS;
  MOE_TRY(ops->copy(state, io->x, t0 * H * 2, p->x_stage, 0, T * H * 2));
  w->x = p->x_stage;
  if (io->logits) {
    MOE_TRY(ops->copy(state, io->logits, t0 * E * 4, p->logits_stage, 0, T * E * 4));
    w->logits = p->logits_stage;
  }
  w->out = p->out_stage;
  return MOE_SUCCESS;
}

/* The picks into the workspace: routed from logits (then copied to the
 * capture buffers that are given), or the caller's copied in. */
static moe_status picks(const moe_backend_ops *ops, void *state, const moe_forward_parts *p,
                        const moe_config *cfg, const moe_forward_io *io, const window *w) {
  const size_t offset = (size_t)(io->first_token * cfg->top_k) * 4;
  const size_t bytes = (size_t)(io->num_tokens * cfg->top_k) * 4;
  if (!io->logits) {
    MOE_TRY(ops->copy(state, io->topk_ids_in, offset, p->topk_ids, 0, bytes));
    return ops->copy(state, io->topk_weights_in, offset, p->topk_weights, 0, bytes);
  }
  const moe_route_args route = moe_plan_route_args(
      cfg, io->num_tokens, w->logits, p->correction_bias, p->topk_ids, p->topk_weights);
  MOE_TRY(ops->route(state, &route));
  if (io->topk_ids_out) MOE_TRY(ops->copy(state, p->topk_ids, 0, io->topk_ids_out, offset, bytes));
  if (io->topk_weights_out)
    MOE_TRY(ops->copy(state, p->topk_weights, 0, io->topk_weights_out, offset, bytes));
  return MOE_SUCCESS;
}

moe_status moe_forward_default(const moe_backend_ops *ops, void *state, void *layer,
                               const moe_config *cfg, const moe_forward_io *io) {
  moe_forward_parts p;
  ops->forward_parts(layer, &p);
  const int64_t T = io->num_tokens;
  window w;
  MOE_TRY(stage_in(ops, state, &p, cfg, io, &w));
  MOE_TRY(picks(ops, state, &p, cfg, io, &w));

  const int32_t block_m = p.block_m(cfg, T);
  const moe_align_args align =
      moe_plan_align_args(cfg, T, block_m, p.topk_ids, p.expert_map, p.sorted_token_ids,
                          p.expert_ids, p.num_tokens_post_padded);
  MOE_TRY(ops->align(state, &align));

  /* gate|up stays fp32 between GEMM1 and the activation, as in every
   * backend's fused epilogue (include/moe.h, "Numerics"). */
  moe_gemm_desc desc1, desc2;
  moe_plan_gemm_descs(cfg, T, block_m, p.b_layout, &desc1, &desc2);
  moe_gemm_args gemm = {
      .desc = desc1,
      .sorted_capacity = align.sorted_capacity,
      .block_capacity = align.block_capacity,
      .a = w.x,
      .b = p.w13,
      .bias = p.w13_bias,
      .sorted_token_ids = p.sorted_token_ids,
      .expert_ids = p.expert_ids,
      .num_tokens_post_padded = p.num_tokens_post_padded,
      .topk_weights = p.topk_weights,
      .c = p.gate_up,
      .c_fp32 = 1,
      .batch_invariant = cfg->batch_invariant != 0,
  };
  MOE_TRY(ops->grouped_gemm(state, &gemm));

  const moe_activation_args act = {.activation = cfg->activation,
                                   .alpha = cfg->swiglu_alpha,
                                   .limit = cfg->swiglu_limit,
                                   .rows = T * cfg->top_k,
                                   .intermediate_size = cfg->intermediate_size,
                                   .in = p.gate_up,
                                   .out = p.hidden,
                                   .in_fp32 = 1};
  MOE_TRY(ops->activation(state, &act));

  gemm.desc = desc2;
  gemm.a = p.hidden;
  gemm.b = p.w2;
  gemm.bias = p.w2_bias;
  gemm.c = p.expert_out;
  gemm.c_fp32 = 0;
  MOE_TRY(ops->grouped_gemm(state, &gemm));

  const moe_reduce_args reduce =
      moe_plan_reduce_args(cfg, T, p.expert_out, p.topk_ids, p.expert_map, w.out);
  MOE_TRY(ops->topk_reduce(state, &reduce));
  if (w.out == io->out) return MOE_SUCCESS;
  const size_t H = (size_t)cfg->hidden_size;
  return ops->copy(state, w.out, 0, io->out, (size_t)io->first_token * H * 2, (size_t)T * H * 2);
}
