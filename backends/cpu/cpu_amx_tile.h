/*
 * cpu_amx_tile.h - the AMX tile kernel's body, written once against the
 * operations that the includer defines:
 *
 *   AMX_CONFIG(cfg)        load a cpu_amx_config (ldtilecfg; zeroes every tile)
 *   AMX_ZERO(t)            tilezero
 *   AMX_LOAD(t, p, s)      tileloadd: configured rows x colsb bytes, row r at p + r*s
 *   AMX_STORE(t, p, s)     tilestored
 *   AMX_DP(c, a, b)        tdpbf16ps
 *   AMX_RELEASE()          tilerelease
 *   AMX_PREFETCH(p)        a cache-line prefetch hint (no effect on results)
 *   AMX_PREFETCH_L2(p)     the same hint, into L2 only
 *
 * cpu_kernels_amx.c maps them to the intrinsics; cpu_amx_check.c maps them
 * to a scalar model of the instructions (the documented pseudo-code, with
 * the instructions' shape checks), so that the configuration, addressing
 * and loop bounds below are verified on machines without AMX, and under
 * AddressSanitizer.
 *
 * Operands (cpu_kernels.h): A is bf16 pairs, row r at a + r * a_stride
 * (uint32 units: CPU_A_STRIDE_U32 for a packed A tile, the row pitch of
 * the activations for the path's strided entry), one uint32 per k-pair:
 * 16 k-pairs of 16 rows are a TDPBF16PS A tile (16 rows x 64 bytes).
 * A packed weight panel is [k-pair][32 columns][2]: its columns 0-15 (and
 * 16-31) of 16 k-pairs are a B tile in the instruction's VNNI layout
 * (K/2 rows x 16 columns x 2), rows 128 bytes apart. So the layer's packed
 * weights serve AMX as they are, with no second copy.
 *
 * Tiles (the 2 x 2 kernel, rows <= 32): C(i, j) = tmm(2i + j) for row
 * block i (rows 16i..16i+15) and column half j of the panel; A(i) =
 * tmm(4 + i); B(j) = tmm(6 + j). Four accumulators stay live over the
 * panel's whole K range. Tiles of 33-64 rows (an item of up to
 * CPU_AMX_ONE_TILE_ROWS rows, cpu_kernels.h) run
 * the 4 x 1 kernel at the end of this file instead.
 *
 * K: full steps of 16 k-pairs under one configuration, then the remaining
 * kpairs % 16 (K not a multiple of 32) under a second one whose A tiles
 * are 4 * tail bytes wide and B tiles tail rows tall, so nothing past the
 * packed data is read. Loading a configuration zeroes the tiles, so the
 * accumulators go through c between the two (an exact fp32 store/load).
 * The order of operations on an output element depends only on kpairs.
 *
 * Prefetch: an item's weights come from memory once (its first row tile)
 * and tileloadd waits for each line, so each k-step requests the B rows of
 * the step CPU_AMX_PREFETCH_STEPS ahead in the order the loops visit them
 * (this panel's next rows, then the next panel's first), in parts, one
 * before each TDPBF16PS. A hint only: the results never depend on it.
 * `stream` (may be NULL; cpu_weight_prefetch) is the caller's share of the
 * next K block's weights: each panel's part goes to L2 spread evenly over
 * the panel's steps, so that the next block's first row tile finds its
 * weights there instead of waiting on memory. Where the caller's next call
 * reads the following K block (stream->follow_pairs), the requests of the
 * last panel's last steps run on into that block's first steps instead of
 * stopping, so that the next call does not start with CPU_AMX_PREFETCH_STEPS
 * steps of cold weights.
 */
#ifndef MOE_CPU_AMX_TILE_H
#define MOE_CPU_AMX_TILE_H

#include "cpu_kernels.h"

#include <stdint.h>
#include <string.h>

#define CPU_AMX_PAIRS 16 /* k-pairs per full tile step (64 bytes of A row) */
/* Steps of prefetch distance; 0 turns the hint off (a compile-time
 * definition, for A/B builds: bench/results.md, "CPU AMX path"). */
