/*
 * gemm_wgmma.cu - the Hopper (sm_90a) prefill path of the layer forward:
 * token rows permuted once into expert-sorted order, then both grouped BF16
 * GEMMs on warpgroup MMA (wgmma) fed by the tensor memory accelerator (TMA).
 *
 * Data flow (cuda_backend.cu's forward, when it takes this path):
 *   align with block_m 128 (64 for the 64-row tiles)
 *   -> permute (unless GEMM1 gathers, below): xs[p] = x[sorted[p] / top_k]
 *      for p < *num_tokens_post_padded, zeros for padding rows;
 *   -> GEMM1: h_sorted[p][i] = act(gate, up) of xs[p] @ w13[e]^T (w13 rows
 *      interleave gate/up), bias and the input-side routed weight first;
 *   -> GEMM2: y[slot] = h_sorted[p] @ w2[e]^T + bias, routed weight, stored
 *      by slot for real rows only;
 *   -> the reduce of the mma.sync path, unchanged.
 * Both operands of both GEMMs are then plain row-major tiles that TMA loads.
 *
 * GEMM kernel (wgmma_gemm_kernel<BN, STAGES, EPI, GATHER, BM>):
 *   - One CTA per (BM-row block, BN-column tile). A BM-row block is one
 *     align block, so one expert: expert_ids[m_tile]. CTAs whose block starts
 *     at or past *num_tokens_post_padded, or whose expert is not local, exit
 *     at once: the grid is sized on the host by a bound, and the real count
 *     is read only on the device (no host synchronization).
 *   - 384 threads in three warpgroups. Warpgroup 0 produces: one thread
 *     issues the TMA loads, and the warpgroup hands registers back
 *     (setmaxnreg.dec). Warpgroups 1 and 2 consume: each owns 64 rows x BN of
 *     the tile as m64nBNk16 fp32 accumulators in registers (setmaxnreg.inc);
 *     with the 64-row tiles (BM 64, BN 128, option cuda.wgmma_bm or the
 *     tuning row's rule) each owns all 64 rows x 64 of the columns.
 *   - K advances in 64-element (128-byte) tiles through a ring of STAGES
 *     shared-memory stages, each holding A (BM x 64) and B (BN x 64) as TMA
 *     wrote them with the 128-byte swizzle that the wgmma descriptors read.
 *     full[s] completes when both loads of stage s have landed (expect_tx);
 *     empty[s] when all 8 consumer warps have finished the wgmmas reading
 *     it (after wgmma.wait_group), so the producer may overwrite it. Each
 *     consumer keeps one k-tile of wgmmas in flight while it waits for the
 *     next stage.
 *   - TMA zero-fills outside each tensor: K past its end contributes 0 (K
 *     needs only be a multiple of 8, for 16-byte row strides), B rows past
 *     the last expert are 0. A tile's B rows that run past one expert's n
 *     rows into the next expert's only produce columns >= n, never stored.
 *   - The epilogue works straight from the accumulator registers: a thread
 *     holds column pairs (2c, 2c+1) of two rows, which is exactly a gate/up
 *     pair of the interleaved w13. GLU: bias, routed weight, activation into
 *     h_sorted[p][c]; padding rows get zeros, so GEMM2 never reads
 *     uninitialized memory. STORE: bias, routed weight, a bf16 pair into
 *     y[slot][2c] for real rows only.
 *   - CTAs are rasterized in groups of 8 row blocks per column tile (as in
 *     grouped_gemm.cu), so that CTAs running together share B tiles in L2.
 *   - GATHER (option cuda.wgmma_gather, GEMM1 only): no permute; the
 *     producer warpgroup copies each A tile's rows from x[sorted[p] /
 *     top_k] by cp.async, a warp four whole rows' 128-byte pieces per
 *     instruction, 16-byte chunks placed where the 128-byte swizzle puts
 *     them (zeros for padding rows and past K), and
 *     the copies complete on the stage's full barrier (one noinc arrival
 *     per thread besides the TMA thread's); consumers fence the proxies
 *     before wgmma reads them. Saves the permute's write and read of
 *     T*k*H*2 bytes (79 us at Qwen3 4096 tokens on an H100).
 *
 * Not done yet, for when the GPU numbers say where the time goes: a
 * persistent grid walking (block, tile) pairs, so that one tile's epilogue
 * and the next tile's first loads overlap (the launch-per-tile grid here
 * exposes both once per tile); an epilogue staged through shared memory
 * (wider stores, or TMA stores); consumer warpgroups on alternating tiles
 * (ping-pong); 2-CTA clusters multicasting B.
 *
 * Tensor maps (CUtensorMap) are encoded on the host by the driver's
 * cuTensorMapEncodeTiled, reached through cudaGetDriverEntryPointByVersion:
 * the library links the static runtime and never libcuda, so that it still
 * loads on a machine without a driver. <cuda.h> is included for types only.
 *
 * The device code exists only in the sm_90a compilation (wgmma and
 * setmaxnreg are sm_90a instructions); other targets compile a kernel body
 * that traps. The host takes the path only when the build holds sm_90a code
 * (MOE_CUDA_SM90A, set by CMake) and the device is compute capability 9.0.
 */
