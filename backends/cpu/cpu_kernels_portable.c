/*
 * cpu_kernels_portable.c - the reference tile kernel in plain C: runs on
 * any CPU and defines the results the vector paths must reproduce (see the
 * reduction order in cpu_kernels.h). Compiled with -ffp-contract=off, so a
 * multiply-add here rounds exactly like the vector FMA (the product of two
 * bf16 values is exact in fp32).
 */
#include "cpu_kernels.h"

#include "../common/bf16_logic.h"

static void portable_tile(int rows, int panels, int64_t kpairs, const void *a_packed,
                          const uint16_t *b, int64_t panel_stride, float *c, int64_t ldc,
                          int accumulate, const cpu_weight_prefetch *prefetch) {
  (void)prefetch;
  const float *a = a_packed;
  for (int p = 0; p < panels; ++p) {
    const uint16_t *panel = b + p * panel_stride;
    for (int r = 0; r < rows; ++r) {
      float *c_row = c + r * ldc + p * CPU_PANEL_COLS;
      float acc[CPU_PANEL_COLS];
      for (int j = 0; j < CPU_PANEL_COLS; ++j)
        acc[j] = accumulate ? c_row[j] : 0.0f;
      for (int64_t kp = 0; kp < kpairs; ++kp) {
        const float a_even = a[r * CPU_A_STRIDE_F32 + 2 * kp];
        const float a_odd = a[r * CPU_A_STRIDE_F32 + 2 * kp + 1];
        const uint16_t *pair = panel + kp * CPU_PANEL_PAIR;
        for (int j = 0; j < CPU_PANEL_COLS; ++j) {
          acc[j] += a_odd * moe_bf16_to_float(pair[2 * j + 1]);
          acc[j] += a_even * moe_bf16_to_float(pair[2 * j]);
        }
      }
      for (int j = 0; j < CPU_PANEL_COLS; ++j)
        c_row[j] = acc[j];
    }
  }
}

const cpu_kernel_path cpu_path_portable = {
    .name = "portable",
    .a_format = CPU_A_FP32,
    .tile = portable_tile,
    .tile_rows = CPU_MR_MAX,
    .row_block = 1,
    .item_rows = CPU_MC_ROWS,
};
