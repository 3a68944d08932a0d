/*
 * cpu_kernels.h - the contract of the CPU backend's GEMM tile kernels, and
 * the kernel paths (portable C, AVX-512F, AVX-512 BF16, AMX BF16) that
 * implement it.
 *
 * Packed B panel (weights; built by cpu_pack_b_panel): 32 output columns,
 * K taken in pairs. Element (k-pair kp, column j, half h) is at
 * b[kp*64 + j*2 + h], holding B[column j][k = 2*kp + h] as bf16:
 *
 *     k-pair 0: | c0:k0 c0:k1 | c1:k0 c1:k1 | ... | c31:k0 c31:k1 |  (128 bytes)
 *     k-pair 1: | c0:k2 c0:k3 | ...
 *
 * so one 512-bit load holds 16 columns x 2 k values: the operand layout of
 * vdpbf16ps, and two shifts away from two fp32 vectors for AVX-512F.
 * Columns or k beyond the real matrix are zero.
 *
 * Packed A tile (the gathered activation rows of one K block, built by the
 * driver): row r starts at a fixed stride, so the kernel addresses every
 * row with a constant displacement and packing is a plain row conversion:
 *   CPU_A_FP32:       float a[r * CPU_A_STRIDE_F32 + 2*kp + h]
 *   CPU_A_BF16_PAIRS: uint32 a[r * CPU_A_STRIDE_U32 + kp] = bf16(k even) | bf16(k odd) << 16
 *                     (that is, the bf16 row itself)
 * with zeros for k beyond the real K. The strides are padded past a power
 * of two so that the rows do not collide in the same L1 sets.
 *
 * A tile kernel computes, for r < rows (<= its path's tile_rows), panel p < panels
 * (<= CPU_GROUP_PANELS) and j < 32,
 *   C[r][p*32 + j] = (accumulate ? C[r][p*32 + j] : 0) + sum over kpairs of A.B
 * with C fp32 at c[r*ldc + p*32 + j] and panel p at b + p*panel_stride.
 * prefetch (may be NULL) names weights the caller reads next, which a
 * kernel may request into its caches while it computes (a hint: never
 * dereferenced, and no result depends on it); see cpu_weight_prefetch.
 *
 * Reduction order (the determinism contract): every C element has ONE
 * accumulator, updated for k-pair 0, 1, 2, ... in order, and within a pair
 * the odd k first, then the even k (the order vdpbf16ps documents). Each
 * product of two bf16 values is exact in fp32, so an FMA and a separate
 * multiply-add round identically. The order depends on nothing but K: not
 * on rows, panels, the tile a row lands in, T or the thread count. Hence
 * bitwise-identical reruns and batch invariance, and the portable and
 * AVX-512F paths agree bit for bit (AVX-512 BF16 too, except that
 * vdpbf16ps flushes denormals).
 *
 * The AMX path (cpu_kernels_amx.c) keeps the determinism and batch
 * invariance of this contract but not its pair order: TDPBF16PS is
 * documented to add the even k before the odd k, and flushes denormals, so
 * its bits may differ from the other paths. Each path is deterministic on
 * its own. For a few rows it may hand a tile to the AVX-512 BF16 kernel or
 * to an AVX-512F kernel in TDPBF16PS's order (cpu_amx_order_tile), and
 * then only after checking on the running CPU that it gives the same bits
 * as tdpbf16ps (see cpu_amx_split_rows).
 */
#ifndef MOE_CPU_KERNELS_H
#define MOE_CPU_KERNELS_H

#include <stdint.h>

#define CPU_PANEL_COLS 32 /* output columns per packed panel */
#define CPU_PANEL_PAIR 64 /* uint16 elements per k-pair of a panel */
#define CPU_MR_MAX 12     /* rows per tile kernel call (vector paths) */
/* The blocking below may be overridden at compile time (-D...) for A/B
 * builds on a machine at hand; the defaults are the measured ones
 * (bench/results.md, "CPU AMX path"). CPU_KC_PAIRS must stay a multiple of
 * 16: the AMX tile steps, and so the bits, depend on it otherwise. */
#ifndef CPU_GROUP_PANELS
#define CPU_GROUP_PANELS 8 /* panels per work item */
#endif
#ifndef CPU_KC_PAIRS
#define CPU_KC_PAIRS 256 /* k-pairs per K block (A tile fits L1, B slices L2) */
#endif
_Static_assert(CPU_KC_PAIRS % 16 == 0, "K blocks of whole AMX tile steps");
#define CPU_MC_ROWS 48                           /* about the rows per work item (vector paths) */
#define CPU_A_STRIDE_F32 (2 * CPU_KC_PAIRS + 16) /* floats between packed A rows */
#define CPU_A_STRIDE_U32 (CPU_KC_PAIRS + 16)     /* uint32 between packed A rows */

