/*
 * opencl_backend.c - the OpenCL backend's operation table: buffers as
 * cl_mem, the stages as kernels of the one program (kernels/), and the
 * layer: weights repacked to the [out][in] layout at create and a workspace
 * sized at reserve. The layer forward is the core's default one
 * (core/forward.c) on the parts this file names (ocl_forward_parts); the
 * stages only enqueue. In it GEMM1 stores gate|up in fp32 and the
 * activation reads them so (moe_gemm_args.c_fp32,
 * moe_activation_args.in_fp32), as the CPU and CUDA epilogues keep them
 * (include/moe.h, "Numerics").
 *
 * GEMM kernel choice (see bench/opencl_notes.md for the measurements): the
 * skinny kernel while the rows per touched expert (moe_plan_rows_per_expert,
 * docs/DESIGN.md "Core plan helpers") are at most
 * MOE_OCL_SKINNY_MAX_ROWS (option opencl.skinny_max_rows overrides), the
 * 128x128 tile from MOE_OCL_TILE128_MIN_ROWS on, else the 64x64 tile. On
 * CPU devices the row kernel serves every [out][in] GEMM. Option
 * opencl.skinny forces a skinny variant by name (also on CPU devices, for
 * tests). A batch-invariant layer runs one kernel for every T: the 64x64
 * tile with block_m 64 on GPUs, the row kernel on CPU devices.
 */
#include "opencl_internal.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MOE_OCL_SKINNY_MAX_ROWS 64
#define MOE_OCL_TILE128_MIN_ROWS 512

/* ------------------------------------------------------------------------ */
/* Kernel launch helpers                                                    */
/* ------------------------------------------------------------------------ */

typedef struct kernel_args {
  cl_kernel kernel;
  cl_uint index;
  cl_int err;
} kernel_args;

static kernel_args args_begin(const moe_ocl_state *s, moe_ocl_kernel_id id) {
  return (kernel_args){s->kernels[id], 0, CL_SUCCESS};
}

static void arg_raw(kernel_args *a, size_t size, const void *value) {
  if (a->err == CL_SUCCESS) a->err = clSetKernelArg(a->kernel, a->index, size, value);
  a->index++;
}

/* A buffer argument; NULL becomes a NULL __global pointer. */
static void arg_mem(kernel_args *a, const void *handle) {
  cl_mem mem = (cl_mem)handle;
  arg_raw(a, sizeof mem, handle ? &mem : NULL);
}

static void arg_int(kernel_args *a, int64_t value) {
  cl_int v = (cl_int)value;
  arg_raw(a, sizeof v, &v);
}

static void arg_float(kernel_args *a, float value) {
  arg_raw(a, sizeof value, &value);
}

static size_t round_up(size_t x, size_t m) {
  return (x + m - 1) / m * m;
}

/* Enqueues a->kernel over global (rounded up to local) work-items. */
static moe_status launch(moe_ocl_state *s, kernel_args *a, cl_uint dims, const size_t *global,
                         const size_t *local, const char *what) {
  if (a->err != CL_SUCCESS) return moe_ocl_fail(a->err, "clSetKernelArg");
  size_t rounded[2];
  for (cl_uint d = 0; d < dims; ++d) {
    if (global[d] == 0) return MOE_SUCCESS;
    rounded[d] = round_up(global[d], local[d]);
  }
  cl_int err =
      clEnqueueNDRangeKernel(s->queue, a->kernel, dims, NULL, rounded, local, 0, NULL, NULL);
  return err == CL_SUCCESS ? MOE_SUCCESS : moe_ocl_fail(err, what);
}

/* ------------------------------------------------------------------------ */
/* Context and buffers                                                      */
/* ------------------------------------------------------------------------ */

static void ocl_context_destroy(void *state) {
  moe_ocl_state *s = state;
  if (s && s->queue) clFinish(s->queue);
  moe_ocl_state_free(s);
}

static moe_status ocl_synchronize(void *state) {
  cl_int err = clFinish(((moe_ocl_state *)state)->queue);
  return err == CL_SUCCESS ? MOE_SUCCESS : moe_ocl_fail(err, "clFinish");
}

/* The device's largest single allocation (CL_DEVICE_MAX_MEM_ALLOC_SIZE) or
 * its whole memory (CL_DEVICE_GLOBAL_MEM_SIZE). */
