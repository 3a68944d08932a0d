/*
 * amx_stream_probe.c - how fast one core streams packed weights through
 * AMX tiles: the CPU backend's AMX kernel body (cpu_amx_tile.h) and
 * candidate variants of its weight prefetch and of the weights' layout
 * (variant.streams), on synthetic work
 * items shaped like the library's (8 panels of 32 columns, K = 2048 in
 * blocks of CPU_KC_PAIRS k-pairs; -DPROBE_KPAIRS=2048 or 7168 for
 * Mixtral's GEMM1 or GEMM2 items), all in one process so that they are
 * compared on the same host state, rounds interleaved, medians printed.
 * Before the kernels, each thread count times the ways a core can request
 * the same bytes without AMX (request_pass): loads, prefetch instructions
 * alone into L1 or L2, loads with a prefetch ahead; one, two, four or
 * eight streams (eight: one per panel of an item).
 *
 * The forward's streaming points (about 32 rows per expert: Qwen3 512
 * tokens, Mixtral 128) move about 8 GB/s of weights per core on 16-core
 * AMX hosts, against about 13 for the plain read that sets moe_bench's
 * roofline (bench/results.md, "CPU AMX path"); this tool separates the
 * kernel's share of that from the driver's. Not a test: the outputs are
 * not checked (cpu_amx_check does that for the kernel body); the tool is
 * built only where the compiler has AMX, and runs only where the CPU does.
 *
 * The K blocks are CPU_KC_PAIRS k-pairs at every thread count, while the
 * library's driver takes 128 on 1-2 threads (cpu_gemm.c): a build with
 * -DCPU_KC_PAIRS=128 probes those (at 32 rows it streamed 12.5 GB/s per core
 * against 9.5 with 256; bench/results.md, "a core's stream at 32 rows").
 *
 * Usage: amx_stream_probe [-l] [THREADS...]   (default: 1, 2, half and all;
 * -l: the library's kernel only)
 * Per request pattern and thread count: GB/s in all and per core. Per
 * variant, rows per item and thread count: ns per 16-k-pair step of the
 * weights (all of the item's row tiles), the weights' GB/s per core and in
 * all, and TFLOP/s.
 */
#include "cpu_amx_intrinsics.h"
#include "cpu_amx_tile.h"

#include <cpuid.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

/* K in pairs: 1024 is Qwen3's hidden size (2048); -DPROBE_KPAIRS=2048 gives
 * Mixtral's GEMM1 (K = 4096, panels 256 KiB apart), 7168 its GEMM2. */
#ifndef PROBE_KPAIRS
#define PROBE_KPAIRS 1024
#endif
enum {
  KPAIRS = PROBE_KPAIRS,
  PANELS = 8,                                      /* CPU_GROUP_PANELS */
  STEP_BYTES = CPU_AMX_PAIRS * CPU_PANEL_PAIR * 2, /* one panel's B per tile step */
  ROUNDS = 7,
};
#define PANEL_STRIDE ((int64_t)KPAIRS * CPU_PANEL_PAIR) /* uint16 */
#define ITEM_BYTES ((int64_t)PANELS * PANEL_STRIDE * 2) /* 1 MiB at K = 2048 */
#define WINDOW_PER_THREAD ((int64_t)64 << 20)

/* A variant of the tile kernel: how it prefetches the weights. Kernel KERNEL_LIBRARY is
 * cpu_amx_tile_body as compiled into the library (its prefetch fixed at build time). */
