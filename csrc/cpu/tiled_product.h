// A register-tiled matrix product for the per-step recurrent products of the CPU engine:
//   out[B, N] = addend[B, N] + in[B, K] Wt[K, N]
// with Wt held in a padded row-major copy (TiledWeights), made once per layer call.
//
// Inside the time loop these products are small (a few rows times one weight matrix that stays
// in cache), where a BLAS call costs more in setup than in arithmetic. Here a tile of kRows rows
// by kVectors SIMD vectors of columns stays in registers for the whole k loop: per k, kVectors
// loads of Wt, kRows broadcasts of `in` and kRows * kVectors fused multiply-adds.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "capability.h"

namespace rnnfast {
namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h

// Wt [K, N] row-major with each row padded to a whole number of SIMD vectors (zeros beyond N),
// so the k loop reads whole vectors only.
template <typename T>
class TiledWeights {
 public:
  static constexpr int kLanes = at::vec::Vectorized<T>::size();

  TiledWeights() = default;

  // From M [N, K] (any strides): Wt = M^T. Made once per layer call, so made by hand: ATen's
  // zero fill and strided copy cost several times the few steps of a short sequence. M may be
  // bfloat16 or float16 for a float Wt (a reduced type's product run in float,
  // recurrent_product.h), converted as it is copied: a float copy of M beside Wt was the peak
  // memory of those layers' calls.
  explicit TiledWeights(const at::Tensor& matrix)
      : n_(matrix.size(0)), k_(matrix.size(1)), padded_n_((n_ + kLanes - 1) / kLanes * kLanes) {
    storage_ =
        at::empty({k_, padded_n_}, matrix.options().dtype(c10::CppTypeToScalarType<T>::value));
    T* wt = storage_.template data_ptr<T>();
    if (matrix.scalar_type() == storage_.scalar_type() && matrix.stride(0) != 1) {
      // Rows of M: a blocked SIMD transpose.
      const at::Tensor rows = matrix.contiguous();
      at::vec::transpose_mxn<T>(rows.template data_ptr<T>(), k_, wt, padded_n_,
                                static_cast<int>(n_), static_cast<int>(k_));
    } else if (matrix.scalar_type() == storage_.scalar_type()) {
      copy_transposed(matrix.template data_ptr<T>(), matrix.stride(0), matrix.stride(1), wt);
    } else {
      TORCH_INTERNAL_ASSERT((std::is_same_v<T, float>), "rnnfast: only float Wt converts its M");
      AT_DISPATCH_REDUCED_FLOATING_TYPES(matrix.scalar_type(), "rnnfast_tiled_weights", [&] {
        copy_transposed(matrix.template data_ptr<scalar_t>(), matrix.stride(0), matrix.stride(1),
                        wt);
      });
    }
    // The padding columns: the k loop multiplies them too (whole vectors, outputs not stored),
    // and uninitialised memory could hold denormals, which slow the multiply-adds.
    for (int64_t k = 0; k < k_; ++k) {
      std::fill(wt + k * padded_n_ + n_, wt + (k + 1) * padded_n_, T(0));
    }
  }

  int64_t n() const { return n_; }
  int64_t k() const { return k_; }
  int64_t padded_n() const { return padded_n_; }
  const T* data() const { return storage_.template data_ptr<T>(); }

 private:
  // wt[k][n] = M[n][k] converted to T (M's element (n, k) at m + n * stride_n + k * stride_k):
  // where M's columns are contiguous (they are the rows of M^T), row copies; else a block of
  // M's rows at a time, converted into a buffer and transposed from there as M's own rows are.
  template <typename S>
  void copy_transposed(const S* m, int64_t stride_n, int64_t stride_k, T* wt) const {
    if (stride_n == 1) {
      for (int64_t k = 0; k < k_; ++k) {
        std::copy(m + k * stride_k, m + k * stride_k + n_, wt + k * padded_n_);
      }
      return;
    }
    constexpr int64_t kBlockRows = 16;
    std::vector<T> block(kBlockRows * k_);
    for (int64_t n0 = 0; n0 < n_; n0 += kBlockRows) {
      const int64_t rows = std::min(kBlockRows, n_ - n0);
      for (int64_t r = 0; r < rows; ++r) {
        const S* row = m + (n0 + r) * stride_n;
        for (int64_t k = 0; k < k_; ++k) block[r * k_ + k] = static_cast<T>(row[k * stride_k]);
      }
      at::vec::transpose_mxn<T>(block.data(), k_, wt + n0, padded_n_, static_cast<int>(rows),
                                static_cast<int>(k_));
    }
  }

