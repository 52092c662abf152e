// Products for the tiniest layers (a few hidden units, a few batch rows), in float with
// AVX-512 or AVX2, where the whole input of a step fits in two vector registers (at most 32
// values with AVX-512, 16 with AVX2) and the output is a few vectors:
//   out[o] = start[o] + sum_s in[source_s(o)] * weight_s(o)     s = 0 .. terms - 1
// Output lane o of term s takes its input by a lane permutation of the two input registers
// (one instruction with AVX-512, three with AVX2), so any layout of the input and output
// (plain rows, or the gate-packed [gates][B][H] of layer_view.h) runs as a few fused
// multiply-adds per output vector, where a loop over rows, gates and units would spend a step
// in index arithmetic.
//
// LaneProduct is one output vector with its inputs in registers (register_layer.h keeps the
// whole layer there); RegisterProduct is a per-step product of the CPU engine, from and to
// memory.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>

#include "capability.h"
// The lane kernels of this file and register_layer.h are built.
#define RNNFAST_LANE_KERNELS 1
#endif

namespace rnnfast {
namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h

// One vector register as the lane kernels use it: float lanes, 32-bit lane indices and a lane
// mask (AVX-512's mask register; AVX2's all-ones lanes of a vector).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kRegisterLanes = 16;
namespace lanes {
using Vector = __m512;
using Index = __m512i;
using Mask = __mmask16;

// The first `count` lanes (none for count <= 0, all for count >= kRegisterLanes).
inline Mask first(int64_t count) {
  if (count <= 0) return Mask(0);
  return count >= kRegisterLanes ? Mask(0xFFFF) : Mask((1u << count) - 1);
}
inline Vector zero() { return _mm512_setzero_ps(); }
inline Vector load(const float* p) { return _mm512_loadu_ps(p); }
// Lanes outside the mask read as 0 and touch no memory.
inline Vector load(Mask mask, const float* p) { return _mm512_maskz_loadu_ps(mask, p); }
inline void store(float* p, Mask mask, Vector v) { _mm512_mask_storeu_ps(p, mask, v); }
// The same, where the whole vector at p may be read (load_whole) or written (store_whole):
// AVX-512's masked loads and stores are as fast as plain ones.
inline Vector load_whole(Mask mask, const float* p) { return _mm512_maskz_loadu_ps(mask, p); }
inline void store_whole(float* p, Mask mask, Vector v) { _mm512_mask_storeu_ps(p, mask, v); }
inline Index load_index(const int32_t* p) { return _mm512_loadu_si512(p); }
inline Vector fmadd(Vector a, Vector b, Vector c) { return _mm512_fmadd_ps(a, b, c); }
inline Vector add(Vector a, Vector b) { return _mm512_add_ps(a, b); }
// Lane o: lane index[o] of v.
inline Vector permute(Index index, Vector v) { return _mm512_permutexvar_ps(index, v); }
// Lane o: lane index[o] of the 2 * kRegisterLanes lanes of low, then high.
inline Vector permute(Vector low, Index index, Vector high) {
  return _mm512_permutex2var_ps(low, index, high);
}
// Lane o: base[offsets[o]] within the mask, else 0.
inline Vector gather(Mask mask, Index offsets, const float* base) {
  return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, offsets, base, 4);
}
}  // namespace lanes
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kRegisterLanes = 8;
namespace lanes {
using Vector = __m256;
using Index = __m256i;
using Mask = __m256i;

inline Mask first(int64_t count) {
  const int32_t lanes = static_cast<int32_t>(std::clamp<int64_t>(count, 0, kRegisterLanes));
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline Vector zero() { return _mm256_setzero_ps(); }
inline Vector load(const float* p) { return _mm256_loadu_ps(p); }
inline Vector load(Mask mask, const float* p) { return _mm256_maskload_ps(p, mask); }
inline void store(float* p, Mask mask, Vector v) { _mm256_maskstore_ps(p, mask, v); }
// AVX2's masked loads and stores cost several plain ones on AMD CPUs: where the whole vector
// may be read, a plain load with the lanes outside the mask zeroed; where it may be written,
// a plain store.
inline Vector load_whole(Mask mask, const float* p) {
  return _mm256_and_ps(_mm256_loadu_ps(p), _mm256_castsi256_ps(mask));
}
inline void store_whole(float* p, Mask, Vector v) { _mm256_storeu_ps(p, v); }
inline Index load_index(const int32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
inline Vector fmadd(Vector a, Vector b, Vector c) { return _mm256_fmadd_ps(a, b, c); }
inline Vector add(Vector a, Vector b) { return _mm256_add_ps(a, b); }
inline Vector permute(Index index, Vector v) { return _mm256_permutevar8x32_ps(v, index); }
inline Vector permute(Vector low, Index index, Vector high) {
  // Each permute reads an index's low 3 bits; bit 3 (moved to the sign bit) picks high.
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, index),
                          _mm256_permutevar8x32_ps(high, index),
                          _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
}
inline Vector gather(Mask mask, Index offsets, const float* base) {
  return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), base, offsets, _mm256_castsi256_ps(mask), 4);
}
}  // namespace lanes
#else
constexpr int kRegisterLanes = 16;  // (no lane kernels: only sizes are computed with it)
#endif