typedef enum { KERNEL_LIBRARY, KERNEL_ONE_PANEL } kernel_kind;
typedef struct variant {
  const char *name;
  kernel_kind kernel;
  int ahead;    /* prefetch distance in tile steps; 0: none */
  int every;    /* prefetch one line in `every` of the step's 32 */
  int hint;     /* 0 T0, 1 T1, 2 a plain 64-byte load (trains the core's own prefetchers) */
  int parts;    /* issue a step's prefetches in this many parts between its tile operations */
  int l2_ahead; /* also request the step this many steps ahead into L2 (T1); 0: no */
  int probe;    /* diagnostics, not candidates: PROBE_HOT_B, PROBE_NO_C */
  /* Also request into L2 the first line of each 4 KiB page this many steps
   * ahead (0: no): one request per page, for the L2's own stream
   * prefetcher to fill the page, where every other request waits for a
   * fill buffer of the core for the whole memory latency. */
  int kick_ahead;
  int first_tile_only; /* prefetch in a K block's first row tile only (the later ones read L2) */
  /* Request the next panel's accumulator lines (or the next row tile's
   * first panel's) during a panel's steps: 0 no, 1 into L1, 2 for writing
   * (prefetchw). */
  int c_ahead;
  /* KERNEL_ONE_PANEL: an item's weights as `streams` (2 or 4) regions far
   * apart, consecutive tile steps in visiting order round-robin over them
   * (0, 1: one contiguous item, as the library packs it). The same steps
   * in the same order, with full 128-byte rows, but a core reads several
   * sequential streams at once: two cores of a C1-class host prefetched
   * 15.4 GB/s per core from one stream and 23.1 from four (bench/results.md,
   * 2026-12-07), where the library's kernel streams 11-13 at 32 rows. On
   * four hosts it gained at most 5% over this kernel and never beat the
   * library's, so the packing stays (bench/results.md, 2026-12-07 11:35Z). */
  int streams;
  /* KERNEL_LIBRARY only: row tiles of this many rows for items of more
   * than CPU_AMX_ONE_TILE_ROWS (0: CPU_AMX_TILE_ROWS; 64: the 4 x 1 kernel
   * on 64-row tiles); near_first: the row tiles after a K block's first
   * get cpu_weight_prefetch.near_done (as the driver on 1-2 threads);
   * stream: the driver's next-K-block stream and follow-on
   * (cpu_tile_requests), which shows whether a block's first row tile
   * finds its weights in L2. */
  int library_tile_rows;
  int near_first;
  int stream;
} variant;

/* PROBE_HOT_B: the same prefetches, but the B tiles loaded from one L1-hot
 * step (would the stream overlap the compute if the tile loads did not wait
 * for it?). PROBE_NO_C: the fp32 accumulators zeroed instead of loaded per
 * panel and K block, and not stored (what the C round trip costs where many
 * row tiles run from L2). */
enum { PROBE_HOT_B = 1, PROBE_NO_C = 2 };

