// The CPU engine's kernels of rnnfast::forward and rnnfast::backward, and the input it reads.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../layer.h"
#include "engine.h"
#include "input_layout.h"

namespace rnnfast {

at::Tensor engine_input(const at::Tensor& input, const at::Tensor& w_hh, bool has_lengths,
                        bool has_projection) {
  // w_hh [G, P]: P is H where there is no projection (with one there is no register layer nor
  // gate packing).
  if (input.device().is_cpu() && w_hh.dim() == 2 &&
      (cpu::register_layer_reads(input, w_hh.size(1), has_lengths, has_projection) ||
       cpu::trains_on_batch_major_input(input, w_hh.size(0), w_hh.size(1), has_lengths,
                                        has_projection))) {
    return input;
  }
  return time_major_contiguous(input);
}

}  // namespace rnnfast

TORCH_LIBRARY_IMPL(rnnfast, CPU, m) {
  m.impl("forward", &rnnfast::cpu::forward_cpu);
  m.impl("backward", &rnnfast::backward_op<rnnfast::cpu::backward_time_major>);
}
