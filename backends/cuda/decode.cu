/*
 * decode.cu - the layer forward for a few tokens without align: two
 * weight-streaming kernels on the CUDA cores that read the routing
 * (topk_ids, topk_weights) directly.
 *
 *   decode_up_kernel:   h[slot][i] = act(gate_i . x[t], up_i . x[t]) with
 *                       bias and the routed weight when it goes on the
 *                       input; a warp per (pick j, column i) of a token.
 *   decode_down_kernel: out[t][n] = sum over t's local picks j, in order,
 *                       of w_j * (w2[e_j][n] . h[t*k + j] + bias), in fp32
 *                       with no bf16 rounding of the per-slot product; a
 *                       CTA per (token, tile of rows n): the weighted top-k
 *                       reduce is fused in, and deterministic.
 * Both grids are one wave of the device shared by the tokens, their CTAs
 * walking the work grid-stride: a CTA stages its activations once, and
 * none waits for another to leave (measurements: bench/cuda_notes.md,
 * 'Measurements behind the code's rules').
 *
 * Why: at one token a forward on the tile path is route+align, GEMM1, GEMM2
 * and the reduce, four dependent launches of which two (align, reduce) move
 * under 100 KB; with L2 cold each pays its code and metadata from DRAM, a
 * fixed cost per launch (measurements: bench/cuda_notes.md, 'Measurements
 * behind the code's rules'). Here the GEMMs index the weights by the
 * slot's expert, so the forward is route, up, down.
 *
 * Streaming: each warp reads a contiguous block of weight rows (a gate/up
 * pair; DECODE_DOWN_ROWS rows of one expert) and issues its 16-byte
 * evict-first loads for a whole batch before it does any math, so that a
 * round is one latency. The first batch is in flight while the CTA stages
 * its activation rows in shared memory, so the activations cost no
 * registers.
 *
 * Overlapped launches (programmatic dependent launch, Hopper): each kernel
 * may get resident while the one before it finishes. decode_up_kernel
 * stages x, decode_down_kernel issues its first weight batch (both need
 * only data complete before the route started, or the route's picks), and
 * only then waits for the previous kernel; so the route's tail and the
 * up kernel's last wave overlap the next kernel's first DRAM round trip.
 *
 * Needs hidden and inter multiples of 8, x 16-byte aligned and the
 * activation rows within DECODE_MAX_SMEM; cuda_decode_wanted says when.
 */
#include "activation_math.cuh"
#include "cuda_internal.cuh"

#include <stdlib.h>
#include <string.h>

typedef __nv_bfloat16 bf16;

constexpr int DECODE_WARPS = 8;
constexpr int DECODE_CHUNKS = 8;      /* 16-byte loads per weight row and lane per round */
constexpr int DECODE_DOWN_BATCH = 12; /* 16-byte loads per lane decode_down_kernel has in flight */
constexpr int DECODE_LANE_SPAN = 32 * 8; /* elements one 16-byte load per lane covers */
constexpr size_t DECODE_MAX_SMEM = 96 * 1024;
/*
 * Default rule, fitted to sweeps of decode vs the tile path in one call;
 * its numbers are the device class's tuning row (cuda_tuning.cu). Each
 * slot streams its expert's weights on its own, so a repeated expert is
 * read again: decode needs the picks to be at most half the local experts.
 * T * hidden is bounded: a wide hidden size loses to the tiles from 4
 * tokens even with few repeats. Fewer tokens with fewer than 64 local
 * experts: there decode lost at 4 tokens where a model with 128 experts
 * still won at 8. One token always takes decode. Measurements:
 * bench/cuda_notes.md, 'Measurements behind the code's rules'.
 */
static bool decode_rule(const cuda_tuning *t, const cuda_decode *d) {
  const int64_t T = d->num_tokens;
  const int64_t max_tokens = d->num_local >= 64 ? t->decode_max_tokens : t->decode_max_tokens_few;
  return T == 1 || (T <= max_tokens && 2 * T * d->top_k <= d->num_local &&
                    T * d->hidden <= t->decode_max_elements);
}

__device__ __forceinline__ uint4 load_weights(const bf16 *p, bool valid) {
  return valid ? __ldcs((const uint4 *)p) : make_uint4(0, 0, 0, 0);
}