static cl_ulong device_limit(const moe_ocl_state *s, cl_device_info what) {
  cl_ulong value = 0;
  if (clGetDeviceInfo(s->device, what, sizeof value, &value, NULL) != CL_SUCCESS) return ~0ULL;
  return value;
}

static moe_status ocl_buffer_alloc(void *state, size_t bytes, void **handle) {
  /* Drivers that allocate lazily (NVIDIA) accept sizes they cannot back;
   * refuse those here, so the failure is an OUT_OF_MEMORY now and not a
   * failed kernel later. */
  const cl_ulong max_alloc = device_limit(state, CL_DEVICE_MAX_MEM_ALLOC_SIZE);
  if ((cl_ulong)bytes > max_alloc)
    return moe_set_error(MOE_ERROR_OUT_OF_MEMORY,
                         "OpenCL: %zu bytes exceed the device's largest allocation (%llu bytes)",
                         bytes, (unsigned long long)max_alloc);
  cl_int err;
  cl_mem mem =
      clCreateBuffer(((moe_ocl_state *)state)->context, CL_MEM_READ_WRITE, bytes, NULL, &err);
  if (err != CL_SUCCESS) return moe_ocl_fail(err, "clCreateBuffer");
  *handle = mem;
  return MOE_SUCCESS;
}

static void ocl_buffer_free(void *state, void *handle) {
  (void)state;
  if (handle) clReleaseMemObject((cl_mem)handle);
}

static moe_status ocl_buffer_write(void *state, void *handle, size_t offset, const void *src,
                                   size_t bytes) {
  if (bytes == 0) return MOE_SUCCESS;
  cl_int err = clEnqueueWriteBuffer(((moe_ocl_state *)state)->queue, (cl_mem)handle, CL_TRUE,
                                    offset, bytes, src, 0, NULL, NULL);
  return err == CL_SUCCESS ? MOE_SUCCESS : moe_ocl_fail(err, "clEnqueueWriteBuffer");
}

static moe_status ocl_buffer_read(void *state, const void *handle, size_t offset, void *dst,
                                  size_t bytes) {
  if (bytes == 0) return MOE_SUCCESS;
  cl_int err = clEnqueueReadBuffer(((moe_ocl_state *)state)->queue, (cl_mem)handle, CL_TRUE, offset,
                                   bytes, dst, 0, NULL, NULL);
  return err == CL_SUCCESS ? MOE_SUCCESS : moe_ocl_fail(err, "clEnqueueReadBuffer");
}

/* An enqueued copy between cl_mem objects at byte offsets (no host wait). */
static moe_status ocl_copy(void *state, const void *src, size_t src_offset, void *dst,
                           size_t dst_offset, size_t bytes) {
  cl_int err = clEnqueueCopyBuffer(((moe_ocl_state *)state)->queue, (cl_mem)src, (cl_mem)dst,
                                   src_offset, dst_offset, bytes, 0, NULL, NULL);
  return err == CL_SUCCESS ? MOE_SUCCESS : moe_ocl_fail(err, "clEnqueueCopyBuffer");
}

/* ------------------------------------------------------------------------ */
/* Stages                                                                   */
/* ------------------------------------------------------------------------ */

/* Whether routing takes the work-group-per-token kernel. */
static int route_parallel(const moe_ocl_state *s, int32_t num_groups) {
  /* Ungrouped routing on a GPU takes the work-group-per-token kernel: the
   * serial kernel walks k * E keys one after another on one work-item, and
   * the whole suite passes with the parallel one under NVIDIA's OpenCL and
   * on PoCL. CPU devices keep the serial kernel (faster on PoCL), as does
   * grouped routing. Option opencl.route = serial|parallel forces one.
   * Measurements: bench/opencl_notes.md, 'Measurements behind the code's
   * rules'. */
  int parallel = s->is_gpu;
  if (s->route_option == MOE_OPENCL_ROUTE_PARALLEL) parallel = 1;
  if (s->route_option == MOE_OPENCL_ROUTE_SERIAL) parallel = 0;
  return parallel && num_groups <= 1;
}

