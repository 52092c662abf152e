// SIMD vectors for the cell math on the CPU: the Math specialisations and the load / store of a
// run of units that csrc/cells.h needs to evaluate a cell on a whole vector of hidden units.
//
// at::vec::Vectorized is the instruction set's this copy of the engine is compiled for
// (capability.h): 16 floats with AVX-512, 8 with AVX2, a plain array in the portable copy. Float
// vectors take tanh and sigmoid from one inlined rational function; double vectors SLEEF's (1 ulp).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <utility>

#include "../cells.h"
#include "capability.h"

namespace rnnfast {
namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h

template <typename S>
using Vec = at::vec::Vectorized<S>;

template <typename S>
struct VectorMath {
  static Vec<S> sigmoid(Vec<S> x) {
    return Vec<S>(S(1)) / (Vec<S>(S(1)) + (Vec<S>(S(0)) - x).exp());
  }
  static Vec<S> tanh(Vec<S> x) { return x.tanh(); }
  static Vec<S> relu(Vec<S> x) { return at::vec::maximum(x, Vec<S>(S(0))); }
  // 0 where y <= 0, else grad (also where y is NaN, as torch's relu gradient)
  static Vec<S> relu_grad(Vec<S> grad, Vec<S> y) {
    return Vec<S>::blendv(grad, Vec<S>(S(0)), y <= Vec<S>(S(0)));
  }
};

#if defined(CPU_CAPABILITY_AVX512)
// Eight float lanes in a 256-bit register, for the AVX-512 copy's register layer on layers of
// at most 8 units (register_layer.h's with_narrowest_lanes). On Zen 4 a 512-bit operation takes
// a 256-bit unit for two cycles, and the adding problem's step (6 units, a chain of a few dozen
// dependent operations and about 150 independent ones) was bound by those units: on 256-bit
// registers its LSTM's forward of 3000 steps ran 0.142 -> 0.103 ms, its training step 0.37 ->
// 0.26 ms (2-core Zen 4 EPYC, 2 threads). The cell math needs + - * and vectors from a float;
// the rational tanh below fmadd and reciprocal.
struct FloatVector8 {
  __m256 values;
  FloatVector8() = default;
  FloatVector8(float x) : values(_mm256_set1_ps(x)) {}  // NOLINT: a float is every lane
  FloatVector8(__m256 v) : values(v) {}                 // NOLINT: to and from the register
  operator __m256() const { return values; }            // NOLINT
};
RNNFAST_HD_INLINED FloatVector8 operator+(FloatVector8 a, FloatVector8 b) {
  return _mm256_add_ps(a, b);
}
RNNFAST_HD_INLINED FloatVector8 operator-(FloatVector8 a, FloatVector8 b) {
  return _mm256_sub_ps(a, b);
}
RNNFAST_HD_INLINED FloatVector8 operator*(FloatVector8 a, FloatVector8 b) {
  return _mm256_mul_ps(a, b);
}
RNNFAST_HD_INLINED FloatVector8 fmadd(FloatVector8 a, FloatVector8 b, FloatVector8 c) {
  return _mm256_fmadd_ps(a, b, c);
}
#endif

// 1 / q for q > 0 bounded away from 0: the hardware estimate (14 bits on AVX-512, 12 on AVX2)
// and one Newton step, to within an ulp or two of the division at a fraction of its latency.
RNNFAST_HD_INLINED Vec<float> reciprocal(Vec<float> q) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
  const Vec<float> r0 = _mm512_rcp14_ps(q);
#else
  const Vec<float> r0 = _mm256_rcp_ps(q);
#endif
  const Vec<float> error = at::vec::fnmadd(q, r0, Vec<float>(1.0f));  // 1 - q r0
  return at::vec::fmadd(r0, error, r0);
#else
  return Vec<float>(1.0f) / q;  // no SIMD build: nothing faster to take
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
RNNFAST_HD_INLINED FloatVector8 reciprocal(FloatVector8 q) {
  const __m256 r0 = _mm256_rcp14_ps(q);
  const __m256 error = _mm256_fnmadd_ps(q, r0, _mm256_set1_ps(1.0f));  // 1 - q r0
  return _mm256_fmadd_ps(r0, error, r0);
}
#endif

// The selections the rational tanh makes, per vector type: AVX-512's compare masks and masked
// moves (at::vec's blendv turns each compare into a vector and back into a mask, three
// instructions more per blend, in the hottest loop of the cells), AVX2's blends.
//
// +-1 with the sign of x where |x| >= limit, else `otherwise` (NaN x: `otherwise`).
RNNFAST_HD_INLINED Vec<float> unit_where_abs_at_least(Vec<float> x, float limit,
                                                      Vec<float> otherwise) {
  using F = Vec<float>;
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 at_least = _mm512_cmp_ps_mask(_mm512_abs_ps(x), F(limit), _CMP_GE_OQ);
  const __m512 one_signed_as_x = _mm512_or_ps(_mm512_and_ps(x, F(-0.0f)), F(1.0f));
  return _mm512_mask_mov_ps(otherwise, at_least, one_signed_as_x);
#else
  const F unit = F::blendv(F(-1.0f), F(1.0f), x > F(0.0f));
  return F::blendv(otherwise, unit, x.abs() >= F(limit));
#endif
}

// x where |x| < limit, else `otherwise`.
RNNFAST_HD_INLINED Vec<float> self_where_abs_below(Vec<float> x, float limit,
                                                   Vec<float> otherwise) {
  using F = Vec<float>;
#if defined(CPU_CAPABILITY_AVX512)
  const __mmask16 below = _mm512_cmp_ps_mask(_mm512_abs_ps(x), F(limit), _CMP_LT_OQ);
  return _mm512_mask_mov_ps(otherwise, below, x);
#else
  return F::blendv(otherwise, x, x.abs() < F(limit));
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
RNNFAST_HD_INLINED __m256 abs_of(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }
RNNFAST_HD_INLINED FloatVector8 unit_where_abs_at_least(FloatVector8 x, float limit,
                                                        FloatVector8 otherwise) {
  const __mmask8 at_least = _mm256_cmp_ps_mask(abs_of(x), _mm256_set1_ps(limit), _CMP_GE_OQ);
  const __m256 one_signed_as_x =
      _mm256_or_ps(_mm256_and_ps(x, _mm256_set1_ps(-0.0f)), _mm256_set1_ps(1.0f));
  return _mm256_mask_mov_ps(otherwise, at_least, one_signed_as_x);
}
RNNFAST_HD_INLINED FloatVector8 self_where_abs_below(FloatVector8 x, float limit,
                                                     FloatVector8 otherwise) {
  const __mmask8 below = _mm256_cmp_ps_mask(abs_of(x), _mm256_set1_ps(limit), _CMP_LT_OQ);
  return _mm256_mask_mov_ps(otherwise, below, x);
}
#endif

// tanh of float vectors as an odd/even rational function (the minimax fit Eigen uses), several
// times faster than SLEEF's tanh, which is the LSTM's and GRU's hottest function. In the
// recurrent chain of a step its latency is what counts, so the numerator is evaluated by
// Estrin's scheme (three levels of multiply-adds instead of six in a row) and the division as
// a reciprocal estimate refined by one Newton step. Relative error under 4 float epsilons over
// all floats (tests/test_vector_math.py checks it against torch.tanh).
//
// tanh_ratio is the rational form alone, right for 0.0004 <= |x| < kTanhLimit; rational_tanh
// and saturated_tanh mend the rest. F: Vec<float>, or FloatVector8.
//
// These functions, reciprocal and the Math specialisations' tanh and sigmoid below are always
// inlined. GCC left some of them out of line in the register layer's step (register_layer.h),
// a chain of dependent instructions where each call stored the live vectors and loaded them
// back (every vector register is the caller's to save): inlined, the adding LSTM's forward of
// 3000 steps ran 0.21-0.25 -> 0.15-0.16 ms and its training step 0.49-0.55 -> 0.36-0.43 ms on 2
// threads of a Zen 4 EPYC; the larger layers, which had them inlined, ran the same.
constexpr float kTanhLimit = 7.90531110763549805f;  // tanh rounds to +-1 beyond
constexpr float kTanhLinearBelow = 0.0004f;         // tanh(x) rounds to x below

template <typename F>
RNNFAST_HD_INLINED F tanh_ratio(F x) {
  using at::vec::fmadd;
  const F x2 = x * x;
  const F x4 = x2 * x2;
  // p(x2) = c0 + c1 x2 + ... + c6 x2^6
  const F p01 = fmadd(x2, F(6.37261928875436e-04f), F(4.89352455891786e-03f));
  const F p23 = fmadd(x2, F(5.12229709037114e-08f), F(1.48572235717979e-05f));
  const F p45 = fmadd(x2, F(2.00018790482477e-13f), F(-8.60467152213735e-11f));
  const F p0123 = fmadd(x4, p23, p01);
  const F p456 = fmadd(x4, F(-2.76076847742355e-16f), p45);
  const F p = x * fmadd(x4 * x4, p456, p0123);
  F q = fmadd(x2, F(1.19825839466702e-06f), F(1.18534705686654e-04f));
  q = fmadd(x2, q, F(2.26843463243900e-03f));
  q = fmadd(x2, q, F(4.89352518554385e-03f));
  return p * reciprocal(q);
}

// tanh(x), except that below kTanhLinearBelow in magnitude it may be an ulp or two from x
// (where sigmoid adds it to 1). Past the limit exactly +-1, whatever the rational form gives
// there (even inf or NaN: x needs no clamp on the way in; the refined reciprocal may leave the
// ratio an ulp short of 1); NaN stays NaN.
template <typename F>
RNNFAST_HD_INLINED F saturated_tanh(F x) {
  return unit_where_abs_at_least(x, kTanhLimit, tanh_ratio(x));
}

// tanh(x) to within 4 float epsilons (relative) over all floats: tiny |x| gives x itself, to
// float precision tanh there (the rational form would lose the last bits).
template <typename F>
RNNFAST_HD_INLINED F rational_tanh(F x) {
  return self_where_abs_below(x, kTanhLinearBelow, saturated_tanh(x));
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu

// The cells' math on vectors: specialisations of csrc/cells.h's Math, which must lie in its
// namespace; Vec is a different type in each instruction set's copy (capability.h).
//
// tanh and sigmoid of float vectors F, from the inlined rational tanh.
template <typename F>
struct RationalMath {
  RNNFAST_HD_INLINED static F tanh(F x) { return cpu::rational_tanh(x); }
  // sigmoid(x) = (1 + tanh(x / 2)) / 2: the inlined rational tanh instead of a call to SLEEF's
  // exp and a division of its own. Within 3e-7 of sigmoid (absolute); for tiny x, tanh's last
  // bits vanish in the sum with 1, so the saturated form does.
  RNNFAST_HD_INLINED static F sigmoid(F x) {
    using at::vec::fmadd;
    const F half(0.5f);
    return fmadd(half, cpu::saturated_tanh(half * x), half);
  }
};

template <>
struct Math<cpu::Vec<float>> : cpu::VectorMath<float>, RationalMath<cpu::Vec<float>> {
  using RationalMath<cpu::Vec<float>>::tanh;
  using RationalMath<cpu::Vec<float>>::sigmoid;
};

#if defined(CPU_CAPABILITY_AVX512)
template <>
struct Math<cpu::FloatVector8> : RationalMath<cpu::FloatVector8> {
  using F = cpu::FloatVector8;
  // As at::vec::maximum(x, 0) (VectorMath's relu): a NaN x gives a NaN.
  static F relu(F x) {
    const __mmask8 nan = _mm256_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    return _mm256_mask_mov_ps(_mm256_max_ps(x, _mm256_setzero_ps()), nan, x);
  }
  // 0 where y <= 0, else grad (also where y is NaN, as torch's relu gradient).
  static F relu_grad(F grad, F y) {
    const __mmask8 at_most_zero = _mm256_cmp_ps_mask(y, _mm256_setzero_ps(), _CMP_LE_OQ);
    return _mm256_mask_mov_ps(grad, at_most_zero, _mm256_setzero_ps());
  }
};
#endif

template <>
struct Math<cpu::Vec<double>> : cpu::VectorMath<double> {};

namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h

// Hidden units j .. j + count - 1 of a row, taken as one vector (count <= the vector's lanes;
// lanes past count read as 0 and are not written).
struct VectorUnits {
  int j;
  int count;
};

// bfloat16 and float16 values are stored in their type and computed in float: the cells on float
// vectors here, the per-step products in float (recurrent_product.h).
template <typename T>
constexpr bool kComputedInFloat = std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>;

#if defined(CPU_CAPABILITY_AVX512)
// The lanes of a run of units (AVX-512 mask).
inline __mmask16 unit_lanes(VectorUnits units) {
  return units.count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << units.count) - 1);
}
#endif

template <typename A, typename T>
inline A load(const T* row, int offset, VectorUnits units) {
  const T* from = row + offset + units.j;
  if constexpr (kComputedInFloat<T>) {
#if defined(CPU_CAPABILITY_AVX512)
    // A masked load of the run's 16-bit values, widened in registers: a conversion loop took a
    // fifth of the 16-row, 256-unit bfloat16 LSTM's forward (AMX products, 2-core Xeon).
    const __m256i values = _mm256_maskz_loadu_epi16(unit_lanes(units), from);
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      __m512 widened;
      at::vec::cvtbf16_fp32(values, widened);
      return Vec<float>(widened);
    } else {
      return Vec<float>(_mm512_cvtph_ps(values));
    }
#else
    constexpr int lanes = Vec<float>::size();
    alignas(64) float values[lanes];
    // A whole vector's loop has a fixed count, which the compiler vectorises (one loop of
    // units.count ran the 16-row, 64-unit bfloat16 LSTM's training step 7% slower).
    if (units.count == lanes) {
      for (int i = 0; i < lanes; ++i) values[i] = static_cast<float>(from[i]);
    } else {
      for (int i = 0; i < units.count; ++i) values[i] = static_cast<float>(from[i]);
    }
    return Vec<float>::loadu(values, units.count);
#endif
  } else {
    return A::loadu(from, units.count);
  }
}

