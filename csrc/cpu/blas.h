// Matrix products of the CPU engine without the dispatcher: the BLAS that torch was built with,
// called directly.
//
// An ATen call (at::mm, at::addmm) costs several microseconds of dispatch, checks and tensor
// bookkeeping before the BLAS runs, which is more than the whole product at the sizes recurrent
// layers often have. torch's own CPU builds carry MKL and export its Fortran entry points
// (sgemm_, dgemm_); they are declared weak here, so a torch without them still loads the
// extension and its products go through ATen instead.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>  // sysconf
#endif

#include "../parallel_rows.h"
#include "amx_product.h"
#include "capability.h"
#include "row_dot_product.h"

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's packed GEMM (CBLAS enums as ints): a matrix packed once is reused by every step's
// product without being repacked.
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
// MKL's GEMM of bfloat16 operands (MKL_BF16: their bits) with float sums into a float C.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                            float* c, int ldc) __attribute__((weak));
// MKL's thread count for the calling thread's next calls (0: back to the global setting);
// returns the previous one. (The C entry point: the lower-case names are Fortran's, which take
// a pointer.)
int MKL_Set_Num_Threads_Local(int threads) __attribute__((weak));
}

namespace rnnfast {
namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h

// A row-major matrix operand: `data` with leading dimension `ld` (elements between rows), read
// transposed when `transposed`.
template <typename T>
struct MatrixRef {
  const T* data;
  int64_t ld;
  bool transposed;
};

// A 2-D view with unit stride in one dimension as a GEMM operand. Only a dimension of size
// above one has a meaningful stride; BLAS wants ld >= the row width.
template <typename T>
MatrixRef<T> matrix_ref(const at::Tensor& x) {
  const int64_t rows = x.size(0), cols = x.size(1);
  if (cols == 1 || x.stride(1) == 1) {
    return {x.data_ptr<T>(), rows > 1 ? x.stride(0) : cols, false};
  }
  TORCH_INTERNAL_ASSERT(rows == 1 || x.stride(0) == 1,
                        "rnnfast: a GEMM operand needs a unit stride");
  return {x.data_ptr<T>(), cols > 1 ? x.stride(1) : rows, true};
}

// A core's own (L2) cache in bytes, as the C library reports it; 2 MiB where it does not.
inline int64_t core_cache_bytes() {
  static const int64_t bytes = [] {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (reported > 0) return int64_t(reported);
#endif
    return int64_t(2) << 20;
  }();
  return bytes;
}

// Who threads a product. A product of fewer than kThreadedGemmMinWork multiply-adds runs on the
// calling thread in every mode: MKL (or the blocks below) would split it over the threads,
// where waking and joining them costs more than the split saves. A larger one-off product is
// MKL's to thread (it splits the rows or columns of such shapes, so each output's sum is the
// same on any number of threads). The products that sum over many terms next to their outputs,
// which MKL splits over its threads along the sum (the weight gradients over all steps'
// rows, FixedBlocks, and the backward's per-step products of a few rows, Library), run as
// gemm_in_term_halves (FixedBlocks only) or gemm_in_fixed_blocks, whose sums do not depend on the
// thread count. OnCaller: on the calling thread.
// (2^19: on 2 threads of a Xeon the training step of two layers of 300 Elman units, 10 rows, 2
// steps, whose products of 900K multiply-adds ran on one thread under 2^20, 370 -> 297 us; of
// 250 units 297 -> 246 us; the course's two GRU layers of 250 units 602 -> 585 us; products of
// 400K (the course's energy model) stay on the caller; 1 thread the same.)
enum class GemmThreads { SmallOnCaller, Library, FixedBlocks, OnCaller };
constexpr int64_t kThreadedGemmMinWork = 1 << 19;

template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, MatrixRef<T> a, MatrixRef<T> b, T beta, T* c,
          int64_t ldc, GemmThreads threads = GemmThreads::SmallOnCaller);

