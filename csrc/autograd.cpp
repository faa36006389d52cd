// Autograd of auxfuse::multihead_ce_forward, one kernel for the Autograd key (every device).
//
// It lives in C++ (as torchvision's csrc/ops/autograd do) rather than in torch.library.register_autograd:
// at classifier sizes the Python autograd layer cost about as much as the fused kernel it wraps (3 x 256 x 1000
// fp32, one CPU thread: 1.40 ms per forward + backward around a 0.67 ms kernel, 1.05 ms with this file; on
// the H200, ~0.9 ms of host time around two kernels of a few microseconds). Fake kernels stay in Python
// (auxfuse/backends/native.py); torch.compile traces through this function with them.
//
// The backward follows the forward's grad_mode (contract in auxfuse.cpp):
//   1 (CPU; CUDA for large heads): the gradient was written in the forward, weights and the mean's divisor
//     folded in. Backward hands that buffer out scaled in place by grad_output through
//     multihead_ce_scale_grad_, which does nothing when grad_output is 1 (loss.backward()) and finds that out
//     on the device for CUDA, so no second gradient-sized buffer is ever allocated. When the graph is kept
//     (retain_graph=True) the buffer stays saved for the next backward, so it hands out a scaled copy
//     instead; when tracing (torch.compile, make_fx) it always emits the multiply, since grad_output's value
//     is not known.
//   2 (CUDA): one backward kernel from the saved log-sum-exp, reading grad_output on the device.
#include <ATen/ATen.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "multihead_ce.h"
#include "ops_common.h"

