/*
 * moe.h - public API of the portable BF16 Mixture-of-Experts library.
 *
 * The library computes the MoE feed-forward block of an LLM (Mixtral,
 * Qwen3-MoE, DeepSeek-V2/V3, ERNIE-4.5, gpt-oss) in BF16 with fp32
 * accumulation, on CUDA GPUs, on any OpenCL device and on CPUs (OpenMP),
 * behind one API. This header includes no vendor header; interop with CUDA
 * streams and OpenCL queues lives in moe_cuda.h and moe_opencl.h.
 *
 * Conventions
 *   - Every call that can fail returns moe_status: 0 on success, a negative
 *     code on error. Results are written through pointer arguments.
 *   - Every call validates all of its arguments before it touches any
 *     output; on error the outputs are left untouched and nothing leaks.
 *   - moe_last_error(ctx) returns a message that says exactly what was wrong
 *     with the last failing call on that context (moe_last_error(NULL): the
 *     last failing call of this thread that had no context to report to).
 *   - Whoever creates an object destroys it. Memory wrapped from the caller
 *     (moe_cuda.h, moe_opencl.h) is never freed by the library.
 *   - Tensors are dense and row-major. bf16 is stored as uint16_t holding
 *     the upper half of an IEEE binary32.
 *   - Thread safety: a context, its buffers and its layers may be used by
 *     several threads at once. Every call that queues work on a context
 *     (moe_layer_forward, moe_layer_reserve and the stage functions) holds
 *     the context's lock while it validates (the layer calls) and queues
 *     or, on the CPU, computes, so such calls on one context run one after
 *     another: a shared layer is safe when each call has its own x, logits
 *     and out, and gives the same bits as one thread would. For parallel
 *     CPU forwards use one context (and layer) per thread. Creating and
 *     destroying objects must not race with calls that use them, and two
 *     calls writing one buffer leave one of the results. moe_last_error(ctx)
 *     belongs to the last failing call on ctx, from whichever thread.
 *   - Numerics (every backend, the same rounding points): bf16 storage of
 *     x, the weights, h (the activation's output), y (each expert's
 *     output, before the reduce) and out; fp32 for logits, routing,
 *     weights of the picks, every accumulation, the biases, the router
 *     weight, gate and up (never rounded inside the layer: the activation
 *     reads the fp32 GEMM1 result), and the reduce's sum. The activation
 *     formulas are one shared header (backends/common/activation_logic.h)
 *     on CPU, CUDA and OpenCL; their exp is the device's own on CUDA and
 *     OpenCL, and on the CPU a branch-free polynomial within 1 ulp of expf
 *     (so that the epilogue vectorizes). A NaN in gives NaN out: the clamps of
 *     SWIGLU_CLAMP keep NaN (no fminf), the router ranks NaN last, and
 *     bf16 rounding keeps NaN a NaN. (Known exception, CUDA only: the
 *     decode path of backends/cuda/decode.cu fuses the reduce into GEMM2
 *     and sums y in fp32 without rounding it to bf16 first.)
 *
 * The computation, for T tokens (see README.md and DESIGN notes):
 *   1. route:      per token, softmax or sigmoid scores of logits[T][E];
 *                  pick top_k experts -> topk_ids[T][k], topk_weights[T][k]
 *   2. align:      sort the T*k slots (s = t*k + j) by expert, pad each
 *                  expert's run to block_m rows -> sorted_token_ids, ...
 *   3. GEMM1:      gu[s] = x[t] @ w13[e]^T       ([2I] per slot)
 *   4. activation: h[s] = act(gate) * up         ([I] per slot, bf16)
 *   5. GEMM2:      y[s] = h[s] @ w2[e]^T         ([H] per slot)
 *   6. reduce:     out[t] = sum_j w[t][j] * y[t*k + j]
 */
#ifndef MOE_H
#define MOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(MOE_SHARED_BUILD)
#define MOE_API __declspec(dllexport)
#elif defined(__GNUC__)
#define MOE_API __attribute__((visibility("default")))
#else
#define MOE_API
#endif

#define MOE_VERSION_MAJOR 0
#define MOE_VERSION_MINOR 1
#define MOE_VERSION_PATCH 0

/* Supported maxima. Larger values are rejected with MOE_ERROR_UNSUPPORTED. */
#define MOE_MAX_EXPERTS 1024 /* E, router width */
#define MOE_MAX_TOP_K 32     /* top_k */
#define MOE_MAX_GROUPS 64    /* num_groups for grouped top-k */
#define MOE_MAX_BLOCK_M 256  /* align row block; a power of two */

/* ------------------------------------------------------------------------ */
/* Status codes                                                             */
/* ------------------------------------------------------------------------ */

