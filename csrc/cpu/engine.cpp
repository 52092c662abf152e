// The entry points of the CPU engine's copy for one instruction set (capability.h).
#include "engine.h"

#include <c10/macros/Macros.h>

#include "amx_product.h"
#include "capability.h"
#include "input_layout.h"
#include "kernels.h"

namespace rnnfast {
namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h
namespace {

bool reads_input_at_strides(const at::Tensor& input, const at::Tensor& w_hh, bool has_lengths,
                            bool has_projection) {
  // w_hh [G, P]: P is H where there is no projection (with one there is no register layer nor
  // gate packing).
  return register_layer_reads(input, w_hh.size(1), has_lengths, has_projection) ||
         trains_on_batch_major_input(input, w_hh.size(0), w_hh.size(1), has_lengths,
                                     has_projection);
}

const Engine kEngine{C10_STRINGIZE(CPU_CAPABILITY),
                     &forward_cpu,
                     &backward_op<backward_time_major>,
                     &reads_input_at_strides,
                     &forward_with_options_cpu,
                     &backward_with_options_cpu,
                     &random_mask_cpu,
                     &amx::usable};

}  // namespace
}  // namespace CPU_CAPABILITY

#if defined(CPU_CAPABILITY_AVX512)
const Engine& avx512_engine() { return kEngine; }
#elif defined(CPU_CAPABILITY_AVX2)
const Engine& avx2_engine() { return kEngine; }
#else
const Engine& default_engine() { return kEngine; }
#endif

}  // namespace cpu
}  // namespace rnnfast
