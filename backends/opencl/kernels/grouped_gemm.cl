/*
 * grouped_gemm.cl - the grouped BF16 GEMM over align's metadata, in three
 * kernels that all compute, for every real slot s of a block b owned by
 * expert e = expert_ids[b]:
 *     c[s][col] = bf16(epilogue(sum_k a[row(s)][k] * B_e[col][k]))
 * with row(s) = s / top_k (per-token input) or s (per-slot input), fp32
 * accumulation, and the epilogue of moe_gemm_epilogue below. Padding rows
 * (sentinel ids >= num_slots) are never written.
 *
 * The metadata is the caller's and may be corrupt (moe.h, moe_grouped_gemm):
 * positions at or past min(num_tokens_post_padded, sorted_capacity), slot
 * ids outside [0, num_slots) and expert ids outside [0, num_local_experts)
 * contribute nothing, so no input makes a kernel read or write outside its
 * buffers. c is bf16, or fp32 when c_fp32 is set (the layer's gate|up, which
 * stays fp32 until the activation: include/moe.h, "Numerics").
 *
 *   moe_gemm_reference  one work-item per output; any layout, any block_m.
 *   moe_gemm_skinny_*   decode: few rows per expert, so weight bytes are the
 *                       cost. A work-group splits K of COLS weight rows
 *                       ([out][in] layout) into 8-wide vector loads; each
 *                       weight vector feeds ROWS rows of A at once; partial
 *                       sums meet in local memory. One work-group per
 *                       (column group, block); it walks all rows of its
 *                       block.
 *   moe_gemm_tiled_*    prefill: a TM x TN output tile per work-group of
 *                       256 work-items, each owning MR x NR outputs held in
 *                       registers; K advances TK at a time through local
 *                       memory (fp32), the next slice loaded into registers
 *                       while the current one is multiplied. The TM rows of
 *                       a tile lie in one align block (block_m % TM == 0).
 */

#define MOE_ROUTED_NONE 0
#define MOE_ROUTED_BEFORE_BIAS 1
#define MOE_ROUTED_AFTER_BIAS 2

/* bias, then the routed weight, as moe_gemm_routed_weight says. */
inline float moe_gemm_epilogue(float acc, int slot, int col, int expert, int n,
                               __global const float *bias, __global const float *topk_weights,
                               int routed_mode) {
  float b = bias ? bias[(long)expert * n + col] : 0.0f;
  if (routed_mode == MOE_ROUTED_BEFORE_BIAS) return topk_weights[slot] * acc + b;
  if (routed_mode == MOE_ROUTED_AFTER_BIAS) return topk_weights[slot] * (acc + b);
  return acc + b;
}

/* The sorted positions a kernel may read: the caller's
 * num_tokens_post_padded clamped to [0, sorted_capacity]. */
inline int moe_gemm_limit(__global const int *num_tokens_post_padded, int sorted_capacity) {
  return clamp(*num_tokens_post_padded, 0, sorted_capacity);
}

/* The expert owning block `block`, or -1 when its id is not a local expert. */
inline int moe_gemm_expert(__global const int *expert_ids, int block, int num_local_experts) {
  const int e = expert_ids[block];
  return e >= 0 && e < num_local_experts ? e : -1;
}

/* The slot at sorted position pos, or num_slots (padding: never computed)
 * when pos is past the limit or its id is not a slot. */
inline int moe_gemm_slot(__global const int *sorted_token_ids, int pos, int limit, int num_slots) {
  if (pos >= limit) return num_slots;
  const int s = sorted_token_ids[pos];
  return s >= 0 && s < num_slots ? s : num_slots;
}

/* Stores one output: bf16, or fp32 when c_fp32. */
inline void moe_gemm_store(__global ushort *c, int c_fp32, long index, float v) {
  if (c_fp32)
    ((__global float *)c)[index] = v;
  else
    c[index] = moe_bf16_from_float(v);
}

inline long moe_gemm_a_row(int slot, int top_k, int per_slot_input) {
  return per_slot_input ? (long)slot : (long)(slot / top_k);
}

