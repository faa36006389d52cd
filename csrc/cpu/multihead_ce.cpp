// Fused CPU kernels of auxfuse::multihead_ce_forward and auxfuse::multihead_ce_backward (schema and output
// contract: csrc/auxfuse.cpp; per-row formulas: csrc/multihead_ce.h).
//
// Structure
//   1. A pre-pass over the class-index targets: counted rows, the mean's divisor and the first out-of-range
//      target, which raises a ValueError before any output is allocated or written.
//   2. One at::parallel_for over fixed blocks of work, handed to the threads dynamically. A block is a range of
//      rows (or of spatial tiles) for every head; each block writes its rows' outputs and one partial (loss sum
//      in double, top-1 hits) per head into its own slot; the partials are reduced afterwards in block order.
//   Two layouts, chosen from the heads' strides:
//   - row path (classifier heads, S == 1, or channels_last, class stride 1): one row at a time, vectorized
//     along the classes. Pass 1 reads the row (max; for probability targets the target's max and weighted
//     sum), pass 2 computes e = exp(x - max) once per logit, sums it (and the weighted sums of x - max that
//     label smoothing / probability targets need) and in grad_mode 1 keeps e in a per-thread fp32/fp64 row
//     buffer while prefetching the next row, pass 3 writes the gradient e * a - b * w_c from that buffer while
//     the row is in cache; the true class is written last from fp32 (p - 1 never rounded through bf16).
//   - spatial path (N, C, S) with a strided class dimension (segmentation): tiles of up to 2048 spatial
//     positions of one sample (the unit of the block partition), vectorized along S (each lane is one row).
//     The forward takes one vector of rows at a time through all passes, its running values in registers:
//     pass 1 reads the vector's C logits (one cache line per class plane) into a C x kW buffer in L1 and keeps
//     the per-lane max / argmax, pass 2 turns the buffer into exp(x - max) and sums it, a per-lane epilogue
//     applies multihead_ce.h, pass 3 writes each gradient element once (true class folded in).
//   Deterministic: the block partition depends only on the shape, never on the thread count; every row is
//   computed by the same instruction sequence wherever it runs (no alignment-dependent peeling); partial
//   sums are reduced in a fixed order.
//
// Every logit costs one exponential in the forward (grad_mode 1 included); the backward op (grad_mode 2,
// used by CUDA in production, here so the op contract is testable on CPU) recomputes exp(x - lse) once.

// Compiled once per instruction-set level (csrc/cpu/dispatch.cpp says how and which copy runs): as the baseline
// here, and included by multihead_ce_avx2.cpp and multihead_ce_avx512.cpp. cpu_capability.h names the level
// (CPU_CAPABILITY), which selects at::vec's SIMD implementation and names the namespace of this copy.
#include "cpu_capability.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "kernels.h"
#include "multihead_ce.h"
#include "ops_common.h"

namespace auxfuse {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

// ---------------------------------------------------------------------------------------------------------
// Loads and stores of kW elements of scalar_t as one vector of the accumulation type.

template <typename scalar_t>
struct IO {
  using acc_t = scalar_t;
  using Vec = Vectorized<acc_t>;
  static constexpr int kW = Vec::size();
  static Vec load(const scalar_t* p) { return Vec::loadu(p); }
  static Vec load(const scalar_t* p, int n) { return Vec::loadu(p, n); }  // lanes >= n are zero
  static void store(scalar_t* p, const Vec& v) { v.store(p); }
  static void store(scalar_t* p, const Vec& v, int n) { v.store(p, n); }
};

template <typename reduced_t>
struct ReducedIO {
  using acc_t = float;
  using Vec = Vectorized<float>;
  static constexpr int kW = Vec::size();
  static Vec load(const reduced_t* p) {
    Vec out;
    at::vec::load_to_float(p, out);
    return out;
  }
  static Vec load(const reduced_t* p, int n) {
    reduced_t buf[kW];
    for (int i = 0; i < kW; ++i) buf[i] = i < n ? p[i] : reduced_t(0.0f);
    return load(buf);
  }
  static void store(reduced_t* p, const Vec& v) { at::vec::convert_from_float<reduced_t>(v, v).store(p, kW); }
  static void store(reduced_t* p, const Vec& v, int n) { at::vec::convert_from_float<reduced_t>(v, v).store(p, n); }
};

template <>
struct IO<at::BFloat16> : ReducedIO<at::BFloat16> {};
template <>
struct IO<at::Half> : ReducedIO<at::Half> {};

// exp(x) for x <= ~88 (the kernels only take exp of x - max or x - lse). On AVX-512: 2^n * p(r) with
// n = round(x log2 e), r = x - n ln 2 (two-constant split) and Cephes' degree-7 polynomial for exp(r), scaled by
// vscalefps (which also gives the underflow to 0): 13 vector instructions, about 1-2 ulp; NaN stays NaN.
// Elsewhere at::vec's exp_u20 (a polynomial of the same kind, about 20 ulp).
inline Vectorized<float> vexp(const Vectorized<float>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-104.0f), v);  // max(lo, NaN) is NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
#else
  return v.exp_u20();
#endif
}
inline Vectorized<double> vexp(const Vectorized<double>& v) { return v.exp(); }

// exp of one value through the vector routine, so a recomputed element equals its vector neighbours' math.
template <typename acc_t>
inline acc_t sexp(acc_t x) {
  acc_t out[Vectorized<acc_t>::size()];
  vexp(Vectorized<acc_t>(x)).store(out);
  return out[0];
}

template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) { return a + b; },
                                        v);
}

// NaN-propagating horizontal max.
template <typename acc_t>
inline acc_t hmax(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) { return at::vec::maximum(a, b); }, v);
}

template <typename acc_t>
inline acc_t nan_value() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}

// ---------------------------------------------------------------------------------------------------------
// The problem, as raw pointers and strides.

template <typename scalar_t>
struct Args {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t H, N, C, S;
  std::vector<const scalar_t*> x;  // per head, element (n, c, s) at n*sN + c*sC + s*sS
  int64_t sN, sC, sS;
  bool prob;
  const int64_t* y;  // class-index target (n, s) at n*yN + s*yS
  int64_t yN, yS;
  const scalar_t* t;  // probability target (n, c, s) at n*tN + c*tC + s*tS
  int64_t tN, tC, tS;
  const acc_t* cw;  // class weights (C,), or nullptr
  acc_t W;          // sum of class weights (C without)
  int64_t ignore_index;
  acc_t eps;
  int64_t reduction;
  std::vector<acc_t> hw;  // head weights

  bool row_path() const { return S == 1 || sC == 1; }
  acc_t w(int64_t c) const { return cw ? cw[c] : acc_t(1); }
};

