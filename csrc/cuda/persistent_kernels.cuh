// The CUDA engine's persistent kernels (the Persistent RNN idea, Diamos et al. 2016): the whole
// time loop of one layer in ONE cooperative launch of many blocks, for layers whose W_hh does
// not fit one block's shared memory. Opt-in (RNNFAST_CUDA_PERSISTENT=1, engine.cu) until they
// have passed the CUDA tests on a GPU.
//
// The hidden units are split over the blocks: block k owns units [k U, k U + U) and, for them,
// the rows of W_hh of every gate (forward) or its columns (backward), which it keeps in shared
// memory for all T steps. A step's new state of every unit is needed by every block in the next
// step, so the blocks exchange it through global memory and meet at a grid-wide barrier once
// per step; everything else a block reads or writes in a step belongs to its own units, and the
// per-unit work is the step kernels' forward_step_unit / backward_step_unit (step_kernels.cuh)
// unchanged.
//
//   forward step s:   hg[b, rows of own units] = h_old[b, :] W_hh[rows]^T (+ b_hh)
//                     forward_step_unit for (b, own units): h_new, c, out, ws
//                     grid barrier (h_new complete), h_old <-> h_new
//   backward step q:  dh[b, own units] = dh_direct + dgate_h[step q - 1][b, :] W_hh[:, own units]
//                     backward_step_unit for (b, own units): dgate_x, dgate_h, dc, dh_direct
//                     grid barrier (dgate_h of step q complete)
//
// What other blocks wrote in this launch is read through L2 (load_coherent): the SMs' L1 caches
// are not coherent with each other. The host emulation (RNNFAST_CUDA_HOST_EMULATION) runs the
// blocks one after another between barriers, so it checks the indexing and the split, not the
// barrier or the coherence, which only the CUDA tests on a GPU check.
#pragma once

#include <cstdint>
#include <vector>

#include "../cells.h"
#include "launch.cuh"
#include "sequence_kernels.cuh"
#include "step_kernels.cuh"
#include "types.cuh"

namespace rnnfast {
namespace cuda {

constexpr int64_t kMaxPersistentThreads = 1024;

// The layer as the persistent kernels of both directions see it.
struct PersistentShape : LoopShape {
  int64_t units_per_block;  // U
  unsigned int* barrier;    // [2] zeroed before the launch: arrivals and generation
};

template <typename T>
struct PersistentForwardArgs : PersistentShape, LoopForwardData<T> {
  T* h_spare;  // [B, P] the other state buffer
  T* hg;       // [B, G] each block writes and reads the rows of its own units
};

template <typename T>
struct PersistentBackwardArgs : PersistentShape, LoopBackwardData<T> {
  T* dh_direct;  // [B, P] the part of dLoss/dh_prev that skips W_hh
};

// A value another block may have written during this launch: read from L2, past this SM's L1.
template <typename T>
RNNFAST_HD T load_coherent(const T* address) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 2) {
    T value;
    value.bits = __ldcg(reinterpret_cast<const unsigned short*>(address));
    return value;
  } else {
    return __ldcg(address);
  }
#else
  return *address;
#endif
}

#if defined(__CUDA_ARCH__)
// Every block of the launch waits here until all have arrived; what each wrote before is then
// visible to all (the fences). barrier[0] counts arrivals, barrier[1] is the generation the last
// arrival advances. Needs every block resident at once: a cooperative launch guarantees it.
__device__ inline void grid_barrier(unsigned int* barrier, unsigned int blocks) {
  __syncthreads();
  if (threadIdx.x == 0) {
    volatile unsigned int* generation = barrier + 1;
    const unsigned int current = *generation;
    __threadfence();  // this block's writes (made visible to thread 0 by the block barrier)
    if (atomicAdd(barrier, 1u) == blocks - 1) {
      atomicExch(barrier, 0u);
      __threadfence();
      atomicAdd(barrier + 1, 1u);
    } else {
      while (*generation == current) __nanosleep(20);
    }
    __threadfence();
  }
  __syncthreads();
}
#endif

