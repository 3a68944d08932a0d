/*
 * grouped_gemm.cu - the grouped BF16 GEMM over align's metadata, on tensor
 * cores (mma.sync m16n8k16, fp32 accumulation), plus a plain reference
 * kernel for the shapes the fast path declines.
 *
 * Tensor-core kernel contract (gemm_mma_kernel<Tile, B_KN, EPILOGUE>):
 *   - One CTA owns a BM x BN tile of c: BM consecutive entries of
 *     sorted_token_ids (inside one align block, so one expert) times BN
 *     output columns. BM divides align's block_m.
 *   - Rows are gathered: row r reads a[slot / top_k] (per token) or a[slot]
 *     (per slot); sentinel rows are zero-filled and never stored.
 *   - K advances in BK steps through a STAGES-deep cp.async ring (16-byte
 *     copies, zero-fill past the edges), so STAGES-1 tiles are in flight
 *     while the tensor cores work on one.
 *   - Warps form WARPS_M x WARPS_N; each owns (BM/WARPS_M) x (BN/WARPS_N)
 *     of the tile as m16n8 accumulators, fed by ldmatrix (.trans for the
 *     IN_OUT layout, whose tiles are stored k-major).
 *   - Shared rows are padded by 16 bytes, so the 8 rows an ldmatrix reads
 *     fall in distinct banks.
 *   - Epilogue: bias, routed weight (before or after the bias) and either a
 *     bf16 store or the gated activation of interleaved gate/up columns
 *     (GLU: columns 2i and 2i+1 are gate i and up i, written as h[i]).
 *   - CTAs are rasterized in groups of 8 row tiles, so that a wave of CTAs
 *     shares both its A rows and its B tiles in L2.
 * Needs n, k, and the row strides to be multiples of 8 elements and the
 * pointers 16-byte aligned; otherwise the reference kernel runs.
 *
 * Decode (at most GEMV_MAX_ROWS_PER_EXPERT rows per expert on average, long
 * weight rows, OUT_IN weights) takes gemm_gemv_kernel instead: weight streaming on the CUDA
 * cores with more bytes in flight (see its comment).
 *
 * Tile choice is data: tile_rules below maps rows per expert to a tile
 * (measurements: bench/cuda_notes.md, 'Measurements behind the code's
 * rules'); for 16-row tiles the widest BN that still gives every SM two
 * CTAs (to within 10%) is taken.
 * Option cuda.tile=<name> forces one tile (cuda.tile=gemv the decode
 * kernel), so that a sweep can rerun without rebuilding. A batch-invariant
 * layer's GEMMs (cuda_gemm.fixed_tile) run the 64x128 tile for every T.
 * Prefill on Hopper runs on gemm_wgmma.cu instead (wgmma fed by TMA); the
 * layer forward in cuda_backend.cu picks the path.
 */
#include "activation_math.cuh"
#include "cuda_internal.cuh"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

typedef __nv_bfloat16 bf16;

/* The sorted positions a kernel may read: the caller's
 * num_tokens_post_padded clamped to [0, bound], where bound is align's
 * padded-row bound (T*k + (block_m - 1) * min(T*k, EL), which every align
 * capacity and every grid here covers). With expert ids checked against
 * [0, EL) and slot ids against [0, T*k), corrupt metadata cannot make a
 * kernel index outside its buffers (include/moe.h, moe_grouped_gemm). */
__device__ __forceinline__ int64_t gemm_position_limit(const cuda_gemm &g) {
  const int64_t slots = g.num_tokens * g.top_k;
  const int64_t touched = slots < g.num_local_experts ? slots : (int64_t)g.num_local_experts;
  const int64_t bound = slots + (int64_t)(g.block_m - 1) * touched;
  const int64_t padded = *g.num_tokens_post_padded;
  return padded < 0 ? 0 : (padded < bound ? padded : bound);
}

