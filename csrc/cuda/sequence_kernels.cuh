// The CUDA engine's sequence kernels: the whole time loop of one layer in one launch, and the
// planning of their shared memory (plan_sequence), which sizes it with the very code that
// carves it. A step inside them runs the step kernels' per-thread functions
// (step_kernels.cuh) unchanged.
#pragma once

#if defined(__CUDACC__)
#include <cuda_pipeline.h>
#endif

#include <cstdint>
#include <vector>

#include "../cells.h"
#include "launch.cuh"
#include "step_kernels.cuh"
#include "types.cuh"

namespace rnnfast {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Sequence kernels: the whole time loop of one layer in ONE launch. Each block owns a slice of
// `rows_per_block` batch rows (rows are independent of each other) and keeps W_hh and its
// rows' running state in shared memory for all T steps; a step is the recurrent product
// (one thread per output) and then forward_step_unit / backward_step_unit of step_kernels.cuh
// (one thread per hidden unit), two block barriers apart. The per-step kernels' math and masking
// are reused as they are: the step arguments point at shared memory for the state and the
// staged inputs, and at the device's [T, B, *] tensors for what the step writes. Only for layers
// without projection whose W_hh and state fit in one block's shared memory (plan_sequence);
// otherwise the engine runs the GEMM-per-step loop.
// ---------------------------------------------------------------------------------------------

constexpr int64_t kMaxSequenceThreads = 1024;
// The inputs of the next kStagedSteps steps (xg; grad_output, output and workspace rows) are
// copied into a ring of shared memory ahead of their use, without waiting, so that no step
// waits for a read from device memory. At least 3: the backward reads two slots per step
// (its step and the one before it in time order) while the copy into a third is under way.
constexpr int kStagedSteps = 4;
static_assert(kStagedSteps >= 3, "the backward ring needs 3 slots");

// The layer as the sequence kernels of both directions see it.
struct SequenceShape : LoopShape {
  int64_t rows_per_block;
};

template <typename T>
struct SequenceForwardArgs : SequenceShape, LoopForwardData<T> {};

template <typename T>
struct SequenceBackwardArgs : SequenceShape, LoopBackwardData<T> {};

// The threads of one block, as the sequence kernels see them: loops over a block-wide index
// range start at first() and step by stride(); sync() is the block barrier. A host-emulated
// block (RNNFAST_CUDA_HOST_EMULATION) is one thread that runs every index, and needs no barrier.
struct BlockThreads {
  RNNFAST_HD static int64_t first() {
#if defined(__CUDA_ARCH__)
    return threadIdx.x;
#else
    return 0;
#endif
  }
  RNNFAST_HD static int64_t stride() {
#if defined(__CUDA_ARCH__)
    return blockDim.x;
#else
    return 1;
#endif
  }
  RNNFAST_HD static void sync() {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
};

// Copies `count` elements from device memory to shared memory, spread over the block's threads.
// On sm_80 and later 4- and 8-byte elements are copied asynchronously (cp.async): the copies of
// one call belong to the thread's next batch (commit_async_copies), and a thread waits for its
// own batches with wait_async_copies<N>() (all but the N latest are complete); a barrier after
// that makes every thread's copies visible. Two-byte types (and the host emulation) copy at once.
template <typename T>
RNNFAST_HD void copy_async(T* shared_dst, const T* src, int64_t count) {
  for (int64_t i = BlockThreads::first(); i < count; i += BlockThreads::stride()) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (sizeof(T) == 4 || sizeof(T) == 8) {
      __pipeline_memcpy_async(shared_dst + i, src + i, sizeof(T));
    } else {
      shared_dst[i] = src[i];
    }
#else
    shared_dst[i] = src[i];
#endif
  }
}

RNNFAST_HD void commit_async_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __pipeline_commit();
#endif
}

template <int kInFlight>
RNNFAST_HD void wait_async_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __pipeline_wait_prior(kInFlight);
#endif
}

// Hands out aligned pieces of a block's shared memory; with a null base it only counts bytes
// (how the launchers size the allocation with the very code that carves it).
class SharedCarver {
 public:
  RNNFAST_HD explicit SharedCarver(unsigned char* base) : base_(base) {}
  template <typename U>
  RNNFAST_HD U* take(int64_t count) {
    used_ = (used_ + static_cast<int64_t>(alignof(U)) - 1) / static_cast<int64_t>(alignof(U)) *
            static_cast<int64_t>(alignof(U));
    U* piece = base_ != nullptr ? reinterpret_cast<U*>(base_ + used_) : nullptr;
    used_ += count * static_cast<int64_t>(sizeof(U));
    return piece;
  }
  RNNFAST_HD int64_t bytes() const { return used_; }

 private:
  unsigned char* base_;
  int64_t used_ = 0;
};

