// The CPU engine: rnnfast::forward / rnnfast::backward for one layer in one direction.
//
// Forward: xg = x W_ih^T + b for all steps in ONE GEMM; per step the recurrent product
// hg = h W_hh^T and ONE fused pointwise pass (csrc/cells.h) that writes h, c, the output and
// the workspace. Backward: a reverse loop of one fused pointwise pass plus the recurrent
// product per step; the gradients of x, W_ih, W_hh, W_hr and the biases as single GEMMs /
// reductions over all steps. Buffers are allocated once per call, never per step.
//
// Variable lengths (packed sequences) are masks: row b is active at step t when t < len[b].
// An inactive step keeps the row's state, writes a zero output and a zero gate gradient, so
// both directions start each row from hx at its own first step.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <c10/util/irange.h>
#include <torch/library.h>

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

#include "../layer.h"
#include "blas.h"
#include "buffer_pool.h"
#include "gate_panels.h"
#include "recurrent_product.h"
#include "register_layer.h"
#include "step_barrier.h"
#include "vector_math.h"

namespace rnnfast {
namespace {

using at::Tensor;

// Batch rows never interact in a layer, so each thread may run the whole sequence for its
// share of the rows: one parallel region per call, no barrier per step. That pays where the
// recurrent product stays in cache (the tiled kernel or the plain loop) and the call has enough
// work: below this many multiply-adds of recurrent products over the sequence a call stays on
// one thread (a region costs more). The register product (a few rows, bound by the latency of
// each step) stays on one thread.
constexpr int64_t kParallelMinWork = 1 << 18;
// Products in the BLAS are threaded by the BLAS, each thread on its share of the weights. The
// pointwise pass between them is split over the threads per step where a step has at least
// this many hidden units (below, a parallel region per step costs more than it saves).
constexpr int64_t kPointwiseSplitMinUnits = 1 << 12;

enum class StepThreads { Serial, RowsPerThread, PointwisePerStep };

template <typename T>
StepThreads step_threads(int64_t rows, int64_t steps, int64_t gate_size, int64_t state_size,
                         int64_t hidden_size, const RecurrentProduct<T>& product) {
  if (at::get_num_threads() < 2) return StepThreads::Serial;
  if (product.may_split_rows()) {
    return rows * steps * gate_size * state_size >= kParallelMinWork ? StepThreads::RowsPerThread
                                                                     : StepThreads::Serial;
  }
  return product.uses_blas() && rows * hidden_size >= kPointwiseSplitMinUnits
             ? StepThreads::PointwisePerStep
             : StepThreads::Serial;
}

// Runs steps [step_begin, step_end) of a call over batch rows [0, rows) in the schedule
// `threads`: per step before(step, begin, end), pointwise(step, begin, end) and
// after(step, begin, end) on rows begin .. end - 1 (before and after run the products; with
// PointwisePerStep on all rows).
template <typename Before, typename Pointwise, typename After>
void run_steps(int64_t rows, int64_t step_begin, int64_t step_end, StepThreads threads,
               const Before& before, const Pointwise& pointwise, const After& after) {
  if (threads == StepThreads::PointwisePerStep) {
    for (int64_t step = step_begin; step < step_end; ++step) {
      before(step, 0, rows);
      at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        pointwise(step, begin, end);
      });
      after(step, 0, rows);
    }
    return;
  }
  const int64_t grain = threads == StepThreads::RowsPerThread ? 1 : std::max<int64_t>(rows, 1);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t step = step_begin; step < step_end; ++step) {
      before(step, begin, end);
      pointwise(step, begin, end);
      after(step, begin, end);
    }
  });
}

// Sizes of one call as the pointwise loops see them, shared by the forward and backward.
//
// Gate-packed view: with fewer hidden units than a SIMD vector has lanes (and no lengths or
// projection), per-row vectors would be mostly empty. Then the gate buffers of a step are laid
// out [gates][B][H] instead of [B][gates * H] and the loops see ONE row of B * H units
// (B = 1, H = B * H, ...), so a vector covers units of several batch rows. The recurrent
// products (product_rows = the real batch) read or write that layout.
template <typename T>
struct LayerView {
  int64_t T_, B, I, H, P, G, W;
  int64_t product_rows;  // batch rows of the recurrent products
  int64_t unit_hidden;   // hidden units of one batch row
  bool gate_packed;
  bool reverse;
  const int64_t* lengths;  // [B] or nullptr (every row runs all T steps)

  int64_t step_time(int64_t step) const { return reverse ? T_ - 1 - step : step; }
  // The rows a recurrent product runs on for the loop's rows [b_begin, b_end): the gate-packed
  // view's one row holds all batch rows, so its products run on all of them.
  int64_t rows_of_products(int64_t b_begin, int64_t b_end) const {
    return gate_packed ? product_rows : b_end - b_begin;
  }
  int64_t length_of(int64_t b) const { return lengths ? lengths[b] : T_; }
  // Lengths that never increase down the batch (a packed sequence's order): the rows active at
  // a step are a prefix of the batch.
  bool rows_by_length = false;
  // The end of the rows of [b_begin, b_end) that may be active at step t: before the first row
  // that has ended, where rows go by length; else b_end.
  int64_t active_end(int64_t t, int64_t b_begin, int64_t b_end) const {
    if (!rows_by_length) return b_end;
    while (b_begin < b_end) {  // the first row of length <= t
      const int64_t middle = b_begin + (b_end - b_begin) / 2;
      if (lengths[middle] > t) {
        b_begin = middle + 1;
      } else {
        b_end = middle;
      }
    }
    return b_begin;
  }
  bool active(int64_t t, int64_t b) const { return t < length_of(b); }
  // The step at which row b starts (its state before that step is hx[b]).
  bool is_first_step(int64_t t, int64_t b) const {
    return reverse ? t == length_of(b) - 1 : t == 0;
  }
  int64_t previous_time(int64_t t) const { return reverse ? t + 1 : t - 1; }
};

template <typename T>
bool use_gate_packing(const LayerSizes& s) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return !s.has_lengths && !s.has_projection && s.batch > 1 &&
           s.hidden_size < Vec<T>::size();
  }
  return false;
}

bool uses_gate_packing(const LayerSizes& s, at::ScalarType type) {
  return type == at::kFloat    ? use_gate_packing<float>(s)
         : type == at::kDouble ? use_gate_packing<double>(s)
                               : false;
}

template <typename T>
LayerView<T> make_view(const LayerSizes& s, int64_t workspace_cols, bool reverse,
                       const Tensor& lengths) {
  LayerView<T> v;
  v.gate_packed = use_gate_packing<T>(s);
  const int64_t rows = v.gate_packed ? s.batch : 1;  // real rows folded into one
  v.T_ = s.steps;
  v.B = s.batch / rows;
  v.I = s.input_size;
  v.H = s.hidden_size * rows;
  v.P = s.state_size * rows;
  v.G = s.gate_size * rows;
  v.W = workspace_cols * rows;
  v.product_rows = s.batch;
  v.unit_hidden = s.hidden_size;
  v.reverse = reverse;
  v.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  v.rows_by_length = v.lengths != nullptr &&
                     std::is_sorted(v.lengths, v.lengths + s.batch, std::greater<int64_t>());
  return v;
}

template <typename T>
T* data_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

#if defined(CPU_CAPABILITY_AVX512)
// A call's sizes as register_layer.h takes them.
register_layer::Layer register_layer_sizes(const LayerSizes& s, bool reverse) {
  return {s.steps, s.batch, s.input_size, s.hidden_size, reverse};
}

register_layer::StridedSteps strided_steps(const Tensor& x) {
  return {x.data_ptr<float>(), x.stride(0), x.stride(1), x.stride(2)};
}
#endif

