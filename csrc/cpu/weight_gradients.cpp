// The CPU engine's weight gradients (engine.h): GEMMs over all steps and column sums, each in
// an order fixed by the shape.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

#include "../buffer_pool.h"
#include "blas.h"
#include "capability.h"
#include "input_layout.h"
#include "kernels.h"
#include "layer_view.h"
#include "recurrent_product.h"
#include "register_layer.h"
#include "schedule.h"
#include "vector_math.h"

namespace rnnfast {
namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h

// A weight gradient C [M, N] = A^T B from the K rows of all steps, A [K, M] and B [K, N] with
// contiguous rows. Where K is long next to C, MKL runs C^T = B^T A into a buffer faster, and C
// is its transpose: measured 1.5x for the fashion-MNIST LSTM's [120, 28] and [120, 30] from 3584
// rows (no gain from 20 rows, nor for outputs of 10^5 values and more).
bool runs_transposed(const Tensor& out, const Tensor& a, const Tensor& b, bool accumulate) {
  const int64_t M = out.size(0), N = out.size(1), K = a.size(1);
  return !accumulate && out.scalar_type() == at::kFloat && out.is_contiguous() && M > 1 && N > 1 &&
         a.stride(0) == 1 && b.stride(1) == 1 && M * N <= 2 * K;
}

// Rows of the steps that one product sums at most: a weight gradient over more runs as the
// products of blocks of this many rows, their results added in double. One BLAS call over
// millions of rows adds its float partial sums to the output thousands of times (the 2M-row
// W_hh gradient of an RNN(3, 32): an error of 2.5e-6 against float64, torch.nn's 3.7e-7, which
// sums a product per step; AMD EPYC, MKL).
constexpr int64_t kRowsPerProduct = int64_t(1) << 15;

void cpu_matmul(Tensor& out, const Tensor& a, const Tensor& b, bool accumulate);

// out [M, N] (+)= a [M, K] b [K, N] for K > kRowsPerProduct, block by block of K.
void matmul_in_row_blocks(Tensor& out, const Tensor& a, const Tensor& b, bool accumulate) {
  const int64_t K = a.size(1);
  Tensor total =
      accumulate ? out.to(at::kDouble) : at::zeros(out.sizes(), out.options().dtype(at::kDouble));
  Tensor block_product = at::empty(out.sizes(), out.options());
  for (int64_t first = 0; first < K; first += kRowsPerProduct) {
    const int64_t count = std::min(kRowsPerProduct, K - first);
    cpu_matmul(block_product, a.narrow(1, first, count), b.narrow(0, first, count), false);
    total.add_(block_product);
  }
  out.copy_(total);
}

void cpu_matmul(Tensor& out, const Tensor& a, const Tensor& b, bool accumulate) {
  if (a.size(1) > kRowsPerProduct) {
    matmul_in_row_blocks(out, a, b, accumulate);
    return;
  }
  if (runs_transposed(out, a, b, accumulate)) {
    const int64_t M = out.size(0), N = out.size(1), K = a.size(1);
    Tensor transposed = at::empty({N, M}, out.options());
    float* c_t = transposed.data_ptr<float>();  // C^T [N, M] = B^T A
    gemm<float>(N, M, K, matrix_ref<float>(b.t()), matrix_ref<float>(a.t()), 0.0f, c_t, M,
                GemmThreads::FixedBlocks);
    float* c = out.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) c[m * N + n] = c_t[n * M + m];
    }
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, out.scalar_type(), "rnnfast_matmul", [&] {
        gemm<scalar_t>(out.size(0), out.size(1), a.size(1), matrix_ref<scalar_t>(a),
                       matrix_ref<scalar_t>(b), scalar_t(accumulate ? 1 : 0),
                       out.data_ptr<scalar_t>(), out.size(1), GemmThreads::FixedBlocks);
      });
}

void cpu_column_sum(Tensor& out, const Tensor& x) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "rnnfast_column_sum",
                                  [&] {
                                    // In double, row by row: torch.nn's accuracy over millions of
                                    // rows, in one order.
                                    const int64_t rows = x.size(0), cols = x.size(1);
                                    std::vector<double> sum(cols, 0.0);
                                    const scalar_t* data = x.data_ptr<scalar_t>();
                                    for (int64_t r = 0; r < rows; ++r) {
                                      const scalar_t* row = data + r * x.stride(0);
                                      for (int64_t c = 0; c < cols; ++c) sum[c] += double(row[c]);
                                    }
                                    std::copy(sum.begin(), sum.end(), out.data_ptr<scalar_t>());
                                  });
}

const GradientKernels kCpuGradientKernels{&cpu_matmul, &cpu_column_sum};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
