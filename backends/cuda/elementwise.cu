/*
 * elementwise.cu - the CUDA kernels that are not GEMMs: the gated
 * activation stage, the deterministic weighted top-k reduce, and the weight
 * repacks that moe_layer_create runs once.
 */
#include "activation_math.cuh"
#include "cuda_internal.cuh"

#include <limits.h>

typedef __nv_bfloat16 bf16;

static_assert(MOE_ACT_SWIGLU == (int)MOE_ACTIVATION_SWIGLU &&
                  MOE_ACT_GEGLU == (int)MOE_ACTIVATION_GEGLU &&
                  MOE_ACT_SWIGLU_CLAMP == (int)MOE_ACTIVATION_SWIGLU_CLAMP,
              "activation_logic.h must mirror moe_activation");

/* Grid of at most this many blocks; kernels stride over the rest. */
#define CUDA_MAX_GRID 65536

static unsigned grid_for(int64_t items, int threads) {
  int64_t blocks = (items + threads - 1) / threads;
  if (blocks > CUDA_MAX_GRID) blocks = CUDA_MAX_GRID;
  return (unsigned)(blocks > 0 ? blocks : 1);
}

/* ---- activation stage --------------------------------------------------- */

__global__ void activation_kernel(moe_activation act, float alpha, float limit, int64_t rows,
                                  int64_t inter, const bf16 *in, bf16 *out) {
  const int64_t total = rows * inter;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / inter, c = i % inter;
    const float gate = __bfloat162float(in[r * 2 * inter + c]);
    const float up = __bfloat162float(in[r * 2 * inter + inter + c]);
    out[i] = __float2bfloat16_rn(cuda_gated_activation(act, alpha, limit, gate, up));
  }
}

moe_status cuda_activation(const cuda_state *st, const moe_activation_args *a) {
  const int threads = 256;
  activation_kernel<<<grid_for(a->rows * a->intermediate_size, threads), threads, 0, st->stream>>>(
      a->activation, a->alpha, a->limit, a->rows, a->intermediate_size, (const bf16 *)a->in,
      (bf16 *)a->out);
  return cuda_launch_status("activation_kernel");
}

/* ---- top-k reduce ------------------------------------------------------- */

struct reduce_params {
  const bf16 *y;
  const float *weights; /* NULL: weight 1 */
  const int32_t *ids;   /* masks slots that are not local (through map if any) */
  const int32_t *map;
  int32_t num_experts, num_local;
  int64_t num_tokens, hidden;
  int32_t top_k;
  bf16 *out;
};

/* Without ids every slot counts. With ids and no map (the layer forward:
 * a routed forward's -1 left its row of y unwritten) ids outside [0, EL)
 * are skipped; the reduce stage passes ids only with a map. */
__device__ __forceinline__ bool slot_is_local(const reduce_params &p, int64_t slot) {
  return !p.ids || cuda_local_expert(p.ids[slot], p.map, p.num_experts, p.num_local) >= 0;
}

/* Each thread owns VEC consecutive columns of one token and sums its k
 * slots in ascending j, in fp32: the same order every run. The picks of
 * REDUCE_BATCH slots are loaded first, then their rows of y, then summed:
 * one after the other, a token's 2 k dependent loads are 2 k round trips to
 * memory (measurements: bench/cuda_notes.md, 'Measurements behind the
 * code's rules'). Tokens run along y and columns along x, so no index
 * needs a 64-bit division (a long subroutine, whose code a decode step
 * would fetch from DRAM). */
constexpr int REDUCE_BATCH = 8;

/* VEC bf16 of a row of y, kept as loaded (VEC / 2 registers) until summed:
 * converted at load, the batch's rows took 8 VEC registers and the kernel
 * 102, two blocks per SM; now 78, three (bench/cuda_notes.md item 21). */
template <int VEC> struct raw_row { uint32_t bits[VEC == 8 ? 4 : 1]; };

template <int VEC> __device__ __forceinline__ raw_row<VEC> load_row(const bf16 *row) {
  raw_row<VEC> r;
  if (VEC == 8) {
    const uint4 raw = *(const uint4 *)row;
    r.bits[0] = raw.x, r.bits[1] = raw.y, r.bits[2] = raw.z, r.bits[3] = raw.w;
  } else {
    r.bits[0] = *(const uint16_t *)row;
  }
  return r;
}

/* Element v of a loaded row as float (bf16 is the top half of a float). */
template <int VEC> __device__ __forceinline__ float row_value(const raw_row<VEC> &r, int v) {
  const uint32_t word = r.bits[v / 2];
  return __uint_as_float(v % 2 ? word & 0xffff0000u : word << 16);
}

