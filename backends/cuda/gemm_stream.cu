/*
 * gemm_stream.cu - the Hopper (sm_90a) weight-streaming grouped GEMM: for
 * a few to a few dozen rows per expert, each expert's weight rows are the
 * M side of warpgroup MMA (wgmma) and its gathered token rows the N side
 * (operands swapped), so that every tensor-core instruction consumes 64
 * weight rows straight from a TMA ring and none multiplies padding rows of
 * a 64- or 128-row token tile.
 *
 * Data flow (cuda_backend.cu, when the plan takes this path): align with
 * block_m = NT (16, 32, 64 or 128) -> the permute of gemm_wgmma.cu (xs[p] =
 * x[sorted[p] / top_k]) -> GEMM1 (w13 x xs^T, GLU epilogue into h_sorted[p])
 * -> GEMM2 (w2 x h_sorted^T, routed weight, y[slot]) -> the usual reduce.
 *
 * Kernel (stream_gemm_kernel<NT, EPI, CTAS>):
 *   - Work item: (NT-row block of one expert, 128 output features). A
 *     persistent grid (one CTA per SM; two at NT 16, each with half the
 *     ring: option cuda.stream_ctas) walks the items in groups of m-blocks
 *     (the tuning row's stream_group, option cuda.stream_group): every
 *     128-feature tile of a group before the next group, m-block fastest
 *     inside it, so that an expert of several blocks reads each tile while
 *     it is in L2, and CTAs running together read neighbouring tiles of a
 *     few experts (measured faster than m-block fastest over all blocks:
 *     cuda_tuning.cu). The item count depends on *num_tokens_post_padded, read on
 *     the device only (no host synchronization).
 *   - Schedule: round robin over the CTAs (static), or claimed from a
 *     counter by whichever CTA is free (option cuda.stream_schedule=
 *     dynamic). The producer picks the units and tells the consumers, with
 *     each stage, which unit it belongs to (stage_meta), so that only the
 *     producer walks the schedule.
 *   - 288 threads: two consumer warpgroups (64 features each) and one
 *     producer warp whose lane 0 issues the TMA loads. The producer runs
 *     ahead across item boundaries, so the next item's weights stream while
 *     the consumers run an epilogue.
 *   - A stage is 128 elements of K: two 64-wide boxes (128-byte swizzle) of
 *     the 128 weight rows and of the NT token rows: 256 contiguous bytes
 *     per weight row and step. STAGES stages (6, 5, 4, 3 at NT 16, 32,
 *     64, 128) keep 96-192 KB of weights in flight per SM (bench/cuda_notes.md,
 *     item 18). Option cuda.stream_k=256 (token block 16 only): four
 *     boxes per stage, 512 contiguous bytes per weight row, three 72 KB
 *     stages and one CTA per SM. full[s] completes with the stage's TMA bytes; empty[s]
 *     when the 8 consumer warps have retired the wgmmas that read it. TMA
 *     fills zeros past K (also a box wholly past it, in the last step when
 *     K % 128 <= 64) and past the last expert's rows, so every step
 *     multiplies two full boxes: a wgmma issue that depends on data would
 *     be serialized by the compiler.
 *   - Register j of a consumer thread holds D[feature][token] at feature
 *     16 w + l / 4 + 8 ((j / 2) % 2) of its warpgroup's 64 and token
 *     8 (j / 4) + 2 (l % 4) + j % 2 (lane l of warp w). Features 2c and
 *     2c + 1 (a gate/up pair of the interleaved w13, or two adjacent output
 *     columns) are in lanes l and l ^ 4: one shuffle gives each lane of
 *     the pair both values for one of its two tokens. GLU writes
 *     h_sorted[p][c] (zeros for padding rows, which GEMM2 reads); STORE
 *     writes a bf16 pair of y[slot] for real rows only.
 *
 * Overlapped launch (option cuda.stream_overlap, on): both GEMMs are
 * dependent launches; the producer requests its first ring of weights
 * before griddepcontrol.wait, so GEMM1's weights stream during the permute
 * and GEMM2's during GEMM1's tail (cuda_stream_gemm_run says why reading
 * the align metadata before the wait is safe).
 *
 * Split K (cuda_stream_splits): where the items would leave the last round
 * of the persistent grid short (few experts, or few features), each item's
 * K is cut into up to 4 ranges computed as separate work units. Each unit
 * stores its fp32 sums in the context's split workspace and counts itself
 * in the item's counter (an atomic on the counter only); the unit that
 * finishes last adds the partial sums in split order and runs the epilogue,
 * then zeroes the counter for the next forward.
 *
 * Deterministic: every output element is a fixed-order sum, whichever CTA
 * finishes an item last. Device code exists only in the sm_90a pass.
 */
