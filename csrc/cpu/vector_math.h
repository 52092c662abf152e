// SIMD vectors for the cell math on the CPU: the Math specialisations and the load / store of a
// run of units that csrc/cells.h needs to evaluate a cell on a whole vector of hidden units.
//
// at::vec::Vectorized uses the widest instruction set the extension was compiled for (setup.py
// enables AVX-512, or AVX2 + FMA, where the building machine has them). Float vectors take
// tanh and sigmoid from one inlined rational function; double vectors SLEEF's (1 ulp).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

#include "../cells.h"

namespace rnnfast {

template <typename S>
using Vec = at::vec::Vectorized<S>;

template <typename S>
struct VectorMath {
  static Vec<S> sigmoid(Vec<S> x) { return Vec<S>(S(1)) / (Vec<S>(S(1)) + (Vec<S>(S(0)) - x).exp()); }
  static Vec<S> tanh(Vec<S> x) { return x.tanh(); }
  static Vec<S> relu(Vec<S> x) { return at::vec::maximum(x, Vec<S>(S(0))); }
  static Vec<S> positive(Vec<S> y) { return y.gt(Vec<S>(S(0))); }  // 1.0 where y > 0, else 0.0
};

// tanh of float vectors as an odd/even rational function (the minimax fit Eigen uses): within
// 7 ulp (4e-7 relative) of tanh over all floats, and several times faster than SLEEF's tanh,
// which is the LSTM's and GRU's hottest function.
inline Vec<float> rational_tanh(Vec<float> x) {
  const Vec<float> limit(7.90531110763549805f);  // tanh rounds to +-1 beyond
  const Vec<float> xc = at::vec::clamp(x, Vec<float>(0.0f) - limit, limit);
  const Vec<float> x2 = xc * xc;
  Vec<float> p = at::vec::fmadd(x2, Vec<float>(-2.76076847742355e-16f), Vec<float>(2.00018790482477e-13f));
  p = at::vec::fmadd(x2, p, Vec<float>(-8.60467152213735e-11f));
  p = at::vec::fmadd(x2, p, Vec<float>(5.12229709037114e-08f));
  p = at::vec::fmadd(x2, p, Vec<float>(1.48572235717979e-05f));
  p = at::vec::fmadd(x2, p, Vec<float>(6.37261928875436e-04f));
  p = at::vec::fmadd(x2, p, Vec<float>(4.89352455891786e-03f));
  p = xc * p;
  Vec<float> q = at::vec::fmadd(x2, Vec<float>(1.19825839466702e-06f), Vec<float>(1.18534705686654e-04f));
  q = at::vec::fmadd(x2, q, Vec<float>(2.26843463243900e-03f));
  q = at::vec::fmadd(x2, q, Vec<float>(4.89352518554385e-03f));
  // Tiny |x|: tanh(x) = x to float precision (the rational form would lose the last bits).
  return Vec<float>::blendv(p / q, x, x.abs() < Vec<float>(0.0004f));
}

template <>
struct Math<Vec<float>> : VectorMath<float> {
  static Vec<float> tanh(Vec<float> x) { return rational_tanh(x); }
  // sigmoid(x) = (1 + tanh(x / 2)) / 2: the inlined rational tanh instead of a call to SLEEF's
  // exp and a division of its own. Within 3e-7 of sigmoid (absolute).
  static Vec<float> sigmoid(Vec<float> x) {
    const Vec<float> half(0.5f);
    return at::vec::fmadd(half, rational_tanh(half * x), half);
  }
};
template <>
struct Math<Vec<double>> : VectorMath<double> {};

// Hidden units j .. j + count - 1 of a row, taken as one vector (count <= the vector's lanes;
// lanes past count read as 0 and are not written).
struct VectorUnits {
  int j;
  int count;
};

template <typename A, typename T>
inline A load(const T* row, int offset, VectorUnits units) {
  return A::loadu(row + offset + units.j, units.count);
}

template <typename T, typename A>
inline void store(T* row, int offset, VectorUnits units, A value) {
  value.store(row + offset + units.j, units.count);
}

// Calls fn(index, A{}) for runs of units covering 0 .. H-1: SIMD vectors of units where the
// storage type has them (float, double), else one unit at a time in the accumulation type.
template <typename T, typename Fn>
inline void for_unit_runs(int64_t hidden_size, Fn&& fn) {
  const int H = static_cast<int>(hidden_size);
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    constexpr int lanes = Vec<T>::size();
    for (int j = 0; j < H; j += lanes) fn(VectorUnits{j, std::min(lanes, H - j)}, Vec<T>(T(0)));
  } else {
    using A = at::opmath_type<T>;
    for (int j = 0; j < H; ++j) fn(j, A(0));
  }
}

}  // namespace rnnfast
