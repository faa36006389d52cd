// Fused CUDA kernels of the auxfuse ops (schema and output contract: csrc/auxfuse.cpp).
//
// Forward: ONE launch for all heads (grad_mode 0 and 2; grad_mode 1 adds a pre-pass for mean, below).
// A "group" of G threads owns one row (n, s) at a time and loops over the heads inside the row, so the row's
// target is read once for every head:
//   G = 1    thread per row: class-strided logits, e.g. (N, C, S) segmentation heads (consecutive threads
//            take consecutive s, so every class step is a coalesced load; up to 24 loads in flight per
//            thread), or tiny C (< 32);
//   G = 32   warp per row, classes contiguous (classifiers, channels_last), 32 <= C <= 2048;
//   G = 512  block per row, classes contiguous, C > 2048 (LM vocabularies).
// Contiguous classes are read with 16-byte vector loads (a scalar prologue up to the first 16-byte boundary,
// a scalar tail), each logit read once: an online softmax keeps (max, sum of exp, first argmax) per thread
// and merges them across the group in a fixed order (its own RowState rather than multihead_ce.h's
// SoftmaxState add / merge, which turn a leading -inf logit into NaN via exp(-inf - -inf); -inf logits,
// e.g. a masked vocabulary, add 0 here). The loss and gradient coefficients are multihead_ce.h's.
// Rows are handed out grid-stride from a grid whose size depends only on the shape, so every sum has a
// fixed order: the results are bitwise repeatable.
// The cross-row reduction (per-head loss sums and hits, count, denom, the final loss) is done in the same
// launch without float atomics: every block writes its partials to a workspace, takes an integer ticket,
// and the last block sums the partials in block order (in double) and resets the ticket to 0.
// The ticket lives in a small zeroed buffer kept per (device, stream), so the hot path has no memset;
// during CUDA-graph capture a fresh ticket is zeroed by a captured memset instead.
//
// Backward: ONE launch, same mappings: grad = head_weight * row_scale * (p * lse_coef - target terms), with
// p = exp(x - lse) from the saved log-sum-exp (1 read + 1 write per logit), row_scale read on the device
// (grad_loss, divided by denom for mean, per row for none); `p - 1` at the target is formed in fp32
// before the single rounding to the logits' dtype.
//
// grad_mode 1 (gradient in the forward, 2 x element size bytes per logit instead of 3): right after a row's
// log-sum-exp is known, its group reads the row again (from L1 / L2: it was just read) and writes the
// gradient with the head weight folded in, and for mean the 1 / denom of a pre-pass: the same forward kernel
// launched with no heads, which only sums the targets' weights (a read of the targets, not the logits). With
// a block per row the grid is one block per SM so that the rows in flight fit in L2. Backward is then
// scale_grad_kernel: it reads grad_output on the device and returns at once when it is 1 (loss.backward()),
// else scales the gradient in place (one more read and write: a GradScaler's scale costs a pass).
//
// One target per head (multihead_ce_per_head_forward; heads of their own N, C, S, targets and class weights): ONE
// launch of multihead_ce_per_head_kernel for all heads (plus the same target-only pre-pass for mean with gradients),
// on the same per-row code (forward_row) and mappings, the mapping chosen per call from the widest head and
// whether every head's classes are contiguous; the head table (HeadDesc) and the work items go to the device in
// one asynchronous copy. See that kernel's section below.
//
// No CUB: the reductions are an online-softmax merge (max, sum, first argmax) and fixed-order partial sums,
// a few warp shuffles and one shared-memory pass written out here, and that keeps the whole file plain
// CUDA C++ that the CPU emulation below can compile (CUB's device code cannot run there).
//
// Never a host sync. Invalid class indices (outside [0, C), not ignore_index) are never used as an
// address: the row reads class 0 instead, its loss is NaN (so the loss is NaN) and its gradient row NaN;
// the forward counts such rows into the `invalid` output, on the device, in the same reduction as `count`.
//
// AUXFUSE_KERNELS_ONLY: compile the kernels alone (no ATen / torch headers), for quick register checks:
//   nvcc -DAUXFUSE_KERNELS_ONLY -Xptxas=-v -I csrc -I <torch>/include -c csrc/cuda/multihead_ce.cu
// AUXFUSE_EMULATE (set by tests/cuda_emulation/cuda_shim.h): kernels and host logic compiled as C++ and run on
// CPU threads by tests/cuda_emulation/emulate.cpp, with its own launcher instead of the CUDA one below.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "multihead_ce.h"

#ifndef AUXFUSE_KERNELS_ONLY
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ops_common.h"
#endif
#if !defined(AUXFUSE_KERNELS_ONLY) && !defined(AUXFUSE_EMULATE)
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <map>
#include <mutex>
#include <utility>
#endif

namespace auxfuse_cuda {

using auxfuse::ProbRowSums;
using auxfuse::RowCoeffs;
using auxfuse::SoftmaxState;

constexpr int kMaxHeads = 16;            // the heads' pointers travel by value in the launch parameters
#ifndef AUXFUSE_MAX_FORWARD_BLOCKS
#define AUXFUSE_MAX_FORWARD_BLOCKS 1024  // bounds the partials the last block sums
#endif
#ifndef AUXFUSE_MAX_BACKWARD_BLOCKS
#define AUXFUSE_MAX_BACKWARD_BLOCKS (1 << 16)
#endif
constexpr int kMaxForwardBlocks = AUXFUSE_MAX_FORWARD_BLOCKS;  // the emulation lowers both to test grid strides
constexpr int kMaxBackwardBlocks = AUXFUSE_MAX_BACKWARD_BLOCKS;
constexpr int kWarpMaxClasses = 2048;    // above: a block per row
constexpr int kThreadMaxClasses = 32;    // below (contiguous classes): a thread per row
constexpr int kRowBlock = 512;           // block-per-row threads
constexpr int kWarpBlock = 128;          // warp-per-row kernels: 4 rows per block
constexpr int kThreadBlock = 256;        // thread-per-row kernels
constexpr int kScaleBlock = 256;         // scale_grad_kernel
constexpr int kScaleBlocksPerSM = 4;
constexpr float kLog2e = 1.4426950408889634f;

// ------------------------------------------------------------------------------------------------
// Element access
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);  // host pass of nvcc (never called) and the CPU emulation of the kernels
#endif
}

template <typename T>
__device__ __forceinline__ float load_float(const T* p) {
  return static_cast<float>(*p);
}

template <typename T>
__device__ __forceinline__ T to_scalar(float v) {
  return static_cast<T>(v);
}

// 16-byte vectors: kVec elements of T in a uint4.
template <typename T>
struct Vec;

template <>
struct Vec<float> {
  static constexpr int kVec = 4;
  __device__ __forceinline__ static void unpack(const uint4& u, float (&f)[4]) {
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[4]) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};

__device__ __forceinline__ float half_bits_to_float(unsigned int bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}
// Two floats -> two rounded (nearest-even) 16-bit values in one word, `lo` in the low half (one cvt on sm_80+).
__device__ __forceinline__ unsigned int pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  unsigned int bits;
  memcpy(&bits, &h, sizeof(bits));
  return bits;
}
__device__ __forceinline__ unsigned int pack_bf162(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  unsigned int bits;
  memcpy(&bits, &h, sizeof(bits));
  return bits;
}