/* Copies `rows` rows of `cols` bf16 (cols % 8 == 0, 16-byte aligned,
 * contiguous) into shared memory with the whole CTA, skipping the rows
 * wanted(r) declines; the caller synchronizes. Each thread has
 * AHEAD loads in flight before it stores: one at a time, a
 * CTA staging 8 rows of h paid 8 round trips (bench/cuda_notes.md). Every
 * lane of a warp calls wanted() the same number of times (it may shuffle). */
template <int AHEAD, typename Wanted>
__device__ __forceinline__ void stage_rows(bf16 *dst, const bf16 *src, int rows, int cols,
                                           Wanted wanted) {
  const int row_vecs = cols / 8, total = rows * row_vecs;
#pragma unroll 1
  for (int base = 0; base < total; base += AHEAD * blockDim.x) {
    uint4 v[AHEAD];
    bool take[AHEAD];
#pragma unroll
    for (int u = 0; u < AHEAD; ++u) {
      const int i = base + u * blockDim.x + threadIdx.x;
      const int r = i < total ? i / row_vecs : 0;
      take[u] = wanted(r) && i < total;
      v[u] = take[u] ? __ldg((const uint4 *)src + i) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < AHEAD; ++u)
      if (take[u]) ((uint4 *)dst)[base + u * blockDim.x + threadIdx.x] = v[u];
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

/*
 * Grid: (CTAs per token, num_tokens). A warp item is (pick j, gate/up pair
 * i) of token t, k x inter of them; the CTAs of a token walk them
 * grid-stride, one warp an item, consecutive warps on consecutive pairs
 * (contiguous weight rows). The grid is one wave (cuda_decode_run), so x
 * and the picks are staged once per CTA and no CTA waits for another to
 * leave (option cuda.decode_persistent=off: one item a warp, for A/B runs).
 * Shared: x[t] (hidden), then the local expert of each of t's picks.
 */
__global__ void __launch_bounds__(DECODE_WARPS * 32) decode_up_kernel(const cuda_decode p) {
  extern __shared__ uint4 smem_up[];
  const int K = p.hidden;
  bf16 *xs = (bf16 *)smem_up;
  int *pick_expert = (int *)(xs + K); /* hidden % 8 == 0: 16-byte aligned */
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t t = blockIdx.y, first_slot = t * p.top_k;
  /* x is the forward's input, complete before the route kernel started:
   * staged before waiting for the route (overlapped launch, see the file
   * comment). */
  stage_rows<4>(xs, p.x + t * K, 1, K, [](int) { return true; });
  cuda_grid_dependency_wait();
  cuda_allow_dependents(); /* decode_down_kernel may get resident during our tail */
  for (int j = threadIdx.x; j < p.top_k; j += blockDim.x)
    pick_expert[j] =
        cuda_local_expert(p.topk_ids[first_slot + j], p.expert_map, p.num_experts, p.num_local);
  __syncthreads();

  const int items = p.top_k * p.inter; /* cuda_decode_wanted: twice this fits an int */
#pragma unroll 1
  for (int item = blockIdx.x * DECODE_WARPS + warp; item < items;
       item += gridDim.x * DECODE_WARPS) {
    const int j = item / p.inter, pair = item % p.inter;
    const int e = pick_expert[j];
    if (e < 0) continue; /* another rank's expert: its slot of h stays unread */
    const bf16 *gate = p.w13 + ((int64_t)e * 2 * p.inter + 2 * (int64_t)pair) * K;
    const bf16 *up = gate + K;

    uint4 wg[DECODE_CHUNKS], wu[DECODE_CHUNKS];
    float acc_gate = 0.0f, acc_up = 0.0f;
#pragma unroll 1
    for (int k0 = lane * 8; k0 < K; k0 += DECODE_CHUNKS * DECODE_LANE_SPAN) {
#pragma unroll
      for (int c = 0; c < DECODE_CHUNKS; ++c) {
        const int k = k0 + c * DECODE_LANE_SPAN;
        wg[c] = load_weights(gate + k, k < K);
        wu[c] = load_weights(up + k, k < K);
      }
#pragma unroll
      for (int c = 0; c < DECODE_CHUNKS; ++c) {
        const int k = k0 + c * DECODE_LANE_SPAN;
        if (k < K) {
          const uint4 xv = *(const uint4 *)(xs + k);
          acc_gate += dot8_bf16(wg[c], xv);
          acc_up += dot8_bf16(wu[c], xv);
        }
      }
    }
    acc_gate = warp_sum(acc_gate);
    acc_up = warp_sum(acc_up);
    if (lane != 0) continue;
    const int64_t slot = first_slot + j;
    const moe_gemm_routed_weight mode =
        p.weight_on_input ? MOE_GEMM_ROUTED_WEIGHT_BEFORE_BIAS : MOE_GEMM_ROUTED_WEIGHT_NONE;
    const float weight = p.weight_on_input ? p.topk_weights[slot] : 1.0f;
    const float *bias = p.w13_bias ? p.w13_bias + (int64_t)e * 2 * p.inter + 2 * pair : NULL;
    const float g = cuda_apply_routed(acc_gate, bias ? bias[0] : 0.0f, weight, mode);
    const float u = cuda_apply_routed(acc_up, bias ? bias[1] : 0.0f, weight, mode);
    p.h[slot * p.inter + pair] =
        __float2bfloat16_rn(cuda_gated_activation(p.activation, p.alpha, p.limit, g, u));
  }
}

/* decode_down_kernel's tile: each warp reads DECODE_DOWN_ROWS consecutive
 * rows of one pick's expert (a contiguous block of w2; at Qwen3's shape
 * 6 KB, one batch of DECODE_DOWN_BATCH loads a lane), DECODE_DOWN_LANES
 * lanes to a row; a CTA covers picks x row groups with its 8 warps. */
constexpr int DECODE_DOWN_LANES = 8;
constexpr int DECODE_DOWN_ROWS = 32 / DECODE_DOWN_LANES;
constexpr int DECODE_DOWN_SPAN = DECODE_DOWN_LANES * 8; /* elements of a row one load covers */

/* Row groups a CTA of decode_down_kernel covers for top_k picks. */
__host__ __device__ inline int down_row_groups(int top_k) {
  return top_k >= DECODE_WARPS ? 1 : DECODE_WARPS / top_k;
}

/*
 * Grid: (CTAs per token, num_tokens); tile = row groups x DECODE_DOWN_ROWS
 * output rows, the CTAs of a token walk its tiles grid-stride (one wave,
 * as decode_up_kernel; cuda.decode_persistent=off: one tile a CTA).
 * Shared: h of t's k slots, staged once, then the partial dot products
 * [k][tile].
 * Each warp takes (pick j, row group) pairs. Its lanes own a row each
 * (lane / DECODE_DOWN_LANES) and a column phase, so one accumulator a lane
 * serves the whole row, and the warp's loads stay inside one contiguous
 * block of the expert's rows: a first version in which a warp walked one
 * row across all picks (8 experts' rows at once) streamed far below DRAM
 * peak (measurements: bench/cuda_notes.md, 'Measurements behind the code's
 * rules'). Partial sums meet in shared memory; then one thread a row adds
 * w_j * (part_j + bias_j) over j in order: the fused, deterministic top-k
 * reduce. A warp issues its first batch of the next tile before that
 * reduce, so its loads are in flight across the barriers.
 */
__global__ void __launch_bounds__(DECODE_WARPS * 32) decode_down_kernel(const cuda_decode p) {
  extern __shared__ uint4 smem_down[];
  const int K = p.inter, top_k = p.top_k;
  bf16 *hs = (bf16 *)smem_down;
  const int row_groups = down_row_groups(top_k), tile = row_groups * DECODE_DOWN_ROWS;
  const int tiles = (p.hidden + tile - 1) / tile;
  float *part = (float *)(hs + (int64_t)top_k * K); /* [k][tile] */
  constexpr int B = DECODE_DOWN_BATCH;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int my_row = lane / DECODE_DOWN_LANES, phase = (lane % DECODE_DOWN_LANES) * 8;
  const int64_t t = blockIdx.y, first_slot = t * p.top_k;
  const int loads_per_row = (K + DECODE_DOWN_SPAN - 1) / DECODE_DOWN_SPAN;

  static_assert(MOE_MAX_TOP_K <= 32, "lane j holds pick j");
  int pick_expert = -1; /* lane j: pick j's local expert */
  if (lane < top_k)
    pick_expert =
        cuda_local_expert(p.topk_ids[first_slot + lane], p.expert_map, p.num_experts, p.num_local);
  /* The reduce's view of the picks, read once: read per row, they were a
   * chain of k dependent global loads in every tile's reduce. */
  __shared__ int reduce_expert[MOE_MAX_TOP_K];
  __shared__ float reduce_weight[MOE_MAX_TOP_K];
  if (warp == 0 && lane < top_k) {
    reduce_expert[lane] = pick_expert;
    reduce_weight[lane] = p.weight_on_input ? 1.0f : p.topk_weights[first_slot + lane];
  }

  /* The weight row this lane reads for pair q of tile `tile_index` (NULL:
   * nothing to read). */
  auto row_of = [&](int tile_index, int q) -> const bf16 * {
    const int j = q / row_groups, group = q % row_groups;
    const int e = __shfl_sync(0xffffffffu, pick_expert, j & 31);
    const int row = tile_index * tile + group * DECODE_DOWN_ROWS + my_row;
    if (tile_index >= tiles || j >= top_k || e < 0 || row >= p.hidden) return NULL;
    return p.w2 + ((int64_t)e * p.hidden + row) * K + phase;
  };
  auto load_batch = [&](const bf16 *w, int c0, uint4(&v)[DECODE_DOWN_BATCH]) {
#pragma unroll
    for (int b = 0; b < DECODE_DOWN_BATCH; ++b) {
      const int k = (c0 + b) * DECODE_DOWN_SPAN;
      v[b] = load_weights(w + k, w && phase + k < K);
    }
  };

  const int pairs = top_k * row_groups;
  uint4 wv[B];
  const bf16 *w = row_of(blockIdx.x, warp);
  load_batch(w, 0, wv);
  /* The weights above needed only the route's picks; h is decode_up_kernel's. */
  cuda_grid_dependency_wait();
  stage_rows<2>(hs, /* 2: the weight batch holds the registers */ p.h + first_slot * K, top_k, K,
                [&](int j) { return __shfl_sync(0xffffffffu, pick_expert, j & 31) >= 0; });
  __syncthreads();

#pragma unroll 1
  for (int tile_index = blockIdx.x; tile_index < tiles; tile_index += gridDim.x) {
#pragma unroll 1
    for (int q = warp; q < pairs; q += DECODE_WARPS) {
      const int j = q / row_groups, group = q % row_groups;
      if (q != warp) { /* the warp's first pair of a tile is in flight already */
        w = row_of(tile_index, q);
        load_batch(w, 0, wv);
      }
      float acc = 0.0f;
#pragma unroll 1
      for (int c0 = 0;;) {
#pragma unroll
        for (int b = 0; b < B; ++b) {
          const int k = phase + (c0 + b) * DECODE_DOWN_SPAN;
          if (w && k < K) acc += dot8_bf16(wv[b], *(const uint4 *)(hs + (int64_t)j * K + k));
        }
        c0 += B;
        if (c0 >= loads_per_row) break;
        load_batch(w, c0, wv);
      }
#pragma unroll
      for (int offset = 1; offset < DECODE_DOWN_LANES; offset <<= 1)
        acc += __shfl_xor_sync(0xffffffffu, acc, offset);
      if (phase == 0) part[j * tile + group * DECODE_DOWN_ROWS + my_row] = acc;
    }
    w = row_of(tile_index + gridDim.x, warp); /* NULL past the last tile */
    load_batch(w, 0, wv);
    __syncthreads();

    for (int r = threadIdx.x; r < tile; r += blockDim.x) {
      const int row = tile_index * tile + r;
      if (row >= p.hidden) break;
      float sum = 0.0f;
#pragma unroll 1
      for (int j = 0; j < top_k; ++j) {
        const int e = reduce_expert[j];
        if (e < 0) continue;
        const float bias = p.w2_bias ? p.w2_bias[(int64_t)e * p.hidden + row] : 0.0f;
        /* weight 1 when it went on GEMM1's input: the same as no weight */
        sum += cuda_apply_routed(part[j * tile + r], bias, reduce_weight[j],
                                 MOE_GEMM_ROUTED_WEIGHT_AFTER_BIAS);
      }
      p.out[t * p.hidden + row] = __float2bfloat16_rn(sum);
    }
    __syncthreads(); /* part is the next tile's */
  }
}

static int down_tile(const cuda_decode *d) {
  return down_row_groups(d->top_k) * DECODE_DOWN_ROWS;
}

static size_t up_smem(const cuda_decode *d) {
  return (size_t)d->hidden * sizeof(bf16) + (size_t)d->top_k * sizeof(int);
}
static size_t down_smem(const cuda_decode *d) {
  return (size_t)d->top_k * (size_t)d->inter * sizeof(bf16) +
         (size_t)d->top_k * (size_t)down_tile(d) * sizeof(float);
}

moe_status cuda_decode_init(void) {
  CUDA_TRY(cuda_status(cudaFuncSetAttribute(decode_up_kernel,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            (int)DECODE_MAX_SMEM),
                       "cudaFuncSetAttribute of decode_up_kernel"));
  return cuda_status(cudaFuncSetAttribute(decode_down_kernel,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          (int)DECODE_MAX_SMEM),
                     "cudaFuncSetAttribute of decode_down_kernel");
}

bool cuda_decode_wanted(const cuda_state *st, const cuda_decode *d) {
  const bool fits = d->hidden % 8 == 0 && d->inter % 8 == 0 && ((uintptr_t)d->x & 15u) == 0 &&
                    up_smem(d) <= DECODE_MAX_SMEM && down_smem(d) <= DECODE_MAX_SMEM &&
                    /* decode_up_kernel's item index plus its grid stride stays an int */
                    d->num_tokens <= 65535 && 2 * (int64_t)d->top_k * d->inter <= INT32_MAX;
  if (!fits) return false;
  if (st->path_option == MOE_CUDA_PATH_DECODE) return true;
  if (st->tile_option[0]) return false; /* a forced tile means the tile path */
  return decode_rule(st->tuning, d);
}

/* Overlapped launches (Hopper; option cuda.decode_pdl=off turns them off). */
static bool decode_pdl(const cuda_state *st) {
  return st->hopper && st->decode_pdl;
}

/* Option cuda.decode_persistent=off: one work item a warp (up) or a CTA
 * (down), the grid as large as the work, for A/B runs against the one-wave
 * grid. */
static bool decode_persistent(const cuda_state *st) {
  return st->decode_persistent;
}

/* CTAs per token for `work` CTAs' worth of items: one wave of the device
 * shared by the tokens (at least one CTA each), or all of them. The
 * occupancy query is host-side arithmetic: no stream work, capture-safe. */
static unsigned grid_per_token(const cuda_state *st, const void *kernel, size_t smem, int64_t work,
                               int64_t num_tokens) {
  if (!decode_persistent(st)) return (unsigned)work;
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, DECODE_WARPS * 32, smem) !=
      cudaSuccess) {
    (void)cudaGetLastError(); /* a failed query leaves no error behind: the grid stays whole */
    return (unsigned)work;
  }
  const int64_t wave = (int64_t)per_sm * st->sm_count / num_tokens;
  return (unsigned)(wave < work ? (wave > 0 ? wave : 1) : work);
}

