// Fused CPU kernels of auxfuse::multihead_ce_forward, multihead_ce_per_head_forward and multihead_ce_backward
// (schema and output contract: csrc/auxfuse.cpp; per-row formulas and the head table: csrc/multihead_ce.h).
//
// Structure. Both forward ops describe their heads as a head table (one HeadDesc per head: logits, sizes,
// strides, target, class weights, loss weight, outputs); the shared-target op's heads all point at one target.
//   1. A pre-pass over each head's class-index targets (once for heads that share them): counted rows, the
//      mean's divisor and the first out-of-range target, which raises a ValueError before anything is written.
//   2. One at::parallel_for over fixed blocks of work, each thread taking its own range of them in order, then
//      what is left of the others' (parallel_blocks). Heads are grouped (consecutive heads with the same rows,
//      layout and kind of target: every head of the shared op); a block is a range of rows (or of spatial
//      tiles) for every head of its group, about kBlockElements logits, so the blocks of a 128 x 128 head and
//      of a 16 x 16 head balance across the threads. Each block
//      writes its rows' outputs and one partial (loss sum in double, top-1 hits) per head into its own slot;
//      the partials are reduced afterwards in block order.
//   Two layouts, chosen per head from its strides:
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
//     the per-lane max, pass 2 turns the buffer into exp(x - max), sums it and finds the argmax, a per-lane
//     epilogue applies multihead_ce.h, pass 3 writes each gradient element once (true class folded in).
//     Classifiers of at most 24 classes take this path too, their rows as one sample's positions
//     (lay_rows_in_lanes).
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
#include <string>
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
// n = round(x log2 e), r = x - n ln 2 (two-constant split), p(r) = 1 + r + r^2 q(r) with q a cubic fitted for the
// least relative error on |r| <= ln2 / 2 (Lawson's iteration, float32 coefficients), scaled by vscalefps (which
// also gives the underflow to 0): 11 vector instructions, at most 2.2 ulp (0.7 on average) from exp over
// [-87, 0], where Cephes' degree-7 polynomial took 13 for 0.9 ulp; NaN stays NaN. Elsewhere at::vec's exp_u20 (a
// polynomial of the same kind, about 20 ulp).
inline Vectorized<float> vexp(const Vectorized<float>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-104.0f), v);  // max(lo, NaN) is NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(8.3125075e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1890327e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6667110e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.9999230e-1f));
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
// The problem: the head table (HeadDesc, csrc/multihead_ce.h) and the options every head shares.

// The table entry, as a type of this compiled copy (the anonymous namespace of its CPU_CAPABILITY): the vector
// functions of std::vector<Head> are then this copy's own, never linked into another copy or baseline code.
template <typename scalar_t>
struct Head : HeadDesc<scalar_t, at::opmath_type<scalar_t>> {
  bool rows_in_lanes = false;  // a classifier head laid out for the spatial path (lay_rows_in_lanes)
};

template <typename scalar_t>
struct Args {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<Head<scalar_t>> head;
  int64_t ignore_index;
  acc_t eps;
  int64_t reduction;
};

// The row path takes heads whose rows are contiguous along the classes (classifiers, S == 1, or channels_last);
// the spatial path the others, (N, C, S) with a strided class dimension (segmentation).
template <typename Head>
bool row_path(const Head& d) {
  return !d.rows_in_lanes && (d.S == 1 || d.sC == 1);
}

// Classifier heads of few classes (multi-task and hierarchical heads): a row of the row path costs about 40 ns
// of dependent latency whatever its classes (horizontal max and sum, exp, log). The forward lays such a head out
// for the spatial path instead: its N rows are the spatial positions of one sample, kW rows per vector, no
// horizontal step; its strided loads and stores are scalar. Per row, fp32 forward with gradient, one thread of
// a 2-core AMD EPYC VM (AVX-512): 43 -> 20 ns at 10 classes, 61 -> 54 at 24, but 41 -> 55 at 32: the row path
// from 25 classes on.
constexpr int64_t kRowsInLanesMaxClasses = 24;

template <typename Head>
void lay_rows_in_lanes(Head& d) {
  if (d.S != 1 || d.N < 2 || d.C > kRowsInLanesMaxClasses || d.y_pos) return;
  d.S = d.N;
  d.sS = d.sN;
  d.yS = d.yN;
  d.tS = d.tN;
  d.gS = d.gN;
  d.N = 1;
  d.rows_in_lanes = true;
}

// One head's entry of the table, from its (N, C, S) view, its target view (with `positions`, target_resize: the
// full-resolution (N, S') target and where each of the head's S positions reads it) and class weights. The
// gradient and log-sum-exp pointers are set once the outputs exist, the grad scale once the targets are counted.
template <typename scalar_t>
Head<scalar_t> describe_head(const at::Tensor& head, const at::Tensor& target, const at::Tensor& positions,
                             const c10::optional<at::Tensor>& class_weight, double head_weight,
                             const ProblemShape& shape) {
  using acc_t = at::opmath_type<scalar_t>;
  Head<scalar_t> d{};
  describe_head_inputs(d, head, target, positions, class_weight, head_weight, shape.prob_target);
  double weight_sum = static_cast<double>(d.C);
  if (d.cw) {
    weight_sum = 0;
    for (int64_t c = 0; c < d.C; ++c) weight_sum += static_cast<double>(d.cw[c]);
  }
  d.weight_sum = static_cast<acc_t>(weight_sum);
  d.grad_scale = d.weight;
  return d;
}

// ---------------------------------------------------------------------------------------------------------
// Pre-pass over class-index targets: count, the mean's divisor, validation. Fixed blocks, fixed-order sum.

struct TargetStats {
  int64_t count = 0;
  double denom = 0;
};

// The void label of Pascal VOC-style masks: an invalid index that gets a hint (ignore_index=255).
constexpr int64_t kVoidLabel = 255;

// `head`: the head's index in the message (the per-head op), or -1.
template <typename Head>
TargetStats scan_targets(const Head& d, int64_t ignore_index, int64_t head = -1) {
  const int64_t rows = d.rows();
  TargetStats stats;
  if (d.prob()) {
    stats.count = rows;
    stats.denom = static_cast<double>(rows);
    return stats;
  }
  for (int64_t s = 0; d.y_pos && s < d.S; ++s) {  // target_resize's positions, before any is read
    TORCH_CHECK_VALUE(d.target_in_range(s), "auxfuse: ", head >= 0 ? "head " + std::to_string(head) + ": " : "",
                      "target position ", d.y_pos ? d.y_pos[s] : s, " of spatial element ", s,
                      " is outside the target's ", d.y_spatial, " positions per sample");
  }
  constexpr int64_t kBlock = 8192;
  const int64_t blocks = (rows + kBlock - 1) / kBlock;
  c10::SmallVector<int64_t, 4> counts(blocks, 0), bad(blocks, -1);  // heap memory only past 32K targets
  c10::SmallVector<double, 4> denoms(blocks, 0.0);
  // Parallel only from 1M targets on: below, a parallel region costs more than the scan.
  at::parallel_for(0, blocks, 128, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t count = 0, first_bad = -1;
      double denom = 0;
      const int64_t r1 = std::min(rows, (b + 1) * kBlock);
      int64_t n = b * kBlock / d.S, s = b * kBlock % d.S;  // row r = n * S + s, stepped (no division per row)
      for (int64_t r = b * kBlock; r < r1; ++r) {
        const int64_t y = d.y[d.target_offset(n, s)];
        if (++s == d.S) {
          s = 0;
          ++n;
        }
        if (y == ignore_index) continue;
        if (y < 0 || y >= d.C) {
          if (first_bad < 0) first_bad = r;
          continue;
        }
        ++count;
        denom += d.cw ? static_cast<double>(d.cw[y]) : 1.0;
      }
      counts[b] = count;
      denoms[b] = denom;
      bad[b] = first_bad;
    }
  });
  for (int64_t b = 0; b < blocks; ++b) {
    if (bad[b] >= 0) {
      const int64_t r = bad[b];
      const int64_t y = d.y[d.target_offset(r / d.S, r % d.S)];
      // The same words as the Python check in auxfuse/functional.py.
      const std::string which = head >= 0 ? "head " + std::to_string(head) + ": " : "";
      TORCH_CHECK_VALUE(false, "auxfuse: ", which, "target value ", y, " is outside [0, ", d.C,
                        ") and is not ignore_index (", ignore_index, ") (flattened position ", r,
                        "); every class index must name one of the ", d.C, " classes",
                        y == kVoidLabel ? "; segmentation masks often mark void pixels 255: pass ignore_index=255"
                                        : "");
    }
    stats.count += counts[b];
    stats.denom += denoms[b];
  }
  return stats;
}