static moe_status ocl_route(void *state, const moe_route_args *r) {
  moe_ocl_state *s = state;
  const int parallel = route_parallel(s, r->num_groups);
  kernel_args a = args_begin(s, parallel ? MOE_OCL_ROUTE_PARALLEL : MOE_OCL_ROUTE);
  arg_int(&a, r->num_tokens);
  arg_mem(&a, r->logits);
  arg_mem(&a, r->correction_bias);
  arg_mem(&a, r->topk_ids);
  arg_mem(&a, r->topk_weights);
  arg_int(&a, r->num_experts);
  arg_int(&a, r->top_k);
  arg_int(&a, r->scoring == MOE_SCORING_SIGMOID);
  arg_int(&a, r->renormalize != 0);
  arg_int(&a, r->num_groups);
  arg_int(&a, r->topk_groups);
  arg_int(&a, r->group_scoring == MOE_GROUP_SCORING_TOP2_SUM);
  arg_float(&a, r->routed_scaling_factor);
  const size_t local[1] = {parallel ? 128 : 64};
  const size_t global[1] = {(size_t)r->num_tokens * (parallel ? 128 : 1)};
  return launch(s, &a, 1, global, local, "route kernel");
}

static moe_status ocl_align(void *state, const moe_align_args *al) {
  moe_ocl_state *s = state;
  kernel_args a = args_begin(s, MOE_OCL_ALIGN);
  arg_int(&a, al->num_tokens * al->top_k);
  arg_mem(&a, al->topk_ids);
  arg_mem(&a, al->expert_map);
  arg_int(&a, al->num_experts);
  arg_int(&a, al->num_local_experts);
  arg_int(&a, al->block_m);
  arg_int(&a, al->sorted_capacity);
  arg_int(&a, al->block_capacity);
  arg_mem(&a, al->sorted_token_ids);
  arg_mem(&a, al->expert_ids);
  arg_mem(&a, al->num_tokens_post_padded);
  const size_t global[1] = {256}, local[1] = {256};
  return launch(s, &a, 1, global, local, "align kernel");
}

typedef enum gemm_kernel {
  GEMM_REFERENCE,
  GEMM_SKINNY,
  GEMM_ROWS_CPU,
  GEMM_TILED_64,
  GEMM_TILED_128
} gemm_kernel;

/* The skinny variants (kernels/grouped_gemm.cl): "WGxCOLSxROWS[uUNROLL]"
 * names work-group size, output columns and rows per pass, and K chunks in
 * flight. "any" serves the K that are not a multiple of 8. */
typedef struct skinny_variant {
  const char *name; /* for option opencl.skinny */
  moe_ocl_kernel_id id;
  int work_group, cols;
} skinny_variant;

enum { SKINNY_4X1U2, SKINNY_4X4, SKINNY_4X4U2, SKINNY_8X4, SKINNY_128_4X8, SKINNY_COUNT };
static const skinny_variant skinny_variants[SKINNY_COUNT] = {
    [SKINNY_4X1U2] = {"64x4x1u2", MOE_OCL_GEMM_SKINNY_64X4X1U2, 64, 4},
    [SKINNY_4X4] = {"64x4x4", MOE_OCL_GEMM_SKINNY_64X4X4, 64, 4},
    [SKINNY_4X4U2] = {"64x4x4u2", MOE_OCL_GEMM_SKINNY_64X4X4U2, 64, 4},
    [SKINNY_8X4] = {"64x8x4", MOE_OCL_GEMM_SKINNY_64X8X4, 64, 8},
    [SKINNY_128_4X8] = {"128x4x8", MOE_OCL_GEMM_SKINNY_128X4X8, 128, 4},
};
static const skinny_variant skinny_any = {"any", MOE_OCL_GEMM_SKINNY_ANY, 64, 4};

/* The default by average rows per expert, and by shape: "wide" GEMMs
 * (n > 4k, as Mixtral's GEMM1) prefer fewer columns per work-group. Chosen
 * from the per-stage profile and a Mixtral 16-token sweep of the variants;
 * 64x4x4u4 and 64x4x8u2 were slower and were removed (measurements:
 * bench/opencl_notes.md, 'Measurements behind the code's rules'). */
static const struct {
  int64_t max_rows;
  int wide, narrow;
} skinny_table[] = {
    {1, SKINNY_4X1U2, SKINNY_4X1U2},
    {6, SKINNY_4X4U2, SKINNY_4X4U2},
    {INT64_MAX, SKINNY_4X4U2, SKINNY_128_4X8},
};

