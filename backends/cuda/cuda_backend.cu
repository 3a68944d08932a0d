/*
 * cuda_backend.cu - the CUDA backend's table (moe_cuda_backend_ops):
 * contexts on a stream, device buffers, the stages, and the layer.
 *
 * The layer repacks w13 so that gate and up rows interleave (GEMM1's
 * epilogue then holds g and u of one column pair and writes h directly),
 * keeps w2 as [EL][H][I], and runs a forward of four launches for decode:
 *   route+align (one block) -> GEMM1 + activation -> GEMM2 + routed weight
 *   -> reduce,
 * with more align launches when the slots outgrow one block. Prefill on a
 * Hopper GPU (sm_90a code, enough rows per expert) takes the wgmma path of
 * gemm_wgmma.cu instead: align with 128-row blocks -> permute the token rows
 * into sorted order -> GEMM1 -> GEMM2 -> the same reduce; its TMA maps are
 * encoded at layer creation (weights) and at reserve (workspace).
 * Option cuda.path=wgmma forces that path wherever it can run, =mma keeps
 * it off. The forward allocates nothing and never waits for the host, so it can
 * be captured into a CUDA graph on the context's stream.
 */
#include "cuda_context.h"
#include "cuda_internal.cuh"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef __nv_bfloat16 bf16;

static_assert(CUDA_WGMMA_BLOCK_M == CUDA_GEMM_MAX_BLOCK_M,
              "the workspace's align capacity is sized for CUDA_GEMM_MAX_BLOCK_M");

moe_status cuda_status(cudaError_t err, const char *what) {
  if (err == cudaSuccess) return MOE_SUCCESS;
  cudaGetLastError(); /* clear a non-sticky error so later calls start clean */
  const moe_status status =
      err == cudaErrorMemoryAllocation ? MOE_ERROR_OUT_OF_MEMORY : MOE_ERROR_DEVICE;
  return moe_set_error(status, "%s failed: %s (%s)", what, cudaGetErrorString(err),
                       cudaGetErrorName(err));
}

static moe_status use_device(const cuda_state *st) {
  return cuda_status(cudaSetDevice(st->device), "cudaSetDevice");
}

/* ---- contexts ----------------------------------------------------------- */

static moe_status state_create(int device, void *stream, bool own_stream, void **out, char *name,
                               size_t name_size) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();
    return moe_set_error(MOE_ERROR_BACKEND_UNAVAILABLE, "no CUDA device is usable: %s",
                         err != cudaSuccess ? cudaGetErrorString(err) : "no devices");
  }
  if (device >= count)
    return moe_set_error(MOE_ERROR_BACKEND_UNAVAILABLE,
                         "CUDA device %d does not exist (%d device%s)", device, count,
                         count == 1 ? "" : "s");
  CUDA_TRY(cuda_status(cudaSetDevice(device), "cudaSetDevice"));
  cudaDeviceProp prop;
  CUDA_TRY(cuda_status(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties"));
  if (prop.major < 8)
    return moe_set_error(MOE_ERROR_BACKEND_UNAVAILABLE,
                         "CUDA device %d (%s) has compute capability %d.%d; the backend needs "
                         "8.0 or newer (bf16 tensor cores)",
                         device, prop.name, prop.major, prop.minor);
  CUDA_TRY(cuda_gemm_init());
  CUDA_TRY(cuda_decode_init());
  /* The wgmma path only where its sm_90a code runs and its kernels accept
   * their shared-memory size; otherwise the mma.sync path does everything. */
  const bool wgmma =
      cuda_wgmma_available(prop.major, prop.minor) && cuda_wgmma_init() && cuda_stream_init();
  cuda_state *st = (cuda_state *)calloc(1, sizeof *st);
  if (!st) return moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot allocate the CUDA state");
  st->device = device;
  st->sm_count = prop.multiProcessorCount;
  st->wgmma = wgmma;
  st->hopper = prop.major >= 9;
  st->tuning = cuda_tuning_for(prop.major, cuda_peak_read_gbps(device));
  /* The options' defaults (core/options.c). */
  st->pdl = false;
  st->path_option = MOE_CUDA_PATH_AUTO;
  st->tile_option[0] = '\0';
  st->gemv_max_rows = -1; /* grouped_gemm.cu's GEMV_MAX_ROWS_PER_EXPERT */
  st->routing_option = MOE_CUDA_ROUTING_AUTO;
  st->decode_pdl = true;
  st->stream_overlap = true;
  st->stream_ctas = 2; /* bench/cuda_notes.md item 19 */
  st->decode_persistent = true;
  st->wgmma_bn_option = 0;
  st->stream_max_rows = -1;
  st->wgmma_min_rows = -1;
  st->wgmma_gather = -1; /* auto: the tuning row's rule */
  st->stream_k = 128;
  st->wgmma_bm = 0; /* auto: the tuning row's rule */
  if (own_stream) {
    moe_status s = cuda_status(cudaStreamCreateWithFlags(&st->stream, cudaStreamNonBlocking),
                               "cudaStreamCreateWithFlags");
    if (s != MOE_SUCCESS) {
      free(st);
      return s;
    }
  } else {
    st->stream = (cudaStream_t)stream;
  }
  st->owns_stream = own_stream;
  snprintf(name, name_size, "%s", prop.name);
  *out = st;
  return MOE_SUCCESS;
}

static moe_status cuda_context_create(int device, void **state, char *name, size_t name_size) {
  return state_create(device, NULL, true, state, name, name_size);
}

extern "C" moe_status moe_cuda_state_create_on_stream(int device, void *stream, void **state,
                                                      char *name, size_t name_size) {
  return state_create(device, stream, false, state, name, name_size);
}

extern "C" void *moe_cuda_state_stream(void *state) {
  return ((cuda_state *)state)->stream;
}

static int cuda_has_gpu(void) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count > 0;
}

static void cuda_context_destroy(void *state) {
  cuda_state *st = (cuda_state *)state;
  if (!st) return;
  cudaSetDevice(st->device);
  cudaStreamSynchronize(st->stream);
  if (st->owns_stream) cudaStreamDestroy(st->stream);
  cudaFree(st->split_partial);
  cudaFree(st->split_counters);
  free(st);
}

static moe_status cuda_synchronize(void *state) {
  const cuda_state *st = (const cuda_state *)state;
  CUDA_TRY(use_device(st));
  return cuda_status(cudaStreamSynchronize(st->stream), "cudaStreamSynchronize");
}

/* ---- buffers ------------------------------------------------------------ */

