/*
 * bench_report.h - what moe_bench measured, and its two renderings: a
 * table on stdout and a JSON file (read by bench/plot.py).
 */
#ifndef MOE_BENCH_REPORT_H
#define MOE_BENCH_REPORT_H

#include "bench_device.h"

#include <stdint.h>
#include <stdio.h>

/* The run: where it ran and the machine's rooflines. */
typedef struct bench_run {
  const char *command; /* the command line, as typed */
  char date[32];       /* UTC, ISO 8601 */
  const char *backend; /* "cpu", "cuda", "opencl" */
  const char *device;  /* the context's device name */
  const char *kernels; /* the kernel path, e.g. "avx512" */
  const char *timing;  /* how a forward was timed */
  int threads;         /* OpenMP threads (CPU) */
  int have_rooflines;  /* 0: percentages are not reported */
  bench_rooflines roof;
  char read_what[96]; /* how read_gbps was measured */
} bench_run;

/* One (model, tokens) measurement. */
typedef struct bench_row {
  const char *model;
  int64_t hidden, intermediate;
  int32_t experts, top_k;
  int64_t tokens;
  int32_t experts_touched; /* distinct experts in this batch's routing */
  double flops;            /* 2*T*k*3*H*I */
  double bytes;            /* experts_touched * 3*H*I*2 */
  double median_us;
  double min_us; /* the fastest rep; 0 when the timer reports only a median */
  int reps;
} bench_row;

/* Quantities derived from a row and the rooflines (fractions, not %). */
typedef struct bench_derived {
  double tflops, gbps;
  double roofline_us; /* max(bytes/read_bw, flops/peak) */
  double of_roofline; /* roofline_us / median_us */
  double of_read_bw;  /* gbps / read_gbps */
  double of_peak;     /* tflops / peak_tflops */
  const char *bound;  /* "bandwidth" or "compute" */
} bench_derived;

bench_derived bench_derive(const bench_run *run, const bench_row *row);

/* The table: a header with device and rooflines, then rows as they come. */
void bench_print_header(FILE *out, const bench_run *run);
void bench_print_row(FILE *out, const bench_run *run, const bench_row *row);
/* A line for a model that could not run (too big, an error). */
void bench_print_skip(FILE *out, const char *model, const char *why);

/* Writes the run and every row as JSON; returns 0 or nonzero on I/O error. */
int bench_write_json(const char *path, const bench_run *run, const bench_row *rows, int count);

#endif /* MOE_BENCH_REPORT_H */
