// The thread schedule of a call's time loop: which threads run the steps, and the loop itself.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

#include "capability.h"
#include "recurrent_product.h"

namespace rnnfast {
namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h

// Batch rows never interact in a layer, so each thread may run the whole sequence for its
// share of the rows: one parallel region per call, no barrier per step. That pays where the
// recurrent product stays in cache (the tiled kernel or the plain loop) and the call has enough
// work: below this many multiply-adds of recurrent products over the sequence a call stays on
// one thread (a region costs more). The register product (a few rows, bound by the latency of
// each step) stays on one thread.
constexpr int64_t kParallelMinWork = 1 << 18;
// Products in the BLAS are threaded by the BLAS, each thread on its share of the weights (and so
// are AMX's products of a few rows, recurrent_product.h). The pointwise pass between them is
// split over the threads per step where a step has at least this many hidden units (below, a
// parallel region per step costs more than it saves).
constexpr int64_t kPointwiseSplitMinUnits = 1 << 12;

enum class StepThreads { Serial, RowsPerThread, PointwisePerStep };

template <typename T>
StepThreads step_threads(int64_t rows, int64_t steps, int64_t gate_size, int64_t state_size,
                         int64_t hidden_size, const RecurrentProduct<T>& product) {
  if (at::get_num_threads() < 2) return StepThreads::Serial;
  if (product.may_split_rows()) {
    return rows * steps * gate_size * state_size >= kParallelMinWork ? StepThreads::RowsPerThread
                                                                     : StepThreads::Serial;
  }
  return product.threads_itself() && rows * hidden_size >= kPointwiseSplitMinUnits
             ? StepThreads::PointwisePerStep
             : StepThreads::Serial;
}

// The reverse loop's schedule where its product dh_prev = dgates W_hh runs in the backward's
// gate panels (backward_panels) in tiles that do not split their terms (splits_panel_terms),
// so that a thread computes its rows as the whole batch computes them: rows per thread (each
// thread takes its rows through all steps, reading all of W_hh at each, with no barrier per
// step) where W_hh fits in a core's L2 cache, and otherwise step_threads' schedule (a step's
// product split over the threads by the panels' units, whose share of W_hh stays in cache).
// On a 2-core AMD EPYC, training steps in one process against step_threads' schedule: 20 rows
// x 35 steps of 200 LSTM units 5% faster (the option layers' 6-9%), GRU's 16 and 64 rows of 256
// units 5-6%, LSTM's 1-2%; 16 rows of 512 units (W_hh of 3-4 MiB) the same either way.
template <typename T>
StepThreads backward_step_threads(int64_t rows, int64_t steps, int64_t gate_size,
                                  int64_t state_size, int64_t hidden_size,
                                  const RecurrentProduct<T>& product, bool whole_row_panels) {
  if (whole_row_panels && at::get_num_threads() > 1 &&
      gate_size * state_size * int64_t(sizeof(T)) <= core_cache_bytes() &&
      rows * steps * gate_size * state_size >= kParallelMinWork) {
    return StepThreads::RowsPerThread;
  }
  return step_threads(rows, steps, gate_size, state_size, hidden_size, product);
}

// Runs steps [step_begin, step_end) of a call over batch rows [0, rows) in the schedule
// `threads`: per step before(step, begin, end), pointwise(step, begin, end) and
// after(step, begin, end) on rows begin .. end - 1 (before and after run the products; with
// PointwisePerStep on all rows).
template <typename Before, typename Pointwise, typename After>
void run_steps(int64_t rows, int64_t step_begin, int64_t step_end, StepThreads threads,
               const Before& before, const Pointwise& pointwise, const After& after) {
  if (threads == StepThreads::PointwisePerStep) {
    for (int64_t step = step_begin; step < step_end; ++step) {
      before(step, 0, rows);
      at::parallel_for(0, rows, 1,
                       [&](int64_t begin, int64_t end) { pointwise(step, begin, end); });
      after(step, 0, rows);
    }
    return;
  }
  const int64_t grain = threads == StepThreads::RowsPerThread ? 1 : std::max<int64_t>(rows, 1);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t step = step_begin; step < step_end; ++step) {
      before(step, begin, end);
      pointwise(step, begin, end);
      after(step, begin, end);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