static moe_status cuda_buffer_alloc(void *state, size_t bytes, void **handle) {
  const cuda_state *st = (const cuda_state *)state;
  CUDA_TRY(use_device(st));
  return cuda_status(cudaMalloc(handle, bytes), "cudaMalloc");
}

static void cuda_buffer_free(void *state, void *handle) {
  const cuda_state *st = (const cuda_state *)state;
  cudaSetDevice(st->device);
  /* Work queued on the stream may still read the buffer. */
  cudaStreamSynchronize(st->stream);
  cudaFree(handle);
}

static moe_status cuda_buffer_write(void *state, void *handle, size_t offset, const void *src,
                                    size_t bytes) {
  const cuda_state *st = (const cuda_state *)state;
  CUDA_TRY(use_device(st));
  CUDA_TRY(cuda_status(
      cudaMemcpyAsync((char *)handle + offset, src, bytes, cudaMemcpyHostToDevice, st->stream),
      "cudaMemcpyAsync host to device"));
  return cuda_status(cudaStreamSynchronize(st->stream), "cudaStreamSynchronize");
}

static moe_status cuda_buffer_read(void *state, const void *handle, size_t offset, void *dst,
                                   size_t bytes) {
  const cuda_state *st = (const cuda_state *)state;
  CUDA_TRY(use_device(st));
  CUDA_TRY(cuda_status(cudaMemcpyAsync(dst, (const char *)handle + offset, bytes,
                                       cudaMemcpyDeviceToHost, st->stream),
                       "cudaMemcpyAsync device to host"));
  return cuda_status(cudaStreamSynchronize(st->stream), "cudaStreamSynchronize");
}

/* ---- stages ------------------------------------------------------------- */

static moe_status cuda_route_stage(void *state, const moe_route_args *args) {
  const cuda_state *st = (const cuda_state *)state;
  CUDA_TRY(use_device(st));
  return cuda_route(st, args);
}

static moe_status cuda_align_stage(void *state, const moe_align_args *args) {
  const cuda_state *st = (const cuda_state *)state;
  CUDA_TRY(use_device(st));
  return cuda_route_align(st, NULL, args, NULL);
}

static moe_status cuda_grouped_gemm_stage(void *state, const moe_gemm_args *args) {
  const cuda_state *st = (const cuda_state *)state;
  CUDA_TRY(use_device(st));
  const moe_gemm_desc *d = &args->desc;
  cuda_gemm g;
  memset(&g, 0, sizeof g);
  g.a = (const bf16 *)args->a;
  g.lda = d->k;
  g.b = (const bf16 *)args->b;
  g.b_expert_stride = d->n * d->k;
  g.b_kn = d->b_layout == MOE_WEIGHT_LAYOUT_IN_OUT;
  g.ldb = g.b_kn ? d->n : d->k;
  g.bias = (const float *)args->bias;
  g.bias_stride = d->n;
  g.sorted_token_ids = (const int32_t *)args->sorted_token_ids;
  g.expert_ids = (const int32_t *)args->expert_ids;
  g.num_tokens_post_padded = (const int32_t *)args->num_tokens_post_padded;
  g.topk_weights = (const float *)args->topk_weights;
  g.c = (bf16 *)args->c;
  g.ldc = d->n;
  g.num_tokens = d->num_tokens;
  g.top_k = d->top_k;
  g.num_local_experts = d->num_local_experts;
  g.n = (int32_t)d->n;
  g.k = (int32_t)d->k;
  g.block_m = d->block_m;
  g.input_per_slot = d->input == MOE_GEMM_INPUT_PER_SLOT;
  g.routed_weight = d->routed_weight;
  g.epilogue = CUDA_EPILOGUE_STORE;
  return cuda_gemm_run(st, &g);
}

static moe_status cuda_activation_stage(void *state, const moe_activation_args *args) {
  const cuda_state *st = (const cuda_state *)state;
  CUDA_TRY(use_device(st));
  return cuda_activation(st, args);
}

static moe_status cuda_topk_reduce_stage(void *state, const moe_reduce_args *args) {
  const cuda_state *st = (const cuda_state *)state;
  CUDA_TRY(use_device(st));
  return cuda_topk_reduce(st, args);
}

/* ---- layer -------------------------------------------------------------- */

struct cuda_layer {
  moe_config cfg;         /* resolved */
  bf16 *w13;              /* [EL][2I][H], rows interleaved gate/up */
  bf16 *w2;               /* [EL][H][I] */
  float *w13_bias;        /* [EL][2I] interleaved like w13, or NULL */
  float *w2_bias;         /* [EL][H] or NULL */
  float *correction_bias; /* [E] or NULL */
  int32_t *expert_map;    /* [E] or NULL */

  /* Workspace for up to `reserved` tokens, one allocation. */
  void *workspace;
  int64_t reserved;
  int32_t *topk_ids;
  float *topk_weights;
  int32_t *sorted_token_ids;
  int32_t *expert_ids;
  int32_t *num_tokens_post_padded;
  int32_t *align_scratch;
  bf16 *h; /* [T*k][I] */
  bf16 *y; /* [T*k][H], routed weight applied */

  /* The wgmma path (gemm_wgmma.cu). Its operands live in the regions of h
   * and y, which then hold sorted_rows rows: h_sorted [sorted_rows][I] in
   * h's (the two paths never run in one forward), xs [sorted_rows][H] in
   * y's (GEMM1 has read xs before GEMM2 writes y). TMA maps over the
   * weights have boxes of 128 or 256 rows ([0], [1]: the column tile). */
  bool wgmma_weights; /* the weight maps are valid: sm_90a device, shapes qualify */
  bool wgmma_ready;   /* and the workspace maps too */
  cuda_tma_map w13_map[2], w2_map[2];
  cuda_tma_map xs_map, h_sorted_map;
  /* The streaming path (gemm_stream.cu) reads the same weight maps with
   * 128-row boxes ([0]) and these over xs and h_sorted with boxes of 16,
   * 32, 64 and 128 rows (cuda_stream_rows_index). */
  cuda_tma_map xs_rows_map[CUDA_STREAM_BLOCKS], h_rows_map[CUDA_STREAM_BLOCKS];
  int64_t sorted_rows;
  bf16 *xs;
  bf16 *h_sorted;
};

static void layer_free(cuda_layer *l) {
  if (!l) return;
  cudaFree(l->w13);
  cudaFree(l->w2);
  cudaFree(l->w13_bias);
  cudaFree(l->w2_bias);
  cudaFree(l->correction_bias);
  cudaFree(l->expert_map);
  cudaFree(l->workspace);
  free(l);
}

