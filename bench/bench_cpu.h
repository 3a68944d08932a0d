/*
 * bench_cpu.h - the host CPU's rooflines, measured by the bench's own
 * kernels in the same run: DRAM read bandwidth (every thread summing a
 * large array) and the dot-product compute peak (AMX TDPBF16PS tiles
 * where the CPU has AMX and the OS allows it, else the faster of AVX-512
 * BF16 vdpbf16ps and AVX-512 fp32 FMA where the CPU has avx512_bf16, else
 * AVX-512 fp32 FMA, else plain C fp32 FMA).
 * Also a cache flush, so that each timed forward reads its weights from
 * DRAM as a decode step of a real model does.
 */
#ifndef MOE_BENCH_CPU_H
#define MOE_BENCH_CPU_H

#include "bench_device.h"

#include <stddef.h>

/* Fills r (read_gbps, peak_tflops, peak_what, device) and read_what (how
 * the bandwidth was measured). array_bytes: size of the array summed
 * (at least 1 GiB is advised). Returns 0, or nonzero when out of memory. */
int bench_cpu_rooflines(size_t array_bytes, bench_rooflines *r, char *read_what,
                        size_t read_what_size);

/* Evicts the caches by writing a buffer a few times the size of the last
 * level cache. The first call allocates it; bench_cpu_flush_free frees it. */
void bench_cpu_flush_caches(void);
void bench_cpu_flush_free(void);

#endif /* MOE_BENCH_CPU_H */
