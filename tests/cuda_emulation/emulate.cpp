// The CUDA kernels of csrc/cuda/multihead_ce.cu, compiled as C++ and run on CPU threads (cuda_shim.h), behind
// ops of their own: torch.ops.auxfuse_emu.multihead_ce_forward / multihead_ce_per_head_forward /
// multihead_ce_backward on CPU tensors, with auxfuse's schemas (csrc/op_schemas.h). The host logic is the CUDA
// backend's own (forward_impl / per_head_forward_impl / backward_impl); only the launcher differs. The grid caps
// are lowered so that small problems exercise the grid-stride loops and a last block that sums several partials.
// Built (tests/cuda_emulation/loader.py) and used by tests/test_cuda_emulated.py and test_cuda_emulated_per_head.py.
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
    with_mapping(m, [&](auto g, auto block) {
      with_grad(fp.grad != nullptr, [&](auto write_grad) {
        emu::launch(grid, block(), [&] { multihead_ce_forward_kernel<T, g(), block(), write_grad()>(fp); });
      });
    });
    TORCH_CHECK(*counter() == 0, "emulation: the forward kernel left its ticket at ", *counter());
  }

  // The per-head kernel's head table: "device" memory is host memory here, the copy is a copy (so the kernels
  // never read the host buffer the host logic filled).
  at::Tensor host_bytes(int64_t n) { return at::empty({n}, at::TensorOptions().dtype(at::kByte)); }
  at::Tensor upload(const at::Tensor& host, const at::Device&) { return host.clone(); }

  template <typename T>
  void per_head(Mapping m, int grid, const PerHeadParams& pp, bool grad) {
    with_mapping(m, [&](auto g, auto block) {
      with_grad(grad, [&](auto write_grad) {
        emu::launch(grid, block(), [&] { multihead_ce_per_head_kernel<T, g(), block(), write_grad()>(pp); });
      });
    });
    TORCH_CHECK(*counter() == 0, "emulation: the per-head kernel left its ticket at ", *counter());
  }

  // Few "SMs", so that grad_mode 1's one-block-per-SM grid strides too.
  int sm_count() const { return 2; }

  template <typename T>
  void scale(int grid, T* g, int64_t n, const float* grad_loss) {
    emu::launch(grid, kScaleBlock, [&] { scale_grad_kernel<T>(g, n, grad_loss); });
  }

  template <typename T>
  void backward(Mapping m, int grid, const BackwardParams& bp) {
    with_mapping(m, [&](auto g, auto block) {
      emu::launch(grid, block(), [&] { multihead_ce_backward_kernel<T, g(), block()>(bp); });
    });
  }
};

ForwardResult emulated_forward(at::TensorList heads, const at::Tensor& target,
                               const c10::optional<at::Tensor>& class_weight, at::ArrayRef<double> head_weights,
                               int64_t ignore_index, double label_smoothing, int64_t reduction, int64_t grad_mode) {
  EmulatedLauncher launcher;
  return forward_impl(launcher, heads, target, class_weight, head_weights, ignore_index, label_smoothing,
                      reduction, grad_mode);
}

PerHeadResult emulated_per_head_forward(at::TensorList heads, at::TensorList targets,
                                        const c10::List<std::optional<at::Tensor>>& target_positions,
                                        const c10::List<std::optional<at::Tensor>>& class_weights,
                                        at::ArrayRef<double> head_weights, int64_t ignore_index,
                                        double label_smoothing, int64_t reduction, int64_t grad_mode) {
  EmulatedLauncher launcher;
  return per_head_forward_impl(launcher, heads, targets, target_positions, class_weights, head_weights, ignore_index,
                               label_smoothing, reduction, grad_mode);
}

// The per-head op's launch plan, so the tests can check their coverage: (mapping, grid, items) of the main launch.
std::tuple<int64_t, int64_t, int64_t> emulated_per_head_plan(at::IntArrayRef rows, at::IntArrayRef classes,
                                                             bool every_head_per_item, int64_t mapping) {
  const Mapping m = static_cast<Mapping>(mapping);
  int64_t items = 0;
  const std::vector<WorkSpan> spans = make_work_spans(rows.vec(), classes.vec(), every_head_per_item,
                                                      rows_per_block(m), kMaxForwardBlocks, items);
  return {static_cast<int64_t>(spans.size()), std::min<int64_t>(items, kMaxForwardBlocks), items};
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
  m.def(auxfuse::kPerHeadForwardSchema);
  m.def(auxfuse::kBackwardSchema);
  m.def(auxfuse::kScaleGradSchema);
  m.def("mapping(int classes, int class_stride) -> int", &auxfuse_cuda::emulated_mapping);
  m.def("per_head_plan(int[] rows, int[] classes, bool every_head_per_item, int mapping) -> (int, int, int)",
        &auxfuse_cuda::emulated_per_head_plan);
}

TORCH_LIBRARY_IMPL(auxfuse_emu, CPU, m) {
  m.impl("multihead_ce_forward", &auxfuse_cuda::emulated_forward);
  m.impl("multihead_ce_per_head_forward", &auxfuse_cuda::emulated_per_head_forward);
  m.impl("multihead_ce_backward", &auxfuse_cuda::emulated_backward);
  m.impl("multihead_ce_scale_grad_", &auxfuse_cuda::emulated_scale_grad);
}
