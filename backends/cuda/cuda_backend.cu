/*
 * cuda_backend.cu - the CUDA backend's table (moe_cuda_backend_ops):
 * contexts on a stream, device buffers, the stages, and the layer.
 *
 * The layer repacks w13 so that gate and up rows interleave (GEMM1's
 * epilogue then holds g and u of one column pair and writes h directly),
 * keeps w2 as [EL][H][I], and runs a forward of four launches for decode:
 *   route+align (one block) -> GEMM1 + activation -> GEMM2 + routed weight
 *   -> reduce,
 * with more align launches when the slots outgrow one block. The forward
 * allocates nothing and never waits for the host, so it can be captured
 * into a CUDA graph on the context's stream.
 */
#include "cuda_context.h"
#include "cuda_internal.cuh"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef __nv_bfloat16 bf16;

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
  cuda_state *st = (cuda_state *)calloc(1, sizeof *st);
  if (!st) return moe_set_error(MOE_ERROR_OUT_OF_MEMORY, "cannot allocate the CUDA state");
  st->device = device;
  st->sm_count = prop.multiProcessorCount;
  const char *pdl = getenv("MOE_CUDA_PDL");
  st->pdl = prop.major >= 9 && pdl && strcmp(pdl, "1") == 0;
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

static moe_status cuda_layer_reserve(void *state, void *layer, int64_t max_tokens) {
  const cuda_state *st = (const cuda_state *)state;
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
  const size_t sizes[8] = {
      (size_t)slots * 4,
      (size_t)slots * 4,
      (size_t)sorted_cap * 4,
      (size_t)block_cap * 4,
      4,
      (size_t)scratch * 4,
      (size_t)(slots * c->intermediate_size) * sizeof(bf16),
      (size_t)(slots * c->hidden_size) * sizeof(bf16),
  };
  size_t offsets[8], total = 0;
  for (int i = 0; i < 8; ++i) {
    offsets[i] = total;
    total += align_up(sizes[i]);
  }
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
  return MOE_SUCCESS;
}

static moe_status cuda_layer_forward(void *state, void *layer, int64_t T, const void *x,
                                     const void *logits, void *out) {
  const cuda_state *st = (const cuda_state *)state;
  const cuda_layer *l = (const cuda_layer *)layer;
  CUDA_TRY(use_device(st));
  const moe_config *c = &l->cfg;
  const int64_t H = c->hidden_size, I = c->intermediate_size;
  const int32_t k = c->top_k, EL = c->num_local_experts;
  const int64_t slots = T * k;
  const int32_t BM = cuda_gemm_pick_block_m(st, slots, EL, 2 * I, H);

  moe_route_args route;
  memset(&route, 0, sizeof route);
  route.num_tokens = T;
  route.logits = logits;
  route.correction_bias = l->correction_bias;
  route.topk_ids = l->topk_ids;
  route.topk_weights = l->topk_weights;
  route.num_experts = c->num_experts;
  route.top_k = k;
  route.scoring = c->scoring;
  route.renormalize = c->renormalize;
  route.num_groups = c->num_groups;
  route.topk_groups = c->topk_groups;
  route.group_scoring = c->group_scoring;
  route.routed_scaling_factor = c->routed_scaling_factor;

  moe_align_args align;
  memset(&align, 0, sizeof align);
  align.num_tokens = T;
  align.top_k = k;
  align.num_experts = c->num_experts;
  align.num_local_experts = EL;
  align.block_m = BM;
  align.sorted_capacity = slots + (int64_t)EL * (BM - 1);
  align.block_capacity = (align.sorted_capacity + BM - 1) / BM;
  align.topk_ids = l->topk_ids;
  align.expert_map = l->expert_map;
  align.sorted_token_ids = l->sorted_token_ids;
  align.expert_ids = l->expert_ids;
  align.num_tokens_post_padded = l->num_tokens_post_padded;
  CUDA_TRY(cuda_route_align(st, &route, &align, l->align_scratch));

  const bool weight_on_input = c->router_weight == MOE_ROUTER_WEIGHT_ON_INPUT;
  cuda_gemm g1;
  memset(&g1, 0, sizeof g1);
  g1.a = (const bf16 *)x;
  g1.lda = H;
  g1.b = l->w13;
  g1.b_expert_stride = 2 * I * H;
  g1.ldb = H;
  g1.bias = l->w13_bias;
  g1.bias_stride = 2 * I;
  g1.sorted_token_ids = l->sorted_token_ids;
  g1.expert_ids = l->expert_ids;
  g1.num_tokens_post_padded = l->num_tokens_post_padded;
  g1.topk_weights = l->topk_weights;
  g1.c = l->h;
  g1.ldc = I;
  g1.num_tokens = T;
  g1.top_k = k;
  g1.num_local_experts = EL;
  g1.n = (int32_t)(2 * I);
  g1.k = (int32_t)H;
  g1.block_m = BM;
  g1.input_per_slot = false;
  g1.routed_weight =
      weight_on_input ? MOE_GEMM_ROUTED_WEIGHT_BEFORE_BIAS : MOE_GEMM_ROUTED_WEIGHT_NONE;
  g1.epilogue = CUDA_EPILOGUE_GLU;
  g1.activation = c->activation;
  g1.alpha = c->swiglu_alpha;
  g1.limit = c->swiglu_limit;
  CUDA_TRY(cuda_gemm_run(st, &g1));

  cuda_gemm g2 = g1;
  g2.a = l->h;
  g2.lda = I;
  g2.b = l->w2;
  g2.b_expert_stride = H * I;
  g2.ldb = I;
  g2.bias = l->w2_bias;
  g2.bias_stride = H;
  g2.c = l->y;
  g2.ldc = H;
  g2.n = (int32_t)H;
  g2.k = (int32_t)I;
  g2.input_per_slot = true;
  g2.routed_weight =
      weight_on_input ? MOE_GEMM_ROUTED_WEIGHT_NONE : MOE_GEMM_ROUTED_WEIGHT_AFTER_BIAS;
  g2.epilogue = CUDA_EPILOGUE_STORE;
  CUDA_TRY(cuda_gemm_run(st, &g2));

  moe_reduce_args reduce;
  memset(&reduce, 0, sizeof reduce);
  reduce.num_tokens = T;
  reduce.top_k = k;
  reduce.hidden_size = H;
  reduce.y = l->y;
  reduce.topk_weights = NULL; /* applied in GEMM2 (or on the input) */
  reduce.topk_ids = l->expert_map ? l->topk_ids : NULL;
  reduce.expert_map = l->expert_map;
  reduce.num_experts = c->num_experts;
  reduce.num_local_experts = EL;
  reduce.out = out;
  return cuda_topk_reduce(st, &reduce);
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
};
