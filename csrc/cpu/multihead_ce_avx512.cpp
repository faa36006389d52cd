// The CPU kernel (multihead_ce.cpp) for AVX-512 machines; dispatch.cpp runs it where ATen's CPU capability is
// AVX512. As in multihead_ce_avx2.cpp: ATen's AVX512 flags (-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma) from
// the pragma, and the macros of those flags that headers read.
#if !defined(__GNUC__) || defined(__clang__)
#error "auxfuse: the per-level CPU kernel copies need GCC; with another compiler set AUXFUSE_CPU_ARCH (e.g. native)"
#endif
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#include "multihead_ce.cpp"
