/*
 * bench_cpu.c - CPU rooflines: a DRAM read kernel and a dot-product peak
 * kernel, each on every OpenMP thread, dispatched at run time on the
 * instruction sets the CPU has (AMX BF16, AVX-512 BF16, AVX-512F, or plain
 * C).
 *
 * The vector peak kernels keep 16 independent accumulators per thread so
 * that the FMA latency (4 cycles) times the FMA ports (2) is covered with
 * room. The AMX kernel keeps 4 accumulator tiles, as the library's AMX
 * path does, and loads its A and B tiles from L1 every step, as it does.
 */
#include "bench_cpu.h"

#include <omp.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#define BENCH_X86 1
#endif

static volatile uint64_t sink_u64; /* keeps kernel results alive */
static volatile float sink_f32;

/* ---- DRAM read bandwidth ------------------------------------------------ */

static uint64_t sum_portable(const uint64_t *a, size_t n) {
  uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i];
    s1 += a[i + 1];
    s2 += a[i + 2];
    s3 += a[i + 3];
  }
  for (; i < n; ++i)
    s0 += a[i];
  return s0 + s1 + s2 + s3;
}

#ifdef BENCH_X86
/* 64-byte aligned a, n a multiple of 32; four cache lines per iteration.
 * One stream reads them adjacent; four streams read one line from each
 * quarter of the range. Which is faster depends on the machine (four
 * streams: +10% on a 2-core Skylake-SP guest, -30% on a 16-core Sapphire
 * Rapids guest), so the roofline takes the better. */
__attribute__((target("avx512f"))) static uint64_t sum_avx512(const uint64_t *a, size_t n,
                                                              bool four_streams) {
  const size_t gap = four_streams ? n / 4 : 8, step = four_streams ? 8 : 32;
  const size_t extent = four_streams ? n / 4 : n;
  __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
  for (size_t i = 0; i < extent; i += step) {
    s0 = _mm512_add_epi64(s0, _mm512_load_si512((const void *)(a + i)));
    s1 = _mm512_add_epi64(s1, _mm512_load_si512((const void *)(a + i + gap)));
    s2 = _mm512_add_epi64(s2, _mm512_load_si512((const void *)(a + i + 2 * gap)));
    s3 = _mm512_add_epi64(s3, _mm512_load_si512((const void *)(a + i + 3 * gap)));
  }
  s0 = _mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3));
  return (uint64_t)_mm512_reduce_add_epi64(s0);
}
#endif

static int have_avx512f(void) {
#ifdef BENCH_X86
  return __builtin_cpu_supports("avx512f");
#else
  return 0;
#endif
}

static int have_avx512bf16(void) {
#ifdef BENCH_X86
  return __builtin_cpu_supports("avx512bf16");
#else
  return 0;
#endif
}

/* Best of several passes over the array, each thread summing the part it
 * first touched (so that its pages are local on NUMA machines). Best, not
 * median: on a shared machine it is the rate the memory system can give.
 * With AVX-512, passes alternate one and four streams per thread;
 * *four_streams_won tells which gave the best pass. */
static double read_bandwidth_gbps(uint64_t *a, size_t n, bool use_avx512, bool *four_streams_won) {
  const int passes = 12;
  double best = 0;
  *four_streams_won = false;
  for (int pass = 0; pass < passes; ++pass) {
    const bool four_streams = use_avx512 && pass % 2;
    uint64_t total = 0;
    const double t0 = omp_get_wtime();
#pragma omp parallel reduction(+ : total)
    {
      const size_t threads = (size_t)omp_get_num_threads(), id = (size_t)omp_get_thread_num();
      const size_t per = n / threads / 32 * 32;
      const size_t begin = id * per, count = id + 1 == threads ? n - begin : per;
#ifdef BENCH_X86
      if (use_avx512)
        total += sum_avx512(a + begin, count, four_streams);
      else
#endif
        total += sum_portable(a + begin, count);
    }
    const double seconds = omp_get_wtime() - t0;
    sink_u64 = total;
    const double gbps = (double)n * sizeof *a / seconds * 1e-9;
    if (gbps > best) best = gbps, *four_streams_won = four_streams;
  }
  return best;
}

/* ---- dot-product peak --------------------------------------------------- */

/* Each kernel returns the flops it did; iterations per thread. */

static double fma_portable(int64_t iterations) {
  float acc[16], a = 0.999999f, b = 1e-6f;
  for (int j = 0; j < 16; ++j)
    acc[j] = (float)j;
  for (int64_t i = 0; i < iterations; ++i)
    for (int j = 0; j < 16; ++j)
      acc[j] = acc[j] * a + b;
  float s = 0;
  for (int j = 0; j < 16; ++j)
    s += acc[j];
  sink_f32 = s;
  return 2.0 * 16 * (double)iterations;
}

#ifdef BENCH_X86
#define ACCUMULATORS 16

