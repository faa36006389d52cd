// Host-side pieces shared by the CPU and CUDA kernels of the ops in auxfuse.cpp: argument checks,
// the problem's sizes and strides, and output allocation (which the fake kernels in
// auxfuse/backends/native.py mirror exactly).
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorUtils.h>
#include <ATen/core/List.h>
#include <c10/util/accumulate.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "multihead_ce.h"

namespace auxfuse {

struct ProblemShape {
  int64_t heads;        // H
  int64_t batch;        // N
  int64_t classes;      // C
  int64_t spatial;      // S
  bool prob_target;     // target holds probabilities (N, C, S) rather than indices (N, S)
  int64_t rows() const { return batch * spatial; }
};

// The heads and target as every kernel reads them: (N, C, S) and (N, S) / (N, C, S). Heads may come as
// (N, C, d1, ..., dk) for any k >= 0, with targets (N, d1, ..., dk) / (N, C, d1, ..., dk): reshaped here to
// (N, C, S) (a view wherever the strides allow, as every head of one call shares head 0's strides), so that
// Python passes them as they are instead of making a view per head, which under autograd is a node per head
// in forward and in backward. Anything else is left as it is for check_inputs to report.
struct RowViews {
  std::vector<at::Tensor> heads;
  at::Tensor target;
};

// t.reshape(sizes) for the kernels' own views: where the strides allow a view, it is made directly, without the
// two dispatcher calls of a reshape (for classifier heads, one per head and target and call, as costly as a small
// head's kernel); else the reshape's copy. The view never leaves the op, so it needs no autograd or version
// counter of its own.
inline at::Tensor row_view(const at::Tensor& t, at::IntArrayRef sizes) {
  const std::optional<std::vector<int64_t>> strides = at::detail::computeStride(t.sizes(), t.strides(), sizes);
  if (!strides.has_value()) return t.reshape(sizes);
  at::Tensor view = at::detail::make_tensor<c10::TensorImpl>(c10::TensorImpl::VIEW, c10::Storage(t.storage()),
                                                            t.key_set(), t.dtype());
  view.unsafeGetTensorImpl()->set_sizes_and_strides(sizes, *strides, t.storage_offset());
  return view;
}

inline RowViews as_row_views(at::TensorList heads, const at::Tensor& target) {
  RowViews rows;
  rows.heads = heads.vec();
  rows.target = target;
  if (heads.empty() || heads[0].dim() < 2 || heads[0].dim() == 3) {
    return rows;
  }
  const at::IntArrayRef sizes = heads[0].sizes();
  const int64_t N = sizes[0], C = sizes[1], S = c10::multiply_integers(sizes.slice(2));
  for (at::Tensor& h : rows.heads) {
    if (h.sizes() == sizes) h = row_view(h, {N, C, S});
  }
  if (target.dim() == heads[0].dim() - 1 && target.size(0) == N && target.sizes().slice(1) == sizes.slice(2)) {
    rows.target = row_view(target, {N, S});
  } else if (target.sizes() == sizes) {
    rows.target = row_view(target, {N, C, S});
  }
  return rows;
}

inline ProblemShape check_inputs(at::TensorList heads, const at::Tensor& target,
                                 const c10::optional<at::Tensor>& class_weight, at::ArrayRef<double> head_weights,
                                 int64_t reduction) {
  TORCH_CHECK(!heads.empty(), "auxfuse: at least one head is needed");
  const at::Tensor& h0 = heads[0];
  TORCH_CHECK(h0.dim() == 3, "auxfuse: heads must be (N, C, d1, ..., dk); got ", h0.sizes());
  TORCH_CHECK(at::isFloatingType(h0.scalar_type()), "auxfuse: heads must be floating point; got ", h0.scalar_type());
  for (size_t h = 1; h < heads.size(); ++h) {
    TORCH_CHECK(heads[h].sizes() == h0.sizes() && heads[h].strides() == h0.strides() &&
                    heads[h].scalar_type() == h0.scalar_type() && heads[h].device() == h0.device(),
                "auxfuse: head ", h, " differs from head 0 in shape, strides, dtype or device");
  }
  TORCH_CHECK(static_cast<int64_t>(head_weights.size()) == static_cast<int64_t>(heads.size()),
              "auxfuse: ", head_weights.size(), " head weights for ", heads.size(), " heads");
  TORCH_CHECK(reduction >= kReductionNone && reduction <= kReductionSum, "auxfuse: bad reduction ", reduction);
  TORCH_CHECK(h0.size(1) > 0, "auxfuse: heads need at least one class");
  ProblemShape shape{static_cast<int64_t>(heads.size()), h0.size(0), h0.size(1), h0.size(2), false};
  TORCH_CHECK(target.device() == h0.device(), "auxfuse: target is on ", target.device(), ", heads on ", h0.device());
  if (target.dim() == 3) {
    TORCH_CHECK(target.sizes() == h0.sizes() && target.scalar_type() == h0.scalar_type(),
                "auxfuse: probability targets must match the heads' shape and dtype");
    shape.prob_target = true;
  } else {
    TORCH_CHECK(target.dim() == 2 && target.size(0) == shape.batch && target.size(1) == shape.spatial &&
                    target.scalar_type() == at::kLong,
                "auxfuse: class-index targets must be int64 (N, S); got ", target.scalar_type(), " ",
                target.sizes());
  }
  if (class_weight.has_value()) {
    const auto acc_type = at::toOpMathType(h0.scalar_type());
    TORCH_CHECK(class_weight->dim() == 1 && class_weight->size(0) == shape.classes &&
                    class_weight->scalar_type() == acc_type && class_weight->device() == h0.device() &&
                    class_weight->is_contiguous(),
                "auxfuse: class_weight must be a contiguous (C,) tensor of ", acc_type, " on the heads' device");
  }
  return shape;
}

// Gradients (H, N, C, S) laid out like the heads: class-innermost heads (channels_last) get a
// class-innermost gradient, so the kernels write it with the same access pattern as they read. `allocator`:
// where their memory comes from: null, the heads' device's default; else CPU memory (the CPU kernels pass their
// cache of large blocks, csrc/cpu/gradient_cache.cpp).
inline at::Tensor allocate_head_grads(at::TensorList heads, at::Allocator* allocator) {
  const at::Tensor& h0 = heads[0];
  const int64_t H = heads.size(), N = h0.size(0), C = h0.size(1), S = h0.size(2);
  const bool class_innermost = S > 1 && h0.stride(1) == 1;
  const auto empty = [&](at::IntArrayRef sizes) -> at::Tensor {
    if (allocator == nullptr) return at::empty(sizes, h0.options());
    return at::detail::empty_generic(sizes, allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), h0.scalar_type(),
                                     std::nullopt);
  };
  if (class_innermost) {
    return empty({H, N, S, C}).permute({0, 1, 3, 2});
  }
  return empty({H, N, C, S});
}

