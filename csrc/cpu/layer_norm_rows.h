// The layer normalisation of one row on SIMD vectors: the CPU engine's rows of the per-element
// formulas in csrc/cells.h ("Cell options"), which the CUDA engine's block-wide rows share.
//
// A row is one batch row's gates (G values) or cell state (H values) at one step; the options
// layer (options_layer.cpp) normalises it while it is in the L1 cache. float and double.
//
// Each pass runs over whole vectors and then one partial vector (its lanes past the row's end
// load as 0 and are not stored), with the rows' pointers in registers and what a row lacks (a
// bias, a saved normal form) chosen outside the loop: in the time loop of the 16-row, 64-unit
// layer-normalised LSTM these passes are most of what its step spends beyond the plain layer's.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../cells.h"
#include "capability.h"
#include "vector_math.h"

// A lambda inlined into its caller. The passes below and their bodies are all inlined: GCC left
// the backward's first pass (a lambda that calls a lambda per vector) out of line, with its sums
// in memory from vector to vector (the 16-row, 64-unit layer-normalised LSTM's training step
// 2% slower).
#define RNNFAST_LAMBDA_INLINED __attribute__((always_inline))

namespace rnnfast {
namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h

// The sum of a vector's lanes, added pairwise in halves: 4 dependent additions for 16 lanes,
// where one running sum is 16 (a row's normalisation takes two of these sums, its gradient two).
// With AVX-512 in registers (the intrinsics add the same halves in the same order); elsewhere
// through memory.
template <typename T>
inline T lanes_sum(Vec<T> v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_reduce_add_ps(v);
  } else if constexpr (std::is_same_v<T, double>) {
    return _mm512_reduce_add_pd(v);
  }
#endif
  constexpr int kLanes = Vec<T>::size();
  alignas(64) T lanes[kLanes];
  v.store(lanes);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int lane = 0; lane < width; ++lane) lanes[lane] += lanes[lane + width];
  }
  return lanes[0];
}

// Calls fn(j, count) for the vectors of a row of n values: whole ones (count = the lanes, a
// constant the loads and stores compile to plain ones for) and the partial one at its end.
template <typename T, typename Fn>
RNNFAST_HD_INLINED void for_row_vectors(int64_t n, const Fn& fn) {
  constexpr int64_t lanes = Vec<T>::size();
  int64_t j = 0;
  for (; j + lanes <= n; j += lanes) fn(j, std::integral_constant<int, lanes>{});
  if (j < n) fn(j, static_cast<int>(n - j));
}

// Calls fn(j, count, half) for the vectors of a row two at a time, half 0 and 1 alternating, so
// that a sum over the row runs as two chains of dependent additions of half the length, then
// the partial vectors at its end (half 0).
template <typename T, typename Fn>
RNNFAST_HD_INLINED void for_row_vector_pairs(int64_t n, const Fn& fn) {
  constexpr int64_t lanes = Vec<T>::size();
  using Whole = std::integral_constant<int, lanes>;
  int64_t j = 0;
  for (; j + 2 * lanes <= n; j += 2 * lanes) {
    fn(j, Whole{}, std::integral_constant<int, 0>{});
    fn(j + lanes, Whole{}, std::integral_constant<int, 1>{});
  }
  for (; j < n; j += lanes) {
    fn(j, static_cast<int>(std::min<int64_t>(lanes, n - j)), std::integral_constant<int, 0>{});
  }
}

// One row of a layer normalisation: y = (x - mean) / sqrt(var + eps) * gain + bias over its n
// values (bias may be nullptr); normalized gets (x - mean) / sqrt(var + eps) (may be nullptr);
// y may be x.
template <typename T>
struct NormRow {
  const T* x;
  const T* gain;
  const T* bias;
  T* y;
  T* normalized;
};

