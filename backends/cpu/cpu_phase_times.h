/*
 * cpu_phase_times.h - where a CPU forward's time goes, on hosts without a
 * profiler (the GPU machines' hosts have no perf). Built with
 * -DCPU_PHASE_TIMES, the forward adds each stage's wall time to its
 * layer's totals and prints the per-forward means to stderr when the token
 * count changes and when the layer is destroyed, with the two GEMMs' rates.
 * The means include the warm-up forwards and whatever the caller does
 * between forwards (moe_bench flushes the caches: cold weights, as timed).
 * Without the definition the macros are empty and the layer has no field.
 */
#ifndef MOE_CPU_PHASE_TIMES_H
#define MOE_CPU_PHASE_TIMES_H

#ifdef CPU_PHASE_TIMES
#include <omp.h>
#include <stdint.h>
#include <stdio.h>

enum { PHASE_ROUTE, PHASE_GATHER, PHASE_GEMM1, PHASE_GEMM2, PHASE_REDUCE, PHASE_COUNT };

typedef struct cpu_phase_times {
  double seconds[PHASE_COUNT];
  int64_t forwards, tokens;
} cpu_phase_times;

/* Prints and clears the totals of `forwards` forwards of `tokens` tokens. */
static inline void cpu_phase_print(cpu_phase_times *t, int64_t hidden, int64_t inter,
                                   int64_t top_k) {
  if (t->forwards == 0) return;
  static const char *names[PHASE_COUNT] = {"route+align", "gather", "gemm1", "gemm2", "reduce"};
  const double n = (double)t->forwards, slots = (double)(t->tokens * top_k);
  const double flops[PHASE_COUNT] = {0, 0, 2 * slots * hidden * 2 * inter,
                                     2 * slots * inter * hidden, 0};
  double total = 0;
  for (int i = 0; i < PHASE_COUNT; ++i)
    total += t->seconds[i] / n;
  fprintf(stderr, "cpu phases H=%lld I=%lld tokens=%lld (%lld forwards), ms per forward:",
          (long long)hidden, (long long)inter, (long long)t->tokens, (long long)t->forwards);
  for (int i = 0; i < PHASE_COUNT; ++i) {
    const double s = t->seconds[i] / n;
    fprintf(stderr, " %s %.3f", names[i], 1e3 * s);
    if (flops[i] > 0 && s > 0) fprintf(stderr, " (%.2f TFLOP/s)", flops[i] / s * 1e-12);
    t->seconds[i] = 0;
  }
  fprintf(stderr, "; total %.3f\n", 1e3 * total);
  t->forwards = 0;
}

#define CPU_PHASE_FIELD cpu_phase_times phases;
#define CPU_PHASE_START(layer, num_tokens, hidden, inter, top_k)                                   \
  if ((layer)->phases.tokens != (num_tokens)) {                                                    \
    cpu_phase_print(&(layer)->phases, hidden, inter, top_k);                                       \
    (layer)->phases.tokens = (num_tokens);                                                         \
  }                                                                                                \
  ++(layer)->phases.forwards;                                                                      \
  double phase_clock = omp_get_wtime()
#define CPU_PHASE_MARK(layer, phase)                                                               \
  do {                                                                                             \
    const double now = omp_get_wtime();                                                            \
    (layer)->phases.seconds[phase] += now - phase_clock;                                           \
    phase_clock = now;                                                                             \
  } while (0)
#define CPU_PHASE_FINISH(layer, hidden, inter, top_k)                                              \
  cpu_phase_print(&(layer)->phases, hidden, inter, top_k)
#else
#define CPU_PHASE_FIELD
#define CPU_PHASE_START(layer, num_tokens, hidden, inter, top_k) ((void)0)
#define CPU_PHASE_MARK(layer, phase) ((void)0)
#define CPU_PHASE_FINISH(layer, hidden, inter, top_k) ((void)0)
#endif

#endif /* MOE_CPU_PHASE_TIMES_H */