#include "activation_math.cuh"
#include "cuda_internal.cuh"
#include "hopper_gemm.cuh"
#include "wgmma_ptx.cuh"

#include <cuda.h>

#include <limits.h>
#include <string.h>

typedef __nv_bfloat16 bf16;

/* ---- shape -------------------------------------------------------------- */

#define ST_BM CUDA_STREAM_FEATURES /* weight rows (output features) per item */
#define ST_BOX_K 64                /* one 128-byte swizzle row of bf16 */
#define ST_BOXES 2                 /* boxes per stage: 128 elements of K */
#define ST_WIDE_BOXES 4            /* option cuda.stream_k=256: 256 elements, token block 16 only */
#define ST_CONSUMER_WARPS 8        /* two warpgroups */
#define ST_THREADS (32 * ST_CONSUMER_WARPS + 32) /* + the producer warp */
#define ST_SMEM_BUDGET (220 * 1024)              /* of the 228 KB an SM has, per SM */

/* CTAS resident CTAs per SM share the budget (2: only at NT 16, whose
 * three 36 KB stages fit in half of it). */
template <int NT, int CTAS = 1, int BOXES = ST_BOXES> struct st_shape {
  static constexpr int W_BOX = ST_BM * ST_BOX_K * 2;
  static constexpr int X_BOX = NT * ST_BOX_K * 2;
  static constexpr int STAGE_BYTES = BOXES * (W_BOX + X_BOX);
  static constexpr int BUDGET = ST_SMEM_BUDGET / CTAS;
  static constexpr int STAGES = BUDGET / STAGE_BYTES < 8 ? BUDGET / STAGE_BYTES : 8;
  /* + 1024: the base is aligned up to the swizzle period in the kernel. */
  static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + 1024;
  static_assert(W_BOX % 1024 == 0 && X_BOX % 1024 == 0, "boxes keep 1024-byte alignment");
  static_assert(STAGES >= 3, "a ring of at least three stages");
  static_assert(NT % 8 == 0 && NT >= 8 && NT <= 256, "wgmma n and TMA box rows");
};

/* The persistent grid's work and split K on top of the shared parameters. */
struct stream_params : hopper_gemm_params {
  int32_t n_tiles;     /* ceil(n / ST_BM) */
  int32_t m_tiles_cap; /* NT-row blocks the buffers hold */
  /* Raster: items go in groups of group_m token blocks, token block fastest
   * inside a group (group_m >= the blocks: token block fastest overall). */
  int32_t group_m;
  /* Split K: each item's k steps in `splits` ranges of k_steps_per_split
   * (1: no split). partial holds [item][split][256 consumer threads x NT/2]
   * fp32; counters[item] counts finished splits and is left at 0. */
  int32_t splits, k_steps_per_split;
  float *partial;
  int32_t *counters;
  /* Dynamic schedule (option cuda.stream_schedule): NULL, or two counters
   * of this GEMM (claimed units past the first wave, CTAs done claiming),
   * left at 0 by the last CTA to finish claiming. */
  uint32_t *claims;
  /* Overlapped launch: the producer issues the first ring's weight boxes
   * before waiting for the kernel before (which wrote only the token rows;
   * the align metadata is older, see cuda_stream_gemm_run). */
  int32_t weights_before_wait;
};

/* ---- the kernel --------------------------------------------------------- */

/* Where work unit `unit` lies: unit u is item u % items and split
 * u / items of its K; items run in groups of group_m token blocks (all
 * n tiles of a group before the next group), token block fastest inside
 * a group. */
struct unit_coords {
  int64_t item;
  int split, m_tile, n_tile;
};

__device__ __forceinline__ unit_coords coords_of(const stream_params &p, int64_t unit,
                                                 int64_t items, int32_t m_count) {
  unit_coords u;
  u.item = unit % items;
  u.split = (int)(unit / items);
  const int64_t per_group = (int64_t)p.group_m * p.n_tiles;
  const int64_t group = u.item / per_group;
  const int64_t in_group = u.item - group * per_group;
  const int32_t m_first = (int32_t)group * p.group_m;
  const int32_t blocks = min(p.group_m, m_count - m_first);
  u.m_tile = m_first + (int32_t)(in_group % blocks);
  u.n_tile = (int32_t)(in_group / blocks);
  return u;
}

