/*
 * cuda_tuning.cu - the CUDA forward's thresholds as data: one row per
 * device class, chosen once at context creation by compute capability and
 * the device's peak memory read rate, like a database of tuned parameters.
 * The plan (cuda_backend.cu's plan_forward) and the decode rule read only
 * the row; options cuda.stream_max_rows and cuda.wgmma_min_rows override
 * its Hopper boundaries, and a tuning table (moe_layer_tune) can set them
 * per token count. The measurements behind each row are in
 * bench/cuda_notes.md, "Measurements behind the code's rules", and the
 * device calls that produced them in bench/results.md.
 */
#include "cuda_internal.cuh"

/*
 * First matching row wins, so the most specific class comes first.
 *
 * H200 class: sm_90 with at least 4.3 TB/s of peak read rate (H200 SXM:
 * 4.8). Streaming wins over the mma.sync tiles at every row count below
 * the wgmma tiles' 32 rows per expert (cuda_notes items 17-18).
 *
 * H100 class: every other sm_90 device (H100 SXM: 3.35 TB/s). Streaming
 * up to 31 rows per expert as on the H200: since the streaming producer
 * takes each stage's rows once per unit (cuda_notes item 23) it beat the
 * mma.sync tiles at Qwen3 8 and 16 rows by 5.6% and 4.3% and was level at
 * DeepSeek-V3's (the mma.sync band from 8 rows for 128 or more experts of
 * item 20 is gone). With fewer experts, a 32-token block from 16 rows was
 * 5% faster for gpt-oss and Mixtral at 16 rows (a 16-row block streams the
 * weights of an expert with more rows than that twice).
 *
 * Both Hopper rows order the streaming GEMM's work items in groups of 8
 * token blocks (all feature tiles of a group, then the next group): on an
 * H200, 3.4% faster over 15 points at 16-256 tokens than token block
 * fastest over all blocks (up to 8% at DeepSeek, ernie and Qwen3), slower
 * nowhere by more than 0.2% (bench/results.md, "CUDA on an NVIDIA H200:
 * the streaming GEMM's raster and the kernels around the GEMMs"); not yet
 * measured on its own on an H100.
 *
 * Both Hopper rows route by ranks on many blocks up to 256 tokens (an
 * H100: 2-3% faster forwards than the warp per token for Qwen3 at 16-256
 * tokens, level for the other layers, up to 7% slower past 1024 tokens)
 * and let the wgmma GEMM1 gather x's rows itself up to 96 rows per expert
 * (an H100: 3-8% faster at 32-96 rows; bench/cuda_notes.md item 22), and
 * at any rows where GEMM1 has at most 4096 columns: each column tile
 * copies its rows from x again, which an H200 measured 4% faster than the
 * permute at Qwen3 4096/16384 tokens (1536 columns) and 1-2% at
 * DeepSeek-V3's (4096), but 2-5% slower for gpt-oss (5760) and Mixtral
 * (28672); ncu on an H100 put Qwen3 4096's permute at 78 us of a 1042 us
 * forward (item 24).
 *
 * Both Hopper rows run 64 x 128 wgmma tiles up to 64 rows per expert for
 * layers of at most 128 local experts (an H100: 14% faster at gpt-oss 256
 * tokens, 10% at Qwen3 512, 8% at ernie 512, 2-3% at 64 rows; 8-38%
 * slower from 96 rows, and 2.5% slower at DeepSeek-V3's 256 experts with
 * 32 rows, where the 128 x 256 tiles stay); bench/cuda_notes.md item 23.
 *
 * Generic: everything else (sm_80, sm_89, sm_100 without the sm_90a
 * kernels). The Hopper fields are then unused: the mma.sync tiles run.
 */
/* One device class per line. */
/* clang-format off */
static const cuda_tuning rows[] = {
    /* class, major, min GB/s, decode tokens (>= 64 experts, fewer), decode T x H,
     * stream_max_rows, wgmma_min_rows, stream blocks, stream group,
     * rank routing tokens, wgmma gather (rows, GEMM1 columns), 64-row wgmma tiles (rows, experts) */
    {"H200 class (sm_90, >= 4.3 TB/s)", 9, 4300.0, 8, 2, 16384, 31, 32, {16, 32, 64}, 8, 256, 96, 4096, 64, 128},
    {"H100 class (sm_90)", 9, 0.0, 8, 2, 16384, 31, 32, {15, 32, 64}, 8, 256, 96, 4096, 64, 128},
    {"generic (mma.sync tiles)", 0, 0.0, 8, 2, 16384, 31, 32, {16, 32, 64}, 8, 256, 0, 0, 0, 0},
};
/* clang-format on */

double cuda_peak_read_gbps(int device) {
  int clock_khz = 0, bus_bits = 0;
  if (cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device) != cudaSuccess) {
    (void)cudaGetLastError(); /* unknown: the row that needs no bandwidth */
    return 0.0;
  }
  /* Double data rate: two transfers per clock over bus_bits / 8 bytes. */
  return 2.0 * clock_khz * 1e3 * (bus_bits / 8.0) / 1e9;
}

const cuda_tuning *cuda_tuning_for(int major, double read_gbps) {
  const int count = (int)(sizeof rows / sizeof rows[0]);
  for (int i = 0; i < count - 1; ++i)
    if (major == rows[i].major && read_gbps >= rows[i].min_read_gbps) return &rows[i];
  return &rows[count - 1];
}