template <>
struct Vec<c10::Half> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static void unpack(const uint4& u, float (&f)[8]) {
    const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = half_bits_to_float(w[i] & 0xffffu);
      f[2 * i + 1] = half_bits_to_float(w[i] >> 16);
    }
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[8]) {
    unsigned int w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = pack_half2(f[2 * i], f[2 * i + 1]);
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

template <>
struct Vec<c10::BFloat16> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static void unpack(const uint4& u, float (&f)[8]) {
    const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  __device__ __forceinline__ static uint4 pack(const float (&f)[8]) {
    unsigned int w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = pack_bf162(f[2 * i], f[2 * i + 1]);
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

// Elements to skip from p to reach a 16-byte boundary (p is element-aligned), at most C.
template <typename T>
__device__ __forceinline__ int vector_shift(const void* p, int C) {
  const int misalign = static_cast<int>(reinterpret_cast<uintptr_t>(p) & 15u);
  const int shift = ((16 - misalign) & 15) / static_cast<int>(sizeof(T));
  return shift < C ? shift : C;
}

// ------------------------------------------------------------------------------------------------
// Online softmax per thread, and merges
// ------------------------------------------------------------------------------------------------

// max, sum of exp(x - max), first index of the max (-1 while no value above -inf was seen). NaN never
// becomes the max but reaches the sum (the row's loss becomes NaN, as in PyTorch); -inf logits add 0.
struct RowState {
  float m;
  float s;
  int arg;
};

__device__ __forceinline__ RowState state_empty() { return {-INFINITY, 0.f, -1}; }

// Adds K values at indices idx0, idx0 + step, ... (increasing). Padding values are -inf.
template <int K>
__device__ __forceinline__ void state_add(RowState& st, const float (&v)[K], int idx0, int step) {
  float vmax = v[0];
#pragma unroll
  for (int k = 1; k < K; ++k) vmax = fmaxf(vmax, v[k]);
  if (vmax > st.m) {
    int first = K - 1;
#pragma unroll
    for (int k = K - 1; k >= 0; --k) {
      if (v[k] == vmax) first = k;
    }
    st.s *= fast_exp2((st.m - vmax) * kLog2e);  // 0 when the old max was -inf; NaN stays NaN
    st.m = vmax;
    st.arg = idx0 + first * step;
  }
  const float mL = st.m == -INFINITY ? 0.f : st.m * kLog2e;
  float e[K];
#pragma unroll
  for (int k = 0; k < K; ++k) e[k] = fast_exp2(fmaf(v[k], kLog2e, -mL));
#pragma unroll
  for (int width = 1; width < K; width *= 2) {
#pragma unroll
    for (int k = 0; k + width < K; k += 2 * width) e[k] += e[k + width];
  }
  st.s += e[0];
}

// Commutative (bitwise) merge: the winner is fixed by (max, then smaller index).
struct MergeState {
  __device__ __forceinline__ RowState operator()(const RowState& a, const RowState& b) const {
    // Plain values and selects only (no references into a or b: they would force a stack frame).
    if (a.arg < 0 || b.arg < 0) {
      // A side with nothing above -inf contributes its sum (0, or NaN) unchanged.
      const bool keep_b = a.arg < 0;
      return {keep_b ? b.m : a.m, a.s + b.s, keep_b ? b.arg : a.arg};
    }
    const bool b_wins = b.m > a.m || (b.m == a.m && b.arg < a.arg);
    const float hi_m = b_wins ? b.m : a.m, lo_m = b_wins ? a.m : b.m;
    const float hi_s = b_wins ? b.s : a.s, lo_s = b_wins ? a.s : b.s;
    return {hi_m, hi_s + lo_s * fast_exp2((lo_m - hi_m) * kLog2e), b_wins ? b.arg : a.arg};
  }
};

struct AddOp {
  template <typename V>
  __device__ __forceinline__ V operator()(const V& a, const V& b) const {
    return a + b;
  }
};

struct MergeProb {
  __device__ __forceinline__ ProbRowSums<float> operator()(const ProbRowSums<float>& a,
                                                          const ProbRowSums<float>& b) const {
    return auxfuse::prob_row_sums_merge(a, b);
  }
};

__device__ __forceinline__ float shfl_xor(float v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ double shfl_xor(double v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ int shfl_xor(int v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ long long shfl_xor(long long v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ RowState shfl_xor(const RowState& v, int o) {
  return {shfl_xor(v.m, o), shfl_xor(v.s, o), shfl_xor(v.arg, o)};
}
__device__ __forceinline__ ProbRowSums<float> shfl_xor(const ProbRowSums<float>& v, int o) {
  return {shfl_xor(v.weighted_target, o), shfl_xor(v.weighted_target_logit, o), shfl_xor(v.weighted_logit, o),
          shfl_xor(v.target_max, o), static_cast<int64_t>(shfl_xor(static_cast<long long>(v.target_argmax), o))};
}

// Butterfly over the warp: every lane ends with the same value (the ops are commutative).
template <typename V, typename Op>
__device__ __forceinline__ V warp_allreduce(V v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = op(v, shfl_xor(v, o));
  return v;
}

// Scratch for block reductions: 32 warps x the largest reduced value.
struct alignas(16) ReduceScratch {
  unsigned char bytes[32 * 32];
};

// Every thread of the block gets the same value; smem is reusable right after (leading barrier).
template <int BLOCK, typename V, typename Op>
__device__ __forceinline__ V block_allreduce(V v, Op op, ReduceScratch& scratch) {
  static_assert(sizeof(V) <= 32, "scratch slot too small");
  constexpr int kWarps = BLOCK / 32;
  V* slots = reinterpret_cast<V*>(scratch.bytes);
  v = warp_allreduce(v, op);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) slots[threadIdx.x / 32] = v;
  __syncthreads();
  V r = slots[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = op(r, slots[w]);
  return r;
}

// Reduce over the G threads that own one row.
template <int G, int BLOCK, typename V, typename Op>
__device__ __forceinline__ V group_allreduce(V v, Op op, ReduceScratch& scratch) {
  if constexpr (G == 1) {
    return v;
  } else if constexpr (G == 32) {
    return warp_allreduce(v, op);
  } else {
    static_assert(G == BLOCK, "a group is a thread, a warp or the block");
    return block_allreduce<BLOCK>(v, op, scratch);
  }
}

// ------------------------------------------------------------------------------------------------
// Row scans (one head, one row; this thread's share of the classes)
// ------------------------------------------------------------------------------------------------

// Class-index targets. x: the row (class c at x[c * cs]; groups of G > 1 threads only see contiguous
// classes, cs == 1). Adds this thread's classes to st and, when need_xs, sum_c w_c x_c to xs.
template <typename T, int G>
__device__ __forceinline__ void scan_row_index(const T* __restrict__ x, int64_t cs, int C, int lane, bool need_xs,
                                               const float* __restrict__ cw, RowState& st, float& xs) {
  if constexpr (G > 1) {
    constexpr int V = Vec<T>::kVec;
    constexpr int U = 4;  // vectors in flight per thread
    const int shift = vector_shift<T>(x, C);
    if (lane < shift) {
      const float v[1] = {load_float(x + lane)};
      if (need_xs) xs += (cw ? cw[lane] : 1.f) * v[0];
      state_add<1>(st, v, lane, 1);
    }
    const int nvec = (C - shift) / V;
    const uint4* __restrict__ xv = reinterpret_cast<const uint4*>(x + shift);
    for (int v0 = lane; v0 < nvec; v0 += U * G) {
      uint4 raw[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (v0 + u * G < nvec) raw[u] = __ldg(xv + v0 + u * G);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int vi = v0 + u * G;
        if (vi < nvec) {
          float f[V];
          Vec<T>::unpack(raw[u], f);
          const int c0 = shift + vi * V;
          if (need_xs) {
#pragma unroll
            for (int k = 0; k < V; ++k) xs += (cw ? cw[c0 + k] : 1.f) * f[k];
          }
          state_add<V>(st, f, c0, 1);
        }
      }
    }
    for (int c = shift + nvec * V + lane; c < C; c += G) {
      const float v[1] = {load_float(x + c)};
      if (need_xs) xs += (cw ? cw[c] : 1.f) * v[0];
      state_add<1>(st, v, c, 1);
    }
  } else {
    // J chunks of K per iteration: J * K loads in flight (a whole row of up to 24 classes, e.g. VOC's 21,
    // in one round trip), padding (-inf) only in the last chunk.
    constexpr int K = 8, J = 3;
    for (int c0 = lane; c0 < C; c0 += J * K * G) {
      float f[J][K];
#pragma unroll
      for (int j = 0; j < J; ++j) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const int c = c0 + (j * K + k) * G;
          f[j][k] = c < C ? load_float(x + static_cast<int64_t>(c) * cs) : -INFINITY;
        }
      }
#pragma unroll
      for (int j = 0; j < J; ++j) {
        const int cj = c0 + j * K * G;
        if (cj < C) {
          if (need_xs) {
#pragma unroll
            for (int k = 0; k < K; ++k) {
              const int c = cj + k * G;
              if (c < C) xs += (cw ? cw[c] : 1.f) * f[j][k];
            }
          }
          state_add<K>(st, f[j], cj, G);
        }
      }
    }
  }
}

// Probability targets (scalar loads): logits x and target t (class c at t[c * ts]).
template <typename T, int G>
__device__ __forceinline__ void scan_row_prob(const T* __restrict__ x, int64_t cs, const T* __restrict__ t,
                                              int64_t ts, int C, int lane, const float* __restrict__ cw,
                                              RowState& st, ProbRowSums<float>& ps) {
  constexpr int K = 4;
  for (int c0 = lane; c0 < C; c0 += K * G) {
    float f[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = c0 + k * G;
      f[k] = c < C ? load_float(x + static_cast<int64_t>(c) * cs) : -INFINITY;
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c = c0 + k * G;
      if (c < C) {
        auxfuse::prob_row_sums_add(ps, f[k], load_float(t + static_cast<int64_t>(c) * ts), cw ? cw[c] : 1.f,
                                   static_cast<int64_t>(c));
      }
    }
    state_add<K>(st, f, c0, G);
  }
}

// sum_c w_c * t'_c of a probability-target row (this thread's share).
template <typename T, int G>
__device__ __forceinline__ float scan_target_weight(const T* __restrict__ t, int64_t ts, int C, int lane,
                                                    const float* __restrict__ cw, float eps) {
  float acc = 0.f;
  const float smooth = eps / static_cast<float>(C);
  for (int c = lane; c < C; c += G) {
    const float tv = (1.f - eps) * load_float(t + static_cast<int64_t>(c) * ts) + smooth;
    acc += (cw ? cw[c] : 1.f) * tv;
  }
  return acc;
}

// Gradient writers. Index targets: g_c = p_c * A - B * w_c - [c == y] * Ty (everything already scaled).
template <typename T, int G>
__device__ __forceinline__ void write_row_index(const T* __restrict__ x, int64_t cs, T* __restrict__ g, int64_t gs,
                                                int C, int lane, float lseL, float A, float B, float Ty, int y,
                                                const float* __restrict__ cw) {
  auto grad_of = [&](float xv, int c) {
    const float p = fast_exp2(fmaf(xv, kLog2e, -lseL));
    float v = fmaf(p, A, -(cw ? B * cw[c] : B));
    if (c == y) v -= Ty;  // p * A - Ty in fp32, rounded once below
    return v;
  };
  if (G > 1 && cs == 1 && gs == 1 && vector_shift<T>(x, C) == vector_shift<T>(g, C)) {  // the usual case
    constexpr int V = Vec<T>::kVec;
    constexpr int U = 4;
    const int shift = vector_shift<T>(x, C);
    if (lane < shift) g[lane] = to_scalar<T>(grad_of(load_float(x + lane), lane));
    const int nvec = (C - shift) / V;
    const uint4* __restrict__ xv = reinterpret_cast<const uint4*>(x + shift);
    uint4* __restrict__ gv = reinterpret_cast<uint4*>(g + shift);
    for (int v0 = lane; v0 < nvec; v0 += U * G) {
      uint4 raw[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (v0 + u * G < nvec) raw[u] = __ldg(xv + v0 + u * G);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int vi = v0 + u * G;
        if (vi < nvec) {
          float f[V];
          Vec<T>::unpack(raw[u], f);
          const int c0 = shift + vi * V;
#pragma unroll
          for (int k = 0; k < V; ++k) f[k] = grad_of(f[k], c0 + k);
          __stcs(gv + vi, Vec<T>::pack(f));  // streaming: the gradient is not read again soon
        }
      }
    }
    for (int c = shift + nvec * V + lane; c < C; c += G) g[c] = to_scalar<T>(grad_of(load_float(x + c), c));
  } else {
    constexpr int K = (G == 1) ? 16 : 8;  // a thread per row: more loads in flight
    for (int c0 = lane; c0 < C; c0 += K * G) {
      float f[K];
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int c = c0 + k * G;
        f[k] = c < C ? load_float(x + static_cast<int64_t>(c) * cs) : 0.f;
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int c = c0 + k * G;
        if (c < C) g[static_cast<int64_t>(c) * gs] = to_scalar<T>(grad_of(f[k], c));
      }
    }
  }
}

// Probability targets: g_c = scale * (p_c * lse_coef - w_c * ((1 - eps) t_c + eps / C)).
template <typename T, int G>
__device__ __forceinline__ void write_row_prob(const T* __restrict__ x, int64_t cs, const T* __restrict__ t,
                                               int64_t ts, T* __restrict__ g, int64_t gs, int C, int lane,
                                               float lseL, float lse_coef, float scale, float eps,
                                               const float* __restrict__ cw) {
  const float smooth = eps / static_cast<float>(C);
  for (int c = lane; c < C; c += G) {
    const float xv = load_float(x + static_cast<int64_t>(c) * cs);
    const float tv = (1.f - eps) * load_float(t + static_cast<int64_t>(c) * ts) + smooth;
    const float p = fast_exp2(fmaf(xv, kLog2e, -lseL));
    const float v = fmaf(p, lse_coef, -(cw ? cw[c] : 1.f) * tv);
    g[static_cast<int64_t>(c) * gs] = to_scalar<T>(v * scale);
  }
}

// One head's gradient row for a class-index target: `sc` is head weight x the row's scale (0 for an ignored
// row), `lse` the row's log-sum-exp. A row with an invalid target gets NaN (never an out-of-bounds read).
template <typename T, int G>
__device__ __forceinline__ void write_index_grad(const T* __restrict__ x, int64_t cs, T* __restrict__ g, int64_t gs,
                                                 int C, int lane, float lse, bool bad, int y,
                                                 const RowCoeffs<float>& k, float sc,
                                                 const float* __restrict__ cw_smooth) {
  const float A = bad ? NAN : sc * k.lse_coef;
  write_row_index<T, G>(x, cs, g, gs, C, lane, lse * kLog2e, A, sc * k.smooth_coef, sc * k.target_coef, y,
                        cw_smooth);
}

// ------------------------------------------------------------------------------------------------
// Kernels
// ------------------------------------------------------------------------------------------------

struct CommonParams {
  const void* heads[kMaxHeads];
  float head_weight[kMaxHeads];
  int H;
  int C;
  int64_t S;
  int64_t R;                      // rows: N * S
  int64_t sN, sC, sS;             // the heads' strides (elements)
  const int64_t* target;          // class indices (N, S), or nullptr
  int64_t tN, tS;
  const void* ptarget;            // probabilities (N, C, S), or nullptr
  int64_t pN, pC, pS;
  const float* class_weight;      // (C,) or nullptr
  float eps;
  int64_t ignore_index;
  int reduction;
};

struct ForwardParams {
  CommonParams p;
  float* lse;          // grad_mode 2: (H, R), else nullptr
  void* grad;          // grad_mode 1: (H, N, C, S) with strides gH, gN, gC, gS, else nullptr
  int64_t gH, gN, gC, gS;
  const float* denom_in;  // grad_mode 1 with mean: the denominator from the pre-pass, else nullptr
  float* loss_rows;    // (R,) for reduction none, else nullptr
  float* loss;         // () for mean / sum
  float* head_losses;  // (H,)
  int64_t* head_correct;
  int64_t* count;
  int64_t* invalid;
  float* denom;
  float* part_f;       // [(H + 1) x grid]: per-head loss sums, then denom
  long long* part_i;   // [(H + 2) x grid]: per-head hits, then count, then invalid rows
  unsigned int* ticket;
};

struct BackwardParams {
  CommonParams p;
  void* grad;                      // (H, N, C, S) with strides gH, gN, gC, gS
  int64_t gH, gN, gC, gS;
  const float* lse;                // (H, R)
  const float* grad_loss;          // () or (N, S) with strides glN, glS
  int64_t glN, glS;
  const float* denom;              // ()
};

__device__ __forceinline__ void split_row(int64_t r, int64_t S, int64_t& n, int64_t& s) {
  if (S == 1) {
    n = r;
    s = 0;
  } else if (r <= 0xffffffffLL && S <= 0xffffffffLL) {
    const uint32_t q = static_cast<uint32_t>(r) / static_cast<uint32_t>(S);
    n = q;
    s = r - static_cast<int64_t>(q) * S;
  } else {
    n = r / S;
    s = r - n * S;
  }
}

// sum_c w_c over the class weights cw (C,) (every thread of the block gets it, the same in every block); C
// without weights.
template <int BLOCK>
__device__ __forceinline__ float class_weight_sum(const float* __restrict__ cw, int C, ReduceScratch& scratch) {
  if (cw == nullptr) return static_cast<float>(C);
  float acc = 0.f;
  for (int c = threadIdx.x; c < C; c += BLOCK) acc += cw[c];
  return block_allreduce<BLOCK>(acc, AddOp{}, scratch);
}

template <int BLOCK>
__device__ __forceinline__ float class_weight_sum(const CommonParams& p, ReduceScratch& scratch) {
  return class_weight_sum<BLOCK>(p.class_weight, p.C, scratch);
}

struct RowTarget {
  int y;          // class index when in range, else -1
  int y_read;     // class index used for reads: y when in range, else 0
  bool counted;   // not ignore_index
  bool bad;       // counted but outside [0, C)
  float w_y;      // class weight of the target (0 when not counted)
};

// The row's class index y of a head with C classes and class weights cw (or nullptr).
__device__ __forceinline__ RowTarget row_target(int64_t y, int C, const float* __restrict__ cw, int64_t ignore_index) {
  RowTarget rt;
  rt.counted = y != ignore_index;
  const bool in_range = y >= 0 && y < C;
  rt.bad = rt.counted && !in_range;
  rt.y = in_range ? static_cast<int>(y) : -1;
  rt.y_read = in_range ? static_cast<int>(y) : 0;
  rt.w_y = !rt.counted ? 0.f : (cw ? cw[rt.y_read] : 1.f);
  return rt;
}

__device__ __forceinline__ RowTarget read_row_target(const CommonParams& p, int64_t n, int64_t s) {
  return row_target(p.target[n * p.tN + s * p.tS], p.C, p.class_weight, p.ignore_index);
}

// One head's row in the forward: loss and hit (both on the group's leader only, 0 elsewhere) and log-sum-exp (every
// thread); with GRAD, the row's gradient written to grow (class stride gC). x: the row's logits (class stride cs);
// trow: the probability target's row (class stride tC), or nullptr for the class index in rt; cw: class weights or
// nullptr; W: their sum (C without). With GRAD the gradient row grad_row() (class stride gC) is written, scaled by
// grad_scale x head_weight() (the reduction's scale, 1 / denom for mean, times the head's weight). Both are
// callables evaluated only after the scan, so that nothing more than the caller's own state stays live in
// registers across the streaming loops (tests/test_cuda_codegen.py checks that no spill reaches them).
struct RowResult {
  float loss;
  bool hit;
  float m, s;  // the row's max and sum of exp(x - max): log-sum-exp m + log(s)
};

template <typename T, int G, int BLOCK, bool GRAD, typename WeightFn, typename GradRowFn>
__device__ __forceinline__ RowResult forward_row(const T* __restrict__ x, int64_t cs, int C, int lane,
                                                 const RowTarget& rt, const T* __restrict__ trow, int64_t tC,
                                                 const float* __restrict__ cw, float W, float eps, float grad_scale,
                                                 const WeightFn& head_weight, const GradRowFn& grad_row,
                                                 int64_t gC, ReduceScratch& scratch) {
  const bool leader = lane == 0;
  const bool need_xs = eps != 0.f;
  RowState st = state_empty();
  RowResult res{0.f, false, 0.f, 0.f};
  if (trow == nullptr) {
    float xs = 0.f;
    scan_row_index<T, G>(x, cs, C, lane, need_xs, cw, st, xs);
    st = group_allreduce<G, BLOCK>(st, MergeState{}, scratch);
    if (need_xs) xs = group_allreduce<G, BLOCK>(xs, AddOp{}, scratch);
    const RowCoeffs<float> k = auxfuse::index_target_coeffs<float>(rt.w_y, W, eps, C);
    if (leader && rt.counted) {
      const SoftmaxState<float> ss{st.m, st.s, static_cast<int64_t>(st.arg)};
      const float x_y = load_float(x + static_cast<int64_t>(rt.y_read) * cs);
      res.loss = rt.bad ? NAN
                        : auxfuse::index_target_row_loss<float>(ss, auxfuse::log_acc(ss.sum), x_y - st.m, xs, W, k);
      res.hit = !rt.bad && st.arg == rt.y;
    }
    if constexpr (GRAD) {  // the row was just read: the second read comes from L1 / L2
      const float sc = rt.counted ? grad_scale * head_weight() : 0.f;
      write_index_grad<T, G>(x, cs, grad_row(), gC, C, lane, st.m + __logf(st.s), rt.bad, rt.y, k, sc,
                             need_xs ? cw : nullptr);
    }
  } else {
    ProbRowSums<float> ps = auxfuse::prob_row_sums_empty<float>();
    scan_row_prob<T, G>(x, cs, trow, tC, C, lane, cw, st, ps);
    st = group_allreduce<G, BLOCK>(st, MergeState{}, scratch);
    ps = group_allreduce<G, BLOCK>(ps, MergeProb{}, scratch);
    const float lse_coef = auxfuse::prob_target_lse_coef<float>(ps, W, eps, C);
    if (leader) {
      const SoftmaxState<float> ss{st.m, st.s, static_cast<int64_t>(st.arg)};
      res.loss = auxfuse::prob_target_row_loss<float>(ss, auxfuse::log_acc(ss.sum), ps, lse_coef, eps, C);
      res.hit = st.arg >= 0 && st.arg == ps.target_argmax;
    }
    if constexpr (GRAD) {
      write_row_prob<T, G>(x, cs, trow, tC, grad_row(), gC, C, lane, (st.m + __logf(st.s)) * kLog2e, lse_coef,
                           grad_scale * head_weight(), eps, cw);
    }
  }
  res.m = st.m;
  res.s = st.s;
  return res;
}

// 64 registers at most: 1024 resident threads per SM, enough 16-byte loads in flight for HBM.
template <int BLOCK>
constexpr int min_blocks() {
  return 1024 / BLOCK;
}

// Thread-per-row kernels keep 16 (backward) or 24 (forward) loads in flight per thread: up to 80 registers,
// 768 threads per SM; the others 64 registers, 1024 threads per SM.
template <int G, int BLOCK>
constexpr int kernel_min_blocks() {
  return G == 1 ? 3 : min_blocks<BLOCK>();
}

// GRAD: grad_mode 1 (writes fp.grad); a kernel of its own, so the others keep their registers for the scans.
template <typename T, int G, int BLOCK, bool GRAD>
__global__ void __launch_bounds__(BLOCK, kernel_min_blocks<G, BLOCK>()) multihead_ce_forward_kernel(const ForwardParams fp) {
  constexpr int kGroups = BLOCK / G;
  constexpr int kWarps = BLOCK / 32;
  __shared__ ReduceScratch scratch;
  __shared__ float red_f[kMaxHeads + 1][kWarps];
  __shared__ long long red_i[kMaxHeads + 2][kWarps];
  __shared__ double fin_f[kMaxHeads + 1];
  __shared__ long long fin_i[kMaxHeads + 2];
  __shared__ bool is_last;

  const CommonParams& p = fp.p;
  const int64_t cs = G == 1 ? p.sC : 1;  // the host picks G > 1 only for contiguous classes
  const int tid = threadIdx.x;
  const int lane = tid % G;
  const int group = tid / G;
  const bool leader = lane == 0;
  const int C = p.C;
  const bool prob = p.ptarget != nullptr;
  const float eps = p.eps;
  const float W = (eps != 0.f) ? class_weight_sum<BLOCK>(p, scratch) : static_cast<float>(C);
  // grad_mode 1: the gradient of a counted row is scaled by head weight x (1 / denom for mean), known from
  // the pre-pass; backward then only multiplies by grad_output.
  T* const grad = static_cast<T*>(fp.grad);
  const float grad_scale =
      GRAD && p.reduction == auxfuse::kReductionMean ? __fdiv_rn(1.f, *fp.denom_in) : 1.f;

  // Per-thread partials (only group leaders add to them).
  float acc_loss[kMaxHeads];
  int acc_hits[kMaxHeads];
#pragma unroll
  for (int h = 0; h < kMaxHeads; ++h) {
    acc_loss[h] = 0.f;
    acc_hits[h] = 0;
  }
  float acc_denom = 0.f;
  int acc_count = 0;
  int acc_invalid = 0;

  const int64_t stride = static_cast<int64_t>(gridDim.x) * kGroups;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kGroups + group; r < p.R; r += stride) {
    int64_t n, s;
    split_row(r, p.S, n, s);
    const int64_t off = n * p.sN + s * p.sS;
    RowTarget rt{-1, 0, true, false, 1.f};
    const T* trow = nullptr;
    if (prob) {
      trow = static_cast<const T*>(p.ptarget) + n * p.pN + s * p.pS;
    } else {
      rt = read_row_target(p, n, s);
    }
    float weighted_row_loss = 0.f;
    for (int h = 0; h < p.H; ++h) {
      const T* x = static_cast<const T*>(p.heads[h]) + off;
      const RowResult res = forward_row<T, G, BLOCK, GRAD>(
          x, cs, C, lane, rt, trow, p.pC, p.class_weight, W, eps, grad_scale, [&] { return p.head_weight[h]; },
          [&] { return grad + h * fp.gH + n * fp.gN + s * fp.gS; }, fp.gC, scratch);
      const float loss = res.loss;
      const bool hit = res.hit;
      if (leader) {
        acc_loss[h] += loss;
        acc_hits[h] += hit ? 1 : 0;
        weighted_row_loss += p.head_weight[h] * loss;
        if (fp.lse != nullptr) fp.lse[h * p.R + r] = res.m + __logf(res.s);
      }
    }
    if (leader) {
      if (rt.counted) {
        acc_count += 1;
        acc_denom += rt.w_y;
      }
      acc_invalid += rt.bad ? 1 : 0;
      if (fp.loss_rows != nullptr) fp.loss_rows[r] = weighted_row_loss;
    }
  }

  // Block partials: per warp (butterfly), then warps in order. Slots q <= H hold floats and integers,
  // slot H + 1 (invalid rows) an integer only.
  const int warp = tid / 32, wl = tid % 32;
  for (int q = 0; q <= p.H + 1; ++q) {
    const long long mine = q < p.H ? acc_hits[q] : (q == p.H ? acc_count : acc_invalid);
    const long long vi = warp_allreduce(mine, AddOp{});
    if (wl == 0) red_i[q][warp] = vi;
    if (q <= p.H) {
      const float vf = warp_allreduce(q < p.H ? acc_loss[q] : acc_denom, AddOp{});
      if (wl == 0) red_f[q][warp] = vf;
    }
  }
  __syncthreads();
  const int grid = gridDim.x;
  if (tid <= p.H + 1) {
    long long si = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) si += red_i[tid][w];
    fp.part_i[static_cast<int64_t>(tid) * grid + blockIdx.x] = si;
  }
  if (tid <= p.H) {
    float sf = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sf += red_f[tid][w];
    fp.part_f[static_cast<int64_t>(tid) * grid + blockIdx.x] = sf;
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) is_last = atomicAdd(fp.ticket, 1u) == static_cast<unsigned int>(grid - 1);
  __syncthreads();
  if (!is_last) return;
  __threadfence();

  // The last block: every quantity summed over the blocks in block order.
  for (int q = warp; q <= p.H + 1; q += kWarps) {
    double sf = 0.0;
    long long si = 0;
    for (int b = wl; b < grid; b += 32) {
      if (q <= p.H) sf += static_cast<double>(__ldcg(fp.part_f + static_cast<int64_t>(q) * grid + b));
      si += __ldcg(fp.part_i + static_cast<int64_t>(q) * grid + b);
    }
    sf = warp_allreduce(sf, AddOp{});
    si = warp_allreduce(si, AddOp{});
    if (wl == 0) {
      if (q <= p.H) fin_f[q] = sf;
      fin_i[q] = si;
    }
  }
  __syncthreads();
  if (tid == 0) {
    // With a pre-pass (grad_mode 1, mean) its denominator, the one the gradient used, is already in place.
    const float denom = fp.denom_in != nullptr ? *fp.denom_in : static_cast<float>(fin_f[p.H]);
    *fp.denom = denom;
    *fp.count = static_cast<int64_t>(fin_i[p.H]);
    *fp.invalid = static_cast<int64_t>(fin_i[p.H + 1]);
    float total = 0.f;
    for (int h = 0; h < p.H; ++h) {
      const float head_sum = static_cast<float>(fin_f[h]);
      fp.head_correct[h] = static_cast<int64_t>(fin_i[h]);
      fp.head_losses[h] = p.reduction == auxfuse::kReductionSum ? head_sum : __fdiv_rn(head_sum, denom);
      total = fmaf(p.head_weight[h], head_sum, total);
    }
    if (fp.loss == nullptr) {
      // the pre-pass: denominator and count only
    } else if (p.reduction == auxfuse::kReductionSum) {
      *fp.loss = total;
    } else if (p.reduction == auxfuse::kReductionMean) {
      *fp.loss = __fdiv_rn(total, denom);  // 0 / 0 = NaN when every row is ignored, as in PyTorch
    }
    *fp.ticket = 0u;  // ready for the next launch on this stream
  }
}

template <typename T, int G, int BLOCK>
__global__ void __launch_bounds__(BLOCK, kernel_min_blocks<G, BLOCK>()) multihead_ce_backward_kernel(const BackwardParams bp) {
  constexpr int kGroups = BLOCK / G;
  __shared__ ReduceScratch scratch;
  const CommonParams& p = bp.p;
  const int64_t cs = G == 1 ? p.sC : 1;  // the host picks G > 1 only for contiguous classes
  const int tid = threadIdx.x;
  const int lane = tid % G;
  const int group = tid / G;
  const int C = p.C;
  const bool prob = p.ptarget != nullptr;
  const float eps = p.eps;
  const float W = (eps != 0.f) ? class_weight_sum<BLOCK>(p, scratch) : static_cast<float>(C);
  // Class weights enter the gradient of index targets only through the smoothing term.
  const float* cw_smooth = eps != 0.f ? p.class_weight : nullptr;

  float scalar_scale = 0.f;
  if (p.reduction != auxfuse::kReductionNone) {
    scalar_scale = bp.grad_loss[0];
    if (p.reduction == auxfuse::kReductionMean) scalar_scale = __fdiv_rn(scalar_scale, bp.denom[0]);
  }
  T* grad = static_cast<T*>(bp.grad);

  const int64_t stride = static_cast<int64_t>(gridDim.x) * kGroups;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kGroups + group; r < p.R; r += stride) {
    int64_t n, s;
    split_row(r, p.S, n, s);
    const int64_t off = n * p.sN + s * p.sS;
    const int64_t goff = n * bp.gN + s * bp.gS;
    float row_scale = p.reduction == auxfuse::kReductionNone ? bp.grad_loss[n * bp.glN + s * bp.glS] : scalar_scale;
    if (!prob) {
      const RowTarget rt = read_row_target(p, n, s);
      if (!rt.counted) row_scale = 0.f;  // exactly zero, also when every row is ignored (denom 0)
      const RowCoeffs<float> k = auxfuse::index_target_coeffs<float>(rt.w_y, W, eps, C);
      for (int h = 0; h < p.H; ++h) {
        write_index_grad<T, G>(static_cast<const T*>(p.heads[h]) + off, cs, grad + h * bp.gH + goff, bp.gC, C,
                               lane, bp.lse[h * p.R + r], rt.bad, rt.y, k, row_scale * p.head_weight[h],
                               cw_smooth);
      }
    } else {
      const T* trow = static_cast<const T*>(p.ptarget) + n * p.pN + s * p.pS;
      float lse_coef = scan_target_weight<T, G>(trow, p.pC, C, lane, p.class_weight, eps);
      lse_coef = group_allreduce<G, BLOCK>(lse_coef, AddOp{}, scratch);
      for (int h = 0; h < p.H; ++h) {
        const float sc = row_scale * p.head_weight[h];
        const float lseL = bp.lse[h * p.R + r] * kLog2e;
        write_row_prob<T, G>(static_cast<const T*>(p.heads[h]) + off, cs, trow, p.pC, grad + h * bp.gH + goff,
                             bp.gC, C, lane, lseL, lse_coef, sc, eps, p.class_weight);
      }
    }
  }
}

// Backward of grad_mode 1: g *= grad_output in place, unless grad_output is exactly 1 (loss.backward()),
// which every block finds out on the device and returns at once: no host sync, no pass over the gradient.
// g is dense: n elements from a 16-byte aligned start (a fresh allocation).
template <typename T>
__global__ void __launch_bounds__(kScaleBlock) scale_grad_kernel(T* __restrict__ g, int64_t n,
                                                                  const float* __restrict__ grad_loss) {
  const float scale = *grad_loss;
  if (scale == 1.f) return;
  constexpr int V = Vec<T>::kVec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kScaleBlock;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kScaleBlock + threadIdx.x;
  uint4* __restrict__ gv = reinterpret_cast<uint4*>(g);
  for (int64_t i = first; i < n / V; i += stride) {
    float f[V];
    Vec<T>::unpack(gv[i], f);
#pragma unroll
    for (int k = 0; k < V; ++k) f[k] *= scale;
    gv[i] = Vec<T>::pack(f);
  }
  for (int64_t i = n / V * V + first; i < n; i += stride) g[i] = to_scalar<T>(load_float(g + i) * scale);
}

// ------------------------------------------------------------------------------------------------
// One target per head (multihead_ce_per_head_forward): heads of their own N, C, S, target and class weights
// (deep supervision, multi-token, multi-task heads), one launch for all of them.
//
// The heads are described by the head table, HeadDesc<T, float> (multihead_ce.h), copied to the device, and the
// work by a list of work items: (heads, first row, row count), stored as spans of equal items (WorkSpan) so the
// list is O(H) bytes whatever the rows. Blocks take items grid-stride (item i goes to block i % grid), so a big
// head and a small one are spread over the whole grid in proportion to their size. Within an item a group
// of G threads owns one row at a time, as in the forward kernel (same row machinery: forward_row). For mean /
// sum an item covers one head; for none every head (they then share N and S) and a group sums the row's
// weighted losses over the heads in head order, so loss_rows gets one writer per row and a fixed order.
//
// Partials: every block owns one column of the workspace (per head: loss sum, denominator, hits, count, invalid
// rows), zeroes it, and adds to it (thread 0, after a fixed-order block reduction) whenever the head it works on
// changes; the last block (ticket) sums the columns in block order, in double, as the forward kernel does.
// ------------------------------------------------------------------------------------------------

// Items item_begin .. item_begin + ceil(rows / rows_per_item) - 1: heads [head_begin, head_end), which all have
// `rows` rows; item i covers rows [(i - item_begin) * rows_per_item, ...) of each of them.
struct WorkSpan {
  int64_t item_begin;
  int64_t rows;
  int64_t rows_per_item;
  int head_begin;
  int head_end;
};

struct PerHeadParams {
  const void* table;           // HeadDesc<T, float>[H], on the device. grad_scale holds w_h: the kernel divides
                               // by the pre-pass's denominator (denom_in) for mean; weight_sum is C, the kernel
                               // sums class weights itself (the host cannot read them without a sync).
  const WorkSpan* spans;       // on the device, item_begin increasing
  int num_spans;
  int H;
  float eps;
  int64_t ignore_index;
  int reduction;
  bool denom_only;             // the pre-pass of grad_mode 1 + mean: reads the targets only, writes denom
  const float* denom_in;       // (H,): the pre-pass's denominators (grad_mode 1 + mean), else nullptr
  float* loss_rows;            // (N * S,) for none, else nullptr
  float* loss;                 // () for mean / sum, else nullptr
  float* head_losses;          // (H,), nullptr in the pre-pass
  int64_t* head_correct;       // (H,)
  int64_t* count;              // (H,)
  float* denom;                // (H,)
  int64_t* invalid;            // ()
  float* part_f;               // [2H x grid]: per head loss sum, denominator
  long long* part_i;           // [3H x grid]: per head hits, count, invalid rows
  unsigned int* ticket;
};

template <typename T, int G, int BLOCK, bool GRAD>
__global__ void __launch_bounds__(BLOCK, kernel_min_blocks<G, BLOCK>())
    multihead_ce_per_head_kernel(const PerHeadParams pp) {
  using Desc = auxfuse::HeadDesc<T, float>;
  constexpr int kGroups = BLOCK / G;
  constexpr int kWarps = BLOCK / 32;
  __shared__ ReduceScratch scratch;
  __shared__ Desc d;  // the head being worked on
  __shared__ float red_f[2][kWarps];
  __shared__ long long red_i[3][kWarps];
  __shared__ long long fin_invalid[kWarps];
  __shared__ bool is_last;

  const int tid = threadIdx.x;
  const int lane = tid % G;
  const int group = tid / G;
  const bool leader = lane == 0;
  const int warp = tid / 32, wl = tid % 32;
  const int grid = gridDim.x;
  const int H = pp.H;
  const float eps = pp.eps;
  const Desc* __restrict__ table = static_cast<const Desc*>(pp.table);

  // This block's column of the partials; made visible to thread 0 by the barriers of the first flush.
  for (int q = tid; q < 2 * H; q += BLOCK) pp.part_f[static_cast<int64_t>(q) * grid + blockIdx.x] = 0.f;
  for (int q = tid; q < 3 * H; q += BLOCK) pp.part_i[static_cast<int64_t>(q) * grid + blockIdx.x] = 0;

  // Per-thread partials of head `pending` (only group leaders add to them).
  float acc_loss = 0.f, acc_denom = 0.f;
  int acc_hits = 0, acc_count = 0, acc_invalid = 0;
  int pending = -1;
  // Block-uniform: per warp (butterfly), then warps in order, added to the block's column by thread 0.
  auto flush = [&]() {
    const float lf = warp_allreduce(acc_loss, AddOp{});
    const float df = warp_allreduce(acc_denom, AddOp{});
    const long long hi = warp_allreduce(static_cast<long long>(acc_hits), AddOp{});
    const long long ci = warp_allreduce(static_cast<long long>(acc_count), AddOp{});
    const long long ii = warp_allreduce(static_cast<long long>(acc_invalid), AddOp{});
    if (wl == 0) {
      red_f[0][warp] = lf;
      red_f[1][warp] = df;
      red_i[0][warp] = hi;
      red_i[1][warp] = ci;
      red_i[2][warp] = ii;
    }
    __syncthreads();
    if (tid == 0) {
      float sl = 0.f, sd = 0.f;
      long long sh = 0, sc = 0, si = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        sl += red_f[0][w];
        sd += red_f[1][w];
        sh += red_i[0][w];
        sc += red_i[1][w];
        si += red_i[2][w];
      }
      const int64_t b = blockIdx.x;
      pp.part_f[(2 * static_cast<int64_t>(pending)) * grid + b] += sl;
      pp.part_f[(2 * static_cast<int64_t>(pending) + 1) * grid + b] += sd;
      pp.part_i[(3 * static_cast<int64_t>(pending)) * grid + b] += sh;
      pp.part_i[(3 * static_cast<int64_t>(pending) + 1) * grid + b] += sc;
      pp.part_i[(3 * static_cast<int64_t>(pending) + 2) * grid + b] += si;
    }
    __syncthreads();
    acc_loss = acc_denom = 0.f;
    acc_hits = acc_count = acc_invalid = 0;
  };

  // Items blockIdx.x, blockIdx.x + grid, ... in increasing order, span by span (no search for an item's span).
  for (int j = 0; j < pp.num_spans; ++j) {
    const WorkSpan sp = pp.spans[j];
    const int64_t span_end = sp.item_begin + (sp.rows + sp.rows_per_item - 1) / sp.rows_per_item;
    const int64_t skip = (static_cast<int64_t>(blockIdx.x) - sp.item_begin % grid + grid) % grid;
    for (int64_t item = sp.item_begin + skip; item < span_end; item += grid) {
      const int64_t first = (item - sp.item_begin) * sp.rows_per_item;
      const int64_t end = first + sp.rows_per_item < sp.rows ? first + sp.rows_per_item : sp.rows;
      for (int h = sp.head_begin; h < sp.head_end; ++h) {
        if (h != pending) {
          if (pending >= 0) flush();
          pending = h;
        }
        __syncthreads();  // every thread is done with the previous head's description
        if (tid == 0) d = table[h];
        __syncthreads();
        const int C = static_cast<int>(d.C);
        const int64_t cs = G == 1 ? d.sC : 1;  // the host picks G > 1 only when every head has contiguous classes
        const bool prob = d.t != nullptr;
        const float W = !pp.denom_only && eps != 0.f ? class_weight_sum<BLOCK>(d.cw, C, scratch)
                                                     : static_cast<float>(C);
        // The gradient's scale: 1 / the head's denominator (mean) here, times d.grad_scale (w_h) in forward_row.
        const float grad_scale =
            GRAD && pp.reduction == auxfuse::kReductionMean ? __fdiv_rn(1.f, pp.denom_in[h]) : 1.f;
        const float head_weight = d.weight;
        for (int64_t r = first + group; r < end; r += kGroups) {
          int64_t n, s;
          split_row(r, d.S, n, s);
          RowTarget rt{-1, 0, true, false, 1.f};
          const T* trow = nullptr;
          if (prob) {
            trow = d.t + n * d.tN + s * d.tS;
          } else {
            // A target_resize position outside the target (checked here, not on the host: no sync) is an
            // invalid target, as row_target makes a counted class index outside [0, C).
            rt = d.target_in_range(s) ? row_target(d.y[d.target_offset(n, s)], C, d.cw, pp.ignore_index)
                                      : RowTarget{-1, 0, true, true, d.cw ? d.cw[0] : 1.f};
          }
          float loss = 0.f;
          bool hit = false;
          if (!pp.denom_only) {
            const RowResult res = forward_row<T, G, BLOCK, GRAD>(
                d.x + n * d.sN + s * d.sS, cs, C, lane, rt, trow, d.tC, d.cw, W, eps, grad_scale,
                [&] { return d.grad_scale; }, [&] { return d.grad + n * d.gN + s * d.gS; }, d.gC, scratch);
            loss = res.loss;
            hit = res.hit;
          }
          if (leader) {
            acc_loss += loss;
            acc_hits += hit ? 1 : 0;
            if (rt.counted) {
              acc_count += 1;
              acc_denom += rt.w_y;
            }
            acc_invalid += rt.bad ? 1 : 0;
            if (pp.loss_rows != nullptr) {  // none: this group owns row r of every head of the item
              const float before = h == sp.head_begin ? 0.f : pp.loss_rows[r];
              pp.loss_rows[r] = before + head_weight * loss;
            }
          }
        }
      }
    }
  }
  if (pending >= 0) flush();

  __threadfence();
  __syncthreads();
  if (tid == 0) is_last = atomicAdd(pp.ticket, 1u) == static_cast<unsigned int>(grid - 1);
  __syncthreads();
  if (!is_last) return;
  __threadfence();

  // The last block: a warp per head sums the head's columns in block order.
  long long invalid = 0;
  for (int h = warp; h < H; h += kWarps) {
    double sl = 0.0, sd = 0.0;
    long long sh = 0, sc = 0, si = 0;
    for (int b = wl; b < grid; b += 32) {
      sl += static_cast<double>(__ldcg(pp.part_f + (2 * static_cast<int64_t>(h)) * grid + b));
      sd += static_cast<double>(__ldcg(pp.part_f + (2 * static_cast<int64_t>(h) + 1) * grid + b));
      sh += __ldcg(pp.part_i + (3 * static_cast<int64_t>(h)) * grid + b);
      sc += __ldcg(pp.part_i + (3 * static_cast<int64_t>(h) + 1) * grid + b);
      si += __ldcg(pp.part_i + (3 * static_cast<int64_t>(h) + 2) * grid + b);
    }
    sl = warp_allreduce(sl, AddOp{});
    sd = warp_allreduce(sd, AddOp{});
    sh = warp_allreduce(sh, AddOp{});
    sc = warp_allreduce(sc, AddOp{});
    si = warp_allreduce(si, AddOp{});
    invalid += si;
    if (wl == 0) {
      // With a pre-pass (grad_mode 1, mean) its denominator, the one the gradient used, is already in place.
      const float denom = pp.denom_in != nullptr ? pp.denom_in[h] : static_cast<float>(sd);
      if (pp.denom_in == nullptr) pp.denom[h] = denom;
      pp.count[h] = static_cast<int64_t>(sc);
      pp.head_correct[h] = static_cast<int64_t>(sh);
      if (pp.head_losses != nullptr) {
        const float head_sum = static_cast<float>(sl);
        pp.head_losses[h] = pp.reduction == auxfuse::kReductionSum ? head_sum : __fdiv_rn(head_sum, denom);
      }
    }
  }
  if (wl == 0) fin_invalid[warp] = invalid;
  __syncthreads();
  if (tid == 0) {
    long long total_invalid = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total_invalid += fin_invalid[w];
    *pp.invalid = static_cast<int64_t>(total_invalid);
    if (pp.loss != nullptr) {
      // Each head's mean over its own denominator (0 / 0 = NaN for a head with no counted row, as in PyTorch).
      float total = 0.f;
      for (int h = 0; h < H; ++h) total = fmaf(table[h].weight, pp.head_losses[h], total);
      *pp.loss = total;
    }
    *pp.ticket = 0u;  // ready for the next launch on this stream
  }
}

