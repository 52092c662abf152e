// A per-step product for the tiniest layers (a few hidden units, a few batch rows), in float
// with AVX-512: the whole input of a step fits in two vector registers (at most 32 values) and
// the output is a few vectors.
//   out[o] = addend[o] + sum_s in[source_s(o)] * weight_s(o)     s = 0 .. terms - 1
// Output lane o of term s takes its input by a lane permutation of the two input registers
// (one instruction), so any layout of the input and output (plain rows, or the gate-packed
// [gates][B][H] of engine.cpp) runs as a few fused multiply-adds per output vector, where a
// loop over rows, gates and units would spend a step in index arithmetic.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace rnnfast {

class RegisterProduct {
 public:
  static constexpr int kLanes = 16;
  static constexpr int64_t kMaxInputs = 2 * kLanes;
  // Output vectors times terms: the tables (an index and a weight vector per entry) stay in L1.
  static constexpr int64_t kMaxEntries = 64;

  static constexpr bool available() {
#if defined(CPU_CAPABILITY_AVX512)
    return true;
#else
    return false;
#endif
  }

  static bool fits(int64_t inputs, int64_t outputs, int64_t terms) {
    return available() && inputs > 0 && inputs <= kMaxInputs && outputs > 0 && terms > 0 &&
           (outputs + kLanes - 1) / kLanes * terms <= kMaxEntries;
  }

  RegisterProduct() = default;

  // source(o, s): the input position output o reads in term s; weight(o, s): its factor;
  // bias(o): the value out[o] starts from when no addend is given (run with addend nullptr).
  template <typename Source, typename Weight, typename Bias>
  RegisterProduct(int64_t inputs, int64_t outputs, int64_t terms, Source source, Weight weight,
                  Bias bias)
      : inputs_(inputs), outputs_(outputs), terms_(terms),
        vectors_((outputs + kLanes - 1) / kLanes) {
    sources_.assign(vectors_ * terms_ * kLanes, 0);
    weights_.assign(vectors_ * terms_ * kLanes, 0.0f);
    bias_.assign(vectors_ * kLanes, 0.0f);
    for (int64_t o = 0; o < outputs_; ++o) {
      const int64_t vector = o / kLanes, lane = o % kLanes;
      bias_[vector * kLanes + lane] = bias(o);
      for (int64_t s = 0; s < terms_; ++s) {
        const int64_t at = (vector * terms_ + s) * kLanes + lane;
        sources_[at] = static_cast<int32_t>(source(o, s));
        weights_[at] = weight(o, s);
      }
    }
  }

  bool usable() const { return vectors_ > 0; }

  // in: [inputs]; addend: [outputs] in output order, or nullptr for the bias; out: [outputs].
  void run(const float* in, const float* addend, float* out) const {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 low = _mm512_maskz_loadu_ps(lane_mask(inputs_), in);
    const __m512 high =
        inputs_ > kLanes ? _mm512_maskz_loadu_ps(lane_mask(inputs_ - kLanes), in + kLanes)
                         : _mm512_setzero_ps();
    for (int64_t vector = 0; vector < vectors_; ++vector) {
      const __mmask16 mask = lane_mask(outputs_ - vector * kLanes);
      const float* start = addend ? addend + vector * kLanes : bias_.data() + vector * kLanes;
      // Two accumulators halve the chain of dependent multiply-adds.
      __m512 even = _mm512_maskz_loadu_ps(mask, start);
      __m512 odd = _mm512_setzero_ps();
      const int32_t* sources = sources_.data() + vector * terms_ * kLanes;
      const float* weights = weights_.data() + vector * terms_ * kLanes;
      int64_t s = 0;
      for (; s + 1 < terms_; s += 2) {
        even = term(low, high, sources + s * kLanes, weights + s * kLanes, even);
        odd = term(low, high, sources + (s + 1) * kLanes, weights + (s + 1) * kLanes, odd);
      }
      if (s < terms_) even = term(low, high, sources + s * kLanes, weights + s * kLanes, even);
      _mm512_mask_storeu_ps(out + vector * kLanes, mask, _mm512_add_ps(even, odd));
    }
#else
    // Unreachable: fits() is false without AVX-512, so no product is ever built.
    (void)in, (void)addend, (void)out;
    std::abort();
#endif
  }

 private:
#if defined(CPU_CAPABILITY_AVX512)
  static __mmask16 lane_mask(int64_t count) {
    return count >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
  }

  static __m512 term(__m512 low, __m512 high, const int32_t* sources, const float* weights,
                     __m512 acc) {
    const __m512i index = _mm512_loadu_si512(sources);
    return _mm512_fmadd_ps(_mm512_permutex2var_ps(low, index, high),
                           _mm512_loadu_ps(weights), acc);
  }
#endif

  int64_t inputs_ = 0, outputs_ = 0, terms_ = 0, vectors_ = 0;
  std::vector<int32_t> sources_;  // [vectors][terms][lanes]
  std::vector<float> weights_;    // [vectors][terms][lanes]
  std::vector<float> bias_;       // [vectors][lanes]
};

}  // namespace rnnfast
