// The CPU kernels of the auxfuse ops, registered once, from code compiled for the baseline.
//
// The fused kernel (multihead_ce.cpp) is compiled once per instruction-set level, as ATen compiles its own CPU
// kernels: for the baseline and, on x86-64, for AVX2 (multihead_ce_avx2.cpp) and AVX-512
// (multihead_ce_avx512.cpp). When the library loads, this file picks the best copy the process may run, by the
// level ATen chose for it (at::get_cpu_capability(): the CPU's, or the one ATEN_CPU_CAPABILITY asks for), so one
// build runs at full speed on an AVX-512 machine and still runs on a machine without AVX-512 or AVX2. A build for
// one machine (setup.py: AUXFUSE_CPU_ARCH=native) has a single copy, at the level of its flags, and runs that.
#include "cpu_capability.h"

#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <iterator>
#include <string>

#include "kernels.h"

#define AUXFUSE_STRINGIFY_(x) #x
#define AUXFUSE_STRINGIFY(x) AUXFUSE_STRINGIFY_(x)

namespace auxfuse {
namespace {

struct KernelCopy {
  const char* capability;  // its level, as at::get_cpu_capability() names it
  const CpuKernels* kernels;
};

// Best first. The last is the copy compiled with the build's own flags: the baseline (DEFAULT) unless the build
// is for one machine.
constexpr KernelCopy kCopies[] = {
#if defined(AUXFUSE_CPU_DISPATCH)  // setup.py: the portable x86-64 build
    {"AVX512", &AVX512::kKernels},
    {"AVX2", &AVX2::kKernels},
#endif
    {AUXFUSE_STRINGIFY(CPU_CAPABILITY), &CPU_CAPABILITY::kKernels},
};

// x86-64's levels in order; any other name (another architecture's) ranks with DEFAULT: only baseline code is
// known to run there.
int level_rank(const std::string& capability) {
  if (capability == "AVX512") return 2;
  if (capability == "AVX2") return 1;
  return 0;
}

const KernelCopy& chosen_copy() {
  static const KernelCopy& chosen = []() -> const KernelCopy& {
    const int process_level = level_rank(at::get_cpu_capability());
    for (const KernelCopy& copy : kCopies) {
      if (level_rank(copy.capability) <= process_level) return copy;
    }
    return kCopies[std::size(kCopies) - 1];  // a build for one machine asked to run below its level
  }();
  return chosen;
}

// The level of the copy that runs in this process: "AVX512", "AVX2" or "DEFAULT" (for tests and benchmarks).
std::string cpu_capability() { return chosen_copy().capability; }

// On CPU reading grad_loss costs nothing: skip the pass over the gradient when it is 1.
void scale_grad_cpu(const at::Tensor& grads, const at::Tensor& grad_loss) {
  TORCH_CHECK(grad_loss.numel() == 1, "auxfuse: scale_grad_ takes a one-element grad_output");
  if (grad_loss.item<double>() != 1.0) grads.mul_(grad_loss.to(grads.scalar_type()));
}

// The per-head op: checks and output allocation here, in baseline code (std::vector<at::Tensor> stays out of the
// per-level copies: see forward_per_head_cpu in multihead_ce.cpp), the kernel in the chosen copy.
PerHeadResult forward_per_head_cpu(at::TensorList heads, at::TensorList targets,
                                   const c10::List<c10::optional<at::Tensor>>& target_positions,
                                   const c10::List<c10::optional<at::Tensor>>& class_weights,
                                   at::ArrayRef<double> head_weights, int64_t ignore_index, double label_smoothing,
                                   int64_t reduction, int64_t grad_mode) {
  const PerHeadViews inputs =
      check_per_head_inputs(heads, targets, target_positions, class_weights, head_weights, reduction, grad_mode);
  TORCH_CHECK(inputs.heads[0].device().is_cpu(), "auxfuse: the CPU kernel got tensors on ", inputs.heads[0].device());
  const PerHeadOutputs outputs =
      allocate_per_head_outputs(heads, inputs, reduction, grad_mode, cpu_gradient_allocator());
  chosen_copy().kernels->forward_per_head(inputs, outputs, head_weights, ignore_index, label_smoothing, reduction);
  return outputs.result();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(auxfuse, m) { m.def("cpu_capability() -> str", &cpu_capability); }

TORCH_LIBRARY_IMPL(auxfuse, CPU, m) {
  const CpuKernels& kernels = *chosen_copy().kernels;
  m.impl("multihead_ce_forward", kernels.forward);
  m.impl("multihead_ce_backward", kernels.backward);
  m.impl("multihead_ce_per_head_forward", &forward_per_head_cpu);
  m.impl("multihead_ce_scale_grad_", &scale_grad_cpu);
}

}  // namespace auxfuse