/* What the producer tells the consumers about the stage it fills: the
 * work unit (-1: no more units, the consumers finish), its local expert
 * and the stage's k step. Written before the stage's arrive (release),
 * read after its wait (acquire). */
struct stage_meta {
  int64_t unit;
  int32_t expert;
  int32_t ks;
};

/* The producer's walk over its k steps: next() moves to the next step of
 * this CTA's units (skipping other ranks' experts) and says false past the
 * last, once. Units come round robin (unit += gridDim.x) or, with the
 * dynamic schedule, from a counter shared by the grid, claimed one unit
 * ahead so that the atomic's latency hides behind a unit's stream. */
struct step_walk {
  const stream_params *p;
  int64_t unit, pending, units, items;
  int32_t m_count;
  int k_steps, ks, ks_end;
  int expert;
  /* The unit's token block and feature tile, found once per unit: each
   * stage's box rows follow from them without coords_of's four 64-bit
   * divisions, which the producer's one thread ran twice per stage
   * between its empty-barrier wait and the stage's TMA issue. */
  int32_t m_tile, n_tile;

  __device__ step_walk(const stream_params &params, int64_t units_, int64_t items_,
                       int32_t m_count_, int k_steps_)
      : p(&params), unit(-1), pending(blockIdx.x), units(units_), items(items_), m_count(m_count_),
        k_steps(k_steps_), ks(0), ks_end(0), expert(-1), m_tile(0), n_tile(0) {}

  __device__ int64_t claim_after(int64_t current) const {
    if (!p->claims) return current + gridDim.x;
    return (int64_t)gridDim.x + (int64_t)atomicAdd(&p->claims[0], 1u);
  }

  __device__ bool next() {
    if (++ks < ks_end) return true;
    for (;;) {
      unit = pending;
      if (unit >= units) return false;
      pending = claim_after(unit);
      const unit_coords u = coords_of(*p, unit, items, m_count);
      const int e = p->expert_ids[u.m_tile];
      if (e < 0 || e >= p->num_local_experts) continue; /* another rank's expert */
      expert = e;
      m_tile = u.m_tile;
      n_tile = u.n_tile;
      ks = u.split * p->k_steps_per_split;
      ks_end = min(k_steps, ks + p->k_steps_per_split);
      if (ks < ks_end) return true;
    }
  }

  /* This CTA claims no more: the last CTA to get here zeroes the counters
   * for the next launch (every claim of this launch has returned). */
  __device__ void finish() const {
    if (p->claims && atomicAdd(&p->claims[1], 1u) == gridDim.x - 1) {
      atomicExch(&p->claims[0], 0u);
      atomicExch(&p->claims[1], 0u);
    }
  }

  __device__ stage_meta meta() const {
    stage_meta m;
    m.unit = unit;
    m.expert = expert;
    m.ks = ks;
    return m;
  }
};

/* Where a stage's boxes come from. */
__device__ __forceinline__ int32_t weight_row(const stream_params &p, const stage_meta &m,
                                              int64_t items, int32_t m_count) {
  /* host checked EL * n + ST_BM < 2^31 */
  return m.expert * p.n + coords_of(p, m.unit, items, m_count).n_tile * ST_BM;
}
template <int NT>
__device__ __forceinline__ int32_t token_row(const stream_params &p, const stage_meta &m,
                                             int64_t items, int32_t m_count) {
  /* host checked the sorted rows < 2^31 */
  return coords_of(p, m.unit, items, m_count).m_tile * NT;
}

#ifdef MOE_WGMMA_DEVICE
/* Barrier `id` over `threads` threads (a multiple of 32): the consumer
 * warpgroups meet without the producer warp. */
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
#endif