/* The rows per touched expert of a GEMM, the measure of every choice. */
static int64_t desc_rows_per_expert(const moe_gemm_desc *d) {
  return moe_plan_rows_per_expert(d->num_tokens * d->top_k, d->num_local_experts);
}

static const skinny_variant *choose_skinny(const moe_ocl_state *s, const moe_gemm_desc *d) {
  if (d->k % 8 != 0) return &skinny_any;
  if (s->skinny_option > 0) return &skinny_variants[s->skinny_option - 1];
  const int64_t rows = desc_rows_per_expert(d);
  size_t row = 0;
  while (rows > skinny_table[row].max_rows)
    ++row;
  return &skinny_variants[d->n > 4 * d->k ? skinny_table[row].wide : skinny_table[row].narrow];
}

static int64_t skinny_max_rows(const moe_ocl_state *s) {
  return s->skinny_max_rows_set ? s->skinny_max_rows : MOE_OCL_SKINNY_MAX_ROWS;
}

/* The kernel for a GEMM: by the rows per touched expert, within what the
 * layout and block_m allow (the tiles need block_m % TM == 0). A
 * batch-invariant layer (block_m 64) runs one kernel for every T: each
 * output element is one work-item's sum over K in order, whatever the
 * other rows. */
static gemm_kernel choose_gemm(const moe_ocl_state *s, const moe_gemm_desc *d,
                               int batch_invariant) {
  if (batch_invariant) return s->is_gpu ? GEMM_TILED_64 : GEMM_ROWS_CPU;
  const int64_t rows = desc_rows_per_expert(d);
  const int out_in = d->b_layout == MOE_WEIGHT_LAYOUT_OUT_IN;
  /* CPU devices: the barrier-free row kernel, whatever the rows (measured
   * on PoCL: bench/opencl_notes.md). */
  if (out_in && !s->is_gpu && s->skinny_option == 0) return GEMM_ROWS_CPU;
  if (out_in && rows <= skinny_max_rows(s)) return GEMM_SKINNY;
  if (d->block_m % 128 == 0 && rows >= MOE_OCL_TILE128_MIN_ROWS) return GEMM_TILED_128;
  if (d->block_m % 64 == 0) return GEMM_TILED_64;
  return out_in ? GEMM_SKINNY : GEMM_REFERENCE;
}

static moe_status ocl_grouped_gemm(void *state, const moe_gemm_args *g) {
  moe_ocl_state *s = state;
  const moe_gemm_desc *d = &g->desc;
  const gemm_kernel kind = choose_gemm(s, d, g->batch_invariant);
  const int64_t num_slots = d->num_tokens * d->top_k;
  moe_ocl_kernel_id id;
  size_t global[2], local[2];
  switch (kind) {
  case GEMM_SKINNY: {
    const skinny_variant *v = choose_skinny(s, d);
    id = v->id;
    local[0] = (size_t)v->work_group;
    local[1] = 1;
    /* One work-group per column group; a block with work holds a real slot. */
    global[0] = (size_t)((d->n + v->cols - 1) / v->cols) * local[0];
    global[1] = (size_t)(g->block_capacity < num_slots ? g->block_capacity : num_slots);
    break;
  }
  case GEMM_ROWS_CPU:
    id = MOE_OCL_GEMM_ROWS_CPU;
    local[0] = 16;
    local[1] = 1;
    global[0] = (size_t)d->n;
    global[1] = (size_t)(g->block_capacity < num_slots ? g->block_capacity : num_slots);
    break;
  case GEMM_TILED_64:
  case GEMM_TILED_128: {
    const int64_t tile = kind == GEMM_TILED_64 ? 64 : 128;
    id = kind == GEMM_TILED_64 ? MOE_OCL_GEMM_TILED_64 : MOE_OCL_GEMM_TILED_128;
    local[0] = 256;
    local[1] = 1;
    global[0] = (size_t)(d->n + tile - 1) / tile * 256;
    global[1] = (size_t)(g->sorted_capacity / tile);
    break;
  }
  default:
    id = MOE_OCL_GEMM_REFERENCE;
    local[0] = 64;
    local[1] = 1;
    global[0] = (size_t)d->n;
    global[1] = (size_t)g->sorted_capacity;
    break;
  }
  kernel_args a = args_begin(s, id);
  arg_int(&a, num_slots);
  arg_int(&a, d->top_k);
  arg_int(&a, d->input == MOE_GEMM_INPUT_PER_SLOT);
  arg_int(&a, d->n);
  arg_int(&a, d->k);
  arg_int(&a, d->block_m);
  arg_int(&a, d->routed_weight);
  /* The bounds that make corrupt metadata harmless (grouped_gemm.cl). */
  arg_int(&a, d->num_local_experts);
  arg_int(&a, g->sorted_capacity);
  arg_int(&a, g->c_fp32);
  if (kind != GEMM_SKINNY && kind != GEMM_ROWS_CPU)
    arg_int(&a, d->b_layout == MOE_WEIGHT_LAYOUT_IN_OUT);
  arg_mem(&a, g->a);
  arg_mem(&a, g->b);
  arg_mem(&a, g->bias);
  arg_mem(&a, g->sorted_token_ids);
  arg_mem(&a, g->expert_ids);
  arg_mem(&a, g->num_tokens_post_padded);
  arg_mem(&a, g->topk_weights);
  arg_mem(&a, g->c);
  return launch(s, &a, 2, global, local, "grouped GEMM kernel");
}

