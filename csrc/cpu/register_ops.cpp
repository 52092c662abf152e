// Registers the CPU engine's kernels of rnnfast::forward and rnnfast::backward: the copy compiled
// for the instruction set ATen chose for this CPU (capability.h), and the input it reads.
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "../layer.h"
#include "engine.h"

namespace rnnfast {
namespace cpu {
namespace {

// capability: at::get_cpu_capability()'s "AVX512", "AVX2", "DEFAULT" (or another
// architecture's name, which only the portable copy serves).
const Engine& engine_for(const std::string& capability) {
#if defined(RNNFAST_AVX512_ENGINE)
  if (capability == "AVX512") {
    return avx512_engine();
  }
#endif
#if defined(RNNFAST_AVX2_ENGINE)
  if (capability == "AVX512" || capability == "AVX2") {
    return avx2_engine();
  }
#endif
  return default_engine();
}

}  // namespace

std::vector<const Engine*> built_engines() {
  std::vector<const Engine*> engines{&default_engine()};
#if defined(RNNFAST_AVX2_ENGINE)
  engines.push_back(&avx2_engine());
#endif
#if defined(RNNFAST_AVX512_ENGINE)
  engines.push_back(&avx512_engine());
#endif
  return engines;
}

const Engine& engine() {
  // Chosen once, when the extension registers its kernels at load time.
  static const Engine& chosen = engine_for(at::get_cpu_capability());
  return chosen;
}

}  // namespace cpu

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor, at::Tensor>
forward_with_options(
    c10::string_view cell, const at::Tensor& input, const std::optional<at::Tensor>& hx,
    const std::optional<at::Tensor>& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& norm_ih_weight,
    const std::optional<at::Tensor>& norm_hh_weight,
    const std::optional<at::Tensor>& norm_cell_weight,
    const std::optional<at::Tensor>& norm_cell_bias,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout_mask,
    const std::optional<at::Tensor>& zoneout_cell_mask, double zoneout, double zoneout_cell,
    const std::optional<at::Tensor>& lengths, bool reverse, bool save) {
  const LayerOptionsArgs args =
      layer_options_args(cell, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, norm_ih_weight,
                         norm_hh_weight, norm_cell_weight, norm_cell_bias, recurrent_mask,
                         zoneout_mask, zoneout_cell_mask, zoneout, zoneout_cell, lengths, reverse);
  check_layer_options_args(args);
  return cpu::engine().forward_with_options(args, save).as_tuple();
}

LayerOptionsGradients backward_with_options(
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
  const LayerOptionsBackwardArgs args = layer_options_backward_args(
      cell, grad_output, grad_h_n, grad_c_n, input, w_ih, w_hh, has_bias, w_hr, norm_ih_weight,
      norm_hh_weight, norm_cell_weight, has_norm_cell_bias, recurrent_mask, zoneout_mask,
      zoneout_cell_mask, zoneout, zoneout_cell, lengths, reverse, cell_saved, h_prev, c_prev,
      h_cell, norm_ih, norm_hh, norm_cell, rstd, input_grad);
  return layer_options_gradients(cpu::engine().backward_with_options(args), input);
}

}  // namespace

at::Tensor engine_input(const at::Tensor& input, const at::Tensor& w_hh, bool has_lengths,
                        bool has_projection) {
  if (input.device().is_cpu() && w_hh.dim() == 2 &&
      cpu::engine().reads_input_at_strides(input, w_hh, has_lengths, has_projection)) {
    return input;
  }
  return time_major_contiguous(input);
}

}  // namespace rnnfast

TORCH_LIBRARY_IMPL(rnnfast, CPU, m) {
  m.impl("forward", rnnfast::cpu::engine().forward);
  m.impl("backward", rnnfast::cpu::engine().backward);
  m.impl("forward_with_options", &rnnfast::forward_with_options);
  m.impl("backward_with_options", &rnnfast::backward_with_options);
  m.impl("random_mask", rnnfast::cpu::engine().random_mask);
}