// Whether the register layer runs on this float input [T, B, I], which it reads at its strides:
// sizes it takes, and a step's offsets within its gathers'.
bool register_layer_reads(const Tensor& input, int64_t hidden_size, bool has_lengths,
                          bool has_projection) {
#if defined(CPU_CAPABILITY_AVX512)
  return input.scalar_type() == at::kFloat && input.dim() == 3 &&
         register_layer::fits(input.size(1), input.size(2), hidden_size, has_lengths,
                              has_projection) &&
         register_layer::StridedSteps::fits(input.size(1), input.size(2), input.stride(1),
                                            input.stride(2));
#else
  (void)input, (void)hidden_size, (void)has_lengths, (void)has_projection;
  return false;
#endif
}

// Whether the forward and the reverse pass run in register_layer.h (the reverse pass also needs
// register_layer::backward_fits), on the input as prepare_forward / prepare_backward leave it;
// before that, their ReadsInputAtStrides.
bool register_layer_reads_input(const LayerSizes& s, const Tensor& input) {
  return register_layer_reads(input, s.hidden_size, s.has_lengths, s.has_projection);
}

bool register_layer_reads_input_backward(const LayerSizes& s, const Tensor& input) {
#if defined(CPU_CAPABILITY_AVX512)
  return register_layer_reads_input(s, input) &&
         register_layer::backward_fits(s.gate_size / s.hidden_size, s.input_size, s.hidden_size);
#else
  (void)s, (void)input;
  return false;
#endif
}

// Whether the forward's input projection runs on this input [T, B, I] as it is, a batch_first
// tensor's transposed view (its memory holds the rows of [B, T, I] in order): the GEMM takes the
// rows batch-major, and the steps read xg at batch-major strides. Only where xg gets a buffer
// of its own anyway (the inference's: training writes it into the workspace, time-major, and
// the backward reads the time-major copy of the input that the autograd kernel makes) and the
// gate-packed view does not regroup it.
bool projects_batch_major_input(const LayerSizes& s, const Tensor& input) {
  return input.device().is_cpu() && input.dim() == 3 && !input.is_contiguous() &&
         input.transpose(0, 1).is_contiguous() && !uses_gate_packing(s, input.scalar_type());
}

// The inference forward's ReadsInputAtStrides: the register layer's, or a batch_first input
// that the input projection takes as it is.
bool inference_reads_input_at_strides(const LayerSizes& s, const Tensor& input) {
  return register_layer_reads_input(s, input) || projects_batch_major_input(s, input);
}

// Whether every value of w (contiguous) is finite. Only then is the product of a zero state with
// W_hh zero, so that the first step of a call without hx may skip it: torch.nn multiplies, and
// a NaN or Inf in W_hh makes that step's gates NaN (0 * NaN and 0 * Inf are NaN). One pass over
// the exponent bits (an integer reduction the compiler vectorizes), once per call.
template <typename T>
bool all_finite(const Tensor& w) {
  const T* data = w.data_ptr<T>();
  const int64_t n = w.numel();
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    using Bits = std::conditional_t<std::is_same_v<T, float>, uint32_t, uint64_t>;
    constexpr Bits kExponent = std::is_same_v<T, float> ? Bits(0x7f800000u)
                                                         : Bits(0x7ff0000000000000ull);
    Bits non_finite = 0;  // 1 once a value's exponent field is all ones (NaN or Inf)
    for (int64_t i = 0; i < n; ++i) {
      Bits bits;
      std::memcpy(&bits, data + i, sizeof(bits));
      non_finite |= Bits((bits & kExponent) == kExponent);
    }
    return non_finite == 0;
  } else {
    for (int64_t i = 0; i < n; ++i) {
      if (!std::isfinite(float(data[i]))) return false;
    }
    return true;
  }
}

// all_finite(w_hh), remembered per thread for the last kRemembered tensors asked about while
// they live and keep their data and version: an inference loop passes the same weights every
// call, and the scan reads all of W_hh, as much memory as a two-step sequence's products (the
// course's 2-layer energy model's forward 0.30 -> 0.36 ms with a scan per call; its two layers'
// weights, one remembered, took turns at the one place: 0.43 ms). Any in-place change (an
// optimizer's step, load_state_dict) bumps the version; a change through a `.data` alias does
// not, as for autograd's own checks.
template <typename T>
bool w_hh_all_finite(const Tensor& w_hh) {
  struct Remembered {
    std::optional<c10::weak_intrusive_ptr<c10::TensorImpl>> tensor;
    const void* data = nullptr;
    int64_t version = -1;
    bool finite = false;
  };
  // Every layer and direction of a deep bidirectional stack (8 layers of 2), replaced in turn.
  constexpr int kRemembered = 16;
  thread_local std::array<Remembered, kRemembered> remembered;
  thread_local int next_place = 0;
  const void* data = w_hh.data_ptr();
  const int64_t version = w_hh._version();
  for (const Remembered& entry : remembered) {
    if (entry.tensor && entry.data == data && entry.version == version) {
      const auto alive = entry.tensor->lock();
      if (alive.get() == w_hh.unsafeGetTensorImpl()) return entry.finite;
    }
  }
  Remembered& entry = remembered[next_place];
  next_place = (next_place + 1) % kRemembered;
  entry.finite = all_finite<T>(w_hh);
  entry.tensor.emplace(w_hh.getIntrusivePtr());
  entry.data = data;
  entry.version = version;
  return entry.finite;
}

// b_ih + b_hh [G], added in the accumulation type.
template <typename T>
Tensor summed_biases(const Tensor& b_ih, const Tensor& b_hh) {
  using A = at::opmath_type<T>;
  Tensor sum = at::empty_like(b_ih);
  const T *a = b_ih.data_ptr<T>(), *b = b_hh.data_ptr<T>();
  T* out = sum.data_ptr<T>();
  for (int64_t n = 0; n < b_ih.numel(); ++n) out[n] = T(A(a[n]) + A(b[n]));
  return sum;
}

// [T, B, gates * H] <-> [T, gates, B, H] for the gate-packed view: a copy with the gate and
// batch axes swapped (to_packed: from rows to packed, else back). An element loop: a run is a
// few units (fewer than a vector's lanes), too short for a strided copy or a memcpy call.
template <typename T>
Tensor regroup_gates(const Tensor& from, int64_t gates, bool to_packed) {
  const int64_t T_ = from.size(0), B = from.size(1), H = from.size(2) / gates;
  Tensor to = pooled_empty(from.sizes(), from.options());
  const T* src = from.data_ptr<T>();
  T* dst = to.data_ptr<T>();
  for (int64_t t = 0; t < T_; ++t) {
    const int64_t step = t * B * gates * H;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t g = 0; g < gates; ++g) {
        const int64_t row_at = step + (b * gates + g) * H, packed_at = step + (g * B + b) * H;
        const T* from_run = src + (to_packed ? row_at : packed_at);
        T* to_run = dst + (to_packed ? packed_at : row_at);
        for (int64_t j = 0; j < H; ++j) to_run[j] = from_run[j];
      }
    }
  }
  return to;
}

// One run of units j of a row's forward step (H: the gate stride of xg_row, hg_row, ws_row):
// reads h_prev_row (GRU) and c_row (LSTM, updated in place), writes h_new_row (which may be
// h_prev_row: a unit's h_prev is read first) and the saved values; returns the new h.
template <typename Cell, typename T, typename A, typename Index, typename V>
inline V forward_run(int H, Index j, V zero, const T* xg_row, const T* hg_row,
                     const T* h_prev_row, A* c_row, T* h_new_row, T* ws_row) {
  const V h_prev = Cell::kReadsPrevHidden ? load<V>(h_prev_row, 0, j) : zero;
  const V c_prev = c_row ? load<V>(c_row, 0, j) : zero;
  V h_new = zero, c_new = zero;
  Cell::forward(H, j, xg_row, hg_row, h_prev, c_prev, h_new, c_new, ws_row);
  store(h_new_row, 0, j, h_new);
  if (c_row) store(c_row, 0, j, c_new);
  return h_new;
}

