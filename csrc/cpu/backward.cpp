// The CPU engine's backward (engine.h): the reverse loop and its kernels; the weight gradients
// after it are weight_gradients.cpp's.
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
#include "gate_panels.h"
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
namespace {

// hx, cx: undefined where the forward started from zero states. column_sums: [B, G] double
// zeros, into whose row b the reverse loop adds row b's dgate_x of every step (not in the
// gate-packed view, whose rows are not the gates' columns); or undefined.
// dgate_x [T, B, G] and dgate_h [T, B, Gh] have contiguous rows at any row stride (columns of
// the workspace, where it was handed over); packed_gate_rows: they are a packed workspace's
// columns, [N, G] and [N, Gh] with the rows active at each step only (LayerView::saved_row).
template <typename Cell, typename T>
void run_backward(const LayerView<T>& v, const Tensor& grad_output, const Tensor& hx,
                  const Tensor& cx, const Tensor& w_hh, const Tensor& w_hr, const Tensor& output,
                  const Tensor& workspace, Tensor& dh_state, Tensor& dc_state, Tensor& dgate_x,
                  Tensor& dgate_h, Tensor& dprojected, Tensor& column_sums, bool packed_gate_rows,
                  bool state_grad) {
  using A = at::opmath_type<T>;
  const int64_t B = v.B, H = v.H, P = v.P, G = v.G, W = v.W;
  const bool projecting = w_hr.defined();
  // (The gate-packed view's one row per step spans all batch rows.)
  const int64_t dgx_stride = v.gate_packed ? G : dgate_x.stride(-2);
  const auto gate_row = [&](int64_t t, int64_t b) {
    return packed_gate_rows ? v.saved_row(t, b) : t * B + b;
  };
  // The recurrent product reads a step's gate gradients as [B, G]: where dgate_x's rows are not
  // that (columns of the workspace), an LSTM's are copied into step_dgate_x for it.
  const bool copies_step_gates =
      !Cell::kSeparateHiddenGateGrad && (packed_gate_rows || dgx_stride != G);
  Tensor step_dgate_x = copies_step_gates ? at::empty({B, G}, grad_output.options()) : Tensor();
  T* step_dgx_data = copies_step_gates ? step_dgate_x.data_ptr<T>() : nullptr;
  // A cell with its own dLoss/dhg (GRU) writes a step's into step_dgate_h [B, G], which the
  // recurrent product reads; dgate_h [T, B, Gh] keeps its last Gh columns of every step (all
  // G, or the last gate's H: the gates before it are dgate_x's), for the weight gradients.
  Tensor step_dgate_h =
      Cell::kSeparateHiddenGateGrad ? at::empty({B, G}, grad_output.options()) : Tensor();
  // In the view's units (the gate-packed view's rows span the batch): G, or the last gate's H.
  const int64_t Gh = Cell::kSeparateHiddenGateGrad && dgate_h.size(-1) < dgate_x.size(-1) ? H : G;
  const int64_t dgh_stride = !Cell::kSeparateHiddenGateGrad ? 0
                             : v.gate_packed                ? Gh
                                                            : dgate_h.stride(-2);
  // dh_direct [B, P]: dLoss/dh_prev by paths other than W_hh (GRU's z gate; an inactive row's
  // dh passing through). Zero for the other cells without lengths: then no buffer.
  const bool has_direct_path = Cell::kReadsPrevHidden || v.lengths != nullptr;
  Tensor dh_direct = has_direct_path ? at::empty({B, P}, grad_output.options()) : Tensor();
  Tensor dh_unprojected = projecting ? at::empty({B, H}, grad_output.options()) : Tensor();
  using Product = RecurrentProduct<T>;
  // Zero initial states read as a zero row.
  const bool zero_initial_state = !hx.defined();
  // dh_prev = dh_direct + dgate_h W_hh  [B, G] x [G, P]. In a call of one step without hx's
  // gradient (recurrent_step skips step 0's product) a product of no terms ([P, 0]), which
  // copies nothing, as the forward's (run_forward).
  const bool multiplies = v.T_ > 1 || (!zero_initial_state && state_grad);
  const Product recurrent_back(
      multiplies ? w_hh.t() : w_hh.t().narrow(1, 0, 0), Tensor(), v.product_rows, v.T_,
      v.gate_packed ? Product::Packed::Input : Product::Packed::None, v.unit_hidden);
  // dh_unprojected = dprojected W_hr  [B, P] x [P, H]
  const Product projection_back(projecting ? w_hr.t() : Tensor(), Tensor(), v.product_rows, v.T_);

  // grad_output [T, B, P]: contiguous rows at any strides over t and b (see prepare_backward);
  // contiguous in the gate-packed view, whose one row per step spans all batch rows.
  const T* go_data = grad_output.data_ptr<T>();
  const int64_t go_step = grad_output.stride(0), go_batch = grad_output.stride(1);
  const auto grad_output_row = [&](int64_t t, int64_t b) {
    return go_data + t * go_step + b * go_batch;
  };
  Tensor zero_row =
      zero_initial_state ? zeros_by_memset({std::max(P, H)}, grad_output.options()) : Tensor();
  const T* hx_data = zero_initial_state ? nullptr : hx.data_ptr<T>();
  const T* cx_data = Cell::kHasCellState && !zero_initial_state ? cx.data_ptr<T>() : nullptr;
  const T* zero_data = zero_initial_state ? zero_row.data_ptr<T>() : nullptr;
  // output [T, B, P]: rows at one stride (prepare_backward's strided_output_rows).
  const T* out_data = output.data_ptr<T>();
  const int64_t out_stride = v.gate_packed ? P : strided_rows_stride(output);
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
      const bool active = v.active(t, b);
      // Packed gate gradients have no rows for the rows that have ended.
      const bool has_gate_row = active || !packed_gate_rows;
      T* dgx_row = has_gate_row ? dgx_data + gate_row(t, b) * dgx_stride : nullptr;
      T* dgh_saved_row = Cell::kSeparateHiddenGateGrad && has_gate_row
                             ? dgh_data + gate_row(t, b) * dgh_stride
                             : nullptr;
      T* step_dgx_row = copies_step_gates ? step_dgx_data + b * G : nullptr;
      T* dgh_row = step_dgh_data ? step_dgh_data + b * G : nullptr;
      T* dhd_row = has_direct_path ? dhd_data + b * P : nullptr;
      if (!active) {
        // The row's state passes through this step untouched.
        if (dgx_row) std::fill(dgx_row, dgx_row + G, T(0));
        if (step_dgx_row) std::fill(step_dgx_row, step_dgx_row + G, T(0));
        if (Cell::kSeparateHiddenGateGrad) {
          std::fill(dgh_row, dgh_row + G, T(0));
          if (dgh_saved_row) std::fill(dgh_saved_row, dgh_saved_row + Gh, T(0));
        }
        std::copy(dh_data + b * P, dh_data + (b + 1) * P, dhd_row);
        continue;
      }
      const bool first = v.is_first_step(t, b);
      const int64_t prev_time = v.previous_time(t), prev_row = prev_time * B + b;
      const T* go_row = grad_output_row(t, b);
      const T* saved_row = W > 0 ? ws_data + v.saved_row(t, b) * W : out_data + row * out_stride;
      const T* h_prev_row = !first               ? out_data + prev_row * out_stride
                            : zero_initial_state ? zero_data
                                                 : hx_data + b * P;
      // LSTM's c_prev: cx, or the c saved by the previous step (after i, f, g, o).
      const T* c_prev_row = nullptr;
      if (Cell::kHasCellState) {
        // (A row active at step t that did not start there was active at the step before.)
        c_prev_row = !first               ? ws_data + v.saved_row(prev_time, b) * W + 4 * H
                     : zero_initial_state ? zero_data
                                          : cx_data + b * H;
      }
      if (projecting && dhd_row) std::fill(dhd_row, dhd_row + P, T(0));
      A* dc_row = dc_data ? dc_data + b * H : nullptr;
      const T* dh_row = dh_data + b * P;
      const T* dhu_row = projecting ? dhu_data + b * H : nullptr;
      for_unit_runs<T>(H, [&](auto j, auto zero) {
        using V = decltype(zero);
        const V dh =
            projecting ? load<V>(dhu_row, 0, j) : load<V>(go_row, 0, j) + load<V>(dh_row, 0, j);
        const V dc = dc_row ? load<V>(dc_row, 0, j) : zero;
        const V h_prev = Cell::kReadsPrevHidden ? load<V>(h_prev_row, 0, j) : zero;
        const V c_prev = c_prev_row ? load<V>(c_prev_row, 0, j) : zero;
        V dc_prev = zero, dh_prev_direct = zero;
        Cell::backward(static_cast<int>(H), j, saved_row, h_prev, c_prev, dh, dc, dgx_row, dgh_row,
                       dc_prev, dh_prev_direct);
        if (dc_row) store(dc_row, 0, j, dc_prev);
        if (!projecting && dhd_row) store(dhd_row, 0, j, dh_prev_direct);
      });
      if (step_dgx_row) std::copy(dgx_row, dgx_row + G, step_dgx_row);
      if (sums_data) {
        // The row's gate gradients, just written (in L1), into the row's own sums: each sum
        // runs over the steps in order whichever thread runs the row.
        double* sums = sums_data + b * G;
        for (int64_t n = 0; n < G; ++n) sums[n] += double(dgx_row[n]);
      }
      // The last gate's columns, also in the gate-packed view (there one row holds the gate's
      // units of all batch rows, in dgate_h's order).
      if (Cell::kSeparateHiddenGateGrad) {
        std::copy(dgh_row + G - Gh, dgh_row + G, dgh_saved_row);
      }
    }
  };
  const bool products_skip_ended_rows = recurrent_back.runs_any_rows();
  // Where the forward's product runs in gate panels, so does this one (backward_panels):
  // dh_prev = the panels' product, then + dh_direct; in tiles whose sums do not depend on a
  // thread's share of the rows where the schedule may run rows per thread (splits_panel_terms).
  const std::optional<GatePanels<T>> back_panels =
      !projecting && !v.gate_packed ? backward_panels<T>(w_hh, v.product_rows, v.T_) : std::nullopt;
  const bool split_terms = splits_panel_terms<T>(B);
  const auto recurrent_step = [&](int64_t pass, int64_t b_begin, int64_t b_end) {
    // dh_prev = dh_direct + dgate_h[t] W_hh. After the last step (every row's first) it is
    // the gradient of hx alone, not needed without one or where it is not wanted.
    const int64_t step = v.T_ - 1 - pass;
    if ((zero_initial_state || !state_grad) && step == 0) return;
    const int64_t t = v.step_time(step);
    const T* dgate_step = Cell::kSeparateHiddenGateGrad ? step_dgh_data
                          : copies_step_gates           ? step_dgx_data
                                                        : dgx_data + t * B * G;
    if (has_direct_path) {
      // A row that has ended passes dh through (dh_direct is dh, its gate gradients are zero):
      // where the rows go by length, those rows skip the product.
      const int64_t end = products_skip_ended_rows ? v.active_end(t, b_begin, b_end) : b_end;
      if (end == b_begin) return;
      if (back_panels) {
        back_panels->template product<kBackwardPanelGates>(
            dgate_step + b_begin * G, end - b_begin, dh_data + b_begin * P, P, pass, split_terms);
        for (int64_t n = b_begin * P; n < end * P; ++n) dh_data[n] += dhd_data[n];
        return;
      }
      recurrent_back.run_accumulate(dgate_step + b_begin * G, v.rows_of_products(b_begin, end),
                                    dhd_data + b_begin * P, dh_data + b_begin * P);
    } else if (back_panels) {
      back_panels->template product<kBackwardPanelGates>(
          dgate_step + b_begin * G, b_end - b_begin, dh_data + b_begin * P, P, pass, split_terms);
    } else {
      recurrent_back.run(dgate_step + b_begin * G, v.rows_of_products(b_begin, b_end),
                         dh_data + b_begin * P);
    }
  };
  const StepThreads threads =
      backward_step_threads(B, v.T_, G, P, H, recurrent_back, back_panels && !split_terms);
  run_steps(B, 0, v.T_, threads, projection_step, pointwise_step, recurrent_step);
}