static moe_status ocl_activation(void *state, const moe_activation_args *act) {
  moe_ocl_state *s = state;
  kernel_args a = args_begin(s, MOE_OCL_ACTIVATION);
  arg_int(&a, act->activation);
  arg_float(&a, act->alpha);
  arg_float(&a, act->limit);
  arg_int(&a, act->rows);
  arg_int(&a, act->intermediate_size);
  arg_int(&a, act->in_fp32);
  arg_mem(&a, act->in);
  arg_mem(&a, act->out);
  const size_t global[2] = {(size_t)act->intermediate_size, (size_t)act->rows};
  const size_t local[2] = {64, 1};
  return launch(s, &a, 2, global, local, "activation kernel");
}

static moe_status ocl_topk_reduce(void *state, const moe_reduce_args *r) {
  moe_ocl_state *s = state;
  kernel_args a = args_begin(s, MOE_OCL_TOPK_REDUCE);
  arg_int(&a, r->num_tokens);
  arg_int(&a, r->top_k);
  arg_int(&a, r->hidden_size);
  arg_mem(&a, r->y);
  arg_mem(&a, r->topk_weights);
  arg_mem(&a, r->topk_ids);
  arg_mem(&a, r->expert_map);
  arg_int(&a, r->num_experts);
  arg_int(&a, r->num_local_experts);
  arg_mem(&a, r->out);
  const size_t global[2] = {(size_t)r->hidden_size, (size_t)r->num_tokens};
  const size_t local[2] = {64, 1};
  return launch(s, &a, 2, global, local, "top-k reduce kernel");
}

/* ------------------------------------------------------------------------ */
/* Layer                                                                    */
/* ------------------------------------------------------------------------ */

/* The workspace of a forward of up to reserved tokens. */
typedef struct ocl_workspace {
  cl_mem topk_ids, topk_weights, sorted_token_ids, expert_ids, num_tokens_post_padded;
  cl_mem gate_up, hidden, expert_out; /* gate_up fp32 [T*k][2I]; the others bf16 */
  /* A chunk past the first token of the caller's buffers (moe_forward_io):
   * kernels take whole cl_mem objects, and sub-buffers would be allocations
   * with alignment rules, so x and logits are copied in and out copied back
   * (bf16 [T][H], fp32 [T][E], bf16 [T][H]). */
  cl_mem x_stage, logits_stage, out_stage;
} ocl_workspace;

#define WORKSPACE_BUFFERS 11

typedef struct ocl_layer {
  moe_config cfg;
  cl_mem w13, w2;                     /* bf16 [EL][2I][H], [EL][H][I] */
  cl_mem w13_bias, w2_bias;           /* fp32 or NULL */
  cl_mem correction_bias, expert_map; /* or NULL */
  int64_t reserved;
  ocl_workspace ws;
} ocl_layer;

