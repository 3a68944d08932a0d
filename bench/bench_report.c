/*
 * bench_report.c - renders moe_bench's measurements: the stdout table and
 * the JSON file. Every derived figure comes from bench_derive, so the two
 * always agree.
 */
#include "bench_report.h"

#include <string.h>

bench_derived bench_derive(const bench_run *run, const bench_row *row) {
  bench_derived d = {0};
  const double seconds = row->median_us * 1e-6;
  d.tflops = row->flops / seconds * 1e-12;
  d.gbps = row->bytes / seconds * 1e-9;
  d.bound = "-";
  if (!run->have_rooflines || run->roof.read_gbps <= 0 || run->roof.peak_tflops <= 0) return d;
  const double memory_us = row->bytes / (run->roof.read_gbps * 1e9) * 1e6;
  const double compute_us = row->flops / (run->roof.peak_tflops * 1e12) * 1e6;
  d.roofline_us = memory_us > compute_us ? memory_us : compute_us;
  d.bound = memory_us > compute_us ? "bandwidth" : "compute";
  d.of_roofline = d.roofline_us / row->median_us;
  d.of_read_bw = d.gbps / run->roof.read_gbps;
  d.of_peak = d.tflops / run->roof.peak_tflops;
  return d;
}

void bench_print_header(FILE *out, const bench_run *run) {
  fprintf(out, "moe_bench  %s\n", run->date);
  fprintf(out, "command    %s\n", run->command);
  fprintf(out, "backend    %s, device \"%s\", kernels %s", run->backend, run->device, run->kernels);
  if (run->threads > 0) fprintf(out, ", %d threads", run->threads);
  fprintf(out, "\ntiming     %s\n", run->timing);
  if (run->have_rooflines) {
    fprintf(out, "rooflines  read %.1f GB/s (%s)\n", run->roof.read_gbps, run->read_what);
    fprintf(out, "           peak %.3f TFLOP/s (%s)\n", run->roof.peak_tflops, run->roof.peak_what);
  } else {
    fprintf(out, "rooflines  not measured for this backend in this build: no percentages\n");
  }
  fprintf(out, "\n%-18s %5s %6s %4s %3s %6s %7s %11s %11s %9s %8s %7s %6s %6s  %s\n", "model", "H",
          "I", "E", "k", "tokens", "experts", "median_us", "min_us", "TFLOP/s", "GB/s", "%roof",
          "%bw", "%peak", "bound");
  fflush(out);
}

void bench_print_row(FILE *out, const bench_run *run, const bench_row *row) {
  const bench_derived d = bench_derive(run, row);
  fprintf(out, "%-18s %5lld %6lld %4d %3d %6lld %7d %11.1f", row->model, (long long)row->hidden,
          (long long)row->intermediate, row->experts, row->top_k, (long long)row->tokens,
          row->experts_touched, row->median_us);
  if (row->min_us > 0)
    fprintf(out, " %11.1f", row->min_us);
  else
    fprintf(out, " %11s", "-");
  fprintf(out, " %9.4f %8.1f", d.tflops, d.gbps);
  if (run->have_rooflines)
    fprintf(out, " %6.1f%% %5.1f%% %5.1f%%  %s\n", 100 * d.of_roofline, 100 * d.of_read_bw,
            100 * d.of_peak, d.bound);
  else
    fprintf(out, " %7s %6s %6s  -\n", "-", "-", "-");
  fflush(out);
}

void bench_print_skip(FILE *out, const char *model, const char *why) {
  fprintf(out, "%-18s skipped: %s\n", model, why);
  fflush(out);
}

/* A JSON string: quotes, backslashes and control characters escaped. */
static void json_string(FILE *f, const char *s) {
  fputc('"', f);
  for (; s && *s; ++s) {
    const unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\')
      fprintf(f, "\\%c", c);
    else if (c < 0x20)
      fprintf(f, "\\u%04x", c);
    else
      fputc(c, f);
  }
  fputc('"', f);
}

int bench_write_json(const char *path, const bench_run *run, const bench_row *rows, int count) {
  FILE *f = fopen(path, "w");
  if (!f) return 1;
  fprintf(f, "{\n  \"command\": ");
  json_string(f, run->command);
  fprintf(f, ",\n  \"date\": ");
  json_string(f, run->date);
  fprintf(f, ",\n  \"backend\": ");
  json_string(f, run->backend);
  fprintf(f, ",\n  \"device\": ");
  json_string(f, run->device);
  fprintf(f, ",\n  \"kernels\": ");
  json_string(f, run->kernels);
  fprintf(f, ",\n  \"timing\": ");
  json_string(f, run->timing);
  fprintf(f, ",\n  \"threads\": %d,\n  \"rooflines\": ", run->threads);
  if (run->have_rooflines) {
    fprintf(f, "{\"read_gbps\": %.3f, \"read_what\": ", run->roof.read_gbps);
    json_string(f, run->read_what);
    fprintf(f, ", \"peak_tflops\": %.6f, \"peak_what\": ", run->roof.peak_tflops);
    json_string(f, run->roof.peak_what);
    fprintf(f, ", \"device\": ");
    json_string(f, run->roof.device);
    fprintf(f, "}");
  } else {
    fprintf(f, "null");
  }
  fprintf(f, ",\n  \"rows\": [");
  for (int i = 0; i < count; ++i) {
    const bench_row *r = &rows[i];
    const bench_derived d = bench_derive(run, r);
    fprintf(f, "%s\n    {\"model\": ", i ? "," : "");
    json_string(f, r->model);
    fprintf(f,
            ", \"hidden\": %lld, \"intermediate\": %lld, \"experts\": %d, \"top_k\": %d, "
            "\"tokens\": %lld, \"experts_touched\": %d, \"flops\": %.6g, \"bytes\": %.6g, "
            "\"median_us\": %.3f, \"min_us\": %.3f, \"reps\": %d, \"tflops\": %.6f, "
            "\"gbps\": %.3f",
            (long long)r->hidden, (long long)r->intermediate, r->experts, r->top_k,
            (long long)r->tokens, r->experts_touched, r->flops, r->bytes, r->median_us, r->min_us,
            r->reps, d.tflops, d.gbps);
    if (run->have_rooflines)
      fprintf(f,
              ", \"roofline_us\": %.3f, \"of_roofline\": %.5f, \"of_read_bw\": %.5f, "
              "\"of_peak\": %.5f, \"bound\": \"%s\"}",
              d.roofline_us, d.of_roofline, d.of_read_bw, d.of_peak, d.bound);
    else
      fprintf(f, "}");
  }
  fprintf(f, "\n  ]\n}\n");
  const int write_failed = ferror(f);
  return fclose(f) != 0 || write_failed ? 1 : 0;
}