#include "activation_math.cuh"
#include "cuda_internal.cuh"
#include "hopper_gemm.cuh"
#include "wgmma_ptx.cuh"

#include <cuda.h>
#include <cudaTypedefs.h>

#include <limits.h>
#include <stdlib.h>
#include <string.h>

typedef __nv_bfloat16 bf16;

static_assert(sizeof(cuda_tma_map) == sizeof(CUtensorMap), "cuda_tma_map holds one CUtensorMap");

/* ---- shape -------------------------------------------------------------- */

#define WG_BM CUDA_WGMMA_BLOCK_M /* rows per CTA == align's block_m (or WG_BM_NARROW) */
/* Option cuda.wgmma_bm=64: 64-row token tiles with BN 128, each consumer
 * warpgroup on 64 of the 128 columns (half the padding of 128-row tiles
 * where experts hold 32-64 rows; the peer's tile there is 64 x 128). */
#define WG_BM_NARROW 64
#define WG_BK 64            /* K per stage: 128 bytes, one swizzle row */
#define WG_THREADS 384      /* producer + 2 consumer warpgroups */
#define WG_CONSUMER_WARPS 8 /* arrivals that free a stage */
/* Registers per thread after setmaxnreg: 128 * 40 + 256 * 232 = 64512 of
 * the 65536 of an SM (one CTA per SM). Multiples of 8, as setmaxnreg needs. */
#define WG_PRODUCER_REGS 40
#define WG_CONSUMER_REGS 232
static_assert(WG_BM == 128, "the 128-row tile: two consumer warpgroups of 64 rows");

template <int BN, int STAGES, int BM = WG_BM> struct wg_shape {
  /* Columns of the tile each consumer warpgroup owns: all of them on its
   * 64 rows (BM 128), or half of them on all 64 rows (BM 64). */
  static constexpr int WG_N = BM == 128 ? BN : BN / 2;
  static constexpr int A_BYTES = BM * WG_BK * 2;
  static constexpr int B_BYTES = BN * WG_BK * 2;
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
  /* + 1024: the dynamic shared memory base is aligned up to 1024 bytes in
   * the kernel (the 128-byte swizzle repeats every 8 rows = 1024 bytes, and
   * TMA and the descriptors assume stages start on that period). */
  static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + 1024;
  static_assert(A_BYTES % 1024 == 0 && B_BYTES % 1024 == 0, "stages keep 1024-byte alignment");
  static_assert(BN == 128 || BN == 256, "wgmma n of the instantiated wrappers");
  static_assert(BN <= 256, "a TMA box has at most 256 rows");
  static_assert(BM == 128 || BM == 64, "the producer's gather passes of 16 rows, two warpgroups");
};