/* The AMX path: two 16-row tiles of A per call (4 accumulator tiles of
 * 16 x 16 live), about eight such calls per work item: an expert's weights
 * stream once per about 256 of its rows (a run is cut into balanced
 * chunks of under 1.5 item_rows, cpu_gemm.c's run_chunks). With balanced
 * chunks, 256 against 128 took 0.77x the time at Mixtral 4096 tokens and
 * 0.92x at Qwen3 4096 on 16-core AMX hosts, and changes nothing where runs
 * have under 384 rows; 512 was no faster (bench/results.md, "CPU AMX path
 * on two classes of 16-core hosts"). */
#ifndef CPU_AMX_TILE_ROWS
#define CPU_AMX_TILE_ROWS 32
#endif
/* An item of 33 to this many rows runs as one tile call of the 4 x 1
 * kernel (cpu_amx_tile.h) instead of a 32-row tile plus a tail tile of
 * one 16-row block that reads the weights again from L2: at Mixtral 128
 * tokens (32 rows per expert on average, some experts 33-48) that took
 * 0.93x the time on 2 and on 16 cores of a 16-core AMX host. 48, not 64:
 * those wins came from items of 33-48 rows; an item of 49-64 rows already
 * runs as two whole 2 x 2 tiles (32 + 17-32), untimed against one 64-row
 * tile, and cutting larger items into 64-row tiles of the 4 x 1 kernel
 * took 1.09-1.15x the time at 128-256 rows per item (bench/results.md,
 * "CPU: the 4 x 1 AMX kernel for items of 33-64 rows"). Items of more rows
 * keep tiles of CPU_AMX_TILE_ROWS. 32: off; 64: up to four blocks. */
#ifndef CPU_AMX_ONE_TILE_ROWS
#define CPU_AMX_ONE_TILE_ROWS 48
#endif
/* -DCPU_AMX_TILE_ROWS=64 (A/B builds) cuts larger items into 64-row tiles
 * of the 4 x 1 kernel instead. */
_Static_assert(CPU_AMX_TILE_ROWS % 16 == 0 && (CPU_AMX_TILE_ROWS <= 32 || CPU_AMX_TILE_ROWS == 64),
               "an item cut into several AMX tiles: 2 x 2 kernel tiles of whole 16-row blocks, "
               "or 4 x 1 kernel tiles of four");
_Static_assert(CPU_AMX_ONE_TILE_ROWS % 16 == 0 && CPU_AMX_ONE_TILE_ROWS >= 32 &&
                   CPU_AMX_ONE_TILE_ROWS <= 64,
               "one AMX tile of whole 16-row blocks, at most the 4 x 1 kernel's four");
/* -DCPU_AMX_ROW_BLOCK=1 balances the AMX path's tiles by rows, as the
 * vector paths do, for A/B builds: that took 1.06-1.07x the time at Qwen3
 * 512 tokens on 2 threads of a 16-core AMX host and made no difference on
 * 16 (bench/results.md, "CPU AMX path at 2 threads"). */
#ifndef CPU_AMX_ROW_BLOCK
#define CPU_AMX_ROW_BLOCK 16
#endif
#ifndef CPU_AMX_ITEM_ROWS
#define CPU_AMX_ITEM_ROWS 256
#endif
/* Below this many rows per tile call, the AMX path may hand a tile to a
 * vector kernel (see cpu_amx_split_rows). 4: the AVX-512 decode kernels
 * handle up to 3 rows with 4 panels in flight, the shape that streams
 * weights at DRAM speed; from 4 rows AMX does at least 4x the multiply
 * work per weight byte loaded. Not yet tuned on an AMX machine:
 * bench/results.md, section "CPU AMX path", says how to sweep it (option
 * cpu.kernels=avx512bf16 vs amx at 1, 4, 16 tokens). Must stay
 * <= CPU_MR_MAX + 1. */
#define CPU_AMX_MIN_ROWS 4
/* The largest tile_rows / item_rows of any path (scratch sizing; a chunk
 * may hold up to 1.5 item_rows). */
#define CPU_TILE_ROWS_MAX                                                                          \
  (CPU_AMX_ONE_TILE_ROWS > CPU_AMX_TILE_ROWS ? CPU_AMX_ONE_TILE_ROWS : CPU_AMX_TILE_ROWS)
#define CPU_ITEM_ROWS_MAX CPU_AMX_ITEM_ROWS

typedef enum cpu_a_format {
  CPU_A_FP32 = 0,
  CPU_A_BF16_PAIRS = 1,
} cpu_a_format;