/* ---- PTX wrappers ------------------------------------------------------- */

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool valid) {
  const unsigned dst = (unsigned)__cvta_generic_to_shared(smem);
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void *smem) {
  const unsigned addr = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void *smem) {
  const unsigned addr = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                               unsigned b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
               "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* ---- tiles ------------------------------------------------------------- */

template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_> struct tile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, STAGES = STAGES_;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MI = WM / 16, NI = WN / 8;
  static_assert(WM % 16 == 0 && WN % 16 == 0, "a warp owns whole m16 rows and n16 pairs");
  static constexpr int A_LD = BK + 8;
  static constexpr int A_STAGE = BM * A_LD;
  template <bool KN> __host__ __device__ static constexpr int b_ld() { return (KN ? BN : BK) + 8; }
  template <bool KN> __host__ __device__ static constexpr int b_stage() {
    return (KN ? BK : BN) * b_ld<KN>();
  }
  template <bool KN> __host__ __device__ static constexpr int smem_bytes() {
    return STAGES * (A_STAGE + b_stage<KN>()) * (int)sizeof(bf16);
  }
};

/* The tiles: name, BM, BN, BK, WARPS_M, WARPS_N, STAGES. */
#define CUDA_TILES(X)                                                                              \
  X(16x32, 16, 32, 128, 1, 2, 4)       /* decode, few CTAs */                                      \
  X(16x64, 16, 64, 128, 1, 4, 4)       /* decode: streams B */                                     \
  X(16x64k64, 16, 64, 64, 1, 4, 6)     /* decode, more CTAs per SM */                              \
  X(16x128, 16, 128, 64, 1, 8, 4)      /* decode, 8 warps */                                       \
  X(16x32k256, 16, 32, 256, 1, 2, 3)   /* decode, long rows per stage */                           \
  X(32x64, 32, 64, 64, 1, 4, 4)        /* small batches */                                         \
  X(32x128, 32, 128, 64, 2, 4, 4)      /* small batches, streams B */                              \
  X(64x128, 64, 128, 64, 2, 4, 3)      /* medium */                                                \
  X(128x128, 128, 128, 32, 2, 4, 4)    /* prefill */                                               \
  X(128x128k64, 128, 128, 64, 2, 4, 3) /* prefill, fewer barriers */                               \
  X(128x256, 128, 256, 32, 2, 4, 3)    /* prefill, 64x64 per warp */

#define CUDA_TILE_TYPEDEF(name, bm, bn, bk, wm, wn, stages)                                        \
  typedef tile<bm, bn, bk, wm, wn, stages> tile_##name;
CUDA_TILES(CUDA_TILE_TYPEDEF)
#define CUDA_TILE_ENUM(name, ...) TILE_##name,
enum tile_id { CUDA_TILES(CUDA_TILE_ENUM) TILE_COUNT };
#define CUDA_TILE_NAME(name, ...) #name,
static const char *const tile_names[TILE_COUNT] = {CUDA_TILES(CUDA_TILE_NAME)};
#define CUDA_TILE_BM(name, bm, ...) bm,
static const int tile_block_m[TILE_COUNT] = {CUDA_TILES(CUDA_TILE_BM)};

/* Rows per expert (average over touched experts) -> tile. First match. */
struct tile_rule {
  int64_t max_rows_per_expert;
  tile_id id;
};
/* From sweeps of forced tiles: 16-row tiles while experts rarely get more
 * than 16 rows (else the weights stream twice), 32x128 up to 20 rows per
 * expert, 32x64 around 24, 64x128 from 32, 128x128 when prefill is
 * compute-bound (measurements: bench/cuda_notes.md, 'Measurements behind
 * the code's rules'). */
static const tile_rule tile_rules[] = {
    {10, TILE_16x64},
    {20, TILE_32x128},
    {28, TILE_32x64},
    {96, TILE_64x128},
    {INT64_MAX, TILE_128x128k64},
};

/* ---- the tensor-core kernel -------------------------------------------- */