namespace auxfuse {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardSignature = ForwardResult(at::TensorList, const at::Tensor&, const std::optional<at::Tensor>&,
                                        at::ArrayRef<double>, int64_t, double, int64_t, int64_t);
using BackwardSignature = at::Tensor(const at::Tensor&, at::TensorList, const at::Tensor&,
                                     const std::optional<at::Tensor>&, at::ArrayRef<double>, int64_t, double, int64_t,
                                     const at::Tensor&, const at::Tensor&);

// Number of non-head inputs of the forward op: target, class_weight, head_weights, ignore_index,
// label_smoothing, reduction, grad_mode (backward returns one entry per input, heads first).
constexpr size_t kOtherInputs = 7;

// True for a tensor whose values are not there to read: a fake, functional or other Python tensor, or any
// tensor while a dispatch mode (make_fx, FakeTensorMode) records the calls.
bool is_traced(const at::Tensor& t) {
  return t.unsafeGetTensorImpl()->is_python_dispatch() || at::functionalization::impl::isFunctionalTensor(t) ||
         c10::impl::TorchDispatchModeTLS::any_modes_set();
}

// grad_mode 1's backward: the gradient computed in the forward (weights and the mean's divisor folded in), times
// grad_output. Multiplied only when needed: loss.backward() (grad_output 1 on a freed graph) launches nothing.
// A `none` loss is (N, S): its gradient is broadcast over the classes as (N, 1, d1, ..., dk). `grads` is
// (H, *head shape) for the shared-target op (`stacked`) and one head's (*head shape) for the per-head op.
at::Tensor scaled_saved_grad(at::Tensor grads, const at::Tensor& grad_loss, int64_t reduction, bool stacked) {
  const auto scale = [&] {
    if (reduction != kReductionNone) return grad_loss.to(grads.scalar_type());
    std::vector<int64_t> sizes(grads.sizes().begin() + (stacked ? 1 : 0), grads.sizes().end());
    sizes[1] = 1;
    return grad_loss.reshape(sizes).to(grads.scalar_type());
  };
  // The buffer may be handed out (or scaled in place) only if this backward is its last reader.
  const bool last_use =
      !torch::autograd::get_current_graph_task_keep_graph() && !is_traced(grad_loss) && !is_traced(grads);
  if (!last_use) return grads * scale();
  if (reduction == kReductionNone) return grads.mul_(scale());
  static const auto scale_grad = c10::Dispatcher::singleton()
                                     .findSchemaOrThrow("auxfuse::multihead_ce_scale_grad_", "")
                                     .typed<void(const at::Tensor&, const at::Tensor&)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  scale_grad.call(grads, grad_loss);  // nothing when grad_output is 1, found out on the device for CUDA
  return grads;
}

// The gradient w.r.t. a probability target (it is differentiable in PyTorch: distillation from a trained
// teacher, PyTorch's own OpInfo samples). Per row and class: d loss / d t_c = (1 - eps) * w_c * (lse - x_c)
// = -(1 - eps) * w_c * log_softmax(x)_c, times each head's weight, summed over the heads that read the target,
// times the row's scale (grad_output; / denom for mean). Composed of ATen ops from the saved logits: the kernels
// keep their single pass for the common case, targets without gradient.
at::Tensor prob_target_grad(at::TensorList heads, at::ArrayRef<double> head_weights, const at::Tensor& class_weight,
                            double label_smoothing, int64_t reduction, const at::Tensor& denom,
                            const at::Tensor& grad_loss, const at::Tensor& target) {
  const auto acc_type = at::toOpMathType(heads[0].scalar_type());
  at::Tensor sum;
  for (size_t h = 0; h < heads.size(); ++h) {
    const at::Tensor term = at::log_softmax(heads[h].to(acc_type), 1) * (-head_weights[h]);
    sum = sum.defined() ? sum + term : term;
  }
  sum = sum * (1.0 - label_smoothing);
  std::vector<int64_t> sizes(heads[0].dim(), 1);  // (1, C, 1, ...) for the class weights, (N, 1, d1, ...) per row
  if (class_weight.defined()) {
    sizes[1] = heads[0].size(1);
    sum = sum * class_weight.view(sizes);
  }
  at::Tensor scale = grad_loss.to(acc_type);
  if (reduction == kReductionMean) scale = scale / denom;
  if (reduction == kReductionNone) {
    sizes.assign(heads[0].sizes().begin(), heads[0].sizes().end());
    sizes[1] = 1;
    scale = scale.reshape(sizes);
  }
  return (sum * scale).to(target.scalar_type());
}

class MultiheadCrossEntropy : public torch::autograd::Function<MultiheadCrossEntropy> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList heads, const at::Tensor& target,
                               const std::optional<at::Tensor>& class_weight, at::ArrayRef<double> head_weights,
                               int64_t ignore_index, double label_smoothing, int64_t reduction, int64_t grad_mode) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("auxfuse::multihead_ce_forward", "")
                               .typed<ForwardSignature>();
    at::Tensor loss, head_losses, head_correct, count, denom, saved, invalid;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(loss, head_losses, head_correct, count, denom, saved, invalid) =
          op.call(heads, target, class_weight, head_weights, ignore_index, label_smoothing, reduction, grad_mode);
    }
    // Only the loss carries a gradient; without this autograd would zero-fill the other six on every backward.
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({head_losses, head_correct, count, denom, saved, invalid});
    ctx->saved_data["num_heads"] = static_cast<int64_t>(heads.size());
    ctx->saved_data["grad_mode"] = grad_mode;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["head_weights"] = head_weights.vec();
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    // grad_mode 1: the gradient buffer; 2: what the backward op reads. A probability target that requires grad
    // also keeps the logits (prob_target_grad).
    const bool target_grad = target.is_floating_point() && target.requires_grad();
    ctx->saved_data["target_grad"] = target_grad;
    variable_list to_save{saved, denom, target, class_weight.value_or(at::Tensor())};
    if (grad_mode == kSaveLse || target_grad) to_save.insert(to_save.end(), heads.begin(), heads.end());
    ctx->save_for_backward(std::move(to_save));
    return {loss, head_losses, head_correct, count, denom, saved, invalid};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const int64_t num_heads = ctx->saved_data["num_heads"].toInt();
    const int64_t grad_mode = ctx->saved_data["grad_mode"].toInt();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    variable_list grad_inputs(num_heads + kOtherInputs);
    const at::Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) {
      return grad_inputs;
    }
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &denom = saved[1], &target = saved[2], &class_weight = saved[3];
    const std::vector<at::Tensor> heads(saved.begin() + 4, saved.end());
    const std::vector<double> head_weights = ctx->saved_data["head_weights"].toDoubleVector();
    const double label_smoothing = ctx->saved_data["label_smoothing"].toDouble();
    if (ctx->saved_data["target_grad"].toBool()) {
      grad_inputs[num_heads] = prob_target_grad(heads, head_weights, class_weight, label_smoothing, reduction, denom,
                                                grad_loss, target);
    }
    if (grad_mode == kNoGrad) {
      return grad_inputs;
    }
    at::Tensor grads;
    if (grad_mode == kGradInForward) {
      grads = scaled_saved_grad(saved[0], grad_loss, reduction, /*stacked=*/true);
    } else {
      static const auto op = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("auxfuse::multihead_ce_backward", "")
                                 .typed<BackwardSignature>();
      grads = op.call(grad_loss, heads, target,
                      class_weight.defined() ? std::optional<at::Tensor>(class_weight) : std::nullopt, head_weights,
                      ctx->saved_data["ignore_index"].toInt(), label_smoothing, reduction, saved[0], denom);
    }
    for (int64_t h = 0; h < num_heads; ++h) {
      grad_inputs[h] = grads.select(0, h);  // (H, *head shape): see grads_in_head_shape
    }
    return grad_inputs;
  }
};