static void workspace_free(ocl_workspace *ws) {
  cl_mem *mems = (cl_mem *)ws;
  for (int i = 0; i < WORKSPACE_BUFFERS; ++i)
    if (mems[i]) clReleaseMemObject(mems[i]);
  memset(ws, 0, sizeof *ws);
}

static void ocl_layer_destroy(void *state, void *layer) {
  ocl_layer *l = layer;
  if (!l) return;
  clFinish(((moe_ocl_state *)state)->queue);
  cl_mem weights[] = {l->w13, l->w2, l->w13_bias, l->w2_bias, l->correction_bias, l->expert_map};
  for (size_t i = 0; i < sizeof weights / sizeof weights[0]; ++i)
    if (weights[i]) clReleaseMemObject(weights[i]);
  workspace_free(&l->ws);
  free(l);
}

/* A device copy of host data (NULL host data: *mem stays NULL). */
static moe_status upload(moe_ocl_state *s, cl_mem *mem, const void *host, size_t bytes) {
  if (!host) return MOE_SUCCESS;
  MOE_TRY(ocl_buffer_alloc(s, bytes, (void **)mem));
  return ocl_buffer_write(s, *mem, 0, host, bytes);
}

/* Uploads experts weights of `rows x cols` per expert as [EL][rows][cols]
 * ([out][in]); in_out: the host holds [EL][cols][rows] and each expert is
 * transposed on the way. */
static moe_status upload_out_in(moe_ocl_state *s, cl_mem *mem, const uint16_t *host, int64_t EL,
                                int64_t rows, int64_t cols, int in_out) {
  const size_t expert_elems = (size_t)rows * (size_t)cols;
  const size_t expert_bytes = expert_elems * sizeof(uint16_t);
  if (!in_out) return upload(s, mem, host, expert_bytes * (size_t)EL);
  MOE_TRY(ocl_buffer_alloc(s, expert_bytes * (size_t)EL, (void **)mem));
  uint16_t *packed = malloc(expert_bytes);
  if (!packed) return moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot allocate repacking space");
  moe_status st = MOE_SUCCESS;
  for (int64_t e = 0; e < EL && st == MOE_SUCCESS; ++e) {
    const uint16_t *src = host + (size_t)e * expert_elems;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        packed[(size_t)r * (size_t)cols + (size_t)c] = src[(size_t)c * (size_t)rows + (size_t)r];
    st = ocl_buffer_write(s, *mem, (size_t)e * expert_bytes, packed, expert_bytes);
  }
  free(packed);
  return st;
}

static moe_status layer_upload(moe_ocl_state *s, ocl_layer *l, const moe_weights *w) {
  const moe_config *c = &l->cfg;
  const int64_t EL = c->num_local_experts, H = c->hidden_size, I = c->intermediate_size;
  const int in_out = c->weight_layout == MOE_WEIGHT_LAYOUT_IN_OUT;
  MOE_TRY(upload_out_in(s, &l->w13, w->w13, EL, 2 * I, H, in_out));
  MOE_TRY(upload_out_in(s, &l->w2, w->w2, EL, H, I, in_out));
  MOE_TRY(upload(s, &l->w13_bias, w->w13_bias, (size_t)(EL * 2 * I) * sizeof(float)));
  MOE_TRY(upload(s, &l->w2_bias, w->w2_bias, (size_t)(EL * H) * sizeof(float)));
  MOE_TRY(
      upload(s, &l->correction_bias, w->correction_bias, (size_t)c->num_experts * sizeof(float)));
  return upload(s, &l->expert_map, w->expert_map, (size_t)c->num_experts * sizeof(int32_t));
}

static moe_status ocl_layer_create(void *state, const moe_layer_desc *desc, void **layer) {
  ocl_layer *l = calloc(1, sizeof *l);
  if (!l) return moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot allocate an OpenCL layer");
  l->cfg = desc->cfg;
  moe_status st = layer_upload(state, l, desc->weights);
  if (st != MOE_SUCCESS) {
    ocl_layer_destroy(state, l);
    return st;
  }
  *layer = l;
  return MOE_SUCCESS;
}

/* The row block of align in a forward of T tokens: 128 where the 128-row
 * tile runs, else 64 (both serve the skinny kernel, whose cost does not
 * grow with padding); always 64 for a batch-invariant layer. */