// The means and 1 / sqrt(var + eps) of `rows` rows (1 or 2) of n values, in two passes as
// torch.nn.LayerNorm's. The rows' sums run in the same loops, each as two chains (a row's
// normalisation is bound by the latency of its dependent additions, which the other chains
// overlap). Each sum in a variable of its own: in an array they stayed in memory.
template <typename T, int rows>
inline void row_moments(int64_t n, const T* const (&x)[rows], T (&mean)[rows], T (&rstd)[rows]) {
  static_assert(rows == 1 || rows == 2, "one row or a pair");
  using V = Vec<T>;
  const T* x0 = x[0];
  const T* x1 = x[rows - 1];
  V s00(T(0)), s01(T(0)), s10(T(0)), s11(T(0));  // row 0's and row 1's sums, two halves each
  for_row_vector_pairs<T>(n, [&](int64_t j, auto count, auto half) {
    V& s0 = half == 0 ? s00 : s01;
    s0 += V::loadu(x0 + j, count);
    if constexpr (rows == 2) {
      V& s1 = half == 0 ? s10 : s11;
      s1 += V::loadu(x1 + j, count);
    }
  });
  mean[0] = lanes_sum(s00 + s01) / T(n);
  if constexpr (rows == 2) mean[1] = lanes_sum(s10 + s11) / T(n);
  const V mean0(mean[0]), mean1(mean[rows - 1]), zero(T(0));
  s00 = s01 = s10 = s11 = zero;
  for_row_vector_pairs<T>(n, [&](int64_t j, auto count, auto half) {
    // Past a partial vector's end the lanes hold -mean: they are left out.
    const V c0 = V::set(zero, V::loadu(x0 + j, count) - mean0, count);
    V& s0 = half == 0 ? s00 : s01;
    s0 = at::vec::fmadd(c0, c0, s0);
    if constexpr (rows == 2) {
      const V c1 = V::set(zero, V::loadu(x1 + j, count) - mean1, count);
      V& s1 = half == 0 ? s10 : s11;
      s1 = at::vec::fmadd(c1, c1, s1);
    }
  });
  rstd[0] = layer_norm_rstd(lanes_sum(s00 + s01), static_cast<int>(n));
  if constexpr (rows == 2) rstd[1] = layer_norm_rstd(lanes_sum(s10 + s11), static_cast<int>(n));
}

// y = x_hat * gain + bias and normalized = x_hat over a row, from its mean and rstd.
template <typename T, bool kNormalized, bool kBias>
inline void normalise_row_as(int64_t n, const NormRow<T>& row, T mean, T rstd) {
  using V = Vec<T>;
  const T* x = row.x;
  const T* gain = row.gain;
  const T* bias = row.bias;
  T* y = row.y;
  T* normalized = row.normalized;
  const V mean_v(mean), rstd_v(rstd);
  for_row_vectors<T>(n, [&](int64_t j, auto count) {
    const V x_hat = layer_norm_normal_form(V::loadu(x + j, count), mean_v, rstd_v);
    if constexpr (kNormalized) x_hat.store(normalized + j, count);
    layer_norm_affine(x_hat, V::loadu(gain + j, count), kBias ? V::loadu(bias + j, count) : V(T(0)))
        .store(y + j, count);
  });
}

// The last pass of a row's normalisation, from its mean and 1 / sqrt(var + eps).
template <typename T>
inline void normalise_row(int64_t n, const NormRow<T>& row, T mean, T rstd) {
  if (row.normalized != nullptr) {
    row.bias != nullptr ? normalise_row_as<T, true, true>(n, row, mean, rstd)
                        : normalise_row_as<T, true, false>(n, row, mean, rstd);
  } else {
    row.bias != nullptr ? normalise_row_as<T, false, true>(n, row, mean, rstd)
                        : normalise_row_as<T, false, false>(n, row, mean, rstd);
  }
}