// The units of block `block`: [first_unit, first_unit + units).
struct BlockUnits {
  int64_t first_unit, units;
};

RNNFAST_HD BlockUnits units_of_block(const PersistentShape& a, int64_t block) {
  const int64_t first_unit = block * a.units_per_block;
  const int64_t left = a.H - first_unit;
  return {first_unit, left < a.units_per_block ? left : a.units_per_block};
}

// ---------------------------------------------------------------------------------------------
// Forward. Shared memory: the block's rows of W_hh, transposed: [P, kGates * U], so the threads
// of a warp (consecutive rows r) read consecutive words.
// ---------------------------------------------------------------------------------------------

// Gate row r of the block's rows (r = g * units + local unit) as a row of W_hh.
RNNFAST_HD int64_t gate_row(const PersistentShape& a, const BlockUnits& own, int64_t r) {
  const int64_t g = r / own.units;
  return g * a.H + own.first_unit + (r - g * own.units);
}

template <typename Cell, typename T>
RNNFAST_HD void persistent_load(const PersistentForwardArgs<T>& a, int64_t block, T* w_own) {
  const BlockUnits own = units_of_block(a, block);
  const int64_t rows = Cell::kGates * own.units, P = a.P;
  for (int64_t i = BlockThreads::first(); i < rows * P; i += BlockThreads::stride()) {
    const int64_t r = i / P, k = i - r * P;
    w_own[k * rows + r] = a.w_hh[gate_row(a, own, r) * P + k];
  }
  BlockThreads::sync();
}

template <typename Cell, typename T>
RNNFAST_HD void persistent_step(const PersistentForwardArgs<T>& a, int64_t block, const T* w_own,
                                int64_t s) {
  using A = AccType<T>;
  const BlockUnits own = units_of_block(a, block);
  const int64_t B = a.B, H = a.H, P = a.P, G = a.G, rows = Cell::kGates * own.units;
  const int64_t first = BlockThreads::first(), stride = BlockThreads::stride();
  const int64_t t = a.reverse ? a.steps - 1 - s : s;
  T* h_old = s % 2 == 0 ? a.h : a.h_spare;
  T* h_new = s % 2 == 0 ? a.h_spare : a.h;
  // hg = h_old W_hh^T (+ b_hh) for the block's rows, output (row b, gate row r) per thread
  for (int64_t i = first; i < B * rows; i += stride) {
    const int64_t b = i / rows, r = i - b * rows;
    const int64_t row = gate_row(a, own, r);
    const T* h_row = h_old + b * P;
    A acc = a.b_hh != nullptr ? A(a.b_hh[row]) : A(0);
    for (int64_t k = 0; k < P; ++k) acc += A(w_own[k * rows + r]) * A(load_coherent(h_row + k));
    a.hg[b * G + row] = T(acc);
  }
  BlockThreads::sync();
  ForwardStepArgs<T> step{};
  step.B = B;
  step.H = H;
  step.P = P;
  step.G = G;
  step.W = a.ws != nullptr ? a.W : 0;
  step.steps = a.steps;
  step.t = t;
  step.reverse = a.reverse;
  step.lengths = a.lengths;
  step.xg = a.xg + t * B * G;
  step.hg = a.hg;
  step.h = h_old;
  step.h_next = h_new;
  step.c = a.c;
  step.out = a.out + t * B * P;
  step.ws = a.ws != nullptr ? a.ws + t * B * a.W : nullptr;
  step.h_unprojected = nullptr;
  for (int64_t i = first; i < B * own.units; i += stride) {
    const int64_t b = i / own.units;
    forward_step_unit<Cell, T>(step, b * H + own.first_unit + (i - b * own.units));
  }
}