static moe_status upload(const cuda_state *st, void **dst, const void *src, size_t bytes,
                         const char *what) {
  CUDA_TRY(cuda_status(cudaMalloc(dst, bytes), what));
  return cuda_status(cudaMemcpyAsync(*dst, src, bytes, cudaMemcpyHostToDevice, st->stream), what);
}

/* Uploads w13 and w2 one expert at a time through a device staging buffer
 * and repacks them there (gate/up interleave; IN_OUT transposed). */
static moe_status upload_weights(const cuda_state *st, cuda_layer *l, const moe_weights *w) {
  const moe_config *c = &l->cfg;
  const int64_t H = c->hidden_size, I = c->intermediate_size, EL = c->num_local_experts;
  const size_t w13_elems = (size_t)(2 * I * H), w2_elems = (size_t)(H * I);
  CUDA_TRY(cuda_status(cudaMalloc((void **)&l->w13, EL * w13_elems * sizeof(bf16)),
                       "cudaMalloc of w13"));
  CUDA_TRY(
      cuda_status(cudaMalloc((void **)&l->w2, EL * w2_elems * sizeof(bf16)), "cudaMalloc of w2"));
  bf16 *staging = NULL;
  CUDA_TRY(cuda_status(cudaMalloc((void **)&staging, w13_elems * sizeof(bf16)),
                       "cudaMalloc of the repack staging"));
  const bool in_out = c->weight_layout == MOE_WEIGHT_LAYOUT_IN_OUT;
  moe_status s = MOE_SUCCESS;
  for (int64_t e = 0; e < EL && s == MOE_SUCCESS; ++e) {
    s = cuda_status(cudaMemcpyAsync(staging, w->w13 + e * w13_elems, w13_elems * sizeof(bf16),
                                    cudaMemcpyHostToDevice, st->stream),
                    "upload of w13");
    if (s == MOE_SUCCESS)
      s = cuda_repack_w13(st, staging, l->w13 + e * w13_elems, H, I, c->weight_layout);
    if (s != MOE_SUCCESS) break;
    if (in_out) {
      s = cuda_status(cudaMemcpyAsync(staging, w->w2 + e * w2_elems, w2_elems * sizeof(bf16),
                                      cudaMemcpyHostToDevice, st->stream),
                      "upload of w2");
      if (s == MOE_SUCCESS) s = cuda_transpose(st, staging, l->w2 + e * w2_elems, I, H);
    } else {
      s = cuda_status(cudaMemcpyAsync(l->w2 + e * w2_elems, w->w2 + e * w2_elems,
                                      w2_elems * sizeof(bf16), cudaMemcpyHostToDevice, st->stream),
                      "upload of w2");
    }
  }
  const moe_status synced = cuda_status(cudaStreamSynchronize(st->stream), "weight upload");
  cudaFree(staging);
  return s != MOE_SUCCESS ? s : synced;
}

/* Shapes the wgmma path takes: TMA needs 16-byte row strides (H and I
 * multiples of 8); a K of at least one 64-wide box and B row coordinates
 * (expert * n + n0, int32) in range keep every box inside what the encoder
 * and the kernels were written for. */
static bool wgmma_shapes_qualify(const moe_config *c) {
  const int64_t H = c->hidden_size, I = c->intermediate_size, EL = c->num_local_experts;
  return H % 8 == 0 && I % 8 == 0 && H >= 64 && I >= 64 && EL * 2 * I + 256 <= INT32_MAX &&
         EL * H + 256 <= INT32_MAX;
}

/* Encodes the TMA maps over w13 ([EL*2I][H]) and w2 ([EL*H][I]); false
 * leaves the layer on the mma.sync path. */
static bool wgmma_encode_weights(const cuda_state *st, cuda_layer *l) {
  const moe_config *c = &l->cfg;
  if (!st->wgmma || !wgmma_shapes_qualify(c)) return false;
  const int64_t H = c->hidden_size, I = c->intermediate_size, EL = c->num_local_experts;
  const int boxes[2] = {128, 256};
  for (int i = 0; i < 2; ++i)
    if (!cuda_tma_map_bf16(&l->w13_map[i], l->w13, EL * 2 * I, H, boxes[i]) ||
        !cuda_tma_map_bf16(&l->w2_map[i], l->w2, EL * H, I, boxes[i]))
      return false;
  return true;
}

static moe_status cuda_layer_create(void *state, const moe_layer_desc *desc, void **out) {
  const cuda_state *st = (const cuda_state *)state;
  CUDA_TRY(use_device(st));
  cuda_layer *l = (cuda_layer *)calloc(1, sizeof *l);
  if (!l) return moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot allocate a layer");
  l->cfg = desc->cfg;
  const moe_weights *w = desc->weights;
  const int64_t H = l->cfg.hidden_size, I = l->cfg.intermediate_size;
  const int64_t EL = l->cfg.num_local_experts, E = l->cfg.num_experts;
  moe_status s = upload_weights(st, l, w);
  float *packed_bias = NULL;
  if (s == MOE_SUCCESS && w->w13_bias) {
    packed_bias = (float *)malloc((size_t)(EL * 2 * I) * sizeof(float));
    if (!packed_bias) s = moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot allocate bias staging");
    for (int64_t e = 0; packed_bias && e < EL; ++e)
      for (int64_t i = 0; i < I; ++i) {
        packed_bias[e * 2 * I + 2 * i] = w->w13_bias[e * 2 * I + i];
        packed_bias[e * 2 * I + 2 * i + 1] = w->w13_bias[e * 2 * I + I + i];
      }
    if (s == MOE_SUCCESS)
      s = upload(st, (void **)&l->w13_bias, packed_bias, (size_t)(EL * 2 * I) * sizeof(float),
                 "upload of w13_bias");
  }
  if (s == MOE_SUCCESS && w->w2_bias)
    s = upload(st, (void **)&l->w2_bias, w->w2_bias, (size_t)(EL * H) * sizeof(float),
               "upload of w2_bias");
  if (s == MOE_SUCCESS && w->correction_bias)
    s = upload(st, (void **)&l->correction_bias, w->correction_bias, (size_t)E * sizeof(float),
               "upload of correction_bias");
  if (s == MOE_SUCCESS && w->expert_map)
    s = upload(st, (void **)&l->expert_map, w->expert_map, (size_t)E * sizeof(int32_t),
               "upload of expert_map");
  if (s == MOE_SUCCESS)
    s = cuda_status(cudaStreamSynchronize(st->stream), "layer upload"); /* host bias staging */
  free(packed_bias);
  if (s != MOE_SUCCESS) {
    cudaStreamSynchronize(st->stream);
    layer_free(l);
    return s;
  }
  l->wgmma_weights = wgmma_encode_weights(st, l);
  *out = l;
  return MOE_SUCCESS;
}

