/*
 * backend.h - the internal interface between the core and the backends.
 *
 * Seen only by core/ and backends/. A backend is one static table of
 * operations (moe_backend_ops) plus a per-context opaque state. The core
 * validates every argument before it calls an operation, so an operation
 * may assume valid shapes, sizes, non-NULL required handles and buffers of
 * the right context and size. Operations report failures with a status and
 * moe_set_error(); they never print.
 *
 * Buffers reach the backend as their native handle (void *): a host pointer
 * for the CPU backend, a device pointer for CUDA, a cl_mem for OpenCL.
 */
#ifndef MOE_CORE_BACKEND_H
#define MOE_CORE_BACKEND_H

#include "moe.h"

#include <stdarg.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Returns the status of expr when it is not MOE_SUCCESS. */
#define MOE_TRY(expr)                                                                              \
  do {                                                                                             \
    moe_status moe_try_status_ = (expr);                                                           \
    if (moe_try_status_ != MOE_SUCCESS) return moe_try_status_;                                    \
  } while (0)

/* Arguments of the routing stage (validated by the core). */
typedef struct moe_route_args {
  int64_t num_tokens;
  const void *logits;          /* fp32 [T][E] */
  const void *correction_bias; /* fp32 [E] or NULL */
  void *topk_ids;              /* int32 [T][k] */
  void *topk_weights;          /* fp32 [T][k] */
  int32_t num_experts;
  int32_t top_k;
  moe_scoring scoring;
  int32_t renormalize;
  int32_t num_groups; /* 1 when not grouped */
  int32_t topk_groups;
  moe_group_scoring group_scoring;
  float routed_scaling_factor;
} moe_route_args;

/* Arguments of the align stage. */
typedef struct moe_align_args {
  int64_t num_tokens;
  int32_t top_k;
  int32_t num_experts;
  int32_t num_local_experts;
  int32_t block_m;
  int64_t sorted_capacity; /* elements of sorted_token_ids to write */
  int64_t block_capacity;  /* elements of expert_ids to write */
  const void *topk_ids;    /* int32 [T][k] */
  const void *expert_map;  /* int32 [E] or NULL */
  void *sorted_token_ids;
  void *expert_ids;
  void *num_tokens_post_padded;
} moe_align_args;

/* Arguments of the grouped GEMM stage. */
typedef struct moe_gemm_args {
  moe_gemm_desc desc;
  int64_t sorted_capacity;
  int64_t block_capacity;
  const void *a;
  const void *b;
  const void *bias; /* fp32 [EL][n] or NULL */
  const void *sorted_token_ids;
  const void *expert_ids;
  const void *num_tokens_post_padded;
  const void *topk_weights; /* fp32 [T*k] or NULL */
  void *c;
  /* Set only by the default forward (core/forward.c); the public stage
   * moe_grouped_gemm leaves both 0. */
  int32_t c_fp32;          /* c holds fp32, not bf16 (the forward's gate|up) */
  int32_t batch_invariant; /* the layer's option: one kernel for every T */
} moe_gemm_args;

/* Arguments of the activation stage. */
typedef struct moe_activation_args {
  moe_activation activation;
  float alpha;
  float limit;
  int64_t rows;
  int64_t intermediate_size;
  const void *in;  /* bf16 [rows][2I], or fp32 when in_fp32 */
  void *out;       /* bf16 [rows][I] */
  int32_t in_fp32; /* set only by the default forward (its fp32 gate|up) */
} moe_activation_args;

/* Arguments of the reduce stage. */
typedef struct moe_reduce_args {
  int64_t num_tokens;
  int32_t top_k;
  int64_t hidden_size;
  const void *y;            /* bf16 [T*k][H] */
  const void *topk_weights; /* fp32 [T][k] or NULL */
  const void *topk_ids;     /* int32 [T][k] or NULL (then no slot is skipped) */
  const void *expert_map;   /* int32 [E] or NULL */
  int32_t num_experts;
  int32_t num_local_experts;
  void *out; /* bf16 [T][H] */
} moe_reduce_args;