__kernel void moe_gemm_reference(int num_slots, int top_k, int per_slot_input, int n, int k,
                                 int block_m, int routed_mode, int num_local_experts,
                                 int sorted_capacity, int c_fp32, int b_in_out,
                                 __global const ushort *a, __global const ushort *b,
                                 __global const float *bias, __global const int *sorted_token_ids,
                                 __global const int *expert_ids,
                                 __global const int *num_tokens_post_padded,
                                 __global const float *topk_weights, __global ushort *c) {
  const int col = get_global_id(0), pos = get_global_id(1);
  const int limit = moe_gemm_limit(num_tokens_post_padded, sorted_capacity);
  if (col >= n || pos >= limit) return;
  const int slot = moe_gemm_slot(sorted_token_ids, pos, limit, num_slots);
  const int expert = moe_gemm_expert(expert_ids, pos / block_m, num_local_experts);
  if (slot >= num_slots || expert < 0) return;
  __global const ushort *x = a + moe_gemm_a_row(slot, top_k, per_slot_input) * k;
  __global const ushort *w = b + (long)expert * n * k;
  const long w_col = b_in_out ? col : (long)col * k;
  const long w_step = b_in_out ? n : 1;
  float acc = 0.0f;
  for (int i = 0; i < k; ++i)
    acc += moe_bf16_to_float(x[i]) * moe_bf16_to_float(w[w_col + i * w_step]);
  moe_gemm_store(c, c_fp32, (long)slot * n + col,
                 moe_gemm_epilogue(acc, slot, col, expert, n, bias, topk_weights, routed_mode));
}

/* ------------------------------------------------------------------------ */
/* Skinny kernel (decode)                                                   */
/* ------------------------------------------------------------------------ */

/* 16-byte loads where rows are 16-byte aligned (k % 8 == 0), else vload8. */
#define MOE_LOAD8_ALIGNED(p, i) (*(__global const ushort8 *)((p) + (i)))
#define MOE_LOAD8_ANY(p, i) vload8(0, (p) + (i))

/* acc + dot(x, w) of 8 bf16 pairs packed in uint4s: the even elements are
 * the low halves (shifted up), the odd ones the high halves (masked), one
 * integer operation per element and one FMA per pair. */
inline float moe_dot8_bf16(uint4 x, uint4 w, float acc) {
  const float4 xe = as_float4(x << 16), xo = as_float4(x & 0xffff0000u);
  const float4 we = as_float4(w << 16), wo = as_float4(w & 0xffff0000u);
  acc += xe.s0 * we.s0;
  acc += xo.s0 * wo.s0;
  acc += xe.s1 * we.s1;
  acc += xo.s1 * wo.s1;
  acc += xe.s2 * we.s2;
  acc += xo.s2 * wo.s2;
  acc += xe.s3 * we.s3;
  acc += xo.s3 * wo.s3;
  return acc;
}

/*
 * WG work-items split K; each owns COLS x ROWS fp32 sums. A pass over K
 * reads UNROLL 8-element chunks per column per step (chunk u of step kk at
 * kk + u * WG * 8, so each chunk is one coalesced run across the group),
 * which keeps UNROLL * COLS 16-byte weight loads in flight per work-item.
 * The sums meet in local memory in two levels: WG/16 groups of 16 lanes,
 * then 16 partials per output.
 */