#if defined(RNNFAST_LANE_KERNELS)
// The reverse pass of a float layer whose state fits in vector registers (register_layer.h):
// the gradients of the weights and biases are summed in the loop, not by GEMMs after it.
BackwardResult backward_in_registers(const LayerSizes& s, const BackwardInputs& in,
                                     const BackwardArgs& args) {
  const bool reverse = args.layer.reverse, has_bias = args.has_bias, input_grad = args.input_grad;
  const auto options = in.input.options();
  auto [dh, dc] = final_state_gradients(s, args);
  const int64_t G = s.gate_size;
  Tensor grad_input = at::empty(
      input_grad ? at::IntArrayRef{s.steps, s.batch, s.input_size} : at::IntArrayRef{0}, options);
  Tensor grad_w_ih = at::empty({G, s.input_size}, options);
  Tensor grad_w_hh = at::empty({G, s.hidden_size}, options);
  Tensor grad_b_ih = at::empty({has_bias ? G : 0}, options);
  Tensor grad_b_hh = at::empty({has_bias ? G : 0}, options);
  const auto data = data_or_null<float>;
  const Tensor output = in.output.contiguous();
  // Read at its strides where a step's offsets fit the gather's, else a contiguous copy.
  const Tensor& given = in.grad_output;
  const Tensor grad_output =
      register_layer::StridedSteps::fits(s.batch, s.hidden_size, given.stride(1), given.stride(2))
          ? given
          : given.contiguous();
  const register_layer::StridedSteps grad_output_steps = strided_steps(grad_output);
  dispatch_cell(s.kind, [&](auto cell_type) {
    using Cell = decltype(cell_type);
    register_layer::with_narrowest_lanes(
        s.batch * s.hidden_size, s.batch * s.input_size, [&](auto lanes_type) {
          register_layer::backward<Cell, decltype(lanes_type)>(
              register_layer_sizes(s, reverse), strided_steps(in.input), grad_output_steps,
              data(output), Cell::kSavedPerUnit > 0 ? data(in.workspace) : nullptr, data(in.hx),
              data(in.cx), data(in.w_ih), data(in.w_hh), data(dh), data(dc),
              input_grad ? data(grad_input) : nullptr, data(grad_w_ih), data(grad_w_hh),
              has_bias ? data(grad_b_ih) : nullptr, has_bias ? data(grad_b_hh) : nullptr);
        });
  });
  Tensor grad_hx = in.hx.defined() ? dh : at::empty({0}, options);
  Tensor grad_cx = in.cx.defined() ? dc : at::empty({0}, options);
  return {grad_input, grad_hx,   grad_cx,   grad_w_ih,
          grad_w_hh,  grad_b_ih, grad_b_hh, at::empty({0}, options)};
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

// total[i] += block[i] in double, for a bfloat16 or float16 block (total.add_(block) would
// first make a double copy of the block, as large as total).
void add_in_double(Tensor& total, const Tensor& block) {
  AT_DISPATCH_REDUCED_FLOATING_TYPES(block.scalar_type(), "rnnfast_add_in_double", [&] {
    const scalar_t* from = block.const_data_ptr<scalar_t>();
    double* to = total.data_ptr<double>();
    at::parallel_for(0, total.numel(), int64_t(1) << 14, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) to[i] += static_cast<double>(from[i]);
    });
  });
}

