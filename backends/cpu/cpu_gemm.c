/*
 * cpu_gemm.c - the grouped GEMM driver of the CPU backend (see cpu_gemm.h).
 *
 * Work item = (expert run chunk of about item_rows rows (the path's), group of
 * <= CPU_GROUP_PANELS panels of 32 output columns). Items are handed out
 * dynamically to the OpenMP threads; within an expert the chunks of one
 * panel group are consecutive, so threads working on the same expert share
 * its weights in the last-level cache. Decode (one row per expert) still
 * has experts x groups items, so every core streams weights. An expert with
 * no rows has no run and costs nothing.
 *
 * Inside an item: for each K block of CPU_KC_PAIRS k-pairs (fewer on few
 * threads: CPU_KC_PAIRS_FEW_THREADS), each tile of
 * <= tile_rows rows is gathered and packed (A, L1-resident) and the
 * kernel sweeps the group's panels (B slices, L2-resident), accumulating
 * into an fp32 C tile; the epilogue then rounds to bf16. While they run,
 * the tiles after a block's first request the next block's slices into L2
 * (cpu_weight_prefetch), so that only an item's first block waits on
 * memory, and the block's last tile runs its requests on into the next
 * block's first steps, so that no block starts cold. Splitting K into
 * blocks stores and reloads the fp32 accumulator exactly, so the
 * per-element reduction order of cpu_kernels.h is kept.
 *
 * A path with an in-place entry (AMX: tileloadd takes any row stride)
 * reads A where it lies when the problem's rows are in sorted order, as the
 * layer's are: the packing above would copy each row once per panel group
 * (112 times for Mixtral's GEMM1), for a kernel that reads it from L1 or L2
 * either way.
 */
#include "cpu_gemm.h"
#include "cpu_vector_clones.h" /* the A packing and the epilogue */

#include "../common/activation_logic.h"
#include "../common/bf16_logic.h"

#include <omp.h>
#include <string.h>

#ifndef CPU_BALANCED_CHUNKS
#define CPU_BALANCED_CHUNKS 1
#endif
/* -DCPU_NEXT_BLOCK_STREAM=0: no next-K-block hints, for A/B builds. */
#ifndef CPU_NEXT_BLOCK_STREAM
#define CPU_NEXT_BLOCK_STREAM 1
#endif
/* -DCPU_FOLLOW_NEXT_BLOCK=0: no requests into the next K block from the
 * end of the last row tile of a block (cpu_weight_prefetch.follow_pairs),
 * for A/B builds. */
#ifndef CPU_FOLLOW_NEXT_BLOCK
#define CPU_FOLLOW_NEXT_BLOCK 1
#endif
/* Near requests in a K block's first row tile only: on few threads
 * (CPU_FEW_THREADS), the row tiles after a block's first skip their near
 * weight requests (cpu_weight_prefetch.near_done), as their weights wait
 * in L2. On 2 pinned cores of AMX hosts that took 0.96, 0.97 and 0.92x
 * the time at Mixtral 512 tokens (128 rows per expert: four row tiles per
 * block) in three calls, and changes nothing where a block has one tile;
 * on 16 threads it took 1.04x there, so the tiles keep their requests
 * (bench/results.md, "CPU: the prepared AMX A/Bs measured").
 * -DCPU_NEAR_FIRST_TILE=0: never, 2: on every thread count (A/B builds). */
#ifndef CPU_NEAR_FIRST_TILE
#define CPU_NEAR_FIRST_TILE 1
#endif
/* K blocks on few threads: a GEMM run by at most CPU_FEW_THREADS threads
 * sweeps K blocks of CPU_KC_PAIRS_FEW_THREADS k-pairs instead of
 * CPU_KC_PAIRS. Then a 32-row AMX tile's A slice (16 KiB) and a panel's
 * weight slice (16 KiB) fit L1 together, so A is not evicted by the
 * weights streaming through every panel. Measured on 2 pinned cores of
 * 16-core AMX hosts, three calls on two host kinds: 0.86, 0.96 and 1.00x
 * the time of 256 (Mixtral 128 tokens 0.90, 0.91 and 0.97x); on 16 threads
 * 1.04x (Mixtral 4096 1.20x), so 256 stays there (bench/results.md, "CPU:
 * the epilogue and A packing compiled for AVX-512F; ..."). The bits do not
 * depend on the K blocks (cpu_kernels.h); 0 keeps CPU_KC_PAIRS everywhere,
 * for A/B builds. */