typedef enum moe_status {
  MOE_SUCCESS = 0,
  MOE_ERROR_INVALID_ARGUMENT = -1,    /* bad size, enum value or combination */
  MOE_ERROR_NULL_POINTER = -2,        /* a required handle or pointer is NULL */
  MOE_ERROR_UNSUPPORTED = -3,         /* valid, but beyond what is supported */
  MOE_ERROR_BUFFER_TOO_SMALL = -4,    /* a buffer is smaller than the shapes need */
  MOE_ERROR_CONTEXT_MISMATCH = -5,    /* a buffer or layer of another context */
  MOE_ERROR_NOT_RESERVED = -6,        /* forward with more tokens than reserved */
  MOE_ERROR_OUT_OF_MEMORY = -7,       /* host or device allocation failed */
  MOE_ERROR_BACKEND_UNAVAILABLE = -8, /* backend not compiled in, or no device */
  MOE_ERROR_DEVICE = -9,              /* CUDA/OpenCL failure; see moe_last_error */
  MOE_ERROR_INTERNAL = -10,           /* a bug in the library; please report */
  MOE_ERROR_TUNING_MISMATCH = -11,    /* a tuning table of another backend, device,
                                         library version or layer shape */
} moe_status;

/* A static, never-NULL name for a status code ("MOE_ERROR_NULL_POINTER"). */
MOE_API const char *moe_status_string(moe_status status);

/* ------------------------------------------------------------------------ */
/* Contexts                                                                 */
/* ------------------------------------------------------------------------ */

typedef enum moe_backend {
  MOE_BACKEND_AUTO = 0, /* $MOE_BACKEND if set, else CUDA, OpenCL GPU, CPU */
  MOE_BACKEND_CPU = 1,
  MOE_BACKEND_CUDA = 2,
  MOE_BACKEND_OPENCL = 3,
} moe_backend;

typedef struct moe_context moe_context;

/*
 * Creates a context on one device of a backend.
 *   backend: MOE_BACKEND_AUTO picks, in order, the backend named by the
 *            environment variable MOE_BACKEND (cpu|cuda|opencl), else CUDA if
 *            a CUDA device is present, else an OpenCL GPU, else the CPU.
 *   device:  device index within the backend (0 = default; ignored by the
 *            CPU backend). OpenCL also honours MOE_OPENCL_PLATFORM and
 *            MOE_OPENCL_DEVICE when device is 0.
 *   ctx:     receives the context; the caller destroys it.
 * Kernel choices are options of the context (moe_context_set_option), never
 * environment variables; the only variables read are the deployment ones
 * named here, once, by this call.
 * Errors: NULL_POINTER, INVALID_ARGUMENT (bad enum, device < 0),
 *         BACKEND_UNAVAILABLE (not compiled in, or no such device),
 *         OUT_OF_MEMORY, DEVICE.
 */
MOE_API moe_status moe_context_create(moe_backend backend, int device, moe_context **ctx);

/* Destroys a context. Buffers and layers must be destroyed first. NULL is a
 * no-op. */
MOE_API void moe_context_destroy(moe_context *ctx);

/* The backend a context runs on (never AUTO); MOE_BACKEND_AUTO for NULL. */
MOE_API moe_backend moe_context_backend(const moe_context *ctx);

/* A static name of a backend: "auto", "cpu", "cuda", "opencl". */
MOE_API const char *moe_backend_name(moe_backend backend);

/* The device's name, e.g. "NVIDIA H100 80GB HBM3" or the CPU model plus the
 * kernel path ("... [avx512]"). Owned by the context. "" for NULL. */
MOE_API const char *moe_context_device_name(const moe_context *ctx);

/* Waits until all work queued on the context has finished.
 * Errors: NULL_POINTER, DEVICE. */
MOE_API moe_status moe_context_synchronize(moe_context *ctx);