using PerHeadSignature = PerHeadResult(at::TensorList, at::TensorList, const c10::List<std::optional<at::Tensor>>&,
                                       const c10::List<std::optional<at::Tensor>>&, at::ArrayRef<double>, int64_t,
                                       double, int64_t, int64_t);

// The per-head op (grad_mode 0 or 1): its backward hands out each head's saved gradient times grad_output (and
// prob_target_grad for probability targets that require grad).
// Outputs are flattened for autograd as loss, head_losses, head_correct, count, denom, invalid, grads...
class PerHeadCrossEntropy : public torch::autograd::Function<PerHeadCrossEntropy> {
 public:
  static variable_list forward(AutogradContext* ctx, at::TensorList heads, at::TensorList targets,
                               const c10::List<std::optional<at::Tensor>>& target_positions,
                               const c10::List<std::optional<at::Tensor>>& class_weights,
                               at::ArrayRef<double> head_weights, int64_t ignore_index, double label_smoothing,
                               int64_t reduction, int64_t grad_mode) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("auxfuse::multihead_ce_per_head_forward", "")
                               .typed<PerHeadSignature>();
    TORCH_CHECK(grad_mode == kNoGrad || grad_mode == kGradInForward,
                "auxfuse: multihead_ce_per_head_forward takes grad_mode 0 or 1, not ", grad_mode);
    at::Tensor loss, head_losses, head_correct, count, denom, invalid;
    std::vector<at::Tensor> grads;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(loss, head_losses, head_correct, count, denom, grads, invalid) =
          op.call(heads, targets, target_positions, class_weights, head_weights, ignore_index, label_smoothing,
                  reduction, grad_mode);
    }
    ctx->set_materialize_grads(false);
    variable_list out;
    out.reserve(6 + grads.size());
    out.insert(out.end(), {loss, head_losses, head_correct, count, denom, invalid});
    out.insert(out.end(), grads.begin(), grads.end());
    ctx->mark_non_differentiable(variable_list(out.begin() + 1, out.end()));
    const int64_t H = heads.size();
    ctx->saved_data["num_heads"] = H;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["num_grads"] = static_cast<int64_t>(grads.size());  // 0 for grad_mode 0
    // Probability targets that require grad (prob_target_grad): their head, target, class weight and head weight;
    // kept only when there are any (the common call saves no list).
    std::vector<int64_t> target_grad_heads;
    std::vector<double> target_grad_weights;
    variable_list to_save;
    to_save.reserve(grads.size() + 1);
    to_save.insert(to_save.end(), grads.begin(), grads.end());
    to_save.push_back(denom);
    for (int64_t h = 0; h < H; ++h) {
      if (targets[h].is_floating_point() && targets[h].requires_grad()) {
        target_grad_heads.push_back(h);
        target_grad_weights.push_back(head_weights[h]);
        to_save.insert(to_save.end(), {heads[h], targets[h], class_weights.get(h).value_or(at::Tensor())});
      }
    }
    if (!target_grad_heads.empty()) {
      ctx->saved_data["target_heads"] = target_grad_heads;
      ctx->saved_data["target_weights"] = target_grad_weights;
      ctx->saved_data["label_smoothing"] = label_smoothing;
    }
    ctx->save_for_backward(std::move(to_save));
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const int64_t num_heads = ctx->saved_data["num_heads"].toInt();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    // One entry per input as autograd counts them: each head, each target, the target-position and class-weight
    // lists (one entry each), then the five non-tensor arguments.
    variable_list grad_inputs(2 * num_heads + 7);
    const at::Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) return grad_inputs;
    const variable_list saved = ctx->get_saved_variables();
    const int64_t num_grads = ctx->saved_data["num_grads"].toInt();
    // loss.backward() on CPU: grad_output is read once here and every head's buffer handed out as it is, instead
    // of a dispatcher call and a host read per head in scaled_saved_grad.
    const bool hand_out = num_grads > 0 && reduction != kReductionNone && grad_loss.is_cpu() &&
                          !torch::autograd::get_current_graph_task_keep_graph() && !is_traced(grad_loss) &&
                          grad_loss.item<double>() == 1.0;
    for (int64_t h = 0; h < num_grads; ++h) {
      grad_inputs[h] = hand_out && !is_traced(saved[h])
                           ? saved[h]
                           : scaled_saved_grad(saved[h], grad_loss, reduction, /*stacked=*/false);
    }
    if (ctx->saved_data.find("target_heads") == ctx->saved_data.end()) return grad_inputs;
    const at::Tensor& denom = saved[num_grads];
    const std::vector<int64_t> target_grad_heads = ctx->saved_data["target_heads"].toIntVector();
    const std::vector<double> target_grad_weights = ctx->saved_data["target_weights"].toDoubleVector();
    for (size_t i = 0; i < target_grad_heads.size(); ++i) {
      const int64_t h = target_grad_heads[i];
      const at::Tensor &head = saved[num_grads + 1 + 3 * i], &target = saved[num_grads + 2 + 3 * i];
      grad_inputs[num_heads + h] =
          prob_target_grad({head}, {target_grad_weights[i]}, saved[num_grads + 3 + 3 * i],
                           ctx->saved_data["label_smoothing"].toDouble(), reduction, denom[h], grad_loss, target);
    }
    return grad_inputs;
  }
};