#ifdef AUXFUSE_KERNELS_ONLY
#define AUXFUSE_INSTANTIATE(T, G, B)                                                            \
  template __global__ void multihead_ce_forward_kernel<T, G, B, false>(const ForwardParams);      \
  template __global__ void multihead_ce_forward_kernel<T, G, B, true>(const ForwardParams);       \
  template __global__ void multihead_ce_backward_kernel<T, G, B>(const BackwardParams);          \
  template __global__ void multihead_ce_per_head_kernel<T, G, B, false>(const PerHeadParams);     \
  template __global__ void multihead_ce_per_head_kernel<T, G, B, true>(const PerHeadParams);
AUXFUSE_INSTANTIATE(float, 1, kThreadBlock)
AUXFUSE_INSTANTIATE(float, 32, kWarpBlock)
AUXFUSE_INSTANTIATE(float, kRowBlock, kRowBlock)
AUXFUSE_INSTANTIATE(c10::BFloat16, 1, kThreadBlock)
AUXFUSE_INSTANTIATE(c10::BFloat16, 32, kWarpBlock)
AUXFUSE_INSTANTIATE(c10::BFloat16, kRowBlock, kRowBlock)
AUXFUSE_INSTANTIATE(c10::Half, 1, kThreadBlock)
AUXFUSE_INSTANTIATE(c10::Half, 32, kWarpBlock)
AUXFUSE_INSTANTIATE(c10::Half, kRowBlock, kRowBlock)
template __global__ void scale_grad_kernel<float>(float*, int64_t, const float*);
template __global__ void scale_grad_kernel<c10::BFloat16>(c10::BFloat16*, int64_t, const float*);
template __global__ void scale_grad_kernel<c10::Half>(c10::Half*, int64_t, const float*);
}  // namespace auxfuse_cuda
#else