// R below is rows_per_block, S kStagedSteps.
template <typename T>
struct ForwardShared {
  AccType<T>* c;     // [R, H] LSTM's cell state, else nullptr
  int64_t* lengths;  // [R]
  T* w_t;            // [P, G] W_hh transposed: a warp reads consecutive gates of one column
  T* h;              // [R, P]
  T* hg;             // [R, G] h W_hh^T (+ b_hh) of the step
  T* xg;             // [S, R, G] the ring of staged input projections
};

template <typename Cell, typename T>
RNNFAST_HD ForwardShared<T> carve_forward_shared(SharedCarver& carver, int64_t rows, int64_t H,
                                                 int64_t P, int64_t G) {
  ForwardShared<T> m;
  m.c = Cell::kHasCellState ? carver.template take<AccType<T>>(rows * H) : nullptr;
  m.lengths = carver.template take<int64_t>(rows);
  m.w_t = carver.template take<T>(P * G);
  m.h = carver.template take<T>(rows * P);
  m.hg = carver.template take<T>(rows * G);
  m.xg = carver.template take<T>(kStagedSteps * rows * G);
  return m;
}

template <typename T>
struct BackwardShared {
  AccType<T>* dc;    // [R, H] LSTM's carried dLoss/dc, else nullptr
  int64_t* lengths;  // [R]
  T* w;              // [G, P] W_hh as it is: a warp reads consecutive columns of one gate row
  T* dh;             // [R, P] the carried dLoss/dh
  T* dh_direct;      // [R, P]
  T* dgate_x;        // [R, G] this step's
  T* dgate_h;        // [R, G] (GRU), else the same as dgate_x
  T* grad_output;    // [S, R, P] the ring of staged rows of grad_output,
  T* output;         // [S, R, P] of the output
  T* ws;             // [S, R, W] and of the workspace (nullptr when W == 0)
};

template <typename Cell, typename T>
RNNFAST_HD BackwardShared<T> carve_backward_shared(SharedCarver& carver, int64_t rows, int64_t H,
                                                   int64_t P, int64_t G, int64_t W) {
  BackwardShared<T> m;
  m.dc = Cell::kHasCellState ? carver.template take<AccType<T>>(rows * H) : nullptr;
  m.lengths = carver.template take<int64_t>(rows);
  m.w = carver.template take<T>(G * P);
  m.dh = carver.template take<T>(rows * P);
  m.dh_direct = carver.template take<T>(rows * P);
  m.dgate_x = carver.template take<T>(rows * G);
  m.dgate_h = Cell::kSeparateHiddenGateGrad ? carver.template take<T>(rows * G) : m.dgate_x;
  m.grad_output = carver.template take<T>(kStagedSteps * rows * P);
  m.output = carver.template take<T>(kStagedSteps * rows * P);
  m.ws = W > 0 ? carver.template take<T>(kStagedSteps * rows * W) : nullptr;
  return m;
}