/*
 * Options: named switches of the kernels a context runs, for A/B runs,
 * sweeps and tests; the defaults are what the library measured fastest.
 * Each is stored in the context's backend and read by every later call on
 * the context (existing layers included); none is read from the
 * environment. Names and values (the first value listed is the default):
 *
 *   cpu.kernels             auto|portable|avx512|avx512bf16|amx
 *                           the CPU kernel path (auto: AMX where usable,
 *                           else AVX-512F on Intel, else AVX-512 BF16 where
 *                           present, else portable C)
 *   opencl.route            auto|serial|parallel   routing kernel (auto: a
 *                           work-group per token on GPUs for ungrouped
 *                           routing, else one work-item per token)
 *   opencl.skinny           auto|64x4x1u2|64x4x4|64x4x4u2|64x8x4|128x4x8
 *                           forces a skinny GEMM variant (also on CPU
 *                           devices, which otherwise run the row kernel)
 *   opencl.skinny_max_rows  integer >= 0, default 64: rows per expert up
 *                           to which GPUs take the skinny GEMM
 *   cuda.path               auto|decode|stream|wgmma|mma   forces a forward
 *                           path where it can run (decode: the shape fits
 *                           decode.cu; stream, wgmma: sm_90a code, TMA-able
 *                           shapes, 16-byte aligned x); elsewhere auto's
 *                           choice; mma: always the mma.sync tiles
 *   cuda.tile               auto|gemv|16x32|16x64|16x64k64|16x128|16x32k256|
 *                           32x64|32x128|64x128|128x128|128x128k64|128x256
 *                           forces a tile of the mma.sync path (gemv: the
 *                           CUDA-core kernel); a forced tile keeps decode off
 *   cuda.gemv_max_rows      integer >= 0, default 1: rows per expert up to
 *                           which the mma path streams weights on the CUDA
 *                           cores (0: never)
 *   cuda.routing            auto|warp|reference|rank   routing kernel (auto:
 *                           by ranks, on one block for a few tokens, on many
 *                           up to the tuning row's token count, else a warp
 *                           per token; reference: one thread per token;
 *                           rank: by ranks on many blocks, any token count)
 *   cuda.decode_pdl         on|off   overlapped launches of the decode
 *                           kernels (Hopper)
 *   cuda.decode_persistent  on|off   one-wave grids for the decode kernels
 *                           (off: grids as large as the work)
 *   cuda.wgmma_bn           auto|128|256   column tile of the wgmma path
 *   cuda.pdl                off|on   programmatic dependent launch of the
 *                           other kernels (Hopper)
 *   cuda.stream_overlap     on|off   the streaming GEMMs start while the
 *                           kernel before them ends and request their first
 *                           weights before waiting for it (Hopper)
 *   cuda.stream_ctas        2|1   resident CTAs per SM of the streaming
 *                           GEMM at token block 16 (each with 1/n of the
 *                           ring)
 *   cuda.stream_max_rows    auto|integer >= 0   rows per expert up to which
 *                           Hopper streams the weights (above: the mma.sync
 *                           tiles until cuda.wgmma_min_rows); auto: the
 *                           device class's tuning row (moe_layer_describe
 *                           names it)
 *   cuda.stream_block       auto|16|32|64|128   token block of the streaming
 *                           GEMM (auto: the tuning row's, by rows per
 *                           expert)
 *   cuda.stream_schedule    static|dynamic   the streaming GEMM's CTAs take
 *                           work items round robin, or claim them from a
 *                           counter as they finish (same bits)
 *   cuda.stream_group       auto|integer >= 1   the streaming GEMM's items
 *                           in groups of this many token blocks, all
 *                           feature tiles of a group first (auto: the
 *                           device class's tuning row, 8 on Hopper)
 *   cuda.stream_k           auto|128|256   elements of K per stage of the
 *                           streaming GEMM at token block 16 (256: three
 *                           72 KB stages, one CTA per SM; auto: 128)
 *   cuda.wgmma_bm           auto|128|64   token rows of the wgmma tiles (64:
 *                           BN 128, half the padding where experts hold
 *                           32-64 rows; auto: the tuning row's rule)
 *   cuda.wgmma_gather       auto|off|on   GEMM1 of the wgmma path gathers
 *                           x's rows itself (no permute kernel; same bits;
 *                           auto: up to the tuning row's rows per expert)
 *   cuda.wgmma_min_rows     auto|integer >= 1   rows per expert from which
 *                           Hopper runs the 128-row wgmma tiles
 *
 * An option of another backend is checked and has no effect, so one list
 * serves every backend. A layer with moe_config.batch_invariant set runs
 * its one fixed plan whatever the kernel options say.
 * Errors: NULL_POINTER, INVALID_ARGUMENT (an unknown name, or a value not
 *         in the option's list or range), UNSUPPORTED (a valid value this
 *         device or build cannot run, e.g. cpu.kernels=amx without AMX;
 *         nothing changes).
 */
MOE_API moe_status moe_context_set_option(moe_context *ctx, const char *name, const char *value);

/* Writes the value of an option as last set on ctx (the default if never
 * set), NUL-terminated, into value (size bytes).
 * Errors: NULL_POINTER, INVALID_ARGUMENT (unknown name), BUFFER_TOO_SMALL. */
MOE_API moe_status moe_context_get_option(moe_context *ctx, const char *name, char *value,
                                          size_t size);

/* The message of the last failing call on ctx, or of this thread when ctx
 * is NULL. Owned by the library; valid until the next failing call. */
MOE_API const char *moe_last_error(const moe_context *ctx);

/* ------------------------------------------------------------------------ */
/* Buffers: memory owned by a context (device memory on GPU backends)       */
/* ------------------------------------------------------------------------ */

typedef struct moe_buffer moe_buffer;

/* Allocates bytes (> 0) of memory on the context's device. The contents are
 * undefined. Errors: NULL_POINTER, INVALID_ARGUMENT (bytes == 0),
 * OUT_OF_MEMORY, DEVICE. */
MOE_API moe_status moe_buffer_create(moe_context *ctx, size_t bytes, moe_buffer **buffer);

/* Frees a buffer created by moe_buffer_create; for a wrapped buffer only
 * the handle is freed, never the caller's memory. NULL is a no-op. */
MOE_API void moe_buffer_destroy(moe_buffer *buffer);

/* Wraps `bytes` of host memory at host_ptr as a buffer of a CPU context
 * (for callers that own their tensors, e.g. the Python package: no copy).
 * moe_buffer_destroy frees only the handle. The memory must stay valid
 * while the buffer is used.
 * Errors: NULL_POINTER, INVALID_ARGUMENT (bytes == 0, ctx not CPU). */
MOE_API moe_status moe_buffer_wrap_host(moe_context *ctx, void *host_ptr, size_t bytes,
                                        moe_buffer **buffer);

/* Size in bytes; 0 for NULL. */
MOE_API size_t moe_buffer_size(const moe_buffer *buffer);

/* Copies bytes from host memory src into the buffer at offset, and returns
 * when the copy is complete (it is ordered after earlier work on the
 * context). Errors: NULL_POINTER, BUFFER_TOO_SMALL (offset + bytes beyond
 * the buffer), DEVICE. */
