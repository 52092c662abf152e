// How the CPU engine reads a layer's input: where it takes the tensor at its strides (the
// register layer, the inference's batch-major projection) instead of a time-major copy.
#pragma once

#include <ATen/ATen.h>

#include "../layer.h"
#include "layer_view.h"
#include "register_layer.h"

namespace rnnfast {
namespace cpu {

#if defined(CPU_CAPABILITY_AVX512)
// A call's sizes as register_layer.h takes them.
inline register_layer::Layer register_layer_sizes(const LayerSizes& s, bool reverse) {
  return {s.steps, s.batch, s.input_size, s.hidden_size, reverse};
}

inline register_layer::StridedSteps strided_steps(const Tensor& x) {
  return {x.data_ptr<float>(), x.stride(0), x.stride(1), x.stride(2)};
}
#endif

// Whether the register layer runs on this float input [T, B, I], which it reads at its strides:
// sizes it takes, and a step's offsets within its gathers'.
inline bool register_layer_reads(const Tensor& input, int64_t hidden_size, bool has_lengths,
                          bool has_projection) {
#if defined(CPU_CAPABILITY_AVX512)
  return input.scalar_type() == at::kFloat && input.dim() == 3 &&
         register_layer::fits(input.size(1), input.size(2), hidden_size, has_lengths,
                              has_projection) &&
         register_layer::StridedSteps::fits(input.size(1), input.size(2), input.stride(1),
                                            input.stride(2));
#else
  (void)input, (void)hidden_size, (void)has_lengths, (void)has_projection;
  return false;
#endif
}

// Whether the forward and the reverse pass run in register_layer.h (the reverse pass also needs
// register_layer::backward_fits), on the input as prepare_forward / prepare_backward leave it;
// before that, their ReadsInputAtStrides.
inline bool register_layer_reads_input(const LayerSizes& s, const Tensor& input) {
  return register_layer_reads(input, s.hidden_size, s.has_lengths, s.has_projection);
}

inline bool register_layer_reads_input_backward(const LayerSizes& s, const Tensor& input) {
#if defined(CPU_CAPABILITY_AVX512)
  return register_layer_reads_input(s, input) &&
         register_layer::backward_fits(s.gate_size / s.hidden_size, s.input_size, s.hidden_size);
#else
  (void)s, (void)input;
  return false;
#endif
}

// Whether the forward's input projection runs on this input [T, B, I] as it is, a batch_first
// tensor's transposed view (its memory holds the rows of [B, T, I] in order): the GEMM takes the
// rows batch-major, and the steps read xg at batch-major strides. Only where xg gets a buffer
// of its own anyway (the inference's: training writes it into the workspace, time-major, and
// the backward reads the time-major copy of the input that the autograd kernel makes) and the
// gate-packed view does not regroup it.
inline bool projects_batch_major_input(const LayerSizes& s, const Tensor& input) {
  return input.device().is_cpu() && input.dim() == 3 && !input.is_contiguous() &&
         input.transpose(0, 1).is_contiguous() && !uses_gate_packing(s, input.scalar_type());
}

// The inference forward's ReadsInputAtStrides: the register layer's, or a batch_first input
// that the input projection takes as it is.
inline bool inference_reads_input_at_strides(const LayerSizes& s, const Tensor& input) {
  return register_layer_reads_input(s, input) || projects_batch_major_input(s, input);
}

}  // namespace cpu
}  // namespace rnnfast
