/*
 * cpu_kernels_amx_order.c - a decode tile kernel (fewer than 4 rows) that
 * gives the bits TDPBF16PS's documented pseudo-code gives, with AVX-512F
 * fp32 FMAs, for the AMX path's small tiles (cpu_kernels_amx.c). Compiled
 * with -mavx512f for this file only; reads the AMX path's operands as they
 * are: A in CPU_A_BF16_PAIRS, B the packed panels (cpu_kernels.h).
 *
 * Why it matches: the SDM writes TDPBF16PS, per output element, as
 *   for k-pair k in order: acc += a[2k] * b[2k]; acc += a[2k+1] * b[2k+1]
 * each step an "FP32 FMA with DAZ, FTZ, RNE". A product of two bf16 values
 * has at most 16 significant bits, so it is exact in fp32 (in range), and
 * each step is fma(a_even, b_even, acc), then fma(a_odd, b_odd, acc):
 * the even k first, the reverse of the AVX-512 kernels' order. DAZ and FTZ
 * are those of MXCSR, set for the duration of the call (with RNE): a
 * denormal operand (bf16 widened by a shift is denormal exactly when the
 * bf16 was) counts as a zero of its sign, and a result that is tiny after
 * rounding becomes a zero of its sign. Whether the hardware's TDPBF16PS
 * does the same is measured at run time (split_rows_probe); this kernel is
 * checked bit for bit against the scalar model of the instruction in
 * cpu_amx_check.c.
 *
 * Streaming: like the AVX-512 decode kernels, rows x 4 panels per pass (8
 * independent accumulators per row while four weight streams flow), with
 * software prefetch cpu_decode_request_pairs() k-pairs ahead; leftover
 * panels one at a time.
 */
#include "cpu_tile_blocks.h"

/* MXCSR for the call: DAZ (bit 6), FTZ (bit 15), every exception masked
 * (bits 7-12; tdpbf16ps raises none), round to nearest even (bits 13-14
 * clear), whatever the caller had set. */
#define MXCSR_TDPBF16PS 0x9fc0u

/* Widens the even (low) and odd (high) bf16 halves of 16 packed pairs. */
static inline __attribute__((always_inline)) __m512 even_of(__m512i pairs) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
}
static inline __attribute__((always_inline)) __m512 odd_of(__m512i pairs) {
  return _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32((int)0xffff0000u)));
}

/* MR (<= 3) rows x NP (1 or 4) panels. */
static inline __attribute__((always_inline)) void
tile_kernel(const int MR, const int NP, int64_t kpairs, const uint32_t *a, const uint16_t *b,
            int64_t panel_stride, int ahead_pairs, cpu_panel_requests *requests, float *c,
            int64_t ldc, int accumulate) {
  (void)requests; /* decode tiles: each weight stream is requested ahead_pairs ahead */
  __m512 acc[CPU_AMX_MIN_ROWS - 1][8];
  cpu_acc_load(MR, NP, acc, c, ldc, accumulate);

  for (int64_t kp = 0; kp < kpairs; ++kp) {
    __m512 x_even[CPU_AMX_MIN_ROWS - 1], x_odd[CPU_AMX_MIN_ROWS - 1];
#pragma GCC unroll 3
    for (int r = 0; r < MR; ++r) {
      const __m512i x = _mm512_set1_epi32((int)a[r * CPU_A_STRIDE_U32 + kp]);
      x_even[r] = even_of(x);
      x_odd[r] = odd_of(x);
    }
#pragma GCC unroll 8
    for (int v = 0; v < 2 * NP; ++v) {
      const uint16_t *src = b + (v / 2) * panel_stride + kp * CPU_PANEL_PAIR + (v % 2) * 32;
      _mm_prefetch((const char *)(src + ahead_pairs * CPU_PANEL_PAIR), _MM_HINT_T0);
      const __m512i w = _mm512_loadu_si512((const void *)src);
      const __m512 w_even = even_of(w), w_odd = odd_of(w);
#pragma GCC unroll 3
      for (int r = 0; r < MR; ++r) {
        acc[r][v] = _mm512_fmadd_ps(x_even[r], w_even, acc[r][v]);
        acc[r][v] = _mm512_fmadd_ps(x_odd[r], w_odd, acc[r][v]);
      }
    }
  }

  cpu_acc_store(MR, NP, acc, c, ldc);
}

CPU_DECODE_BLOCKS(CPU_DEFINE_BLOCK)

_Static_assert(CPU_AMX_MIN_ROWS == 4, "the blocks above cover 1..3 rows");

static const cpu_panel_fn one_panel[CPU_AMX_MIN_ROWS] = {NULL, tile_1x1, tile_2x1, tile_3x1};
static const cpu_block_fn four_panels[CPU_AMX_MIN_ROWS] = CPU_FOUR_PANEL_TABLE;

/* The FMAs run in out-of-line functions, so the compiler cannot move any of
 * them across the MXCSR writes around the calls. */
static __attribute__((noinline)) void all_panels(int rows, int panels, int64_t kpairs,
                                                 const void *a, const uint16_t *b,
                                                 int64_t panel_stride, float *c, int64_t ldc,
                                                 int accumulate) {
  cpu_run_panels(four_panels[rows], one_panel[rows], panels, kpairs, a, b, panel_stride, c, ldc,
                 accumulate, NULL);
}

void cpu_amx_order_tile(int rows, int panels, int64_t kpairs, const void *a_packed,
                        const uint16_t *b, int64_t panel_stride, float *c, int64_t ldc,
                        int accumulate, const cpu_weight_prefetch *prefetch) {
  (void)prefetch;
  const unsigned saved = _mm_getcsr();
  _mm_setcsr(MXCSR_TDPBF16PS);
  all_panels(rows, panels, kpairs, a_packed, b, panel_stride, c, ldc, accumulate);
  _mm_setcsr(saved);
}