PerHeadResult per_head_forward_autograd(at::TensorList heads, at::TensorList targets,
                                        const c10::List<std::optional<at::Tensor>>& target_positions,
                                        const c10::List<std::optional<at::Tensor>>& class_weights,
                                        at::ArrayRef<double> head_weights, int64_t ignore_index,
                                        double label_smoothing, int64_t reduction, int64_t grad_mode) {
  const variable_list out = PerHeadCrossEntropy::apply(heads, targets, target_positions, class_weights, head_weights,
                                                       ignore_index, label_smoothing, reduction, grad_mode);
  return {out[0], out[1], out[2], out[3], out[4], std::vector<at::Tensor>(out.begin() + 6, out.end()), out[5]};
}

ForwardResult forward_autograd(at::TensorList heads, const at::Tensor& target,
                                const std::optional<at::Tensor>& class_weight, at::ArrayRef<double> head_weights,
                                int64_t ignore_index, double label_smoothing, int64_t reduction, int64_t grad_mode) {
  const variable_list out = MultiheadCrossEntropy::apply(heads, target, class_weight, head_weights, ignore_index,
                                                         label_smoothing, reduction, grad_mode);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6]};
}

}  // namespace

TORCH_LIBRARY_IMPL(auxfuse, Autograd, m) {
  m.impl("multihead_ce_forward", &forward_autograd);
  m.impl("multihead_ce_per_head_forward", &per_head_forward_autograd);
}

}  // namespace auxfuse