template <class T, bool B_KN, int EPILOGUE>
__global__ void __launch_bounds__(T::THREADS)
    gemm_mma_kernel(const cuda_gemm g, int m_tiles, int n_tiles) {
  constexpr int BM = T::BM, BN = T::BN, BK = T::BK, STAGES = T::STAGES, THREADS = T::THREADS;
  constexpr int MI = T::MI, NI = T::NI, WM = T::WM, WN = T::WN, A_LD = T::A_LD;
  constexpr int B_LD = T::template b_ld<B_KN>();
  constexpr int A_STAGE = T::A_STAGE, B_STAGE = T::template b_stage<B_KN>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16 *const a_smem = (bf16 *)smem_raw;
  bf16 *const b_smem = a_smem + STAGES * A_STAGE;
  __shared__ int64_t a_row[BM];  /* element offset of the row in a, or -1 */
  __shared__ int32_t c_slot[BM]; /* slot written by the row, or -1 */
  cuda_grid_dependency_wait();
  cuda_allow_dependents();

  /* Grouped raster: GROUP_M row tiles share each column tile in turn. The
   * grid has at most INT_MAX tiles (launch_tile), so 32-bit division does:
   * 64-bit division is a long subroutine, and a decode GEMM's CTAs all wait
   * for their code to come from DRAM at start-up (bench/cuda_notes.md, 13). */
  constexpr int GROUP_M = 8;
  const int tile_index = (int)blockIdx.x;
  const int group_tiles = GROUP_M * n_tiles;
  const int first_m = tile_index / group_tiles * GROUP_M;
  const int group_m = min(m_tiles - first_m, GROUP_M);
  const int in_group = tile_index % group_tiles;
  const int m_tile = first_m + in_group % group_m;
  const int n_tile = in_group / group_m;
  const int64_t m0 = (int64_t)m_tile * BM;
  const int n0 = n_tile * BN;
  const int64_t limit = gemm_position_limit(g);
  if (m0 >= limit) return;
  /* block_m is a power of two (align's contract): its block by a shift. */
  const int expert = g.expert_ids[m0 >> (__ffs(g.block_m) - 1)];
  if (expert < 0 || expert >= g.num_local_experts) return;

  const int64_t num_slots = g.num_tokens * g.top_k;
#pragma unroll 1 /* one pass in every tile (BM <= THREADS): no unrolled copies */
  for (int r = threadIdx.x; r < BM; r += THREADS) {
    const int32_t slot = m0 + r < limit ? g.sorted_token_ids[m0 + r] : -1;
    const bool real = slot >= 0 && slot < num_slots;
    c_slot[r] = real ? slot : -1;
    a_row[r] = real ? (g.input_per_slot ? (int64_t)slot : (int64_t)(slot / g.top_k)) * g.lda : -1;
  }
  __syncthreads();

  const bf16 *const b_expert = g.b + (int64_t)expert * g.b_expert_stride;
  auto load_stage = [&](int stage, int k0) {
    bf16 *as = a_smem + stage * A_STAGE;
    bf16 *bs = b_smem + stage * B_STAGE;
    constexpr int A_CHUNKS = BM * BK / 8;
#pragma unroll
    for (int i = threadIdx.x; i < A_CHUNKS; i += THREADS) {
      const int r = i / (BK / 8), c = (i % (BK / 8)) * 8;
      const int64_t off = a_row[r];
      const bool ok = off >= 0 && k0 + c < g.k;
      cp_async16(as + r * A_LD + c, ok ? g.a + off + k0 + c : g.a, ok);
    }
    constexpr int B_CHUNKS = BN * BK / 8;
#pragma unroll
    for (int i = threadIdx.x; i < B_CHUNKS; i += THREADS) {
      if (!B_KN) { /* rows are n, 16-byte chunks along k */
        const int r = i / (BK / 8), c = (i % (BK / 8)) * 8;
        const bool ok = n0 + r < g.n && k0 + c < g.k;
        cp_async16(bs + r * B_LD + c, ok ? b_expert + (int64_t)(n0 + r) * g.ldb + k0 + c : g.b, ok);
      } else { /* rows are k, chunks along n */
        const int r = i / (BN / 8), c = (i % (BN / 8)) * 8;
        const bool ok = k0 + r < g.k && n0 + c < g.n;
        cp_async16(bs + r * B_LD + c, ok ? b_expert + (int64_t)(k0 + r) * g.ldb + n0 + c : g.b, ok);
      }
    }
  };

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warp_m = warp % T::WARPS_M, warp_n = warp / T::WARPS_M;
  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int q = 0; q < 4; ++q)
        acc[mi][ni][q] = 0.0f;

  const int k_tiles = (g.k + BK - 1) / BK;
