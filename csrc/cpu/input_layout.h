// How the CPU engine reads a layer's input: where it takes the tensor at its strides (the
// register layer, the inference's batch-major projection) instead of a time-major copy.
#pragma once

#include <ATen/core/Tensor.h>

#include "../layer.h"
#include "capability.h"
#include "layer_view.h"
#include "register_layer.h"

namespace rnnfast {
namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h

#if defined(RNNFAST_LANE_KERNELS)
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
#if defined(RNNFAST_LANE_KERNELS)
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
#if defined(RNNFAST_LANE_KERNELS)
  return register_layer_reads_input(s, input) &&
         register_layer::backward_fits(s.gate_size / s.hidden_size, s.input_size, s.hidden_size);
#else
  (void)s, (void)input;
  return false;
#endif
}

// Whether x [T, B, I] is a batch_first tensor's transposed view: its memory holds the rows of
// [B, T, I] in order.
inline bool is_batch_major(const Tensor& x) {
  return x.device().is_cpu() && x.dim() == 3 && !x.is_contiguous() &&
         x.transpose(0, 1).is_contiguous();
}

// Whether the inference forward's input projection runs on this input [T, B, I] as it is, a
// batch-major one: the GEMM takes the rows batch-major into a buffer of xg of their own, and the
// steps read xg at batch-major strides. Not where the gate-packed view regroups xg.
inline bool projects_batch_major_input(const LayerSizes& s, const Tensor& input) {
  return is_batch_major(input) && !uses_gate_packing(s, input.scalar_type());
}

// The inference forward's ReadsInputAtStrides: the register layer's, or a batch_first input
// that the input projection takes as it is.
inline bool inference_reads_input_at_strides(const LayerSizes& s, const Tensor& input) {
  return register_layer_reads_input(s, input) || projects_batch_major_input(s, input);
}

// A training call takes a batch-major input of at least this many bytes as it is, where W_ih
// has at most kBatchMajorTrainingMaxWeightBytes and a batch row's GEMM (T x I x G) at least
// kBatchMajorTrainingMinRowWork multiply-adds.
constexpr int64_t kBatchMajorTrainingMinBytes = int64_t(64) << 10;
constexpr int64_t kBatchMajorTrainingMaxWeightBytes = int64_t(2) << 20;
constexpr int64_t kBatchMajorTrainingMinRowWork = int64_t(1) << 20;

// Whether a training call's forward and backward take this input [T, B, I] as it is, a
// batch-major one (gate_size, hidden_size: G, H; gate packing regroups the gates and takes a
// copy): the input projection, the input's gradient and W_ih's run as a GEMM per batch row on
// its rows of [B, T, I]. A time-major copy would live as long as the graph: 13% of the peak
// memory of the word language model's 2-layer, 200-unit Elman training step. Below
// kBatchMajorTrainingMinBytes one GEMM on a copy costs less than a GEMM per batch row; so it
// does for small GEMMs per row (fashion-MNIST's 128 rows of 28 x 28 x 120: 20% slower) and past
// kBatchMajorTrainingMaxWeightBytes, where each of those GEMMs reads all of W_ih and W_ih's
// gradient is summed over them, out of a core's cache (16 and 64 rows of 512 LSTM units
// trained 17% and 5% slower, 64 rows of 512 GRU units 8%). In bfloat16 and float16, whose
// GEMMs go through ATen at tens of microseconds a call, up to kBatchMajorReducedMaxRows batch
// rows (64 rows of 64 bfloat16 LSTM units spent half their training step in the GEMMs per row;
// the copy took 16 and 20 rows of Elman units over torch.nn's peak memory).
constexpr int64_t kBatchMajorReducedMaxRows = 32;

inline bool trains_on_batch_major_input(const Tensor& input, int64_t gate_size, int64_t hidden_size,
                                        bool has_lengths, bool has_projection) {
  const int64_t element_bytes = int64_t(input.element_size());
  const bool blas_type = input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble;
  return is_batch_major(input) && (blas_type || input.size(1) <= kBatchMajorReducedMaxRows) &&
         input.numel() * element_bytes >= kBatchMajorTrainingMinBytes &&
         gate_size * input.size(2) * element_bytes <= kBatchMajorTrainingMaxWeightBytes &&
         input.size(0) * input.size(2) * gate_size >= kBatchMajorTrainingMinRowWork &&
         !uses_gate_packing(input.scalar_type(), input.size(1), hidden_size, has_lengths,
                            has_projection);
}

inline bool trains_on_batch_major_input(const LayerSizes& s, const Tensor& input) {
  return trains_on_batch_major_input(input, s.gate_size, s.hidden_size, s.has_lengths,
                                     s.has_projection);
}

// The training forward's and the backward's ReadsInputAtStrides: the register layer's, or a
// batch-major input the call trains on as it is.
inline bool training_reads_input_at_strides(const LayerSizes& s, const Tensor& input) {
  return register_layer_reads_input(s, input) || trains_on_batch_major_input(s, input);
}

inline bool backward_reads_input_at_strides(const LayerSizes& s, const Tensor& input) {
  return register_layer_reads_input_backward(s, input) || trains_on_batch_major_input(s, input);
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