// Where row b of step t of the input projection xg starts: time-major rows (step = B * row
// stride), or batch-major ones (batch = T * G) where the GEMM ran on a batch_first input as it
// is; the gate-packed view's one row per step spans B * G. `data` holds the steps from time
// first_time on (all, or those of a chunk of steps).
template <typename T>
struct StepRows {
  const T* data;
  int64_t step, batch;
  int64_t first_time = 0;
  const T* row(int64_t t, int64_t b) const { return data + (t - first_time) * step + b * batch; }
};

// The steps [begin, end) of a call that one run of the time loop takes (in the loop's order:
// step s is time v.step_time(s)).
struct StepRange {
  int64_t begin, end;
};

// The panel schedule (gate_panels.h) runs a float or double forward whose product the BLAS
// would run, over at least this many steps (fewer do not repay the packing of W_hh).
constexpr int64_t kPanelMinSteps = 4;
// ... of at most this many batch rows where the BLAS is MKL on an Intel CPU: there MKL's packed
// GEMM per step ran the 64-row LSTM forward faster (256 and 512 units: 31 and 117 ms against
// 36 and 131, 2 threads of a Xeon), from 16 to 20 rows slower (16 rows of 256 units: 8.2
// against 10.8 ms; 20 rows of 650, two layers: 54 against 62). MKL on AMD CPUs runs its
// generic kernels at half of oneDNN's rate: there the panels run every batch.
constexpr int64_t kPanelMaxRowsBesideFastBlas = 32;

bool blas_is_fast_here() {
  static const bool fast = [] {
#if defined(__x86_64__) || defined(_M_X64)
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
    // "GenuineIntel" in ebx, edx, ecx; MKL is the BLAS of torch's x86 builds.
    const bool intel = ebx == 0x756e6547 && edx == 0x49656e69 && ecx == 0x6c65746e;
    return intel && &sgemm_ != nullptr;
#else
    return false;
#endif
  }();
  return fast;
}

// Whether the forward runs in the panel schedule: a product the BLAS would run; float or
// double with SIMD vectors; no projection; one thread, or the threads of a region that run
// concurrently (OpenMP's: StepBarrier spins).
template <typename T>
bool runs_by_panels(const LayerView<T>& v, bool projecting) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    using Product = RecurrentProduct<T>;
    const bool concurrent_threads = AT_PARALLEL_OPENMP || at::get_num_threads() == 1 ||
                                    at::in_parallel_region();
    return !projecting && !v.gate_packed && v.T_ >= kPanelMinSteps && concurrent_threads &&
           (v.product_rows <= kPanelMaxRowsBesideFastBlas || !blas_is_fast_here()) &&
           Product::kernel_for(v.product_rows, v.G, v.P, v.T_) == Product::Kernel::Blas;
#endif
  }
  (void)v, (void)projecting;
  return false;
}

// The forward in the panel schedule: one parallel region, each thread on its panels (blocks of
// hidden units, every gate) for all batch rows and steps, one barrier per step. Per panel and
// tile of rows, the product's tile and at once the cell math of its units. h alternates
// between two buffers: a thread's product of step s reads all of h_{s-1} while another
// thread may already be writing its units of h_s.
template <typename Cell, typename T>
void run_forward_by_panels(const LayerView<T>& v, StepRange steps, bool zero_initial_state,
                           StepRows<T> xg, const Tensor& w_hh, const Tensor& step_bias,
                           Tensor& h_state, Tensor& c_state, Tensor& output,
                           Tensor& workspace) {
  using A = at::opmath_type<T>;
  const int64_t B = v.B, H = v.H, G = v.G, W = v.W;  // no projection: P == H
  constexpr int kRows = GatePanels<T>::rows_per_tile(Cell::kGates);
  const bool saving = workspace.dim() == 3;
  GatePanels<T> panels(w_hh.contiguous(), step_bias, Cell::kGates);
  Tensor hg = at::empty({B, G}, h_state.options());
  // [(s - steps.begin) % 2]: h before step s
  Tensor h_buffers = at::empty({2, B, H}, h_state.options());
  h_buffers[0].copy_(h_state);
  T* hg_data = hg.data_ptr<T>();
  T* h_data = h_buffers.data_ptr<T>();
  A* c_data = Cell::kHasCellState ? c_state.data_ptr<A>() : nullptr;  // [B, H]
  T* out_data = output.data_ptr<T>();
  T* ws_data = saving && W > 0 ? workspace.data_ptr<T>() : nullptr;
  // Row tiles over the rows of a step that may be active (all, or the packed sequence's rows
  // that have not ended), as even as kRows allows: 20 LSTM rows as 4 tiles of 5, not
  // 6 + 6 + 6 + 2 (a tile of 2 rows runs its multiply-adds at a third of the rate). Tile i of
  // `rows` rows: rows tile_begin(i) .. tile_begin(i + 1) - 1.
  const auto tiles_of = [](int64_t rows) { return (rows + kRows - 1) / kRows; };
  const auto tile_begin = [&](int64_t tile, int64_t rows) { return tile * rows / tiles_of(rows); };

  // The cell math of rows b0 .. b1 - 1, units `units`, of step t, from hg.
  const auto pointwise = [&](int64_t t, int64_t b0, int64_t b1, VectorUnits units,
                             const T* h_prev, T* h_next) {
    const int64_t u0 = units.j, u1 = u0 + units.count;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t row = t * B + b;
      T* out_row = out_data + row * H;
      T* ws_row = ws_data ? ws_data + row * W : nullptr;
      const T* h_prev_row = h_prev + b * H;
      T* h_next_row = h_next + b * H;
      if (!v.active(t, b)) {
        // The row keeps its state; its output and saved values of the step are zero.
        std::copy(h_prev_row + u0, h_prev_row + u1, h_next_row + u0);
        std::fill(out_row + u0, out_row + u1, T(0));
        for (int64_t group = 0; ws_row && group < W / H; ++group) {
          std::fill(ws_row + group * H + u0, ws_row + group * H + u1, T(0));
        }
        continue;
      }
      A* c_row = c_data ? c_data + b * H : nullptr;
      const auto h = forward_run<Cell>(static_cast<int>(H), units, Vec<A>(A(0)), xg.row(t, b),
                                       hg_data + b * G, h_prev_row, c_row, h_next_row, ws_row);
      store(out_row, 0, units, h);
    }
  };

  // What the cell math of rows b0 .. b1 - 1, units `units`, of step t reads from memory that is
  // not in cache (xg: a step's rows are a few hundred KB apart from the last time they were
  // read, in another step; c), fetched into the L2 cache while the product's tile runs: the
  // hardware's prefetchers do not follow strides of a row per gate, and the cells waited on
  // these loads for a third of their time (64 rows of 512 LSTM units).
  const auto fetch_cell_inputs = [&](int64_t t, int64_t b0, int64_t b1, VectorUnits units) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* xg_row = xg.row(t, b) + units.j;
      for (int gate = 0; gate < Cell::kGates; ++gate) __builtin_prefetch(xg_row + gate * H, 0, 2);
      if (c_data) __builtin_prefetch(c_data + b * H + units.j, 1, 2);
    }
  };

  StepBarrier barrier(panels.blocks());
  at::parallel_for(0, panels.blocks(), 1, [&](int64_t first, int64_t end) {
    panels.pack(first, end);
    const int64_t K = panels.terms(), chunk = panels.chunk_terms();
    for (int64_t step = steps.begin; step < steps.end; ++step) {
      const int64_t t = v.step_time(step);
      const int64_t parity = (step - steps.begin) % 2;
      const T* h_prev = h_data + parity * B * H;
      T* h_next = h_data + (1 - parity) * B * H;
      const T* h_rows = zero_initial_state && step == 0 ? nullptr : h_prev;
      // The rows that have ended (a packed sequence's, in order of length) run no product.
      const int64_t rows = v.active_end(t, 0, B), tiles = tiles_of(rows);
      for (int64_t block = first; block < end; ++block) {
        const VectorUnits units{static_cast<int>(panels.first_unit(block)), panels.units(block)};
        // The k loop in chunks that stay in the L1 cache over all row tiles; after the last
        // chunk of a tile, its cell math while the tile is in L1 too.
        for (int64_t k0 = 0; k0 < K; k0 += chunk) {
          const int64_t k1 = std::min(K, k0 + chunk);
          for (int64_t row_tile = 0; row_tile < tiles; ++row_tile) {
            const int64_t b0 = tile_begin(row_tile, rows), b1 = tile_begin(row_tile + 1, rows);
            if (k0 == 0) fetch_cell_inputs(t, b0, b1, units);
            panels.template tile<Cell::kGates>(h_rows ? h_rows + b0 * H : nullptr,
                                               static_cast<int>(b1 - b0), block, k0, k1,
                                               hg_data + b0 * G, G, row_tile == 0);
            if (k1 == K) pointwise(t, b0, b1, units, h_prev, h_next);
          }
        }
        // The ended rows keep their state and write zeros.
        pointwise(t, rows, B, units, h_prev, h_next);
      }
      barrier.arrive_and_wait(end - first);
    }
  });
  h_state.copy_(h_buffers[(steps.end - steps.begin) % 2]);
}

