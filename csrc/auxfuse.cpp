// The auxfuse ops: every op is defined here, once (the schema strings are in op_schemas.h, which the CUDA
// emulation of the tests defines too). Kernels register per dispatch key in
// csrc/cpu/multihead_ce.cpp and csrc/cuda/multihead_ce.cu, autograd in csrc/autograd.cpp; fake kernels
// are registered from Python (auxfuse/backends/native.py).
//
// Contract shared by every kernel (the oracle is auxfuse/backends/reference.py):
//   heads        H >= 1 tensors of one shape (N, C, S), one dtype and device; any strides, but all heads
//                share heads[0]'s strides (Python makes an odd one contiguous). S is the flattened
//                spatial size. Heads may also come as the model gave them, (N, C, d1, ..., dk) for any
//                k >= 0 with targets (N, d1, ..., dk) / (N, C, d1, ..., dk): read as (N, C, S), S = d1...dk
//                (1 for k = 0); the loss and log-sum-exp are then those of (N, C, S) (a `none` loss (N, S)),
//                and gradients come in the heads' shape, (H, N, C, d1, ..., dk).
//   target       class indices (N, S) int64, or probabilities (N, C, S) of the heads' dtype.
//   class_weight optional (C,) of the accumulation dtype (float32, float64 for float64 heads).
//   head_weights H floats.
//   reduction    0 none, 1 mean, 2 sum (auxfuse::Reduction in multihead_ce.h).
//   grad_mode    0 no gradient; 1 the gradient is computed in the forward and returned in `saved`,
//                already multiplied by the head weight and, for mean, divided by `denom`;
//                2 the per-row log-sum-exp is returned in `saved` for multihead_ce_backward.
// Outputs (acc = float32, or float64 for float64 heads):
//   loss         acc, () for mean / sum, (N, S) for none: sum_h w_h * cross_entropy(head_h).
//   head_losses  acc (H,): each head's unweighted loss; reduced with `reduction`, and with none by mean.
//   head_correct int64 (H,): rows whose argmax (first maximum) equals the target, among counted rows;
//                for probability targets, equals the argmax of the target row.
//   count        int64 (): counted rows (target != ignore_index; every row for probability targets).
//   denom        acc (): the mean's divisor: sum of class_weight[target] over counted rows, or count
//                without weights; N * S for probability targets.
//   saved        grad_mode 0: empty (0,). 1: gradients (H, *heads' shape) in the heads' dtype, laid out
//                like the heads (see allocate_head_grads). 2: log-sum-exp (H, N, S), acc dtype.
//   invalid      int64 (): counted rows whose class index is outside [0, C) (0 for probability targets).
//
// multihead_ce_per_head_forward: the same with one target and one class weight per head (targets[h] and
// class_weights[h] follow the rules above for head h alone; heads share only dtype and device). Every head
// has its own N, C and S; its mean divides by its own denominator. Outputs: loss () for mean / sum
// (sum_h w_h * cross_entropy(head_h, targets[h])), (N, S) for none (every head must then have the same N and
// S); head_losses, head_correct, count and denom (H,), per head; grads: grad_mode 1, each head's gradient in
// its own shape, laid out like it, weight and divisor folded in (empty list for grad_mode 0; grad_mode 2 is
// not offered); invalid () as above.
// target_positions[h] (target_resize, class indices only): None, or an int64 (S_h,) tensor of positions in a
// full-resolution target: targets[h] is then (N, e1, ..., ek) of any spatial size S', and row (n, s) of head h
// reads targets[h].reshape(N, S')[n, target_positions[h][s]], so no downsampled copy is made. A position outside
// [0, S') raises ValueError on CPU; on CUDA its row counts as an invalid target (NaN, `invalid`).
// A target outside [0, C) that is not ignore_index raises ValueError on CPU before anything is written;
// on CUDA it is never read out of bounds: that row's loss and gradient are NaN (so the loss is NaN) and
// `invalid` counts it, on the device, for the caller to read when it wants to know (no host sync here).
#include <Python.h>
#include <torch/library.h>

#include "op_schemas.h"

extern "C" {
// `import auxfuse._C` loads this library, whose static initializers register the ops below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(auxfuse, m) {
  m.def(auxfuse::kForwardSchema);
  m.def(auxfuse::kPerHeadForwardSchema);
  m.def(auxfuse::kBackwardSchema);
  m.def(auxfuse::kScaleGradSchema);
}
