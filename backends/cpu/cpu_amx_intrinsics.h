/*
 * cpu_amx_intrinsics.h - the tile operations of cpu_amx_tile.h mapped to the
 * AMX intrinsics, for the files compiled with -mamx-tile -mamx-bf16 that
 * run the kernel body on the hardware: the AMX kernel path
 * (cpu_kernels_amx.c) and the streaming probe (bench/amx_stream_probe.c).
 * cpu_amx_check.c maps the same operations to its scalar model instead.
 */
#ifndef MOE_CPU_AMX_INTRINSICS_H
#define MOE_CPU_AMX_INTRINSICS_H

#include <immintrin.h>

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
/* The cache level the weight prefetch fills: T0 (L1) by default; T1 (L2)
 * for A/B builds (-DCPU_AMX_PREFETCH_HINT=_MM_HINT_T1: geomean 0.97x and
 * 1.08x the time on 2 threads, 1.00x and 1.09x on 16, on two hosts; bench/results.md, "CPU AMX
 * path: the prepared prefetch variants"). */
#ifndef CPU_AMX_PREFETCH_HINT
#define CPU_AMX_PREFETCH_HINT _MM_HINT_T0
#endif
/* Each request is followed by an empty volatile asm that takes its address:
 * GCC 12 counts a prefetch as no side effect, so a loop of nothing but
 * prefetches (cpu_amx_prefetch_part's) is dead code to it and was deleted
 * at -O1 and above: until 2026-12-07 the library's AMX kernel issued none
 * of its near weight requests, only the next-K-block stream, whose loop
 * also advances a pointer. The asm keeps every request. */
#define AMX_KEEP(p) __asm__ volatile("" : : "r"(p))
#define AMX_PREFETCH(p)                                                                            \
  do {                                                                                             \
    _mm_prefetch((const char *)(p), CPU_AMX_PREFETCH_HINT);                                        \
    AMX_KEEP(p);                                                                                   \
  } while (0)
#define AMX_PREFETCH_L2(p)                                                                         \
  do {                                                                                             \
    _mm_prefetch((const char *)(p), _MM_HINT_T1);                                                  \
    AMX_KEEP(p);                                                                                   \
  } while (0)

#endif /* MOE_CPU_AMX_INTRINSICS_H */