template <int NT, int EPI, int CTAS, int BOXES>
__global__ void __launch_bounds__(ST_THREADS, CTAS)
    stream_gemm_kernel(const __grid_constant__ CUtensorMap w_map,
                       const __grid_constant__ CUtensorMap x_map, const stream_params p) {
#ifdef MOE_WGMMA_DEVICE
  typedef st_shape<NT, CTAS, BOXES> S;
  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) uint64_t full_bar[S::STAGES];
  __shared__ __align__(8) uint64_t empty_bar[S::STAGES];
  __shared__ stage_meta meta[S::STAGES];

  const uint32_t smem = (smem_addr(smem_raw) + 1023u) & ~1023u;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < S::STAGES; ++s) {
      mbar_init(smem_addr(&full_bar[s]), 1);
      mbar_init(smem_addr(&empty_bar[s]), ST_CONSUMER_WARPS);
    }
    mbar_init_fence();
  }
  __syncthreads();
  /* Overlapped: the metadata is read and the first weights requested
   * before the wait (the producer's below); the consumers wait here. */
  const bool overlapped = p.weights_before_wait != 0;
  const bool producer = threadIdx.x / 32 == ST_CONSUMER_WARPS;
  if (!overlapped || !producer) {
    cuda_grid_dependency_wait();
    cuda_allow_dependents();
  }

  /* The items of this forward: every thread derives the same sequence. */
  const int32_t padded = *p.num_tokens_post_padded;
  const int32_t m_count = min((padded + NT - 1) / NT, p.m_tiles_cap);
  const int64_t items = (int64_t)m_count * p.n_tiles;
  const int64_t units = items * p.splits; /* unit u: item u % items, split u / items */
  const int k_steps = (p.k + ST_BOX_K * BOXES - 1) / (ST_BOX_K * BOXES);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;

  if (producer) {
    /* Producer: lane 0 alone; the others finish (no CTA barrier follows). */
    if (lane != 0) {
      if (overlapped) cuda_grid_dependency_wait(), cuda_allow_dependents();
      return;
    }
    tma_prefetch_map(&w_map);
    tma_prefetch_map(&x_map);
    step_walk steps(p, units, items, m_count, k_steps);
    int s = 0;
    uint32_t phase = 0;
    bool more = true;
    if (overlapped) {
      /* The weight boxes of the first ring (one stage per step) go out
       * first; their stages expect the token boxes too, which follow the
       * wait, so no stage completes before its tokens are in. */
      int early = 0;
      for (; early < S::STAGES && (more = steps.next()); ++early) {
        const uint32_t stage = smem + (uint32_t)(early * S::STAGE_BYTES);
        const uint32_t full = smem_addr(&full_bar[early]);
        meta[early] = steps.meta();
        mbar_arrive_expect_tx(full, (uint32_t)S::STAGE_BYTES);
        const int32_t w_row = weight_row(p, meta[early], items, m_count);
#pragma unroll
        for (int b = 0; b < BOXES; ++b)
          tma_load_2d(stage + b * S::W_BOX, &w_map, full,
                      steps.ks * ST_BOX_K * BOXES + b * ST_BOX_K, w_row);
      }
      cuda_grid_dependency_wait();
      cuda_allow_dependents();
      for (int e = 0; e < early; ++e) {
        const uint32_t stage = smem + (uint32_t)(e * S::STAGE_BYTES);
        const int32_t x_row = token_row<NT>(p, meta[e], items, m_count);
#pragma unroll
        for (int b = 0; b < BOXES; ++b)
          tma_load_2d(stage + BOXES * S::W_BOX + b * S::X_BOX, &x_map, smem_addr(&full_bar[e]),
                      meta[e].ks * ST_BOX_K * BOXES + b * ST_BOX_K, x_row);
      }
      s = early % S::STAGES;
      phase = early == S::STAGES ? 1u : 0u;
    }
    while (more && (more = steps.next())) {
      const uint32_t full = smem_addr(&full_bar[s]);
      const uint32_t stage = smem + (uint32_t)(s * S::STAGE_BYTES);
      mbar_wait(smem_addr(&empty_bar[s]), phase ^ 1u);
      meta[s] = steps.meta();
      mbar_arrive_expect_tx(full, (uint32_t)S::STAGE_BYTES);
      const int k0 = steps.ks * ST_BOX_K * BOXES;
      /* weight_row and token_row of this unit, from the walk's tiles */
      const int32_t w_row = steps.expert * p.n + steps.n_tile * ST_BM;
      const int32_t x_row = steps.m_tile * NT;
#pragma unroll
      for (int b = 0; b < BOXES; ++b)
        tma_load_2d(stage + b * S::W_BOX, &w_map, full, k0 + b * ST_BOX_K, w_row);
#pragma unroll
      for (int b = 0; b < BOXES; ++b)
        tma_load_2d(stage + BOXES * S::W_BOX + b * S::X_BOX, &x_map, full, k0 + b * ST_BOX_K,
                    x_row);
      if (++s == S::STAGES) {
        s = 0;
        phase ^= 1u;
      }
    }
    /* No more units: the next stage says so, without data. */
    mbar_wait(smem_addr(&empty_bar[s]), phase ^ 1u);
    meta[s].unit = -1;
    mbar_arrive(smem_addr(&full_bar[s]));
    steps.finish();
    return;
  }

  /* Consumers: warpgroup wg owns features 64 wg .. 64 wg + 63 of an item;
   * the producer says which unit each stage belongs to. */
  const int wg = warp / 4, warp_in_wg = warp & 3;
  const uint64_t desc_w = smem_desc(smem + (uint32_t)(wg * 64 * ST_BOX_K * 2));
  const uint64_t desc_x = smem_desc(smem + (uint32_t)(BOXES * S::W_BOX));
  const bool odd = (lane >> 2) & 1; /* this lane holds the up rows (odd features) */
  __shared__ int last_split;        /* this CTA finished an item's last split */
  const int ctid = threadIdx.x;     /* 0..255 over the consumers */
  int s = 0;
  uint32_t phase = 0;
  for (;;) {
    mbar_wait(smem_addr(&full_bar[s]), phase);
    /* Lane 0 alone reads the stage's meta and hands it to its warp: every
     * thread that reads it then also arrives on the stage's empty barrier
     * (racecheck reported lanes 1-31's reads against the producer's next
     * write, bench/cuda_notes.md item 22). */
    stage_meta m = {0, 0, 0};
    if (lane == 0) m = meta[s];
    const int64_t unit = __shfl_sync(0xffffffffu, lane == 0 ? m.unit : 0, 0);
    if (unit < 0) break;
    const int expert = __shfl_sync(0xffffffffu, lane == 0 ? m.expert : 0, 0);
    const int ks_begin = __shfl_sync(0xffffffffu, lane == 0 ? m.ks : 0, 0);
    const unit_coords u = coords_of(p, unit, items, m_count);
    const int64_t item = u.item;
    const int split = u.split, m_tile = u.m_tile, n_tile = u.n_tile;
    /* The epilogue's rows, loaded now so that their latency hides behind
     * the k loop: this thread's tokens are 8 j + 2 (l % 4) + e, j < NT / 8. */
    const int64_t m0 = (int64_t)m_tile * NT;
    int32_t slot[NT / 8][2];
    float weight[NT / 8][2];
#pragma unroll
    for (int j = 0; j < NT / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int32_t id = p.sorted_token_ids[m0 + 8 * j + 2 * (lane & 3) + e];
        slot[j][e] = id >= 0 && id < p.num_slots ? id : -1;
        weight[j][e] = 1.0f;
      }
    float acc[NT / 2];
#pragma unroll
    for (int i = 0; i < NT / 2; ++i)
      acc[i] = 0.0f;
    int prev = 0;
    const int ks_end = min(k_steps, (split + 1) * p.k_steps_per_split);
    const int weights_step = min(ks_begin + 1, ks_end - 1);
    for (int ks = ks_begin; ks < ks_end; ++ks) {
      if (ks > ks_begin) mbar_wait(smem_addr(&full_bar[s]), phase);
      const uint64_t stage = (uint64_t)((s * S::STAGE_BYTES) >> 4);
      wgmma_fence();
#pragma unroll
      for (int b = 0; b < BOXES; ++b) {
        const uint64_t w_box = stage + (uint64_t)((b * S::W_BOX) >> 4);
        const uint64_t x_box = stage + (uint64_t)((b * S::X_BOX) >> 4);
#pragma unroll
        for (int kk = 0; kk < ST_BOX_K / 16; ++kk)
          wgmma_k16<NT>(acc, desc_w + w_box + 2 * kk, desc_x + x_box + 2 * kk);
      }
      wgmma_commit();
      /* The rows' routed weights one step later, when their slots are in
       * (loaded after the unit's first wait). */
      if (ks == weights_step && p.routed_weight != MOE_GEMM_ROUTED_WEIGHT_NONE) {
#pragma unroll
        for (int j = 0; j < NT / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e)
            if (slot[j][e] >= 0) weight[j][e] = p.topk_weights[slot[j][e]];
      }
      /* The previous step's wgmmas are done: its stage may be refilled.
       * The warp meets first, so that lane 0's arrival also orders the
       * other lanes' reads of the stage's meta before the producer
       * rewrites it (racecheck still reports that pair: it does not follow
       * the order through the warp barrier; bench/cuda_notes.md item 22). */
      wgmma_wait<1>();
      if (ks > ks_begin) {
        __syncwarp();
        if (lane == 0) mbar_arrive(smem_addr(&empty_bar[prev]));
      }
      prev = s;
      if (++s == S::STAGES) {
        s = 0;
        phase ^= 1u;
      }
    }
    wgmma_wait<0>();
    __syncwarp();
    if (lane == 0) mbar_arrive(smem_addr(&empty_bar[prev]));
    fence_registers(acc);

    if (p.splits > 1) {
      /* Publish this split's sums; the CTA that finishes an item's last
       * split adds all of them in split order (the same bits whichever CTA
       * that is), then runs the epilogue. */
      const int64_t per_split = (int64_t)(32 * ST_CONSUMER_WARPS) * (NT / 2);
      float *mine = p.partial + (item * p.splits + split) * per_split;
#pragma unroll
      for (int i = 0; i < NT / 2; ++i)
        mine[i * 32 * ST_CONSUMER_WARPS + ctid] = acc[i];
      __threadfence();
      named_barrier_sync(1, 32 * ST_CONSUMER_WARPS);
      if (ctid == 0) last_split = atomicAdd(&p.counters[item], 1) == p.splits - 1;
      named_barrier_sync(1, 32 * ST_CONSUMER_WARPS);
      if (!last_split) continue;
      __threadfence();
      const float *all = p.partial + item * p.splits * per_split;
#pragma unroll
      for (int i = 0; i < NT / 2; ++i) {
        float sum = 0.0f;
        for (int sp = 0; sp < p.splits; ++sp)
          sum += __ldcg(all + sp * per_split + i * 32 * ST_CONSUMER_WARPS + ctid);
        acc[i] = sum;
      }
      if (ctid == 0) p.counters[item] = 0; /* ready for the next forward */
    }

    /* Epilogue. */
    const float *bias = p.bias ? p.bias + (int64_t)expert * p.n : NULL;
    const int f_base = n_tile * ST_BM + wg * 64 + warp_in_wg * 16 + (lane >> 2);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int f = f_base + 8 * h;     /* this lane's feature; even on even lanes */
      const int pair = f & ~1;          /* the pair's first feature */
      const bool in_range = pair < p.n; /* n is even: pair + 1 < n too */
      const float b = bias && f < p.n ? bias[f] : 0.0f;
#pragma unroll
      for (int j = 0; j < NT / 8; ++j) {
        const float v0 = cuda_apply_routed(acc[4 * j + 2 * h], b, weight[j][0], p.routed_weight);
        const float v1 =
            cuda_apply_routed(acc[4 * j + 2 * h + 1], b, weight[j][1], p.routed_weight);
        /* Even lanes keep token e = 0 and receive the odd feature of it;
         * odd lanes keep e = 1 and receive the even feature. */
        const float other = __shfl_xor_sync(0xffffffffu, odd ? v0 : v1, 4);
        const float lo = odd ? other : v0, hi = odd ? v1 : other;
        /* selects, not an index: a run-time index puts the arrays in local memory */
        const int32_t my_slot = odd ? slot[j][1] : slot[j][0];
        if (!in_range) continue;
        if (EPI != HOPPER_STORE) {
          const int64_t row = m0 + 8 * j + 2 * (lane & 3) + (odd ? 1 : 0);
          const float v = my_slot >= 0 ? cuda_gated_activation((moe_activation)(EPI - 1), p.alpha,
                                                               p.limit, lo, hi)
                                       : 0.0f;
          p.c[row * p.ldc + pair / 2] = __float2bfloat16_rn(v);
        } else if (my_slot >= 0) {
          *(__nv_bfloat162 *)(p.c + (int64_t)my_slot * p.ldc + pair) =
              __floats2bfloat162_rn(lo, hi);
        }
      }
    }
  }
