/*
 * cpu_amx_probe.h - the data and the comparison of the split-rows probe:
 * does a vector tile kernel give, on small tiles, exactly the bits of the
 * AMX tile body? Shared by the run-time probe (cpu_kernels_amx.c, real
 * tdpbf16ps) and by cpu_amx_check.c (the scalar model of the instruction),
 * so that the check exercises exactly the data the probe decides on.
 * Include after cpu_amx_tile.h (it calls cpu_amx_tile_body).
 *
 * Three kinds of data, each a few thousand dot products of 40 k-pairs
 * (two full tile steps and a tail) over 5 panels (a 4-panel pass and a
 * single panel) for 1..3 rows, accumulated into random C:
 *   CPU_PROBE_WIDE   normal values of 2^-12 .. 2^13, both signs: the
 *                    roundings of the additions;
 *   CPU_PROBE_TINY   values near 2^-63 with denormals and zeros among them,
 *                    C near 2^-126: products and sums around the smallest
 *                    normal, so the DAZ and FTZ of both sides show;
 *   CPU_PROBE_MIXED  2^-90 .. 2^30 with denormals and zeros: absorption
 *                    and cancellation between very different magnitudes.
 * No value overflows, so no inf or NaN (whose bits need not agree).
 */
#ifndef MOE_CPU_AMX_PROBE_H
#define MOE_CPU_AMX_PROBE_H

#include "cpu_kernels.h"

#include <stdint.h>
#include <string.h>

enum { CPU_PROBE_WIDE, CPU_PROBE_TINY, CPU_PROBE_MIXED, CPU_PROBE_KINDS };
enum {
  CPU_PROBE_PANELS = 5,
  CPU_PROBE_PAIRS = 40,
  CPU_PROBE_ROWS = CPU_AMX_MIN_ROWS - 1,
  CPU_PROBE_LDC = CPU_PROBE_PANELS * CPU_PANEL_COLS,
};

typedef struct cpu_amx_probe {
  uint32_t a[CPU_PROBE_ROWS * CPU_A_STRIDE_U32];
  uint16_t b[CPU_PROBE_PANELS * CPU_PROBE_PAIRS * CPU_PANEL_PAIR];
  float c_init[CPU_PROBE_ROWS * CPU_PROBE_LDC];
  float c_amx[CPU_PROBE_ROWS * CPU_PROBE_LDC];
  float c_vec[CPU_PROBE_ROWS * CPU_PROBE_LDC];
} cpu_amx_probe;

/* A bf16 value of the given kind from a 64-bit LCG. */
static inline uint16_t cpu_probe_bf16(uint64_t *state, int kind) {
  *state = *state * 6364136223846793005ull + 1442695040888963407ull;
  const uint32_t r = (uint32_t)(*state >> 32);
  const uint32_t mantissa = r & 0x7f, sign = (r >> 7) & 1, pick = (r >> 8) & 15, e = r >> 12;
  uint32_t exponent; /* biased */
  if (kind == CPU_PROBE_WIDE) {
    exponent = 127 - 12 + e % 26;
  } else if (pick == 0) {
    return (uint16_t)(sign << 15); /* a zero */
  } else if (pick <= 2) {
    return (uint16_t)(sign << 15 | (mantissa ? mantissa : 1)); /* a denormal */
  } else {
    exponent = kind == CPU_PROBE_TINY ? 127 - 68 + e % 11 : 127 - 90 + e % 121;
  }
  return (uint16_t)(sign << 15 | exponent << 7 | mantissa);
}

/* A packed A value: the pair (even k, odd k). */
static inline uint32_t cpu_probe_pair(uint64_t *state, int kind) {
  const uint32_t even = cpu_probe_bf16(state, kind);
  return even | (uint32_t)cpu_probe_bf16(state, kind) << 16;
}

/* An initial C value: a bf16 value, scaled by 2^-63 for the tiny kind (so
 * near 2^-126, denormals included). */
static inline float cpu_probe_c(uint64_t *state, int kind) {
  const uint32_t bits = (uint32_t)cpu_probe_bf16(state, kind) << 16;
  float v;
  memcpy(&v, &bits, sizeof v);
  return kind == CPU_PROBE_TINY ? v * 0x1.0p-63f : v;
}

/* Fresh A, B and C of the given kind. */
static inline void cpu_amx_probe_fill(cpu_amx_probe *p, uint64_t *state, int kind) {
  for (size_t i = 0; i < sizeof p->a / sizeof p->a[0]; ++i)
    p->a[i] = cpu_probe_pair(state, kind);
  for (size_t i = 0; i < sizeof p->b / sizeof p->b[0]; ++i)
    p->b[i] = cpu_probe_bf16(state, kind);
  for (size_t i = 0; i < sizeof p->c_init / sizeof p->c_init[0]; ++i)
    p->c_init[i] = cpu_probe_c(state, kind);
}

/* 1 when `tile` gives the bits of cpu_amx_tile_body for `rows` rows of the
 * probe's data, accumulating into C. */
static inline int cpu_amx_probe_same(cpu_amx_probe *p, int rows, cpu_tile_fn tile) {
  const int64_t stride = CPU_PROBE_PAIRS * CPU_PANEL_PAIR;
  memcpy(p->c_amx, p->c_init, sizeof p->c_init);
  memcpy(p->c_vec, p->c_init, sizeof p->c_init);
  cpu_amx_tile_body(rows, CPU_PROBE_PANELS, CPU_PROBE_PAIRS, p->a, CPU_A_STRIDE_U32, p->b, stride,
                    p->c_amx, CPU_PROBE_LDC, 1, NULL);
  tile(rows, CPU_PROBE_PANELS, CPU_PROBE_PAIRS, p->a, p->b, stride, p->c_vec, CPU_PROBE_LDC, 1,
       NULL);
  return memcmp(p->c_amx, p->c_vec, (size_t)rows * CPU_PROBE_LDC * sizeof(float)) == 0;
}

#endif /* MOE_CPU_AMX_PROBE_H */
