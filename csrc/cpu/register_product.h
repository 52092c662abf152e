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
// LaneProduct is one output vector with its inputs in registers, and RegisterProduct a per-step
// product of the CPU engine made of them, from and to memory; GateLanes is the products of a
// layer's gates, with inputs and outputs in registers (register_layer.h keeps the whole layer
// there).
#pragma once

#include <algorithm>
#include <array>
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
// mask (AVX-512's mask register; AVX2's all-ones lanes of a vector). Lanes512 and Lanes256 hold
// the same functions for a 512-bit and a 256-bit register; `lanes` is the widest this copy has,
// which every product but the register layer's narrow one takes (register_layer.h).
#if defined(CPU_CAPABILITY_AVX512)
struct Lanes512 {
  static constexpr int kLanes = 16;
  using Vector = __m512;
  using Index = __m512i;
  using Mask = __mmask16;

  // The first `count` lanes (none for count <= 0, all for count >= kLanes).
  static Mask first(int64_t count) {
    if (count <= 0) return Mask(0);
    return count >= kLanes ? Mask(0xFFFF) : Mask((1u << count) - 1);
  }
  static Vector zero() { return _mm512_setzero_ps(); }
  static Vector load(const float* p) { return _mm512_loadu_ps(p); }
  // Lanes outside the mask read as 0 and touch no memory.
  static Vector load(Mask mask, const float* p) { return _mm512_maskz_loadu_ps(mask, p); }
  static void store(float* p, Mask mask, Vector v) { _mm512_mask_storeu_ps(p, mask, v); }
  // The same, where the whole vector at p may be read (load_whole) or written (store_whole):
  // AVX-512's masked loads and stores are as fast as plain ones.
  static Vector load_whole(Mask mask, const float* p) { return _mm512_maskz_loadu_ps(mask, p); }
  static void store_whole(float* p, Mask mask, Vector v) { _mm512_mask_storeu_ps(p, mask, v); }
  static Index load_index(const int32_t* p) { return _mm512_loadu_si512(p); }
  static Vector fmadd(Vector a, Vector b, Vector c) { return _mm512_fmadd_ps(a, b, c); }
  static Vector add(Vector a, Vector b) { return _mm512_add_ps(a, b); }
  static Vector mul(Vector a, Vector b) { return _mm512_mul_ps(a, b); }
  // Lane o: lane index[o] of v.
  static Vector permute(Index index, Vector v) { return _mm512_permutexvar_ps(index, v); }
  // Lane o: lane index[o] of the 2 * kLanes lanes of low, then high.
  static Vector permute(Vector low, Index index, Vector high) {
    return _mm512_permutex2var_ps(low, index, high);
  }
  // Lane o: base[offsets[o]] within the mask, else 0.
  static Vector gather(Mask mask, Index offsets, const float* base) {
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, offsets, base, 4);
  }
};

// 256-bit registers with AVX-512's masks and permutations (AVX-512VL).
struct Lanes256 {
  static constexpr int kLanes = 8;
  using Vector = __m256;
  using Index = __m256i;
  using Mask = __mmask8;

  static Mask first(int64_t count) {
    if (count <= 0) return Mask(0);
    return count >= kLanes ? Mask(0xFF) : Mask((1u << count) - 1);
  }
  static Vector zero() { return _mm256_setzero_ps(); }
  static Vector load(const float* p) { return _mm256_loadu_ps(p); }
  static Vector load(Mask mask, const float* p) { return _mm256_maskz_loadu_ps(mask, p); }
  static void store(float* p, Mask mask, Vector v) { _mm256_mask_storeu_ps(p, mask, v); }
  static Vector load_whole(Mask mask, const float* p) { return _mm256_maskz_loadu_ps(mask, p); }
  static void store_whole(float* p, Mask mask, Vector v) { _mm256_mask_storeu_ps(p, mask, v); }
  static Index load_index(const int32_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  static Vector fmadd(Vector a, Vector b, Vector c) { return _mm256_fmadd_ps(a, b, c); }
  static Vector add(Vector a, Vector b) { return _mm256_add_ps(a, b); }
  static Vector mul(Vector a, Vector b) { return _mm256_mul_ps(a, b); }
  static Vector permute(Index index, Vector v) { return _mm256_permutexvar_ps(index, v); }
  static Vector permute(Vector low, Index index, Vector high) {
    return _mm256_permutex2var_ps(low, index, high);
  }
  static Vector gather(Mask mask, Index offsets, const float* base) {
    return _mm256_mmask_i32gather_ps(_mm256_setzero_ps(), mask, offsets, base, 4);
  }
};
using lanes = Lanes512;
#elif defined(CPU_CAPABILITY_AVX2)
struct Lanes256 {
  static constexpr int kLanes = 8;
  using Vector = __m256;
  using Index = __m256i;
  using Mask = __m256i;

