/*
 * cpu_kernels_amx.c - the AMX BF16 kernel path: TDPBF16PS on 16 x 16 fp32
 * accumulator tiles (cpu_amx_tile.h), the tile data permission, and the
 * check that decides whether tiles of a few rows may go to the AVX-512
 * BF16 kernel. Compiled with -mamx-tile -mamx-bf16 (and the AVX-512 flags)
 * for this file only; the backend selects it only after cpu_amx_usable().
 *
 * The packing: A rows are gathered by the driver into CPU_A_BF16_PAIRS
 * (the bf16 rows themselves, 16 k-pairs of 16 rows = one A tile), and the
 * layer's packed weight panels already are TDPBF16PS's VNNI B layout (see
 * cpu_amx_tile.h), so the weights are repacked once, at layer creation, as
 * for the other paths. The epilogue (bias, routed weight, activation, bf16)
 * is the driver's, shared by every path.
 *
 * Decode: a tile of fewer than CPU_AMX_MIN_ROWS rows is bandwidth-bound on
 * either unit; the AVX-512 decode kernels stream 4 panels per pass and were
 * measured at 82-99% of DRAM bandwidth (bench/results.md), so such tiles go
 * to the AVX-512 BF16 kernel, which reads the same packed A and B. That is
 * allowed only if vdpbf16ps and tdpbf16ps give the same bits, or a token's
 * result would depend on how many rows its expert had in the batch (batch
 * invariance). Both are documented to round each accumulation to nearest
 * even and to flush denormals, but their pseudo-code adds the pair's
 * products in opposite orders, so the first use measures it on random data
 * (split_rows_probe) and, where any bit differs, AMX takes every tile.
 */
#include "cpu_kernels.h"

#include <cpuid.h>
#include <immintrin.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Below this many rows per tile call, tiles go to the AVX-512 BF16 kernel
 * (when split_rows_probe allows it). 4: the AVX-512 decode kernels handle
 * up to 3 rows with 4 panels in flight, the shape that streams weights at
 * DRAM speed; from 4 rows AMX does at least 4x the multiply work per weight
 * byte loaded. Not yet tuned on an AMX machine: bench/results.md, section
 * "CPU AMX path", says how to sweep it (option cpu.kernels=avx512bf16 vs amx
 * at 1, 4, 16 tokens). Must stay <= CPU_MR_MAX + 1. */
#define CPU_AMX_MIN_ROWS 4

#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* GCC 12's ldtilecfg and tileloadd asm statements declare no memory read
 * (ldtilecfg names 8 of its 64 bytes), so the compiler could keep the
 * configuration's or the operands' stores after them: each goes after a
 * barrier that hands the address to an asm reading all memory. */
#define AMX_ESCAPE(p) __asm__ volatile("" : : "r"(p) : "memory")
#define AMX_CONFIG(cfg)                                                                            \
  do {                                                                                             \
    AMX_ESCAPE(cfg);                                                                               \
    _tile_loadconfig(cfg);                                                                         \
  } while (0)
#define AMX_ZERO(t) _tile_zero(t)
#define AMX_LOAD(t, p, s)                                                                          \
  do {                                                                                             \
    AMX_ESCAPE(p);                                                                                 \
    _tile_loadd(t, p, s);                                                                          \
  } while (0)
#define AMX_STORE(t, p, s) _tile_stored(t, p, s)
#define AMX_DP(c, a, b) _tile_dpbf16ps(c, a, b)
#define AMX_RELEASE() _tile_release()
#include "cpu_amx_tile.h"

static pthread_once_t amx_once = PTHREAD_ONCE_INIT;
static int amx_usable;
static int amx_split_rows;

/* A value of a wide range of magnitudes (2^-12 .. 2^12) and both signs,
 * so that the two instructions' roundings are exercised; never denormal. */
static uint16_t probe_bf16(uint64_t *state) {
  *state = *state * 6364136223846793005ull + 1442695040888963407ull;
  const uint32_t r = (uint32_t)(*state >> 33);
  const uint32_t exponent = 127 - 12 + (r % 25), mantissa = (r >> 5) & 0x7f, sign = (r >> 12) & 1;
  return (uint16_t)(sign << 15 | exponent << 7 | mantissa);
}

