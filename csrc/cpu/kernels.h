// The entry points of one compiled copy of the fused CPU kernel (multihead_ce.cpp). Each copy defines its table,
// kKernels, in a namespace named after its instruction-set level; dispatch.cpp registers the one to run.
#pragma once

#include <ATen/ATen.h>

#include "ops_common.h"

namespace auxfuse {

struct CpuKernels {
  ForwardResult (*forward)(at::TensorList heads, const at::Tensor& target,
                           const c10::optional<at::Tensor>& class_weight, at::ArrayRef<double> head_weights,
                           int64_t ignore_index, double label_smoothing, int64_t reduction, int64_t grad_mode);
  at::Tensor (*backward)(const at::Tensor& grad_loss, at::TensorList heads, const at::Tensor& target,
                         const c10::optional<at::Tensor>& class_weight, at::ArrayRef<double> head_weights,
                         int64_t ignore_index, double label_smoothing, int64_t reduction, const at::Tensor& lse,
                         const at::Tensor& denom);
  // multihead_ce_per_head_forward on inputs checked and outputs allocated by dispatch.cpp.
  void (*forward_per_head)(const PerHeadViews& inputs, const PerHeadOutputs& outputs,
                           at::ArrayRef<double> head_weights, int64_t ignore_index, double label_smoothing,
                           int64_t reduction);
};

// Where the CPU kernels' gradients come from: large blocks are kept for the next step (gradient_cache.cpp).
at::Allocator* cpu_gradient_allocator();

namespace DEFAULT {
extern const CpuKernels kKernels;
}
namespace AVX2 {
extern const CpuKernels kKernels;
}
namespace AVX512 {
extern const CpuKernels kKernels;
}

}  // namespace auxfuse
