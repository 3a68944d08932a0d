/*
 * decode.cu - the layer forward for a few tokens without align: two
 * weight-streaming kernels on the CUDA cores that read the routing
 * (topk_ids, topk_weights) directly.
 *
 *   decode_up_kernel:   h[slot][i] = act(gate_i . x[t], up_i . x[t]) with
 *                       bias and the routed weight when it goes on the
 *                       input; one CTA per (token, pick j, 8 columns i).
 *   decode_down_kernel: out[t][n] = sum over t's local picks j, in order,
 *                       of w_j * (w2[e_j][n] . h[t*k + j] + bias), in fp32
 *                       with no bf16 rounding of the per-slot product; one
 *                       CTA per (token, tile of rows n): the weighted top-k
 *                       reduce is fused in, and deterministic.
 *
 * Why: at one token a forward on the tile path is route+align, GEMM1, GEMM2
 * and the reduce, four dependent launches of which two (align, reduce) move
 * under 100 KB; with L2 cold each pays its code and metadata from DRAM (on
 * an H100 route+align took ~16 us and the reduce ~4 us under ncu for
 * Qwen3's one token, bench/cuda_notes.md). Here the GEMMs index the weights
 * by the slot's expert, so the forward is route, up, down.
 *
 * Streaming: each warp reads a contiguous block of weight rows (a gate/up
 * pair; DECODE_DOWN_ROWS rows of one expert) and issues its 16-byte
 * evict-first loads for a whole batch before it does any math, so that a
 * round is one latency. The first batch is in flight while the CTA stages
 * its activation rows in shared memory, so the activations cost no
 * registers.
 *
 * Overlapped launches (programmatic dependent launch, Hopper): each kernel
 * may get resident while the one before it finishes. decode_up_kernel
 * stages x, decode_down_kernel issues its first weight batch (both need
 * only data complete before the route started, or the route's picks), and
 * only then waits for the previous kernel; so the route's tail and the
 * up kernel's last wave overlap the next kernel's first DRAM round trip.
 *
 * Needs hidden and inter multiples of 8, x 16-byte aligned and the
 * activation rows within DECODE_MAX_SMEM; cuda_decode_wanted says when.
 */
#include "activation_math.cuh"
#include "cuda_internal.cuh"

#include <stdlib.h>
#include <string.h>

typedef __nv_bfloat16 bf16;

constexpr int DECODE_WARPS = 8;
constexpr int DECODE_CHUNKS = 8;      /* 16-byte loads per weight row and lane per round */
constexpr int DECODE_DOWN_BATCH = 12; /* 16-byte loads per lane decode_down_kernel has in flight */
constexpr int DECODE_LANE_SPAN = 32 * 8; /* elements one 16-byte load per lane covers */
constexpr size_t DECODE_MAX_SMEM = 96 * 1024;
/*
 * Default rule, fitted to H200 sweeps of decode vs the tile path (same
 * call, bench/cuda_notes.md item 16). Each slot streams its expert's
 * weights on its own, so a repeated expert is read again: decode needs the
 * picks to be at most half the local experts, and T * hidden <= 16384
 * (DeepSeek, hidden 7168, won at 2 tokens, lost 8% at 4 with few
 * repeats); with fewer than 64 local experts at most 2 tokens (gpt-oss,
 * 32 experts, lost 10% at 4 tokens, where Qwen3 with 128 won 8% at 8).
 * Decode won: Qwen3 1-8 tokens (37.7 vs 53.2 us at 1), Mixtral 1-2,
 * DeepSeek 1-2, gpt-oss 1 (2: a tie).
 */
static bool decode_rule(const cuda_decode *d) {
  const int64_t T = d->num_tokens, max_tokens = d->num_local >= 64 ? 8 : 2;
  return T == 1 || (T <= max_tokens && 2 * T * d->top_k <= d->num_local && T * d->hidden <= 16384);
}

bool cuda_decode_wanted(const cuda_decode *d) {
  const bool fits = d->hidden % 8 == 0 && d->inter % 8 == 0 && ((uintptr_t)d->x & 15u) == 0 &&
                    up_smem(d) <= DECODE_MAX_SMEM && down_smem(d) <= DECODE_MAX_SMEM &&
                    d->num_tokens <= 65535 &&
                    (d->hidden + DECODE_WARPS - 1) / DECODE_WARPS <= INT32_MAX;
  if (!fits) return false;
  const char *env = getenv("MOE_CUDA_DECODE");
  if (env && strcmp(env, "off") == 0) return false;
  if (env && strcmp(env, "on") == 0) return true;
  const char *tile = getenv("MOE_CUDA_TILE"); /* a forced tile means the tile path */
  if (tile && *tile) return false;
  return decode_rule(d);
}

/* Overlapped launches (Hopper; MOE_CUDA_DECODE_PDL=0 turns them off). */
static bool decode_pdl(const cuda_state *st) {
  const char *env = getenv("MOE_CUDA_DECODE_PDL");
  return st->hopper && !(env && strcmp(env, "0") == 0);
}

moe_status cuda_decode_run(const cuda_state *st, const cuda_decode *d) {
  cuda_state overlapped = *st;
  overlapped.pdl = decode_pdl(st);
  st = &overlapped;
  const dim3 block(DECODE_WARPS * 32);
  const dim3 up_grid((unsigned)((d->inter + DECODE_WARPS - 1) / DECODE_WARPS),
                     (unsigned)d->num_tokens, (unsigned)d->top_k);
  cudaError_t err = cuda_launch(st, true, decode_up_kernel, up_grid, block, up_smem(d), *d);
  if (err != cudaSuccess) return cuda_status(err, "decode_up_kernel launch");
  CUDA_TRY(cuda_launch_status("decode_up_kernel"));
  const dim3 down_grid((unsigned)((d->hidden + down_tile(d) - 1) / down_tile(d)),
                       (unsigned)d->num_tokens);
  err = cuda_launch(st, true, decode_down_kernel, down_grid, block, down_smem(d), *d);
  if (err != cudaSuccess) return cuda_status(err, "decode_down_kernel launch");
  return cuda_launch_status("decode_down_kernel");
}