#ifndef CPU_KC_PAIRS_FEW_THREADS
#define CPU_KC_PAIRS_FEW_THREADS 128
#endif
#define CPU_FEW_THREADS 2 /* see the K blocks above and the near requests */
_Static_assert(CPU_KC_PAIRS_FEW_THREADS % 16 == 0 && CPU_KC_PAIRS_FEW_THREADS <= CPU_KC_PAIRS,
               "K blocks of whole AMX tile steps, within the scratch's A tile");
/* Fewest work items per thread before items get fewer panels
 * (cpu_gemm_execute); 0 keeps CPU_GROUP_PANELS always, for A/B builds. */
#ifndef CPU_MIN_ITEMS_PER_THREAD
#define CPU_MIN_ITEMS_PER_THREAD 4
#endif
#define CPU_CHUNK_ROWS_MAX (CPU_ITEM_ROWS_MAX * 3 / 2) /* see run_chunks */
/* -DCPU_C_TILE_PAD=16 (A/B builds): floats past the group's columns in
 * each row of the fp32 C tile. Without it the rows are 1 KiB apart, so a
 * panel's 32 rows fall into 8 of L1's 64 sets, beside the A and weight
 * lines of the same sets; one more line per row spreads them. */
#ifndef CPU_C_TILE_PAD
#define CPU_C_TILE_PAD 0
#endif
_Static_assert(CPU_C_TILE_PAD % 16 == 0, "C tile rows stay 64-byte aligned");
#define C_TILE_LD (CPU_GROUP_PANELS * CPU_PANEL_COLS + CPU_C_TILE_PAD)
/* The larger of the two A formats at each one's most rows per tile. */
#define A_F32_BYTES ((size_t)CPU_MR_MAX * CPU_A_STRIDE_F32 * sizeof(float))
#define A_U32_BYTES ((size_t)CPU_TILE_ROWS_MAX * CPU_A_STRIDE_U32 * sizeof(uint32_t))
#define A_TILE_BYTES (A_F32_BYTES > A_U32_BYTES ? A_F32_BYTES : A_U32_BYTES)
#define C_TILE_BYTES ((size_t)CPU_CHUNK_ROWS_MAX * C_TILE_LD * sizeof(float))
#define B_GROUP_BYTES ((size_t)CPU_GROUP_PANELS * CPU_KC_PAIRS * CPU_PANEL_PAIR * sizeof(uint16_t))

static int64_t div_up(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}
static int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

int64_t cpu_b_panels(const cpu_b_source *src) {
  return src->gated_half > 0 ? div_up(src->gated_half, CPU_PANEL_COLS / 2)
                             : div_up(src->n, CPU_PANEL_COLS);
}

/* The raw row (out index n) feeding packed column j of a panel, or -1. */
static int64_t source_row(const cpu_b_source *src, int64_t panel, int j) {
  if (src->gated_half > 0) {
    const int half = CPU_PANEL_COLS / 2;
    int64_t col = panel * half + (j % half);
    if (col >= src->gated_half) return -1;
    return j < half ? col : src->gated_half + col;
  }
  int64_t n = panel * CPU_PANEL_COLS + j;
  return n < src->n ? n : -1;
}