template <int VEC> __global__ void topk_reduce_kernel(const reduce_params p) {
  cuda_grid_dependency_wait();
  cuda_allow_dependents();
  const int64_t units = (p.hidden + VEC - 1) / VEC;
  for (int64_t t = blockIdx.y; t < p.num_tokens; t += gridDim.y)
#pragma unroll 1
    for (int64_t u = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; u < units;
         u += (int64_t)gridDim.x * blockDim.x) {
      const int64_t col = u * VEC;
      float acc[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v)
        acc[v] = 0.0f;
#pragma unroll 1
      for (int j0 = 0; j0 < p.top_k; j0 += REDUCE_BATCH) {
        bool used[REDUCE_BATCH];
        float w[REDUCE_BATCH];
#pragma unroll
        for (int b = 0; b < REDUCE_BATCH; ++b) {
          const int64_t slot = t * p.top_k + j0 + b;
          used[b] = j0 + b < p.top_k && slot_is_local(p, slot);
          w[b] = used[b] && p.weights ? p.weights[slot] : 1.0f;
        }
        raw_row<VEC> rows[REDUCE_BATCH];
#pragma unroll
        for (int b = 0; b < REDUCE_BATCH; ++b)
          if (used[b]) rows[b] = load_row<VEC>(p.y + (t * p.top_k + j0 + b) * p.hidden + col);
#pragma unroll
        for (int b = 0; b < REDUCE_BATCH; ++b)
          if (used[b])
#pragma unroll
            for (int v = 0; v < VEC; ++v)
              acc[v] += w[b] * row_value<VEC>(rows[b], v);
      }
      bf16 *dst = p.out + t * p.hidden + col;
      if (VEC == 8) {
        uint4 raw;
        bf16 *vals = (bf16 *)&raw;
#pragma unroll
        for (int v = 0; v < VEC; ++v)
          vals[v] = __float2bfloat16_rn(acc[v]);
        *(uint4 *)dst = raw;
      } else {
        dst[0] = __float2bfloat16_rn(acc[0]);
      }
    }
}

moe_status cuda_topk_reduce(const cuda_state *st, const moe_reduce_args *a) {
  reduce_params p;
  p.y = (const bf16 *)a->y;
  p.weights = (const float *)a->topk_weights;
  p.ids = (const int32_t *)a->topk_ids;
  p.map = a->topk_ids ? (const int32_t *)a->expert_map : NULL;
  p.num_experts = a->num_experts;
  p.num_local = a->num_local_experts;
  p.num_tokens = a->num_tokens;
  p.hidden = a->hidden_size;
  p.top_k = a->top_k;
  p.out = (bf16 *)a->out;
  const int threads = 256;
  const bool vec =
      a->hidden_size % 8 == 0 && ((uintptr_t)a->y & 15u) == 0 && ((uintptr_t)a->out & 15u) == 0;
  const int64_t units = vec ? a->hidden_size / 8 : a->hidden_size;
  const int64_t token_blocks = a->num_tokens < 65535 ? a->num_tokens : 65535;
  const dim3 grid((unsigned)((units + threads - 1) / threads),
                  (unsigned)(token_blocks > 0 ? token_blocks : 1));
  if (vec)
    topk_reduce_kernel<8><<<grid, threads, 0, st->stream>>>(p);
  else
    topk_reduce_kernel<1><<<grid, threads, 0, st->stream>>>(p);
  return cuda_launch_status("topk_reduce_kernel");
}

/* ---- weight repacks (layer creation) ------------------------------------ */

/* packed[2i + half][h] = gate/up row i of w13, from either layout. */
__global__ void repack_w13_kernel(const bf16 *src, bf16 *dst, int64_t hidden, int64_t inter,
                                  bool in_out) {
  const int64_t total = 2 * inter * hidden;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t packed_row = i / hidden, h = i % hidden;
    const int64_t src_row = (packed_row & 1) * inter + packed_row / 2; /* gate or up row */
    dst[i] = in_out ? src[h * 2 * inter + src_row] : src[src_row * hidden + h];
  }
}

moe_status cuda_repack_w13(const cuda_state *st, const bf16 *src, bf16 *dst, int64_t hidden,
                           int64_t inter, moe_weight_layout layout) {
  const int threads = 256;
  repack_w13_kernel<<<grid_for(2 * inter * hidden, threads), threads, 0, st->stream>>>(
      src, dst, hidden, inter, layout == MOE_WEIGHT_LAYOUT_IN_OUT);
  return cuda_launch_status("repack_w13_kernel");
}

__global__ void transpose_kernel(const bf16 *src, bf16 *dst, int64_t rows, int64_t cols) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t c = i / rows, r = i % rows; /* dst is [cols][rows] */
    dst[i] = src[r * cols + c];
  }
}

moe_status cuda_transpose(const cuda_state *st, const bf16 *src, bf16 *dst, int64_t rows,
                          int64_t cols) {
  const int threads = 256;
  transpose_kernel<<<grid_for(rows * cols, threads), threads, 0, st->stream>>>(src, dst, rows,
                                                                               cols);
  return cuda_launch_status("transpose_kernel");
}
