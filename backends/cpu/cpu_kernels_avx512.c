/*
 * cpu_kernels_avx512.c - the AVX-512F tile kernel: bf16 weights widened to
 * fp32 by 16-bit shifts, fp32 FMA. The fast path on CPUs without
 * avx512_bf16. Compiled with -mavx512f for this file only; the backend
 * calls it only after checking the CPU at context creation.
 *
 * Register blocking: MR rows x NP panels, each panel two zmm of 16 columns,
 * so MR*2*NP accumulators stay in registers. Per k-pair the kernel loads
 * each panel's two vectors once, splits them into the odd-k (mask) and
 * even-k (shift) fp32 vectors, and feeds every row with a broadcast load
 * of its packed fp32 A value. Prefill uses 12 rows x 1
 * panel (24 FMAs per 4 conversions); decode (<= 3 rows) uses 4 panels, so
 * that at least 8 independent accumulators hide the FMA latency while the
 * weights stream through. The order of the FMAs into each accumulator is
 * the one cpu_kernels.h fixes.
 */
#include "cpu_tile_blocks.h"

/* The kernels are written with named accumulators and conditions on the
 * constant MR rather than arrays and loops, so that every compiler keeps
 * them in registers and none splits the k loop per row. */
#define ROWS_12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define ROWS_3(X, v) X(0, v) X(1, v) X(2, v)
#define VECS_8(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7)

/* MR (<= 12) rows x 1 panel: 2*MR accumulators, the panel's two vectors
 * widened once per k-pair and reused by every row, with the panel's
 * requests (cpu_panel_request). */
static inline __attribute__((always_inline)) void
tile_rows_1panel(const int MR, int64_t kpairs, const float *a, const uint16_t *b,
                 cpu_panel_requests *requests, float *c, int64_t ldc, int accumulate) {
  const __m512i odd_mask = _mm512_set1_epi32((int)0xffff0000u);
#define DECLARE(r)                                                                                 \
  __m512 acc##r##_lo = _mm512_setzero_ps(), acc##r##_hi = _mm512_setzero_ps();                     \
  if (MR > r && accumulate) {                                                                      \
    acc##r##_lo = _mm512_loadu_ps(c + r * ldc);                                                    \
    acc##r##_hi = _mm512_loadu_ps(c + r * ldc + 16);                                               \
  }
  ROWS_12(DECLARE)
#undef DECLARE
  for (int64_t kp = 0; kp < kpairs; ++kp) {
    cpu_panel_request(requests, kp, kpairs);
    const __m512i w_lo = _mm512_loadu_si512((const void *)(b + kp * CPU_PANEL_PAIR));
    const __m512i w_hi = _mm512_loadu_si512((const void *)(b + kp * CPU_PANEL_PAIR + 32));
    const __m512 odd_lo = _mm512_castsi512_ps(_mm512_and_si512(w_lo, odd_mask));
    const __m512 odd_hi = _mm512_castsi512_ps(_mm512_and_si512(w_hi, odd_mask));
    const __m512 even_lo = _mm512_castsi512_ps(_mm512_slli_epi32(w_lo, 16));
    const __m512 even_hi = _mm512_castsi512_ps(_mm512_slli_epi32(w_hi, 16));
    const float *a_k = a + 2 * kp;
#define STEP_ODD(r)                                                                                \
  if (MR > r) {                                                                                    \
    const __m512 x = _mm512_set1_ps(a_k[r * CPU_A_STRIDE_F32 + 1]);                                \
    acc##r##_lo = _mm512_fmadd_ps(x, odd_lo, acc##r##_lo);                                         \
    acc##r##_hi = _mm512_fmadd_ps(x, odd_hi, acc##r##_hi);                                         \
  }
#define STEP_EVEN(r)                                                                               \
  if (MR > r) {                                                                                    \
    const __m512 x = _mm512_set1_ps(a_k[r * CPU_A_STRIDE_F32]);                                    \
    acc##r##_lo = _mm512_fmadd_ps(x, even_lo, acc##r##_lo);                                        \
    acc##r##_hi = _mm512_fmadd_ps(x, even_hi, acc##r##_hi);                                        \
  }
    ROWS_12(STEP_ODD)
    ROWS_12(STEP_EVEN)
#undef STEP_ODD
#undef STEP_EVEN
  }
#define STORE(r)                                                                                   \
  if (MR > r) {                                                                                    \
    _mm512_storeu_ps(c + r * ldc, acc##r##_lo);                                                    \
    _mm512_storeu_ps(c + r * ldc + 16, acc##r##_hi);                                               \
  }
  ROWS_12(STORE)
#undef STORE
}

/* MR (<= 3) rows x 4 panels: 8*MR accumulators, so that even one row has 8
 * independent FMA chains while four weight streams flow (decode). */
static inline __attribute__((always_inline)) void
tile_rows_4panels(const int MR, int64_t kpairs, const float *a, const uint16_t *b,
                  int64_t panel_stride, int ahead_pairs, float *c, int64_t ldc, int accumulate) {
  const __m512i odd_mask = _mm512_set1_epi32((int)0xffff0000u);
#define DECLARE_RV(r, v)                                                                           \
  __m512 acc##r##_##v = _mm512_setzero_ps();                                                       \
  if (MR > r && accumulate) acc##r##_##v = _mm512_loadu_ps(c + r * ldc + v * 16);
#define DECLARE(v) ROWS_3(DECLARE_RV, v)
  VECS_8(DECLARE)
#undef DECLARE
#undef DECLARE_RV
  for (int64_t kp = 0; kp < kpairs; ++kp) {
    const float *a_k = a + 2 * kp;
    const __m512 x0_odd = _mm512_set1_ps(a_k[1]), x0_even = _mm512_set1_ps(a_k[0]);
    const __m512 x1_odd = _mm512_set1_ps(a_k[MR > 1 ? CPU_A_STRIDE_F32 + 1 : 1]);
    const __m512 x1_even = _mm512_set1_ps(a_k[MR > 1 ? CPU_A_STRIDE_F32 : 0]);
    const __m512 x2_odd = _mm512_set1_ps(a_k[MR > 2 ? 2 * CPU_A_STRIDE_F32 + 1 : 1]);
    const __m512 x2_even = _mm512_set1_ps(a_k[MR > 2 ? 2 * CPU_A_STRIDE_F32 : 0]);
#define STEP_RV(r, v)                                                                              \
  if (MR > r) {                                                                                    \
    acc##r##_##v = _mm512_fmadd_ps(x##r##_odd, odd, acc##r##_##v);                                 \
    acc##r##_##v = _mm512_fmadd_ps(x##r##_even, even, acc##r##_##v);                               \
  }
#define STEP(v)                                                                                    \
  {                                                                                                \
    const uint16_t *src = b + (v / 2) * panel_stride + kp * CPU_PANEL_PAIR + (v % 2) * 32;         \
    _mm_prefetch((const char *)(src + ahead_pairs * CPU_PANEL_PAIR), _MM_HINT_T0);                 \
    const __m512i w = _mm512_loadu_si512((const void *)src);                                       \
    const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(w, odd_mask));                         \
    const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));                             \
    ROWS_3(STEP_RV, v)                                                                             \
  }
    VECS_8(STEP)
#undef STEP
#undef STEP_RV
  }