static void cuda_layer_destroy(void *state, void *layer) {
  const cuda_state *st = (const cuda_state *)state;
  cudaSetDevice(st->device);
  cudaStreamSynchronize(st->stream);
  layer_free((cuda_layer *)layer);
}

static size_t align_up(size_t x) {
  return (x + 255) & ~(size_t)255;
}

/* The context's split-K workspace of the streaming GEMM, once: a layer
 * that can stream reserves it with its own workspace (never in a
 * forward). Counters start at 0; the kernels leave them at 0. */
static moe_status reserve_split_workspace(cuda_state *st) {
  if (st->split_partial) return MOE_SUCCESS;
  float *partial = NULL;
  int32_t *counters = NULL;
  const size_t counter_bytes = CUDA_STREAM_COUNTERS * sizeof(int32_t);
  moe_status s = cuda_status(cudaMalloc((void **)&partial, CUDA_STREAM_SPLIT_BYTES),
                             "cudaMalloc of the split-K workspace");
  if (s == MOE_SUCCESS)
    s = cuda_status(cudaMalloc((void **)&counters, counter_bytes), "cudaMalloc of split counters");
  if (s == MOE_SUCCESS)
    s = cuda_status(cudaMemsetAsync(counters, 0, counter_bytes, st->stream),
                    "cudaMemsetAsync of split counters");
  if (s != MOE_SUCCESS) {
    cudaFree(partial);
    cudaFree(counters);
    return s;
  }
  st->split_partial = partial;
  st->split_partial_bytes = CUDA_STREAM_SPLIT_BYTES;
  st->split_counters = counters;
  st->split_counters_len = CUDA_STREAM_SPLIT_COUNTERS;
  return MOE_SUCCESS;
}

static moe_status cuda_layer_reserve(void *state, void *layer, int64_t max_tokens) {
  cuda_state *st = (cuda_state *)state;
  cuda_layer *l = (cuda_layer *)layer;
  CUDA_TRY(use_device(st));
  const moe_config *c = &l->cfg;
  const int64_t slots = max_tokens * c->top_k, EL = c->num_local_experts;
  const int64_t sorted_cap = slots + EL * (CUDA_GEMM_MAX_BLOCK_M - 1);
  /* expert_ids for the row block that needs the most blocks. */
  int64_t block_cap = 0;
  for (int64_t bm = CUDA_GEMM_MIN_BLOCK_M; bm <= CUDA_GEMM_MAX_BLOCK_M; bm *= 2) {
    const int64_t blocks = (slots + EL * (bm - 1) + bm - 1) / bm;
    if (blocks > block_cap) block_cap = blocks;
  }
  const int64_t scratch = cuda_align_scratch_elems(slots, (int32_t)EL);
  /* The wgmma path needs h and y to hold every sorted row (padding too):
   * EL * 127 rows more than the slots. Only where the path can run. */
  const bool wgmma = l->wgmma_weights && sorted_cap + CUDA_WGMMA_BLOCK_M <= INT32_MAX;
  const int64_t act_rows = wgmma ? sorted_cap : slots;
  const size_t sizes[8] = {
      (size_t)slots * 4,
      (size_t)slots * 4,
      (size_t)sorted_cap * 4,
      (size_t)block_cap * 4,
      4,
      (size_t)scratch * 4,
      (size_t)(act_rows * c->intermediate_size) * sizeof(bf16),
      (size_t)(act_rows * c->hidden_size) * sizeof(bf16),
  };
  size_t offsets[8], total = 0;
  for (int i = 0; i < 8; ++i) {
    offsets[i] = total;
    total += align_up(sizes[i]);
  }
  if (wgmma) CUDA_TRY(reserve_split_workspace(st));
  char *base = NULL;
  CUDA_TRY(cuda_status(cudaMalloc((void **)&base, total), "cudaMalloc of the layer workspace"));
  /* The old workspace may still be read by queued forwards. */
  cudaStreamSynchronize(st->stream);
  cudaFree(l->workspace);
  l->workspace = base;
  l->reserved = max_tokens;
  l->topk_ids = (int32_t *)(base + offsets[0]);
  l->topk_weights = (float *)(base + offsets[1]);
  l->sorted_token_ids = (int32_t *)(base + offsets[2]);
  l->expert_ids = (int32_t *)(base + offsets[3]);
  l->num_tokens_post_padded = (int32_t *)(base + offsets[4]);
  l->align_scratch = (int32_t *)(base + offsets[5]);
  l->h = (bf16 *)(base + offsets[6]);
  l->y = (bf16 *)(base + offsets[7]);
  /* A maps over the new workspace (box: 64 columns x one 128-row block). */
  l->sorted_rows = act_rows;
  l->h_sorted = l->h;
  l->xs = l->y;
  l->wgmma_ready =
      wgmma && cuda_tma_map_bf16(&l->xs_map, l->xs, act_rows, c->hidden_size, CUDA_WGMMA_BLOCK_M) &&
      cuda_tma_map_bf16(&l->h_sorted_map, l->h_sorted, act_rows, c->intermediate_size,
                        CUDA_WGMMA_BLOCK_M);
  for (int rows = 16; l->wgmma_ready && rows <= 128; rows *= 2) {
    const int i = cuda_stream_rows_index(rows);
    l->wgmma_ready =
        cuda_tma_map_bf16(&l->xs_rows_map[i], l->xs, act_rows, c->hidden_size, rows) &&
        cuda_tma_map_bf16(&l->h_rows_map[i], l->h_sorted, act_rows, c->intermediate_size, rows);
  }
  return MOE_SUCCESS;
}

/*
 * The forward's plan: one place decides the path and align's row block.
 *
 * Paths, by rows per touched expert r (cuda_rows_per_expert) on a device
 * where the sm_90a kernels run (H100, H200), with the thresholds of the
 * device class's tuning row (cuda_tuning.cu) or the options overriding it:
 *   decode  a few tokens whose picks are few against the experts
 *           (decode.cu's rule);
 *   stream  r <= stream_max_rows: weight streaming with the operands
 *           swapped (gemm_stream.cu), token blocks of 16, 32 or 64 rows;
 *   mma     stream_max_rows < r < wgmma_min_rows: the mma.sync tiles;
 *   wgmma   r >= wgmma_min_rows: 128-row token tiles (gemm_wgmma.cu);
 * elsewhere (sm_80, shapes TMA cannot take, unaligned x) decode or the
 * mma.sync tiles of grouped_gemm.cu's table.
 * Option cuda.path=stream|wgmma forces a Hopper path wherever it can run,
 * =decode the decode path wherever its shape fits, =mma the mma.sync tiles
 * (A/B runs and tests). A batch-invariant layer always gets the mma.sync
 * tiles with one block_m and one tile (CUDA_FIXED_TILE_BLOCK_M): no
 * decode, no stream or wgmma, no split, one routing kernel.
 */
