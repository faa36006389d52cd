// Just enough of CUDA to compile csrc/cuda/multihead_ce.cu as ordinary C++ and run its kernels on CPU
// threads: one OS thread per CUDA thread, blocks run one after another, __syncthreads is a barrier of the
// block, warp shuffles exchange through a buffer between two barriers of the warp. Slow, but it executes the
// kernels' own source: indexing, alignment prologues, reductions, the last-block epilogue, the ticket reset.
// Not covered: the GPU memory model, the precision of ex2.approx / lg2.approx (exact libm here).
#pragma once

#include <vector_functions.h>
#include <vector_types.h>

#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define AUXFUSE_EMULATE 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

namespace emu {
struct Dim3 {
  unsigned int x = 0, y = 0, z = 0;
};
struct BlockContext {
  explicit BlockContext(int threads) : block(threads) {
    for (int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
    buffers.resize(threads / 32);
  }
  std::barrier<> block;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<std::array<unsigned long long, 32>> buffers;
};
inline thread_local Dim3 thread_idx, block_idx, grid_dim, block_dim;
inline thread_local BlockContext* context = nullptr;

// Runs fn() as a grid of `grid` blocks of `threads` threads (threads a multiple of 32).
inline void launch(int grid, int threads, const std::function<void()>& fn) {
  for (int b = 0; b < grid; ++b) {
    BlockContext ctx(threads);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t, b] {
        thread_idx.x = t;
        block_idx.x = b;
        grid_dim.x = grid;
        block_dim.x = threads;
        context = &ctx;
        fn();
      });
    }
    for (auto& th : pool) th.join();
  }
}
}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define gridDim (::emu::grid_dim)
#define blockDim (::emu::block_dim)

inline void __syncthreads() { emu::context->block.arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
inline T __shfl_xor_sync(unsigned int, T v, int offset) {
  static_assert(sizeof(T) <= sizeof(unsigned long long), "shuffle of a wide type");
  const int lane = static_cast<int>(threadIdx.x % 32), warp = static_cast<int>(threadIdx.x / 32);
  auto& buffer = emu::context->buffers[warp];
  auto& bar = *emu::context->warps[warp];
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  buffer[lane] = bits;
  bar.arrive_and_wait();
  bits = buffer[lane ^ offset];
  bar.arrive_and_wait();
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}
template <typename T>
inline void __stcs(T* p, T v) {
  *p = v;
}
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline float __logf(float x) { return std::log(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
