/*
 * hopper_gemm.cuh - what the two Hopper grouped GEMMs (gemm_wgmma.cu's
 * 128-row tiles, gemm_stream.cu's weight streaming) share on the host and
 * in their kernel parameters: the epilogue index of their template tables
 * and the raise of their shared-memory limit (the fields both kernels
 * read, hopper_gemm_params, are the base of cuda_wgmma_gemm in
 * cuda_internal.cuh).
 */
#ifndef MOE_CUDA_HOPPER_GEMM_CUH
#define MOE_CUDA_HOPPER_GEMM_CUH

#include "cuda_internal.cuh"

/* Epilogues: a plain store (GEMM2) or the GLU of one activation (GEMM1).
 * The activation is a template parameter of the kernels because their
 * epilogues are unrolled over the accumulator registers (compile-time
 * indices only): one formula per kernel keeps the code each tile runs
 * small. */
enum hopper_epilogue {
  HOPPER_STORE = 0,
  HOPPER_GLU_SWIGLU,
  HOPPER_GLU_GEGLU,
  HOPPER_GLU_SWIGLU_CLAMP,
  HOPPER_EPILOGUES
};
static_assert(HOPPER_GLU_SWIGLU - 1 == MOE_ACTIVATION_SWIGLU &&
                  HOPPER_GLU_GEGLU - 1 == MOE_ACTIVATION_GEGLU &&
                  HOPPER_GLU_SWIGLU_CLAMP - 1 == MOE_ACTIVATION_SWIGLU_CLAMP,
              "HOPPER_GLU_* = 1 + the activation");

/* g's epilogue as an index of the kernels' tables, or -1 (with the error
 * set) for a GLU of an activation the kernels were not built for. */
static inline int hopper_epilogue_of(const cuda_wgmma_gemm *g) {
  if (g->epilogue != CUDA_EPILOGUE_GLU) return HOPPER_STORE;
  if (g->activation != MOE_ACTIVATION_SWIGLU && g->activation != MOE_ACTIVATION_GEGLU &&
      g->activation != MOE_ACTIVATION_SWIGLU_CLAMP) {
    moe_set_error(MOE_ERROR_INTERNAL, "Hopper GEMM: activation %d", (int)g->activation);
    return -1;
  }
  return 1 + (int)g->activation;
}

/* Raises kernel's dynamic shared-memory limit to bytes on the current
 * device; false (the error cleared) when the device refuses. */
template <typename Kernel> static inline bool hopper_set_smem_limit(Kernel *kernel, int bytes) {
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) cudaGetLastError();
  return err == cudaSuccess;
}

#endif /* MOE_CUDA_HOPPER_GEMM_CUH */
