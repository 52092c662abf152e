// The arguments of the layer with cell options (layer_options.h): made from the ops' schema
// arguments and checked, with messages that name the argument.
#include "layer_options.h"

#include <ATen/ops/empty.h>

#include <sstream>
#include <string>
#include <utility>

#include "layer.h"

namespace rnnfast {
namespace {

at::Tensor contiguous_or_none(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : at::Tensor();
}

std::string shape_of(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

// An optional tensor of the input's dtype and device with exactly the shape `expected`.
void check_tensor(const at::Tensor& t, const char* name, at::IntArrayRef expected,
                  const char* meaning, const at::Tensor& input) {
  if (!t.defined()) return;
  TORCH_CHECK(t.sizes() == expected, "rnnfast: ", name, " must have shape ", expected, " (",
              meaning, "), got ", shape_of(t));
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "rnnfast: ", name,
              " must have the dtype of input (", input.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), "rnnfast: ", name, " must be on the device of input (",
              input.device(), "), got ", t.device());
}

}  // namespace

LayerOptionsArgs layer_options_args(
    c10::string_view cell, const at::Tensor& input, const std::optional<at::Tensor>& hx,
    const std::optional<at::Tensor>& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& norm_ih_weight,
    const std::optional<at::Tensor>& norm_hh_weight,
    const std::optional<at::Tensor>& norm_cell_weight,
    const std::optional<at::Tensor>& norm_cell_bias,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout_mask,
    const std::optional<at::Tensor>& zoneout_cell_mask, double zoneout, double zoneout_cell,
    const std::optional<at::Tensor>& lengths, bool reverse) {
  LayerOptionsArgs a;
  a.kind = cell_from_name(std::string(cell));
  a.input = input.contiguous();
  a.hx = contiguous_or_none(hx);
  a.cx = contiguous_or_none(cx);
  a.w_ih = w_ih.contiguous();
  a.w_hh = w_hh.contiguous();
  a.b_ih = contiguous_or_none(b_ih);
  a.b_hh = contiguous_or_none(b_hh);
  a.w_hr = contiguous_or_none(w_hr);
  a.norm_ih_weight = contiguous_or_none(norm_ih_weight);
  a.norm_hh_weight = contiguous_or_none(norm_hh_weight);
  a.norm_cell_weight = contiguous_or_none(norm_cell_weight);
  a.norm_cell_bias = contiguous_or_none(norm_cell_bias);
  a.recurrent_mask = contiguous_or_none(recurrent_mask);
  a.zoneout_mask = contiguous_or_none(zoneout_mask);
  a.zoneout_cell_mask = contiguous_or_none(zoneout_cell_mask);
  a.zoneout = zoneout;
  a.zoneout_cell = zoneout_cell;
  a.lengths = contiguous_or_none(lengths);
  a.reverse = reverse;
  return a;
}

void check_layer_options_args(const LayerOptionsArgs& a) {
  const at::Tensor& input = a.input;
  TORCH_CHECK(input.dim() == 3, "rnnfast: input must be 3-D [T, B, I], got ", shape_of(input));
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "rnnfast: the layer with cell options runs float32 and float64 tensors, got ",
              input.scalar_type());
  const int gates = dispatch_cell(a.kind, [](auto cell) { return decltype(cell)::kGates; });
  const bool lstm = has_cell_state(a.kind);
  TORCH_CHECK(a.w_ih.dim() == 2 && a.w_ih.size(0) % gates == 0,
              "rnnfast: w_ih must be [gates * hidden_size, input_size], got ", shape_of(a.w_ih));
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const int64_t G = a.w_ih.size(0), H = G / gates;
  TORCH_CHECK(a.w_hh.dim() == 2, "rnnfast: w_hh must be 2-D, got ", shape_of(a.w_hh));
  const int64_t P = a.w_hh.size(1);
  check_tensor(a.w_ih, "w_ih", {G, I}, "gates * hidden_size, input_size", input);
  check_tensor(a.w_hh, "w_hh", {G, P}, "gates * hidden_size, state_size", input);
  check_tensor(a.b_ih, "b_ih", {G}, "gates * hidden_size", input);
  check_tensor(a.b_hh, "b_hh", {G}, "gates * hidden_size", input);
  TORCH_CHECK(a.w_hr.defined() || P == H, "rnnfast: w_hh's state_size ", P,
              " differs from hidden_size ", H, " without a projection w_hr");
  TORCH_CHECK(!a.w_hr.defined() || lstm, "rnnfast: w_hr (a projection) is only for LSTM cells");
  check_tensor(a.w_hr, "w_hr", {P, H}, "state_size, hidden_size", input);
  check_tensor(a.hx, "hx", {B, P}, "B, state_size", input);
  TORCH_CHECK(!a.cx.defined() || lstm, "rnnfast: cx is only for LSTM cells");
  check_tensor(a.cx, "cx", {B, H}, "B, hidden_size", input);
  check_tensor(a.norm_ih_weight, "norm_ih_weight", {G}, "gates * hidden_size", input);
  check_tensor(a.norm_hh_weight, "norm_hh_weight", {G}, "gates * hidden_size", input);
  TORCH_CHECK(!a.norm_cell_weight.defined() || lstm,
              "rnnfast: norm_cell_weight (the cell state's layer normalisation) is only for LSTM "
              "cells");
  TORCH_CHECK(!a.norm_cell_bias.defined() || a.norm_cell_weight.defined(),
              "rnnfast: norm_cell_bias needs norm_cell_weight");
  check_tensor(a.norm_cell_weight, "norm_cell_weight", {H}, "hidden_size", input);
  check_tensor(a.norm_cell_bias, "norm_cell_bias", {H}, "hidden_size", input);
  check_tensor(a.recurrent_mask, "recurrent_mask", {B, P}, "B, state_size", input);
  check_tensor(a.zoneout_mask, "zoneout_mask", {T, B, P}, "T, B, state_size", input);
  TORCH_CHECK(!a.zoneout_cell_mask.defined() || lstm,
              "rnnfast: zoneout_cell_mask is only for LSTM cells");
  check_tensor(a.zoneout_cell_mask, "zoneout_cell_mask", {T, B, H}, "T, B, hidden_size", input);
  TORCH_CHECK_VALUE(a.zoneout >= 0 && a.zoneout < 1,
                    "rnnfast: zoneout must be a probability in [0, 1), got ", a.zoneout);
  TORCH_CHECK_VALUE(a.zoneout_cell >= 0 && a.zoneout_cell < 1,
                    "rnnfast: zoneout_cell must be a probability in [0, 1), got ", a.zoneout_cell);
  TORCH_CHECK_VALUE(a.zoneout_cell == 0 || lstm, "rnnfast: zoneout_cell is only for LSTM cells");
  if (a.lengths.defined()) {
    TORCH_CHECK(a.lengths.dim() == 1 && a.lengths.size(0) == B &&
                    a.lengths.scalar_type() == at::kLong && a.lengths.device().is_cpu(),
                "rnnfast: lengths must be a CPU int64 tensor of shape [", B, "], got ",
                a.lengths.scalar_type(), " ", shape_of(a.lengths), " on ", a.lengths.device());
  }
}

