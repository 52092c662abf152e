// The host functions engine.cu and options_engine.cu call to run the CUDA engine's kernels,
// one per kernel, and the lists of cells x storage types they are compiled for. Each launcher
// launches exactly one kernel on `stream` (nothing when there is no work) through launch()
// (launch.cuh) and returns; the caller checks the launch (C10_CUDA_KERNEL_LAUNCH_CHECK, host.h).
//
// The launchers are explicitly instantiated in one translation unit per storage type
// (kernels_float.cu, kernels_double.cu, kernels_half.cu, kernels_bfloat16.cu; the cell
// options' in the float and double ones only), which the build compiles in parallel (ninja);
// the host code sees only the extern declarations at the end of this file. No torch header is
// included here or by the headers below, so tests/test_cuda_compile.py compiles those files with
// nvcc alone.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../cells.h"
#include "launch.cuh"
#include "options_kernels.cuh"
#include "persistent_kernels.cuh"
#include "sequence_kernels.cuh"
#include "step_kernels.cuh"
#include "types.cuh"
#include "warp_kernels.cuh"

namespace rnnfast {
namespace cuda {

template <typename Cell, typename T>
void launch_forward_step(const ForwardStepArgs<T>& args, cudaStream_t stream) {
  const int64_t threads = args.B * args.H;
  launch<StepKernel<ForwardStepArgs<T>, forward_step_unit<Cell, T>>>(step_shape(threads), stream,
                                                                     args, threads);
}

template <typename Cell, typename T>
void launch_backward_step(const BackwardStepArgs<T>& args, cudaStream_t stream) {
  const int64_t threads = args.B * args.H;
  launch<StepKernel<BackwardStepArgs<T>, backward_step_unit<Cell, T>>>(step_shape(threads), stream,
                                                                       args, threads);
}

// One launch of `plan.blocks` blocks for the whole sequence, forward or backward by the type of
// `args` (plan from plan_sequence with the same sizes).
template <typename Cell, typename T, typename Args>
void launch_sequence(const Args& args, const SequencePlan& plan, cudaStream_t stream) {
  launch<SequenceKernel<Cell, T, Args>>({plan.blocks, plan.threads, plan.shared_bytes}, stream,
                                        args);
}

// One cooperative launch of `plan.blocks` blocks for the whole sequence, forward or backward by
// the type of `args` (plan from plan_persistent with the same sizes).
template <typename Cell, typename T, typename Args>
void launch_persistent(const Args& args, const PersistentPlan& plan, cudaStream_t stream) {
  launch_cooperative<PersistentKernel<Cell, T, Args>>(
      {plan.blocks, plan.threads, plan.shared_bytes}, stream, args);
}

// One launch of a warp per batch row for the whole sequence, forward or backward by the type of
// `args` (for layers where warp_kernels_fit).
template <typename Cell, typename T, typename Args>
void launch_warp(const Args& args, cudaStream_t stream) {
  launch<WarpKernel<Cell, T, Args>>(warp_shape(args.B), stream, args);
}

template <typename T>
void launch_projection_copy(const ProjectionCopyArgs<T>& args, cudaStream_t stream) {
  const int64_t threads = args.B * args.P;
  launch<StepKernel<ProjectionCopyArgs<T>, projection_copy_unit<T>>>(step_shape(threads), stream,
                                                                     args, threads);
}

template <typename T>
void launch_projection_grad(const ProjectionGradArgs<T>& args, cudaStream_t stream) {
  const int64_t threads = args.B * args.P;
  launch<StepKernel<ProjectionGradArgs<T>, projection_grad_unit<T>>>(step_shape(threads), stream,
                                                                     args, threads);
}

// The layer with cell options (options_kernels.cuh), float and double only.
template <typename Cell, typename T>
void launch_options_forward_row(const OptionsForwardArgs<T>& args, cudaStream_t stream) {
  launch<RowKernel<OptionsForwardArgs<T>, AccType<T>, options_forward_row<Cell, T>>>(
      row_shape(args.B), stream, args);
}

template <typename Cell, typename T>
void launch_options_backward_row(const OptionsBackwardArgs<T>& args, cudaStream_t stream) {
  launch<RowKernel<OptionsBackwardArgs<T>, AccType<T>, options_backward_row<Cell, T>>>(
      row_shape(args.B), stream, args);
}

template <typename T>
void launch_options_projection(const OptionsProjectionArgs<T>& args, cudaStream_t stream) {
  const int64_t threads = args.B * args.P;
  launch<StepKernel<OptionsProjectionArgs<T>, options_projection_unit<T>>>(step_shape(threads),
                                                                           stream, args, threads);
}

template <typename T>
void launch_options_grad_split(const OptionsGradSplitArgs<T>& args, cudaStream_t stream) {
  const int64_t threads = args.B * args.P;
  launch<StepKernel<OptionsGradSplitArgs<T>, options_grad_split_unit<T>>>(step_shape(threads),
                                                                          stream, args, threads);
}

template <typename T>
void launch_options_carry(const OptionsCarryArgs<T>& args, cudaStream_t stream) {
  const int64_t threads = args.B * args.P;
  launch<StepKernel<OptionsCarryArgs<T>, options_carry_unit<T>>>(step_shape(threads), stream, args,
                                                                 threads);
}

// `rows` rows of the input normalisation's backward (T * B).
template <typename T>
void launch_options_norm_backward(const OptionsNormBackwardArgs<T>& args, int64_t rows,
                                  cudaStream_t stream) {
  launch<RowKernel<OptionsNormBackwardArgs<T>, AccType<T>, options_norm_backward_row<T>>>(
      row_shape(rows), stream, args);
}

// Every cell x storage type, for explicit instantiation (kernels_<type>.cu) and its declaration
// (engine.cu, via the extern declarations below). X(Cell, T) and Y(T) are macros.
#define RNNFAST_CUDA_FOR_EACH_TYPE(Y) \
  Y(float)                            \
  Y(double)                           \
  Y(::rnnfast::cuda::Half)            \
  Y(::rnnfast::cuda::BFloat16)

#define RNNFAST_CUDA_FOR_EACH_CELL_OF_TYPE(X, T)            \
  X(::rnnfast::LstmCell<::rnnfast::Activation::Tanh>, T)    \
  X(::rnnfast::LstmCell<::rnnfast::Activation::Relu>, T)    \
  X(::rnnfast::LstmCell<::rnnfast::Activation::Sigmoid>, T) \
  X(::rnnfast::GruCell, T)                                  \
  X(::rnnfast::ElmanCell<::rnnfast::Activation::Tanh>, T)   \
  X(::rnnfast::ElmanCell<::rnnfast::Activation::Relu>, T)   \
  X(::rnnfast::ElmanCell<::rnnfast::Activation::Sigmoid>, T)

#define RNNFAST_CUDA_CELL_LAUNCHERS(PREFIX, Cell, T)                                            \
  PREFIX template void launch_forward_step<Cell, T>(const ForwardStepArgs<T>&, cudaStream_t);   \
  PREFIX template void launch_backward_step<Cell, T>(const BackwardStepArgs<T>&, cudaStream_t); \
  PREFIX template void launch_sequence<Cell, T, SequenceForwardArgs<T>>(                        \
      const SequenceForwardArgs<T>&, const SequencePlan&, cudaStream_t);                        \
  PREFIX template void launch_sequence<Cell, T, SequenceBackwardArgs<T>>(                       \
      const SequenceBackwardArgs<T>&, const SequencePlan&, cudaStream_t);                       \
  PREFIX template void launch_persistent<Cell, T, PersistentForwardArgs<T>>(                    \
      const PersistentForwardArgs<T>&, const PersistentPlan&, cudaStream_t);                    \
  PREFIX template void launch_persistent<Cell, T, PersistentBackwardArgs<T>>(                   \
      const PersistentBackwardArgs<T>&, const PersistentPlan&, cudaStream_t);                   \
  PREFIX template void launch_warp<Cell, T, WarpForwardArgs<T>>(const WarpForwardArgs<T>&,      \
                                                                cudaStream_t);                  \
  PREFIX template void launch_warp<Cell, T, WarpBackwardArgs<T>>(const WarpBackwardArgs<T>&,    \
                                                                 cudaStream_t);

#define RNNFAST_CUDA_TYPE_LAUNCHERS(PREFIX, T)                                                \
  PREFIX template void launch_projection_copy<T>(const ProjectionCopyArgs<T>&, cudaStream_t); \
  PREFIX template void launch_projection_grad<T>(const ProjectionGradArgs<T>&, cudaStream_t);

// The cell options' launchers of storage type T (float and double).
#define RNNFAST_CUDA_OPTIONS_CELL_LAUNCHERS(PREFIX, Cell, T)                               \
  PREFIX template void launch_options_forward_row<Cell, T>(const OptionsForwardArgs<T>&,   \
                                                           cudaStream_t);                  \
  PREFIX template void launch_options_backward_row<Cell, T>(const OptionsBackwardArgs<T>&, \
                                                            cudaStream_t);

#define RNNFAST_CUDA_OPTIONS_TYPE_LAUNCHERS(PREFIX, T)                                             \
  PREFIX template void launch_options_projection<T>(const OptionsProjectionArgs<T>&,               \
                                                    cudaStream_t);                                 \
  PREFIX template void launch_options_grad_split<T>(const OptionsGradSplitArgs<T>&, cudaStream_t); \
  PREFIX template void launch_options_carry<T>(const OptionsCarryArgs<T>&, cudaStream_t);          \
  PREFIX template void launch_options_norm_backward<T>(const OptionsNormBackwardArgs<T>&, int64_t, \
                                                       cudaStream_t);

#define RNNFAST_CUDA_EXTERN_CELL(Cell, T) RNNFAST_CUDA_CELL_LAUNCHERS(extern, Cell, T)
#define RNNFAST_CUDA_EXTERN_TYPE(T)      \
  RNNFAST_CUDA_TYPE_LAUNCHERS(extern, T) \
  RNNFAST_CUDA_FOR_EACH_CELL_OF_TYPE(RNNFAST_CUDA_EXTERN_CELL, T)

// The definitions of every launcher of storage type T, for its kernels_<type>.cu.
#define RNNFAST_CUDA_DEFINE_CELL(Cell, T) RNNFAST_CUDA_CELL_LAUNCHERS(, Cell, T)
#define RNNFAST_CUDA_DEFINE_TYPE(T) \
  RNNFAST_CUDA_TYPE_LAUNCHERS(, T)  \
  RNNFAST_CUDA_FOR_EACH_CELL_OF_TYPE(RNNFAST_CUDA_DEFINE_CELL, T)

#define RNNFAST_CUDA_EXTERN_OPTIONS_CELL(Cell, T) \
  RNNFAST_CUDA_OPTIONS_CELL_LAUNCHERS(extern, Cell, T)
#define RNNFAST_CUDA_EXTERN_OPTIONS_TYPE(T)      \
  RNNFAST_CUDA_OPTIONS_TYPE_LAUNCHERS(extern, T) \
  RNNFAST_CUDA_FOR_EACH_CELL_OF_TYPE(RNNFAST_CUDA_EXTERN_OPTIONS_CELL, T)

// The definitions of the cell options' launchers of storage type T (float, double), for its
// kernels_<type>.cu.
#define RNNFAST_CUDA_DEFINE_OPTIONS_CELL(Cell, T) RNNFAST_CUDA_OPTIONS_CELL_LAUNCHERS(, Cell, T)
#define RNNFAST_CUDA_DEFINE_OPTIONS_TYPE(T) \
  RNNFAST_CUDA_OPTIONS_TYPE_LAUNCHERS(, T)  \
  RNNFAST_CUDA_FOR_EACH_CELL_OF_TYPE(RNNFAST_CUDA_DEFINE_OPTIONS_CELL, T)

// Declared here, defined once in kernels_<type>.cu: the translation units that only call the
// launchers (engine.cu) do not compile the kernels again.
RNNFAST_CUDA_FOR_EACH_TYPE(RNNFAST_CUDA_EXTERN_TYPE)
RNNFAST_CUDA_EXTERN_OPTIONS_TYPE(float)
RNNFAST_CUDA_EXTERN_OPTIONS_TYPE(double)

}  // namespace cuda
}  // namespace rnnfast