// Steps `steps` of the forward, from the state in h_state and c_state (which it updates); the
// kernels are chosen for the whole call (v.T_ steps), so that a call run in chunks of steps
// computes what it computes in one.
template <typename Cell, typename T>
void run_forward(const LayerView<T>& v, StepRange steps, bool zero_initial_state,
                 StepRows<T> xg, const Tensor& w_hh, const Tensor& step_bias,
                 const Tensor& w_hr, Tensor& h_state, Tensor& c_state, Tensor& output,
                 Tensor& workspace) {
  using A = at::opmath_type<T>;
  const int64_t B = v.B, H = v.H, P = v.P, G = v.G, W = v.W;
  const bool projecting = w_hr.defined();
  const bool saving = workspace.dim() == 3;  // [T, B, W] when saving, [0] otherwise
  if (runs_by_panels(v, projecting)) {
    run_forward_by_panels<Cell, T>(v, steps, zero_initial_state, xg, w_hh, step_bias, h_state,
                                   c_state, output, workspace);
    return;
  }
  Tensor hg = at::empty({B, G}, h_state.options());
  Tensor h_unprojected = projecting ? at::empty({B, H}, h_state.options()) : Tensor();
  Tensor h_projected = projecting ? at::empty({B, P}, h_state.options()) : Tensor();
  using Product = RecurrentProduct<T>;
  // hg = h W_hh^T + step_bias (b_hh, or b_ih + b_hh where xg has no bias). A product in the
  // BLAS would add the bias by copying it into every row of hg before each step's GEMM, a pass
  // over [B, G] on the calling thread while the others wait (5% of the 64-row, 256-unit LSTM's
  // forward); there the pointwise pass adds it instead, on each thread's rows while they are
  // in its cache. (float and double: the BLAS's own types, for which both round the same.)
  const bool bias_in_pointwise =
      (std::is_same_v<T, float> || std::is_same_v<T, double>) && step_bias.defined() &&
      !v.gate_packed && Product::kernel_for(v.product_rows, G, P, v.T_) == Product::Kernel::Blas;
  const T* pointwise_bias = bias_in_pointwise ? step_bias.data_ptr<T>() : nullptr;
  // The forward may use MKL's packed copy of W_hh: its memory is gone before the backward,
  // whose gate-gradient buffers make the peak of a training step.
  const Product recurrent(w_hh, bias_in_pointwise ? Tensor() : step_bias, v.product_rows, v.T_,
                          v.gate_packed ? Product::Packed::Output : Product::Packed::None,
                          v.unit_hidden, /*may_pack=*/true);
  // h = h_unprojected W_hr^T
  const Product projection(w_hr, Tensor(), v.product_rows, v.T_);

  T* hg_data = hg.data_ptr<T>();
  T* h_data = h_state.data_ptr<T>();  // [B, P]
  A* c_data = Cell::kHasCellState ? c_state.data_ptr<A>() : nullptr;  // [B, H]
  T* out_data = output.data_ptr<T>();
  T* ws_data = saving && W > 0 ? workspace.data_ptr<T>() : nullptr;
  T* hu_data = projecting ? h_unprojected.data_ptr<T>() : nullptr;
  T* hp_data = projecting ? h_projected.data_ptr<T>() : nullptr;

  // A packed sequence's rows that have ended skip the product (their step reads no hg): a
  // seq2seq encoder's sentences of 3-10 words padded to 10 ran a third of its products on them.
  const bool products_skip_ended_rows = recurrent.runs_any_rows();
  const auto recurrent_step = [&](int64_t step, int64_t b_begin, int64_t b_end) {
    // Every row active at the first step starts there; from zero states hg is step_bias alone.
    const bool from_zero = zero_initial_state && step == 0;
    const int64_t end =
        products_skip_ended_rows ? v.active_end(v.step_time(step), b_begin, b_end) : b_end;
    if (end == b_begin) return;
    recurrent.run(from_zero ? nullptr : h_data + b_begin * P, v.rows_of_products(b_begin, end),
                  hg_data + b_begin * G);
  };
  const auto pointwise_step = [&](int64_t step, int64_t b_begin, int64_t b_end) {
    const int64_t t = v.step_time(step);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t row = t * B + b;
      T* out_row = out_data + row * P;
      T* ws_row = ws_data ? ws_data + row * W : nullptr;
      if (!v.active(t, b)) {
        std::fill(out_row, out_row + P, T(0));
        if (ws_row) std::fill(ws_row, ws_row + W, T(0));
        continue;
      }
      // Where xg lives in the workspace or the output, the cell overwrites it in place: it
      // reads all gates of a unit before it writes any.
      const T* xg_row = xg.row(t, b);
      T* hg_row = hg_data + b * G;
      if (pointwise_bias) {
        for_unit_runs<T>(G, [&](auto n, auto zero) {
          using V = decltype(zero);
          store(hg_row, 0, n, load<V>(hg_row, 0, n) + load<V>(pointwise_bias, 0, n));
        });
      }
      T* h_row = h_data + b * P;
      A* c_row = c_data ? c_data + b * H : nullptr;
      T* h_new_row = projecting ? hu_data + b * H : h_row;
      for_unit_runs<T>(H, [&](auto j, auto zero) {
        const auto h = forward_run<Cell>(static_cast<int>(H), j, zero, xg_row, hg_row, h_row,
                                         c_row, h_new_row, ws_row);
        if (!projecting) store(out_row, 0, j, h);
      });
      if (projecting && ws_row) {
        std::copy(h_new_row, h_new_row + H, ws_row + Cell::kSavedPerUnit * H);
      }
    }
  };
  const auto projection_step = [&](int64_t step, int64_t b_begin, int64_t b_end) {
    if (!projecting) return;
    // h = h_unprojected W_hr^T for the active rows; inactive rows keep their state.
    const int64_t t = v.step_time(step);
    projection.run(hu_data + b_begin * H, v.rows_of_products(b_begin, b_end),
                   hp_data + b_begin * P);
    for (int64_t b = b_begin; b < b_end; ++b) {
      if (!v.active(t, b)) continue;
      std::copy(hp_data + b * P, hp_data + (b + 1) * P, h_data + b * P);
      std::copy(hp_data + b * P, hp_data + (b + 1) * P, out_data + (t * B + b) * P);
    }
  };
  run_steps(B, steps.begin, steps.end, step_threads(B, v.T_, G, P, H, recurrent),
            recurrent_step, pointwise_step, projection_step);
}

