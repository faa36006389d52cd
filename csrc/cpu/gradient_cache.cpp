// The cache of large CPU gradient buffers: cpu_gradient_allocator (kernels.h), where the CPU kernels' gradients
// come from (ops_common.h's allocate_head_grads).
//
// Why: glibc serves a block above its mmap threshold (at most 32 MiB) with a fresh mmap and gives it back with
// munmap, so the gradient of a large head is new memory on every training step: the kernel page-faults and zeroes
// every 4 KiB page the fused op writes, and unmaps it all again when the gradient is freed. On the 2-core VM of
// docs/benchmarks.md that was two thirds of the fused op on 4 x 2048 x 32000 fp32 heads (1 GiB of gradients): the
// op took 294 ms with fresh buffers and 67 ms without gradients, and freeing them took 42 ms more. CUDA has its
// caching allocator for this; CPU has none.
//
// A block of at least kMinBytes (rounded up to 2 MiB) comes from c10's CPU allocator (the user's, if one is set,
// and the profiler sees it) and, when the last tensor using it is freed, waits here to be handed out again for a
// request of the same rounded size (a training loop repeats its shapes). Bounds on what waits here:
// - a request that no waiting block fits (new shapes) first releases every waiting block, so the cache never
//   holds idle blocks of old shapes while new ones are allocated;
// - the waiting bytes never pass the limit (default a quarter of physical memory; AUXFUSE_CPU_CACHE_BYTES at
//   load, auxfuse.set_cpu_cache_limit; 0 turns the cache off), the longest-waiting block released first.
// auxfuse.empty_cpu_cache() releases them all; auxfuse.cpu_cache_info() reports.
#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <list>
#include <mutex>
#include <vector>

#include "kernels.h"

namespace auxfuse {
namespace {

// glibc mmaps every block of 32 MiB or more (its mmap threshold grows with use up to there); below, its heap reuses
// freed memory already, and idle blocks here would be memory the heap cannot give to other tensors.
constexpr size_t kMinBytes = size_t(32) << 20;
constexpr size_t kGranule = size_t(2) << 20;    // sizes rounded up to this, so nearby shapes share blocks

size_t default_limit() {
  const long pages = sysconf(_SC_PHYS_PAGES), page_size = sysconf(_SC_PAGESIZE);
  const size_t quarter = pages > 0 && page_size > 0 ? size_t(pages) * size_t(page_size) / 4 : 0;
  const char* env = std::getenv("AUXFUSE_CPU_CACHE_BYTES");
  if (env == nullptr) return quarter;
  char* end = nullptr;
  errno = 0;
  const unsigned long long bytes = std::strtoull(env, &end, 10);
  if (end != env && *end == '\0' && errno == 0 && env[0] != '-') return bytes;
  TORCH_WARN("auxfuse: AUXFUSE_CPU_CACHE_BYTES=", env, " is not a number of bytes; the CPU gradient cache keeps its "
             "default limit, ", quarter, " bytes");
  return quarter;
}

class GradientCache final : public c10::Allocator {
 public:
  struct Block {
    c10::DataPtr memory;  // from c10's CPU allocator
    size_t bytes;
  };

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinBytes) return c10::GetCPUAllocator()->allocate(nbytes);
    const size_t bytes = (nbytes + kGranule - 1) / kGranule * kGranule;
    Block* block = take(bytes);
    if (block == nullptr) block = new Block{c10::GetCPUAllocator()->allocate(bytes), bytes};
    return {block->memory.get(), block, &GradientCache::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  std::vector<int64_t> info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {int64_t(idle_bytes_), int64_t(idle_.size()), int64_t(limit_), hits_, misses_};
  }

  void set_limit(size_t limit) {
    std::vector<Block*> released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = limit;
      evict_to(limit_, released);
    }
    release(released);
  }

  void release_all() {
    std::vector<Block*> released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evict_to(0, released);
    }
    release(released);
  }

  static GradientCache& instance() {
    static GradientCache* cache = new GradientCache();  // never destroyed: tensors may outlive static destructors
    return *cache;
  }

 private:
  GradientCache() : limit_(default_limit()) {}

  // A waiting block of `bytes`, most recently freed first (its pages are the likeliest in cache); on a miss every
  // waiting block is released first.
  Block* take(size_t bytes) {
    std::vector<Block*> released;
    Block* found = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = idle_.rbegin(); it != idle_.rend(); ++it) {
        if ((*it)->bytes == bytes) {
          found = *it;
          idle_bytes_ -= bytes;
          idle_.erase(std::next(it).base());
          break;
        }
      }
      if (found) {
        ++hits_;
      } else {
        ++misses_;
        evict_to(0, released);
      }
    }
    release(released);
    return found;
  }

  static void give_back(void* context) {
    GradientCache& cache = instance();
    Block* block = static_cast<Block*>(context);
    std::vector<Block*> released;
    {
      std::lock_guard<std::mutex> lock(cache.mutex_);
      if (block->bytes <= cache.limit_) {
        cache.idle_.push_back(block);
        cache.idle_bytes_ += block->bytes;
        block = nullptr;
        cache.evict_to(cache.limit_, released);
      }
    }
    if (block) released.push_back(block);
    release(released);
  }

  // Under the lock: moves the longest-waiting blocks to `released` until at most `bytes` wait.
  void evict_to(size_t bytes, std::vector<Block*>& released) {
    while (idle_bytes_ > bytes) {
      Block* block = idle_.front();
      idle_.pop_front();
      idle_bytes_ -= block->bytes;
      released.push_back(block);
    }
  }

  // Outside the lock: freeing a large block is a munmap.
  static void release(const std::vector<Block*>& blocks) {
    for (Block* block : blocks) delete block;
  }

  std::mutex mutex_;
  std::list<Block*> idle_;  // oldest first
  size_t idle_bytes_ = 0;
  size_t limit_;
  int64_t hits_ = 0, misses_ = 0;
};

std::vector<int64_t> cpu_cache_info() { return GradientCache::instance().info(); }
void cpu_cache_empty() { GradientCache::instance().release_all(); }
void cpu_cache_set_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "auxfuse: the CPU cache limit is a number of bytes >= 0, not ", bytes);
  GradientCache::instance().set_limit(size_t(bytes));
}

}  // namespace

at::Allocator* cpu_gradient_allocator() { return &GradientCache::instance(); }

TORCH_LIBRARY_FRAGMENT(auxfuse, m) {
  GradientCache::instance();  // reads AUXFUSE_CPU_CACHE_BYTES now, when the library loads
  m.def("cpu_cache_info() -> int[]", &cpu_cache_info);
  m.def("cpu_cache_empty() -> ()", &cpu_cache_empty);
  m.def("cpu_cache_set_limit(int bytes) -> ()", &cpu_cache_set_limit);
}

}  // namespace auxfuse