#ifndef CPU_AMX_PREFETCH_STEPS
#define CPU_AMX_PREFETCH_STEPS 4
#endif
/* Tried and dropped, as they lost on AMX hosts (bench/results.md, "CPU:
 * the prepared AMX A/Bs measured"): a second request of each step into L2
 * 16 steps ahead (1.03-1.09x the time on 2 cores), requests for the
 * accumulator lines loaded next (1.03-1.16x), and near requests aimed at
 * four 4 KiB pages at once (1.00-1.07x). */
#ifndef CPU_AMX_PREFETCH_SPREAD
#define CPU_AMX_PREFETCH_SPREAD 1
#endif

/* The B rows of the step `ahead` steps after k-pair kp of panel p (steps
 * of `pairs` k-pairs over [kp_begin, kp_end) in every panel: this panel's
 * next steps, then the next panel's first). Past the last panel: the first
 * panel's steps of the K block that follows (its first follow_pairs
 * k-pairs, right after kp_end in the packed panel; see
 * cpu_weight_prefetch), else NULL. near_done: none within the block. */
static inline const char *cpu_amx_prefetch_target(const uint16_t *b, int64_t panel_stride,
                                                  int panels, int p, int64_t kp, int64_t kp_begin,
                                                  int64_t kp_end, int pairs, int ahead,
                                                  int64_t follow_pairs, int near_done) {
  int64_t next = kp + (int64_t)ahead * pairs;
  while (next >= kp_end && ++p < panels)
    next = kp_begin + (next - kp_end);
  if (p < panels)
    return near_done ? NULL : (const char *)(b + p * panel_stride + next * CPU_PANEL_PAIR);
  if (next - kp_end + pairs <= follow_pairs) return (const char *)(b + next * CPU_PANEL_PAIR);
  return NULL;
}

typedef struct cpu_amx_parts {
  int first_line[5]; /* part i: lines [first_line[i], first_line[i + 1]) */
} cpu_amx_parts;

/* Cuts a step's 2 * pairs lines (a k-pair of a panel is 128 bytes) into
 * `parts` (<= 4) parts, once per pass: no division in the steps. */
static inline cpu_amx_parts cpu_amx_make_parts(int pairs, int parts) {
  cpu_amx_parts r = {{0}};
  for (int i = 0; i <= parts; ++i)
    r.first_line[i] = 2 * pairs * i / parts;
  return r;
}

/* Requests part `part` of the step's lines at rows into L1 (NULL:
 * nothing). A step's requests go out in parts between its tile
 * operations: all at the step's start took 1.1-1.2x the time at 32 rows per
 * tile on a 16-core AMX host (bench/amx_stream_probe.c; bench/results.md,
 * "CPU AMX path: the weight stream per core"). */
static inline void cpu_amx_prefetch_part(const char *rows, const cpu_amx_parts *parts, int part) {
  if (rows)
    for (int line = parts->first_line[part]; line < parts->first_line[part + 1]; ++line)
      AMX_PREFETCH(rows + 64 * line);
}

/* The K range and step of pass 0 (the full steps of CPU_AMX_PAIRS k-pairs)
 * and pass 1 (the remaining kpairs % 16, one step under its own
 * configuration); an empty range where a pass has nothing. */
typedef struct cpu_amx_pass {
  int64_t begin, end;
  int pairs;
} cpu_amx_pass;

static inline cpu_amx_pass cpu_amx_pass_range(int64_t kpairs, int pass) {
  const int64_t full = kpairs / CPU_AMX_PAIRS * CPU_AMX_PAIRS;
  cpu_amx_pass r = {0, full, CPU_AMX_PAIRS};
  if (pass) r = (cpu_amx_pass){full, kpairs, (int)(kpairs - full)};
  return r;
}

/* The next-K-block stream after a step of `pairs` k-pairs: stream_pairs
 * k-pairs of the panel spread evenly over its kp_end k-pairs, two lines
 * each, into L2. */