// Normalises `rows` rows (1 or 2) of n values each; rstd[r] gets row r's 1 / sqrt(var + eps).
template <typename T, int rows>
inline void layer_norm_rows(int64_t n, const NormRow<T> (&row)[rows], T (&rstd)[rows]) {
  T mean[rows];
  const T* x[rows];
  for (int r = 0; r < rows; ++r) x[r] = row[r].x;
  row_moments<T, rows>(n, x, mean, rstd);
  for (int r = 0; r < rows; ++r) normalise_row(n, row[r], mean[r], rstd[r]);
}

// One row's normalisation; returns its 1 / sqrt(var + eps).
template <typename T>
inline T layer_norm_row(int64_t n, const NormRow<T>& row) {
  T rstd[1];
  layer_norm_rows<T, 1>(n, {row}, rstd);
  return rstd[0];
}

// Normalises two rows and writes the sum of their results, y = y_a + y_b, into `sum` (their
// own y are not written; sum may be a's or b's x): for a cell that reads x W_ih^T's and
// h W_hh^T's normalised rows only as their sum (the LSTM's, Elman's), one row to store and to
// read instead of two. Both biases are given (a row of zeros for an absent one); rstd as
// layer_norm_rows'.
template <typename T>
inline void layer_norm_rows_into_sum(int64_t n, const NormRow<T>& row_a, const NormRow<T>& row_b,
                                     T* sum, T (&rstd)[2]) {
  using V = Vec<T>;
  // Local copies of the rows' pointers, as layer_norm_rows_backward_as's.
  const NormRow<T> a = row_a, b = row_b;
  T mean[2];
  row_moments<T, 2>(n, {a.x, b.x}, mean, rstd);
  const V mean_a(mean[0]), rstd_a(rstd[0]), mean_b(mean[1]), rstd_b(rstd[1]);
  const auto pass = [&](auto saving) {
    for_row_vectors<T>(n, [&](int64_t j, auto count) {
      const V x_hat_a = layer_norm_normal_form(V::loadu(a.x + j, count), mean_a, rstd_a);
      const V x_hat_b = layer_norm_normal_form(V::loadu(b.x + j, count), mean_b, rstd_b);
      if constexpr (decltype(saving)::value) {
        x_hat_a.store(a.normalized + j, count);
        x_hat_b.store(b.normalized + j, count);
      }
      (layer_norm_affine(x_hat_a, V::loadu(a.gain + j, count), V::loadu(a.bias + j, count)) +
       layer_norm_affine(x_hat_b, V::loadu(b.gain + j, count), V::loadu(b.bias + j, count)))
          .store(sum + j, count);
    });
  };
  // The normal forms are saved for both rows or for neither (a training or an inference call).
  if (a.normalized != nullptr && b.normalized != nullptr) {
    pass(std::true_type{});
  } else {
    TORCH_INTERNAL_ASSERT(a.normalized == nullptr && b.normalized == nullptr);
    pass(std::false_type{});
  }
}

// A row of a normalisation's backward: dy (dLoss/dy), what the forward kept (normalized, rstd)
// and the gain; dx gets dLoss/dx, gain_sum and bias_sum [n] the row's terms of the gain's and
// the bias's gradients (sums over all rows: += dy * x_hat and += dy; bias_sum may be nullptr).
template <typename T>
struct NormGradRow {
  const T* dy;
  const T* normalized;
  T rstd;
  const T* gain;
  T* dx;
  T* gain_sum;
  T* bias_sum;
};