#pragma unroll 1 /* one copy of load_stage's code for the prologue, not STAGES - 1 */
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < k_tiles) load_stage(s, s * BK);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads(); /* tile kt landed; everyone is done with tile kt - 1 */
    const int next = kt + STAGES - 1;
    if (next < k_tiles) load_stage(next % STAGES, next * BK);
    cp_async_commit();

    const bf16 *as = a_smem + (kt % STAGES) * A_STAGE;
    const bf16 *bs = b_smem + (kt % STAGES) * B_STAGE;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      unsigned af[MI][4], bfrag[NI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
        ldmatrix_x4(af[mi],
                    as + (warp_m * WM + mi * 16 + (lane & 15)) * A_LD + kk + (lane >> 4) * 8);
#pragma unroll
      for (int np = 0; np < NI / 2; ++np) {
        unsigned r[4];
        if (!B_KN)
          ldmatrix_x4(r, bs + (warp_n * WN + np * 16 + (lane & 7) + ((lane >> 4) << 3)) * B_LD +
                             kk + ((lane >> 3) & 1) * 8);
        else
          ldmatrix_x4_trans(r, bs + (kk + (lane & 7) + ((lane >> 3) & 1) * 8) * B_LD + warp_n * WN +
                                   np * 16 + (lane >> 4) * 8);
        bfrag[2 * np][0] = r[0];
        bfrag[2 * np][1] = r[1];
        bfrag[2 * np + 1][0] = r[2];
        bfrag[2 * np + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
          mma_bf16_16816(acc[mi][ni], af[mi], bfrag[ni][0], bfrag[ni][1]);
    }
  }
  cp_async_wait<0>();

  const float *bias = g.bias ? g.bias + (int64_t)expert * g.bias_stride : NULL;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = warp_m * WM + mi * 16 + (lane >> 2) + half * 8;
      const int32_t slot = c_slot[r];
      if (slot < 0) continue;
      const float weight =
          g.routed_weight != MOE_GEMM_ROUTED_WEIGHT_NONE ? g.topk_weights[slot] : 1.0f;
      bf16 *c_row = g.c + (int64_t)slot * g.ldc;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int col = n0 + warp_n * WN + ni * 8 + (lane & 3) * 2;
        if (col >= g.n) continue; /* n % 8 == 0, so col + 1 < n too */
        const float v0 = cuda_apply_routed(acc[mi][ni][2 * half], bias ? bias[col] : 0.0f, weight,
                                           g.routed_weight);
        const float v1 = cuda_apply_routed(acc[mi][ni][2 * half + 1], bias ? bias[col + 1] : 0.0f,
                                           weight, g.routed_weight);
        if (EPILOGUE == CUDA_EPILOGUE_GLU)
          c_row[col / 2] =
              __float2bfloat16_rn(cuda_gated_activation(g.activation, g.alpha, g.limit, v0, v1));
        else
          *(__nv_bfloat162 *)(c_row + col) = __floats2bfloat162_rn(v0, v1);
      }
    }
}

/* ---- the decode kernel: weight streaming on the CUDA cores ------------- */

/*
 * With one or two rows per expert a tensor-core tile multiplies mostly
 * padding, and its cp.async ring keeps too few weight bytes in flight for
 * the few CTAs a decode step has (measurements: bench/cuda_notes.md,
 * 'Measurements behind the code's rules'). Here each warp owns GEMV_N_PER_WARP weight rows (a
 * gate/up pair for the GLU epilogue) and streams them with GEMV_UNROLL 16-byte loads per row in
 * flight per lane, evict-first, so that a resident SM has ~256 KB of
 * weights in flight. Each weight vector feeds up to GEMV_ROWS token rows;
 * a block with more real rows takes another pass (its re-reads mostly hit
 * L2). Partial sums meet in a butterfly; lane 0 runs the epilogue, the
 * same as the tensor-core kernel's. Needs what the tensor-core path needs
 * (k, n, strides multiples of 8, 16-byte aligned pointers), OUT_IN weights.
 */