static inline void cpu_amx_stream_step(const char **next, int64_t *credit, int pairs,
                                       int64_t stream_pairs, int64_t kp_end) {
  for (*credit += pairs * stream_pairs; *credit >= kp_end; *credit -= kp_end) {
    AMX_PREFETCH_L2(*next);
    AMX_PREFETCH_L2(*next + 64);
    *next += CPU_PANEL_PAIR * sizeof(uint16_t);
  }
}

/* A panel's requests beyond its own next steps, from the caller's
 * cpu_weight_prefetch (NULL: none) for pass `pass` ending at kp_end of the
 * call's kpairs: the next-K-block stream's share of the panel, which runs
 * in the full steps only (a tail, where K is not a multiple of 32, is one
 * step), stream_pairs k-pairs over the pass's kp_end k-pairs (kp_begin is
 * 0); the follow-on, only where this pass ends the block (a block that has
 * a next one is whole steps); and near_done. */
typedef struct cpu_amx_panel_requests {
  int64_t stream_pairs, follow_pairs;
  int near_done;
  const char *stream_next; /* the stream's next line pair */
  int64_t stream_credit;
} cpu_amx_panel_requests;

static inline cpu_amx_panel_requests cpu_amx_panel_requests_for(const cpu_weight_prefetch *stream,
                                                                int pass, int64_t kp_end,
                                                                int64_t kpairs, int p,
                                                                int64_t panel_stride) {
  cpu_amx_panel_requests r = {0, 0, 0, NULL, 0};
  if (!stream) return r;
  r.stream_pairs = pass ? 0 : stream->pairs;
  r.follow_pairs = kp_end == kpairs ? stream->follow_pairs : 0;
  r.near_done = stream->near_done;
  if (r.stream_pairs) r.stream_next = (const char *)(stream->b + p * panel_stride);
  return r;
}

/* The 64-byte operand of ldtilecfg, palette 1. */
typedef struct cpu_amx_config {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
} cpu_amx_config;

_Static_assert(sizeof(cpu_amx_config) == 64, "ldtilecfg takes 64 bytes");

/* Configuration for `rows` (1..32) A rows and `pairs` (1..16) k-pairs per
 * step. Tiles of the second row block stay unconfigured when rows <= 16. */
static inline void cpu_amx_make_config(cpu_amx_config *cfg, int rows, int pairs) {
  memset(cfg, 0, sizeof *cfg);
  cfg->palette = 1;
  for (int i = 0; i < 2; ++i) {
    const int r = rows - 16 * i;
    if (r <= 0) continue;
    const uint8_t block_rows = (uint8_t)(r > 16 ? 16 : r);
    cfg->rows[2 * i] = cfg->rows[2 * i + 1] = block_rows;
    cfg->colsb[2 * i] = cfg->colsb[2 * i + 1] = 16 * sizeof(float);
    cfg->rows[4 + i] = block_rows;
    cfg->colsb[4 + i] = (uint16_t)(pairs * sizeof(uint32_t));
  }
  for (int j = 0; j < 2; ++j) {
    cfg->rows[6 + j] = (uint8_t)pairs;
    cfg->colsb[6 + j] = 16 * 2 * sizeof(uint16_t);
  }
}

/* The 2 x 2 grid's accumulators C(i, j) (tmm 2i + j; the second row block
 * only when `two`) at c0 (rows 0-15) and c1 (rows 16-31), c_stride bytes
 * apart, C(i, 1) 16 floats right of C(i, 0) (the panel's second column
 * half): loaded (or zeroed when !load) before the steps, stored after. */
static inline void cpu_amx_c_open(float *c0, float *c1, int64_t c_stride, int two, int load) {
  if (load) {
    AMX_LOAD(0, c0, c_stride);
    AMX_LOAD(1, c0 + 16, c_stride);
    if (two) {
      AMX_LOAD(2, c1, c_stride);
      AMX_LOAD(3, c1 + 16, c_stride);
    }
  } else {
    AMX_ZERO(0);
    AMX_ZERO(1);
    if (two) {
      AMX_ZERO(2);
      AMX_ZERO(3);
    }
  }
}

