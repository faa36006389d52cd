// The CPU kernel (multihead_ce.cpp) for AVX2 machines; dispatch.cpp runs it where ATen's CPU capability is AVX2.
// setup.py compiles every source with the same flags, so this copy takes ATen's AVX2 flags (-mavx2 -mfma -mf16c)
// from the pragma, which applies to every function defined after it, the ATen headers' included. GCC does not
// define those flags' macros for a pragma in C++, so they are defined here, those that headers read: sleef.h
// declares at::vec's vector math under __AVX__, c10::Half converts with F16C under __F16C__, and
// cpu_capability.h names the level from them.
#if !defined(__GNUC__) || defined(__clang__)
#error "auxfuse: the per-level CPU kernel copies need GCC; with another compiler set AUXFUSE_CPU_ARCH (e.g. native)"
#endif
#pragma GCC target("avx2,fma,f16c")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#include "multihead_ce.cpp"