#if defined(RNNFAST_LANE_KERNELS)

// One output vector: `terms` pairs of (source lanes, weights); sources index two input
// vectors, low (lanes 0 .. kRegisterLanes - 1) and high (the next kRegisterLanes).
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
  lanes::Vector add_to(lanes::Vector start, lanes::Vector low, lanes::Vector high) const {
    // Two accumulators halve the chain of dependent multiply-adds.
    lanes::Vector even = start, odd = lanes::zero();
    int64_t s = 0;
    for (; s + 1 < terms_; s += 2) {
      even = term(even, low, high, s);
      odd = term(odd, low, high, s + 1);
    }
    if (s < terms_) even = term(even, low, high, s);
    return lanes::add(even, odd);
  }

 private:
  lanes::Vector term(lanes::Vector acc, lanes::Vector low, lanes::Vector high, int64_t s) const {
    const lanes::Index index = lanes::load_index(sources_.data() + s * kRegisterLanes);
    return lanes::fmadd(lanes::permute(low, index, high),
                        lanes::load(weights_.data() + s * kRegisterLanes), acc);
  }

  std::vector<int32_t> sources_;  // [terms][lanes]
  std::vector<float> weights_;    // [terms][lanes]
  int64_t terms_;
};

#endif  // RNNFAST_LANE_KERNELS

class RegisterProduct {
 public:
  static constexpr int64_t kMaxInputs = 2 * kRegisterLanes;
  // Output vectors times terms: the tables (an index and a weight vector per entry) stay in L1.
  static constexpr int64_t kMaxEntries = 64;

  static bool fits(int64_t inputs, int64_t outputs, int64_t terms) {
#if defined(RNNFAST_LANE_KERNELS)
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
#if defined(RNNFAST_LANE_KERNELS)
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
#if defined(RNNFAST_LANE_KERNELS)
    const lanes::Vector low = lanes::load(lanes::first(inputs_), in);
    const lanes::Vector high =
        inputs_ > kRegisterLanes
            ? lanes::load(lanes::first(inputs_ - kRegisterLanes), in + kRegisterLanes)
            : lanes::zero();
    for (size_t v = 0; v < vectors_.size(); ++v) {
      const int64_t first = static_cast<int64_t>(v) * kRegisterLanes;
      const lanes::Mask mask = lanes::first(outputs_ - first);
      const lanes::Vector start = lanes::load(mask, (addend ? addend : bias_.data()) + first);
      lanes::store(out + first, mask, vectors_[v].add_to(start, low, high));
    }
#else
    // Unreachable: fits() is false without vector lanes, so no product is ever built.
    (void)in, (void)addend, (void)out;
    std::abort();
#endif
  }

 private:
  static int64_t round_up(int64_t n) {
    return (n + kRegisterLanes - 1) / kRegisterLanes * kRegisterLanes;
  }

  int64_t inputs_ = 0, outputs_ = 0;
#if defined(RNNFAST_LANE_KERNELS)
  std::vector<LaneProduct> vectors_;  // one per output vector
#endif
  std::vector<float> bias_;  // [outputs rounded up to whole vectors]
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
