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
// backward.cpp, weight_gradients.cpp (the GEMMs and sums after the reverse loop),
// options_layer.cpp (the layer with cell options), random_masks.cpp (its zoneout masks),
// kernels.h and engine.cpp (one instruction set's kernels and entry points; capability.h says
// why there are several) and register_ops.cpp (registers the entry points of the CPU at hand).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../layer.h"
#include "../layer_options.h"

namespace rnnfast {
namespace cpu {

// rnnfast::forward's and rnnfast::backward's kernels as their schemas declare them.
using ForwardKernel = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    c10::string_view cell, const at::Tensor& input, const std::optional<at::Tensor>& hx,
    const std::optional<at::Tensor>& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths, bool reverse,
    bool save_workspace, bool batch_first);
using BackwardKernel = BackwardResult (*)(
    c10::string_view cell, const at::Tensor& grad_output, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
    const std::optional<at::Tensor>& hx, const std::optional<at::Tensor>& cx,
    const at::Tensor& w_ih, const at::Tensor& w_hh, bool has_bias,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& lengths, bool reverse,
    const at::Tensor& output, const at::Tensor& workspace, bool input_grad, bool batch_first,
    bool state_grad);

// The CPU engine compiled for one instruction set (capability.h).
struct Engine {
  const char* capability;  // "DEFAULT", "AVX2" or "AVX512", as at::get_cpu_capability() names it
  ForwardKernel forward;
  BackwardKernel backward;
  // Whether the engine reads this input [T, B, I] at its strides, where the layer would
  // otherwise pass a time-major contiguous copy (engine_input in csrc/layer.h).
  bool (*reads_input_at_strides)(const at::Tensor& input, const at::Tensor& w_hh, bool has_lengths,
                                 bool has_projection);
  // The layer with cell options (options_layer.cpp).
  LayerOptionsResult (*forward_with_options)(const LayerOptionsArgs& args, bool save);
  std::vector<at::Tensor> (*backward_with_options)(const LayerOptionsBackwardArgs& args);
  // rnnfast::random_mask (random_masks.cpp).
  at::Tensor (*random_mask)(const at::Tensor& seed, at::IntArrayRef size, double p,
                            at::ScalarType dtype);
  // Whether bfloat16 layers run their per-step products on AMX tiles here (amx_product.h).
  bool (*runs_amx)();
};

// Each compiled copy's entry points (engine.cpp); the AVX ones where setup.py built them.
const Engine& default_engine();
#if defined(RNNFAST_AVX2_ENGINE)
const Engine& avx2_engine();
#endif
#if defined(RNNFAST_AVX512_ENGINE)
const Engine& avx512_engine();
#endif

// The copies built, narrowest first (register_ops.cpp).
std::vector<const Engine*> built_engines();

// The copy this CPU runs: the widest built of those ATen's choice of instruction set for its own
// kernels allows (register_ops.cpp).
const Engine& engine();

}  // namespace cpu
}  // namespace rnnfast
