// Rows (of a copy, of a cell's math) split over the threads, in shares large enough to repay a
// parallel region.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace rnnfast {

// Below this many values a share of a copy costs less on the calling thread than a region.
constexpr int64_t kCopyGrainValues = 1 << 16;

// fn(begin, end) on rows [0, rows) of values_per_row values each, split over the threads in
// shares of at least share_values values (one share, on the calling thread, below that).
template <typename Fn>
void for_row_shares(int64_t rows, int64_t values_per_row, int64_t share_values, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, share_values / std::max<int64_t>(1, values_per_row));
  at::parallel_for(0, rows, grain, fn);
}

// The same in shares of at least kCopyGrainValues values.
template <typename Fn>
void for_rows_in_copy_shares(int64_t rows, int64_t values_per_row, const Fn& fn) {
  for_row_shares(rows, values_per_row, kCopyGrainValues, fn);
}

}  // namespace rnnfast
