// The schemas of the auxfuse ops (contract: csrc/auxfuse.cpp), in one place: auxfuse.cpp defines them in the
// auxfuse namespace and the CUDA emulation (tests/cuda_emulation/emulate.cpp) in auxfuse_emu, so that the
// emulated kernels are always called exactly as the real ones.
#pragma once

namespace auxfuse {

inline constexpr const char* kForwardSchema =
    "multihead_ce_forward(Tensor[] heads, Tensor target, Tensor? class_weight, float[] head_weights, "
    "int ignore_index, float label_smoothing, int reduction, int grad_mode) -> "
    "(Tensor loss, Tensor head_losses, Tensor head_correct, Tensor count, Tensor denom, Tensor saved, "
    "Tensor invalid)";

// One target and one class weight (or None) per head: heads of their own sizes (deep supervision, multi-token and
// multi-task heads), one launch for all of them; target_positions: where a head reads a full-resolution target
// (target_resize). Contract in auxfuse.cpp; grad_mode 0 or 1 only.
inline constexpr const char* kPerHeadForwardSchema =
    "multihead_ce_per_head_forward(Tensor[] heads, Tensor[] targets, Tensor?[] target_positions, "
    "Tensor?[] class_weights, "
    "float[] head_weights, int ignore_index, float label_smoothing, int reduction, int grad_mode) -> "
    "(Tensor loss, Tensor head_losses, Tensor head_correct, Tensor count, Tensor denom, Tensor[] grads, "
    "Tensor invalid)";

// Gradient of every head from the saved log-sum-exp (grad_mode 2): grad_loss is () for mean / sum and
// (N, S) for none, read on the device. Returns (H, *heads' shape) in the heads' dtype, laid out like the heads.
inline constexpr const char* kBackwardSchema =
    "multihead_ce_backward(Tensor grad_loss, Tensor[] heads, Tensor target, Tensor? class_weight, "
    "float[] head_weights, int ignore_index, float label_smoothing, int reduction, Tensor lse, "
    "Tensor denom) -> Tensor";

// Backward of grad_mode 1 for mean / sum: grads *= grad_loss (one element) in place, unless grad_loss is
// exactly 1. CUDA reads grad_loss on the device (no sync; when it is 1 the kernel returns at once).
inline constexpr const char* kScaleGradSchema = "multihead_ce_scale_grad_(Tensor(a!) grads, Tensor grad_loss) -> ()";

}  // namespace auxfuse
