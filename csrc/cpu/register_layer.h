// Both passes of the tiniest layers with the whole state in vector registers: float, AVX-512,
// B * H <= 16 hidden units over the batch, B * I <= 32 inputs per step, no lengths, no
// projection (the course's adding problem: B = 3, H = 2, 3000 steps).
//
// There a step is a chain of dependent instructions a few dozen long, and a loop that keeps h,
// c and the gates in memory spends it on loads of values just stored. Here lane b * H + j of a
// vector holds unit j of batch row b; per step and gate, the input and recurrent products are a
// lane permutation and a multiply-add per term (LaneProduct, register_product.h), the cell math
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

#include "register_product.h"
#include "vector_math.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace rnnfast {

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
#if defined(CPU_CAPABILITY_AVX512)
  return !has_lengths && !has_projection && batch * hidden_size <= kLanes &&
         batch * input_size <= 2 * kLanes && batch * hidden_size > 0 && input_size > 0;
#else
  (void)batch, (void)input_size, (void)hidden_size, (void)has_lengths, (void)has_projection;
  return false;
#endif
}

#if defined(CPU_CAPABILITY_AVX512)

using V = at::vec::Vectorized<float>;

// Sizes of one call, as both passes see them. (Weights, wherever passed: w_ih [G, I] and
// w_hh [G, H] row-major; biases [G] or nullptr.)
struct Layer {
  int64_t T_, B, I, H;
  bool reverse;
  int64_t units() const { return B * H; }
  int64_t step_time(int64_t step) const { return reverse ? T_ - 1 - step : step; }
};

// Gate k's input product (x_t [B, I] -> lanes b * H + j) and recurrent product (h [B, H] ->
// the same lanes), and its biases as vectors.
struct GateProducts {
  std::vector<LaneProduct> input, recurrent;
  std::vector<std::array<float, kLanes>> input_bias, recurrent_bias;

  GateProducts(const Layer& l, int gates, const float* w_ih, const float* w_hh, const float* b_ih,
               const float* b_hh) {
    const int64_t H = l.H, I = l.I, units = l.units();
    for (int g = 0; g < gates; ++g) {
      input.emplace_back(
          units, I, [&](int64_t o, int64_t i) { return o / H * I + i; },
          [&](int64_t o, int64_t i) { return w_ih[(g * H + o % H) * I + i]; });
      recurrent.emplace_back(
          units, H, [&](int64_t o, int64_t k) { return o / H * H + k; },
          [&](int64_t o, int64_t k) { return w_hh[(g * H + o % H) * H + k]; });
      std::array<float, kLanes> bias_x{}, bias_h{};
      for (int64_t o = 0; o < units; ++o) {
        bias_x[o] = b_ih ? b_ih[g * H + o % H] : 0.0f;
        bias_h[o] = b_hh ? b_hh[g * H + o % H] : 0.0f;
      }
      input_bias.push_back(bias_x);
      recurrent_bias.push_back(bias_h);
    }
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

// Lanes first .. first + 15 of the steps of a StridedSteps: one masked load per step where a
// step's B * W values are contiguous, else a gather (off the chain of steps, where the
// latency of a step hides it).
class StepReader {
 public:
  StepReader(const StridedSteps& steps, int64_t B, int64_t W, int64_t first = 0)
      : steps_(steps),
        first_(first),
        mask_(first_lanes(B * W - first)),
        contiguous_(steps.column == 1 && steps.row == W) {
    alignas(64) std::array<int32_t, kLanes> offsets{};
    for (int64_t o = first; o < std::min(B * W, first + kLanes); ++o) {
      offsets[o - first] = static_cast<int32_t>(o / W * steps.row + o % W * steps.column);
    }
    offsets_ = _mm512_load_si512(offsets.data());
  }

  __m512 at(int64_t t) const {
    const float* step = steps_.data + t * steps_.step;
    return contiguous_ ? _mm512_maskz_loadu_ps(mask_, step + first_)
                       : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask_, offsets_, step, 4);
  }

 private:
  StridedSteps steps_;
  int64_t first_;
  __mmask16 mask_;
  bool contiguous_;
  __m512i offsets_;
};

// A step's B * I <= 32 inputs as two vectors (lanes 0 .. 15 and 16 .. 31).
class InputReader {
 public:
  InputReader(const StridedSteps& input, int64_t B, int64_t I)
      : low_(input, B, I), high_(input, B, I, kLanes), two_(B * I > kLanes) {}