static inline void cpu_amx_c_close(float *c0, float *c1, int64_t c_stride, int two) {
  AMX_STORE(0, c0, c_stride);
  AMX_STORE(1, c0 + 16, c_stride);
  if (two) {
    AMX_STORE(2, c1, c_stride);
    AMX_STORE(3, c1 + 16, c_stride);
  }
}

/* The 2 x 2 kernel: rows <= 32, two row blocks by the panel's two column
 * halves, each A and B tile loaded once per step. */
static inline void cpu_amx_wide_body(int rows, int panels, int64_t kpairs, const uint32_t *a,
                                     int64_t a_stride_u32, const uint16_t *b, int64_t panel_stride,
                                     float *c, int64_t ldc, int accumulate,
                                     const cpu_weight_prefetch *stream) {
  const int64_t a_stride = a_stride_u32 * (int64_t)sizeof(uint32_t);
  const int64_t b_stride = CPU_PANEL_PAIR * (int64_t)sizeof(uint16_t);
  const int64_t c_stride = ldc * (int64_t)sizeof(float);
  const int two = rows > 16; /* the second row block exists */
  const uint32_t *a1 = a + 16 * a_stride_u32;
  cpu_amx_config cfg;
  for (int pass = 0; pass < 2; ++pass) {
    const cpu_amx_pass range = cpu_amx_pass_range(kpairs, pass);
    const int64_t kp_begin = range.begin, kp_end = range.end;
    const int pairs = range.pairs;
    if (kp_end == kp_begin) continue;
    cpu_amx_make_config(&cfg, rows, pairs);
    AMX_CONFIG(&cfg);
    const int load_c = accumulate || kp_begin > 0;
    /* One part before each TDPBF16PS (-DCPU_AMX_PREFETCH_SPREAD=0: all at
     * the step's start, for A/B builds). */
    const int spread = CPU_AMX_PREFETCH_SPREAD;
    const cpu_amx_parts parts = cpu_amx_make_parts(pairs, spread ? (two ? 4 : 2) : 1);
    for (int p = 0; p < panels; ++p) {
      float *c0 = c + (int64_t)p * CPU_PANEL_COLS, *c1 = c0 + 16 * ldc;
      const uint16_t *panel = b + p * panel_stride;
      cpu_amx_c_open(c0, c1, c_stride, two, load_c);
      cpu_amx_panel_requests req =
          cpu_amx_panel_requests_for(stream, pass, kp_end, kpairs, p, panel_stride);
      for (int64_t kp = kp_begin; kp < kp_end; kp += pairs) {
        const uint16_t *w = panel + kp * CPU_PANEL_PAIR;
        const char *ahead =
            CPU_AMX_PREFETCH_STEPS > 0
                ? cpu_amx_prefetch_target(b, panel_stride, panels, p, kp, kp_begin, kp_end, pairs,
                                          CPU_AMX_PREFETCH_STEPS, req.follow_pairs, req.near_done)
                : NULL;
        cpu_amx_prefetch_part(ahead, &parts, 0);
        AMX_LOAD(6, w, b_stride);
        AMX_LOAD(7, w + 32, b_stride);
        AMX_LOAD(4, a + kp, a_stride);
        AMX_DP(0, 4, 6);
        if (spread) cpu_amx_prefetch_part(ahead, &parts, 1);
        AMX_DP(1, 4, 7);
        if (two) {
          if (spread) cpu_amx_prefetch_part(ahead, &parts, 2);
          AMX_LOAD(5, a1 + kp, a_stride);
          AMX_DP(2, 5, 6);
          if (spread) cpu_amx_prefetch_part(ahead, &parts, 3);
          AMX_DP(3, 5, 7);
        }
        cpu_amx_stream_step(&req.stream_next, &req.stream_credit, pairs, req.stream_pairs, kp_end);
      }
      cpu_amx_c_close(c0, c1, c_stride, two);
    }
  }
  AMX_RELEASE();
}

