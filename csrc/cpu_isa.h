// Which CPU variant this translation unit is compiled for.
//
// setup.py compiles the hot CPU kernels three times on x86-64: with the plain
// x86-64 flags (the `default` variant, also the only one on other CPUs), with
// -mavx2 -mfma -mf16c (ATTNKERNELS_CPU_AVX2) and with AVX-512 F/BW/VL/DQ
// (ATTNKERNELS_CPU_AVX512); csrc/cpu/cpu_dispatch.cpp picks one at run time.
//
// Every inline function and template of ours lives in an inline namespace
// named after the variant. Without it, the AVX-512 object's out-of-line copy
// of, say, a sampler_loops.h template and the default object's copy would
// share one symbol name, and the linker would keep one of them for every
// caller: an AVX2 machine could then run AVX-512 code and die with SIGILL.
// Inline functions of torch and the C++ library cannot be renamed this way;
// setup.py links the default objects first, and linkers keep the first
// definition of such a symbol, so every caller gets a copy compiled for its
// variant or a lower one (tests/test_cpu_capability.py checks the built
// library for this).
#pragma once

#if defined(ATTNKERNELS_CPU_AVX512)
#define ATTNKERNELS_CPU_ISA avx512
#elif defined(ATTNKERNELS_CPU_AVX2)
#define ATTNKERNELS_CPU_ISA avx2
#else
#define ATTNKERNELS_CPU_ISA generic
#endif

// For the small vector helpers called once per channel in the innermost loops:
// as out-of-line calls (GCC declined to inline them where several kernels use
// them) every live vector register is spilled around each call.
#if defined(__GNUC__) || defined(__clang__)
#define ATTNKERNELS_ALWAYS_INLINE inline __attribute__((always_inline))
#define ATTNKERNELS_LAMBDA_ALWAYS_INLINE __attribute__((always_inline))
#else
#define ATTNKERNELS_ALWAYS_INLINE inline
#define ATTNKERNELS_LAMBDA_ALWAYS_INLINE
#endif

// The functions that use AVX512-BF16 (avx512 variant only) carry it as a target attribute, so that
// the variant's own flags stay those of every AVX-512 CPU; they run only where
// bf16_dot_products_enabled() (cpu/cpu_kernels.h) says the CPU has it.
#if defined(ATTNKERNELS_CPU_AVX512)
#define ATTNKERNELS_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif
