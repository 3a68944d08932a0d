/*
 * gemm_stream.cu - the decode grouped GEMM on Hopper: expert weights
 * streamed into shared memory by bulk copies, dot products on the CUDA
 * cores. Taken when experts get about one row each (grouped_gemm.cu
 * decides), where a tensor-core tile multiplies mostly padding and the
 * weights' DRAM stream is the whole cost.
 *
 * Why this shape (bench/cuda_notes.md has the profiles): at Qwen3's one
 * decode token the mma.sync tiles streamed GEMM1's 50 MB at a third of the
 * H200's bandwidth with a one-wave grid of 384 CTAs, each reading 256-byte
 * pieces of 32 weight rows per stage; the CUDA-core GEMV with per-warp
 * loads was no better. Here:
 *   - a unit of work is ST_ROWS consecutive weight rows (a gate/up pair per
 *     warp for GEMM1's interleaved w13) of one align block's expert, over
 *     the whole K, against the block's token rows (at most block_m = 16);
 *   - its weights arrive as stages of ST_ROWS row pieces of ST_KS elements
 *     (one 2 KB bulk copy per row piece, 16 KB per stage), so each copy is
 *     a long contiguous DRAM read; a producer warp (one lane) keeps a ring
 *     of ST_STAGES stages (64 KB) in flight per CTA, refilling a stage as
 *     soon as the four consumer warps have arrived on its empty barrier,
 *     and reads each unit's expert once;
 *   - the grid is persistent (3 CTAs per SM); CTA c takes units c, c + grid,
 *     ... up to the count that only the device knows (from
 *     num_tokens_post_padded), so neighbouring CTAs read neighbouring rows.
 *     The ring runs on across unit boundaries.
 * Each consumer warp owns two weight rows of the unit: lanes take 8 elements of K
 * each per step from shared memory (conflict-free: a warp reads 512
 * contiguous bytes), token rows come through the read-only cache (every
 * unit of a block reads the same few rows), fp32 accumulation, one warp
 * butterfly per output at the unit's end, then the epilogue of the other
 * GEMM kernels (bias, routed weight, GLU or a bf16 pair). The order of
 * every sum is fixed, so results are deterministic.
 *
 * Needs: OUT_IN weights, n a multiple of ST_ROWS, k and the row strides
 * multiples of 8 elements, 16-byte aligned pointers, block_m <= ST_TOKENS,
 * and a device running sm_90 code (bulk copies and mbarriers).
 */
#include "activation_math.cuh"
#include "cuda_internal.cuh"
#include "hopper_ptx.cuh"

#include <limits.h>

typedef __nv_bfloat16 bf16;

constexpr int ST_WARPS = 4; /* consumer warps; one producer warp more */
constexpr int ST_THREADS = 32 * (ST_WARPS + 1);
constexpr int ST_ROWS = 2 * ST_WARPS; /* weight rows per unit: two per consumer warp */
constexpr int ST_KS = 1024;           /* K elements of each row per stage (2 KB) */
constexpr int ST_STAGES = 4;
constexpr int ST_STAGE_ELEMS = ST_ROWS * ST_KS;
constexpr int ST_SMEM_BYTES = ST_STAGES * ST_STAGE_ELEMS * (int)sizeof(bf16); /* 64 KB */
constexpr int ST_CTAS_PER_SM = 3;
constexpr int ST_TOKENS = CUDA_GEMM_MIN_BLOCK_M; /* token rows of one align block */
static_assert(ST_TOKENS <= 32, "a lane holds each token row's slot");

