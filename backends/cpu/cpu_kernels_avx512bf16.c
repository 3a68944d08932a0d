/*
 * cpu_kernels_avx512bf16.c - the AVX-512 BF16 tile kernel: one vdpbf16ps
 * per 16 columns x 2 k per row, straight from the packed weights (the
 * panel layout is the instruction's operand layout) and a broadcast pair
 * of packed bf16 A values. Compiled with -mavx512bf16 for this file only;
 * the backend calls it only on CPUs reporting avx512_bf16.
 *
 * The same register blocking as the AVX-512F kernel (12 rows x 1 panel
 * for prefill, <= 3 rows x 4 panels for decode) without the conversions,
 * and the same weight requests (cpu_panel_request: the next panel, and a
 * share of the next K block, into L2; without them the prefill points
 * took 1.16-1.23x the time on the 2-vCPU AMD EPYC, bench/results.md,
 * 2026-12-07). vdpbf16ps adds, per accumulator, the odd-k product and then
 * the even-k product, which is the order cpu_kernels.h fixes; it flushes
 * denormals, so its results can differ from the other paths in the last
 * bit near the denormal range, never in determinism.
 */
#include "cpu_tile_blocks.h"

static inline __attribute__((always_inline)) void
tile_kernel(const int MR, const int NP, int64_t kpairs, const uint32_t *a, const uint16_t *b,
            int64_t panel_stride, int ahead_pairs, cpu_panel_requests *requests, float *c,
            int64_t ldc, int accumulate) {
  __m512 acc[CPU_MR_MAX][8];
  cpu_acc_load(MR, NP, acc, c, ldc, accumulate);

  for (int64_t kp = 0; kp < kpairs; ++kp) {
    if (NP == 1) cpu_panel_request(requests, kp, kpairs);
    __m512bh w[8];
#pragma GCC unroll 8
    for (int v = 0; v < 2 * NP; ++v) {
      const uint16_t *src = b + (v / 2) * panel_stride + kp * CPU_PANEL_PAIR + (v % 2) * 32;
      if (NP > 1) _mm_prefetch((const char *)(src + ahead_pairs * CPU_PANEL_PAIR), _MM_HINT_T0);
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

  cpu_acc_store(MR, NP, acc, c, ldc);
}

CPU_DEFINE_ALL_BLOCKS(CPU_DEFINE_BLOCK)

static void avx512bf16_tile(int rows, int panels, int64_t kpairs, const void *a_packed,
                            const uint16_t *b, int64_t panel_stride, float *c, int64_t ldc,
                            int accumulate, const cpu_weight_prefetch *prefetch) {
  cpu_run_panels(rows <= 3 ? four_panels[rows] : NULL, one_panel[rows], panels, kpairs, a_packed, b,
                 panel_stride, c, ldc, accumulate, prefetch);
}

const cpu_kernel_path cpu_path_avx512bf16 = {
    .name = "avx512bf16",
    .a_format = CPU_A_BF16_PAIRS,
    .tile = avx512bf16_tile,
    .tile_rows = CPU_MR_MAX,
    .row_block = 1,
    .item_rows = CPU_MC_ROWS,
};