static const variant variants[] = {
    {.name = "library", .kernel = KERNEL_LIBRARY},
    {.name = "library-near-first", .kernel = KERNEL_LIBRARY, .near_first = 1},
    {.name = "library-stream", .kernel = KERNEL_LIBRARY, .stream = 1},
    {.name = "library-stream-near-first", .kernel = KERNEL_LIBRARY, .near_first = 1, .stream = 1},
    {.name = "library-tall64", .kernel = KERNEL_LIBRARY, .library_tile_rows = 64},
    {.name = "library-tall64-near-first",
     .kernel = KERNEL_LIBRARY,
     .library_tile_rows = 64,
     .near_first = 1},
    {.name = "pf4-parts8", .kernel = KERNEL_ONE_PANEL, .ahead = 4, .every = 1, .parts = 8},
    {.name = "pf4-parts8-2streams",
     .kernel = KERNEL_ONE_PANEL,
     .ahead = 4,
     .every = 1,
     .parts = 8,
     .streams = 2},
    {.name = "pf4-parts8-4streams",
     .kernel = KERNEL_ONE_PANEL,
     .ahead = 4,
     .every = 1,
     .parts = 8,
     .streams = 4},
    {.name = "pf8-parts8-2streams",
     .kernel = KERNEL_ONE_PANEL,
     .ahead = 8,
     .every = 1,
     .parts = 8,
     .streams = 2},
    {.name = "pf8-parts8-4streams",
     .kernel = KERNEL_ONE_PANEL,
     .ahead = 8,
     .every = 1,
     .parts = 8,
     .streams = 4},
    {.name = "no-prefetch", .kernel = KERNEL_ONE_PANEL, .every = 1, .parts = 8},
    {.name = "pf2-parts8", .kernel = KERNEL_ONE_PANEL, .ahead = 2, .every = 1, .parts = 8},
    {.name = "load4-parts8",
     .kernel = KERNEL_ONE_PANEL,
     .ahead = 4,
     .every = 1,
     .hint = 2,
     .parts = 8},
    {.name = "load2-parts8",
     .kernel = KERNEL_ONE_PANEL,
     .ahead = 2,
     .every = 1,
     .hint = 2,
     .parts = 8},
    {.name = "load8-parts8",
     .kernel = KERNEL_ONE_PANEL,
     .ahead = 8,
     .every = 1,
     .hint = 2,
     .parts = 8},
    {.name = "load1-parts8",
     .kernel = KERNEL_ONE_PANEL,
     .ahead = 1,
     .every = 1,
     .hint = 2,
     .parts = 8},
    {.name = "pf4-parts8-1in2", .kernel = KERNEL_ONE_PANEL, .ahead = 4, .every = 2, .parts = 8},
    {.name = "pf2-parts8+kick8",
     .kernel = KERNEL_ONE_PANEL,
     .ahead = 2,
     .every = 1,
     .parts = 8,
     .kick_ahead = 8},
    {.name = "pf4-parts8+kick16",
     .kernel = KERNEL_ONE_PANEL,
     .ahead = 4,
     .every = 1,
     .parts = 8,
     .kick_ahead = 16},
    {.name = "pf4-parts8+kick32",
     .kernel = KERNEL_ONE_PANEL,
     .ahead = 4,
     .every = 1,
     .parts = 8,
     .kick_ahead = 32},
    {.name = "pf4-parts8-first-tile",
     .kernel = KERNEL_ONE_PANEL,
     .ahead = 4,
     .every = 1,
     .parts = 8,
     .first_tile_only = 1},
    {.name = "pf4-parts8+c-t0",
     .kernel = KERNEL_ONE_PANEL,
     .ahead = 4,
     .every = 1,
     .parts = 8,
     .c_ahead = 1},
    {.name = "pf4-parts8+c-w",
     .kernel = KERNEL_ONE_PANEL,
     .ahead = 4,
     .every = 1,
     .parts = 8,
     .c_ahead = 2},
    {.name = "diag:hot-b",
     .kernel = KERNEL_ONE_PANEL,
     .ahead = 4,
     .every = 1,
     .parts = 8,
     .probe = PROBE_HOT_B},
    {.name = "diag:no-c",
     .kernel = KERNEL_ONE_PANEL,
     .ahead = 4,
     .every = 1,
     .parts = 8,
     .probe = PROBE_NO_C},
};
enum { VARIANTS = sizeof variants / sizeof variants[0] };

/* Where KERNEL_ONE_PANEL finds an item's weights for the K block at
 * global tile step g0 of each panel: contiguous panels PANEL_STRIDE apart
 * (streams < 2), or round-robin over `streams` regions region_stride
 * apart (variant.streams). */
typedef struct item_weights {
  const uint16_t *item;
  int g0, streams;
  int64_t region_stride; /* uint16 */
} item_weights;

/* The B rows of step `step` of the K block in panel p. */
static const uint16_t *step_rows(const item_weights *w, int p, int step) {
  const int64_t g = w->g0 + step;
  if (w->streams < 2) return w->item + p * PANEL_STRIDE + g * (STEP_BYTES / 2);
  const int64_t linear = (int64_t)p * (KPAIRS / CPU_AMX_PAIRS) + g;
  return w->item + linear % w->streams * w->region_stride + linear / w->streams * (STEP_BYTES / 2);
}

/* Part `part` of `parts` of the lines of panel p's tile step `step`
 * (steps of the K block in [0, steps)), `ahead` steps later in visiting
 * order (this panel's next steps, then the next panel's first). */
