// The CUDA engine's step kernels: one fused pointwise kernel per time step (forward and
// backward, and the two projection helpers), one thread per (batch row, hidden unit), the math
// from csrc/cells.h. What one thread does is a host and device function (*_unit), so that the
// sequence kernels (sequence_kernels.cuh) reuse it per step and the host emulation runs it on
// the CPU.
#pragma once

#include <cstdint>

#include "../cells.h"
#include "launch.cuh"
#include "types.cuh"

namespace rnnfast {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Arguments of one step. Pointers of "this step" point at row 0 of step t (already offset by
// t * B * columns); "all steps" pointers point at step 0 of a [T, B, columns] tensor.
// ---------------------------------------------------------------------------------------------

template <typename T>
struct ForwardStepArgs {
  int64_t B, H, P, G, W;  // W: workspace columns (0: not saving, or nothing to save)
  int64_t steps, t;       // T and the time index of this step
  bool reverse;
  const int64_t* lengths;  // [B] on the device, or nullptr (every row runs all steps)
  const T* xg;             // [B, G] this step: x W_ih^T + biases
  const T* hg;             // [B, G] h_prev W_hh^T (+ b_hh for GRU)
  T* h;                    // [B, P] the hidden state; without projection read and updated
  T* h_next;               // [B, P] where the new state goes instead of h (the persistent
                           // kernels' double buffer: other blocks still read h), or nullptr
  AccType<T>* c;           // [B, H] LSTM's cell state (accumulation type), else nullptr
  T* out;                  // [B, P] this step's output
  T* ws;                   // [B, W] this step's workspace row block, or nullptr
  T* h_unprojected;        // [B, H] LSTM with projection: the new h before W_hr, else nullptr
};

template <typename T>
struct ProjectionCopyArgs {
  int64_t B, P, steps, t;
  const int64_t* lengths;
  const T* h_projected;  // [B, P] h_unprojected W_hr^T
  T* h;                  // [B, P] state, updated on active rows
  T* out;                // [B, P] this step's output, written on active rows
};

template <typename T>
struct BackwardStepArgs {
  int64_t B, H, P, G, W;
  int64_t steps, t;
  bool reverse;
  const int64_t* lengths;
  const T* grad_output;     // [B, P] this step
  const T* dh;              // [B, P] dLoss/dh from the later steps (the carried gradient)
  AccType<T>* dc;           // [B, H] dLoss/dc carried (accumulation type), or nullptr
  const T* hx;              // [B, P]
  const T* cx;              // [B, H] or nullptr
  const T* output;          // [B, P] this step's output
  const T* ws;              // [B, W] this step's workspace, or nullptr when W == 0
  const T* prev_output;     // [B, P] the output of the step before (in time order: t - 1, or
                            // t + 1 when reverse), nullptr when t is the first of all steps
  const T* prev_ws;         // [B, W] the workspace of that step, or nullptr
  const T* dh_unprojected;  // [B, H] with projection: dLoss/dh before W_hr, else nullptr
  T* dgate_x;               // [B, G] this step
  T* dgate_h;               // [B, G] this step (== dgate_x unless the cell separates them)
  T* dh_direct;             // [B, P] the part of dLoss/dh_prev that skips W_hh
};

template <typename T>
struct ProjectionGradArgs {
  int64_t B, P, steps, t;
  const int64_t* lengths;
  const T* grad_output;  // [B, P] this step
  const T* dh;           // [B, P] carried gradient
  T* dprojected;         // [B, P] this step: grad_output + dh on active rows, 0 elsewhere
};

// A layer's whole time loop as the kernels that run it in one launch see it (the sequence,
// persistent and warp kernels), without projection.
struct LoopShape {
  int64_t B, H, P, G, W;  // P == H; W: workspace columns (0: none written or read)
  int64_t steps;
  bool reverse;
  const int64_t* lengths;  // [B] or nullptr
};

// What those kernels' forward reads and writes.
template <typename T>
struct LoopForwardData {
  const T* xg;    // [T, B, G] x W_ih^T + biases, all steps
  const T* w_hh;  // [G, P]
  const T* b_hh;  // [G] added to every step's hg (GRU's unfoldable b_hh), or nullptr
  T* h;           // [B, P] in: h0, out: h_n
  AccType<T>* c;  // [B, H] LSTM: in c0, out c_n; else nullptr
  T* out;         // [T, B, P]
  T* ws;          // [T, B, W] or nullptr
};

// What those kernels' backward reads and writes.
template <typename T>
struct LoopBackwardData {
  const T* grad_output;  // [T, B, P]
  const T* hx;           // [B, P]
  const T* cx;           // [B, H] or nullptr
  const T* output;       // [T, B, P]
  const T* ws;           // [T, B, W] or nullptr (W == 0)
  const T* w_hh;         // [G, P]
  T* dh;                 // [B, P] in: grad of h_n, out: grad of h0
  AccType<T>* dc;        // [B, H] LSTM: in grad of c_n, out grad of c0; else nullptr
  T* dgate_x;            // [T, B, G]
  T* dgate_h;            // [T, B, G]; the same buffer as dgate_x unless the cell separates
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
    if (j < a.P) {
      a.out[b * a.P + j] = T(A(0));
      if (a.h_next != nullptr) a.h_next[b * a.P + j] = a.h[b * a.P + j];
    }
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
    (a.h_next != nullptr ? a.h_next : a.h)[b * a.P + j] = T(h_new_j);
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
  const int64_t H = a.H, P = a.P, G = a.G, W = a.W, t = a.t;
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
  // The row's first step (in time order) starts from hx / cx; the others from the step before.
  const bool first = a.reverse ? t == length - 1 : t == 0;
  const T* saved_row = W > 0 ? a.ws + b * W : a.output + b * P;
  const bool projecting = a.dh_unprojected != nullptr;
  const A dh_j = projecting ? A(a.dh_unprojected[b * H + j])
                            : A(a.grad_output[b * P + j]) + A(a.dh[b * P + j]);
  const A dc_j = a.dc != nullptr ? a.dc[b * H + j] : A(0);
  A h_prev_j = A(0);
  if (Cell::kReadsPrevHidden) {
    h_prev_j = first ? A(a.hx[b * P + j]) : A(a.prev_output[b * P + j]);
  }
  A c_prev_j = A(0);
  if (Cell::kHasCellState) {
    // LSTM's c_prev: cx, or the c saved by the previous step (after i, f, g, o).
    c_prev_j = first ? A(a.cx[b * H + j]) : A(a.prev_ws[b * W + 4 * H + j]);
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

// A step kernel: thread `index` of [0, threads) runs Unit(args, index), in blocks of
// kThreadsPerBlock threads (step_shape).
template <typename Args, void (*Unit)(const Args&, int64_t)>
struct StepKernel {
  static constexpr int kMaxThreadsPerBlock = kThreadsPerBlock;
#if defined(__CUDACC__)
  static __device__ void run_on_device(const Args& args, int64_t threads) {
    const int64_t index = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (index < threads) Unit(args, index);
  }
#endif
  static void run_on_host(const LaunchShape&, const Args& args, int64_t threads) {
    for (int64_t index = 0; index < threads; ++index) Unit(args, index);
  }
};

inline LaunchShape step_shape(int64_t threads) {
  return {(threads + kThreadsPerBlock - 1) / kThreadsPerBlock, kThreadsPerBlock, 0};
}

}  // namespace cuda
}  // namespace rnnfast
