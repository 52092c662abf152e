// The CUDA engine's warp kernels: the whole time loop of the smallest layers (every gate of a
// batch row on one warp: kGates * H <= 32) in one launch, one warp per batch row, everything in
// registers: no shared memory and no block barrier per step, only warp shuffles. Opt-in
// (RNNFAST_CUDA_WARP_KERNELS=1, engine.cu) until they have passed the CUDA tests on a GPU.
//
// Forward, lane l of a row's warp: gate row l of W_hh in registers (l < G), unit l's h and c
// (l < H). A step is the recurrent product of gate row l (h_k read from lane k by a shuffle),
// then unit j's gates gathered from lanes k * H + j and the cell (csrc/cells.h, for one unit),
// then the output and saved values to memory. Backward, lane l: column l of W_hh in registers,
// unit l's cell backward, then dh_prev of column l from every gate's gradient (a shuffle per
// gate). Values are rounded to the storage type T where the other paths store them in memory
// (hg, h, the gate gradients, dh), so the paths agree bit for bit in float and double.
//
// The host emulation (RNNFAST_CUDA_HOST_EMULATION) runs the 32 lanes of a warp as 32 fibers
// on one host thread that meet at every shuffle (HostWarp), so it runs this very code, lane by
// lane.
#pragma once

#include <cstdint>

#if !defined(__CUDACC__)
#include <ucontext.h>

#include <memory>
#include <stdexcept>
#endif

#include "../cells.h"
#include "launch.cuh"
#include "step_kernels.cuh"
#include "types.cuh"

