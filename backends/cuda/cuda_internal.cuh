/*
 * cuda_internal.cuh - what the CUDA backend's translation units share: the
 * per-context state, error mapping, and the launchers of each kernel family
 * (route/align, grouped GEMM, elementwise). Seen only by backends/cuda/.
 */
#ifndef MOE_CUDA_INTERNAL_CUH
#define MOE_CUDA_INTERNAL_CUH

#include "backend.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

/*
 * The forward's thresholds for one device class (cuda_tuning.cu holds the
 * rows). Rows per expert are cuda_rows_per_expert's.
 */
struct cuda_tuning {
  const char *device_class; /* shown by moe_layer_describe */
  int major;                /* matches this compute capability major ... */
  double min_read_gbps;     /* ... with at least this peak read rate (GB/s) */
  /* Decode path: at most this many tokens with >= 64 local experts, or
   * decode_max_tokens_few with fewer, and tokens x hidden at most
   * decode_max_elements (decode.cu's rule; one token always decodes). */
  int decode_max_tokens, decode_max_tokens_few;
  int64_t decode_max_elements;
  /* Hopper (sm_90a kernels): the streaming GEMM up to stream_max_rows
   * rows per expert, the mma.sync tiles above it (none where it is
   * wgmma_min_rows - 1, as in every row now), the wgmma tiles from
   * wgmma_min_rows. */
  int64_t stream_max_rows, wgmma_min_rows;
  /* The streaming GEMM's token block: 16 rows up to [0] rows per expert,
   * 32 up to [1], 64 up to [2], else 128 (rows per expert as the plan
   * estimates them for the block: x num_groups / topk_groups for grouped
   * routing, cuda_backend.cu's stream_rows_per_expert). */
  int64_t stream_block_max_rows[3];
  /* The streaming GEMM's raster: work items in groups of this many token
   * blocks, every feature tile of a group before the next group. */
  int32_t stream_group;
  /* The rank routing on many blocks of a few tokens each (route_align.cu)
   * up to this many tokens; the warp per token above. */
  int64_t rank_routing_max_tokens;
  /* The wgmma GEMM1 gathers x's rows itself (no permute) up to this many
   * rows per expert, or at any rows where GEMM1 has at most
   * wgmma_gather_max_n output columns (2 x intermediate): each column
   * tile copies its rows from x again (through L2), so with many column
   * tiles the permute's one contiguous copy costs less. */
  int64_t wgmma_gather_max_rows, wgmma_gather_max_n;
  /* The wgmma GEMMs run 64-row token tiles (CUDA_WGMMA_NARROW_BLOCK_M)
   * up to this many rows per expert, for layers of at most
   * wgmma_narrow_max_experts local experts: half the padding of the
   * 128-row tiles where experts hold 32-64 rows. */
  int64_t wgmma_narrow_max_rows;
  int32_t wgmma_narrow_max_experts;
};

/* The row for a device: compute capability major and peak read rate. */
const cuda_tuning *cuda_tuning_for(int major, double read_gbps);

/* A device's peak memory read rate from its clock and bus width (GB/s),
 * or 0 when the driver does not say. */
double cuda_peak_read_gbps(int device);