/* The two tiles: BN 256 with 4 stages (48 KB each), BN 128 with 6 (32 KB
 * each): 192 KB of the 227 KB a Hopper (sm_90) block may take either way. */
#define WG_STAGES_256 4
#define WG_STAGES_128 6
#define WG_STAGES_NARROW 8 /* BM 64, BN 128: 24 KB each */

/* ---- kernel parameters -------------------------------------------------- */

/* The tile grid on top of the shared parameters. gather_x: GEMM1 reads
 * its rows from x itself (row sorted[p] / gather_top_k), not from the
 * permuted xs of a_map (option cuda.wgmma_gather). */
struct wgmma_params : hopper_gemm_params {
  int32_t m_tiles, n_tiles;
  const bf16 *gather_x;
  int32_t gather_top_k;
};

/* The A tile's 16-byte chunk c of row r, where TMA with the 128-byte
 * swizzle puts it: rows 128 bytes apart, the chunk index XORed with the
 * row's position in its 8-row (1024-byte) period. */
__device__ __forceinline__ uint32_t swizzled_chunk(int r, int c) {
  return (uint32_t)(r * 128 + ((c ^ (r & 7)) * 16));
}

/* ---- the GEMM kernel ---------------------------------------------------- */

template <int BN, int STAGES, int EPI, bool GATHER, int BM>
__global__ void __launch_bounds__(WG_THREADS, 1)
    wgmma_gemm_kernel(const __grid_constant__ CUtensorMap a_map,
                      const __grid_constant__ CUtensorMap b_map, const wgmma_params p) {
#ifdef MOE_WGMMA_DEVICE
  typedef wg_shape<BN, STAGES, BM> S;
  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) uint64_t full_bar[STAGES];
  __shared__ __align__(8) uint64_t empty_bar[STAGES];
  cuda_grid_dependency_wait();
  cuda_allow_dependents();

  /* Grouped raster: GROUP_M row blocks take each column tile in turn. */
  constexpr int GROUP_M = 8;
  const int64_t tile_index = blockIdx.x;
  const int64_t group_tiles = (int64_t)GROUP_M * p.n_tiles;
  const int first_m = (int)(tile_index / group_tiles) * GROUP_M;
  const int group_m = min(p.m_tiles - first_m, GROUP_M);
  const int64_t in_group = tile_index % group_tiles;
  const int m_tile = first_m + (int)(in_group % group_m);
  const int n_tile = (int)(in_group / group_m);
  const int64_t m0 = (int64_t)m_tile * BM;
  const int n0 = n_tile * BN;
  /* Uniform over the CTA, so the early exits come before any barrier. */
  if (m0 >= *p.num_tokens_post_padded) return;
  const int expert = p.expert_ids[m_tile];
  if (expert < 0 || expert >= p.num_local_experts) return;

  const uint32_t smem = (smem_addr(smem_raw) + 1023u) & ~1023u;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      /* Gathering: the TMA thread's arrival and one cp.async arrival per
       * producer thread. */
      mbar_init(smem_addr(&full_bar[s]), GATHER ? 1 + 128 : 1);
      mbar_init(smem_addr(&empty_bar[s]), WG_CONSUMER_WARPS);
    }
    mbar_init_fence();
  }
  __syncthreads();

  const int k_tiles = (p.k + WG_BK - 1) / WG_BK;
  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    /* Producer. Thread 0 loads B (and, unless gathering, A) by TMA. When
     * gathering, the warpgroup also copies each A tile from x with
     * cp.async into the swizzled layout TMA would have written (zeros for
     * padding rows and K past its end): thread t copies 16-byte chunk t % 8
     * of rows t / 8 + 16 j, so that a warp's copy reads four whole 128-byte
     * row pieces (a thread per row read 32 rows' 16 bytes each, half of
     * every 32-byte sector, per instruction). Without gathering, the other
     * 127 threads simply finish (no barrier involving the whole CTA
     * follows). */
    setmaxnreg_dec<WG_PRODUCER_REGS>();
    const int t = threadIdx.x;
    if (GATHER || t == 0) {
      constexpr int GATHER_ROWS = GATHER ? BM / 16 : 1; /* rows per thread */
      const int chunk = t & 7;
      int32_t token[GATHER_ROWS]; /* x's row of each of this thread's rows; -1: padding */
#pragma unroll
      for (int j = 0; j < GATHER_ROWS; ++j) {
        const int32_t slot = GATHER ? p.sorted_token_ids[m0 + (t >> 3) + 16 * j] : -1;
        token[j] = slot >= 0 && slot < p.num_slots ? slot / p.gather_top_k : -1;
      }
      if (t == 0) {
        if (!GATHER) tma_prefetch_map(&a_map);
        tma_prefetch_map(&b_map);
      }
      const int32_t b_row = expert * p.n + n0; /* host checked EL * n + BN < 2^31 */
      int s = 0;
      uint32_t phase = 0;
      for (int kt = 0; kt < k_tiles; ++kt) {
        mbar_wait(smem_addr(&empty_bar[s]), phase ^ 1u);
        const uint32_t full = smem_addr(&full_bar[s]);
        const uint32_t stage = smem + (uint32_t)(s * S::STAGE_BYTES);
        if (t == 0) {
          mbar_arrive_expect_tx(full, GATHER ? S::B_BYTES : S::STAGE_BYTES);
          if (!GATHER) tma_load_2d(stage, &a_map, full, kt * WG_BK, (int32_t)m0);
          tma_load_2d(stage + S::A_BYTES, &b_map, full, kt * WG_BK, b_row);
        }
        if (GATHER) {
          const int k = kt * WG_BK + 8 * chunk; /* k % 8 == 0 and K % 8 == 0 */
#pragma unroll
          for (int j = 0; j < GATHER_ROWS; ++j) {
            const bool in = token[j] >= 0 && k < p.k;
            cp_async16_zfill(stage + swizzled_chunk((t >> 3) + 16 * j, chunk),
                             in ? p.gather_x + (int64_t)token[j] * p.k + k : p.gather_x,
                             in ? 16u : 0u);
          }
          cp_async_mbar_arrive_noinc(full);
        }
        if (++s == STAGES) {
          s = 0;
          phase ^= 1u;
        }
      }
    }
  } else {
    setmaxnreg_inc<WG_CONSUMER_REGS>();
    /* BM 128: rows 64 wg .. 64 wg + 63 of the tile, all columns; BM 64:
     * every row, columns WG_N wg .. WG_N wg + WG_N - 1. */
    const int wg = warpgroup - 1;
    const int row0 = BM == 128 ? 64 * wg : 0, col0 = BM == 128 ? 0 : S::WG_N * wg;
    const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
    float acc[S::WG_N / 2];
#pragma unroll
    for (int i = 0; i < S::WG_N / 2; ++i)
      acc[i] = 0.0f;
    /* B's rows are 128 bytes apart: column c's row starts at c * 128. */
    const uint64_t desc_a = smem_desc(smem + (uint32_t)(row0 * WG_BK * 2));
    const uint64_t desc_b = smem_desc(smem + (uint32_t)(S::A_BYTES + col0 * WG_BK * 2));
    int s = 0, prev = 0;
    uint32_t phase = 0;
    for (int kt = 0; kt < k_tiles; ++kt) {
      mbar_wait(smem_addr(&full_bar[s]), phase);
      /* The gathered rows came through the generic proxy (cp.async);
       * wgmma reads through the async proxy. */
      if (GATHER) fence_proxy_async_shared();
      const uint64_t stage = (uint64_t)((s * S::STAGE_BYTES) >> 4);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < WG_BK / 16; ++kk)
        wgmma_k16<S::WG_N>(acc, desc_a + stage + 2 * kk, desc_b + stage + 2 * kk);
      wgmma_commit();
      /* The previous k-tile's wgmmas are done: its stage may be refilled. */
      wgmma_wait<1>();
      if (kt > 0 && lane == 0) mbar_arrive(smem_addr(&empty_bar[prev]));
      prev = s;
      if (++s == STAGES) {
        s = 0;
        phase ^= 1u;
      }
    }
    wgmma_wait<0>();
    fence_registers(acc);

    /* Epilogue: this thread's rows are r and r + 8 of the tile. */
    const int r = row0 + warp * 16 + (lane >> 2);
    int64_t pos[2];
    int32_t slot[2];
    bool real[2];
    float weight[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      pos[h] = m0 + r + 8 * h;
      slot[h] = p.sorted_token_ids[pos[h]];
      real[h] = slot[h] >= 0 && slot[h] < p.num_slots;
      weight[h] = real[h] && p.routed_weight != MOE_GEMM_ROUTED_WEIGHT_NONE
                      ? p.topk_weights[slot[h]]
                      : 1.0f;
    }
    const float *bias = p.bias ? p.bias + (int64_t)expert * p.n : NULL;