static void prefetch_lines(const item_weights *w, int panels, int p, int step, int steps, int ahead,
                           int every_lines, int hint, int part, int parts) {
  int next = step + ahead;
  while (next >= steps && ++p < panels)
    next -= steps;
  if (p >= panels) return;
  const char *lines = (const char *)step_rows(w, p, next);
  const int every = 64 * every_lines;
  const int begin = STEP_BYTES / parts * part, end = begin + STEP_BYTES / parts;
  if (hint == 2) /* loaded and dropped: the asm keeps the load */
    for (int off = begin; off < end; off += every)
      __asm__ volatile("" ::"v"(_mm512_load_si512(lines + off)));
  else if (hint == 1)
    for (int off = begin; off < end; off += every)
      _mm_prefetch(lines + off, _MM_HINT_T1);
  else
    for (int off = begin; off < end; off += every)
      _mm_prefetch(lines + off, _MM_HINT_T0);
}

static void prefetch_part(const variant *v, const item_weights *b, int panels, int p, int step,
                          int steps, int part, int parts) {
  if (v->ahead > 0)
    prefetch_lines(b, panels, p, step, steps, v->ahead, v->every, v->hint, part, parts);
  if (v->l2_ahead > 0) prefetch_lines(b, panels, p, step, steps, v->l2_ahead, 1, 1, part, parts);
  /* A step is half a page: the even steps start one (panels are whole pages apart). */
  if (v->kick_ahead > 0 && part == 0 && (step + v->kick_ahead) % 2 == 0)
    prefetch_lines(b, panels, p, step, steps, v->kick_ahead, 64, 1, 0, 1);
}

/* The library's loop with a run-time prefetch: one panel at a time, rows
 * <= 32 as two 16-row blocks. */
static void one_panel(const variant *v, int rows, int panels, int kpairs, const uint32_t *a,
                      int64_t lda_u32, const item_weights *b, float *c, int64_t ldc,
                      int first_tile) {
  const int two = rows > 16, steps = kpairs / CPU_AMX_PAIRS;
  const uint32_t *a1 = a + 16 * lda_u32;
  cpu_amx_config cfg;
  cpu_amx_make_config(&cfg, rows, CPU_AMX_PAIRS);
  AMX_CONFIG(&cfg);
  for (int p = 0; p < panels; ++p) {
    float *c0 = c + p * 32, *c1 = c0 + 16 * ldc;
    const int keep_c = v->probe != PROBE_NO_C;
    cpu_amx_c_open(c0, c1, ldc * 4, two, keep_c);
    /* The step's prefetch parts go out at the tile operations' positions
     * (8 with two row blocks, 5 with one), spread evenly: position i issues
     * parts [ceil(i * parts / positions), ceil((i + 1) * parts / positions)). */
    const int parts = v->parts > 0 ? v->parts : 1, positions = two ? 8 : 5;
    const int requests = first_tile || !v->first_tile_only;
#define AT(i)                                                                                      \
  for (int part = ((i)*parts + positions - 1) / positions;                                         \
       requests && part < (((i) + 1) * parts + positions - 1) / positions; ++part)                 \
  prefetch_part(v, b, panels, p, step, steps, part, parts)
    static _Thread_local uint16_t hot[STEP_BYTES / 2] __attribute__((aligned(64)));
    /* The accumulators loaded next: the next panel's, after the last panel
     * the next row tile's first (the probe's C has room for it). */
    const float *c_next = p + 1 < panels ? c0 + 32 : c + 32 * ldc;
    for (int step = 0; step < steps; ++step) {
      const uint16_t *w = v->probe == PROBE_HOT_B ? hot : step_rows(b, p, step);
      for (int r = step * 32 / steps; v->c_ahead && r < (step + 1) * 32 / steps; ++r)
        for (int half = 0; half < 2; ++half) {
          const char *line = (const char *)(c_next + r * ldc + 16 * half);
          if (v->c_ahead == 2)
            __asm__ volatile("prefetchw %0" : : "m"(*line));
          else
            _mm_prefetch(line, _MM_HINT_T0);
        }
      AT(0);
      AMX_LOAD(6, w, 128);
      AT(1);
      AMX_LOAD(7, w + 32, 128);
      AT(2);
      AMX_LOAD(4, a + step * CPU_AMX_PAIRS, lda_u32 * 4);
      AT(3);
      AMX_DP(0, 4, 6);
      AT(4);
      AMX_DP(1, 4, 7);
      if (two) {
        AT(5);
        AMX_LOAD(5, a1 + step * CPU_AMX_PAIRS, lda_u32 * 4);
        AT(6);
        AMX_DP(2, 5, 6);
        AT(7);
        AMX_DP(3, 5, 7);
      }
    }
#undef AT
    if (keep_c) cpu_amx_c_close(c0, c1, ldc * 4, two);
  }
  AMX_RELEASE();
}