constexpr int GEMV_WARPS = 8;
constexpr int GEMV_N_PER_WARP = 2;
constexpr int GEMV_ROWS = 4;
constexpr int GEMV_UNROLL = 4;
constexpr int GEMV_K_STEP = 32 * 8; /* elements a warp covers with one 16-byte load per lane */
/* Where the decode kernel beat the tensor-core tiles: at most one row per
 * expert on average (slots <= local experts), and weight rows of at least
 * GEMV_MIN_K elements; with short rows (Qwen3's K = 2048 and 768) or two
 * rows per expert each warp's stream is too short to hide the load
 * latency. A grid of one wave whose warps walk items measured slower than
 * this grid (one CTA per column group and row block). Measurements:
 * bench/cuda_notes.md, 'Measurements behind the code's rules'. */
constexpr int64_t GEMV_MAX_ROWS_PER_EXPERT = 1;
constexpr int64_t GEMV_MIN_K = 2560;

template <bool GLU>
__global__ void __launch_bounds__(GEMV_WARPS * 32, 3) gemm_gemv_kernel(const cuda_gemm g) {
  constexpr int NW = GEMV_N_PER_WARP, R = GEMV_ROWS, U = GEMV_UNROLL;
  cuda_grid_dependency_wait();
  cuda_allow_dependents();
  const int64_t m0 = (int64_t)blockIdx.y * g.block_m;
  const int64_t limit = gemm_position_limit(g);
  if (m0 >= limit) return;
  const int expert = g.expert_ids[blockIdx.y];
  if (expert < 0 || expert >= g.num_local_experts) return;
  const int lane = threadIdx.x & 31;
  const int64_t n0 = ((int64_t)blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5)) * NW;
  if (n0 >= g.n) return; /* no barriers below */

  const int64_t num_slots = g.num_tokens * g.top_k;
  const bf16 *w = g.b + (int64_t)expert * g.b_expert_stride + n0 * g.ldb;
  const float *bias = g.bias ? g.bias + (int64_t)expert * g.bias_stride : NULL;
  for (int r0 = 0; r0 < g.block_m; r0 += R) {
    int32_t slot[R];
    const bf16 *a_row[R];
    bool any = false;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int32_t s =
          r0 + r < g.block_m && m0 + r0 + r < limit ? g.sorted_token_ids[m0 + r0 + r] : -1;
      const bool real = s >= 0 && s < num_slots;
      slot[r] = real ? s : -1;
      a_row[r] =
          real ? g.a + (g.input_per_slot ? (int64_t)s : (int64_t)(s / g.top_k)) * g.lda : NULL;
      any |= real;
    }
    if (!any) continue; /* the same on every lane */

    float acc[NW][R];
#pragma unroll
    for (int j = 0; j < NW; ++j)
#pragma unroll
      for (int r = 0; r < R; ++r)
        acc[j][r] = 0.0f;
    for (int64_t k0 = lane * 8; k0 < g.k; k0 += (int64_t)GEMV_K_STEP * U) {
      uint4 wv[NW][U];
#pragma unroll
      for (int j = 0; j < NW; ++j)
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t kk = k0 + u * GEMV_K_STEP;
          wv[j][u] = (kk < g.k && n0 + j < g.n) ? __ldcs((const uint4 *)(w + j * g.ldb + kk))
                                                : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t kk = k0 + u * GEMV_K_STEP;
        if (kk >= g.k) break;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (!a_row[r]) continue;
          const uint4 av = __ldg((const uint4 *)(a_row[r] + kk));
#pragma unroll
          for (int j = 0; j < NW; ++j)
            acc[j][r] += dot8_bf16(wv[j][u], av);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < NW; ++j)
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1)
          acc[j][r] += __shfl_xor_sync(0xffffffffu, acc[j][r], offset);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (lane != 0 || slot[r] < 0) continue;
      const float weight =
          g.routed_weight != MOE_GEMM_ROUTED_WEIGHT_NONE ? g.topk_weights[slot[r]] : 1.0f;
      bf16 *c_row = g.c + (int64_t)slot[r] * g.ldc;
      float v[NW];
