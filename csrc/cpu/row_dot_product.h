// C[m, n] = A[m, k] B[n, k]^T (+ C) for a few rows m, float, AVX-512: each output the dot
// product of a row of A with a row of B, both read as they are stored.
//
// The forward's products have this form (x W_ih^T over all steps, h W_hh^T per step), with W
// stored [gates, k]. MKL runs it by first packing W^T, a pass over all of W that for 10 rows
// costs about as much as the product. Here W is read once, in place: a block of 8 rows of B
// stays in L1 while the rows of A pass over it three at a time, with 3 x 8 vectors of partial
// sums in registers, reduced to their 24 outputs after the k loop. Measured on 2 threads,
// [10, 500] x [500, 500]^T: 26 us, against 39 us for MKL (23 us with W^T given); forward of
// the course's 2-layer energy models 7-10% faster. At 20 rows MKL's packing pays for itself
// (a 2-layer GRU's training step ran 3% slower with its 20-row input projections here), and
// at k = 125 it is faster.
#pragma once

#if defined(CPU_CAPABILITY_AVX512)

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "capability.h"

namespace rnnfast {
namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h
namespace row_dot {

constexpr int64_t kBlockRows = 8;  // rows of B (columns of C) per block
// Products this kernel takes (measured from 10 to 20 rows): few rows of A, and long ones.
constexpr int64_t kMinRows = 8, kMaxRows = 16, kMinDepth = 200;

inline bool takes(int64_t m, int64_t n, int64_t k) {
  return m >= kMinRows && m <= kMaxRows && k >= kMinDepth && n >= kBlockRows;
}

// The lane sums of 8 vectors, as the 8 lanes of one (vectors by value: the caller's stay in
// registers).
inline __m256 lane_sums(__m512 s0, __m512 s1, __m512 s2, __m512 s3, __m512 s4, __m512 s5, __m512 s6,
                        __m512 s7) {
  const auto halves_added = [](__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  };
  const __m256 halves[kBlockRows] = {halves_added(s0), halves_added(s1), halves_added(s2),
                                     halves_added(s3), halves_added(s4), halves_added(s5),
                                     halves_added(s6), halves_added(s7)};
  // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]: two rounds leave
  // [s0 s1 s2 s3 | s0' s1' s2' s3'] (sums over each 128-bit half) for vectors 0-3 and 4-7.
  const __m256 low =
      _mm256_hadd_ps(_mm256_hadd_ps(halves[0], halves[1]), _mm256_hadd_ps(halves[2], halves[3]));
  const __m256 high =
      _mm256_hadd_ps(_mm256_hadd_ps(halves[4], halves[5]), _mm256_hadd_ps(halves[6], halves[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20),
                       _mm256_permute2f128_ps(low, high, 0x31));
}

// Rows [0, kRowsA) of A against the block of B rows b_rows[0..8) (a partial block repeats its
// last row), into the first `columns` outputs of each row of C. The sums are indexed by
// constants only (index sequences), so that the compiler keeps all of them in registers.
template <int kRowsA, size_t... J>
inline void block(const float* a, int64_t lda, const float* const (&b_rows)[kBlockRows], int64_t k,
                  bool accumulate, float* c, int64_t ldc, int64_t columns,
                  std::index_sequence<J...>) {
  static_assert(sizeof...(J) == kBlockRows && kRowsA >= 1 && kRowsA <= 3);
  // Rows 0, 1 and 2 of A against the block (those past kRowsA are never used).
  __m512 sums0[kBlockRows] = {((void)J, _mm512_setzero_ps())...};
  __m512 sums1[kBlockRows] = {((void)J, _mm512_setzero_ps())...};
  __m512 sums2[kBlockRows] = {((void)J, _mm512_setzero_ps())...};
  // The k loop in whole vectors; the rest under a lane mask.
  for (int64_t p = 0; p < k; p += 16) {
    const __mmask16 lanes = k - p >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (k - p)) - 1);
    const __m512 a0 = _mm512_maskz_loadu_ps(lanes, a + p);
    const __m512 a1 = kRowsA > 1 ? _mm512_maskz_loadu_ps(lanes, a + lda + p) : a0;
    const __m512 a2 = kRowsA > 2 ? _mm512_maskz_loadu_ps(lanes, a + 2 * lda + p) : a0;
    (
        (void)[&] {
          const __m512 b_part = _mm512_maskz_loadu_ps(lanes, b_rows[J] + p);
          sums0[J] = _mm512_fmadd_ps(a0, b_part, sums0[J]);
          if constexpr (kRowsA > 1) sums1[J] = _mm512_fmadd_ps(a1, b_part, sums1[J]);
          if constexpr (kRowsA > 2) sums2[J] = _mm512_fmadd_ps(a2, b_part, sums2[J]);
        }(),
        ...);
  }
  const __mmask8 outputs = __mmask8((1u << columns) - 1);
  const auto store = [&](float* c_row, __m256 result) {
    if (accumulate) result = _mm256_add_ps(result, _mm256_maskz_loadu_ps(outputs, c_row));
    _mm256_mask_storeu_ps(c_row, outputs, result);
  };
  store(c, lane_sums(sums0[J]...));
  if constexpr (kRowsA > 1) store(c + ldc, lane_sums(sums1[J]...));
  if constexpr (kRowsA > 2) store(c + 2 * ldc, lane_sums(sums2[J]...));
}

// C[m, n] = A[m, k] B[n, k]^T, plus C where `accumulate`; A's and B's rows contiguous.
// `threaded`: the blocks of B's rows are split over the threads (else all on the calling one).
inline void product(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                    int64_t ldb, bool accumulate, float* c, int64_t ldc, bool threaded) {
  const int64_t blocks = (n + kBlockRows - 1) / kBlockRows;
  at::parallel_for(0, blocks, threaded ? 1 : blocks, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t j0 = index * kBlockRows;
      const int64_t columns = std::min(kBlockRows, n - j0);
      const float* b_rows[kBlockRows];
      for (int64_t j = 0; j < kBlockRows; ++j) {
        b_rows[j] = b + (j0 + std::min(j, columns - 1)) * ldb;
      }
      // Rows of A three at a time, then the one or two left.
      constexpr auto columns_of_block = std::make_index_sequence<kBlockRows>();
      int64_t r = 0;
      for (; r + 3 <= m; r += 3) {
        block<3>(a + r * lda, lda, b_rows, k, accumulate, c + r * ldc + j0, ldc, columns,
                 columns_of_block);
      }
      if (m - r == 2) {
        block<2>(a + r * lda, lda, b_rows, k, accumulate, c + r * ldc + j0, ldc, columns,
                 columns_of_block);
      } else if (m - r == 1) {
        block<1>(a + r * lda, lda, b_rows, k, accumulate, c + r * ldc + j0, ldc, columns,
                 columns_of_block);
      }
    }
  });
}

}  // namespace row_dot
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast

#endif  // CPU_CAPABILITY_AVX512