// Every head's counts; a head reading the same targets with the same classes and class weights as the head
// before it (the shared-target op) reuses that head's scan. `name_heads`: errors say which head (per-head op).
template <typename scalar_t>
std::vector<TargetStats> scan_head_targets(const Args<scalar_t>& a, bool name_heads) {
  std::vector<TargetStats> stats;
  stats.reserve(a.head.size());
  for (size_t h = 0; h < a.head.size(); ++h) {
    const auto& d = a.head[h];
    if (h > 0) {
      const auto& p = a.head[h - 1];
      if (d.y == p.y && d.t == p.t && d.yN == p.yN && d.yS == p.yS && d.y_pos == p.y_pos && d.N == p.N &&
          d.S == p.S && d.C == p.C && d.cw == p.cw) {
        stats.push_back(stats.back());
        continue;
      }
    }
    stats.push_back(scan_targets(d, a.ignore_index, name_heads ? static_cast<int64_t>(h) : -1));
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

// Whether y is the row's argmax (its first maximum, NaN counting as the maximum, as torch.argmax): x_y = x[y]
// equals the max and no earlier logit does. Only rows whose target holds the max scan, and only up to y.
template <typename scalar_t>
bool is_first_max(const scalar_t* x, int64_t y, at::opmath_type<scalar_t> x_y, at::opmath_type<scalar_t> max) {
  const bool nan = std::isnan(max);
  if (nan ? !std::isnan(x_y) : x_y != max) return false;
  return first_index_of(x, y, max) < 0;
}

// Pass 1 of a row: the max (NaN-propagating), and for probability targets the target's max and sum_c w_c t_c.
template <typename acc_t>
struct RowPass1 {
  acc_t max;
  acc_t wt;  // sum_c w_c t_c  (probability targets)
  acc_t tmax;
};

// max(a, b) without NaN propagation: one instruction on x86 (at::vec::maximum's NaN test is two more). Only for
// a max whose row's NaN shows up later anyway (class-index rows: see row_pass1).
template <typename acc_t>
inline Vectorized<acc_t> max_ignoring_nan(const Vectorized<acc_t>& a, const Vectorized<acc_t>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) return _mm512_max_ps(a, b);
  if constexpr (std::is_same_v<acc_t, double>) return _mm512_max_pd(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) return _mm256_max_ps(a, b);
  if constexpr (std::is_same_v<acc_t, double>) return _mm256_max_pd(a, b);
#endif
  return at::vec::maximum(a, b);
}

// For class-index rows (!kProb) pass 1 takes the max with max_ignoring_nan: it is the true (NaN-propagating) max
// whenever pass 2's sum of exp(x - max) is not NaN, and a NaN, a +inf or an all -inf row always makes that sum
// NaN; only such a row scans again for the true max (row_true_max), which the loss and the argmax then use.
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
    // The common case: the max alone, with four independent chains.
    Vec m1(ninf), m2(ninf), m3(ninf);
    for (; c0 + 4 * kW <= C; c0 += 4 * kW) {
      vmax = max_ignoring_nan(vmax, io::load(x + c0));
      m1 = max_ignoring_nan(m1, io::load(x + c0 + kW));
      m2 = max_ignoring_nan(m2, io::load(x + c0 + 2 * kW));
      m3 = max_ignoring_nan(m3, io::load(x + c0 + 3 * kW));
    }
    vmax = max_ignoring_nan(max_ignoring_nan(vmax, m1), max_ignoring_nan(m2, m3));
  }
  for_chunks<kW>(C - c0, [&](int64_t c, int n) {
    c += c0;
    const bool full = n == kW;
    const Vec xv = full ? io::load(x + c) : io::load(x + c, n);
    const Vec masked = full ? xv : Vec::set(ninf, xv, n);
    vmax = kProb ? at::vec::maximum(vmax, masked) : max_ignoring_nan(vmax, masked);
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

// The NaN-propagating max of a row (a row whose pass 2 sum came out NaN: see row_pass1).
template <typename scalar_t>
at::opmath_type<scalar_t> row_true_max(const scalar_t* x, int64_t C) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t c = 0; c < C && !std::isnan(m); ++c) {
    const acc_t v = static_cast<acc_t>(x[c]);
    m = std::isnan(v) ? v : std::max(m, v);
  }
  return m;
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

// Gradient of a class-index row: g_c = e_c * a - b * w_c (b = 0 without smoothing). Returns sum_c e_c (the
// caller zeroes the true class's e first: the sum of the others, see forward_row_block).
template <typename scalar_t>
at::opmath_type<scalar_t> row_write_index_grad(scalar_t* g, const at::opmath_type<scalar_t>* e,
                                               const at::opmath_type<scalar_t>* cw, int64_t C,
                                               at::opmath_type<scalar_t> a, at::opmath_type<scalar_t> b) {
  using io = IO<scalar_t>;
  using Vec = typename io::Vec;
  constexpr int kW = io::kW;
  const Vec av(a), bv(b);
  Vec sum(0);
  if (cw && b != 0) {
    for_chunks<kW>(C, [&](int64_t c, int n) {
      const Vec ev = n == kW ? Vec::loadu(e + c) : Vec::loadu(e + c, n);
      sum = sum + ev;
      const Vec gv = at::vec::fmsub(ev, av, bv * Vec::loadu(cw + c, n));
      n == kW ? io::store(g + c, gv) : io::store(g + c, gv, n);
    });
  } else {
    for_chunks<kW>(C, [&](int64_t c, int n) {
      const Vec ev = n == kW ? Vec::loadu(e + c) : Vec::loadu(e + c, n);
      sum = sum + ev;
      const Vec gv = at::vec::fmsub(ev, av, bv);
      n == kW ? io::store(g + c, gv) : io::store(g + c, gv, n);
    });
  }
  return hsum(sum);
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

// Runs worker(next_block) on at::parallel_for's threads; each worker takes block indices from next_block() until
// it returns >= blocks. Each worker owns a contiguous range of the blocks and takes them in order (it streams
// through consecutive rows, the hardware prefetchers keep up, and a step's blocks go to the same thread as in
// the last step, so its gradient lines are still in that core's cache); a worker done with its range takes the
// blocks left in the others' ranges, so a thread slowed down (another process on its core) does less of the
// work. No result depends on which thread ran a block.
template <typename F>
void parallel_blocks(int64_t blocks, const F& worker) {
  if (blocks <= 0) return;
  const int64_t workers = std::min<int64_t>(blocks, at::get_num_threads());
  struct alignas(64) Range {  // one cache line each: a worker's claims do not contend with the others'
    std::atomic<int64_t> next;
    int64_t end;
  };
  std::vector<Range> ranges(workers);
  for (int64_t w = 0; w < workers; ++w) {
    ranges[w].next.store(w * blocks / workers, std::memory_order_relaxed);
    ranges[w].end = (w + 1) * blocks / workers;
  }
  at::parallel_for(0, workers, 1, [&](int64_t own, int64_t) {
    int64_t from = own;  // the range claimed from: its own first, then the others' in turn
    const auto next_block = [&]() {
      for (int64_t tried = 0; tried < workers; ++tried, from = (from + 1) % workers) {
        Range& r = ranges[from];
        if (r.next.load(std::memory_order_relaxed) < r.end) {
          const int64_t b = r.next.fetch_add(1, std::memory_order_relaxed);
          if (b < r.end) return b;
        }
      }
      return blocks;
    };
    worker(next_block);
  });
}

// Per-block partials: each block's unweighted loss sum (double) and top-1 hits, per head (0 for the heads a
// block does not cover).
struct Partials {
  std::vector<double> loss;
  std::vector<int64_t> hits;
  Partials(int64_t blocks, int64_t heads) : loss(blocks * heads, 0.0), hits(blocks * heads, 0) {}
};

constexpr int64_t kBlockElements = 8192;  // logits of all heads per block (fixes the partition)

// The unit of the block partition: consecutive heads with the same rows (N, S), path and kind of target, cut
// into blocks of rows (row path) or of spatial tiles (spatial path) covering every head of the group, so that a
// shared target is read once per block for all heads. Heads of other sizes are groups of their own; every block
// holds about kBlockElements logits and the blocks of all groups are numbered in one sequence that the threads
// share out (parallel_blocks), so a 128 x 128 head and a 16 x 16 head are balanced across the threads.
struct Group {
  int64_t h0, h1;  // heads [h0, h1)
  bool rows;       // row path, else spatial tiles
  bool prob;
  int64_t width;        // spatial path: positions per tile
  int64_t units;        // rows, or tiles
  int64_t per_block;    // units per block
  int64_t first_block;  // the group's blocks are [first_block, first_block + blocks)
  int64_t blocks;
};

template <typename scalar_t>
int64_t tile_width(int64_t C, int64_t S);

template <typename scalar_t>
std::vector<Group> make_groups(const Args<scalar_t>& a) {
  std::vector<Group> groups;
  const int64_t H = a.head.size();
  int64_t first_block = 0;
  for (int64_t h0 = 0; h0 < H;) {
    const auto& d = a.head[h0];
    int64_t h1 = h0 + 1, classes = d.C, max_classes = d.C;
    while (h1 < H && a.head[h1].N == d.N && a.head[h1].S == d.S && row_path(a.head[h1]) == row_path(d) &&
           a.head[h1].prob() == d.prob()) {
      classes += a.head[h1].C;
      max_classes = std::max(max_classes, a.head[h1].C);
      ++h1;
    }
    Group g{h0, h1, row_path(d), d.prob(), 1, d.rows(), 1, first_block, 0};
    if (g.rows) {
      g.per_block = std::max<int64_t>(1, kBlockElements / classes);
    } else {
      g.width = tile_width<scalar_t>(max_classes, d.S);
      g.units = d.N * ((d.S + g.width - 1) / g.width);
      g.per_block = std::max<int64_t>(1, kBlockElements / (classes * g.width));
    }
    g.blocks = (g.units + g.per_block - 1) / g.per_block;
    first_block += g.blocks;
    groups.push_back(g);
    h0 = h1;
  }
  return groups;
}

// A worker's buffers, sized for the largest head.
template <typename scalar_t>
struct Scratch {
  using acc_t = at::opmath_type<scalar_t>;
  std::unique_ptr<acc_t[]> exps;  // row path: a row's exponentials (C rounded up to kW); spatial: C x kW
  std::vector<scalar_t> x_row, t_row;  // strided rows copied contiguous
  explicit Scratch(const Args<scalar_t>& a) {
    constexpr int kW = IO<scalar_t>::kW;
    int64_t exps_size = 0, strided = 0;
    for (const auto& d : a.head) {
      exps_size = std::max(exps_size, row_path(d) ? (d.C + kW - 1) / kW * kW : d.C * kW);
      if (row_path(d) && (d.sC != 1 || (d.prob() && d.tC != 1))) strided = std::max(strided, d.C);
    }
    exps.reset(new acc_t[exps_size]);
    x_row.resize(strided);
    t_row.resize(strided);
  }
};

// Row r = n * S + s of a tensor with strides sN, sS. Classifier heads (S == 1) skip the two 64-bit divisions,
// which cost about as much as the rest of a 10-class row.
inline int64_t row_offset(int64_t r, int64_t S, int64_t sN, int64_t sS) {
  return S == 1 ? r * sN : (r / S) * sN + (r % S) * sS;
}

template <typename Head>
auto logit_row(const Head& d, int64_t r) {
  return d.x + row_offset(r, d.S, d.sN, d.sS);
}

template <typename Head>
auto grad_row(const Head& d, int64_t r) {
  return d.grad ? d.grad + row_offset(r, d.S, d.gN, d.gS) : nullptr;
}

// The rows [r0, r1) of the heads of group g: loss, hits, log-sum-exp, gradient (each as the head table asks).
// `after` / `after_grad`: the row this worker processes next after the block, prefetched while the last one is
// computed (a new row's first pass otherwise waits on memory at every 4 KiB page).
template <typename scalar_t, bool kProb>
void forward_row_block(const Args<scalar_t>& a, const Group& g, int64_t r0, int64_t r1, const scalar_t* after,
                       scalar_t* after_grad, Scratch<scalar_t>& scratch, double* loss_part, int64_t* hits_part,
                       at::opmath_type<scalar_t>* loss_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool need_wx = a.eps != acc_t(0);
  acc_t* e = scratch.exps.get();
  for (int64_t h = g.h0; h < g.h1; ++h) {
    const auto& d = a.head[h];
    const int64_t C = d.C;
    const acc_t scale = d.grad_scale;
    double loss_sum = 0;
    int64_t hits = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = d.S == 1 ? r : r / d.S, s = d.S == 1 ? 0 : r % d.S;
      const scalar_t* x = contiguous_row(logit_row(d, r), d.sC, C, scratch.x_row);
      const scalar_t* next = nullptr;
      scalar_t* next_grad = nullptr;
      if (d.sC == 1) {
        if (r + 1 < r1) {
          next = logit_row(d, r + 1);
          next_grad = grad_row(d, r + 1);
        } else if (h + 1 < g.h1) {
          next = logit_row(a.head[h + 1], r0);
          next_grad = grad_row(a.head[h + 1], r0);
        } else {
          next = after;
          next_grad = after_grad;
        }
      }
      scalar_t* gr = grad_row(d, r);
      acc_t row_loss = 0;
      if (kProb) {
        const scalar_t* t = contiguous_row(d.t + n * d.tN + s * d.tS, d.tC, C, scratch.t_row);
        const RowPass1<acc_t> p1 = row_pass1<scalar_t, true>(x, t, d.cw, C);
        const RowPass2<acc_t> p2 =
            row_pass2<scalar_t, true, true>(x, t, d.cw, C, p1.max, gr ? e : nullptr, next, next_grad);
        const acc_t sum = p2.sum;
        // The row's formulas with every logit shifted by the max (the loss is shift-invariant): max 0 and the
        // sums relative to the max, so nothing cancels for large logits.
        ProbRowSums<acc_t> sums{p1.wt, p2.wtd, p2.wd, p1.tmax, 0};
        const acc_t lse_coef = prob_target_lse_coef(sums, d.weight_sum, a.eps, C);
        const SoftmaxState<acc_t> st{acc_t(0), sum, 0};
        const bool finite = std::isfinite(p1.max);
        row_loss = finite ? prob_target_row_loss(st, log_acc(sum), sums, lse_coef, a.eps, C) : nan_value<acc_t>();
        hits += first_index_of(x, C, p1.max) == first_index_of(t, C, p1.tmax);
        if (gr) {
          const acc_t ga = finite ? scale * lse_coef / sum : nan_value<acc_t>();
          row_write_prob_grad(gr, e, t, d.cw, C, ga, scale * (acc_t(1) - a.eps), scale * a.eps / acc_t(C));
        }
        if (d.lse) d.lse[r] = p1.max + std::log(sum);
      } else {
        const int64_t y = d.y[d.target_offset(n, s)];
        const bool counted = y != a.ignore_index;
        if (!counted && !d.lse) {
          if (gr) write_ignored_row_grad(gr, x, C);
        } else {
          const RowPass1<acc_t> p1 = row_pass1<scalar_t, false>(x, nullptr, d.cw, C);
          acc_t* row_exps = counted && gr ? e : nullptr;
          const RowPass2<acc_t> p2 =
              need_wx && counted
                  ? row_pass2<scalar_t, true, false>(x, nullptr, d.cw, C, p1.max, row_exps, next, next_grad)
                  : row_pass2<scalar_t, false, false>(x, nullptr, d.cw, C, p1.max, row_exps, next, next_grad);
          const acc_t sum = p2.sum;
          const acc_t max = std::isnan(sum) ? row_true_max(x, C) : p1.max;
          if (d.lse) d.lse[r] = max + std::log(sum);
          if (!counted) {
            if (gr) write_ignored_row_grad(gr, x, C);
          } else {
            const bool finite = std::isfinite(max);
            const acc_t w_y = d.class_weight(y);
            const RowCoeffs<acc_t> k = index_target_coeffs(w_y, d.weight_sum, a.eps, C);
            // Shifted by the max, as above: max 0, x_y - m, and sum_c w_c (x_c - m).
            const SoftmaxState<acc_t> st{acc_t(0), sum, 0};
            const acc_t x_y = static_cast<acc_t>(x[y]);
            row_loss = finite ? index_target_row_loss(st, log_acc(sum), x_y - p1.max, p2.wd, d.weight_sum, k)
                              : nan_value<acc_t>();
            hits += is_first_max(x, y, x_y, max);
            if (gr) {
              const acc_t ga = finite ? scale * k.lse_coef / sum : nan_value<acc_t>();
              const acc_t gb = scale * k.smooth_coef;
              const acc_t e_y = e[y];
              e[y] = 0;
              const acc_t others = row_write_index_grad(gr, e, d.cw, C, ga, gb);
              // The true class, from fp32 / fp64: p_y * a - b * w_y - (1 - eps) * w_y * scale. A confident row
              // (p_y > 1/2) takes p_y = 1 - others / sum: e_y * a - scale * target_coef cancels there, and the
              // running sum (1 plus many tiny exponentials) has lost the last bits that 1 - p_y is made of (1%
              // of 1 - p_y at p_y = 1 - 1e-4 over 1000 classes); the others' sum, with no 1 in its lanes, has not.
              gr[y] = static_cast<scalar_t>(
                  finite && e_y > others
                      ? scale * ((k.lse_coef - k.target_coef) - k.lse_coef * (others / sum)) - gb * w_y
                      : e_y * ga - gb * w_y - scale * k.target_coef);
            }
          }
        }
      }
      loss_sum += static_cast<double>(row_loss);
      if (loss_rows) {
        const acc_t weighted = d.weight * row_loss;
        loss_rows[r] = h == g.h0 ? weighted : loss_rows[r] + weighted;
      }
    }
    loss_part[h] = loss_sum;
    hits_part[h] = hits;
  }
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
  // Stores positions [j*kW, j*kW + kW) of class row p (spatial stride ss), `valid` of them.
  static void store(scalar_t* p, int64_t ss, int j, int valid, const Vec& v) {
    const int n = std::min(kW, valid - j * kW);
    if (ss == 1) {
      n == kW ? io::store(p + j * kW, v) : io::store(p + j * kW, v, n);
      return;
    }
    acc_t buf[kW];
    v.store(buf);
    for (int l = 0; l < n; ++l) p[(j * kW + l) * ss] = static_cast<scalar_t>(buf[l]);
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

// Pass 1 of a vector of kW rows: per-lane max over the classes (NaN-propagating), the logits kept in `ev`
// (C x kW); for probability targets the target's max and sum_c w_c t_c. Only the max is carried from class to
// class: tracking the argmax here too made a chain of about 12 cycles per class (mask, blend, compare).
// Passes 1 and 2 are functions of their own (not inlined): inside forward_tile_block's many live values the
// compiler kept their running values on the stack, a store and reload per class in the loop-carried chain.
template <typename Vec>
struct TilePass1 {
  Vec max, wt, tmax;
};

template <typename scalar_t, bool kProb>
C10_NOINLINE TilePass1<typename Tile<scalar_t>::Vec> tile_pass1(const Head<scalar_t>& d, const scalar_t* xb,
                                                               const scalar_t* tb, int j, int valid,
                                                               at::opmath_type<scalar_t>* ev) {
  using T = Tile<scalar_t>;
  using Vec = typename T::Vec;
  using acc_t = typename T::acc_t;
  constexpr int kW = T::kW;
  const Vec ninf(-std::numeric_limits<acc_t>::infinity());
  Vec m0(ninf), m1(ninf), wt(0), tm(ninf);  // two chains: even and odd classes
  for (int64_t c = 0; c < d.C; ++c) {
    const Vec xv = T::load(xb + c * d.sC, d.sS, j, valid);
    xv.store(ev + c * kW);
    if (c % 2) {
      m1 = at::vec::maximum(m1, xv);
    } else {
      m0 = at::vec::maximum(m0, xv);
    }
    if (kProb) {
      const Vec tv = T::load(tb + c * d.tC, d.tS, j, valid);
      wt = at::vec::fmadd(Vec(d.class_weight(c)), tv, wt);
      tm = at::vec::maximum(tm, tv);
    }
  }
  return {at::vec::maximum(m0, m1), wt, tm};
}

// Pass 2, over the classes from the last to the first: exponentials (kept in `ev` for pass 3 when the head has a
// gradient) and their sum; the first argmax of the logits (and of the targets), as torch.argmax: the smallest
// class equal to the max, or the first NaN where the max is NaN (the last class found wins, off the chain).
// With kSums, the weighted sums the loss needs relative to the max, x - m (no cancellation against the
// log-sum-exp for large logits): wx = sum_c w_c (x_c - m), and for probability targets wtx = sum_c w_c t_c
// (x_c - m).
template <typename Vec>
struct TilePass2 {
  Vec sum, wx, wtx, idx, tidx;
};

template <typename Vec>
inline Vec equal_or_both_nan(const Vec& v, const Vec& m, const Vec& m_nan) {
  return (v == m) | (v.isnan() & m_nan);
}

// `next_x` / `next_grad` (or nullptr): where the next vector of rows starts in class plane 0 of the logits and of
// the gradient (unit spatial stride), prefetched one class plane per step: with a plane per class the vectors'
// lines come from C streams at once, more than the hardware prefetchers follow, and a gradient line written
// without it waits for its read-for-ownership.
template <typename scalar_t, bool kSums, bool kProb>
C10_NOINLINE TilePass2<typename Tile<scalar_t>::Vec> tile_pass2(const Head<scalar_t>& d,
                                                               const TilePass1<typename Tile<scalar_t>::Vec>& p1,
                                                               const scalar_t* tb, int j, int valid,
                                                               at::opmath_type<scalar_t>* ev, const scalar_t* next_x,
                                                               scalar_t* next_grad) {
  using T = Tile<scalar_t>;
  using Vec = typename T::Vec;
  using acc_t = typename T::acc_t;
  constexpr int kW = T::kW;
  const Vec m = p1.max, m_nan = m.isnan(), tm_nan = p1.tmax.isnan();
  Vec sum(0), wx(0), wtx(0), idx(0), tidx(0);
  for (int64_t c = d.C - 1; c >= 0; --c) {
    if (next_x) __builtin_prefetch(next_x + c * d.sC, 0, 2);
    if (next_grad) __builtin_prefetch(next_grad + c * d.gC, 1, 2);
    const Vec cv(static_cast<acc_t>(c));
    const Vec xv = Vec::loadu(ev + c * kW);
    idx = Vec::blendv(idx, cv, equal_or_both_nan(xv, m, m_nan));
    const Vec shifted = xv - m;
    const Vec e = vexp(shifted);
    if (d.grad) e.store(ev + c * kW);
    sum = sum + e;
    if (kSums) {
      const Vec wd = Vec(d.class_weight(c)) * shifted;
      wx = wx + wd;
      if (kProb) {
        const Vec tv = T::load(tb + c * d.tC, d.tS, j, valid);
        wtx = at::vec::fmadd(wd, tv, wtx);
        tidx = Vec::blendv(tidx, cv, equal_or_both_nan(tv, p1.tmax, tm_nan));
      }
    }
  }
  return {sum, wx, wtx, idx, tidx};
}

template <typename scalar_t, bool kProb>
void forward_tile_block(const Args<scalar_t>& a, const Group& g, int64_t u0, int64_t u1,
                        Scratch<scalar_t>& scratch, double* loss_part, int64_t* hits_part,
                        at::opmath_type<scalar_t>* loss_rows) {
  using T = Tile<scalar_t>;
  using Vec = typename T::Vec;
  using acc_t = typename T::acc_t;
  constexpr int kW = T::kW;
  const int64_t S = a.head[g.h0].S, width = g.width;
  const int64_t tiles_per_n = (S + width - 1) / width;
  const bool need_wx = a.eps != acc_t(0);
  // One vector of kW rows at a time goes through all three passes with its running values in registers;
  // its logits (then their exponentials) wait in `ev` (C x kW: in L1 for segmentation class counts).
  acc_t* ev = scratch.exps.get();
  // Per-lane values for the epilogue, stored from the registers.
  acc_t vmax[kW], vidx[kW], vsum[kW], vlog[kW], vwx[kW], vwt[kW], vwtx[kW], vtidx[kW];
  acc_t la[kW], lb[kW], lfix[kW], ly[kW], xy[kW], wy[kW];
  for (int64_t h = g.h0; h < g.h1; ++h) {
    const auto& d = a.head[h];
    const int64_t C = d.C;
    const acc_t scale = d.grad_scale;
    double loss_sum = 0;
    int64_t hits = 0;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / tiles_per_n, s0 = (u % tiles_per_n) * width;
      const int valid = static_cast<int>(std::min(width, S - s0));
      const int nv = (valid + kW - 1) / kW;
      const scalar_t* xb = d.x + n * d.sN + s0 * d.sS;
      const scalar_t* tb = kProb ? d.t + n * d.tN + s0 * d.tS : nullptr;
      scalar_t* gb = d.grad ? d.grad + n * d.gN + s0 * d.gS : nullptr;
      for (int j = 0; j < nv; ++j) {
        const int o = j * kW;
        const int lanes = std::min(kW, valid - o);
        // Pass 1: per-lane max over the classes; for probability targets the target's max and sum_c w_c t_c.
        const TilePass1<Vec> p1 = tile_pass1<scalar_t, kProb>(d, xb, tb, j, valid, ev);
        const Vec m = p1.max, wt = p1.wt;
        if (!kProb) {  // the logit at each lane's target, before pass 2 overwrites `ev`
          for (int l = 0; l < kW; ++l) {
            const int64_t y = l < lanes ? d.y[d.target_offset(n, s0 + o + l)] : a.ignore_index;
            const bool counted = y != a.ignore_index;
            ly[l] = counted ? static_cast<acc_t>(y) : acc_t(-1);
            xy[l] = counted ? ev[y * kW + l] : acc_t(0);
          }
        }
        // Pass 2: exponentials (kept for pass 3), their sum, the argmax and the sums the loss needs.
        const bool next_in_tile = j + 1 < nv;
        const scalar_t* next_x = next_in_tile && d.sS == 1 ? xb + o + kW : nullptr;
        scalar_t* next_grad = next_in_tile && gb && d.gS == 1 ? gb + o + kW : nullptr;
        const TilePass2<Vec> p2 =
            need_wx || kProb ? tile_pass2<scalar_t, true, kProb>(d, p1, tb, j, valid, ev, next_x, next_grad)
                             : tile_pass2<scalar_t, false, false>(d, p1, tb, j, valid, ev, next_x, next_grad);
        const Vec sum = p2.sum, wx = p2.wx, wtx = p2.wtx, idx = p2.idx, tidx = p2.tidx;
        if (kProb) {
          m.store(vmax);
          idx.store(vidx);
          sum.store(vsum);
          sum.log().store(vlog);
          wx.store(vwx);
          wt.store(vwt);
          wtx.store(vwtx);
          tidx.store(vtidx);
        }
        // Epilogue: loss, hits, lse, gradient coefficients. Class indices: in vector registers, every lane at
        // once (per lane, it cost as much as the three passes at segmentation class counts); probabilities: per
        // lane, the row math of multihead_ce.h.
        acc_t row_losses[kW];
        if (!kProb) {
          const Vec y = Vec::loadu(ly);
          const Vec counted = y >= Vec(0);  // ly is -1 for ignored rows and padding lanes
          const Vec finite = (m - m) == Vec(0);  // false for an infinite or NaN max
          const Vec nan(nan_value<acc_t>()), zero(0);
          Vec w_y(1);
          if (d.cw) {
            for (int l = 0; l < kW; ++l) wy[l] = ly[l] >= 0 ? d.cw[static_cast<int64_t>(ly[l])] : acc_t(0);
            w_y = Vec::loadu(wy);
          }
          const Vec target_coef = Vec(acc_t(1) - a.eps) * w_y;  // index_target_coeffs, per lane
          const acc_t smooth_coef = a.eps / acc_t(C);
          const Vec lse_coef = target_coef + Vec(smooth_coef * d.weight_sum);
          const Vec log_sum = sum.log();
          // index_target_row_loss with the max shifted to 0 (wx holds sum_c w_c (x_c - m)).
          Vec loss = target_coef * (log_sum - (Vec::loadu(xy) - m));
          if (smooth_coef != acc_t(0)) loss = loss + Vec(smooth_coef) * (Vec(d.weight_sum) * log_sum - wx);
          Vec::blendv(zero, Vec::blendv(nan, loss, finite), counted).store(row_losses);
          Vec::blendv(zero, Vec::blendv(nan, Vec(scale) * lse_coef / sum, finite), counted).store(la);
          Vec::blendv(zero, Vec(scale * smooth_coef), counted).store(lb);
          Vec::blendv(zero, Vec(scale) * target_coef, counted).store(lfix);
          hits += static_cast<int64_t>(hsum(Vec::blendv(zero, Vec(1), (idx == y) & counted)));
          if (d.lse) {
            (m + log_sum).store(vmax);
            for (int l = 0; l < lanes; ++l) d.lse[n * S + s0 + o + l] = vmax[l];
          }
        } else {
          for (int l = 0; l < kW; ++l) {
            la[l] = lb[l] = lfix[l] = row_losses[l] = 0;
            if (l >= lanes) continue;
            const int64_t r = n * S + s0 + o + l;
            const acc_t ml = vmax[l], sl = vsum[l];
            const bool finite = std::isfinite(ml);
            if (d.lse) d.lse[r] = ml + vlog[l];
            ProbRowSums<acc_t> sums{vwt[l], vwtx[l], vwx[l], 0, 0};
            const acc_t lse_coef = prob_target_lse_coef(sums, d.weight_sum, a.eps, C);
            row_losses[l] = finite ? prob_target_row_loss(SoftmaxState<acc_t>{0, sl, 0}, vlog[l], sums, lse_coef,
                                                          a.eps, C)
                                   : nan_value<acc_t>();
            hits += static_cast<int64_t>(vidx[l]) == static_cast<int64_t>(vtidx[l]);
            la[l] = finite ? scale * lse_coef / sl : nan_value<acc_t>();
            lb[l] = scale * (acc_t(1) - a.eps);
            lfix[l] = scale * a.eps / acc_t(C);
          }
        }
        for (int l = 0; l < lanes; ++l) {
          loss_sum += static_cast<double>(row_losses[l]);
          if (loss_rows) {
            const int64_t r = n * S + s0 + o + l;
            const acc_t weighted = d.weight * row_losses[l];
            loss_rows[r] = h == g.h0 ? weighted : loss_rows[r] + weighted;
          }
        }
        if (!gb) continue;
        // Pass 3: the gradient from the kept exponentials, every element written once:
        //   index: e * a - b * w_c - [c == y] * fix;  probability: e * a - (b * t_c + fix) * w_c.
        const Vec av = Vec::loadu(la), bv = Vec::loadu(lb), fv = Vec::loadu(lfix);
        const Vec yv = kProb ? Vec(0) : Vec::loadu(ly);
        for (int64_t c = 0; c < C; ++c) {
          const Vec wv(d.class_weight(c));
          const Vec e = Vec::loadu(ev + c * kW);
          Vec gv;
          if (kProb) {
            gv = at::vec::fmsub(e, av, at::vec::fmadd(bv, T::load(tb + c * d.tC, d.tS, j, valid), fv) * wv);
          } else {
            gv = at::vec::fmsub(e, av, bv * wv);
            gv = gv - Vec::blendv(Vec(0), fv, yv == Vec(static_cast<acc_t>(c)));
          }
          T::store(gb + c * d.gC, d.gS, j, valid, gv);
        }
      }
    }
    loss_part[h] = loss_sum;
    hits_part[h] = hits;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward: every head of the table in one parallel region, then the fixed-order reduction over the blocks.

struct HeadTotals {
  std::vector<double> loss;  // per head: the sum of its rows' unweighted losses
  std::vector<int64_t> hits;
};

// `loss_rows`: for reduction none the (N * S) rows every head adds its weighted loss to (the heads then share N
// and S), else nullptr.
template <typename scalar_t>
HeadTotals run_forward(const Args<scalar_t>& a, at::opmath_type<scalar_t>* loss_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<Group> groups = make_groups(a);
  const int64_t H = a.head.size();
  const int64_t blocks = groups.back().first_block + groups.back().blocks;
  // With several groups over the same rows (heads of other layouts or target kinds), every group after the
  // first sums into rows of its own, added in group order afterwards: no row is written by two threads.
  std::vector<std::vector<acc_t>> group_rows_storage;
  std::vector<acc_t*> group_rows(groups.size(), loss_rows);
  if (loss_rows) {
    for (size_t i = 1; i < groups.size(); ++i) {
      group_rows_storage.emplace_back(a.head[0].rows());
      group_rows[i] = group_rows_storage.back().data();
    }
  }
  const auto group_of = [&groups](int64_t b) {
    size_t i = 0;
    while (b >= groups[i].first_block + groups[i].blocks) ++i;
    return i;
  };
  Partials part(blocks, H);
  parallel_blocks(blocks, [&](const auto& next_block) {
    Scratch<scalar_t> scratch(a);
    // The next block is taken one ahead, so that the last row of a block can prefetch the first of the next.
    int64_t b_next = next_block();
    for (int64_t b = b_next; b < blocks; b = b_next) {
      b_next = next_block();
      const size_t gi = group_of(b);
      const Group& g = groups[gi];
      const int64_t u0 = (b - g.first_block) * g.per_block, u1 = std::min(g.units, u0 + g.per_block);
      double* loss_part = part.loss.data() + b * H;
      int64_t* hits_part = part.hits.data() + b * H;
      if (g.rows) {
        const scalar_t* after = nullptr;
        scalar_t* after_grad = nullptr;
        const Group* gn = b_next < blocks ? &groups[group_of(b_next)] : nullptr;
        if (gn && gn->rows) {
          const int64_t r = (b_next - gn->first_block) * gn->per_block;
          after = logit_row(a.head[gn->h0], r);
          after_grad = grad_row(a.head[gn->h0], r);
        }
        if (g.prob) {
          forward_row_block<scalar_t, true>(a, g, u0, u1, after, after_grad, scratch, loss_part, hits_part,
                                            group_rows[gi]);
        } else {
          forward_row_block<scalar_t, false>(a, g, u0, u1, after, after_grad, scratch, loss_part, hits_part,
                                             group_rows[gi]);
        }
      } else if (g.prob) {
        forward_tile_block<scalar_t, true>(a, g, u0, u1, scratch, loss_part, hits_part, group_rows[gi]);
      } else {
        forward_tile_block<scalar_t, false>(a, g, u0, u1, scratch, loss_part, hits_part, group_rows[gi]);
      }
    }
  });
  for (const std::vector<acc_t>& rows : group_rows_storage) {
    for (size_t r = 0; r < rows.size(); ++r) loss_rows[r] += rows[r];
  }
  HeadTotals totals{std::vector<double>(H, 0.0), std::vector<int64_t>(H, 0)};
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      totals.loss[h] += part.loss[b * H + h];
      totals.hits[h] += part.hits[b * H + h];
    }
  }
  return totals;
}

// Points head h's table entry at its outputs: its gradient `grad` ((N, C, S), or in the head's shape), laid out
// like the head (the row path writes rows contiguous along the classes, the spatial path planes contiguous along
// S), or its log-sum-exp rows `lse`; and folds the mean's divisor into its gradient scale.
template <typename scalar_t>
void attach_outputs(Head<scalar_t>& d, const at::Tensor& grad,
                    at::opmath_type<scalar_t>* lse, const TargetStats& stats, int64_t reduction) {
  using acc_t = at::opmath_type<scalar_t>;
  if (grad.defined()) {
    d.grad = grad.data_ptr<scalar_t>();
    // grad_row_strides (ops_common.h), spelled out here: an inline function of the shared header called from
    // this file could be linked into another instruction-set copy (tests/test_cpu_capability.py).
    d.gN = grad.stride(0);
    d.gC = grad.stride(1);
    d.gS = grad.dim() > 2 ? grad.stride(grad.dim() - 1) : 1;
    TORCH_INTERNAL_ASSERT(row_path(d) ? (d.gC == 1 || d.C == 1) : d.gS == 1);
  }
  d.lse = lse;
  if (reduction == kReductionMean) d.grad_scale = d.weight * (acc_t(1) / static_cast<acc_t>(stats.denom));
}

// The reduced outputs: each head's loss (its sum, or its mean over its own divisor) and hits, and the total.
template <typename scalar_t>
void write_totals(const Args<scalar_t>& a, const HeadTotals& totals, const std::vector<TargetStats>& stats,
                  const at::Tensor& loss, const at::Tensor& head_losses, const at::Tensor& head_correct) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* head_loss = head_losses.data_ptr<acc_t>();
  int64_t* hits = head_correct.data_ptr<int64_t>();
  double total = 0;
  for (size_t h = 0; h < a.head.size(); ++h) {
    const double head = a.reduction == kReductionSum ? totals.loss[h] : totals.loss[h] / stats[h].denom;
    total += static_cast<double>(a.head[h].weight) * head;
    head_loss[h] = static_cast<acc_t>(head);
    hits[h] = totals.hits[h];
  }
  if (a.reduction != kReductionNone) *loss.data_ptr<acc_t>() = static_cast<acc_t>(total);
}

template <typename scalar_t>
Args<scalar_t> make_args(int64_t ignore_index, double label_smoothing, int64_t reduction) {
  Args<scalar_t> a;
  a.ignore_index = ignore_index;
  a.eps = static_cast<at::opmath_type<scalar_t>>(label_smoothing);
  a.reduction = reduction;
  return a;
}

ForwardResult forward_cpu(at::TensorList heads_in, const at::Tensor& target_in,
                          const c10::optional<at::Tensor>& class_weight, at::ArrayRef<double> head_weights,
                          int64_t ignore_index, double label_smoothing, int64_t reduction, int64_t grad_mode) {
  const RowViews rows = as_row_views(heads_in, target_in);
  const at::TensorList heads = rows.heads;
  const at::Tensor& target = rows.target;
  const ProblemShape shape = check_inputs(heads, target, class_weight, head_weights, reduction);
  TORCH_CHECK(grad_mode >= kNoGrad && grad_mode <= kSaveLse, "auxfuse: bad grad_mode ", grad_mode);
  TORCH_CHECK(heads[0].device().is_cpu(), "auxfuse: the CPU kernel got tensors on ", heads[0].device());
  ForwardOutputs outs;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, heads[0].scalar_type(), "auxfuse_multihead_ce_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Args<scalar_t> a = make_args<scalar_t>(ignore_index, label_smoothing, reduction);
    a.head.reserve(heads.size());
    for (size_t h = 0; h < heads.size(); ++h) {
      a.head.push_back(describe_head<scalar_t>(heads[h], target, at::Tensor(), class_weight, head_weights[h], shape));
    }
    // Validates the targets (one scan: every head reads the same): raises before any output exists.
    const std::vector<TargetStats> stats = scan_head_targets(a, /*name_heads=*/false);
    outs = allocate_forward_outputs(heads, shape, reduction, grad_mode, cpu_gradient_allocator());
    for (size_t h = 0; h < heads.size(); ++h) {
      attach_outputs(a.head[h], grad_mode == kGradInForward ? outs.saved.select(0, h) : at::Tensor(),
                     grad_mode == kSaveLse ? outs.saved.data_ptr<acc_t>() + h * shape.rows() : nullptr, stats[h],
                     reduction);
      lay_rows_in_lanes(a.head[h]);
    }
    const HeadTotals totals = run_forward(a, reduction == kReductionNone ? outs.loss.data_ptr<acc_t>() : nullptr);
    write_totals(a, totals, stats, outs.loss, outs.head_losses, outs.head_correct);
    *outs.count.data_ptr<int64_t>() = stats[0].count;
    *outs.denom.data_ptr<acc_t>() = static_cast<acc_t>(stats[0].denom);
    *outs.invalid.data_ptr<int64_t>() = 0;  // scan_targets raised for any
  });
  return outs.result(heads_in, grad_mode);
}