#else
  __trap(); /* the host launches this only where sm_90a code runs */
#endif
}

/* ---- host side ---------------------------------------------------------- */

template <int NT, int EPI, int CTAS, int BOXES> static bool set_smem_limit() {
  return hopper_set_smem_limit(stream_gemm_kernel<NT, EPI, CTAS, BOXES>,
                               st_shape<NT, CTAS, BOXES>::SMEM_BYTES);
}

template <int NT, int CTAS = 1, int BOXES = ST_BOXES> static bool set_smem_limits() {
  return set_smem_limit<NT, HOPPER_STORE, CTAS, BOXES>() &&
         set_smem_limit<NT, HOPPER_GLU_SWIGLU, CTAS, BOXES>() &&
         set_smem_limit<NT, HOPPER_GLU_GEGLU, CTAS, BOXES>() &&
         set_smem_limit<NT, HOPPER_GLU_SWIGLU_CLAMP, CTAS, BOXES>();
}

bool cuda_stream_init(void) {
  return set_smem_limits<16>() && set_smem_limits<16, 2>() &&
         set_smem_limits<16, 1, ST_WIDE_BOXES>() && set_smem_limits<32>() &&
         set_smem_limits<64>() && set_smem_limits<128>();
}

/*
 * Splits of K for `items` work items of k_steps steps on `sms` persistent
 * CTAs: the count (1..4, each split at least two steps) whose units fill
 * the last round of the grid best; a split must gain more than 5% of
 * round efficiency to be taken, since it costs a store and a reload of the
 * partial sums. Items past four rounds are balanced enough unsplit.
 */
