/*
 * bench_random.h - fast, reproducible random tensors for the benchmark:
 * gigabytes of bf16 weights in well under a second per core.
 */
#ifndef MOE_BENCH_RANDOM_H
#define MOE_BENCH_RANDOM_H

#include <stddef.h>
#include <stdint.h>

/* dst[i] = bf16(scale * z_i) with z_i approximately N(0,1). The same seed
 * gives the same values whatever the number of threads. */
void bench_random_bf16(uint16_t *dst, size_t count, float scale, uint64_t seed);

/* dst[i] = scale * z_i in fp32, as above. */
void bench_random_f32(float *dst, size_t count, float scale, uint64_t seed);

#endif /* MOE_BENCH_RANDOM_H */
