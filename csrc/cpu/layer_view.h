// A call's sizes as the CPU engine's loops see them (LayerView), and the gate-packed view's
// layout.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "../buffer_pool.h"
#include "../layer.h"
#include "capability.h"
#include "vector_math.h"

namespace rnnfast {
namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h

using at::Tensor;

// Sizes of one call as the pointwise loops see them, shared by the forward and backward.
//
// Gate-packed view: with fewer hidden units than a SIMD vector has lanes (and no lengths or
// projection), per-row vectors would be mostly empty. Then the gate buffers of a step are laid
// out [gates][B][H] instead of [B][gates * H] and the loops see ONE row of B * H units
// (B = 1, H = B * H, ...), so a vector covers units of several batch rows. The recurrent
// products (product_rows = the real batch) read or write that layout.
template <typename T>
struct LayerView {
  int64_t T_, B, I, H, P, G, W;
  int64_t product_rows;  // batch rows of the recurrent products
  int64_t unit_hidden;   // hidden units of one batch row
  bool gate_packed;
  bool reverse;
  const int64_t* lengths;  // [B] or nullptr (every row runs all T steps)

  int64_t step_time(int64_t step) const { return reverse ? T_ - 1 - step : step; }
  // The rows a recurrent product runs on for the loop's rows [b_begin, b_end): the gate-packed
  // view's one row holds all batch rows, so its products run on all of them.
  int64_t rows_of_products(int64_t b_begin, int64_t b_end) const {
    return gate_packed ? product_rows : b_end - b_begin;
  }
  int64_t length_of(int64_t b) const { return lengths ? lengths[b] : T_; }
  // Lengths that never increase down the batch (a packed sequence's order): the rows active at
  // a step are a prefix of the batch.
  bool rows_by_length = false;
  // The end of the rows of [b_begin, b_end) that may be active at step t: before the first row
  // that has ended, where rows go by length; else b_end.
  int64_t active_end(int64_t t, int64_t b_begin, int64_t b_end) const {
    if (!rows_by_length) return b_end;
    while (b_begin < b_end) {  // the first row of length <= t
      const int64_t middle = b_begin + (b_end - b_begin) / 2;
      if (lengths[middle] > t) {
        b_begin = middle + 1;
      } else {
        b_end = middle;
      }
    }
    return b_begin;
  }
  bool active(int64_t t, int64_t b) const { return t < length_of(b); }

  // The workspace's rows: [T, B, W] (row t * B + b), or, for a packed sequence (rows by
  // length), [N, W] with the rows of each step that are active only, step after step (N: the
  // sum of the lengths), as torch.nn's packed data holds them.
  std::vector<int64_t> saved_rows_before;  // [T]: the packed workspace's rows before step t
  bool saved_rows_packed() const { return !saved_rows_before.empty(); }
  // Row (t, b) of the workspace; in a packed one, only for a row active at step t.
  int64_t saved_row(int64_t t, int64_t b) const {
    return saved_rows_packed() ? saved_rows_before[t] + b : t * B + b;
  }
  // Lays the workspace's rows out packed; returns their count.
  int64_t pack_saved_rows() {
    saved_rows_before.resize(T_);
    int64_t rows = 0;
    for (int64_t t = 0; t < T_; ++t) {
      saved_rows_before[t] = rows;
      rows += active_end(t, 0, B);
    }
    return rows;
  }
  // The step at which row b starts (its state before that step is hx[b]).
  bool is_first_step(int64_t t, int64_t b) const {
    return reverse ? t == length_of(b) - 1 : t == 0;
  }
  int64_t previous_time(int64_t t) const { return reverse ? t + 1 : t - 1; }
};

template <typename T>
bool use_gate_packing(int64_t batch, int64_t hidden_size, bool has_lengths, bool has_projection) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return !has_lengths && !has_projection && batch > 1 && hidden_size < Vec<T>::size();
  }
  return false;
}

template <typename T>
bool use_gate_packing(const LayerSizes& s) {
  return use_gate_packing<T>(s.batch, s.hidden_size, s.has_lengths, s.has_projection);
}

inline bool uses_gate_packing(at::ScalarType type, int64_t batch, int64_t hidden_size,
                              bool has_lengths, bool has_projection) {
  return type == at::kFloat
             ? use_gate_packing<float>(batch, hidden_size, has_lengths, has_projection)
         : type == at::kDouble
             ? use_gate_packing<double>(batch, hidden_size, has_lengths, has_projection)
             : false;
}

inline bool uses_gate_packing(const LayerSizes& s, at::ScalarType type) {
  return uses_gate_packing(type, s.batch, s.hidden_size, s.has_lengths, s.has_projection);
}

// Whether lengths [B] (int64, contiguous; or undefined) never increase down the batch.
inline bool rows_by_length(const Tensor& lengths) {
  if (!lengths.defined()) return false;
  const int64_t* data = lengths.data_ptr<int64_t>();
  return std::is_sorted(data, data + lengths.numel(), std::greater<int64_t>());
}

// The rows of a packed workspace (LayerView::pack_saved_rows): the sum of the lengths, each at
// most T.
inline int64_t packed_row_count(const Tensor& lengths, int64_t steps) {
  const int64_t* data = lengths.data_ptr<int64_t>();
  int64_t rows = 0;
  for (int64_t b = 0; b < lengths.numel(); ++b) rows += std::min(data[b], steps);
  return rows;
}

template <typename T>
LayerView<T> make_view(const LayerSizes& s, int64_t workspace_cols, bool reverse,
                       const Tensor& lengths) {
  LayerView<T> v;
  v.gate_packed = use_gate_packing<T>(s);
  const int64_t rows = v.gate_packed ? s.batch : 1;  // real rows folded into one
  v.T_ = s.steps;
  v.B = s.batch / rows;
  v.I = s.input_size;
  v.H = s.hidden_size * rows;
  v.P = s.state_size * rows;
  v.G = s.gate_size * rows;
  v.W = workspace_cols * rows;
  v.product_rows = s.batch;
  v.unit_hidden = s.hidden_size;
  v.reverse = reverse;
  v.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  v.rows_by_length = rows_by_length(lengths);
  return v;
}

// [T, B, gates * H] <-> [T, gates, B, H] for the gate-packed view: a copy with the gate and
// batch axes swapped (to_packed: from rows to packed, else back). An element loop: a run is a
// few units (fewer than a vector's lanes), too short for a strided copy or a memcpy call.
template <typename T>
Tensor regroup_gates(const Tensor& from, int64_t gates, bool to_packed) {
  const int64_t T_ = from.size(0), B = from.size(1), H = from.size(2) / gates;
  Tensor to = pooled_empty(from.sizes(), from.options());
  const T* src = from.data_ptr<T>();
  T* dst = to.data_ptr<T>();
  for (int64_t t = 0; t < T_; ++t) {
    const int64_t step = t * B * gates * H;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t g = 0; g < gates; ++g) {
        const int64_t row_at = step + (b * gates + g) * H, packed_at = step + (g * B + b) * H;
        const T* from_run = src + (to_packed ? row_at : packed_at);
        T* to_run = dst + (to_packed ? packed_at : row_at);
        for (int64_t j = 0; j < H; ++j) to_run[j] = from_run[j];
      }
    }
  }
  return to;
}

template <typename T>
T* data_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