// An inference call's input projection in chunks of this many bytes (at least kMinChunkSteps
// steps): large enough that a chunk's GEMM runs at the rate of one over all steps and that the
// per-call preparation of the step kernels, repeated per chunk (W_hh packed), stays small next
// to the chunk's steps.
constexpr int64_t kProjectionChunkBytes = int64_t(32) << 20;
// Only a projection past this many bytes is chunked: the two chunks of the 64-row, 512-unit
// LSTM's 100 steps (52 MB whole) ran its forward 10% slower than one GEMM.
constexpr int64_t kChunkedProjectionAbove = int64_t(64) << 20;
constexpr int64_t kMinChunkSteps = 16;

int64_t projection_chunk_steps(int64_t step_bytes) {
  return std::max<int64_t>(kMinChunkSteps,
                           kProjectionChunkBytes / std::max<int64_t>(1, step_bytes));
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_cpu(
    c10::string_view cell, const Tensor& input_, const std::optional<Tensor>& hx_,
    const std::optional<Tensor>& cx_, const Tensor& w_ih_, const Tensor& w_hh_,
    const std::optional<Tensor>& b_ih_, const std::optional<Tensor>& b_hh_,
    const std::optional<Tensor>& w_hr_, const std::optional<Tensor>& lengths_, bool reverse,
    bool save_workspace, bool batch_first) {
  const ForwardInputs in = prepare_forward(std::string(cell),
                                           swap_time_and_batch(input_, batch_first), hx_, cx_,
                                           w_ih_, w_hh_, b_ih_, b_hh_, w_hr_, lengths_,
                                           save_workspace ? register_layer_reads_input
                                                          : inference_reads_input_at_strides);
  const LayerSizes& s = in.sizes;
  const Tensor &input = in.input, &w_ih = in.w_ih, &w_hh = in.w_hh, &w_hr = in.w_hr;
  const Tensor& lengths = in.lengths;
  const int64_t ws_cols = workspace_width(s.kind, s.hidden_size, s.has_projection);

  ForwardState state = make_forward_state(s, input, hx_, cx_, save_workspace);
  Tensor &output = state.output, &h_state = state.h, &c_state = state.c;
  Tensor& workspace = state.workspace;

  dispatch_cell(s.kind, [&](auto cell_type) {
    using Cell = decltype(cell_type);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(),
                                    "rnnfast_forward_cpu", [&] {
      const Tensor b_ih = b_ih_.has_value() ? b_ih_->contiguous() : Tensor();
      const Tensor b_hh = b_hh_.has_value() ? b_hh_->contiguous() : Tensor();
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (register_layer_reads_input(s, input)) {
          register_layer::forward<Cell>(
              register_layer_sizes(s, reverse), strided_steps(input),
              w_ih.data_ptr<float>(), w_hh.data_ptr<float>(), data_or_null<float>(b_ih),
              data_or_null<float>(b_hh), h_state.data_ptr<float>(),
              Cell::kHasCellState ? c_state.data_ptr<float>() : nullptr,
              output.data_ptr<float>(),
              save_workspace && ws_cols > 0 ? workspace.data_ptr<float>() : nullptr);
          return;
        }
      }
#endif
      const auto v = make_view<scalar_t>(s, ws_cols, reverse, lengths);
      // Without hx the first step's product h0 W_hh^T is skipped where that changes nothing.
      const bool zero_initial_state = !s.has_initial_state && w_hh_all_finite<scalar_t>(w_hh);
      const bool packs_gates = v.gate_packed && Cell::kGates > 1;
      const bool batch_major = !save_workspace && projects_batch_major_input(s, input);
      const bool xg_in_output =
          !batch_major && !packs_gates && Cell::kGates == 1 && s.state_size == s.gate_size;
      // The biases are added by the recurrent product of each step, where that costs nothing
      // extra: b_ih + b_hh for the cells that see xg and hg only as their sum, else b_hh, and
      // then b_ih goes into xg (a copy into every row before the GEMM).
      const bool fold_biases = Cell::kHiddenBiasFoldable && b_ih.defined() && b_hh.defined();
      const scalar_t* xg_bias = b_ih.defined() && !fold_biases ? b_ih.data_ptr<scalar_t>()
                                                               : nullptr;
      const Tensor step_bias = fold_biases ? summed_biases<scalar_t>(b_ih, b_hh) : b_hh;
      const scalar_t* x_data = input.data_ptr<scalar_t>();
      const MatrixRef<scalar_t> w_ih_t{w_ih.data_ptr<scalar_t>(), s.input_size, true};
      const int64_t chunk_steps =
          projection_chunk_steps(s.batch * s.gate_size * int64_t(sizeof(scalar_t)));
      const int64_t projection_bytes =
          s.steps * s.batch * s.gate_size * int64_t(sizeof(scalar_t));
      if (!save_workspace && !packs_gates && !xg_in_output && s.steps > chunk_steps &&
          projection_bytes > kChunkedProjectionAbove) {
        // Under no_grad a long call's input projection is not held whole ([T, B, G], several
        // times the output): it is made a chunk of steps at a time, [steps, B, G] time-major,
        // just before the steps that read it.
        Tensor chunk = pooled_empty({chunk_steps * s.batch, s.gate_size}, input.options());
        scalar_t* chunk_data = chunk.data_ptr<scalar_t>();
        for (int64_t first = 0; first < s.steps; first += chunk_steps) {
          const StepRange steps{first, std::min(s.steps, first + chunk_steps)};
          const int64_t count = steps.end - steps.begin;
          const int64_t t0 = reverse ? s.steps - steps.end : steps.begin;  // the chunk's times
          const int64_t rows = count * s.batch;
          const scalar_t beta =
              copy_addend_rows<scalar_t>(rows, s.gate_size, xg_bias, 0, chunk_data, s.gate_size);
          if (batch_major) {
            // Input rows (b, t) at b * T + t: per batch row, its steps of the chunk into the
            // chunk's rows t * B + b.
            at::parallel_for(0, s.batch, 1, [&](int64_t b_begin, int64_t b_end) {
              for (int64_t b = b_begin; b < b_end; ++b) {
                gemm<scalar_t>(count, s.gate_size, s.input_size,
                               {x_data + (b * s.steps + t0) * s.input_size, s.input_size, false},
                               w_ih_t, beta, chunk_data + b * s.gate_size,
                               s.batch * s.gate_size, GemmThreads::OnCaller);
              }
            });
          } else {
            gemm<scalar_t>(rows, s.gate_size, s.input_size,
                           {x_data + t0 * s.batch * s.input_size, s.input_size, false}, w_ih_t,
                           beta, chunk_data, s.gate_size);
          }
          const StepRows<scalar_t> xg_rows{chunk_data, s.batch * s.gate_size, s.gate_size, t0};
          run_forward<Cell, scalar_t>(v, steps, zero_initial_state, xg_rows, w_hh, step_bias,
                                      w_hr, h_state, c_state, output, workspace);
        }
        return;
      }
      // xg = x W_ih^T + b_ih: [T * B, G], one GEMM, its rows in the input's order (time-major,
      // or batch-major: see projects_batch_major_input).
      // To save a [T, B, G] buffer it is computed straight into the columns of the workspace
      // (LSTM, GRU: their saved gates take its place) or of the output (Elman: h takes its
      // place); the gate-packed view permutes it, so there it gets its own buffer, as do
      // batch-major rows.
      Tensor xg;
      if (batch_major) {
        xg = pooled_empty({s.steps * s.batch, s.gate_size}, input.options());
      } else if (!packs_gates && save_workspace && Cell::kSavedPerUnit >= Cell::kGates) {
        xg = workspace.view({s.steps * s.batch, ws_cols}).narrow(1, 0, s.gate_size);
      } else if (xg_in_output) {
        xg = output.view({s.steps * s.batch, s.state_size});
      } else {
        xg = pooled_empty({s.steps * s.batch, s.gate_size}, input.options());
      }
      const int64_t rows = s.steps * s.batch, xg_stride = xg.stride(0);
      scalar_t* xg_data = xg.data_ptr<scalar_t>();
      const scalar_t beta = copy_addend_rows<scalar_t>(rows, s.gate_size, xg_bias, 0, xg_data,
                                                       xg_stride);
      gemm<scalar_t>(rows, s.gate_size, s.input_size, {x_data, s.input_size, false}, w_ih_t,
                     beta, xg_data, xg_stride);
      Tensor step_gates = xg;
      if (packs_gates) {
        step_gates = regroup_gates<scalar_t>(xg.view({s.steps, s.batch, s.gate_size}),
                                                Cell::kGates, /*to_packed=*/true);
      }
      const int64_t row_stride = step_gates.stride(0);
      const StepRows<scalar_t> xg_rows{
          step_gates.data_ptr<scalar_t>(),
          v.gate_packed ? v.G : batch_major ? row_stride : s.batch * row_stride,
          batch_major ? s.steps * row_stride : row_stride};
      run_forward<Cell, scalar_t>(v, StepRange{0, s.steps}, zero_initial_state, xg_rows, w_hh,
                                  step_bias, w_hr, h_state, c_state, output, workspace);
    });
  });
  return {swap_time_and_batch(output, batch_first), h_state, final_cell_state(s, state, input),
          workspace};
}