#define MOE_DEFINE_GEMM_SKINNY(NAME, LOAD8, WG, COLS, ROWS, UNROLL)                                \
  __kernel __attribute__((reqd_work_group_size(WG, 1, 1))) void NAME(                              \
      int num_slots, int top_k, int per_slot_input, int n, int k, int block_m, int routed_mode,    \
      int num_local_experts, int sorted_capacity, int c_fp32, __global const ushort *a,            \
      __global const ushort *b, __global const float *bias, __global const int *sorted_token_ids,  \
      __global const int *expert_ids, __global const int *num_tokens_post_padded,                  \
      __global const float *topk_weights, __global ushort *c) {                                    \
    __local float partial[ROWS * COLS][WG + 1];                                                    \
    const int lid = get_local_id(0);                                                               \
    const int col0 = get_group_id(0) * COLS;                                                       \
    const int block_start = get_group_id(1) * block_m;                                             \
    const int limit = moe_gemm_limit(num_tokens_post_padded, sorted_capacity);                     \
    if (block_start >= limit) return;                                                              \
    const int expert = moe_gemm_expert(expert_ids, get_group_id(1), num_local_experts);            \
    if (expert < 0) return;                                                                        \
    __global const ushort *w[COLS];                                                                \
    for (int j = 0; j < COLS; ++j)                                                                 \
      w[j] = b + ((long)expert * n + min(col0 + j, n - 1)) * k;                                    \
    const int k_main = k / (WG * 8 * UNROLL) * (WG * 8 * UNROLL);                                  \
    for (int r0 = 0; r0 < block_m; r0 += ROWS) {                                                   \
      int slot[ROWS];                                                                              \
      __global const ushort *x[ROWS];                                                              \
      int any_real = 0;                                                                            \
      for (int i = 0; i < ROWS; ++i) {                                                             \
        slot[i] = r0 + i < block_m                                                                 \
                      ? moe_gemm_slot(sorted_token_ids, block_start + r0 + i, limit, num_slots)    \
                      : num_slots;                                                                 \
        int real = slot[i] < num_slots;                                                            \
        any_real |= real;                                                                          \
        /* Padding rows read row 0 (always there) and are never stored. */                         \
        x[i] = a + (real ? moe_gemm_a_row(slot[i], top_k, per_slot_input) : 0) * k;                \
      }                                                                                            \
      if (!any_real) continue;                                                                     \
      float acc[ROWS][COLS];                                                                       \
      for (int i = 0; i < ROWS; ++i)                                                               \
        for (int j = 0; j < COLS; ++j)                                                             \
          acc[i][j] = 0.0f;                                                                        \
      for (int kk = lid * 8; kk < k_main; kk += WG * 8 * UNROLL) {                                 \
        uint4 wv[UNROLL][COLS];                                                                    \
        _Pragma("unroll") for (int u = 0; u < UNROLL; ++u)                                         \
            _Pragma("unroll") for (int j = 0; j < COLS; ++j) wv[u][j] =                            \
                as_uint4(LOAD8(w[j], kk + u * WG * 8));                                            \
        _Pragma("unroll") for (int u = 0; u < UNROLL; ++u) {                                       \
          _Pragma("unroll") for (int i = 0; i < ROWS; ++i) {                                       \
            const uint4 xv = as_uint4(LOAD8(x[i], kk + u * WG * 8));                               \
            _Pragma("unroll") for (int j = 0; j < COLS; ++j) acc[i][j] =                           \
                moe_dot8_bf16(xv, wv[u][j], acc[i][j]);                                            \
          }                                                                                        \
        }                                                                                          \
      }                                                                                            \
      /* The rest of K, 8 at a time, then one by one. */                                           \
      const int k8 = k / 8 * 8;                                                                    \
      for (int kk = k_main + lid * 8; kk < k8; kk += WG * 8)                                       \
        for (int i = 0; i < ROWS; ++i) {                                                           \
          const float8 xv = moe_bf16x8_to_f32(LOAD8(x[i], kk));                                    \
          for (int j = 0; j < COLS; ++j) {                                                         \
            const float8 p = xv * moe_bf16x8_to_f32(LOAD8(w[j], kk));                              \
            acc[i][j] += ((p.s0 + p.s1) + (p.s2 + p.s3)) + ((p.s4 + p.s5) + (p.s6 + p.s7));        \
          }                                                                                        \
        }                                                                                          \
      for (int kk = k8 + lid; kk < k; kk += WG)                                                    \
        for (int i = 0; i < ROWS; ++i)                                                             \
          for (int j = 0; j < COLS; ++j)                                                           \
            acc[i][j] += moe_bf16_to_float(x[i][kk]) * moe_bf16_to_float(w[j][kk]);                \
      for (int i = 0; i < ROWS; ++i)                                                               \
        for (int j = 0; j < COLS; ++j)                                                             \
          partial[i * COLS + j][lid] = acc[i][j];                                                  \
      barrier(CLK_LOCAL_MEM_FENCE);                                                                \
      /* Level 1: work-item q*G + g sums lanes g*16 .. g*16+15 of output q. */                     \
      for (int t = lid; t < ROWS * COLS * (WG / 16); t += WG) {                                    \
        const int q = t / (WG / 16), g = t % (WG / 16);                                            \
        float sum = 0.0f;                                                                          \
        for (int l = 0; l < 16; ++l)                                                               \
          sum += partial[q][g * 16 + l];                                                           \
        partial[q][g * 16] = sum; /* only this work-item reads lane g*16 of q again */             \
      }                                                                                            \
      barrier(CLK_LOCAL_MEM_FENCE);                                                                \
      for (int q = lid; q < ROWS * COLS; q += WG) {                                                \
        const int i = q / COLS, col = col0 + q % COLS;                                             \
        float sum = 0.0f;                                                                          \
        for (int g = 0; g < WG / 16; ++g)                                                          \
          sum += partial[q][g * 16];                                                               \
        int s = slot[0];                                                                           \
        for (int r = 1; r < ROWS; ++r)                                                             \
          if (r == i) s = slot[r];                                                                 \
        if (s < num_slots && col < n)                                                              \
          moe_gemm_store(                                                                          \
              c, c_fp32, (long)s *n + col,                                                         \
              moe_gemm_epilogue(sum, s, col, expert, n, bias, topk_weights, routed_mode));         \
      }                                                                                            \
      barrier(CLK_LOCAL_MEM_FENCE);                                                                \
    }                                                                                              \
  }