// ------------------------------------------------------------------------------------------------
// Host side: checks, mapping, parameters, outputs. The launches go through a Launcher: CudaLauncher below, or
// the CPU-thread emulation in tests/cuda_emulation/emulate.cpp, so both run this same host logic.
// ------------------------------------------------------------------------------------------------

enum class Mapping { kThread, kWarp, kBlock };

// Calls f(G, BLOCK) with the mapping's threads per row and per block as std::integral_constant: each launcher
// (CudaLauncher below, the emulation's) instantiates a kernel for the three mappings through this one switch.
template <typename F>
void with_mapping(Mapping m, F&& f) {
  switch (m) {
    case Mapping::kThread:
      f(std::integral_constant<int, 1>{}, std::integral_constant<int, kThreadBlock>{});
      break;
    case Mapping::kWarp:
      f(std::integral_constant<int, 32>{}, std::integral_constant<int, kWarpBlock>{});
      break;
    case Mapping::kBlock:
      f(std::integral_constant<int, kRowBlock>{}, std::integral_constant<int, kRowBlock>{});
      break;
  }
}

// Calls f(GRAD) with the run-time flag as std::integral_constant: the forward and per-head kernels take whether
// they write the gradient as a template argument (both launchers instantiate both through this one branch).
template <typename F>
void with_grad(bool grad, F&& f) {
  if (grad) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

inline Mapping choose_mapping(int64_t C, int64_t class_stride) {
  const bool classes_contiguous = C == 1 || class_stride == 1;
  if (!classes_contiguous || C < kThreadMaxClasses) return Mapping::kThread;
  return C <= kWarpMaxClasses ? Mapping::kWarp : Mapping::kBlock;
}

inline int rows_per_block(Mapping m) {
  switch (m) {
    case Mapping::kThread:
      return kThreadBlock;
    case Mapping::kWarp:
      return kWarpBlock / 32;
    default:
      return 1;
  }
}

inline int grid_for(int64_t rows, Mapping m, int max_blocks) {
  const int64_t per_block = rows_per_block(m);
  const int64_t units = (rows + per_block - 1) / per_block;
  return static_cast<int>(std::min<int64_t>(units, max_blocks));
}

inline void check_kernel_limits(at::TensorList heads, const auxfuse::ProblemShape& shape) {
  const auto dtype = heads[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "auxfuse: the CUDA kernels take float32, float16 or bfloat16 logits, not ", dtype);
  TORCH_CHECK(shape.heads <= kMaxHeads, "auxfuse: the CUDA kernels take at most ", kMaxHeads, " heads, got ",
              shape.heads);
  TORCH_CHECK(shape.classes < (int64_t{1} << 30), "auxfuse: too many classes for the CUDA kernels: ",
              shape.classes);
}

inline CommonParams make_common(at::TensorList heads, const auxfuse::ProblemShape& shape, const at::Tensor& target,
                                const c10::optional<at::Tensor>& class_weight, at::ArrayRef<double> head_weights,
                                int64_t ignore_index, double label_smoothing, int64_t reduction) {
  CommonParams p{};
  const at::Tensor& h0 = heads[0];
  for (int64_t h = 0; h < shape.heads; ++h) {
    p.heads[h] = heads[h].data_ptr();
    p.head_weight[h] = static_cast<float>(head_weights[h]);
  }
  p.H = static_cast<int>(shape.heads);
  p.C = static_cast<int>(shape.classes);
  p.S = shape.spatial;
  p.R = shape.rows();
  p.sN = h0.stride(0);
  p.sC = h0.stride(1);
  p.sS = h0.stride(2);
  if (shape.prob_target) {
    p.ptarget = target.data_ptr();
    p.pN = target.stride(0);
    p.pC = target.stride(1);
    p.pS = target.stride(2);
  } else {
    p.target = target.data_ptr<int64_t>();
    p.tN = target.stride(0);
    p.tS = target.stride(1);
  }
  p.class_weight = class_weight.has_value() ? class_weight->data_ptr<float>() : nullptr;
  p.eps = static_cast<float>(label_smoothing);
  p.ignore_index = ignore_index;
  p.reduction = static_cast<int>(reduction);
  return p;
}

template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(float{});
      break;
    case at::kHalf:
      fn(c10::Half{});
      break;
    case at::kBFloat16:
      fn(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, "auxfuse: unsupported dtype ", dtype);
  }
}