// Gradients as autograd hands them out, (H, *shape of the heads as given): a view of the (H, N, C, S) layout
// the kernels write, so that each head's gradient is one select.
inline at::Tensor grads_in_head_shape(const at::Tensor& grads, at::TensorList heads_in) {
  const at::Tensor& h0 = heads_in[0];
  if (h0.dim() == 3) return grads;
  std::vector<int64_t> sizes{grads.size(0)};
  sizes.insert(sizes.end(), h0.sizes().begin(), h0.sizes().end());
  return grads.view(sizes);
}

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct ForwardOutputs {
  at::Tensor loss, head_losses, head_correct, count, denom, saved, invalid;

  // The op's outputs; `saved` in the heads' shape when it holds gradients (grad_mode 1).
  ForwardResult result(at::TensorList heads_in, int64_t grad_mode) const {
    return {loss,  head_losses, head_correct,
            count, denom,       grad_mode == kGradInForward ? grads_in_head_shape(saved, heads_in) : saved,
            invalid};
  }
};

inline ForwardOutputs allocate_forward_outputs(at::TensorList heads, const ProblemShape& shape, int64_t reduction,
                                               int64_t grad_mode, at::Allocator* grad_allocator) {
  const at::Tensor& h0 = heads[0];
  const auto acc_options = h0.options().dtype(at::toOpMathType(h0.scalar_type()));
  ForwardOutputs out;
  out.loss = reduction == kReductionNone ? at::empty({shape.batch, shape.spatial}, acc_options)
                                         : at::empty({}, acc_options);
  out.head_losses = at::empty({shape.heads}, acc_options);
  out.head_correct = at::empty({shape.heads}, h0.options().dtype(at::kLong));
  out.count = at::empty({}, h0.options().dtype(at::kLong));
  out.denom = at::empty({}, acc_options);
  out.invalid = at::empty({}, h0.options().dtype(at::kLong));
  if (grad_mode == kGradInForward) {
    out.saved = allocate_head_grads(heads, grad_allocator);
  } else if (grad_mode == kSaveLse) {
    out.saved = at::empty({shape.heads, shape.batch, shape.spatial}, acc_options);
  } else {
    TORCH_CHECK(grad_mode == kNoGrad, "auxfuse: bad grad_mode ", grad_mode);
    out.saved = at::empty({0}, acc_options);
  }
  return out;
}


