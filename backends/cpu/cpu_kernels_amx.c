/*
 * cpu_kernels_amx.c - the AMX BF16 kernel path: TDPBF16PS on 16 x 16 fp32
 * accumulator tiles (cpu_amx_tile.h), the tile data permission, and the
 * check that decides whether tiles of a few rows may go to a vector
 * kernel (AVX-512 BF16, or AVX-512F FMAs in TDPBF16PS's order). Compiled
 * with -mamx-tile -mamx-bf16 (and the AVX-512 flags) for this file only;
 * the backend selects it only after cpu_amx_usable().
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
 * measured at 82-99% of DRAM bandwidth (bench/results.md), while AMX took
 * 1.5x as long for one-token decode on a Sapphire Rapids-class host (Qwen3,
 * 839 vs 548 us). Such tiles may go to a vector kernel reading the same
 * packed A and B, but only one that gives tdpbf16ps's bits, or a token's
 * result would depend on how many rows its expert had in the batch (batch
 * invariance). Two candidates:
 *   avx512bf16  vdpbf16ps (cpu_kernels_avx512bf16.c). Documented with the
 *               same rounding (RNE per addition, DAZ, FTZ) but the odd k's
 *               product added before the even k's: the reverse of
 *               tdpbf16ps's pseudo-code, so its bits may differ.
 *   fma-order   cpu_amx_order_tile (cpu_kernels_amx_order.c). The SDM
 *               writes each tdpbf16ps step as an fp32 FMA with DAZ, FTZ and
 *               RNE, even k then odd k, k-pairs in order; a bf16 x bf16
 *               product is exact in fp32, so AVX-512F FMAs in that order
 *               under MXCSR DAZ/FTZ/RNE give the same bits, if the hardware
 *               does what the pseudo-code says. cpu_amx_check verifies this
 *               kernel bit for bit against a scalar model of the
 *               pseudo-code, denormals included.
 * The hardware may differ from its pseudo-code (a fused pair, another
 * tininess rule, signed zeros), so the first use measures it:
 * split_rows_probe runs real tdpbf16ps tiles and both candidates on the
 * data of cpu_amx_probe.h (normal values of wide range; values around the
 * smallest normal with denormals; mixed magnitudes) and hands small tiles
 * to the first candidate that matched every bit, vdpbf16ps preferred (it
 * needs no MXCSR switch and half the instructions), else AMX takes every
 * tile. The choice depends only on the CPU, never on the data of a call,
 * so every call of a process computes each element the same way.
 */
#include "cpu_kernels.h"

#include <cpuid.h>
#include <immintrin.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

#include "cpu_amx_intrinsics.h"
#include "cpu_amx_tile.h"

#include "cpu_amx_probe.h"

static pthread_once_t amx_once = PTHREAD_ONCE_INIT;
static int amx_usable;
static int amx_split_rows;
static cpu_tile_fn amx_split_tile; /* takes tiles of < amx_split_rows rows */
static const char *amx_split_name = "none";

/* Chooses the kernel for tiles of a few rows: the first candidate giving
 * tdpbf16ps's bits on every probe (cpu_amx_probe.h), or none. */
static void split_rows_probe(void) {
  struct candidate {
    const char *name;
    cpu_tile_fn tile;
    int same;
  } candidates[] = {
      {"avx512bf16", cpu_path_avx512bf16.tile, 1},
#ifdef MOE_CPU_HAVE_AMX_ORDER
      {"fma-order", cpu_amx_order_tile, 1},
#endif
  };
  enum { COUNT = sizeof candidates / sizeof candidates[0], TRIALS = 8 };
  static cpu_amx_probe probe;
  uint64_t state = 0x243f6a8885a308d3ull;
  for (int kind = 0; kind < CPU_PROBE_KINDS; ++kind)
    for (int trial = 0; trial < TRIALS; ++trial) {
      cpu_amx_probe_fill(&probe, &state, kind);
      const int rows = 1 + trial % CPU_PROBE_ROWS;
      for (int i = 0; i < COUNT; ++i)
        if (candidates[i].same)
          candidates[i].same = cpu_amx_probe_same(&probe, rows, candidates[i].tile);
    }
  for (int i = 0; i < COUNT; ++i)
    if (candidates[i].same) {
      amx_split_rows = CPU_AMX_MIN_ROWS;
      amx_split_tile = candidates[i].tile;
      amx_split_name = candidates[i].name;
      return;
    }
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
  split_rows_probe();
}

int cpu_amx_usable(void) {
  pthread_once(&amx_once, amx_init);
  return amx_usable;
}

int cpu_amx_split_rows(void) {
  pthread_once(&amx_once, amx_init);
  return amx_split_rows;
}

const char *cpu_amx_split_kernel(void) {
  pthread_once(&amx_once, amx_init);
  return amx_split_name;
}

/* Selected only after cpu_amx_usable(), so amx_split_rows is set. */
static void amx_tile(int rows, int panels, int64_t kpairs, const void *a_packed, const uint16_t *b,
                     int64_t panel_stride, float *c, int64_t ldc, int accumulate,
                     const cpu_weight_prefetch *prefetch) {
  if (rows < amx_split_rows) {
    amx_split_tile(rows, panels, kpairs, a_packed, b, panel_stride, c, ldc, accumulate, prefetch);
    return;
  }
  cpu_amx_tile_body(rows, panels, kpairs, a_packed, CPU_A_STRIDE_U32, b, panel_stride, c, ldc,
                    accumulate, prefetch);
}

/* A in place (the layer's sorted activation rows); the few rows of a split
 * tile are copied into the packed form the vector kernels read. */
static void amx_tile_strided(int rows, int panels, int64_t kpairs, const uint32_t *a,
                             int64_t a_stride_u32, const uint16_t *b, int64_t panel_stride,
                             float *c, int64_t ldc, int accumulate,
                             const cpu_weight_prefetch *prefetch) {
  if (rows < amx_split_rows) {
    uint32_t packed[(CPU_AMX_MIN_ROWS - 1) * CPU_A_STRIDE_U32];
    for (int r = 0; r < rows; ++r)
      memcpy(packed + r * CPU_A_STRIDE_U32, a + r * a_stride_u32, (size_t)kpairs * sizeof *a);
    amx_split_tile(rows, panels, kpairs, packed, b, panel_stride, c, ldc, accumulate, prefetch);
    return;
  }
  cpu_amx_tile_body(rows, panels, kpairs, a, a_stride_u32, b, panel_stride, c, ldc, accumulate,
                    prefetch);
}

_Static_assert(CPU_AMX_MIN_ROWS <= CPU_MR_MAX + 1, "the AVX-512 kernels take <= CPU_MR_MAX rows");

const cpu_kernel_path cpu_path_amx = {
    .name = "amx",
    .a_format = CPU_A_BF16_PAIRS,
    .tile = amx_tile,
    .tile_strided = amx_tile_strided,
    .tile_rows = CPU_AMX_TILE_ROWS,
    .one_tile_rows = CPU_AMX_ONE_TILE_ROWS,
    .row_block = CPU_AMX_ROW_BLOCK,
    .item_rows = CPU_AMX_ITEM_ROWS,
};
