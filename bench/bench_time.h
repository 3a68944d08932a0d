/*
 * bench_time.h - the host clock and the median the bench programs share
 * (moe_bench, the OpenCL bench, moe_tune): one definition each.
 */
#ifndef MOE_BENCH_TIME_H
#define MOE_BENCH_TIME_H

#include <stdlib.h>
#include <time.h>

/* Monotonic seconds. */
static inline double bench_seconds(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* qsort order of doubles. */
static inline int bench_compare_double(const void *a, const void *b) {
  const double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* Sorts v[0..n) and returns its median (n >= 1). */
static inline double bench_median(double *v, int n) {
  qsort(v, (size_t)n, sizeof *v, bench_compare_double);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

#endif /* MOE_BENCH_TIME_H */