// A product that the BLAS would thread, split over the threads here instead: MKL splits the k
// dimension of some shapes over its threads (a weight gradient's thousands of rows), and then
// an output's sum depends on the thread count. Here the longer side of C is cut into blocks
// fixed by the shape alone (2 up to max_blocks, a power of two, of at least 32 rows or
// columns), each multiplied by the single-threaded BLAS: every output is summed in the same
// order on any number of threads (one runs the blocks in turn). Returns false (nothing done)
// where the product stays whole.
template <typename T>
bool gemm_in_fixed_blocks(int64_t m, int64_t n, int64_t k, MatrixRef<T> a, MatrixRef<T> b, T beta,
                          T* c, int64_t ldc, int64_t max_blocks) {
  // Few blocks: each block's call packs the operand the blocks share once more (16 blocks ran
  // the 650-unit word model's training step 20% slower than MKL's own threading).
  constexpr int64_t kMinBlock = 32;
  const bool by_rows = m >= n;
  const int64_t length = by_rows ? m : n;
  if (at::in_parallel_region() || length < 2 * kMinBlock) return false;
  // A power of two of blocks, even in size: they divide evenly among 2 or 4 threads.
  int64_t blocks = max_blocks;
  while (blocks > 2 && length < blocks * kMinBlock) blocks /= 2;
  const int64_t block = (length + blocks - 1) / blocks;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t first = index * block, count = std::min(block, length - first);
      if (by_rows) {  // rows [first, first + count) of A and C
        MatrixRef<T> rows{a.transposed ? a.data + first : a.data + first * a.ld, a.ld,
                          a.transposed};
        gemm<T>(count, n, k, rows, b, beta, c + first * ldc, ldc, GemmThreads::OnCaller);
      } else {  // columns of B and C
        MatrixRef<T> cols{b.transposed ? b.data + first * b.ld : b.data + first, b.ld,
                          b.transposed};
        gemm<T>(m, count, k, a, cols, beta, c + first, ldc, GemmThreads::OnCaller);
      }
    }
  });
  return true;
}

// A product whose sum is long next to its output (a weight gradient over all steps' rows: k at
// least kTermHalvesMinRatio times C's longer side, C of at most kTermHalvesMaxOutputBytes) runs
// on the two halves of its terms instead of in blocks of C, each of whose calls reads and packs
// all of the operand the blocks share. The first half's product goes into C and the second's
// into a buffer of C's size, each a single-threaded BLAS call on a thread of its own, and the
// buffer is then added to C: every output is the same sum in the same order on any number of
// threads. (2-core Xeon: [256 x 1600] x [1600 x 64] on one thread, two blocks of 64 rows 213 us
// against one half of the terms 180 us; training steps of 16 and 64 rows of 64 LSTM and GRU
// units 0-6% faster, with cell options 6%, the fashion-MNIST LSTM's 14%, 16 rows of 256 GRU
// units (k = 2.1 times C's side) 2-4%. At 1.6 times, 16 rows of 256 LSTM units, no gain.)
constexpr int64_t kTermHalvesMinRatio = 2;
constexpr int64_t kTermHalvesMaxOutputBytes = int64_t(1) << 20;

// C[m, n] = A B + beta * C over the two halves of the k terms, as above; returns false (nothing
// done) where the product is not such a one.
template <typename T>
bool gemm_in_term_halves(int64_t m, int64_t n, int64_t k, MatrixRef<T> a, MatrixRef<T> b, T beta,
                         T* c, int64_t ldc) {
  if (at::in_parallel_region() || k < kTermHalvesMinRatio * std::max(m, n) ||
      m * n * int64_t(sizeof(T)) > kTermHalvesMaxOutputBytes) {
    return false;
  }
  const int64_t first_terms = k / 2;
  // op(A)[m, k] and op(B)[k, n] from term `first` on.
  const auto a_from = [&](int64_t first) {
    return MatrixRef<T>{a.transposed ? a.data + first * a.ld : a.data + first, a.ld, a.transposed};
  };
  const auto b_from = [&](int64_t first) {
    return MatrixRef<T>{b.transposed ? b.data + first : b.data + first * b.ld, b.ld, b.transposed};
  };
  // [m, n]: the second half's product (from torch's allocator, which memory measurements see)
  const at::Tensor second_product =
      at::empty({m, n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* second = second_product.data_ptr<T>();
  at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t half = begin; half < end; ++half) {
      if (half == 0) {
        gemm<T>(m, n, first_terms, a, b, beta, c, ldc, GemmThreads::OnCaller);
      } else {
        gemm<T>(m, n, k - first_terms, a_from(first_terms), b_from(first_terms), T(0), second, n,
                GemmThreads::OnCaller);
      }
    }
  });
  for_rows_in_copy_shares(m, n, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      T* out = c + row * ldc;
      const T* addend = second + row * n;
      for (int64_t col = 0; col < n; ++col) out[col] += addend[col];
    }
  });
  return true;
}

