// CPU_CAPABILITY: the instruction-set level this translation unit is compiled for, named as ATen names its levels
// (DEFAULT, AVX2, AVX512) and derived from the compiler's ISA macros as ATen's per-level flags set them: at::vec
// picks its SIMD implementation from it (so it comes before any ATen header), and the CPU kernel names the
// namespace of each compiled copy after it. DEFAULT in the portable build's baseline code, AVX2 and AVX512 in the
// per-level copies (multihead_ce_avx2.cpp, multihead_ce_avx512.cpp), the machine's level in a build for one
// machine (setup.py: AUXFUSE_CPU_ARCH=native).
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__FMA__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#endif