int cuda_stream_splits(int64_t items, int k_steps, int sms) {
  if (items <= 0 || sms <= 0 || items >= 4 * (int64_t)sms) return 1;
  int best = 1;
  double best_fill = 0.0;
  for (int splits = 1; splits <= 4; ++splits) {
    const int per = (k_steps + splits - 1) / splits;
    if (splits > 1 && (per < 2 || (splits - 1) * per >= k_steps)) break;
    const int64_t units = items * splits;
    const int64_t rounds = (units + sms - 1) / sms;
    const double fill = (double)units / (double)(rounds * sms);
    if (splits == 1 || fill > best_fill + 0.05) {
      best = splits;
      best_fill = fill;
    }
  }
  return best;
}

int cuda_stream_rows_index(int rows) {
  switch (rows) {
  case 16:
    return 0;
  case 32:
    return 1;
  case 64:
    return 2;
  case 128:
    return 3;
  default:
    return -1;
  }
}

template <int NT, int EPI, int CTAS = 1, int BOXES = ST_BOXES>
static cudaError_t launch_stream(const cuda_state *st, unsigned ctas, const CUtensorMap &w,
                                 const CUtensorMap &x, const stream_params &p) {
  return cuda_launch(st, true, stream_gemm_kernel<NT, EPI, CTAS, BOXES>, dim3(ctas),
                     dim3(ST_THREADS), (size_t)st_shape<NT, CTAS, BOXES>::SMEM_BYTES, w, x, p);
}