// out[n] = start + x[k0, k1) B[k0 .. k1 - 1, n] (start: out's own values, or nullptr for zero),
// summed term by term in order; B row-major with row stride ldb. A pass holds 64 outputs (float;
// 32 in double with AVX2, whose 16 registers would not hold 64) in vector registers over all the
// terms, so B is read once and out not at all in the k loop.
template <typename T>
void add_rows_times_matrix(int64_t n, int64_t k0, int64_t k1, const T* x, const T* b, int64_t ldb,
                           bool from_out, T* out) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t kLanes = V::size();
  constexpr int kVectors = std::min<int64_t>(8, 64 / kLanes);
  int64_t j = 0;
  for (; j + kVectors * kLanes <= n; j += kVectors * kLanes) {
    V acc[kVectors];
    for (int c = 0; c < kVectors; ++c) {
      acc[c] = from_out ? V::loadu(out + j + c * kLanes) : V(T(0));
    }
    for (int64_t term = k0; term < k1; ++term) {
      const V value(x[term]);
      const T* row = b + term * ldb + j;
      for (int c = 0; c < kVectors; ++c) {
        acc[c] = at::vec::fmadd(value, V::loadu(row + c * kLanes), acc[c]);
      }
    }
    for (int c = 0; c < kVectors; ++c) acc[c].store(out + j + c * kLanes);
  }
  // The outputs left, a vector at a time (the last one partial).
  for (; j < n; j += kLanes) {
    const int64_t count = std::min(kLanes, n - j);
    V acc = from_out ? V::loadu(out + j, count) : V(T(0));
    for (int64_t term = k0; term < k1; ++term) {
      acc = at::vec::fmadd(V(x[term]), V::loadu(b + term * ldb + j, count), acc);
    }
    acc.store(out + j, count);
  }
}

// y[n] = x[k] B[k, n] (+ y where accumulate), B row-major with row stride ldb: a per-step
// product of one batch row. Its rows of B (the terms) are cut into blocks fixed by k, each
// summed in order over whole rows of B on a thread of its own, then the blocks' sums added in
// block order: the result does not depend on the thread count. MKL threads such a product as it
// chooses (its sums differed in the last bit between 1 and 2 threads); in blocks of columns
// (single-threaded MKL, or kernels like this one) it ran at half the rate, each thread reading
// half of every row of B, which its own cache's prefetcher fetched whole.
template <typename T>
void row_times_matrix(int64_t n, int64_t k, const T* x, const T* b, int64_t ldb, bool accumulate,
                      T* y) {
  constexpr int64_t kMinBlockTerms = 256;
  const int64_t blocks = k >= 2 * kMinBlockTerms ? 2 : 1;
  const int64_t block_terms = (k + blocks - 1) / blocks;
  // The second block's sums, on the calling thread's scratch.
  thread_local std::vector<T> scratch;
  if (blocks > 1 && static_cast<int64_t>(scratch.size()) < n) scratch.resize(n);
  T* second = scratch.data();  // (the workers' own thread_local is another vector)
  const auto run_block = [&](int64_t block) {
    const int64_t k0 = block * block_terms, k1 = std::min(k, k0 + block_terms);
    if (block == 0) {
      add_rows_times_matrix(n, k0, k1, x, b, ldb, accumulate, y);
    } else {
      add_rows_times_matrix(n, k0, k1, x, b, ldb, false, second);
    }
  };
  if (blocks == 1 || at::in_parallel_region()) {
    for (int64_t block = 0; block < blocks; ++block) run_block(block);
  } else {
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) run_block(block);
    });
  }
  if (blocks > 1) {
    for (int64_t j = 0; j < n; ++j) y[j] += second[j];
  }
}