enum cuda_path { CUDA_PATH_DECODE, CUDA_PATH_STREAM, CUDA_PATH_WGMMA, CUDA_PATH_MMA };

struct cuda_plan {
  cuda_path path;
  int32_t block_m; /* align's row block (0 for decode) */
  bool gather;     /* wgmma: GEMM1 gathers x's rows, no permute */
};

/* The streaming GEMM's token block (align's block_m): option
 * cuda.stream_block, else the tuning row's by rows per expert. An expert
 * with more rows than the block streams its weights once per block. */
static int32_t stream_block(const cuda_state *st, int64_t rows_per_expert) {
  if (st->stream_block) return st->stream_block;
  int32_t block = 16;
  for (int i = 0; i < 3 && rows_per_expert > st->tuning->stream_block_max_rows[i]; ++i)
    block *= 2;
  return block;
}

/* Rows per touched expert that the streaming GEMM's token block is chosen
 * by. Grouped routing takes each token's picks from topk_groups of
 * num_groups groups; with a correction bias it concentrated moe_bench's
 * DeepSeek-V3 batch of 256 tokens on 159 of 256 experts, 12.9 rows each
 * where slots / experts says 8, and the 16-row block streamed the weights
 * of every expert past 16 rows twice (the GEMMs read 30% and 21% more than
 * the touched weights). So for grouped routing the estimate takes the
 * picks as landing on the chosen groups' share of the experts (an H100:
 * block 32 9% faster at DeepSeek 256 tokens; forced at 64 tokens it was 3%
 * slower, and there the estimate, 4 rows, keeps block 16; bench/cuda_notes.md
 * item 24). */
static int64_t stream_rows_per_expert(const moe_config *c, int64_t rows_per_expert) {
  if (c->num_groups <= 1 || c->topk_groups >= c->num_groups) return rows_per_expert;
  return rows_per_expert * c->num_groups / c->topk_groups;
}

static int64_t wgmma_min_rows(const cuda_state *st) {
  return st->wgmma_min_rows >= 0 ? st->wgmma_min_rows : st->tuning->wgmma_min_rows;
}

/* The option, else the row's. */
static int64_t stream_max_rows(const cuda_state *st) {
  return st->stream_max_rows >= 0 ? st->stream_max_rows : st->tuning->stream_max_rows;
}

/* Whether the wgmma GEMM1 gathers x's rows (option cuda.wgmma_gather,
 * else the row's rule by rows per expert and GEMM1's output columns). */
static bool wgmma_gathers(const cuda_state *st, int64_t rows_per_expert, int64_t gemm1_n) {
  if (st->wgmma_gather >= 0) return st->wgmma_gather == 1;
  return rows_per_expert <= st->tuning->wgmma_gather_max_rows ||
         gemm1_n <= st->tuning->wgmma_gather_max_n;
}

/* The wgmma tiles' token rows (option cuda.wgmma_bm, else the row's rule
 * by rows per expert and local experts). */
static int32_t wgmma_block_m(const cuda_state *st, int64_t rows_per_expert, int32_t local_experts) {
  if (st->wgmma_bm) return st->wgmma_bm;
  const bool narrow = rows_per_expert <= st->tuning->wgmma_narrow_max_rows &&
                      local_experts <= st->tuning->wgmma_narrow_max_experts;
  return narrow ? CUDA_WGMMA_NARROW_BLOCK_M : CUDA_WGMMA_BLOCK_M;
}

static cuda_plan plan_forward(const cuda_state *st, const cuda_layer *l, int64_t T, const void *x,
                              const cuda_decode *d) {
  const moe_config *c = &l->cfg;
  const int64_t slots = T * c->top_k, rows = cuda_rows_per_expert(slots, c->num_local_experts);
  if (c->batch_invariant) return {CUDA_PATH_MMA, CUDA_FIXED_TILE_BLOCK_M, false};
  const int option = st->path_option;
  const bool force_stream = option == MOE_CUDA_PATH_STREAM;
  const bool force_wgmma = option == MOE_CUDA_PATH_WGMMA;
  const bool force_mma = option == MOE_CUDA_PATH_MMA;
  const bool hopper = l->wgmma_ready && ((uintptr_t)x & 15u) == 0 && !force_mma;
  const cuda_plan wgmma = {CUDA_PATH_WGMMA, wgmma_block_m(st, rows, c->num_local_experts),
                           wgmma_gathers(st, rows, 2 * c->intermediate_size)};
  if (hopper && force_wgmma) return wgmma;
  const int32_t block = stream_block(st, stream_rows_per_expert(c, rows));
  if (hopper && force_stream) return {CUDA_PATH_STREAM, block, false};
  if (!force_mma && cuda_decode_wanted(st, d)) return {CUDA_PATH_DECODE, 0, false};
  if (hopper && rows >= wgmma_min_rows(st)) return wgmma;
  if (hopper && rows <= stream_max_rows(st)) return {CUDA_PATH_STREAM, block, false};
  return {CUDA_PATH_MMA,
          cuda_gemm_pick_block_m(st, slots, c->num_local_experts, 2 * c->intermediate_size,
                                 c->hidden_size),
          false};
}

/* The decode kernels' arguments for a forward of T tokens (plan_forward
 * reads them to decide whether the decode path fits). */
static cuda_decode decode_args(const cuda_layer *l, int64_t T, const void *x, void *out) {
  const moe_config *c = &l->cfg;
  cuda_decode d;
  memset(&d, 0, sizeof d);
  d.x = (const bf16 *)x;
  d.w13 = l->w13;
  d.w2 = l->w2;
  d.w13_bias = l->w13_bias;
  d.w2_bias = l->w2_bias;
  d.topk_ids = l->topk_ids;
  d.topk_weights = l->topk_weights;
  d.expert_map = l->expert_map;
  d.h = l->h;
  d.out = (bf16 *)out;
  d.num_tokens = T;
  d.top_k = c->top_k;
  d.num_experts = c->num_experts;
  d.num_local = c->num_local_experts;
  d.hidden = (int32_t)c->hidden_size;
  d.inter = (int32_t)c->intermediate_size;
  d.weight_on_input = c->router_weight == MOE_ROUTER_WEIGHT_ON_INPUT;
  d.activation = c->activation;
  d.alpha = c->swiglu_alpha;
  d.limit = c->swiglu_limit;
  return d;
}