#pragma unroll
    for (int j = 0; j < S::WG_N / 8; ++j) {
      const int col = n0 + col0 + 8 * j + 2 * (lane & 3);
      if (col >= p.n) continue; /* n % 8 == 0: col + 1 < n too */
      const float b0 = bias ? bias[col] : 0.0f, b1 = bias ? bias[col + 1] : 0.0f;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float v0 = cuda_apply_routed(acc[4 * j + 2 * h], b0, weight[h], p.routed_weight);
        const float v1 = cuda_apply_routed(acc[4 * j + 2 * h + 1], b1, weight[h], p.routed_weight);
        if (EPI != HOPPER_STORE) {
          /* Columns 2c, 2c+1 are gate c and up c: h_sorted[p][c]. */
          const float v =
              real[h] ? cuda_gated_activation((moe_activation)(EPI - 1), p.alpha, p.limit, v0, v1)
                      : 0.0f;
          p.c[pos[h] * p.ldc + col / 2] = __float2bfloat16_rn(v);
        } else if (real[h]) {
          *(__nv_bfloat162 *)(p.c + (int64_t)slot[h] * p.ldc + col) = __floats2bfloat162_rn(v0, v1);
        }
      }
    }
  }
#else
  __trap(); /* the host launches this only where sm_90a code runs */