/* The options of moe_context_set_option. core/options.c holds their names,
 * values and defaults and checks a value before a backend sees it; the
 * backend keeps the parsed value in its state (never the environment). */
typedef enum moe_option_id {
  MOE_OPTION_CPU_KERNELS,            /* choice: MOE_CPU_KERNELS_* */
  MOE_OPTION_OPENCL_ROUTE,           /* choice: MOE_OPENCL_ROUTE_* */
  MOE_OPTION_OPENCL_SKINNY,          /* choice: 0 auto, else the variant named by value */
  MOE_OPTION_OPENCL_SKINNY_MAX_ROWS, /* integer */
  MOE_OPTION_CUDA_PATH,              /* choice: MOE_CUDA_PATH_* */
  MOE_OPTION_CUDA_TILE,              /* choice: 0 auto, 1 gemv, else the tile named by value */
  MOE_OPTION_CUDA_GEMV_MAX_ROWS,     /* integer */
  MOE_OPTION_CUDA_ROUTING,           /* choice: MOE_CUDA_ROUTING_* */
  MOE_OPTION_CUDA_DECODE_PDL,        /* choice: 0 on, 1 off */
  MOE_OPTION_CUDA_DECODE_PERSISTENT, /* choice: 0 on, 1 off */
  MOE_OPTION_CUDA_WGMMA_BN,          /* choice: 0 auto, 1 128, 2 256 */
  MOE_OPTION_CUDA_PDL,               /* choice: 0 off, 1 on */
  MOE_OPTION_CUDA_STREAM_OVERLAP,    /* choice: 0 on, 1 off */
  MOE_OPTION_CUDA_STREAM_CTAS,       /* choice: 0 one CTA per SM, 1 two */
  MOE_OPTION_CUDA_STREAM_MAX_ROWS,   /* integer or auto (-1) */
  MOE_OPTION_CUDA_WGMMA_MIN_ROWS,    /* integer or auto (-1) */
  MOE_OPTION_CUDA_STREAM_BLOCK,      /* choice: 0 auto, 1 16, 2 32, 3 64, 4 128 */
  MOE_OPTION_CUDA_STREAM_SCHEDULE,   /* choice: 0 static, 1 dynamic */
  MOE_OPTION_CUDA_STREAM_GROUP,      /* integer or auto (-1) */
  MOE_OPTION_CUDA_WGMMA_GATHER,      /* choice: 0 auto, 1 off, 2 on */
  MOE_OPTION_CUDA_STREAM_K,          /* choice: 0 auto, 1 128, 2 256 */
  MOE_OPTION_CUDA_WGMMA_BM,          /* choice: 0 auto, 1 128, 2 64 */
  MOE_OPTION_COUNT
} moe_option_id;

/* Choice indices, in the order of core/options.c's value lists. */
enum { MOE_CPU_KERNELS_AUTO, MOE_CPU_KERNELS_PORTABLE }; /* then avx512, avx512bf16, amx */
enum { MOE_OPENCL_ROUTE_AUTO, MOE_OPENCL_ROUTE_SERIAL, MOE_OPENCL_ROUTE_PARALLEL };
enum {
  MOE_CUDA_PATH_AUTO,
  MOE_CUDA_PATH_DECODE,
  MOE_CUDA_PATH_STREAM,
  MOE_CUDA_PATH_WGMMA,
  MOE_CUDA_PATH_MMA
};
enum {
  MOE_CUDA_ROUTING_AUTO,
  MOE_CUDA_ROUTING_WARP,
  MOE_CUDA_ROUTING_REFERENCE,
  MOE_CUDA_ROUTING_RANK
};

/* The default value of an option, as text. */
const char *moe_option_default(moe_option_id id);

/* A layer as the backend sees it: the validated configuration with
 * num_local_experts resolved and num_groups >= 1, and host weights. */
typedef struct moe_layer_desc {
  moe_config cfg;
  const moe_weights *weights; /* host pointers, valid during create only */
} moe_layer_desc;

