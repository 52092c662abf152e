// The per-step matrix product of the CPU engine: out[B, N] = in[B, K] M[N, K]^T (+ bias[N]).
//
// Inside the time loop the product is small (the batch times one weight matrix), so the fixed
// cost of a library GEMM call dominates at small sizes. There, for float and double, a
// register-tiled kernel (tiled_product.h) runs on a copy of M^T made once per layer call; the
// tiniest products run as a plain loop over the rows of M. Larger products, and calls of too
// few steps to repay the copy, go to the BLAS.
//
// bfloat16 and float16 products run in float on a float copy of M made once per call (the tiled
// kernel's M^T, converted as it is copied), up to a size (see RecurrentProduct::widened_).
//
// Gate-packed layout (small hidden sizes, see layer_view.h): the gate side of the product (the
// output in the forward, the input in the backward) may be stored as [gates][B][H] instead of
// [B][gates * H], so the cell math sees all B * H units of a gate as one contiguous run.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <memory>
#include <type_traits>
#include <vector>

#include "amx_product.h"
#include "blas.h"
#include "capability.h"
#include "register_product.h"
#include "tiled_product.h"
#include "vector_math.h"

namespace rnnfast {
namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h

// Which side of a product is gate-packed (None: plain rows).
enum class ProductPacking { None, Output, Input };

template <typename T>
class RecurrentProduct {
 public:
  using Packed = ProductPacking;