  int64_t n_ = 0, k_ = 0, padded_n_ = 0;
  at::Tensor storage_;
};

namespace tiled {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Rows per tile; vectors of columns per tile (what the vector registers hold: 16 of them for
// AVX2, 32 for AVX-512, a few left for Wt and the broadcasts).
constexpr int kRows = 4;  // tiled_product's tail switch covers 1 .. kRows - 1 rows
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVectors = 4;
#else
constexpr int kVectors = 2;
#endif

// One tile: `Rows` rows from b0, `Vectors` vectors of columns from n0; `last_lanes` lanes of the
// last vector are real columns (the rest is padding, not stored).
template <typename T, int Rows, int Vectors>
inline void tile(const T* in, int64_t k_count, const TiledWeights<T>& w, const T* addend,
                 int64_t addend_stride, T* out, int64_t out_stride, int64_t n0, int last_lanes) {
  using V = Vec<T>;
  constexpr int L = V::size();
  V acc[Rows][Vectors];
  for (int r = 0; r < Rows; ++r) {
    for (int c = 0; c < Vectors; ++c) {
      const int lanes = c == Vectors - 1 ? last_lanes : L;
      acc[r][c] = addend ? V::loadu(addend + r * addend_stride + n0 + c * L, lanes) : V(T(0));
    }
  }
  const T* w_col = w.data() + n0;
  const int64_t ldw = w.padded_n();
  for (int64_t k = 0; k < k_count; ++k) {
    V w_vec[Vectors];
    for (int c = 0; c < Vectors; ++c) w_vec[c] = V::loadu(w_col + k * ldw + c * L);
    for (int r = 0; r < Rows; ++r) {
      const V x(in[r * k_count + k]);
      for (int c = 0; c < Vectors; ++c) acc[r][c] = at::vec::fmadd(x, w_vec[c], acc[r][c]);
    }
  }
  for (int r = 0; r < Rows; ++r) {
    for (int c = 0; c < Vectors; ++c) {
      const int lanes = c == Vectors - 1 ? last_lanes : L;
      acc[r][c].store(out + r * out_stride + n0 + c * L, lanes);
    }
  }
}

// The tiles of `Rows` rows from b0 across all columns.
template <typename T, int Rows>
inline void row_block(const T* in, const TiledWeights<T>& w, const T* addend, int64_t addend_stride,
                      T* out, int64_t out_stride) {
  constexpr int L = Vec<T>::size();
  const int64_t N = w.n(), K = w.k();
  int64_t n0 = 0;
  for (; n0 + kVectors * L <= N; n0 += kVectors * L) {
    tile<T, Rows, kVectors>(in, K, w, addend, addend_stride, out, out_stride, n0, L);
  }
  // The remaining columns: up to kVectors - 1 whole vectors and a partial one.
  const int64_t left = N - n0;
  if (left == 0) return;
  const int vectors = int((left + L - 1) / L);
  const int last = int(left - (vectors - 1) * L);
  switch (vectors) {
    case 1: tile<T, Rows, 1>(in, K, w, addend, addend_stride, out, out_stride, n0, last); break;
    case 2: tile<T, Rows, 2>(in, K, w, addend, addend_stride, out, out_stride, n0, last); break;
    case 3: tile<T, Rows, 3>(in, K, w, addend, addend_stride, out, out_stride, n0, last); break;
    default: tile<T, Rows, 4>(in, K, w, addend, addend_stride, out, out_stride, n0, last); break;
  }
}

}  // namespace tiled

// out[B, N] = addend[B, N] (row stride addend_stride, 0: one row for all; nullptr: zeros)
//             + in[B, K] Wt[K, N]; in is plain rows, out has row stride out_stride (>= N).
template <typename T>
void tiled_product(const T* in, int64_t batch, const TiledWeights<T>& w, const T* addend,
                   int64_t addend_stride, T* out, int64_t out_stride) {
  using tiled::kRows;
  const int64_t K = w.k();
  int64_t b0 = 0;
  const auto addend_at = [&](int64_t b) { return addend ? addend + b * addend_stride : nullptr; };
  for (; b0 + kRows <= batch; b0 += kRows) {
    tiled::row_block<T, kRows>(in + b0 * K, w, addend_at(b0), addend_stride, out + b0 * out_stride,
                               out_stride);
  }
  const auto rows_left = [&](auto rows) {
    tiled::row_block<T, decltype(rows)::value>(in + b0 * K, w, addend_at(b0), addend_stride,
                                               out + b0 * out_stride, out_stride);
  };
  switch (batch - b0) {
    case 0: break;
    case 1: rows_left(std::integral_constant<int, 1>()); break;
    case 2: rows_left(std::integral_constant<int, 2>()); break;
    default: rows_left(std::integral_constant<int, 3>()); break;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