/* The next weights a tile call may request, two hints:
 * - stream: k-pairs [0, pairs) of each of its panels p at b + p *
 *   panel_stride (the call's own panel stride). The driver (cpu_gemm.c's
 *   run_item) hands the row tiles after a K block's first shares of the
 *   next K block's slices, so that the weights stream from memory under the
 *   block's later tiles instead of stalling the next block's first one. A
 *   share is never longer than the call's kpairs (0: none).
 * - follow_pairs: the caller's next tile call reads the K block that
 *   follows this call's, follow_pairs k-pairs long, in the same panels.
 *   Packed panels hold K contiguously, so it starts right after the call's
 *   own slice of each panel (call b + kpairs * CPU_PANEL_PAIR for the first
 *   panel), and a kernel whose prefetch runs ahead of its reads may carry
 *   it on into that block's first steps instead of stopping at the end of
 *   the call (0: none; only for packed weights).
 * - near_done: an earlier row tile of the caller's K block read this
 *   call's weights, so they wait in L2: a kernel may skip its own requests
 *   ahead within the block (the follow-on above still runs). */
typedef struct cpu_weight_prefetch {
  const uint16_t *b;
  int64_t pairs;
  int64_t follow_pairs;
  int near_done;
} cpu_weight_prefetch;

/* The fewest row tiles in a K block for its tiles to stream the next
 * block (cpu_tile_requests); -DCPU_STREAM_MIN_TILES=2 for A/B builds,
 * such as those with 64-row AMX tiles, whose second tile has the work of
 * two. */
#ifndef CPU_STREAM_MIN_TILES
#define CPU_STREAM_MIN_TILES 3
#endif

/* In an item's K blocks after its first, whose weights the block before
 * streamed into L2, the first row tile takes a share of the next block's
 * stream too (shares by rows over all of the block's tiles): its weights
 * come from L2, so it has time to spare. Mixtral 512 tokens (four row
 * tiles per block) took 0.967 and 0.973 of the time on two cores of an AMX
 * host in two paired A/Bs (bench/pair_ab.c), 0.993 on 16 threads; points
 * of one tile per block are unchanged (bench/results.md, "CPU: paired
 * A/Bs"). -DCPU_STREAM_FIRST_TILE=0: the first tile never takes a share. */
#ifndef CPU_STREAM_FIRST_TILE
#define CPU_STREAM_FIRST_TILE 1
#endif

/* The requests of row tile [r0, r0 + tr) of a K block of `rows` rows cut
 * into tiles of tile_rows, whose weights start at b, kpairs k-pairs per
 * panel (cpu_gemm.c's run_item; bench/amx_stream_probe.c times the same
 * plan). next_pairs: the next K block's k-pairs, which a block of at
 * least CPU_STREAM_MIN_TILES tiles streams from its tiles, in shares by
 * rows (0: none; a block of fewer tiles has too little work after its
 * first to hide a whole block); follow_pairs: the next block's, for the
 * last tile's follow-on (0: none); near_first: the tiles after the first
 * skip their near requests. streamed: the block is not the item's first,
 * so its weights came from L2 and its first tile takes a share too
 * (CPU_STREAM_FIRST_TILE); in an item's first block the first tile streams
 * its own weights from memory and takes none. */
static inline cpu_weight_prefetch cpu_tile_requests(const uint16_t *b, int64_t kpairs,
                                                    int64_t next_pairs, int64_t follow_pairs,
                                                    int near_first, int streamed, int rows,
                                                    int tile_rows, int r0, int tr) {
  const int first_rows =
      CPU_STREAM_FIRST_TILE && streamed ? 0 : (rows < tile_rows ? rows : tile_rows);
  const int tiles = (rows + tile_rows - 1) / tile_rows;
  int64_t share0 = 0, share1 = 0; /* k-pairs [share0, share1) of next_pairs */
  if (tiles >= CPU_STREAM_MIN_TILES && rows > first_rows && r0 + tr > first_rows) {
    share0 = next_pairs * (r0 - first_rows) / (rows - first_rows);
    share1 = next_pairs * (r0 + tr - first_rows) / (rows - first_rows);
  }
  const cpu_weight_prefetch requests = {b + (kpairs + share0) * CPU_PANEL_PAIR, share1 - share0,
                                        r0 + tr == rows ? follow_pairs : 0, near_first && r0 > 0};
  return requests;
}

typedef void (*cpu_tile_fn)(int rows, int panels, int64_t kpairs, const void *a, const uint16_t *b,
                            int64_t panel_stride, float *c, int64_t ldc, int accumulate,
                            const cpu_weight_prefetch *prefetch);