// One block's whole forward time loop (block `block` of ceil(B / rows_per_block)).
template <typename Cell, typename T>
RNNFAST_HD void sequence_block(const SequenceForwardArgs<T>& a, int64_t block,
                               unsigned char* shared) {
  using A = AccType<T>;
  const int64_t B = a.B, H = a.H, P = a.P, G = a.G, W = a.W, R = a.rows_per_block;
  const int64_t b0 = block * R;
  const int64_t rows = B - b0 < R ? B - b0 : R;
  const int64_t first = BlockThreads::first(), stride = BlockThreads::stride();
  SharedCarver carver(shared);
  const ForwardShared<T> m = carve_forward_shared<Cell, T>(carver, R, H, P, G);
  const auto time_of = [&](int64_t s) { return a.reverse ? a.steps - 1 - s : s; };
  // Step s's xg rows into ring slot s % kStagedSteps (one batch of copies, maybe empty).
  const auto stage = [&](int64_t s) {
    if (s < a.steps) {
      copy_async(m.xg + (s % kStagedSteps) * R * G, a.xg + (time_of(s) * B + b0) * G, rows * G);
    }
    commit_async_copies();
  };
  for (int64_t s = 0; s < kStagedSteps; ++s) stage(s);

  for (int64_t i = first; i < G * P; i += stride) {
    const int64_t g = i / P, k = i - g * P;
    m.w_t[k * G + g] = a.w_hh[i];
  }
  for (int64_t i = first; i < rows * P; i += stride) m.h[i] = a.h[b0 * P + i];
  if (m.c != nullptr) {
    for (int64_t i = first; i < rows * H; i += stride) m.c[i] = a.c[b0 * H + i];
  }
  if (a.lengths != nullptr) {
    for (int64_t i = first; i < rows; i += stride) m.lengths[i] = a.lengths[b0 + i];
  }

  ForwardStepArgs<T> step{};
  step.B = rows;
  step.H = H;
  step.P = P;
  step.G = G;
  step.W = W;
  step.steps = a.steps;
  step.reverse = a.reverse;
  step.lengths = a.lengths != nullptr ? m.lengths : nullptr;
  step.hg = m.hg;
  step.h = m.h;
  step.c = m.c;
  step.h_unprojected = nullptr;
  for (int64_t s = 0; s < a.steps; ++s) {
    const int64_t t = time_of(s);
    wait_async_copies<kStagedSteps - 1>();  // this thread's copies of step s
    BlockThreads::sync();                   // everyone's, and the state of step s - 1
    // hg = h W_hh^T (+ b_hh), output (row r, gate g) per thread
    for (int64_t i = first; i < rows * G; i += stride) {
      const int64_t r = i / G, g = i - r * G;
      const T* h_row = m.h + r * P;
      A acc = a.b_hh != nullptr ? A(a.b_hh[g]) : A(0);
      for (int64_t k = 0; k < P; ++k) acc += A(m.w_t[k * G + g]) * A(h_row[k]);
      m.hg[i] = T(acc);
    }
    BlockThreads::sync();
    step.t = t;
    step.xg = m.xg + (s % kStagedSteps) * R * G;
    step.out = a.out + (t * B + b0) * P;
    step.ws = a.ws != nullptr ? a.ws + (t * B + b0) * W : nullptr;
    for (int64_t i = first; i < rows * H; i += stride) forward_step_unit<Cell, T>(step, i);
    BlockThreads::sync();  // slot s % kStagedSteps is read: stage step s + kStagedSteps there
    stage(s + kStagedSteps);
  }

  for (int64_t i = first; i < rows * P; i += stride) a.h[b0 * P + i] = m.h[i];
  if (m.c != nullptr) {
    for (int64_t i = first; i < rows * H; i += stride) a.c[b0 * H + i] = m.c[i];
  }
}

// One block's whole backward time loop: the reverse of the forward one. Processing
// step q (q = 0 .. T - 1) is time step T - 1 - q (q when reverse); the step before it in time
// order is processing step q + 1, so both are in the ring.
template <typename Cell, typename T>
RNNFAST_HD void sequence_block(const SequenceBackwardArgs<T>& a, int64_t block,
                               unsigned char* shared) {
  using A = AccType<T>;
  const int64_t B = a.B, H = a.H, P = a.P, G = a.G, W = a.W, R = a.rows_per_block;
  const int64_t b0 = block * R;
  const int64_t rows = B - b0 < R ? B - b0 : R;
  const int64_t first = BlockThreads::first(), stride = BlockThreads::stride();
  SharedCarver carver(shared);
  const BackwardShared<T> m = carve_backward_shared<Cell, T>(carver, R, H, P, G, W);
  const auto time_of = [&](int64_t q) { return a.reverse ? q : a.steps - 1 - q; };
  const auto stage = [&](int64_t q) {
    if (q < a.steps) {
      const int64_t slot = q % kStagedSteps, row0 = time_of(q) * B + b0;
      copy_async(m.grad_output + slot * R * P, a.grad_output + row0 * P, rows * P);
      copy_async(m.output + slot * R * P, a.output + row0 * P, rows * P);
      if (W > 0) copy_async(m.ws + slot * R * W, a.ws + row0 * W, rows * W);
    }
    commit_async_copies();
  };
  for (int64_t q = 0; q < kStagedSteps; ++q) stage(q);

  for (int64_t i = first; i < G * P; i += stride) m.w[i] = a.w_hh[i];
  for (int64_t i = first; i < rows * P; i += stride) m.dh[i] = a.dh[b0 * P + i];
  if (m.dc != nullptr) {
    for (int64_t i = first; i < rows * H; i += stride) m.dc[i] = a.dc[b0 * H + i];
  }
  if (a.lengths != nullptr) {
    for (int64_t i = first; i < rows; i += stride) m.lengths[i] = a.lengths[b0 + i];
  }
  wait_async_copies<kStagedSteps - 2>();  // processing steps 0 and 1
  BlockThreads::sync();

  BackwardStepArgs<T> step{};
  step.B = rows;
  step.H = H;
  step.P = P;
  step.G = G;
  step.W = W;
  step.steps = a.steps;
  step.reverse = a.reverse;
  step.lengths = a.lengths != nullptr ? m.lengths : nullptr;
  step.dh = m.dh;
  step.dc = m.dc;
  step.hx = a.hx + b0 * P;
  step.cx = a.cx != nullptr ? a.cx + b0 * H : nullptr;
  step.dh_unprojected = nullptr;
  step.dgate_x = m.dgate_x;
  step.dgate_h = m.dgate_h;
  step.dh_direct = m.dh_direct;
  for (int64_t q = 0; q < a.steps; ++q) {
    const int64_t t = time_of(q);
    const int64_t slot = q % kStagedSteps, prev_slot = (q + 1) % kStagedSteps;
    const bool has_prev = q + 1 < a.steps;
    step.t = t;
    step.grad_output = m.grad_output + slot * R * P;
    step.output = m.output + slot * R * P;
    step.ws = W > 0 ? m.ws + slot * R * W : nullptr;
    step.prev_output = has_prev ? m.output + prev_slot * R * P : nullptr;
    step.prev_ws = has_prev && W > 0 ? m.ws + prev_slot * R * W : nullptr;
    for (int64_t i = first; i < rows * H; i += stride) backward_step_unit<Cell, T>(step, i);
    BlockThreads::sync();  // slot q is read: stage processing step q + kStagedSteps there
    stage(q + kStagedSteps);
    T* dgate_x_t = a.dgate_x + (t * B + b0) * G;
    T* dgate_h_t = a.dgate_h + (t * B + b0) * G;
    for (int64_t i = first; i < rows * G; i += stride) {
      dgate_x_t[i] = m.dgate_x[i];
      if (Cell::kSeparateHiddenGateGrad) dgate_h_t[i] = m.dgate_h[i];
    }
    // dh_prev = dh_direct + dgate_h W_hh, output (row r, column k) per thread
    for (int64_t i = first; i < rows * P; i += stride) {
      const int64_t r = i / P, k = i - r * P;
      const T* d_row = m.dgate_h + r * G;
      A acc = A(m.dh_direct[i]);
      for (int64_t g = 0; g < G; ++g) acc += A(d_row[g]) * A(m.w[g * P + k]);
      m.dh[i] = T(acc);
    }
    wait_async_copies<kStagedSteps - 2>();  // processing steps q + 1 and q + 2
    BlockThreads::sync();
  }

  for (int64_t i = first; i < rows * P; i += stride) a.dh[b0 * P + i] = m.dh[i];
  if (m.dc != nullptr) {
    for (int64_t i = first; i < rows * H; i += stride) a.dc[b0 * H + i] = m.dc[i];
  }
}

