// Per-row cross-entropy math shared by the CPU and CUDA kernels. Everything here works on one row of
// one head, in the accumulation type `acc_t` (float, or double for double logits), and has no memory
// access of its own: the kernels decide how rows are read and written.
//
// Notation for a row x[0..C) of one head: m = max_c x_c, s = sum_c exp(x_c - m), lse = m + log(s),
// p_c = exp(x_c - lse), eps = label_smoothing, w_c = class weight (1 without weights), W = sum_c w_c.
//
// Class-index target y (PyTorch's cross_entropy with label smoothing, per row):
//   loss = (1 - eps) * w_y * (lse - x_y) + eps / C * sum_c w_c * (lse - x_c)
//   grad_c = p_c * lse_coef - target_coef * [c == y] - smooth_coef * w_c
// with target_coef = (1 - eps) * w_y, smooth_coef = eps / C, lse_coef = target_coef + smooth_coef * W.
//
// Probability target t (t'_c = (1 - eps) * t_c + eps / C):
//   loss = sum_c w_c * t'_c * (lse - x_c)
//   grad_c = p_c * lse_coef - w_c * t'_c      with lse_coef = sum_c w_c * t'_c.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define AUXFUSE_HD __host__ __device__ __forceinline__
#else
#define AUXFUSE_HD inline
#endif

namespace auxfuse {

enum Reduction : int64_t { kReductionNone = 0, kReductionMean = 1, kReductionSum = 2 };
enum GradMode : int64_t { kNoGrad = 0, kGradInForward = 1, kSaveLse = 2 };

#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
AUXFUSE_HD float exp_acc(float x) { return __expf(x); }
AUXFUSE_HD float log_acc(float x) { return __logf(x); }
AUXFUSE_HD double exp_acc(double x) { return ::exp(x); }
AUXFUSE_HD double log_acc(double x) { return ::log(x); }
#else
inline float exp_acc(float x) { return std::exp(x); }
inline float log_acc(float x) { return std::log(x); }
inline double exp_acc(double x) { return std::exp(x); }
inline double log_acc(double x) { return std::log(x); }
#endif

// One head of a call, as every kernel reads it: the head table. The CPU kernels take a vector of these, the CUDA
// kernels a copy on the device, and the Triton backend builds the same fields (auxfuse/backends/triton.py).
// Each head has its own sizes, target and class weights (per-head targets: deep supervision, multi-token and
// multi-task heads); the heads of the shared-target op all point at one target. Element (n, c, s) of the
// logits is at x[n*sN + c*sC + s*sS]; row r = n*S + s.
template <typename scalar_t, typename acc_t>
struct HeadDesc {
  const scalar_t* x;   // logits
  int64_t N, C, S;     // N*S rows of C classes
  int64_t sN, sC, sS;  // logits' strides
  const int64_t* y;    // class-index target: (n, s) at y[n*yN + s*yS]; nullptr for probability targets
  int64_t yN, yS;
  const int64_t* y_pos;  // target_resize: (n, s) at y[n*yN + y_pos[s]*yS] of the full-resolution target, no
  int64_t y_spatial;     // downsampled copy (nullptr: the head's own target); y_spatial: y's positions per sample
  const scalar_t* t;   // probability target: (n, c, s) at t[n*tN + c*tC + s*tS]; nullptr for class indices
  int64_t tN, tC, tS;
  const acc_t* cw;     // class weights (C,), or nullptr
  acc_t weight_sum;    // sum of the class weights (C without); the CUDA kernel sums them itself (C here)
  acc_t weight;        // the head's loss weight w_h
  acc_t grad_scale;    // what the gradient is multiplied by: w_h, divided by the head's denominator for mean
                       // (on CUDA w_h: the kernel divides by the denominator of its pre-pass, on the device)
  scalar_t* grad;      // grad_mode 1: the gradient, laid out like the logits, at n*gN + c*gC + s*gS; else nullptr
  int64_t gN, gC, gS;
  acc_t* lse;          // grad_mode 2: the rows' log-sum-exp (N*S), else nullptr