// The head table's fields that come from one head's tensors: its (N, C, S) view, its target view ((N, S) class
// indices, with `positions` the full-resolution (N, S') mask and where the head reads it; or (N, C, S)
// probabilities), its class weights and loss weight. Shared by the CPU and CUDA hosts, which set weight_sum,
// grad_scale and the outputs. `Desc` is HeadDesc or the CPU copies' own type derived from it, so every CPU copy
// instantiates its own (no inline function compiled for two instruction sets).
template <typename Desc>
void describe_head_inputs(Desc& d, const at::Tensor& head, const at::Tensor& target, const at::Tensor& positions,
                          const c10::optional<at::Tensor>& class_weight, double head_weight, bool prob_target) {
  d.x = static_cast<decltype(d.x)>(head.const_data_ptr());
  d.N = head.size(0);
  d.C = head.size(1);
  d.S = head.size(2);
  d.sN = head.stride(0);
  d.sC = head.stride(1);
  d.sS = head.stride(2);
  if (prob_target) {
    d.t = static_cast<decltype(d.t)>(target.const_data_ptr());
    d.tN = target.stride(0);
    d.tC = target.stride(1);
    d.tS = target.stride(2);
  } else {
    d.y = target.const_data_ptr<int64_t>();
    d.yN = target.stride(0);
    d.yS = target.stride(1);
    d.y_pos = positions.defined() ? positions.const_data_ptr<int64_t>() : nullptr;
    d.y_spatial = target.size(1);
  }
  d.cw = class_weight.has_value() ? static_cast<decltype(d.cw)>(class_weight->const_data_ptr()) : nullptr;
  d.weight = static_cast<decltype(d.weight)>(head_weight);
}

// ---------------------------------------------------------------------------------------------------------
// multihead_ce_per_head_forward: one target and class weight per head (contract in auxfuse.cpp).

using PerHeadResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>,
                                 at::Tensor>;

// Each head with its own target and class weight, as the kernels read them: (N, C, S) and (N, S) / (N, C, S)
// views (as_row_views, one head at a time), and each head's shape.
struct PerHeadViews {
  std::vector<at::Tensor> heads, targets;
  std::vector<at::Tensor> positions;  // target_resize: (S,) positions in the (N, S') target; undefined: none
  std::vector<c10::optional<at::Tensor>> class_weights;
  std::vector<ProblemShape> shapes;
};

// A head that reads a full-resolution target through positions (target_resize): the target as (N, S'), checked
// against the head; `rows.target` becomes that view. Returns a stand-in of the head's own target shape for
// check_inputs (an expanded scalar: no memory).
inline at::Tensor resized_target_stand_in(RowViews& rows, const at::Tensor& positions, size_t h) {
  const at::Tensor &head = rows.heads[0], &target = rows.target;
  TORCH_CHECK(head.dim() == 3, "auxfuse: heads must be (N, C, d1, ..., dk); got ", head.sizes());
  const int64_t N = head.size(0), S = head.size(2);
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() >= 1 && target.size(0) == N &&
                  target.device() == head.device(),
              "auxfuse: head ", h, ": target_positions index an int64 class-index target (N, e1, ..., ek) with the "
              "head's N = ", N, " on its device; got ", target.scalar_type(), " ", target.sizes());
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == S && positions.scalar_type() == at::kLong &&
                  positions.device() == head.device() && positions.is_contiguous(),
              "auxfuse: head ", h, ": target_positions must be a contiguous int64 (", S, ",) tensor on the head's "
              "device, one position per spatial element of the head; got ", positions.scalar_type(), " ",
              positions.sizes());
  rows.target = target.reshape({N, c10::multiply_integers(target.sizes().slice(1))});  // N = 0 too
  return at::empty({}, target.options()).expand({N, S});
}