void cpu_pack_b_panel(const cpu_b_source *src, const uint16_t *b_expert, int64_t panel, int64_t kp0,
                      int64_t kpairs, uint16_t *dst) {
  int64_t rows[CPU_PANEL_COLS];
  for (int j = 0; j < CPU_PANEL_COLS; ++j)
    rows[j] = source_row(src, panel, j);
  const int64_t K = src->k, N = src->n;
  if (src->layout == MOE_WEIGHT_LAYOUT_OUT_IN) {
    /* Rows of b are contiguous in k: walk each column's row. */
    for (int j = 0; j < CPU_PANEL_COLS; ++j) {
      const uint16_t *row = rows[j] >= 0 ? b_expert + rows[j] * K : NULL;
      for (int64_t kp = 0; kp < kpairs; ++kp)
        for (int h = 0; h < 2; ++h) {
          int64_t k = 2 * (kp0 + kp) + h;
          dst[kp * CPU_PANEL_PAIR + 2 * j + h] = (row && k < K) ? row[k] : 0;
        }
    }
  } else {
    /* Rows of b are contiguous in n: walk k, gather the panel's columns. */
    for (int64_t kp = 0; kp < kpairs; ++kp)
      for (int h = 0; h < 2; ++h) {
        int64_t k = 2 * (kp0 + kp) + h;
        const uint16_t *krow = k < K ? b_expert + k * N : NULL;
        for (int j = 0; j < CPU_PANEL_COLS; ++j)
          dst[kp * CPU_PANEL_PAIR + 2 * j + h] = (krow && rows[j] >= 0) ? krow[rows[j]] : 0;
      }
  }
}

size_t cpu_gemm_scratch_bytes(int b_packed) {
  return A_TILE_BYTES + C_TILE_BYTES + (b_packed ? 0 : B_GROUP_BYTES);
}

/* The A row of row r of a run. */
CPU_CLONE_INLINE const uint16_t *a_row(const cpu_gemm_problem *pb, const cpu_gemm_run *run,
                                       int64_t r) {
  const int64_t index = pb->a_by_position ? run->position + r : run->slots[r] / pb->a_row_div;
  return pb->a + index * pb->lda;
}

/* Gathers the A rows of run rows [row0, row0 + rows), k-pairs
 * [kp0, kp0 + kpairs), into the path's packed format (cpu_kernels.h), zero
 * beyond K. */
CPU_VECTOR_CLONES static void pack_a(const cpu_gemm_problem *pb, const cpu_gemm_run *run,
                                     int64_t row0, int rows, int64_t kp0, int64_t kpairs,
                                     void *dst) {
  const int64_t K = pb->b_source.k, k_begin = 2 * kp0;
  const int64_t width = 2 * kpairs, real = min64(width, K - k_begin);
  for (int r = 0; r < rows; ++r) {
    const uint16_t *row = a_row(pb, run, row0 + r) + k_begin;
    if (pb->path->a_format == CPU_A_FP32) {
      float *d = (float *)dst + (int64_t)r * CPU_A_STRIDE_F32;
      for (int64_t i = 0; i < real; ++i)
        d[i] = moe_bf16_to_float(row[i]);
      for (int64_t i = real; i < width; ++i)
        d[i] = 0.0f;
    } else {
      uint16_t *d = (uint16_t *)((uint32_t *)dst + (int64_t)r * CPU_A_STRIDE_U32);
      memcpy(d, row, (size_t)real * sizeof *d);
      for (int64_t i = real; i < width; ++i)
        d[i] = 0;
    }
  }
}

/* Finishes n accumulators in place: bias (may be NULL) and routed weight,
 * in the order the weight mode fixes. Plain loops, so they vectorize. */
CPU_CLONE_INLINE void finish_values(moe_gemm_routed_weight mode, float *v, const float *bias,
                                    float w, int n) {
  if (mode == MOE_GEMM_ROUTED_WEIGHT_BEFORE_BIAS) {
    for (int j = 0; j < n; ++j)
      v[j] = w * v[j];
    if (bias)
      for (int j = 0; j < n; ++j)
        v[j] = v[j] + bias[j];
  } else {
    if (bias)
      for (int j = 0; j < n; ++j)
        v[j] = v[j] + bias[j];
    if (mode == MOE_GEMM_ROUTED_WEIGHT_AFTER_BIAS)
      for (int j = 0; j < n; ++j)
        v[j] = w * v[j];
  }
}

/* g[j] = act(g[j], u[j]) for j < n: one loop per activation, so that each
 * vectorizes (moe_act_* are branch-free on the CPU). A loop of
 * moe_act_apply vectorizes too, but by evaluating all three formulas and
 * selecting: 4x the time of the silu loop on the development machine. */