/* What plan_forward decides for T tokens, as text (moe_layer_describe);
 * x is taken as 16-byte aligned. */
static void describe_plan(const cuda_state *st, const cuda_layer *l, int64_t T, char *text,
                          size_t size) {
  const moe_config *c = &l->cfg;
  alignas(16) static const unsigned char aligned[16] = {0}; /* only its address is read */
  const cuda_decode d = decode_args(l, T, aligned, NULL);
  const cuda_plan plan = plan_forward(st, l, T, aligned, &d);
  const int64_t slots = T * c->top_k, EL = c->num_local_experts;
  const int64_t rows = cuda_rows_per_expert(slots, EL);
  const int head = snprintf(text, size, "%s: ", st->tuning->device_class);
  if (head < 0 || (size_t)head >= size) return;
  text += head, size -= (size_t)head;
  if (plan.path == CUDA_PATH_DECODE) {
    snprintf(text, size,
             "decode path: route, GEMM1 with the activation and GEMM2 with the top-k reduce on "
             "the CUDA cores (weights indexed by each slot's expert, no align; %s launches, "
             "%s grids)",
             st->hopper && st->decode_pdl ? "overlapped" : "plain",
             st->decode_persistent ? "one-wave" : "work-sized");
    return;
  }
  const int64_t bm = plan.block_m, sorted_capacity = slots + EL * (bm - 1);
  const int64_t rows_bound = cuda_padded_rows_bound(slots, EL, bm);
  const int n =
      snprintf(text, size,
               "route and align (block_m %lld, sorted capacity %lld, at most %lld "
               "padded rows, %lld rows per touched expert), ",
               (long long)bm, (long long)sorted_capacity, (long long)rows_bound, (long long)rows);
  if (n < 0 || (size_t)n >= size) return;
  text += n, size -= (size_t)n;
  switch (plan.path) {
  case CUDA_PATH_STREAM:
    snprintf(text, size,
             "permute, GEMM1 and GEMM2 streaming the weights on wgmma (token block %lld, K "
             "split where the grid's last round is short), reduce",
             (long long)bm);
    break;
  case CUDA_PATH_WGMMA:
    snprintf(text, size,
             "%s, GEMM1 (BN %d) and GEMM2 (BN %d) on %lld-row wgmma tiles fed by TMA, reduce",
             plan.gather ? "no permute (GEMM1 gathers x's rows with cp.async)" : "permute",
             cuda_wgmma_pick_bn(st, (int)bm, rows_bound, 2 * c->intermediate_size),
             cuda_wgmma_pick_bn(st, (int)bm, rows_bound, c->hidden_size), (long long)bm);
    break;
  default:
    snprintf(text, size, "GEMM1 and GEMM2 on %s, reduce",
             c->batch_invariant   ? "the 64x128 mma.sync tile (fixed), warp-per-token routing"
             : st->tile_option[0] ? st->tile_option
                                  : "the mma.sync tile table's tiles");
    break;
  }
}

/* The fields the mma.sync GEMM (cuda_gemm) and the Hopper GEMMs
 * (cuda_wgmma_gemm) name alike, for the layer's GEMM1 (w13 into h, the
 * activation fused) and, on a copy of it, GEMM2 (w2 into y); the A side
 * and the launch fields are the caller's. */
template <typename Gemm>
static void set_gemm1(Gemm *g, const cuda_layer *l, int32_t block_m, __nv_bfloat16 *h) {
  const moe_config *c = &l->cfg;
  g->sorted_token_ids = l->sorted_token_ids;
  g->expert_ids = l->expert_ids;
  g->num_tokens_post_padded = l->num_tokens_post_padded;
  g->topk_weights = l->topk_weights;
  g->bias = l->w13_bias;
  g->c = h;
  g->ldc = c->intermediate_size;
  g->num_local_experts = c->num_local_experts;
  g->n = (int32_t)(2 * c->intermediate_size);
  g->k = (int32_t)c->hidden_size;
  g->block_m = block_m;
  moe_plan_routed_modes(c, &g->routed_weight, NULL);
  g->epilogue = CUDA_EPILOGUE_GLU;
  g->activation = c->activation;
  g->alpha = c->swiglu_alpha;
  g->limit = c->swiglu_limit;
}

template <typename Gemm> static void set_gemm2(Gemm *g, const cuda_layer *l) {
  const moe_config *c = &l->cfg;
  g->bias = l->w2_bias;
  g->c = l->y;
  g->ldc = c->hidden_size;
  g->n = (int32_t)c->hidden_size;
  g->k = (int32_t)c->intermediate_size;
  moe_plan_routed_modes(c, NULL, &g->routed_weight);
  g->epilogue = CUDA_EPILOGUE_STORE;
}

/* Permute, GEMM1 and GEMM2 of the Hopper paths (wgmma tiles or weight
 * streaming), after align ran with the plan's block_m; leaves y as the
 * mma.sync path does. */