LayerOptionsBackwardArgs layer_options_backward_args(
    c10::string_view cell, const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input, const at::Tensor& w_ih,
    const at::Tensor& w_hh, bool has_bias, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& norm_ih_weight,
    const std::optional<at::Tensor>& norm_hh_weight,
    const std::optional<at::Tensor>& norm_cell_weight, bool has_norm_cell_bias,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout_mask,
    const std::optional<at::Tensor>& zoneout_cell_mask, double zoneout, double zoneout_cell,
    const std::optional<at::Tensor>& lengths, bool reverse, const at::Tensor& cell_saved,
    const at::Tensor& h_prev, const at::Tensor& c_prev, const at::Tensor& h_cell,
    const at::Tensor& norm_ih, const at::Tensor& norm_hh, const at::Tensor& norm_cell,
    const at::Tensor& rstd, bool input_grad) {
  LayerOptionsBackwardArgs args;
  args.layer = layer_options_args(cell, input, std::nullopt, std::nullopt, w_ih, w_hh, std::nullopt,
                                  std::nullopt, w_hr, norm_ih_weight, norm_hh_weight,
                                  norm_cell_weight, std::nullopt, recurrent_mask, zoneout_mask,
                                  zoneout_cell_mask, zoneout, zoneout_cell, lengths, reverse);
  check_layer_options_args(args.layer);
  const LayerOptionsArgs& layer = args.layer;
  const int64_t steps = layer.input.size(0), batch = layer.input.size(1);
  const int64_t state = layer.w_hh.size(1);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef({steps, batch, state}),
              "rnnfast: grad_output must have shape [T, B, state_size], got ", grad_output.sizes());
  TORCH_CHECK(h_prev.sizes() == at::IntArrayRef({steps, batch, state}),
              "rnnfast: h_prev must be the forward's, saved with save=True; got shape ",
              h_prev.sizes());
  args.grad_output = with_contiguous_rows(grad_output);
  args.grad_h_n = grad_h_n.has_value() ? grad_h_n->contiguous() : at::Tensor();
  args.grad_c_n = grad_c_n.has_value() ? grad_c_n->contiguous() : at::Tensor();
  args.cell_saved = cell_saved.contiguous();
  args.h_prev = h_prev.contiguous();
  args.c_prev = c_prev.contiguous();
  args.h_cell = h_cell.contiguous();
  args.norm_ih = norm_ih.contiguous();
  args.norm_hh = norm_hh.contiguous();
  args.norm_cell = norm_cell.contiguous();
  args.rstd = rstd.contiguous();
  args.has_bias = has_bias;
  args.has_norm_cell_bias = has_norm_cell_bias;
  args.input_grad = input_grad;
  return args;
}

namespace {

template <size_t... Place>
LayerOptionsGradients as_gradient_tuple(std::vector<at::Tensor>& grads,
                                        std::index_sequence<Place...>) {
  return {std::move(grads[Place])...};
}

}  // namespace

LayerOptionsGradients layer_options_gradients(std::vector<at::Tensor> grads,
                                              const at::Tensor& input) {
  TORCH_CHECK(grads.size() == kLayerOptionsGradients, "rnnfast: an engine returned ", grads.size(),
              " gradients of the layer with cell options, not ", int(kLayerOptionsGradients));
  for (at::Tensor& grad : grads) {
    if (!grad.defined()) grad = at::empty({0}, input.options());
  }
  return as_gradient_tuple(grads, std::make_index_sequence<kLayerOptionsGradients>());
}

}  // namespace rnnfast