/* One work item as the driver runs it: K blocks, row tiles of <= 32 (as
 * the AMX path's whole 16-row blocks cut them: 80 rows run as 32 + 32 +
 * 16; the library's kernel takes an item of up to CPU_AMX_ONE_TILE_ROWS
 * rows as one tile, 40 rows through its 4 x 1 kernel). Only the library
 * variants with `stream` get the driver's next-K-block stream
 * (cpu_tile_requests); the others time each tile's own weight stream. */
static void run_item(const variant *v, int rows, const uint32_t *a, int64_t lda_u32,
                     const uint16_t *b, int64_t region_stride, float *c, int64_t ldc) {
  /* The probe's own kernel takes 32 rows at most. */
  const int library_tile_rows = v->library_tile_rows ? v->library_tile_rows : CPU_AMX_TILE_ROWS;
  const int tile_rows = v->kernel != KERNEL_LIBRARY     ? 32
                        : rows <= CPU_AMX_ONE_TILE_ROWS ? rows
                                                        : library_tile_rows;
  for (int kp0 = 0; kp0 < KPAIRS; kp0 += CPU_KC_PAIRS) {
    const int64_t next_block = v->stream && kp0 + CPU_KC_PAIRS < KPAIRS ? CPU_KC_PAIRS : 0;
    for (int r0 = 0; r0 < rows; r0 += tile_rows) {
      const int tr = rows - r0 < tile_rows ? rows - r0 : tile_rows;
      const uint32_t *at = a + r0 * lda_u32 + kp0;
      const uint16_t *bt = b + kp0 * CPU_PANEL_PAIR;
      float *ct = c + r0 * ldc;
      if (v->kernel != KERNEL_LIBRARY) {
        const item_weights w = {b, kp0 / CPU_AMX_PAIRS, v->streams, region_stride};
        one_panel(v, tr, PANELS, CPU_KC_PAIRS, at, lda_u32, &w, ct, ldc, r0 == 0);
        continue;
      }
      const cpu_weight_prefetch requests =
          cpu_tile_requests(bt, CPU_KC_PAIRS, next_block, next_block, v->near_first, kp0 > 0, rows,
                            tile_rows, r0, tr);
      const int any = requests.pairs > 0 || requests.follow_pairs > 0 || requests.near_done;
      cpu_amx_tile_body(tr, PANELS, CPU_KC_PAIRS, at, lda_u32, bt, PANEL_STRIDE, ct, ldc, 1,
                        any ? &requests : NULL);
    }
  }
}

/* The next window of 64 MiB per thread: consecutive passes read different
 * parts of the region, so no pass finds its weights in L3. */
static int64_t region_bytes; /* two windows of the most threads, at least 2 GiB (7x L3) */
static const uint16_t *next_window(const uint16_t *region, int threads) {
  static int64_t pass;
  const int64_t window = WINDOW_PER_THREAD * threads, windows = region_bytes / window;
  return region + (pass++ % windows) * (window / 2);
}

