// Both passes of the tiniest layers with the whole state in vector registers: float, AVX-512
// or AVX2, B * H hidden units over the batch in one vector (16 lanes, or 8; the AVX-512 copy
// takes a 256-bit register of 8 where a step fits, with_narrowest_lanes), B * I inputs per step
// in two, no lengths, no projection (the course's adding problem: B = 3, H = 2, 3000 steps).
//
// There a step is a chain of dependent instructions a few dozen long, and a loop that keeps h,
// c and the gates in memory spends it on loads of values just stored. Here lane b * H + j of a
// vector holds unit j of batch row b; per step, the input and recurrent products are a lane
// permutation per term and a multiply-add per term and gate (GateLanes, register_product.h: the
// gates share the permutation; with a product per gate, which permuted the same lanes again for
// each gate, the adding LSTM's forward ran 13% longer, its training step 8-9%), the cell math
// is csrc/cells.h's on those vectors (InRegister: gate k is the k-th vector of an array), and
// only the outputs and the saved values go to memory, in the layouts the rest of the engine
// reads: output [T, B, H], workspace [T, saved, B, H] (the gate-packed view's). The reverse
// pass sums the weight and bias gradients in registers over the steps and writes the input's.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <vector>

#include "capability.h"
#include "register_product.h"
#include "vector_math.h"