  std::pair<__m512, __m512> at(int64_t t) const {
    return {low_.at(t), two_ ? high_.at(t) : _mm512_setzero_ps()};
  }

 private:
  StepReader low_, high_;
  bool two_;
};

// input [T, B, I] at its strides; h [B, H] and c [B, H] (LSTM) hold the initial states (zeros
// from zero states) and receive the final ones; output [T, B, H]; workspace
// [T, kSavedPerUnit, B, H] or nullptr (inference).
template <typename Cell>
void forward(const Layer& l, const StridedSteps& input, const float* w_ih, const float* w_hh,
             const float* b_ih, const float* b_hh, float* h, float* c, float* output,
             float* workspace) {
  constexpr int gates = Cell::kGates;
  const GateProducts products(l, gates, w_ih, w_hh, b_ih, b_hh);
  const int64_t units = l.units();
  const __mmask16 unit_mask = first_lanes(units);
  const InputReader input_at(input, l.B, l.I);
  V h_now = _mm512_maskz_loadu_ps(unit_mask, h);
  V c_now = Cell::kHasCellState ? V(_mm512_maskz_loadu_ps(unit_mask, c)) : V(0.0f);
  for (int64_t step = 0; step < l.T_; ++step) {
    const int64_t t = l.step_time(step);
    const auto [x_low, x_high] = input_at.at(t);
    std::array<V, gates> xg, hg;
    for (int g = 0; g < gates; ++g) {
      xg[g] =
          products.input[g].add_to(_mm512_loadu_ps(products.input_bias[g].data()), x_low, x_high);
      hg[g] = products.recurrent[g].add_to(_mm512_loadu_ps(products.recurrent_bias[g].data()),
                                           h_now, _mm512_setzero_ps());
    }
    std::array<V, Cell::kSavedPerUnit + 1> saved;  // + 1: Elman saves nothing
    V h_new(0.0f), c_new(0.0f);
    Cell::forward(1, InRegister{}, xg.data(), hg.data(), h_now, c_now, h_new, c_new,
                  workspace ? saved.data() : nullptr);
    _mm512_mask_storeu_ps(output + t * units, unit_mask, h_new);
    if (workspace) {
      float* saved_step = workspace + t * Cell::kSavedPerUnit * units;
      for (int s = 0; s < Cell::kSavedPerUnit; ++s) {
        _mm512_mask_storeu_ps(saved_step + s * units, unit_mask, saved[s]);
      }
    }
    h_now = h_new;
    c_now = c_new;
  }
  _mm512_mask_storeu_ps(h, unit_mask, h_now);
  if (Cell::kHasCellState) _mm512_mask_storeu_ps(c, unit_mask, c_now);
}

// Lane o = b * H + j of a vector takes lane b * width + column of `in` (x_t with width I,
// h_prev with width H): the factor that meets the gate gradient of unit j of row b in the
// gradient of weight column `column`.
inline std::vector<__m512i> row_broadcasts(int64_t units, int64_t H, int64_t width) {
  std::vector<__m512i> tables;
  for (int64_t column = 0; column < width; ++column) {
    alignas(64) std::array<int32_t, kLanes> at{};
    for (int64_t o = 0; o < units; ++o) at[o] = static_cast<int32_t>(o / H * width + column);
    tables.push_back(_mm512_load_si512(at.data()));
  }
  return tables;
}

// dst[g * H + j][column] (row stride `columns`) = the sum over rows b of lane b * H + j of
// acc[g * columns + column]: per-lane sums over the steps, folded over the batch.
inline void fold_batch(const std::vector<V>& acc, int gates, int64_t B, int64_t H, int64_t columns,
                       float* dst) {
  for (int g = 0; g < gates; ++g) {
    for (int64_t column = 0; column < columns; ++column) {
      alignas(64) std::array<float, kLanes> lanes_of{};
      acc[g * columns + column].store(lanes_of.data());
      for (int64_t j = 0; j < H; ++j) {
        float sum = 0.0f;
        for (int64_t b = 0; b < B; ++b) sum += lanes_of[b * H + j];
        dst[(g * H + j) * columns + column] = sum;
      }
    }
  }
}

// Whether the reverse pass fits too: it keeps gates * (I + H + 1) running sums (a vector per
// gate and weight column, and the bias), which should stay about as many as the 32 vector
// registers; wider layers run the engine's general reverse pass and its GEMMs.
constexpr int64_t kMaxRunningSums = 40;

inline bool backward_fits(int gates, int64_t input_size, int64_t hidden_size) {
  return gates * (input_size + hidden_size + 1) <= kMaxRunningSums;
}

// The reverse pass, with the weight and bias gradients summed in registers over the steps.
// input [T, B, I] and grad_output [T, B, H] at their strides; output and workspace as the
// forward wrote them; hx, cx [B, H] or nullptr (zero initial states); dh [B, H] and dc [B, H]
// (LSTM) hold the gradients of h_n and c_n (or zeros) and receive those of hx and cx. Writes
// grad_input [T, B, I] (or nullptr: not needed), grad_w_ih [G, I], grad_w_hh [G, H] and
// grad_b_ih, grad_b_hh [G] (or nullptr: no biases).
template <typename Cell>
void backward(const Layer& l, const StridedSteps& input, const StridedSteps& grad_output,
              const float* output, const float* workspace, const float* hx, const float* cx,
              const float* w_ih, const float* w_hh, float* dh, float* dc, float* grad_input,
              float* grad_w_ih, float* grad_w_hh, float* grad_b_ih, float* grad_b_hh) {
  constexpr int gates = Cell::kGates;
  const int64_t units = l.units(), H = l.H, I = l.I, inputs = l.B * l.I;
  const __mmask16 unit_mask = first_lanes(units);
  const __mmask16 input_low = first_lanes(inputs), input_high = first_lanes(inputs - kLanes);
  // dh_prev lane b * H + k = sum over gates g and units j of dhg[g] lane b * H + j times
  // W_hh[g * H + j][k]; grad_input lane b * I + i (two vectors) likewise through W_ih, where
  // the input's gradient is wanted.
  std::vector<LaneProduct> recurrent, to_input_low, to_input_high;
  for (int g = 0; g < gates; ++g) {
    recurrent.emplace_back(
        units, H, [&](int64_t o, int64_t j) { return o / H * H + j; },
        [&](int64_t o, int64_t j) { return w_hh[(g * H + j) * H + o % H]; });
    for (int half = 0; grad_input && half < 2; ++half) {
      const int64_t first = half * kLanes;
      const int64_t outputs = std::max<int64_t>(0, std::min<int64_t>(kLanes, inputs - first));
      (half == 0 ? to_input_low : to_input_high)
          .emplace_back(
              outputs, H, [&](int64_t o, int64_t j) { return (first + o) / I * H + j; },
              [&](int64_t o, int64_t j) { return w_ih[(g * H + j) * I + (first + o) % I]; });
    }
  }
  const InputReader input_at(input, l.B, I);
  const StepReader grad_output_at(grad_output, l.B, H);
  const std::vector<__m512i> from_input = row_broadcasts(units, H, I);
  const std::vector<__m512i> from_hidden = row_broadcasts(units, H, H);
  const V zero(0.0f);
  // Per-lane sums over the steps: [gates][I], [gates][H], [gates] (twice for GRU; the other
  // cells' bias gradients are equal).
  std::vector<V> sum_w_ih(gates * I, zero), sum_w_hh(gates * H, zero);
  std::vector<V> sum_b_ih(gates, zero), sum_b_hh(Cell::kSeparateHiddenGateGrad ? gates : 0);

  V dh_next = _mm512_maskz_loadu_ps(unit_mask, dh);
  V dc_next = Cell::kHasCellState ? V(_mm512_maskz_loadu_ps(unit_mask, dc)) : zero;
  for (int64_t step = l.T_ - 1; step >= 0; --step) {
    const int64_t t = l.step_time(step);
    const bool first = step == 0;
    const int64_t t_prev = first ? t : l.step_time(step - 1);
    std::array<V, Cell::kSavedPerUnit + 1> saved;  // Elman's saved value is its output
    if (Cell::kSavedPerUnit == 0) {
      saved[0] = _mm512_maskz_loadu_ps(unit_mask, output + t * units);
    }
    for (int s = 0; s < Cell::kSavedPerUnit; ++s) {
      saved[s] =
          _mm512_maskz_loadu_ps(unit_mask, workspace + (t * Cell::kSavedPerUnit + s) * units);
    }
    const float* h_prev_data = first ? hx : output + t_prev * units;
    const V h_prev = h_prev_data ? V(_mm512_maskz_loadu_ps(unit_mask, h_prev_data)) : zero;
    V c_prev = zero;
    if (Cell::kHasCellState) {
      // The c saved by the previous step (after i, f, g, o), or cx.
      const float* from = first ? cx : workspace + (t_prev * Cell::kSavedPerUnit + 4) * units;
      if (from) c_prev = _mm512_maskz_loadu_ps(unit_mask, from);
    }
    const V dh_now = V(grad_output_at.at(t)) + dh_next;
    std::array<V, gates> dxg, dhg;
    V dc_prev = zero, dh_prev_direct = zero;
    Cell::backward(1, InRegister{}, saved.data(), h_prev, c_prev, dh_now, dc_next, dxg.data(),
                   dhg.data(), dc_prev, dh_prev_direct);
    // For the cells whose hg gradient is their xg gradient, dhg is left as it came.
    const std::array<V, gates>& hidden_grad = Cell::kSeparateHiddenGateGrad ? dhg : dxg;

    // The next (earlier) step's dh: the direct path and the gate gradients through W_hh.
    __m512 dh_prev = dh_prev_direct;
    for (int g = 0; g < gates; ++g) {
      dh_prev = recurrent[g].add_to(dh_prev, hidden_grad[g], _mm512_setzero_ps());
    }
    dh_next = dh_prev;
    dc_next = dc_prev;

    // Off the chain of steps: this step's share of the weight and bias gradients, and of the
    // input's.
    const auto [x_low, x_high] = input_at.at(t);
    for (int g = 0; g < gates; ++g) {
      sum_b_ih[g] = sum_b_ih[g] + dxg[g];
      if (Cell::kSeparateHiddenGateGrad) sum_b_hh[g] = sum_b_hh[g] + hidden_grad[g];
      for (int64_t i = 0; i < I; ++i) {
        sum_w_ih[g * I + i] = _mm512_fmadd_ps(
            dxg[g], _mm512_permutex2var_ps(x_low, from_input[i], x_high), sum_w_ih[g * I + i]);
      }
      for (int64_t k = 0; k < H; ++k) {
        sum_w_hh[g * H + k] = _mm512_fmadd_ps(
            hidden_grad[g], _mm512_permutexvar_ps(from_hidden[k], h_prev), sum_w_hh[g * H + k]);
      }
    }
    if (grad_input) {
      __m512 low = _mm512_setzero_ps(), high = _mm512_setzero_ps();
      for (int g = 0; g < gates; ++g) {
        low = to_input_low[g].add_to(low, dxg[g], _mm512_setzero_ps());
        if (inputs > kLanes) high = to_input_high[g].add_to(high, dxg[g], _mm512_setzero_ps());
      }
      _mm512_mask_storeu_ps(grad_input + t * inputs, input_low, low);
      if (inputs > kLanes) {
        _mm512_mask_storeu_ps(grad_input + t * inputs + kLanes, input_high, high);
      }
    }
  }
  _mm512_mask_storeu_ps(dh, unit_mask, dh_next);
  if (Cell::kHasCellState) _mm512_mask_storeu_ps(dc, unit_mask, dc_next);
  fold_batch(sum_w_ih, gates, l.B, H, I, grad_w_ih);
  fold_batch(sum_w_hh, gates, l.B, H, H, grad_w_hh);
  if (grad_b_ih) {
    fold_batch(sum_b_ih, gates, l.B, H, 1, grad_b_ih);
    fold_batch(Cell::kSeparateHiddenGateGrad ? sum_b_hh : sum_b_ih, gates, l.B, H, 1, grad_b_hh);
  }
}

#endif  // CPU_CAPABILITY_AVX512

}  // namespace register_layer
}  // namespace rnnfast