/* Per-context state: one device, one stream (ours or the caller's). */
struct cuda_state {
  int device;
  cudaStream_t stream;
  bool owns_stream;
  int sm_count;
  bool pdl;    /* programmatic dependent launch: option cuda.pdl=on (Hopper), off by default
                  (it slowed the tile path's 1-token forward; measurements:
                  bench/cuda_notes.md, 'Measurements behind the code's rules') */
  bool wgmma;  /* the sm_90a prefill path (gemm_wgmma.cu) can run here */
  bool hopper; /* compute capability 9.x: programmatic dependent launch */
  const cuda_tuning *tuning; /* this device class's thresholds */
  /* Options (moe_context_set_option, core/options.c), set at creation to
   * their defaults; the plan and the launchers read them, never the
   * environment. */
  int path_option;         /* cuda.path: MOE_CUDA_PATH_* */
  char tile_option[16];    /* cuda.tile: "" (auto), "gemv" or a tile's name */
  int64_t gemv_max_rows;   /* cuda.gemv_max_rows; -1: the measured default (1) */
  int routing_option;      /* cuda.routing: MOE_CUDA_ROUTING_* */
  bool decode_pdl;         /* cuda.decode_pdl */
  bool stream_overlap;     /* cuda.stream_overlap */
  int stream_ctas;         /* cuda.stream_ctas: 1 or 2 per SM at token block 16 */
  bool decode_persistent;  /* cuda.decode_persistent */
  int wgmma_bn_option;     /* cuda.wgmma_bn: 0 (auto), 128 or 256 */
  int64_t stream_max_rows; /* cuda.stream_max_rows; -1: the tuning row's */
  int64_t wgmma_min_rows;  /* cuda.wgmma_min_rows; -1: the tuning row's */
  int stream_block;        /* cuda.stream_block: 0 (the tuning row's), 16 ... 128 */
  int32_t stream_group;    /* cuda.stream_group: token blocks per raster group; 0: the row's */
  int stream_k;            /* cuda.stream_k: elements of K per streaming stage at token block 16 */
  int wgmma_bm;            /* cuda.wgmma_bm: 0 (auto: the tuning row's rule), 128 or 64 */
  int wgmma_gather;        /* cuda.wgmma_gather: -1 auto (the row's rule), 0 off, 1 on */
  bool stream_dynamic;     /* cuda.stream_schedule=dynamic */
  /* Split-K workspace of the streaming GEMM (gemm_stream.cu), shared by the
   * context's layers (their forwards are ordered on one stream); allocated
   * by the first reserve of a layer that can stream, counters zeroed. */
  float *split_partial;
  size_t split_partial_bytes;
  int32_t *split_counters;
  int64_t split_counters_len;
};

/* Maps a CUDA error to a status and a message naming what failed. */
moe_status cuda_status(cudaError_t err, const char *what);

/* Checks the launch that was just queued. */
static inline moe_status cuda_launch_status(const char *kernel) {
  return cuda_status(cudaGetLastError(), kernel);
}

/*
 * Queues kernel<<<grid, block, smem, st's stream>>>(args...). A dependent
 * launch (Hopper) may start before the previous kernel on the stream ends:
 * its CTAs get resident during the previous kernel's tail and wait in
 * cuda_grid_dependency_wait() until that kernel has finished and its
 * writes are visible. Every kernel launched this way calls the wait before
 * touching global memory, so the order of results is that of a plain
 * launch; only the launch latency is hidden.
 */
template <typename... Params, typename... Args>
static inline cudaError_t cuda_launch(const cuda_state *st, bool dependent,
                                      void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                                      Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = st->stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = dependent && st->pdl ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

/* In a dependent kernel: waits for the previous kernel (a no-op when the
 * launch was plain). */
__device__ __forceinline__ void cuda_grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

/* Lets the next dependent kernel get scheduled once every CTA of this one
 * has called it (or exited). */
__device__ __forceinline__ void cuda_allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::);
#endif
}

/* ---- sizes of a batch over the experts (host) --------------------------- */

/* The most experts `slots` (token, expert) pairs can touch among EL. */
static inline int64_t cuda_touched_bound(int64_t slots, int64_t num_local_experts) {
  return slots < num_local_experts ? slots : num_local_experts;
}

/* Rows per touched expert on average, rounded up; what the GEMM choices
 * (tile table, decode kernel, stream and wgmma paths) are keyed by. The
 * core's one definition (core/plan.c, docs/DESIGN.md). */
static inline int64_t cuda_rows_per_expert(int64_t slots, int64_t num_local_experts) {
  return moe_plan_rows_per_expert(slots, num_local_experts);
}

/* Upper bound of num_tokens_post_padded, which only the device knows:
 * every touched expert pads at most block_m - 1 rows. Grids are sized by
 * it. */
static inline int64_t cuda_padded_rows_bound(int64_t slots, int64_t num_local_experts,
                                             int64_t block_m) {
  return slots + (block_m - 1) * cuda_touched_bound(slots, num_local_experts);
}

/* The local expert of a slot's id, or -1 when the slot is not computed
 * here (as core/align.c's local_expert): align, the decode kernels and the
 * reduce agree on it. */
