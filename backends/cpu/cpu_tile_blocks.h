/*
 * cpu_tile_blocks.h - what the AVX-512 tile kernels (cpu_kernels_avx512.c,
 * cpu_kernels_avx512bf16.c, cpu_kernels_amx_order.c) share around their
 * always-inline register-block bodies: the blocks (rows x panels) they
 * instantiate, the tables of those blocks by rows, the accumulator loads
 * and stores of the kernels that keep their accumulators in an array, the
 * weight requests of a one-panel block, and the loop that runs a tile
 * call's panels through the blocks. Included by
 * those files only, each compiling it with its own instruction-set flags.
 * Nothing here changes a kernel's order of operations (cpu_kernels.h).
 */
#ifndef MOE_CPU_TILE_BLOCKS_H
#define MOE_CPU_TILE_BLOCKS_H

#include "cpu_kernels.h"

#include <immintrin.h>
#include <stddef.h>

/* The blocks, as X(MR, NP): MR rows x NP panels, each instantiated as a
 * function tile_<MR>x<NP> of its own so that the compiler sees constant
 * trip counts and keeps every accumulator in a register. Decode tiles
 * (<= 3 rows) take four panels at a time so that at least 8 independent
 * accumulators hide the FMA latency while the weights stream; leftover
 * panels and prefill tiles take one. */
#define CPU_DECODE_BLOCKS(X) X(1, 1) X(2, 1) X(3, 1) X(1, 4) X(2, 4) X(3, 4)
#define CPU_PREFILL_BLOCKS(X)                                                                      \
  X(4, 1) X(5, 1) X(6, 1) X(7, 1) X(8, 1) X(9, 1) X(10, 1) X(11, 1) X(12, 1)

/* The four-panel blocks by rows (entry 0 unused). */
#define CPU_FOUR_PANEL_TABLE                                                                       \
  { NULL, tile_1x4, tile_2x4, tile_3x4 }

/* Every block of a path that takes tiles of up to CPU_MR_MAX rows, made by
 * DEFINE(MR, NP) (CPU_DEFINE_BLOCK), and their tables by rows: one_panel
 * and four_panels. */
#define CPU_DEFINE_ALL_BLOCKS(DEFINE)                                                              \
  CPU_DECODE_BLOCKS(DEFINE)                                                                        \
  CPU_PREFILL_BLOCKS(DEFINE)                                                                       \
  static const cpu_panel_fn one_panel[CPU_MR_MAX + 1] = {                                          \
      NULL,     tile_1x1, tile_2x1, tile_3x1,  tile_4x1,  tile_5x1, tile_6x1,                      \
      tile_7x1, tile_8x1, tile_9x1, tile_10x1, tile_11x1, tile_12x1};                              \
  static const cpu_block_fn four_panels[4] = CPU_FOUR_PANEL_TABLE;

_Static_assert(CPU_MR_MAX == 12, "CPU_PREFILL_BLOCKS and CPU_DEFINE_ALL_BLOCKS end at 12 rows");

/* What a one-panel block requests into L2 while it computes: the next
 * panel's k-pairs, a line pair per step, so that an item's first row tile
 * streams its weights from memory under the arithmetic (after the last
 * panel: the next K block's first, when the caller reads it next); and,
 * spread evenly over its steps, stream_pairs k-pairs at `stream`, its share
 * of the next K block (cpu_weight_prefetch). credit starts at 0. Hints
 * only: no result depends on them. */
typedef struct cpu_panel_requests {
  const uint16_t *next;
  const uint16_t *stream;
  int64_t stream_pairs, credit;
} cpu_panel_requests;

/* The requests of step kp of a panel's kpairs: at most one stream pair per
 * step, as a share of the next K block is no longer than this block. */
static inline __attribute__((always_inline)) void cpu_panel_request(cpu_panel_requests *r,
                                                                    int64_t kp, int64_t kpairs) {
  const uint16_t *next = r->next + kp * CPU_PANEL_PAIR;
  _mm_prefetch((const char *)next, _MM_HINT_T1);
  _mm_prefetch((const char *)(next + 32), _MM_HINT_T1);
  r->credit += r->stream_pairs;
  if (r->credit >= kpairs) {
    r->credit -= kpairs;
    _mm_prefetch((const char *)r->stream, _MM_HINT_T1);
    _mm_prefetch((const char *)(r->stream + 32), _MM_HINT_T1);
    r->stream += CPU_PANEL_PAIR;
  }
}