#pragma unroll
      for (int j = 0; j < NW; ++j)
        v[j] = cuda_apply_routed(acc[j][r], bias && n0 + j < g.n ? bias[n0 + j] : 0.0f, weight,
                                 g.routed_weight);
      if (GLU) {
        c_row[n0 / 2] =
            __float2bfloat16_rn(cuda_gated_activation(g.activation, g.alpha, g.limit, v[0], v[1]));
      } else {
#pragma unroll
        for (int j = 0; j < NW; ++j)
          if (n0 + j < g.n) c_row[n0 + j] = __float2bfloat16_rn(v[j]);
      }
    }
  }
}

/* ---- the reference kernel ---------------------------------------------- */

/* One CTA per sorted position, threads over output columns: plain fp32
 * dot products, any shape, any layout, any alignment. */
__global__ void gemm_reference_kernel(const cuda_gemm g) {
  cuda_grid_dependency_wait();
  cuda_allow_dependents();
  const int64_t p = blockIdx.x;
  if (p >= gemm_position_limit(g)) return;
  const int32_t slot = g.sorted_token_ids[p];
  if (slot < 0 || slot >= g.num_tokens * g.top_k) return;
  const int expert = g.expert_ids[p / g.block_m];
  if (expert < 0 || expert >= g.num_local_experts) return;
  const bf16 *a = g.a + (g.input_per_slot ? (int64_t)slot : (int64_t)(slot / g.top_k)) * g.lda;
  const bf16 *b = g.b + (int64_t)expert * g.b_expert_stride;
  const float *bias = g.bias ? g.bias + (int64_t)expert * g.bias_stride : NULL;
  const float weight = g.routed_weight != MOE_GEMM_ROUTED_WEIGHT_NONE ? g.topk_weights[slot] : 1.0f;
  const bool glu = g.epilogue == CUDA_EPILOGUE_GLU;
  const int64_t outputs = glu ? g.n / 2 : g.n;
  bf16 *c_row = g.c + (int64_t)slot * g.ldc;
  auto column = [&](int64_t col) {
    float acc = 0.0f;
    for (int64_t kk = 0; kk < g.k; ++kk) {
      const bf16 w = g.b_kn ? b[kk * g.ldb + col] : b[col * g.ldb + kk];
      acc += __bfloat162float(a[kk]) * __bfloat162float(w);
    }
    return cuda_apply_routed(acc, bias ? bias[col] : 0.0f, weight, g.routed_weight);
  };
  for (int64_t o = (int64_t)blockIdx.y * blockDim.x + threadIdx.x; o < outputs;
       o += (int64_t)gridDim.y * blockDim.x) {
    const float v = glu ? cuda_gated_activation(g.activation, g.alpha, g.limit, column(2 * o),
                                                column(2 * o + 1))
                        : column(o);
    c_row[o] = __float2bfloat16_rn(v);
  }
}

/* ---- dispatch ---------------------------------------------------------- */

template <class T, bool B_KN, int EPILOGUE> static moe_status set_smem_limit() {
  return cuda_status(cudaFuncSetAttribute(gemm_mma_kernel<T, B_KN, EPILOGUE>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          T::template smem_bytes<B_KN>()),
                     "cudaFuncSetAttribute");
}

template <class T> static moe_status set_smem_limits() {
  CUDA_TRY((set_smem_limit<T, false, CUDA_EPILOGUE_STORE>()));
  CUDA_TRY((set_smem_limit<T, false, CUDA_EPILOGUE_GLU>()));
  return set_smem_limit<T, true, CUDA_EPILOGUE_STORE>();
}

moe_status cuda_gemm_init(void) {
#define CUDA_TILE_INIT(name, ...) CUDA_TRY(set_smem_limits<tile_##name>());
  CUDA_TILES(CUDA_TILE_INIT)
  return MOE_SUCCESS;
}