// The backward of `rows` rows (1 or 2): with g = dy * gain,
// dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)). A row's dx may be its dy, or the other
// row's dy (each vector of both rows' dx is computed before either is stored).
template <typename T, int rows, bool kBias0, bool kBias1>
inline void layer_norm_rows_backward_as(int64_t n, const NormGradRow<T>& row0,
                                        const NormGradRow<T>& row1) {
  using V = Vec<T>;
  // The rows' pointers as local copies (kept in registers): read through the references, each
  // was loaded again after every store, which may alias them (a vector store writes bytes). (In
  // one process, interleaved, the 16-row, 64-unit and 20-row, 200-unit layer-normalised LSTMs'
  // training steps ran within 2% of the reloading version's, either way, on a Zen 4 EPYC.)
  const NormGradRow<T> r0 = row0, r1 = row1;
  // Per row, the sums of g and g * x_hat in two halves each.
  V g00(T(0)), g01(T(0)), gx00(T(0)), gx01(T(0)), g10(T(0)), g11(T(0)), gx10(T(0)), gx11(T(0));
  const auto add_terms = [&](const NormGradRow<T>& r, auto with_bias, int64_t j, auto count,
                             V& sum_g, V& sum_g_x_hat) RNNFAST_LAMBDA_INLINED {
    const V d = V::loadu(r.dy + j, count), x_hat = V::loadu(r.normalized + j, count);
    const V g = d * V::loadu(r.gain + j, count);
    sum_g += g;
    sum_g_x_hat = at::vec::fmadd(g, x_hat, sum_g_x_hat);
    at::vec::fmadd(d, x_hat, V::loadu(r.gain_sum + j, count)).store(r.gain_sum + j, count);
    if constexpr (decltype(with_bias)::value) {
      (V::loadu(r.bias_sum + j, count) + d).store(r.bias_sum + j, count);
    }
  };
  using Bias0 = std::integral_constant<bool, kBias0>;
  using Bias1 = std::integral_constant<bool, kBias1>;
  for_row_vector_pairs<T>(n, [&](int64_t j, auto count, auto half) RNNFAST_LAMBDA_INLINED {
    add_terms(r0, Bias0{}, j, count, half == 0 ? g00 : g01, half == 0 ? gx00 : gx01);
    if constexpr (rows == 2) {
      add_terms(r1, Bias1{}, j, count, half == 0 ? g10 : g11, half == 0 ? gx10 : gx11);
    }
  });
  const V mean_g0(lanes_sum(g00 + g01) / T(n)), mean_g_x_hat0(lanes_sum(gx00 + gx01) / T(n));
  const V mean_g1(rows == 2 ? lanes_sum(g10 + g11) / T(n) : T(0));
  const V mean_g_x_hat1(rows == 2 ? lanes_sum(gx10 + gx11) / T(n) : T(0));
  const V rstd0(r0.rstd), rstd1(r1.rstd);
  for_row_vectors<T>(n, [&](int64_t j, auto count) {
    const V dx0 =
        layer_norm_input_grad(V::loadu(r0.dy + j, count) * V::loadu(r0.gain + j, count),
                              V::loadu(r0.normalized + j, count), mean_g0, mean_g_x_hat0, rstd0);
    if constexpr (rows == 2) {
      const V dx1 =
          layer_norm_input_grad(V::loadu(r1.dy + j, count) * V::loadu(r1.gain + j, count),
                                V::loadu(r1.normalized + j, count), mean_g1, mean_g_x_hat1, rstd1);
      dx1.store(r1.dx + j, count);
    }
    dx0.store(r0.dx + j, count);
  });
}

// The backward of one row.
template <typename T>
inline void layer_norm_row_backward(int64_t n, const NormGradRow<T>& row) {
  row.bias_sum != nullptr ? layer_norm_rows_backward_as<T, 1, true, false>(n, row, row)
                          : layer_norm_rows_backward_as<T, 1, false, false>(n, row, row);
}

// The backward of two rows together (their sums' chains overlap).
template <typename T>
inline void layer_norm_rows_backward(int64_t n, const NormGradRow<T>& r0,
                                     const NormGradRow<T>& r1) {
  if (r0.bias_sum != nullptr) {
    r1.bias_sum != nullptr ? layer_norm_rows_backward_as<T, 2, true, true>(n, r0, r1)
                           : layer_norm_rows_backward_as<T, 2, true, false>(n, r0, r1);
  } else {
    r1.bias_sum != nullptr ? layer_norm_rows_backward_as<T, 2, false, true>(n, r0, r1)
                           : layer_norm_rows_backward_as<T, 2, false, false>(n, r0, r1);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
