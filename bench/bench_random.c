/*
 * bench_random.c - approximately normal random numbers from a
 * counter-based hash: value j of chunk c depends only on (seed, c, j), so
 * chunks fill in parallel and the inner loop vectorizes.
 *
 * Each value is the sum of four 16-bit uniforms (Irwin-Hall of order 4,
 * rescaled to unit variance): two 32-bit hashes per value, tails cut at
 * +-3.46 sigma. Timings depend on magnitudes and on routing, not on exact
 * Gaussian tails.
 */
#include "bench_random.h"

#include <stdbool.h>
#include <string.h>

/* Values per chunk: a chunk's stream depends only on (seed, chunk index). */
#define CHUNK ((size_t)1 << 16)

/* x86-64: one clone per vector width (the 32-bit multiplies of the hash
 * need at least AVX2 to vectorize); the loader picks one at run time. */
#if defined(__x86_64__) && defined(__GNUC__)
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

static inline uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* A 32-bit integer hash with a 64-bit key mixed into both rounds. */
static inline uint32_t keyed_hash(uint32_t x, uint32_t key_lo, uint32_t key_hi) {
  x ^= key_lo;
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= key_hi;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

/* Value j of a chunk with key (lo, hi): approximately N(0,1). */
static inline float normal_at(uint32_t j, uint32_t lo, uint32_t hi) {
  const uint32_t a = keyed_hash(2 * j, lo, hi), b = keyed_hash(2 * j + 1, lo, hi);
  const uint32_t sum = (a & 0xffff) + (a >> 16) + (b & 0xffff) + (b >> 16);
  /* Four uniforms on [0, 65535]: mean 131070, standard deviation 65536/sqrt(3). */
  return (float)((int32_t)sum - 131070) * (1.7320508f / 65536.0f);
}

/* fp32 -> bf16, round to nearest even (inputs here are finite). */
static inline uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

VECTOR_CLONES static void chunk_bf16(uint16_t *dst, uint32_t n, float scale, uint64_t key) {
  const uint32_t lo = (uint32_t)key, hi = (uint32_t)(key >> 32);
  for (uint32_t j = 0; j < n; ++j)
    dst[j] = to_bf16(scale * normal_at(j, lo, hi));
}

VECTOR_CLONES static void chunk_f32(float *dst, uint32_t n, float scale, uint64_t key) {
  const uint32_t lo = (uint32_t)key, hi = (uint32_t)(key >> 32);
  for (uint32_t j = 0; j < n; ++j)
    dst[j] = scale * normal_at(j, lo, hi);
}

/* Chunks in parallel (this also first-touches fresh memory on all threads). */
static void fill(void *dst, size_t count, float scale, uint64_t seed, bool as_bf16) {
  const size_t chunks = (count + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static)
  for (size_t c = 0; c < chunks; ++c) {
    const uint64_t key = splitmix64(seed ^ splitmix64(c));
    const size_t begin = c * CHUNK;
    const uint32_t n = (uint32_t)(count - begin < CHUNK ? count - begin : CHUNK);
    if (as_bf16)
      chunk_bf16((uint16_t *)dst + begin, n, scale, key);
    else
      chunk_f32((float *)dst + begin, n, scale, key);
  }
}

void bench_random_bf16(uint16_t *dst, size_t count, float scale, uint64_t seed) {
  fill(dst, count, scale, seed, true);
}

void bench_random_f32(float *dst, size_t count, float scale, uint64_t seed) {
  fill(dst, count, scale, seed, false);
}