static int32_t forward_block_m(const moe_config *c, int64_t num_tokens) {
  if (c->batch_invariant) return 64;
  const int64_t rows = moe_plan_rows_per_expert(num_tokens * c->top_k, c->num_local_experts);
  return rows >= MOE_OCL_TILE128_MIN_ROWS ? 128 : 64;
}

static moe_status ocl_layer_reserve(void *state, void *layer, int64_t max_tokens) {
  moe_ocl_state *s = state;
  ocl_layer *l = layer;
  const moe_config *c = &l->cfg;
  const size_t slots = (size_t)(max_tokens * c->top_k);
  const size_t H = (size_t)c->hidden_size, I = (size_t)c->intermediate_size;
  /* Capacities for the largest (most padding) and smallest (most blocks)
   * block_m a forward uses (forward_block_m). */
  int64_t most_sorted, most_blocks;
  moe_plan_align_capacity((int64_t)slots, c->num_local_experts, 128, &most_sorted, NULL);
  moe_plan_align_capacity((int64_t)slots, c->num_local_experts, 64, NULL, &most_blocks);
  const size_t sorted_capacity = (size_t)most_sorted, block_capacity = (size_t)most_blocks;
  const size_t T = (size_t)max_tokens, E = (size_t)c->num_experts;
  const size_t bytes[WORKSPACE_BUFFERS] = {
      slots * 4,         slots * 4,     sorted_capacity * 4, block_capacity * 4, 4,
      slots * 2 * I * 4, slots * I * 2, slots * H * 2,       T * H * 2,          T * E * 4,
      T * H * 2};
  size_t total = 0;
  for (int i = 0; i < WORKSPACE_BUFFERS; ++i)
    total += bytes[i];
  const cl_ulong global_mem = device_limit(s, CL_DEVICE_GLOBAL_MEM_SIZE);
  if ((cl_ulong)total > global_mem)
    return moe_set_error(MOE_ERROR_OUT_OF_MEMORY,
                         "OpenCL: a workspace of %zu bytes for %lld tokens exceeds the device's "
                         "%llu bytes",
                         total, (long long)max_tokens, (unsigned long long)global_mem);
  ocl_workspace ws = {0};
  cl_mem *mems = (cl_mem *)&ws;
  for (int i = 0; i < WORKSPACE_BUFFERS; ++i) {
    moe_status st = ocl_buffer_alloc(s, bytes[i], (void **)&mems[i]);
    if (st != MOE_SUCCESS) {
      workspace_free(&ws);
      return st;
    }
  }
  /* Back the buffers now (lazy drivers allocate at first use), so that a
   * shortage shows here and never in a forward. */
  cl_int err = clEnqueueMigrateMemObjects(s->queue, WORKSPACE_BUFFERS, mems,
                                          CL_MIGRATE_MEM_OBJECT_CONTENT_UNDEFINED, 0, NULL, NULL);
  if (err == CL_SUCCESS) err = clFinish(s->queue);
  if (err != CL_SUCCESS) {
    workspace_free(&ws);
    return moe_ocl_fail(err, "backing the workspace");
  }
  /* Earlier forwards may still use the old workspace: release it only after
   * them (clReleaseMemObject defers the free until queued work is done). */
  workspace_free(&l->ws);
  l->ws = ws;
  l->reserved = max_tokens;
  return MOE_SUCCESS;
}

/* The parts of the core's default forward (core/forward.c) that are this
 * layer's: its weights, its workspace and its row block. */
static void ocl_forward_parts(void *layer, moe_forward_parts *parts) {
  const ocl_layer *l = layer;
  const ocl_workspace *ws = &l->ws;
  *parts = (moe_forward_parts){
      .b_layout = MOE_WEIGHT_LAYOUT_OUT_IN, /* repacked at create */
      .w13 = l->w13,
      .w2 = l->w2,
      .w13_bias = l->w13_bias,
      .w2_bias = l->w2_bias,
      .correction_bias = l->correction_bias,
      .expert_map = l->expert_map,
      .topk_ids = ws->topk_ids,
      .topk_weights = ws->topk_weights,
      .sorted_token_ids = ws->sorted_token_ids,
      .expert_ids = ws->expert_ids,
      .num_tokens_post_padded = ws->num_tokens_post_padded,
      .gate_up = ws->gate_up,
      .hidden = ws->hidden,
      .expert_out = ws->expert_out,
      .x_stage = ws->x_stage,
      .logits_stage = ws->logits_stage,
      .out_stage = ws->out_stage,
      .block_m = forward_block_m,
  };
}