/* Variants chosen by the host (opencl_backend.c): WG, COLS, ROWS, UNROLL. */
MOE_DEFINE_GEMM_SKINNY(moe_gemm_skinny_any, MOE_LOAD8_ANY, 64, 4, 4, 1)
MOE_DEFINE_GEMM_SKINNY(moe_gemm_skinny_64x4x1u2, MOE_LOAD8_ALIGNED, 64, 4, 1, 2)
MOE_DEFINE_GEMM_SKINNY(moe_gemm_skinny_64x4x4, MOE_LOAD8_ALIGNED, 64, 4, 4, 1)
MOE_DEFINE_GEMM_SKINNY(moe_gemm_skinny_64x4x4u2, MOE_LOAD8_ALIGNED, 64, 4, 4, 2)
MOE_DEFINE_GEMM_SKINNY(moe_gemm_skinny_64x8x4, MOE_LOAD8_ALIGNED, 64, 8, 4, 1)
MOE_DEFINE_GEMM_SKINNY(moe_gemm_skinny_128x4x8, MOE_LOAD8_ALIGNED, 128, 4, 8, 1)

/* ------------------------------------------------------------------------ */
/* Row kernel for CPU devices                                               */
/* ------------------------------------------------------------------------ */

/*
 * moe_gemm_rows_cpu: for CPU OpenCL devices (PoCL), where a work-group is a
 * task and barriers split it into loops. No local memory, no barriers: a
 * work-item owns one output column of one block and streams its weight row
 * ([out][in]) over all of K with 8-wide loads, MOE_CPU_ROWS rows of A at a
 * time, so a row of weights is reused from the core's cache.
 */
#define MOE_CPU_ROWS 4

__kernel void moe_gemm_rows_cpu(int num_slots, int top_k, int per_slot_input, int n, int k,
                                int block_m, int routed_mode, int num_local_experts,
                                int sorted_capacity, int c_fp32, __global const ushort *a,
                                __global const ushort *b, __global const float *bias,
                                __global const int *sorted_token_ids,
                                __global const int *expert_ids,
                                __global const int *num_tokens_post_padded,
                                __global const float *topk_weights, __global ushort *c) {
  const int col = get_global_id(0), block = get_global_id(1);
  const int block_start = block * block_m;
  const int limit = moe_gemm_limit(num_tokens_post_padded, sorted_capacity);
  if (col >= n || block_start >= limit) return;
  const int expert = moe_gemm_expert(expert_ids, block, num_local_experts);
  if (expert < 0) return;
  __global const ushort *w = b + ((long)expert * n + col) * k;
  const int k8 = k / 8 * 8;
  for (int r0 = 0; r0 < block_m; r0 += MOE_CPU_ROWS) {
    int slot[MOE_CPU_ROWS];
    __global const ushort *x[MOE_CPU_ROWS];
    int any_real = 0;
    for (int i = 0; i < MOE_CPU_ROWS; ++i) {
      slot[i] = r0 + i < block_m
                    ? moe_gemm_slot(sorted_token_ids, block_start + r0 + i, limit, num_slots)
                    : num_slots;
      const int real = slot[i] < num_slots;
      any_real |= real;
      x[i] = a + (real ? moe_gemm_a_row(slot[i], top_k, per_slot_input) : 0) * k;
    }
    if (!any_real) continue;
    float8 acc[MOE_CPU_ROWS];
    for (int i = 0; i < MOE_CPU_ROWS; ++i)
      acc[i] = (float8)(0.0f);
    for (int kk = 0; kk < k8; kk += 8) {
      const float8 wv = moe_bf16x8_to_f32(vload8(0, w + kk));
      for (int i = 0; i < MOE_CPU_ROWS; ++i)
        acc[i] += moe_bf16x8_to_f32(vload8(0, x[i] + kk)) * wv;
    }
    for (int i = 0; i < MOE_CPU_ROWS; ++i) {
      if (slot[i] >= num_slots) continue;
      const float8 v = acc[i];
      float sum = ((v.s0 + v.s1) + (v.s2 + v.s3)) + ((v.s4 + v.s5) + (v.s6 + v.s7));
      for (int kk = k8; kk < k; ++kk)
        sum += moe_bf16_to_float(x[i][kk]) * moe_bf16_to_float(w[kk]);
      moe_gemm_store(
          c, c_fp32, (long)slot[i] * n + col,
          moe_gemm_epilogue(sum, slot[i], col, expert, n, bias, topk_weights, routed_mode));
    }
  }
}