template <class T>
static moe_status launch_tile(const cuda_state *st, const cuda_gemm *g, int64_t m_tiles) {
  const int64_t n_tiles = (g->n + T::BN - 1) / T::BN;
  const int64_t ctas = m_tiles * n_tiles;
  if (ctas > INT_MAX)
    return moe_set_error(MOE_ERROR_UNSUPPORTED, "grouped GEMM grid of %lld tiles is too large",
                         (long long)ctas);
  const dim3 grid((unsigned)ctas), block(T::THREADS);
  const int m = (int)m_tiles, n = (int)n_tiles;
  cudaError_t err;
  if (g->b_kn) {
    if (g->epilogue == CUDA_EPILOGUE_GLU)
      return moe_set_error(MOE_ERROR_INTERNAL, "GLU epilogue needs OUT_IN weights");
    err = cuda_launch(st, true, gemm_mma_kernel<T, true, CUDA_EPILOGUE_STORE>, grid, block,
                      T::template smem_bytes<true>(), *g, m, n);
  } else if (g->epilogue == CUDA_EPILOGUE_GLU) {
    err = cuda_launch(st, true, gemm_mma_kernel<T, false, CUDA_EPILOGUE_GLU>, grid, block,
                      T::template smem_bytes<false>(), *g, m, n);
  } else {
    err = cuda_launch(st, true, gemm_mma_kernel<T, false, CUDA_EPILOGUE_STORE>, grid, block,
                      T::template smem_bytes<false>(), *g, m, n);
  }
  if (err != cudaSuccess) return cuda_status(err, "gemm_mma_kernel launch");
  return cuda_launch_status("gemm_mma_kernel");
}

/* Option cuda.tile=<name> forces a tile (for sweeps), else TILE_COUNT. */
static tile_id forced_tile(const cuda_state *st) {
  for (int i = 0; i < TILE_COUNT; ++i)
    if (strcmp(st->tile_option, tile_names[i]) == 0) return (tile_id)i;
  return TILE_COUNT;
}

/* Option cuda.tile=gemv forces the decode kernel wherever it can run. */
static bool forced_gemv(const cuda_state *st) {
  return strcmp(st->tile_option, "gemv") == 0;
}

/* The decode kernel while experts average at most
 * GEMV_MAX_ROWS_PER_EXPERT rows of at least GEMV_MIN_K (option
 * cuda.gemv_max_rows overrides the rows; 0 turns the kernel off, for A/B
 * runs), unless a tile is forced. */
static bool gemv_wanted(const cuda_state *st, int64_t slots, int32_t num_local_experts, int64_t k) {
  if (forced_gemv(st)) return true;
  if (forced_tile(st) != TILE_COUNT || k < GEMV_MIN_K) return false;
  const int64_t max_rows = st->gemv_max_rows >= 0 ? st->gemv_max_rows : GEMV_MAX_ROWS_PER_EXPERT;
  return cuda_rows_per_expert(slots, num_local_experts) <= max_rows;
}

static tile_id table_tile(const cuda_state *st, int64_t slots, int32_t num_local_experts,
                          int64_t n) {
  const tile_id forced = forced_tile(st);
  if (forced != TILE_COUNT) return forced;
  const int64_t touched = cuda_touched_bound(slots, num_local_experts);
  const int64_t rows_per_expert = cuda_rows_per_expert(slots, num_local_experts);
  tile_id id = TILE_128x128k64;
  for (const tile_rule &rule : tile_rules)
    if (rows_per_expert <= rule.max_rows_per_expert) {
      id = rule.id;
      break;
    }
  /* Decode: the widest tile that still gives every SM two CTAs (BN = 128
   * streams faster than 64), a wave short by under 10% counting as full:
   * Mixtral's GEMM2 at 16 tokens has 256 tiles of 128 columns for 264
   * places on 132 SMs (measurements: bench/cuda_notes.md, 'Measurements
   * behind the code's rules'). */
  if (id == TILE_16x64) {
    const int64_t enough = 2 * (int64_t)st->sm_count;
    if (10 * touched * ((n + 127) / 128) >= 9 * enough)
      id = TILE_16x128;
    else if (touched * ((n + 63) / 64) < enough)
      id = TILE_16x32;
  }
  return id;
}

