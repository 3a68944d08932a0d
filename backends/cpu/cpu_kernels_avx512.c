/*
 * cpu_kernels_avx512.c - the AVX-512F tile kernel: bf16 weights widened to
 * fp32 by 16-bit shifts, fp32 FMA. The fast path on CPUs without
 * avx512_bf16. Compiled with -mavx512f for this file only; the backend
 * calls it only after checking the CPU at context creation.
 *
 * Register blocking: MR rows x NP panels, each panel two zmm of 16 columns,
 * so MR*2*NP accumulators stay in registers. Per k-pair the kernel loads
 * each panel's two vectors once, splits them into the odd-k (mask) and
 * even-k (shift) fp32 vectors, and feeds every row with a broadcast of its
 * packed fp32 A value (an FMA memory operand). Prefill uses 12 rows x 1
 * panel (24 FMAs per 4 conversions); decode (<= 3 rows) uses 4 panels, so
 * that at least 8 independent accumulators hide the FMA latency while the
 * weights stream through. The order of the FMAs into each accumulator is
 * the one cpu_kernels.h fixes.
 */
#include "cpu_kernels.h"

#include <immintrin.h>

/* Software prefetch distance for the weight streams, in k-pairs. */
#define PREFETCH_PAIRS 16

static inline __attribute__((always_inline)) void
tile_kernel(const int MR, const int NP, int64_t kpairs, const float *a, const uint16_t *b,
            int64_t panel_stride, float *c, int64_t ldc, int accumulate) {
  __m512 acc[CPU_MR_MAX][8];
  const __m512i odd_mask = _mm512_set1_epi32((int)0xffff0000u);
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < 2 * NP; ++v)
      acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + v * 16) : _mm512_setzero_ps();

  for (int64_t kp = 0; kp < kpairs; ++kp) {
    const float *a_even = a + 2 * kp;
    const float *a_odd = a_even + 1;
    if (NP == 1) {
      /* Many rows: convert the panel's two vectors once, then sweep rows. */
      __m512 odd[2], even[2];
#pragma GCC unroll 2
      for (int v = 0; v < 2; ++v) {
        __m512i w = _mm512_loadu_si512((const void *)(b + kp * CPU_PANEL_PAIR + v * 16 * 2));
        odd[v] = _mm512_castsi512_ps(_mm512_and_si512(w, odd_mask));
        even[v] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
      }
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) {
        __m512 x = _mm512_set1_ps(a_odd[r * CPU_A_STRIDE_F32]);
        acc[r][0] = _mm512_fmadd_ps(x, odd[0], acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(x, odd[1], acc[r][1]);
      }
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) {
        __m512 x = _mm512_set1_ps(a_even[r * CPU_A_STRIDE_F32]);
        acc[r][0] = _mm512_fmadd_ps(x, even[0], acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(x, even[1], acc[r][1]);
      }
    } else {
      /* Few rows, many columns: keep the row broadcasts, stream vectors. */
      __m512 x_odd[CPU_MR_MAX], x_even[CPU_MR_MAX];
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) {
        x_odd[r] = _mm512_set1_ps(a_odd[r * CPU_A_STRIDE_F32]);
        x_even[r] = _mm512_set1_ps(a_even[r * CPU_A_STRIDE_F32]);
      }
#pragma GCC unroll 8
      for (int v = 0; v < 2 * NP; ++v) {
        const uint16_t *src = b + (v / 2) * panel_stride + kp * CPU_PANEL_PAIR + (v % 2) * 32;
        _mm_prefetch((const char *)(src + PREFETCH_PAIRS * CPU_PANEL_PAIR), _MM_HINT_T0);
        __m512i w = _mm512_loadu_si512((const void *)src);
        __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(w, odd_mask));
        __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
#pragma GCC unroll 12
        for (int r = 0; r < MR; ++r) {
          acc[r][v] = _mm512_fmadd_ps(x_odd[r], odd, acc[r][v]);
          acc[r][v] = _mm512_fmadd_ps(x_even[r], even, acc[r][v]);
        }
      }
    }
  }

#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < 2 * NP; ++v)
      _mm512_storeu_ps(c + r * ldc + v * 16, acc[r][v]);
}

#define DEFINE_TILE(MR, NP)                                                                        \
  static void tile_##MR##x##NP(int64_t kpairs, const float *a, const uint16_t *b,                  \
                               int64_t panel_stride, float *c, int64_t ldc, int accumulate) {      \
    tile_kernel(MR, NP, kpairs, a, b, panel_stride, c, ldc, accumulate);                           \
  }

typedef void (*fixed_tile_fn)(int64_t, const float *, const uint16_t *, int64_t, float *, int64_t,
                              int);

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

static void avx512_tile(int rows, int panels, int64_t kpairs, const void *a_packed,
                        const uint16_t *b, int64_t panel_stride, float *c, int64_t ldc,
                        int accumulate) {
  const float *a = a_packed;
  int p = 0;
  if (rows <= 3)
    for (; p + 4 <= panels; p += 4)
      four_panels[rows](kpairs, a, b + p * panel_stride, panel_stride, c + p * CPU_PANEL_COLS, ldc,
                        accumulate);
  for (; p < panels; ++p)
    one_panel[rows](kpairs, a, b + p * panel_stride, panel_stride, c + p * CPU_PANEL_COLS, ldc,
                    accumulate);
}

const cpu_kernel_path cpu_path_avx512 = {
    .name = "avx512",
    .a_format = CPU_A_FP32,
    .tile = avx512_tile,
};