template <bool GLU>
__global__ void __launch_bounds__(ST_THREADS, ST_CTAS_PER_SM)
    gemm_stream_kernel(const cuda_gemm g, int32_t groups, int32_t slices) {
#ifdef MOE_HOPPER_DEVICE
  extern __shared__ __align__(128) unsigned char smem_raw[];
  bf16 *const ring = (bf16 *)smem_raw;
  __shared__ __align__(8) uint64_t full[ST_STAGES], empty[ST_STAGES];
  cuda_grid_dependency_wait();
  cuda_allow_dependents();

  const int64_t units = (int64_t)(*g.num_tokens_post_padded / g.block_m) * groups;
  const int64_t my_units = units > blockIdx.x ? (units - 1 - blockIdx.x) / gridDim.x + 1 : 0;
  const int64_t stages = my_units * slices;
  if (stages == 0) return; /* uniform over the CTA: the barrier below is reached by all */

  if (threadIdx.x == 0) {
    for (int s = 0; s < ST_STAGES; ++s) {
      mbar_init(smem_addr(&full[s]), 1);
      mbar_init(smem_addr(&empty[s]), ST_WARPS);
    }
    mbar_init_fence();
  }
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  if (warp == ST_WARPS) { /* the producer: one lane queues every stage */
    if (lane != 0) return;
    int64_t unit_of_expert = -1;
    int expert = -1;
    for (int64_t j = 0; j < stages; ++j) {
      const int64_t unit = blockIdx.x + (j / slices) * (int64_t)gridDim.x;
      const int slice = (int)(j % slices);
      if (unit != unit_of_expert) { /* once per unit */
        expert = g.expert_ids[unit / groups];
        unit_of_expert = unit;
      }
      const int64_t n0 = (unit % groups) * ST_ROWS;
      const int k0 = slice * ST_KS, ks = min(ST_KS, g.k - k0);
      const int stage = (int)(j % ST_STAGES);
      /* A fresh barrier passes a wait for parity 1: the first pass over
       * the ring does not wait. */
      mbar_wait(smem_addr(&empty[stage]), (uint32_t)(((j / ST_STAGES) & 1) ^ 1));
      const uint32_t bar = smem_addr(&full[stage]);
      const bool local = expert >= 0 && expert < g.num_local_experts;
      mbar_arrive_expect_tx(bar, local ? (uint32_t)(ST_ROWS * ks * sizeof(bf16)) : 0u);
      if (!local) continue;
      const bf16 *src = g.b + (int64_t)expert * g.b_expert_stride + n0 * g.ldb + k0;
      const uint32_t dst = smem_addr(ring + stage * ST_STAGE_ELEMS);
      for (int r = 0; r < ST_ROWS; ++r)
        bulk_copy_g2s(dst + r * ST_KS * (uint32_t)sizeof(bf16), src + r * g.ldb,
                      (uint32_t)(ks * sizeof(bf16)), bar);
    }
    return;
  }

  const int64_t num_slots = g.num_tokens * g.top_k;
  float acc[2][ST_TOKENS];
  int32_t lane_slot = -1; /* lane t: the slot of the block's token row t */
  int64_t lane_a = 0;     /* lane t: element offset of that row in a */
  int rows = 0, expert = -1;
  int64_t n0 = 0;
  for (int64_t j = 0; j < stages; ++j) {
    const int slice = (int)(j % slices);
    if (slice == 0) { /* a new unit: its expert and token rows */
      const int64_t unit = blockIdx.x + (j / slices) * (int64_t)gridDim.x;
      const int64_t block = unit / groups;
      expert = g.expert_ids[block];
      n0 = (unit % groups) * ST_ROWS;
      const int32_t s = lane < g.block_m ? g.sorted_token_ids[block * g.block_m + lane] : -1;
      const bool real = s >= 0 && s < num_slots;
      lane_slot = real ? s : -1;
      lane_a = real ? (g.input_per_slot ? (int64_t)s : (int64_t)(s / g.top_k)) * g.lda : 0;
      rows = __popc(__ballot_sync(0xffffffffu, real)); /* real rows lead a block */
#pragma unroll
      for (int t = 0; t < ST_TOKENS; ++t)
        acc[0][t] = acc[1][t] = 0.0f;
    }
    const bool local = expert >= 0 && expert < g.num_local_experts;
    const int stage = (int)(j % ST_STAGES);
    mbar_wait(smem_addr(&full[stage]), (uint32_t)((j / ST_STAGES) & 1));
    if (local) {
      const bf16 *w0 = ring + stage * ST_STAGE_ELEMS + 2 * warp * ST_KS;
      const int k0 = slice * ST_KS, ks = min(ST_KS, g.k - k0);
      /* The trip count is the same on every lane (the shuffles need the
       * whole warp); lanes past ks skip their loads. */
      for (int base = 0; base < ks; base += 32 * 8) {
        const int kk = base + lane * 8;
        const bool in_k = kk < ks;
        uint4 wa = make_uint4(0, 0, 0, 0), wb = wa;
        if (in_k) {
          wa = *(const uint4 *)(w0 + kk);
          wb = *(const uint4 *)(w0 + ST_KS + kk);
        }
#pragma unroll
        for (int t = 0; t < ST_TOKENS; ++t) {
          if (t >= rows) break; /* warp-uniform */
          const int64_t a_off = __shfl_sync(0xffffffffu, lane_a, t);
          if (!in_k) continue;
          const uint4 av = __ldg((const uint4 *)(g.a + a_off + k0 + kk));
          acc[0][t] += dot8_bf16(wa, av);
          acc[1][t] += dot8_bf16(wb, av);
        }
      }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(smem_addr(&empty[stage])); /* this warp is done with it */
    if (slice == slices - 1 && local) { /* the unit's outputs */
      const int64_t col = n0 + 2 * warp; /* rows col (gate) and col + 1 (up) */
      const float *bias = g.bias ? g.bias + (int64_t)expert * g.bias_stride : NULL;
#pragma unroll
      for (int t = 0; t < ST_TOKENS; ++t) {
        if (t >= rows) break;
        float v0 = acc[0][t], v1 = acc[1][t];
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) {
          v0 += __shfl_xor_sync(0xffffffffu, v0, offset);
          v1 += __shfl_xor_sync(0xffffffffu, v1, offset);
        }
        const int32_t slot = __shfl_sync(0xffffffffu, lane_slot, t);
        if (lane != t) continue; /* lanes take turns writing their token's row */
        const float weight =
            g.routed_weight != MOE_GEMM_ROUTED_WEIGHT_NONE ? g.topk_weights[slot] : 1.0f;
        v0 = cuda_apply_routed(v0, bias ? bias[col] : 0.0f, weight, g.routed_weight);
        v1 = cuda_apply_routed(v1, bias ? bias[col + 1] : 0.0f, weight, g.routed_weight);
        bf16 *c_row = g.c + (int64_t)slot * g.ldc;
        if (GLU)
          c_row[col / 2] =
              __float2bfloat16_rn(cuda_gated_activation(g.activation, g.alpha, g.limit, v0, v1));
        else
          *(__nv_bfloat162 *)(c_row + col) = __floats2bfloat162_rn(v0, v1);
      }
    }
  }
#endif
}