  static Mask first(int64_t count) {
    const int32_t on = static_cast<int32_t>(std::clamp<int64_t>(count, 0, kLanes));
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(on), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static Vector zero() { return _mm256_setzero_ps(); }
  static Vector load(const float* p) { return _mm256_loadu_ps(p); }
  static Vector load(Mask mask, const float* p) { return _mm256_maskload_ps(p, mask); }
  static void store(float* p, Mask mask, Vector v) { _mm256_maskstore_ps(p, mask, v); }
  // AVX2's masked loads and stores cost several plain ones on AMD CPUs: where the whole vector
  // may be read, a plain load with the lanes outside the mask zeroed; where it may be written,
  // a plain store.
  static Vector load_whole(Mask mask, const float* p) {
    return _mm256_and_ps(_mm256_loadu_ps(p), _mm256_castsi256_ps(mask));
  }
  static void store_whole(float* p, Mask, Vector v) { _mm256_storeu_ps(p, v); }
  static Index load_index(const int32_t* p) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  }
  static Vector fmadd(Vector a, Vector b, Vector c) { return _mm256_fmadd_ps(a, b, c); }
  static Vector add(Vector a, Vector b) { return _mm256_add_ps(a, b); }
  static Vector mul(Vector a, Vector b) { return _mm256_mul_ps(a, b); }
  static Vector permute(Index index, Vector v) { return _mm256_permutevar8x32_ps(v, index); }
  static Vector permute(Vector low, Index index, Vector high) {
    // Each permute reads an index's low 3 bits; bit 3 (moved to the sign bit) picks high.
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, index),
                            _mm256_permutevar8x32_ps(high, index),
                            _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
  }
  static Vector gather(Mask mask, Index offsets, const float* base) {
    return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), base, offsets, _mm256_castsi256_ps(mask),
                                    4);
  }
};
using lanes = Lanes256;
#endif
#if defined(RNNFAST_LANE_KERNELS)
constexpr int kRegisterLanes = lanes::kLanes;
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

// The products of a layer's gates, where term s reads the same input lanes for every gate
// (lane b * H + j of each gate reads input k of row b in term k): one lane permutation per term
// serves all the gates, and, input by input, the gates' products are independent multiply-adds.
//   each: out_g[o] = out_g[o] + sum_s in[source_s(o)] * weight_g,s(o)   (one input, Gates outputs)
//   sum:  out[o] = start[o] + sum_g sum_s in_g[source_s(o)] * weight_g,s(o)   (Gates inputs of one
//         vector each, one output)
// Per term a product with a LaneProduct per gate permuted its input once for each gate; with AVX2
// a permutation of two inputs is three instructions, all on the chain of a step. L: the
// register's lanes (Lanes512 or Lanes256).
template <int Gates, typename L = lanes>
class GateLanes {
 public:
  using Vector = typename L::Vector;
  using Index = typename L::Index;
  using Vectors = std::array<Vector, Gates>;

  // source(o, s), weight(g, o, s) for the output lanes o < outputs; later lanes get 0. With
  // two_inputs, sources index two input vectors (low, high) as LaneProduct's do.
  template <typename Source, typename Weight>
  GateLanes(int64_t outputs, int64_t terms, bool two_inputs, Source source, Weight weight)
      : sources_(terms * L::kLanes, 0),
        weights_(terms * Gates * L::kLanes, 0.0f),
        terms_(terms),
        two_inputs_(two_inputs) {
    for (int64_t s = 0; s < terms; ++s) {
      for (int64_t o = 0; o < outputs; ++o) {
        sources_[s * L::kLanes + o] = static_cast<int32_t>(source(o, s));
        for (int g = 0; g < Gates; ++g) {
          weights_[(s * Gates + g) * L::kLanes + o] = weight(g, o, s);
        }
      }
    }
  }

  // out_g += the product of the inputs low and high (high: with two_inputs only). Inlined, as
  // sum(): out of line, each call's sums went through memory, on the chain of a step.
  __attribute__((always_inline)) void each(Vectors& out, Vector low, Vector high) const {
    // Odd terms go to sums of their own: half the chain of dependent multiply-adds.
    Vectors odd;
    int64_t s = 0;
    for (; s + 1 < terms_; s += 2) {
      const Vector even_in = input(s, low, high), odd_in = input(s + 1, low, high);
      for (int g = 0; g < Gates; ++g) {
        out[g] = L::fmadd(even_in, weight(s, g), out[g]);
        odd[g] = s == 0 ? L::mul(odd_in, weight(1, g)) : L::fmadd(odd_in, weight(s + 1, g), odd[g]);
      }
    }
    if (s < terms_) {
      const Vector in = input(s, low, high);
      for (int g = 0; g < Gates; ++g) out[g] = L::fmadd(in, weight(s, g), out[g]);
    }
    if (terms_ > 1) {
      for (int g = 0; g < Gates; ++g) out[g] = L::add(out[g], odd[g]);
    }
  }

  // start + the products of the gates' inputs (one vector each).
  __attribute__((always_inline)) Vector sum(Vector start, const Vectors& in) const {
    // A sum per gate (the first from start), added pairwise at the end: the gates' products do
    // not wait on each other.
    Vectors sums;
    const Index first = index(0);
    for (int g = 0; g < Gates; ++g) {
      sums[g] = g == 0 ? L::fmadd(L::permute(first, in[g]), weight(0, g), start)
                       : L::mul(L::permute(first, in[g]), weight(0, g));
    }
    for (int64_t s = 1; s < terms_; ++s) {
      const Index from = index(s);
      for (int g = 0; g < Gates; ++g) {
        sums[g] = L::fmadd(L::permute(from, in[g]), weight(s, g), sums[g]);
      }
    }
    if constexpr (Gates == 1) {
      return sums[0];
    } else if constexpr (Gates == 3) {
      return L::add(L::add(sums[0], sums[1]), sums[2]);
    } else {
      static_assert(Gates == 4, "the cells have 1, 3 or 4 gates");
      return L::add(L::add(sums[0], sums[1]), L::add(sums[2], sums[3]));
    }
  }

 private:
  Index index(int64_t s) const { return L::load_index(sources_.data() + s * L::kLanes); }
  Vector weight(int64_t s, int g) const {
    return L::load(weights_.data() + (s * Gates + g) * L::kLanes);
  }
  Vector input(int64_t s, Vector low, Vector high) const {
    return two_inputs_ ? L::permute(low, index(s), high) : L::permute(index(s), low);
  }

  std::vector<int32_t> sources_;  // [terms][lanes]
  std::vector<float> weights_;    // [terms][Gates][lanes]
  int64_t terms_;
  bool two_inputs_;
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