using auxfuse::ForwardResult;

// Launcher: unsigned int* ticket(const at::TensorOptions&, at::Tensor& holder) (a zeroed counter);
// template <typename T> void forward(Mapping, int grid, const ForwardParams&); likewise backward.
template <typename Launcher>
ForwardResult forward_impl(Launcher& launcher, at::TensorList heads_in, const at::Tensor& target_in,
                           const c10::optional<at::Tensor>& class_weight, at::ArrayRef<double> head_weights,
                           int64_t ignore_index, double label_smoothing, int64_t reduction, int64_t grad_mode) {
  const auxfuse::RowViews rows = auxfuse::as_row_views(heads_in, target_in);
  const at::TensorList heads = rows.heads;
  const at::Tensor& target = rows.target;
  const auxfuse::ProblemShape shape = auxfuse::check_inputs(heads, target, class_weight, head_weights, reduction);
  check_kernel_limits(heads, shape);
  const at::Tensor& h0 = heads[0];
  auxfuse::ForwardOutputs out = auxfuse::allocate_forward_outputs(heads, shape, reduction, grad_mode, nullptr);

  if (shape.rows() == 0) {
    // No rows: no launch. As PyTorch: mean is 0 / 0 = NaN, sum is 0, every count 0.
    const double empty = reduction == auxfuse::kReductionSum ? 0.0 : std::numeric_limits<double>::quiet_NaN();
    if (reduction != auxfuse::kReductionNone) out.loss.fill_(empty);
    out.head_losses.fill_(empty);
    out.head_correct.zero_();
    out.count.zero_();
    out.invalid.zero_();
    out.denom.zero_();
    return out.result(heads_in, grad_mode);
  }

  const Mapping mapping = choose_mapping(shape.classes, h0.stride(1));
  // grad_mode 1, a block per row: one block per SM, so that the rows being read (one each) stay in L2 until
  // their second read, which writes the gradient (2 blocks per SM would keep 2 x 132 rows of up to 512 KB).
  const int max_blocks = grad_mode == auxfuse::kGradInForward && mapping == Mapping::kBlock
                             ? std::min(kMaxForwardBlocks, launcher.sm_count())
                             : kMaxForwardBlocks;
  const int grid = grid_for(shape.rows(), mapping, max_blocks);
  // grad_mode 1 with mean: a pre-pass over the targets (the forward kernel with no heads) computes the
  // denominator the gradient is divided by, before the gradient is written.
  const bool pre_pass = grad_mode == auxfuse::kGradInForward && reduction == auxfuse::kReductionMean;
  const int pre_grid = pre_pass ? grid_for(shape.rows(), Mapping::kThread, kMaxForwardBlocks) : 0;
  const int64_t blocks = std::max(grid, pre_grid);
  const int64_t int_slots = (shape.heads + 2) * blocks, float_slots = (shape.heads + 1) * blocks;
  // One allocation for the partials of both launches (stream-ordered), never zeroed (every block writes its
  // own): int64 first, then float.
  const int64_t workspace_bytes = int_slots * static_cast<int64_t>(sizeof(long long)) +
                                  float_slots * static_cast<int64_t>(sizeof(float));
  at::Tensor workspace = at::empty({workspace_bytes}, h0.options().dtype(at::kByte));
  at::Tensor ticket_holder;

  ForwardParams fp{};
  fp.p = make_common(heads, shape, target, class_weight, head_weights, ignore_index, label_smoothing, reduction);
  fp.lse = grad_mode == auxfuse::kSaveLse ? out.saved.data_ptr<float>() : nullptr;
  if (grad_mode == auxfuse::kGradInForward) {
    fp.grad = out.saved.data_ptr();
    fp.gH = out.saved.stride(0);
    fp.gN = out.saved.stride(1);
    fp.gC = out.saved.stride(2);
    fp.gS = out.saved.stride(3);
  }
  fp.loss_rows = reduction == auxfuse::kReductionNone ? out.loss.data_ptr<float>() : nullptr;
  fp.loss = reduction == auxfuse::kReductionNone ? nullptr : out.loss.data_ptr<float>();
  fp.head_losses = out.head_losses.data_ptr<float>();
  fp.head_correct = out.head_correct.data_ptr<int64_t>();
  fp.count = out.count.data_ptr<int64_t>();
  fp.invalid = out.invalid.data_ptr<int64_t>();
  fp.denom = out.denom.data_ptr<float>();
  fp.part_i = reinterpret_cast<long long*>(workspace.data_ptr());
  fp.part_f = reinterpret_cast<float*>(fp.part_i + int_slots);
  fp.ticket = launcher.ticket(h0.options(), ticket_holder);  // both launches: each leaves it at 0

  dispatch_dtype(h0.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    if (pre_pass) {
      ForwardParams pre = fp;
      pre.p.H = 0;
      pre.lse = nullptr;
      pre.grad = nullptr;
      pre.loss = nullptr;
      pre.loss_rows = nullptr;
      launcher.template forward<T>(Mapping::kThread, pre_grid, pre);
      fp.denom_in = out.denom.data_ptr<float>();
    }
    launcher.template forward<T>(mapping, grid, fp);
  });
  return out.result(heads_in, grad_mode);
}