#endif
}

/* ---- the row permute ---------------------------------------------------- */

/* xs[p] = x[sorted[p] / top_k] for p < min(*ntpp, rows_cap), zeros for
 * padding rows. A warp per row, rows strided over the grid; each lane
 * moves PERMUTE_BATCH 16-byte chunks at a time, all loads before the
 * stores, so that a row of up to 4096 elements takes one round trip to
 * memory (four chunks at a time cost 1-3% at Mixtral and gpt-oss 256
 * tokens, whose rows then took 3-4). (A block per row, one
 * chunk per thread, took 78 us at Qwen3 4096 tokens on an H200 under ncu,
 * 49% of DRAM peak, most of its 49k blocks exiting at once past *ntpp:
 * bench/cuda_notes.md item 21.) */
#define PERMUTE_BATCH 16
#define PERMUTE_WARPS 8

__global__ void __launch_bounds__(32 * PERMUTE_WARPS)
    wgmma_permute_kernel(const bf16 *x, bf16 *xs, int64_t hidden, const int32_t *sorted_token_ids,
                         const int32_t *ntpp, int64_t num_slots, int32_t top_k, int64_t rows_cap) {
  cuda_grid_dependency_wait();
  cuda_allow_dependents();
  const int64_t rows = min((int64_t)*ntpp, rows_cap);
  const int64_t chunks = hidden / 8;
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t)gridDim.x * PERMUTE_WARPS;
  for (int64_t p = blockIdx.x * (int64_t)PERMUTE_WARPS + (threadIdx.x >> 5); p < rows; p += warps) {
    const int32_t slot = sorted_token_ids[p];
    const bool real = slot >= 0 && slot < num_slots;
    const uint4 *src = (const uint4 *)(x + (real ? (int64_t)(slot / top_k) : 0) * hidden);
    uint4 *dst = (uint4 *)(xs + p * hidden);
    for (int64_t c0 = lane; c0 < chunks; c0 += 32 * PERMUTE_BATCH) {
      uint4 v[PERMUTE_BATCH];
#pragma unroll
      for (int b = 0; b < PERMUTE_BATCH; ++b) {
        const int64_t c = c0 + 32 * b;
        /* A plain load, not __ldg: the compiler may sink a non-coherent
         * load below the stores before it and pair each load with its
         * store (two in flight, seen in the SASS); a plain load may alias
         * dst, so all of them stay ahead of the stores. */
        v[b] = real && c < chunks ? src[c] : make_uint4(0u, 0u, 0u, 0u);
      }
#pragma unroll
      for (int b = 0; b < PERMUTE_BATCH; ++b)
        if (c0 + 32 * b < chunks) dst[c0 + 32 * b] = v[b];
    }
  }
}