__attribute__((target("avx512f"))) static double fma_avx512(int64_t iterations) {
  __m512 acc[ACCUMULATORS];
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-6f);
  for (int j = 0; j < ACCUMULATORS; ++j)
    acc[j] = _mm512_set1_ps((float)j);
  for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < ACCUMULATORS; ++j)
      acc[j] = _mm512_fmadd_ps(acc[j], a, b);
  }
  __m512 s = acc[0];
  for (int j = 1; j < ACCUMULATORS; ++j)
    s = _mm512_add_ps(s, acc[j]);
  sink_f32 = _mm512_reduce_add_ps(s);
  /* 16 lanes, multiply and add. */
  return 2.0 * 16 * ACCUMULATORS * (double)iterations;
}

__attribute__((target("avx512f,avx512bf16"))) static double dot_avx512bf16(int64_t iterations) {
  __m512 acc[ACCUMULATORS];
  /* bf16 0x3f80 = 1.0 and 0x3380 ~ 6e-8: the sums stay small and normal. */
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80);
  const __m512bh b = (__m512bh)_mm512_set1_epi16(0x3380);
  for (int j = 0; j < ACCUMULATORS; ++j)
    acc[j] = _mm512_set1_ps((float)j);
  for (int64_t i = 0; i < iterations; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < ACCUMULATORS; ++j)
      acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
  }
  __m512 s = acc[0];
  for (int j = 1; j < ACCUMULATORS; ++j)
    s = _mm512_add_ps(s, acc[j]);
  sink_f32 = _mm512_reduce_add_ps(s);
  /* 16 lanes, each a pair of products and their sum into the lane. */
  return 4.0 * 16 * ACCUMULATORS * (double)iterations;
}

/* AMX: CPUID.(7,0):EDX bit 22 (AMX-BF16) and 24 (AMX-TILE), and the OS's
 * permission for the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM of
 * XFEATURE_XTILEDATA, process-wide; the library asks the same). */
static int have_amx(void) {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return 0;
  if (!(edx & (1u << 22)) || !(edx & (1u << 24))) return 0;
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
}

/* The ldtilecfg operand: palette 1, every tile 16 rows x 64 bytes. */
typedef struct amx_config {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} amx_config;

/* Per step: two A tiles and two B tiles loaded (from L1), four TDPBF16PS
 * into four accumulator tiles, each 16 x 16 x 32 multiply-adds. */
