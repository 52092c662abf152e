// The layer normalisation of one row on SIMD vectors: the CPU engine's rows of the per-element
// formulas in csrc/cells.h ("Cell options"), which the CUDA engine's block-wide rows share.
//
// A row is one batch row's gates (G values) or cell state (H values) at one step; the options
// layer (options_layer.cpp) normalises it while it is in the L1 cache. float and double.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../cells.h"
#include "capability.h"
#include "vector_math.h"

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

// The second and last pass of a row's normalisation, from its mean and 1 / sqrt(var + eps).
template <typename T>
inline void normalise_row(int64_t n, const NormRow<T>& row, T mean, T rstd) {
  using V = Vec<T>;
  for_unit_runs<T>(n, [&](VectorUnits j, V zero) {
    const V x_hat = layer_norm_normal_form(load<V>(row.x, 0, j), V(mean), V(rstd));
    if (row.normalized != nullptr) store(row.normalized, 0, j, x_hat);
    store(row.y, 0, j,
          layer_norm_affine(x_hat, load<V>(row.gain, 0, j),
                            row.bias != nullptr ? load<V>(row.bias, 0, j) : zero));
  });
}

// Normalises `rows` rows of n values each; rstd[r] gets row r's 1 / sqrt(var + eps). Mean and
// variance in two passes, as torch.nn.LayerNorm's. The rows' sums run in the same loops: a
// row's normalisation is bound by the latency of its chains of dependent additions, which the
// other rows' chains overlap (the same values as one row at a time).
template <typename T, int rows>
inline void layer_norm_rows(int64_t n, const NormRow<T> (&row)[rows], T (&rstd)[rows]) {
  using V = Vec<T>;
  V sums[rows];
  for (int r = 0; r < rows; ++r) sums[r] = V(T(0));
  // (Lanes past a run's end load as 0 and add nothing.)
  for_unit_runs<T>(n, [&](VectorUnits j, V) {
    for (int r = 0; r < rows; ++r) sums[r] += load<V>(row[r].x, 0, j);
  });
  T mean[rows];
  for (int r = 0; r < rows; ++r) {
    mean[r] = lanes_sum(sums[r]) / T(n);
    sums[r] = V(T(0));
  }
  for_unit_runs<T>(n, [&](VectorUnits j, V zero) {
    for (int r = 0; r < rows; ++r) {
      const V centred = load<V>(row[r].x, 0, j) - V(mean[r]);
      // Past the run's end the lanes hold -mean: they are left out.
      sums[r] = sums[r] + V::set(zero, centred * centred, j.count);
    }
  });
  for (int r = 0; r < rows; ++r) {
    rstd[r] = layer_norm_rstd(lanes_sum(sums[r]), static_cast<int>(n));
    normalise_row(n, row[r], mean[r], rstd[r]);
  }
}

// One row's normalisation; returns its 1 / sqrt(var + eps).
template <typename T>
inline T layer_norm_row(int64_t n, const NormRow<T>& row) {
  T rstd[1];
  layer_norm_rows<T, 1>(n, {row}, rstd);
  return rstd[0];
}

// The gradient of layer_norm_row's input from dy (dLoss/dy) and what the forward kept
// (normalized, rstd): with g = dy * gain, dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)).
// dx may be dy. The row's terms of the gain's and the bias's gradients (sums over all rows)
// are added to gain_sum += dy * x_hat and bias_sum += dy [n] in the same pass, where given.
template <typename T>
inline void layer_norm_row_backward(int64_t n, const T* dy, const T* normalized, T rstd,
                                    const T* gain, T* dx, T* gain_sum = nullptr,
                                    T* bias_sum = nullptr) {
  using V = Vec<T>;
  V sum_g(T(0)), sum_g_x_hat(T(0));
  for_unit_runs<T>(n, [&](VectorUnits j, V) {
    const V d = load<V>(dy, 0, j), x_hat = load<V>(normalized, 0, j);
    const V g = d * load<V>(gain, 0, j);
    sum_g += g;
    sum_g_x_hat += g * x_hat;
    if (gain_sum != nullptr) store(gain_sum, 0, j, load<V>(gain_sum, 0, j) + d * x_hat);
    if (bias_sum != nullptr) store(bias_sum, 0, j, load<V>(bias_sum, 0, j) + d);
  });
  const V mean_g(lanes_sum(sum_g) / T(n)), mean_g_x_hat(lanes_sum(sum_g_x_hat) / T(n));
  for_unit_runs<T>(n, [&](VectorUnits j, V) {
    store(dx, 0, j,
          layer_norm_input_grad(load<V>(dy, 0, j) * load<V>(gain, 0, j), load<V>(normalized, 0, j),
                                mean_g, mean_g_x_hat, V(rstd)));
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