__device__ __forceinline__ int cuda_local_expert(int32_t id, const int32_t *map,
                                                 int32_t num_experts, int32_t num_local) {
  if (map) {
    if (id < 0 || id >= num_experts) return -1;
    id = map[id];
  }
  return (id >= 0 && id < num_local) ? id : -1;
}

#define CUDA_TRY(expr)                                                                             \
  do {                                                                                             \
    moe_status cuda_try_status_ = (expr);                                                          \
    if (cuda_try_status_ != MOE_SUCCESS) return cuda_try_status_;                                  \
  } while (0)

/* ---- route and align (route_align.cu) ---------------------------------- */

/* Scratch int32 elements the multi-block align needs for n slots and EL
 * experts (0 when the one-block path takes it). */
int64_t cuda_align_scratch_elems(int64_t num_slots, int32_t num_local_experts);

/* Routing through core/routing_logic.h, one thread per token. */
moe_status cuda_route(const cuda_state *st, const moe_route_args *args);

/*
 * Align (and, when route is not NULL, routing first, fused into the same
 * launch when the slots fit one block). scratch holds
 * cuda_align_scratch_elems() int32 elements; when it is NULL and scratch is
 * needed, it is taken stream-ordered from the device's pool.
 */
moe_status cuda_route_align(const cuda_state *st, const moe_route_args *route,
                            const moe_align_args *align, int32_t *scratch);

/* ---- grouped GEMM (grouped_gemm.cu) ------------------------------------- */

enum cuda_epilogue {
  CUDA_EPILOGUE_STORE = 0, /* c[s][n] = bf16(op(acc)) */
  CUDA_EPILOGUE_GLU = 1,   /* b's rows interleave gate/up: c[s][n/2] = act(g, u) */
};

/* One grouped GEMM as the kernels see it (element strides, 64-bit). */
struct cuda_gemm {
  const __nv_bfloat16 *a;
  int64_t lda;
  const __nv_bfloat16 *b;
  int64_t b_expert_stride;
  int64_t ldb; /* OUT_IN: stride between n rows; IN_OUT: between k rows */
  bool b_kn;   /* IN_OUT layout: b[e][k][n] */
  const float *bias;
  int64_t bias_stride;
  const int32_t *sorted_token_ids;
  const int32_t *expert_ids;
  const int32_t *num_tokens_post_padded;
  const float *topk_weights;
  __nv_bfloat16 *c;
  int64_t ldc;
  int64_t num_tokens;
  int32_t top_k;
  int32_t num_local_experts;
  int32_t n, k;
  int32_t block_m;
  bool input_per_slot;
  moe_gemm_routed_weight routed_weight;
  cuda_epilogue epilogue;
  moe_activation activation;
  float alpha, limit;
  /* Host only: a batch-invariant layer's GEMM runs one tile whatever the
   * rows (CUDA_FIXED_TILE_BLOCK_M rows), never the CUDA-core kernel. */
  bool fixed_tile;
};

/* The row block of the one tile of batch-invariant layers. */
#define CUDA_FIXED_TILE_BLOCK_M 64

/* Sets the shared-memory limits of the GEMM kernels on the current device. */
moe_status cuda_gemm_init(void);

/* Queues the grouped GEMM on st's stream: the tensor-core path when the
 * shape allows it, else the plain reference kernel. */
moe_status cuda_gemm_run(const cuda_state *st, const cuda_gemm *g);

/* The largest row block the tile table may pick; align's capacity for the
 * layer's workspace is sized with it. */
#define CUDA_GEMM_MAX_BLOCK_M 128
#define CUDA_GEMM_MIN_BLOCK_M 16

/* The row block the tile table picks for slots spread over experts. */
int32_t cuda_gemm_pick_block_m(const cuda_state *st, int64_t num_slots, int32_t num_local_experts,
                               int64_t n, int64_t k);

/* ---- activation and reduce (elementwise.cu) ----------------------------- */

moe_status cuda_activation(const cuda_state *st, const moe_activation_args *args);
moe_status cuda_topk_reduce(const cuda_state *st, const moe_reduce_args *args);

/* Repacks one expert's w13 (on the device, as given) into rows that
 * interleave gate and up: packed[2i] = gate row i, packed[2i+1] = up row i,
 * each of H elements. */
moe_status cuda_repack_w13(const cuda_state *st, const __nv_bfloat16 *src, __nv_bfloat16 *dst,
                           int64_t hidden, int64_t inter, moe_weight_layout layout);