CPU_CLONE_INLINE void activate(const cpu_epilogue *ep, float *g, const float *u, int n) {
  const float alpha = ep->alpha, limit = ep->limit;
  switch (ep->activation) {
  case MOE_ACT_GEGLU:
    for (int j = 0; j < n; ++j)
      g[j] = moe_act_gelu_tanh(g[j]) * u[j];
    break;
  case MOE_ACT_SWIGLU_CLAMP:
    for (int j = 0; j < n; ++j)
      g[j] = moe_act_swiglu_clamp(g[j], u[j], alpha, limit);
    break;
  default:
    for (int j = 0; j < n; ++j)
      g[j] = moe_act_silu(g[j]) * u[j];
  }
}

CPU_CLONE_INLINE void store_bf16(uint16_t *dst, const float *src, int n) {
  for (int j = 0; j < n; ++j)
    dst[j] = moe_bf16_from_float(src[j]);
}

/* Rounds a finished C tile (rows x panels) into the output rows; the tile
 * is overwritten on the way. */
CPU_VECTOR_CLONES static void apply_epilogue(const cpu_epilogue *ep, const cpu_gemm_run *run,
                                             int64_t row0, int rows, int64_t panel0, int panels,
                                             float *c) {
  const int32_t expert = run->expert;
  const int32_t *slots = run->slots + row0;
  const float *bias = ep->bias ? ep->bias + (int64_t)expert * ep->bias_stride : NULL;
  const int half = CPU_PANEL_COLS / 2;
  /* The pair rule of a sorted output (cpu_epilogue.out_by_position): the
   * item holding the last column also writes the zero after it. */
  const int64_t cols_end = (panel0 + panels) * (ep->gated ? half : CPU_PANEL_COLS);
  const int zero_after = ep->out_by_position && (ep->n_out & 1) && cols_end >= ep->n_out;
  for (int r = 0; r < rows; ++r) {
    const int64_t s = slots[r];
    const float w = ep->weight_mode != MOE_GEMM_ROUTED_WEIGHT_NONE ? ep->slot_weights[s] : 1.0f;
    const int64_t out_row = ep->out_by_position ? run->position + row0 + r : s;
    uint16_t *out = ep->out + out_row * ep->ld_out;
    float *c_row = c + (int64_t)r * C_TILE_LD;
    if (ep->gated) {
      for (int p = 0; p < panels; ++p) {
        const int64_t col0 = (panel0 + p) * half;
        const int count = (int)min64(half, ep->n_out - col0);
        float *g = c_row + p * CPU_PANEL_COLS, *u = g + half;
        finish_values(ep->weight_mode, g, bias ? bias + col0 : NULL, w, count);
        finish_values(ep->weight_mode, u, bias ? bias + ep->n_out + col0 : NULL, w, count);
        activate(ep, g, u, count);
        store_bf16(out + col0, g, count);
      }
    } else {
      const int64_t col0 = panel0 * CPU_PANEL_COLS;
      const int count = (int)min64((int64_t)panels * CPU_PANEL_COLS, ep->n_out - col0);
      finish_values(ep->weight_mode, c_row, bias ? bias + col0 : NULL, w, count);
      store_bf16(out + col0, c_row, count);
    }
    if (zero_after) out[ep->n_out] = 0;
  }
}

/* An expert's run is cut into round(rows / item_rows) chunks (at least
 * one) of balanced size: each chunk reads its groups' weights from memory
 * once, so with item_rows 128, 140 rows run as one chunk, not as 128 + 12
 * with a whole weight read for 12 rows (about half the experts of a
 * 512-token Mixtral step had a few rows more than 128 when that was the
 * AMX path's item size). A chunk has under 1.5 item_rows rows.
 * -DCPU_BALANCED_CHUNKS=0: fixed chunks of item_rows, for A/B builds. */
static int64_t run_chunks(int64_t rows, int item_rows) {
  if (!CPU_BALANCED_CHUNKS) return div_up(rows, item_rows);
  const int64_t chunks = (2 * rows + item_rows) / (2 * item_rows);
  return chunks > 0 ? chunks : 1;
}

