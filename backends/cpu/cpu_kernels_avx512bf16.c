/*
 * cpu_kernels_avx512bf16.c - the AVX-512 BF16 tile kernel: one vdpbf16ps
 * per 16 columns x 2 k per row, straight from the packed weights (the
 * panel layout is the instruction's operand layout) and a broadcast pair
 * of packed bf16 A values. Compiled with -mavx512bf16 for this file only;
 * the backend calls it only on CPUs reporting avx512_bf16.
 *
 * Kept deliberately simple: the same register blocking as the AVX-512F
 * kernel (12 rows x 1 panel for prefill, <= 3 rows x 4 panels for decode)
 * without the conversions. vdpbf16ps adds, per accumulator, the odd-k
 * product and then the even-k product, which is the order cpu_kernels.h
 * fixes; it flushes denormals, so its results can differ from the other
 * paths in the last bit near the denormal range, never in determinism.
 */
#include "cpu_kernels.h"

#include <immintrin.h>

#define PREFETCH_PAIRS 16

static inline __attribute__((always_inline)) void
tile_kernel(const int MR, const int NP, int64_t kpairs, const uint32_t *a, const uint16_t *b,
            int64_t panel_stride, float *c, int64_t ldc, int accumulate) {
  __m512 acc[CPU_MR_MAX][8];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < 2 * NP; ++v)
      acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + v * 16) : _mm512_setzero_ps();

  for (int64_t kp = 0; kp < kpairs; ++kp) {
    __m512bh w[8];
#pragma GCC unroll 8
    for (int v = 0; v < 2 * NP; ++v) {
      const uint16_t *src = b + (v / 2) * panel_stride + kp * CPU_PANEL_PAIR + (v % 2) * 32;
      if (NP > 1) _mm_prefetch((const char *)(src + PREFETCH_PAIRS * CPU_PANEL_PAIR), _MM_HINT_T0);
      w[v] = (__m512bh)_mm512_loadu_si512((const void *)src);
    }
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      __m512bh x = (__m512bh)_mm512_set1_epi32((int)a[r * CPU_A_STRIDE_U32 + kp]);
#pragma GCC unroll 8
      for (int v = 0; v < 2 * NP; ++v)
        acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, w[v]);
    }
  }

#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < 2 * NP; ++v)
      _mm512_storeu_ps(c + r * ldc + v * 16, acc[r][v]);
}

#define DEFINE_TILE(MR, NP)                                                                        \
  static void tile_##MR##x##NP(int64_t kpairs, const uint32_t *a, const uint16_t *b,               \
                               int64_t panel_stride, float *c, int64_t ldc, int accumulate) {      \
    tile_kernel(MR, NP, kpairs, a, b, panel_stride, c, ldc, accumulate);                           \
  }

typedef void (*fixed_tile_fn)(int64_t, const uint32_t *, const uint16_t *, int64_t, float *,
                              int64_t, int);

DEFINE_TILE(1, 1)
DEFINE_TILE(2, 1)
DEFINE_TILE(3, 1)
DEFINE_TILE(4, 1)
DEFINE_TILE(5, 1)
DEFINE_TILE(6, 1)
DEFINE_TILE(7, 1)
DEFINE_TILE(8, 1)
DEFINE_TILE(9, 1)
DEFINE_TILE(10, 1)
DEFINE_TILE(11, 1)
DEFINE_TILE(12, 1)
DEFINE_TILE(1, 4)
DEFINE_TILE(2, 4)
DEFINE_TILE(3, 4)

static const fixed_tile_fn one_panel[CPU_MR_MAX + 1] = {
    NULL,     tile_1x1, tile_2x1, tile_3x1,  tile_4x1,  tile_5x1, tile_6x1,
    tile_7x1, tile_8x1, tile_9x1, tile_10x1, tile_11x1, tile_12x1};
static const fixed_tile_fn four_panels[4] = {NULL, tile_1x4, tile_2x4, tile_3x4};

static void avx512bf16_tile(int rows, int panels, int64_t kpairs, const void *a_packed,
                            const uint16_t *b, int64_t panel_stride, float *c, int64_t ldc,
                            int accumulate, const uint16_t *prefetch_after) {
  (void)prefetch_after;
  const uint32_t *a = a_packed;
  int p = 0;
  if (rows <= 3)
    for (; p + 4 <= panels; p += 4)
      four_panels[rows](kpairs, a, b + p * panel_stride, panel_stride, c + p * CPU_PANEL_COLS, ldc,
                        accumulate);
  for (; p < panels; ++p)
    one_panel[rows](kpairs, a, b + p * panel_stride, panel_stride, c + p * CPU_PANEL_COLS, ldc,
                    accumulate);
}

const cpu_kernel_path cpu_path_avx512bf16 = {
    .name = "avx512bf16",
    .a_format = CPU_A_BF16_PAIRS,
    .tile = avx512bf16_tile,
    .tile_rows = CPU_MR_MAX,
    .item_rows = CPU_MC_ROWS,
};
