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
//
// The engine's files: schedule.h (which threads run the time loop), layer_view.h (a call's
// sizes as the loops see them), input_layout.h (where the input is read at its strides),
// recurrent_product.h (which kernel runs a per-step product of which size), forward.cpp,
// backward.cpp, weight_gradients.cpp (the GEMMs and sums after the reverse loop) and
// register_ops.cpp (the ops' CPU kernels).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "../layer.h"

namespace rnnfast {
namespace cpu {

// rnnfast::forward's CPU kernel (forward.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    c10::string_view cell, const at::Tensor& input_, const std::optional<at::Tensor>& hx_,
    const std::optional<at::Tensor>& cx_, const at::Tensor& w_ih_, const at::Tensor& w_hh_,
    const std::optional<at::Tensor>& b_ih_, const std::optional<at::Tensor>& b_hh_,
    const std::optional<at::Tensor>& w_hr_, const std::optional<at::Tensor>& lengths_, bool reverse,
    bool save_workspace, bool batch_first);

// rnnfast::backward's CPU kernel on time-major tensors (backward.cpp), registered as
// backward_op<backward_time_major>.
BackwardResult backward_time_major(c10::string_view cell, const at::Tensor& grad_output_,
                                   const std::optional<at::Tensor>& grad_h_n_,
                                   const std::optional<at::Tensor>& grad_c_n_,
                                   const at::Tensor& input_, const std::optional<at::Tensor>& hx_,
                                   const std::optional<at::Tensor>& cx_, const at::Tensor& w_ih_,
                                   const at::Tensor& w_hh_, bool has_bias,
                                   const std::optional<at::Tensor>& w_hr_,
                                   const std::optional<at::Tensor>& lengths_, bool reverse,
                                   const at::Tensor& output_, const at::Tensor& workspace_,
                                   bool input_grad);

// The weight gradients' GEMMs and column sums on the CPU (weight_gradients.cpp).
extern const GradientKernels kCpuGradientKernels;

}  // namespace cpu
}  // namespace rnnfast
