// The CPU engine's kernels as one instruction set's copy declares them (capability.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../layer.h"
#include "../layer_options.h"
#include "capability.h"

namespace rnnfast {
namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h

// rnnfast::forward's CPU kernel (forward.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    c10::string_view cell, const at::Tensor& input_, const std::optional<at::Tensor>& hx_,
    const std::optional<at::Tensor>& cx_, const at::Tensor& w_ih_, const at::Tensor& w_hh_,
    const std::optional<at::Tensor>& b_ih_, const std::optional<at::Tensor>& b_hh_,
    const std::optional<at::Tensor>& w_hr_, const std::optional<at::Tensor>& lengths_, bool reverse,
    bool save_workspace, bool batch_first);

// rnnfast::backward's CPU kernel of a time-major call (backward.cpp), registered as
// backward_op<backward_time_major>.
BackwardResult backward_time_major(const BackwardArgs& args);

// rnnfast::forward_with_options's and backward_with_options's CPU kernels (options_layer.cpp).
LayerOptionsResult forward_with_options_cpu(const LayerOptionsArgs& args, bool save);
std::vector<at::Tensor> backward_with_options_cpu(const LayerOptionsBackwardArgs& args);

// rnnfast::random_mask's CPU kernel (random_masks.cpp).
at::Tensor random_mask_cpu(const at::Tensor& seed, at::IntArrayRef size, double p,
                           at::ScalarType dtype);

// The weight gradients' GEMMs and column sums on the CPU (weight_gradients.cpp).
extern const GradientKernels kCpuGradientKernels;

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