/* One call of layer_forward_routed: num_tokens in [1, reserved] starting at
 * row first_token of every per-token buffer (x, logits, the ids and weights
 * in or out, out), so that the core can run a batch larger than the
 * reservation in chunks without sub-buffers. Exactly one routing source:
 * logits (then topk_ids_out / topk_weights_out, each optional, receive the
 * picks), or topk_ids_in with topk_weights_in (the caller's picks, used as
 * given: ids outside the local experts contribute nothing; the core has
 * checked them where it can read them, see moe_layer_forward_routed). */
typedef struct moe_forward_io {
  int64_t num_tokens;
  int64_t first_token;
  const void *x;               /* bf16 [..][H] */
  const void *logits;          /* fp32 [..][E] or NULL */
  const void *topk_ids_in;     /* int32 [..][k] when logits is NULL */
  const void *topk_weights_in; /* fp32 [..][k] when logits is NULL */
  void *topk_ids_out;          /* int32 [..][k] or NULL */
  void *topk_weights_out;      /* fp32 [..][k] or NULL */
  void *out;                   /* bf16 [..][H] */
} moe_forward_io;

/* What the default forward (moe_forward_default) takes from a backend's
 * layer: native handles of its weights and of its workspace, which
 * layer_reserve sized for R reserved tokens (slots R*k), and its row
 * block. Every workspace buffer is the forward's own; x, logits, the picks
 * and out are the caller's (moe_forward_io). */
typedef struct moe_forward_parts {
  moe_weight_layout b_layout;     /* how w13 and w2 are stored */
  const void *w13, *w2;           /* bf16 [EL][2I][H], [EL][H][I] (in b_layout) */
  const void *w13_bias, *w2_bias; /* fp32 [EL][2I], [EL][H] or NULL */
  const void *correction_bias;    /* fp32 [E] or NULL */
  const void *expert_map;         /* int32 [E] or NULL */
  void *topk_ids, *topk_weights;  /* int32, fp32 [R*k] */
  /* align's outputs, at the capacities of every block_m that block_m()
   * returns (moe_plan_align_capacity) */
  void *sorted_token_ids, *expert_ids, *num_tokens_post_padded;
  void *gate_up;    /* fp32 [R*k][2I] */
  void *hidden;     /* bf16 [R*k][I] */
  void *expert_out; /* bf16 [R*k][H] */
  /* A window past token 0 is copied through these (bf16 [R][H], fp32
   * [R][E], bf16 [R][H]): handles are opaque to the core, and a kernel
   * may take only whole buffers. */
  void *x_stage, *logits_stage, *out_stage;
  /* align's row block for a forward of num_tokens tokens. */
  int32_t (*block_m)(const moe_config *cfg, int64_t num_tokens);
} moe_forward_parts;