/* ------------------------------------------------------------------------ */
/* Tiled kernel (prefill)                                                   */
/* ------------------------------------------------------------------------ */

/*
 * 256 work-items as 16 x 16 (tx, ty). A work-item owns rows
 * g*64 + ty*4 + {0..3} (g < MR/4) and columns g*64 + tx*4 + {0..3}
 * (g < NR/4) of the tile, so that its local reads are float4 and a
 * quarter-warp's reads fall in distinct banks:
 *
 *            TN columns: | tx=0 (4) | tx=1 (4) | ... | tx=15 | (repeat NR/4)
 *   TM rows  ty=0 (4 rows)
 *            ty=1 ...    (repeat MR/4)
 *
 * Loads: each work-item fetches 4 consecutive bf16 of one A row and of one
 * B row ([out][in]) or B column run ([in][out]) per K slice.
 */
#define MOE_TL_THREADS 256

/* Four consecutive bf16 at p as fp32; only the first `valid` (0..4) are
 * read, the rest are 0. vec4: p is 8-byte aligned, so one load will do. */
inline float4 moe_load4(__global const ushort *p, int valid, int vec4) {
  if (vec4 && valid == 4) return moe_bf16x4_to_f32(*(__global const ushort4 *)p);
  float t[4];
  for (int q = 0; q < 4; ++q)
    t[q] = q < valid ? moe_bf16_to_float(p[q]) : 0.0f;
  return (float4)(t[0], t[1], t[2], t[3]);
}

/* This work-item's part of the K slice at K0: a_next, b_next. */
#define MOE_TL_FETCH(K0)                                                                           \
  do {                                                                                             \
    const int ka = (K0) + a_kq;                                                                    \
    a_next = moe_load4(a_ptr + ka, a_real ? clamp(k - ka, 0, 4) : 0, vec4);                        \
    if (b_in_out) {                                                                                \
      const int kb = (K0) + b_r, col = n0 + b_q;                                                   \
      b_next =                                                                                     \
          moe_load4(w + (long)min(kb, k - 1) * n + col, kb < k ? clamp(n - col, 0, 4) : 0, vec4);  \
    } else {                                                                                       \
      const int kb = (K0) + b_q, col = n0 + b_r;                                                   \
      b_next =                                                                                     \
          moe_load4(w + (long)min(col, n - 1) * k + kb, col < n ? clamp(k - kb, 0, 4) : 0, vec4);  \
    }                                                                                              \
  } while (0)