/* ---- The 4 x 1 kernel: 32 < rows <= 64 ---------------------------------- */

/* Tiles: C(i) = tmm i for row block i (3 or 4 blocks) of one column half;
 * B(half) = tmm 6; A(i) = tmm 4 and 5 in turn for the full blocks, tmm 7
 * for the last one, which may be partial (an A tile's rows must equal its
 * C tile's). A step loads one weight tile per 3-4 TDPBF16PS instead of
 * one per two: where an item has many row tiles, the later ones read the
 * weights from L2, and the 2 x 2 kernel's two weight tiles per step (with
 * the accumulators' round trip per K block) left the tiles idle: at 256
 * rows per item a core reached 0.85 TFLOP/s against about 2 from L1 on
 * two cores (bench/results.md, "a core's stream at 32 rows"). The A tiles
 * are loaded twice per panel (once per column half), from L1. */
static inline void cpu_amx_make_tall_config(cpu_amx_config *cfg, int rows, int pairs) {
  memset(cfg, 0, sizeof *cfg);
  cfg->palette = 1;
  const int blocks = rows > 48 ? 4 : 3; /* 33 <= rows <= 64 */
  for (int i = 0; i < blocks; ++i) {
    const int r = rows - 16 * i;
    cfg->rows[i] = (uint8_t)(r > 16 ? 16 : r);
    cfg->colsb[i] = 16 * sizeof(float);
  }
  cfg->rows[4] = cfg->rows[5] = 16;
  cfg->colsb[4] = cfg->colsb[5] = (uint16_t)(pairs * sizeof(uint32_t));
  cfg->rows[7] = cfg->rows[blocks - 1];
  cfg->colsb[7] = (uint16_t)(pairs * sizeof(uint32_t));
  cfg->rows[6] = (uint8_t)pairs;
  cfg->colsb[6] = 16 * 2 * sizeof(uint16_t);
}

/* One column half's accumulators C(i) at c + 16 i rows: loaded (or zeroed
 * when !load) before the half's steps, stored after. */
static inline void cpu_amx_tall_c_open(float *c, int64_t ldc, int four, int load) {
  const int64_t c_stride = ldc * (int64_t)sizeof(float);
  if (load) {
    AMX_LOAD(0, c, c_stride);
    AMX_LOAD(1, c + 16 * ldc, c_stride);
    AMX_LOAD(2, c + 32 * ldc, c_stride);
    if (four) AMX_LOAD(3, c + 48 * ldc, c_stride);
  } else {
    AMX_ZERO(0);
    AMX_ZERO(1);
    AMX_ZERO(2);
    if (four) AMX_ZERO(3);
  }
}

static inline void cpu_amx_tall_c_close(float *c, int64_t ldc, int four) {
  const int64_t c_stride = ldc * (int64_t)sizeof(float);
  AMX_STORE(0, c, c_stride);
  AMX_STORE(1, c + 16 * ldc, c_stride);
  AMX_STORE(2, c + 32 * ldc, c_stride);
  if (four) AMX_STORE(3, c + 48 * ldc, c_stride);
}