/* Seconds for every thread to run its 64 items of a window. */
static double timed_pass(const variant *v, int rows, int threads, const uint16_t *region,
                         const uint32_t *a_all, int64_t lda_u32, float *c_all) {
  const int64_t per = WINDOW_PER_THREAD / ITEM_BYTES;
  const uint16_t *window = next_window(region, threads);
  const double t0 = omp_get_wtime();
#pragma omp parallel num_threads(threads)
  {
    const int id = omp_get_thread_num();
    const uint32_t *a = a_all + (int64_t)id * 256 * lda_u32;
    float *c = c_all + (int64_t)id * 256 * PANELS * 32;
    /* variant.streams: the thread's part of the window as that many
     * regions, each item's share of each at item / streams. */
    const int streams = v->streams > 1 ? v->streams : 1;
    const int64_t region_stride = per * (ITEM_BYTES / 2) / streams;
    const uint16_t *mine = window + id * per * (ITEM_BYTES / 2);
    for (int64_t i = 0; i < per; ++i)
      run_item(v, rows, a, lda_u32, mine + i * (ITEM_BYTES / 2 / streams), region_stride, c,
               PANELS * 32);
  }
  return omp_get_wtime() - t0;
}

/* The ways a core can request the same bytes without AMX: AVX-512 loads
 * (moe_bench's roofline reader is four streams per thread: the per-core
 * rate to aim at) and prefetch instructions alone, into L1 (T0) or L2
 * (T2), one line per request, over one or four sequential streams. A
 * prefetch retires once a fill buffer takes it, so a loop of them runs at
 * the rate the core keeps lines in flight. */
typedef enum { REQ_LOAD, REQ_T0, REQ_T2 } request_kind;
typedef struct request_pattern {
  const char *name;
  request_kind kind;
  int streams;  /* 1, 2, 4 or 8 */
  int ahead;    /* loads only: also prefetch each line this many bytes ahead (0: no) */
  int ahead_t2; /* that prefetch into L2 (T2) instead of L1 */
  int sparse;   /* that prefetch for one line in `sparse` only (0, 1: every line) */
} request_pattern;
static const request_pattern patterns[] = {
    {.name = "load, 4 streams", .kind = REQ_LOAD, .streams = 4},
    {.name = "load, 1 stream", .kind = REQ_LOAD, .streams = 1},
    {.name = "prefetch T0, 1 stream", .kind = REQ_T0, .streams = 1},
    {.name = "prefetch T0, 2 streams", .kind = REQ_T0, .streams = 2},
    {.name = "prefetch T0, 4 streams", .kind = REQ_T0, .streams = 4},
    {.name = "prefetch T2, 1 stream", .kind = REQ_T2, .streams = 1},
    {.name = "prefetch T2, 4 streams", .kind = REQ_T2, .streams = 4},
    {.name = "prefetch T2, 8 streams", .kind = REQ_T2, .streams = 8},
    {.name = "load + T0 8 KiB ahead", .kind = REQ_LOAD, .streams = 1, .ahead = 8192},
    {.name = "load + T2 8 KiB ahead", .kind = REQ_LOAD, .streams = 1, .ahead = 8192, .ahead_t2 = 1},
    {.name = "load + T2 32 KiB ahead",
     .kind = REQ_LOAD,
     .streams = 1,
     .ahead = 32768,
     .ahead_t2 = 1},
    {.name = "load + T2 8 KiB ahead, 1 in 4",
     .kind = REQ_LOAD,
     .streams = 1,
     .ahead = 8192,
     .ahead_t2 = 1,
     .sparse = 4},
    {.name = "load + T0 8 KiB ahead, 1 in 4",
     .kind = REQ_LOAD,
     .streams = 1,
     .ahead = 8192,
     .sparse = 4},
};
enum { PATTERNS = sizeof patterns / sizeof patterns[0] };