/* ---- host side ---------------------------------------------------------- */

bool cuda_wgmma_available(int cc_major, int cc_minor) {
#if defined(MOE_CUDA_SM90A)
  return cc_major == 9 && cc_minor == 0;
#else
  (void)cc_major;
  (void)cc_minor;
  return false;
#endif
}

template <int BN, int STAGES, int EPI, bool GATHER = false, int BM = WG_BM>
static bool set_smem_limit() {
  return hopper_set_smem_limit(wgmma_gemm_kernel<BN, STAGES, EPI, GATHER, BM>,
                               wg_shape<BN, STAGES, BM>::SMEM_BYTES);
}

/* Every epilogue; the gathering variants exist for GEMM1's (GLU) only. */
template <int BN, int STAGES, int BM = WG_BM> static bool set_smem_limits() {
  return set_smem_limit<BN, STAGES, HOPPER_STORE, false, BM>() &&
         set_smem_limit<BN, STAGES, HOPPER_GLU_SWIGLU, false, BM>() &&
         set_smem_limit<BN, STAGES, HOPPER_GLU_GEGLU, false, BM>() &&
         set_smem_limit<BN, STAGES, HOPPER_GLU_SWIGLU_CLAMP, false, BM>() &&
         set_smem_limit<BN, STAGES, HOPPER_GLU_SWIGLU, true, BM>() &&
         set_smem_limit<BN, STAGES, HOPPER_GLU_GEGLU, true, BM>() &&
         set_smem_limit<BN, STAGES, HOPPER_GLU_SWIGLU_CLAMP, true, BM>();
}

bool cuda_wgmma_init(void) {
  return set_smem_limits<256, WG_STAGES_256>() && set_smem_limits<128, WG_STAGES_128>() &&
         set_smem_limits<128, WG_STAGES_NARROW, WG_BM_NARROW>();
}

/* cuTensorMapEncodeTiled from the driver, or NULL (no driver, or one older
 * than CUDA 12.0). Looked up once. */
static PFN_cuTensorMapEncodeTiled_v12000 encode_tiled(void) {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void *entry = NULL;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &entry,
                                                             12000, cudaEnableDefault, &found);
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      entry = NULL;
    }
    return (PFN_cuTensorMapEncodeTiled_v12000)entry;
  }();
  return fn;
}

bool cuda_tma_map_bf16(cuda_tma_map *out, const void *base, int64_t rows, int64_t cols,
                       int box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = encode_tiled();
  if (!encode || !base || ((uintptr_t)base & 15u) != 0 || rows <= 0 || cols <= 0 || cols % 8 != 0 ||
      rows > ((int64_t)1 << 32) || cols > ((int64_t)1 << 32) || box_rows <= 0 || box_rows > 256)
    return false;
  CUtensorMap map; /* the type is 64-byte aligned, as the encoder needs */
  const cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
  const cuuint64_t strides[1] = {(cuuint64_t)cols * sizeof(bf16)}; /* bytes, multiple of 16 */
  const cuuint32_t box[2] = {WG_BK, (cuuint32_t)box_rows};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r =
      encode(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void *>(base), dims, strides,
             box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE /* zeros */);
  if (r != CUDA_SUCCESS) return false;
  memcpy(out, &map, sizeof map);
  return true;
}