#define MOE_DEFINE_GEMM_TILED(NAME, TM, TN, TK, MR, NR)                                            \
  __kernel __attribute__((reqd_work_group_size(MOE_TL_THREADS, 1, 1))) void NAME(                  \
      int num_slots, int top_k, int per_slot_input, int n, int k, int block_m, int routed_mode,    \
      int num_local_experts, int sorted_capacity, int c_fp32, int b_in_out,                        \
      __global const ushort *a, __global const ushort *b, __global const float *bias,              \
      __global const int *sorted_token_ids, __global const int *expert_ids,                        \
      __global const int *num_tokens_post_padded, __global const float *topk_weights,              \
      __global ushort *c) {                                                                        \
    __local float a_tile[TK][TM] __attribute__((aligned(16)));                                     \
    __local float b_tile[TK][TN] __attribute__((aligned(16)));                                     \
    __local int tile_slot[TM];                                                                     \
    const int tid = get_local_id(0), tx = tid % 16, ty = tid / 16;                                 \
    const int n0 = get_group_id(0) * TN;                                                           \
    const int p0 = get_group_id(1) * TM;                                                           \
    const int limit = moe_gemm_limit(num_tokens_post_padded, sorted_capacity);                     \
    if (p0 >= limit) return;                                                                       \
    const int expert = moe_gemm_expert(expert_ids, p0 / block_m, num_local_experts);               \
    if (expert < 0) return;                                                                        \
    for (int r = tid; r < TM; r += MOE_TL_THREADS)                                                 \
      tile_slot[r] = moe_gemm_slot(sorted_token_ids, p0 + r, limit, num_slots);                    \
    barrier(CLK_LOCAL_MEM_FENCE);                                                                  \
    /* This work-item's loads: A row a_r at k offset a_kq; B likewise. */                          \
    const int a_r = tid / (TK / 4), a_kq = (tid % (TK / 4)) * 4;                                   \
    const int a_slot = tile_slot[a_r];                                                             \
    const int a_real = a_slot < num_slots;                                                         \
    __global const ushort *a_ptr =                                                                 \
        a + (a_real ? moe_gemm_a_row(a_slot, top_k, per_slot_input) : 0) * k;                      \
    __global const ushort *w = b + (long)expert * n * k;                                           \
    int b_r, b_q; /* [out][in]: row n0+b_r, k offset b_q; [in][out]: k row b_r, column b_q */      \
    if (b_in_out) {                                                                                \
      b_r = tid / (TN / 4);                                                                        \
      b_q = (tid % (TN / 4)) * 4;                                                                  \
    } else {                                                                                       \
      b_r = tid / (TK / 4);                                                                        \
      b_q = (tid % (TK / 4)) * 4;                                                                  \
    }                                                                                              \
    const int vec4 = (k % 4 == 0) && (!b_in_out || n % 4 == 0);                                    \
    float4 a_next, b_next;                                                                         \
    MOE_TL_FETCH(0);                                                                               \
    float acc[MR][NR];                                                                             \
    for (int i = 0; i < MR; ++i)                                                                   \
      for (int j = 0; j < NR; ++j)                                                                 \
        acc[i][j] = 0.0f;                                                                          \
    for (int k0 = 0; k0 < k; k0 += TK) {                                                           \
      barrier(CLK_LOCAL_MEM_FENCE);                                                                \
      a_tile[a_kq + 0][a_r] = a_next.s0;                                                           \
      a_tile[a_kq + 1][a_r] = a_next.s1;                                                           \
      a_tile[a_kq + 2][a_r] = a_next.s2;                                                           \
      a_tile[a_kq + 3][a_r] = a_next.s3;                                                           \
      if (b_in_out) {                                                                              \
        *(__local float4 *)&b_tile[b_r][b_q] = b_next;                                             \
      } else {                                                                                     \
        b_tile[b_q + 0][b_r] = b_next.s0;                                                          \
        b_tile[b_q + 1][b_r] = b_next.s1;                                                          \
        b_tile[b_q + 2][b_r] = b_next.s2;                                                          \
        b_tile[b_q + 3][b_r] = b_next.s3;                                                          \
      }                                                                                            \
      barrier(CLK_LOCAL_MEM_FENCE);                                                                \
      /* The next slice travels while this one is multiplied. */                                   \
      if (k0 + TK < k) MOE_TL_FETCH(k0 + TK);                                                      \
      _Pragma("unroll") for (int kk = 0; kk < TK; ++kk) {                                          \
        float av[MR], bv[NR];                                                                      \
        _Pragma("unroll") for (int g = 0; g < MR / 4; ++g)                                         \
            vstore4(*(__local const float4 *)&a_tile[kk][g * 64 + ty * 4], g, av);                 \
        _Pragma("unroll") for (int g = 0; g < NR / 4; ++g)                                         \
            vstore4(*(__local const float4 *)&b_tile[kk][g * 64 + tx * 4], g, bv);                 \
        _Pragma("unroll") for (int i = 0; i < MR; ++i)                                             \
            _Pragma("unroll") for (int j = 0; j < NR; ++j) acc[i][j] += av[i] * bv[j];             \
      }                                                                                            \
    }                                                                                              \
    for (int i = 0; i < MR; ++i) {                                                                 \
      const int slot = tile_slot[(i / 4) * 64 + ty * 4 + i % 4];                                   \
      if (slot >= num_slots) continue;                                                             \
      for (int j = 0; j < NR; ++j) {                                                               \
        const int col = n0 + (j / 4) * 64 + tx * 4 + j % 4;                                        \
        if (col < n)                                                                               \
          moe_gemm_store(c, c_fp32, (long)slot *n + col,                                           \
                         moe_gemm_epilogue(acc[i][j], slot, col, expert, n, bias, topk_weights,    \
                                           routed_mode));                                          \
      }                                                                                            \
    }                                                                                              \
  }

MOE_DEFINE_GEMM_TILED(moe_gemm_tiled_64x64, 64, 64, 16, 4, 4)
MOE_DEFINE_GEMM_TILED(moe_gemm_tiled_128x128, 128, 128, 8, 8, 8)
