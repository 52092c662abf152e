// What every engine needs to know about one call of a layer op: the cell, the sizes, and the
// checked arguments. Shared by the CPU and CUDA engines (host code only).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "cells.h"

namespace rnnfast {

CellKind cell_from_name(const std::string& name);

// Values saved per time step and batch row for the backward (the workspace's last dim).
int64_t workspace_width(CellKind kind, int64_t hidden_size, bool has_projection);

struct LayerSizes {
  CellKind kind;
  int64_t steps;        // T
  int64_t batch;        // B
  int64_t input_size;   // I
  int64_t hidden_size;  // H
  int64_t state_size;   // P: size of h (proj_size when projecting, else H)
  int64_t gate_size;    // G = gates * H
  bool has_projection;
  bool has_lengths;
};

// Checks the forward op's arguments (ranks, sizes, dtypes, devices, lengths) and returns the
// sizes; every error names the argument, what was expected and what came.
//   input [T, B, I], hx [B, P], cx [B, H] (LSTM only), w_ih [G, I], w_hh [G, P],
//   b_ih [G], b_hh [G], w_hr [P, H] (LSTM with projection only), lengths [B] int64.
LayerSizes check_layer_args(const std::string& cell, const at::Tensor& input,
                            const at::Tensor& hx, const std::optional<at::Tensor>& cx,
                            const at::Tensor& w_ih, const at::Tensor& w_hh,
                            const std::optional<at::Tensor>& b_ih,
                            const std::optional<at::Tensor>& b_hh,
                            const std::optional<at::Tensor>& w_hr,
                            const std::optional<at::Tensor>& lengths);

// Checks the backward op's extra arguments against the sizes of the forward.
void check_backward_args(const LayerSizes& sizes, const at::Tensor& input,
                         const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                         const std::optional<at::Tensor>& grad_c_n, const at::Tensor& output,
                         const at::Tensor& workspace);

}  // namespace rnnfast