template <typename Launcher>
at::Tensor backward_impl(Launcher& launcher, const at::Tensor& grad_loss, at::TensorList heads_in,
                         const at::Tensor& target_in, const c10::optional<at::Tensor>& class_weight,
                         at::ArrayRef<double> head_weights, int64_t ignore_index, double label_smoothing,
                         int64_t reduction, const at::Tensor& lse, const at::Tensor& denom) {
  const auxfuse::RowViews rows = auxfuse::as_row_views(heads_in, target_in);
  const at::TensorList heads = rows.heads;
  const at::Tensor& target = rows.target;
  const auxfuse::ProblemShape shape = auxfuse::check_inputs(heads, target, class_weight, head_weights, reduction);
  check_kernel_limits(heads, shape);
  const at::Tensor& h0 = heads[0];
  TORCH_CHECK(lse.device() == h0.device() && lse.scalar_type() == at::kFloat && lse.dim() == 3 &&
                  lse.size(0) == shape.heads && lse.size(1) == shape.batch && lse.size(2) == shape.spatial,
              "auxfuse: lse must be the forward's (H, N, S) float32 log-sum-exp; got ", lse.sizes());
  TORCH_CHECK(denom.device() == h0.device() && denom.numel() == 1,
              "auxfuse: denom must be the forward's scalar denominator");
  if (reduction == auxfuse::kReductionNone) {
    TORCH_CHECK(grad_loss.dim() == 2 && grad_loss.size(0) == shape.batch && grad_loss.size(1) == shape.spatial,
                "auxfuse: grad_loss of reduction none must be (N, S); got ", grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, "auxfuse: grad_loss of a reduced loss must have one element; got ",
                grad_loss.sizes());
  }
  TORCH_CHECK(grad_loss.device() == h0.device(), "auxfuse: grad_loss is on ", grad_loss.device());

  at::Tensor grads = auxfuse::allocate_head_grads(heads, nullptr);
  if (shape.rows() == 0) return auxfuse::grads_in_head_shape(grads, heads_in);

  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor denom_f = denom.to(at::kFloat);
  const at::Tensor grad_f = grad_loss.to(at::kFloat);  // no copy when already float32 (keeps expanded strides)

  const Mapping mapping = choose_mapping(shape.classes, h0.stride(1));
  const int grid = grid_for(shape.rows(), mapping, kMaxBackwardBlocks);

  BackwardParams bp{};
  bp.p = make_common(heads, shape, target, class_weight, head_weights, ignore_index, label_smoothing, reduction);
  bp.grad = grads.data_ptr();
  bp.gH = grads.stride(0);
  bp.gN = grads.stride(1);
  bp.gC = grads.stride(2);
  bp.gS = grads.stride(3);
  bp.lse = lse_c.data_ptr<float>();
  bp.grad_loss = grad_f.data_ptr<float>();
  if (reduction == auxfuse::kReductionNone) {
    bp.glN = grad_f.stride(0);
    bp.glS = grad_f.stride(1);
  }
  bp.denom = denom_f.data_ptr<float>();

  dispatch_dtype(h0.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launcher.template backward<T>(mapping, grid, bp);
  });
  return auxfuse::grads_in_head_shape(grads, heads_in);
}