MOE_API moe_status moe_buffer_write(moe_buffer *buffer, size_t offset, const void *src,
                                    size_t bytes);

/* Copies bytes at offset into host memory dst; waits for earlier work on
 * the context. Errors: as moe_buffer_write. */
MOE_API moe_status moe_buffer_read(const moe_buffer *buffer, size_t offset, void *dst,
                                   size_t bytes);

/* ------------------------------------------------------------------------ */
/* Layer configuration                                                      */
/* ------------------------------------------------------------------------ */

typedef enum moe_scoring {
  MOE_SCORING_SOFTMAX = 0, /* Mixtral, Qwen3-MoE, DeepSeek-V2, ERNIE */
  MOE_SCORING_SIGMOID = 1, /* DeepSeek-V3 */
} moe_scoring;

typedef enum moe_group_scoring {
  MOE_GROUP_SCORING_MAX = 0,      /* DeepSeek-V2: a group scores its best expert */
  MOE_GROUP_SCORING_TOP2_SUM = 1, /* DeepSeek-V3: the sum of its best two */
} moe_group_scoring;

typedef enum moe_activation {
  MOE_ACTIVATION_SWIGLU = 0,       /* h = silu(gate) * up */
  MOE_ACTIVATION_GEGLU = 1,        /* h = gelu_tanh(gate) * up */
  MOE_ACTIVATION_SWIGLU_CLAMP = 2, /* gpt-oss: g = min(gate, limit),
                                      u = clamp(up, -limit, limit),
                                      h = g * sigmoid(alpha * g) * (u + 1) */
} moe_activation;

typedef enum moe_weight_layout {
  /* w13[E][2I][H] and w2[E][H][I]: the [out][in] layout of PyTorch/vLLM. */
  MOE_WEIGHT_LAYOUT_OUT_IN = 0,
  /* w13[E][H][2I] and w2[E][I][H]: the [in][out] layout of PaddlePaddle. */
  MOE_WEIGHT_LAYOUT_IN_OUT = 1,
} moe_weight_layout;

typedef enum moe_router_weight {
  MOE_ROUTER_WEIGHT_ON_OUTPUT = 0, /* out[t] = sum_j w_j * expert_j(x[t]) */
  MOE_ROUTER_WEIGHT_ON_INPUT = 1,  /* out[t] = sum_j expert_j(w_j * x[t]) (Llama-4) */
} moe_router_weight;

typedef struct moe_config {
  int64_t hidden_size;       /* H > 0 */
  int64_t intermediate_size; /* I > 0, per expert; w13 holds 2I rows */
  int32_t num_experts;       /* E in [1, MOE_MAX_EXPERTS]: router width */
  int32_t num_local_experts; /* experts whose weights this layer holds; 0 means
                                num_experts. With an expert map, ids map into
                                [0, num_local_experts). */
  int32_t top_k;             /* in [1, min(E, MOE_MAX_TOP_K)] */
  moe_scoring scoring;       /* default SOFTMAX */
  int32_t renormalize;       /* nonzero: the k weights are scaled to sum 1 */
  int32_t num_groups;        /* grouped top-k: 0 or 1 = off; else divides E */
  int32_t topk_groups;       /* groups kept, in [1, num_groups] when grouped */
  moe_group_scoring group_scoring;
  float routed_scaling_factor; /* multiplies the final weights; default 1 */
  moe_activation activation;   /* default SWIGLU */
  float swiglu_alpha;          /* SWIGLU_CLAMP only; default 1.702 */
  float swiglu_limit;          /* SWIGLU_CLAMP only; default 7.0 */
  moe_weight_layout weight_layout;
  moe_router_weight router_weight;
  int32_t batch_invariant; /* nonzero: a token's output does not depend on
                              the other tokens of its batch (nor on T):
                              every forward runs one kernel configuration
                              with a fixed reduction order. Costs speed at
                              the sizes the fixed plan does not suit (see
                              README, "Batch invariance"). Default 0. */
} moe_config;

/* Fills cfg with defaults: softmax, no renormalize, no groups, scaling 1,
 * SwiGLU (alpha 1.702, limit 7), OUT_IN layout, weight on output, not
 * batch invariant, and zero
 * sizes that the caller must set. No-op for NULL. */
MOE_API void moe_config_init(moe_config *cfg);

/* Checks a configuration without creating anything. Errors: NULL_POINTER,
 * INVALID_ARGUMENT (a size <= 0, top_k > E, bad enum value, grouping that
 * does not divide E or cannot hold top_k, SWIGLU_CLAMP with a non-finite
 * alpha or a limit not > 0, a non-finite routed_scaling_factor),
 * UNSUPPORTED (H or I > 2^30, E or EL > MOE_MAX_EXPERTS, top_k >
 * MOE_MAX_TOP_K, num_groups > MOE_MAX_GROUPS); the message is in
 * moe_last_error(NULL). The stage functions and moe_layer_create return
 * the same code for the same condition. */
MOE_API moe_status moe_config_validate(const moe_config *cfg);

/* Host-side weights, read only during moe_layer_create (the library keeps
 * its own repacked copy). Shapes follow cfg.weight_layout, with
 * EL = num_local_experts. Optional pointers may be NULL. */