/* A four-panel block: four panels of B at b, panel_stride apart, each
 * stream requested ahead_pairs k-pairs ahead (cpu_decode_request_pairs);
 * MR rows of packed A at a; C at c. */
typedef void (*cpu_block_fn)(int64_t kpairs, const void *a, const uint16_t *b, int64_t panel_stride,
                             int ahead_pairs, float *c, int64_t ldc, int accumulate);
/* A one-panel block: the panel at b, with its requests. */
typedef void (*cpu_panel_fn)(int64_t kpairs, const void *a, const uint16_t *b,
                             cpu_panel_requests requests, float *c, int64_t ldc, int accumulate);

/* The block tile_<MR>x<NP> of a file whose body is
 *   tile_kernel(const int MR, const int NP, int64_t kpairs, const A_TYPE *a,
 *               const uint16_t *b, int64_t panel_stride, int ahead_pairs,
 *               cpu_panel_requests *requests, float *c, int64_t ldc,
 *               int accumulate)
 * (one panel: requests; four: ahead_pairs, requests NULL). */
#define CPU_DEFINE_BLOCK(MR, NP) CPU_DEFINE_BLOCK_##NP(MR)
#define CPU_DEFINE_BLOCK_1(MR)                                                                     \
  static void tile_##MR##x1(int64_t kpairs, const void *a, const uint16_t *b,                      \
                            cpu_panel_requests requests, float *c, int64_t ldc, int accumulate) {  \
    tile_kernel(MR, 1, kpairs, a, b, 0, 0, &requests, c, ldc, accumulate);                         \
  }
#define CPU_DEFINE_BLOCK_4(MR)                                                                     \
  static void tile_##MR##x4(int64_t kpairs, const void *a, const uint16_t *b,                      \
                            int64_t panel_stride, int ahead_pairs, float *c, int64_t ldc,          \
                            int accumulate) {                                                      \
    tile_kernel(MR, 4, kpairs, a, b, panel_stride, ahead_pairs, NULL, c, ldc, accumulate);         \
  }

/* The MR x 2 NP accumulators (16 columns each) of an array-based block:
 * loaded from C when accumulating, else zero; stored back at the end. */
static inline __attribute__((always_inline)) void cpu_acc_load(const int MR, const int NP,
                                                               __m512 (*acc)[8], const float *c,
                                                               int64_t ldc, int accumulate) {
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < 2 * NP; ++v)
      acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + v * 16) : _mm512_setzero_ps();
}

static inline __attribute__((always_inline)) void
cpu_acc_store(const int MR, const int NP, __m512 (*acc)[8], float *c, int64_t ldc) {
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < 2 * NP; ++v)
      _mm512_storeu_ps(c + r * ldc + v * 16, acc[r][v]);
}

/* The panels of one tile call: groups of four through four (when not
 * NULL), the rest one at a time through one, each requesting the panel
 * after it and its share of the caller's next-K-block stream (prefetch,
 * may be NULL: cpu_weight_prefetch). */
static inline void cpu_run_panels(cpu_block_fn four, cpu_panel_fn one, int panels, int64_t kpairs,
                                  const void *a, const uint16_t *b, int64_t panel_stride, float *c,
                                  int64_t ldc, int accumulate,
                                  const cpu_weight_prefetch *prefetch) {
  int p = 0;
  if (four) {
    const int ahead_pairs = cpu_decode_request_pairs();
    for (; p + 4 <= panels; p += 4)
      four(kpairs, a, b + p * panel_stride, panel_stride, ahead_pairs, c + p * CPU_PANEL_COLS, ldc,
           accumulate);
  }
  /* After the last panel: the first panel's next K block, when the caller
   * reads a whole one next (cpu_weight_prefetch.follow_pairs). */
  const uint16_t *after_last = prefetch && prefetch->follow_pairs >= kpairs
                                   ? b + kpairs * CPU_PANEL_PAIR
                                   : b + (panels - 1) * panel_stride;
  const int stream = prefetch && prefetch->pairs > 0;
  for (; p < panels; ++p) {
    const uint16_t *panel = b + p * panel_stride;
    const cpu_panel_requests requests = {p + 1 < panels ? panel + panel_stride : after_last,
                                         stream ? prefetch->b + p * panel_stride : panel,
                                         stream ? prefetch->pairs : 0, 0};
    one(kpairs, a, panel, requests, c + p * CPU_PANEL_COLS, ldc, accumulate);
  }
}

#endif /* MOE_CPU_TILE_BLOCKS_H */
