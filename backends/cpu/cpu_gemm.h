/*
 * cpu_gemm.h - the CPU backend's grouped GEMM driver: weight packing, the
 * gathered-A packing, work items over (expert rows, panel group), and the
 * epilogues (bias, routed weight, fused gated activation, bf16 rounding).
 * Used by the layer forward (weights packed once at layer creation) and by
 * the grouped GEMM stage (raw weights, packed per work item).
 */
#ifndef MOE_CPU_GEMM_H
#define MOE_CPU_GEMM_H

#include "backend.h"
#include "cpu_kernels.h"

#include <stddef.h>
#include <stdint.h>

/* A run of rows of one expert: slots[0..rows) are slot indices s, and
 * row r of the run is row position + r of the expert-sorted order. */
typedef struct cpu_gemm_run {
  int32_t expert;
  int32_t rows;
  const int32_t *slots;
  int64_t position;
  int64_t first_item; /* filled by cpu_gemm_execute */
} cpu_gemm_run;

/* How packed columns map to rows of the raw weight ("out" index n). */
typedef struct cpu_b_source {
  moe_weight_layout layout; /* OUT_IN: b[n][k]; IN_OUT: b[k][n] */
  int64_t n;                /* rows of the raw matrix in the out dimension */
  int64_t k;
  /* > 0: gate/up interleave of a w13 with this I: panel p holds gate rows
   * p*16..p*16+15 then up rows I+p*16..; 0: panel p holds rows p*32... */
  int64_t gated_half;
} cpu_b_source;

/* Panels of a packed matrix for this source. */
int64_t cpu_b_panels(const cpu_b_source *src);

/* Packs k-pairs [kp0, kp0 + kpairs) of one panel of a raw expert matrix
 * into dst ([kpairs][64] uint16, see cpu_kernels.h). */
void cpu_pack_b_panel(const cpu_b_source *src, const uint16_t *b_expert, int64_t panel, int64_t kp0,
                      int64_t kpairs, uint16_t *dst);

typedef struct cpu_epilogue {
  int gated;      /* 1: fused activation of the (gate, up) halves of each panel */
  int activation; /* MOE_ACT_* when gated */
  float alpha, limit;
  int64_t n_out; /* columns written per row (I when gated) */
  uint16_t *out; /* bf16; the row of slot s is out + s * ld_out */
  int64_t ld_out;
  /* 1: rows by sorted position instead (run row r at out + (position + r) *
   * ld_out), the next GEMM's in-place A: where n_out is odd, column n_out
   * is written 0, the upper half of the last k-pair. */
  int out_by_position;
  const float *bias; /* fp32, expert e at bias + e * bias_stride (gated: gate
                        [0, I), up [I, 2I)); NULL for none */
  int64_t bias_stride;
  moe_gemm_routed_weight weight_mode;
  const float *slot_weights; /* fp32 [T*k] when weight_mode != NONE */
} cpu_epilogue;

typedef struct cpu_gemm_problem {
  const cpu_kernel_path *path;
  /* A: the row of slot s is a + (s / a_row_div) * lda, k elements; with
   * a_by_position, run row r is a + (position + r) * lda instead, lda even
   * and 4-byte aligned rows, so that a path with tile_strided reads it in
   * place (with the pair rule of cpu_tile_strided_fn where k is odd). */
  const uint16_t *a;
  int64_t lda;
  int32_t a_row_div;
  int a_by_position;
  /* B: either packed (expert e, panel p at b_packed + e * b_expert_stride +
   * p * b_panel_stride, b_kpairs k-pairs per panel) or raw (b_raw, packed
   * per work item). */
  cpu_b_source b_source;
  const uint16_t *b_packed;
  int64_t b_expert_stride, b_panel_stride;
  const uint16_t *b_raw;
  int64_t b_raw_expert_stride;
  cpu_epilogue epi;
} cpu_gemm_problem;

/* Per-thread scratch bytes the driver needs (packed: B already packed). */
size_t cpu_gemm_scratch_bytes(int b_packed);

/* Runs the problem over the runs with up to `threads` OpenMP threads;
 * scratch holds threads * scratch_stride bytes (64-byte aligned). Every
 * output element is computed by the same operation sequence whatever the
 * runs, items or threads (see cpu_kernels.h). */
void cpu_gemm_execute(const cpu_gemm_problem *pb, cpu_gemm_run *runs, int64_t num_runs, int threads,
                      unsigned char *scratch, size_t scratch_stride);

#endif /* MOE_CPU_GEMM_H */
