// The forward's recurrent product split by hidden units, for one parallel region per call.
//
// Where the product hg = h W_hh^T + b [B, G] is too large for the tiled kernel's single copy of
// W_hh^T, the forward's default schedule runs it in the BLAS, threaded by the BLAS (each thread
// on its share of the gate columns), and the pointwise pass after it: a fork-join of the BLAS's
// threads per step, and a pointwise pass that reads gate columns the other threads' caches
// hold. For a small batch this schedule gives thread s hidden units [unit_begin(s),
// unit_begin(s + 1)) of every gate instead: it computes exactly the gate columns its own
// pointwise pass reads, with the tiled kernel on its own copy of its rows of W_hh, which stay
// in its cache over all steps; the threads meet once per step (StepBarrier), where every
// thread needs every unit of h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <thread>
#include <type_traits>
#include <vector>

#include "tiled_product.h"

namespace rnnfast {

// Threads of one parallel region waiting for each other at the end of a step. A participant
// stands for `weight` slots (the slots a thread runs), so a region that gives one thread all
// slots (a nested or one-thread region) never waits. Only for regions whose threads run
// concurrently (OpenMP's): a participant spins until the others arrive.
class StepBarrier {
 public:
  explicit StepBarrier(int64_t slots) : slots_(slots) {}

  void arrive_and_wait(int64_t weight) {
    const int64_t generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(weight, std::memory_order_acq_rel) + weight == slots_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(generation + 1, std::memory_order_release);
      return;
    }
    // The wait is a few microseconds (one step's imbalance): spin, yielding now and then in
    // case the machine runs more threads than cores.
    for (int spins = 1; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins % 1024 == 0) std::this_thread::yield();
    }
  }

 private:
  const int64_t slots_;
  std::atomic<int64_t> arrived_{0};
  std::atomic<int64_t> generation_{0};
};

template <typename T>
class UnitSlicedProduct {
 public:
  // w_hh: [gates * H, K]; bias: [gates * H] contiguous or undefined; rows: the batch B;
  // slices: the threads to split the units over.
  UnitSlicedProduct(const at::Tensor& w_hh, const at::Tensor& bias, int64_t gates, int64_t rows,
                    int64_t slices)
      : bias_(bias), gates_(gates), hidden_(w_hh.size(0) / gates), rows_(rows) {
    // Slices of whole SIMD vectors, so each thread's pointwise pass runs on full vectors.
    constexpr int64_t lanes = at::vec::Vectorized<T>::size();
    const int64_t per_slice = (hidden_ + slices - 1) / slices;
    const int64_t step = (per_slice + lanes - 1) / lanes * lanes;
    for (int64_t begin = 0; begin < hidden_; begin += step) unit_begins_.push_back(begin);
    unit_begins_.push_back(hidden_);
    // Each slice's rows of each gate as a W^T of their own (the tiled kernel's copy): a thread
    // reads only its own weights, contiguous.
    for (int64_t slice = 0; slice < this->slices(); ++slice) {
      const int64_t u0 = unit_begin(slice), units = unit_begin(slice + 1) - u0;
      for (int64_t gate = 0; gate < gates; ++gate) {
        weights_.emplace_back(w_hh.narrow(0, gate * hidden_ + u0, units));
      }
    }
  }

  int64_t slices() const { return int64_t(unit_begins_.size()) - 1; }
  int64_t unit_begin(int64_t slice) const { return unit_begins_[slice]; }

  // hg[B, G] (row stride G) in the columns of slices [first, end) of every gate, from
  // h [B, K] (contiguous rows; nullptr: zero state, hg = bias).
  void run(const T* h, int64_t first, int64_t end, T* hg) const {
    const int64_t G = gates_ * hidden_;
    const T* bias = bias_.defined() ? bias_.template data_ptr<T>() : nullptr;
    for (int64_t slice = first; slice < end; ++slice) {
      const int64_t u0 = unit_begin(slice), units = unit_begin(slice + 1) - u0;
      for (int64_t gate = 0; gate < gates_; ++gate) {
        const int64_t column = gate * hidden_ + u0;
        const T* addend = bias ? bias + column : nullptr;
        if (h != nullptr) {
          tiled_product(h, rows_, weights_[slice * gates_ + gate], addend, 0, hg + column, G);
          continue;
        }
        for (int64_t b = 0; b < rows_; ++b) {
          T* out = hg + b * G + column;
          if (addend) {
            std::copy(addend, addend + units, out);
          } else {
            std::fill(out, out + units, T(0));
          }
        }
      }
    }
  }

 private:
  at::Tensor bias_;
  int64_t gates_, hidden_, rows_;
  std::vector<int64_t> unit_begins_;  // slice s: units [unit_begins_[s], unit_begins_[s + 1])
  std::vector<TiledWeights<T>> weights_;  // [slice][gate]: W^T of the slice's rows of the gate
};

}  // namespace rnnfast