// The per-head op's kernel. Its inputs are checked and its outputs allocated by the caller (dispatch.cpp, baseline
// code): this file is compiled once per instruction-set level, and an inline function of std::vector<at::Tensor>
// instantiated here could be linked into baseline code with AVX instructions in it (tests/test_cpu_capability.py).
void forward_per_head_cpu(const PerHeadViews& v, const PerHeadOutputs& outs, at::ArrayRef<double> head_weights,
                          int64_t ignore_index, double label_smoothing, int64_t reduction) {
  const int64_t H = head_weights.size();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.heads[0].scalar_type(),
                                  "auxfuse_multihead_ce_per_head_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Args<scalar_t> a = make_args<scalar_t>(ignore_index, label_smoothing, reduction);
    a.head.reserve(H);
    for (int64_t h = 0; h < H; ++h) {
      a.head.push_back(
          describe_head<scalar_t>(v.heads[h], v.targets[h], v.positions[h], v.class_weights[h], head_weights[h],
                                  v.shapes[h]));
    }
    const std::vector<TargetStats> stats = scan_head_targets(a, /*name_heads=*/true);  // raises before any write
    const bool with_grads = !outs.grads.empty();
    for (int64_t h = 0; h < H; ++h) {
      attach_outputs(a.head[h], with_grads ? outs.grads[h] : at::Tensor(), nullptr, stats[h], reduction);
      lay_rows_in_lanes(a.head[h]);
    }
    const HeadTotals totals = run_forward(a, reduction == kReductionNone ? outs.loss.data_ptr<acc_t>() : nullptr);
    write_totals(a, totals, stats, outs.loss, outs.head_losses, outs.head_correct);
    int64_t* count = outs.count.data_ptr<int64_t>();
    acc_t* denom = outs.denom.data_ptr<acc_t>();
    for (int64_t h = 0; h < H; ++h) {
      count[h] = stats[h].count;
      denom[h] = static_cast<acc_t>(stats[h].denom);
    }
    *outs.invalid.data_ptr<int64_t>() = 0;  // scan_targets raised for any
  });
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
  const auto& d = a.head[0];  // every head shares its sizes, target and class weights here
  const int64_t C = d.C, S = d.S, H = a.head.size();
  const int64_t rows = d.N * S;
  const int64_t rows_per_block = std::max<int64_t>(1, kBlockElements / (H * C));
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  parallel_blocks(blocks, [&](const auto& next_block) {
    std::vector<scalar_t> xbuf(d.sC != 1 ? C : 0), tbuf(kProb && d.tC != 1 ? C : 0);
    for (int64_t b = next_block(); b < blocks; b = next_block()) {
      const int64_t r0 = b * rows_per_block, r1 = std::min(rows, r0 + rows_per_block);
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t n = r / S, s = r % S;
          scalar_t* g = grad + (h * rows + r) * C;
          const acc_t gl = in.per_row ? in.grad_loss[n * in.glN + s * in.glS] : in.grad_loss[0];
          const acc_t scale = gl * a.head[h].weight * in.inv_denom;
          int64_t y = -1;
          const scalar_t* x = contiguous_row(a.head[h].x + n * d.sN + s * d.sS, d.sC, C, xbuf);
          if (!kProb) {
            y = d.y[d.target_offset(n, s)];
            if (y == a.ignore_index) {
              write_ignored_row_grad(g, x, C);
              continue;
            }
          }
          const acc_t lse = in.lse[h * rows + r];
          const bool finite = std::isfinite(lse);
          const Vec lv(lse);
          if (kProb) {
            const scalar_t* t = contiguous_row(d.t + n * d.tN + s * d.tS, d.tC, C, tbuf);
            Vec vwt(0);
            for_chunks<kW>(C, [&](int64_t c, int nn) {
              const Vec tv = nn == kW ? io::load(t + c) : io::load(t + c, nn);
              vwt = d.cw ? at::vec::fmadd(nn == kW ? Vec::loadu(d.cw + c) : Vec::loadu(d.cw + c, nn), tv, vwt) : vwt + tv;
            });
            ProbRowSums<acc_t> sums{hsum(vwt), 0, 0, 0, 0};
            const acc_t lse_coef = prob_target_lse_coef(sums, d.weight_sum, a.eps, C);
            const Vec av(finite ? scale * lse_coef : nan_value<acc_t>());
            const Vec b1v(scale * (acc_t(1) - a.eps)), b0v(scale * a.eps / acc_t(C));
            for_chunks<kW>(C, [&](int64_t c, int nn) {
              const bool full = nn == kW;
              const Vec xv = full ? io::load(x + c) : io::load(x + c, nn);
              const Vec tv = full ? io::load(t + c) : io::load(t + c, nn);
              Vec minus = at::vec::fmadd(b1v, tv, b0v);
              if (d.cw) minus = minus * (full ? Vec::loadu(d.cw + c) : Vec::loadu(d.cw + c, nn));
              const Vec gv = at::vec::fmsub(vexp(xv - lv), av, minus);
              full ? io::store(g + c, gv) : io::store(g + c, gv, nn);
            });
          } else {
            const acc_t w_y = d.class_weight(y);
            const RowCoeffs<acc_t> k = index_target_coeffs(w_y, d.weight_sum, a.eps, C);
            const acc_t ga = finite ? scale * k.lse_coef : nan_value<acc_t>();
            const acc_t gb = scale * k.smooth_coef;
            const Vec av(ga), bv(gb);
            for_chunks<kW>(C, [&](int64_t c, int nn) {
              const bool full = nn == kW;
              const Vec xv = full ? io::load(x + c) : io::load(x + c, nn);
              Vec minus = bv;
              if (d.cw) minus = minus * (full ? Vec::loadu(d.cw + c) : Vec::loadu(d.cw + c, nn));
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
  const auto& d = a.head[0];  // every head shares its sizes, target and class weights here
  const int64_t C = d.C, S = d.S, H = a.head.size(), N = d.N;
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
          const scalar_t* xb = a.head[h].x + n * d.sN + s0 * d.sS;
          const scalar_t* tb = kProb ? d.t + n * d.tN + s0 * d.tS : nullptr;
          if (kProb) {  // sum_c w_c t_c per lane
            for (int l = 0; l < nv * kW; ++l) lwt[l] = 0;
            for (int64_t c = 0; c < C; ++c) {
              const Vec wv(d.class_weight(c));
              for (int j = 0; j < nv; ++j) {
                at::vec::fmadd(wv, T::load(tb + c * d.tC, d.tS, j, valid), Vec::loadu(lwt + j * kW)).store(lwt + j * kW);
              }
            }
          }
          for (int l = 0; l < nv * kW; ++l) {
            la[l] = lb[l] = lfix[l] = ll[l] = 0;
            ly[l] = -1;
            if (l >= valid) continue;
            const int64_t s = s0 + l, r = n * S + s;
            const acc_t gl = in.per_row ? in.grad_loss[n * in.glN + s * in.glS] : in.grad_loss[0];
            const acc_t scale = gl * a.head[h].weight * in.inv_denom;
            const acc_t lse = in.lse[h * rows + r];
            const bool finite = std::isfinite(lse);
            ll[l] = finite ? lse : acc_t(0);
            if (kProb) {
              ProbRowSums<acc_t> sums{lwt[l], 0, 0, 0, 0};
              la[l] = finite ? scale * prob_target_lse_coef(sums, d.weight_sum, a.eps, C) : nan_value<acc_t>();
              lb[l] = scale * (acc_t(1) - a.eps);
              lfix[l] = scale * a.eps / acc_t(C);
            } else {
              const int64_t y = d.y[d.target_offset(n, s)];
              if (y == a.ignore_index) continue;
              const RowCoeffs<acc_t> k = index_target_coeffs(d.class_weight(y), d.weight_sum, a.eps, C);
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
            const Vec wv(d.class_weight(c));
            const Vec cv(static_cast<acc_t>(c));
            for (int j = 0; j < nv; ++j) {
              const int o = j * kW;
              const Vec ev = vexp(T::load(xb + c * d.sC, d.sS, j, valid) - Vec::loadu(ll + o));
              const Vec av = Vec::loadu(la + o), bv = Vec::loadu(lb + o), fv = Vec::loadu(lfix + o);
              Vec gv;
              if (kProb) {
                gv = at::vec::fmsub(ev, av, at::vec::fmadd(bv, T::load(tb + c * d.tC, d.tS, j, valid), fv) * wv);
              } else {
                gv = at::vec::fmsub(ev, av, bv * wv) - Vec::blendv(Vec(0), fv, Vec::loadu(ly + o) == cv);
              }
              T::store(gb + c * S, 1, j, valid, gv);
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
    Args<scalar_t> a = make_args<scalar_t>(ignore_index, label_smoothing, reduction);
    a.head.reserve(heads.size());
    for (size_t h = 0; h < heads.size(); ++h) {
      a.head.push_back(describe_head<scalar_t>(heads[h], target, at::Tensor(), class_weight, head_weights[h], shape));
    }
    scan_targets(a.head[0], ignore_index);  // never read a class out of bounds
    grads = allocate_head_grads(heads, cpu_gradient_allocator());
    BackwardIn<acc_t> in;
    in.grad_loss = grad_loss.const_data_ptr<acc_t>();
    in.per_row = per_row;
    in.glN = per_row ? grad_loss.stride(0) : 0;
    in.glS = per_row ? grad_loss.stride(1) : 0;
    in.lse = lse.const_data_ptr<acc_t>();
    in.inv_denom = reduction == kReductionMean ? acc_t(1) / denom.to(acc_type).item<acc_t>() : acc_t(1);
    if (row_path(a.head[0])) {
      if (a.head[0].prob()) {
        backward_rows<scalar_t, true>(a, in, grads.data_ptr<scalar_t>());
      } else {
        backward_rows<scalar_t, false>(a, in, grads.data_ptr<scalar_t>());
      }
    } else {
      if (a.head[0].prob()) {
        backward_tiles<scalar_t, true>(a, in, grads.data_ptr<scalar_t>());
      } else {
        backward_tiles<scalar_t, false>(a, in, grads.data_ptr<scalar_t>());
      }
    }
  });
  return grads_in_head_shape(grads, heads_in);
}

}  // namespace

const CpuKernels kKernels{&forward_cpu, &backward_cpu, &forward_per_head_cpu};

}  // namespace CPU_CAPABILITY
}  // namespace auxfuse