// How a sequence kernel is launched for a layer, or that it cannot be (usable == false: W_hh
// and the state do not fit in one block's shared memory, or the layer projects).
struct SequencePlan {
  bool usable = false;
  int64_t rows_per_block = 0, blocks = 0, threads = 0, shared_bytes = 0;
};

inline int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Rows are spread over the multiprocessors (one block each when B <= their count), so every
// block runs its T steps at once with the others. W: the workspace's columns (the backward
// stages them).
template <typename Cell, typename T>
SequencePlan plan_sequence(bool backward, int64_t B, int64_t H, int64_t P, int64_t G, int64_t W,
                           int64_t multiprocessors, int64_t max_shared_bytes) {
  SequencePlan plan;
  if (B <= 0 || P != H || multiprocessors <= 0) return plan;
  const int64_t rows = (B + multiprocessors - 1) / multiprocessors;
  SharedCarver carver(nullptr);
  if (backward) {
    carve_backward_shared<Cell, T>(carver, rows, H, P, G, W);
  } else {
    carve_forward_shared<Cell, T>(carver, rows, H, P, G);
  }
  if (carver.bytes() > max_shared_bytes) return plan;
  plan.usable = true;
  plan.rows_per_block = rows;
  plan.blocks = (B + rows - 1) / rows;
  const int64_t widest = rows * (G > P ? G : P);
  plan.threads = round_up(widest < kMaxSequenceThreads ? widest : kMaxSequenceThreads, 32);
  plan.shared_bytes = carver.bytes();
  return plan;
}

// A sequence kernel (Args: SequenceForwardArgs<T> or SequenceBackwardArgs<T>, which picks the
// direction): block `block` runs sequence_block for its rows, with the plan's shared memory.
template <typename Cell, typename T, typename Args>
struct SequenceKernel {
  static constexpr int64_t kMaxThreadsPerBlock = kMaxSequenceThreads;
#if defined(__CUDACC__)
  static __device__ void run_on_device(const Args& args) {
    extern __shared__ __align__(16) unsigned char shared[];
    sequence_block<Cell, T>(args, blockIdx.x, shared);
  }
#endif
  static void run_on_host(const LaunchShape& shape, const Args& args) {
    std::vector<unsigned char> shared(static_cast<size_t>(shape.shared_bytes));
    for (int64_t block = 0; block < shape.blocks; ++block) {
      sequence_block<Cell, T>(args, block, shared.data());
    }
  }
};

}  // namespace cuda
}  // namespace rnnfast