// Whether bfloat16 GEMMs run in MKL's bfloat16 GEMM (gemm_with_float_sums) rather than ATen's:
// where the CPU has no AVX512-BF16 instructions, on which ATen's runs. Without them ATen's ran
// at 15-19 GFLOP/s and MKL's, which reads the operands as they are, at 84-142 (2 threads of a
// 2-core Zen 3 EPYC: the per-step products of 16-64 rows of 512 units and 20 rows of 650, and
// the products over all steps of the 650-unit word model; float's own GEMM ran 57-162).
inline bool bfloat16_gemm_in_mkl() {
  static const bool chosen = &cblas_gemm_bf16bf16f32 != nullptr && !amx::has_bf16_dot_products();
  return chosen;
}

// C[m, n] = A B + beta * C in bfloat16 by MKL's GEMM with float sums, each output rounded to
// bfloat16 once. C in blocks of at most kFloatSumRows x kFloatSumColumns, each computed by the
// single-threaded BLAS into a float buffer of the thread's (loaded from C where beta is 1) and
// then rounded into C: the blocks are fixed by the shape alone, so every output is the same sum
// on any number of threads, and the float values never take more than a block's buffer. A
// product of fewer than kThreadedGemmMinWork multiply-adds, or one inside a parallel region,
// runs its blocks on the calling thread.
constexpr int64_t kFloatSumRows = 128;
constexpr int64_t kFloatSumColumns = 512;
inline void gemm_with_float_sums(int64_t m, int64_t n, int64_t k, MatrixRef<at::BFloat16> a,
                                 MatrixRef<at::BFloat16> b, at::BFloat16 beta, at::BFloat16* c,
                                 int64_t ldc, bool threaded) {
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  const int64_t row_blocks = (m + kFloatSumRows - 1) / kFloatSumRows;
  const int64_t column_blocks = (n + kFloatSumColumns - 1) / kFloatSumColumns;
  const bool accumulate = float(beta) == 1.0f;
  const auto run_blocks = [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> sums;
    sums.resize(kFloatSumRows * kFloatSumColumns);
    const bool one_thread = &MKL_Set_Num_Threads_Local != nullptr;
    const int threads_before = one_thread ? MKL_Set_Num_Threads_Local(1) : 0;
    for (int64_t block = begin; block < end; ++block) {
      const int64_t row0 = block / column_blocks * kFloatSumRows;
      const int64_t col0 = block % column_blocks * kFloatSumColumns;
      const int64_t rows = std::min(kFloatSumRows, m - row0);
      const int64_t cols = std::min(kFloatSumColumns, n - col0);
      at::BFloat16* c_block = c + row0 * ldc + col0;
      if (accumulate) {
        for (int64_t r = 0; r < rows; ++r) {
          std::copy(c_block + r * ldc, c_block + r * ldc + cols, sums.data() + r * cols);
        }
      }
      // op(A)'s rows row0 .. and op(B)'s columns col0 .. (a transposed operand is stored
      // [k, m] or [n, k]).
      const at::BFloat16* a_rows = a.transposed ? a.data + row0 : a.data + row0 * a.ld;
      const at::BFloat16* b_cols = b.transposed ? b.data + col0 * b.ld : b.data + col0;
      cblas_gemm_bf16bf16f32(kRowMajor, a.transposed ? kTrans : kNoTrans,
                             b.transposed ? kTrans : kNoTrans, int(rows), int(cols), int(k), 1.0f,
                             reinterpret_cast<const uint16_t*>(a_rows), int(a.ld),
                             reinterpret_cast<const uint16_t*>(b_cols), int(b.ld),
                             accumulate ? 1.0f : 0.0f, sums.data(), int(cols));
      for (int64_t r = 0; r < rows; ++r) {
        at::vec::convert(sums.data() + r * cols, c_block + r * ldc, cols);
      }
    }
    if (one_thread) MKL_Set_Num_Threads_Local(threads_before);
  };
  const int64_t blocks = row_blocks * column_blocks;
  if (threaded && blocks > 1 && !at::in_parallel_region()) {
    at::parallel_for(0, blocks, 1, run_blocks);
  } else {
    run_blocks(0, blocks);
  }
}