typedef struct moe_weights {
  const uint16_t *w13;          /* bf16 [EL][2I][H] or [EL][H][2I] */
  const uint16_t *w2;           /* bf16 [EL][H][I] or [EL][I][H] */
  const float *w13_bias;        /* optional fp32 [EL][2I] */
  const float *w2_bias;         /* optional fp32 [EL][H] */
  const float *correction_bias; /* optional fp32 [E], for selection only */
  const int32_t *expert_map;    /* optional int32 [E]: router id -> local
                                   id, or -1 when not local; entries out of
                                   [-1, EL) are rejected */
} moe_weights;

/* ------------------------------------------------------------------------ */
/* Layers                                                                   */
/* ------------------------------------------------------------------------ */

typedef struct moe_layer moe_layer;

/*
 * Validates cfg and weights, repacks the weights into the backend's
 * preferred layout and uploads them.
 * Errors: NULL_POINTER (ctx, cfg, weights, w13, w2, layer), INVALID_ARGUMENT,
 *         UNSUPPORTED, OUT_OF_MEMORY, DEVICE.
 */
MOE_API moe_status moe_layer_create(moe_context *ctx, const moe_config *cfg,
                                    const moe_weights *weights, moe_layer **layer);

/* Destroys a layer and its workspace. NULL is a no-op. */
MOE_API void moe_layer_destroy(moe_layer *layer);

/*
 * Sizes the workspace for up to max_tokens tokens per forward. After it,
 * moe_layer_forward with T <= max_tokens allocates nothing and, on GPU
 * backends, never waits for the host (it can be captured in a CUDA graph).
 * Reserving less than before keeps the larger workspace. On failure the
 * previous reservation stays usable.
 * Errors: NULL_POINTER, INVALID_ARGUMENT (max_tokens <= 0), UNSUPPORTED
 *         (max_tokens * top_k beyond int32 slot indices), OUT_OF_MEMORY, DEVICE.
 */
MOE_API moe_status moe_layer_reserve(moe_layer *layer, int64_t max_tokens);

/*
 * out[T][H] (bf16) = MoE(x[T][H] (bf16), logits[T][E] (fp32)). Queued on the
 * context's stream/queue; asynchronous on GPU backends. T = 0 is a no-op.
 * Errors: NULL_POINTER, INVALID_ARGUMENT (T < 0), NOT_RESERVED (T above the
 *         reservation), BUFFER_TOO_SMALL, CONTEXT_MISMATCH, UNSUPPORTED (a
 *         launch beyond the device's grid limits), DEVICE.
 * Thread safety: see the conventions at the top; calls on one context run
 * one after another, so N threads may share a layer with their own x,
 * logits and out.
 */
MOE_API moe_status moe_layer_forward(moe_layer *layer, int64_t num_tokens, const moe_buffer *x,
                                     const moe_buffer *logits, moe_buffer *out);

/*
 * Writes a one-line, human-readable description of what
 * moe_layer_forward(layer, num_tokens, ...) would run now, on the backend
 * and with the options of the layer's context: the backend and device, the
 * path and kernels, align's row block, capacities and splits where the
 * backend knows them (the GEMM kernels and, on CUDA, the plan's own
 * decision; x is assumed 16-byte aligned). Reserve first: a CUDA layer
 * chooses its Hopper paths only once it has a workspace. For logs and
 * A/B runs; the format may change between versions.
 * Errors: NULL_POINTER (layer, text), INVALID_ARGUMENT (num_tokens < 1),
 *         UNSUPPORTED (num_tokens * top_k beyond int32), BUFFER_TOO_SMALL
 *         (size below the description's length + 1; text untouched).
 */
MOE_API moe_status moe_layer_describe(moe_layer *layer, int64_t num_tokens, char *text,
                                      size_t size);

/*
 * Routing out: moe_layer_forward that also writes the picks it routed by,
 * topk_ids[T][k] (int32, router ids in [0, E), rank order) and
 * topk_weights[T][k] (fp32, the final weights: renormalized and scaled),
 * for replay with moe_layer_forward_routed, which then gives the same bits.
 * Errors: those of moe_layer_forward, and NULL_POINTER, BUFFER_TOO_SMALL
 *         and CONTEXT_MISMATCH for topk_ids and topk_weights.
 */
MOE_API moe_status moe_layer_forward_capture(moe_layer *layer, int64_t num_tokens,
                                             const moe_buffer *x, const moe_buffer *logits,
                                             moe_buffer *out, moe_buffer *topk_ids,
                                             moe_buffer *topk_weights);

/*
 * Routing in: out[T][H] = sum_j w[t][j] * expert_{id[t][j]}(x[t]) (or the
 * weight on the input, per cfg.router_weight) with the caller's picks
 * topk_ids[T][k] (int32 router ids) and topk_weights[T][k] (fp32, used as
 * given: no renormalize, no routed_scaling_factor, no correction bias).
 * An id of -1 means "no expert": the slot contributes nothing (as an
 * expert map's -1 does); ids go through the layer's expert map like routed
 * ones. Ids outside [-1, E) are rejected with INVALID_ARGUMENT where the
 * library can read them without waiting for the device: on the CPU backend
 * (host memory), before any output is touched. On GPU backends (CUDA,
 * OpenCL) the ids are not read on the host (that would need a wait, which
 * a reserved forward never does): there an id outside [0, E) contributes
 * nothing, like -1, and never reads or writes outside the buffers.
 * Errors: those of moe_layer_forward (topk_ids and topk_weights in place
 *         of logits), and INVALID_ARGUMENT (an id outside [-1, E), CPU).
 */