static moe_status ocl_set_option(void *state, moe_option_id id, const char *value, int64_t parsed,
                                 char *name, size_t name_size) {
  moe_ocl_state *s = state;
  (void)value, (void)name, (void)name_size;
  switch (id) {
  case MOE_OPTION_OPENCL_ROUTE:
    s->route_option = (int)parsed;
    return MOE_SUCCESS;
  case MOE_OPTION_OPENCL_SKINNY:
    _Static_assert(SKINNY_4X1U2 == 0 && SKINNY_128_4X8 == 4,
                   "core/options.c lists the skinny variants in this order");
    s->skinny_option = (int)parsed;
    return MOE_SUCCESS;
  case MOE_OPTION_OPENCL_SKINNY_MAX_ROWS:
    s->skinny_max_rows = parsed;
    s->skinny_max_rows_set = 1;
    return MOE_SUCCESS;
  default:
    return moe_set_error(MOE_ERROR_INTERNAL, "the OpenCL backend has no option %d", (int)id);
  }
}

static const char *gemm_kernel_name(const moe_ocl_state *s, gemm_kernel kind,
                                    const moe_gemm_desc *d) {
  switch (kind) {
  case GEMM_SKINNY:
    return choose_skinny(s, d)->name;
  case GEMM_ROWS_CPU:
    return "rows";
  case GEMM_TILED_64:
    return "tiled 64x64";
  case GEMM_TILED_128:
    return "tiled 128x128";
  default:
    return "reference";
  }
}

/* The forward's choices, from the same functions the core's default
 * forward reaches through ocl_forward_parts and ocl_grouped_gemm. */
static moe_status ocl_layer_describe(void *state, const void *layer, int64_t num_tokens, char *text,
                                     size_t size) {
  const moe_ocl_state *s = state;
  const ocl_layer *l = layer;
  const moe_config *c = &l->cfg;
  const int32_t BM = forward_block_m(c, num_tokens);
  int64_t sorted_capacity, block_capacity;
  moe_plan_align_capacity(num_tokens * c->top_k, c->num_local_experts, BM, &sorted_capacity,
                          &block_capacity);
  moe_gemm_desc d1, d2;
  moe_plan_gemm_descs(c, num_tokens, BM, MOE_WEIGHT_LAYOUT_OUT_IN, &d1, &d2);
  const gemm_kernel k1 = choose_gemm(s, &d1, c->batch_invariant);
  const gemm_kernel k2 = choose_gemm(s, &d2, c->batch_invariant);
  const int parallel = route_parallel(s, c->num_groups);
  snprintf(text, size,
           "route (%s), align (block_m %d, sorted capacity %lld, %lld blocks), GEMM1 %s (fp32 "
           "gate|up), activation, GEMM2 %s, reduce in slot order",
           parallel ? "work-group per token" : "work-item per token", (int)BM,
           (long long)sorted_capacity, (long long)block_capacity, gemm_kernel_name(s, k1, &d1),
           gemm_kernel_name(s, k2, &d2));
  return MOE_SUCCESS;
}

const moe_backend_ops moe_opencl_backend_ops = {
    .name = "opencl",
    .kind = MOE_BACKEND_OPENCL,
    .context_create = moe_ocl_context_create,
    .has_gpu = moe_ocl_has_gpu,
    .context_destroy = ocl_context_destroy,
    .synchronize = ocl_synchronize,
    .buffer_alloc = ocl_buffer_alloc,
    .buffer_free = ocl_buffer_free,
    .buffer_write = ocl_buffer_write,
    .buffer_read = ocl_buffer_read,
    .route = ocl_route,
    .align = ocl_align,
    .grouped_gemm = ocl_grouped_gemm,
    .activation = ocl_activation,
    .topk_reduce = ocl_topk_reduce,
    .layer_create = ocl_layer_create,
    .layer_destroy = ocl_layer_destroy,
    .layer_reserve = ocl_layer_reserve,
    .set_option = ocl_set_option,
    .layer_describe = ocl_layer_describe,
    .copy = ocl_copy,
    .forward_parts = ocl_forward_parts,
};