// hx, cx: undefined where the forward started from zero states. column_sums: [B, G] double
// zeros, into whose row b the reverse loop adds row b's dgate_x of every step (not in the
// gate-packed view, whose rows are not the gates' columns); or undefined.
template <typename Cell, typename T>
void run_backward(const LayerView<T>& v, const Tensor& grad_output, const Tensor& hx,
                  const Tensor& cx, const Tensor& w_hh, const Tensor& w_hr,
                  const Tensor& output, const Tensor& workspace, Tensor& dh_state,
                  Tensor& dc_state, Tensor& dgate_x, Tensor& dgate_h, Tensor& dprojected,
                  Tensor& column_sums) {
  using A = at::opmath_type<T>;
  const int64_t B = v.B, H = v.H, P = v.P, G = v.G, W = v.W;
  const bool projecting = w_hr.defined();
  // A cell with its own dLoss/dhg (GRU) writes a step's into step_dgate_h [B, G], which the
  // recurrent product reads; dgate_h [T, B, Gh] keeps its last Gh columns of every step (all
  // G, or the last gate's H: the gates before it are dgate_x's), for the weight gradients.
  Tensor step_dgate_h = Cell::kSeparateHiddenGateGrad ? at::empty({B, G}, grad_output.options())
                                                      : Tensor();
  // In the view's units (the gate-packed view's rows span the batch): G, or the last gate's H.
  const int64_t Gh = Cell::kSeparateHiddenGateGrad && dgate_h.size(2) < dgate_x.size(2) ? H : G;
  // dh_direct [B, P]: dLoss/dh_prev by paths other than W_hh (GRU's z gate; an inactive row's
  // dh passing through). Zero for the other cells without lengths: then no buffer.
  const bool has_direct_path = Cell::kReadsPrevHidden || v.lengths != nullptr;
  Tensor dh_direct = has_direct_path ? at::empty({B, P}, grad_output.options()) : Tensor();
  Tensor dh_unprojected = projecting ? at::empty({B, H}, grad_output.options()) : Tensor();
  using Product = RecurrentProduct<T>;
  // dh_prev = dh_direct + dgate_h W_hh  [B, G] x [G, P]
  const Product recurrent_back(w_hh.t(), Tensor(), v.product_rows, v.T_,
                               v.gate_packed ? Product::Packed::Input : Product::Packed::None,
                               v.unit_hidden);
  // dh_unprojected = dprojected W_hr  [B, P] x [P, H]
  const Product projection_back(projecting ? w_hr.t() : Tensor(), Tensor(), v.product_rows,
                                v.T_);

  // grad_output [T, B, P]: contiguous rows at any strides over t and b (see prepare_backward);
  // contiguous in the gate-packed view, whose one row per step spans all batch rows.
  const T* go_data = grad_output.data_ptr<T>();
  const int64_t go_step = grad_output.stride(0), go_batch = grad_output.stride(1);
  const auto grad_output_row = [&](int64_t t, int64_t b) {
    return go_data + t * go_step + b * go_batch;
  };
  // Zero initial states read as a zero row.
  const bool zero_initial_state = !hx.defined();
  Tensor zero_row = zero_initial_state ? at::zeros({std::max(P, H)}, grad_output.options())
                                       : Tensor();
  const T* hx_data = zero_initial_state ? nullptr : hx.data_ptr<T>();
  const T* cx_data = Cell::kHasCellState && !zero_initial_state ? cx.data_ptr<T>() : nullptr;
  const T* zero_data = zero_initial_state ? zero_row.data_ptr<T>() : nullptr;
  const T* out_data = output.data_ptr<T>();
  const T* ws_data = W > 0 ? workspace.data_ptr<T>() : nullptr;
  T* dh_data = dh_state.data_ptr<T>();
  A* dc_data = Cell::kHasCellState ? dc_state.data_ptr<A>() : nullptr;
  T* dgx_data = dgate_x.data_ptr<T>();
  T* step_dgh_data = Cell::kSeparateHiddenGateGrad ? step_dgate_h.data_ptr<T>() : nullptr;
  T* dgh_data = Cell::kSeparateHiddenGateGrad ? dgate_h.data_ptr<T>() : nullptr;
  T* dhd_data = has_direct_path ? dh_direct.data_ptr<T>() : nullptr;
  T* dp_data = projecting ? dprojected.data_ptr<T>() : nullptr;
  T* dhu_data = projecting ? dh_unprojected.data_ptr<T>() : nullptr;
  double* sums_data = column_sums.defined() ? column_sums.data_ptr<double>() : nullptr;

  // The reverse loop: pass i is step T - 1 - i.
  const auto projection_step = [&](int64_t pass, int64_t b_begin, int64_t b_end) {
    if (!projecting) return;
    // dLoss/dh (projected) of this step, then back through W_hr.
    const int64_t t = v.step_time(v.T_ - 1 - pass);
    for (int64_t b = b_begin; b < b_end; ++b) {
      T* dp_row = dp_data + (t * B + b) * P;
      if (!v.active(t, b)) {
        std::fill(dp_row, dp_row + P, T(0));
        continue;
      }
      const T* go_row = grad_output_row(t, b);
      for (const auto k : c10::irange(P)) {
        dp_row[k] = T(A(go_row[k]) + A(dh_data[b * P + k]));
      }
    }
    projection_back.run(dp_data + (t * B + b_begin) * P, v.rows_of_products(b_begin, b_end),
                        dhu_data + b_begin * H);
  };
  const auto pointwise_step = [&](int64_t pass, int64_t b_begin, int64_t b_end) {
    const int64_t t = v.step_time(v.T_ - 1 - pass);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t row = t * B + b;
      T* dgx_row = dgx_data + row * G;
      T* dgh_row = step_dgh_data ? step_dgh_data + b * G : nullptr;
      T* dhd_row = has_direct_path ? dhd_data + b * P : nullptr;
      if (!v.active(t, b)) {
        // The row's state passes through this step untouched.
        std::fill(dgx_row, dgx_row + G, T(0));
        if (Cell::kSeparateHiddenGateGrad) {
          std::fill(dgh_row, dgh_row + G, T(0));
          std::fill(dgh_data + row * Gh, dgh_data + (row + 1) * Gh, T(0));
        }
        std::copy(dh_data + b * P, dh_data + (b + 1) * P, dhd_row);
        continue;
      }
      const bool first = v.is_first_step(t, b);
      const int64_t prev_row = v.previous_time(t) * B + b;
      const T* go_row = grad_output_row(t, b);
      const T* saved_row = W > 0 ? ws_data + row * W : out_data + row * P;
      const T* h_prev_row = !first ? out_data + prev_row * P
                            : zero_initial_state ? zero_data : hx_data + b * P;
      // LSTM's c_prev: cx, or the c saved by the previous step (after i, f, g, o).
      const T* c_prev_row = nullptr;
      if (Cell::kHasCellState) {
        c_prev_row = !first ? ws_data + prev_row * W + 4 * H
                     : zero_initial_state ? zero_data : cx_data + b * H;
      }
      if (projecting && dhd_row) std::fill(dhd_row, dhd_row + P, T(0));
      A* dc_row = dc_data ? dc_data + b * H : nullptr;
      const T* dh_row = dh_data + b * P;
      const T* dhu_row = projecting ? dhu_data + b * H : nullptr;
      for_unit_runs<T>(H, [&](auto j, auto zero) {
        using V = decltype(zero);
        const V dh = projecting ? load<V>(dhu_row, 0, j)
                                : load<V>(go_row, 0, j) + load<V>(dh_row, 0, j);
        const V dc = dc_row ? load<V>(dc_row, 0, j) : zero;
        const V h_prev = Cell::kReadsPrevHidden ? load<V>(h_prev_row, 0, j) : zero;
        const V c_prev = c_prev_row ? load<V>(c_prev_row, 0, j) : zero;
        V dc_prev = zero, dh_prev_direct = zero;
        Cell::backward(static_cast<int>(H), j, saved_row, h_prev, c_prev, dh, dc, dgx_row,
                       dgh_row, dc_prev, dh_prev_direct);
        if (dc_row) store(dc_row, 0, j, dc_prev);
        if (!projecting && dhd_row) store(dhd_row, 0, j, dh_prev_direct);
      });
      if (sums_data) {
        // The row's gate gradients, just written (in L1), into the row's own sums: each sum
        // runs over the steps in order whichever thread runs the row.
        double* sums = sums_data + b * G;
        for (int64_t n = 0; n < G; ++n) sums[n] += double(dgx_row[n]);
      }
      // The last gate's columns, also in the gate-packed view (there one row holds the gate's
      // units of all batch rows, in dgate_h's order).
      if (Cell::kSeparateHiddenGateGrad) {
        std::copy(dgh_row + G - Gh, dgh_row + G, dgh_data + row * Gh);
      }
    }
  };
  const bool products_skip_ended_rows = recurrent_back.runs_any_rows();
  const auto recurrent_step = [&](int64_t pass, int64_t b_begin, int64_t b_end) {
    // dh_prev = dh_direct + dgate_h[t] W_hh. After the last step (every row's first) it is
    // the gradient of hx alone, not needed without one.
    const int64_t step = v.T_ - 1 - pass;
    if (zero_initial_state && step == 0) return;
    const int64_t t = v.step_time(step);
    const T* dgate_step = Cell::kSeparateHiddenGateGrad ? step_dgh_data : dgx_data + t * B * G;
    if (has_direct_path) {
      // A row that has ended passes dh through (dh_direct is dh, its gate gradients are zero):
      // where the rows go by length, those rows skip the product.
      const int64_t end =
          products_skip_ended_rows ? v.active_end(t, b_begin, b_end) : b_end;
      if (end == b_begin) return;
      recurrent_back.run_accumulate(dgate_step + b_begin * G, v.rows_of_products(b_begin, end),
                                    dhd_data + b_begin * P, dh_data + b_begin * P);
    } else {
      recurrent_back.run(dgate_step + b_begin * G, v.rows_of_products(b_begin, b_end),
                         dh_data + b_begin * P);
    }
  };
  run_steps(B, 0, v.T_, step_threads(B, v.T_, G, P, H, recurrent_back), projection_step,
            pointwise_step, recurrent_step);
}