MOE_API moe_status moe_layer_forward_routed(moe_layer *layer, int64_t num_tokens,
                                            const moe_buffer *x, const moe_buffer *topk_ids,
                                            const moe_buffer *topk_weights, moe_buffer *out);

/*
 * Chunked batches. With enabled nonzero, the three forwards of a layer
 * accept T above the reservation and run it, inside the same call, in
 * chunks of the reserved size, one after another on the same workspace
 * (still no allocation and no host wait; every token's bits are those of
 * a forward of its chunk). Off (the default), such a T is NOT_RESERVED.
 * A layer without a reservation stays NOT_RESERVED either way.
 * Errors: NULL_POINTER.
 */
MOE_API moe_status moe_layer_set_chunking(moe_layer *layer, int enabled);

/* ------------------------------------------------------------------------ */
/* Tuning: per-layer option tables, measured on the device                  */
/* ------------------------------------------------------------------------ */

#define MOE_TUNING_MAX_POINTS 64     /* token counts of one table */
#define MOE_TUNING_MAX_CANDIDATES 64 /* candidates of one moe_layer_tune call */

/*
 * A layer may carry a tuning table: ascending token counts T_0 < T_1 < ...,
 * each with a set of context options ("name=value[,name=value...]", at most
 * 4 pairs, names and values of moe_context_set_option). A forward, capture,
 * routed forward or describe of T tokens runs with the options of the last
 * point <= T (the first point's below T_0), set under the context's lock
 * through moe_context_set_option's path and put back afterwards; nothing is
 * allocated and nothing waits for the host. Options the caller set stay in
 * force for every option the entry does not name.
 *
 * moe_layer_tune measures: for each token_counts[i] (ascending, >= 1), each
 * candidate option set is timed with real forwards of the layer on random
 * inputs (warm-up, then the median of several, moe_context_synchronize
 * around each), and the fastest becomes the point's entry; candidates the
 * device refuses (UNSUPPORTED) are skipped. times_ms, if not NULL, receives
 * [n][n_candidates] medians in milliseconds (NaN where skipped). The new
 * table replaces the layer's. It is a load-time call: it reserves the layer
 * for the largest count, allocates buffers and synchronizes. When the
 * deployment variable MOE_TUNING_DIR names a directory (read once, when
 * the layer's context was created), the table is also written there as
 * a cache file named by its key (moe_layer_save_tuning's format; a failed
 * write is ignored), and moe_layer_reserve loads the layer's cache file
 * from there, once per layer, when the layer has no table.
 * Errors: NULL_POINTER (layer, token_counts, candidates or an entry),
 *         INVALID_ARGUMENT (n not in [1, MOE_TUNING_MAX_POINTS], n_candidates
 *         not in [1, MOE_TUNING_MAX_CANDIDATES], counts not ascending or < 1,
 *         a malformed candidate or unknown option), UNSUPPORTED (every
 *         candidate refused at some count), and moe_layer_reserve's and the
 *         forward's errors.
 */
MOE_API moe_status moe_layer_tune(moe_layer *layer, const int64_t *token_counts, int n,
                                  const char *const *candidates, int n_candidates,
                                  double *times_ms);

/*
 * Writes the layer's table to path as text:
 *   moe-tuning 1
 *   backend cpu
 *   device <device name, without a bracketed " [kernel path]">
 *   version 0.1.0
 *   shape H=4096 I=14336 E=8 EL=8 k=2 activation=swiglu layout=out_in
 *         router_weight=output batch_invariant=0      (one line)
 *   point 1 cpu.kernels=avx512bf16
 *   point 64 cpu.kernels=amx
 * Lines starting with '#' are comments. The five header lines are the key.
 * Errors: NULL_POINTER, INVALID_ARGUMENT (the layer has no table, or the
 *         file cannot be written).
 */
MOE_API moe_status moe_layer_save_tuning(moe_layer *layer, const char *path);

/* Reads a table written by moe_layer_save_tuning and makes it the layer's.
 * Errors: NULL_POINTER, INVALID_ARGUMENT (unreadable or malformed file),
 *         TUNING_MISMATCH (its key names another backend, device, version or
 *         shape; moe_last_error says which line), UNSUPPORTED (an entry this
 *         device refuses). On error the layer keeps its table. */
MOE_API moe_status moe_layer_load_tuning(moe_layer *layer, const char *path);

/* The number of points of the layer's table (0: none, or layer NULL). */
MOE_API int moe_layer_tuning_count(moe_layer *layer);

/* Point index of the table: its token count and options text.
 * Errors: NULL_POINTER, INVALID_ARGUMENT (index out of range),
 *         BUFFER_TOO_SMALL. */
MOE_API moe_status moe_layer_tuning_entry(moe_layer *layer, int index, int64_t *min_tokens,
                                          char *options, size_t size);

/* Drops the layer's table. NULL is a no-op. */
MOE_API void moe_layer_clear_tuning(moe_layer *layer);

/* ------------------------------------------------------------------------ */
/* Stages, for engines that compose their own pipeline                      */
/* ------------------------------------------------------------------------ */

