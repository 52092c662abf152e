// The CUDA engine's layer with cell options (layer normalisation, zoneout, recurrent dropout):
// rnnfast::forward_with_options and rnnfast::backward_with_options on the GPU, with the CPU
// engine's semantics, outputs and saved tensors (csrc/layer_options.h; the CPU's is
// csrc/cpu/options_layer.cpp), so that rnnfast/_options_ops.py's fake implementations and
// autograd formula serve both.
//
// Forward: xg = x W_ih^T (+ b_ih where xg is not normalised) for all steps in ONE GEMM; then
// per step the recurrent GEMM hg = (h * mask) W_hh^T (+ b_hh where hg is not normalised) and
// ONE row kernel (options_kernels.cuh: the normalisations, the cell, zoneout, the state, the
// output and the saved tensors); with a projection ATen's h_cell W_hr^T and a finishing kernel.
// Backward: the steps in reverse, each a zoneout split kernel, ATen's dh W_hr (projection), ONE
// row kernel (the cell's and the normalisations' backward), ATen's dhg W_hh and the carry
// kernel; then the weights', biases' and gains' gradients as GEMMs and sums over all steps,
// and the input normalisation's backward as one row kernel over all T * B rows.
//
// float32 and float64 only (the arguments' checks refuse others; the Python side runs
// bfloat16 and float16 in float32). The lengths come as the CPU int64 tensor the checks ask for
// and are copied to the device for the kernels. Everything runs on the current stream of the
// input's device, with autocast off inside the ops.
//
// RNNFAST_CUDA_HOST_EMULATION (tests only): compiled by a C++ compiler, the same host code
// registers itself for CPU tensors and the kernels run on the host (launch.cuh), as engine.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../layer.h"
#include "../layer_options.h"
#include "host.h"
#include "launchers.cuh"