template <typename scalar_t>
Args<scalar_t> make_args(at::TensorList heads, const at::Tensor& target, const c10::optional<at::Tensor>& class_weight,
                         at::ArrayRef<double> head_weights, int64_t ignore_index, double label_smoothing,
                         int64_t reduction, const ProblemShape& shape) {
  using acc_t = at::opmath_type<scalar_t>;
  Args<scalar_t> a;
  a.H = shape.heads;
  a.N = shape.batch;
  a.C = shape.classes;
  a.S = shape.spatial;
  for (const auto& h : heads) a.x.push_back(h.const_data_ptr<scalar_t>());
  a.sN = heads[0].stride(0);
  a.sC = heads[0].stride(1);
  a.sS = heads[0].stride(2);
  a.prob = shape.prob_target;
  a.y = nullptr;
  a.t = nullptr;
  a.yN = a.yS = a.tN = a.tC = a.tS = 0;
  if (a.prob) {
    a.t = target.const_data_ptr<scalar_t>();
    a.tN = target.stride(0);
    a.tC = target.stride(1);
    a.tS = target.stride(2);
  } else {
    a.y = target.const_data_ptr<int64_t>();
    a.yN = target.stride(0);
    a.yS = target.stride(1);
  }
  a.cw = class_weight.has_value() ? class_weight->const_data_ptr<acc_t>() : nullptr;
  if (a.cw) {
    double sum = 0;
    for (int64_t c = 0; c < a.C; ++c) sum += static_cast<double>(a.cw[c]);
    a.W = static_cast<acc_t>(sum);
  } else {
    a.W = static_cast<acc_t>(a.C);
  }
  a.ignore_index = ignore_index;
  a.eps = static_cast<acc_t>(label_smoothing);
  a.reduction = reduction;
  for (double w : head_weights) a.hw.push_back(static_cast<acc_t>(w));
  return a;
}

// ---------------------------------------------------------------------------------------------------------
// Pre-pass over class-index targets: count, the mean's divisor, validation. Fixed blocks, fixed-order sum.

struct TargetStats {
  int64_t count = 0;
  double denom = 0;
};

// The void label of Pascal VOC-style masks: an invalid index that gets a hint (ignore_index=255).
constexpr int64_t kVoidLabel = 255;

template <typename scalar_t>
TargetStats scan_targets(const Args<scalar_t>& a) {
  const int64_t rows = a.N * a.S;
  TargetStats stats;
  if (a.prob) {
    stats.count = rows;
    stats.denom = static_cast<double>(rows);
    return stats;
  }
  constexpr int64_t kBlock = 8192;
  const int64_t blocks = (rows + kBlock - 1) / kBlock;
  std::vector<int64_t> counts(blocks, 0), bad(blocks, -1);
  std::vector<double> denoms(blocks, 0.0);
  // Parallel only from 1M targets on: below, a parallel region costs more than the scan.
  at::parallel_for(0, blocks, 128, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t count = 0, first_bad = -1;
      double denom = 0;
      const int64_t r1 = std::min(rows, (b + 1) * kBlock);
      for (int64_t r = b * kBlock; r < r1; ++r) {
        const int64_t y = a.y[(r / a.S) * a.yN + (r % a.S) * a.yS];
        if (y == a.ignore_index) continue;
        if (y < 0 || y >= a.C) {
          if (first_bad < 0) first_bad = r;
          continue;
        }
        ++count;
        denom += a.cw ? static_cast<double>(a.cw[y]) : 1.0;
      }
      counts[b] = count;
      denoms[b] = denom;
      bad[b] = first_bad;
    }
  });
  for (int64_t b = 0; b < blocks; ++b) {
    if (bad[b] >= 0) {
      const int64_t r = bad[b];
      const int64_t y = a.y[(r / a.S) * a.yN + (r % a.S) * a.yS];
      // The same words as the Python check in auxfuse/functional.py.
      TORCH_CHECK_VALUE(false, "auxfuse: target value ", y, " is outside [0, ", a.C, ") and is not ignore_index (",
                        a.ignore_index, ") (flattened position ", r, "); every class index must name one of the ",
                        a.C, " classes",
                        y == kVoidLabel ? "; segmentation masks often mark void pixels 255: pass ignore_index=255"
                                        : "");
    }
    stats.count += counts[b];
    stats.denom += denoms[b];
  }
  return stats;
}

// ---------------------------------------------------------------------------------------------------------
// Row path: one row, contiguous along the classes.

// Visits [0, C) in chunks of kW: f(c, n) with n = kW except for a shorter last chunk.
template <int kW, typename F>
inline void for_chunks(int64_t C, F&& f) {
  int64_t c = 0;
  for (; c + kW <= C; c += kW) f(c, kW);
  if (c < C) f(c, static_cast<int>(C - c));
}

// First index c with x[c] == target (NaN matches NaN), or -1.
template <typename scalar_t>
int64_t first_index_of(const scalar_t* x, int64_t C, at::opmath_type<scalar_t> target) {
  using io = IO<scalar_t>;
  using Vec = typename io::Vec;
  constexpr int kW = io::kW;
  const bool nan = std::isnan(target);
  const Vec tv(target);
  for (int64_t c = 0; c < C; c += kW) {
    const int n = static_cast<int>(std::min<int64_t>(kW, C - c));
    const Vec v = n == kW ? io::load(x + c) : io::load(x + c, n);
    const Vec eq = nan ? v.isnan() : (v == tv);
    const int64_t bits = static_cast<int64_t>(~static_cast<uint64_t>(eq.zero_mask())) & ((int64_t(1) << n) - 1);
    if (bits) return c + __builtin_ctzll(static_cast<uint64_t>(bits));
  }
  return -1;
}

// Pass 1 of a row: the max (NaN-propagating), and for probability targets the target's max and sum_c w_c t_c.
template <typename acc_t>
struct RowPass1 {
  acc_t max;
  acc_t wt;  // sum_c w_c t_c  (probability targets)
  acc_t tmax;
};

template <typename scalar_t, bool kProb>
RowPass1<at::opmath_type<scalar_t>> row_pass1(const scalar_t* x, const scalar_t* t, const at::opmath_type<scalar_t>* cw,
                                              int64_t C) {
  using io = IO<scalar_t>;
  using Vec = typename io::Vec;
  using acc_t = typename io::acc_t;
  constexpr int kW = io::kW;
  const Vec ninf(-std::numeric_limits<acc_t>::infinity());
  Vec vmax(ninf), vwt(0), vtmax(ninf);
  int64_t c0 = 0;
  if (!kProb) {
    // The common case: the max alone, with four independent chains (NaN-propagating max is 4 dependent ops).
    Vec m1(ninf), m2(ninf), m3(ninf);
    for (; c0 + 4 * kW <= C; c0 += 4 * kW) {
      vmax = at::vec::maximum(vmax, io::load(x + c0));
      m1 = at::vec::maximum(m1, io::load(x + c0 + kW));
      m2 = at::vec::maximum(m2, io::load(x + c0 + 2 * kW));
      m3 = at::vec::maximum(m3, io::load(x + c0 + 3 * kW));
    }
    vmax = at::vec::maximum(at::vec::maximum(vmax, m1), at::vec::maximum(m2, m3));
  }
  for_chunks<kW>(C - c0, [&](int64_t c, int n) {
    c += c0;
    const bool full = n == kW;
    const Vec xv = full ? io::load(x + c) : io::load(x + c, n);
    vmax = at::vec::maximum(vmax, full ? xv : Vec::set(ninf, xv, n));
    if (kProb) {
      const Vec tv = full ? io::load(t + c) : io::load(t + c, n);  // zero beyond n: harmless in the sum
      vwt = vwt + (cw ? (full ? Vec::loadu(cw + c) : Vec::loadu(cw + c, n)) * tv : tv);
      vtmax = at::vec::maximum(vtmax, full ? tv : Vec::set(ninf, tv, n));
    }
  });
  RowPass1<acc_t> r;
  r.max = hmax(vmax);
  r.wt = kProb ? hsum(vwt) : acc_t(0);
  r.tmax = kProb ? hmax(vtmax) : acc_t(0);
  return r;
}