int cuda_wgmma_pick_bn(const cuda_state *st, int block_m, int64_t rows_bound, int64_t n) {
  if (block_m == WG_BM_NARROW) return 128; /* the 64-row tile's only BN */
  if (st->wgmma_bn_option == 128 || st->wgmma_bn_option == 256) return st->wgmma_bn_option;
  /* The wide tile (twice the arithmetic intensity per shared-memory byte)
   * unless it would leave SMs without a CTA. */
  const int64_t m_tiles = (rows_bound + WG_BM - 1) / WG_BM;
  return m_tiles * ((n + 255) / 256) >= st->sm_count ? 256 : 128;
}

moe_status cuda_wgmma_permute(const cuda_state *st, const bf16 *x, bf16 *xs, int64_t hidden,
                              const int32_t *sorted_token_ids, const int32_t *ntpp,
                              int64_t num_slots, int32_t top_k, int64_t rows_bound) {
  /* A warp per row up to 16 blocks per SM; the rest of the rows by stride. */
  int64_t blocks = (rows_bound + PERMUTE_WARPS - 1) / PERMUTE_WARPS;
  if (blocks > 16 * (int64_t)st->sm_count) blocks = 16 * (int64_t)st->sm_count;
  if (blocks < 1) blocks = 1;
  const cudaError_t err =
      cuda_launch(st, true, wgmma_permute_kernel, dim3((unsigned)blocks), dim3(32 * PERMUTE_WARPS),
                  0, x, xs, hidden, sorted_token_ids, ntpp, num_slots, top_k, rows_bound);
  if (err != cudaSuccess) return cuda_status(err, "wgmma_permute_kernel launch");
  return cuda_launch_status("wgmma_permute_kernel");
}

template <int BN, int STAGES, int EPI, bool GATHER = false, int BM = WG_BM>
static cudaError_t launch_gemm(const cuda_state *st, unsigned ctas, const CUtensorMap &a,
                               const CUtensorMap &b, const wgmma_params &p) {
  return cuda_launch(st, true, wgmma_gemm_kernel<BN, STAGES, EPI, GATHER, BM>, dim3(ctas),
                     dim3(WG_THREADS), (size_t)wg_shape<BN, STAGES, BM>::SMEM_BYTES, a, b, p);
}