/* 1 when tdpbf16ps and the AVX-512 BF16 kernel give identical bits on a
 * few thousand random dot products (rows 3 and 12: both of its kernels;
 * K of 40 k-pairs: full and tail steps; accumulating into random C). */
static int split_rows_probe(void) {
#ifdef MOE_CPU_HAVE_AVX512BF16
  enum { PANELS = 4, PAIRS = 40, ROWS = 12, LDC = PANELS * CPU_PANEL_COLS };
  static uint32_t a[ROWS * CPU_A_STRIDE_U32];
  static uint16_t b[PANELS * PAIRS * CPU_PANEL_PAIR];
  static float c_init[ROWS * LDC], c_amx[ROWS * LDC], c_vec[ROWS * LDC];
  uint64_t state = 0x243f6a8885a308d3ull;
  for (int trial = 0; trial < 16; ++trial) {
    for (size_t i = 0; i < sizeof a / sizeof a[0]; ++i)
      a[i] = probe_bf16(&state) | (uint32_t)probe_bf16(&state) << 16;
    for (size_t i = 0; i < sizeof b / sizeof b[0]; ++i)
      b[i] = probe_bf16(&state);
    for (size_t i = 0; i < sizeof c_init / sizeof c_init[0]; ++i) {
      const uint32_t bits = (uint32_t)probe_bf16(&state) << 16;
      memcpy(&c_init[i], &bits, sizeof bits);
    }
    const int rows = trial % 2 ? 3 : ROWS;
    memcpy(c_amx, c_init, sizeof c_init);
    memcpy(c_vec, c_init, sizeof c_init);
    cpu_amx_tile_body(rows, PANELS, PAIRS, a, b, PAIRS * CPU_PANEL_PAIR, c_amx, LDC, 1);
    cpu_path_avx512bf16.tile(rows, PANELS, PAIRS, a, b, PAIRS * CPU_PANEL_PAIR, c_vec, LDC, 1,
                             NULL);
    if (memcmp(c_amx, c_vec, (size_t)rows * LDC * sizeof(float)) != 0) return 0;
  }
  return 1;
#else
  return 0;
#endif
}

static void amx_init(void) {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return;
  if (!(edx & (1u << 22)) || !(edx & (1u << 24))) return; /* AMX-BF16, AMX-TILE */
  /* Linux keeps the 8 KiB tile state off until a process asks for it. */
  if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return;
  unsigned long granted = 0;
  if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &granted) != 0 ||
      !(granted & (1ul << XFEATURE_XTILEDATA)))
    return;
  amx_usable = 1;
  /* Option cpu.kernels=amx chooses this path; no new option to force the
   * split off is needed: where the probe fails it is off. */
  amx_split_rows = split_rows_probe() ? CPU_AMX_MIN_ROWS : 0;
}

int cpu_amx_usable(void) {
  pthread_once(&amx_once, amx_init);
  return amx_usable;
}

int cpu_amx_split_rows(void) {
  pthread_once(&amx_once, amx_init);
  return amx_split_rows;
}

/* Selected only after cpu_amx_usable(), so amx_split_rows is set. */
static void amx_tile(int rows, int panels, int64_t kpairs, const void *a_packed, const uint16_t *b,
                     int64_t panel_stride, float *c, int64_t ldc, int accumulate,
                     const uint16_t *prefetch_after) {
#ifdef MOE_CPU_HAVE_AVX512BF16
  if (rows < amx_split_rows) {
    cpu_path_avx512bf16.tile(rows, panels, kpairs, a_packed, b, panel_stride, c, ldc, accumulate,
                             prefetch_after);
    return;
  }
#endif
  (void)prefetch_after;
  cpu_amx_tile_body(rows, panels, kpairs, a_packed, b, panel_stride, c, ldc, accumulate);
}

_Static_assert(CPU_AMX_MIN_ROWS <= CPU_MR_MAX + 1, "the AVX-512 kernels take <= CPU_MR_MAX rows");

const cpu_kernel_path cpu_path_amx = {
    .name = "amx",
    .a_format = CPU_A_BF16_PAIRS,
    .tile = amx_tile,
    .tile_rows = CPU_AMX_TILE_ROWS,
    .item_rows = CPU_AMX_ITEM_ROWS,
};
