// The CUDA engine's pointwise kernels: one fused kernel per time step (forward and backward),
// one thread per (batch row, hidden unit), the math from csrc/cells.h.
//
// This header includes no torch header, so that nvcc can compile (and the test suite can
// compile-check) the kernels on their own: tests/test_cuda_compile.py builds kernels.cu, which
// instantiates every cell x dtype, with nothing but nvcc. The host code that allocates buffers,
// runs the GEMMs through ATen and calls the launchers below is csrc/cuda/engine.cu.
//
// Storage types T: float, double, and rnnfast::cuda::Half / BFloat16 (two bytes each, the bit
// layout of at::Half / at::BFloat16, so engine.cu passes ATen's data pointers reinterpreted).
// Accumulation type A = AccType<T>: double for double, float otherwise (at::opmath_type's).
//
// Each launcher launches exactly one kernel on `stream` (nothing when there is no work) and
// returns; the caller checks the launch (C10_CUDA_KERNEL_LAUNCH_CHECK in engine.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../cells.h"

namespace rnnfast {
namespace cuda {

// Two-byte float storage with explicit conversions through the CUDA intrinsics, which exist
// whatever __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__ say (torch's
// extension build defines them, which removes __half's own conversion operators).
struct alignas(2) Half {
  unsigned short bits;
  Half() = default;
  __host__ __device__ __forceinline__ explicit Half(float value)
      : bits(__half_as_ushort(__float2half_rn(value))) {}
  __host__ __device__ __forceinline__ explicit operator float() const {
    return __half2float(__ushort_as_half(bits));
  }
};

struct alignas(2) BFloat16 {
  unsigned short bits;
  BFloat16() = default;
  __host__ __device__ __forceinline__ explicit BFloat16(float value)
      : bits(__bfloat16_as_ushort(__float2bfloat16_rn(value))) {}
  __host__ __device__ __forceinline__ explicit operator float() const {
    return __bfloat162float(__ushort_as_bfloat16(bits));
  }
};

static_assert(sizeof(Half) == 2 && sizeof(BFloat16) == 2, "two-byte storage types");

template <typename T>
struct AccTypeOf {
  using type = float;
};
template <>
struct AccTypeOf<double> {
  using type = double;
};
template <typename T>
using AccType = typename AccTypeOf<T>::type;

// ---------------------------------------------------------------------------------------------
// Arguments of one step. Pointers of "this step" point at row 0 of step t (already offset by
// t * B * columns); "all steps" pointers point at step 0 of a [T, B, columns] tensor.
// ---------------------------------------------------------------------------------------------

template <typename T>
struct ForwardStepArgs {
  int64_t B, H, P, G, W;     // W: workspace columns (0: not saving, or nothing to save)
  int64_t steps, t;          // T and the time index of this step
  bool reverse;
  const int64_t* lengths;    // [B] on the device, or nullptr (every row runs all steps)
  const T* xg;               // [B, G] this step: x W_ih^T + biases
  const T* hg;               // [B, G] h_prev W_hh^T (+ b_hh for GRU)
  T* h;                      // [B, P] the hidden state; without projection read and updated
  AccType<T>* c;             // [B, H] LSTM's cell state (accumulation type), else nullptr
  T* out;                    // [B, P] this step's output
  T* ws;                     // [B, W] this step's workspace row block, or nullptr
  T* h_unprojected;          // [B, H] LSTM with projection: the new h before W_hr, else nullptr
};

template <typename T>
struct ProjectionCopyArgs {
  int64_t B, P, steps, t;
  const int64_t* lengths;
  const T* h_projected;      // [B, P] h_unprojected W_hr^T
  T* h;                      // [B, P] state, updated on active rows
  T* out;                    // [B, P] this step's output, written on active rows
};

template <typename T>
struct BackwardStepArgs {
  int64_t B, H, P, G, W;
  int64_t steps, t;
  bool reverse;
  const int64_t* lengths;
  const T* grad_output;      // [B, P] this step
  const T* dh;               // [B, P] dLoss/dh from the later steps (the carried gradient)
  AccType<T>* dc;            // [B, H] dLoss/dc carried (accumulation type), or nullptr
  const T* hx;               // [B, P]
  const T* cx;               // [B, H] or nullptr
  const T* output;           // [T, B, P] all steps
  const T* ws;               // [T, B, W] all steps, or nullptr when W == 0
  const T* dh_unprojected;   // [B, H] with projection: dLoss/dh before W_hr, else nullptr
  T* dgate_x;                // [B, G] this step
  T* dgate_h;                // [B, G] this step (== dgate_x unless the cell separates them)
  T* dh_direct;              // [B, P] the part of dLoss/dh_prev that skips W_hh
};

template <typename T>
struct ProjectionGradArgs {
  int64_t B, P, steps, t;
  const int64_t* lengths;
  const T* grad_output;      // [B, P] this step
  const T* dh;               // [B, P] carried gradient
  T* dprojected;             // [B, P] this step: grad_output + dh on active rows, 0 elsewhere
};

// ---------------------------------------------------------------------------------------------
// What one thread does (host and device functions, so a test build can run them on the host)
// ---------------------------------------------------------------------------------------------

constexpr int kThreadsPerBlock = 256;

RNNFAST_HD int64_t length_of(const int64_t* lengths, int64_t b, int64_t steps) {
  return lengths != nullptr ? lengths[b] : steps;
}

// Thread `index` = b * H + j: hidden unit j of batch row b.
template <typename Cell, typename T>
RNNFAST_HD void forward_step_unit(const ForwardStepArgs<T>& a, int64_t index) {
  using A = AccType<T>;
  const int64_t b = index / a.H;
  const int64_t j = index - b * a.H;
  T* ws_row = a.ws != nullptr ? a.ws + b * a.W : nullptr;
  if (a.t >= length_of(a.lengths, b, a.steps)) {
    // Inactive: the state is kept, the output and the saved values are zero.
    if (j < a.P) a.out[b * a.P + j] = T(A(0));
    if (ws_row != nullptr) {
      for (int64_t m = j; m < a.W; m += a.H) ws_row[m] = T(A(0));
    }
    return;
  }
  const A h_prev_j = Cell::kReadsPrevHidden ? A(a.h[b * a.P + j]) : A(0);
  const A c_prev_j = a.c != nullptr ? a.c[b * a.H + j] : A(0);
  A h_new_j = A(0), c_new_j = A(0);
  Cell::forward(static_cast<int>(a.H), static_cast<int>(j), a.xg + b * a.G, a.hg + b * a.G,
                h_prev_j, c_prev_j, h_new_j, c_new_j, ws_row);
  if (a.c != nullptr) a.c[b * a.H + j] = c_new_j;
  if (a.h_unprojected != nullptr) {
    a.h_unprojected[b * a.H + j] = T(h_new_j);
    if (ws_row != nullptr) ws_row[Cell::kSavedPerUnit * a.H + j] = T(h_new_j);
  } else {
    a.h[b * a.P + j] = T(h_new_j);
    a.out[b * a.P + j] = T(h_new_j);
  }
}

// Thread `index` = b * P + k.
template <typename T>
RNNFAST_HD void projection_copy_unit(const ProjectionCopyArgs<T>& a, int64_t index) {
  const int64_t b = index / a.P;
  if (a.t >= length_of(a.lengths, b, a.steps)) return;
  const T value = a.h_projected[index];
  a.h[index] = value;
  a.out[index] = value;
}

// Thread `index` = b * P + k.
template <typename T>
RNNFAST_HD void projection_grad_unit(const ProjectionGradArgs<T>& a, int64_t index) {
  using A = AccType<T>;
  const int64_t b = index / a.P;
  a.dprojected[index] = a.t < length_of(a.lengths, b, a.steps)
                            ? T(A(a.grad_output[index]) + A(a.dh[index]))
                            : T(A(0));
}

// Thread `index` = b * H + j.
template <typename Cell, typename T>
RNNFAST_HD void backward_step_unit(const BackwardStepArgs<T>& a, int64_t index) {
  using A = AccType<T>;
  const int64_t B = a.B, H = a.H, P = a.P, G = a.G, W = a.W, t = a.t;
  const int64_t b = index / H;
  const int64_t j = index - b * H;
  T* dgx_row = a.dgate_x + b * G;
  T* dgh_row = a.dgate_h + b * G;
  const int64_t length = length_of(a.lengths, b, a.steps);
  if (t >= length) {
    // The row's state passes through this step untouched.
    for (int64_t m = j; m < G; m += H) dgx_row[m] = T(A(0));
    if (Cell::kSeparateHiddenGateGrad) {
      for (int64_t m = j; m < G; m += H) dgh_row[m] = T(A(0));
    }
    if (j < P) a.dh_direct[b * P + j] = a.dh[b * P + j];
    return;
  }
  const bool first = a.reverse ? t == length - 1 : t == 0;
  const int64_t row = t * B + b;
  const int64_t prev_row = (a.reverse ? t + 1 : t - 1) * B + b;  // read only when !first
  const T* saved_row = W > 0 ? a.ws + row * W : a.output + row * P;
  const bool projecting = a.dh_unprojected != nullptr;
  const A dh_j = projecting ? A(a.dh_unprojected[b * H + j])
                            : A(a.grad_output[b * P + j]) + A(a.dh[b * P + j]);
  const A dc_j = a.dc != nullptr ? a.dc[b * H + j] : A(0);
  A h_prev_j = A(0);
  if (Cell::kReadsPrevHidden) {
    h_prev_j = first ? A(a.hx[b * P + j]) : A(a.output[prev_row * P + j]);
  }
  A c_prev_j = A(0);
  if (Cell::kHasCellState) {
    // LSTM's c_prev: cx, or the c saved by the previous step (after i, f, g, o).
    c_prev_j = first ? A(a.cx[b * H + j]) : A(a.ws[prev_row * W + 4 * H + j]);
  }
  A dc_prev_j = A(0), dh_prev_direct_j = A(0);
  Cell::backward(static_cast<int>(H), static_cast<int>(j), saved_row, h_prev_j, c_prev_j, dh_j,
                 dc_j, dgx_row, dgh_row, dc_prev_j, dh_prev_direct_j);
  if (a.dc != nullptr) a.dc[b * H + j] = dc_prev_j;
  if (projecting) {
    if (j < P) a.dh_direct[b * P + j] = T(A(0));
  } else {
    a.dh_direct[b * P + j] = T(dh_prev_direct_j);
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels and their launchers (host). Explicitly instantiated for every cell x storage type in
// kernels.cu.
// ---------------------------------------------------------------------------------------------

inline unsigned int blocks_for(int64_t threads) {
  return static_cast<unsigned int>((threads + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

#if defined(__CUDACC__)

template <typename Cell, typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    forward_step_kernel(const ForwardStepArgs<T> args, int64_t threads) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index < threads) forward_step_unit<Cell, T>(args, index);
}

template <typename Cell, typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    backward_step_kernel(const BackwardStepArgs<T> args, int64_t threads) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index < threads) backward_step_unit<Cell, T>(args, index);
}

template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    projection_copy_kernel(const ProjectionCopyArgs<T> args, int64_t threads) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index < threads) projection_copy_unit<T>(args, index);
}

template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    projection_grad_kernel(const ProjectionGradArgs<T> args, int64_t threads) {
  const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (index < threads) projection_grad_unit<T>(args, index);
}

#endif  // __CUDACC__

// Each launcher launches one kernel of `threads` threads on `stream`, none when there is no
// work. Compiled by a plain C++ compiler (the host-emulation test build, see
// RNNFAST_CUDA_HOST_EMULATION in engine.cu) they run every thread's body in a loop on the
// calling thread instead; the extension setup.py builds always compiles them with nvcc.
template <typename Cell, typename T>
void launch_forward_step(const ForwardStepArgs<T>& args, cudaStream_t stream) {
  const int64_t threads = args.B * args.H;
  if (threads <= 0) return;
#if defined(__CUDACC__)
  forward_step_kernel<Cell, T><<<blocks_for(threads), kThreadsPerBlock, 0, stream>>>(args,
                                                                                     threads);
#else
  (void)stream;
  for (int64_t index = 0; index < threads; ++index) forward_step_unit<Cell, T>(args, index);
#endif
}

template <typename Cell, typename T>
void launch_backward_step(const BackwardStepArgs<T>& args, cudaStream_t stream) {
  const int64_t threads = args.B * args.H;
  if (threads <= 0) return;
#if defined(__CUDACC__)
  backward_step_kernel<Cell, T><<<blocks_for(threads), kThreadsPerBlock, 0, stream>>>(args,
                                                                                      threads);
#else
  (void)stream;
  for (int64_t index = 0; index < threads; ++index) backward_step_unit<Cell, T>(args, index);
#endif
}

template <typename T>
void launch_projection_copy(const ProjectionCopyArgs<T>& args, cudaStream_t stream) {
  const int64_t threads = args.B * args.P;
  if (threads <= 0) return;
#if defined(__CUDACC__)
  projection_copy_kernel<T><<<blocks_for(threads), kThreadsPerBlock, 0, stream>>>(args, threads);
#else
  (void)stream;
  for (int64_t index = 0; index < threads; ++index) projection_copy_unit<T>(args, index);
#endif
}

template <typename T>
void launch_projection_grad(const ProjectionGradArgs<T>& args, cudaStream_t stream) {
  const int64_t threads = args.B * args.P;
  if (threads <= 0) return;
#if defined(__CUDACC__)
  projection_grad_kernel<T><<<blocks_for(threads), kThreadsPerBlock, 0, stream>>>(args, threads);
#else
  (void)stream;
  for (int64_t index = 0; index < threads; ++index) projection_grad_unit<T>(args, index);
#endif
}

// Every cell x storage type, for explicit instantiation (kernels.cu) and its declaration
// (engine.cu, via the extern declarations below). X(Cell, T) and Y(T) are macros.
#define RNNFAST_CUDA_FOR_EACH_TYPE(Y) \
  Y(float)                            \
  Y(double)                           \
  Y(::rnnfast::cuda::Half)            \
  Y(::rnnfast::cuda::BFloat16)

#define RNNFAST_CUDA_FOR_EACH_CELL_OF_TYPE(X, T)                        \
  X(::rnnfast::LstmCell<::rnnfast::Activation::Tanh>, T)                \
  X(::rnnfast::LstmCell<::rnnfast::Activation::Relu>, T)                \
  X(::rnnfast::LstmCell<::rnnfast::Activation::Sigmoid>, T)             \
  X(::rnnfast::GruCell, T)                                              \
  X(::rnnfast::ElmanCell<::rnnfast::Activation::Tanh>, T)               \
  X(::rnnfast::ElmanCell<::rnnfast::Activation::Relu>, T)               \
  X(::rnnfast::ElmanCell<::rnnfast::Activation::Sigmoid>, T)

#define RNNFAST_CUDA_CELL_LAUNCHERS(PREFIX, Cell, T)                                       \
  PREFIX template void launch_forward_step<Cell, T>(const ForwardStepArgs<T>&, cudaStream_t); \
  PREFIX template void launch_backward_step<Cell, T>(const BackwardStepArgs<T>&, cudaStream_t);

#define RNNFAST_CUDA_TYPE_LAUNCHERS(PREFIX, T)                                                \
  PREFIX template void launch_projection_copy<T>(const ProjectionCopyArgs<T>&, cudaStream_t); \
  PREFIX template void launch_projection_grad<T>(const ProjectionGradArgs<T>&, cudaStream_t);

#define RNNFAST_CUDA_EXTERN_CELL(Cell, T) RNNFAST_CUDA_CELL_LAUNCHERS(extern, Cell, T)
#define RNNFAST_CUDA_EXTERN_TYPE(T)                       \
  RNNFAST_CUDA_TYPE_LAUNCHERS(extern, T)                  \
  RNNFAST_CUDA_FOR_EACH_CELL_OF_TYPE(RNNFAST_CUDA_EXTERN_CELL, T)

// Declared here, defined once in kernels.cu: the translation units that only call the
// launchers (engine.cu) do not compile the kernels again.
RNNFAST_CUDA_FOR_EACH_TYPE(RNNFAST_CUDA_EXTERN_TYPE)

}  // namespace cuda
}  // namespace rnnfast