namespace rnnfast {
namespace {

using at::Tensor;

// The pointer of row `row` of a [rows, width] tensor, or nullptr where it is undefined or empty.
template <typename T>
T* row_of(const Tensor& t, int64_t row, int64_t width) {
  T* data = data_of<T>(t);
  return data != nullptr ? data + row * width : nullptr;
}

template <typename Cell, typename T>
LayerOptionsResult forward_impl(const LayerOptionsArgs& args, bool save, const Tensor& lengths) {
  static_assert(std::is_same<T, cuda::AccType<T>>::value, "float and double accumulate in kind");
  const int64_t Tn = args.input.size(0), B = args.input.size(1), I = args.input.size(2);
  const int64_t G = args.w_ih.size(0), H = G / Cell::kGates, P = args.w_hh.size(1);
  const int64_t S = Cell::kSavedPerUnit;
  const auto options = args.input.options();
  const bool projecting = args.w_hr.defined();
  const bool norm_ih = args.norm_ih_weight.defined(), norm_hh = args.norm_hh_weight.defined();
  const bool norm_cell = Cell::kHasCellState && args.norm_cell_weight.defined();
  const bool normalising = norm_ih || norm_hh || norm_cell;
  const bool dropping = args.recurrent_mask.defined();

  LayerOptionsResult r;
  r.output = at::empty({Tn, B, P}, options);
  // A packed sequence's rows write nothing at the steps they do not run; the backward's sums
  // over all rows read those places, so they start at zero.
  const auto saved_or_empty = [&](bool wanted, at::IntArrayRef sizes) {
    if (!save || !wanted) return at::empty({0}, options);
    return lengths.defined() ? at::zeros(sizes, options) : at::empty(sizes, options);
  };
  r.cell_saved = saved_or_empty(S > 0, {Tn, B, S * H});
  r.h_prev = saved_or_empty(true, {Tn, B, P});
  r.c_prev = saved_or_empty(Cell::kHasCellState, {Tn, B, H});
  r.h_cell = saved_or_empty(S == 0 || projecting, {Tn, B, H});
  r.norm_ih = saved_or_empty(norm_ih, {Tn, B, G});
  r.norm_hh = saved_or_empty(norm_hh, {Tn, B, G});
  r.norm_cell = saved_or_empty(norm_cell, {Tn, B, H});
  r.rstd = saved_or_empty(normalising, {Tn, B, 3});

  // xg = x W_ih^T + b_ih, or where it is normalised x W_ih^T alone (the row kernel adds b_ih
  // after the normalisation). [T * B, G]
  const Tensor x = args.input.reshape({Tn * B, I});
  Tensor xg = at::empty({Tn * B, G}, options);
  if (norm_ih || !args.b_ih.defined()) {
    at::mm_out(xg, x, args.w_ih.t());
  } else {
    at::addmm_out(xg, args.b_ih, x, args.w_ih.t());
  }

  // The state before and after each step: buffer step % 2 holds the state step `step` starts
  // from. [2, B, P] and LSTM's [2, B, H]
  Tensor h_buffers = at::zeros({2, B, P}, options);
  if (args.hx.defined()) h_buffers[0].copy_(args.hx);
  Tensor c_buffers = Cell::kHasCellState ? at::zeros({2, B, H}, options) : Tensor();
  if (Cell::kHasCellState && args.cx.defined()) c_buffers[0].copy_(args.cx);
  Tensor h_in = dropping ? at::empty({B, P}, options) : Tensor();  // h_prev * mask
  Tensor hg = at::empty({B, G}, options);
  Tensor h_cell = at::empty({B, H}, options);
  Tensor h_candidate = projecting ? at::empty({B, P}, options) : Tensor();
  const bool saving_cell = save && S > 0;
  Tensor scratch_saved =
      saving_cell ? Tensor() : at::empty({B, std::max<int64_t>(S, 1) * H}, options);
  const Tensor w_hh_t = args.w_hh.t();
  const Tensor w_hr_t = projecting ? args.w_hr.t() : Tensor();

  cuda::OptionsForwardArgs<T> a{};
  a.B = B;
  a.H = H;
  a.P = P;
  a.G = G;
  a.steps = Tn;
  a.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  a.hg = data_of<T>(hg);
  a.gain_ih = data_of<T>(args.norm_ih_weight);
  a.bias_ih = norm_ih ? data_of<T>(args.b_ih) : nullptr;
  a.gain_hh = data_of<T>(args.norm_hh_weight);
  a.bias_hh = norm_hh ? data_of<T>(args.b_hh) : nullptr;
  a.gain_c = norm_cell ? data_of<T>(args.norm_cell_weight) : nullptr;
  a.bias_c = norm_cell ? data_of<T>(args.norm_cell_bias) : nullptr;
  a.h_cell = data_of<T>(h_cell);
  a.saved_width = saving_cell ? S * H : std::max<int64_t>(S, 1) * H;
  a.zoneout_h = T(args.zoneout);
  a.zoneout_c = T(args.zoneout_cell);
  a.zoneout_h_on = args.zoneout_mask.defined() || args.zoneout > 0;
  a.zoneout_c_on = args.zoneout_cell_mask.defined() || args.zoneout_cell > 0;
  a.projecting = projecting;

  cuda::OptionsProjectionArgs<T> finish{};
  finish.B = B;
  finish.P = P;
  finish.steps = Tn;
  finish.lengths = a.lengths;
  finish.h_candidate = data_of<T>(h_candidate);
  finish.zoneout_h = a.zoneout_h;
  finish.zoneout_h_on = a.zoneout_h_on;

  const cudaStream_t stream = current_stream();
  for (int64_t step = 0; step < Tn; ++step) {
    const int64_t t = args.reverse ? Tn - 1 - step : step;
    const int64_t row = t * B;  // the step's first row of the [T * B, ...] tensors
    const Tensor h_old = h_buffers[step % 2], h_new = h_buffers[(step + 1) % 2];
    // hg = (h_prev * mask) W_hh^T (+ b_hh where hg is not normalised)
    const Tensor& product_input = dropping ? at::mul_out(h_in, h_old, args.recurrent_mask) : h_old;
    if (norm_hh || !args.b_hh.defined()) {
      at::mm_out(hg, product_input, w_hh_t);
    } else {
      at::addmm_out(hg, args.b_hh, product_input, w_hh_t);
    }
    a.t = t;
    a.xg = row_of<T>(xg, row, G);
    a.h_prev = data_of<T>(h_old);
    a.h_next = data_of<T>(h_new);
    a.c_prev = Cell::kHasCellState ? data_of<T>(c_buffers[step % 2]) : nullptr;
    a.c_next = Cell::kHasCellState ? data_of<T>(c_buffers[(step + 1) % 2]) : nullptr;
    a.out = row_of<T>(r.output, row, P);
    a.saved = saving_cell ? row_of<T>(r.cell_saved, row, S * H) : data_of<T>(scratch_saved);
    a.zoneout_h_mask = row_of<T>(args.zoneout_mask, row, P);
    a.zoneout_c_mask = row_of<T>(args.zoneout_cell_mask, row, H);
    a.h_prev_saved = row_of<T>(r.h_prev, row, P);
    a.c_prev_saved = row_of<T>(r.c_prev, row, H);
    a.h_cell_saved = row_of<T>(r.h_cell, row, H);
    a.norm_ih_saved = row_of<T>(r.norm_ih, row, G);
    a.norm_hh_saved = row_of<T>(r.norm_hh, row, G);
    a.norm_cell_saved = row_of<T>(r.norm_cell, row, H);
    a.rstd_saved = row_of<T>(r.rstd, row, 3);
    cuda::launch_options_forward_row<Cell, T>(a, stream);
    RNNFAST_KERNEL_LAUNCH_CHECK();
    if (projecting) {
      // h_candidate = h_cell W_hr^T, then zoneout and the output on the active rows.
      at::mm_out(h_candidate, h_cell, w_hr_t);
      finish.t = t;
      finish.h_prev = a.h_prev;
      finish.h_next = a.h_next;
      finish.out = a.out;
      finish.zoneout_h_mask = a.zoneout_h_mask;
      cuda::launch_options_projection<T>(finish, stream);
      RNNFAST_KERNEL_LAUNCH_CHECK();
    }
  }
  r.h_n = h_buffers[Tn % 2].clone();
  r.c_n = Cell::kHasCellState ? c_buffers[Tn % 2].clone() : at::empty({0}, options);
  return r;
}

template <typename Cell, typename T>
std::vector<Tensor> backward_impl(const LayerOptionsBackwardArgs& ba, const Tensor& lengths) {
  const LayerOptionsArgs& args = ba.layer;
  const int64_t Tn = args.input.size(0), B = args.input.size(1), I = args.input.size(2);
  const int64_t G = args.w_ih.size(0), H = G / Cell::kGates, P = args.w_hh.size(1);
  const int64_t S = Cell::kSavedPerUnit;
  const auto options = args.input.options();
  const bool projecting = args.w_hr.defined();
  const bool norm_ih = args.norm_ih_weight.defined(), norm_hh = args.norm_hh_weight.defined();
  const bool norm_cell = Cell::kHasCellState && args.norm_cell_weight.defined();
  const bool dropping = args.recurrent_mask.defined();
  // Per-step buffers over all steps [T * B, width]: every row writes its places at the steps it
  // runs; a packed sequence's rows leave the others, which the sums after the loop read, at zero.
  const auto steps_buffer = [&](int64_t width) {
    return lengths.defined() ? at::zeros({Tn * B, width}, options)
                             : at::empty({Tn * B, width}, options);
  };
  // The gates' gradients per step: of xg (and of hg where the cell's differ), after hg's
  // normalisation and before it.
  Tensor dxg = steps_buffer(G);
  Tensor dhg = Cell::kSeparateHiddenGateGrad ? steps_buffer(G) : dxg;
  Tensor dhg_raw = norm_hh ? steps_buffer(G) : dhg;
  Tensor dh_candidate_steps = projecting ? steps_buffer(P) : Tensor();
  Tensor dc_out_steps = norm_cell ? steps_buffer(H) : Tensor();

  // dLoss/dh and dLoss/dc of the state each step leaves, carried back step by step. [B, P], [B, H]
  Tensor dh_carry = ba.grad_h_n.defined() ? ba.grad_h_n.clone() : at::zeros({B, P}, options);
  Tensor dc_carry = Cell::kHasCellState
                        ? (ba.grad_c_n.defined() ? ba.grad_c_n.clone() : at::zeros({B, H}, options))
                        : Tensor();
  // Of the step's h before zoneout (the projection's rows of dh_candidate_steps where it
  // projects), and of the cell's h before the projection. [B, P], [B, H]
  Tensor dh_candidate = projecting ? Tensor() : at::empty({B, P}, options);
  Tensor dh_cell = projecting ? at::empty({B, H}, options) : dh_candidate;
  Tensor dh_in = at::empty({B, P}, options);  // of the product's input h_prev * mask
  Tensor dh_direct = Cell::kReadsPrevHidden ? at::empty({B, H}, options) : Tensor();  // GRU
  Tensor dc_scratch = Cell::kHasCellState ? at::empty({B, 2 * H}, options) : Tensor();

  const int64_t* lengths_data = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  cuda::OptionsGradSplitArgs<T> split{};
  split.B = B;
  split.P = P;
  split.steps = Tn;
  split.lengths = lengths_data;
  split.dh_carry = data_of<T>(dh_carry);
  split.zoneout_h = T(args.zoneout);
  split.zoneout_h_on = args.zoneout_mask.defined() || args.zoneout > 0;

  cuda::OptionsBackwardArgs<T> a{};
  a.B = B;
  a.H = H;
  a.P = P;
  a.G = G;
  a.S = S;
  a.steps = Tn;
  a.lengths = lengths_data;
  a.dh_cell = data_of<T>(dh_cell);
  a.dc_carry = data_of<T>(dc_carry);
  a.dc_scratch = data_of<T>(dc_scratch);
  a.zoneout_c = T(args.zoneout_cell);
  a.zoneout_c_on = args.zoneout_cell_mask.defined() || args.zoneout_cell > 0;
  a.gain_c = norm_cell ? data_of<T>(args.norm_cell_weight) : nullptr;
  a.gain_hh = data_of<T>(args.norm_hh_weight);
  a.dh_direct = data_of<T>(dh_direct);

  cuda::OptionsCarryArgs<T> carry{};
  carry.B = B;
  carry.P = P;
  carry.steps = Tn;
  carry.lengths = lengths_data;
  carry.dh_in = data_of<T>(dh_in);
  carry.recurrent_mask = data_of<T>(args.recurrent_mask);
  carry.dh_direct = a.dh_direct;
  carry.dh_carry = split.dh_carry;

  const Tensor grad_output = ba.grad_output.contiguous().view({Tn * B, P});
  const cudaStream_t stream = current_stream();
  for (int64_t step = Tn - 1; step >= 0; --step) {
    const int64_t t = args.reverse ? Tn - 1 - step : step;
    const int64_t row = t * B;
    split.t = t;
    split.grad_output = row_of<T>(grad_output, row, P);
    split.dh_candidate =
        projecting ? row_of<T>(dh_candidate_steps, row, P) : data_of<T>(dh_candidate);
    split.zoneout_h_mask = row_of<T>(args.zoneout_mask, row, P);
    cuda::launch_options_grad_split<T>(split, stream);
    RNNFAST_KERNEL_LAUNCH_CHECK();
    if (projecting) at::mm_out(dh_cell, dh_candidate_steps.narrow(0, row, B), args.w_hr);
    a.t = t;
    a.saved = S > 0 ? row_of<T>(ba.cell_saved, row, S * H) : nullptr;
    a.h_prev = row_of<T>(ba.h_prev, row, P);
    a.c_prev = row_of<T>(ba.c_prev, row, H);
    a.h_cell = row_of<T>(ba.h_cell, row, H);
    a.zoneout_c_mask = row_of<T>(args.zoneout_cell_mask, row, H);
    a.norm_cell = row_of<T>(ba.norm_cell, row, H);
    a.norm_hh = row_of<T>(ba.norm_hh, row, G);
    a.rstd = row_of<T>(ba.rstd, row, 3);
    a.dc_out = row_of<T>(dc_out_steps, row, H);
    a.dxg = row_of<T>(dxg, row, G);
    a.dhg = row_of<T>(dhg, row, G);
    a.dhg_raw = row_of<T>(dhg_raw, row, G);
    cuda::launch_options_backward_row<Cell, T>(a, stream);
    RNNFAST_KERNEL_LAUNCH_CHECK();
    at::mm_out(dh_in, dhg_raw.narrow(0, row, B), args.w_hh);
    carry.t = t;
    cuda::launch_options_carry<T>(carry, stream);
    RNNFAST_KERNEL_LAUNCH_CHECK();
  }

  // The weights', biases' and gains' gradients over all steps.
  const GradientKernels& kernels = kAtenGradientKernels;
  std::vector<Tensor> grads(kLayerOptionsGradients);
  Tensor h_in_steps = ba.h_prev.reshape({Tn * B, P});
  if (dropping) h_in_steps = (ba.h_prev * args.recurrent_mask).view({Tn * B, P});
  grads[kGradWhh] = kernels.product(dhg_raw.t(), h_in_steps);
  if (ba.has_bias) grads[kGradBhh] = kernels.column_sums(dhg);
  if (norm_hh) grads[kGradNormHh] = (dhg * ba.norm_hh.view({Tn * B, G})).sum(0);
  if (projecting) {
    grads[kGradWhr] = kernels.product(dh_candidate_steps.t(), ba.h_cell.view({Tn * B, H}));
  }
  if (norm_cell) {
    grads[kGradNormCellWeight] = (dc_out_steps * ba.norm_cell.view({Tn * B, H})).sum(0);
    if (ba.has_norm_cell_bias) grads[kGradNormCellBias] = kernels.column_sums(dc_out_steps);
  }
  // The input side (for LSTM and Elman dxg is dhg, whose uses above are done).
  if (ba.has_bias) grads[kGradBih] = kernels.column_sums(dxg);
  if (norm_ih) {
    grads[kGradNormIh] = (dxg * ba.norm_ih.view({Tn * B, G})).sum(0);
    cuda::OptionsNormBackwardArgs<T> norm{};
    norm.G = G;
    norm.dxg = data_of<T>(dxg);
    norm.normalized = data_of<T>(ba.norm_ih);
    norm.rstd = data_of<T>(ba.rstd);
    norm.gain = data_of<T>(args.norm_ih_weight);
    cuda::launch_options_norm_backward<T>(norm, Tn * B, stream);
    RNNFAST_KERNEL_LAUNCH_CHECK();
  }
  grads[kGradWih] = kernels.product(dxg.t(), args.input.view({Tn * B, I}));
  if (ba.input_grad) grads[kGradInput] = at::mm(dxg, args.w_ih).view({Tn, B, I});
  grads[kGradHx] = dh_carry;
  if (Cell::kHasCellState) grads[kGradCx] = dc_carry;
  return grads;
}

// The lengths [B] (a CPU int64 tensor, as the checks ask) where the kernels read them.
Tensor lengths_on_device(const LayerOptionsArgs& args) {
  return args.lengths.defined() ? args.lengths.to(args.input.device()) : Tensor();
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
forward_with_options_cuda(
    c10::string_view cell, const Tensor& input, const std::optional<Tensor>& hx,
    const std::optional<Tensor>& cx, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& norm_ih_weight,
    const std::optional<Tensor>& norm_hh_weight, const std::optional<Tensor>& norm_cell_weight,
    const std::optional<Tensor>& norm_cell_bias, const std::optional<Tensor>& recurrent_mask,
    const std::optional<Tensor>& zoneout_mask, const std::optional<Tensor>& zoneout_cell_mask,
    double zoneout, double zoneout_cell, const std::optional<Tensor>& lengths, bool reverse,
    bool save) {
  DeviceGuard device_guard;
  if (input.is_cuda()) device_guard.set_device(input.device());
  const NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  const LayerOptionsArgs args =
      layer_options_args(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, norm_ih_weight,
                         norm_hh_weight, norm_cell_weight, norm_cell_bias, recurrent_mask,
                         zoneout_mask, zoneout_cell_mask, zoneout, zoneout_cell, lengths, reverse);
  check_layer_options_args(args);
  const Tensor lengths_device = lengths_on_device(args);
  return dispatch_cell(args.kind, [&](auto cell_type) {
    using Cell = decltype(cell_type);
    return AT_DISPATCH_FLOATING_TYPES(
        args.input.scalar_type(), "rnnfast_forward_with_options_cuda",
        [&] { return forward_impl<Cell, scalar_t>(args, save, lengths_device).as_tuple(); });
  });
}

LayerOptionsGradients backward_with_options_cuda(
    c10::string_view cell, const Tensor& grad_output, const std::optional<Tensor>& grad_h_n,
    const std::optional<Tensor>& grad_c_n, const Tensor& input, const Tensor& w_ih,
    const Tensor& w_hh, bool has_bias, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& norm_ih_weight, const std::optional<Tensor>& norm_hh_weight,
    const std::optional<Tensor>& norm_cell_weight, bool has_norm_cell_bias,
    const std::optional<Tensor>& recurrent_mask, const std::optional<Tensor>& zoneout_mask,
    const std::optional<Tensor>& zoneout_cell_mask, double zoneout, double zoneout_cell,
    const std::optional<Tensor>& lengths, bool reverse, const Tensor& cell_saved,
    const Tensor& h_prev, const Tensor& c_prev, const Tensor& h_cell, const Tensor& norm_ih,
    const Tensor& norm_hh, const Tensor& norm_cell, const Tensor& rstd, bool input_grad) {
  DeviceGuard device_guard;
  if (input.is_cuda()) device_guard.set_device(input.device());
  const NoAutocast no_autocast(c10::autocast_dispatch_keyset);
  const LayerOptionsBackwardArgs args = layer_options_backward_args(
      cell, grad_output, grad_h_n, grad_c_n, input, w_ih, w_hh, has_bias, w_hr, norm_ih_weight,
      norm_hh_weight, norm_cell_weight, has_norm_cell_bias, recurrent_mask, zoneout_mask,
      zoneout_cell_mask, zoneout, zoneout_cell, lengths, reverse, cell_saved, h_prev, c_prev,
      h_cell, norm_ih, norm_hh, norm_cell, rstd, input_grad);
  const Tensor lengths_device = lengths_on_device(args.layer);
  std::vector<Tensor> grads = dispatch_cell(args.layer.kind, [&](auto cell_type) {
    using Cell = decltype(cell_type);
    return AT_DISPATCH_FLOATING_TYPES(
        args.layer.input.scalar_type(), "rnnfast_backward_with_options_cuda",
        [&] { return backward_impl<Cell, scalar_t>(args, lengths_device); });
  });
  return layer_options_gradients(std::move(grads), input);
}

}  // namespace
}  // namespace rnnfast

#ifndef RNNFAST_CUDA_HOST_EMULATION
TORCH_LIBRARY_IMPL(rnnfast, CUDA, m) {
  m.impl("forward_with_options", &rnnfast::forward_with_options_cuda);
  m.impl("backward_with_options", &rnnfast::backward_with_options_cuda);
}
#else
TORCH_LIBRARY_IMPL(rnnfast, CPU, m) {
  m.impl("forward_with_options", &rnnfast::forward_with_options_cuda);
  m.impl("backward_with_options", &rnnfast::backward_with_options_cuda);
}
#endif