// After the last step's barrier: h_n into h where it ended in the spare buffer (odd T).
template <typename Cell, typename T>
RNNFAST_HD void persistent_finish(const PersistentForwardArgs<T>& a, int64_t block, const T*) {
  if (a.steps % 2 == 0) return;
  const BlockUnits own = units_of_block(a, block);
  for (int64_t i = BlockThreads::first(); i < a.B * own.units; i += BlockThreads::stride()) {
    const int64_t b = i / own.units;
    const int64_t index = b * a.P + own.first_unit + (i - b * own.units);
    a.h[index] = a.h_spare[index];
  }
}

// ---------------------------------------------------------------------------------------------
// Backward. Shared memory: the block's columns of W_hh, [G, U].
// ---------------------------------------------------------------------------------------------

template <typename Cell, typename T>
RNNFAST_HD void persistent_load(const PersistentBackwardArgs<T>& a, int64_t block, T* w_own) {
  const BlockUnits own = units_of_block(a, block);
  for (int64_t i = BlockThreads::first(); i < a.G * own.units; i += BlockThreads::stride()) {
    const int64_t g = i / own.units, u = i - g * own.units;
    w_own[i] = a.w_hh[g * a.P + own.first_unit + u];
  }
  BlockThreads::sync();
}

// dh[b, own units] = dh_direct + dgate_h of time t_done (the step processed before) W_hh.
template <typename T>
RNNFAST_HD void carry_hidden_gradient(const PersistentBackwardArgs<T>& a, const BlockUnits& own,
                                      const T* w_own, int64_t t_done) {
  using A = AccType<T>;
  const int64_t G = a.G;
  for (int64_t i = BlockThreads::first(); i < a.B * own.units; i += BlockThreads::stride()) {
    const int64_t b = i / own.units, u = i - b * own.units;
    const int64_t index = b * a.P + own.first_unit + u;
    const T* d_row = a.dgate_h + (t_done * a.B + b) * G;
    A acc = A(a.dh_direct[index]);
    for (int64_t g = 0; g < G; ++g)
      acc += A(load_coherent(d_row + g)) * A(w_own[g * own.units + u]);
    a.dh[index] = T(acc);
  }
  BlockThreads::sync();
}

// Processing step q is time step T - 1 - q (q when reverse).
template <typename Cell, typename T>
RNNFAST_HD void persistent_step(const PersistentBackwardArgs<T>& a, int64_t block, const T* w_own,
                                int64_t q) {
  const BlockUnits own = units_of_block(a, block);
  const int64_t B = a.B, H = a.H, P = a.P, G = a.G, W = a.W;
  const auto time_of = [&](int64_t processed) {
    return a.reverse ? processed : a.steps - 1 - processed;
  };
  const int64_t t = time_of(q);
  if (q > 0) carry_hidden_gradient(a, own, w_own, time_of(q - 1));
  const int64_t prev_t = a.reverse ? t + 1 : t - 1;  // the step before t in time order
  const bool has_prev = prev_t >= 0 && prev_t < a.steps;
  BackwardStepArgs<T> step{};
  step.B = B;
  step.H = H;
  step.P = P;
  step.G = G;
  step.W = W;
  step.steps = a.steps;
  step.t = t;
  step.reverse = a.reverse;
  step.lengths = a.lengths;
  step.grad_output = a.grad_output + t * B * P;
  step.dh = a.dh;
  step.dc = a.dc;
  step.hx = a.hx;
  step.cx = a.cx;
  step.output = a.output + t * B * P;
  step.ws = W > 0 ? a.ws + t * B * W : nullptr;
  step.prev_output = has_prev ? a.output + prev_t * B * P : nullptr;
  step.prev_ws = has_prev && W > 0 ? a.ws + prev_t * B * W : nullptr;
  step.dh_unprojected = nullptr;
  step.dgate_x = a.dgate_x + t * B * G;
  step.dgate_h = a.dgate_h + t * B * G;
  step.dh_direct = a.dh_direct;
  for (int64_t i = BlockThreads::first(); i < B * own.units; i += BlockThreads::stride()) {
    const int64_t b = i / own.units;
    backward_step_unit<Cell, T>(step, b * H + own.first_unit + (i - b * own.units));
  }
}