moe_status cuda_stream_gemm_run(const cuda_state *st, const cuda_wgmma_gemm *g) {
  const int index = cuda_stream_rows_index(g->block_m);
  if (index < 0 || g->n <= 0 || g->k <= 0 || g->n % 8 != 0 || g->k % 8 != 0)
    return moe_set_error(MOE_ERROR_INTERNAL, "stream GEMM with block_m %d, n %d, k %d", g->block_m,
                         g->n, g->k);
  const int64_t m_tiles = (g->rows_bound + g->block_m - 1) / g->block_m;
  const int64_t n_tiles = (g->n + ST_BM - 1) / ST_BM;
  if (m_tiles <= 0) return MOE_SUCCESS;
  if (m_tiles * n_tiles > INT_MAX)
    return moe_set_error(MOE_ERROR_UNSUPPORTED, "stream GEMM of %lld items is too large",
                         (long long)(m_tiles * n_tiles));
  const int epi = hopper_epilogue_of(g);
  if (epi < 0) return MOE_ERROR_INTERNAL;
  stream_params p{};
  static_cast<hopper_gemm_params &>(p) = *g;
  p.n_tiles = (int32_t)n_tiles;
  p.m_tiles_cap = (int32_t)m_tiles;
  /* Raster: groups of the tuning row's token blocks (option
   * cuda.stream_group overrides), token block fastest inside a group so
   * that an expert's blocks read its tiles while they are in L2. */
  const int32_t group = st->stream_group > 0 ? st->stream_group : st->tuning->stream_group;
  p.group_m = group > 0 && group < m_tiles ? group : (int32_t)m_tiles;
  /* Stages of 256 elements of K (option cuda.stream_k=256): token block
   * 16 only, one CTA per SM (three 72 KB stages take its shared memory). */
  const bool wide = index == 0 && st->stream_k == 256;
  const int boxes = wide ? ST_WIDE_BOXES : ST_BOXES;
  const int k_steps = (g->k + ST_BOX_K * boxes - 1) / (ST_BOX_K * boxes);
  p.splits = 1;
  p.k_steps_per_split = k_steps;
  const int64_t items = m_tiles * n_tiles;
  const int64_t per_split_bytes = (int64_t)ST_BM * g->block_m * (int64_t)sizeof(float);
  /* Two CTAs per SM (option cuda.stream_ctas, token block 16 only): each
   * with half the ring, so that one streams while the other runs its
   * epilogue. */
  const int per_sm = index == 0 && st->stream_ctas == 2 && !wide ? 2 : 1;
  const int64_t slots = (int64_t)per_sm * st->sm_count;
  const int splits = cuda_stream_splits(items, k_steps, (int)slots);
  if (splits > 1 && st->split_partial && items <= st->split_counters_len &&
      items * splits * per_split_bytes <= st->split_partial_bytes) {
    p.splits = splits;
    p.k_steps_per_split = (k_steps + splits - 1) / splits;
    p.partial = st->split_partial;
    p.counters = st->split_counters;
  }
  /* Dynamic schedule (option cuda.stream_schedule): a CTA that finishes
   * its unit early takes the next one, so that SMs served faster by the
   * memory system do more of the work. Each GEMM of a forward has its own
   * two counters: GEMM2 may claim while GEMM1's last CTAs run, and the
   * same GEMM of the next forward claims only after this one finished (the
   * kernels between them each wait for their predecessor). */
  if (st->stream_dynamic && st->split_counters)
    p.claims = (uint32_t *)(st->split_counters + CUDA_STREAM_SPLIT_COUNTERS +
                            (epi == HOPPER_STORE ? 2 : 0));
  /* Overlapped launch (Hopper): the kernel may start while the one before
   * it runs and request its first weights before waiting. It reads the
   * align metadata before the wait too, which is safe only because the
   * kernel before it (the permute or GEMM1) waits for its own predecessor
   * before it lets a dependent start: the metadata's writer, align, has
   * then finished. */
  cuda_state overlapped = *st;
  overlapped.pdl = st->hopper && g->overlapped;
  p.weights_before_wait = overlapped.pdl;
  st = &overlapped;
  CUtensorMap w, x;
  memcpy(&w, g->b_map, sizeof w);
  memcpy(&x, g->a_map, sizeof x);
  /* One wave of persistent CTAs (per_sm per SM: the rings take the shared
   * memory), never more than the work units. */
  const int64_t units = items * p.splits;
  const unsigned ctas = (unsigned)(units < slots ? units : slots);
  typedef cudaError_t (*launcher)(const cuda_state *, unsigned, const CUtensorMap &,
                                  const CUtensorMap &, const stream_params &);
  /* [rows index][epilogue] */
  static const launcher launchers[4][4] = {
      {launch_stream<16, HOPPER_STORE>, launch_stream<16, HOPPER_GLU_SWIGLU>,
       launch_stream<16, HOPPER_GLU_GEGLU>, launch_stream<16, HOPPER_GLU_SWIGLU_CLAMP>},
      {launch_stream<32, HOPPER_STORE>, launch_stream<32, HOPPER_GLU_SWIGLU>,
       launch_stream<32, HOPPER_GLU_GEGLU>, launch_stream<32, HOPPER_GLU_SWIGLU_CLAMP>},
      {launch_stream<64, HOPPER_STORE>, launch_stream<64, HOPPER_GLU_SWIGLU>,
       launch_stream<64, HOPPER_GLU_GEGLU>, launch_stream<64, HOPPER_GLU_SWIGLU_CLAMP>},
      {launch_stream<128, HOPPER_STORE>, launch_stream<128, HOPPER_GLU_SWIGLU>,
       launch_stream<128, HOPPER_GLU_GEGLU>, launch_stream<128, HOPPER_GLU_SWIGLU_CLAMP>},
  };
  static const launcher two_per_sm[4] = {
      launch_stream<16, HOPPER_STORE, 2>, launch_stream<16, HOPPER_GLU_SWIGLU, 2>,
      launch_stream<16, HOPPER_GLU_GEGLU, 2>, launch_stream<16, HOPPER_GLU_SWIGLU_CLAMP, 2>};
  static const launcher wide_k[4] = {launch_stream<16, HOPPER_STORE, 1, ST_WIDE_BOXES>,
                                     launch_stream<16, HOPPER_GLU_SWIGLU, 1, ST_WIDE_BOXES>,
                                     launch_stream<16, HOPPER_GLU_GEGLU, 1, ST_WIDE_BOXES>,
                                     launch_stream<16, HOPPER_GLU_SWIGLU_CLAMP, 1, ST_WIDE_BOXES>};
  const cudaError_t err = (wide          ? wide_k[epi]
                           : per_sm == 2 ? two_per_sm[epi]
                                         : launchers[index][epi])(st, ctas, w, x, p);
  if (err != cudaSuccess) return cuda_status(err, "stream_gemm_kernel launch");
  return cuda_launch_status("stream_gemm_kernel");
}