// Pass 2 of a row: s = sum_c exp(x_c - m); with `e` non-null it also stores the exponentials there (C rounded up
// to kW). With kSums, the sums the loss needs for label smoothing / probability targets, taken relative to the
// max (d_c = x_c - m) so that they do not cancel against the log-sum-exp for large logits:
//   wd = sum_c w_c d_c,  wtd = sum_c w_c t_c d_c  (probability targets).
// `next` (optional): the row processed after this one, prefetched into L2 while the exponentials are computed
// (a new row's first pass otherwise waits on memory at every 4 KiB page).
template <typename acc_t>
struct RowPass2 {
  acc_t sum, wd, wtd;
};

template <typename scalar_t, bool kSums, bool kProb>
RowPass2<at::opmath_type<scalar_t>> row_pass2(const scalar_t* x, const scalar_t* t, const at::opmath_type<scalar_t>* cw,
                                              int64_t C, at::opmath_type<scalar_t> m, at::opmath_type<scalar_t>* e,
                                              const scalar_t* next, scalar_t* next_grad) {
  using io = IO<scalar_t>;
  using Vec = typename io::Vec;
  using acc_t = typename io::acc_t;
  constexpr int kW = io::kW;
  const Vec mv(m), zero(0);
  Vec s0(0), s1(0), vwd(0), vwtd(0);
  int64_t c = 0;
  if (!kSums) {
    for (; c + 2 * kW <= C; c += 2 * kW) {
      if (next) {
        for (int64_t k = 0; k < 2 * kW * int64_t(sizeof(scalar_t)); k += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(next + c) + k, 0, 2);
          if (next_grad) __builtin_prefetch(reinterpret_cast<const char*>(next_grad + c) + k, 1, 2);
        }
      }
      const Vec e0 = vexp(io::load(x + c) - mv);
      const Vec e1 = vexp(io::load(x + c + kW) - mv);
      if (e) {
        e0.store(e + c);
        e1.store(e + c + kW);
      }
      s0 = s0 + e0;
      s1 = s1 + e1;
    }
  }
  for (; c < C; c += kW) {
    const int n = static_cast<int>(std::min<int64_t>(kW, C - c));
    const bool full = n == kW;
    if (next) {
      for (int64_t k = 0; k < kW * int64_t(sizeof(scalar_t)); k += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(next + c) + k, 0, 2);
        if (next_grad) __builtin_prefetch(reinterpret_cast<const char*>(next_grad + c) + k, 1, 2);
      }
    }
    Vec d = (full ? io::load(x + c) : io::load(x + c, n)) - mv;
    if (!full) d = Vec::set(zero, d, n);  // lanes beyond n: d = 0, exp(d) = 1 (masked out of the sum below)
    Vec ev = vexp(d);
    if (e) ev.store(e + c);
    if (!full) ev = Vec::set(zero, ev, n);
    s0 = s0 + ev;
    if (kSums) {
      const Vec wv = cw ? (full ? Vec::loadu(cw + c) : Vec::loadu(cw + c, n)) : Vec(1);
      const Vec wd = cw ? wv * d : d;
      vwd = vwd + wd;
      if (kProb) vwtd = at::vec::fmadd(wd, full ? io::load(t + c) : io::load(t + c, n), vwtd);
    }
  }
  return {hsum(s0 + s1), kSums ? hsum(vwd) : acc_t(0), kProb ? hsum(vwtd) : acc_t(0)};
}

// Gradient of a class-index row: g_c = e_c * a - b * w_c (b = 0 without smoothing).
template <typename scalar_t>
void row_write_index_grad(scalar_t* g, const at::opmath_type<scalar_t>* e, const at::opmath_type<scalar_t>* cw,
                          int64_t C, at::opmath_type<scalar_t> a, at::opmath_type<scalar_t> b) {
  using io = IO<scalar_t>;
  using Vec = typename io::Vec;
  constexpr int kW = io::kW;
  const Vec av(a), bv(b);
  if (cw && b != 0) {
    for_chunks<kW>(C, [&](int64_t c, int n) {
      const Vec gv = at::vec::fmsub(Vec::loadu(e + c), av, bv * Vec::loadu(cw + c, n));
      n == kW ? io::store(g + c, gv) : io::store(g + c, gv, n);
    });
  } else {
    for_chunks<kW>(C, [&](int64_t c, int n) {
      const Vec gv = at::vec::fmsub(Vec::loadu(e + c), av, bv);
      n == kW ? io::store(g + c, gv) : io::store(g + c, gv, n);
    });
  }
}

// Gradient of a probability-target row: g_c = e_c * a - (b1 * t_c + b0) * w_c.
template <typename scalar_t>
void row_write_prob_grad(scalar_t* g, const at::opmath_type<scalar_t>* e, const scalar_t* t,
                         const at::opmath_type<scalar_t>* cw, int64_t C, at::opmath_type<scalar_t> a,
                         at::opmath_type<scalar_t> b1, at::opmath_type<scalar_t> b0) {
  using io = IO<scalar_t>;
  using Vec = typename io::Vec;
  constexpr int kW = io::kW;
  const Vec av(a), b1v(b1), b0v(b0);
  for_chunks<kW>(C, [&](int64_t c, int n) {
    const bool full = n == kW;
    const Vec tv = full ? io::load(t + c) : io::load(t + c, n);
    Vec minus = at::vec::fmadd(b1v, tv, b0v);
    if (cw) minus = minus * (full ? Vec::loadu(cw + c) : Vec::loadu(cw + c, n));
    const Vec gv = at::vec::fmsub(Vec::loadu(e + c), av, minus);
    full ? io::store(g + c, gv) : io::store(g + c, gv, n);
  });
}

// Copies a strided row into `buf` (for heads or targets whose class dimension is not contiguous).
// The gradient row of an ignored target, as PyTorch's: zero, except NaN where log_softmax of the row is NaN
// (a NaN or +inf logit, or every logit -inf), since autograd multiplies that NaN by the zero weight.
template <typename scalar_t>
void write_ignored_row_grad(scalar_t* g, const scalar_t* x, int64_t C) {
  float row_max = -INFINITY;
  bool nan_row = false;
  for (int64_t c = 0; c < C && !nan_row; ++c) {
    const float v = static_cast<float>(x[c]);
    nan_row = std::isnan(v) || v == INFINITY;
    row_max = std::max(row_max, v);
  }
  if (nan_row || row_max == -INFINITY) {
    std::fill(g, g + C, std::numeric_limits<scalar_t>::quiet_NaN());
  } else {
    std::memset(static_cast<void*>(g), 0, C * sizeof(scalar_t));
  }
}

template <typename scalar_t>
const scalar_t* contiguous_row(const scalar_t* p, int64_t stride, int64_t C, std::vector<scalar_t>& buf) {
  if (stride == 1) return p;
  for (int64_t c = 0; c < C; ++c) buf[c] = p[c * stride];
  return buf.data();
}