/* A tile kernel that reads A in place: as cpu_tile_fn with A in bf16 pairs,
 * but row r at a + r * a_stride_u32 (uint32 units) instead of a packed A
 * tile, so the driver copies nothing. Where K is odd, the upper half of the
 * last pair (k = K) must be zero, as in a packed tile: the weights there are
 * zero, and a NaN or inf times zero is NaN. */
typedef void (*cpu_tile_strided_fn)(int rows, int panels, int64_t kpairs, const uint32_t *a,
                                    int64_t a_stride_u32, const uint16_t *b, int64_t panel_stride,
                                    float *c, int64_t ldc, int accumulate,
                                    const cpu_weight_prefetch *prefetch);

/* One kernel path: how A is packed for it, its tile kernel, and the row
 * blocking the driver uses with it. */
typedef struct cpu_kernel_path {
  const char *name; /* "portable", "avx512", "avx512bf16", "amx" */
  cpu_a_format a_format;
  cpu_tile_fn tile;
  /* NULL, or the in-place entry (the AMX path: tileloadd takes any stride,
   * while the vector kernels address A with constant displacements). */
  cpu_tile_strided_fn tile_strided;
  int tile_rows; /* most rows per tile call of an item cut into several */
  /* An item of up to this many rows runs as one tile call (0: tile_rows;
   * <= CPU_TILE_ROWS_MAX). */
  int one_tile_rows;
  /* Rows the kernel computes as one block, at one block's cost however few
   * of them are real (AMX: 16-row A tiles): the driver cuts tiles in whole
   * blocks (cpu_gemm.c's tile_rows_for). 1: rows cost what they are. */
  int row_block;
  int item_rows; /* target rows per work item (<= CPU_ITEM_ROWS_MAX; see run_chunks) */
} cpu_kernel_path;

/* Request distances of the vector kernels' four-panel (decode) blocks, in
 * k-pairs of a weight stream (128 bytes each). Paired A/Bs of 64 against
 * 16 (bench/results.md, 2026-12-07): 0.87-0.98x the time at 1 and 16
 * tokens on a 2-vCPU AMD EPYC (AVX-512 BF16 and AVX-512F), but 1.01-1.05x
 * on an AMX Xeon's AVX-512 BF16 path and level on its AMX path (whose
 * decode tiles run these blocks); 128 lost to 64 on the EPYC. -D
 * overrides either, for A/B builds. */
#ifndef CPU_PREFETCH_PAIRS
#define CPU_PREFETCH_PAIRS 16
#endif
#ifndef CPU_PREFETCH_PAIRS_AMD
#define CPU_PREFETCH_PAIRS_AMD 64
#endif

/* How many k-pairs ahead the vector kernels' four-panel (decode) blocks
 * request each weight stream on this CPU: CPU_PREFETCH_PAIRS_AMD on AMD,
 * CPU_PREFETCH_PAIRS elsewhere (above). Depends only on the CPU, and
 * changes no result. */
int cpu_decode_request_pairs(void);

extern const cpu_kernel_path cpu_path_portable;
#ifdef MOE_CPU_HAVE_AVX512
extern const cpu_kernel_path cpu_path_avx512;
#endif
#ifdef MOE_CPU_HAVE_AVX512BF16
extern const cpu_kernel_path cpu_path_avx512bf16;
#endif
#ifdef MOE_CPU_HAVE_AMX
extern const cpu_kernel_path cpu_path_amx;
/* 1 when the CPU has AMX-TILE and AMX-BF16 (CPUID.(7,0):EDX bits 24, 22)
 * and the OS granted this process the tile data state; asks once. */
int cpu_amx_usable(void);
/* Tiles of fewer rows than this go to a vector kernel that gives the same
 * bits as tdpbf16ps on this CPU, or 0 when AMX takes every tile (no vector
 * kernel did). */
int cpu_amx_split_rows(void);
/* The name of that vector kernel: "avx512bf16" (vdpbf16ps), "fma-order"
 * (cpu_amx_order_tile), or "none" when AMX takes every tile. */
const char *cpu_amx_split_kernel(void);
#endif
#ifdef MOE_CPU_HAVE_AMX_ORDER
/* A cpu_tile_fn for rows < CPU_AMX_MIN_ROWS, A in CPU_A_BF16_PAIRS, in
 * TDPBF16PS's documented order, not this contract's (even k, then odd k,
 * each an fp32 FMA with DAZ and FTZ) with AVX-512F: cpu_kernels_amx_order.c.
 * Needs a CPU with AVX-512F. */
void cpu_amx_order_tile(int rows, int panels, int64_t kpairs, const void *a, const uint16_t *b,
                        int64_t panel_stride, float *c, int64_t ldc, int accumulate,
                        const cpu_weight_prefetch *prefetch);
#endif

#endif /* MOE_CPU_KERNELS_H */