// Packed rows [N, K] gathered a chunk at a time from rows of a padded [T, B, K] layout, and
// the product over them: out (+)= a[N, M]^T rows[N, K] in chunks of packed rows, a GEMM per
// chunk. row_of(t, b) gives the source row of step t's active row b (nullptr: a zero row).
template <typename RowOf>
void accumulate_over_packed_rows(Tensor& out, const Tensor& a, int64_t K,
                                 const std::vector<int64_t>& rows_before,
                                 const std::vector<int64_t>& active, const RowOf& row_of,
                                 const at::TensorOptions& options) {
  // A bounded buffer: a chunk's GEMM is long enough to run at the rate of one over all rows.
  constexpr int64_t kChunkBytes = int64_t(2) << 20;
  const int64_t element = int64_t(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  const int64_t rows = a.size(0), row_bytes = K * element;
  int64_t chunk =
      std::max<int64_t>(1, std::min(rows, kChunkBytes / std::max<int64_t>(1, row_bytes)));
  // bfloat16 and float16: each chunk's product is rounded once, and the chunks are added in
  // double (as the engine's products over more rows than a block add their blocks), in a
  // total four times out's size. Where all rows gathered at once take no more memory than
  // that total, they are one chunk, whose product goes straight into out (the seq2seq
  // encoder's bfloat16 training step peaked at 2.1 times torch.nn's with the total and its
  // double copy of each chunk's product).
  const bool reduced = options.dtype() != at::kFloat && options.dtype() != at::kDouble;
  if (reduced && rows * row_bytes <= out.numel() * int64_t(sizeof(double))) {
    chunk = std::max<int64_t>(1, rows);
  }
  const bool in_chunks = reduced && chunk < rows;
  Tensor gathered = pooled_empty({chunk, K}, options);
  char* to = static_cast<char*>(gathered.data_ptr());
  Tensor total = in_chunks ? at::zeros(out.sizes(), options.dtype(at::kDouble)) : Tensor();
  Tensor block = in_chunks ? at::empty(out.sizes(), options) : Tensor();
  int64_t first = 0, filled = 0;
  bool written = false;
  const auto flush = [&] {
    if (filled == 0) return;
    const Tensor rows = a.narrow(0, first, filled).t(), values = gathered.narrow(0, 0, filled);
    if (in_chunks) {
      kCpuGradientKernels.matmul(block, rows, values, /*accumulate=*/false);
      add_in_double(total, block);
    } else {
      kCpuGradientKernels.matmul(out, rows, values, /*accumulate=*/written);
    }
    written = true;
    first += filled;
    filled = 0;
  };
  for (size_t t = 0; t < rows_before.size(); ++t) {
    for (int64_t b = 0; b < active[t]; ++b) {
      const char* from = static_cast<const char*>(row_of(int64_t(t), b));
      char* row = to + filled * row_bytes;
      if (from) {
        std::memcpy(row, from, row_bytes);
      } else {
        std::memset(row, 0, row_bytes);
      }
      if (++filled == chunk) flush();
    }
  }
  flush();
  if (in_chunks) {
    out.copy_(total);
  } else if (!written) {
    out.zero_();
  }
}

// finish_backward for gate gradients over a packed workspace: dgate_x [N, G] and GRU's
// dgate_h [N, H] hold the rows active at each step only (rows_before: the rows before each
// step), at the workspace's row stride. The input's gradient comes back padded [T, B, I] (zero
// where a row has ended); the weight gradients are products over the packed rows, with the
// input's rows and h_prev's (the output of the step before, hx or zero at a row's first step)
// gathered a chunk at a time. The bias gradient was summed in the reverse loop.
BackwardResult finish_packed_backward(const LayerSizes& s, BackwardState& state,
                                      const std::vector<int64_t>& rows_before, const Tensor& input,
                                      const Tensor& hx, const Tensor& cx, const Tensor& w_ih,
                                      const Tensor& output, const Tensor& lengths, bool reverse,
                                      bool has_bias, bool input_grad) {
  TORCH_INTERNAL_ASSERT(!s.has_projection && state.dgate_x_column_sums.defined() == has_bias);
  const int64_t T_ = s.steps, B = s.batch, G = s.gate_size, I = s.input_size, P = s.state_size;
  const auto options = input.options();
  const int64_t element = int64_t(input.element_size());
  const int64_t N = state.dgate_x.size(0);
  std::vector<int64_t> active(T_);
  for (int64_t t = 0; t < T_; ++t) {
    active[t] = (t + 1 < T_ ? rows_before[t + 1] : N) - rows_before[t];
  }
  if (!hx.defined()) state.dh = Tensor();
  if (!cx.defined()) state.dc = Tensor();
  const Tensor& dgx = state.dgate_x;  // [N, G]

  // The input's gradient: the packed rows' product into its first N rows, then each step's
  // rows to their place, the last step first (a row's place is never before its packed row,
  // nor within a step still to move), the ended rows' zeroed.
  Tensor grad_input = at::empty({0}, options);
  if (input_grad) {
    grad_input = pooled_empty({T_ * B, I}, options);
    Tensor packed = grad_input.narrow(0, 0, N);
    kCpuGradientKernels.matmul(packed, dgx, w_ih, /*accumulate=*/false);
    char* data = static_cast<char*>(grad_input.data_ptr());
    const int64_t row_bytes = I * element;
    for (int64_t t = T_ - 1; t >= 0; --t) {
      char* place = data + t * B * row_bytes;
      std::memmove(place, data + rows_before[t] * row_bytes, active[t] * row_bytes);
      std::memset(place + active[t] * row_bytes, 0, (B - active[t]) * row_bytes);
    }
    grad_input = grad_input.view({T_, B, I});
  }

  // grad_w_ih = dgate_x^T x over the packed rows.
  TORCH_INTERNAL_ASSERT(input.size(2) <= 1 || input.stride(2) == 1);
  const char* x_data = static_cast<const char*>(input.data_ptr());
  const int64_t x_step = input.stride(0) * element, x_row = input.stride(1) * element;
  Tensor grad_w_ih = pooled_empty({G, I}, options);
  accumulate_over_packed_rows(
      grad_w_ih, dgx, I, rows_before, active,
      [&](int64_t t, int64_t b) { return x_data + t * x_step + b * x_row; }, options);

  Tensor grad_b_ih =
      has_bias ? state.dgate_x_column_sums.sum(0).to(input.scalar_type()) : at::empty({0}, options);
  const int64_t Gh = state.dgate_h.size(-1);
  const int64_t shared_cols = shared_hidden_gate_cols(state, G);
  Tensor grad_b_hh = hidden_bias_gradient(state, grad_b_ih, has_bias, kCpuGradientKernels);

  // grad_w_hh = dgate_h^T h_prev over the packed rows: dgate_x's first shared_cols columns,
  // the rest dgate_h's (GRU's last gate).
  const char* out_data = static_cast<const char*>(output.data_ptr());
  const int64_t out_row = strided_rows_stride(output) * element;
  const char* hx_data = hx.defined() ? static_cast<const char*>(hx.data_ptr()) : nullptr;
  const int64_t* length = lengths.data_ptr<int64_t>();
  const auto h_prev_of = [&](int64_t t, int64_t b) -> const void* {
    const bool first = reverse ? t == length[b] - 1 : t == 0;
    if (first) return hx_data ? hx_data + b * P * element : nullptr;
    return out_data + ((reverse ? t + 1 : t - 1) * B + b) * out_row;
  };
  Tensor grad_w_hh = pooled_empty({G, P}, options);
  Tensor shared_rows = grad_w_hh.narrow(0, 0, shared_cols);
  accumulate_over_packed_rows(shared_rows, dgx.narrow(1, 0, shared_cols), P, rows_before, active,
                              h_prev_of, options);
  if (shared_cols < G) {
    Tensor last_rows = grad_w_hh.narrow(0, shared_cols, Gh);
    accumulate_over_packed_rows(last_rows, state.dgate_h, P, rows_before, active, h_prev_of,
                                options);
  }
  Tensor grad_hx = hx.defined() ? state.dh : at::empty({0}, options);
  Tensor grad_cx = cx.defined() ? state.dc.to(input.scalar_type()) : at::empty({0}, options);
  return {grad_input, grad_hx,   grad_cx,   grad_w_ih,
          grad_w_hh,  grad_b_ih, grad_b_hh, at::empty({0}, options)};
}

// The backward op on time-major tensors (registered as backward_op<backward_time_major>).

}  // namespace