/* The first row of chunk `chunk` of `chunks`; the next chunk's is its end. */
static int64_t chunk_row(int64_t rows, int item_rows, int64_t chunks, int64_t chunk) {
  if (!CPU_BALANCED_CHUNKS) return min64(chunk * item_rows, rows);
  return chunk * rows / chunks;
}

/* Rows per tile call for a chunk of `rows` rows: one tile up to the path's
 * one_tile_rows, else the fewest tiles, balanced in whole row blocks of
 * the path. Vector paths (blocks of 1 row): 13 rows run as 7 + 6, not
 * 12 + 1. AMX (16): 40 rows run as one tile of the 4 x 1 kernel; 80 as
 * 32 + 32 + 16, five 16-row blocks of tdpbf16ps, not 27 + 27 + 26, six. */
static int tile_rows_for(const cpu_kernel_path *path, int rows) {
  if (rows <= path->one_tile_rows) return (int)(div_up(rows, path->row_block) * path->row_block);
  const int64_t tiles = div_up(rows, path->tile_rows);
  const int64_t block = path->row_block;
  return (int)min64(path->tile_rows, div_up(div_up(rows, tiles), block) * block);
}

/* How a GEMM call cuts its items, the same for all of them. */
typedef struct item_blocking {
  int group_panels;    /* panels per item */
  int64_t block_pairs; /* k-pairs per K block */
  int near_first;      /* near requests in a block's first row tile only */
} item_blocking;

static void run_item(const cpu_gemm_problem *pb, const cpu_gemm_run *run, int64_t local,
                     const item_blocking *blocking, unsigned char *scratch) {
  const int group_panels = blocking->group_panels;
  const int64_t block_pairs = blocking->block_pairs;
  void *a_tile = scratch;
  float *c_tile = (float *)(scratch + A_TILE_BYTES);
  uint16_t *b_group = (uint16_t *)(scratch + A_TILE_BYTES + C_TILE_BYTES);

  const int item_rows = pb->path->item_rows;
  const int64_t chunks = run_chunks(run->rows, item_rows);
  const int64_t chunk = local % chunks, group = local / chunks;
  const int64_t row0 = chunk_row(run->rows, item_rows, chunks, chunk);
  const int rows = (int)(chunk_row(run->rows, item_rows, chunks, chunk + 1) - row0);
  /* The path reads A in place: no copy (the layer's sorted activations). */
  const int a_in_place = pb->a_by_position && pb->path->tile_strided;
  const int64_t panels_total = cpu_b_panels(&pb->b_source);
  const int64_t panel0 = group * group_panels;
  const int panels = (int)min64(group_panels, panels_total - panel0);
  const int64_t kpairs_total = div_up(pb->b_source.k, 2);
  const int tile_rows = tile_rows_for(pb->path, rows);

  for (int64_t kp0 = 0; kp0 < kpairs_total; kp0 += block_pairs) {
    const int64_t kpairs = min64(block_pairs, kpairs_total - kp0);
    const uint16_t *b;
    int64_t panel_stride;
    if (pb->b_packed) {
      b = pb->b_packed + run->expert * pb->b_expert_stride + panel0 * pb->b_panel_stride +
          kp0 * CPU_PANEL_PAIR;
      panel_stride = pb->b_panel_stride;
    } else {
      const uint16_t *raw = pb->b_raw + run->expert * pb->b_raw_expert_stride;
      panel_stride = kpairs * CPU_PANEL_PAIR;
      for (int p = 0; p < panels; ++p)
        cpu_pack_b_panel(&pb->b_source, raw, panel0 + p, kp0, kpairs, b_group + p * panel_stride);
      b = b_group;
    }
    /* Packed weights: each panel's slice of the next K block follows this
     * block's. In a block of CPU_STREAM_MIN_TILES (3) or more row tiles,
     * the tiles request shares of it in proportion to their rows
     * (cpu_tile_requests), all but the item's very first tile, which
     * streams its own weights from memory; a short tail tile cannot hide
     * a whole block (one 8-row tile streaming it
     * took 1.10-1.26x the time at Mixtral 128 tokens on two AMX cores). */
    const int64_t next_pairs =
        pb->b_packed && CPU_NEXT_BLOCK_STREAM ? min64(block_pairs, kpairs_total - kp0 - kpairs) : 0;
    /* The block's last row tile is followed by the next K block's first:
     * its weight requests may run on into it (cpu_weight_prefetch). */
    const int64_t follow_pairs =
        pb->b_packed && CPU_FOLLOW_NEXT_BLOCK ? min64(block_pairs, kpairs_total - kp0 - kpairs) : 0;
    for (int r0 = 0; r0 < rows; r0 += tile_rows) {
      const int tr = rows - r0 < tile_rows ? rows - r0 : tile_rows;
      const cpu_weight_prefetch next =
          cpu_tile_requests(b, kpairs, next_pairs, follow_pairs, blocking->near_first, kp0 > 0,
                            rows, tile_rows, r0, tr);
      const cpu_weight_prefetch *next_block =
          next.pairs > 0 || next.follow_pairs > 0 || next.near_done ? &next : NULL;
      float *c = c_tile + (int64_t)r0 * C_TILE_LD;
      if (a_in_place) {
        const uint32_t *a = (const uint32_t *)a_row(pb, run, row0 + r0) + kp0;
        pb->path->tile_strided(tr, panels, kpairs, a, pb->lda / 2, b, panel_stride, c, C_TILE_LD,
                               kp0 > 0, next_block);
        continue;
      }
      pack_a(pb, run, row0 + r0, tr, kp0, kpairs, a_tile);
      pb->path->tile(tr, panels, kpairs, a_tile, b, panel_stride, c, C_TILE_LD, kp0 > 0,
                     next_block);
    }
  }
  apply_epilogue(&pb->epi, run, row0, rows, panel0, panels, c_tile);
}