// Runs worker(next_block) on at::parallel_for's threads; each worker takes block indices from next_block()
// (a shared counter) until it returns >= blocks. Blocks are handed out dynamically, so a thread slowed down
// (another process on its core) does less of the work; no result depends on which thread ran a block.
template <typename F>
void parallel_blocks(int64_t blocks, const F& worker) {
  if (blocks <= 0) return;
  std::atomic<int64_t> counter{0};
  const auto next_block = [&counter]() { return counter.fetch_add(1, std::memory_order_relaxed); };
  const int64_t workers = std::min<int64_t>(blocks, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker(next_block); });
}

// Per-block partials: each block's unweighted loss sum (double) and top-1 hits, per head.
struct Partials {
  std::vector<double> loss;
  std::vector<int64_t> hits;
  Partials(int64_t blocks, int64_t heads) : loss(blocks * heads, 0.0), hits(blocks * heads, 0) {}
};

template <typename acc_t>
struct ForwardOut {
  acc_t* loss_rows;  // reduction none: (N * S) rows, else nullptr
  void* grad;        // grad_mode 1: (H, N, C, S) laid out like the heads, else nullptr
  acc_t* lse;        // grad_mode 2: (H, N * S), else nullptr
  acc_t grad_scale_denom;  // 1 / denom for mean, 1 otherwise
};

constexpr int64_t kBlockElements = 32768;  // logits of all heads per block (fixes the partition)

