// Products for the tiniest layers (a few hidden units, a few batch rows), in float with
// AVX-512, where the whole input of a step fits in two vector registers (at most 32 values)
// and the output is a few vectors:
//   out[o] = start[o] + sum_s in[source_s(o)] * weight_s(o)     s = 0 .. terms - 1
// Output lane o of term s takes its input by a lane permutation of the two input registers
// (one instruction), so any layout of the input and output (plain rows, or the gate-packed
// [gates][B][H] of layer_view.h) runs as a few fused multiply-adds per output vector, where a
// loop over rows, gates and units would spend a step in index arithmetic.
//
// LaneProduct is one output vector with its inputs in registers (register_layer.h keeps the
// whole layer there); RegisterProduct is a per-step product of the CPU engine, from and to
// memory.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace rnnfast {

constexpr int kRegisterLanes = 16;

#if defined(CPU_CAPABILITY_AVX512)

// One output vector: `terms` pairs of (source lanes, weights); sources index two input
// vectors, low (lanes 0 .. 15) and high (16 .. 31).
class LaneProduct {
 public:
  // source(o, s), weight(o, s) for the output lanes o < outputs; later lanes get 0.
  template <typename Source, typename Weight>
  LaneProduct(int64_t outputs, int64_t terms, Source source, Weight weight)
      : sources_(terms * kRegisterLanes, 0), weights_(terms * kRegisterLanes, 0.0f), terms_(terms) {
    for (int64_t s = 0; s < terms_; ++s) {
      for (int64_t o = 0; o < outputs; ++o) {
        sources_[s * kRegisterLanes + o] = static_cast<int32_t>(source(o, s));
        weights_[s * kRegisterLanes + o] = weight(o, s);
      }
    }
  }

  // start + the product of the inputs low and high.
  __m512 add_to(__m512 start, __m512 low, __m512 high) const {
    // Two accumulators halve the chain of dependent multiply-adds.
    __m512 even = start, odd = _mm512_setzero_ps();
    int64_t s = 0;
    for (; s + 1 < terms_; s += 2) {
      even = term(even, low, high, s);
      odd = term(odd, low, high, s + 1);
    }
    if (s < terms_) even = term(even, low, high, s);
    return _mm512_add_ps(even, odd);
  }

 private:
  __m512 term(__m512 acc, __m512 low, __m512 high, int64_t s) const {
    const __m512i index = _mm512_loadu_si512(sources_.data() + s * kRegisterLanes);
    return _mm512_fmadd_ps(_mm512_permutex2var_ps(low, index, high),
                           _mm512_loadu_ps(weights_.data() + s * kRegisterLanes), acc);
  }

  std::vector<int32_t> sources_;  // [terms][lanes]
  std::vector<float> weights_;    // [terms][lanes]
  int64_t terms_;
};

// The first `count` lanes of a vector (none for count <= 0, all for count >= 16).
inline __mmask16 first_lanes(int64_t count) {
  if (count <= 0) return __mmask16(0);
  return count >= kRegisterLanes ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
}

#endif  // CPU_CAPABILITY_AVX512

class RegisterProduct {
 public:
  static constexpr int64_t kMaxInputs = 2 * kRegisterLanes;
  // Output vectors times terms: the tables (an index and a weight vector per entry) stay in L1.
  static constexpr int64_t kMaxEntries = 64;

  static bool fits(int64_t inputs, int64_t outputs, int64_t terms) {
#if defined(CPU_CAPABILITY_AVX512)
    return inputs > 0 && inputs <= kMaxInputs && outputs > 0 && terms > 0 &&
           (outputs + kRegisterLanes - 1) / kRegisterLanes * terms <= kMaxEntries;
#else
    (void)inputs, (void)outputs, (void)terms;
    return false;
#endif
  }

  RegisterProduct() = default;

  // source(o, s): the input position output o reads in term s; weight(o, s): its factor;
  // bias(o): the value out[o] starts from when no addend is given (run with addend nullptr).
  template <typename Source, typename Weight, typename Bias>
  RegisterProduct(int64_t inputs, int64_t outputs, int64_t terms, Source source, Weight weight,
                  Bias bias)
      : inputs_(inputs), outputs_(outputs), bias_(round_up(outputs), 0.0f) {
#if defined(CPU_CAPABILITY_AVX512)
    for (int64_t first = 0; first < outputs; first += kRegisterLanes) {
      vectors_.emplace_back(
          std::min<int64_t>(kRegisterLanes, outputs - first), terms,
          [&](int64_t o, int64_t s) { return source(first + o, s); },
          [&](int64_t o, int64_t s) { return weight(first + o, s); });
    }
#endif
    for (int64_t o = 0; o < outputs; ++o) bias_[o] = bias(o);
  }

  bool usable() const { return outputs_ > 0; }

  // in: [inputs]; addend: [outputs] in output order, or nullptr for the bias; out: [outputs].
  void run(const float* in, const float* addend, float* out) const {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 low = _mm512_maskz_loadu_ps(first_lanes(inputs_), in);
    const __m512 high =
        inputs_ > kRegisterLanes
            ? _mm512_maskz_loadu_ps(first_lanes(inputs_ - kRegisterLanes), in + kRegisterLanes)
            : _mm512_setzero_ps();
    for (size_t v = 0; v < vectors_.size(); ++v) {
      const int64_t first = static_cast<int64_t>(v) * kRegisterLanes;
      const __mmask16 mask = first_lanes(outputs_ - first);
      const __m512 start = _mm512_maskz_loadu_ps(mask, (addend ? addend : bias_.data()) + first);
      _mm512_mask_storeu_ps(out + first, mask, vectors_[v].add_to(start, low, high));
    }
#else
    // Unreachable: fits() is false without AVX-512, so no product is ever built.
    (void)in, (void)addend, (void)out;
    std::abort();
#endif
  }

 private:
  static int64_t round_up(int64_t n) {
    return (n + kRegisterLanes - 1) / kRegisterLanes * kRegisterLanes;
  }

  int64_t inputs_ = 0, outputs_ = 0;
#if defined(CPU_CAPABILITY_AVX512)
  std::vector<LaneProduct> vectors_;  // one per output vector
#endif
  std::vector<float> bias_;  // [outputs rounded up to whole vectors]
};

}  // namespace rnnfast
