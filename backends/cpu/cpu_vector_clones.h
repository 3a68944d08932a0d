/*
 * cpu_vector_clones.h - CPU_VECTOR_CLONES: compiles a function of plain
 * loops twice, for AVX-512F and for the baseline, and lets the loader pick
 * the one the CPU runs (GCC/Clang target_clones, an ifunc). The backend's
 * element-wise passes (A packing, the GEMM epilogue, the top-k reduce) are
 * such loops: at the baseline's 4 lanes they took about 4% of the GEMM time
 * of Qwen3's shapes on the AVX-512F path, and the reduce ran at SSE width.
 * Elementwise IEEE operations round alike at every vector width, and the
 * backend is compiled without contraction (-ffp-contract=off), so both
 * clones give the same bits (a forward of the -DCPU_VECTOR_CLONES= build and
 * of the default one hash alike on an AVX-512 machine).
 */
#ifndef MOE_CPU_VECTOR_CLONES_H
#define MOE_CPU_VECTOR_CLONES_H

#if !defined(CPU_VECTOR_CLONES) && defined(__x86_64__) && defined(__ELF__) &&                      \
    defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define CPU_VECTOR_CLONES __attribute__((target_clones("avx512f", "default")))
#endif
#endif
#ifndef CPU_VECTOR_CLONES /* -DCPU_VECTOR_CLONES= : the baseline only, for A/B builds */
#define CPU_VECTOR_CLONES
#endif
/* Helpers of the cloned functions, inlined into each clone. */
#define CPU_CLONE_INLINE static inline __attribute__((always_inline))

#endif /* MOE_CPU_VECTOR_CLONES_H */
