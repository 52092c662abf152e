// Registers the CPU engine's kernels of rnnfast::forward and rnnfast::backward: the copy compiled
// for the instruction set ATen chose for this CPU (capability.h), and the input it reads.
#include <ATen/ATen.h>
#include <ATen/Version.h>
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
}