/*
 * Routing. Reads logits[T][E] fp32 and, when correction_bias is not NULL,
 * correction_bias[E] fp32; writes topk_ids[T][k] int32 and
 * topk_weights[T][k] fp32, in rank order. Uses cfg's num_experts, top_k,
 * scoring, renormalize, num_groups, topk_groups, group_scoring and
 * routed_scaling_factor; sizes H and I are ignored here.
 *
 * Ranking: experts are ranked by a selection key, higher first, ties to the
 * lower expert index, NaN below every number. The key is the logit itself
 * when there is no correction bias and groups (if any) score by MAX (the
 * same order as the score, without rounding ties); otherwise it is
 * score + bias. A NaN logit has key NaN and score 0. Softmax treats NaN as
 * -inf; experts with +inf logits share the mass. A row with no logit above
 * -inf (all NaN or -inf) gets all scores 0: it routes by the same ranking
 * (without a correction bias and with all logits NaN, or all -inf, that is
 * experts 0..k-1) with weight 0 for every pick. In moe_layer_forward that
 * row's output is then: with the router weight on the output (the
 * default), sum_j 0 * y_j = 0 (+-0; NaN only if an expert's output is
 * inf or NaN); with the router weight on the input, the experts see a zero
 * input, so it is sum_j expert_j(0) = sum_j (w2_j act(b13_j) + b2_j) over
 * the k picks: 0 without biases, the biases' response with them. The weights are the scores of
 * the chosen experts (without bias), renormalized when asked (a zero sum is
 * left as is), times routed_scaling_factor.
 * Errors: NULL_POINTER, INVALID_ARGUMENT (T < 0 and the routing conditions
 *         of moe_config_validate), UNSUPPORTED (T*k beyond int32, sizes
 *         beyond size_t, and the routing conditions of
 *         moe_config_validate), BUFFER_TOO_SMALL, CONTEXT_MISMATCH, DEVICE.
 */
MOE_API moe_status moe_route(moe_context *ctx, const moe_config *cfg, int64_t num_tokens,
                             const moe_buffer *logits, const moe_buffer *correction_bias,
                             moe_buffer *topk_ids, moe_buffer *topk_weights);

/* Sizes of align's outputs, in int32 elements:
 *   sorted_token_ids: T*k + EL*(block_m - 1)
 *   expert_ids:       sorted capacity / block_m (rounded up)
 * Errors: NULL_POINTER, INVALID_ARGUMENT (T < 0, top_k or EL <= 0,
 * block_m not a power of two in [1, MOE_MAX_BLOCK_M]), UNSUPPORTED (top_k >
 * MOE_MAX_TOP_K, EL > MOE_MAX_EXPERTS, T*k or the capacity beyond int32). */
MOE_API moe_status moe_align_capacity(int64_t num_tokens, int32_t top_k, int32_t num_local_experts,
                                      int32_t block_m, int64_t *sorted_capacity,
                                      int64_t *block_capacity);

/*
 * Align. Sorts the T*k slots (slot s = t*k + j, expert topk_ids[s]) by local
 * expert, where the local expert is expert_map[id] when expert_map (int32
 * [num_experts]) is given, else the id itself. Slots whose local expert is
 * -1 or outside [0, num_local_experts) are skipped. Writes:
 *   sorted_token_ids: expert e's run starts at P_e = sum_{e'<e} ceil(c_e'/BM)*BM
 *                     and lists its slots in ascending order; padding up to
 *                     the capacity holds the sentinel T*k;
 *   expert_ids:       the local expert owning each BM-row block, -1 for
 *                     blocks past num_tokens_post_padded;
 *   num_tokens_post_padded: one int32, P_E.
 * block_m is a power of two in [1, MOE_MAX_BLOCK_M].
 * Errors: NULL_POINTER, INVALID_ARGUMENT (those of moe_align_capacity,
 *         E <= 0, EL != E without an expert map), UNSUPPORTED (those of
 *         moe_align_capacity, E > MOE_MAX_EXPERTS), BUFFER_TOO_SMALL,
 *         CONTEXT_MISMATCH, DEVICE.
 */
MOE_API moe_status moe_align(moe_context *ctx, int64_t num_tokens, int32_t top_k,
                             int32_t num_experts, int32_t num_local_experts, int32_t block_m,
                             const moe_buffer *topk_ids, const moe_buffer *expert_map,
                             moe_buffer *sorted_token_ids, moe_buffer *expert_ids,
                             moe_buffer *num_tokens_post_padded);

typedef enum moe_gemm_input {
  MOE_GEMM_INPUT_PER_TOKEN = 0, /* A is [T][K]: slot s reads row s / top_k (GEMM1) */
  MOE_GEMM_INPUT_PER_SLOT = 1,  /* A is [T*k][K]: slot s reads row s (GEMM2) */
} moe_gemm_input;

typedef enum moe_gemm_routed_weight {
  MOE_GEMM_ROUTED_WEIGHT_NONE = 0,
  MOE_GEMM_ROUTED_WEIGHT_BEFORE_BIAS = 1, /* c = w * acc + bias (weight on input) */
  MOE_GEMM_ROUTED_WEIGHT_AFTER_BIAS = 2,  /* c = w * (acc + bias) (weight on output) */
} moe_gemm_routed_weight;