inline PerHeadViews check_per_head_inputs(at::TensorList heads_in, at::TensorList targets_in,
                                          const c10::List<c10::optional<at::Tensor>>& target_positions,
                                          const c10::List<c10::optional<at::Tensor>>& class_weights,
                                          at::ArrayRef<double> head_weights, int64_t reduction, int64_t grad_mode) {
  const size_t H = heads_in.size();
  TORCH_CHECK(H > 0, "auxfuse: at least one head is needed");
  TORCH_CHECK(targets_in.size() == H && target_positions.size() == H && class_weights.size() == H &&
                  head_weights.size() == H,
              "auxfuse: ", H, " heads need as many targets, target positions, class weights and head weights; got ",
              targets_in.size(), ", ", target_positions.size(), ", ", class_weights.size(), " and ",
              head_weights.size());
  TORCH_CHECK(grad_mode == kNoGrad || grad_mode == kGradInForward,
              "auxfuse: multihead_ce_per_head_forward takes grad_mode 0 or 1, not ", grad_mode);
  PerHeadViews v;
  v.heads.reserve(H);
  v.targets.reserve(H);
  v.positions.reserve(H);
  v.class_weights.reserve(H);
  v.shapes.reserve(H);
  for (size_t h = 0; h < H; ++h) {
    TORCH_CHECK(heads_in[h].scalar_type() == heads_in[0].scalar_type() && heads_in[h].device() == heads_in[0].device(),
                "auxfuse: head ", h, " differs from head 0 in dtype or device");
    RowViews rows = as_row_views({heads_in[h]}, targets_in[h]);
    const c10::optional<at::Tensor> positions = target_positions.get(h);
    const at::Tensor checked_target =
        positions.has_value() ? resized_target_stand_in(rows, *positions, h) : rows.target;
    const c10::optional<at::Tensor> cw = class_weights.get(h);
    ProblemShape shape = check_inputs(rows.heads, checked_target, cw, {head_weights[h]}, reduction);
    v.heads.push_back(rows.heads[0]);
    v.targets.push_back(rows.target);
    v.positions.push_back(positions.has_value() ? *positions : at::Tensor());
    v.class_weights.push_back(cw);
    v.shapes.push_back(shape);
  }
  if (reduction == kReductionNone) {
    for (size_t h = 1; h < H; ++h) {
      TORCH_CHECK(v.shapes[h].batch == v.shapes[0].batch && v.shapes[h].spatial == v.shapes[0].spatial,
                  "auxfuse: reduction none sums the heads' rows: head ", h, " has ", v.shapes[h].batch, " x ",
                  v.shapes[h].spatial, " rows, head 0 ", v.shapes[0].batch, " x ", v.shapes[0].spatial);
    }
  }
  return v;
}

struct PerHeadOutputs {
  at::Tensor loss, head_losses, head_correct, count, denom, invalid;
  std::vector<at::Tensor> grads;  // in the heads' own shapes, laid out like them (grad_mode 1; allocate_head_grad)

  PerHeadResult result() const { return {loss, head_losses, head_correct, count, denom, grads, invalid}; }
};

// One head's gradient, allocated in the head's own shape (N, C, d1, ..., dk) as the op returns it (no view per
// head) and laid out like the head's (N, C, S) view `rows`, as allocate_head_grads lays out the shared op's:
// class-innermost strides for a class-innermost head (channels_last), else contiguous. grad_row_strides gives
// the kernels its (N, C, S) strides.
inline at::Tensor allocate_head_grad(const at::Tensor& head, const at::Tensor& rows, at::Allocator* allocator) {
  const at::IntArrayRef sizes = head.sizes();
  const int64_t dims = head.dim();
  c10::SmallVector<int64_t, 6> strides(dims);
  int64_t step = 1;
  const bool class_innermost = rows.size(2) > 1 && rows.stride(1) == 1;
  if (class_innermost) {
    strides[1] = 1;
    step = std::max<int64_t>(sizes[1], 1);
  }
  for (int64_t d = dims - 1; d >= 0; --d) {
    if (class_innermost && d == 1) continue;
    strides[d] = step;
    step *= std::max<int64_t>(sizes[d], 1);
  }
  if (allocator == nullptr) return at::empty_strided(sizes, strides, head.options());
  return at::detail::empty_strided_generic(sizes, strides, allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                           head.scalar_type());
}

// The (N, C, S) strides of a gradient in its head's shape (allocate_head_grad) or of an (N, C, S) gradient: its
// spatial dimensions collapse into S with the last one's stride.
inline std::array<int64_t, 3> grad_row_strides(const at::Tensor& grad) {
  return {grad.stride(0), grad.stride(1), grad.dim() > 2 ? grad.stride(grad.dim() - 1) : 1};
}

inline PerHeadOutputs allocate_per_head_outputs(at::TensorList heads_in, const PerHeadViews& v, int64_t reduction,
                                                int64_t grad_mode, at::Allocator* grad_allocator) {
  const at::Tensor& h0 = v.heads[0];
  const int64_t H = v.heads.size();
  const auto acc_options = h0.options().dtype(at::toOpMathType(h0.scalar_type()));
  PerHeadOutputs out;
  out.loss = reduction == kReductionNone ? at::empty({v.shapes[0].batch, v.shapes[0].spatial}, acc_options)
                                         : at::empty({}, acc_options);
  out.head_losses = at::empty({H}, acc_options);
  out.head_correct = at::empty({H}, h0.options().dtype(at::kLong));
  out.count = at::empty({H}, h0.options().dtype(at::kLong));
  out.denom = at::empty({H}, acc_options);
  out.invalid = at::empty({}, h0.options().dtype(at::kLong));
  if (grad_mode == kGradInForward) {
    out.grads.reserve(H);
    for (int64_t h = 0; h < H; ++h) out.grads.push_back(allocate_head_grad(heads_in[h], v.heads[h], grad_allocator));
  }
  return out;
}

}  // namespace auxfuse