BackwardResult backward_time_major(const BackwardArgs& args) {
  const bool reverse = args.layer.reverse, has_bias = args.has_bias, input_grad = args.input_grad;
  const BackwardInputs in =
      prepare_backward(args, /*contiguous_grad_output=*/false, backward_reads_input_at_strides,
                       /*strided_output_rows=*/true);
  const LayerSizes& s = in.sizes;
  const Tensor &input = in.input, &hx = in.hx, &cx = in.cx, &w_ih = in.w_ih, &w_hh = in.w_hh;
  const Tensor &w_hr = in.w_hr, &lengths = in.lengths;
  const Tensor& workspace = in.workspace;
  // The gate-packed view reads a step's rows of the output as one.
  const Tensor output =
      uses_gate_packing(s, input.scalar_type()) ? in.output.contiguous() : in.output;
  const int64_t ws_cols = workspace_width(s.kind, s.hidden_size, s.has_projection);
#if defined(RNNFAST_LANE_KERNELS)
  if (register_layer_reads_input_backward(s, input)) {
    return backward_in_registers(s, in, args);
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
  const bool owns_grad_output =
      !grad_output.is_same(args.grad_output) && grad_output.is_contiguous();
  const bool gate_grad_over_output_grad =
      owns_grad_output && s.gate_size == s.state_size && !s.has_projection &&
      dispatch_cell(s.kind, [](auto cell) { return decltype(cell)::kGates == 1; });
  // Where the workspace was handed over to this call (WorkspaceHandover), the gate gradients
  // take its place: dgate_x its first G columns (the LSTM's i, f, g, o over themselves, GRU's
  // r, z, n), GRU's last hidden gate the next H (hg_n). A step reads a row's saved values before
  // it writes the row's gradients, and the LSTM's c, which the step before reads, stays.
  // The LSTM's recurrent product then reads a copy of each step's rows (run_backward): that
  // pays on a packed workspace only (its padded training steps ran 3-5% slower at 64-256
  // units, 16 and 64 rows, where their peak memory is under half of torch.nn's; GRU's product
  // reads a step buffer of its own anyway).
  const bool separate_hidden_gate_grad =
      dispatch_cell(s.kind, [](auto cell) { return decltype(cell)::kSeparateHiddenGateGrad; });
  const bool gates_over_workspace = !gate_grad_over_output_grad && ws_cols > 0 &&
                                    !uses_gate_packing(s, input.scalar_type()) &&
                                    (separate_hidden_gate_grad || workspace.dim() == 2) &&
                                    WorkspaceHandover::covers(args.workspace);
  const Tensor dgate_x_buffer = gate_grad_over_output_grad ? grad_output
                                : gates_over_workspace     ? workspace.narrow(-1, 0, s.gate_size)
                                                           : Tensor();
  const Tensor dgate_h_buffer = gates_over_workspace && separate_hidden_gate_grad
                                    ? workspace.narrow(-1, s.gate_size, s.hidden_size)
                                    : Tensor();
  BackwardState state = make_backward_state(
      s, args, dgate_x_buffer,
      gates_over_workspace || keeps_last_hidden_gate_only(s, input.scalar_type()), dgate_h_buffer);
  // Gate gradients over a packed workspace hold its rows (LayerView::saved_rows_before).
  std::vector<int64_t> packed_rows_before;
  dispatch_cell(s.kind, [&](auto cell_type) {
    using Cell = decltype(cell_type);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, input.scalar_type(), "rnnfast_backward_cpu", [&] {
          auto v = make_view<scalar_t>(s, ws_cols, reverse, lengths);
          if (workspace.dim() == 2) {
            // A packed sequence's workspace with the active rows only (forward.cpp).
            TORCH_CHECK(v.rows_by_length && v.pack_saved_rows() == workspace.size(0),
                        "rnnfast: workspace must have T * B = ", s.steps * s.batch,
                        " rows, or the sum of the lengths where they never increase down the "
                        "batch, as the forward saved it; got ",
                        args.workspace.sizes());
          }
          // The bias gradient summed in the reverse loop, a pass over dgate_x fewer, where that
          // pass is long enough to cost more than the sums' buffer and their reduction. Each batch
          // row's sums over the steps in double, then the rows' in order: torch.nn's accuracy over
          // millions of rows, and the same sums on any number of threads.
          constexpr int64_t kLoopSumsMinValues = 1 << 16;
          const bool packed_gate_rows = gates_over_workspace && v.saved_rows_packed();
          if (packed_gate_rows) packed_rows_before = v.saved_rows_before;
          const bool sums_in_loop =
              has_bias && !v.gate_packed &&
              (packed_gate_rows || s.steps * s.batch * s.gate_size >= kLoopSumsMinValues);
          Tensor row_sums =
              sums_in_loop ? at::zeros({s.batch, s.gate_size}, input.options().dtype(at::kDouble))
                           : Tensor();
          run_backward<Cell, scalar_t>(v, grad_output, hx, cx, w_hh, w_hr, output, workspace,
                                       state.dh, state.dc, state.dgate_x, state.dgate_h,
                                       state.dprojected, row_sums, packed_gate_rows,
                                       args.state_grad);
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
  if (!packed_rows_before.empty()) {
    return finish_packed_backward(s, state, packed_rows_before, input, hx, cx, w_ih, output,
                                  lengths, reverse, has_bias, input_grad);
  }
  return finish_backward(s, state, input, hx, cx, w_ih, output, workspace, lengths, reverse,
                         has_bias, input_grad, kCpuGradientKernels);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
