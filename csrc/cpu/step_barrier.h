// A barrier for the threads of one parallel region that run a layer's steps together (the
// forward's panel schedule, forward.cpp): each thread computes its share of a step, and every
// thread needs all of h before the next step.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>

#include "capability.h"

namespace rnnfast {
namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h

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

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