// C[m, n] = A[m, k] B[k, n] + beta * C (row-major, C's leading dimension ldc; beta 0 or 1).
// Inside a parallel region the BLAS runs on the calling thread only.
template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, MatrixRef<T> a, MatrixRef<T> b, T beta, T* c,
          int64_t ldc, GemmThreads threads) {
  if (m == 0 || n == 0) return;
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    if (m == 1 && threads == GemmThreads::Library && !a.transposed && !b.transposed && k > 0) {
      row_times_matrix(n, k, a.data, b.data, b.ld, beta == T(1), c);
      return;
    }
  }
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    // A few long rows times a matrix stored [n, k] (the forward's products): row_dot_product.h,
    // threaded by the work, per-step products too.
    if (!a.transposed && b.transposed && row_dot::takes(m, n, k)) {
      row_dot::product(m, n, k, a.data, a.ld, b.data, b.ld, beta == T(1), c, ldc,
                       /*threaded=*/m * n * k >= kThreadedGemmMinWork);
      return;
    }
  }
#endif
  const bool fits_int = m < INT_MAX && n < INT_MAX && k < INT_MAX && a.ld < INT_MAX &&
                        b.ld < INT_MAX && ldc < INT_MAX;
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    const auto blas = std::is_same_v<T, float> ? reinterpret_cast<const void*>(&sgemm_)
                                               : reinterpret_cast<const void*>(&dgemm_);
    if (blas != nullptr && fits_int && k > 0) {
      // Column-major BLAS: C^T[n, m] = B^T[n, k] A^T[k, m].
      const int mi = int(m), ni = int(n), ki = int(k), lda = int(a.ld), ldb = int(b.ld);
      const int ldci = int(ldc);
      const char ta = a.transposed ? 'T' : 'N', tb = b.transposed ? 'T' : 'N';
      const T one = T(1);
      // Split on one thread too: the blocks, not the thread count, fix each output's sum.
      // Except a per-step product of one row: in blocks its time doubles (the single-row
      // backward of a 512-unit GRU 4.3 -> 9 ms), so where row_times_matrix does not take it
      // (a transposed operand) MKL threads it, summing as it chooses.
      // A product of fewer than kThreadedGemmMinWork multiply-adds, in any mode, is one call on
      // the calling thread: a parallel region, and a packing of the shared operand per block,
      // cost more than its work (the per-step product and W_hh's gradient of the course's
      // energy model, 10 rows of 200 Elman units over 2 steps: its training step 3.5% faster on
      // 2 threads of a Xeon). The shape alone decides, so the sums stay the same on any number
      // of threads.
      const bool small = m * n * k < kThreadedGemmMinWork;
      const bool in_blocks = !small && (threads == GemmThreads::FixedBlocks ||
                                        (threads == GemmThreads::Library && m > 1));
      // A per-step product repeats every step: 2 blocks, each packing the shared operand once.
      const int64_t max_blocks = threads == GemmThreads::Library ? 2 : 4;
      if (!small && threads == GemmThreads::FixedBlocks &&
          gemm_in_term_halves(m, n, k, a, b, beta, c, ldc)) {
        return;
      }
      if (in_blocks && gemm_in_fixed_blocks(m, n, k, a, b, beta, c, ldc, max_blocks)) return;
      // Too small to split into blocks, or OnCaller: on the calling thread.
      const bool mkl_threads =
          (threads == GemmThreads::SmallOnCaller && m * n * k >= kThreadedGemmMinWork) ||
          (threads == GemmThreads::Library && m == 1 && !small);
      const bool one_thread = &MKL_Set_Num_Threads_Local != nullptr && !mkl_threads;
      const int threads_before = one_thread ? MKL_Set_Num_Threads_Local(1) : 0;
      if constexpr (std::is_same_v<T, float>) {
        sgemm_(&tb, &ta, &ni, &mi, &ki, &one, b.data, &ldb, a.data, &lda, &beta, c, &ldci);
      } else {
        dgemm_(&tb, &ta, &ni, &mi, &ki, &one, b.data, &ldb, a.data, &lda, &beta, c, &ldci);
      }
      if (one_thread) MKL_Set_Num_Threads_Local(threads_before);
      return;
    }
  }
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (bfloat16_gemm_in_mkl() && fits_int && k > 0) {
      gemm_with_float_sums(m, n, k, a, b, beta, c, ldc,
                           threads != GemmThreads::OnCaller && m * n * k >= kThreadedGemmMinWork);
      return;
    }
  }
  // ATen on views of the same memory (other dtypes, or a torch without these BLAS symbols).
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto view = [&](MatrixRef<T> x, int64_t rows, int64_t cols) {
    // op(X)[rows, cols]: stored [rows, cols] with row stride ld, or [cols, rows] transposed.
    return x.transposed
               ? at::from_blob(const_cast<T*>(x.data), {cols, rows}, {x.ld, 1}, options).t()
               : at::from_blob(const_cast<T*>(x.data), {rows, cols}, {x.ld, 1}, options);
  };
  at::Tensor c_t = at::from_blob(c, {m, n}, {ldc, 1}, options);
  if (k == 0) {
    if (beta == T(0)) c_t.zero_();
    return;
  }
  if (beta == T(0)) {
    at::mm_out(c_t, view(a, m, k), view(b, k, n));
  } else {
    c_t.addmm_(view(a, m, k), view(b, k, n));
  }
}