__attribute__((target("amx-tile,amx-bf16"))) static double dot_amx(int64_t iterations) {
  _Alignas(64) uint16_t a[2][16 * 32], b[2][16 * 32];
  _Alignas(64) float c[16 * 16];
  for (int i = 0; i < 16 * 32; ++i) /* 1.0 and ~6e-8, as dot_avx512bf16 */
    a[0][i] = a[1][i] = 0x3f80, b[0][i] = b[1][i] = 0x3380;
  amx_config cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t)
    cfg.rows[t] = 16, cfg.colsb[t] = 64;
  /* GCC 12's ldtilecfg and tileloadd declare no memory read: make the
   * stores above visible to them. */
  __asm__ volatile("" : : "r"(&cfg), "r"(a), "r"(b) : "memory");
  _tile_loadconfig(&cfg);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t i = 0; i < iterations; ++i) {
    _tile_loadd(4, a[0], 64);
    _tile_loadd(5, a[1], 64);
    _tile_loadd(6, b[0], 64);
    _tile_loadd(7, b[1], 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  float s = 0;
  _tile_stored(0, c, 64);
  s += c[0];
  _tile_stored(3, c, 64);
  s += c[255];
  _tile_release();
  sink_f32 = s;
  /* Four tiles of 16 x 16 outputs, each 32 products and their sums. */
  return 4.0 * 16 * 16 * 32 * 2 * (double)iterations;
}
#endif

typedef double (*peak_kernel)(int64_t iterations);

/* Flops of kernel on every thread in one timed run. */
static double timed_run(peak_kernel kernel, int64_t iterations, double *flops_per_second) {
  double flops = 0;
  const double t0 = omp_get_wtime();
#pragma omp parallel reduction(+ : flops)
  flops += kernel(iterations);
  const double elapsed = omp_get_wtime() - t0;
  *flops_per_second = elapsed > 0 ? flops / elapsed : 0;
  return elapsed;
}

/* Best flops per second of kernel on every thread: grow the run to about
 * `seconds` (which also brings the cores to their AVX-512 clock), then take
 * the best of several runs of that length (best: on a shared or virtual
 * machine it is the rate the cores can give). */
static double peak_flops(peak_kernel kernel, double seconds) {
  int64_t iterations = 1 << 14;
  double rate = 0, best = 0;
  for (double elapsed = 0; elapsed < seconds / 2;) {
    elapsed = timed_run(kernel, iterations, &rate);
    const double grow = elapsed > 0 ? seconds / elapsed : 16;
    iterations = (int64_t)((double)iterations * (grow > 16 ? 16 : grow < 1.5 ? 1.5 : grow));
  }
  for (int run = 0; run < 5; ++run) {
    timed_run(kernel, iterations, &rate);
    if (rate > best) best = rate;
  }
  return best;
}

/* ---- roofline entry point ---------------------------------------------- */

static void cpu_model_name(char *dst, size_t size) {
  snprintf(dst, size, "CPU");
  FILE *f = fopen("/proc/cpuinfo", "r");
  if (!f) return;
  char line[512];
  while (fgets(line, sizeof line, f)) {
    if (strncmp(line, "model name", 10) != 0) continue;
    const char *colon = strchr(line, ':');
    if (!colon) break;
    colon += 1 + (colon[1] == ' ');
    snprintf(dst, size, "%s", colon);
    dst[strcspn(dst, "\n")] = '\0';
    break;
  }
  fclose(f);
}

int bench_cpu_rooflines(size_t array_bytes, bench_rooflines *r, char *read_what,
                        size_t read_what_size) {
  memset(r, 0, sizeof *r);
  cpu_model_name(r->device, sizeof r->device);
  const int threads = omp_get_max_threads();

  const size_t n = array_bytes / sizeof(uint64_t) / 32 * 32;
  const size_t huge_page = (size_t)2 << 20;
  uint64_t *a = aligned_alloc(huge_page, (n * sizeof *a + huge_page - 1) / huge_page * huge_page);
  if (!a) {
    fprintf(stderr, "moe_bench: cannot allocate %zu bytes for the bandwidth test\n", array_bytes);
    return 1;
  }
#ifdef MADV_HUGEPAGE
  /* Huge pages where the kernel has them: the roofline is what DRAM can
   * give, not what 4 KiB page walks allow (+10% in a KVM guest here). */
  madvise(a, n * sizeof *a, MADV_HUGEPAGE);
#endif
  /* First touch with the same static split as the reads. */
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; ++i)
    a[i] = i;
  const bool use_avx512 = have_avx512f();
  bool four_streams = false;
  r->read_gbps = read_bandwidth_gbps(a, n, use_avx512, &four_streams);
  free(a);
  snprintf(read_what, read_what_size, "%s sum of %.2f GiB, %d threads",
           !use_avx512    ? "plain C"
           : four_streams ? "AVX-512 4-stream"
                          : "AVX-512 1-stream",
           (double)array_bytes / (1 << 30), threads);

  const double seconds = 0.1; /* per run */
  const char *what;
  double flops;
#ifdef BENCH_X86
  char both[64];
  if (have_amx()) {
    /* The library's AMX path runs prefill on tiles: their rate is the
     * compute roofline; the fp32 FMA rate is reported beside it. */
    flops = peak_flops(dot_amx, seconds);
    const double fma = peak_flops(fma_avx512, seconds);
    snprintf(both, sizeof both, "AMX tdpbf16ps tiles; fp32 FMA %.3f TFLOP/s", fma * 1e-12);
    what = both;
  } else if (have_avx512bf16()) {
    /* Both, and the faster is the peak: some CPUs (Sapphire Rapids) issue
     * vdpbf16ps at half the FMA rate, so kernels may prefer fp32 FMA. */
    const double dot = peak_flops(dot_avx512bf16, seconds);
    const double fma = peak_flops(fma_avx512, seconds);
    flops = dot > fma ? dot : fma;
    snprintf(both, sizeof both, "%s; %s %.3f TFLOP/s",
             dot > fma ? "AVX-512 BF16 vdpbf16ps" : "AVX-512 fp32 FMA",
             dot > fma ? "fp32 FMA" : "vdpbf16ps", (dot > fma ? fma : dot) * 1e-12);
    what = both;
  } else if (use_avx512) {
    flops = peak_flops(fma_avx512, seconds);
    what = "AVX-512 fp32 FMA (no avx512_bf16)";
  } else
#endif
  {
    flops = peak_flops(fma_portable, seconds);
    what = "plain C fp32 FMA (no AVX-512)";
  }
  r->peak_tflops = flops * 1e-12;
  snprintf(r->peak_what, sizeof r->peak_what, "%.48s, %d threads", what, threads);
  return 0;
}

/* ---- cache flush -------------------------------------------------------- */

static unsigned char *flush_buffer;
static size_t flush_bytes;

void bench_cpu_flush_caches(void) {
  if (!flush_buffer) {
    long llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (llc <= 0) llc = sysconf(_SC_LEVEL2_CACHE_SIZE);
    /* Three times the LLC (non-inclusive LLCs need more than one pass's
     * worth), and never less than 32 MiB when the size is unknown. */
    flush_bytes = llc > 0 ? (size_t)llc * 3 : 0;
    if (flush_bytes < ((size_t)32 << 20)) flush_bytes = (size_t)32 << 20;
    flush_buffer = malloc(flush_bytes);
    if (!flush_buffer) return;
    memset(flush_buffer, 1, flush_bytes);
  }
  /* Reads only: the lines left in the caches are clean, so the timed
   * forward pays no write-back of flush data when it evicts them. */
  const size_t lines = flush_bytes / 64;
  unsigned sum = 0;
#pragma omp parallel for schedule(static) reduction(+ : sum)
  for (size_t i = 0; i < lines; ++i)
    sum += flush_buffer[i * 64];
  sink_u64 = sum;
}

void bench_cpu_flush_free(void) {
  free(flush_buffer);
  flush_buffer = NULL;
}