static moe_status hopper_forward(const cuda_state *st, const cuda_layer *l, int64_t T,
                                 const void *x, const cuda_plan *plan) {
  const moe_config *c = &l->cfg;
  const int64_t H = c->hidden_size, I = c->intermediate_size, slots = T * c->top_k;
  const int32_t EL = c->num_local_experts;
  const bool stream = plan->path == CUDA_PATH_STREAM;
  /* The streaming GEMM's and the 64-row wgmma tiles' maps have boxes of
   * block_m rows (xs_rows_map, h_rows_map); the 128-row tiles' are
   * xs_map and h_sorted_map. */
  const bool narrow = !stream && plan->block_m == CUDA_WGMMA_NARROW_BLOCK_M;
  const int rows_index = stream || narrow ? cuda_stream_rows_index(plan->block_m) : 0;
  static_assert(CUDA_STREAM_FEATURES == 128, "w13_map[0] and w2_map[0] have 128-row boxes");
  const int64_t rows_bound = cuda_padded_rows_bound(slots, EL, plan->block_m);
  /* The wgmma GEMM1 may gather x's rows itself (the plan's choice); else
   * the permute writes them in sorted order first. */
  const bool gather = !stream && plan->gather;
  if (!gather)
    CUDA_TRY(cuda_wgmma_permute(st, (const bf16 *)x, l->xs, H, l->sorted_token_ids,
                                l->num_tokens_post_padded, slots, c->top_k, rows_bound));
  cuda_wgmma_gemm g1;
  memset(&g1, 0, sizeof g1);
  set_gemm1(&g1, l, plan->block_m, l->h_sorted);
  g1.a_map = stream || narrow ? &l->xs_rows_map[rows_index] : &l->xs_map;
  g1.bn = stream ? CUDA_STREAM_FEATURES : cuda_wgmma_pick_bn(st, plan->block_m, rows_bound, 2 * I);
  g1.b_map = &l->w13_map[g1.bn == 256 ? 1 : 0];
  g1.num_slots = slots;
  g1.rows_bound = rows_bound;
  g1.overlapped = stream && st->stream_overlap;
  if (gather) {
    g1.gather_x = (const bf16 *)x;
    g1.gather_top_k = c->top_k;
  }
  CUDA_TRY(stream ? cuda_stream_gemm_run(st, &g1) : cuda_wgmma_gemm_run(st, &g1));

  cuda_wgmma_gemm g2 = g1;
  set_gemm2(&g2, l);
  g2.gather_x = NULL; /* h_sorted is in sorted order already */
  g2.a_map = stream || narrow ? &l->h_rows_map[rows_index] : &l->h_sorted_map;
  g2.bn = stream ? CUDA_STREAM_FEATURES : cuda_wgmma_pick_bn(st, plan->block_m, rows_bound, H);
  g2.b_map = &l->w2_map[g2.bn == 256 ? 1 : 0];
  return stream ? cuda_stream_gemm_run(st, &g2) : cuda_wgmma_gemm_run(st, &g2);
}

/* out[t] = sum over t's local slots of y[slot] (weights already applied). */
static moe_status reduce_y(const cuda_state *st, const cuda_layer *l, int64_t T, void *out) {
  /* Always the ids: without a map, a routed forward's -1 (or any id outside
   * the experts) left its row of y unwritten, and the reduce skips it. */
  const moe_reduce_args reduce =
      moe_plan_reduce_args(&l->cfg, T, l->y, l->topk_ids, l->expert_map, out);
  return cuda_topk_reduce(st, &reduce);
}

/* Routing capture: the picks the forward routed by, copied (device to
 * device, on the stream) to the caller's buffers at the chunk's offset. */
static moe_status capture_picks(const cuda_state *st, const cuda_layer *l, const moe_forward_io *io,
                                size_t slot_bytes) {
  const int64_t at = io->first_token * l->cfg.top_k;
  if (io->logits && io->topk_ids_out)
    CUDA_TRY(cuda_status(cudaMemcpyAsync((int32_t *)io->topk_ids_out + at, l->topk_ids, slot_bytes,
                                         cudaMemcpyDeviceToDevice, st->stream),
                         "cudaMemcpyAsync of the captured topk_ids"));
  if (io->logits && io->topk_weights_out)
    CUDA_TRY(cuda_status(cudaMemcpyAsync((float *)io->topk_weights_out + at, l->topk_weights,
                                         slot_bytes, cudaMemcpyDeviceToDevice, st->stream),
                         "cudaMemcpyAsync of the captured topk_weights"));
  return MOE_SUCCESS;
}

/* The forward of both entries. Routing: logits are routed into
 * l->topk_ids / l->topk_weights (then copied to the capture buffers when
 * given), or the caller's picks are copied there (device to device, on the
 * stream), so every later stage reads the workspace as before. Pointers
 * are offset to io->first_token (a chunk of a larger batch). */
static moe_status cuda_forward(const cuda_state *st, const cuda_layer *l,
                               const moe_forward_io *io) {
  CUDA_TRY(use_device(st));
  const moe_config *c = &l->cfg;
  const int64_t H = c->hidden_size, I = c->intermediate_size;
  const int32_t k = c->top_k;
  const int64_t T = io->num_tokens, t0 = io->first_token;
  const int64_t slots = T * k;
  const size_t slot_bytes = (size_t)slots * 4;
  const void *x = (const bf16 *)io->x + t0 * H;
  const void *logits = io->logits ? (const float *)io->logits + t0 * c->num_experts : NULL;
  void *out = (bf16 *)io->out + t0 * H;
  if (!logits) {
    CUDA_TRY(cuda_status(cudaMemcpyAsync(l->topk_ids, (const int32_t *)io->topk_ids_in + t0 * k,
                                         slot_bytes, cudaMemcpyDeviceToDevice, st->stream),
                         "cudaMemcpyAsync of topk_ids"));
    CUDA_TRY(
        cuda_status(cudaMemcpyAsync(l->topk_weights, (const float *)io->topk_weights_in + t0 * k,
                                    slot_bytes, cudaMemcpyDeviceToDevice, st->stream),
                    "cudaMemcpyAsync of topk_weights"));
  }

  moe_route_args route =
      moe_plan_route_args(c, T, logits, l->correction_bias, l->topk_ids, l->topk_weights);

  /* A few tokens: route, then the two decode kernels (no align, no
   * separate reduce). */
  const cuda_decode d = decode_args(l, T, x, out);
  const cuda_plan plan = plan_forward(st, l, T, x, &d);
  if (plan.path == CUDA_PATH_DECODE) {
    if (logits) CUDA_TRY(cuda_route(st, &route));
    CUDA_TRY(capture_picks(st, l, io, slot_bytes));
    return cuda_decode_run(st, &d);
  }
  const int32_t BM = plan.block_m;

  const moe_align_args align =
      moe_plan_align_args(c, T, BM, l->topk_ids, l->expert_map, l->sorted_token_ids, l->expert_ids,
                          l->num_tokens_post_padded);
  /* A batch-invariant layer routes with the warp per token whatever T (the
   * rank routing of a few tokens may round the weights differently). */
  cuda_state warp_routing = *st;
  warp_routing.routing_option = MOE_CUDA_ROUTING_WARP;
  CUDA_TRY(cuda_route_align(c->batch_invariant ? &warp_routing : st, logits ? &route : NULL, &align,
                            l->align_scratch));
  CUDA_TRY(capture_picks(st, l, io, slot_bytes));

  if (plan.path == CUDA_PATH_STREAM || plan.path == CUDA_PATH_WGMMA) {
    CUDA_TRY(hopper_forward(st, l, T, x, &plan));
    return reduce_y(st, l, T, out);
  }

  cuda_gemm g1;
  memset(&g1, 0, sizeof g1);
  set_gemm1(&g1, l, BM, l->h);
  g1.a = (const bf16 *)x;
  g1.lda = H;
  g1.b = l->w13;
  g1.b_expert_stride = 2 * I * H;
  g1.ldb = H;
  g1.bias_stride = 2 * I;
  g1.num_tokens = T;
  g1.top_k = k;
  g1.input_per_slot = false;
  g1.fixed_tile = c->batch_invariant != 0;
  CUDA_TRY(cuda_gemm_run(st, &g1));

  cuda_gemm g2 = g1;
  set_gemm2(&g2, l);
  g2.a = l->h;
  g2.lda = I;
  g2.b = l->w2;
  g2.b_expert_stride = H * I;
  g2.ldb = I;
  g2.bias_stride = H;
  g2.input_per_slot = true;
  CUDA_TRY(cuda_gemm_run(st, &g2));
  return reduce_y(st, l, T, out);
}