/* Transposes an [rows][cols] bf16 matrix into [cols][rows]. */
moe_status cuda_transpose(const cuda_state *st, const __nv_bfloat16 *src, __nv_bfloat16 *dst,
                          int64_t rows, int64_t cols);

/* ---- decode without align (decode.cu) ----------------------------------- */

/* One forward of a few tokens after routing: x [T][hidden], the layer's
 * repacked weights (w13 [EL][2I][H] gate/up interleaved, w2 [EL][H][I]),
 * h [T*k][I] scratch, out [T][hidden]. */
struct cuda_decode {
  const __nv_bfloat16 *x;
  const __nv_bfloat16 *w13;
  const __nv_bfloat16 *w2;
  const float *w13_bias; /* [EL][2I] interleaved, or NULL */
  const float *w2_bias;  /* [EL][H], or NULL */
  const int32_t *topk_ids;
  const float *topk_weights;
  const int32_t *expert_map; /* or NULL */
  __nv_bfloat16 *h;
  __nv_bfloat16 *out;
  int64_t num_tokens;
  int32_t top_k, num_experts, num_local;
  int32_t hidden, inter;
  bool weight_on_input; /* the routed weight scales GEMM1's input, else GEMM2's output */
  moe_activation activation;
  float alpha, limit;
};

/* Raises the decode kernels' shared-memory limit on the current device. */
moe_status cuda_decode_init(void);

/* Whether the forward takes the decode path: the shape fits it, and either
 * option cuda.path=decode or the default rule (few tokens) says so; a
 * forced tile (cuda.tile) keeps it off. */
bool cuda_decode_wanted(const cuda_state *st, const cuda_decode *d);

/* Queues decode_up_kernel and decode_down_kernel; out gets the layer's
 * output, the reduce included. */
moe_status cuda_decode_run(const cuda_state *st, const cuda_decode *d);

/* ---- Hopper prefill: wgmma fed by TMA (gemm_wgmma.cu) ------------------ */

/* Rows of one CTA of the wgmma GEMMs; align runs with this block_m on that
 * path (== CUDA_GEMM_MAX_BLOCK_M, so the workspace's align capacity holds),
 * or with CUDA_WGMMA_NARROW_BLOCK_M for the 64-row tiles (the tuning row's
 * wgmma_narrow rule, or option cuda.wgmma_bm=64). */
#define CUDA_WGMMA_BLOCK_M 128
#define CUDA_WGMMA_NARROW_BLOCK_M 64

/* The 128 opaque bytes of a CUtensorMap, as plain words: a struct holding
 * one then needs no 64-byte alignment (the launch passes a copy). */
struct cuda_tma_map {
  uint64_t words[16];
};

/* Whether this build holds sm_90a code for a device of this compute
 * capability (only 9.0 runs sm_90a code). */
bool cuda_wgmma_available(int cc_major, int cc_minor);

/* Raises the shared-memory limit of the wgmma kernels on the current device;
 * false (errors cleared) when the device refuses. */
bool cuda_wgmma_init(void);

/* Encodes a TMA map over a row-major bf16 matrix [rows][cols]: boxes of 64
 * columns (128 bytes, 128-byte swizzle) by box_rows rows, zeros outside.
 * false when the driver has no encoder or refuses the shape (cols must be a
 * multiple of 8, base 16-byte aligned); nothing is reported as an error. */
bool cuda_tma_map_bf16(cuda_tma_map *map, const void *base, int64_t rows, int64_t cols,
                       int box_rows);

/* The column tile (128 or 256; option cuda.wgmma_bn forces one; 128 for
 * 64-row token tiles) for a GEMM of at most rows_bound sorted rows and n
 * columns. B maps are encoded with this many rows per box. */
int cuda_wgmma_pick_bn(const cuda_state *st, int block_m, int64_t rows_bound, int64_t n);

/* xs[p] = x[sorted_token_ids[p] / top_k] for p < *ntpp (at most
 * rows_bound), zeros for padding rows. hidden % 8 == 0, 16-byte aligned. */