// grads *= grad_loss (a one-element tensor), in place, unless it is 1; read on the device.
template <typename Launcher>
void scale_grad_impl(Launcher& launcher, const at::Tensor& grads, const at::Tensor& grad_loss) {
  TORCH_CHECK(grads.is_non_overlapping_and_dense() && grad_loss.numel() == 1 &&
                  grad_loss.device() == grads.device(),
              "auxfuse: scale_grad_ takes a dense gradient and a one-element grad_output on its device");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(grads.data_ptr()) % 16 == 0, "auxfuse: scale_grad_ needs a 16-byte "
              "aligned gradient (the forward's own allocation)");
  if (grads.numel() == 0) return;
  const at::Tensor grad_f = grad_loss.to(at::kFloat);
  dispatch_dtype(grads.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const int64_t vectors = (grads.numel() + Vec<T>::kVec - 1) / Vec<T>::kVec;  // one per thread and step
    const int grid = static_cast<int>(std::min<int64_t>((vectors + kScaleBlock - 1) / kScaleBlock,
                                                        static_cast<int64_t>(launcher.sm_count()) * kScaleBlocksPerSM));
    launcher.template scale<T>(grid, static_cast<T*>(grads.data_ptr()), grads.numel(), grad_f.data_ptr<float>());
  });
}

// ------------------------------------------------------------------------------------------------
// One target per head: host side of multihead_ce_per_head_kernel
// ------------------------------------------------------------------------------------------------

using auxfuse::PerHeadResult;

constexpr int kItemsPerBlock = 4;  // items per block (about) above which items grow past one row per group

// The work items of one launch as spans (see WorkSpan): for mean / sum a span per head with rows, for none one
// span of every head. Items are `groups` rows (one per group of the block) while that makes at most
// kItemsPerBlock x max_blocks items; else each item holds about the same number of logits, so that the
// blocks (which take items round-robin) get equal shares whatever the heads' sizes and class counts.
inline std::vector<WorkSpan> make_work_spans(const std::vector<int64_t>& rows, const std::vector<int64_t>& classes,
                                             bool every_head_per_item, int groups, int max_blocks, int64_t& items) {
  struct Run {
    int head_begin, head_end;
    int64_t rows, classes;  // classes read per row (every head's for none)
  };
  std::vector<Run> runs;
  const int H = static_cast<int>(rows.size());
  if (every_head_per_item) {
    int64_t total_classes = 0;
    for (int64_t c : classes) total_classes += c;
    if (rows[0] > 0) runs.push_back({0, H, rows[0], total_classes});
  } else {
    for (int h = 0; h < H; ++h) {
      if (rows[h] > 0) runs.push_back({h, h + 1, rows[h], classes[h]});
    }
  }
  const int64_t target_items = static_cast<int64_t>(kItemsPerBlock) * max_blocks;
  int64_t small_items = 0;
  double logits = 0.0;
  for (const Run& run : runs) {
    small_items += (run.rows + groups - 1) / groups;
    logits += static_cast<double>(run.rows) * static_cast<double>(run.classes);
  }
  const double logits_per_item = logits / static_cast<double>(target_items);
  std::vector<WorkSpan> spans;
  items = 0;
  for (const Run& run : runs) {
    int64_t per_group = 1;  // rows per group and item
    if (small_items > target_items) {
      const double k = logits_per_item / (static_cast<double>(groups) * static_cast<double>(run.classes));
      per_group = std::max<int64_t>(1, static_cast<int64_t>(std::min(k, 1e15)));
    }
    const int64_t rows_per_item = std::min(per_group * groups, run.rows);
    spans.push_back({items, run.rows, rows_per_item, run.head_begin, run.head_end});
    items += (run.rows + rows_per_item - 1) / rows_per_item;
  }
  return spans;
}

// Launcher (as forward_impl) plus: at::Tensor host_bytes(int64_t) (a host buffer, pinned for CUDA),
// at::Tensor upload(const at::Tensor& host, const at::Device&) (one asynchronous copy to the device), and
// template <typename T> void per_head(Mapping, int grid, const PerHeadParams&).
template <typename Launcher>
PerHeadResult per_head_forward_impl(Launcher& launcher, at::TensorList heads_in, at::TensorList targets_in,
                                    const c10::List<std::optional<at::Tensor>>& target_positions,
                                    const c10::List<std::optional<at::Tensor>>& class_weights,
                                    at::ArrayRef<double> head_weights, int64_t ignore_index, double label_smoothing,
                                    int64_t reduction, int64_t grad_mode) {
  // Checks and (N, C, S) views as on CPU (ops_common.h), then the CUDA kernels' own limits per head.
  const auxfuse::PerHeadViews v =
      auxfuse::check_per_head_inputs(heads_in, targets_in, target_positions, class_weights, head_weights, reduction,
                                     grad_mode);
  const int64_t H = static_cast<int64_t>(v.heads.size());
  TORCH_CHECK(H <= std::numeric_limits<int>::max() / 4, "auxfuse: too many heads: ", H);
  for (int64_t h = 0; h < H; ++h) {
    try {
      check_kernel_limits({v.heads[h]}, v.shapes[h]);
    } catch (const c10::Error& e) {  // the same message, naming the head
      std::string message = e.msg();
      const std::string prefix = "auxfuse: ";
      if (message.compare(0, prefix.size(), prefix) == 0) message.erase(0, prefix.size());
      TORCH_CHECK(false, "auxfuse: head ", h, ": ", message);
    }
  }
  const std::vector<at::Tensor>& heads = v.heads;
  const std::vector<at::Tensor>& targets = v.targets;
  const std::vector<auxfuse::ProblemShape>& shapes = v.shapes;
  const bool none = reduction == auxfuse::kReductionNone;
  const at::Tensor& h0_in = heads_in[0];
  // Outputs as on CPU: the acc dtype is float32 (the CUDA kernels take float32, float16 and bfloat16 heads).
  const auxfuse::PerHeadOutputs out = auxfuse::allocate_per_head_outputs(heads_in, v, reduction, grad_mode, nullptr);
  const at::Tensor &loss = out.loss, &head_losses = out.head_losses, &head_correct = out.head_correct;
  const at::Tensor &count = out.count, &denom = out.denom, &invalid = out.invalid;

  // The mapping, for the whole launch: a thread per row if any head has strided classes, else by the widest head.
  bool classes_contiguous = true;
  int64_t max_classes = 0;
  std::vector<int64_t> rows(H), classes(H);
  for (int64_t h = 0; h < H; ++h) {
    rows[h] = shapes[h].rows();
    classes[h] = shapes[h].classes;
    max_classes = std::max(max_classes, classes[h]);
    classes_contiguous = classes_contiguous && (classes[h] == 1 || heads[h].stride(1) == 1);
  }
  const Mapping mapping = choose_mapping(max_classes, classes_contiguous ? 1 : 0);
  const int max_blocks = grad_mode == auxfuse::kGradInForward && mapping == Mapping::kBlock
                             ? std::min(kMaxForwardBlocks, launcher.sm_count())
                             : kMaxForwardBlocks;
  int64_t items = 0;
  const std::vector<WorkSpan> spans = make_work_spans(rows, classes, none, rows_per_block(mapping), max_blocks, items);

  if (items == 0) {
    // No rows at all: no launch. As PyTorch: mean is 0 / 0 = NaN, sum is 0, every count 0.
    const double empty = reduction == auxfuse::kReductionSum ? 0.0 : std::numeric_limits<double>::quiet_NaN();
    if (!none) loss.fill_(empty);
    head_losses.fill_(empty);
    head_correct.zero_();
    count.zero_();
    denom.zero_();
    invalid.zero_();
    return out.result();
  }
  const int grid = static_cast<int>(std::min<int64_t>(items, max_blocks));
  // grad_mode 1 with mean: a pre-pass over the targets computes each head's denominator first.
  const bool pre_pass = grad_mode == auxfuse::kGradInForward && reduction == auxfuse::kReductionMean;
  int64_t pre_items = 0;
  const std::vector<WorkSpan> pre_spans =
      pre_pass ? make_work_spans(rows, std::vector<int64_t>(H, 1), false, rows_per_block(Mapping::kThread),
                                 kMaxForwardBlocks, pre_items)
               : std::vector<WorkSpan>{};
  const int pre_grid = static_cast<int>(std::min<int64_t>(pre_items, kMaxForwardBlocks));
  const int64_t blocks = std::max(grid, pre_grid);
  const int64_t int_slots = 3 * H * blocks, float_slots = 2 * H * blocks;
  at::Tensor workspace = at::empty({int_slots * static_cast<int64_t>(sizeof(long long)) +
                                        float_slots * static_cast<int64_t>(sizeof(float))},
                                   h0_in.options().dtype(at::kByte));
  at::Tensor ticket_holder;

  PerHeadParams pp{};
  pp.H = static_cast<int>(H);
  pp.eps = static_cast<float>(label_smoothing);
  pp.ignore_index = ignore_index;
  pp.reduction = static_cast<int>(reduction);
  pp.loss_rows = none ? loss.data_ptr<float>() : nullptr;
  pp.loss = none ? nullptr : loss.data_ptr<float>();
  pp.head_losses = head_losses.data_ptr<float>();
  pp.head_correct = head_correct.data_ptr<int64_t>();
  pp.count = count.data_ptr<int64_t>();
  pp.denom = denom.data_ptr<float>();
  pp.invalid = invalid.data_ptr<int64_t>();
  pp.part_i = reinterpret_cast<long long*>(workspace.data_ptr());
  pp.part_f = reinterpret_cast<float*>(pp.part_i + int_slots);
  pp.ticket = launcher.ticket(h0_in.options(), ticket_holder);  // both launches: each leaves it at 0

  dispatch_dtype(h0_in.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using Desc = auxfuse::HeadDesc<T, float>;
    // The head table and both span lists in one host buffer, copied to the device at once (no sync).
    const int64_t table_bytes = H * static_cast<int64_t>(sizeof(Desc));
    const int64_t spans_bytes = static_cast<int64_t>(sizeof(WorkSpan)) * static_cast<int64_t>(spans.size());
    const int64_t pre_bytes = static_cast<int64_t>(sizeof(WorkSpan)) * static_cast<int64_t>(pre_spans.size());
    static_assert(sizeof(Desc) % alignof(WorkSpan) == 0 && sizeof(WorkSpan) % alignof(WorkSpan) == 0);
    at::Tensor host = launcher.host_bytes(table_bytes + spans_bytes + pre_bytes);
    auto* bytes = static_cast<unsigned char*>(host.data_ptr());
    for (int64_t h = 0; h < H; ++h) {
      Desc desc{};
      auxfuse::describe_head_inputs(desc, heads[h], targets[h], v.positions[h], v.class_weights[h], head_weights[h],
                                    shapes[h].prob_target);
      desc.weight_sum = static_cast<float>(desc.C);  // with class weights: summed on the device
      desc.grad_scale = desc.weight;  // for mean: divided on the device by the pre-pass's denominator
      if (grad_mode == auxfuse::kGradInForward) {
        const at::Tensor& g = out.grads[h];  // in the head's shape, laid out like it
        desc.grad = static_cast<T*>(g.data_ptr());
        const std::array<int64_t, 3> strides = auxfuse::grad_row_strides(g);
        desc.gN = strides[0];
        desc.gC = strides[1];
        desc.gS = strides[2];
      }
      std::memcpy(bytes + h * sizeof(Desc), &desc, sizeof(Desc));
    }
    std::memcpy(bytes + table_bytes, spans.data(), spans_bytes);
    if (pre_bytes > 0) std::memcpy(bytes + table_bytes + spans_bytes, pre_spans.data(), pre_bytes);
    const at::Tensor device_table = launcher.upload(host, h0_in.device());
    const auto* base = static_cast<const unsigned char*>(device_table.data_ptr());
    pp.table = base;
    if (pre_pass) {
      PerHeadParams pre = pp;
      pre.spans = reinterpret_cast<const WorkSpan*>(base + table_bytes + spans_bytes);
      pre.num_spans = static_cast<int>(pre_spans.size());
      pre.denom_only = true;
      pre.loss = nullptr;
      pre.loss_rows = nullptr;
      pre.head_losses = nullptr;
      launcher.template per_head<T>(Mapping::kThread, pre_grid, pre, false);
      pp.denom_in = denom.data_ptr<float>();
    }
    pp.spans = reinterpret_cast<const WorkSpan*>(base + table_bytes);
    pp.num_spans = static_cast<int>(spans.size());
    launcher.template per_head<T>(mapping, grid, pp, grad_mode == auxfuse::kGradInForward);
  });
  return out.result();
}