// A weight gradient C [M, N] = A^T B from the K rows of all steps, A [K, M] and B [K, N] with
// contiguous rows. Where K is long next to C, MKL runs C^T = B^T A into a buffer faster, and C
// is its transpose: measured 1.5x for the fashion-MNIST LSTM's [120, 28] and [120, 30] from 3584
// rows (no gain from 20 rows, nor for outputs of 10^5 values and more).
bool runs_transposed(const Tensor& out, const Tensor& a, const Tensor& b, bool accumulate) {
  const int64_t M = out.size(0), N = out.size(1), K = a.size(1);
  return !accumulate && out.scalar_type() == at::kFloat && out.is_contiguous() && M > 1 &&
         N > 1 && a.stride(0) == 1 && b.stride(1) == 1 && M * N <= 2 * K;
}

void cpu_matmul(Tensor& out, const Tensor& a, const Tensor& b, bool accumulate) {
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "rnnfast_matmul",
                                  [&] {
    gemm<scalar_t>(out.size(0), out.size(1), a.size(1), matrix_ref<scalar_t>(a),
                   matrix_ref<scalar_t>(b), scalar_t(accumulate ? 1 : 0),
                   out.data_ptr<scalar_t>(), out.size(1), GemmThreads::FixedBlocks);
  });
}

void cpu_column_sum(Tensor& out, const Tensor& x) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(),
                                  "rnnfast_column_sum", [&] {
    // In double, row by row: torch.nn's accuracy over millions of rows, in one order.
    const int64_t rows = x.size(0), cols = x.size(1);
    std::vector<double> sum(cols, 0.0);
    const scalar_t* data = x.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* row = data + r * cols;
      for (int64_t c = 0; c < cols; ++c) sum[c] += double(row[c]);
    }
    std::copy(sum.begin(), sum.end(), out.data_ptr<scalar_t>());
  });
}

const GradientKernels kCpuGradientKernels{&cpu_matmul, &cpu_column_sum};


#if defined(CPU_CAPABILITY_AVX512)
// The reverse pass of a float layer whose state fits in vector registers (register_layer.h):
// the gradients of the weights and biases are summed in the loop, not by GEMMs after it.
BackwardResult backward_in_registers(const LayerSizes& s, const BackwardInputs& in,
                                     const std::optional<Tensor>& grad_h_n,
                                     const std::optional<Tensor>& grad_c_n, bool reverse,
                                     bool has_bias, bool input_grad) {
  const auto options = in.input.options();
  auto [dh, dc] = final_state_gradients(s, in.input, grad_h_n, grad_c_n);
  const int64_t G = s.gate_size;
  Tensor grad_input = at::empty(input_grad ? at::IntArrayRef{s.steps, s.batch, s.input_size}
                                           : at::IntArrayRef{0}, options);
  Tensor grad_w_ih = at::empty({G, s.input_size}, options);
  Tensor grad_w_hh = at::empty({G, s.hidden_size}, options);
  Tensor grad_b_ih = at::empty({has_bias ? G : 0}, options);
  Tensor grad_b_hh = at::empty({has_bias ? G : 0}, options);
  const auto data = data_or_null<float>;
  // Read at its strides where a step's offsets fit the gather's, else a contiguous copy.
  const Tensor& given = in.grad_output;
  const Tensor grad_output =
      register_layer::StridedSteps::fits(s.batch, s.hidden_size, given.stride(1), given.stride(2))
          ? given
          : given.contiguous();
  const register_layer::StridedSteps grad_output_steps = strided_steps(grad_output);
  dispatch_cell(s.kind, [&](auto cell_type) {
    using Cell = decltype(cell_type);
    register_layer::backward<Cell>(
        register_layer_sizes(s, reverse), strided_steps(in.input), grad_output_steps,
        data(in.output),
        Cell::kSavedPerUnit > 0 ? data(in.workspace) : nullptr, data(in.hx), data(in.cx),
        data(in.w_ih), data(in.w_hh), data(dh), data(dc),
        input_grad ? data(grad_input) : nullptr, data(grad_w_ih), data(grad_w_hh),
        has_bias ? data(grad_b_ih) : nullptr, has_bias ? data(grad_b_hh) : nullptr);
  });
  Tensor grad_hx = in.hx.defined() ? dh : at::empty({0}, options);
  Tensor grad_cx = in.cx.defined() ? dc : at::empty({0}, options);
  return {grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh,
          at::empty({0}, options)};
}
#endif