moe_status cuda_wgmma_permute(const cuda_state *st, const __nv_bfloat16 *x, __nv_bfloat16 *xs,
                              int64_t hidden, const int32_t *sorted_token_ids, const int32_t *ntpp,
                              int64_t num_slots, int32_t top_k, int64_t rows_bound);

/* The kernel parameters both Hopper GEMMs (gemm_wgmma.cu, gemm_stream.cu)
 * read; each kernel's own parameters derive from it (passed by value:
 * trivially copyable). */
struct hopper_gemm_params {
  const int32_t *sorted_token_ids;
  const int32_t *expert_ids; /* one per align block */
  const int32_t *num_tokens_post_padded;
  const float *topk_weights;
  const float *bias; /* [EL][n] or NULL */
  __nv_bfloat16 *c;
  int64_t ldc;
  int64_t num_slots;
  int32_t num_local_experts;
  int32_t n; /* weight rows per expert = output columns */
  int32_t k;
  moe_gemm_routed_weight routed_weight;
  float alpha, limit; /* of the activation */
};

/* One grouped GEMM of the wgmma path: A rows in sorted order (a_map, box
 * 64 x 128), B = [EL][n][k] (b_map, box 64 x bn). GLU writes
 * c[p][col / 2] for every sorted row p of a local block (zeros for padding
 * rows); STORE writes c[slot][col] for real rows only. The kernels get its
 * hopper_gemm_params part as it is; the fields below choose the launch. */
struct cuda_wgmma_gemm : hopper_gemm_params {
  const cuda_tma_map *a_map;
  const cuda_tma_map *b_map;
  int bn;
  int64_t rows_bound; /* >= *num_tokens_post_padded */
  int32_t block_m;    /* align's: CUDA_WGMMA_BLOCK_M, or CUDA_WGMMA_NARROW_BLOCK_M with bn 128 */
  cuda_epilogue epilogue;
  moe_activation activation;
  /* Streaming GEMM only: launched to overlap the kernel before it (which
   * must be the permute or a streaming GEMM: see cuda_stream_gemm_run) */
  bool overlapped;
  /* wgmma GEMM1 only: A rows gathered from x (row sorted[p] / gather_top_k,
   * 16-byte aligned) instead of a_map's permuted rows; NULL: a_map. */
  const __nv_bfloat16 *gather_x;
  int32_t gather_top_k;
};

moe_status cuda_wgmma_gemm_run(const cuda_state *st, const cuda_wgmma_gemm *g);

/* ---- Hopper weight streaming: operands swapped (gemm_stream.cu) -------- */

/* Weight rows (output features) per work item of the streaming GEMM; the
 * weight maps it reads have boxes of this many rows. */
#define CUDA_STREAM_FEATURES 128

/* Raises the shared-memory limit of the streaming kernels; false (errors
 * cleared) when the device refuses. */
bool cuda_stream_init(void);

/* 0, 1, 2, 3 for token blocks of 16, 32, 64, 128 rows (the NT the
 * kernels are built for); -1 otherwise. */
#define CUDA_STREAM_BLOCKS 4
int cuda_stream_rows_index(int rows);

/* How many ranges of K the streaming GEMM splits `items` work items of
 * k_steps steps into on `sms` SMs (1 = no split). */
int cuda_stream_splits(int64_t items, int k_steps, int sms);

/* Bytes of split partial sums and counters the split workspace holds:
 * enough for items up to four rounds of the grid, four splits each, at
 * the widest token block. */
#define CUDA_STREAM_SPLIT_BYTES ((size_t)16 << 20)
#define CUDA_STREAM_SPLIT_COUNTERS 4096
/* The counters array holds CUDA_STREAM_SPLIT_COUNTERS for split K, then
 * two per streaming GEMM of a forward for the dynamic schedule. */
#define CUDA_STREAM_COUNTERS (CUDA_STREAM_SPLIT_COUNTERS + 4)

/* One grouped GEMM of the streaming path, described as for the wgmma path:
 * a_map over the sorted token rows with boxes of block_m (= NT) rows, b_map
 * over the weights [EL][n][k] with boxes of CUDA_STREAM_FEATURES rows;
 * align ran with block_m. bn is unused. */
moe_status cuda_stream_gemm_run(const cuda_state *st, const cuda_wgmma_gemm *g);

#endif /* MOE_CUDA_INTERNAL_CUH */
