// The CPU engine's backward (engine.h): the reverse loop and its kernels; the weight gradients
// after it are weight_gradients.cpp's.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
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
namespace {

// hx, cx: undefined where the forward started from zero states. column_sums: [B, G] double
// zeros, into whose row b the reverse loop adds row b's dgate_x of every step (not in the
// gate-packed view, whose rows are not the gates' columns); or undefined.
template <typename Cell, typename T>
void run_backward(const LayerView<T>& v, const Tensor& grad_output, const Tensor& hx,
                  const Tensor& cx, const Tensor& w_hh, const Tensor& w_hr, const Tensor& output,
                  const Tensor& workspace, Tensor& dh_state, Tensor& dc_state, Tensor& dgate_x,
                  Tensor& dgate_h, Tensor& dprojected, Tensor& column_sums) {
  using A = at::opmath_type<T>;
  const int64_t B = v.B, H = v.H, P = v.P, G = v.G, W = v.W;
  const bool projecting = w_hr.defined();
  // A cell with its own dLoss/dhg (GRU) writes a step's into step_dgate_h [B, G], which the
  // recurrent product reads; dgate_h [T, B, Gh] keeps its last Gh columns of every step (all
  // G, or the last gate's H: the gates before it are dgate_x's), for the weight gradients.
  Tensor step_dgate_h =
      Cell::kSeparateHiddenGateGrad ? at::empty({B, G}, grad_output.options()) : Tensor();
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
  const Product projection_back(projecting ? w_hr.t() : Tensor(), Tensor(), v.product_rows, v.T_);

  // grad_output [T, B, P]: contiguous rows at any strides over t and b (see prepare_backward);
  // contiguous in the gate-packed view, whose one row per step spans all batch rows.
  const T* go_data = grad_output.data_ptr<T>();
  const int64_t go_step = grad_output.stride(0), go_batch = grad_output.stride(1);
  const auto grad_output_row = [&](int64_t t, int64_t b) {
    return go_data + t * go_step + b * go_batch;
  };
  // Zero initial states read as a zero row.
  const bool zero_initial_state = !hx.defined();
  Tensor zero_row =
      zero_initial_state ? at::zeros({std::max(P, H)}, grad_output.options()) : Tensor();
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
      const int64_t end = products_skip_ended_rows ? v.active_end(t, b_begin, b_end) : b_end;
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
    register_layer::backward<Cell>(
        register_layer_sizes(s, reverse), strided_steps(in.input), grad_output_steps,
        data(output), Cell::kSavedPerUnit > 0 ? data(in.workspace) : nullptr, data(in.hx),
        data(in.cx), data(in.w_ih), data(in.w_hh), data(dh), data(dc),
        input_grad ? data(grad_input) : nullptr, data(grad_w_ih), data(grad_w_hh),
        has_bias ? data(grad_b_ih) : nullptr, has_bias ? data(grad_b_hh) : nullptr);
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

// The backward op on time-major tensors (registered as backward_op<backward_time_major>).

}  // namespace

BackwardResult backward_time_major(const BackwardArgs& args) {
  const bool reverse = args.layer.reverse, has_bias = args.has_bias, input_grad = args.input_grad;
  const BackwardInputs in = prepare_backward(args, /*contiguous_grad_output=*/false,
                                             backward_reads_input_at_strides,
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
  BackwardState state =
      make_backward_state(s, args, gate_grad_over_output_grad ? grad_output : Tensor(),
                          keeps_last_hidden_gate_only(s, input.scalar_type()));
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
                        "batch, as the forward saved it; got ", args.workspace.sizes());
          }
          // The bias gradient summed in the reverse loop, a pass over dgate_x fewer, where that
          // pass is long enough to cost more than the sums' buffer and their reduction. Each batch
          // row's sums over the steps in double, then the rows' in order: torch.nn's accuracy over
          // millions of rows, and the same sums on any number of threads.
          constexpr int64_t kLoopSumsMinValues = 1 << 16;
          const bool sums_in_loop =
              has_bias && !v.gate_packed && s.steps * s.batch * s.gate_size >= kLoopSumsMinValues;
          Tensor row_sums =
              sums_in_loop ? at::zeros({s.batch, s.gate_size}, input.options().dtype(at::kDouble))
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

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