moe_status cuda_wgmma_gemm_run(const cuda_state *st, const cuda_wgmma_gemm *g) {
  const bool narrow = g->block_m == WG_BM_NARROW;
  if ((g->bn != 128 && g->bn != 256) || g->n <= 0 || g->k <= 0 || g->n % 8 != 0 || g->k % 8 != 0 ||
      (g->block_m != WG_BM && !(narrow && g->bn == 128)))
    return moe_set_error(MOE_ERROR_INTERNAL, "wgmma GEMM with bn %d, n %d, k %d, block_m %d", g->bn,
                         g->n, g->k, g->block_m);
  const int64_t m_tiles = (g->rows_bound + g->block_m - 1) / g->block_m;
  const int64_t n_tiles = (g->n + g->bn - 1) / g->bn;
  if (m_tiles <= 0) return MOE_SUCCESS;
  if (m_tiles * n_tiles > INT_MAX)
    return moe_set_error(MOE_ERROR_UNSUPPORTED, "wgmma GEMM grid of %lld tiles is too large",
                         (long long)(m_tiles * n_tiles));
  const int epi = hopper_epilogue_of(g);
  if (epi < 0) return MOE_ERROR_INTERNAL;
  const bool gather = g->gather_x != NULL;
  if (gather && (epi == HOPPER_STORE || g->gather_top_k <= 0 || ((uintptr_t)g->gather_x & 15u)))
    return moe_set_error(MOE_ERROR_INTERNAL, "wgmma gather needs GEMM1, top_k and an aligned x");
  wgmma_params p{};
  static_cast<hopper_gemm_params &>(p) = *g;
  p.m_tiles = (int32_t)m_tiles;
  p.n_tiles = (int32_t)n_tiles;
  p.gather_x = g->gather_x;
  p.gather_top_k = g->gather_top_k;
  CUtensorMap a, b;
  memcpy(&a, g->a_map, sizeof a);
  memcpy(&b, g->b_map, sizeof b);
  const unsigned ctas = (unsigned)(m_tiles * n_tiles);
  typedef cudaError_t (*launcher)(const cuda_state *, unsigned, const CUtensorMap &,
                                  const CUtensorMap &, const wgmma_params &);
  /* [bn == 256][epilogue] */
  static const launcher launchers[2][4] = {
      {launch_gemm<128, WG_STAGES_128, HOPPER_STORE>,
       launch_gemm<128, WG_STAGES_128, HOPPER_GLU_SWIGLU>,
       launch_gemm<128, WG_STAGES_128, HOPPER_GLU_GEGLU>,
       launch_gemm<128, WG_STAGES_128, HOPPER_GLU_SWIGLU_CLAMP>},
      {launch_gemm<256, WG_STAGES_256, HOPPER_STORE>,
       launch_gemm<256, WG_STAGES_256, HOPPER_GLU_SWIGLU>,
       launch_gemm<256, WG_STAGES_256, HOPPER_GLU_GEGLU>,
       launch_gemm<256, WG_STAGES_256, HOPPER_GLU_SWIGLU_CLAMP>},
  };
  /* Gathering GEMM1: [bn == 256][GLU epilogue - 1] */
  static const launcher gathering[2][3] = {
      {launch_gemm<128, WG_STAGES_128, HOPPER_GLU_SWIGLU, true>,
       launch_gemm<128, WG_STAGES_128, HOPPER_GLU_GEGLU, true>,
       launch_gemm<128, WG_STAGES_128, HOPPER_GLU_SWIGLU_CLAMP, true>},
      {launch_gemm<256, WG_STAGES_256, HOPPER_GLU_SWIGLU, true>,
       launch_gemm<256, WG_STAGES_256, HOPPER_GLU_GEGLU, true>,
       launch_gemm<256, WG_STAGES_256, HOPPER_GLU_SWIGLU_CLAMP, true>},
  };
  /* The 64-row tile (BN 128): [epilogue], and gathering [GLU epilogue - 1] */
  static const launcher narrow_launchers[4] = {
      launch_gemm<128, WG_STAGES_NARROW, HOPPER_STORE, false, WG_BM_NARROW>,
      launch_gemm<128, WG_STAGES_NARROW, HOPPER_GLU_SWIGLU, false, WG_BM_NARROW>,
      launch_gemm<128, WG_STAGES_NARROW, HOPPER_GLU_GEGLU, false, WG_BM_NARROW>,
      launch_gemm<128, WG_STAGES_NARROW, HOPPER_GLU_SWIGLU_CLAMP, false, WG_BM_NARROW>};
  static const launcher narrow_gathering[3] = {
      launch_gemm<128, WG_STAGES_NARROW, HOPPER_GLU_SWIGLU, true, WG_BM_NARROW>,
      launch_gemm<128, WG_STAGES_NARROW, HOPPER_GLU_GEGLU, true, WG_BM_NARROW>,
      launch_gemm<128, WG_STAGES_NARROW, HOPPER_GLU_SWIGLU_CLAMP, true, WG_BM_NARROW>};
  const int wide = g->bn == 256 ? 1 : 0;
  const launcher launch = narrow   ? (gather ? narrow_gathering[epi - 1] : narrow_launchers[epi])
                          : gather ? gathering[wide][epi - 1]
                                   : launchers[wide][epi];
  const cudaError_t err = launch(st, ctas, a, b, p);
  if (err != cudaSuccess) return cuda_status(err, "wgmma_gemm_kernel launch");
  return cuda_launch_status("wgmma_gemm_kernel");
}