template <typename scalar_t, bool kProb>
void forward_rows(const Args<scalar_t>& a, const ForwardOut<at::opmath_type<scalar_t>>& out, Partials& part,
                  int64_t rows_per_block, int64_t blocks) {
  using acc_t = at::opmath_type<scalar_t>;
  using io = IO<scalar_t>;
  constexpr int kW = io::kW;
  const int64_t C = a.C, S = a.S, H = a.H;
  const int64_t rows = a.N * S;
  const int64_t C_pad = (C + kW - 1) / kW * kW;
  const bool need_wx = a.eps != acc_t(0);
  scalar_t* grad = static_cast<scalar_t*>(out.grad);
  parallel_blocks(blocks, [&](const auto& next_block) {
    std::unique_ptr<acc_t[]> ebuf(grad ? new acc_t[C_pad] : nullptr);
    std::vector<scalar_t> xbuf(a.sC != 1 ? C : 0), tbuf(kProb && a.tC != 1 ? C : 0);
    acc_t* e = ebuf.get();
    // The row after (h, r) in this worker's order, for prefetching (contiguous rows only). The next block is
    // taken one block ahead so that the last row of a block can prefetch the first row of the next.
    const auto row_ptr = [&](int64_t h, int64_t r) { return a.x[h] + (r / S) * a.sN + (r % S) * a.sS; };
    int64_t b_next = next_block();
    for (int64_t b = b_next; b < blocks; b = b_next) {
      b_next = next_block();
      const int64_t r0 = b * rows_per_block, r1 = std::min(rows, r0 + rows_per_block);
      for (int64_t h = 0; h < H; ++h) {
        const acc_t scale = a.hw[h] * out.grad_scale_denom;
        double loss_sum = 0;
        int64_t hits = 0;
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t n = r / S, s = r % S;
          const scalar_t* x = contiguous_row(a.x[h] + n * a.sN + s * a.sS, a.sC, C, xbuf);
          const scalar_t* next = nullptr;
          scalar_t* next_grad = nullptr;
          if (a.sC == 1) {
            int64_t h_next = h, r_next = r + 1;
            if (r + 1 >= r1) {
              h_next = h + 1 < H ? h + 1 : 0;
              r_next = h + 1 < H ? r0 : b_next * rows_per_block;
            }
            if (h_next != 0 || r_next < rows) {
              next = row_ptr(h_next, r_next);
              if (grad) next_grad = grad + (h_next * rows + r_next) * C;
            }
          }
          scalar_t* g = grad ? grad + (h * rows + r) * C : nullptr;
          acc_t row_loss = 0;
          if (kProb) {
            const scalar_t* t = contiguous_row(a.t + n * a.tN + s * a.tS, a.tC, C, tbuf);
            const RowPass1<acc_t> p1 = row_pass1<scalar_t, true>(x, t, a.cw, C);
            const RowPass2<acc_t> p2 = row_pass2<scalar_t, true, true>(x, t, a.cw, C, p1.max, e, next, next_grad);
            const acc_t sum = p2.sum;
            // The row's formulas with every logit shifted by the max (the loss is shift-invariant): max 0 and the
            // sums relative to the max, so nothing cancels for large logits.
            ProbRowSums<acc_t> sums{p1.wt, p2.wtd, p2.wd, p1.tmax, 0};
            const acc_t lse_coef = prob_target_lse_coef(sums, a.W, a.eps, C);
            const SoftmaxState<acc_t> st{acc_t(0), sum, 0};
            const bool finite = std::isfinite(p1.max);
            row_loss = finite ? prob_target_row_loss(st, log_acc(sum), sums, lse_coef, a.eps, C) : nan_value<acc_t>();
            hits += first_index_of(x, C, p1.max) == first_index_of(t, C, p1.tmax);
            if (g) {
              const acc_t ga = finite ? scale * lse_coef / sum : nan_value<acc_t>();
              row_write_prob_grad(g, e, t, a.cw, C, ga, scale * (acc_t(1) - a.eps), scale * a.eps / acc_t(C));
            }
            if (out.lse) out.lse[h * rows + r] = p1.max + std::log(sum);
          } else {
            const int64_t y = a.y[n * a.yN + s * a.yS];
            const bool counted = y != a.ignore_index;
            if (!counted && !out.lse) {
              if (g) write_ignored_row_grad(g, x, C);
            } else {
              const RowPass1<acc_t> p1 = row_pass1<scalar_t, false>(x, nullptr, a.cw, C);
              RowPass2<acc_t> p2;
              if (need_wx && counted) {
                p2 = row_pass2<scalar_t, true, false>(x, nullptr, a.cw, C, p1.max, e, next, next_grad);
              } else {
                p2 = row_pass2<scalar_t, false, false>(x, nullptr, a.cw, C, p1.max, counted ? e : nullptr, next,
                                                          next_grad);
              }
              const acc_t sum = p2.sum;
              if (out.lse) out.lse[h * rows + r] = p1.max + std::log(sum);
              if (!counted) {
                if (g) write_ignored_row_grad(g, x, C);
              } else {
                const bool finite = std::isfinite(p1.max);
                const acc_t w_y = a.w(y);
                const RowCoeffs<acc_t> k = index_target_coeffs(w_y, a.W, a.eps, C);
                // Shifted by the max, as above: max 0, x_y - m, and sum_c w_c (x_c - m).
                const SoftmaxState<acc_t> st{acc_t(0), sum, 0};
                const acc_t x_y = static_cast<acc_t>(x[y]);
                row_loss = finite ? index_target_row_loss(st, log_acc(sum), x_y - p1.max, p2.wd, a.W, k)
                                  : nan_value<acc_t>();
                hits += first_index_of(x, C, p1.max) == y;
                if (g) {
                  const acc_t ga = finite ? scale * k.lse_coef / sum : nan_value<acc_t>();
                  const acc_t gb = scale * k.smooth_coef;
                  row_write_index_grad(g, e, a.cw, C, ga, gb);
                  // The true class, from fp32 / fp64: p_y * a - b * w_y - (1 - eps) * w_y * scale.
                  g[y] = static_cast<scalar_t>(e[y] * ga - gb * w_y - scale * k.target_coef);
                }
              }
            }
          }
          loss_sum += static_cast<double>(row_loss);
          if (out.loss_rows) {
            const acc_t weighted = a.hw[h] * row_loss;
            out.loss_rows[r] = h == 0 ? weighted : out.loss_rows[r] + weighted;
          }
        }
        part.loss[b * H + h] = loss_sum;
        part.hits[b * H + h] = hits;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Spatial path: (N, C, S) with a strided class dimension. A tile is up to kMaxVecs * kW spatial positions of
// one sample; every vector lane is one row.

template <typename scalar_t>
struct Tile {
  using io = IO<scalar_t>;
  using Vec = typename io::Vec;
  using acc_t = typename io::acc_t;
  static constexpr int kW = io::kW;
  static constexpr int kMaxVecs = 128;

  // Loads positions [j*kW, j*kW + kW) of class row p (spatial stride ss), `valid` of them.
  static Vec load(const scalar_t* p, int64_t ss, int j, int valid) {
    const int n = std::min(kW, valid - j * kW);
    if (ss == 1) return n == kW ? io::load(p + j * kW) : io::load(p + j * kW, n);
    acc_t buf[kW];
    for (int l = 0; l < kW; ++l) buf[l] = l < n ? static_cast<acc_t>(p[(j * kW + l) * ss]) : acc_t(0);
    return Vec::loadu(buf);
  }
  static void store(scalar_t* p, int j, int valid, const Vec& v) {
    const int n = std::min(kW, valid - j * kW);
    n == kW ? io::store(p + j * kW, v) : io::store(p + j * kW, v, n);
  }
};

// Tile width (a multiple of kW): the backward's tile copy (C x width, acc type) stays within ~192 KiB (L2), and
// each class contributes a contiguous run of up to 8 KiB (long runs keep the hardware prefetchers streaming).
template <typename scalar_t>
int64_t tile_width(int64_t C, int64_t S) {
  using T = Tile<scalar_t>;
  const int64_t budget = 196608 / (C * static_cast<int64_t>(sizeof(typename T::acc_t)));
  int64_t width = std::max<int64_t>(1, std::min<int64_t>(budget / T::kW, T::kMaxVecs)) * T::kW;
  const int64_t s_pad = (S + T::kW - 1) / T::kW * T::kW;
  return std::min(width, s_pad);
}

template <typename scalar_t, bool kProb>
void forward_tiles(const Args<scalar_t>& a, const ForwardOut<at::opmath_type<scalar_t>>& out, Partials& part,
                   int64_t width, int64_t tiles_per_block, int64_t blocks) {
  using T = Tile<scalar_t>;
  using Vec = typename T::Vec;
  using acc_t = typename T::acc_t;
  constexpr int kW = T::kW;
  const int64_t C = a.C, S = a.S, H = a.H, N = a.N;
  const int64_t rows = N * S;
  const int64_t tiles_per_n = (S + width - 1) / width;
  const int64_t tiles = N * tiles_per_n;
  const bool need_wx = a.eps != acc_t(0);
  scalar_t* grad = static_cast<scalar_t*>(out.grad);
  const Vec ninf(-std::numeric_limits<acc_t>::infinity());
  parallel_blocks(blocks, [&](const auto& next_block) {
    // One vector of kW rows at a time goes through all three passes with its running values in registers;
    // its logits (then their exponentials) wait in `ev` (C x kW: in L1 for segmentation class counts).
    std::unique_ptr<acc_t[]> ebuf(new acc_t[C * kW]);
    acc_t* ev = ebuf.get();
    // Per-lane values for the scalar epilogue (the row math of multihead_ce.h), stored from the registers.
    acc_t vmax[kW], vidx[kW], vsum[kW], vlog[kW], vwx[kW], vwt[kW], vwtx[kW], vtidx[kW];
    acc_t la[kW], lb[kW], lfix[kW], ly[kW], xy[kW];
    for (int64_t b = next_block(); b < blocks; b = next_block()) {
      const int64_t u0 = b * tiles_per_block, u1 = std::min(tiles, u0 + tiles_per_block);
      for (int64_t h = 0; h < H; ++h) {
        const acc_t scale = a.hw[h] * out.grad_scale_denom;
        double loss_sum = 0;
        int64_t hits = 0;
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t n = u / tiles_per_n, s0 = (u % tiles_per_n) * width;
          const int valid = static_cast<int>(std::min(width, S - s0));
          const int nv = (valid + kW - 1) / kW;
          const scalar_t* xb = a.x[h] + n * a.sN + s0 * a.sS;
          const scalar_t* tb = kProb ? a.t + n * a.tN + s0 * a.tS : nullptr;
          for (int j = 0; j < nv; ++j) {
            const int o = j * kW;
            const int lanes = std::min(kW, valid - o);
            // Pass 1: per-lane max and first argmax over the classes (NaN wins, like argmax); for probability
            // targets the target's argmax and sum_c w_c t_c.
            Vec m(ninf), idx(0), wt(0), tm(ninf), tidx(0);
            for (int64_t c = 0; c < C; ++c) {
              const Vec cv(static_cast<acc_t>(c));
              const Vec xv = T::load(xb + c * a.sC, a.sS, j, valid);
              xv.store(ev + c * kW);
              const Vec gt = (xv > m) | (xv.isnan() & (m == m));
              m = Vec::blendv(m, xv, gt);
              idx = Vec::blendv(idx, cv, gt);
              if (kProb) {
                const Vec tv = T::load(tb + c * a.tC, a.tS, j, valid);
                wt = at::vec::fmadd(Vec(a.w(c)), tv, wt);
                const Vec tgt = (tv > tm) | (tv.isnan() & (tm == tm));
                tm = Vec::blendv(tm, tv, tgt);
                tidx = Vec::blendv(tidx, cv, tgt);
              }
            }
            if (!kProb) {  // the logit at each lane's target, before pass 2 overwrites `ev`
              for (int l = 0; l < kW; ++l) {
                const int64_t y = l < lanes ? a.y[n * a.yN + (s0 + o + l) * a.yS] : a.ignore_index;
                const bool counted = y != a.ignore_index;
                ly[l] = counted ? static_cast<acc_t>(y) : acc_t(-1);
                xy[l] = counted ? ev[y * kW + l] : acc_t(0);
              }
            }
            // Pass 2: exponentials (kept for pass 3) and their sum; the weighted sums the loss needs relative to
            // the max, d = x - m (no cancellation against the log-sum-exp for large logits).
            Vec sum(0), wx(0), wtx(0);
            for (int64_t c = 0; c < C; ++c) {
              const Vec d = Vec::loadu(ev + c * kW) - m;
              const Vec e = vexp(d);
              if (grad) e.store(ev + c * kW);
              sum = sum + e;
              if (need_wx || kProb) {
                const Vec wd = Vec(a.w(c)) * d;
                if (need_wx) wx = wx + wd;
                if (kProb) wtx = at::vec::fmadd(wd, T::load(tb + c * a.tC, a.tS, j, valid), wtx);
              }
            }
            m.store(vmax);
            idx.store(vidx);
            sum.store(vsum);
            sum.log().store(vlog);
            wx.store(vwx);
            wt.store(vwt);
            wtx.store(vwtx);
            tidx.store(vtidx);
            // Per-lane epilogue: loss, hits, lse, gradient coefficients.
            for (int l = 0; l < kW; ++l) {
              la[l] = lb[l] = lfix[l] = 0;
              if (l >= lanes) continue;
              const int64_t r = n * S + s0 + o + l;
              const acc_t ml = vmax[l], sl = vsum[l];
              const bool finite = std::isfinite(ml);
              const int64_t argmax = static_cast<int64_t>(vidx[l]);
              if (out.lse) out.lse[h * rows + r] = ml + vlog[l];
              acc_t row_loss = 0;
              if (kProb) {
                ProbRowSums<acc_t> sums{vwt[l], vwtx[l], vwx[l], 0, 0};
                const acc_t lse_coef = prob_target_lse_coef(sums, a.W, a.eps, C);
                row_loss = finite ? prob_target_row_loss(SoftmaxState<acc_t>{0, sl, 0}, vlog[l], sums, lse_coef,
                                                         a.eps, C)
                                  : nan_value<acc_t>();
                hits += argmax == static_cast<int64_t>(vtidx[l]);
                la[l] = finite ? scale * lse_coef / sl : nan_value<acc_t>();
                lb[l] = scale * (acc_t(1) - a.eps);
                lfix[l] = scale * a.eps / acc_t(C);
              } else if (ly[l] >= 0) {
                const int64_t y = static_cast<int64_t>(ly[l]);
                const acc_t w_y = a.w(y);
                const RowCoeffs<acc_t> k = index_target_coeffs(w_y, a.W, a.eps, C);
                row_loss = finite ? index_target_row_loss(SoftmaxState<acc_t>{0, sl, 0}, vlog[l], xy[l] - ml, vwx[l],
                                                          a.W, k)
                                  : nan_value<acc_t>();
                hits += argmax == y;
                la[l] = finite ? scale * k.lse_coef / sl : nan_value<acc_t>();
                lb[l] = scale * k.smooth_coef;
                lfix[l] = scale * k.target_coef;
              }
              loss_sum += static_cast<double>(row_loss);
              if (out.loss_rows) {
                const acc_t weighted = a.hw[h] * row_loss;
                out.loss_rows[r] = h == 0 ? weighted : out.loss_rows[r] + weighted;
              }
            }
            if (!grad) continue;
            // Pass 3: the gradient from the kept exponentials, every element written once:
            //   index: e * a - b * w_c - [c == y] * fix;  probability: e * a - (b * t_c + fix) * w_c.
            scalar_t* gb = grad + h * rows * C + n * C * S + s0;
            const Vec av = Vec::loadu(la), bv = Vec::loadu(lb), fv = Vec::loadu(lfix);
            const Vec yv = kProb ? Vec(0) : Vec::loadu(ly);
            for (int64_t c = 0; c < C; ++c) {
              const Vec wv(a.w(c));
              const Vec e = Vec::loadu(ev + c * kW);
              Vec gv;
              if (kProb) {
                gv = at::vec::fmsub(e, av, at::vec::fmadd(bv, T::load(tb + c * a.tC, a.tS, j, valid), fv) * wv);
              } else {
                gv = at::vec::fmsub(e, av, bv * wv);
                gv = gv - Vec::blendv(Vec(0), fv, yv == Vec(static_cast<acc_t>(c)));
              }
              T::store(gb + c * S, j, valid, gv);
            }
          }
        }
        part.loss[b * H + h] = loss_sum;
        part.hits[b * H + h] = hits;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Forward op.

ForwardResult forward_cpu(
    at::TensorList heads_in, const at::Tensor& target_in, const c10::optional<at::Tensor>& class_weight,
    at::ArrayRef<double> head_weights, int64_t ignore_index, double label_smoothing, int64_t reduction,
    int64_t grad_mode) {
  const RowViews rows = as_row_views(heads_in, target_in);
  const at::TensorList heads = rows.heads;
  const at::Tensor& target = rows.target;
  const ProblemShape shape = check_inputs(heads, target, class_weight, head_weights, reduction);
  TORCH_CHECK(grad_mode >= kNoGrad && grad_mode <= kSaveLse, "auxfuse: bad grad_mode ", grad_mode);
  TORCH_CHECK(heads[0].device().is_cpu(), "auxfuse: the CPU kernel got tensors on ", heads[0].device());
  ForwardOutputs outs;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, heads[0].scalar_type(), "auxfuse_multihead_ce_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Args<scalar_t> a =
        make_args<scalar_t>(heads, target, class_weight, head_weights, ignore_index, label_smoothing, reduction, shape);
    // Validates the targets: raises before any output exists.
    const TargetStats stats = scan_targets(a);
    outs = allocate_forward_outputs(heads, shape, reduction, grad_mode);
    const acc_t denom = static_cast<acc_t>(stats.denom);
    ForwardOut<acc_t> fo;
    fo.loss_rows = reduction == kReductionNone ? outs.loss.data_ptr<acc_t>() : nullptr;
    fo.grad = grad_mode == kGradInForward ? outs.saved.data_ptr() : nullptr;
    fo.lse = grad_mode == kSaveLse ? outs.saved.data_ptr<acc_t>() : nullptr;
    fo.grad_scale_denom = reduction == kReductionMean ? acc_t(1) / denom : acc_t(1);
    const int64_t rows = a.N * a.S;
    int64_t blocks = 0;
    Partials* part = nullptr;
    Partials storage(0, 0);
    if (a.row_path()) {
      if (fo.grad) {
        TORCH_INTERNAL_ASSERT(outs.saved.stride(2) == 1 || a.C == 1);
      }
      const int64_t rows_per_block = std::max<int64_t>(1, kBlockElements / (a.H * a.C));
      blocks = (rows + rows_per_block - 1) / rows_per_block;
      storage = Partials(blocks, a.H);
      part = &storage;
      if (a.prob) {
        forward_rows<scalar_t, true>(a, fo, *part, rows_per_block, blocks);
      } else {
        forward_rows<scalar_t, false>(a, fo, *part, rows_per_block, blocks);
      }
    } else {
      if (fo.grad) {
        TORCH_INTERNAL_ASSERT(outs.saved.is_contiguous());
      }
      const int64_t width = tile_width<scalar_t>(a.C, a.S);
      const int64_t tiles = a.N * ((a.S + width - 1) / width);
      const int64_t tiles_per_block = std::max<int64_t>(1, kBlockElements / (a.H * a.C * width));
      blocks = (tiles + tiles_per_block - 1) / tiles_per_block;
      storage = Partials(blocks, a.H);
      part = &storage;
      if (a.prob) {
        forward_tiles<scalar_t, true>(a, fo, *part, width, tiles_per_block, blocks);
      } else {
        forward_tiles<scalar_t, false>(a, fo, *part, width, tiles_per_block, blocks);
      }
    }
    // Fixed-order reduction of the block partials.
    std::vector<double> head_sum(a.H, 0.0);
    std::vector<int64_t> head_hits(a.H, 0);
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t h = 0; h < a.H; ++h) {
        head_sum[h] += part->loss[b * a.H + h];
        head_hits[h] += part->hits[b * a.H + h];
      }
    }
    acc_t* head_losses = outs.head_losses.data_ptr<acc_t>();
    int64_t* head_correct = outs.head_correct.data_ptr<int64_t>();
    double weighted = 0;
    for (int64_t h = 0; h < a.H; ++h) {
      weighted += static_cast<double>(a.hw[h]) * head_sum[h];
      head_losses[h] = reduction == kReductionSum ? static_cast<acc_t>(head_sum[h])
                                                  : static_cast<acc_t>(head_sum[h] / stats.denom);
      head_correct[h] = head_hits[h];
    }
    if (reduction == kReductionMean) {
      *outs.loss.data_ptr<acc_t>() = static_cast<acc_t>(weighted / stats.denom);
    } else if (reduction == kReductionSum) {
      *outs.loss.data_ptr<acc_t>() = static_cast<acc_t>(weighted);
    }
    *outs.count.data_ptr<int64_t>() = stats.count;
    *outs.denom.data_ptr<acc_t>() = denom;
    *outs.invalid.data_ptr<int64_t>() = 0;  // scan_targets raised for any
  });
  return outs.result(heads_in, grad_mode);
}

// ---------------------------------------------------------------------------------------------------------
// Backward op: gradients from the saved log-sum-exp, scaled by grad_loss.

template <typename acc_t>
struct BackwardIn {
  const acc_t* grad_loss;  // () or (N, S) with strides glN, glS
  int64_t glN, glS;
  bool per_row;
  const acc_t* lse;  // (H, N * S)
  acc_t inv_denom;   // 1 / denom for mean, else 1
};

template <typename scalar_t, bool kProb>
void backward_rows(const Args<scalar_t>& a, const BackwardIn<at::opmath_type<scalar_t>>& in, scalar_t* grad) {
  using acc_t = at::opmath_type<scalar_t>;
  using io = IO<scalar_t>;
  using Vec = typename io::Vec;
  constexpr int kW = io::kW;
  const int64_t C = a.C, S = a.S, H = a.H;
  const int64_t rows = a.N * S;
  const int64_t rows_per_block = std::max<int64_t>(1, kBlockElements / (H * C));
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  parallel_blocks(blocks, [&](const auto& next_block) {
    std::vector<scalar_t> xbuf(a.sC != 1 ? C : 0), tbuf(kProb && a.tC != 1 ? C : 0);
    for (int64_t b = next_block(); b < blocks; b = next_block()) {
      const int64_t r0 = b * rows_per_block, r1 = std::min(rows, r0 + rows_per_block);
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t n = r / S, s = r % S;
          scalar_t* g = grad + (h * rows + r) * C;
          const acc_t gl = in.per_row ? in.grad_loss[n * in.glN + s * in.glS] : in.grad_loss[0];
          const acc_t scale = gl * a.hw[h] * in.inv_denom;
          int64_t y = -1;
          const scalar_t* x = contiguous_row(a.x[h] + n * a.sN + s * a.sS, a.sC, C, xbuf);
          if (!kProb) {
            y = a.y[n * a.yN + s * a.yS];
            if (y == a.ignore_index) {
              write_ignored_row_grad(g, x, C);
              continue;
            }
          }
          const acc_t lse = in.lse[h * rows + r];
          const bool finite = std::isfinite(lse);
          const Vec lv(lse);
          if (kProb) {
            const scalar_t* t = contiguous_row(a.t + n * a.tN + s * a.tS, a.tC, C, tbuf);
            Vec vwt(0);
            for_chunks<kW>(C, [&](int64_t c, int nn) {
              const Vec tv = nn == kW ? io::load(t + c) : io::load(t + c, nn);
              vwt = a.cw ? at::vec::fmadd(nn == kW ? Vec::loadu(a.cw + c) : Vec::loadu(a.cw + c, nn), tv, vwt) : vwt + tv;
            });
            ProbRowSums<acc_t> sums{hsum(vwt), 0, 0, 0, 0};
            const acc_t lse_coef = prob_target_lse_coef(sums, a.W, a.eps, C);
            const Vec av(finite ? scale * lse_coef : nan_value<acc_t>());
            const Vec b1v(scale * (acc_t(1) - a.eps)), b0v(scale * a.eps / acc_t(C));
            for_chunks<kW>(C, [&](int64_t c, int nn) {
              const bool full = nn == kW;
              const Vec xv = full ? io::load(x + c) : io::load(x + c, nn);
              const Vec tv = full ? io::load(t + c) : io::load(t + c, nn);
              Vec minus = at::vec::fmadd(b1v, tv, b0v);
              if (a.cw) minus = minus * (full ? Vec::loadu(a.cw + c) : Vec::loadu(a.cw + c, nn));
              const Vec gv = at::vec::fmsub(vexp(xv - lv), av, minus);
              full ? io::store(g + c, gv) : io::store(g + c, gv, nn);
            });
          } else {
            const acc_t w_y = a.w(y);
            const RowCoeffs<acc_t> k = index_target_coeffs(w_y, a.W, a.eps, C);
            const acc_t ga = finite ? scale * k.lse_coef : nan_value<acc_t>();
            const acc_t gb = scale * k.smooth_coef;
            const Vec av(ga), bv(gb);
            for_chunks<kW>(C, [&](int64_t c, int nn) {
              const bool full = nn == kW;
              const Vec xv = full ? io::load(x + c) : io::load(x + c, nn);
              Vec minus = bv;
              if (a.cw) minus = minus * (full ? Vec::loadu(a.cw + c) : Vec::loadu(a.cw + c, nn));
              const Vec gv = at::vec::fmsub(vexp(xv - lv), av, minus);
              full ? io::store(g + c, gv) : io::store(g + c, gv, nn);
            });
            g[y] = static_cast<scalar_t>(sexp<acc_t>(static_cast<acc_t>(x[y]) - lse) * ga - gb * w_y -
                                         scale * k.target_coef);
          }
        }
      }
    }
  });
}

template <typename scalar_t, bool kProb>
void backward_tiles(const Args<scalar_t>& a, const BackwardIn<at::opmath_type<scalar_t>>& in, scalar_t* grad) {
  using T = Tile<scalar_t>;
  using Vec = typename T::Vec;
  using acc_t = typename T::acc_t;
  constexpr int kW = T::kW;
  constexpr int kLanes = T::kMaxVecs * kW;
  const int64_t C = a.C, S = a.S, H = a.H, N = a.N;
  const int64_t rows = N * S;
  const int64_t width = tile_width<scalar_t>(C, S);
  const int64_t tiles_per_n = (S + width - 1) / width;
  const int64_t tiles = N * tiles_per_n;
  const int64_t tiles_per_block = std::max<int64_t>(1, kBlockElements / (H * C * width));
  const int64_t blocks = (tiles + tiles_per_block - 1) / tiles_per_block;
  parallel_blocks(blocks, [&](const auto& next_block) {
    std::unique_ptr<acc_t[]> state(new acc_t[6 * kLanes]);
    acc_t* la = state.get();
    acc_t* lb = la + kLanes;
    acc_t* lfix = lb + kLanes;
    acc_t* ll = lfix + kLanes;
    acc_t* ly = ll + kLanes;
    acc_t* lwt = ly + kLanes;
    for (int64_t b = next_block(); b < blocks; b = next_block()) {
      const int64_t u0 = b * tiles_per_block, u1 = std::min(tiles, u0 + tiles_per_block);
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t n = u / tiles_per_n, s0 = (u % tiles_per_n) * width;
          const int valid = static_cast<int>(std::min(width, S - s0));
          const int nv = (valid + kW - 1) / kW;
          const scalar_t* xb = a.x[h] + n * a.sN + s0 * a.sS;
          const scalar_t* tb = kProb ? a.t + n * a.tN + s0 * a.tS : nullptr;
          if (kProb) {  // sum_c w_c t_c per lane
            for (int l = 0; l < nv * kW; ++l) lwt[l] = 0;
            for (int64_t c = 0; c < C; ++c) {
              const Vec wv(a.w(c));
              for (int j = 0; j < nv; ++j) {
                at::vec::fmadd(wv, T::load(tb + c * a.tC, a.tS, j, valid), Vec::loadu(lwt + j * kW)).store(lwt + j * kW);
              }
            }
          }
          for (int l = 0; l < nv * kW; ++l) {
            la[l] = lb[l] = lfix[l] = ll[l] = 0;
            ly[l] = -1;
            if (l >= valid) continue;
            const int64_t s = s0 + l, r = n * S + s;
            const acc_t gl = in.per_row ? in.grad_loss[n * in.glN + s * in.glS] : in.grad_loss[0];
            const acc_t scale = gl * a.hw[h] * in.inv_denom;
            const acc_t lse = in.lse[h * rows + r];
            const bool finite = std::isfinite(lse);
            ll[l] = finite ? lse : acc_t(0);
            if (kProb) {
              ProbRowSums<acc_t> sums{lwt[l], 0, 0, 0, 0};
              la[l] = finite ? scale * prob_target_lse_coef(sums, a.W, a.eps, C) : nan_value<acc_t>();
              lb[l] = scale * (acc_t(1) - a.eps);
              lfix[l] = scale * a.eps / acc_t(C);
            } else {
              const int64_t y = a.y[n * a.yN + s * a.yS];
              if (y == a.ignore_index) continue;
              const RowCoeffs<acc_t> k = index_target_coeffs(a.w(y), a.W, a.eps, C);
              la[l] = finite ? scale * k.lse_coef : nan_value<acc_t>();
              lb[l] = scale * k.smooth_coef;
              lfix[l] = scale * k.target_coef;
              ly[l] = static_cast<acc_t>(y);
            }
          }
          // One pass: index: exp(x - lse) * a - b * w_c - [c == y] * fix;
          //           probability: exp(x - lse) * a - (b * t_c + fix) * w_c.
          scalar_t* gb = grad + h * rows * C + n * C * S + s0;
          for (int64_t c = 0; c < C; ++c) {
            const Vec wv(a.w(c));
            const Vec cv(static_cast<acc_t>(c));
            for (int j = 0; j < nv; ++j) {
              const int o = j * kW;
              const Vec ev = vexp(T::load(xb + c * a.sC, a.sS, j, valid) - Vec::loadu(ll + o));
              const Vec av = Vec::loadu(la + o), bv = Vec::loadu(lb + o), fv = Vec::loadu(lfix + o);
              Vec gv;
              if (kProb) {
                gv = at::vec::fmsub(ev, av, at::vec::fmadd(bv, T::load(tb + c * a.tC, a.tS, j, valid), fv) * wv);
              } else {
                gv = at::vec::fmsub(ev, av, bv * wv) - Vec::blendv(Vec(0), fv, Vec::loadu(ly + o) == cv);
              }
              T::store(gb + c * S, j, valid, gv);
            }
          }
        }
      }
    }
  });
}