#ifndef AUXFUSE_EMULATE

struct CudaLauncher {
  c10::cuda::CUDAGuard guard;
  c10::cuda::CUDAStream stream;

  explicit CudaLauncher(const at::Device& device) : guard(device), stream(c10::cuda::getCurrentCUDAStream()) {}

  // A zeroed ticket counter for the forward kernel's last-block detection. Outside graph capture: one
  // buffer per (device, stream), allocated and zeroed once, reset to 0 by every kernel that uses it
  // (launches on one stream are ordered; different streams never share one). During capture: a fresh
  // buffer from the graph's pool zeroed by a captured memset, so replays never share a counter with eager
  // launches or with other graphs.
  unsigned int* ticket(const at::TensorOptions& options, at::Tensor& holder) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &status));
    if (status != cudaStreamCaptureStatusNone) {
      holder = at::empty({1}, options.dtype(at::kInt));
      C10_CUDA_CHECK(cudaMemsetAsync(holder.data_ptr(), 0, sizeof(unsigned int), stream.stream()));
      return static_cast<unsigned int*>(holder.data_ptr());
    }
    static std::mutex mutex;
    static std::map<std::pair<int, int64_t>, unsigned int*> tickets;  // never freed: 4 bytes per stream
    std::lock_guard<std::mutex> lock(mutex);
    const auto key = std::make_pair(static_cast<int>(stream.device_index()), static_cast<int64_t>(stream.id()));
    auto it = tickets.find(key);
    if (it != tickets.end()) return it->second;
    void* ptr = c10::cuda::CUDACachingAllocator::raw_alloc_with_stream(sizeof(unsigned int), stream.stream());
    C10_CUDA_CHECK(cudaMemsetAsync(ptr, 0, sizeof(unsigned int), stream.stream()));
    auto* counter = static_cast<unsigned int*>(ptr);
    tickets.emplace(key, counter);
    return counter;
  }

  template <typename T>
  void forward(Mapping m, int grid, const ForwardParams& fp) {
    with_mapping(m, [&](auto g, auto block) {
      with_grad(fp.grad != nullptr, [&](auto write_grad) {
        multihead_ce_forward_kernel<T, g(), block(), write_grad()><<<grid, block(), 0, stream.stream()>>>(fp);
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // The per-head kernel's head table and work spans: a pinned host buffer, copied with one asynchronous copy
  // (the caching host allocator keeps the buffer until the copy is done; no host sync). During CUDA-graph capture
  // the graph's copy node reads the host buffer at every replay: the buffer is then kept for the process.
  at::Tensor host_bytes(int64_t n) {
    return at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  }

  at::Tensor upload(const at::Tensor& host, const at::Device& device) {
    at::Tensor on_device = host.to(device, /*non_blocking=*/true);
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &status));
    if (status != cudaStreamCaptureStatusNone) {
      static std::mutex mutex;
      static std::vector<at::Tensor> kept;  // a few hundred bytes per captured call
      std::lock_guard<std::mutex> lock(mutex);
      kept.push_back(host);
    }
    return on_device;
  }

  template <typename T>
  void per_head(Mapping m, int grid, const PerHeadParams& pp, bool grad) {
    with_mapping(m, [&](auto g, auto block) {
      with_grad(grad, [&](auto write_grad) {
        multihead_ce_per_head_kernel<T, g(), block(), write_grad()><<<grid, block(), 0, stream.stream()>>>(pp);
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  int sm_count() const {
    static std::mutex mutex;
    static std::map<int, int> counts;  // per device, asked once
    std::lock_guard<std::mutex> lock(mutex);
    const int device = stream.device_index();
    auto it = counts.find(device);
    if (it != counts.end()) return it->second;
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    counts.emplace(device, count);
    return count;
  }

  template <typename T>
  void scale(int grid, T* g, int64_t n, const float* grad_loss) {
    scale_grad_kernel<T><<<grid, kScaleBlock, 0, stream.stream()>>>(g, n, grad_loss);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename T>
  void backward(Mapping m, int grid, const BackwardParams& bp) {
    with_mapping(m, [&](auto g, auto block) {
      multihead_ce_backward_kernel<T, g(), block()><<<grid, block(), 0, stream.stream()>>>(bp);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

ForwardResult multihead_ce_forward_cuda(at::TensorList heads, const at::Tensor& target,
                                        const c10::optional<at::Tensor>& class_weight,
                                        at::ArrayRef<double> head_weights, int64_t ignore_index,
                                        double label_smoothing, int64_t reduction, int64_t grad_mode) {
  TORCH_CHECK(!heads.empty() && heads[0].is_cuda(), "auxfuse: the CUDA kernels need CUDA heads");
  CudaLauncher launcher(heads[0].device());
  return forward_impl(launcher, heads, target, class_weight, head_weights, ignore_index, label_smoothing,
                      reduction, grad_mode);
}

at::Tensor multihead_ce_backward_cuda(const at::Tensor& grad_loss, at::TensorList heads, const at::Tensor& target,
                                      const c10::optional<at::Tensor>& class_weight, at::ArrayRef<double> head_weights,
                                      int64_t ignore_index, double label_smoothing, int64_t reduction,
                                      const at::Tensor& lse, const at::Tensor& denom) {
  TORCH_CHECK(!heads.empty() && heads[0].is_cuda(), "auxfuse: the CUDA kernels need CUDA heads");
  CudaLauncher launcher(heads[0].device());
  return backward_impl(launcher, grad_loss, heads, target, class_weight, head_weights, ignore_index,
                       label_smoothing, reduction, lse, denom);
}

PerHeadResult multihead_ce_per_head_forward_cuda(at::TensorList heads, at::TensorList targets,
                                                const c10::List<std::optional<at::Tensor>>& target_positions,
                                                const c10::List<std::optional<at::Tensor>>& class_weights,
                                                at::ArrayRef<double> head_weights, int64_t ignore_index,
                                                double label_smoothing, int64_t reduction, int64_t grad_mode) {
  TORCH_CHECK(!heads.empty() && heads[0].is_cuda(), "auxfuse: the CUDA kernels need CUDA heads");
  CudaLauncher launcher(heads[0].device());
  return per_head_forward_impl(launcher, heads, targets, target_positions, class_weights, head_weights, ignore_index,
                               label_smoothing, reduction, grad_mode);
}

void multihead_ce_scale_grad_cuda(const at::Tensor& grads, const at::Tensor& grad_loss) {
  TORCH_CHECK(grads.is_cuda(), "auxfuse: the CUDA kernels need a CUDA gradient");
  CudaLauncher launcher(grads.device());
  scale_grad_impl(launcher, grads, grad_loss);
}

}  // namespace auxfuse_cuda

TORCH_LIBRARY_IMPL(auxfuse, CUDA, m) {
  m.impl("multihead_ce_forward", &auxfuse_cuda::multihead_ce_forward_cuda);
  m.impl("multihead_ce_per_head_forward", &auxfuse_cuda::multihead_ce_per_head_forward_cuda);
  m.impl("multihead_ce_backward", &auxfuse_cuda::multihead_ce_backward_cuda);
  m.impl("multihead_ce_scale_grad_", &auxfuse_cuda::multihead_ce_scale_grad_cuda);
}

#else  // AUXFUSE_EMULATE: the emulation's launcher and op registration live in emulate.cpp

}  // namespace auxfuse_cuda

#endif  // AUXFUSE_EMULATE
#endif  // AUXFUSE_KERNELS_ONLY