static moe_status cuda_layer_describe(void *state, const void *layer, int64_t T, char *text,
                                      size_t size) {
  describe_plan((const cuda_state *)state, (const cuda_layer *)layer, T, text, size);
  return MOE_SUCCESS;
}

/* Options: the core checked the value; the parsed choice or integer is
 * kept for the plan and the launchers. */
static moe_status cuda_set_option(void *state, moe_option_id id, const char *value, int64_t parsed,
                                  char *name, size_t name_size) {
  cuda_state *st = (cuda_state *)state;
  (void)name, (void)name_size;
  switch (id) {
  case MOE_OPTION_CUDA_PATH:
    st->path_option = (int)parsed;
    break;
  case MOE_OPTION_CUDA_TILE:
    snprintf(st->tile_option, sizeof st->tile_option, "%s", parsed == 0 ? "" : value);
    break;
  case MOE_OPTION_CUDA_GEMV_MAX_ROWS:
    st->gemv_max_rows = parsed;
    break;
  case MOE_OPTION_CUDA_ROUTING:
    st->routing_option = (int)parsed;
    break;
  case MOE_OPTION_CUDA_DECODE_PDL:
    st->decode_pdl = parsed == 0; /* on|off */
    break;
  case MOE_OPTION_CUDA_STREAM_CTAS:
    st->stream_ctas = (int)parsed + 1; /* 1|2 */
    break;
  case MOE_OPTION_CUDA_STREAM_OVERLAP:
    st->stream_overlap = parsed == 0; /* on|off */
    break;
  case MOE_OPTION_CUDA_DECODE_PERSISTENT:
    st->decode_persistent = parsed == 0; /* on|off */
    break;
  case MOE_OPTION_CUDA_WGMMA_BN:
    st->wgmma_bn_option = parsed == 1 ? 128 : parsed == 2 ? 256 : 0;
    break;
  case MOE_OPTION_CUDA_STREAM_MAX_ROWS:
    st->stream_max_rows = parsed; /* -1: auto */
    break;
  case MOE_OPTION_CUDA_STREAM_SCHEDULE:
    st->stream_dynamic = parsed == 1; /* static|dynamic */
    break;
  case MOE_OPTION_CUDA_WGMMA_GATHER:
    st->wgmma_gather = parsed == 0 ? -1 : parsed == 2; /* auto|off|on */
    break;
  case MOE_OPTION_CUDA_STREAM_GROUP:
    st->stream_group = parsed < 0 ? 0 : (int32_t)parsed; /* -1: auto */
    break;
  case MOE_OPTION_CUDA_STREAM_K:
    st->stream_k = parsed == 2 ? 256 : 128; /* auto|128|256; auto: 128 */
    break;
  case MOE_OPTION_CUDA_WGMMA_BM:
    st->wgmma_bm = parsed == 0 ? 0 : parsed == 1 ? 128 : 64; /* auto|128|64 */
    break;
  case MOE_OPTION_CUDA_STREAM_BLOCK:
    st->stream_block = parsed == 0 ? 0 : 8 << parsed; /* auto|16|32|64|128 */
    break;
  case MOE_OPTION_CUDA_WGMMA_MIN_ROWS:
    st->wgmma_min_rows = parsed; /* -1: auto */
    break;
  case MOE_OPTION_CUDA_PDL:
    st->pdl = st->hopper && parsed == 1; /* off|on; only Hopper has it */
    break;
  default:
    return moe_set_error(MOE_ERROR_INTERNAL, "the CUDA backend has no option %d", (int)id);
  }
  return MOE_SUCCESS;
}

static moe_status cuda_layer_forward(void *state, void *layer, int64_t T, const void *x,
                                     const void *logits, void *out) {
  moe_forward_io io;
  memset(&io, 0, sizeof io);
  io.num_tokens = T;
  io.x = x;
  io.logits = logits;
  io.out = out;
  return cuda_forward((const cuda_state *)state, (const cuda_layer *)layer, &io);
}

static moe_status cuda_forward_routed(void *state, void *layer, const moe_forward_io *io) {
  return cuda_forward((const cuda_state *)state, (const cuda_layer *)layer, io);
}

/* ---- the table ---------------------------------------------------------- */

extern "C" const moe_backend_ops moe_cuda_backend_ops = {
    "cuda",                  /* name */
    MOE_BACKEND_CUDA,        /* kind */
    cuda_context_create,     /* context_create: own non-blocking stream */
    cuda_has_gpu,            /* has_gpu */
    cuda_context_destroy,    /* context_destroy */
    cuda_synchronize,        /* synchronize */
    cuda_buffer_alloc,       /* buffer_alloc: cudaMalloc */
    cuda_buffer_free,        /* buffer_free */
    cuda_buffer_write,       /* buffer_write: async copy + stream sync */
    cuda_buffer_read,        /* buffer_read */
    cuda_route_stage,        /* route: routing_logic.h on the device */
    cuda_align_stage,        /* align: same bytes as moe_align_host */
    cuda_grouped_gemm_stage, /* grouped_gemm: mma.sync tiles or reference */
    cuda_activation_stage,   /* activation */
    cuda_topk_reduce_stage,  /* topk_reduce */
    cuda_layer_create,       /* layer_create: interleave gate/up, upload */
    cuda_layer_destroy,      /* layer_destroy */
    cuda_layer_reserve,      /* layer_reserve: one workspace allocation */
    cuda_layer_forward,      /* layer_forward: no allocation, no host wait */
    cuda_set_option,         /* set_option: kept in cuda_state */
    cuda_layer_describe,     /* layer_describe: plan_forward's choice */
    cuda_forward_routed,     /* layer_forward_routed: routing in/out */
};