typedef struct moe_gemm_desc {
  int64_t num_tokens;         /* T */
  int32_t top_k;              /* k */
  int32_t num_local_experts;  /* EL: experts in b */
  int64_t n;                  /* output columns */
  int64_t k;                  /* reduction length */
  int32_t block_m;            /* the block_m given to moe_align */
  moe_weight_layout b_layout; /* OUT_IN: b[EL][n][k]; IN_OUT: b[EL][k][n] */
  moe_gemm_input input;
  moe_gemm_routed_weight routed_weight; /* uses topk_weights[s] */
} moe_gemm_desc;

/*
 * Grouped GEMM over align's metadata: for every real slot s in block b of
 * sorted_token_ids (s < T*k), with e = expert_ids[b],
 *   c[s][0:n] = bf16(op(a[row(s)] @ B_e, topk_weights[s], bias[e]))
 * with a and b bf16, fp32 accumulation, bias fp32 [EL][n] (may be NULL),
 * topk_weights fp32 [T*k] (needed only when routed_weight is not NONE).
 * Rows of c of slots that align skipped are not written.
 *
 * The metadata is read as given and may be anything, without harm: every
 * backend reads only sorted positions p < min(num_tokens_post_padded,
 * sorted capacity) (a negative count reads none), and a position whose
 * block's expert id is outside [0, EL) or whose slot id is outside
 * [0, T*k) contributes nothing. No metadata makes a kernel read or write
 * outside the buffers; rows of c that no valid position names are not
 * written; a slot that valid positions of two experts name gets one of
 * the two results.
 * Errors: NULL_POINTER, INVALID_ARGUMENT (negative T, top_k or EL <= 0,
 *         n or k <= 0, block_m not a power of two in [1, MOE_MAX_BLOCK_M],
 *         a bad enum value), UNSUPPORTED (top_k > MOE_MAX_TOP_K,
 *         EL > MOE_MAX_EXPERTS, n or k > 2^30, T*k or the align capacity
 *         beyond int32, a sizes' product beyond size_t, or a shape the
 *         backend cannot run), BUFFER_TOO_SMALL, CONTEXT_MISMATCH, DEVICE.
 */
MOE_API moe_status moe_grouped_gemm(moe_context *ctx, const moe_gemm_desc *desc,
                                    const moe_buffer *a, const moe_buffer *b,
                                    const moe_buffer *bias, const moe_buffer *sorted_token_ids,
                                    const moe_buffer *expert_ids,
                                    const moe_buffer *num_tokens_post_padded,
                                    const moe_buffer *topk_weights, moe_buffer *c);

/*
 * Gated activation: for each of rows rows, with gate = in[r][0:I] and
 * up = in[r][I:2I] (bf16), out[r][0:I] = bf16(act(gate) * up) computed in
 * fp32. alpha and limit are used by SWIGLU_CLAMP only. (Inside
 * moe_layer_forward gate and up stay fp32; only this stage's buffers hold
 * them as bf16.) A NaN gate or up gives NaN.
 * Errors: NULL_POINTER, INVALID_ARGUMENT (bad activation, SWIGLU_CLAMP
 *         with a non-finite alpha or a limit not > 0, rows < 0, I <= 0),
 *         UNSUPPORTED (rows beyond int32, I > 2^30, sizes beyond size_t),
 *         BUFFER_TOO_SMALL, CONTEXT_MISMATCH, DEVICE.
 */
MOE_API moe_status moe_activation_apply(moe_context *ctx, moe_activation activation, float alpha,
                                        float limit, int64_t rows, int64_t intermediate_size,
                                        const moe_buffer *in, moe_buffer *out);

/*
 * Weighted top-k reduce: out[t][0:H] = bf16(sum_j w[t][j] * y[t*k + j][0:H])
 * in fp32, j ascending (deterministic). y is bf16 [T*k][H]; topk_weights is
 * fp32 [T][k] or NULL for weight 1 (weights already applied). When
 * topk_ids and expert_map are both given, slots whose expert maps to -1 (or
 * out of range) contribute nothing, so their rows of y are never read.
 * Any topk_ids and expert_map contents are safe: an id outside
 * [0, num_experts) or a map entry outside [0, num_local_experts) masks
 * the slot; nothing is read outside the buffers.
 * Errors: NULL_POINTER, INVALID_ARGUMENT (T < 0, top_k <= 0, H <= 0, and
 *         with a mask E or EL <= 0), UNSUPPORTED (top_k > MOE_MAX_TOP_K,
 *         T*k beyond int32, H > 2^30, with a mask E or EL >
 *         MOE_MAX_EXPERTS, sizes beyond size_t), BUFFER_TOO_SMALL,
 *         CONTEXT_MISMATCH, DEVICE.
 */
MOE_API moe_status moe_topk_reduce(moe_context *ctx, int64_t num_tokens, int32_t top_k,
                                   int64_t hidden_size, const moe_buffer *y,
                                   const moe_buffer *topk_weights, const moe_buffer *topk_ids,
                                   const moe_buffer *expert_map, int32_t num_experts,
                                   int32_t num_local_experts, moe_buffer *out);

#ifdef __cplusplus
}
#endif

#endif /* MOE_H */