static double request_pass(const request_pattern *pat, int threads, const uint16_t *region) {
  const uint16_t *window = next_window(region, threads);
  const double t0 = omp_get_wtime();
  long long total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    const int id = omp_get_thread_num();
    const int64_t per = WINDOW_PER_THREAD;
    const char *base = (const char *)window + id * per;
    const int64_t part = per / pat->streams;
    __m512i s = _mm512_setzero_si512();
    if (pat->kind == REQ_LOAD && pat->streams == 4)
      for (int64_t i = 0; i < part; i += 64) {
        s = _mm512_add_epi64(s, _mm512_load_si512(base + i));
        s = _mm512_add_epi64(s, _mm512_load_si512(base + part + i));
        s = _mm512_add_epi64(s, _mm512_load_si512(base + 2 * part + i));
        s = _mm512_add_epi64(s, _mm512_load_si512(base + 3 * part + i));
      }
    else if (pat->kind == REQ_LOAD && pat->ahead)
      for (int64_t i = 0; i < part; i += 256)
        for (int line = 0; line < 256; line += 64) {
          const char *next = base + i + line + pat->ahead;
          const int requested = pat->sparse < 2 || (i + line) / 64 % pat->sparse == 0;
          if (requested && pat->ahead_t2)
            _mm_prefetch(next, _MM_HINT_T2);
          else if (requested)
            _mm_prefetch(next, _MM_HINT_T0);
          s = _mm512_add_epi64(s, _mm512_load_si512(base + i + line));
        }
    else if (pat->kind == REQ_LOAD)
      for (int64_t i = 0; i < part; i += 256) {
        s = _mm512_add_epi64(s, _mm512_load_si512(base + i));
        s = _mm512_add_epi64(s, _mm512_load_si512(base + i + 64));
        s = _mm512_add_epi64(s, _mm512_load_si512(base + i + 128));
        s = _mm512_add_epi64(s, _mm512_load_si512(base + i + 192));
      }
    else
      for (int64_t i = 0; i < part; i += 64)
        for (int st = 0; st < pat->streams; ++st) {
          if (pat->kind == REQ_T0)
            _mm_prefetch(base + st * part + i, _MM_HINT_T0);
          else
            _mm_prefetch(base + st * part + i, _MM_HINT_T2);
        }
    total += _mm512_reduce_add_epi64(s);
  }
  volatile long long sink = total;
  (void)sink;
  return omp_get_wtime() - t0;
}

static int cmp_double(const void *x, const void *y) {
  const double a = *(const double *)x, b = *(const double *)y;
  return (a > b) - (a < b);
}

static int have_amx(void) {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return 0;
  if (!(edx & (1u << 22)) || !(edx & (1u << 24))) return 0;
  return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
}