/* Work items (and each run's first) with `group_panels` panels per item. */
static int64_t count_items(const cpu_gemm_problem *pb, cpu_gemm_run *runs, int64_t num_runs,
                           int group_panels) {
  const int64_t groups = div_up(cpu_b_panels(&pb->b_source), group_panels);
  int64_t items = 0;
  for (int64_t i = 0; i < num_runs; ++i) {
    runs[i].first_item = items;
    items += run_chunks(runs[i].rows, pb->path->item_rows) * groups;
  }
  return items;
}

void cpu_gemm_execute(const cpu_gemm_problem *pb, cpu_gemm_run *runs, int64_t num_runs, int threads,
                      unsigned char *scratch, size_t scratch_stride) {
  /* A decode step has few items (Mixtral's GEMM2 at one token: 2 experts x
   * 16 groups for 16 threads), so one slow item idles the other threads:
   * halve the panels per item until each thread has a few. Prefill keeps
   * CPU_GROUP_PANELS, whose weight reuse it needs. */
  int group_panels = CPU_GROUP_PANELS;
  int64_t items = count_items(pb, runs, num_runs, group_panels);
  while (group_panels > 1 && items < (int64_t)CPU_MIN_ITEMS_PER_THREAD * threads) {
    group_panels /= 2;
    items = count_items(pb, runs, num_runs, group_panels);
  }
  if (items == 0) return;
  const int few_threads = threads <= CPU_FEW_THREADS;
  const item_blocking blocking = {
      group_panels,
      CPU_KC_PAIRS_FEW_THREADS > 0 && few_threads ? CPU_KC_PAIRS_FEW_THREADS : CPU_KC_PAIRS,
      CPU_NEAR_FIRST_TILE == 2 || (CPU_NEAR_FIRST_TILE == 1 && few_threads)};
  if (threads > items) threads = (int)items;
#pragma omp parallel num_threads(threads)
  {
    unsigned char *mine = scratch + (size_t)omp_get_thread_num() * scratch_stride;
    int64_t run = 0;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      /* Items arrive in increasing order per thread: advance, else search. */
      if (item < runs[run].first_item) run = 0;
      int64_t lo = run, hi = num_runs - 1;
      while (lo < hi) {
        int64_t mid = (lo + hi + 1) / 2;
        if (runs[mid].first_item <= item)
          lo = mid;
        else
          hi = mid - 1;
      }
      run = lo;
      run_item(pb, &runs[run], item - runs[run].first_item, &blocking, mine);
    }
  }
}