moe_status cuda_decode_run(const cuda_state *st, const cuda_decode *d) {
  cuda_state overlapped = *st;
  overlapped.pdl = decode_pdl(st);
  st = &overlapped;
  const dim3 block(DECODE_WARPS * 32);
  const int64_t up_work = ((int64_t)d->top_k * d->inter + DECODE_WARPS - 1) / DECODE_WARPS;
  const dim3 up_grid(
      grid_per_token(st, (const void *)decode_up_kernel, up_smem(d), up_work, d->num_tokens),
      (unsigned)d->num_tokens);
  cudaError_t err = cuda_launch(st, true, decode_up_kernel, up_grid, block, up_smem(d), *d);
  if (err != cudaSuccess) return cuda_status(err, "decode_up_kernel launch");
  CUDA_TRY(cuda_launch_status("decode_up_kernel"));
  const int64_t down_work = (d->hidden + down_tile(d) - 1) / down_tile(d);
  const dim3 down_grid(
      grid_per_token(st, (const void *)decode_down_kernel, down_smem(d), down_work, d->num_tokens),
      (unsigned)d->num_tokens);
  err = cuda_launch(st, true, decode_down_kernel, down_grid, block, down_smem(d), *d);
  if (err != cudaSuccess) return cuda_status(err, "decode_down_kernel launch");
  return cuda_launch_status("decode_down_kernel");
}