// The rows of C[m, n] set to those of `addend` (row stride addend_stride, 0: one row for all;
// nullptr: none), so that a GEMM with beta = 1 adds the product to them. Returns that beta.
// Split over the threads: the bias rows of a GRU's input projection over all steps are tens of
// MB (B64-H256: 3.5% of its forward on one thread).
template <typename T>
T copy_addend_rows(int64_t m, int64_t n, const T* addend, int64_t addend_stride, T* c,
                   int64_t ldc) {
  if (addend == nullptr) return T(0);
  for_rows_in_copy_shares(m, n, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      std::copy(addend + r * addend_stride, addend + r * addend_stride + n, c + r * ldc);
    }
  });
  return T(1);
}

// The B operand of C[m, n] = A[m, k] B[k, n] + beta * C packed once for MKL's packed GEMM, for
// products that run many times with the same B and the same m (the steps of a layer). Empty
// (usable() false) where the BLAS has no packed GEMM or the sizes do not fit its ints.
class PackedOperand {
 public:
  PackedOperand() = default;

  // Packs B unless the packed copy would take more than max_elements floats.
  PackedOperand(MatrixRef<float> b, int64_t m, int64_t n, int64_t k, int64_t max_elements) {
    if (&cblas_sgemm_pack == nullptr || &cblas_sgemm_compute == nullptr ||
        &cblas_sgemm_pack_get_size == nullptr || m <= 0 || n <= 0 || k <= 0 || m >= INT_MAX ||
        n >= INT_MAX || k >= INT_MAX || b.ld >= INT_MAX) {
      return;
    }
    const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, int(m), int(n), int(k));
    const int64_t elements = int64_t((bytes + sizeof(float) - 1) / sizeof(float));
    if (elements > max_elements) return;
    storage_ = at::empty({elements}, at::TensorOptions().dtype(at::kFloat));
    cblas_sgemm_pack(kRowMajor, kBMatrix, b.transposed ? kTrans : kNoTrans, int(m), int(n), int(k),
                     1.0f, b.data, int(b.ld), storage_.data_ptr<float>());
    m_ = m;
    n_ = n;
    k_ = k;
  }

  bool usable() const { return storage_.defined(); }
  int64_t m() const { return m_; }

  // C[m, n] = A[m, k] B + beta * C, A row-major with leading dimension lda.
  void multiply(const float* a, int64_t lda, float beta, float* c, int64_t ldc) const {
    cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, int(m_), int(n_), int(k_), a, int(lda),
                        storage_.data_ptr<float>(), int(n_), beta, c, int(ldc));
  }

 private:
  // CBLAS_LAYOUT, CBLAS_TRANSPOSE, CBLAS_IDENTIFIER and MKL's CblasPacked.
  static constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151;
  static constexpr int kBMatrix = 162;

  at::Tensor storage_;
  int64_t m_ = 0, n_ = 0, k_ = 0;
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