template <typename T, typename A>
inline void store(T* row, int offset, VectorUnits units, A value) {
  T* to = row + offset + units.j;
  if constexpr (kComputedInFloat<T>) {
#if defined(CPU_CAPABILITY_AVX512)
    // Rounded to nearest, ties to even, as T(float) rounds (a NaN stays a NaN).
    __m256i values;
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      values = at::vec::cvtfp32_bf16(__m512(value));
    } else {
      values = _mm512_cvtps_ph(__m512(value), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    _mm256_mask_storeu_epi16(to, unit_lanes(units), values);
#else
    constexpr int lanes = Vec<float>::size();
    alignas(64) float values[lanes];
    value.store(values);
    if (units.count == lanes) {
      for (int i = 0; i < lanes; ++i) to[i] = T(values[i]);
    } else {
      for (int i = 0; i < units.count; ++i) to[i] = T(values[i]);
    }
#endif
  } else {
    value.store(to, units.count);
  }
}

// Fetches `count` values from `row` on into the cache of __builtin_prefetch's `Locality` (3: the
// L1 cache, 2: the L2): a hint (it neither faults nor waits) for a row read soon from beyond it.
template <int Locality, typename T>
inline void prefetch_row(const T* row, int64_t count) {
  constexpr int64_t kCacheLineBytes = 64;  // x86-64's
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t byte = 0; byte < count * int64_t(sizeof(T)); byte += kCacheLineBytes) {
    __builtin_prefetch(bytes + byte, /*rw=*/0, Locality);
  }
}

// Into the L2 cache (prefetcht1): for a row that a later step reads from beyond the cache.
template <typename T>
inline void prefetch_to_l2(const T* row, int64_t count) {
  prefetch_row<2>(row, count);
}

// Calls fn(index, A{}) for runs of units covering begin .. end - 1: SIMD vectors of units where
// the storage type has them (float, double) or is computed in float vectors (bfloat16,
// float16), else one unit at a time in the accumulation type.
template <typename T, typename Fn>
inline void for_unit_runs(int64_t begin, int64_t end, Fn&& fn) {
  const int first = static_cast<int>(begin), last = static_cast<int>(end);
  using A = at::opmath_type<T>;
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double> || kComputedInFloat<T>) {
    constexpr int lanes = Vec<A>::size();
    for (int j = first; j < last; j += lanes) {
      fn(VectorUnits{j, std::min(lanes, last - j)}, Vec<A>(A(0)));
    }
  } else {
    for (int j = first; j < last; ++j) fn(j, A(0));
  }
}

// The same over all units 0 .. H - 1 of a row.
template <typename T, typename Fn>
inline void for_unit_runs(int64_t hidden_size, Fn&& fn) {
  for_unit_runs<T>(0, hidden_size, std::forward<Fn>(fn));
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