int32_t cuda_gemm_pick_block_m(const cuda_state *st, int64_t num_slots, int32_t num_local_experts,
                               int64_t n, int64_t k) {
  (void)k;
  if (forced_gemv(st)) return CUDA_GEMM_MIN_BLOCK_M;
  return tile_block_m[table_tile(st, num_slots, num_local_experts, n)];
}

static bool aligned16(const void *p) {
  return ((uintptr_t)p & 15u) == 0;
}

moe_status cuda_gemm_run(const cuda_state *st, const cuda_gemm *g) {
  const int64_t slots = g->num_tokens * g->top_k;
  const int64_t rows = cuda_padded_rows_bound(slots, g->num_local_experts, g->block_m);
  static_assert(CUDA_FIXED_TILE_BLOCK_M == 64, "the fixed tile is 64x128");
  tile_id id = g->fixed_tile ? TILE_64x128 : table_tile(st, slots, g->num_local_experts, g->n);
  /* A row block above align's: the largest rule's tile that fits in it. */
  for (int r = (int)(sizeof tile_rules / sizeof tile_rules[0]) - 1;
       r >= 0 && tile_block_m[id] > g->block_m; --r)
    id = tile_rules[r].id;
  const bool vectors = g->n % 8 == 0 && g->k % 8 == 0 && g->lda % 8 == 0 && g->ldb % 8 == 0 &&
                       g->ldc % 8 == 0 && g->b_expert_stride % 8 == 0 && aligned16(g->a) &&
                       aligned16(g->b) && aligned16(g->c);
  const bool fast = vectors && tile_block_m[id] <= g->block_m;
  const int64_t gemv_blocks = (rows + g->block_m - 1) / g->block_m;
  if (vectors && !g->b_kn && gemv_blocks <= 65535 && !g->fixed_tile &&
      gemv_wanted(st, slots, g->num_local_experts, g->k)) {
    const int64_t n_per_cta = (int64_t)GEMV_WARPS * GEMV_N_PER_WARP;
    const dim3 grid((unsigned)((g->n + n_per_cta - 1) / n_per_cta), (unsigned)gemv_blocks);
    const cudaError_t err =
        g->epilogue == CUDA_EPILOGUE_GLU
            ? cuda_launch(st, true, gemm_gemv_kernel<true>, grid, dim3(GEMV_WARPS * 32), 0, *g)
            : cuda_launch(st, true, gemm_gemv_kernel<false>, grid, dim3(GEMV_WARPS * 32), 0, *g);
    if (err != cudaSuccess) return cuda_status(err, "gemm_gemv_kernel launch");
    return cuda_launch_status("gemm_gemv_kernel");
  }
  if (fast) {
    const int bm = tile_block_m[id];
    const int64_t m_tiles = (rows + bm - 1) / bm;
    switch (id) {
#define CUDA_TILE_CASE(name, ...)                                                                  \
  case TILE_##name:                                                                                \
    return launch_tile<tile_##name>(st, g, m_tiles);
      CUDA_TILES(CUDA_TILE_CASE)
    default:
      break;
    }
  }
  const int threads = 128;
  const int64_t outputs = g->epilogue == CUDA_EPILOGUE_GLU ? g->n / 2 : g->n;
  int64_t col_blocks = (outputs + threads - 1) / threads;
  if (col_blocks > 65535) col_blocks = 65535;
  if (rows > INT_MAX)
    return moe_set_error(MOE_ERROR_UNSUPPORTED, "grouped GEMM of %lld rows is too large",
                         (long long)rows);
  const cudaError_t err =
      cuda_launch(st, true, gemm_reference_kernel, dim3((unsigned)rows, (unsigned)col_blocks),
                  dim3(threads), 0, *g);
  if (err != cudaSuccess) return cuda_status(err, "gemm_reference_kernel launch");
  return cuda_launch_status("gemm_reference_kernel");
}