#define STORE_RV(r, v)                                                                             \
  if (MR > r) _mm512_storeu_ps(c + r * ldc + v * 16, acc##r##_##v);
#define STORE(v) ROWS_3(STORE_RV, v)
  VECS_8(STORE)
#undef STORE
#undef STORE_RV
}

/* The blocks of cpu_tile_blocks.h: one panel (tile_rows_1panel) or four
 * (tile_rows_4panels). */
static inline __attribute__((always_inline)) void
tile_kernel(const int MR, const int NP, int64_t kpairs, const float *a, const uint16_t *b,
            int64_t panel_stride, int ahead_pairs, cpu_panel_requests *requests, float *c,
            int64_t ldc, int accumulate) {
  if (NP == 1)
    tile_rows_1panel(MR, kpairs, a, b, requests, c, ldc, accumulate);
  else
    tile_rows_4panels(MR, kpairs, a, b, panel_stride, ahead_pairs, c, ldc, accumulate);
}

CPU_DEFINE_ALL_BLOCKS(CPU_DEFINE_BLOCK)

static void avx512_tile(int rows, int panels, int64_t kpairs, const void *a_packed,
                        const uint16_t *b, int64_t panel_stride, float *c, int64_t ldc,
                        int accumulate, const cpu_weight_prefetch *prefetch) {
  cpu_run_panels(rows <= 3 ? four_panels[rows] : NULL, one_panel[rows], panels, kpairs, a_packed, b,
                 panel_stride, c, ldc, accumulate, prefetch);
}

const cpu_kernel_path cpu_path_avx512 = {
    .name = "avx512",
    .a_format = CPU_A_FP32,
    .tile = avx512_tile,
    .tile_rows = CPU_MR_MAX,
    .row_block = 1,
    .item_rows = CPU_MC_ROWS,
};