at::Tensor backward_cpu(const at::Tensor& grad_loss_in, at::TensorList heads_in, const at::Tensor& target_in,
                        const c10::optional<at::Tensor>& class_weight, at::ArrayRef<double> head_weights,
                        int64_t ignore_index, double label_smoothing, int64_t reduction, const at::Tensor& lse_in,
                        const at::Tensor& denom) {
  const RowViews rows = as_row_views(heads_in, target_in);
  const at::TensorList heads = rows.heads;
  const at::Tensor& target = rows.target;
  const ProblemShape shape = check_inputs(heads, target, class_weight, head_weights, reduction);
  const auto acc_type = at::toOpMathType(heads[0].scalar_type());
  TORCH_CHECK(heads[0].device().is_cpu(), "auxfuse: the CPU kernel got tensors on ", heads[0].device());
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == shape.heads && lse_in.size(1) == shape.batch &&
                  lse_in.size(2) == shape.spatial && lse_in.scalar_type() == acc_type,
              "auxfuse: lse must be (H, N, S) of ", acc_type, "; got ", lse_in.scalar_type(), " ", lse_in.sizes());
  TORCH_CHECK(denom.numel() == 1 && denom.scalar_type() == acc_type, "auxfuse: denom must be a scalar of ", acc_type);
  const bool per_row = reduction == kReductionNone;
  if (per_row) {
    TORCH_CHECK(grad_loss_in.dim() == 2 && grad_loss_in.size(0) == shape.batch && grad_loss_in.size(1) == shape.spatial,
                "auxfuse: grad_loss must be (N, S) for reduction none; got ", grad_loss_in.sizes());
  } else {
    TORCH_CHECK(grad_loss_in.numel() == 1, "auxfuse: grad_loss must be a scalar; got ", grad_loss_in.sizes());
  }
  const at::Tensor grad_loss = grad_loss_in.to(acc_type);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, heads[0].scalar_type(), "auxfuse_multihead_ce_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Args<scalar_t> a =
        make_args<scalar_t>(heads, target, class_weight, head_weights, ignore_index, label_smoothing, reduction, shape);
    scan_targets(a);  // never read a class out of bounds
    grads = allocate_head_grads(heads);
    BackwardIn<acc_t> in;
    in.grad_loss = grad_loss.const_data_ptr<acc_t>();
    in.per_row = per_row;
    in.glN = per_row ? grad_loss.stride(0) : 0;
    in.glS = per_row ? grad_loss.stride(1) : 0;
    in.lse = lse.const_data_ptr<acc_t>();
    in.inv_denom = reduction == kReductionMean ? acc_t(1) / denom.to(acc_type).item<acc_t>() : acc_t(1);
    if (a.row_path()) {
      if (a.prob) {
        backward_rows<scalar_t, true>(a, in, grads.data_ptr<scalar_t>());
      } else {
        backward_rows<scalar_t, false>(a, in, grads.data_ptr<scalar_t>());
      }
    } else {
      if (a.prob) {
        backward_tiles<scalar_t, true>(a, in, grads.data_ptr<scalar_t>());
      } else {
        backward_tiles<scalar_t, false>(a, in, grads.data_ptr<scalar_t>());
      }
    }
  });
  return grads_in_head_shape(grads, heads_in);
}

}  // namespace

const CpuKernels kKernels{&forward_cpu, &backward_cpu};

}  // namespace CPU_CAPABILITY
}  // namespace auxfuse