  // matrix: [N, K], any strides (or undefined: the product is never run); bias: [N] or
  // undefined; rows: the batch the product runs on; steps: how many times it runs. packed:
  // which side is gate-packed with `packed_hidden` units per gate (None: plain rows).
  // may_pack: a product in the BLAS may use MKL's packed GEMM (more memory, faster steps).
  // output_bytes: the bytes of one of the caller's output values (those of a widened product's
  // bfloat16 or float16 type: 2), against which the packed copy's memory is weighed.
  RecurrentProduct(const at::Tensor& matrix, const at::Tensor& bias, int64_t rows, int64_t steps,
                   Packed packed = Packed::None, int64_t packed_hidden = 0, bool may_pack = false,
                   int64_t output_bytes = int64_t(sizeof(T)))
      : bias_(bias.defined() ? bias.contiguous() : bias),
        bias_data_(bias_.defined() ? bias_.template data_ptr<T>() : nullptr),
        packed_(packed),
        packed_hidden_(packed_hidden) {
    if (!matrix.defined()) return;
    n_ = matrix.size(0);
    k_ = matrix.size(1);
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      // On AMX's tiles, or without them as their row_product's dot products alone.
      const bool tiles = amx::usable();
      if (runs_on_amx(rows, steps, packed) && (tiles || amx::dot_products_usable())) {
        amx_ = amx::AmxWeights(matrix);
        amx_rows_by_dots_ = (rows < kAmxMinRows && amx::has_bf16_dot_products()) || !tiles;
        amx_splits_outputs_ = amx_splits_outputs(rows);
        return;
      }
    }
    if (kWidened && rows * n_ * k_ < kWidenedMaxWork) {
      // The tiled kernel converts M as it copies it (no float copy of M beside its own).
      const bool tiled = RecurrentProduct<float>::kernel_for(rows, n_, k_, steps, packed) ==
                         RecurrentProduct<float>::Kernel::Tiled;
      widened_ = std::make_shared<const RecurrentProduct<float>>(
          tiled ? matrix : matrix.to(at::kFloat), bias.defined() ? bias.to(at::kFloat) : bias, rows,
          steps, packed, packed_hidden, may_pack, int64_t(sizeof(T)));
      return;
    }
    switch (kernel_for(rows, n_, k_, steps, packed)) {
      case Kernel::Register:
        if constexpr (std::is_same_v<T, float>) {
          register_rows_ = rows;
          register_ = make_register_product(matrix, rows);
        }
        return;
      case Kernel::Tiled:
        if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
          tiled_ = TiledWeights<T>(matrix);
        }
        return;
      case Kernel::Loop:
        use_loop_ = true;
        matrix_ = matrix.contiguous();  // the loop reads rows of M
        if (packed != Packed::None) make_packed_terms();
        return;
      case Kernel::Blas: break;
    }
    if (steps >= kTiledMinSteps && splits_rows_in_blas(rows, n_, k_)) {
      // Each thread runs the product on its own rows (schedule.h: RowsPerThread), the BLAS on
      // the calling thread: every core keeps all of M^T in its cache, and the threads never
      // wait for each other within a sequence. M^T is read row-major (copied so where M comes
      // with contiguous rows): the BLAS's kernels for a few rows read that layout fastest.
      matrix_ = matrix.t().contiguous().t();
      matrix_transposed_ = matrix_ref<T>(matrix_.t());
      splits_blas_rows_ = true;
      return;
    }
    // The BLAS reads M^T [K, N] as it comes (M's rows or columns contiguous), else a copy.
    matrix_ = matrix.stride(0) == 1 || matrix.stride(1) == 1 ? matrix : matrix.contiguous();
    matrix_transposed_ = matrix_ref<T>(matrix_.t());
    if constexpr (std::is_same_v<T, float>) {
      // MKL's packed copy of M^T is several times its size: it is made only for a batch of
      // rows (a single row runs as a matrix-vector product anyway) and only where its bytes are
      // at most twice those of the products' outputs over all steps, so it never dominates a
      // call. In the caller's type: weighed against their floats, the copy made the bfloat16
      // training steps of 16 rows of 256 LSTM and GRU units and 512 Elman units peak at
      // 1.21-1.24x torch.nn's (7.1 MB of copy for a 1 MB M); without it they peaked at 0.51-0.88x
      // and ran as fast (2-core AMD EPYC, Zen 3, which has no bfloat16 instructions).
      if (may_pack && steps > 1 && rows >= kPackMinRows) {
        const int64_t max_floats = 2 * rows * steps * n_ * output_bytes / int64_t(sizeof(float));
        packed_operand_ = PackedOperand(matrix_transposed_, rows, n_, k_, max_floats);
      }
    }
  }

  // Which kernel runs a product of `rows` rows and an [n, k] matrix, run `steps` times.
  enum class Kernel { Register, Tiled, Loop, Blas };
  static Kernel kernel_for(int64_t rows, int64_t n, int64_t k, int64_t steps,
                           Packed packed = Packed::None) {
    if (std::is_same_v<T, float> && RegisterProduct::fits(rows * k, rows * n, k)) {
      return Kernel::Register;
    }
    if ((std::is_same_v<T, float> || std::is_same_v<T, double>) && packed == Packed::None &&
        n * k <= kTiledLimit && steps >= kTiledMinSteps) {
      return Kernel::Tiled;
    }
    if (packed != Packed::None || rows * n * k <= kLoopLimit) return Kernel::Loop;
    return Kernel::Blas;
  }

  // The fewest rows of a thread's share where a schedule runs rows per thread
  // (splits_rows_in_blas).
  static constexpr int64_t kMinRowsPerThread = 8;

  // Whether the product may run on a share of the rows it was built for: so do the tiled
  // kernel and the plain loop, which a thread runs on its rows, and a product in the BLAS that
  // splits_rows_in_blas; other products in the BLAS are threaded by the BLAS, and the register
  // product is built for the whole batch.
  bool may_split_rows() const {
    if (widened_) return widened_->may_split_rows();
    return n_ > 0 && (tiled_.n() > 0 || use_loop_ || splits_blas_rows_ ||
                      (amx_.n() > 0 && !amx_splits_outputs_));
  }

  // Whether the product runs on any number of rows up to the batch it was built for (all but
  // the register product, which is built for its batch).
  bool runs_any_rows() const {
    if (widened_) return widened_->runs_any_rows();
    return !register_.usable();
  }

  // Whether the product splits its own work over the threads: in the BLAS, or on AMX tiles by
  // outputs.
  bool threads_itself() const { return uses_blas() || amx_splits_outputs_; }

  // Whether the product runs in the BLAS (the larger matrices).
  bool uses_blas() const {
    if (widened_) return widened_->uses_blas();
    return n_ > 0 && !register_.usable() && tiled_.n() == 0 && !use_loop_ && amx_.n() == 0;
  }

  // out[B, N] = in[B, K] M^T (+ bias); in == nullptr stands for zeros (out = bias, or 0).
  void run(const T* in, int64_t batch, T* out) const {
    if (widened_) {
      compute_widened(in, batch, nullptr, out);
    } else {
      compute(in, batch, bias_data_, 0, out);
    }
  }

  // out[B, N] = addend[B, N] + in[B, K] M^T
  void run_accumulate(const T* in, int64_t batch, const T* addend, T* out) const {
    if (widened_) {
      compute_widened(in, batch, addend, out);
    } else {
      compute(in, batch, addend, n_, out);
    }
  }

  // sums[B, N] += in[B, K] M^T in place, sums' rows `sums_stride` apart; no bias. Products in
  // the BLAS only (uses_blas()), whose GEMM reads the rows of sums itself.
  void run_into(const T* in, int64_t batch, T* sums, int64_t sums_stride) const {
    TORCH_INTERNAL_ASSERT(uses_blas() && !widened_);
    blas_product(in, batch, T(1), sums, sums_stride);
  }

 private:
  // bfloat16 and float16 products run in float below kWidenedMaxWork multiply-adds per step:
  // ATen's GEMM of these types took 3.5 of the 6.4 ms of fashion-MNIST's LSTM forward (128
  // rows, 30 units; torch.nn's whole forward: 0.44 ms). From there the GEMM of the type is the
  // faster one (blas.h: ATen's, oneDNN on AMX where the CPU has it; MKL's where the CPU has no
  // bfloat16 instructions): the 64-row LSTM's forward of 512 units ran 27 ms against 53 in
  // float, of 256 units 11 against 17, 16 rows of 512 units 12 against 16 ms; 16 rows of 256
  // units ran 4.0 ms in float against 6.1 (bfloat16, 2 threads of a Xeon).
  static constexpr bool kWidened = kComputedInFloat<T>;
  static constexpr int64_t kWidenedMaxWork = int64_t(1) << 23;
  // bfloat16 products run on AMX tiles (amx_product.h), where the CPU has them: in calls of
  // kTiledMinSteps steps or more (fewer do not repay M's packing: packed value by value, the
  // 2-layer energy models' 2 steps ran 1.7x slower), from M of kAmxMinWeights weights, for 4 rows
  // or more. Fewer rows (a tile's 16 rows would hold 1 to 3 of them: one row of 64-256 LSTM, GRU
  // and Elman units ran up to 2x slower on tiles than in float) run as dot products of bfloat16
  // pairs on the same packed M (AmxWeights::row_product; every CPU with AMX has them), for an M
  // of kAmxMinRowWeights (half the bytes of float's to read) or in calls of kDotMinSteps steps or
  // more, which repay M's packing (one row of 100 LSTM units over 12 steps ran its forward 15%
  // slower than in float; over 30 steps 64 units 13% faster; over 100 steps 128-512 LSTM units
  // 1.2-2.5x, 256 GRU units 1.8x; 2 threads of a Xeon). On those, a product of kDotSplitMinWork
  // multiply-adds or more splits its outputs over the threads (one row of 256 LSTM and GRU units
  // 1.3x and 1.1x faster so; 128 LSTM units and 256 Elman units, 64K multiply-adds, 10-18%
  // slower). A CPU without the tiles but with those dot products (AVX512-BF16: an AMD EPYC of the
  // Zen 4 family) runs as dot products every product the tiles would run, where the float
  // product or ATen's bfloat16 GEMM ran before (2 threads of a Zen 4 EPYC, forward of 100 steps:
  // one row of 256 LSTM units 4.30 -> 1.44 ms, 16 rows 14.8 -> 8.7, 64 rows 37.2 -> 23.2; the
  // 200-unit word model's LSTM 7.76 -> 5.04, the 16-row, 256-unit GRU's 9.17 -> 4.71).
  static constexpr int64_t kAmxMinWeights = 1 << 10;
  static constexpr int64_t kAmxMinRows = 4;
  static constexpr int64_t kAmxMinRowWeights = 1 << 19;
  static constexpr int64_t kDotMinSteps = 16;
  static constexpr int64_t kDotSplitMinWork = 1 << 17;
  bool runs_on_amx(int64_t rows, int64_t steps, Packed packed) const {
    return packed == Packed::None && steps >= kTiledMinSteps && n_ * k_ >= kAmxMinWeights &&
           (rows >= kAmxMinRows || n_ * k_ >= kAmxMinRowWeights ||
            (steps >= kDotMinSteps && amx::has_bf16_dot_products()));
  }
  // Whether the AMX product of `rows` rows splits its outputs over the threads at each call:
  // where split by rows each thread would read all of M for part of a tile (at most a tile's
  // rows) or from beyond its L2 cache (M past half of it), and the product is worth a parallel
  // region at each step (kAmxSplitMinWork: 16 rows of 64 LSTM units split so ran 1.4x
  // slower).
  static constexpr int64_t kAmxSplitMinWork = 1 << 20;
  bool amx_splits_outputs(int64_t rows) const {
    const bool outgrows_cache = n_ * k_ * int64_t(sizeof(T)) > core_cache_bytes() / 2;
    const int64_t min_work = rows < kAmxMinRows ? kDotSplitMinWork : kAmxSplitMinWork;
    // Dot products alone (no tiles) on a batch of kAmxMinRows rows or more run on each thread's
    // rows (2-core AMD EPYC, Zen 4, bfloat16, 2 threads: the 16-row, 256-unit GRU's forward 7.09
    // -> 5.08 ms, the LSTM's 6.01 -> 5.84, the 200-unit word model's LSTM 6.58 -> 6.26; 16 rows
    // of 512 LSTM units 21.0 -> 21.3). amx_rows_by_dots_ is set before this is called.
    if (rows >= kAmxMinRows && amx_rows_by_dots_) return false;
    return at::get_num_threads() > 1 && amx_.passes() > 1 && rows * n_ * k_ >= min_work &&
           (rows <= amx::kTileRows || outgrows_cache);
  }

  // The widened product: in [batch, K] (or nullptr: zeros) and addend [batch, N] (or nullptr:
  // the bias) converted to float, the float product, its result rounded to T once. Both sides
  // are taken value for value, so any packing of the rows passes through.
  void compute_widened(const T* in, int64_t batch, const T* addend, T* out) const {
    const int64_t in_values = in ? batch * k_ : 0, out_values = batch * n_;
    // Per thread: threads may run the product on their own rows at once.
    thread_local std::vector<float> buffer;
    buffer.resize(in_values + (addend ? 2 : 1) * out_values);
    float* in_float = buffer.data();
    float* out_float = in_float + in_values;
    float* addend_float = out_float + out_values;
    std::copy(in, in + in_values, in_float);
    if (addend) {
      std::copy(addend, addend + out_values, addend_float);
      widened_->run_accumulate(in ? in_float : nullptr, batch, addend_float, out_float);
    } else {
      widened_->run(in ? in_float : nullptr, batch, out_float);
    }
    std::copy(out_float, out_float + out_values, out);
  }

  // addend has row stride `addend_stride` (0: one bias row shared by all rows).
  void compute(const T* in, int64_t batch, const T* addend, int64_t addend_stride, T* out) const {
    using A = at::opmath_type<T>;
    if (in == nullptr) {
      compute_from_zero(batch, addend, addend_stride, out);
      return;
    }
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      if (amx_.n() > 0) {
        compute_amx(in, batch, addend, addend_stride, out);
        return;
      }
    }
    if constexpr (std::is_same_v<T, float>) {
      // The register product's bias is the bias row; another addend is read in output order,
      // which is the addend's own (rows of N) unless the output is gate-packed.
      if (register_.usable() && batch == register_rows_ &&
          (addend_stride == 0 || packed_ != Packed::Output)) {
        register_.run(in, addend_stride == 0 ? nullptr : addend, out);
        return;
      }
    }
    if (tiled_.n() > 0) {
      tiled_product(in, batch, tiled_, addend, addend_stride, out, n_);
      return;
    }
    if (packed_ != Packed::None) {
      compute_packed(in, batch, addend, addend_stride, out);
      return;
    }
    if (use_loop_) {
      const T* m = matrix_.template data_ptr<T>();
      for (int64_t b = 0; b < batch; ++b) {
        const T* in_row = in + b * k_;
        for (int64_t n = 0; n < n_; ++n) {
          const T* m_row = m + n * k_;
          A acc = addend ? A(addend[b * addend_stride + n]) : A(0);
          for (int64_t k = 0; k < k_; ++k) acc += A(in_row[k]) * A(m_row[k]);
          out[b * n_ + n] = T(acc);
        }
      }
      return;
    }
    const T beta = copy_addend_rows(batch, n_, addend, addend_stride, out, n_);
    blas_product(in, batch, beta, out, n_);
  }

  // The product on AMX tiles: the float sums of in M^T, plus the addend in float, rounded to T
  // once (as the widened product rounds).
  void compute_amx(const T* in, int64_t batch, const T* addend, int64_t addend_stride,
                   T* out) const {
    const int64_t ldo = amx_.padded_n();
    // Per thread: threads may run the product on their own rows at once.
    thread_local std::vector<float> sums_buffer;
    sums_buffer.resize(batch * ldo);
    float* sums = sums_buffer.data();
    // Passes [first, end) and their outputs.
    const auto passes = [&](int64_t first, int64_t end) {
      if (amx_rows_by_dots_) {
        amx_.row_product(in, batch, sums, first, end);
      } else {
        amx_.product(in, batch, sums, first, end);
      }
      const int64_t n0 = first * amx::kPassOutputs, n1 = std::min(n_, end * amx::kPassOutputs);
      for (int64_t b = 0; b < batch; ++b) {
        const float* row_sums = sums + b * ldo;
        const T* addend_row = addend ? addend + b * addend_stride : nullptr;
        T* out_row = out + b * n_;
        for_unit_runs<T>(n0, n1, [&](auto j, auto zero) {
          using V = decltype(zero);
          V sum = load<V>(row_sums, 0, j);
          if (addend_row) sum = sum + load<V>(addend_row, 0, j);
          store(out_row, 0, j, sum);
        });
      }
    };
    if (amx_splits_outputs_) {
      // Each output's sum runs in the same order on any thread.
      at::parallel_for(0, amx_.passes(), 1, passes);
    } else {
      passes(0, amx_.passes());
    }
  }

  // out[B, N] = in[B, K] M^T + beta * out (beta 0 or 1), out's rows ldo apart: MKL's packed
  // copy of M^T where it was made for this batch, else the GEMM.
  void blas_product(const T* in, int64_t batch, T beta, T* out, int64_t ldo) const {
    if constexpr (std::is_same_v<T, float>) {
      if (packed_operand_.usable() && packed_operand_.m() == batch) {
        packed_operand_.multiply(in, k_, beta, out, ldo);
        return;
      }
    }
    gemm<T>(batch, n_, k_, {in, k_, false}, matrix_transposed_, beta, out, ldo,
            GemmThreads::Library);
  }

  // The gate-packed products (a gate-packed view's few hidden units: fewer than a vector's
  // lanes, see layer_view.h) in vectors. Each output run, a gate's Hp units of a batch row
  // (Output packing: out [N / Hp][B][Hp]) or all N outputs of a row (Input packing: in
  // [K / Hp][B][Hp], out [B, N]), is one vector, its terms summed in order by multiply-adds;
  // kRowsTogether batch rows run together, as independent chains. A loop over single outputs
  // spent 36% of the IMDB task's forward (32 rows of 5 Elman units) in its index arithmetic.
  static constexpr int64_t kRowsTogether = 4;

  // The output runs of a row and their width.
  int64_t packed_runs() const { return packed_ == Packed::Output ? n_ / packed_hidden_ : 1; }
  int64_t packed_run_width() const { return packed_ == Packed::Output ? packed_hidden_ : n_; }

  // packed_terms_ [K][runs][lanes]: the terms of each output run, M^T's, zero past the run's
  // width (whole vectors load as they are).
  void make_packed_terms() {
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      constexpr int64_t lanes = Vec<T>::size();
      const int64_t runs = packed_runs(), width = packed_run_width();
      TORCH_INTERNAL_ASSERT(width <= lanes, "rnnfast: a gate-packed run wider than a vector");
      packed_terms_.assign(k_ * runs * lanes, T(0));
      const T* m = matrix_.template data_ptr<T>();  // [N, K]
      for (int64_t k = 0; k < k_; ++k) {
        for (int64_t r = 0; r < runs; ++r) {
          for (int64_t lane = 0; lane < width; ++lane) {
            packed_terms_[(k * runs + r) * lanes + lane] = m[(r * width + lane) * k_ + k];
          }
        }
      }
    } else {
      TORCH_INTERNAL_ASSERT(false, "rnnfast: gate packing is for float and double only");
    }
  }

  // out = addend (rows addend_stride apart; 0: the bias row) + in M^T, gate-packed as above.
  void compute_packed(const T* in, int64_t batch, const T* addend, int64_t addend_stride,
                      T* out) const {
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      using V = Vec<T>;
      constexpr int64_t lanes = V::size();
      const int64_t Hp = packed_hidden_, runs = packed_runs(), width = packed_run_width();
      const bool output_packed = packed_ == Packed::Output;
      // Term k of batch row b: in[b * in_row_step + term_offset[k]].
      const int64_t in_row_step = output_packed ? k_ : Hp;
      c10::SmallVector<int64_t, 64> term_offset(k_);
      for (int64_t k = 0; k < k_; ++k) {
        term_offset[k] = output_packed ? k : (k / Hp) * batch * Hp + k % Hp;
      }
      const auto start = [&](int64_t b, int64_t r) {
        return addend ? V::loadu(addend + b * addend_stride + r * width, width) : V(T(0));
      };
      const auto out_run = [&](int64_t b, int64_t r) {
        return output_packed ? out + r * batch * Hp + b * Hp : out + b * n_;
      };
      const T* terms = packed_terms_.data();
      // Rows b .. b + kRows - 1 (kRows <= kRowsTogether).
      const auto rows = [&](int64_t b, auto rows_constant) {
        constexpr int kRows = decltype(rows_constant)::value;
        for (int64_t r = 0; r < runs; ++r) {
          V sums[kRowsTogether];
          for (int i = 0; i < kRows; ++i) sums[i] = start(b + i, r);
          for (int64_t k = 0; k < k_; ++k) {
            const V term = V::loadu(terms + (k * runs + r) * lanes);
            const T* in_k = in + b * in_row_step + term_offset[k];
            for (int i = 0; i < kRows; ++i) {
              sums[i] = at::vec::fmadd(V(in_k[i * in_row_step]), term, sums[i]);
            }
          }
          for (int i = 0; i < kRows; ++i) sums[i].store(out_run(b + i, r), width);
        }
      };
      int64_t b = 0;
      for (; b + kRowsTogether <= batch; b += kRowsTogether) {
        rows(b, std::integral_constant<int, kRowsTogether>{});
      }
      for (; b < batch; ++b) rows(b, std::integral_constant<int, 1>{});
    } else {
      (void)in, (void)batch, (void)addend, (void)addend_stride, (void)out;
      TORCH_INTERNAL_ASSERT(false, "rnnfast: gate packing is for float and double only");
    }
  }

  // The product for `rows` rows as a RegisterProduct: output o and term k (a column of M) in
  // the layout of this product's packing.
  RegisterProduct make_register_product(const at::Tensor& matrix, int64_t rows) const {
    const at::Tensor m = matrix.contiguous();
    const float* m_data = m.data_ptr<float>();
    const float* bias = bias_.defined() ? bias_.template data_ptr<float>() : nullptr;
    const int64_t n = n_, k = k_, hp = packed_hidden_;
    const Packed packed = packed_;
    // (row b, column c) of output o: plain rows [B][N], or gate-packed [N / Hp][B][Hp].
    const auto row_of = [=](int64_t o) {
      return packed == Packed::Output ? o % (rows * hp) / hp : o / n;
    };
    const auto column_of = [=](int64_t o) {
      return packed == Packed::Output ? o / (rows * hp) * hp + o % hp : o % n;
    };
    // Where input element (row b, term s) lives: plain rows [B][K] or gate-packed [K / Hp][B][Hp].
    const auto source = [=](int64_t o, int64_t s) {
      const int64_t b = row_of(o);
      return packed == Packed::Input ? s / hp * rows * hp + b * hp + s % hp : b * k + s;
    };
    const auto weight = [=](int64_t o, int64_t s) { return m_data[column_of(o) * k + s]; };
    const auto start = [=](int64_t o) { return bias ? bias[column_of(o)] : 0.0f; };
    return RegisterProduct(rows * k, rows * n, k, source, weight, start);
  }

  // out = addend (rows of it, or the one bias row), or 0: the product of a zero input.
  void compute_from_zero(int64_t batch, const T* addend, int64_t addend_stride, T* out) const {
    const int64_t Hp = packed_hidden_;
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t n = 0; n < n_; ++n) {
        const T value = addend ? addend[b * addend_stride + n] : T(0);
        // Gate-packed output: column n of row b lives at [n / Hp][b][n % Hp].
        const int64_t at =
            packed_ == Packed::Output ? (n / Hp) * batch * Hp + b * Hp + n % Hp : b * n_ + n;
        out[at] = value;
      }
    }
  }

  // A product in the BLAS runs on each thread's share of the rows where that share is
  // kMinRowsPerThread .. kMaxRowsPerThread rows, M fits in half a core's L2 cache and the call
  // has the tiled kernel's kTiledMinSteps steps to repay the copy of M^T. Fewer rows
  // per thread are faster split by columns of M (each core reads half of it); more, or a larger
  // M, by MKL's own threading of its packed copy of M^T (grid LSTM: 16 to 32 rows of 192 to 256
  // units ran 4-18% faster split by rows, 64 rows 3% slower, 512 units 12-30% slower).
  static constexpr int64_t kMaxRowsPerThread = 16;
  static bool splits_rows_in_blas(int64_t rows, int64_t n, int64_t k) {
    const int64_t threads = at::get_num_threads();
    return threads > 1 && rows >= kMinRowsPerThread * threads &&
           rows <= kMaxRowsPerThread * threads &&
           n * k * int64_t(sizeof(T)) <= core_cache_bytes() / 2;
  }

  // Products up to this many multiply-adds run as a plain loop.
  static constexpr int64_t kLoopLimit = 4096;
  // The tiled kernel takes matrices up to this many elements (M^T stays in the L2 cache), in
  // calls of at least this many steps (fewer do not repay the copy of M^T).
  static constexpr int64_t kTiledLimit = 1 << 16;
  static constexpr int64_t kTiledMinSteps = 3;
  static constexpr int64_t kPackMinRows = 4;

  at::Tensor matrix_, bias_;
  // bias_'s data, read once: a step's product of a few rows ran data_ptr's type check each
  // call (0.6% of fashion-MNIST's LSTM training step).
  const T* bias_data_;
  // The float product that runs a bfloat16 or float16 one below kWidenedMaxWork, on float
  // copies of M and the bias; else null.
  std::shared_ptr<const RecurrentProduct<float>> widened_;
  RegisterProduct register_;         // the whole product in registers (float, tiny sizes)
  int64_t register_rows_ = 0;        // the batch register_ was built for
  TiledWeights<T> tiled_;            // M^T for the tiled kernel, when it runs the product
  amx::AmxWeights amx_;              // M packed for AMX tiles, when they run the product (bfloat16)
  bool amx_splits_outputs_ = false;  // amx_splits_outputs(the batch it was built for)
  bool amx_rows_by_dots_ = false;  // AmxWeights::row_product (under kAmxMinRows rows, or no tiles)
  MatrixRef<T> matrix_transposed_{nullptr, 0, false};  // M^T for gemm
  PackedOperand packed_operand_;  // M^T packed for the BLAS (float, several steps)
  std::vector<T> packed_terms_;   // the gate-packed products' terms (make_packed_terms)
  bool use_loop_ = false;
  bool splits_blas_rows_ = false;  // the BLAS on a thread's rows, from a row-major M^T
  Packed packed_;
  int64_t packed_hidden_;
  int64_t n_ = 0, k_ = 0;
};

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