namespace rnnfast {
namespace cuda {

constexpr int kWarpLanes = 32;
constexpr int64_t kWarpRowsPerBlock = 4;

// The layer as the warp kernels of both directions see it.
using WarpShape = LoopShape;

template <typename T>
struct WarpForwardArgs : WarpShape, LoopForwardData<T> {};

template <typename T>
struct WarpBackwardArgs : WarpShape, LoopBackwardData<T> {};

#if defined(__CUDACC__)
// A warp on the device: this thread's lane, and __shfl_sync over the whole warp.
struct DeviceWarp {
  __device__ int lane() const { return static_cast<int>(threadIdx.x) % kWarpLanes; }
  template <typename A>
  __device__ A shuffle(A value, int source_lane) const {
    return __shfl_sync(0xffffffffu, value, source_lane);
  }
};
#endif

// Element k of a small array indexed at run time, as a chain of selects: on the device an
// indexed register array would live in local memory.
template <typename A, int N>
RNNFAST_HD A pick(const A (&values)[N], int k) {
  A value = values[0];
  for (int i = 1; i < N; ++i) value = k == i ? values[i] : value;
  return value;
}

// The time index of processing step s of the forward.
RNNFAST_HD int64_t warp_time(const WarpShape& a, int64_t s) {
  return a.reverse ? a.steps - 1 - s : s;
}

// Batch row b's whole forward time loop, run by every lane of one warp.
template <typename Cell, typename T, typename Warp>
RNNFAST_HD void warp_row_forward(const WarpForwardArgs<T>& a, int64_t b, const Warp& warp) {
  using A = AccType<T>;
  constexpr int kGates = Cell::kGates;
  constexpr int kSaved = Cell::kSavedPerUnit > 0 ? Cell::kSavedPerUnit : 1;
  const int lane = warp.lane();
  const int64_t B = a.B, H = a.H, P = a.P, G = a.G, W = a.W;
  const bool gate_lane = lane < G, unit_lane = lane < H;
  A w_row[kWarpLanes];  // W_hh[lane, k]
  for (int k = 0; k < kWarpLanes; ++k) {
    w_row[k] = gate_lane && k < P ? A(a.w_hh[lane * P + k]) : A(0);
  }
  const A b_hh = gate_lane && a.b_hh != nullptr ? A(a.b_hh[lane]) : A(0);
  A h = lane < P ? A(a.h[b * P + lane]) : A(0);
  A c = unit_lane && a.c != nullptr ? a.c[b * H + lane] : A(0);
  const int64_t length = length_of(a.lengths, b, a.steps);
  for (int64_t s = 0; s < a.steps; ++s) {
    const int64_t t = warp_time(a, s), row = t * B + b;
    const A x = gate_lane ? A(a.xg[row * G + lane]) : A(0);
    A acc = b_hh;
    for (int k = 0; k < kWarpLanes; ++k) {
      const A h_k = warp.shuffle(h, k);
      if (k < P) acc += w_row[k] * h_k;
    }
    const A hg = A(T(acc));
    // Unit `lane`'s gates, from lanes k * H + lane (every lane takes part in the shuffles).
    T xg_unit[kGates], hg_unit[kGates];
    for (int k = 0; k < kGates; ++k) {
      const int source = unit_lane ? static_cast<int>(k * H) + lane : 0;
      xg_unit[k] = T(warp.shuffle(x, source));
      hg_unit[k] = T(warp.shuffle(hg, source));
    }
    if (!unit_lane) continue;
    T* ws_row = a.ws != nullptr ? a.ws + row * W : nullptr;
    if (t >= length) {
      // Inactive: the state is kept, the output and the saved values are zero.
      a.out[row * P + lane] = T(A(0));
      if (ws_row != nullptr) {
        for (int64_t m = lane; m < W; m += H) ws_row[m] = T(A(0));
      }
      continue;
    }
    T saved[kSaved];
    A h_new = A(0), c_new = A(0);
    Cell::forward(1, 0, xg_unit, hg_unit, h, c, h_new, c_new, saved);
    if (ws_row != nullptr) {
      for (int k = 0; k < Cell::kSavedPerUnit; ++k) ws_row[k * H + lane] = saved[k];
    }
    c = c_new;
    h = A(T(h_new));
    a.out[row * P + lane] = T(h_new);
  }
  if (lane < P) a.h[b * P + lane] = T(h);
  if (unit_lane && a.c != nullptr) a.c[b * H + lane] = c;
}

// Batch row b's whole backward time loop (processing step q is time step T - 1 - q, q when
// reverse), run by every lane of one warp.
template <typename Cell, typename T, typename Warp>
RNNFAST_HD void warp_row_backward(const WarpBackwardArgs<T>& a, int64_t b, const Warp& warp) {
  using A = AccType<T>;
  constexpr int kGates = Cell::kGates;
  const int lane = warp.lane();
  const int64_t B = a.B, H = a.H, P = a.P, G = a.G, W = a.W;
  const bool unit_lane = lane < H;
  A w_column[kWarpLanes];  // W_hh[g, lane]
  for (int g = 0; g < kWarpLanes; ++g) {
    w_column[g] = lane < P && g < G ? A(a.w_hh[g * P + lane]) : A(0);
  }
  A dh = lane < P ? A(a.dh[b * P + lane]) : A(0);  // the carried dLoss/dh, as stored
  A dc = unit_lane && a.dc != nullptr ? a.dc[b * H + lane] : A(0);
  const int64_t length = length_of(a.lengths, b, a.steps);
  for (int64_t q = 0; q < a.steps; ++q) {
    const int64_t t = a.reverse ? q : a.steps - 1 - q, row = t * B + b;
    // Unit `lane`'s gate gradients of this step (zero where the row is inactive).
    A dgx[kGates], dgh[kGates];
    for (int k = 0; k < kGates; ++k) dgx[k] = dgh[k] = A(0);
    A dh_direct = dh;  // an inactive row passes its gradient through
    if (unit_lane && t < length) {
      // The row's first step (in time order) starts from hx / cx; the others from the step
      // before.
      const bool first = a.reverse ? t == length - 1 : t == 0;
      const int64_t prev_row = (a.reverse ? t + 1 : t - 1) * B + b;
      T saved[Cell::kSavedPerUnit > 0 ? Cell::kSavedPerUnit : 1];
      for (int k = 0; k < Cell::kSavedPerUnit; ++k) saved[k] = a.ws[row * W + k * H + lane];
      if (Cell::kSavedPerUnit == 0) saved[0] = a.output[row * P + lane];  // Elman: its output
      A h_prev = A(0), c_prev = A(0);
      if (Cell::kReadsPrevHidden) {
        h_prev = first ? A(a.hx[b * P + lane]) : A(a.output[prev_row * P + lane]);
      }
      if (Cell::kHasCellState) {
        c_prev = first ? A(a.cx[b * H + lane]) : A(a.ws[prev_row * W + 4 * H + lane]);
      }
      T dgx_unit[kGates], dgh_unit[kGates];
      A dc_prev = A(0);
      dh_direct = A(0);
      Cell::backward(1, 0, saved, h_prev, c_prev, A(a.grad_output[row * P + lane]) + dh, dc,
                     dgx_unit, dgh_unit, dc_prev, dh_direct);
      dh_direct = A(T(dh_direct));
      for (int k = 0; k < kGates; ++k) {
        dgx[k] = A(dgx_unit[k]);
        dgh[k] = Cell::kSeparateHiddenGateGrad ? A(dgh_unit[k]) : dgx[k];
      }
      dc = dc_prev;
    }
    if (unit_lane) {
      for (int k = 0; k < kGates; ++k) {
        a.dgate_x[row * G + k * H + lane] = T(dgx[k]);
        if (Cell::kSeparateHiddenGateGrad) a.dgate_h[row * G + k * H + lane] = T(dgh[k]);
      }
    }
    // dh_prev of column `lane` = dh_direct + sum over gate rows g of dgate_h[g] W_hh[g, lane];
    // gate row g = k * H + j is unit j's k-th gradient.
    A acc = dh_direct;
    for (int g = 0; g < kWarpLanes; ++g) {
      const int unit = g < G ? g % static_cast<int>(H) : 0;
      const A d_g = warp.shuffle(pick(dgh, g < G ? g / static_cast<int>(H) : 0), unit);
      if (g < G) acc += d_g * w_column[g];
    }
    dh = A(T(acc));
  }
  if (lane < P) a.dh[b * P + lane] = T(dh);
  if (unit_lane && a.dc != nullptr) a.dc[b * H + lane] = dc;
}

// Whether a layer fits the warp kernels: every gate of a batch row on one warp's lanes.
inline bool warp_kernels_fit(int64_t B, int64_t H, int64_t P, int64_t G) {
  return B > 0 && H > 0 && P == H && G <= kWarpLanes;
}

inline LaunchShape warp_shape(int64_t B) {
  return {(B + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock, kWarpRowsPerBlock * kWarpLanes, 0};
}

#if !defined(__CUDACC__)
// A warp emulated on the host: 32 fibers (ucontext), one per lane, running the same code on
// stacks of their own on the calling thread, switched in turn at every shuffle. A shuffle is a
// meeting of all 32: each lane leaves its value and yields; once all have, each takes its
// source lane's. (As 32 threads meeting at a condition variable, the warp kernels' emulation
// took 42 s of the emulation test's 50 on a 2-core Xeon; as fibers, 2 s.)
class HostWarp {
 public:
  // Runs body(warp) on the 32 lanes and returns when all have finished. A lane that ends while
  // others wait at a shuffle (a warp whose lanes diverge: __shfl_sync over the whole warp
  // would hang on a device) is an error.
  template <typename Body>
  static void run(const Body& body) {
    Meeting meeting;
    Lane lanes[kWarpLanes];
    for (int index = 0; index < kWarpLanes; ++index) {
      Lane& lane = lanes[index];
      lane.meeting = &meeting;
      lane.index = index;
      lane.body = &body;
      lane.stack.reset(new char[kStackBytes]);
      getcontext(&lane.context);
      lane.context.uc_stack.ss_sp = lane.stack.get();
      lane.context.uc_stack.ss_size = kStackBytes;
      lane.context.uc_link = &meeting.scheduler;  // where the lane goes when it returns
      makecontext(&lane.context, reinterpret_cast<void (*)()>(&start<Body>), 0);
    }
    for (;;) {
      // A round: every lane runs to its next shuffle, or to its end.
      int waiting = 0, finished = 0;
      for (Lane& lane : lanes) {
        if (lane.finished) continue;
        starting = &lane;
        swapcontext(&meeting.scheduler, &lane.context);
        (lane.finished ? finished : waiting) += 1;
      }
      if (waiting == 0) return;
      if (finished > 0) {
        throw std::logic_error("HostWarp: lanes of a warp ended while others wait at a shuffle");
      }
    }
  }

  int lane() const { return lane_; }

  template <typename A>
  A shuffle(A value, int source_lane) const {
    // Two sets of slots, used in turn: a lane writes the next set only after the round in
    // which every lane read this one.
    double* slots = meeting_->values[parity_];
    parity_ ^= 1;
    slots[lane_] = static_cast<double>(value);
    swapcontext(context_, &meeting_->scheduler);
    return static_cast<A>(slots[source_lane]);
  }

 private:
  // The lanes' shared slots and the scheduler's context, to which a lane yields.
  struct Meeting {
    double values[2][kWarpLanes] = {};
    ucontext_t scheduler;
  };
  // Small: the lanes' frames hold a few dozen values each.
  static constexpr size_t kStackBytes = 64 << 10;

  HostWarp(Meeting& meeting, ucontext_t& context, int lane)
      : meeting_(&meeting), context_(&context), lane_(lane) {}

  struct Lane {
    ucontext_t context;
    std::unique_ptr<char[]> stack;
    Meeting* meeting = nullptr;
    int index = 0;
    const void* body = nullptr;
    bool finished = false;
  };
  // The lane the scheduler switches to (makecontext passes no pointer portably).
  static inline thread_local Lane* starting = nullptr;

  template <typename Body>
  static void start() {
    Lane& lane = *starting;
    const HostWarp warp(*lane.meeting, lane.context, lane.index);
    (*static_cast<const Body*>(lane.body))(warp);
    lane.finished = true;
  }

  Meeting* meeting_;
  ucontext_t* context_;
  int lane_;
  mutable int parity_ = 0;
};
#endif

// A warp kernel (Args: WarpForwardArgs<T> or WarpBackwardArgs<T>, which picks the direction):
// warp w of block k runs batch row k * kWarpRowsPerBlock + w.
template <typename Cell, typename T, typename Args>
struct WarpKernel {
  static constexpr int64_t kMaxThreadsPerBlock = kWarpRowsPerBlock * kWarpLanes;
  template <typename Warp>
  RNNFAST_HD static void run_row(const WarpForwardArgs<T>& args, int64_t b, const Warp& warp) {
    warp_row_forward<Cell, T>(args, b, warp);
  }
  template <typename Warp>
  RNNFAST_HD static void run_row(const WarpBackwardArgs<T>& args, int64_t b, const Warp& warp) {
    warp_row_backward<Cell, T>(args, b, warp);
  }
#if defined(__CUDACC__)
  static __device__ void run_on_device(const Args& args) {
    const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpRowsPerBlock +
                      static_cast<int64_t>(threadIdx.x) / kWarpLanes;
    if (b < args.B) run_row(args, b, DeviceWarp{});  // a whole warp, or none of it
  }
#endif
  static void run_on_host(const LaunchShape&, const Args& args) {
#if !defined(__CUDACC__)
    for (int64_t b = 0; b < args.B; ++b) {
      HostWarp::run([&](const HostWarp& warp) { run_row(args, b, warp); });
    }
#else
    (void)args;
#endif
  }
};

}  // namespace cuda
}  // namespace rnnfast