static inline void cpu_amx_tall_body(int rows, int panels, int64_t kpairs, const uint32_t *a,
                                     int64_t a_stride_u32, const uint16_t *b, int64_t panel_stride,
                                     float *c, int64_t ldc, int accumulate,
                                     const cpu_weight_prefetch *stream) {
  const int64_t a_stride = a_stride_u32 * (int64_t)sizeof(uint32_t);
  const int64_t b_stride = CPU_PANEL_PAIR * (int64_t)sizeof(uint16_t);
  const int four = rows > 48; /* the fourth row block exists */
  const uint32_t *a1 = a + 16 * a_stride_u32, *a2 = a + 32 * a_stride_u32,
                 *a3 = a + 48 * a_stride_u32;
  cpu_amx_config cfg;
  for (int pass = 0; pass < 2; ++pass) {
    const cpu_amx_pass range = cpu_amx_pass_range(kpairs, pass);
    const int64_t kp_begin = range.begin, kp_end = range.end;
    const int pairs = range.pairs;
    if (kp_end == kp_begin) continue;
    cpu_amx_make_tall_config(&cfg, rows, pairs);
    AMX_CONFIG(&cfg);
    const int load_c = accumulate || kp_begin > 0;
    const cpu_amx_parts parts = cpu_amx_make_parts(pairs, four ? 4 : 3);
    for (int p = 0; p < panels; ++p) {
      const uint16_t *panel = b + p * panel_stride;
      cpu_amx_panel_requests req =
          cpu_amx_panel_requests_for(stream, pass, kp_end, kpairs, p, panel_stride);
      for (int half = 0; half < 2; ++half) {
        float *ch = c + (int64_t)p * CPU_PANEL_COLS + 16 * half;
        cpu_amx_tall_c_open(ch, ldc, four, load_c);
        for (int64_t kp = kp_begin; kp < kp_end; kp += pairs) {
          const uint16_t *w = panel + kp * CPU_PANEL_PAIR + 32 * half;
          /* A step's request covers both halves' lines: the first half's
           * pass requests the steps ahead within the panel, the second's
           * those past its end (the next panel's first steps, or the
           * follow-on into the next K block). */
          const int crosses = kp + (int64_t)CPU_AMX_PREFETCH_STEPS * pairs >= kp_end;
          const char *ahead =
              CPU_AMX_PREFETCH_STEPS > 0 && crosses == half
                  ? cpu_amx_prefetch_target(b, panel_stride, panels, p, kp, kp_begin, kp_end, pairs,
                                            CPU_AMX_PREFETCH_STEPS, req.follow_pairs, req.near_done)
                  : NULL;
          cpu_amx_prefetch_part(ahead, &parts, 0);
          AMX_LOAD(6, w, b_stride);
          AMX_LOAD(4, a + kp, a_stride);
          AMX_DP(0, 4, 6);
          cpu_amx_prefetch_part(ahead, &parts, 1);
          AMX_LOAD(5, a1 + kp, a_stride);
          AMX_DP(1, 5, 6);
          cpu_amx_prefetch_part(ahead, &parts, 2);
          if (four) {
            AMX_LOAD(4, a2 + kp, a_stride);
            AMX_DP(2, 4, 6);
            cpu_amx_prefetch_part(ahead, &parts, 3);
            AMX_LOAD(7, a3 + kp, a_stride);
            AMX_DP(3, 7, 6);
          } else {
            AMX_LOAD(7, a2 + kp, a_stride);
            AMX_DP(2, 7, 6);
          }
          if (half == 0)
            cpu_amx_stream_step(&req.stream_next, &req.stream_credit, pairs, req.stream_pairs,
                                kp_end);
        }
        cpu_amx_tall_c_close(ch, ldc, four);
      }
    }
  }
  AMX_RELEASE();
}

/* The tile kernel of cpu_kernels.h for rows <= CPU_TILE_ROWS_MAX. The
 * bits do not depend on which kernel runs: each accumulator element sees
 * the same tdpbf16ps steps in the same order. */
static inline void cpu_amx_tile_body(int rows, int panels, int64_t kpairs, const uint32_t *a,
                                     int64_t a_stride_u32, const uint16_t *b, int64_t panel_stride,
                                     float *c, int64_t ldc, int accumulate,
                                     const cpu_weight_prefetch *stream) {
  if (CPU_TILE_ROWS_MAX > 32 && rows > 32)
    cpu_amx_tall_body(rows, panels, kpairs, a, a_stride_u32, b, panel_stride, c, ldc, accumulate,
                      stream);
  else
    cpu_amx_wide_body(rows, panels, kpairs, a, a_stride_u32, b, panel_stride, c, ldc, accumulate,
                      stream);
}

#endif /* MOE_CPU_AMX_TILE_H */