typedef struct moe_backend_ops {
  const char *name; /* "cpu", "cuda", "opencl" */
  moe_backend kind;

  /* Creates the per-context state on device index `device`; writes the
   * device name (at most name_size bytes, NUL-terminated). Returns
   * BACKEND_UNAVAILABLE when the backend has no such device. */
  moe_status (*context_create)(int device, void **state, char *name, size_t name_size);
  /* (optional) Nonzero when the backend has a GPU device (for AUTO). */
  int (*has_gpu)(void);
  /* Frees the state. */
  void (*context_destroy)(void *state);
  /* Waits for all queued work. */
  moe_status (*synchronize)(void *state);

  /* Allocates device memory; *handle is the buffer's native handle. */
  moe_status (*buffer_alloc)(void *state, size_t bytes, void **handle);
  /* Frees memory from buffer_alloc. */
  void (*buffer_free)(void *state, void *handle);
  /* Blocking host -> device copy at a byte offset. */
  moe_status (*buffer_write)(void *state, void *handle, size_t offset, const void *src,
                             size_t bytes);
  /* Blocking device -> host copy at a byte offset. */
  moe_status (*buffer_read)(void *state, const void *handle, size_t offset, void *dst,
                            size_t bytes);

  /* (optional) Routing; default: the core's host routing through
   * buffer_read/buffer_write. */
  moe_status (*route)(void *state, const moe_route_args *args);
  /* (optional) Align; default: the core's host align, likewise. */
  moe_status (*align)(void *state, const moe_align_args *args);
  /* Grouped BF16 GEMM over the align metadata. */
  moe_status (*grouped_gemm)(void *state, const moe_gemm_args *args);
  /* Gated activation. */
  moe_status (*activation)(void *state, const moe_activation_args *args);
  /* Weighted top-k reduce. */
  moe_status (*topk_reduce)(void *state, const moe_reduce_args *args);

  /* Creates the backend's layer: repacks and uploads the weights. */
  moe_status (*layer_create)(void *state, const moe_layer_desc *desc, void **layer);
  /* Frees a layer and its workspace. */
  void (*layer_destroy)(void *state, void *layer);
  /* Grows the workspace to max_tokens; on failure the old one stays. */
  moe_status (*layer_reserve)(void *state, void *layer, int64_t max_tokens);
  /* (optional; NULL: moe_forward_default) Full forward; num_tokens in
   * [1, reserved]. No allocation, no host wait. For backends that fuse
   * stages. */
  moe_status (*layer_forward)(void *state, void *layer, int64_t num_tokens, const void *x,
                              const void *logits, void *out);

  /* Sets one of the backend's own options (the core checked the value):
   * `parsed` is the choice's index or the integer, `value` the text. May
   * rewrite the device name (name_size bytes) when the option shows in it.
   * A valid value the device or build cannot run returns UNSUPPORTED and
   * changes nothing. */
  moe_status (*set_option)(void *state, moe_option_id id, const char *value, int64_t parsed,
                           char *device_name, size_t name_size);
  /* Writes (at most size bytes, NUL-terminated) what a forward of
   * num_tokens (>= 1) would run now: path, kernels, align's block_m,
   * capacities, splits. The plan's own decision, not a copy of it. */
  moe_status (*layer_describe)(void *state, const void *layer, int64_t num_tokens, char *text,
                               size_t size);
  /* (optional; NULL: moe_forward_default) The forward with routing in or
   * out, on a window of the caller's buffers (see moe_forward_io). No
   * allocation, no host wait. For backends that fuse stages. */
  moe_status (*layer_forward_routed)(void *state, void *layer, const moe_forward_io *io);

  /* What the default forward needs beyond the stages; a backend that runs
   * it fills both, one that overrides both forwards may leave them NULL.
   * copy: an enqueued device copy between buffers at byte offsets (no
   * host wait); forward_parts: the parts of a layer (moe_forward_parts). */
  moe_status (*copy)(void *state, const void *src, size_t src_offset, void *dst, size_t dst_offset,
                     size_t bytes);
  void (*forward_parts)(void *layer, moe_forward_parts *parts);
} moe_backend_ops;

/* The tables of the compiled backends (defined in backends/<name>/). */
extern const moe_backend_ops moe_cpu_backend_ops;
#ifdef MOE_HAVE_CUDA
extern const moe_backend_ops moe_cuda_backend_ops;
#endif
#ifdef MOE_HAVE_OPENCL
extern const moe_backend_ops moe_opencl_backend_ops;
#endif

/* Records the message of a failing call for moe_last_error(): on the
 * current context when the core is inside a call on one, else per thread.
 * Returns status, so that `return moe_set_error(...)` reads naturally. */