// After the last step's barrier: the gradient of h0 through the first step's gates.
template <typename Cell, typename T>
RNNFAST_HD void persistent_finish(const PersistentBackwardArgs<T>& a, int64_t block,
                                  const T* w_own) {
  if (a.steps == 0) return;
  carry_hidden_gradient(a, units_of_block(a, block), w_own, a.reverse ? a.steps - 1 : 0);
}

// ---------------------------------------------------------------------------------------------
// Planning and the kernel
// ---------------------------------------------------------------------------------------------

// How a persistent kernel is launched for a layer, or that it cannot be (usable == false).
struct PersistentPlan {
  bool usable = false;
  int64_t units_per_block = 0, blocks = 0, threads = 0, shared_bytes = 0;
};

// One block per multiprocessor at most (a cooperative launch needs all of them resident), the
// units spread evenly; usable where the block's slice of W_hh fits its shared memory.
template <typename Cell, typename T>
PersistentPlan plan_persistent(bool backward, int64_t B, int64_t H, int64_t P, int64_t G,
                               int64_t multiprocessors, int64_t max_shared_bytes) {
  PersistentPlan plan;
  if (B <= 0 || H <= 0 || P != H || multiprocessors <= 0) return plan;
  const int64_t blocks_wanted = H < multiprocessors ? H : multiprocessors;
  const int64_t units = (H + blocks_wanted - 1) / blocks_wanted;
  const int64_t rows = Cell::kGates * units;
  const int64_t shared_bytes = (backward ? G * units : rows * P) * static_cast<int64_t>(sizeof(T));
  if (shared_bytes > max_shared_bytes) return plan;
  plan.usable = true;
  plan.units_per_block = units;
  plan.blocks = (H + units - 1) / units;
  const int64_t widest = B * (backward ? units : rows);
  plan.threads = round_up(widest < kMaxPersistentThreads ? widest : kMaxPersistentThreads, 32);
  plan.shared_bytes = shared_bytes;
  return plan;
}

// A persistent kernel (Args: PersistentForwardArgs<T> or PersistentBackwardArgs<T>, which picks
// the direction): every block loads its slice of W_hh, runs the steps with a grid barrier after
// each, then finishes its units.
template <typename Cell, typename T, typename Args>
struct PersistentKernel {
  static constexpr int64_t kMaxThreadsPerBlock = kMaxPersistentThreads;
#if defined(__CUDACC__)
  static __device__ void run_on_device(const Args& args) {
    extern __shared__ __align__(16) unsigned char shared[];
    T* w_own = reinterpret_cast<T*>(shared);
    const int64_t block = blockIdx.x;
    persistent_load<Cell, T>(args, block, w_own);
    for (int64_t s = 0; s < args.steps; ++s) {
      persistent_step<Cell, T>(args, block, w_own, s);
      grid_barrier(args.barrier, gridDim.x);
    }
    persistent_finish<Cell, T>(args, block, w_own);
  }
#endif
  // The blocks one after another, barrier by barrier, each with its own shared memory.
  static void run_on_host(const LaunchShape& shape, const Args& args) {
    const size_t words = static_cast<size_t>(shape.shared_bytes) / sizeof(T);
    std::vector<std::vector<T>> shared(static_cast<size_t>(shape.blocks), std::vector<T>(words));
    for (int64_t block = 0; block < shape.blocks; ++block) {
      persistent_load<Cell, T>(args, block, shared[block].data());
    }
    for (int64_t s = 0; s < args.steps; ++s) {
      for (int64_t block = 0; block < shape.blocks; ++block) {
        persistent_step<Cell, T>(args, block, shared[block].data(), s);
      }
    }
    for (int64_t block = 0; block < shape.blocks; ++block) {
      persistent_finish<Cell, T>(args, block, shared[block].data());
    }
  }
};

}  // namespace cuda
}  // namespace rnnfast
