// One layer with cell options (layer normalisation, zoneout, recurrent dropout; the math in
// csrc/cells.h, "Cell options"): the arguments of rnnfast::forward_with_options and
// rnnfast::backward_with_options, made once where a kernel receives them (layer_options.cpp),
// and what the engines return. Host code only.
//
//   forward_with_options  input [T, B, I] (time-major) -> output [T, B, P], h_n [B, P],
//                         c_n [B, H] (LSTM; else empty) and, when `save`, what the backward
//                         reads (else empty tensors):
//                           cell_saved [T, B, S * H]  the cell's saved values (cells.h)
//                           h_prev [T, B, P]          the state each step starts from
//                           c_prev [T, B, H]          (LSTM)
//                           h_cell [T, B, H]          the cell's h, before projection and zoneout
//                                                     (Elman cells and projections)
//                           norm_ih, norm_hh [T, B, G], norm_cell [T, B, H]  the normal forms
//                           rstd [T, B, 3]            1 / sqrt(var + eps) of the three (with
//                                                     layer_norm)
//   backward_with_options  their gradients, in the order of kGradInput .. kGradNormCellBias
//                         (an empty tensor where the forward had no such tensor, or where the
//                         input's gradient was not asked for).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cells.h"

namespace rnnfast {

struct LayerOptionsArgs {
  CellKind kind;
  at::Tensor input;                             // [T, B, I], contiguous
  at::Tensor hx, cx;                            // [B, P], [B, H]; undefined: zeros
  at::Tensor w_ih, w_hh, b_ih, b_hh, w_hr;      // as rnnfast::forward's
  at::Tensor norm_ih_weight, norm_hh_weight;    // [G] each: layer_norm's gains, or undefined
  at::Tensor norm_cell_weight, norm_cell_bias;  // [H] (LSTM), or undefined
  at::Tensor recurrent_mask;                    // [B, P]: 0 or 1 / (1 - p); undefined: none
  at::Tensor zoneout_mask, zoneout_cell_mask;   // [T, B, P], [T, B, H] of 0 and 1
  double zoneout = 0, zoneout_cell = 0;         // without a mask: p (inference)
  at::Tensor lengths;                           // [B] int64 on the CPU, or undefined
  bool reverse = false;
};

struct LayerOptionsResult {
  at::Tensor output, h_n, c_n;
  at::Tensor cell_saved, h_prev, c_prev, h_cell, norm_ih, norm_hh, norm_cell, rstd;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
             at::Tensor, at::Tensor, at::Tensor, at::Tensor>
  as_tuple() const {
    return {output, h_n,     c_n,     cell_saved, h_prev, c_prev,
            h_cell, norm_ih, norm_hh, norm_cell,  rstd};
  }
};

struct LayerOptionsBackwardArgs {
  LayerOptionsArgs layer;         // the biases and norm_cell_bias undefined: has_bias and
                                  // has_norm_cell_bias say whether they exist
  at::Tensor grad_output;         // [T, B, P], contiguous rows at any strides over t and b (an
                                  // expanded gradient, as of output.sum(), is not copied)
  at::Tensor grad_h_n, grad_c_n;  // or undefined: zero
  at::Tensor cell_saved, h_prev, c_prev, h_cell, norm_ih, norm_hh, norm_cell, rstd;
  bool has_bias = false, has_norm_cell_bias = false, input_grad = true;
};

// The places of backward_with_options's gradients (undefined where the forward had no such
// tensor).
enum LayerOptionsGradient {
  kGradInput,
  kGradHx,
  kGradCx,
  kGradWih,
  kGradWhh,
  kGradBih,
  kGradBhh,
  kGradWhr,
  kGradNormIh,
  kGradNormHh,
  kGradNormCellWeight,
  kGradNormCellBias,
  kLayerOptionsGradients
};

// The forward's arguments as its schema gives them (tensors made contiguous).
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
    const std::optional<at::Tensor>& lengths, bool reverse);

// Checks the arguments (shapes, dtypes, devices, probabilities), with messages that name them.
void check_layer_options_args(const LayerOptionsArgs& args);

// The backward's arguments as its schema gives them (tensors made contiguous), checked: the
// layer's as the forward's, grad_output and h_prev of shape [T, B, state_size].
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
    const at::Tensor& rstd, bool input_grad);

// backward_with_options's results, kLayerOptionsGradients tensors in the order above: a tuple
// of tensors, not a list, so that torch.func's vmap runs the op once per slice (it has no such
// fallback for ops that return a list).
using LayerOptionsGradients =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
static_assert(std::tuple_size_v<LayerOptionsGradients> == kLayerOptionsGradients);

// An engine's gradients (kLayerOptionsGradients of them) as the backward op returns them: an
// empty tensor of input's options where the forward had no such tensor.
LayerOptionsGradients layer_options_gradients(std::vector<at::Tensor> grads,
                                              const at::Tensor& input);

}  // namespace rnnfast
