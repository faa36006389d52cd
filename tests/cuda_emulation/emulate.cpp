// The CUDA kernels of csrc/cuda/multihead_ce.cu, compiled as C++ and run on CPU threads (cuda_shim.h), behind
// ops of their own: torch.ops.auxfuse_emu.multihead_ce_forward / multihead_ce_backward on CPU tensors, with
// auxfuse's schemas (csrc/op_schemas.h). The host logic is the CUDA backend's own (forward_impl /
// backward_impl); only the launcher differs. The grid caps are lowered so that small problems exercise the
// grid-stride loops and a last block that sums several partials. Built and used by tests/test_cuda_emulated.py.
#define AUXFUSE_MAX_FORWARD_BLOCKS 3
#define AUXFUSE_MAX_BACKWARD_BLOCKS 2
#include "cuda_shim.h"
// clang-format off
#include "cuda/multihead_ce.cu"
// clang-format on
#include "op_schemas.h"

namespace auxfuse_cuda {

struct EmulatedLauncher {
  // One counter for the whole process, as the CUDA launcher keeps one per stream: every forward must leave it
  // at 0 for the next one.
  static unsigned int* counter() {
    static unsigned int value = 0;
    return &value;
  }

  unsigned int* ticket(const at::TensorOptions&, at::Tensor&) {
    TORCH_CHECK(*counter() == 0, "emulation: the ticket counter was not reset by the previous forward");
    return counter();
  }

  template <typename T>
  void forward(Mapping m, int grid, const ForwardParams& fp) {
    if (fp.grad != nullptr) {
      forward_kernel<T, true>(m, grid, fp);
    } else {
      forward_kernel<T, false>(m, grid, fp);
    }
    TORCH_CHECK(*counter() == 0, "emulation: the forward kernel left its ticket at ", *counter());
  }

  template <typename T, bool GRAD>
  void forward_kernel(Mapping m, int grid, const ForwardParams& fp) {
    switch (m) {
      case Mapping::kThread:
        emu::launch(grid, kThreadBlock, [&] { multihead_ce_forward_kernel<T, 1, kThreadBlock, GRAD>(fp); });
        break;
      case Mapping::kWarp:
        emu::launch(grid, kWarpBlock, [&] { multihead_ce_forward_kernel<T, 32, kWarpBlock, GRAD>(fp); });
        break;
      case Mapping::kBlock:
        emu::launch(grid, kRowBlock, [&] { multihead_ce_forward_kernel<T, kRowBlock, kRowBlock, GRAD>(fp); });
        break;
    }
  }

  // Few "SMs", so that grad_mode 1's one-block-per-SM grid strides too.
  int sm_count() const { return 2; }

  template <typename T>
  void scale(int grid, T* g, int64_t n, const float* grad_loss) {
    emu::launch(grid, kScaleBlock, [&] { scale_grad_kernel<T>(g, n, grad_loss); });
  }

  template <typename T>
  void backward(Mapping m, int grid, const BackwardParams& bp) {
    switch (m) {
      case Mapping::kThread:
        emu::launch(grid, kThreadBlock, [&] { multihead_ce_backward_kernel<T, 1, kThreadBlock>(bp); });
        break;
      case Mapping::kWarp:
        emu::launch(grid, kWarpBlock, [&] { multihead_ce_backward_kernel<T, 32, kWarpBlock>(bp); });
        break;
      case Mapping::kBlock:
        emu::launch(grid, kRowBlock, [&] { multihead_ce_backward_kernel<T, kRowBlock, kRowBlock>(bp); });
        break;
    }
  }
};

ForwardResult emulated_forward(at::TensorList heads, const at::Tensor& target,
                               const c10::optional<at::Tensor>& class_weight, at::ArrayRef<double> head_weights,
                               int64_t ignore_index, double label_smoothing, int64_t reduction, int64_t grad_mode) {
  EmulatedLauncher launcher;
  return forward_impl(launcher, heads, target, class_weight, head_weights, ignore_index, label_smoothing,
                      reduction, grad_mode);
}

at::Tensor emulated_backward(const at::Tensor& grad_loss, at::TensorList heads, const at::Tensor& target,
                             const c10::optional<at::Tensor>& class_weight, at::ArrayRef<double> head_weights,
                             int64_t ignore_index, double label_smoothing, int64_t reduction, const at::Tensor& lse,
                             const at::Tensor& denom) {
  EmulatedLauncher launcher;
  return backward_impl(launcher, grad_loss, heads, target, class_weight, head_weights, ignore_index,
                       label_smoothing, reduction, lse, denom);
}

void emulated_scale_grad(const at::Tensor& grads, const at::Tensor& grad_loss) {
  EmulatedLauncher launcher;
  scale_grad_impl(launcher, grads, grad_loss);
}

// Which kernel a shape takes (0 thread, 1 warp, 2 block per row), so the tests can check their coverage.
int64_t emulated_mapping(int64_t classes, int64_t class_stride) {
  return static_cast<int64_t>(choose_mapping(classes, class_stride));
}

}  // namespace auxfuse_cuda

TORCH_LIBRARY(auxfuse_emu, m) {
  m.def(auxfuse::kForwardSchema);
  m.def(auxfuse::kBackwardSchema);
  m.def(auxfuse::kScaleGradSchema);
  m.def("mapping(int classes, int class_stride) -> int", &auxfuse_cuda::emulated_mapping);
}

TORCH_LIBRARY_IMPL(auxfuse_emu, CPU, m) {
  m.impl("multihead_ce_forward", &auxfuse_cuda::emulated_forward);
  m.impl("multihead_ce_backward", &auxfuse_cuda::emulated_backward);
  m.impl("multihead_ce_scale_grad_", &auxfuse_cuda::emulated_scale_grad);
}