bool cuda_gemm_stream_fits(const cuda_state *st, const cuda_gemm *g) {
  return st->bulk_copy && !g->b_kn && g->n % ST_ROWS == 0 && g->k % 8 == 0 && g->lda % 8 == 0 &&
         g->ldb % 8 == 0 && g->b_expert_stride % 8 == 0 && g->block_m <= ST_TOKENS &&
         ((uintptr_t)g->a & 15u) == 0 && ((uintptr_t)g->b & 15u) == 0 &&
         (g->epilogue != CUDA_EPILOGUE_STORE || (g->ldc % 2 == 0 && ((uintptr_t)g->c & 3u) == 0));
}

moe_status cuda_gemm_stream_init(void) {
  CUDA_TRY(cuda_status(cudaFuncSetAttribute(gemm_stream_kernel<true>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            ST_SMEM_BYTES),
                       "cudaFuncSetAttribute"));
  return cuda_status(cudaFuncSetAttribute(gemm_stream_kernel<false>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          ST_SMEM_BYTES),
                     "cudaFuncSetAttribute");
}

moe_status cuda_gemm_stream_run(const cuda_state *st, const cuda_gemm *g) {
  const int64_t slots = g->num_tokens * g->top_k;
  const int64_t blocks =
      cuda_padded_rows_bound(slots, g->num_local_experts, g->block_m) / g->block_m;
  const int64_t groups = g->n / ST_ROWS, slices = (g->k + ST_KS - 1) / ST_KS;
  const int64_t units = blocks * groups;
  if (groups > INT_MAX || units == 0) return MOE_SUCCESS;
  int64_t grid = (int64_t)ST_CTAS_PER_SM * st->sm_count;
  if (grid > units) grid = units;
  const dim3 threads(ST_THREADS);
  const cudaError_t err =
      g->epilogue == CUDA_EPILOGUE_GLU
          ? cuda_launch(st, true, gemm_stream_kernel<true>, dim3((unsigned)grid), threads,
                        (size_t)ST_SMEM_BYTES, *g, (int32_t)groups, (int32_t)slices)
          : cuda_launch(st, true, gemm_stream_kernel<false>, dim3((unsigned)grid), threads,
                        (size_t)ST_SMEM_BYTES, *g, (int32_t)groups, (int32_t)slices);
  if (err != cudaSuccess) return cuda_status(err, "gemm_stream_kernel launch");
  return cuda_launch_status("gemm_stream_kernel");
}