// Whether GRU's dLoss/dhg [T, B, G] keeps only its last gate's columns (r and z equal dgate_x's,
// which finish_backward reads instead): a third of the memory, for one more weight-gradient
// GEMM (measured 1-3% of a training step of the course's GRUs). All gates are kept only where
// the extra columns are small next to the weight gradients the call returns anyway (an eighth
// of them), so that the peak memory of a step hardly moves. The gate-packed view keeps the
// last gate only: its order is the rows' order, where all gates would need regrouping.
bool keeps_last_hidden_gate_only(const LayerSizes& s, at::ScalarType type) {
  const int64_t extra_values = s.steps * s.batch * (s.gate_size - s.hidden_size);
  const int64_t weight_gradient_values = s.gate_size * (s.input_size + s.state_size);
  return 8 * extra_values > weight_gradient_values || uses_gate_packing(s, type);
}

// The backward op on time-major tensors (registered as backward_op<backward_time_major>).
BackwardResult backward_time_major(
    c10::string_view cell, const Tensor& grad_output_, const std::optional<Tensor>& grad_h_n_,
    const std::optional<Tensor>& grad_c_n_, const Tensor& input_,
    const std::optional<Tensor>& hx_,
    const std::optional<Tensor>& cx_, const Tensor& w_ih_, const Tensor& w_hh_, bool has_bias,
    const std::optional<Tensor>& w_hr_, const std::optional<Tensor>& lengths_, bool reverse,
    const Tensor& output_, const Tensor& workspace_, bool input_grad) {
  const BackwardInputs in =
      prepare_backward(std::string(cell), grad_output_, grad_h_n_, grad_c_n_, input_, hx_, cx_,
                       w_ih_, w_hh_, w_hr_, lengths_, output_, workspace_,
                       /*contiguous_grad_output=*/false, register_layer_reads_input_backward);
  const LayerSizes& s = in.sizes;
  const Tensor &input = in.input, &hx = in.hx, &cx = in.cx, &w_ih = in.w_ih, &w_hh = in.w_hh;
  const Tensor &w_hr = in.w_hr, &lengths = in.lengths;
  const Tensor &output = in.output, &workspace = in.workspace;
  const int64_t ws_cols = workspace_width(s.kind, s.hidden_size, s.has_projection);
#if defined(CPU_CAPABILITY_AVX512)
  if (register_layer_reads_input_backward(s, input)) {
    return backward_in_registers(s, in, grad_h_n_, grad_c_n_, reverse, has_bias, input_grad);
  }
#endif
  // The reverse loop reads rows of grad_output at their strides; the gate-packed view reads a
  // step's rows as one: contiguous.
  const Tensor grad_output = uses_gate_packing(s, input.scalar_type())
                                 ? in.grad_output.contiguous()
                                 : with_contiguous_rows(in.grad_output);
  // An Elman layer's gate gradient of a step and row takes the place of its output gradient
  // (read just before, same size): where grad_output is this call's own contiguous copy, the
  // reverse loop writes dgate_x over it instead of into a buffer of its own.
  const bool owns_grad_output = !grad_output.is_same(grad_output_) && grad_output.is_contiguous();
  const bool gate_grad_over_output_grad =
      owns_grad_output && s.gate_size == s.state_size && !s.has_projection &&
      dispatch_cell(s.kind, [](auto cell) { return decltype(cell)::kGates == 1; });
  BackwardState state = make_backward_state(s, input, grad_h_n_, grad_c_n_,
                                            gate_grad_over_output_grad ? grad_output : Tensor(),
                                            keeps_last_hidden_gate_only(s, input.scalar_type()));
  dispatch_cell(s.kind, [&](auto cell_type) {
    using Cell = decltype(cell_type);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(),
                                    "rnnfast_backward_cpu", [&] {
      const auto v = make_view<scalar_t>(s, ws_cols, reverse, lengths);
      // The bias gradient summed in the reverse loop, a pass over dgate_x fewer, where that
      // pass is long enough to cost more than the sums' buffer and their reduction. Each batch
      // row's sums over the steps in double, then the rows' in order: torch.nn's accuracy over
      // millions of rows, and the same sums on any number of threads.
      constexpr int64_t kLoopSumsMinValues = 1 << 16;
      const bool sums_in_loop = has_bias && !v.gate_packed &&
                                s.steps * s.batch * s.gate_size >= kLoopSumsMinValues;
      Tensor row_sums = sums_in_loop ? at::zeros({s.batch, s.gate_size},
                                                 input.options().dtype(at::kDouble))
                                     : Tensor();
      run_backward<Cell, scalar_t>(v, grad_output, hx, cx, w_hh, w_hr, output, workspace,
                                   state.dh, state.dc, state.dgate_x, state.dgate_h,
                                   state.dprojected, row_sums);
      if (sums_in_loop) {
        // [1, G]: the rows' sums added in row order.
        state.dgate_x_column_sums = at::empty({1, s.gate_size}, row_sums.options());
        double* total = state.dgate_x_column_sums.data_ptr<double>();
        const double* rows = row_sums.data_ptr<double>();
        std::copy(rows, rows + s.gate_size, total);
        for (int64_t b = 1; b < s.batch; ++b) {
          for (int64_t n = 0; n < s.gate_size; ++n) total[n] += rows[b * s.gate_size + n];
        }
      }
      if (v.gate_packed && Cell::kGates > 1) {
        // (A separate dgate_h holds one gate, whose packed order is already the rows' order.)
        state.dgate_x = regroup_gates<scalar_t>(state.dgate_x, Cell::kGates, false);
        if (!state.separate_hidden_gate_grad) state.dgate_h = state.dgate_x;
      }
    });
  });
  return finish_backward(s, state, input, hx, cx, w_ih, output, workspace, lengths, reverse,
                         has_bias, input_grad, kCpuGradientKernels);
}

}  // namespace

at::Tensor engine_input(const at::Tensor& input, const at::Tensor& w_hh, bool has_lengths,
                        bool has_projection) {
  // w_hh [G, P]: P is H where there is no projection (with one there is no register layer).
  if (input.device().is_cpu() && w_hh.dim() == 2 &&
      register_layer_reads(input, w_hh.size(1), has_lengths, has_projection)) {
    return input;
  }
  return time_major_contiguous(input);
}

}  // namespace rnnfast

TORCH_LIBRARY_IMPL(rnnfast, CPU, m) {
  m.impl("forward", &rnnfast::forward_cpu);
  m.impl("backward", &rnnfast::backward_op<rnnfast::backward_time_major>);
}