moe_status moe_set_error(moe_status status, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* The table of a backend, or NULL when it is not compiled in. */
const moe_backend_ops *moe_backend_lookup(moe_backend backend);

/* The core's host implementations, used by the CPU backend directly and as
 * the default for the optional route/align entries. Pointers are host
 * memory. */
void moe_route_host(const moe_route_args *args);
void moe_align_host(const moe_align_args *args);

/* The core's plan helpers (core/plan.c; docs/DESIGN.md, "Core plan
 * helpers"): what a forward's stages take from a layer's configuration,
 * written once for every backend. cfg is a resolved configuration
 * (moe_layer_desc::cfg); none of them validates or fails. */

/* The route arguments of num_tokens tokens (num_groups <= 1: not grouped,
 * 1 and 1); buffers as given, each may be NULL to fill in later. */
moe_route_args moe_plan_route_args(const moe_config *cfg, int64_t num_tokens, const void *logits,
                                   const void *correction_bias, void *topk_ids, void *topk_weights);
/* Align's capacities for `slots` = T*k slots: sorted_token_ids holds
 * slots + EL*(block_m - 1) elements, expert_ids one per block_m of them
 * (moe_align_capacity's formula; either output may be NULL). */
void moe_plan_align_capacity(int64_t slots, int64_t num_local_experts, int32_t block_m,
                             int64_t *sorted_capacity, int64_t *block_capacity);
/* The align arguments of num_tokens tokens with row block block_m, the
 * capacities from moe_plan_align_capacity. */
moe_align_args moe_plan_align_args(const moe_config *cfg, int64_t num_tokens, int32_t block_m,
                                   const void *topk_ids, const void *expert_map,
                                   void *sorted_token_ids, void *expert_ids,
                                   void *num_tokens_post_padded);
/* Where the router weight enters the two GEMMs: on the input (GEMM1 scales
 * its input, BEFORE_BIAS; GEMM2 NONE) or on the output (GEMM1 NONE, GEMM2
 * AFTER_BIAS). Either output may be NULL. */
void moe_plan_routed_modes(const moe_config *cfg, moe_gemm_routed_weight *gemm1,
                           moe_gemm_routed_weight *gemm2);
/* The two GEMMs of a forward over align's metadata with row block
 * block_m and the backend's weight layout b_layout: GEMM1 x[T][H] (per
 * token) -> gate|up [T*k][2I], GEMM2 h[T*k][I] (per slot) -> y[T*k][H],
 * each with its routed-weight mode (moe_plan_routed_modes). Either output
 * may be NULL. */
void moe_plan_gemm_descs(const moe_config *cfg, int64_t num_tokens, int32_t block_m,
                         moe_weight_layout b_layout, moe_gemm_desc *gemm1, moe_gemm_desc *gemm2);
/* The reduce of a forward: y [T*k][H] summed per token into out, without
 * topk_weights (the GEMMs applied them); topk_ids (NULL: no slot skipped)
 * and expert_map as given. */
moe_reduce_args moe_plan_reduce_args(const moe_config *cfg, int64_t num_tokens, const void *y,
                                     const void *topk_ids, const void *expert_map, void *out);
/* Rows per touched expert, the one measure kernel choices read:
 * ceil(slots / min(slots, EL)), 0 when slots is 0. At most EL experts are
 * touched, and never more than slots, so this is the average run length in
 * the fullest spread of the picks. */
int64_t moe_plan_rows_per_expert(int64_t slots, int64_t num_local_experts);

/* The default layer forward (core/forward.c; docs/DESIGN.md, "The
 * forward"), run by the core for a backend without layer_forward_routed
 * (and, for plain forwards, without layer_forward): a composition of the
 * backend's route, align, grouped_gemm, activation and topk_reduce on
 * ops->forward_parts(layer), with ops->copy for the caller's picks in and
 * out and for a window past token 0. The backend must implement route and
 * align (the host defaults would wait for the device). cfg is the layer's
 * resolved configuration. No allocation, no host wait. */
moe_status moe_forward_default(const moe_backend_ops *ops, void *state, void *layer,
                               const moe_config *cfg, const moe_forward_io *io);

/* For interop headers: a context around a backend state that the backend
 * made itself (for example on the caller's CUDA stream), and a buffer
 * around a native handle the caller owns (never freed by the library). */
moe_status moe_context_adopt(const moe_backend_ops *ops, void *state, const char *device_name,
                             moe_context **ctx);
moe_status moe_buffer_wrap_native(moe_context *ctx, void *handle, size_t bytes,
                                  moe_buffer **buffer);
/* The backend state of a context, and the native handle of a buffer. */
void *moe_context_backend_state(const moe_context *ctx);
void *moe_buffer_native_handle(const moe_buffer *buffer);

#ifdef __cplusplus
}
#endif

#endif /* MOE_CORE_BACKEND_H */