int main(int argc, char **argv) {
  if (!have_amx()) {
    printf("amx_stream_probe: SKIPPED (no AMX here)\n");
    return 0;
  }
  /* -l: the library's kernel only (builds with other definitions compared
   * by scripts/device-check.sh probeab). */
  const int library_only = argc > 1 && strcmp(argv[1], "-l") == 0;
  int thread_counts[8] = {1, 2, omp_get_max_threads() / 2, omp_get_max_threads()}, counts = 4;
  if (argc > 1 + library_only) {
    counts = 0;
    for (int i = 1 + library_only; i < argc && counts < 8; ++i)
      thread_counts[counts++] = atoi(argv[i]);
  }
  const int variant_count = library_only ? 1 : VARIANTS;
  int max_threads = 1;
  for (int i = 0; i < counts; ++i)
    if (thread_counts[i] > max_threads) max_threads = thread_counts[i];

  region_bytes = 2 * WINDOW_PER_THREAD * max_threads;
  if (region_bytes < ((int64_t)2 << 30)) region_bytes = (int64_t)2 << 30;
  uint16_t *region = aligned_alloc((size_t)2 << 20, (size_t)region_bytes);
  const int64_t lda_u32 = KPAIRS + 16; /* the layer's sorted row pitch, in pairs */
  const int64_t a_words = (int64_t)max_threads * 256 * lda_u32;
  uint32_t *a = aligned_alloc(64, (size_t)a_words * 4);
  /* 32 rows past the last thread's: the c-* variants' requests for a next row tile. */
  const size_t c_bytes = ((size_t)max_threads * 256 + 32) * PANELS * 32 * 4;
  float *c = aligned_alloc(64, c_bytes);
  if (!region || !a || !c) return 1;
  madvise(region, (size_t)region_bytes, MADV_HUGEPAGE);
  /* Small normal bf16 values, so the sums stay finite; first touch by the
   * threads that read them. */
#pragma omp parallel for schedule(static) num_threads(max_threads)
  for (int64_t i = 0; i < region_bytes / 2; ++i)
    region[i] = (uint16_t)(0x3c00 + (i & 0xff));
  for (int64_t i = 0; i < a_words; ++i)
    a[i] = 0x3c003c00u + (uint32_t)(i & 0xff);
  memset(c, 0, c_bytes);

  static const int row_counts[] = {1, 16, 32, 40, 64, 128, 256};
  enum { ROWS = sizeof row_counts / sizeof row_counts[0] };
  printf("K = %d, %d panels per item, K blocks of %d k-pairs, library prefetch %d steps; "
         "%d items of %lld KiB per thread and pass; medians of %d rounds\n",
         2 * KPAIRS, PANELS, CPU_KC_PAIRS, CPU_AMX_PREFETCH_STEPS,
         (int)(WINDOW_PER_THREAD / ITEM_BYTES), (long long)(ITEM_BYTES >> 10), ROUNDS);
  for (int t = 0; t < counts; ++t) {
    const int threads = thread_counts[t];
    static double seconds[VARIANTS][ROWS][ROUNDS], requests[PATTERNS][ROUNDS];
    for (int round = 0; round < ROUNDS; ++round) {
      for (int q = 0; q < PATTERNS; ++q)
        requests[q][round] = request_pass(&patterns[q], threads, region);
      for (int v = 0; v < variant_count; ++v)
        for (int r = 0; r < ROWS; ++r)
          seconds[v][r][round] =
              timed_pass(&variants[v], row_counts[r], threads, region, a, lda_u32, c);
    }
    const double bytes = (double)WINDOW_PER_THREAD * threads;
    /* A window holds whole items only (7 MiB ones at -DPROBE_KPAIRS=7168). */
    const double item_bytes = (double)(WINDOW_PER_THREAD / ITEM_BYTES) * ITEM_BYTES * threads;
    printf("\n%d threads:\n", threads);
    for (int q = 0; q < PATTERNS; ++q) {
      qsort(requests[q], ROUNDS, sizeof **requests, cmp_double);
      const double rate = bytes / requests[q][ROUNDS / 2] * 1e-9;
      /* The first pattern's line keeps the "read N GB/s" that scripts grep. */
      printf("  %-30s read %.1f GB/s (%.1f per core)\n", patterns[q].name, rate, rate / threads);
    }
    printf("%-24s %5s %10s %12s %10s %9s\n", "variant", "rows", "ns/step", "GB/s/core", "GB/s",
           "TFLOP/s");
    for (int v = 0; v < variant_count; ++v)
      for (int r = 0; r < ROWS; ++r) {
        double *s = seconds[v][r];
        qsort(s, ROUNDS, sizeof *s, cmp_double);
        const double median = s[ROUNDS / 2];
        const double steps = item_bytes / STEP_BYTES / threads; /* per thread */
        const double flops = 2.0 * row_counts[r] * (item_bytes / 2);
        printf("%-24s %5d %10.1f %12.2f %10.1f %9.3f\n", variants[v].name, row_counts[r],
               median / steps * 1e9, item_bytes / median * 1e-9 / threads,
               item_bytes / median * 1e-9, flops / median * 1e-12);
      }
  }
  free(region);
  free(a);
  free(c);
  return 0;
}
