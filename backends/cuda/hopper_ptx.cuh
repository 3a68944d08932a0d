/*
 * hopper_ptx.cuh - sm_90 PTX for asynchronous copies: shared-memory
 * addresses and mbarriers (init, arrive with expected transaction bytes,
 * parity wait), cp.async completing on an mbarrier and the proxy fence
 * that lets wgmma read what it wrote, apart from the kernels that use them
 * (the TMA pipelines of gemm_wgmma.cu and gemm_stream.cu). Defined only in
 * device passes for compute capability 9.0 and up; callers guard their
 * kernel bodies the same way.
 */
#ifndef MOE_CUDA_HOPPER_PTX_CUH
#define MOE_CUDA_HOPPER_PTX_CUH

#include <stdint.h>

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900)
#define MOE_HOPPER_DEVICE 1

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}

/* Makes the initialized barriers visible to the async proxy (TMA) too. */
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

/* One arrival, and bytes of TMA traffic the phase must also wait for. */
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

/* Waits until the phase of the given parity has completed. A fresh barrier
 * is in phase 0, so waiting for parity 1 returns at once: the producer's
 * first pass over the ring does not wait for empty stages. */
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile("{\n"
                 ".reg .pred p;\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                 "selp.u32 %0, 1, 0, p;\n"
                 "}\n"
                 : "=r"(done)
                 : "r"(bar), "r"(parity)
                 : "memory");
  } while (!done);
}

/* 16 bytes global -> shared by cp.async; bytes = 0 writes zeros and reads
 * nothing (rows past the data, K past its end). */
__device__ __forceinline__ void cp_async16_zfill(uint32_t dst, const void *src, uint32_t bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes)
               : "memory");
}

/* One arrival on bar once every cp.async this thread issued so far has
 * landed (noinc: the arrival counts against the barrier's expected count,
 * which must include it). */
__device__ __forceinline__ void cp_async_mbar_arrive_noinc(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

/* Orders this thread's view of shared memory written through the generic
 * proxy (st.shared, cp.async) before its later async-proxy reads (wgmma
 * operands, TMA stores). */
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

#endif /* __CUDA_ARCH__ >= 900 */
#endif /* MOE_CUDA_HOPPER_PTX_CUH */