  AUXFUSE_HD int64_t rows() const { return N * S; }
  // Where the class index of row (n, s) is read; y_pos entries are checked to lie in [0, y_spatial) by the
  // caller (CPU: before anything is written; CUDA: target_in_range, per row).
  AUXFUSE_HD int64_t target_offset(int64_t n, int64_t s) const { return n * yN + (y_pos ? y_pos[s] : s) * yS; }
  AUXFUSE_HD bool target_in_range(int64_t s) const { return !y_pos || (y_pos[s] >= 0 && y_pos[s] < y_spatial); }
  AUXFUSE_HD bool prob() const { return t != nullptr; }
  AUXFUSE_HD acc_t class_weight(int64_t c) const { return cw ? cw[c] : acc_t(1); }
};

// Running maximum (with the index of its first occurrence) and sum of exp(x - max) over part of a row.
// Merging partial states in any grouping gives the same max and argmax; the sum agrees to rounding.
template <typename acc_t>
struct SoftmaxState {
  acc_t max;
  acc_t sum;
  int64_t argmax;
};

template <typename acc_t>
AUXFUSE_HD SoftmaxState<acc_t> softmax_state_empty() {
  return {-INFINITY, acc_t(0), int64_t(-1)};
}

// NaN compares false everywhere: a NaN logit never becomes the max, but it reaches `sum` through
// exp(NaN - max) and makes the row's loss NaN, as in PyTorch.
template <typename acc_t>
AUXFUSE_HD void softmax_state_add(SoftmaxState<acc_t>& st, acc_t x, int64_t index) {
  if (x > st.max) {
    st.sum = st.sum * exp_acc(st.max - x) + acc_t(1);
    st.max = x;
    st.argmax = index;
  } else {
    st.sum += exp_acc(x - st.max);
  }
}

template <typename acc_t>
AUXFUSE_HD SoftmaxState<acc_t> softmax_state_merge(const SoftmaxState<acc_t>& a, const SoftmaxState<acc_t>& b) {
  if (b.argmax < 0) return a;
  if (a.argmax < 0) return b;
  const bool b_wins = b.max > a.max || (b.max == a.max && b.argmax < a.argmax);
  const SoftmaxState<acc_t>& hi = b_wins ? b : a;
  const SoftmaxState<acc_t>& lo = b_wins ? a : b;
  return {hi.max, hi.sum + lo.sum * exp_acc(lo.max - hi.max), hi.argmax};
}

// Coefficients of one row's loss and gradient (see the top of this file).
template <typename acc_t>
struct RowCoeffs {
  acc_t lse_coef;     // multiplies lse in the loss and p_c in the gradient
  acc_t target_coef;  // class-index targets: multiplies (lse - x_y) and [c == y]
  acc_t smooth_coef;  // multiplies w_c (class-index) ; unused for probability targets
};

template <typename acc_t>
AUXFUSE_HD RowCoeffs<acc_t> index_target_coeffs(acc_t w_y, acc_t weight_sum, acc_t eps, int64_t num_classes) {
  const acc_t target_coef = (acc_t(1) - eps) * w_y;
  const acc_t smooth_coef = eps / acc_t(num_classes);
  return {target_coef + smooth_coef * weight_sum, target_coef, smooth_coef};
}

// Loss of a counted row with a class-index target. `x_y_minus_max` = x_y - m; `weighted_logit_sum` =
// sum_c w_c x_c (needed only when eps > 0). Computing (x_y - m) - log(s) keeps precision for large logits.
// Shift invariance: the loss is unchanged when every logit moves by the same amount, so a caller may pass
// st.max = 0 and weighted_logit_sum = sum_c w_c (x_c - m). Do that when logits can be large: sum_c w_c x_c
// cancels against W * lse otherwise (fp32, offset 1e4, C = 300: 1e-5 relative error in the loss). The same
// holds for prob_target_row_loss (shift st.max and both logit sums of ProbRowSums).
// `log_sum` = log(st.sum), from the caller: a kernel that holds the sums of many rows in a vector takes their
// logarithms in one vector instruction sequence (the scalar log was most of the CPU spatial path's epilogue).
template <typename acc_t>
AUXFUSE_HD acc_t index_target_row_loss(const SoftmaxState<acc_t>& st, acc_t log_sum, acc_t x_y_minus_max,
                                       acc_t weighted_logit_sum, acc_t weight_sum, const RowCoeffs<acc_t>& k) {
  const acc_t log_s = log_sum;
  acc_t loss = k.target_coef * (log_s - x_y_minus_max);
  if (k.smooth_coef != acc_t(0)) {
    loss += k.smooth_coef * (weight_sum * (st.max + log_s) - weighted_logit_sum);
  }
  return loss;
}

// Probability targets: the per-row sums a kernel accumulates alongside the softmax state.
template <typename acc_t>
struct ProbRowSums {
  acc_t weighted_target;        // sum_c w_c t_c
  acc_t weighted_target_logit;  // sum_c w_c t_c x_c
  acc_t weighted_logit;         // sum_c w_c x_c (only when eps > 0)
  acc_t target_max;             // for the target's argmax (head_correct)
  int64_t target_argmax;
};

template <typename acc_t>
AUXFUSE_HD ProbRowSums<acc_t> prob_row_sums_empty() {
  return {acc_t(0), acc_t(0), acc_t(0), -INFINITY, int64_t(-1)};
}

template <typename acc_t>
AUXFUSE_HD void prob_row_sums_add(ProbRowSums<acc_t>& r, acc_t x, acc_t t, acc_t w, int64_t index) {
  r.weighted_target += w * t;
  r.weighted_target_logit += w * t * x;
  r.weighted_logit += w * x;
  if (t > r.target_max) {
    r.target_max = t;
    r.target_argmax = index;
  }
}

template <typename acc_t>
AUXFUSE_HD ProbRowSums<acc_t> prob_row_sums_merge(const ProbRowSums<acc_t>& a, const ProbRowSums<acc_t>& b) {
  const bool b_wins = b.target_argmax >= 0 &&
                      (a.target_argmax < 0 || b.target_max > a.target_max ||
                       (b.target_max == a.target_max && b.target_argmax < a.target_argmax));
  return {a.weighted_target + b.weighted_target, a.weighted_target_logit + b.weighted_target_logit,
          a.weighted_logit + b.weighted_logit, b_wins ? b.target_max : a.target_max,
          b_wins ? b.target_argmax : a.target_argmax};
}

template <typename acc_t>
AUXFUSE_HD acc_t prob_target_lse_coef(const ProbRowSums<acc_t>& r, acc_t weight_sum, acc_t eps, int64_t num_classes) {
  return (acc_t(1) - eps) * r.weighted_target + eps / acc_t(num_classes) * weight_sum;
}

template <typename acc_t>
AUXFUSE_HD acc_t prob_target_row_loss(const SoftmaxState<acc_t>& st, acc_t log_sum, const ProbRowSums<acc_t>& r,
                                      acc_t lse_coef, acc_t eps, int64_t num_classes) {
  const acc_t lse = st.max + log_sum;
  acc_t loss = lse_coef * lse - (acc_t(1) - eps) * r.weighted_target_logit;
  if (eps != acc_t(0)) loss -= eps / acc_t(num_classes) * r.weighted_logit;
  return loss;
}

// Gradient of one element, before the head weight and the reduction scale. p = exp(x - lse).
// Class-index: pass is_target = (c == y); probability: pass the element's w_c * t'_c as `minus_term`.
template <typename acc_t>
AUXFUSE_HD acc_t index_target_grad(acc_t p, bool is_target, acc_t w_c, const RowCoeffs<acc_t>& k) {
  return p * k.lse_coef - (is_target ? k.target_coef : acc_t(0)) - k.smooth_coef * w_c;
}

template <typename acc_t>
AUXFUSE_HD acc_t prob_target_grad(acc_t p, acc_t t, acc_t w_c, acc_t lse_coef, acc_t eps, int64_t num_classes) {
  return p * lse_coef - w_c * ((acc_t(1) - eps) * t + eps / acc_t(num_classes));
}

}  // namespace auxfuse