namespace rnnfast {
namespace cpu {
inline namespace CPU_CAPABILITY {  // capability.h

// Index of a value that is a whole vector of an array (offset k: the k-th vector).
struct InRegister {};

template <typename A, typename T>
inline A load(const T* row, int offset, InRegister) {
  return row[offset];
}

template <typename T, typename A>
inline void store(T* row, int offset, InRegister, A value) {
  row[offset] = value;
}

namespace register_layer {

constexpr int kLanes = kRegisterLanes;

inline bool fits(int64_t batch, int64_t input_size, int64_t hidden_size, bool has_lengths,
                 bool has_projection) {
#if defined(RNNFAST_LANE_KERNELS)
  return !has_lengths && !has_projection && batch * hidden_size <= kLanes &&
         batch * input_size <= 2 * kLanes && batch * hidden_size > 0 && input_size > 0;
#else
  (void)batch, (void)input_size, (void)hidden_size, (void)has_lengths, (void)has_projection;
  return false;
#endif
}

#if defined(RNNFAST_LANE_KERNELS)

// The cell math's vector on a register of L's lanes: at::vec's where that is as wide, else
// FloatVector8 (vector_math.h).
template <typename L>
struct CellVectorOf {
  using type = at::vec::Vectorized<float>;
  static_assert(type::size() == L::kLanes,
                "the cell math's vectors are the lane kernels' registers");
};
#if defined(CPU_CAPABILITY_AVX512)
template <>
struct CellVectorOf<Lanes256> {
  using type = FloatVector8;
};
#endif
template <typename L>
using CellVector = typename CellVectorOf<L>::type;

// Calls fn(L{}) with the lanes of the narrowest register that holds a step of `units` hidden
// units (B * H) and `inputs` inputs (B * I, in two registers): on 256-bit registers, where they
// fit, the AVX-512 copy runs the same instructions at half the width, which Zen 4 runs in half
// the cycles (its 512-bit operations take a 256-bit unit twice; vector_math.h's FloatVector8
// has the numbers).
template <typename Fn>
inline void with_narrowest_lanes(int64_t units, int64_t inputs, Fn&& fn) {
#if defined(CPU_CAPABILITY_AVX512)
  if (units <= Lanes256::kLanes && inputs <= 2 * Lanes256::kLanes) {
    fn(Lanes256{});
    return;
  }
#endif
  (void)units, (void)inputs;
  fn(lanes{});
}

// Sizes of one call, as both passes see them. (Weights, wherever passed: w_ih [G, I] and
// w_hh [G, H] row-major; biases [G] or nullptr.)
struct Layer {
  int64_t T_, B, I, H;
  bool reverse;
  int64_t units() const { return B * H; }
  int64_t step_time(int64_t step) const { return reverse ? T_ - 1 - step : step; }
};

// The gates' input products (x_t [B, I] -> lanes b * H + j of each gate) and recurrent products
// (h [B, H] -> the same lanes), and their biases.
template <int Gates, typename L>
struct GateProducts {
  using V = CellVector<L>;
  GateLanes<Gates, L> input, recurrent;
  alignas(64) std::array<std::array<float, L::kLanes>, Gates> input_bias{}, recurrent_bias{};

  GateProducts(const Layer& l, const float* w_ih, const float* w_hh, const float* b_ih,
               const float* b_hh)
      : input(
            l.units(), l.I, l.B * l.I > L::kLanes,
            [&](int64_t o, int64_t i) { return o / l.H * l.I + i; },
            [&](int g, int64_t o, int64_t i) { return w_ih[(g * l.H + o % l.H) * l.I + i]; }),
        recurrent(
            l.units(), l.H, false, [&](int64_t o, int64_t k) { return o / l.H * l.H + k; },
            [&](int g, int64_t o, int64_t k) { return w_hh[(g * l.H + o % l.H) * l.H + k]; }) {
    for (int g = 0; g < Gates; ++g) {
      for (int64_t o = 0; o < l.units(); ++o) {
        input_bias[g][o] = b_ih ? b_ih[g * l.H + o % l.H] : 0.0f;
        recurrent_bias[g][o] = b_hh ? b_hh[g * l.H + o % l.H] : 0.0f;
      }
    }
  }

  // The sums as the cell math takes them: gate k is the k-th vector.
  static std::array<V, Gates> as_vectors(const typename GateLanes<Gates, L>::Vectors& sums) {
    std::array<V, Gates> out;
    for (int g = 0; g < Gates; ++g) out[g] = sums[g];
    return out;
  }
};

// A [T, B, W] tensor read a step at a time at any strides (a batch_first input or output
// gradient is a transposed view, the gradient of output.sum() a broadcast scalar): lane
// b * W + i of step t is data[t * step + b * row + i * column].
struct StridedSteps {
  const float* data;
  int64_t step, row, column;

  // Whether the gather's 32-bit offsets hold every index within a step of B rows of W values.
  static bool fits(int64_t B, int64_t W, int64_t row, int64_t column) {
    return (B - 1) * row + (W - 1) * column <= INT32_MAX;
  }
};

// Lanes first .. first + L::kLanes - 1 of the T steps of a StridedSteps: one masked load per
// step where a step's B * W values are contiguous, else a gather (off the chain of steps, where
// the latency of a step hides it); steps that are all the same, once.
template <typename L>
class StepReader {
 public:
  StepReader(const StridedSteps& steps, int64_t T, int64_t B, int64_t W, int64_t first = 0)
      : steps_(steps),
        first_(first),
        last_whole_(T > 0 ? (T - 1) * steps.step + B * W - L::kLanes : -1),
        mask_(L::first(B * W - first)),
        contiguous_(steps.column == 1 && steps.row == W),
        same_every_step_(steps.step == 0 && T > 0),
        every_step_(L::zero()) {
    alignas(64) std::array<int32_t, L::kLanes> offsets{};
    for (int64_t o = first; o < std::min<int64_t>(B * W, first + L::kLanes); ++o) {
      offsets[o - first] = static_cast<int32_t>(o / W * steps.row + o % W * steps.column);
    }
    offsets_ = L::load_index(offsets.data());
    if (same_every_step_) every_step_ = read(0);
  }

  typename L::Vector at(int64_t t) const { return same_every_step_ ? every_step_ : read(t); }

 private:
  typename L::Vector read(int64_t t) const {
    const float* step = steps_.data + t * steps_.step;
    if (!contiguous_) return L::gather(mask_, offsets_, step);
    const int64_t offset = t * steps_.step + first_;
    return offset <= last_whole_ ? L::load_whole(mask_, steps_.data + offset)
                                 : L::load(mask_, steps_.data + offset);
  }

  StridedSteps steps_;
  int64_t first_;
  int64_t last_whole_;  // the last offset whose whole vector lies within the steps' memory
  typename L::Mask mask_;
  bool contiguous_;
  // Steps at stride 0 (a broadcast, as the gradient of output.sum()) are read once.
  bool same_every_step_;
  typename L::Index offsets_;
  typename L::Vector every_step_;
};

// Rows of `length` floats of memory read under a mask (saved values, outputs): a row whose
// whole vector lies within the memory reads it whole (L::load_whole).
template <typename L>
class RowReader {
 public:
  RowReader(const float* data, int64_t length, typename L::Mask mask)
      : data_(data), last_whole_(length - L::kLanes), mask_(mask) {}

  typename L::Vector load(int64_t offset) const {
    return offset <= last_whole_ ? L::load_whole(mask_, data_ + offset)
                                 : L::load(mask_, data_ + offset);
  }

 private:
  const float* data_;
  int64_t last_whole_;
  typename L::Mask mask_;
};

// Where a pass writes the rows of a buffer of `length` floats (outputs, saved values, the
// input's gradient) in ascending memory order, a row's store may spill its vector's lanes past
// the row onto the rows after it, which the pass writes later (L::store_whole). Rows whose
// vector would pass the buffer's end, and passes in descending order, store under the mask.
template <typename L>
class RowWriter {
 public:
  RowWriter(float* data, int64_t length, typename L::Mask mask, bool ascending)
      : data_(data), last_whole_(ascending ? length - L::kLanes : -1), mask_(mask) {}

  void store(int64_t offset, typename L::Vector v) const {
    if (offset <= last_whole_) {
      L::store_whole(data_ + offset, mask_, v);
    } else {
      L::store(data_ + offset, mask_, v);
    }
  }

 private:
  float* data_;
  int64_t last_whole_;  // -1: none
  typename L::Mask mask_;
};

// A step's B * I <= 2 * L::kLanes inputs as two vectors.
template <typename L>
class InputReader {
 public:
  InputReader(const StridedSteps& input, int64_t T, int64_t B, int64_t I)
      : low_(input, T, B, I), high_(input, T, B, I, L::kLanes), two_(B * I > L::kLanes) {}

  std::pair<typename L::Vector, typename L::Vector> at(int64_t t) const {
    return {low_.at(t), two_ ? high_.at(t) : L::zero()};
  }

 private:
  StepReader<L> low_, high_;
  bool two_;
};

// input [T, B, I] at its strides; h [B, H] and c [B, H] (LSTM) hold the initial states (zeros
// from zero states) and receive the final ones; output [T, B, H]; workspace
// [T, kSavedPerUnit, B, H] or nullptr (inference). L: the register's lanes (B * H <= L::kLanes,
// B * I <= 2 * L::kLanes).
template <typename Cell, typename L>
void forward(const Layer& l, const StridedSteps& input, const float* w_ih, const float* w_hh,
             const float* b_ih, const float* b_hh, float* h, float* c, float* output,
             float* workspace) {
  constexpr int gates = Cell::kGates;
  using V = CellVector<L>;
  const GateProducts<gates, L> products(l, w_ih, w_hh, b_ih, b_hh);
  const int64_t units = l.units();
  const typename L::Mask unit_mask = L::first(units);
  const InputReader<L> input_at(input, l.T_, l.B, l.I);
  const RowWriter<L> output_rows(output, l.T_ * units, unit_mask, !l.reverse);
  const RowWriter<L> saved_rows(workspace, l.T_ * Cell::kSavedPerUnit * units, unit_mask,
                                !l.reverse);
  V h_now = L::load(unit_mask, h);
  V c_now = Cell::kHasCellState ? V(L::load(unit_mask, c)) : V(0.0f);
  for (int64_t step = 0; step < l.T_; ++step) {
    const int64_t t = l.step_time(step);
    const auto [x_low, x_high] = input_at.at(t);
    typename GateLanes<gates, L>::Vectors x_sums, h_sums;
    for (int g = 0; g < gates; ++g) {
      x_sums[g] = L::load(products.input_bias[g].data());
      h_sums[g] = L::load(products.recurrent_bias[g].data());
    }
    products.input.each(x_sums, x_low, x_high);
    products.recurrent.each(h_sums, h_now, L::zero());
    const std::array<V, gates> xg = GateProducts<gates, L>::as_vectors(x_sums);
    const std::array<V, gates> hg = GateProducts<gates, L>::as_vectors(h_sums);
    std::array<V, Cell::kSavedPerUnit + 1> saved;  // + 1: Elman saves nothing
    V h_new(0.0f), c_new(0.0f);
    Cell::forward(1, InRegister{}, xg.data(), hg.data(), h_now, c_now, h_new, c_new,
                  workspace ? saved.data() : nullptr);
    output_rows.store(t * units, h_new);
    for (int s = 0; workspace && s < Cell::kSavedPerUnit; ++s) {
      saved_rows.store((t * Cell::kSavedPerUnit + s) * units, saved[s]);
    }
    h_now = h_new;
    c_now = c_new;
  }
  L::store(h, unit_mask, h_now);
  if (Cell::kHasCellState) L::store(c, unit_mask, c_now);
}

// Lane o = b * H + j of a vector takes lane b * width + column of `in` (x_t with width I,
// h_prev with width H): the factor that meets the gate gradient of unit j of row b in the
// gradient of weight column `column`.
template <typename L>
std::vector<typename L::Index> row_broadcasts(int64_t units, int64_t H, int64_t width) {
  std::vector<typename L::Index> tables;
  for (int64_t column = 0; column < width; ++column) {
    std::array<int32_t, L::kLanes> at{};
    for (int64_t o = 0; o < units; ++o) at[o] = static_cast<int32_t>(o / H * width + column);
    tables.push_back(L::load_index(at.data()));
  }
  return tables;
}

// dst[g * H + j][column] (row stride `columns`) = the sum over rows b of lane b * H + j of
// acc[g * columns + column]: per-lane sums over the steps, folded over the batch.
template <typename L>
void fold_batch(const std::vector<CellVector<L>>& acc, int gates, int64_t B, int64_t H,
                int64_t columns, float* dst) {
  for (int g = 0; g < gates; ++g) {
    for (int64_t column = 0; column < columns; ++column) {
      alignas(64) std::array<float, L::kLanes> lanes_of{};
      L::store(lanes_of.data(), L::first(L::kLanes), acc[g * columns + column]);
      for (int64_t j = 0; j < H; ++j) {
        float sum = 0.0f;
        for (int64_t b = 0; b < B; ++b) sum += lanes_of[b * H + j];
        dst[(g * H + j) * columns + column] = sum;
      }
    }
  }
}

// Whether the reverse pass fits too: it keeps gates * (I + H + 1) running sums (a vector per
// gate and weight column, and the bias), which should stay about as many as the vector
// registers (32 with AVX-512, 16 with AVX2); wider layers run the engine's general reverse pass
// and its GEMMs.
constexpr int64_t kMaxRunningSums = kLanes == 16 ? 40 : 20;

inline bool backward_fits(int gates, int64_t input_size, int64_t hidden_size) {
  return gates * (input_size + hidden_size + 1) <= kMaxRunningSums;
}

// The reverse pass, with the weight and bias gradients summed in registers over the steps.
// input [T, B, I] and grad_output [T, B, H] at their strides; output and workspace as the
// forward wrote them; hx, cx [B, H] or nullptr (zero initial states); dh [B, H] and dc [B, H]
// (LSTM) hold the gradients of h_n and c_n (or zeros) and receive those of hx and cx. Writes
// grad_input [T, B, I] (or nullptr: not needed), grad_w_ih [G, I], grad_w_hh [G, H] and
// grad_b_ih, grad_b_hh [G] (or nullptr: no biases). L: as the forward's.
template <typename Cell, typename L>
void backward(const Layer& l, const StridedSteps& input, const StridedSteps& grad_output,
              const float* output, const float* workspace, const float* hx, const float* cx,
              const float* w_ih, const float* w_hh, float* dh, float* dc, float* grad_input,
              float* grad_w_ih, float* grad_w_hh, float* grad_b_ih, float* grad_b_hh) {
  using V = CellVector<L>;
  constexpr int gates = Cell::kGates, kLanes = L::kLanes;
  const int64_t units = l.units(), H = l.H, I = l.I, inputs = l.B * l.I;
  const typename L::Mask unit_mask = L::first(units);
  const typename L::Mask input_low = L::first(inputs), input_high = L::first(inputs - kLanes);
  // dh_prev lane b * H + k = sum over gates g and units j of dhg[g] lane b * H + j times
  // W_hh[g * H + j][k]; grad_input lane b * I + i (two vectors) likewise through W_ih, where
  // the input's gradient is wanted.
  const GateLanes<gates, L> recurrent(
      units, H, false, [&](int64_t o, int64_t j) { return o / H * H + j; },
      [&](int g, int64_t o, int64_t j) { return w_hh[(g * H + j) * H + o % H]; });
  const auto to_input = [&](int64_t first) {
    const int64_t outputs = std::max<int64_t>(0, std::min<int64_t>(kLanes, inputs - first));
    return GateLanes<gates, L>(
        outputs, H, false, [&](int64_t o, int64_t j) { return (first + o) / I * H + j; },
        [&](int g, int64_t o, int64_t j) { return w_ih[(g * H + j) * I + (first + o) % I]; });
  };
  const GateLanes<gates, L> to_input_low = to_input(0), to_input_high = to_input(kLanes);
  const InputReader<L> input_at(input, l.T_, l.B, I);
  // The reverse pass visits the steps in descending order of time.
  const RowWriter<L> grad_input_low(grad_input, l.T_ * inputs, input_low, l.reverse);
  const RowWriter<L> grad_input_high(grad_input, l.T_ * inputs, input_high, l.reverse);
  const StepReader<L> grad_output_at(grad_output, l.T_, l.B, H);
  const RowReader<L> output_rows(output, l.T_ * units, unit_mask);
  const RowReader<L> saved_rows(workspace, l.T_ * Cell::kSavedPerUnit * units, unit_mask);
  const std::vector<typename L::Index> from_input = row_broadcasts<L>(units, H, I);
  const std::vector<typename L::Index> from_hidden = row_broadcasts<L>(units, H, H);
  const V zero(0.0f);
  // Per-lane sums over the steps: [gates][I], [gates][H], [gates] (twice for GRU; the other
  // cells' bias gradients are equal).
  std::vector<V> sum_w_ih(gates * I, zero), sum_w_hh(gates * H, zero);
  std::vector<V> sum_b_ih(gates, zero), sum_b_hh(Cell::kSeparateHiddenGateGrad ? gates : 0);

  V dh_next = L::load(unit_mask, dh);
  V dc_next = Cell::kHasCellState ? V(L::load(unit_mask, dc)) : zero;
  for (int64_t step = l.T_ - 1; step >= 0; --step) {
    const int64_t t = l.step_time(step);
    const bool first = step == 0;
    const int64_t t_prev = first ? t : l.step_time(step - 1);
    std::array<V, Cell::kSavedPerUnit + 1> saved;  // Elman's saved value is its output
    if (Cell::kSavedPerUnit == 0) saved[0] = output_rows.load(t * units);
    for (int s = 0; s < Cell::kSavedPerUnit; ++s) {
      saved[s] = saved_rows.load((t * Cell::kSavedPerUnit + s) * units);
    }
    V h_prev = zero, c_prev = zero;
    if (!first) {
      h_prev = output_rows.load(t_prev * units);
      // The c saved by the previous step (after i, f, g, o).
      if (Cell::kHasCellState) c_prev = saved_rows.load((t_prev * Cell::kSavedPerUnit + 4) * units);
    } else {
      if (hx) h_prev = L::load(unit_mask, hx);
      if (Cell::kHasCellState && cx) c_prev = L::load(unit_mask, cx);
    }
    const V dh_now = V(grad_output_at.at(t)) + dh_next;
    std::array<V, gates> dxg, dhg;
    V dc_prev = zero, dh_prev_direct = zero;
    Cell::backward(1, InRegister{}, saved.data(), h_prev, c_prev, dh_now, dc_next, dxg.data(),
                   dhg.data(), dc_prev, dh_prev_direct);
    typename GateLanes<gates, L>::Vectors input_grad, hidden_grad;
    for (int g = 0; g < gates; ++g) {
      input_grad[g] = dxg[g];
      // For the cells whose hg gradient is their xg gradient, dhg is left as it came.
      hidden_grad[g] = Cell::kSeparateHiddenGateGrad ? dhg[g] : dxg[g];
    }

    // The next (earlier) step's dh: the direct path and the gate gradients through W_hh.
    dh_next = recurrent.sum(dh_prev_direct, hidden_grad);
    dc_next = dc_prev;

    // Off the chain of steps: this step's share of the weight and bias gradients, and of the
    // input's.
    const auto [x_low, x_high] = input_at.at(t);
    for (int g = 0; g < gates; ++g) {
      sum_b_ih[g] = sum_b_ih[g] + V(input_grad[g]);
      if (Cell::kSeparateHiddenGateGrad) sum_b_hh[g] = sum_b_hh[g] + V(hidden_grad[g]);
    }
    for (int64_t i = 0; i < I; ++i) {
      const typename L::Vector x_i = L::permute(x_low, from_input[i], x_high);
      for (int g = 0; g < gates; ++g) {
        sum_w_ih[g * I + i] = L::fmadd(input_grad[g], x_i, sum_w_ih[g * I + i]);
      }
    }
    for (int64_t k = 0; k < H; ++k) {
      const typename L::Vector h_k = L::permute(from_hidden[k], h_prev);
      for (int g = 0; g < gates; ++g) {
        sum_w_hh[g * H + k] = L::fmadd(hidden_grad[g], h_k, sum_w_hh[g * H + k]);
      }
    }
    if (grad_input) {
      grad_input_low.store(t * inputs, to_input_low.sum(L::zero(), input_grad));
      if (inputs > kLanes) {
        grad_input_high.store(t * inputs + kLanes, to_input_high.sum(L::zero(), input_grad));
      }
    }
  }
  L::store(dh, unit_mask, dh_next);
  if (Cell::kHasCellState) L::store(dc, unit_mask, dc_next);
  fold_batch<L>(sum_w_ih, gates, l.B, H, I, grad_w_ih);
  fold_batch<L>(sum_w_hh, gates, l.B, H, H, grad_w_hh);
  if (grad_b_ih) {
    fold_batch<L>(sum_b_ih, gates, l.B, H, 1, grad_b_ih);
    fold_batch<L>(Cell::kSeparateHiddenGateGrad ? sum_b_hh : sum_b_ih, gates, l.B, H, 1, grad_b_hh);
  }
}

#endif  // RNNFAST_LANE_KERNELS

}  // namespace register_layer
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace rnnfast
