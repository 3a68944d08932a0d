/*
 * cpu_tile_blocks.h - what the AVX-512 tile kernels (cpu_kernels_avx512.c,
 * cpu_kernels_avx512bf16.c, cpu_kernels_amx_order.c) share around their
 * always-inline register-block bodies: the blocks (rows x panels) they
 * instantiate, the tables of those blocks by rows, the accumulator loads
 * and stores of the kernels that keep their accumulators in an array, and
 * the loop that runs a tile call's panels through the blocks. Included by
 * those files only, each compiling it with its own instruction-set flags.
 * Nothing here changes a kernel's order of operations (cpu_kernels.h).
 */
#ifndef MOE_CPU_TILE_BLOCKS_H
#define MOE_CPU_TILE_BLOCKS_H

#include "cpu_kernels.h"

#include <immintrin.h>
#include <stddef.h>

/* Software prefetch distance for the weight streams, in k-pairs. */
#define CPU_PREFETCH_PAIRS 16

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
 * DEFINE(MR, NP), and their tables by rows: one_panel (of ONE_TYPE) and
 * four_panels. */
#define CPU_DEFINE_ALL_BLOCKS(DEFINE, ONE_TYPE)                                                    \
  CPU_DECODE_BLOCKS(DEFINE)                                                                        \
  CPU_PREFILL_BLOCKS(DEFINE)                                                                       \
  static const ONE_TYPE one_panel[CPU_MR_MAX + 1] = {                                              \
      NULL,     tile_1x1, tile_2x1, tile_3x1,  tile_4x1,  tile_5x1, tile_6x1,                      \
      tile_7x1, tile_8x1, tile_9x1, tile_10x1, tile_11x1, tile_12x1};                              \
  static const cpu_block_fn four_panels[4] = CPU_FOUR_PANEL_TABLE;

_Static_assert(CPU_MR_MAX == 12, "CPU_PREFILL_BLOCKS and CPU_DEFINE_ALL_BLOCKS end at 12 rows");

/* A block: panel_stride apart, NP panels of B at b; MR rows of packed A at
 * a; C at c. */
typedef void (*cpu_block_fn)(int64_t kpairs, const void *a, const uint16_t *b, int64_t panel_stride,
                             float *c, int64_t ldc, int accumulate);

/* The block tile_<MR>x<NP> of a file whose body is
 *   tile_kernel(const int MR, const int NP, int64_t kpairs, const A_TYPE *a,
 *               const uint16_t *b, int64_t panel_stride, float *c,
 *               int64_t ldc, int accumulate). */
#define CPU_DEFINE_BLOCK(MR, NP)                                                                   \
  static void tile_##MR##x##NP(int64_t kpairs, const void *a, const uint16_t *b,                   \
                               int64_t panel_stride, float *c, int64_t ldc, int accumulate) {      \
    tile_kernel(MR, NP, kpairs, a, b, panel_stride, c, ldc, accumulate);                           \
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
 * NULL), the rest one at a time through one. */
static inline void cpu_run_panels(cpu_block_fn four, cpu_block_fn one, int panels, int64_t kpairs,
                                  const void *a, const uint16_t *b, int64_t panel_stride, float *c,
                                  int64_t ldc, int accumulate) {
  int p = 0;
  if (four)
    for (; p + 4 <= panels; p += 4)
      four(kpairs, a, b + p * panel_stride, panel_stride, c + p * CPU_PANEL_COLS, ldc, accumulate);
  for (; p < panels; ++p)
    one(kpairs, a, b + p * panel_stride, panel_stride, c + p * CPU_PANEL_COLS, ldc, accumulate);
}

#endif /* MOE_CPU_TILE_BLOCKS_H */
